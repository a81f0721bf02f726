"""How much work a step hands the host: operators dispatched and waits for the device (not in the paper; speed).

On a GPU a detector's training step can be bound by its host: every operator goes through
Python and PyTorch's dispatcher and launches its kernels one after the other, and every read of
a device tensor's data (``.item()``, ``.tolist()``, a boolean-mask index, ``nonzero``) stops the
host until the device has finished all the work queued before it. Neither shows in a CPU's
timings, but both can be *counted* on a CPU, exactly and without noise, by watching the
dispatcher (``TorchDispatchMode``): :func:`count_host_work` does that for one step.

Counted as a wait: an operator whose output size or value the host must read
(:data:`WAITING_OPS`; ``index``/``index_put_`` with a boolean mask, which calls ``nonzero``);
on a GPU, a copy from the device to the host, and one from the host without ``non_blocking``
(PyTorch synchronises the stream after it, e.g. ``torch.tensor(values, device="cuda")``); and
``Tensor.tolist`` / ``Tensor.numpy`` (on a CPU they read memory without dispatching, so they are
counted by wrapping them). On a CPU every read counts, since a CUDA run would have these tensors
on the GPU; host-to-device copies cannot be seen there.

``cuda_path=True`` counts what a CUDA step would do, on whatever device the step runs: the
choices fpnlib makes for CUDA (grouped NMS, the RPN head's dense backward, every per-image
piece in one thread, images of one size preprocessed as one batch, and with grouped NMS the
sizes of inference guessed, ``guessed_sizes``) are switched on for the step. Backward
operators are counted too (the autograd engine carries the dispatch mode into its threads).
Two CUDA choices cannot be made on a CPU, where Triton's kernels do not run:
RoIAlign's kernel (``pyramid_roi_align``), so a CPU's count takes the per-level RoIAlign, whose
read of the RoIs per level is one wait that a CUDA step with the kernel does not make; and
grouped NMS's overlap kernel, so a CPU's count has the eager formula's operators, chunk by
chunk, where CUDA launches one kernel.

What counts can only suggest, a GPU's profile measures: :func:`device_busy` gives the share of
back-to-back steps in which the GPU is working. Well below 1, the GPU waits for its host.
"""
from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# operators whose result the host must read before it can go on (a size or a value)
WAITING_OPS = frozenset({
    "aten._local_scalar_dense.default",  # .item(), int(t), float(t), bool(t)
    "aten.equal.default",  # torch.equal: a Python bool, read from the device
    "aten.nonzero.default",
    "aten.masked_select.default",
    "aten._unique2.default",
    "aten.unique_dim.default",
    "aten.unique_consecutive.default",
    "aten.repeat_interleave.Tensor",
})
_MASK_INDEXED = ("aten.index.Tensor", "aten.index_put.default", "aten.index_put_.default", "aten._index_put_impl_.default")
_CUDA_PATH_ENV = {"FPNLIB_GROUP_NMS": "1", "FPNLIB_SPARSE_RPN_GRAD": "0", "FPNLIB_BATCH_PREPROCESS": "1"}


def _is_wait(name: str, args, kwargs, device_type: str) -> bool:
    on_device = bool(args) and isinstance(args[0], torch.Tensor) and args[0].device.type == device_type
    if name in WAITING_OPS:  # (a CPU tensor's, in a GPU run, waits for nothing)
        return on_device and not (name == "aten.repeat_interleave.Tensor" and kwargs.get("output_size") is not None)
    if name in _MASK_INDEXED:
        return on_device and any(isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8)
                                 for t in args[1] or ())
    if device_type == "cpu":  # copies within the CPU wait for nothing
        return False
    # a copy to the host waits for the data; one from the host, unless non_blocking, waits for the
    # device's queue too (PyTorch synchronises the stream after it)
    if name == "aten._to_copy.default":
        src, dst = args[0].device.type, torch.device(kwargs.get("device") or args[0].device).type
        blocking = not kwargs.get("non_blocking", False)
    elif name == "aten.copy_.default":
        src, dst = args[1].device.type, args[0].device.type
        blocking = not (args[2] if len(args) > 2 else kwargs.get("non_blocking", False))
    else:
        return False
    return (src == device_type and dst == "cpu") or (src == "cpu" and dst == device_type and blocking)


class _Counter(TorchDispatchMode):
    def __init__(self, device_type: str):
        super().__init__()
        self.device_type = device_type
        self.ops: Counter[str] = Counter()
        self.waits: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        self.ops[name] += 1
        if _is_wait(name, args, kwargs, self.device_type):
            self.waits[name] += 1
        return func(*args, **kwargs)


