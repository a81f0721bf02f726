"""Run torchvision's Faster R-CNN R50-FPN weights in fpnlib's own detector.

``torchvision.models.detection.fasterrcnn_resnet50_fpn`` is an FPN Faster R-CNN in the sense
of the paper (Lin et al., CVPR 2017, Sec. 4 and 5.2.3): a ResNet-50 whose C2..C5 feed a
d = 256 pyramid P2..P6, an RPN shared over P2..P6 with one anchor scale per level, RoIs
pooled from the P_k of Eq. (1) into a 2fc head. fpnlib builds the same network, so its
weights (e.g. torchvision's COCO ones) load by renaming keys; nothing is reimplemented.

What torchvision does differently from fpnlib's defaults, and the setting that matches it
(read from ``torchvision/models/detection/{faster_rcnn,rpn,anchor_utils,roi_heads,
transform}.py`` and ``torchvision/ops/poolers.py``):

* RoIAlign (Mask R-CNN), 7x7, 2 samples per bin side, no half-pixel shift, instead of the
  paper's RoI pooling: ``pooler="align"``, ``sampling_ratio=2``;
* one backbone for the RPN and the head: ``share_features=True``;
* anchors at a cell's top-left corner (``anchor_offset=0``), with corners rounded to whole
  pixels (``anchor_round``) and strides ``image side // map side`` (``anchor_strides_from_image``,
  it differs on P6 when P5's side is odd);
* the RPN drops boxes under 1e-3 px (``rpn.min_size``) and ranks its NMS by probabilities
  (``rpn.rank_by_probability``);
* ``num_classes`` counts the background in torchvision (91 for COCO), not in fpnlib (90).

Already the same: FrozenBN ResNet-50 with conv1 + conv2_x frozen (3 trainable stages), FPN
(nearest upsampling, P6 = stride-2 subsampling of P5), RPN head 3x3 + two 1x1, RPN top
2000/1000 pre-NMS per level and 2000/1000 post-NMS per image (train/test), NMS 0.7, box
coder weights (1, 1, 1, 1) for the RPN and (10, 10, 5, 5) for the head, deltas clamped at
log(1000/16), Eq. (1) with k0 = 4, 224 and eps 1e-6 (torchvision infers each level's RoIAlign
scale from the map / image size ratio rounded to a power of 2: 1/stride for images over ~80 px),
2fc 1024, score > 0.05, boxes under 1e-2 px dropped, per-class NMS 0.5, 100 detections. Training-only settings that differ
(torchvision's head box loss has smooth-L1 beta 1/9) do not change detections and are not
matched.

Images: torchvision normalises with ImageNet statistics, then resizes (shorter side 800,
longer at most 1333, output side ``floor(side * scale)``), pads to a multiple of 32 and
scales the boxes back; :func:`detect` does the same around an fpnlib model.
"""
from __future__ import annotations

import os
import re
from dataclasses import fields, replace

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import FrozenBatchNorm2d

from fpnlib.data.transforms import Normalize

from .backbone import read_state_dict
from .faster_rcnn import FasterRCNN, FasterRCNNConfig
from .rpn import RPNConfig

__all__ = [
    "COCO_V1_FILE_PREFIX",
    "torchvision_faster_rcnn_config",
    "convert_torchvision_state_dict",
    "load_torchvision_faster_rcnn",
    "set_frozen_bn_eps",
    "resize_like_torchvision",
    "preprocess",
    "detect",
]

# torchvision's COCO_V1 weights file (fasterrcnn_resnet50_fpn_coco-258fb6c6.pth) was trained
# with FrozenBN eps = 0, and torchvision loads it with overwrite_eps(model, 0.0).
COCO_V1_FILE_PREFIX = "fasterrcnn_resnet50_fpn_coco-"

_NORMALIZE = Normalize()  # one for all calls: it keeps its statistics on each device it meets

# torchvision key prefix <-> fpnlib key prefix: the whole conversion, read in both directions.
_PREFIXES = (
    ("backbone.body.", "backbone."),  # ResNet: torchvision's names in both (conv1, bn1, layer1..4)
    *((f"backbone.fpn.inner_blocks.{i}.0.", f"neck.lateral_convs.p{i + 2}.") for i in range(4)),
    *((f"backbone.fpn.layer_blocks.{i}.0.", f"neck.output_convs.p{i + 2}.") for i in range(4)),
    ("rpn.head.conv.0.0.", "shared_rpn.head.head.conv."),
    ("rpn.head.cls_logits.", "shared_rpn.head.head.objectness."),
    ("rpn.head.bbox_pred.", "shared_rpn.head.head.deltas."),
    ("roi_heads.box_head.", "head."),  # fc6, fc7
    ("roi_heads.box_predictor.", "predictor."),  # cls_score, bbox_pred
)
_PREDICTOR_KEY = "roi_heads.box_predictor.cls_score.weight"
# Older checkpoints (COCO_V1 among them) predate Conv2dNormActivation: torchvision renames
# these keys in _load_from_state_dict, we do it here.
_LEGACY = (
    (re.compile(r"^(backbone\.fpn\.(?:inner|layer)_blocks\.\d+)\.(weight|bias)$"), r"\1.0.\2"),
    (re.compile(r"^rpn\.head\.conv\.(weight|bias)$"), r"rpn.head.conv.0.0.\1"),
)


