"""The grouped NMS path (``group_nms``, CUDA's default) keeps what torchvision's NMS keeps, and
proposal selection and post-processing give the per-image path's outputs through it.

Run on a CPU with ``FPNLIB_GROUP_NMS=1``; tolerance: none, the outputs are compared with
``torch.equal`` (inputs have no tied scores, whose order torchvision leaves open).
``tests/test_cuda.py`` compares the two paths on a GPU.
"""
from __future__ import annotations

import pytest
import torch
from torchvision.ops import nms

from fpnlib.modeling.anchors import AnchorGenerator
from fpnlib.modeling.group_nms import greedy_keep, grouped_nms, overlaps_above, use_group_nms
from fpnlib.modeling.postprocess import detections_from_head
from fpnlib.modeling.rpn import select_proposals


def _clustered_boxes(g: torch.Generator, n: int, size: float = 200.0) -> torch.Tensor:
    """Boxes around a few centres: long chains of suppression, as a detector's outputs have."""
    centres = torch.rand(4, 2, generator=g) * size
    xy = centres[torch.randint(0, 4, (n,), generator=g)] + torch.randn(n, 2, generator=g) * 6
    wh = 10 + torch.rand(n, 2, generator=g) * 40
    return torch.cat([xy, xy + wh], 1)


def borderline_pairs(n: int, t: float, device="cpu", seed: int = 0) -> torch.Tensor:
    """``[n, 2, 4]`` float32 box pairs whose IoU lies within a few float32 steps of ``t``: the
    pairs that the rounding of each operation decides."""
    g = torch.Generator().manual_seed(seed)
    r = torch.rand(n, 8, generator=g, dtype=torch.float64)
    a = torch.stack([r[:, 0] * 500, r[:, 1] * 500, r[:, 0] * 500 + 10 + r[:, 2] * 300,
                     r[:, 1] * 500 + 10 + r[:, 3] * 300], 1)
    size = (a[:, 2:] - a[:, :2]) * (0.8 + 0.2 * r[:, 4:6])
    dy = r[:, 6] - 0.5

    def shifted(dx):  # b: its own size, shifted from a by (dx, dy)
        corner = a[:, :2] + torch.stack([dx, dy], 1)
        return torch.cat([corner, corner + size], 1)

    def iou(b):
        wh = (torch.minimum(a[:, 2:], b[:, 2:]) - torch.maximum(a[:, :2], b[:, :2])).clamp(min=0)
        inter = wh.prod(1)
        return inter / ((a[:, 2:] - a[:, :2]).prod(1) + size.prod(1) - inter)

    lo, hi = torch.zeros(n, dtype=torch.float64), size[:, 0].clone()
    for _ in range(80):  # bisection on the shift: IoU falls as b moves away
        mid = (lo + hi) / 2
        above = iou(shifted(mid)) > t
        lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
    pairs = torch.stack([a, shifted(lo)], 1).float()
    step = torch.randint(-1, 2, (n,), generator=g).float()  # b's x1 one float step either way, or not
    pairs[:, 1, 0] = torch.nextafter(pairs[:, 1, 0], pairs[:, 1, 0] + step * 1e9)
    return pairs.to(device)


def torchvision_suppresses(pairs: torch.Tensor, t: float) -> torch.Tensor:
    """Bool ``[n]``: torchvision's NMS suppresses the second box of each pair (one call each)."""
    scores = torch.tensor([1.0, 0.5], device=pairs.device)
    return torch.tensor([len(nms(p, scores, t)) == 1 for p in pairs], device=pairs.device)


@pytest.mark.parametrize("t", [0.5, 0.7])
def test_borderline_pairs_are_decided_as_torchvisions_cpu_kernel_decides(t):
    pairs = borderline_pairs(3000, t)
    truth = torchvision_suppresses(pairs, t)
    assert 0.2 < truth.float().mean() < 0.8  # both sides of the threshold
    assert torch.equal(overlaps_above(pairs, t)[:, 0, 1], truth)
    # the CUDA kernel's rounding decides some of these pairs the other way: the test can tell
    assert (overlaps_above(pairs, t, fused=True)[:, 0, 1] != truth).sum() > 10


def test_switch(monkeypatch):
    monkeypatch.delenv("FPNLIB_GROUP_NMS", raising=False)
    assert use_group_nms("cuda") and not use_group_nms("cpu")
    monkeypatch.setenv("FPNLIB_GROUP_NMS", "0")
    assert not use_group_nms("cuda")
    monkeypatch.setenv("FPNLIB_GROUP_NMS", "1")
    assert use_group_nms("cpu")


