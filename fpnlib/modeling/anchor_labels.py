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

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence
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
    the image when cross-boundary anchors are ignored, as Faster R-CNN does. A leading batch
    dimension is allowed (``iou`` ``[B, G, A]``, ``candidates`` ``[B, A]``, result ``[B, A]``).
    """
    if candidates is not None:
        iou = iou.masked_fill(~candidates[..., None, :], -1.0)
    gt_max = iou.max(dim=-1, keepdim=True).values  # [..., G, 1]
    # Exact equality is safe: gt_max is read from this same tensor.
    return ((iou == gt_max) & (gt_max > 0)).any(dim=-2)


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


def labels_from_iou(
    iou: Tensor,
    pos_iou: float = 0.7,
    neg_iou: float = 0.3,
    outside: Tensor | None = None,
    crowd: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Faster R-CNN's labelling rule (Sec. 4.1) on the IoUs ``[G, A]`` of the gt boxes (rows) with
    the anchors (columns), or ``[B, G, A]`` for a batch (rows of padding, and the one row of an
    image without objects, hold -1: they never win).

    Returns ``labels`` ``[A]`` in {1, 0, -1} and ``matched_idx`` ``[A]``, each anchor's highest-IoU
    gt (the first on ties; 0 without gt). Positive: IoU > ``pos_iou`` with some gt, or among the
    best anchors of some gt; negative: IoU < ``neg_iou`` with every gt and not positive; the rest
    ignored. ``outside`` (bool ``[A]``): cross-boundary anchors, ignored and never a gt's best;
    ``crowd`` (bool ``[A]``): anchors inside crowd regions, ignored unless positive.
    """
    max_iou, matched_idx = iou.max(dim=-2)
    labels = torch.where(max_iou < neg_iou, NEGATIVE, IGNORE)
    # Positives last so that they override negatives (the best anchor of a gt may
    # have IoU < neg_iou).
    positive = (max_iou > pos_iou) | best_anchors_per_gt(iou, None if outside is None else ~outside)
    labels = torch.where(positive, POSITIVE, labels)
    if crowd is not None:
        labels = torch.where(crowd & (labels != POSITIVE), IGNORE, labels)
    if outside is not None:
        labels = torch.where(outside, IGNORE, labels)
    return labels, matched_idx


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

    The rule itself is :func:`labels_from_iou`.

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
    labels, matched_idx = label_anchors_batch(anchors, [gt_boxes], pos_iou, neg_iou, [image_hw],
                                              ignore_cross_boundary, [ignore_boxes], ignore_ioa)
    return labels[0], matched_idx[0]


