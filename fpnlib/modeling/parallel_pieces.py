"""Independent per-image (and per-level) pieces run at once, same results (not in the paper; speed).

**CPU.** Three kernels of a detector run on one core: torchvision's ``roi_align``, its backward,
and ``nms``. They are the same kernels in fpnlib and torchvision, and on a 2-core machine they
were 37% of a ``cpu_preset`` training step's self time (torch.profiler, profiled once). Each call
releases Python's GIL and the work splits into independent pieces (per image for NMS and
post-processing, per (level, image) for RoIAlign), so Python threads run them one per core.

**CUDA** runs every piece in a plain loop: there the per-image NMS of proposal selection and
post-processing is replaced by one grouped NMS for the whole batch (``group_nms``), which
measured faster than running the images on CUDA streams of their own
(``results/bench/ab/README.md``).

The results are the sequential ones, bit for bit: each piece is computed by the same kernels on
the same numbers, and RoIAlign's backward writes each image's gradient from that image's RoIs
only, in their order (``tests/test_parallel_pieces.py`` compares both ways). Only pieces that
draw no random numbers run this way (a shared generator would hand out its draws in thread
order). With one CPU thread
(``torch.get_num_threads() == 1``, as in ``run_rows``' worker processes), inside
``sequential()``, or with ``FPNLIB_PARALLEL_PIECES=0``, everything runs in a plain loop.
"""
from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

import torch
from torch import Tensor

T = TypeVar("T")

_state = threading.local()
_pools: dict[int, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def _enabled() -> bool:
    return getattr(_state, "enabled", os.environ.get("FPNLIB_PARALLEL_PIECES", "1") != "0")


@contextmanager
def sequential():
    """Run every piece in a plain loop inside this block (this thread only)."""
    before = _enabled()
    _state.enabled = False
    try:
        yield
    finally:
        _state.enabled = before


def _workers(device: torch.device | str, pieces: int) -> int:
    device = torch.device(device)
    if not _enabled() or pieces < 2 or device.type != "cpu":
        return 1
    return min(torch.get_num_threads(), pieces)


def _pool(workers: int) -> ThreadPoolExecutor:
    with _pools_lock:
        if workers not in _pools:
            _pools[workers] = ThreadPoolExecutor(workers, thread_name_prefix="fpnlib-pieces")
        return _pools[workers]


def map_pieces(fn: Callable[..., T], *columns: Sequence, device: torch.device | str = "cpu") -> list[T]:
    """``[fn(*row) for row in zip(*columns)]``, the rows at once on a CPU's threads (a plain loop
    elsewhere); results in input order. The caller's grad mode reaches the threads (it is
    thread-local in PyTorch)."""
    rows = list(zip(*columns))
    workers = _workers(device, len(rows))
    if workers == 1:
        return [fn(*row) for row in rows]
    grad = torch.is_grad_enabled()

    def run(row):
        with torch.set_grad_enabled(grad):
            return fn(*row)

    return list(_pool(workers).map(run, rows))


# ---------------------------------------------------------------- RoIAlign per (level, image)


def _pieces(rois: Tensor, level_of_roi: Tensor, levels: Sequence[int], num_images: int):
    """(level position, image, indices into ``rois``) for every non-empty (level, image) pair."""
    out = []
    image_of_roi = rois[:, 0].to(torch.int64)
    for li, k in enumerate(levels):
        on_level = level_of_roi == k
        for i in range(num_images):
            idx = torch.nonzero(on_level & (image_of_roi == i)).squeeze(1)
            if idx.numel():
                out.append((li, i, idx))
    return out


class _PyramidRoIAlign(torch.autograd.Function):
    """RoIAlign of each RoI on its level's map, one kernel call per (level, image) piece; the
    backward calls torchvision's backward kernel per piece. ``maps`` are float CPU tensors."""

    @staticmethod
    def forward(ctx, rois, pieces, scales, size, sampling_ratio, aligned, *maps):
        def one(li, i, idx):
            local = rois[idx].clone()
            local[:, 0] = 0  # the piece's map holds one image
            return torch.ops.torchvision.roi_align(maps[li][i:i + 1].contiguous(), local, scales[li], size, size,
                                                   sampling_ratio, aligned), local

        results = map_pieces(one, *zip(*pieces)) if pieces else []
        out = maps[0].new_zeros((rois.shape[0], maps[0].shape[1], size, size))
        for (_, _, idx), (pooled, _) in zip(pieces, results):
            out[idx] = pooled
        ctx.pieces = [(li, i, idx, local) for (li, i, idx), (_, local) in zip(pieces, results)]
        ctx.args = (scales, size, sampling_ratio, aligned)
        ctx.shapes = [m.shape for m in maps]
        ctx.dtypes = [m.dtype for m in maps]
        return out

    @staticmethod
    def backward(ctx, grad):
        scales, size, sampling_ratio, aligned = ctx.args
        grads = [grad.new_zeros(shape, dtype=dtype) for shape, dtype in zip(ctx.shapes, ctx.dtypes)]

        def one(li, i, idx, local):
            _, c, h, w = ctx.shapes[li]
            g = torch.ops.torchvision._roi_align_backward(grad[idx].contiguous(), local, scales[li], size, size, 1, c, h,
                                                          w, sampling_ratio, aligned)
            grads[li][i:i + 1] = g  # pieces of one level write disjoint images

        map_pieces(one, *zip(*ctx.pieces)) if ctx.pieces else None
        return (None,) * 6 + tuple(grads)


def threaded_roi_align(maps: Sequence[Tensor], rois: Tensor, level_of_roi: Tensor, levels: Sequence[int],
                       scales: Sequence[float], size: int, sampling_ratio: int, aligned: bool) -> Tensor | None:
    """``[K, C, size, size]``: RoI ``r`` (a row ``(image, x1, y1, x2, y2)`` of ``rois``) pooled from
    ``maps[levels.index(level_of_roi[r])]``, the pieces on the CPU's cores; ``None`` where the
    work should run in the caller's plain loop (CUDA, where one kernel call per level is already
    parallel; one thread; ``sequential()``; one piece)."""
    num_images = maps[0].shape[0]
    if maps[0].device.type != "cpu" or _workers("cpu", num_images * len(levels)) == 1 or rois.shape[0] == 0:
        return None
    pieces = _pieces(rois, level_of_roi, levels, num_images)
    if len(pieces) < 2:
        return None
    return _PyramidRoIAlign.apply(rois, pieces, tuple(scales), size, sampling_ratio, aligned, *maps)
