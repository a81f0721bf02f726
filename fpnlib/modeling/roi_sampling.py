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

from .anchor_labels import IGNORE, NEGATIVE, POSITIVE, inside_ignore_boxes, padded, sample_batch
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
    ignore_boxes: Tensor | None = None,
    **options,
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

    ``options``: the keywords of :func:`sample_rois_batch`, where the defaults are
    (``batch_size_per_image`` 512, ``positive_fraction`` 0.25, ``fg_iou`` 0.5, ``bg_iou_hi`` 0.5,
    ``bg_iou_lo`` 0, ``generator``, ``ignore_ioa`` 0.5, ``weights`` of the Fast R-CNN heads).
    """
    return sample_rois_batch([proposals], [gt_boxes], [gt_labels], ignore_boxes=[ignore_boxes], **options)[0]


def sample_rois_batch(
    proposals: Sequence[Tensor],
    gt_boxes: Sequence[Tensor],
    gt_labels: Sequence[Tensor],
    batch_size_per_image: int = 512,
    positive_fraction: float = 0.25,
    fg_iou: float = 0.5,
    bg_iou_hi: float = 0.5,
    bg_iou_lo: float = 0.0,
    generator: torch.Generator | None = None,
    ignore_boxes: Sequence[Tensor | None] | None = None,
    ignore_ioa: float = 0.5,
    weights: Sequence[float] = FAST_RCNN_BOX_WEIGHTS,
) -> list[SampledRoIs]:
    """:func:`sample_rois` of every image of a batch (one entry per image in each sequence), the
    same result as image by image, draws included (the generator is read in image order).

    The images are labelled together, padded to the largest proposal and gt counts, so the
    batch costs one IoU, one read of the counts and one gather instead of one of each per image
    (on CUDA each read waits for the GPU, and each small operator costs host time).
    """
    num_images = len(proposals)
    if num_images == 0:
        return []
    ignores = [None] * num_images if ignore_boxes is None else ignore_boxes
    gts = [g.to(p.dtype) for g, p in zip(gt_boxes, proposals)]
    # The gt boxes join the candidates (Fast R-CNN): each object is guaranteed a foreground
    # RoI with IoU 1, whatever the proposals. Per image: its proposals, then its gt boxes
    # (padding between them changes no draw: the draw reads the order of real candidates only).
    props, real_props = padded([p.detach() for p in proposals])
    gt, real_gt = padded(gts)
    candidates, real = torch.cat([props, gt], dim=1), torch.cat([real_props, real_gt], dim=1)  # [B, N, 4], [B, N]
    width = candidates.shape[1]

    if gt.shape[1] == 0:  # no image has an object
        max_iou = candidates.new_zeros(real.shape)
        matched = torch.zeros(real.shape, dtype=torch.int64, device=candidates.device)
    else:
        iou = box_iou(gt, candidates).masked_fill(~real_gt[:, :, None], -1.0)  # [B, G, N]; padded gt never wins
        max_iou, matched = iou.max(dim=1)  # best gt of each candidate (the first one on ties)
        max_iou = max_iou.clamp(min=0.0)  # an image without objects: IoU 0 with everything

    # torch.where, not flags[mask] = v: a mask index waits for the GPU, where does not
    flags = torch.where(real & (max_iou >= bg_iou_lo) & (max_iou < bg_iou_hi), NEGATIVE, IGNORE)
    # Foreground last: with overlapping ranges (bg_iou_hi > fg_iou) foreground wins.
    flags = torch.where(real & (max_iou >= fg_iou), POSITIVE, flags)
    for i, crowd_boxes in enumerate(ignores):
        if crowd_boxes is not None and crowd_boxes.numel() > 0:
            crowd = inside_ignore_boxes(candidates[i], crowd_boxes.to(candidates.dtype), ignore_ioa)
            flags[i] = torch.where(crowd & (flags[i] == NEGATIVE), IGNORE, flags[i])

    # The same draw as the RPN's anchors: a random capped subset of positives, then negatives.
    keep, drawn = sample_batch(flags, batch_size_per_image, positive_fraction, generator)  # into [B * N]
    sizes = [pos + neg for pos, neg in drawn]
    rois = candidates.reshape(-1, 4)[keep]
    matched = matched.reshape(-1)[keep]  # the best gt's index within its image
    foreground = flags.reshape(-1)[keep] == POSITIVE
    labels = torch.zeros_like(keep)
    targets = rois.new_zeros(rois.shape)
    if gt.shape[1] > 0:
        best = torch.div(keep, width, rounding_mode="floor") * gt.shape[1] + matched  # into the [B * G] padded gts
        gt_classes, _ = padded([lab.to(device=keep.device, dtype=torch.int64) for lab in gt_labels])
        labels = torch.where(foreground, gt_classes.reshape(-1)[best], labels)
        # Encoded for foreground only: a background RoI may be degenerate (a proposal clipped
        # to a zero-width sliver), whose log-size target would be -inf.
        targets = torch.where(foreground[:, None], encode(rois, gt.reshape(-1, 4)[best], weights), targets)
    return [SampledRoIs(*parts) for parts in zip(rois.split(sizes), labels.split(sizes), targets.split(sizes),
                                                   matched.split(sizes))]
