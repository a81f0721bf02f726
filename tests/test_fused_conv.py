"""Convolution, bias, shortcut and ReLU in one cuDNN call (``fpnlib.modeling.fused_conv``).

On a CPU the fused modules run the separate operators in torchvision's order, so their outputs
are bit for bit the folded model's; the cuDNN calls are compared with the separate operators on
a GPU in ``tests/test_cuda.py``.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from fpnlib.modeling import fused_conv
from fpnlib.modeling.backbone import ResNetBackbone
from fpnlib.modeling.fast_inference import fold_frozen_bn, optimized_for_inference
from fpnlib.modeling.fused_conv import ConvReLU, FusedBlock, conv_add_relu, conv_relu, fuse_blocks


def _folded_backbone(depth: int) -> ResNetBackbone:
    torch.manual_seed(0)
    backbone = ResNetBackbone(depth=depth, norm="frozen_bn", width=16).eval()
    g = torch.Generator().manual_seed(1)
    for m in backbone.modules():  # non-trivial statistics, so that the folded biases are not zero
        if hasattr(m, "running_mean"):
            c = m.weight.numel()
            m.weight.copy_(0.5 + torch.rand(c, generator=g))
            m.bias.copy_(torch.randn(c, generator=g) * 0.1)
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
            m.running_var.copy_(0.5 + torch.rand(c, generator=g))
    fold_frozen_bn(backbone)
    return backbone


@pytest.mark.parametrize("depth,expected", [(18, 1 + 8 * 2), (50, 1 + 16 * 3)])
def test_fused_blocks_give_the_folded_backbones_outputs_bit_for_bit_on_a_cpu(depth, expected):
    backbone = _folded_backbone(depth)
    x = torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = backbone(x)
    keys = list(backbone.state_dict())
    assert fuse_blocks(backbone) == expected  # the stem's conv1 and every block's convolutions
    assert isinstance(backbone.conv1, ConvReLU) and isinstance(backbone.relu, nn.Identity)
    assert all(isinstance(block, FusedBlock) for stage in ("layer1", "layer4") for block in getattr(backbone, stage))
    assert list(backbone.state_dict()) == keys  # same names: a checkpoint loads either way
    with torch.no_grad():
        after = backbone(x)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert fuse_blocks(backbone) == 0  # fused blocks are not fused again


def test_unfolded_blocks_are_left_alone():
    backbone = ResNetBackbone(depth=18, norm="frozen_bn", width=16).eval()
    assert fuse_blocks(backbone) == 0 and isinstance(backbone.layer1[0], nn.Module) \
        and not isinstance(backbone.layer1[0], FusedBlock)


def test_only_the_optimized_copy_fuses_and_its_weights_stay_channels_last():
    """The inference copy fuses its backbone's blocks and its RPN head's 3x3 conv; the model it
    was made from (the plain path, compared with torchvision) keeps separate operators."""
    from test_fast_inference import _model

    model = _model()
    fast = optimized_for_inference(model)
    # ResNet-18: the stem and 8 blocks of 2 convolutions; one RPN head shared by the levels
    assert "18 convolutions end in their ReLU (one cuDNN call on CUDA)" in fast.optimizations
    heads = [m for m in fast.modules() if hasattr(m, "fused_relu")]
    assert len(heads) == 1 and heads[0].fused_relu
    assert not any(m.fused_relu for m in model.modules() if hasattr(m, "fused_relu"))
    assert not any(isinstance(m, (FusedBlock, ConvReLU)) for m in model.modules())
    assert fast.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)


def test_fusion_applies_only_to_cuda_tensors_without_autograd(monkeypatch):
    conv = nn.Conv2d(4, 4, 3, padding=1)
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert not fused_conv.applies(x, conv)  # a CPU tensor
    cuda_like = type("CudaLike", (), {"is_cuda": True})()
    with torch.no_grad():
        assert fused_conv.applies(cuda_like, conv)
        monkeypatch.setenv("FPNLIB_FUSED_CONV", "0")
        assert not fused_conv.applies(cuda_like, conv)
        assert "FPNLIB_FUSED_CONV=0" in fused_conv.path_note()
    monkeypatch.delenv("FPNLIB_FUSED_CONV")
    assert not fused_conv.applies(cuda_like, conv)  # autograd on: the fused operators have no backward
    with torch.no_grad():
        assert not fused_conv.applies(cuda_like, nn.Conv2d(4, 4, 3, padding="same"))


def test_a_refusal_by_cudnn_falls_back_to_separate_operators_once_with_a_warning(monkeypatch):
    conv, x, z = nn.Conv2d(4, 4, 3, padding=1), torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    calls = []

    def refuse(*args):
        calls.append(args)
        raise RuntimeError("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED\nmore")

    monkeypatch.setattr(fused_conv, "_refused", [])
    monkeypatch.setattr(fused_conv, "applies", lambda x, conv: not fused_conv._refused)
    monkeypatch.setattr(torch, "cudnn_convolution_relu", refuse)
    monkeypatch.setattr(torch, "cudnn_convolution_add_relu", refuse)
    with torch.no_grad():
        with pytest.warns(RuntimeWarning, match="CUDNN_STATUS_NOT_SUPPORTED"):
            first = conv_relu(conv, x)
        again = conv_relu(conv, x)
        residual = conv_add_relu(conv, x, z)
        assert torch.equal(first, torch.relu(conv(x))) and torch.equal(again, first)
        assert torch.equal(residual, torch.relu(conv(x) + z))
    assert len(calls) == 1  # off for the process after the first refusal
    assert "cuDNN refused fusion: cuDNN error: CUDNN_STATUS_NOT_SUPPORTED" in fused_conv.path_note()


def test_weights_are_cast_once_per_dtype_and_again_after_a_change():
    conv = nn.Conv2d(4, 8, 3)
    w1, b1 = fused_conv._weights(conv, torch.bfloat16)
    w2, b2 = fused_conv._weights(conv, torch.bfloat16)
    assert w1 is w2 and b1 is b2 and w1.dtype == b1.dtype == torch.bfloat16
    assert fused_conv._weights(conv, torch.float32)[0] is conv.weight  # its own dtype: no copy
    with torch.no_grad():
        conv.weight.mul_(2)
    w3, _ = fused_conv._weights(conv, torch.bfloat16)
    assert w3 is not w1 and torch.equal(w3, (conv.weight.detach()).to(torch.bfloat16))