def test_overlaps_are_torchvisions_iou_above_the_threshold():
    from torchvision.ops import box_iou

    boxes = _clustered_boxes(torch.Generator().manual_seed(0), 300)
    for t in (0.3, 0.5, 0.7):
        assert torch.equal(overlaps_above(boxes, t), box_iou(boxes, boxes) > t)


@pytest.mark.parametrize("thresh", [0.5, 0.7])
def test_grouped_nms_keeps_what_torchvision_keeps(thresh):
    g = torch.Generator().manual_seed(1)
    groups, n = 6, 150
    boxes = torch.stack([_clustered_boxes(g, n) for _ in range(groups)])
    scores = torch.rand(groups, n, generator=g)
    valid = torch.rand(groups, n, generator=g) > 0.2
    valid[4] = False  # an empty group
    valid[5, 1:] = False  # a group of one
    order, keep = grouped_nms(boxes, scores, valid, thresh)
    for k in range(groups):
        kept = order[k][keep[k]]
        members = torch.nonzero(valid[k]).squeeze(1)
        expected = members[nms(boxes[k, members], scores[k, members], thresh)]
        assert torch.equal(kept, expected), k  # same boxes, same (decreasing score) order
    assert keep[:4].sum() > 20 and (~keep[:4] & torch.take_along_dim(valid[:4], order[:4], 1)).sum() > 20


def test_greedy_keep_resolves_a_chain_box_by_box():
    # each box overlaps the next one only: greedy keeps every other box, a chain of 9 rounds
    boxes = torch.tensor([[float(x), 0.0, x + 10.0, 10.0] for x in range(0, 90, 5)])[None]
    keep = greedy_keep(boxes, torch.ones(1, 18, dtype=torch.bool), 0.3)
    assert keep[0].tolist() == [i % 2 == 0 for i in range(18)]


def _pyramid_outputs(n: int, image_hw: tuple[int, int], seed: int):
    """Random RPN outputs on all five levels of ``n`` padded ``image_hw`` images, and anchors."""
    from test_rpn import LEVELS, STRIDES, _maps, _random_head_outputs

    maps = _maps(LEVELS, image_hw, n)
    logits, deltas = _random_head_outputs(maps, 3, seed, delta_scale=0.3)
    return logits, deltas, AnchorGenerator({k: (8.0 * STRIDES[k],) for k in LEVELS})(maps)


@pytest.mark.parametrize("rank_by_probability,one_size", [(False, False), (True, False), (False, True)])
def test_grouped_proposals_are_the_per_image_ones(monkeypatch, rank_by_probability, one_size):
    logits, deltas, anchors = _pyramid_outputs(3, (256, 320), seed=2)
    logits["p4"][1, :, :2] = float("-inf")  # non-finite logits are dropped
    deltas["p3"][2, 2:4] = -8.0  # tiny boxes, dropped by min_size
    # one size: the batch is clipped in one call
    hws = [(256, 320)] * 3 if one_size else [(256, 320), (200, 300), (256, 190)]
    args = (logits, deltas, anchors, hws, 300, 800, 0.7, 1.0)
    monkeypatch.setenv("FPNLIB_GROUP_NMS", "0")
    plain = select_proposals(*args, with_levels=True, rank_by_probability=rank_by_probability)
    monkeypatch.setenv("FPNLIB_GROUP_NMS", "1")
    grouped = select_proposals(*args, with_levels=True, rank_by_probability=rank_by_probability)
    counts = [len(p[0]) for p in plain]
    assert min(counts) > 500
    # the cap binds for one image only (for two of one size)
    assert counts == [800, 800, 782] if one_size else (800 in counts and len(set(counts)) == 3), counts
    for a, b in zip(plain, grouped, strict=True):
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x, y)
        assert len(set(a[2].tolist())) == 5  # every level contributes


