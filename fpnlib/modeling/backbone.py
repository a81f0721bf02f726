"""The bottom-up pathway: a ResNet whose stage outputs C2..C5 feed the pyramid (Sec. 3).

Sec. 3, "Bottom-up pathway": the feed-forward ConvNet is ResNet; one pyramid level is
defined per network stage, and the output of each stage's last residual block is used,
giving {C2, C3, C4, C5} (conv2_x..conv5_x, torchvision's ``layer1``..``layer4``) with
strides {4, 8, 16, 32}. conv1 is left out of the pyramid because of its large memory
footprint.

The blocks are torchvision's own (``BasicBlock``/``Bottleneck``) and the parameter names
are torchvision's (``conv1``, ``bn1``, ``layer1``..``layer4``), so an ImageNet checkpoint
of ``torchvision.models.resnetXX`` loads with :func:`load_torchvision_resnet`.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from .frozen_bn import FrozenBatchNorm2d

# depth -> (residual block, blocks per stage conv2_x..conv5_x), as in torchvision / He et al.
RESNET_ARCH = {
    18: (BasicBlock, [2, 2, 2, 2]),
    34: (BasicBlock, [3, 4, 6, 3]),
    50: (Bottleneck, [3, 4, 6, 3]),
    101: (Bottleneck, [3, 4, 23, 3]),
    152: (Bottleneck, [3, 8, 36, 3]),
}
_STAGES = ("c2", "c3", "c4", "c5")  # c_k is the output of torchvision's layer{k-1}
STRIDES = {"c2": 4, "c3": 8, "c4": 16, "c5": 32}


def _group_count(channels: int, max_groups: int) -> int:
    """Largest number of groups <= ``max_groups`` that divides ``channels``."""
    return max(g for g in range(1, min(max_groups, channels) + 1) if channels % g == 0)


def norm_factory(norm: str, gn_groups: int = 32):
    """Return ``channels -> nn.Module`` for the normalisation named ``norm``.

    * ``"frozen_bn"``: the paper's setting. The backbone is fine-tuned from ImageNet and,
      with only 2 images per GPU, batch statistics are too noisy to re-estimate, so BN
      is an affine transform with fixed ImageNet statistics (``frozen_bn.FrozenBatchNorm2d``).
    * ``"bn"``: ordinary ``nn.BatchNorm2d`` (large batches only).
    * ``"gn"``: ``nn.GroupNorm`` (Wu & He, 2018). For training from scratch on the
      embedded data set there are no pretrained statistics to freeze, and BN statistics
      from 1-4 images per batch are unreliable; GroupNorm normalises within each image,
      so it is independent of the batch size.
    """
    if norm == "frozen_bn":
        return FrozenBatchNorm2d
    if norm == "bn":
        return nn.BatchNorm2d
    if norm == "gn":
        return lambda channels: nn.GroupNorm(_group_count(channels, gn_groups), channels)
    raise ValueError(f"unknown norm {norm!r}; choose 'frozen_bn', 'bn' or 'gn'")


def he_init(module: nn.Module) -> None:
    """The initialisation torchvision's ``ResNet.__init__`` applies (He et al., 2015)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class ResNetBackbone(nn.Module):
    """ResNet bottom-up pathway returning ``{"c2": C2, ..., "c5": C5}`` (Sec. 3).

    Args:
        depth: 18, 34, 50, 101 or 152.
        norm: ``"frozen_bn"`` (paper), ``"bn"`` or ``"gn"``; see :func:`norm_factory`.
        freeze_at: 0 trains everything; 1 freezes the stem (conv1, bn1); k >= 2 also
            freezes conv2_x..conv{k}_x, as Detectron (its default 2 keeps the generic
            low-level ImageNet filters of the stem and conv2_x fixed when fine-tuning).
        width: channels of the stem and of conv2_x before expansion (64 = standard);
            every stage scales by ``width / 64`` (reduced-width CPU presets).
        out_features: which of c2..c5 to return. Stages after the last one asked for
            are not built, so e.g. a C4-only model neither stores nor computes conv5_x.
        gn_groups: maximum number of GroupNorm groups (``norm="gn"`` only).
    """

    def __init__(
        self,
        depth: int = 50,
        norm: str = "frozen_bn",
        freeze_at: int = 2,
        width: int = 64,
        out_features: Sequence[str] = ("c2", "c3", "c4", "c5"),
        gn_groups: int = 32,
    ) -> None:
        super().__init__()
        if depth not in RESNET_ARCH:
            raise ValueError(f"unsupported depth {depth}; choose one of {sorted(RESNET_ARCH)}")
        if not out_features or any(f not in _STAGES for f in out_features):
            raise ValueError(f"out_features must be a non-empty subset of {_STAGES}, got {out_features}")
        if not 0 <= freeze_at <= 5:
            raise ValueError(f"freeze_at must be in 0..5, got {freeze_at}")
        if width < 1:
            raise ValueError(f"width must be positive, got {width}")
        block, layers = RESNET_ARCH[depth]
        norm_layer = norm_factory(norm, gn_groups)
        self.depth, self.norm, self.freeze_at, self.width = depth, norm, freeze_at, width
        self.out_features = tuple(f for f in _STAGES if f in out_features)
        num_stages = _STAGES.index(self.out_features[-1]) + 1

        # torchvision's ResNet is the layer factory: its __init__ hard-codes 64 channels
        # and all four stages, so a one-block-per-stage instance provides _make_layer, and
        # the stem and the needed stages are built at the requested width with it. Block
        # types and parameter names (conv1, bn1, layer1..) stay torchvision's; avgpool and
        # fc (the classification head) are not kept.
        factory = ResNet(block, [1, 1, 1, 1], norm_layer=norm_layer)
        factory.inplanes = width
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        for i in range(num_stages):
            stage = factory._make_layer(block, width * 2**i, layers[i], stride=1 if i == 0 else 2)
            setattr(self, f"layer{i + 1}", stage)
        self.num_stages = num_stages
        he_init(self)

        self.strides = {f: STRIDES[f] for f in self.out_features}
        self.out_channels = {
            f: width * 2 ** _STAGES.index(f) * block.expansion for f in self.out_features
        }
        for module in self._frozen_modules():
            for p in module.parameters():
                p.requires_grad_(False)

    def _frozen_modules(self) -> list[nn.Module]:
        stem = [self.conv1, self.bn1] if self.freeze_at >= 1 else []
        stages = [getattr(self, f"layer{i}") for i in range(1, min(self.freeze_at, self.num_stages + 1))]
        return stem + stages

    def train(self, mode: bool = True) -> "ResNetBackbone":
        # A frozen stage must stay frozen with norm="bn" too: keep its running
        # statistics from updating (FrozenBatchNorm2d/GroupNorm are unaffected).
        super().train(mode)
        for module in self._frozen_modules():
            module.train(False)
        return self

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # stride 4 (conv1 not output)
        out = {}
        for i, name in enumerate(_STAGES[: self.num_stages]):
            x = getattr(self, f"layer{i + 1}")(x)
            if name in self.out_features:
                out[name] = x
        return out


