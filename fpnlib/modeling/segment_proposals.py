"""DeepMask-style segment proposals on a feature pyramid (Sec. 6, Appendix A; Table 6).

Appendix A turns FPN into a segment-proposal generator the way DeepMask/SharpMask work, but
with one image scale instead of an image pyramid:

* **Pyramid.** The FPN of Sec. 5.1 over P2..P6, with d = 128.
* **Scales.** The scale of a mask is max(w, h) of its box (:func:`mask_scale`). Objects of
  scale {32, 64, 128, 256, 512} px are handled by a 5x5 MLP on {P2..P6}; a second, 7x7
  MLP (7 ~ 5 sqrt 2) handles the half octaves between them (a 128 sqrt 2 object is
  predicted by the 7x7 MLP on P4). Every object goes to the nearest of these 9 canonical
  scales in log space (:func:`canonical_slots`, :func:`assign_segment_levels`). With one MLP
  only (Table 6, "single MLP") there are 5 canonical scales, the full octaves.
* **Windows.** 25% padding: the mask an MLP predicts covers 1.25 x the scale it serves,
  i.e. {40, 80, 160, 320, 640} px on {P2..P6} for the 5x5 MLP, sqrt 2 larger for the 7x7 MLP.
  The window is centred on the location that predicts it.
* **Positives.** At level Pk a location predicts the object whose centre falls within
  2^k px of it (+-1 cell); a location without such an object is a negative and trains only
  the objectness score (:func:`label_locations`).
* **MLP.** A kxk conv with 512 outputs and ReLU, then sibling 1x1 convs: a 14x14 mask
  (196 logits) and one objectness score (:class:`MaskMLP`).
* **Training.** 128 sampled locations per image, positive:negative 1:3; the mask loss is
  a per-pixel binary cross-entropy against the ground-truth mask cropped to the window and
  resized to 14x14 (:func:`mask_targets`), weighted 10 against the score loss
  (:func:`segment_losses`).
* **Inference.** Fully convolutional: every location of every level and MLP is scored, the
  1000 best are kept and their masks pasted into the image at their windows
  (:func:`paste_masks`), threshold 0.5. No NMS, no other post-processing.

``scale`` (:class:`SegmentProposalConfig`) multiplies the canonical scales and windows, for
images smaller than the paper's 800 px (the cpu/smoke presets), like ``anchor_scale`` of the RPN.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align

from .anchor_labels import IGNORE, NEGATIVE, POSITIVE, sample_anchors
from .backbone import ResNetBackbone
from .detectors import batch_images
from .fpn import FPN, STRIDES

KERNELS = {"5x5": 5, "7x7": 7}  # the two MLPs of Appendix A, by kernel size
CANONICAL_SCALE = 32.0  # the scale served on P2 by the 5x5 MLP (Appendix A)
NUM_HALF_OCTAVES = 9  # 32 * 2^(j/2), j = 0..8: 32 .. 512 px
PADDING = 1.25  # "25% padding": a window is 1.25 x the object scale it serves


# ----------------------------------------------------------------------------- scales


@dataclass(frozen=True)
class Slot:
    """One (level, MLP) pair and the canonical object scale it predicts, in px."""

    level: str  # "p2".."p6"
    mlp: str  # "5x5" or "7x7"
    scale: float

    @property
    def stride(self) -> int:
        return STRIDES[self.level]

    @property
    def window(self) -> float:
        """Side of the image region its mask covers: the scale plus 25% padding."""
        return PADDING * self.scale


def canonical_slots(mlps: tuple[str, ...] = ("5x5", "7x7"), scale: float = 1.0) -> tuple[Slot, ...]:
    """The canonical scales 32 * 2^(j/2) * ``scale`` and who predicts each (Appendix A).

    Both MLPs: even j -> the 5x5 MLP on P(2 + j/2), odd j -> the 7x7 MLP on P(2 + (j-1)/2);
    9 slots. One MLP (Table 6, "single MLP"): it serves the full octaves only, j even, on
    P2..P6; half-octave objects then go to the nearest full octave.
    """
    mlps = tuple(m for m in KERNELS if m in mlps)  # canonical order
    if not mlps or len(mlps) != len(set(mlps)):
        raise ValueError(f"mlps must be a non-empty subset of {tuple(KERNELS)}")
    slots = []
    for j in range(NUM_HALF_OCTAVES):
        if len(mlps) == 1 and j % 2:
            continue
        mlp = mlps[0] if len(mlps) == 1 else ("5x5" if j % 2 == 0 else "7x7")
        slots.append(Slot(f"p{2 + j // 2}", mlp, CANONICAL_SCALE * scale * 2 ** (j / 2)))
    return tuple(slots)


def mask_scale(boxes: Tensor) -> Tensor:
    """Scale of a mask = max(w, h) of its box (Appendix A). ``boxes`` [G, 4] xyxy -> [G]."""
    return (boxes[:, 2:] - boxes[:, :2]).amax(dim=1)


def assign_segment_levels(scales: Tensor, slots: tuple[Slot, ...]) -> Tensor:
    """Index into ``slots`` of the nearest canonical scale in log space, per object [G].

    Objects smaller than the smallest or larger than the largest canonical scale are clamped
    to it (argmin does that by itself); ties go to the smaller scale.
    """
    canonical = torch.tensor([s.scale for s in slots], dtype=torch.float32, device=scales.device)
    log_dist = (torch.log2(scales.float().clamp(min=1e-6))[:, None] - torch.log2(canonical)[None, :]).abs()
    return log_dist.argmin(dim=1)


# ----------------------------------------------------------------------------- locations


class LocationGrid:
    """Every location the MLPs score: each slot's level map, flattened slot by slot, row-major.

    Location ``(y, x)`` of a level with stride s sits at the centre of its cell,
    ((x + 0.5) s, (y + 0.5) s) in (padded) image pixels, and its window is the square of
    side ``slot.window`` centred there.
    """

    def __init__(self, slots: tuple[Slot, ...], shapes: list[tuple[int, int]], device=None):
        self.slots, self.shapes = tuple(slots), [tuple(int(v) for v in hw) for hw in shapes]
        sizes = torch.tensor([h * w for h, w in self.shapes])
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)]).to(device)
        self._width = torch.tensor([w for _, w in self.shapes], device=device)
        self._stride = torch.tensor([s.stride for s in self.slots], dtype=torch.float32, device=device)
        self._window = torch.tensor([s.window for s in self.slots], dtype=torch.float32, device=device)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def range(self, s: int) -> slice:
        return slice(int(self.offsets[s]), int(self.offsets[s + 1]))

    def decode(self, idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Flat indices -> (slot index, y, x)."""
        slot = torch.bucketize(idx, self.offsets[1:], right=True)
        local = idx - self.offsets[slot]
        width = self._width[slot]
        return slot, local // width, local % width

    def centres(self, idx: Tensor) -> Tensor:
        slot, y, x = self.decode(idx)
        stride = self._stride[slot]
        return torch.stack([(x + 0.5) * stride, (y + 0.5) * stride], dim=1)

    def windows(self, idx: Tensor) -> Tensor:
        """[n, 4] xyxy windows of the masks predicted at ``idx``."""
        half = self._window[self.decode(idx)[0]][:, None] / 2
        c = self.centres(idx)
        return torch.cat([c - half, c + half], dim=1)