@pytest.mark.parametrize("one_size", [False, True])
def test_grouped_detections_are_the_per_image_ones(monkeypatch, one_size):
    g = torch.Generator().manual_seed(3)
    num_classes = 6  # + background
    if one_size:  # as many RoIs per image, one image size: no padding, one call to clip
        rois, hws = [_clustered_boxes(g, 120, 300.0) for _ in range(3)], [(300, 320)] * 3
    else:
        rois = [_clustered_boxes(g, 120, 300.0), _clustered_boxes(g, 80, 300.0), torch.zeros(0, 4),
                _clustered_boxes(g, 200, 300.0)]
        hws = [(300, 320), (260, 300), (300, 300), (240, 280)]
    total = sum(len(r) for r in rois)
    logits = 2.0 * torch.randn(total, num_classes + 1, generator=g)
    deltas = 0.5 * torch.randn(total, 4 * (num_classes + 1), generator=g)
    monkeypatch.setenv("FPNLIB_GROUP_NMS", "0")
    plain = detections_from_head(logits, deltas, rois, hws, detections_per_img=200)
    monkeypatch.setenv("FPNLIB_GROUP_NMS", "1")
    grouped = detections_from_head(logits, deltas, rois, hws, detections_per_img=200)
    # mixed sizes: the cap binds for two images, and one has no RoI; one size: it binds for all
    assert [len(d["boxes"]) for d in plain] == ([200] * 3 if one_size else [200, 153, 0, 200])
    for a, b in zip(plain, grouped, strict=True):
        for key in ("boxes", "scores", "labels"):
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def test_grouped_detections_of_nothing(monkeypatch):
    monkeypatch.setenv("FPNLIB_GROUP_NMS", "1")
    rois = [torch.tensor([[10.0, 10.0, 50.0, 50.0]])]
    logits = torch.tensor([[5.0, -5.0, -5.0]])  # background: no candidate above 0.05
    (det,) = detections_from_head(logits, torch.zeros(1, 12), rois, [(100, 100)])
    assert det["boxes"].shape == (0, 4) and det["labels"].dtype == torch.int64


def test_overlap_kernel_in_tritons_interpreter_is_the_eager_formula(in_triton_interpreter):
    """The Triton kernel CUDA runs, executed by Triton's CPU interpreter (``tests/test_cuda.py``
    runs it on a GPU). Its output is allocated holding 7s, as ``torch.empty`` may leave it: the
    kernel must write every element, the tiles it does not compute too: below the diagonal, and
    after a group's last candidate (groups padded to the widest: 5, 64 and 65 candidates in 130
    places, none, and only the last place)."""
    in_triton_interpreter(
        "import torch\n"
        "empty = torch.empty\n"
        "torch.empty = lambda *shape, **kw: empty(*shape, **kw).fill_(7)\n"
        "from test_group_nms import _clustered_boxes\n"
        "from fpnlib.modeling import group_nms\n"
        "g = torch.Generator().manual_seed(0)\n"
        "boxes = torch.stack([_clustered_boxes(g, 130) for _ in range(8)])\n"
        "valid = torch.rand(8, 130, generator=g) > 0.2\n"
        "for row, count in zip(range(3, 7), (5, 64, 65, 0)):\n"
        "  valid[row] = torch.arange(130) < count\n"
        "valid[7] = torch.arange(130) == 129\n"
        "assert group_nms._group_ends(valid)[3:].tolist() == [5, 64, 65, 0, 130]\n"
        "upper = torch.ones(130, 130, dtype=torch.bool).triu(1)\n"
        "for t in (0.5, 0.7):\n"
        "  for fused in (False, True):\n"
        "    eager = group_nms.overlaps_above(boxes, t, fused) & upper & valid[:, :, None] & valid[:, None, :]\n"
        "    assert group_nms._triton_kernels() is not None\n"
        "    kernel = group_nms._suppression_matrix(boxes, valid, t, torch.float32, fused)\n"
        "    assert torch.equal(kernel, eager.float()), (t, fused)\n"
        "    assert eager.sum() > 50 and eager[3:6].sum() > 10\n"
    )


