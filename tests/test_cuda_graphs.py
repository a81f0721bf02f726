"""Inference replayed from graphs (``cuda_graphs``) gives the eager pass's detections.

A CPU cannot capture a CUDA graph: these tests run the bookkeeping (one graph per batch shape,
the guesses' checks read after each replay, copies of the outputs, the fallbacks) with
``RerunBackend``, which replays by running the captured pass again, on the grouped-NMS path
(``FPNLIB_GROUP_NMS=1``). Outputs are compared with ``torch.equal``. Real graphs are tested on a
GPU (``tests/test_cuda.py``).
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import replace

import pytest
import torch

from fpnlib import bench
from fpnlib.modeling import cuda_graphs
from fpnlib.modeling.cuda_graphs import InferenceGraphs, RerunBackend
from fpnlib.modeling.fast_inference import optimized_for_inference
from fpnlib.modeling.torchvision_interop import detect


@pytest.fixture
def grouped(fresh_learned_guesses, monkeypatch):
    monkeypatch.setenv("FPNLIB_GROUP_NMS", "1")
    monkeypatch.setenv("FPNLIB_GUESS_SIZES", "1")
    return fresh_learned_guesses


def _model(batch=2):
    cfg = replace(bench.CONFIGS["tiny"], batch=batch)
    model, _ = bench.build_pair(cfg)
    return model.eval(), cfg


def _images(sizes, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, h, w, generator=g) for h, w in sizes]


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for key in ("boxes", "scores", "labels"):
            assert x[key].dtype == y[key].dtype and torch.equal(x[key], y[key]), key


def _graphed(model, **kwargs):
    graphed = copy.deepcopy(model)
    graphed.inference_graphs = InferenceGraphs(backend=RerunBackend(), **kwargs)
    return graphed


def test_replays_give_the_eager_detections_and_outputs_survive_the_next_replay(grouped):
    model, cfg = _model()
    graphed = _graphed(model)
    batches = [_images([(96, 128)] * 2, seed) for seed in (1, 2, 3, 4)]
    with torch.no_grad():
        eager = [detect(model, images, cfg.min_size, cfg.max_size) for images in batches]
        got = [detect(graphed, images, cfg.min_size, cfg.max_size) for images in batches]
    stats = graphed.inference_graphs.stats
    assert stats == {"eager": 2, "captured": 1, "replayed": 2}, stats
    assert max(len(d["boxes"]) for out in eager for d in out) > 20
    for e, g in zip(eager, got):  # batch 3's detections were not overwritten by batch 4's replay
        _assert_same(e, g)


def test_each_shape_is_captured_and_the_oldest_graph_is_dropped(grouped):
    model, cfg = _model()
    graphed = _graphed(model, capture_after=1, max_graphs=1)
    graphs = graphed.inference_graphs
    wide, tall = _images([(96, 128)] * 2, 1), _images([(128, 96)] * 2, 2)
    with torch.no_grad():
        for images in (wide, wide, tall, tall):
            _assert_same(detect(graphed, images, cfg.min_size, cfg.max_size),
                         detect(model, images, cfg.min_size, cfg.max_size))
    assert graphs.stats == {"eager": 2, "captured": 2, "replayed": 2}, graphs.stats
    (shape, _), = graphs.graphs  # the tall batch's
    assert shape[0][2] > shape[0][3], shape


def test_a_failed_check_after_a_replay_runs_the_batch_eagerly_and_captures_again(grouped):
    model, cfg = _model()
    graphed = _graphed(model, capture_after=1)
    graphs = graphed.inference_graphs
    images = _images([(96, 128)] * 2, 1)
    with torch.no_grad():
        expected = detect(model, images, cfg.min_size, cfg.max_size)
        detect(graphed, images, cfg.min_size, cfg.max_size)  # eager, captured
        (key, graph), = graphs.graphs.items()
        assert any(what == ("width", None) for what, _ in graph.checks), graph.checks
        # as if the replay's batch needed a wider group than the capture's guess
        graphs.graphs[key] = graph._replace(checks=[(what, -1 if what == ("width", None) else guessed)
                                                    for what, guessed in graph.checks])
        _assert_same(detect(graphed, images, cfg.min_size, cfg.max_size), expected)
        assert graphs.stats["misguessed"] == 1 and not graphs.graphs
        _assert_same(detect(graphed, images, cfg.min_size, cfg.max_size), expected)  # eager, captured anew
        _assert_same(detect(graphed, images, cfg.min_size, cfg.max_size), expected)  # replayed
    assert graphs.stats == {"eager": 2, "captured": 2, "replayed": 1, "misguessed": 1}, graphs.stats


def test_a_pass_that_must_read_proposal_counts_is_not_captured(grouped, monkeypatch):
    model, cfg = _model()
    # NMS at 0.2 leaves the images fewer proposals than post_nms_top_n_test: once that guess has
    # failed, the counts of this pyramid shape are read in the pass's middle
    monkeypatch.setattr(model.rpn.cfg, "nms_thresh", 0.2)
    graphed = _graphed(model)
    images = _images([(96, 128)] * 2, 1)
    with torch.no_grad():
        expected = detect(model, images, cfg.min_size, cfg.max_size)
        got = [detect(graphed, images, cfg.min_size, cfg.max_size) for _ in range(3)]
    assert grouped.counts_read
    graphs = graphed.inference_graphs
    assert graphs.stats == {"eager": 3, "refused": 1}, graphs.stats
    assert not graphs.graphs and len(graphs.refused) == 1
    for out in got:
        _assert_same(out, expected)


def test_paused_graphs_and_a_copied_model_run_eagerly(grouped):
    model, cfg = _model()
    graphed = _graphed(model, capture_after=1)
    images = _images([(96, 128)] * 2, 1)
    with torch.no_grad():
        with cuda_graphs.paused(graphed):
            detect(graphed, images, cfg.min_size, cfg.max_size)
        assert not graphed.inference_graphs.stats
        detect(graphed, images, cfg.min_size, cfg.max_size)
        copied = copy.deepcopy(graphed)
    assert graphed.inference_graphs.graphs and not copied.inference_graphs.graphs
    assert isinstance(copied.inference_graphs.backend, RerunBackend)
    graphed.inference_graphs.clear()
    assert not graphed.inference_graphs.graphs and not graphed.inference_graphs.seen


def test_optimized_for_inference_adds_graphs_only_when_asked(grouped, monkeypatch):
    model, cfg = _model()
    monkeypatch.delenv("FPNLIB_CUDA_GRAPHS", raising=False)
    assert getattr(optimized_for_inference(model), "inference_graphs", None) is None
    monkeypatch.setenv("FPNLIB_CUDA_GRAPHS", "1")
    fast = optimized_for_inference(model)
    assert isinstance(fast.inference_graphs, InferenceGraphs) and "CUDA graphs" in fast.optimizations
    assert "no CUDA graphs" not in cuda_graphs.path_note(fast)
    images = _images([(96, 128)] * 2, 1)
    with torch.no_grad():  # a CPU batch cannot take CUDA graphs: it runs eagerly, as without them
        _assert_same(detect(fast, images, cfg.min_size, cfg.max_size),
                     detect(optimized_for_inference(model, cuda_graphs=False), images, cfg.min_size, cfg.max_size))
    assert not fast.inference_graphs.stats
    with pytest.raises(ValueError, match="capture_after"):
        InferenceGraphs(capture_after=0)


def test_the_captured_pass_waits_for_nothing_but_a_cpus_roi_read(grouped):
    """What a capture needs, counted on a CPU on the CUDA path: no operator of the pass waits for
    the device. The one wait counted is RoI extraction's read of its levels' counts, which a CPU
    makes and CUDA's RoIAlign kernel does not (``fpnlib.host_work``)."""
    from fpnlib.host_work import count_host_work
    from fpnlib.modeling.detectors import batch_images
    from fpnlib.modeling.guessed_sizes import guessing_pass
    from fpnlib.modeling.torchvision_interop import preprocess

    model, cfg = _model()
    images = _images([(96, 128)] * 2, 1)
    batch, hws = batch_images(preprocess(images, cfg.min_size, cfg.max_size)[0], model.cfg.size_divisible)

    def captured_pass():
        with torch.no_grad(), guessing_pass(capturing=True):
            model.padded_detections(batch, hws)

    work = count_host_work(captured_pass, cuda_path=True, warmup=2)
    assert work["waits_by_kind"] == {"Tensor.tolist": 1}, work["waits_by_kind"]


