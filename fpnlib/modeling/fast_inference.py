"""Faster inference, same detections: a model rewritten for evaluation only.

Nothing here is in the paper; it is how a trained detector is run cheaply. Three rewrites, each
exact up to float rounding (``tests/test_fast_inference.py`` checks proposals and detections
against the plain model):

* **Frozen BatchNorm folded into the convolution before it.** FrozenBN is a fixed per-channel
  affine map, ``y = x * s + b`` with ``s = w / sqrt(var + eps)``, ``b = bias - mean * s``, so
  ``bn(conv(x, W)) = conv(x, W * s) + b``: one pass over the activations less per convolution.
  It applies to the paper's ``frozen_bn`` backbones (and torchvision's weights); GroupNorm
  depends on its input's statistics and is left as it is.
* **Convolution, bias, shortcut and ReLU in one cuDNN call** on a GPU once the BN is folded
  (``fused_conv``): the separate passes over the activations cost a GPU more than the convolutions
  of some layers.
* **channels_last** memory format for the convolutional part, which oneDNN (CPU) and cuDNN
  run faster for many layer shapes; the input batch is converted once at the backbone.

The rewritten model is a copy in eval mode; the original is untouched (it may keep training).
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d

from . import cuda_graphs as graphs
from .fused_conv import fuse_blocks


def fold_conv_frozen_bn(conv: nn.Conv2d, bn: FrozenBatchNorm2d) -> nn.Conv2d:
    """``conv`` followed by ``bn`` as one convolution (a new module with a bias)."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode)
    with torch.no_grad():
        fused.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.bias)
        fused.bias.copy_(bn.bias + (bias - bn.running_mean) * scale)
    return fused.to(conv.weight.device)


# (convolution, its norm) attribute pairs of torchvision's ResNet stem and blocks
_PAIRS = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))


def fold_frozen_bn(model: nn.Module) -> int:
    """Fold, in place, every FrozenBN that directly follows a convolution in a ResNet stem,
    block or downsample branch; returns how many were folded."""
    folded = 0
    for module in model.modules():
        for conv_name, bn_name in _PAIRS:
            conv, bn = getattr(module, conv_name, None), getattr(module, bn_name, None)
            if isinstance(conv, nn.Conv2d) and isinstance(bn, FrozenBatchNorm2d):
                setattr(module, conv_name, fold_conv_frozen_bn(conv, bn))
                setattr(module, bn_name, nn.Identity())
                folded += 1
        down = getattr(module, "downsample", None)
        if isinstance(down, nn.Sequential) and len(down) == 2 and isinstance(down[0], nn.Conv2d) \
                and isinstance(down[1], FrozenBatchNorm2d):
            module.downsample = nn.Sequential(fold_conv_frozen_bn(down[0], down[1]), nn.Identity())
            folded += 1
    return folded


def _to_channels_last(_module, args):
    (x, *rest) = args
    return (x.contiguous(memory_format=torch.channels_last), *rest)


def optimized_for_inference(model: nn.Module, channels_last: bool = True, fold_bn: bool = True,
                            cuda_graphs: bool | None = None) -> nn.Module:
    """A copy of ``model`` (an fpnlib detector) for evaluation: frozen BN folded, convolutions
    ending in ReLU fused on CUDA (``fused_conv``), channels_last; with ``cuda_graphs`` (default:
    ``FPNLIB_CUDA_GRAPHS=1``), a Faster R-CNN's passes on CUDA replayed from a graph per batch
    shape (``cuda_graphs``).

    The backbone is found as ``model.backbone`` (and ``model.rpn_network.backbone`` for the
    unshared Faster R-CNN); the copy's ``optimizations`` lists what was applied."""
    if any(getattr(m, "_fpnlib_compiled", False) for m in model.modules()):
        # a copied compiled forward would still run the original module's weights
        raise ValueError("optimized_for_inference: the model's backbone or FPN is already compiled "
                         "(compile_body); optimize first, then compile the copy")
    fast = copy.deepcopy(model).eval()
    applied = []
    if fold_bn:
        n = fold_frozen_bn(fast)
        if n:
            applied.append(f"{n} frozen BN folded")
    # before channels_last: ConvReLU.of copies weights into fresh (contiguous) parameters
    fused = sum(fuse_blocks(backbone) for backbone in _backbones(fast))  # blocks whose BN is folded
    heads = [m for m in fast.modules() if hasattr(m, "fused_relu")]  # the RPN head's 3x3 conv
    for head in heads:
        head.fused_relu = True
    if fused + len(heads):
        n = fused + len(heads)
        what = f"{n} convolutions end in their ReLU" if n > 1 else "1 convolution ends in its ReLU"
        applied.append(f"{what} (one cuDNN call on CUDA)")
    if channels_last:
        fast = fast.to(memory_format=torch.channels_last)
        for backbone in _backbones(fast):
            backbone.register_forward_pre_hook(_to_channels_last)
        applied.append("channels_last")
    if (graphs.wanted() if cuda_graphs is None else cuda_graphs) and hasattr(fast, "padded_detections"):
        fast.inference_graphs = graphs.InferenceGraphs()
        applied.append("CUDA graphs")
    fast.optimizations = tuple(applied)
    return fast


