"""The per-image minibatch of RoIs that trains the Fast R-CNN head (Sec. 4.2, 5.2).

FPN keeps Fast R-CNN's training recipe for its region head (Sec. 5.2: "each mini-batch
involves 2 images per GPU and 512 RoIs per image"; the rest "as in [Fast R-CNN]"):

* the ground-truth boxes are added to the image's proposals, so that every object has at
  least one perfect foreground RoI, even when the RPN missed it (early in joint training it
  misses most);
* an RoI is foreground if its IoU with some ground-truth box is >= 0.5 and takes that
  box's class; it is background (class 0) if its best IoU lies in [lo, 0.5). Fast R-CNN used
  lo = 0.1 as a crude hard-negative heuristic; Detectron's FPN uses lo = 0, the default here;
* 512 RoIs are drawn per image, at most 25% of them foreground; background fills the rest.

Each foreground RoI also gets its regression target, the box deltas that take it onto its
matched ground-truth box, in the weighted parametrization of the Fast R-CNN heads
(:data:`FAST_RCNN_BOX_WEIGHTS`). The head predicts one set of deltas per class; the loss
reads the foreground RoI's own class (:func:`fpnlib.modeling.box_head.fast_rcnn_losses`).
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import Tensor
from torchvision.ops import box_iou

from .anchor_labels import IGNORE, NEGATIVE, POSITIVE, inside_ignore_boxes, sample_anchors
from .box_coder import FAST_RCNN_BOX_WEIGHTS, encode


class SampledRoIs(NamedTuple):
    """One image's RoI minibatch: foreground rows first, then background.

    ``rois`` ``[R, 4]`` xyxy; ``labels`` int64 ``[R]`` (0 = background, else the gt class);
    ``regression_targets`` ``[R, 4]`` (zeros for background); ``matched_idx`` int64 ``[R]``
    the index of each RoI's best gt (meaningful for foreground only; 0 when there is none).
    """

    rois: Tensor
    labels: Tensor
    regression_targets: Tensor
    matched_idx: Tensor


def sample_rois(
    proposals: Tensor,
    gt_boxes: Tensor,
    gt_labels: Tensor,
    batch_size_per_image: int = 512,
    positive_fraction: float = 0.25,
    fg_iou: float = 0.5,
    bg_iou_hi: float = 0.5,
    bg_iou_lo: float = 0.0,
    generator: torch.Generator | None = None,
    ignore_boxes: Tensor | None = None,
    ignore_ioa: float = 0.5,
    weights: Sequence[float] = FAST_RCNN_BOX_WEIGHTS,
) -> SampledRoIs:
    """Label and sample one image's RoIs for the Fast R-CNN loss (Sec. 4.2, 5.2).

    ``proposals`` ``[P, 4]``, ``gt_boxes`` ``[G, 4]`` xyxy and ``gt_labels`` int64 ``[G]``
    in ``1..K`` (``G`` may be 0: an image without objects yields background only).
    Foreground: best IoU >= ``fg_iou``; background: best IoU in ``[bg_iou_lo, bg_iou_hi)``;
    anything else is not sampled. At most ``int(batch_size_per_image * positive_fraction)``
    foreground RoIs are drawn, background fills the rest (fewer candidates, fewer RoIs).

    ``ignore_boxes`` ``[C, 4]`` (COCO ``iscrowd`` regions, kept out of ``gt_boxes``): a
    non-foreground RoI lying more than ``ignore_ioa`` inside one of them is not drawn as
    background, since it probably covers unlabelled objects (same rule as the RPN's anchors).

    Proposals are detached: no gradient flows from the head into the RPN's boxes
    (approximate joint training, as Faster R-CNN). ``generator`` seeds the draw.
    """
    # The gt boxes join the candidates (Fast R-CNN): each object is guaranteed a foreground
    # RoI with IoU 1, whatever the proposals.
    gt_boxes = gt_boxes.to(proposals.dtype)
    candidates = torch.cat([proposals.detach(), gt_boxes])
    num = candidates.shape[0]
    device = candidates.device

    if gt_boxes.shape[0] == 0:
        max_iou = candidates.new_zeros(num)
        matched = torch.zeros(num, dtype=torch.int64, device=device)
    else:
        max_iou, matched = box_iou(gt_boxes, candidates).max(dim=0)  # best gt of each candidate

    # torch.where, not flags[mask] = v: a mask index waits for the GPU, where does not
    flags = torch.where((max_iou >= bg_iou_lo) & (max_iou < bg_iou_hi), NEGATIVE, IGNORE)
    # Foreground last: with overlapping ranges (bg_iou_hi > fg_iou) foreground wins.
    flags = torch.where(max_iou >= fg_iou, POSITIVE, flags)
    if ignore_boxes is not None and ignore_boxes.numel() > 0 and num > 0:
        crowd = inside_ignore_boxes(candidates, ignore_boxes.to(candidates.dtype), ignore_ioa)
        flags = torch.where(crowd & (flags == NEGATIVE), IGNORE, flags)

    # The same draw as the RPN's anchors: a random capped subset of positives, then negatives.
    fg, bg = sample_anchors(flags, batch_size_per_image, positive_fraction, generator)
    keep = torch.cat([fg, bg])
    rois = candidates[keep]
    matched = matched[keep]

    labels = torch.zeros(keep.numel(), dtype=torch.int64, device=device)
    targets = rois.new_zeros((keep.numel(), 4))
    num_fg = fg.numel()
    if num_fg > 0:
        labels[:num_fg] = gt_labels.to(device=device, dtype=torch.int64)[matched[:num_fg]]
        # Encoded for foreground only: a background RoI may be degenerate (a proposal clipped
        # to a zero-width sliver), whose log-size target would be -inf.
        targets[:num_fg] = encode(rois[:num_fg], gt_boxes[matched[:num_fg]], weights)
    return SampledRoIs(rois, labels, targets, matched)
