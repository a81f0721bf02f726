"""Independent per-image (and per-level) pieces run at once, same results (not in the paper; speed).

**CPU.** Three kernels of a detector run on one core: torchvision's ``roi_align``, its backward,
and ``nms``. They are the same kernels in fpnlib and torchvision, and on a 2-core machine they
were 37% of a ``cpu_preset`` training step's self time (torch.profiler, profiled once). Each call
releases Python's GIL and the work splits into independent pieces (per image for NMS and
post-processing, per (level, image) for RoIAlign), so Python threads run them one per core.

**CUDA.** The per-image pieces (proposal selection, post-processing) wait on the GPU several
times each: boolean indexing, and NMS, which finishes its suppression on the host. Run one
after the other, 8 images wait 8 times in a row. Here each piece runs in a thread of its own
with a CUDA stream of its own, so one image's wait overlaps the others' work; the caller's
stream then waits for every piece's stream (events), and the outputs are recorded on it, so
the caching allocator does not hand their memory out while it may still be read.

The results are the sequential ones, bit for bit: each piece is computed by the same kernels on
the same numbers, and RoIAlign's backward writes each image's gradient from that image's RoIs
only, in their order (``tests/test_parallel_pieces.py`` compares both ways on a CPU,
``tests/test_cuda.py`` on a GPU). Only pieces that draw no random numbers run this way (a shared
generator would hand out its draws in thread order). With one CPU thread
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

CUDA_WORKERS = 8  # pieces in flight on a GPU (one stream each)

_state = threading.local()
_pools: dict[tuple[str, int], ThreadPoolExecutor] = {}
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
    if not _enabled() or pieces < 2 or device.type not in ("cpu", "cuda"):
        return 1
    return min(torch.get_num_threads() if device.type == "cpu" else CUDA_WORKERS, pieces)


def _pool(kind: str, workers: int) -> ThreadPoolExecutor:
    with _pools_lock:
        if (kind, workers) not in _pools:
            _pools[kind, workers] = ThreadPoolExecutor(workers, thread_name_prefix=f"fpnlib-{kind}")
        return _pools[kind, workers]


def _tensors(obj):
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def map_pieces(fn: Callable[..., T], *columns: Sequence, device: torch.device | str = "cpu",
               cuda_streams: bool = False) -> list[T]:
    """``[fn(*row) for row in zip(*columns)]``, the rows at once on a CPU (threads) and, with
    ``cuda_streams``, on CUDA (threads with a stream each); results in input order. The caller's
    grad mode and autocast state reach the threads (both are thread-local in PyTorch).

    ``cuda_streams`` is for pieces that wait on the GPU for long: measured on an H200
    (``results/bench/ab/cuda-nvidia-h200-*.json``, R50-FPN, 800 px, batch 8), streams took training's
    proposal selection from 28.9 to 13.3 ms per step, but made anchor labelling (9.4 -> 18.2 ms)
    and inference post-processing (12.7 -> 17.3 ms) slower; those run one by one on CUDA."""
    rows = list(zip(*columns))
    device = torch.device(device)
    workers = _workers(device, len(rows)) if device.type == "cpu" or cuda_streams else 1
    if workers == 1:
        return [fn(*row) for row in rows]
    grad = torch.is_grad_enabled()
    if device.type == "cpu":
        def run(row):
            with torch.set_grad_enabled(grad):
                return fn(*row)

        return list(_pool("cpu", workers).map(run, rows))
    caller = torch.cuda.current_stream(device)
    autocast, dtype = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")

    def run_on_stream(row):
        streams = _state.__dict__.setdefault("streams", {})  # this worker thread's own
        if device not in streams:
            streams[device] = torch.cuda.Stream(device)
        stream = streams[device]
        stream.wait_stream(caller)  # the inputs, made on the caller's stream, are ready
        with torch.cuda.stream(stream), torch.set_grad_enabled(grad), \
                torch.autocast("cuda", dtype=dtype, enabled=autocast):
            out = fn(*row)
            done = torch.cuda.Event()
            done.record(stream)
        return out, done

    results = list(_pool("cuda", workers).map(run_on_stream, rows))
    for out, done in results:
        caller.wait_event(done)
        for t in _tensors(out):
            if t.is_cuda:
                t.record_stream(caller)
    return [out for out, _ in results]


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
