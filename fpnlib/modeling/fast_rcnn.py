"""Fast R-CNN on a fixed set of proposals: the detectors of Table 2 (Sec. 4.2, 5.2.1).

Table 2 isolates the region head: every row classifies the same proposals (those of the FPN
RPN of Table 1(c)) and differs only in the features the RoIs are pooled from and the head:

  (a) "c4_conv5":  RoIs pooled 14x14 from C4, then the conv5 stage as head (ResNet baseline)
  (b) "c5_2fc":    RoIs pooled 7x7 from C5, then the 2fc head
  (c) "fpn":       each RoI pooled 7x7 from the P_k of Eq. (1), k in 2..5, then the 2fc head
  (d) "bottom_up": the same on the bottom-up pyramid (no top-down pathway)
  (e) "top_down_no_lateral": the same on the top-down pyramid without lateral connections
  (f) "p2_only":   every RoI pooled from P2 alone

Training samples 512 RoIs per image, 25% foreground, ground truth added (``roi_sampling``);
inference keeps detections above 0.05 after per-class NMS at 0.5, at most 100 per image.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .backbone import ResNetBackbone
from .box_head import Conv5Head, FastRCNNPredictor, TwoFCHead, fast_rcnn_losses
from .detectors import _NECK_SWITCHES, batch_images
from .fpn import FPN
from .group_nms import use_group_nms
from .guessed_sizes import with_guessed_sizes
from .postprocess import detections_from_head
from .roi_extraction import ROI_LEVELS, pyramid_roi_features
from .roi_sampling import sample_rois_batch

HEAD_VARIANTS = ("c4_conv5", "c5_2fc", "fpn", "bottom_up", "top_down_no_lateral", "p2_only")


@dataclass
class FastRCNNConfig:
    """One row of Table 2. ``num_classes`` counts the object classes (background is added)."""

    variant: str = "fpn"
    num_classes: int = 80
    depth: int = 50
    width: int = 64
    norm: str = "frozen_bn"
    freeze_at: int = 2
    fpn_channels: int = 256
    hidden: int = 1024  # the 2fc head's width (Sec. 4.2)
    pooler: str = "pool"  # "pool": RoI pooling as the paper; "align": RoIAlign
    # Eq. (1)'s 224 (ImageNet crop size); presets with smaller images scale it with their anchors
    canonical_size: float = 224.0
    sampling_ratio: int = 2
    size_divisible: int = 32
    batch_per_image: int = 512
    positive_fraction: float = 0.25
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_img: int = 100


class FastRCNN(nn.Module):
    """Backbone (+ neck) -> RoI features of given proposals -> head -> losses or detections.

    ``forward(images, targets)``: each target carries ``"proposals"`` (``[P_i, 4]`` xyxy, image
    pixels; ``fpnlib.data.proposals.WithProposals`` puts them there) and, in training, the
    ground truth. Training returns ``{"loss_cls", "loss_box_reg"}``; evaluation returns per
    image ``{"boxes", "scores", "labels"}`` with labels in ``1..num_classes``.
    """

    uses_proposals = True  # ``fpnlib.engine.inference.predict`` passes the targets' proposals

    def __init__(self, cfg: FastRCNNConfig, generator: torch.Generator | None = None):
        super().__init__()
        if cfg.variant not in HEAD_VARIANTS:
            raise ValueError(f"unknown variant {cfg.variant!r}; choose one of {HEAD_VARIANTS}")
        self.cfg, self.generator = cfg, generator
        v = cfg.variant
        out_features = {"c4_conv5": ("c4",), "c5_2fc": ("c5",)}.get(v, ("c2", "c3", "c4", "c5"))
        self.backbone = ResNetBackbone(depth=cfg.depth, norm=cfg.norm, freeze_at=cfg.freeze_at,
                                       width=cfg.width, out_features=out_features)
        if v in ("c4_conv5", "c5_2fc"):
            self.neck = None
            self.levels = (out_features[0],)
            self.strides = {out_features[0]: self.backbone.strides[out_features[0]]}
        else:
            # the region head reads P2..P5 (Eq. 1), never P6; P2-only reads P2 alone
            switches = dict(_NECK_SWITCHES[v])
            self.neck = FPN(self.backbone.out_channels, out_channels=cfg.fpn_channels, **switches)
            self.levels = ("p2",) if v == "p2_only" else ROI_LEVELS
            self.strides = {lvl: self.neck.strides[lvl] for lvl in self.levels}
        if v == "c4_conv5":
            self.resolution = 14  # then conv5's stride 2 gives 7x7 (ResNet Faster R-CNN)
            self.head = Conv5Head(depth=cfg.depth, width=cfg.width, norm=cfg.norm)
        else:
            self.resolution = 7
            channels = self.backbone.out_channels["c5"] if v == "c5_2fc" else cfg.fpn_channels
            self.head = TwoFCHead(channels, resolution=7, hidden=cfg.hidden)
        self.predictor = FastRCNNPredictor(self.head.out_channels, cfg.num_classes + 1)

    def _maps(self, batch: Tensor) -> dict[str, Tensor]:
        feats = self.backbone(batch)
        return feats if self.neck is None else self.neck(feats)

    def roi_features(self, maps: dict[str, Tensor], rois: list[Tensor]) -> Tensor:
        """``[R, C, r, r]`` features of the RoIs, each from its level (Eq. 1 where several)."""
        return pyramid_roi_features(maps, rois, self.strides, output_size=self.resolution, mode=self.cfg.pooler,
                                    sampling_ratio=self.cfg.sampling_ratio, levels=self.levels,
                                    canonical_size=self.cfg.canonical_size)

    def forward(self, images: list[Tensor], targets: list[dict]):
        if len(images) != len(targets) or any("proposals" not in t for t in targets):
            raise ValueError(f"{len(images)} images need as many targets, each with 'proposals'")
        proposals = [t["proposals"] for t in targets]
        batch, hws = batch_images(images, self.cfg.size_divisible)
        maps = self._maps(batch)
        if self.training:
            sampled = self._sample(proposals, targets)
            rois = [s.rois for s in sampled]
            logits, deltas = self.predictor(self.head(self.roi_features(maps, rois)))
            return fast_rcnn_losses(logits, deltas, torch.cat([s.labels for s in sampled]),
                                    torch.cat([s.regression_targets for s in sampled]))
        logits, deltas = self.predictor(self.head(self.roi_features(maps, list(proposals))))
        # on the grouped-NMS path the widest class group and NMS's rounds are guessed
        return with_guessed_sizes(lambda: detections_from_head(logits, deltas, list(proposals), hws,
                                                               self.cfg.score_thresh, self.cfg.nms_thresh,
                                                               self.cfg.detections_per_img),
                                  use_group_nms(batch.device))

    def _sample(self, proposals: list[Tensor], targets: list[dict]) -> list:
        """Each image's RoI minibatch (``roi_sampling``), all images labelled at once."""
        boxes, labels, crowds = [], [], []
        for target in targets:
            b, lab, crowd_boxes = target["boxes"], target["labels"], None
            crowd = target.get("iscrowd")
            if crowd is not None:  # (without crowds no mask index: on CUDA each one waits for the GPU)
                crowd = crowd.to(torch.bool)
                b, lab, crowd_boxes = b[~crowd], lab[~crowd], b[crowd]
            boxes.append(b)
            labels.append(lab)
            crowds.append(crowd_boxes if crowd_boxes is not None and len(crowd_boxes) else None)
        return sample_rois_batch(proposals, boxes, labels, batch_size_per_image=self.cfg.batch_per_image,
                                 positive_fraction=self.cfg.positive_fraction, generator=self.generator,
                                 ignore_boxes=crowds)
