"""A detector's inference replayed as one CUDA graph per batch shape (not in the paper; speed).

After the backbone, inference is hundreds of small operators (top-k, grouped NMS, RoIAlign,
post-processing), and on a GPU the host launching them one by one is what takes the time:
R50-FPN, 800x1333, batch 8 on an H200, proposal selection and post-processing took as long
with the device synchronised after each of them as the host spent on them
(``fpnlib_stages`` in ``results/bench/cuda-nvidia-h200.json``). A CUDA graph records the kernels
of one pass and launches all of them again with one call.

A graph holds fixed shapes, sizes and addresses, so:

* the batch is copied into the graph's own input tensor, and the detections out of its outputs;
* the sizes in the middle are guessed (``guessed_sizes``); their checks are outputs of the graph,
  read with the detections' counts after each replay. A failed check: the guesses learn, the
  graphs are dropped, and this batch runs eagerly, reading each size;
* a pass that must read a size in its middle (``NotCapturable``: proposal counts read for a
  pyramid shape whose images kept too few) is not captured for that shape;
* one graph per (batch shape, image sizes, autocast, what the guesses have learned), captured
  the ``capture_after``-th time the shape is seen (the first passes run eagerly, so evaluation on
  images whose shapes rarely repeat pays for no capture), the last ``max_graphs`` kept.

A graph reads the weights where it found them when it was captured, including the bf16 copies
the fused convolutions keep (``fused_conv``): the inference copy is not meant to change, and one
whose weights do must drop its graphs (``model.inference_graphs.clear()``).

The outputs are the eager pass's: the same kernels run on the same numbers
(``tests/test_cuda_graphs.py`` with :class:`RerunBackend` on a CPU, ``tests/test_cuda.py`` with
real graphs on a GPU). Turned on by ``optimized_for_inference(cuda_graphs=True)`` or
``FPNLIB_CUDA_GRAPHS=1``.
"""
from __future__ import annotations

import os
import warnings
from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .group_nms import use_group_nms
from .guessed_sizes import LEARNED, Guessing, Misguessed, NotCapturable, active, guessing_enabled, guessing_pass
from .postprocess import PaddedDetections

_PADDED = len(PaddedDetections._fields)


def wanted() -> bool:
    """``FPNLIB_CUDA_GRAPHS=1``: ``optimized_for_inference`` adds graphs by default."""
    return os.environ.get("FPNLIB_CUDA_GRAPHS", "0") == "1"


class CudaGraphBackend:
    """Capture and replay with ``torch.cuda.CUDAGraph``. The pass runs once eagerly on the
    capture's own stream first: cuBLAS and cuDNN make their per-stream state, and Triton compiles
    its kernels, on first use, which a capture may not do. That run makes every operator that
    waits for the device an error (``torch.cuda.set_sync_debug_mode``), so a pass that would wait
    (e.g. RoI extraction without the Triton kernel reads its levels' counts) is refused before
    its capture is begun.

    The capture restricts this thread only (``capture_error_mode="thread_local"``): under CUDA's
    default, a call that other threads make while a stream captures, such as a DataLoader's
    pin-memory thread allocating pinned memory for the next batch, breaks the capture and raises
    in that thread too.

    The graphs share one memory pool: a pass's memory is held once, not once per batch shape.
    A replay may then write over memory where another graph left its outputs, which is safe
    because :class:`InferenceGraphs` reads and copies each replay's outputs before the next."""

    device_type = "cuda"

    def __init__(self):
        self.stream: torch.cuda.Stream | None = None
        self.pool = None

    def capture(self, run: Callable[[], tuple[Tensor, ...]]) -> tuple[Any, tuple[Tensor, ...]]:
        if self.stream is None:
            self.stream, self.pool = torch.cuda.Stream(), torch.cuda.graph_pool_handle()
        self.stream.wait_stream(torch.cuda.current_stream())
        before = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            with torch.cuda.stream(self.stream):
                run()  # the warm-up
        finally:
            torch.cuda.set_sync_debug_mode(before)
        torch.cuda.current_stream().wait_stream(self.stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, stream=self.stream, capture_error_mode="thread_local"):
            outputs = run()
        return graph, outputs

    def replay(self, handle: Any, outputs: tuple[Tensor, ...]) -> None:
        handle.replay()


class RerunBackend:
    """A stand-in for CUDA graphs on any device: "replays" by running the pass again and copying
    its results into the captured outputs. It exercises the bookkeeping (shapes, guesses, output
    copies) where no GPU is, and saves nothing."""

    device_type = None  # any

    def capture(self, run: Callable[[], tuple[Tensor, ...]]) -> tuple[Any, tuple[Tensor, ...]]:
        return run, run()

    def replay(self, handle: Any, outputs: tuple[Tensor, ...]) -> None:
        for old, new in zip(outputs, handle(), strict=True):
            old.copy_(new)


class _Graph(NamedTuple):
    handle: Any
    batch: Tensor  # the graph's input, the batch copied in
    outputs: tuple[Tensor, ...]  # PaddedDetections' fields, then the checks' values
    checks: list[tuple[Hashable, int]]  # (what, guessed) of each check, as Guessing keeps them


def _autocast_state(device_type: str) -> tuple[bool, torch.dtype]:
    return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


