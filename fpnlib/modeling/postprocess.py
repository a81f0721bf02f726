"""From the region head's outputs to detections (Sec. 4.2, 5.2; Fast R-CNN's inference).

Per image: softmax over the K+1 classes; each RoI is regressed once per class with that
class's deltas; boxes are clipped to the image; the background column is dropped; every
(RoI, class) pair scoring above a threshold is a candidate; NMS runs within each class (two
different objects may share a box, e.g. a person on a horse); the image keeps its top 100.
The values (0.05, 0.5, 100) are Detectron's, whose FPN models the paper's numbers come from.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import Tensor
from torchvision.ops import batched_nms

from .box_coder import FAST_RCNN_BOX_WEIGHTS, clip_boxes, clip_boxes_per_image, decode, usable_boxes
from .group_nms import greedy_keep, use_group_nms
from .guessed_sizes import LEARNED, active, read
from .lean_ops import finite, take_rows
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


class PaddedDetections(NamedTuple):
    """All images' detections in one padded batch, as the grouped path leaves them on the device:
    ``boxes`` ``[N, D, 4]``, ``scores`` ``[N, D]``, ``labels`` ``[N, D]``; image ``i``'s detections
    are its first ``found[i]`` rows (``found`` ``[N]`` int64), by decreasing score."""

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    found: Tensor

    def per_image(self, found: Sequence[int]) -> list[dict[str, Tensor]]:
        """Each image's first ``found[i]`` rows (views), ``found`` read from :attr:`found`."""
        return [{"boxes": b[:count], "scores": sc[:count], "labels": lab[:count]}
                for b, sc, lab, count in zip(self.boxes.unbind(0), self.scores.unbind(0), self.labels.unbind(0), found)]


@torch.no_grad()
def grouped_detections(
    class_logits: Tensor,
    box_deltas: Tensor,
    rois_per_image: Sequence[Tensor],
    image_hws: Sequence[tuple[int, int]],
    score_thresh: float = 0.05,
    nms_thresh: float = 0.5,
    detections_per_img: int = 100,
    min_size: float = 1e-2,
    weights: Sequence[float] = FAST_RCNN_BOX_WEIGHTS,
) -> PaddedDetections:
    """``_detections_for_image`` for all images at once (``group_nms``), left padded on the
    device: every (image, class) with a candidate is one NMS group. The host waits for the
    groups' sizes and to test NMS's convergence; inside ``with_guessed_sizes`` for neither (the
    widest group and the number of groups per image are guessed as learned, and checked when
    the caller reads ``found``), so the whole pass can be captured in a CUDA graph
    (``cuda_graphs``)."""
    counts = [r.shape[0] for r in rois_per_image]
    n_img, n_cls, width = len(counts), class_logits.shape[1] - 1, max(counts, default=0)
    scores = torch.softmax(class_logits.float(), dim=-1)[:, 1:]
    rois = torch.cat(list(rois_per_image)).float() if counts else class_logits.new_zeros((0, 4))
    boxes = decode(box_deltas.float().reshape(-1, n_cls + 1, 4), rois[:, None, :], weights)[:, 1:]
    boxes = clip_boxes_per_image(boxes, image_hws, counts)
    scores = scores.masked_fill(~((scores > score_thresh) & usable_boxes(boxes, min_size)), float("-inf"))

    def by_class(x: Tensor, fill) -> Tensor:  # [R, K, ...] -> [N * K, width, ...], padded with fill
        if len(set(counts)) == 1:  # images with as many RoIs each (the usual case): no padding
            return x.unflatten(0, (n_img, width)).transpose(1, 2).flatten(0, 1)
        out = x.new_full((n_img, width) + x.shape[1:], fill)
        for i, part in enumerate(x.split(counts)):
            out[i, :part.shape[0]] = part
        return out.transpose(1, 2).flatten(0, 1)

    # one more group, empty, for the rows a guessed number of groups leaves over
    group_scores = torch.cat([by_class(scores, float("-inf")), scores.new_full((1, width), float("-inf"))])
    group_sizes = finite(group_scores).sum(dim=1)
    guessing = active()
    if guessing is not None and width > 0:
        # sizes guessed (the learned width and groups per image), checked instead of read
        n, n_groups = min(LEARNED.width, width), min(LEARNED.groups, n_cls) * n_img
        guessing.check(("width", None), group_sizes, n)
        guessing.check(("groups", None), (group_sizes[:-1] > 0).view(n_img, n_cls).sum(dim=1), n_groups // n_img)
    else:
        sizes = read(group_sizes)  # wait: which groups, how wide
        n, n_groups = max(sizes, default=0), sum(size > 0 for size in sizes)
        if n == 0:
            return PaddedDetections(boxes.new_zeros((n_img, 0, 4)), scores.new_zeros((n_img, 0)),
                                    torch.zeros((n_img, 0), dtype=torch.int64, device=scores.device),
                                    torch.zeros((n_img,), dtype=torch.int64, device=scores.device))
    # the groups' rows, found on the device (a list of them copied from the host would wait);
    # rows beyond the groups with a candidate are the empty one
    empty_row = n_img * n_cls
    rows = torch.nonzero_static(group_sizes > 0, size=n_groups, fill_value=empty_row).flatten()
    top, pos = group_scores[rows].sort(dim=1, descending=True, stable=True)
    top, pos = top[:, :n], pos[:, :n]
    top_boxes = take_rows(by_class(boxes, 0.0)[rows.clamp(max=empty_row - 1)], pos)
    keep = greedy_keep(top_boxes, finite(top), nms_thresh, site="detections")
    # every image's kept detections by decreasing score, the image's best detections_per_img
    kept = top.new_full((empty_row + 1, n), float("-inf"))
    kept[rows] = top.masked_fill(~keep, float("-inf"))  # (the empty row stays empty: -inf only)
    kept_boxes = top_boxes.new_zeros((empty_row + 1, n, 4))
    kept_boxes[rows] = top_boxes
    kept, kept_boxes = kept[:-1], kept_boxes[:-1]
    best = kept.view(n_img, -1).argsort(dim=1, descending=True, stable=True)[:, :detections_per_img]
    found = finite(kept).view(n_img, -1).sum(dim=1).clamp(max=detections_per_img)
    # gathered for all images at once; each image then takes its first `found` rows
    best_boxes = take_rows(kept_boxes.view(n_img, -1, 4), best)
    best_scores = take_rows(kept.view(n_img, -1), best)
    best_labels = torch.div(best, n, rounding_mode="floor") + 1
    return PaddedDetections(best_boxes, best_scores, best_labels, found)


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
    if use_group_nms(class_logits.device):
        padded = grouped_detections(class_logits, box_deltas, rois_per_image, image_hws, score_thresh, nms_thresh,
                                    detections_per_img, min_size, weights)
        return padded.per_image(read(padded.found))  # the wait (in a guessing pass, with the guesses' checks)
    # per image at once on a CPU (parallel_pieces): NMS is a one-core kernel
    return map_pieces(lambda lg, dt, rois, hw: _detections_for_image(lg, dt, rois, hw, score_thresh, nms_thresh,
                                                                     detections_per_img, min_size, weights),
                      class_logits.split(counts), box_deltas.split(counts), rois_per_image, image_hws,
                      device=class_logits.device)