def torchvision_faster_rcnn_config(num_classes: int = 90, **overrides) -> FasterRCNNConfig:
    """``FasterRCNNConfig`` of ``fasterrcnn_resnet50_fpn`` (module docstring lists each choice).

    ``num_classes`` counts object classes without the background (COCO: 90 = torchvision's
    91 - 1; label k of fpnlib is torchvision's label k). Keyword ``overrides`` set fields of
    ``FasterRCNNConfig`` or of its ``RPNConfig`` (e.g. ``post_nms_top_n_test=300``).
    """
    det_fields = {f.name for f in fields(FasterRCNNConfig)}
    rpn_fields = {f.name for f in fields(RPNConfig)}
    unknown = set(overrides) - det_fields - rpn_fields
    if unknown:
        raise TypeError(f"unknown override(s) {sorted(unknown)}")
    rpn = RPNConfig(
        pos_iou=0.7, neg_iou=0.3, batch_per_image=256, positive_fraction=0.5,
        pre_nms_top_n_train=2000, pre_nms_top_n_test=1000, post_nms_top_n_train=2000, post_nms_top_n_test=1000,
        nms_thresh=0.7, min_size=1e-3, smooth_l1_beta=1.0 / 9.0, shared_head=True, rank_by_probability=True,
    )
    rpn = replace(rpn, **{k: overrides.pop(k) for k in list(overrides) if k in rpn_fields - det_fields})
    cfg = FasterRCNNConfig(
        variant="fpn", num_classes=num_classes, depth=50, width=64, norm="frozen_bn", freeze_at=2,
        fpn_channels=256, hidden=1024, pooler="align", sampling_ratio=2, size_divisible=32,
        batch_per_image=512, positive_fraction=0.25, score_thresh=0.05, nms_thresh=0.5, detections_per_img=100,
        share_features=True, anchor_scale=1.0, anchor_offset=0.0, anchor_round=True, anchor_strides_from_image=True,
        rpn=rpn,
    )
    return replace(cfg, **overrides)


def _to_fpnlib(key: str) -> str | None:
    for tv, ours in _PREFIXES:
        if key.startswith(tv):
            return ours + key[len(tv):]
    return None


def _to_torchvision(key: str) -> str:
    for tv, ours in _PREFIXES:
        if key.startswith(ours):
            return tv + key[len(ours):]
    return key


def _show(items: list[str]) -> str:
    return ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")


def _reference_shapes(num_classes: int) -> dict[str, torch.Size]:
    """Key -> shape of torchvision's own R50-FPN Faster R-CNN, built on the meta device
    (no memory, no initialisation), so the check follows torchvision's definition."""
    from torchvision.models.detection import fasterrcnn_resnet50_fpn

    with torch.device("meta"):
        model = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=num_classes + 1)
    return {k: v.shape for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}


