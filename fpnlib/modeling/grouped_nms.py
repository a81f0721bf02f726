"""NMS within groups (classes, pyramid levels) with fewer waits on the GPU (speed only).

Not in the paper. ``torchvision.ops.batched_nms`` has two ways on CUDA:

* up to 25000 boxes, the *coordinate trick*: each group is shifted far from the others and one
  ``nms`` runs over all boxes. Its suppression mask has n^2 bits and goes to the host: after
  the head, 1000 RoIs x 90 classes give up to 90000 candidates, which is tens of megabytes per
  image;
* above 25000, a loop over the groups: ``torch.unique``, then per group a ``torch.where`` and
  an ``nms``. Each of these waits for the GPU, about twice per class.

``grouped_nms`` orders the boxes by group once. The sort is stable, so each group keeps its
boxes in their original order, the order ``torch.where`` gives. The group sizes come back in
one wait, and each group is a contiguous slice: one small ``nms`` per non-empty group, and
nothing else waits. The kept indices and their order are computed as in torchvision's loop,
so the output is exactly per-group NMS (``tests/test_grouped_nms.py``, ``tests/test_cuda.py``).
The coordinate trick can differ from per-group NMS in float rounding, since the shifted
coordinates are large. On a CPU, and on CUDA up to ``CUDA_SEGMENTS_ABOVE`` boxes, this simply
calls ``batched_nms``.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import batched_nms, nms

CUDA_SEGMENTS_ABOVE = 5000  # boxes; below, one coordinate-trick nms is cheap enough


def grouped_nms(boxes: Tensor, scores: Tensor, groups: Tensor, iou_threshold: float,
                force_segments: bool = False) -> Tensor:
    """Indices of the boxes kept by NMS run separately within each group (``groups``: int64,
    >= 0), sorted by decreasing score, as ``torchvision.ops.batched_nms``. ``force_segments``
    takes the sliced path on any device (for the tests)."""
    if not force_segments and (boxes.device.type != "cuda" or boxes.shape[0] <= CUDA_SEGMENTS_ABOVE):
        return batched_nms(boxes, scores, groups, iou_threshold)
    if boxes.shape[0] == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    order = torch.argsort(groups, stable=True)
    sizes = torch.bincount(groups).tolist()  # the one wait for all groups
    keep_mask = torch.zeros_like(groups, dtype=torch.bool)
    start = 0
    for size in sizes:
        if size:
            members = order[start:start + size]
            keep_mask[members[nms(boxes[members], scores[members], iou_threshold)]] = True
            start += size
    keep = torch.where(keep_mask)[0]
    return keep[scores[keep].sort(descending=True)[1]]