def read_state_dict(path: str | os.PathLike, what: str) -> dict[str, Tensor]:
    """The tensors of a checkpoint file (a bare state dict, or one under "model"/"state_dict"),
    read without unpickling code (``weights_only``). Errors name the file: ``FileNotFoundError``,
    ``RuntimeError`` (unreadable) or ``ValueError`` (not a state dict of tensors)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle garbage, foreign objects, ...
        raise RuntimeError(f"could not read {what} {path}: {e}") from e
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors (got {type(state).__name__})")
    return state


def load_torchvision_resnet(backbone: ResNetBackbone, path: str | os.PathLike) -> None:
    """Load a torchvision ResNet ``state_dict`` file (e.g. ImageNet weights) into ``backbone``.

    Accepts a bare state dict or one wrapped under ``"state_dict"``/``"model"``. The
    classifier (``fc.*``), stages the backbone did not build, and ``num_batches_tracked``
    (absent from ``FrozenBatchNorm2d``) are ignored; BN ``weight/bias/running_mean/
    running_var`` map one-to-one onto ``FrozenBatchNorm2d``'s buffers. Any other missing
    or unexpected key or shape mismatch raises ``ValueError`` naming ``path``; an
    unreadable file raises ``FileNotFoundError``/``RuntimeError`` naming it.
    """
    path = os.fspath(path)
    state = read_state_dict(path, "ResNet checkpoint")

    target = backbone.state_dict()
    unbuilt = tuple(f"layer{i}." for i in range(backbone.num_stages + 1, 5))
    state = {
        k: v
        for k, v in state.items()
        if not k.startswith(("fc.",) + unbuilt)
        and not (k.endswith("num_batches_tracked") and k not in target)
    }
    missing = [k for k in target if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in target]
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(target[k].shape)}"
        for k, v in state.items()
        if k in target and v.shape != target[k].shape
    ]
    if missing or unexpected or mismatched:
        def show(items):
            return ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")

        problems = [
            f"{label}: {show(items)}"
            for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched))
            if items
        ]
        raise ValueError(
            f"{path} does not match ResNetBackbone(depth={backbone.depth}, width={backbone.width}, "
            f"norm={backbone.norm!r}): " + "; ".join(problems)
        )
    backbone.load_state_dict(state, strict=False)  # strictness checked above, num_batches_tracked aside