def convert_torchvision_state_dict(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename a ``fasterrcnn_resnet50_fpn`` state dict to fpnlib's :class:`FasterRCNN` keys.

    Tensors are not copied or changed: ``backbone.body.*`` -> ``backbone.*``,
    ``backbone.fpn.inner_blocks.i.0`` / ``layer_blocks.i.0`` -> ``neck.lateral_convs.p{i+2}`` /
    ``neck.output_convs.p{i+2}``, ``rpn.head.{conv.0.0, cls_logits, bbox_pred}`` ->
    ``shared_rpn.head.head.{conv, objectness, deltas}``, ``roi_heads.box_head`` -> ``head``,
    ``roi_heads.box_predictor`` -> ``predictor`` (see ``_PREFIXES``). Legacy key names
    (``inner_blocks.i.weight``, ``rpn.head.conv.weight``) are accepted; BatchNorm's
    ``num_batches_tracked`` is dropped (fpnlib's FrozenBN has none; BN in eval mode is FrozenBN).

    The input is checked against torchvision's own model with the same number of classes
    (taken from ``roi_heads.box_predictor.cls_score``): a ``ValueError`` names every missing
    key, unexpected key and shape mismatch, in torchvision's naming.
    """
    if not isinstance(state_dict, dict) or not all(isinstance(v, Tensor) for v in state_dict.values()):
        raise ValueError("expected a state dict: a dict of tensors keyed by parameter name")
    sd = {}
    for key, value in state_dict.items():
        if key.endswith("num_batches_tracked"):
            continue
        for pattern, repl in _LEGACY:
            key = pattern.sub(repl, key)
        sd[key] = value
    num_classes = sd[_PREDICTOR_KEY].shape[0] - 1 if _PREDICTOR_KEY in sd else 90
    reference = _reference_shapes(num_classes)
    missing = [k for k in reference if k not in sd]
    unexpected = [k for k in sd if k not in reference or _to_fpnlib(k) is None]
    mismatched = [f"{k}: {tuple(v.shape)} vs {tuple(reference[k])}"
                  for k, v in sd.items() if k in reference and v.shape != reference[k]]
    if missing or unexpected or mismatched:
        problems = [f"{label}: {_show(items)}" for label, items in
                    (("missing keys", missing), ("unexpected keys", unexpected),
                     ("shape mismatches (file vs fasterrcnn_resnet50_fpn)", mismatched)) if items]
        raise ValueError("not a torchvision fasterrcnn_resnet50_fpn state dict: " + "; ".join(problems))
    return {_to_fpnlib(k): v for k, v in sd.items()}


def set_frozen_bn_eps(model: torch.nn.Module, eps: float) -> None:
    """Set the ``eps`` of every ``FrozenBatchNorm2d`` (torchvision's ``overwrite_eps``)."""
    for m in model.modules():
        if isinstance(m, FrozenBatchNorm2d):
            m.eps = eps


def load_torchvision_faster_rcnn(path: str | os.PathLike, num_classes: int | None = None,
                                 bn_eps: float | None = None, **overrides) -> FasterRCNN:
    """An fpnlib :class:`FasterRCNN` (eval mode) with the weights of a torchvision
    ``fasterrcnn_resnet50_fpn`` state dict saved at ``path``.

    The file is read with ``torch.load(weights_only=True)``; a bare state dict or one under
    ``"model"`` (torchvision's reference training scripts) or ``"state_dict"`` is accepted.
    ``num_classes`` (object classes, background excluded) defaults to what the box predictor
    holds; a different value is an error. ``bn_eps`` is FrozenBN's eps: by default 0 for
    torchvision's COCO_V1 file (named ``fasterrcnn_resnet50_fpn_coco-*.pth``), as torchvision
    loads it, else 1e-5 (every model torchvision builds). ``overrides`` go to
    :func:`torchvision_faster_rcnn_config` (e.g. ``score_thresh=0.5``).

    Raises ``FileNotFoundError`` (no file), ``RuntimeError`` (unreadable file) or
    ``ValueError`` (not a matching state dict), each naming ``path``.
    """
    path = os.fspath(path)
    state = read_state_dict(path, "torchvision Faster R-CNN checkpoint")
    try:
        converted = convert_torchvision_state_dict(state)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    found = converted["predictor.cls_score.weight"].shape[0] - 1
    if num_classes is not None and num_classes != found:
        raise ValueError(f"{path} holds a box predictor for {found} classes (+ background), not {num_classes}")
    model = FasterRCNN(torchvision_faster_rcnn_config(found, **overrides))
    model.load_state_dict(converted)  # strict: the conversion was checked against torchvision's model
    if bn_eps is None:
        bn_eps = 0.0 if os.path.basename(path).startswith(COCO_V1_FILE_PREFIX) else 1e-5
    set_frozen_bn_eps(model, bn_eps)
    return model.eval()


# ------------------------------------------------------------------ images in, boxes out


def resize_like_torchvision(image: Tensor, min_size: int = 800, max_size: int = 1333) -> Tensor:
    """Resize ``[C, H, W]`` (or a batch ``[N, C, H, W]`` of one size) bilinearly so the shorter
    side is ``min_size`` unless the longer would pass ``max_size`` (Sec. 5.1's 800 px; 1333 is
    Detectron's cap). As ``GeneralizedRCNNTransform``, the scale is one factor for both axes and
    each output side is ``floor(side * scale)`` (fpnlib's ``ResizeShorterSide`` rounds, so may
    differ by 1 px)."""
    h, w = image.shape[-2:]
    scale = min(min_size / min(h, w), max_size / max(h, w))
    batch = image if image.dim() == 4 else image[None]
    out = F.interpolate(batch, scale_factor=scale, mode="bilinear", recompute_scale_factor=True, align_corners=False)
    return out if image.dim() == 4 else out[0]


def _as_float_images(images) -> list[Tensor]:
    if isinstance(images, Tensor):
        images = [images] if images.dim() == 3 else list(images)
    out = []
    for im in images:
        if im.dim() != 3 or im.shape[0] != 3:
            raise ValueError(f"expected RGB images [3, H, W], got shape {tuple(im.shape)}")
        out.append(im.float() / 255 if im.dtype == torch.uint8 else im)
    if not out or not all(im.is_floating_point() for im in out):
        raise ValueError("expected at least one floating-point image in [0, 1] (or uint8)")
    return out


def preprocess(images, min_size: int = 800, max_size: int = 1333) -> tuple[list[Tensor], list[tuple[int, int]]]:
    """torchvision's input pipeline up to batching: ImageNet normalisation (fpnlib's
    ``Normalize``), then :func:`resize_like_torchvision`, in that order. ``images``: ``[3, H, W]``
    RGB in [0, 1] (float) or uint8, a list of them or an ``[N, 3, H, W]`` tensor.
    Returns the model's input images and the original ``(H, W)`` of each."""
    images = _as_float_images(images)
    sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
    if _as_one_batch(images):  # the same values as image by image
        return list(resize_like_torchvision(_NORMALIZE(torch.stack(images))[0], min_size, max_size).unbind(0)), sizes
    return [resize_like_torchvision(_NORMALIZE(im)[0], min_size, max_size) for im in images], sizes


def _as_one_batch(images: list[Tensor]) -> bool:
    """Whether :func:`preprocess` takes ``images`` as one batch: they have one size and lie off the
    CPU (on a GPU each operator is launched once for the batch), or ``FPNLIB_BATCH_PREPROCESS=1``
    (``fpnlib.host_work`` counts the CUDA path on a CPU). A CPU is faster image by image (measured
    on the bench's batches): the stacked copy and the batch-sized results cost it more than the
    calls they save."""
    switch = os.environ.get("FPNLIB_BATCH_PREPROCESS", "")
    off_cpu = switch == "1" or (switch != "0" and images[0].device.type != "cpu")
    return off_cpu and len({(im.shape, im.device, im.dtype) for im in images}) == 1


@torch.no_grad()
def detect(model: FasterRCNN, images, min_size: int = 800, max_size: int = 1333,
           amp: bool = True) -> list[dict[str, Tensor]]:
    """Detections on raw photos, as ``torchvision``'s ``model(images)`` in eval mode.

    ``images`` as :func:`preprocess`. The model pads the batch to a multiple of 32; boxes are
    scaled back to each input image's pixels. Returns per image ``{"boxes" [D, 4] xyxy,
    "scores" [D], "labels" [D]}``; with torchvision's COCO weights a label is a COCO category
    id (``FasterRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"][label]`` names it).
    ``amp``: bf16 autocast on CUDA, as fpnlib's trainer and evaluation (no effect on a CPU).
    """
    model.eval()
    device = next(model.parameters()).device
    inputs, sizes = preprocess(images, min_size, max_size)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
        outputs = model([im.to(device) for im in inputs])
    scales = [(tuple(im.shape[-2:]), size) for im, size in zip(inputs, sizes)]
    if len(set(scales)) == 1:  # one scale for all: one call for the batch (each is a few operators)
        scaled = boxes_to_original_size(torch.cat([out["boxes"] for out in outputs]), *scales[0])
        boxes = scaled.split([len(out["boxes"]) for out in outputs])
    else:
        boxes = [boxes_to_original_size(out["boxes"], *scale) for out, scale in zip(outputs, scales)]
    for out, b in zip(outputs, boxes):
        out["boxes"] = b
    return outputs


def boxes_to_original_size(boxes: Tensor, resized_hw: tuple[int, int], original_hw: tuple[int, int]) -> Tensor:
    """``[D, 4]`` xyxy boxes of a resized image in the original image's pixels, as torchvision's
    ``resize_boxes``: each axis times its float32 ratio original / resized.

    The ratios stay 0-dim CPU tensors, which a device operator takes as scalars: no copy to the
    device, so nothing waits for it (a blocking copy per image would, on CUDA). fpnlib's own
    data sets use :func:`fpnlib.data.transforms.boxes_to_original`, which divides by the scale
    their resize recorded; this one keeps torchvision's arithmetic, so ``detect`` gives
    torchvision's boxes bit for bit."""
    ry, rx = (torch.tensor(float(o)) / torch.tensor(float(r)) for o, r in zip(original_hw, resized_hw))
    corners = boxes.unflatten(-1, (2, 2))  # [D, 2 corners, (x, y)]
    return torch.stack((corners[..., 0] * rx.to(boxes.dtype), corners[..., 1] * ry.to(boxes.dtype)), -1).flatten(-2)
