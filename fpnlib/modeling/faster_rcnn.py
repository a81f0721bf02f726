"""Faster R-CNN: an RPN and a Fast R-CNN head in one detector (Sec. 5.2.2, 5.2.3; Tables 3, 5).

Table 3 gives the RPN and the region head the same kind of backbone ("consistent proposals"):

  (a) "c4_conv5": RPN on C4, RoIs pooled 14x14 from C4, conv5 stage as head (ResNet baseline)
  (b) "c5_2fc":   RPN on C5, RoIs pooled from C5, 2fc head
  (c) "fpn":      RPN on P2..P6, RoIs pooled from the P_k of Eq. (1), 2fc head

and, "for simplicity", does not share features between the two: ``share_features=False``
gives the RPN its own backbone (and pyramid). Table 5 then shares them: one backbone feeds
both, made by the 4-step alternating training of Faster R-CNN (``fpnlib.engine.four_step``).

Both are trained here by *approximate joint training*: one loss = RPN losses + head losses, and
the proposals enter the head as constants (no gradient through the box coordinates). Without
sharing, the two losses touch disjoint parameters, so this is the same as training the RPN and
the detector side by side, the detector seeing the RPN's current proposals.

``stage`` selects what a training step optimises: "joint" (both), "rpn" (RPN losses only) or
"detector" (head losses only, on proposals of the RPN as it is); the 4-step training uses the
last two with the shared layers frozen.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .box_head import fast_rcnn_losses
from .detectors import RPNDetector, RPNDetectorConfig, batch_images, build_rpn
from .fast_rcnn import FastRCNN, FastRCNNConfig
from .group_nms import use_group_nms
from .guessed_sizes import with_guessed_sizes
from .postprocess import PaddedDetections, detections_from_head, grouped_detections
from .rpn import RPN, RPNConfig

# Table 3 row -> the RPN (a Table 1 row) on the same backbone type
RPN_VARIANT = {"c4_conv5": "c4", "c5_2fc": "c5", "fpn": "fpn"}
STAGES = ("joint", "rpn", "detector")


@dataclass
class FasterRCNNConfig(FastRCNNConfig):
    """A Table 3 / Table 5 detector: ``FastRCNNConfig`` (the head) + the RPN's settings."""

    variant: str = "fpn"
    share_features: bool = False  # Table 3: separate backbones; Table 5 "share": one
    anchor_scale: float = 1.0
    anchor_offset: float = 0.5
    # torchvision's anchor conventions, for its trained weights (see anchors.AnchorGenerator);
    # off keeps the paper's exact anchor areas and nominal strides.
    anchor_round: bool = False
    anchor_strides_from_image: bool = False
    rpn: RPNConfig = field(default_factory=RPNConfig)