def for_cuda_training(model: nn.Module) -> nn.Module:
    """``model``, in place, in channels_last with its backbones' inputs converted, and cuDNN's
    autotuner on: what pays for training on a GPU (with the trainer's bf16 autocast). The
    parameters stay the same objects (an optimizer built before still holds them) and keep
    their names. On a CPU nothing changes: oneDNN's backward ran slower in channels_last
    there (profiled once, R50-FPN body at 512 px, 2 cores: 5.6 s against 5.0 s per forward +
    backward)."""
    if next(model.parameters()).device.type != "cuda":
        return model
    torch.backends.cudnn.benchmark = True  # fixed input sizes per batch: the autotuned choice is reused
    model.to(memory_format=torch.channels_last)
    for backbone in _backbones(model):
        if not getattr(backbone, "_fpnlib_channels_last", False):
            backbone.register_forward_pre_hook(_to_channels_last)
            backbone._fpnlib_channels_last = True
    return model


def compile_body(model: nn.Module, backend: str = "inductor") -> list[str]:
    """``model``, in place, with the ``forward`` of its backbone(s) and FPN(s) compiled by
    ``torch.compile`` (static shapes: the bench's padded batch repeats). Only ``forward`` is
    replaced: the modules, their parameters, state_dict and hooks stay as they were, so
    checkpoints, the optimizer and the bench's per-stage hooks see the same model. Returns the
    compiled parts' names. An option to measure (``python -m fpnlib bench --compile``), not a
    default: on the 2-core CPU training ran slower and inference gained nothing clear; on an
    H200 both ran faster on the bench's one batch shape, but a trainer's or evaluator's batches
    change shape and each shape compiles again, a cost not measured (``results/bench/ab/``)."""
    compiled = []
    for name, part in _parts(model, ("backbone", "neck")):
        if not getattr(part, "_fpnlib_compiled", False):
            part.forward = torch.compile(part.forward, backend=backend, dynamic=False)
            part._fpnlib_compiled = True
            compiled.append(name)
    return compiled


def _parts(model: nn.Module, names: tuple[str, ...]) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of each of ``names`` (e.g. ``backbone``) that ``model`` has, and that
    its ``rpn_network`` has (the unshared Faster R-CNN's own RPN detector)."""
    found = []
    for owner, prefix in ((model, ""), (getattr(model, "rpn_network", None), "rpn_network.")):
        found += [(prefix + n, getattr(owner, n)) for n in names if getattr(owner, n, None) is not None]
    return found


def _backbones(model: nn.Module) -> list[nn.Module]:
    return [m for _, m in _parts(model, ("backbone",))]


def matched_fraction(a: Tensor, b: Tensor, tol: float = 1e-3) -> float:
    """Share of the boxes ``a`` [N, 4] that have a box of ``b`` within ``tol`` px on every
    coordinate (1.0 for two empty sets). Near-tied scores may swap places between two float
    orders of summation, so sets are compared, not sequences."""
    if len(a) == 0:
        return 1.0 if len(b) == 0 else 0.0
    if len(b) == 0:
        return 0.0
    dist = (a[:, None, :] - b[None, :, :]).abs().amax(dim=2)
    return float((dist.amin(dim=1) <= tol).float().mean())


def max_box_difference(a: list[dict[str, Tensor]], b: list[dict[str, Tensor]]) -> float:
    """Largest coordinate difference between two models' outputs (same count per image
    required, else ``inf``): how far an optimized path moved the boxes."""
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        if x["boxes"].shape != y["boxes"].shape:
            return float("inf")
        if len(x["boxes"]):
            worst = max(worst, float((x["boxes"] - y["boxes"]).abs().max()))
    return worst
