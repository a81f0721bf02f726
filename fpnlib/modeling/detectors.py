"""Detectors assembled from the parts: for now the RPN-only detector of Table 1 (Sec. 5.1).

Table 1 compares RPNs that see different feature maps, all with the same head (Sec. 4.1):

  (a) "c4":   the Faster R-CNN baseline, an RPN on conv4 (C4), 15 anchors per location
  (b) "c5":   the same on conv5 (C5)
  (c) "fpn":  the full feature pyramid P2..P6, one anchor scale per level
  (d) "bottom_up":           the pyramid without the top-down pathway
  (e) "top_down_no_lateral": the pyramid without the 1x1 lateral connections
  (f) "p2_only":             only the finest level P2, all 15 anchors on it

``RPNDetector`` = backbone -> (optional) FPN neck -> ``RPN``; it returns losses in training
and class-agnostic proposals (the objects the AR metrics of Table 1 score) in evaluation.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch
from torch import Tensor, nn

from .anchors import VARIANTS, AnchorGenerator, anchor_sizes_for
from .backbone import ResNetBackbone
from .fpn import FPN
from .rpn import RPN, RPNConfig, RPNHead

_SINGLE_MAP = ("c4", "c5")  # variants whose RPN reads a raw backbone map, no neck
_NECK_SWITCHES = {  # FPN(...) keyword switches of each pyramid variant (Table 1 c-f)
    "fpn": {},
    "bottom_up": {"top_down": False},
    "top_down_no_lateral": {"lateral": False},
    "p2_only": {"out_levels": ("p2",)},
}


@dataclass
class RPNDetectorConfig:
    """One row of Table 1. ``fpn_channels`` is d (256 in the paper, Sec. 3)."""

    variant: str = "fpn"
    depth: int = 50
    width: int = 64
    norm: str = "frozen_bn"
    freeze_at: int = 2
    fpn_channels: int = 256
    anchor_scale: float = 1.0  # multiplies the paper's anchor sizes, for images smaller than 800 px
    anchor_offset: float = 0.5
    # torchvision's anchor conventions, for its trained weights (see anchors.AnchorGenerator);
    # off keeps the paper's exact anchor areas and nominal strides.
    anchor_round: bool = False
    anchor_strides_from_image: bool = False
    size_divisible: int = 32  # the coarsest backbone stride, so every level aligns with the image
    rpn: RPNConfig = field(default_factory=RPNConfig)


def batch_images(images: list[Tensor], size_divisible: int = 32) -> tuple[Tensor, list[tuple[int, int]]]:
    """Zero-pad [C, H, W] images at the bottom/right to one [N, C, H', W'] tensor.

    H', W' are the largest sizes rounded up to a multiple of ``size_divisible``, so that the
    stride-2 stages halve exactly and pyramid levels line up. Padding at the bottom/right keeps
    pixel coordinates, so boxes need no shift. Returns the tensor and the true (H, W) of each image.
    """
    if len(images) == 0:
        raise ValueError("batch_images needs at least one image")
    hws = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
    h = max(hw[0] for hw in hws)
    w = max(hw[1] for hw in hws)
    if size_divisible > 1:
        h = -(-h // size_divisible) * size_divisible
        w = -(-w // size_divisible) * size_divisible
    batch = images[0].new_zeros((len(images), images[0].shape[0], h, w))
    for b, im in zip(batch, images):
        b[:, : im.shape[-2], : im.shape[-1]].copy_(im)
    return batch, hws


def build_rpn(variant: str, channels: int, strides: dict[str, int], cfg: RPNConfig, anchor_scale: float = 1.0,
              anchor_offset: float = 0.5, generator: torch.Generator | None = None, anchor_round: bool = False,
              anchor_strides_from_image: bool = False) -> RPN:
    """The RPN of a Table 1 row on maps of ``channels`` channels: anchors per level (Sec. 4.1)
    and one head, shared across levels unless ``cfg.shared_head`` is off. ``anchor_round`` and
    ``anchor_strides_from_image`` are torchvision's anchor conventions (``AnchorGenerator``)."""
    sizes = anchor_sizes_for(variant, anchor_scale)
    levels = tuple(sizes)
    anchor_generator = AnchorGenerator(sizes, strides={lvl: strides[lvl] for lvl in levels}, offset=anchor_offset,
                                       round_cells=anchor_round, strides_from_image=anchor_strides_from_image)
    num_anchors = {anchor_generator.num_anchors(lvl) for lvl in levels}
    assert len(num_anchors) == 1, "one head needs the same number of anchors on every level"
    head = RPNHead(channels, num_anchors.pop(), levels, shared=cfg.shared_head, hidden=channels)
    return RPN(head, anchor_generator, cfg, generator=generator)


