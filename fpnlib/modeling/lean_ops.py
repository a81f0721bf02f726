"""Two PyTorch idioms in fewer operators, same results (not in the paper; speed).

On CUDA every operator of inference after the backbone is a launch from the host, and the heads
are bound by those launches (``fpnlib.host_work``). ``torch.isfinite`` dispatches four operators
(``abs``, ``ne``, ``eq`` and an ``and``) and ``torch.take_along_dim`` two (a ``remainder`` that
wraps negative indices, then ``gather``); the forms here launch two and one (views aside), and
give the same tensors bit for bit (``tests/test_lean_ops.py``).
"""
from __future__ import annotations

import math

from torch import Tensor


def finite(x: Tensor) -> Tensor:
    """``torch.isfinite(x)`` for a floating-point ``x``: ``|x| < inf`` is false for NaN and for
    both infinities, true for every finite value."""
    return x.abs() < math.inf


def take_rows(x: Tensor, index: Tensor) -> Tensor:
    """``torch.take_along_dim(x, index[..., None, ...], dim=1)`` for non-negative ``index``:
    ``x`` ``[N, K, ...]``, ``index`` ``[N, k]`` -> ``[N, k, ...]``, the entries ``x[i, index[i, r]]``
    with their trailing dimensions."""
    if x.dim() > index.dim():
        trailing = x.shape[index.dim():]
        index = index.reshape(index.shape + (1,) * len(trailing)).expand(index.shape + trailing)
    return x.gather(1, index)
