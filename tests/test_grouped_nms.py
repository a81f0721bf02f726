"""``grouped_nms``'s sliced path is per-group NMS exactly: the indices and order of
torchvision's ``batched_nms`` where that loops over the groups (on a CPU above 1000 boxes)."""
import pytest
import torch
from torchvision.ops import batched_nms

from fpnlib.modeling.grouped_nms import grouped_nms


def _candidates(n, groups, seed=0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 300
    wh = 5 + torch.rand(n, 2, generator=g) * 80
    scores = torch.rand(n, generator=g)
    scores[: n // 10] = scores[n // 10: 2 * (n // 10)]  # ties, so that the order of equal scores matters
    return torch.cat([xy, xy + wh], 1), scores, torch.randint(0, groups, (n,), generator=g)


@pytest.mark.parametrize("n,groups", [(3000, 7), (2500, 1), (4000, 90)])
def test_sliced_path_is_torchvisions_per_group_nms(n, groups):
    boxes, scores, ids = _candidates(n, groups)
    expected = batched_nms(boxes, scores, ids, 0.5)  # > 1000 boxes on a CPU: torchvision's per-group loop
    got = grouped_nms(boxes, scores, ids, 0.5, force_segments=True)
    assert len(expected) < n  # something was suppressed
    assert torch.equal(got, expected)


def test_empty_and_gapped_groups():
    assert grouped_nms(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64), 0.5,
                       force_segments=True).numel() == 0
    boxes, scores, ids = _candidates(1500, 3)
    ids = ids * 5  # groups 0, 5, 10: empty groups between
    assert torch.equal(grouped_nms(boxes, scores, ids, 0.7, force_segments=True), batched_nms(boxes, scores, ids, 0.7))
