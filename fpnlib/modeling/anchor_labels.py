"""Training labels for anchors and the per-image minibatch of anchors (Sec. 4.1, 5.1).

FPN labels anchors exactly as Faster R-CNN does (Sec. 4.1): an anchor is positive if it
has the highest IoU for a given ground-truth box or an IoU over 0.7 with any ground-truth
box, and negative if its IoU is lower than 0.3 for all ground-truth boxes; the rest do
not contribute to the loss. Ground-truth boxes are not assigned to levels by their scale:
they reach a level only through the anchors that live there. Each image then contributes
256 sampled anchors, at most half of them positive (Sec. 5.1, "256 anchors per image",
with the 1:1 cap of Faster R-CNN).

Label values: ``1`` positive, ``0`` negative, ``-1`` ignored.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_area, box_iou

POSITIVE, NEGATIVE, IGNORE = 1, 0, -1


def cross_boundary(anchors: Tensor, image_hw: tuple[int, int]) -> Tensor:
    """Bool ``[A]``: anchors not entirely inside the ``H x W`` image."""
    h, w = image_hw
    return (anchors[:, 0] < 0) | (anchors[:, 1] < 0) | (anchors[:, 2] > w) | (anchors[:, 3] > h)


def best_anchors_per_gt(iou: Tensor, candidates: Tensor | None = None) -> Tensor:
    """Bool ``[A]``: for each gt (row of ``iou`` ``[G, A]``), every anchor whose IoU equals
    that gt's maximum, ties included, provided the maximum is > 0.

    This keeps a positive for a gt that no anchor covers at IoU > 0.7 (small or oddly shaped
    objects). ``candidates`` (bool ``[A]``) restricts the search, e.g. to anchors inside
    the image when cross-boundary anchors are ignored, as Faster R-CNN does.
    """
    if candidates is not None:
        iou = iou.masked_fill(~candidates[None, :], -1.0)
    gt_max = iou.max(dim=1, keepdim=True).values  # [G, 1]
    # Exact equality is safe: gt_max is read from this same tensor.
    return ((iou == gt_max) & (gt_max > 0)).any(dim=0)


def inside_ignore_boxes(anchors: Tensor, ignore_boxes: Tensor, threshold: float = 0.5) -> Tensor:
    """Bool ``[A]``: anchors whose intersection with some ignore box covers more than
    ``threshold`` of the anchor's own area (intersection over anchor, not IoU: a small
    anchor deep inside a large crowd region has a tiny IoU with it but is still crowd).
    """
    lt = torch.maximum(anchors[:, None, :2], ignore_boxes[None, :, :2])  # [A, C, 2]
    rb = torch.minimum(anchors[:, None, 2:], ignore_boxes[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=-1)  # [A, C]
    ioa = inter / box_area(anchors)[:, None]
    return (ioa > threshold).any(dim=1)


def label_anchors(
    anchors: Tensor,
    gt_boxes: Tensor,
    pos_iou: float = 0.7,
    neg_iou: float = 0.3,
    image_hw: tuple[int, int] | None = None,
    ignore_cross_boundary: bool = False,
    ignore_boxes: Tensor | None = None,
    ignore_ioa: float = 0.5,
) -> tuple[Tensor, Tensor]:
    """Label ``anchors`` ``[A, 4]`` against ``gt_boxes`` ``[G, 4]`` (Sec. 4.1).

    Returns ``labels`` int64 ``[A]`` in {1, 0, -1} and ``matched_idx`` int64 ``[A]``, the
    index of each anchor's highest-IoU gt (0 when ``G == 0``; meaningful for positives only).

    * positive: IoU > ``pos_iou`` with any gt, or among the best anchors of some gt
      (:func:`best_anchors_per_gt`);
    * negative: IoU < ``neg_iou`` with every gt and not positive; an image without
      objects has only negatives;
    * ignored: everything else.

    Cross-boundary anchors are kept by default: "For all RPN experiments (including
    baselines), we include the anchor boxes that are outside the image for training, which
    is unlike [Faster R-CNN] where these anchor boxes are ignored" (Sec. 5.1).
    ``ignore_cross_boundary=True`` (needs ``image_hw``) restores Faster R-CNN's rule: those
    anchors get -1 and cannot be a gt's best anchor.

    ``ignore_boxes`` (e.g. COCO ``iscrowd`` regions, kept out of ``gt_boxes``): anchors
    that are not positive and lie more than ``ignore_ioa`` inside one of them get -1, so no
    negative is drawn from an unlabelled crowd of objects.

    Note the thresholds are strict, as in the paper's text ("over 0.7", "lower than 0.3");
    py-faster-rcnn uses ``>= 0.7``, which differs only at exact equality.
    """
    num_anchors = anchors.shape[0]
    device = anchors.device
    labels = torch.full((num_anchors,), IGNORE, dtype=torch.int64, device=device)
    matched_idx = torch.zeros(num_anchors, dtype=torch.int64, device=device)

    outside = None
    if ignore_cross_boundary:
        if image_hw is None:
            raise ValueError("ignore_cross_boundary=True needs image_hw")
        outside = cross_boundary(anchors, image_hw)

    if gt_boxes.numel() == 0 or num_anchors == 0:
        labels.fill_(NEGATIVE)
    else:
        iou = box_iou(gt_boxes.to(anchors.dtype), anchors)  # [G, A]
        max_iou, matched_idx = iou.max(dim=0)
        # torch.where, not labels[mask] = v: a mask index waits for the GPU, where does not
        labels = torch.where(max_iou < neg_iou, NEGATIVE, labels)
        # Positives last so that they override negatives (the best anchor of a gt may
        # have IoU < neg_iou).
        positive = (max_iou > pos_iou) | best_anchors_per_gt(iou, None if outside is None else ~outside)
        labels = torch.where(positive, POSITIVE, labels)

    if ignore_boxes is not None and ignore_boxes.numel() > 0 and num_anchors > 0:
        crowd = inside_ignore_boxes(anchors, ignore_boxes.to(anchors.dtype), ignore_ioa)
        labels = torch.where(crowd & (labels != POSITIVE), IGNORE, labels)
    if outside is not None:
        labels = torch.where(outside, IGNORE, labels)
    return labels, matched_idx


def sample_anchors(
    labels: Tensor,
    num: int = 256,
    positive_fraction: float = 0.5,
    generator: torch.Generator | None = None,
    counts: tuple[int, int] | None = None,
) -> tuple[Tensor, Tensor]:
    """Indices of the anchors that enter the RPN loss for one image (Sec. 5.1).

    At most ``int(num * positive_fraction)`` random positives; negatives fill the rest up
    to ``num`` (Faster R-CNN pads with negatives when an image has few positives). Fewer
    available anchors give fewer indices. Subsets come from ``torch.randperm`` with
    ``generator``, so a seeded generator makes the draw reproducible.

    ``counts``: the numbers of positives and negatives in ``labels``, when the caller already
    read them (:func:`label_counts`, for a whole batch at once: on CUDA each read waits).
    """
    if counts is None:
        counts = label_counts([labels])[0]
    n_pos, n_neg = counts
    # nonzero_static: indices of a size known here, so no second wait on the GPU
    positive = torch.nonzero_static(labels == POSITIVE, size=n_pos).flatten()
    negative = torch.nonzero_static(labels == NEGATIVE, size=n_neg).flatten()
    num_pos = min(int(num * positive_fraction), n_pos)
    num_neg = min(num - num_pos, n_neg)
    return _random_subset(positive, num_pos, generator), _random_subset(negative, num_neg, generator)


def label_counts(labels: list[Tensor]) -> list[tuple[int, int]]:
    """(positives, negatives) of each label vector, read in one wait."""
    if not labels:
        return []
    both = torch.stack([torch.stack([(lab == POSITIVE).sum(), (lab == NEGATIVE).sum()]) for lab in labels])
    return [(int(p), int(n)) for p, n in both.tolist()]


def _random_subset(idx: Tensor, k: int, generator: torch.Generator | None) -> Tensor:
    # randperm must run on the generator's device; the result goes back to idx's device.
    device = generator.device if generator is not None else idx.device
    perm = torch.randperm(idx.numel(), generator=generator, device=device)[:k]
    return idx[perm.to(idx.device)]