def padded(rows: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """``[B, M, ...]``: the rows padded with zeros to the longest, and ``[B, M]`` bool: which entries are real."""
    if len({r.shape[0] for r in rows}) == 1:  # nothing to pad: two operators, not two per row
        stacked = torch.stack(list(rows))
        return stacked, torch.ones(stacked.shape[:2], dtype=torch.bool, device=stacked.device)
    real = [r.new_ones(r.shape[0], dtype=torch.bool) for r in rows]
    return pad_sequence(list(rows), batch_first=True), pad_sequence(real, batch_first=True)


def label_anchors_batch(
    anchors: Tensor,
    gt_boxes: Sequence[Tensor],
    pos_iou: float = 0.7,
    neg_iou: float = 0.3,
    image_hws: Sequence[tuple[int, int] | None] | None = None,
    ignore_cross_boundary: bool = False,
    ignore_boxes: Sequence[Tensor | None] | None = None,
    ignore_ioa: float = 0.5,
) -> tuple[Tensor, Tensor]:
    """:func:`label_anchors` of every image of a batch at once: ``[B, A]`` labels and matched
    indices, the same as image by image (the gt boxes padded, their padding never wins). One
    IoU for the batch instead of one per image: on CUDA, each small operator costs host time."""
    num_images, num_anchors = len(gt_boxes), anchors.shape[0]
    if num_anchors == 0:
        empty = torch.zeros((num_images, 0), dtype=torch.int64, device=anchors.device)
        return empty, empty.clone()
    gt, real = padded([g.to(anchors.dtype) for g in gt_boxes])
    if gt.shape[1] == 0:  # no image has an object: one row of padding
        gt, real = anchors.new_zeros((num_images, 1, 4)), real.new_zeros((num_images, 1))
    iou = box_iou(gt, anchors).masked_fill(~real[:, :, None], -1.0)  # [B, G, A]
    outside = crowd = None
    if ignore_cross_boundary:
        if image_hws is None or any(hw is None for hw in image_hws):
            raise ValueError("ignore_cross_boundary=True needs image_hw")
        outside = torch.stack([cross_boundary(anchors, hw) for hw in image_hws])
    ignores = [None] * num_images if ignore_boxes is None else ignore_boxes
    if any(b is not None and b.numel() > 0 for b in ignores):
        crowd = torch.stack([inside_ignore_boxes(anchors, b.to(anchors.dtype), ignore_ioa)
                             if b is not None and b.numel() > 0 else anchors.new_zeros(num_anchors, dtype=torch.bool)
                             for b in ignores])
    return labels_from_iou(iou, pos_iou, neg_iou, outside, crowd)


def sample_anchors(
    labels: Tensor,
    num: int = 256,
    positive_fraction: float = 0.5,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Indices of the anchors that enter the RPN loss for one image (Sec. 5.1).

    At most ``int(num * positive_fraction)`` random positives; negatives fill the rest up
    to ``num`` (Faster R-CNN pads with negatives when an image has few positives). Fewer
    available anchors give fewer indices. Subsets come from ``torch.randperm`` with
    ``generator``, so a seeded generator makes the draw reproducible.
    """
    keep, [(num_pos, _)] = sample_batch(labels[None], num, positive_fraction, generator)
    return keep[:num_pos], keep[num_pos:]


def sample_batch(
    labels: Tensor,
    num: int = 256,
    positive_fraction: float = 0.5,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, list[tuple[int, int]]]:
    """:func:`sample_anchors` of every row of ``labels`` ``[B, A]`` (one image per row), in row
    order, so the draws are the image-by-image ones; the counts are read in one wait.

    Returns the sampled indices into the flattened ``[B * A]`` labels, each row's positives then
    its negatives, and each row's (positives, negatives) drawn (known on the host: no wait).

    The permutations are drawn on the generator's device (a seeded CPU generator gives the same
    subsets on a GPU as on a CPU) and reach the labels' device in one copy for the batch: on
    CUDA each copy from the host waits for the GPU's queue.
    """
    device, counts = labels.device, label_counts(labels)
    draw_on = generator.device if generator is not None else device
    total_pos = sum(n_pos for n_pos, _ in counts)
    # every row's positives, then every row's negatives, as indices into the flat labels, row by
    # row (nonzero_static: a size known here, so no second wait on the GPU)
    flat = labels.flatten()
    candidates = torch.cat([torch.nonzero_static(flat == POSITIVE, size=total_pos).flatten(),
                            torch.nonzero_static(flat == NEGATIVE, size=sum(n for _, n in counts)).flatten()])
    picks, drawn, pos_start, neg_start = [], [], 0, total_pos
    for n_pos, n_neg in counts:
        num_pos = min(int(num * positive_fraction), n_pos)
        num_neg = min(num - num_pos, n_neg)
        picks += [torch.randperm(n_pos, generator=generator, device=draw_on)[:num_pos] + pos_start,
                  torch.randperm(n_neg, generator=generator, device=draw_on)[:num_neg] + neg_start]
        pos_start, neg_start = pos_start + n_pos, neg_start + n_neg
        drawn.append((num_pos, num_neg))
    if not drawn:
        return torch.zeros(0, dtype=torch.int64, device=device), drawn
    return candidates[torch.cat(picks).to(device)], drawn


def label_counts(labels: Tensor) -> list[tuple[int, int]]:
    """(positives, negatives) of each row of ``labels`` ``[B, A]``, read in one wait."""
    both = torch.stack([(labels == POSITIVE).sum(-1), (labels == NEGATIVE).sum(-1)], dim=-1)
    return [(int(p), int(n)) for p, n in both.tolist()]
