"""Convolution, bias, shortcut and ReLU as one cuDNN call, for inference on a GPU.

Nothing here is in the paper. Once frozen BN is folded (``fast_inference``), a ResNet block is
conv + bias -> ReLU, then again, then conv + bias + shortcut -> ReLU. Eager PyTorch runs
cuDNN's convolution and then adds the bias, the shortcut and the ReLU as separate passes over
the activations. On an H200, R50-FPN's backbone + FPN at 800x1333, batch 8, spent
about 5 ms per step in the bias additions, more than in the convolutions' own kernels
(profiled: ``results/bench/ab/cuda-nvidia-h200-profile.txt``, over 3 steps; its operator rows
count their kernels' time again). cuDNN's fused operators ``torch.cudnn_convolution_relu`` and
``torch.cudnn_convolution_add_relu`` do the bias, shortcut and ReLU in the convolution's
epilogue: measured on the H200, the body alone took 9.0 ms instead of 14.4 ms
(``results/bench/ab/cuda-nvidia-h200-no-fused-conv.json`` against the H200 record).

They apply to CUDA tensors without autograd (they have no backward); elsewhere the same
arithmetic runs as separate operators, in torchvision's order, so a CPU gives bit for bit the
unfused model's outputs (``tests/test_fused_conv.py``). Autocast does not know these operators:
the operands are cast here to autocast's dtype, the weights once per dtype and weight version.
If cuDNN refuses a call (no engine for a shape or dtype), fusion is off for the process, with a
warning, and the separate operators run. ``FPNLIB_FUSED_CONV=0`` turns it off (A/B runs).
"""
from __future__ import annotations

import os
import warnings

import torch
from torch import Tensor, nn

_refused: list[str] = []  # the first refusal's message, once cuDNN refused


def applies(x: Tensor, conv: nn.Conv2d) -> bool:
    """Whether ``conv`` on ``x`` runs fused: CUDA, no autograd, zero padding given as numbers."""
    return (x.is_cuda and not torch.is_grad_enabled() and not _refused
            and os.environ.get("FPNLIB_FUSED_CONV", "1") != "0"
            and conv.padding_mode == "zeros" and not isinstance(conv.padding, str))


def path_note() -> str:
    if os.environ.get("FPNLIB_FUSED_CONV", "1") == "0":
        return "convolution, bias and ReLU as separate operators (FPNLIB_FUSED_CONV=0)"
    if _refused:
        return f"convolution, bias and ReLU as separate operators (cuDNN refused fusion: {_refused[0]})"
    return "convolution + bias (+ shortcut) + ReLU fused by cuDNN"