def label_locations(
    boxes: Tensor, grid: LocationGrid, image_hw: tuple[int, int], iscrowd: Tensor | None = None, radius: int = 1
) -> tuple[Tensor, Tensor]:
    """Which locations are positive for which object (Appendix A). Returns ``labels`` [L]
    in {1 positive, 0 negative, -1 ignored} and ``matched`` [L], the object index of each
    positive (0 elsewhere).

    Each object goes to one slot (:func:`assign_segment_levels`); on that slot's level, the
    cell holding the object's centre and its 8 neighbours (+-1 cell, "within 2^k px") are
    positive for it (``radius`` = 0 would keep only the cell holding the centre). A cell claimed by two objects takes the one whose centre is closer.
    Everything else is negative, except cells whose centre lies in the batch's zero padding
    (they see no image) and cells a crowd region would claim (an unlabelled group of
    objects is no negative): those are ignored. Crowds are never positives.
    """
    device = boxes.device
    n = len(grid)
    labels = torch.full((n,), NEGATIVE, dtype=torch.long, device=device)
    matched = torch.zeros(n, dtype=torch.long, device=device)
    centres = grid.centres(torch.arange(n, device=device))
    h, w = image_hw
    labels[(centres[:, 0] >= w) | (centres[:, 1] >= h)] = IGNORE
    if boxes.numel() == 0:
        return labels, matched
    crowd = torch.zeros(len(boxes), dtype=torch.bool, device=device) if iscrowd is None else iscrowd.to(device).bool()
    obj_xy = (boxes[:, :2] + boxes[:, 2:]) / 2
    slot_of = assign_segment_levels(mask_scale(boxes), grid.slots)
    for s, slot in enumerate(grid.slots):
        gt = torch.nonzero(slot_of == s).flatten()
        if gt.numel() == 0:
            continue
        (hs, ws), stride = grid.shapes[s], slot.stride
        ys = torch.arange(hs, device=device)
        xs = torch.arange(ws, device=device)
        cx, cy = obj_xy[gt, 0], obj_xy[gt, 1]
        # the cell that holds the centre and its neighbours, [g, H, W]
        near = (((ys[None, :, None] - torch.div(cy, stride, rounding_mode="floor")[:, None, None]).abs() <= radius)
                & ((xs[None, None, :] - torch.div(cx, stride, rounding_mode="floor")[:, None, None]).abs() <= radius))
        dist2 = ((xs[None, None, :] + 0.5) * stride - cx[:, None, None]) ** 2 \
            + ((ys[None, :, None] + 0.5) * stride - cy[:, None, None]) ** 2
        # a neighbour cell past the image's right or bottom edge stays ignored, as inference
        # never scores it; whether it exists depends on the batch's padding, not on the image
        in_image = (((ys + 0.5) * stride < h)[:, None] & ((xs + 0.5) * stride < w)[None, :])[None]
        claim = near & ~crowd[gt][:, None, None] & in_image
        best, arg = dist2.masked_fill(~claim, math.inf).min(dim=0)
        positive = torch.isfinite(best).flatten()
        ignore = (near & crowd[gt][:, None, None]).any(dim=0).flatten() & ~positive
        part = grid.range(s)
        labels[part] = torch.where(positive, POSITIVE, torch.where(ignore, IGNORE, labels[part]))
        matched[part] = torch.where(positive, gt[arg.flatten()], 0)
    return labels, matched


