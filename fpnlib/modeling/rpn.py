"""Region Proposal Network on a feature pyramid (Sec. 4.1).

The RPN of Faster R-CNN slides a small network (a 3x3 conv and two sibling 1x1 convs, for
objectness and box regression) over a feature map. FPN attaches this same head to every
pyramid level, with anchors of a single scale per level (32^2 on P2 ... 512^2 on P6) and three
aspect ratios, and the head's parameters are shared across levels (Sec. 4.1: "the parameters of
the heads are shared across all feature pyramid levels").

One function per step:
  ``RPNHead``                 logits and deltas for every level
  ``flatten_head_outputs``    maps -> per-anchor rows, in the anchor generator's (y, x, a) order
  ``rpn_losses``              label, sample, binary cross-entropy + smooth-L1 (training)
  ``select_proposals``        top-k per level, decode, clip, NMS per level, top-N per image
  ``RPN``                     the module gluing them together
"""
from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import accumulate

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms

from .anchor_labels import POSITIVE, label_anchors_batch, padded, sample_batch
from .box_coder import clip_boxes, clip_boxes_per_image, decode, encode, usable_boxes
from .fused_conv import conv_relu
from .group_nms import grouped_nms, use_group_nms
from .guessed_sizes import LEARNED, active, read
from .lean_ops import finite, take_rows
from .parallel_pieces import map_pieces
from .rpn_head_grad import head_with_sampled_backward, sparse_backward_applies


@dataclass
class RPNConfig:
    """RPN training and inference settings (Sec. 4.1 and 5.1; Faster R-CNN for the rest).

    ``pre_nms_top_n_*`` is per pyramid level and per image, before NMS. ``post_nms_top_n_*`` is
    per IMAGE after merging the levels: Detectron's first FPN release took it per mini-batch,
    which makes an image's proposal count depend on its batch-mates; here it does not.
    """

    pos_iou: float = 0.7
    neg_iou: float = 0.3
    batch_per_image: int = 256
    positive_fraction: float = 0.5
    pre_nms_top_n_train: int = 2000
    pre_nms_top_n_test: int = 1000
    post_nms_top_n_train: int = 2000
    post_nms_top_n_test: int = 1000
    nms_thresh: float = 0.7
    min_size: float = 0.0
    ignore_cross_boundary: bool = False
    smooth_l1_beta: float = 1.0 / 9.0
    shared_head: bool = True
    # NMS ranks by the logits, which never tie by saturating; torchvision ranks by the sigmoid
    # probabilities, which tie in float32 near 1 (close logits above ~10, all above ~17).
    rank_by_probability: bool = False


class _HeadBranch(nn.Module):
    """3x3 conv + ReLU, then sibling 1x1 convs: A objectness logits and 4A box deltas."""

    fused_relu = False  # set on an inference copy (fast_inference): conv + ReLU in one cuDNN call

    def __init__(self, in_channels: int, hidden: int, num_anchors: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, hidden, 3, padding=1)
        self.objectness = nn.Conv2d(hidden, num_anchors, 1)
        self.deltas = nn.Conv2d(hidden, 4 * num_anchors, 1)
        for layer in (self.conv, self.objectness, self.deltas):
            # Faster R-CNN's init: N(0, 0.01) weights, zero bias.
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.constant_(layer.bias, 0.0)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if sparse_backward_applies(x):  # same outputs; backward at the sampled anchors only
            return head_with_sampled_backward(x, self.conv, self.objectness, self.deltas)
        x = conv_relu(self.conv, x) if self.fused_relu else F.relu(self.conv(x))
        return self.objectness(x), self.deltas(x)


