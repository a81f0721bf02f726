"""The box parametrization shared by the RPN and Fast R-CNN heads.

FPN changes where anchors live, not how boxes are regressed: its RPN and Fast R-CNN heads
keep Faster R-CNN's regression (Sec. 4.1-4.2; "other implementation details are as in
[29]", Sec. 5.1), i.e. the R-CNN parametrization (Girshick et al., 2014)::

    tx = (x - xa) / wa,   ty = (y - ya) / ha,   tw = log(w / wa),   th = log(h / ha)

``(x, y)`` box centre, ``w, h`` its size; ``a`` the reference box (anchor or proposal).
Boxes are ``(x1, y1, x2, y2)`` with width ``x2 - x1`` (no "+1", as Detectron2 and
torchvision). ``weights`` ``(wx, wy, ww, wh)`` multiply the deltas: 1s for the RPN,
``(10, 10, 5, 5)`` for the Fast R-CNN heads, which roughly whitens their targets.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor
from torchvision.ops import clip_boxes_to_image

from .lean_ops import finite

# Cap on dw, dh before exp(): early in training the heads emit wild deltas, and exp() of
# them overflows to inf (then NaN losses). A box 1000/16 = 62.5x its reference is already
# absurd, so nothing legitimate is lost (value of Detectron / Faster R-CNN).
BBOX_CLAMP = math.log(1000.0 / 16)

Weights = Sequence[float]
# (wx, wy, ww, wh) of Fast R-CNN's box regression: scales the targets to roughly unit
# variance (the values of Fast R-CNN, Detectron and torchvision).
FAST_RCNN_BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)


def _centre_size(boxes: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    w = boxes[..., 2] - boxes[..., 0]
    h = boxes[..., 3] - boxes[..., 1]
    return boxes[..., 0] + 0.5 * w, boxes[..., 1] + 0.5 * h, w, h


def encode(reference: Tensor, target: Tensor, weights: Weights = (1.0, 1.0, 1.0, 1.0)) -> Tensor:
    """Regression targets ``[..., 4]`` that take ``reference`` boxes onto ``target`` boxes.

    Both must have positive width and height (``log`` of a zero size is ``-inf``).
    Leading dimensions broadcast.
    """
    wx, wy, ww, wh = weights
    xa, ya, wa, ha = _centre_size(reference)
    x, y, w, h = _centre_size(target)
    return torch.stack(
        [wx * (x - xa) / wa, wy * (y - ya) / ha, ww * torch.log(w / wa), wh * torch.log(h / ha)], dim=-1
    )


def decode(
    deltas: Tensor,
    reference: Tensor,
    weights: Weights = (1.0, 1.0, 1.0, 1.0),
    clamp: float = BBOX_CLAMP,
) -> Tensor:
    """Inverse of :func:`encode`: apply ``deltas`` ``[..., 4]`` to ``reference`` ``[..., 4]``.

    Leading dimensions broadcast (e.g. deltas ``[B, N, 4]`` with anchors ``[N, 4]``).
    ``dw, dh`` are clamped to ``clamp`` (after removing the weights) so ``exp`` stays finite.
    """
    wx, wy, ww, wh = weights
    xa, ya, wa, ha = _centre_size(reference.to(deltas.dtype))
    dx = deltas[..., 0] / wx
    dy = deltas[..., 1] / wy
    dw = (deltas[..., 2] / ww).clamp(max=clamp)
    dh = (deltas[..., 3] / wh).clamp(max=clamp)
    cx = dx * wa + xa
    cy = dy * ha + ya
    half_w = 0.5 * torch.exp(dw) * wa
    half_h = 0.5 * torch.exp(dh) * ha
    return torch.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], dim=-1)


def clip_boxes(boxes: Tensor, image_hw: tuple[int, int]) -> Tensor:
    """Clip ``[..., 4]`` xyxy boxes to ``[0, W] x [0, H]`` (new tensor)."""
    return clip_boxes_to_image(boxes, (image_hw[0], image_hw[1]))


def clip_boxes_per_image(boxes: Tensor, image_hws: Sequence[tuple[int, int]],
                         counts: Sequence[int] | None = None) -> Tensor:
    """:func:`clip_boxes` of each image's boxes to its own size: ``boxes`` ``[N, ..., 4]`` with
    image ``i`` in row ``i``, or, with ``counts``, ``[sum(counts), ..., 4]`` with the images'
    boxes one after the other. A batch of one size (the usual case) is clipped in one call: on
    CUDA each call is half a dozen operators launched from the host."""
    if not image_hws:  # no image, no box
        return boxes
    if len(set(image_hws)) == 1:
        return clip_boxes(boxes, image_hws[0])
    parts = boxes.unbind(0) if counts is None else boxes.split(list(counts))
    clipped = [clip_boxes(b, hw) for b, hw in zip(parts, image_hws, strict=True)]
    return torch.stack(clipped) if counts is None else torch.cat(clipped)


def usable_boxes(boxes: Tensor, min_size: float) -> Tensor:
    """Bool mask of the ``[..., 4]`` xyxy boxes that are finite and at least ``min_size`` wide and
    high (``torchvision.ops.remove_small_boxes`` as a mask, so a caller can combine it with its
    own conditions and index once: on CUDA every index of a mask waits for the GPU)."""
    # width and height as one [..., 2] difference: half the operators of one per side (on CUDA,
    # each is launched from the host), the same subtractions
    sides = boxes[..., 2:] - boxes[..., :2]
    return (sides >= min_size).all(dim=-1) & finite(boxes).all(dim=-1)
