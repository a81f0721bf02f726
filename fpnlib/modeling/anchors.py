"""Anchors on the feature pyramid (Sec. 4.1).

The paper attaches one anchor *scale* to each pyramid level, "areas of {32², 64², 128²,
256², 512²} pixels on {P2, P3, P4, P5, P6} respectively", with "anchors of multiple aspect
ratios {1:2, 1:1, 2:1} at each level", so 15 anchors over the pyramid and 3 per location.
The single-map baselines of Table 1 (a, b: conv4 / conv5, as in Faster R-CNN) and the
"only P2" ablation (Table 1 f) put all 15 anchors on one map instead.

Conventions used throughout fpnlib:

* boxes are ``(x1, y1, x2, y2)`` in input-image pixels, width ``x2 - x1`` (no "+1");
* aspect ratio ``r = h / w``, so an anchor of size ``s`` has ``w = s / sqrt(r)``,
  ``h = s * sqrt(r)`` and area exactly ``s²`` (no integer rounding, unlike py-faster-rcnn
  and torchvision, which round the base anchors to whole pixels);
* cell anchors are **ratio-major**: index ``a = i_ratio * len(sizes) + i_size``. This is
  the order of Detectron's / py-faster-rcnn's ``generate_anchors`` and of torchvision's
  ``AnchorGenerator``, so 15-anchor heads stay interchangeable with theirs;
* anchors of a map are ordered ``(y, x, a)``: all ``A`` anchors of location (0, 0), then
  (0, 1), ... — the order of an RPN head output ``(N, A, H, W)`` permuted to
  ``(N, H, W, A)`` and flattened.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Sequence

import torch
from torch import Tensor, nn

PAPER_ANCHOR_SIZES = {"p2": 32.0, "p3": 64.0, "p4": 128.0, "p5": 256.0, "p6": 512.0}  # Sec. 4.1
ASPECT_RATIOS = (0.5, 1.0, 2.0)  # {1:2, 1:1, 2:1}, Sec. 4.1 (as h / w)
LEVEL_STRIDES = {"c2": 4, "c3": 8, "c4": 16, "c5": 32, "p2": 4, "p3": 8, "p4": 16, "p5": 32, "p6": 64}
VARIANTS = ("c4", "c5", "fpn", "bottom_up", "top_down_no_lateral", "p2_only")  # rows of Table 1

_PYRAMID_VARIANTS = ("fpn", "bottom_up", "top_down_no_lateral")


def cell_anchors(sizes: Sequence[float], ratios: Sequence[float] = ASPECT_RATIOS) -> Tensor:
    """Anchors of one feature-map location, centred at (0, 0): ``[len(ratios)*len(sizes), 4]``.

    Ratio-major order (see the module docstring); ``ratio = h / w``; areas are exactly
    ``size²``. Computed in float64 and returned as float32.
    """
    s = torch.as_tensor(sizes, dtype=torch.float64)
    r = torch.as_tensor(ratios, dtype=torch.float64)
    if (s <= 0).any() or (r <= 0).any():
        raise ValueError(f"sizes and ratios must be positive, got {list(sizes)} and {list(ratios)}")
    half_w = (s[None, :] / r.sqrt()[:, None] / 2).reshape(-1)  # [R, S] -> ratio-major
    half_h = (s[None, :] * r.sqrt()[:, None] / 2).reshape(-1)
    return torch.stack([-half_w, -half_h, half_w, half_h], dim=1).to(torch.float32)


def grid_anchors(
    cell: Tensor, feature_hw: tuple[int, int], stride: int | tuple[int, int], offset: float = 0.5
) -> Tensor:
    """Tile ``cell`` ``[A, 4]`` over an ``H x W`` map: ``[H*W*A, 4]`` in ``(y, x, a)`` order.

    Location ``(y, x)`` is centred at ``((x + offset) * stride, (y + offset) * stride)``.
    ``offset=0.5`` (default) puts the anchor at the centre of the ``stride x stride`` input
    patch that the feature cell covers, so anchors are symmetric about the image centre;
    ``offset=0.0`` is the top-left-corner convention of py-faster-rcnn, torchvision and
    Detectron2, kept for loading their weights. ``stride`` may be ``(stride_y, stride_x)``.
    """
    h, w = feature_hw
    stride_y, stride_x = (stride, stride) if isinstance(stride, (int, float)) else stride
    device = cell.device
    ys = (torch.arange(h, device=device, dtype=torch.float32) + offset) * stride_y
    xs = (torch.arange(w, device=device, dtype=torch.float32) + offset) * stride_x
    cy, cx = torch.meshgrid(ys, xs, indexing="ij")  # [H, W], y-major like the head's output
    shifts = torch.stack([cx, cy, cx, cy], dim=-1)  # [H, W, 4]
    return (shifts[:, :, None, :] + cell.to(torch.float32)[None, None, :, :]).reshape(-1, 4)


def anchor_sizes_for(variant: str, scale: float = 1.0) -> dict[str, tuple[float, ...]]:
    """Level -> anchor sizes for a row of Table 1.

    Pyramid variants ("fpn", "bottom_up", "top_down_no_lateral"): one size per level on
    P2..P6 (Sec. 4.1). "c4" / "c5": all five sizes on that single map, the Faster R-CNN
    style baselines (Table 1 a, b). "p2_only": all five sizes on P2 (Table 1 f, 15 anchors
    per location). ``scale`` multiplies every size: the small presets train on images far
    smaller than the paper's 800 px and scale the anchors with them (a documented deviation).
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {VARIANTS}")
    if scale <= 0:
        raise ValueError(f"scale must be positive, got {scale}")
    if variant in _PYRAMID_VARIANTS:
        return {lvl: (s * scale,) for lvl, s in PAPER_ANCHOR_SIZES.items()}
    level = "p2" if variant == "p2_only" else variant
    return {level: tuple(s * scale for s in PAPER_ANCHOR_SIZES.values())}


