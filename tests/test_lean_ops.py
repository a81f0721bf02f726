"""``lean_ops``: the same tensors as ``torch.isfinite`` and ``torch.take_along_dim``, bit for
bit, in fewer dispatched operators (each one a launch from the host on CUDA)."""
from __future__ import annotations

import pytest
import torch

from fpnlib.host_work import count_host_work
from fpnlib.modeling.lean_ops import finite, take_rows

_VIEWS = {"view", "expand", "unsqueeze", "reshape", "_unsafe_view", "alias"}


def _launched(step) -> list[str]:
    """The operators ``step()`` dispatches (``host_work``'s count), views left out: they launch nothing."""
    ops = count_host_work(step)["top_ops"]  # (each of these steps dispatches fewer than 10 kinds)
    return sorted(name for op, n in ops.items() for name in [op.split(".")[1]] * n if name not in _VIEWS)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_finite_is_isfinite_on_every_kind_of_value(dtype):
    info = torch.finfo(dtype)
    special = torch.tensor([0.0, -0.0, 1.0, -2.5, info.max, -info.max, info.tiny, info.tiny / 4, float("inf"),
                            float("-inf"), float("nan"), -float("nan")], dtype=dtype)
    noise = torch.randn(200, generator=torch.Generator().manual_seed(0)).to(dtype) * 1e3
    x = torch.cat([special, noise]).view(2, -1)
    assert torch.equal(finite(x), torch.isfinite(x))
    assert finite(x).tolist()[0][:12] == [True] * 8 + [False] * 4


@pytest.mark.parametrize("trailing", [(), (4,), (2, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.int64, torch.bool])
def test_take_rows_is_take_along_dim(trailing, dtype):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn((3, 50) + trailing, generator=g) * 10).to(dtype)
    index = torch.randint(0, 50, (3, 17), generator=g)  # repeats allowed, as in padded rows
    expected = torch.take_along_dim(x, index.reshape(index.shape + (1,) * len(trailing)), dim=1)
    got = take_rows(x, index)
    assert got.dtype == expected.dtype and torch.equal(got, expected)


def test_each_dispatches_fewer_operators_than_the_torch_function():
    x = torch.tensor([[1.0, float("nan"), float("inf")]])
    boxes, index = torch.rand(2, 10, 4), torch.tensor([[3, 1], [0, 9]])
    counts = {name: _launched(run) for name, run in {
        "finite": lambda: finite(x), "isfinite": lambda: torch.isfinite(x),
        "take_rows": lambda: take_rows(boxes, index),
        "take_along_dim": lambda: torch.take_along_dim(boxes, index[..., None], dim=1)}.items()}
    assert counts["finite"] == ["abs", "lt"] and counts["take_rows"] == ["gather"], counts
    assert len(counts["isfinite"]) > 2 and len(counts["take_along_dim"]) > 1, counts
