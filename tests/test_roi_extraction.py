"""RoI features per level: the same as torchvision's MultiScaleRoIAlign; RoI pooling per level."""
from __future__ import annotations

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