class FasterRCNN(FastRCNN):
    """RPN + Fast R-CNN head. ``forward(images, targets)``: training returns the RPN losses
    (``loss_objectness``, ``loss_rpn_box``) and the head losses (``loss_cls``, ``loss_box_reg``),
    as ``stage`` selects; evaluation returns per image ``{"boxes", "scores", "labels"}``.

    The head, its backbone (+ pyramid) and ``roi_features`` are ``FastRCNN``'s; the RPN reads
    those same maps when ``share_features`` and its own ``rpn_network`` (an ``RPNDetector`` of the
    matching Table 1 row) otherwise.
    """

    uses_proposals = False  # it makes its own

    def __init__(self, cfg: FasterRCNNConfig, generator: torch.Generator | None = None):
        if cfg.variant not in RPN_VARIANT:
            raise ValueError(f"unknown Faster R-CNN variant {cfg.variant!r}; choose one of {tuple(RPN_VARIANT)}")
        super().__init__(cfg, generator=generator)
        rpn_variant = RPN_VARIANT[cfg.variant]
        if cfg.share_features:
            self.rpn_network = None
            single = self.neck is None
            channels = self.backbone.out_channels[rpn_variant] if single else cfg.fpn_channels
            strides = self.backbone.strides if single else self.neck.strides
            self.shared_rpn = build_rpn(rpn_variant, channels, strides, cfg.rpn, cfg.anchor_scale, cfg.anchor_offset,
                                        generator, cfg.anchor_round, cfg.anchor_strides_from_image)
        else:
            self.shared_rpn = None
            self.rpn_network = RPNDetector(RPNDetectorConfig(
                variant=rpn_variant, depth=cfg.depth, width=cfg.width, norm=cfg.norm, freeze_at=cfg.freeze_at,
                fpn_channels=cfg.fpn_channels, anchor_scale=cfg.anchor_scale, anchor_offset=cfg.anchor_offset,
                anchor_round=cfg.anchor_round, anchor_strides_from_image=cfg.anchor_strides_from_image,
                size_divisible=cfg.size_divisible, rpn=cfg.rpn), generator=generator)
        self.stage = "joint"

    @property
    def rpn(self) -> RPN:
        """The RPN module, wherever its features come from."""
        return self.shared_rpn if self.rpn_network is None else self.rpn_network.rpn

    def _rpn_maps(self, batch: Tensor, maps: dict[str, Tensor]) -> dict[str, Tensor]:
        return maps if self.rpn_network is None else self.rpn_network._maps(batch)

    def _head_outputs(self, maps: dict[str, Tensor], rpn_maps: dict[str, Tensor], hws: list[tuple[int, int]]):
        """Inference's proposals and the head's (logits, deltas) for them."""
        proposals = [p[0] for p in self.rpn(rpn_maps, hws)[0]]
        return proposals, *self.predictor(self.head(self.roi_features(maps, proposals)))

    def detect(self, batch: Tensor, hws: list[tuple[int, int]], guess: bool = True) -> list[dict[str, Tensor]]:
        """Evaluation's detections for a padded ``batch`` of images of sizes ``hws``. On the
        grouped-NMS path the sizes in the middle are guessed, checked at the end
        (``guessed_sizes``); ``guess=False`` reads them where needed and learns from that pass."""
        maps = self._maps(batch)
        rpn_maps = self._rpn_maps(batch, maps)

        def detect():
            proposals, logits, deltas = self._head_outputs(maps, rpn_maps, hws)
            return detections_from_head(logits, deltas, proposals, hws, self.cfg.score_thresh,
                                        self.cfg.nms_thresh, self.cfg.detections_per_img)

        return with_guessed_sizes(detect, use_group_nms(batch.device), guess)

    def padded_detections(self, batch: Tensor, hws: list[tuple[int, int]]) -> PaddedDetections:
        """:meth:`detect` on the grouped-NMS path, left on the device as one padded batch: inside
        a guessing pass no operator waits for the device, so ``cuda_graphs`` captures this."""
        maps = self._maps(batch)
        proposals, logits, deltas = self._head_outputs(maps, self._rpn_maps(batch, maps), hws)
        return grouped_detections(logits, deltas, proposals, hws, self.cfg.score_thresh, self.cfg.nms_thresh,
                                  self.cfg.detections_per_img)

    def forward(self, images: list[Tensor], targets: list[dict] | None = None):
        if self.stage not in STAGES:
            raise ValueError(f"unknown stage {self.stage!r}; choose one of {STAGES}")
        batch, hws = batch_images(images, self.cfg.size_divisible)
        if not self.training:
            graphs = getattr(self, "inference_graphs", None)  # set by optimized_for_inference
            return self.detect(batch, hws) if graphs is None else graphs(self, batch, hws)
        maps = self._maps(batch)
        rpn_maps = self._rpn_maps(batch, maps)
        if targets is None or len(targets) != len(images):
            raise ValueError(f"training needs one target per image ({len(images)} images)")
        if self.stage == "rpn":  # nothing downstream needs proposals
            return self.rpn(rpn_maps, hws, targets, return_proposals=False)[1]
        proposals, losses = self.rpn(rpn_maps, hws, targets, compute_losses=self.stage == "joint")
        # select_proposals runs under no_grad: the head sees the boxes as constants
        sampled = self._sample([p[0] for p in proposals], targets)
        logits, deltas = self.predictor(self.head(self.roi_features(maps, [s.rois for s in sampled])))
        losses.update(fast_rcnn_losses(logits, deltas, torch.cat([s.labels for s in sampled]),
                                       torch.cat([s.regression_targets for s in sampled])))
        return losses