def test_packed_rounds_in_tritons_interpreter_keep_torchvisions_boxes(in_triton_interpreter):
    """``FPNLIB_NMS_BITS=1``: the overlaps packed 32 pairs a word and each round one kernel
    (``group_nms.packed_rounds``), run by Triton's CPU interpreter. Every group keeps what
    torchvision's ``nms`` keeps, and the packed words are the unpacked matrix's bits: widths that
    are not a multiple of 32, invalid boxes, a group padded after its 40 candidates, one with
    none, a chain that needs one round a box."""
    in_triton_interpreter(
        "import os, torch\n"
        "from torchvision.ops import nms\n"
        "from test_group_nms import _clustered_boxes\n"
        "from fpnlib.modeling import group_nms\n"
        "os.environ['FPNLIB_NMS_BITS'] = '1'\n"
        "g = torch.Generator().manual_seed(0)\n"
        "chain = torch.tensor([[float(x), 0.0, x + 10.0, 10.0] for x in range(0, 1500, 5)])\n"
        "for n in (70, 130, 300):  # 300: two blocks of 8 words in a round\n"
        "  boxes = torch.stack([_clustered_boxes(g, n) for _ in range(3)] + [chain[:n]])\n"
        "  valid = torch.rand(4, n, generator=g) > 0.2\n"
        "  valid[1] = torch.arange(n) < 40  # padded after its candidates, as most groups are\n"
        "  valid[2] = False  # no candidate\n"
        "  valid[3] = True\n"
        "  assert group_nms.packed_rounds(boxes.device)\n"
        "  for t in (0.3, 0.5):\n"
        "    dense = group_nms._suppression_matrix(boxes, valid, t, torch.float32, False).bool()\n"
        "    words = group_nms._suppression_matrix(boxes, valid, t, torch.int32, False)\n"
        "    j = torch.arange(n)\n"
        "    unpacked = (words[:, :, j // 32] >> (j % 32)) & 1\n"
        "    assert words.shape[2] == -(-n // 32) and torch.equal(unpacked.bool(), dense), (n, t)\n"
        "    keep = group_nms.greedy_keep(boxes, valid, t)\n"
        "    for b, v, k in zip(boxes, valid, keep):\n"
        "      idx = v.nonzero().squeeze(1)\n"
        "      expected = torch.zeros(n, dtype=torch.bool)\n"
        "      expected[idx[nms(b[idx], -idx.float(), t)]] = True\n"
        "      assert torch.equal(k, expected), (n, t)\n"
        "    if t == 0.3:  # neighbours of the chain overlap by 1/3: every other box is kept\n"
        "      assert keep[3].tolist() == [k % 2 == 0 for k in range(n)]\n"
    )


def test_torchvisions_coordinate_trick_decides_some_borderline_pairs_otherwise():
    """Why the grouped path can differ from ``torchvision.ops.batched_nms`` at all: for small
    inputs (<= 1000 boxes on a CPU, 5000 on CUDA) it shifts each group's boxes by group x (largest
    coordinate + 1) and runs one NMS, so a pair's IoU is rounded on shifted coordinates. The
    grouped path, like ``batched_nms`` on larger inputs, decides each group on its own boxes."""
    from torchvision.ops import batched_nms

    t = 0.5
    pairs = borderline_pairs(1000, t, seed=4)
    on_own_boxes = torchvision_suppresses(pairs, t)
    far = torch.tensor([[1300.0, 780.0, 1333.0, 800.0]])  # the largest coordinate of an 800 x 1333 image
    shifted = torch.tensor([1 not in batched_nms(torch.cat([p, far]), torch.tensor([1.0, 0.5, 0.1]),
                                                 torch.tensor([90, 90, 1]), t).tolist() for p in pairs])
    differ = int((shifted != on_own_boxes).sum())
    print(f"batched_nms (class 90, shifted boxes) decides {differ} of {len(pairs)} borderline pairs otherwise")
    assert differ > 100
    assert torch.equal(overlaps_above(pairs, t)[:, 0, 1], on_own_boxes)


@pytest.mark.parametrize("packed", [False, True])
def test_the_nms_kernels_compile_for_an_h100_with_the_kernels_arithmetic(packed, h100_ptx):
    """No GPU is needed to compile: Triton builds the overlap kernel (float16 or packed output,
    with and without the CUDA kernel's fused multiply-add) and the packed round kernel for sm_90
    (an H100) here, so CI catches a kernel that would not compile on the GPU. The PTX holds the
    one fused multiply-add asked for (``FUSED``) and no other, and a correctly rounded division."""
    import re

    from fpnlib.modeling import group_nms

    overlaps_kernel, round_kernel = group_nms._triton_kernels()
    sig = {"boxes": "*fp32", "valid": "*u8", "ends": "*i32", "out": "*i32" if packed else "*fp16", "n": "i32",
           "words": "i32", "thresh": "fp32"}
    for fused in (False, True):
        code = h100_ptx(overlaps_kernel, sig, {"FUSED": fused, "PACKED": packed, "BLOCK": 64})
        assert len(re.findall(r"\bfma\.rn\.f32", code)) == (len(re.findall(r"\bdiv\.rn\.f32", code)) if fused else 0)
        assert re.search(r"\bdiv\.rn\.f32", code) and not re.search(r"\bdiv\.(approx|full)\.f32", code)
    if packed:
        h100_ptx(round_kernel, {"bits": "*i32", "keep": "*u8", "valid": "*u8", "ends": "*i32", "out": "*u8",
                                "n": "i32", "words": "i32"}, {"ROWS": 32, "WORDS": 8})