@contextmanager
def _wrapped_host_reads(counter: _Counter):
    """``tolist``/``numpy`` of CPU tensors dispatch nothing: count them by wrapping."""
    originals = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy")}

    def wrap(name):
        original = originals[name]

        def read(self, *args, **kwargs):
            if self.device.type == "cpu" and counter.device_type == "cpu":
                counter.waits[f"Tensor.{name}"] += 1
            return original(self, *args, **kwargs)
        return read

    for name in originals:
        setattr(torch.Tensor, name, wrap(name))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


@contextmanager
def _cuda_path():
    from fpnlib.modeling.parallel_pieces import sequential

    before = {k: os.environ.get(k) for k in _CUDA_PATH_ENV}
    os.environ.update(_CUDA_PATH_ENV)
    try:
        with sequential():
            yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def count_host_work(step: Callable[[], object], device: torch.device | str = "cpu", cuda_path: bool = False,
                    warmup: int = 0) -> dict:
    """Run ``step()`` once and count the operators it dispatched and the waits for the device.

    Returns ``{"ops": n, "waits": n, "waits_by_kind": {...}, "top_ops": {op: n, ... 10 most
    frequent}}``. On a CPU, per-image pieces run in one thread while counting (a dispatch mode
    does not reach other threads), which changes no result (``parallel_pieces``). ``warmup``
    steps run first on the same path, uncounted: state a path builds once and keeps (cached
    anchors, NMS layouts) stays out of the count, as it does from a warm GPU's steps.
    """
    counter = _Counter(torch.device(device).type)
    from fpnlib.modeling.parallel_pieces import sequential

    with _cuda_path() if cuda_path else sequential():
        for _ in range(warmup):
            step()
        with _wrapped_host_reads(counter), counter:
            step()
    return {"ops": sum(counter.ops.values()), "waits": sum(counter.waits.values()),
            "waits_by_kind": dict(sorted(counter.waits.items())),
            "top_ops": dict(counter.ops.most_common(10))}


def busy_time(intervals) -> int:
    """How long the union of ``intervals`` ((start, end) pairs) lasts: overlapping intervals count once."""
    intervals = sorted(intervals)
    if not intervals:
        return 0
    busy, (start, end) = 0, intervals[0]
    for s, e in intervals[1:]:
        if s > end:  # a gap: the device idled
            busy, start, end = busy + end - start, s, e
        else:
            end = max(end, e)
    return busy + end - start


def busy_share(intervals) -> float:
    """The share of the span from the first start to the last end that the union of
    ``intervals`` covers (:func:`busy_time`)."""
    if not intervals:
        return 0.0
    span = max(e for _, e in intervals) - min(s for s, _ in intervals)
    return busy_time(intervals) / span if span > 0 else 0.0


def _events(prof, device_type) -> list:
    """The profiled events on ``device_type`` (kernels, copies and sets on a GPU)."""
    return [e for e in prof.profiler.kineto_results.events() if e.device_type() == device_type]


def _intervals(events) -> list[tuple[int, int]]:
    """(start, end) in ns of profiled ``events``."""
    return [(e.start_ns(), e.end_ns()) for e in events]


def longest_by_name(events, reps: int, top: int = 10) -> dict[str, float]:
    """The ``top`` names (cut to 90 characters) whose ``events`` last longest in all, in ms per step."""
    total: Counter[str] = Counter()
    for e in events:
        total[e.name()[:90]] += e.end_ns() - e.start_ns()
    return {name: round(ns / reps / 1e6, 3) for name, ns in total.most_common(top)}


def device_busy(step: Callable[[], object], device: torch.device | str, reps: int = 3, warmup: int = 1) -> dict | None:
    """How much of ``reps`` back-to-back steps the GPU spends working: the union of its kernels,
    copies and sets (profiled) over the span from the first to the last. Near 1 the GPU bounds
    the step; well below 1 it waits for the host (Python, dispatch, reads in the middle of a step),
    and host work is where time can be saved. None on a CPU, whose work is all on the host.

    Returns ``{"busy_share": x, "busy_s_per_step": t, "reps": n, "longest_kernels_ms_per_step":
    {...}}``: ``t``, the GPU's busy time per step, is what a step would take if its host cost
    nothing (its device-work floor); the kernels that take it, the longest ten by name. The
    profiler's own cost on the host can only lower the share, not the busy time."""
    if torch.device(device).type != "cuda":
        return None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            step()
        torch.cuda.synchronize()
    events = _events(prof, DeviceType.CUDA)
    intervals = _intervals(events)
    if not intervals:  # the profiler saw no GPU activity (no CUPTI): nothing measured
        return {"busy_share": None, "reps": reps, "note": "the profiler recorded no GPU activity"}
    return {"busy_share": round(busy_share(intervals), 4),
            "busy_s_per_step": round(busy_time(intervals) / reps / 1e9, 6), "reps": reps,
            "longest_kernels_ms_per_step": longest_by_name(events, reps)}