class InferenceGraphs:
    """Replays a detector's evaluation pass (its ``padded_detections``) from CUDA graphs, one per
    batch shape. Called as ``graphs(model, batch, hws)`` by ``FasterRCNN.forward`` in eval mode;
    returns what ``model.detect(batch, hws)`` returns. ``stats`` counts the passes by how they ran:
    eager, captured, replayed, misguessed (replayed, then run again eagerly), refused."""

    def __init__(self, capture_after: int = 2, max_graphs: int = 4, backend=None):
        if capture_after < 1 or max_graphs < 1:
            raise ValueError(f"capture_after ({capture_after}) and max_graphs ({max_graphs}) must be >= 1")
        self.capture_after, self.max_graphs = capture_after, max_graphs
        self.backend = backend if backend is not None else CudaGraphBackend()
        self.graphs: OrderedDict[Hashable, _Graph] = OrderedDict()
        self.seen: Counter = Counter()
        self.refused: set = set()
        self.stats: Counter = Counter()
        self.paused = False

    def __deepcopy__(self, memo):  # a copied model starts with no graphs (they hold its tensors)
        return InferenceGraphs(self.capture_after, self.max_graphs, type(self.backend)())

    def clear(self) -> None:
        """Drop every graph (and its memory); shapes are captured again when seen again."""
        self.graphs.clear()
        self.seen.clear()
        self.refused.clear()

    def usable(self, batch: Tensor) -> bool:
        """Whether ``batch`` can take the graphs: the grouped-NMS path with guessed sizes (the
        pass then never waits in its middle), on the backend's device, outside a guessing pass."""
        on_device = self.backend.device_type in (None, batch.device.type)
        return (not self.paused and on_device and use_group_nms(batch.device) and guessing_enabled()
                and active() is None)

    def __call__(self, model: nn.Module, batch: Tensor, hws: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        if not self.usable(batch):
            return model.detect(batch, hws)
        shape = (tuple(batch.shape), batch.dtype, str(batch.device), tuple(hws), _autocast_state(batch.device.type))
        key = (shape, LEARNED.snapshot())
        graph = self.graphs.get(key)
        if graph is None:
            out = model.detect(batch, hws)  # eagerly; a failed guess learns here
            self.stats["eager"] += 1
            self.seen[shape] += 1
            if self.seen[shape] >= self.capture_after and shape not in self.refused:
                self._capture(model, batch, hws, shape)
            return out
        self.graphs.move_to_end(key)
        return self._replay(model, graph, batch, hws)

    def _capture(self, model: nn.Module, batch: Tensor, hws: list[tuple[int, int]], shape: Hashable) -> None:
        static = batch.clone()
        checks: list[tuple[Hashable, int]] = []
        enabled, dtype = shape[-1]

        def run() -> tuple[Tensor, ...]:
            # autocast's cache of cast weights would be freed after the capture: casts are recorded
            with torch.no_grad(), torch.autocast(batch.device.type, dtype=dtype, enabled=enabled, cache_enabled=False), \
                    guessing_pass(capturing=True) as guessing:
                padded = model.padded_detections(static, hws)
            checks[:] = [(what, guessed) for what, _, guessed in guessing.checks]
            return tuple(padded) + tuple(value for _, value, _ in guessing.checks)

        try:
            handle, outputs = self.backend.capture(run)
        except NotCapturable:
            self.refused.add(shape)
            self.stats["refused"] += 1
            return
        except RuntimeError as err:  # e.g. an operator that cannot be captured: the shape stays eager
            warnings.warn(f"CUDA graph capture failed, batch shape {shape[0]} runs eagerly: {err}", stacklevel=3)
            self.refused.add(shape)
            self.stats["refused"] += 1
            return
        self.graphs[(shape, LEARNED.snapshot())] = _Graph(handle, static, outputs, list(checks))
        self.stats["captured"] += 1
        while len(self.graphs) > self.max_graphs:
            self.graphs.popitem(last=False)

    def _replay(self, model: nn.Module, graph: _Graph, batch: Tensor, hws: list[tuple[int, int]]):
        graph.batch.copy_(batch)
        self.backend.replay(graph.handle, graph.outputs)
        padded = PaddedDetections(*graph.outputs[:_PADDED])
        guessing = Guessing()
        guessing.checks = [(what, value, guessed) for (what, guessed), value in zip(graph.checks, graph.outputs[_PADDED:])]
        try:
            found = guessing.read(padded.found)  # the pass's one wait: counts and checks
        except Misguessed as wrong:
            LEARNED.learn(wrong.failed)
            self.graphs.clear()  # captured with the old guesses; their memory goes back
            self.stats["misguessed"] += 1
            return model.detect(batch, hws, guess=False)
        self.stats["replayed"] += 1
        # the next replay overwrites the graph's outputs: the caller gets copies
        return PaddedDetections(*(t.clone() for t in padded[:3]), padded.found).per_image(found)


@contextmanager
def paused(model: nn.Module):
    """Inside, ``model`` runs its evaluation passes eagerly (e.g. for per-module timing hooks,
    which a replayed graph does not call)."""
    graphs = getattr(model, "inference_graphs", None)
    before = graphs.paused if graphs is not None else None
    if graphs is not None:
        graphs.paused = True
    try:
        yield
    finally:
        if graphs is not None:
            graphs.paused = before


def path_note(model: nn.Module) -> str:
    """Whether ``model``'s inference replays CUDA graphs, for benchmark records."""
    graphs = getattr(model, "inference_graphs", None)
    if graphs is None:
        return "no CUDA graphs (FPNLIB_CUDA_GRAPHS=1 adds them)"
    return (f"a CUDA graph per batch shape, captured the {graphs.capture_after}. time the shape is seen "
            f"(backend {type(graphs.backend).__name__})")