class RPNDetector(nn.Module):
    """Backbone -> neck (per ``cfg.variant``) -> RPN: the region-proposal detector of Table 1.

    ``forward(images, targets)``: training returns ``{"loss_objectness", "loss_rpn_box"}``;
    evaluation returns per image ``{"boxes": [K, 4], "scores": [K], "levels": [K]}`` in the
    input image's pixels (images are only padded, never resized, so no rescaling is needed);
    ``levels`` indexes ``self.rpn.head.levels``, the map each proposal came from.
    ``generator`` optionally seeds the RPN's anchor sampling.
    """

    def __init__(self, cfg: RPNDetectorConfig, generator: torch.Generator | None = None):
        super().__init__()
        if cfg.variant not in VARIANTS:
            raise ValueError(f"unknown variant {cfg.variant!r}; choose one of {VARIANTS}")
        self.cfg = cfg
        single = cfg.variant in _SINGLE_MAP
        # c4 stops after conv4 (the Faster R-CNN C4 baseline never runs conv5 for the RPN).
        out_features = ("c4",) if cfg.variant == "c4" else ("c5",) if cfg.variant == "c5" else ("c2", "c3", "c4", "c5")
        self.backbone = ResNetBackbone(
            depth=cfg.depth, norm=cfg.norm, freeze_at=cfg.freeze_at, width=cfg.width, out_features=out_features
        )
        if single:
            self.neck = None
            channels, strides = self.backbone.out_channels[cfg.variant], self.backbone.strides
        else:
            self.neck = FPN(self.backbone.out_channels, out_channels=cfg.fpn_channels, **_NECK_SWITCHES[cfg.variant])
            channels, strides = cfg.fpn_channels, self.neck.strides
        self.rpn = build_rpn(cfg.variant, channels, strides, cfg.rpn, cfg.anchor_scale, cfg.anchor_offset, generator,
                             cfg.anchor_round, cfg.anchor_strides_from_image)

    def _maps(self, batch: Tensor) -> dict[str, Tensor]:
        feats = self.backbone(batch)
        return feats if self.neck is None else self.neck(feats)

    def features(self, images: list[Tensor] | Tensor) -> dict[str, Tensor]:
        """The maps the RPN sees (C4, C5 or pyramid levels), for inspection in notebooks."""
        batch = images if isinstance(images, Tensor) else batch_images(images, self.cfg.size_divisible)[0]
        maps = self._maps(batch)
        return {lvl: maps[lvl] for lvl in self.rpn.head.levels}

    def forward(self, images: list[Tensor], targets: list[dict] | None = None):
        batch, hws = batch_images(images, self.cfg.size_divisible)
        # Training needs only the losses: the proposals of an RPN trained alone go nowhere.
        proposals, losses = self.rpn(
            self._maps(batch), hws, targets if self.training else None, return_proposals=not self.training,
            with_levels=True,
        )
        if self.training:
            return losses
        return [{"boxes": boxes, "scores": scores, "levels": levels} for boxes, scores, levels in proposals]


def build_rpn_detector(variant: str, generator: torch.Generator | None = None, **overrides) -> RPNDetector:
    """An ``RPNDetector`` for a Table 1 row. Keyword overrides set ``RPNDetectorConfig``
    fields, or ``RPNConfig`` fields (e.g. ``post_nms_top_n_test=300``) of its ``rpn``."""
    det_fields = {f.name for f in fields(RPNDetectorConfig)}
    rpn_fields = {f.name for f in fields(RPNConfig)}
    unknown = set(overrides) - det_fields - rpn_fields
    if unknown:
        raise TypeError(f"unknown override(s) {sorted(unknown)}")
    rpn_cfg = overrides.pop("rpn", None) or RPNConfig()
    rpn_cfg = replace(rpn_cfg, **{k: overrides.pop(k) for k in list(overrides) if k in rpn_fields - det_fields})
    return RPNDetector(RPNDetectorConfig(variant=variant, rpn=rpn_cfg, **overrides), generator=generator)