def mask_targets(masks: Tensor, gt_idx: Tensor, windows: Tensor, mask_size: int = 14) -> Tensor:
    """The ground-truth mask of object ``gt_idx[i]`` cropped to ``windows[i]`` and resized to
    ``mask_size`` x ``mask_size`` (Appendix A), binary float [P, M, M].

    ``roi_align`` averages the mask over each output pixel (adaptive sampling); a pixel is 1
    when the object covers at least half of it. Parts of a window outside the image are 0.
    """
    if gt_idx.numel() == 0:
        return torch.zeros((0, mask_size, mask_size), device=windows.device)
    used, which = torch.unique(gt_idx, return_inverse=True)  # convert only the masks needed
    rois = torch.cat([which[:, None].to(windows), windows], dim=1)
    crops = roi_align(masks[used][:, None].to(windows.dtype), rois, output_size=mask_size, spatial_scale=1.0,
                      sampling_ratio=0, aligned=True)
    return (crops[:, 0] >= 0.5).to(windows.dtype)


def sample_locations(labels: Tensor, num: int = 128, positive_fraction: float = 0.25,
                     generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """128 locations per image, at most 1/4 of them positive, negatives filling the rest
    (Appendix A, "positive:negative 1:3"); the RPN's sampler (Faster R-CNN's rule)."""
    return sample_anchors(labels, num=num, positive_fraction=positive_fraction, generator=generator)


def segment_losses(score_logits: Tensor, score_labels: Tensor, mask_logits: Tensor, mask_target: Tensor,
                   mask_loss_weight: float = 10.0) -> dict[str, Tensor]:
    """Binary cross-entropy of the objectness score over the sampled locations, and per-pixel
    binary cross-entropy of the masks of the sampled positives, weighted 10 (Appendix A).

    Both are means (over locations, over mask pixels). With no positive the mask loss is
    exactly 0, so a batch of empty images trains the score branch only.
    """
    loss_score = F.binary_cross_entropy_with_logits(score_logits, score_labels, reduction="sum") / max(
        score_logits.numel(), 1)
    loss_mask = F.binary_cross_entropy_with_logits(mask_logits, mask_target, reduction="sum") / max(
        mask_target.numel(), 1)
    return {"loss_seg_score": loss_score, "loss_seg_mask": mask_loss_weight * loss_mask}


# ----------------------------------------------------------------------------- the MLPs


class MaskMLP(nn.Module):
    """The per-location MLP of Appendix A: a kxk conv with ``hidden`` (512) outputs and ReLU,
    then sibling 1x1 convs, ``mask_size``^2 mask logits and one objectness logit.

    Run fully convolutionally at inference (:meth:`hidden_map`); in training only at the
    sampled locations (:meth:`at`), which gives the same numbers for those locations at a
    fraction of the cost, since the loss reads nothing else.
    """

    def __init__(self, in_channels: int, kernel: int, hidden: int = 512, mask_size: int = 14):
        super().__init__()
        self.kernel = kernel
        self.conv = nn.Conv2d(in_channels, hidden, kernel, padding=kernel // 2)
        self.mask = nn.Conv2d(hidden, mask_size**2, 1)
        self.score = nn.Conv2d(hidden, 1, 1)
        for layer in (self.conv, self.mask, self.score):
            nn.init.normal_(layer.weight, std=0.01)  # as the RPN head (Faster R-CNN's init)
            nn.init.zeros_(layer.bias)

    def hidden_map(self, x: Tensor) -> Tensor:
        """[N, C, H, W] level map -> [N, hidden, H, W]."""
        return F.relu(self.conv(x))

    def at(self, patches: Tensor) -> Tensor:
        """[n, C, k, k] patches (:func:`gather_patches`) -> [n, hidden]: the conv at their centres."""
        return F.relu(F.conv2d(patches, self.conv.weight, self.conv.bias)).flatten(1)

    def scores(self, hidden: Tensor) -> Tensor:
        """[n, hidden] -> [n] objectness logits."""
        return F.linear(hidden, self.score.weight.flatten(1), self.score.bias)[:, 0]

    def masks(self, hidden: Tensor) -> Tensor:
        """[n, hidden] -> [n, M, M] mask logits."""
        m = int(math.isqrt(self.mask.out_channels))
        return F.linear(hidden, self.mask.weight.flatten(1), self.mask.bias).view(-1, m, m)


def gather_patches(feature: Tensor, b: Tensor, y: Tensor, x: Tensor, kernel: int) -> Tensor:
    """The ``kernel`` x ``kernel`` neighbourhoods of locations (b, y, x) of ``feature``
    [N, C, H, W], zero-padded at the border as the conv is: [n, C, k, k].

    Neighbouring patches overlap, so the backward sums several patches' gradients into one pixel,
    and the order of that sum must not change from run to run. The backward of advanced indexing
    does that on CUDA (it sorts the indices) but not on a CPU, where it adds with atomics on
    several threads; the backward of ``index_select`` does it on a CPU (index order) but not on
    CUDA. Each device takes the one that is the same every run; the patches are the same.
    """
    r = kernel // 2
    padded = F.pad(feature, (r, r, r, r))
    d = torch.arange(kernel, device=feature.device)
    ys, xs = (y[:, None] + d)[:, :, None], (x[:, None] + d)[:, None, :]  # [n, k, 1], [n, 1, k]
    if feature.device.type != "cpu":
        # advanced indices around a slice put the broadcast dims first: [n, k, k, C]
        return padded[b[:, None, None], :, ys, xs].permute(0, 3, 1, 2)
    n_img, c, hp, wp = padded.shape
    pixels = padded.permute(0, 2, 3, 1).reshape(n_img * hp * wp, c)
    rows = (b[:, None, None] * hp + ys) * wp + xs  # [n, k, k] rows of ``pixels``
    return pixels.index_select(0, rows.flatten()).reshape(len(b), kernel, kernel, c).permute(0, 3, 1, 2)


# ----------------------------------------------------------------------------- pasting


def paste_masks(mask_probs: Tensor, windows: Tensor, image_hw: tuple[int, int], threshold: float = 0.5) -> Tensor:
    """Resize each [M, M] mask probability map to its window, threshold at 0.5 and paste it
    into an empty ``H x W`` image (the parts outside the image are cut): bool [K, H, W].

    Windows are rounded to whole pixels; masks of the same window size (all those of one
    slot, at most a pixel apart) are resized together.
    """
    h, w = image_hw
    out = torch.zeros((len(mask_probs), h, w), dtype=torch.bool, device=mask_probs.device)
    if len(mask_probs) == 0:
        return out
    box = windows.round().long()
    size = (box[:, 2:] - box[:, :2]).clamp(min=1)  # (w, h) per window
    for wh in torch.unique(size, dim=0).tolist():
        group = torch.nonzero((size == size.new_tensor(wh)).all(dim=1)).flatten()
        resized = F.interpolate(mask_probs[group, None].float(), size=(wh[1], wh[0]), mode="bilinear",
                                align_corners=False)[:, 0] >= threshold
        for k, m in zip(group.tolist(), resized):
            x0, y0 = box[k, :2].tolist()
            xa, ya, xb, yb = max(x0, 0), max(y0, 0), min(x0 + wh[0], w), min(y0 + wh[1], h)
            if xa < xb and ya < yb:
                out[k, ya:yb, xa:xb] = m[ya - y0:yb - y0, xa - x0:xb - x0]
    return out


# ----------------------------------------------------------------------------- the model


@dataclass
class SegmentProposalConfig:
    """The segment-proposal model of Appendix A (defaults: the paper's, on ResNet-50).

    ``mlps``: ("5x5", "7x7") is the dual MLP; one of them alone is Table 6's single MLP.
    ``mask_size``: 14, or 28 for Table 6's "2x mask resolution". ``scale`` multiplies the
    canonical scales 32..512 and windows 40..640 (1.0 at 800 px images).
    """

    depth: int = 50
    width: int = 64
    norm: str = "frozen_bn"
    freeze_at: int = 2
    fpn_channels: int = 128  # d = 128 (Appendix A)
    mlps: tuple[str, ...] = ("5x5", "7x7")
    mask_size: int = 14
    hidden: int = 512
    scale: float = 1.0
    examples_per_image: int = 128
    positive_fraction: float = 0.25  # 1:3
    mask_loss_weight: float = 10.0
    proposals: int = 1000
    size_divisible: int = 32


class SegmentProposalNet(nn.Module):
    """Backbone -> FPN P2..P6 -> the 5x5 and/or 7x7 MLP at every location (Appendix A).

    ``forward(images, targets)``: training returns ``{"loss_seg_score", "loss_seg_mask"}``
    (targets: "boxes", "masks" [G, H, W] at the image size, optionally "iscrowd"); evaluation
    returns per image ``{"masks": bool [K, H, W], "scores": [K], "boxes": [K, 4], "slots": [K]}``,
    K <= ``cfg.proposals``, at the input image's size; ``boxes`` are the windows the masks were
    pasted into, clipped to the image, and ``slots`` index ``self.slots``.
    ``propose(images)`` gives the same before pasting (windows and [K, M, M] mask
    probabilities), to paste elsewhere, e.g. at the original image size.
    ``generator`` optionally seeds the sampling of training locations.
    """

    def __init__(self, cfg: SegmentProposalConfig, generator: torch.Generator | None = None):
        super().__init__()
        self.cfg = cfg
        self.generator = generator
        self.backbone = ResNetBackbone(depth=cfg.depth, norm=cfg.norm, freeze_at=cfg.freeze_at, width=cfg.width)
        self.fpn = FPN(self.backbone.out_channels, out_channels=cfg.fpn_channels)
        self.slots = canonical_slots(tuple(cfg.mlps), cfg.scale)
        self.mlps = nn.ModuleDict({m: MaskMLP(cfg.fpn_channels, KERNELS[m], cfg.hidden, cfg.mask_size)
                                   for m in KERNELS if m in cfg.mlps})

    def _pyramid(self, images: list[Tensor]) -> tuple[dict[str, Tensor], list[tuple[int, int]], LocationGrid]:
        batch, hws = batch_images(images, self.cfg.size_divisible)
        pyramid = self.fpn(self.backbone(batch))
        grid = LocationGrid(self.slots, [pyramid[s.level].shape[-2:] for s in self.slots], device=batch.device)
        return pyramid, hws, grid

    def forward(self, images: list[Tensor], targets: list[dict] | None = None):
        if self.training:
            if targets is None:
                raise ValueError("SegmentProposalNet in training mode needs targets")
            return self._losses(*self._pyramid(images), targets)
        out = []
        for p in self.propose(images):
            h, w = p["image_size"]
            boxes = p["windows"].clone()
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
            out.append({"masks": paste_masks(p["mask_probs"], p["windows"], (h, w)), "scores": p["scores"],
                        "boxes": boxes, "slots": p["slots"]})
        return out

    def _losses(self, pyramid, hws, grid: LocationGrid, targets: list[dict]) -> dict[str, Tensor]:
        cfg = self.cfg
        b_idx, loc, label, targets_pos = [], [], [], []
        for i, t in enumerate(targets):
            if "masks" not in t:
                raise ValueError("segment proposals train on masks: load the data with with_masks=True")
            labels, matched = label_locations(t["boxes"], grid, hws[i], t.get("iscrowd"))
            pos, neg = sample_locations(labels, cfg.examples_per_image, cfg.positive_fraction, self.generator)
            targets_pos.append(mask_targets(t["masks"], matched[pos], grid.windows(pos), cfg.mask_size))
            loc += [pos, neg]
            label += [torch.ones_like(pos), torch.zeros_like(neg)]
            b_idx += [torch.full_like(pos, i), torch.full_like(neg, i)]
        loc, label, b_idx = torch.cat(loc), torch.cat(label).bool(), torch.cat(b_idx)
        target = torch.cat(targets_pos)  # positives in the order they appear in ``loc``
        slot, y, x = grid.decode(loc)
        score_logits, score_labels, mask_logits, mask_target = [], [], [], []
        pos_rank = torch.cumsum(label.long(), 0) - 1  # row of each positive in ``target``
        for s, sl in enumerate(self.slots):
            sel = torch.nonzero(slot == s).flatten()
            if sel.numel() == 0:
                continue
            mlp = self.mlps[sl.mlp]
            hidden = mlp.at(gather_patches(pyramid[sl.level], b_idx[sel], y[sel], x[sel], mlp.kernel))
            score_logits.append(mlp.scores(hidden))
            score_labels.append(label[sel].to(hidden.dtype))
            is_pos = label[sel]
            mask_logits.append(mlp.masks(hidden[is_pos]))  # the mask branch trains on positives only
            mask_target.append(target[pos_rank[sel[is_pos]]])
        return segment_losses(torch.cat(score_logits), torch.cat(score_labels), torch.cat(mask_logits),
                              torch.cat(mask_target).to(mask_logits[0].dtype), cfg.mask_loss_weight)

    @torch.no_grad()
    def propose(self, images: list[Tensor]) -> list[dict]:
        """Score every location of every slot, keep the ``cfg.proposals`` best per image (no
        NMS) and predict their masks. Per image: ``windows`` [K, 4] (input pixels),
        ``mask_probs`` [K, M, M], ``scores`` [K] (sigmoid), ``slots`` [K], ``image_size``."""
        pyramid, hws, grid = self._pyramid(images)
        hidden = [self.mlps[s.mlp].hidden_map(pyramid[s.level]) for s in self.slots]
        logits = torch.cat([self.mlps[s.mlp].score(h).flatten(1) for s, h in zip(self.slots, hidden)], dim=1)
        centres = grid.centres(torch.arange(len(grid), device=logits.device))
        out = []
        for i, (h, w) in enumerate(hws):
            # locations in the batch's zero padding see no image
            scores = logits[i].masked_fill((centres[:, 0] >= w) | (centres[:, 1] >= h), -math.inf)
            k = min(self.cfg.proposals, int(torch.isfinite(scores).sum()))
            top, idx = scores.topk(k)
            slot, y, x = grid.decode(idx)
            probs = torch.zeros((k, self.cfg.mask_size, self.cfg.mask_size), device=logits.device)
            for s, sl in enumerate(self.slots):
                sel = torch.nonzero(slot == s).flatten()
                if sel.numel():
                    probs[sel] = self.mlps[sl.mlp].masks(hidden[s][i, :, y[sel], x[sel]].T).sigmoid()
            out.append({"windows": grid.windows(idx), "mask_probs": probs, "scores": top.sigmoid(), "slots": slot,
                        "image_size": (h, w)})
        return out


def build_segment_model(generator: torch.Generator | None = None, **overrides) -> SegmentProposalNet:
    """A ``SegmentProposalNet`` with ``SegmentProposalConfig`` fields overridden by keyword."""
    unknown = set(overrides) - {f.name for f in fields(SegmentProposalConfig)}
    if unknown:
        raise TypeError(f"unknown override(s) {sorted(unknown)}")
    if "mlps" in overrides:
        overrides["mlps"] = tuple(overrides["mlps"])
    return SegmentProposalNet(SegmentProposalConfig(**overrides), generator=generator)
