"""From the region head's outputs to detections (Sec. 4.2, 5.2; Fast R-CNN's inference).

Per image: softmax over the K+1 classes; each RoI is regressed once per class with that
class's deltas; boxes are clipped to the image; the background column is dropped; every
(RoI, class) pair scoring above a threshold is a candidate; NMS runs within each class (two
different objects may share a box, e.g. a person on a horse); the image keeps its top 100.
The values (0.05, 0.5, 100) are Detectron's, whose FPN models the paper's numbers come from.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor
from torchvision.ops import batched_nms

from .box_coder import FAST_RCNN_BOX_WEIGHTS, clip_boxes, decode, usable_boxes
from .parallel_pieces import map_pieces


def _detections_for_image(
    logits: Tensor,
    deltas: Tensor,
    rois: Tensor,
    image_hw: tuple[int, int],
    score_thresh: float,
    nms_thresh: float,
    detections_per_img: int,
    min_size: float,
    weights: Sequence[float],
) -> dict[str, Tensor]:
    num_rois, num_classes = logits.shape
    # float32: under autocast the head's outputs may be half precision.
    logits, deltas, rois = logits.float(), deltas.float(), rois.float()
    scores = torch.softmax(logits, dim=-1)
    # [R, K+1, 4]: RoI r regressed with the deltas of class k.
    boxes = decode(deltas.reshape(num_rois, num_classes, 4), rois[:, None, :], weights)
    boxes = clip_boxes(boxes, image_hw)
    labels = torch.arange(num_classes, device=logits.device).expand(num_rois, num_classes)

    # Drop the background column, then flatten to one candidate per (RoI, class).
    boxes = boxes[:, 1:].reshape(-1, 4)
    scores = scores[:, 1:].reshape(-1)
    labels = labels[:, 1:].reshape(-1)

    keep = torch.nonzero((scores > score_thresh) & usable_boxes(boxes, min_size)).squeeze(1)
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    # The label is the NMS group: boxes only suppress boxes of their own class. batched_nms
    # returns indices by decreasing score, so the slice keeps the image's best detections.
    keep = batched_nms(boxes, scores, labels, nms_thresh)[:detections_per_img]
    return {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}


@torch.no_grad()
def detections_from_head(
    class_logits: Tensor,
    box_deltas: Tensor,
    rois_per_image: Sequence[Tensor],
    image_hws: Sequence[tuple[int, int]],
    score_thresh: float = 0.05,
    nms_thresh: float = 0.5,
    detections_per_img: int = 100,
    min_size: float = 1e-2,
    weights: Sequence[float] = FAST_RCNN_BOX_WEIGHTS,
) -> list[dict[str, Tensor]]:
    """Detections per image: dicts with ``boxes`` ``[D, 4]`` xyxy, ``scores`` ``[D]``, ``labels``
    int64 ``[D]`` in ``1..K`` (contiguous; mapping back to dataset category ids is the caller's).

    ``class_logits`` ``[R, K+1]`` and ``box_deltas`` ``[R, 4(K+1)]`` for all images' RoIs,
    concatenated in the order of ``rois_per_image`` (one ``[R_i, 4]`` tensor per image);
    ``image_hws`` the ``(H, W)`` each image's boxes are clipped to. Candidates need a score
    strictly above ``score_thresh`` and both sides >= ``min_size`` after clipping (the default
    drops boxes clipped to a zero-width sliver on the image border). ``D <= detections_per_img``.
    """
    counts = [r.shape[0] for r in rois_per_image]
    if sum(counts) != class_logits.shape[0] or box_deltas.shape[0] != class_logits.shape[0]:
        raise ValueError(f"rois_per_image hold {sum(counts)} RoIs, the head outputs "
                         f"{class_logits.shape[0]} and {box_deltas.shape[0]} rows")
    # per image at once on a CPU (parallel_pieces): NMS is a one-core kernel
    return map_pieces(lambda lg, dt, rois, hw: _detections_for_image(lg, dt, rois, hw, score_thresh, nms_thresh,
                                                                     detections_per_img, min_size, weights),
                      class_logits.split(counts), box_deltas.split(counts), rois_per_image, image_hws,
                      device=class_logits.device)