def _weights(conv: nn.Conv2d, dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
    """``conv``'s weight and bias in ``dtype``, cast once and kept while the weight is unchanged."""
    w, b = conv.weight, conv.bias
    if w.dtype == dtype:
        return w, b
    key = (dtype, w._version, w.data_ptr())
    cached = getattr(conv, "_fpnlib_cast", None)
    if cached is None or cached[0] != key:
        cached = (key, w.detach().to(dtype), None if b is None else b.detach().to(dtype))
        conv._fpnlib_cast = cached
    return cached[1], cached[2]


def _operands(conv: nn.Conv2d, x: Tensor, z: Tensor | None = None):
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else x.dtype
    w, b = _weights(conv, dtype)
    return x.to(dtype), w, b, (None if z is None else z.to(dtype))


def _refuse(err: RuntimeError) -> None:
    _refused.append(str(err).splitlines()[0][:200])
    warnings.warn(f"cuDNN refused a fused convolution ({_refused[0]}); separate operators from now on",
                  RuntimeWarning, stacklevel=3)


def _fused_relu(conv: nn.Conv2d, x: Tensor) -> Tensor | None:
    """``relu(conv(x))`` by cuDNN, or None where it does not apply or cuDNN refused."""
    if applies(x, conv):
        x_, w, b, _ = _operands(conv, x)
        try:
            return torch.cudnn_convolution_relu(x_, w, b, conv.stride, conv.padding, conv.dilation, conv.groups)
        except RuntimeError as err:
            _refuse(err)
    return None


def conv_relu(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """``relu(conv(x))``, fused where :func:`applies`."""
    out = _fused_relu(conv, x)
    return conv(x).relu_() if out is None else out  # in place, as torchvision's blocks: one map less


def conv_add_relu(conv: nn.Conv2d, x: Tensor, shortcut: Tensor) -> Tensor:
    """``relu(conv(x) + shortcut)`` (a residual block's end), fused where :func:`applies`."""
    if applies(x, conv):
        x_, w, b, z = _operands(conv, x, shortcut)
        try:
            return torch.cudnn_convolution_add_relu(x_, w, z, 1.0, b, conv.stride, conv.padding, conv.dilation,
                                                    conv.groups)
        except RuntimeError as err:
            _refuse(err)
    out = conv(x)
    out += shortcut
    return out.relu_()


class ConvReLU(nn.Conv2d):
    """A convolution whose output goes through ReLU: the stem's conv1 once its BN is folded.
    Parameter names are a ``Conv2d``'s, so state dicts are unchanged."""

    @classmethod
    def of(cls, conv: nn.Conv2d) -> "ConvReLU":
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                  conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
                  device=conv.weight.device, dtype=conv.weight.dtype)
        new.load_state_dict(conv.state_dict())
        return new

    def forward(self, x: Tensor) -> Tensor:
        out = _fused_relu(self, x)
        return super().forward(x).relu_() if out is None else out


class FusedBlock(nn.Module):
    """A torchvision ``Bottleneck`` or ``BasicBlock`` whose norms are folded (``nn.Identity``):
    every convolution but the last with its ReLU, the last with the shortcut and the ReLU.
    Same submodule names (``conv1``.., ``downsample``), so the same state dict."""

    def __init__(self, block: nn.Module):
        super().__init__()
        names = [n for n in ("conv1", "conv2", "conv3") if hasattr(block, n)]
        for n in names:
            setattr(self, n, getattr(block, n))
        self._names = names
        self.downsample = block.downsample

    def forward(self, x: Tensor) -> Tensor:
        out = x
        for n in self._names[:-1]:
            out = conv_relu(getattr(self, n), out)
        shortcut = x if self.downsample is None else self.downsample(x)
        return conv_add_relu(getattr(self, self._names[-1]), out, shortcut)


def _folded_block(m: nn.Module) -> bool:
    """A residual block of torchvision's whose norms are all folded away."""
    bns = [getattr(m, n, None) for n in ("bn1", "bn2", "bn3") if hasattr(m, n)]
    return (hasattr(m, "conv1") and hasattr(m, "conv2") and hasattr(m, "downsample") and len(bns) >= 2
            and all(isinstance(bn, nn.Identity) for bn in bns) and isinstance(getattr(m, "relu", None), nn.ReLU))


def fuse_blocks(backbone: nn.Module) -> int:
    """``backbone`` (a ``ResNetBackbone`` with folded BN), in place: its stem's conv1 + ReLU a
    :class:`ConvReLU` and each folded residual block a :class:`FusedBlock`; returns how many
    convolutions end in a fused ReLU."""
    fused = 0
    stem_folded = isinstance(getattr(backbone, "bn1", None), nn.Identity)
    if stem_folded and isinstance(getattr(backbone, "relu", None), nn.ReLU) and type(backbone.conv1) is nn.Conv2d:
        backbone.conv1, backbone.relu = ConvReLU.of(backbone.conv1), nn.Identity()
        fused += 1
    for name, stage in backbone.named_children():
        if isinstance(stage, nn.Sequential):
            for i, block in enumerate(stage):
                if _folded_block(block):
                    stage[i] = FusedBlock(block)
                    fused += len(stage[i]._names)
    return fused
