"""RoI features per level: the same as torchvision's MultiScaleRoIAlign; RoI pooling per level."""
from __future__ import annotations

import os

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign, roi_pool

from fpnlib.modeling.roi_extraction import pyramid_roi_features
from fpnlib.modeling.roi_levels import assign_fpn_levels

STRIDES = {"p2": 4, "p3": 8, "p4": 16, "p5": 32}


def _pyramid(h=512, w=640, c=8, n=2):
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(n, c, h // s, w // s, generator=g) for k, s in STRIDES.items()}, [(h, w)] * n


def _boxes(n, k, h=512, w=640, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        xy = torch.rand(k, 2, generator=g) * torch.tensor([w * 0.5, h * 0.5])
        wh = torch.exp(torch.empty(k, 2).uniform_(2.5, 6.0, generator=g))  # 12 .. 400 px
        out.append(torch.cat([xy, xy + wh], 1))
    return out


def test_roialign_mode_equals_torchvision_multiscale_roialign():
    feats, sizes = _pyramid()
    boxes = _boxes(2, 60)
    ours = pyramid_roi_features(feats, boxes, STRIDES, output_size=7, mode="align", sampling_ratio=2)
    theirs = MultiScaleRoIAlign(list(STRIDES), 7, 2)(feats, boxes, sizes)
    assert (ours - theirs).abs().max() < 1e-5
    # the boxes reach several levels, so the test covers the per-level routing
    assert len(set(assign_fpn_levels(torch.cat(boxes)).tolist())) >= 3


def test_pool_mode_reads_each_roi_from_its_level():
    feats, _ = _pyramid()
    boxes = [torch.tensor([[0.0, 0.0, 60.0, 60.0], [10.0, 10.0, 510.0, 470.0]])]  # P2 and P5 by Eq. (1)
    out = pyramid_roi_features(feats, boxes, STRIDES, mode="pool")
    assert assign_fpn_levels(boxes[0]).tolist() == [2, 5]
    rois = torch.cat([torch.zeros(2, 1), boxes[0]], 1)
    assert torch.equal(out[0], roi_pool(feats["p2"][:1], rois[:1], 7, 1 / 4)[0])
    assert torch.equal(out[1], roi_pool(feats["p5"][:1], rois[1:], 7, 1 / 32)[0])


def test_unknown_mode_is_refused():
    feats, _ = _pyramid()
    with pytest.raises(ValueError, match="mode"):
        pyramid_roi_features(feats, _boxes(1, 2), STRIDES, mode="bilinear")


def test_one_kernel_for_all_levels_in_tritons_interpreter_is_torchvisions_roialign(in_triton_interpreter):
    """``pyramid_roi_align``, the Triton kernels CUDA runs, executed by Triton's CPU interpreter:
    bit for bit torchvision's ``roi_align`` and its gradient in float32, on RoIs of every level,
    RoIs reaching outside the map, a degenerate one, both ``aligned`` settings and two sampling
    ratios; small output grids, for the interpreter's sake (bf16 rounding is checked on a GPU,
    ``tests/test_cuda.py``: the interpreter truncates)."""
    in_triton_interpreter(
        "import torch\n"
        "from torchvision.ops import MultiScaleRoIAlign, roi_align\n"
        "from test_roi_extraction import STRIDES, _pyramid\n"
        "from fpnlib.modeling.roi_extraction import pyramid_roi_features\n"
        "from fpnlib.modeling.roi_levels import assign_fpn_levels\n"
        "from fpnlib.modeling.pyramid_roi_align import pyramid_roi_align\n"
        "feats, sizes = _pyramid(128, 160, c=8)\n"
        "feats = {k: v.contiguous(memory_format=torch.channels_last) for k, v in feats.items()}\n"
        "boxes = [torch.tensor([[4., 6., 40., 30.], [-30., -20., 60., 150.], [20., 10., 20.2, 10.1]]),\n"
        "         torch.tensor([[100., 80., 170., 140.], [-100., -100., 250., 250.], [-300., -300., 300., 300.]])]\n"
        "assert sorted(set(assign_fpn_levels(torch.cat(boxes)).tolist())) == [2, 3, 4, 5]\n"
        "ours = pyramid_roi_features(feats, boxes, STRIDES, output_size=4, mode='align', sampling_ratio=2)\n"
        "assert ours.is_contiguous(memory_format=torch.channels_last)  # the kernel wrote it\n"
        "theirs = MultiScaleRoIAlign(list(STRIDES), 4, 2)(feats, boxes, sizes)\n"
        "assert torch.equal(ours, theirs), (ours - theirs).abs().max()\n"
        "rois = torch.cat([torch.cat([torch.full((3, 1), float(i)), b], 1) for i, b in enumerate(boxes)])\n"
        "level = assign_fpn_levels(rois[:, 1:])\n"
        "maps, scales = list(feats.values()), [1 / s for s in STRIDES.values()]\n"
        "out = pyramid_roi_align(maps, rois, level, [2, 3, 4, 5], scales, 3, 1, True)\n"
        "for r in range(6):\n"
        "    k = int(level[r]) - 2\n"
        "    ref = roi_align(maps[k], rois[r:r + 1], 3, scales[k], 1, True)\n"
        "    assert torch.equal(out[r:r + 1], ref), r\n"
        "maps = [m.clone().requires_grad_() for m in maps]  # training: the gradient of each map\n"
        "w = torch.randn(6, 8, 4, 4, generator=torch.Generator().manual_seed(5))\n"
        "(pyramid_roi_align(maps, rois, level, [2, 3, 4, 5], scales, 4, 2, False) * w).sum().backward()\n"
        "ours = [m.grad for m in maps]\n"
        "on = [(level == k).nonzero().flatten() for k in (2, 3, 4, 5)]  # torchvision: one call per level\n"
        "theirs = torch.autograd.grad(sum((roi_align(m, rois[i], 4, s, 2) * w[i]).sum()\n"
        "                                 for m, i, s in zip(maps, on, scales)), maps)\n"
        "for a, b in zip(ours, theirs):\n"
        "    assert a.abs().sum() > 0 and torch.equal(a, b), (a - b).abs().max()\n"
        "assert pyramid_roi_align(maps, rois, level, [2, 3, 4, 5], scales, 4, 0, False) is None  # adaptive\n"
    )


def test_a_cpu_keeps_torchvisions_roialign():
    """Outside CUDA (and Triton's interpreter) the kernel steps aside, in training and inference:
    the per-level loop or the CPU's threaded pieces pool, as the tests above check."""
    from fpnlib.modeling.pyramid_roi_align import enabled, pyramid_roi_align

    feats, _ = _pyramid(64, 64, c=4)
    rois = torch.tensor([[0.0, 0.0, 0.0, 30.0, 30.0]])
    if os.environ.get("TRITON_INTERPRET") != "1":
        assert not enabled("cpu")
        assert pyramid_roi_align(list(feats.values()), rois, torch.tensor([2]), [2, 3, 4, 5], [0.25] * 4, 7, 2, False) is None


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_one_kernel_for_all_levels_compiles_for_an_h100_without_fused_multiply_adds(dtype, h100_ptx):
    """No GPU is needed to compile: Triton builds the kernel, forward and backward, for sm_90 (an
    H100) here, so CI catches a kernel that would not compile on the GPU. Its PTX has no fused
    multiply-add (the float32 order of operations is torchvision's) and divides with correct
    rounding; the forward rounds bf16 results to nearest even, the backward adds into float32
    atomically."""
    import re

    from fpnlib.modeling.pyramid_roi_align_kernel import pyramid_roi_align_kernel

    def compiled(backward, maps):
        sig = {"rois": "*fp32", "level": "*i32", "bins": f"*{dtype}", "channels": "i32"}
        for i in range(4):  # map pointer, height, width, four strides, scale
            sig.update({f"m{i}": f"*{maps}", f"h{i}": "i32", f"w{i}": "i32", f"n{i}": "i64", f"c{i}": "i32",
                        f"y{i}": "i32", f"x{i}": "i32", f"sc{i}": "fp32"})
        constants = {"SIZE": 7, "RATIO": 2, "ALIGNED": False, "BLOCK_C": 256, "BACKWARD": backward}
        return h100_ptx(pyramid_roi_align_kernel, sig, constants)

    forward = compiled(False, dtype)
    backward = compiled(True, "fp32")  # into float32 gradients of the maps
    for ptx in (forward, backward):
        assert not re.search(r"\bfma\.", ptx)
        assert len(re.findall(r"\bdiv\.rn\.f32", ptx)) >= 4
    assert ("cvt.rn.bf16" in forward) == (dtype == "bf16")
    assert re.search(r"\bred\.[a-z.]*add\.f32|\batom\.[a-z.]*add\.f32", backward)  # atomic float32 adds