def count_anchors(image_hw: tuple[int, int], variant: str, ratios: Sequence[float] = ASPECT_RATIOS) -> int:
    """Number of anchors of ``variant`` on an ``image_hw`` image (Table 1, "# anchors").

    Feature sizes are ``ceil(size / stride)``, what ResNet's padded stride-2 layers (and
    the stride-2 subsampling that makes P6) produce.
    """
    h, w = image_hw
    total = 0
    for level, sizes in anchor_sizes_for(variant).items():
        stride = LEVEL_STRIDES[level]
        total += math.ceil(h / stride) * math.ceil(w / stride) * len(sizes) * len(ratios)
    return total


class AnchorGenerator(nn.Module):
    """Anchors for every level of a set of feature maps (Sec. 4.1). No parameters.

    ``forward`` returns ``{level: [H*W*A, 4]}`` float32 on the maps' device for each level
    in ``sizes`` (other maps are ignored), the same for every image of the batch. Results
    are cached by ``(level, H, W, stride, device)``; the cached tensors are shared between
    calls, so treat them as read-only.

    Two switches reproduce torchvision's ``AnchorGenerator`` (to run its trained weights;
    both off by default, which keeps the paper's exact geometry):

    * ``round_cells``: round the cell anchors' corners to whole pixels, as py-faster-rcnn and
      torchvision do (size 32, ratio 1:2 becomes 46 x 22 instead of 45.25 x 22.63).
    * ``strides_from_image``: the stride of a level is ``image side // map side`` per axis,
      as torchvision computes it, instead of the nominal stride. The image side is the
      finest map's side times its stride (exact: batches are padded to a multiple of 32).
      The two differ on a map whose side was rounded up, e.g. P6 of a batch 800 px high:
      P5 has 25 rows, P6 13, and torchvision spaces P6's anchors 800 // 13 = 61 px apart.
    """

    def __init__(
        self,
        sizes: dict[str, Sequence[float]],
        ratios: Sequence[float] = ASPECT_RATIOS,
        strides: dict[str, int] | None = None,
        offset: float = 0.5,
        cache_size: int = 64,
        round_cells: bool = False,
        strides_from_image: bool = False,
    ):
        super().__init__()
        strides = LEVEL_STRIDES if strides is None else strides
        missing = [lvl for lvl in sizes if lvl not in strides]
        if missing:
            raise ValueError(f"no stride known for level(s) {missing}")
        self.sizes = {lvl: tuple(float(s) for s in sz) for lvl, sz in sizes.items()}
        self.ratios = tuple(float(r) for r in ratios)
        self.strides = {lvl: int(strides[lvl]) for lvl in self.sizes}
        self.offset = float(offset)
        self.round_cells, self.strides_from_image = bool(round_cells), bool(strides_from_image)
        self.cell = {lvl: cell_anchors(sz, self.ratios) for lvl, sz in self.sizes.items()}
        if self.round_cells:
            self.cell = {lvl: c.round() for lvl, c in self.cell.items()}
        # Bounded: multi-size training pads batches to many different shapes.
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple, Tensor] = OrderedDict()

    @property
    def levels(self) -> tuple[str, ...]:
        return tuple(self.sizes)

    def num_anchors(self, level: str) -> int:
        """Anchors per location on ``level`` (the RPN head's ``A``)."""
        return len(self.sizes[level]) * len(self.ratios)

    def num_anchors_per_level(self) -> dict[str, int]:
        return {lvl: self.num_anchors(lvl) for lvl in self.sizes}

    def anchors_for(
        self,
        level: str,
        feature_hw: tuple[int, int],
        device: torch.device | str = "cpu",
        stride: tuple[int, int] | None = None,
    ) -> Tensor:
        """Anchors of ``level`` for a map of size ``feature_hw`` (cached); ``stride``
        ``(y, x)`` overrides the level's nominal stride."""
        h, w = int(feature_hw[0]), int(feature_hw[1])
        stride = (self.strides[level],) * 2 if stride is None else (int(stride[0]), int(stride[1]))
        device = torch.device(device)
        key = (level, h, w, stride, device)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        anchors = grid_anchors(self.cell[level].to(device), (h, w), stride, self.offset)
        self._cache[key] = anchors
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return anchors

    def forward(self, feature_maps: dict[str, Tensor]) -> dict[str, Tensor]:
        missing = [lvl for lvl in self.sizes if lvl not in feature_maps]
        if missing:
            raise KeyError(f"feature maps lack level(s) {missing}; got {list(feature_maps)}")
        strides = {lvl: None for lvl in self.sizes}
        if self.strides_from_image:
            finest = min(self.sizes, key=lambda lvl: self.strides[lvl])
            img_h, img_w = (n * self.strides[finest] for n in feature_maps[finest].shape[-2:])
            strides = {lvl: (img_h // feature_maps[lvl].shape[-2], img_w // feature_maps[lvl].shape[-1])
                       for lvl in self.sizes}
        return {
            lvl: self.anchors_for(lvl, feature_maps[lvl].shape[-2:], feature_maps[lvl].device, strides[lvl])
            for lvl in self.sizes
        }

    def extra_repr(self) -> str:
        return (f"sizes={self.sizes}, ratios={self.ratios}, strides={self.strides}, offset={self.offset}, "
                f"round_cells={self.round_cells}, strides_from_image={self.strides_from_image}")