class RPNHead(nn.Module):
    """The RPN head of Sec. 4.1, applied to each level in ``levels``.

    ``shared=True`` (the paper) uses one set of weights for all levels; ``shared=False`` gives
    each level its own head, for the ablation the paper mentions ("we have also evaluated the
    alternative without sharing parameters and observed similar accuracy").
    ``hidden`` is the 3x3 conv's width (default: ``in_channels``, i.e. d = 256 on a pyramid).
    """

    def __init__(
        self,
        in_channels: int,
        num_anchors: int,
        levels: Sequence[str],
        shared: bool = True,
        hidden: int | None = None,
    ):
        super().__init__()
        self.levels = tuple(levels)
        self.num_anchors = num_anchors
        self.shared = shared
        hidden = in_channels if hidden is None else hidden
        if shared:
            self.head = _HeadBranch(in_channels, hidden, num_anchors)
        else:
            self.heads = nn.ModuleDict({lvl: _HeadBranch(in_channels, hidden, num_anchors) for lvl in self.levels})

    def forward(self, feats: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """level -> [N, A, H, W] logits, level -> [N, 4A, H, W] deltas, in ``self.levels`` order."""
        logits, deltas = {}, {}
        for lvl in self.levels:
            branch = self.head if self.shared else self.heads[lvl]
            logits[lvl], deltas[lvl] = branch(feats[lvl])
        return logits, deltas


def _values(maps: Mapping[str, Tensor] | Sequence[Tensor], levels: Sequence[str] | None = None) -> list[Tensor]:
    """The per-level tensors of a dict (in ``levels`` order when given) or a list."""
    if isinstance(maps, Mapping):
        return [maps[lvl] for lvl in (levels if levels is not None else maps)]
    return list(maps)


def _flatten_level(logits: Tensor, deltas: Tensor) -> tuple[Tensor, Tensor]:
    """(N, A, H, W), (N, 4A, H, W) -> (N, H*W*A), (N, H*W*A, 4); already-flat input passes.

    The anchor generator enumerates anchors as (y, x, a), so the maps are permuted to
    (N, H, W, A); the 4A delta channels are grouped per anchor as (A, 4).
    """
    if logits.dim() == 2:
        return logits, deltas.reshape(logits.shape[0], -1, 4)
    n, a, h, w = logits.shape
    logits = logits.permute(0, 2, 3, 1).reshape(n, -1)
    deltas = deltas.view(n, a, 4, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, 4)
    return logits, deltas


def flatten_head_outputs(
    objectness: Mapping[str, Tensor] | Sequence[Tensor],
    deltas: Mapping[str, Tensor] | Sequence[Tensor],
) -> tuple[Tensor, Tensor]:
    """Concatenate all levels: -> logits [N, total], deltas [N, total, 4].

    Rows follow the levels' order, then (y, x, a) within a level: the order of
    ``torch.cat(list(anchor_generator(features).values()))``.
    """
    levels = list(objectness) if isinstance(objectness, Mapping) else None
    flat = [_flatten_level(o, d) for o, d in zip(_values(objectness), _values(deltas, levels))]
    return torch.cat([o for o, _ in flat], dim=1), torch.cat([d for _, d in flat], dim=1)


# ----------------------------------------------------------------------------- training


def rpn_losses(
    objectness: Tensor,
    deltas: Tensor,
    anchors: Tensor,
    gt_boxes: Sequence[Tensor],
    image_hws: Sequence[tuple[int, int]],
    cfg: RPNConfig,
    generator: torch.Generator | None = None,
    ignore_boxes: Sequence[Tensor | None] | None = None,
) -> dict[str, Tensor]:
    """RPN loss over the sampled anchors of all images in the batch (Faster R-CNN, Eq. 1).

    objectness [N, total] logits, deltas [N, total, 4], anchors [total, 4] shared by the batch.
    Objectness: binary cross-entropy with logits, averaged over the sampled anchors. Box:
    smooth-L1 (beta ``cfg.smooth_l1_beta``) on positives only, summed and divided by the number
    of sampled anchors, i.e. the same normaliser as the objectness term (Faster R-CNN's
    1/N_cls, as in Detectron, rather than the paper's 1/N_reg with lambda = 10, which is about
    the same). An image without objects contributes negatives only and no box term, so the box
    loss of such a batch is exactly 0.
    """
    # labelling draws nothing: all images at once; the sampling draws, in image order
    labels, matched = label_anchors_batch(anchors, gt_boxes, cfg.pos_iou, cfg.neg_iou, image_hws,
                                          cfg.ignore_cross_boundary, ignore_boxes)  # [N, total]
    sampled, drawn = sample_batch(labels, cfg.batch_per_image, cfg.positive_fraction, generator)  # into [N * total]
    starts = [0, *accumulate(pos + neg for pos, neg in drawn)]
    positives = torch.cat([sampled[start:start + pos] for start, (pos, _) in zip(starts, drawn)])
    total = anchors.shape[0]
    logits = objectness.reshape(-1)[sampled]
    targets = (labels.reshape(-1)[sampled] == POSITIVE).to(objectness.dtype)
    gt, _ = padded(gt_boxes)
    # each positive's matched gt, in the [N * G] padded gt boxes
    best = torch.div(positives, total, rounding_mode="floor") * gt.shape[1] + matched.reshape(-1)[positives]
    pos_targets = encode(anchors[positives.remainder(total)], gt.reshape(-1, 4)[best].to(anchors))
    num_sampled = max(logits.numel(), 1)  # guards a batch whose anchors are all ignored
    loss_objectness = F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / num_sampled
    # reduction="sum" of an empty input is exactly 0 (a mean would be NaN).
    loss_box = F.smooth_l1_loss(
        deltas.reshape(-1, 4)[positives], pos_targets, beta=cfg.smooth_l1_beta, reduction="sum"
    ) / num_sampled
    return {"loss_objectness": loss_objectness, "loss_rpn_box": loss_box}


# ---------------------------------------------------------------------------- proposals


def _top_k_per_level(
    objectness: Mapping[str, Tensor] | Sequence[Tensor],
    deltas: Mapping[str, Tensor] | Sequence[Tensor],
    anchors: Mapping[str, Tensor],
    k: int,
) -> tuple[Tensor, Tensor, Tensor, list[int]]:
    """The k highest-scoring anchors of every level of every image.

    Returns logits [N, K], deltas [N, K, 4], anchors [N, K, 4] and the levels' sizes, min(k,
    anchors on that level), which sum to K. ``topk`` runs along each image's row, so the choice
    for one image never depends on the others.
    """
    levels = list(anchors)
    obj_levels = _values(objectness, levels if isinstance(objectness, Mapping) else None)
    dts_levels = _values(deltas, levels if isinstance(deltas, Mapping) else None)
    out_logits, out_deltas, out_anchors, sizes = [], [], [], []
    for o, d, a in zip(obj_levels, dts_levels, anchors.values()):
        o, d = _flatten_level(o, d)
        top, idx = o.topk(min(k, o.shape[1]), dim=1)
        out_logits.append(top)
        out_deltas.append(take_rows(d, idx))
        out_anchors.append(a[idx])
        sizes.append(idx.shape[1])
    return torch.cat(out_logits, 1), torch.cat(out_deltas, 1), torch.cat(out_anchors, 1), sizes


@functools.lru_cache(maxsize=16)
def _row_starts(n_img: int, n_lvl: int, width: int, device: str) -> Tensor:
    """``[n_img * n_lvl, 1]``: the offset of row (image, level) within its image's levels laid
    one after the other, ``width`` entries each (made once per pyramid shape)."""
    return torch.arange(n_lvl, device=device).repeat(n_img)[:, None] * width


@functools.lru_cache(maxsize=16)
def _level_ids(level_sizes: tuple[int, ...], device: str) -> Tensor:
    """``[sum(level_sizes)]``: the level index of each entry, the levels one after the other
    (made once per pyramid shape)."""
    return torch.cat([torch.full((size,), lvl, dtype=torch.int64, device=device) for lvl, size in enumerate(level_sizes)])


def _proposals_for_image(
    boxes: Tensor,
    logits: Tensor,
    level_ids: Tensor,
    image_hw: tuple[int, int],
    post_nms_top_n: int,
    nms_thresh: float,
    min_size: float,
    rank_by_probability: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Clip, drop small boxes, NMS within each level, keep the image's top ``post_nms_top_n``.
    Returns boxes, scores and the level index of each proposal."""
    boxes = clip_boxes(boxes, image_hw)
    keep = torch.nonzero(usable_boxes(boxes, min_size) & torch.isfinite(logits)).squeeze(1)
    boxes, logits, level_ids = boxes[keep], logits[keep], level_ids[keep]
    # One call for all levels: the level index is the NMS group, so boxes only suppress boxes
    # of their own level. The result is sorted by decreasing score, across levels.
    ranking = logits.sigmoid() if rank_by_probability else logits
    keep = batched_nms(boxes, ranking, level_ids, nms_thresh)[:post_nms_top_n]
    return boxes[keep], logits[keep].sigmoid(), level_ids[keep]


def _proposals_grouped(
    boxes: Tensor,
    logits: Tensor,
    level_sizes: Sequence[int],
    image_hws: Sequence[tuple[int, int]],
    post_nms_top_n: int,
    nms_thresh: float,
    min_size: float,
    rank_by_probability: bool = False,
) -> list[tuple[Tensor, Tensor, Tensor]]:
    """``_proposals_for_image`` for all images at once (``group_nms``): every (image, level) is
    one NMS group; the host waits to test NMS's convergence and once for the images' counts,
    or, inside ``with_guessed_sizes``, for neither (each image keeps ``post_nms_top_n``, checked
    later). ``boxes`` [N, K, 4] and ``logits`` [N, K] hold the levels one after the other,
    ``level_sizes`` entries each."""
    n_img, n_lvl, width = boxes.shape[0], len(level_sizes), max(level_sizes)
    boxes = clip_boxes_per_image(boxes, image_hws)
    valid = usable_boxes(boxes, min_size) & finite(logits)
    ranking = logits.sigmoid() if rank_by_probability else logits
    slots = _level_slots(tuple(level_sizes), width, str(boxes.device))

    def by_level(x: Tensor, fill) -> Tensor:  # [N, K, ...] -> [N * levels, width, ...], padded with fill
        out = x.new_full((n_img, n_lvl * width) + x.shape[2:], fill)
        return out.index_copy_(1, slots, x).view((n_img * n_lvl, width) + x.shape[2:])

    boxes, logits = by_level(boxes, 0.0), by_level(logits, 0.0)
    ranking = by_level(ranking, 0.0) if rank_by_probability else logits
    order, keep = grouped_nms(boxes, ranking, by_level(valid, False), nms_thresh, site="proposals")
    # back to padded positions per image, then the image's top post_nms_top_n over its levels
    slot = (order + _row_starts(n_img, n_lvl, width, str(order.device))).view(n_img, -1)
    kept_rank = take_rows(ranking, order).masked_fill(~keep, float("-inf"))
    best = kept_rank.view(n_img, -1).argsort(dim=1, descending=True, stable=True)[:, :post_nms_top_n]
    slot = take_rows(slot, best)
    kept = keep.view(n_img, -1).sum(dim=1)
    guessing, layout = active(), ("counts", (tuple(level_sizes), post_nms_top_n))
    if guessing is not None and sum(level_sizes) >= post_nms_top_n and layout[1] not in LEARNED.counts_read:
        guessing.check(layout, kept < post_nms_top_n, 0)  # the guess: every image keeps post_nms_top_n
        counts = [post_nms_top_n] * n_img
    else:
        counts = read(kept.clamp(max=post_nms_top_n))  # the one wait for counts
    # gathered for all images at once; each image then takes its first `count` rows (views)
    top_boxes = take_rows(boxes.view(n_img, -1, 4), slot)
    top_logits = take_rows(logits.view(n_img, -1), slot)
    top_levels = torch.div(slot, width, rounding_mode="floor")
    # sigmoid per image, as the per-image path: a CPU's vector loop and its scalar tail round
    # some values differently, so where an element falls would change its last bit
    return [(b[:count], sc[:count].sigmoid(), lv[:count])
            for b, sc, lv, count in zip(top_boxes.unbind(0), top_logits.unbind(0), top_levels.unbind(0), counts)]


@functools.lru_cache(maxsize=16)
def _level_slots(level_sizes: tuple[int, ...], width: int, device: str) -> Tensor:
    """``[sum(level_sizes)]``: where each of the levels' entries, one level after the other,
    lies in a layout of one row of ``width`` per level (made once per pyramid shape)."""
    return torch.cat([torch.arange(size, device=device) + lvl * width for lvl, size in enumerate(level_sizes)])


@torch.no_grad()
def select_proposals(
    objectness: Mapping[str, Tensor] | Sequence[Tensor],
    deltas: Mapping[str, Tensor] | Sequence[Tensor],
    anchors: Mapping[str, Tensor],
    image_hws: Sequence[tuple[int, int]],
    pre_nms_top_n: int,
    post_nms_top_n: int,
    nms_thresh: float,
    min_size: float,
    with_levels: bool = False,
    rank_by_probability: bool = False,
) -> list[tuple[Tensor, ...]]:
    """Proposals per image: list of (boxes [K, 4], scores [K]) with K <= ``post_nms_top_n``;
    ``with_levels`` adds the level index [K] of each (its position in ``anchors``' keys).

    objectness/deltas: per level, either [N, A, H, W] / [N, 4A, H, W] maps (dict keyed like
    ``anchors``) or already flattened [N, H*W*A] / [N, H*W*A, 4] (list in ``anchors`` order).
    Per level: top ``pre_nms_top_n`` by objectness, decode, clip, drop boxes smaller than
    ``min_size``, NMS; then the image's top ``post_nms_top_n`` over all levels (per image, not
    per batch). Scores are sigmoid probabilities; ranking uses the logits, which orders the same
    but does not saturate (``rank_by_probability`` ranks by the probabilities, as torchvision).
    No gradient flows into proposals (approximate joint training).
    """
    logits, top_deltas, top_anchors, sizes = _top_k_per_level(objectness, deltas, anchors, pre_nms_top_n)
    # float32 boxes: under bf16 autocast a 1000 px coordinate would be rounded to 4 px
    logits, top_deltas = logits.detach().float(), top_deltas.detach().float()
    n = logits.shape[0]
    boxes = decode(top_deltas.reshape(-1, 4), top_anchors.reshape(-1, 4)).view(n, -1, 4)
    if use_group_nms(boxes.device):
        out = _proposals_grouped(boxes, logits, sizes, image_hws, post_nms_top_n, nms_thresh, min_size,
                                 rank_by_probability)
        return out if with_levels else [(b, sc) for b, sc, _ in out]
    # per image at once (parallel_pieces): NMS is a one-core kernel on a CPU and waits on CUDA
    level_ids = _level_ids(tuple(sizes), str(boxes.device))
    out = map_pieces(lambda b, lg, hw: _proposals_for_image(b, lg, level_ids, hw, post_nms_top_n, nms_thresh, min_size,
                                                            rank_by_probability),
                     boxes.unbind(0), logits.unbind(0), image_hws, device=boxes.device)
    return out if with_levels else [(b, sc) for b, sc, _ in out]


# -------------------------------------------------------------------------------- module


def _split_targets(targets: Sequence[dict]) -> tuple[list[Tensor], list[Tensor | None] | None]:
    """Ground-truth boxes and crowd boxes per image; crowd regions are ignored, not matched."""
    gts, crowds = [], []
    for t in targets:
        boxes = t["boxes"]
        crowd = t.get("iscrowd")
        if crowd is None:
            gts.append(boxes)
            crowds.append(None)
        else:
            crowd = crowd.to(torch.bool)
            gts.append(boxes[~crowd])
            crowds.append(boxes[crowd] if bool(crowd.any()) else None)
    return gts, (crowds if any(c is not None for c in crowds) else None)


class RPN(nn.Module):
    """Head + anchors + proposal selection (+ losses in training) on a set of feature maps.

    ``generator`` (optional) seeds anchor sampling so that runs are reproducible without
    touching torch's global RNG; it must live on the features' device.
    """

    def __init__(
        self,
        head: RPNHead,
        anchor_generator: nn.Module,
        cfg: RPNConfig,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        self.head = head
        self.anchor_generator = anchor_generator
        self.cfg = cfg
        self.generator = generator

    def anchors(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """level -> [H*W*A, 4] anchors for the maps the head sees, in padded-image coordinates."""
        anchors = self.anchor_generator({lvl: features[lvl] for lvl in self.head.levels})
        return {lvl: anchors[lvl] for lvl in self.head.levels}  # the head's order, for flattening

    def forward(
        self,
        features: Mapping[str, Tensor],
        image_hws: Sequence[tuple[int, int]],
        targets: Sequence[dict] | None = None,
        return_proposals: bool = True,
        with_levels: bool = False,
        compute_losses: bool | None = None,
    ) -> tuple[list[tuple[Tensor, ...]], dict[str, Tensor]]:
        """Proposals per image (boxes, scores) and, in training, the losses.

        ``targets``: per image a dict with "boxes" [G, 4] (x1, y1, x2, y2) and optionally
        "iscrowd" [G]; crowd boxes are not ground truth, anchors overlapping them are ignored.
        ``return_proposals=False`` skips proposal selection (an empty list is returned): an
        RPN trained alone never uses its training-time proposals, and NMS is costly on CPU.
        ``with_levels`` adds to each image's (boxes, scores) the index in ``head.levels`` of
        the level each proposal came from. ``compute_losses`` (default: ``self.training``)
        turns the losses off for a frozen RPN that only feeds proposals to a head being trained
        (step 4 of the 4-step training); its proposals still use the training-time counts.
        """
        feats = {lvl: features[lvl] for lvl in self.head.levels}
        logits, deltas = self.head(feats)
        anchors = self.anchors(feats)
        cfg = self.cfg
        pre_n = cfg.pre_nms_top_n_train if self.training else cfg.pre_nms_top_n_test
        post_n = cfg.post_nms_top_n_train if self.training else cfg.post_nms_top_n_test
        proposals = []
        if return_proposals:
            proposals = select_proposals(logits, deltas, anchors, image_hws, pre_n, post_n, cfg.nms_thresh, cfg.min_size,
                                         with_levels=with_levels, rank_by_probability=cfg.rank_by_probability)

        losses: dict[str, Tensor] = {}
        if self.training if compute_losses is None else compute_losses:
            if targets is None:
                raise ValueError("RPN in training mode needs targets")
            gts, crowds = _split_targets(targets)
            flat_logits, flat_deltas = flatten_head_outputs(logits, deltas)
            all_anchors = torch.cat(list(anchors.values()))
            losses = rpn_losses(
                flat_logits, flat_deltas, all_anchors, gts, image_hws, cfg, generator=self.generator, ignore_boxes=crowds
            )
        return proposals, losses