def test_the_cuda_backend_warms_up_where_waits_are_errors_then_captures_this_thread_only(monkeypatch):
    """``CudaGraphBackend``'s order of calls, with ``torch.cuda``'s streams and graphs recorded
    instead of run: the warm-up on the capture's own stream with every wait an error (then the
    setting restored), and the capture on that stream, restricting only this thread (a
    DataLoader's pin-memory thread may allocate meanwhile), into the memory pool that every
    graph of the backend shares. The real thing runs in ``tests/test_cuda.py``."""
    calls, debug = [], ["warn"]

    class Stream:
        def wait_stream(self, other):
            calls.append(("wait_stream", self, other))

    current = Stream()

    @contextlib.contextmanager
    def on_stream(stream):
        calls.append(("on stream", stream))
        yield

    @contextlib.contextmanager
    def graph(handle, stream=None, **kwargs):
        calls.append(("capture", handle, stream, kwargs))
        yield

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: current)
    monkeypatch.setattr(torch.cuda, "stream", on_stream)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", object)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: debug[0])
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda mode: debug.__setitem__(0, mode))
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: ("pool", len(calls)))

    def run():
        calls.append(("run", debug[0]))
        return (torch.zeros(1),)

    backend = cuda_graphs.CudaGraphBackend()
    handle, outputs = backend.capture(run)
    side, pool = backend.stream, backend.pool
    assert isinstance(side, Stream) and side is not current and pool == ("pool", 0)
    capture = ("capture", handle, side, {"pool": pool, "capture_error_mode": "thread_local"})
    assert calls == [("wait_stream", side, current), ("on stream", side), ("run", "error"),
                     ("wait_stream", current, side), capture, ("run", "warn")], calls
    assert debug == ["warn"] and torch.equal(outputs[0], torch.zeros(1))
    calls.clear()
    second, _ = backend.capture(run)  # the next shape's graph: the same stream and memory pool
    assert (backend.stream, backend.pool) == (side, pool) and calls[-2] == ("capture", second, side, capture[3])
