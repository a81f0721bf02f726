"""Figure 1 measured: the four architectures produce the maps the paper draws."""
from __future__ import annotations

import pytest
import torch

from fpnlib.experiments.figure1 import activation_bytes, figure1_forward, measure_figure1
from fpnlib.modeling.backbone import ResNetBackbone
from fpnlib.modeling.fpn import FPN


@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(0)
    backbone = ResNetBackbone(depth=18, width=8, freeze_at=0).eval()
    return backbone, FPN(backbone.out_channels, out_channels=16).eval()


def test_each_architecture_gives_its_maps(nets):
    image = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        maps = {a: figure1_forward(a, *nets, image) for a in "abcd"}
    assert list(maps["b"]) == ["c5"]
    assert list(maps["c"]) == ["c2", "c3", "c4", "c5"]
    assert list(maps["d"]) == ["p2", "p3", "p4", "p5", "p6"]
    assert len(maps["a"]) == 12 and maps["a"]["c2@2x"].shape[-2:] == (32, 48)  # C2 of the 2x image
    assert all(m.shape[1] == 16 for m in maps["d"].values())  # every FPN level has d channels
    with pytest.raises(ValueError, match="unknown architecture"):
        figure1_forward("e", *nets, image)


def test_activation_bytes_counts_layer_outputs():
    conv = torch.nn.Conv2d(3, 5, 1)
    x = torch.rand(2, 3, 4, 4)
    assert activation_bytes(conv, lambda: conv(x)) == 2 * 5 * 4 * 4 * 4  # float32 output


def test_image_pyramid_costs_more_than_one_pass():
    res = measure_figure1(torch.rand(1, 3, 64, 64), depth=18, width=8, fpn_channels=16, repeats=1)
    # deterministic part: memory (the timing is only printed, never asserted)
    assert res["a"]["memory_mb"] > 4 * res["c"]["memory_mb"]  # scales 0.5 + 1 + 2: 5.25x the pixels
    assert res["d"]["memory_mb"] > res["c"]["memory_mb"]
