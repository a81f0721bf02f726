"""Eq. (1): RoI -> pyramid level."""
from __future__ import annotations

import pytest
import torch
from torchvision.ops.poolers import initLevelMapper

from fpnlib.modeling.roi_levels import assign_fpn_levels


def _square(side: float) -> torch.Tensor:
    return torch.tensor([[10.0, 20.0, 10.0 + side, 20.0 + side]])


@pytest.mark.parametrize("side, level", [
    (111.9, 2), (112.0, 3), (223.9, 3), (224.0, 4), (447.9, 4), (448.0, 5),
    (1.0, 2), (0.0, 2), (2000.0, 5),  # clamped to [2, 5]: P6 is never used by the region head
])
def test_level_boundaries_at_112_224_448(side, level):
    assert assign_fpn_levels(_square(side)).item() == level


def test_non_square_boxes_use_sqrt_area():
    # 56 x 896 has sqrt(wh) = 224 -> P4, although neither side is 224
    assert assign_fpn_levels(torch.tensor([[0.0, 0.0, 56.0, 896.0]])).item() == 4


def test_equals_torchvision_level_mapper_on_random_boxes():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(5000, 2, generator=g) * 800
    wh = torch.exp(torch.empty(5000, 2).uniform_(0, 7, generator=g))  # 1 .. 1100 px
    boxes = torch.cat([xy, xy + wh], dim=1)
    mapper = initLevelMapper(k_min=2, k_max=5)  # torchvision returns k - k_min
    theirs = mapper([boxes[:2500], boxes[2500:]]) + 2
    assert torch.equal(assign_fpn_levels(boxes), theirs)
    assert set(theirs.tolist()) == {2, 3, 4, 5}  # the random boxes reach every level


def test_bad_shape_is_refused():
    with pytest.raises(ValueError, match=r"\[N, 4\]"):
        assign_fpn_levels(torch.zeros(4))
