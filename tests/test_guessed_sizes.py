"""Sizes guessed in inference's middle and checked once at the end (``guessed_sizes``) give the
outputs of the path that reads each size, whether the guesses are right or wrong.

Run on a CPU with the CUDA path's grouped NMS (``FPNLIB_GROUP_NMS=1``); outputs are compared with
``torch.equal`` (no tolerance).
"""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from fpnlib import bench
from fpnlib.host_work import count_host_work
from fpnlib.modeling import guessed_sizes
from fpnlib.modeling.group_nms import greedy_keep
from fpnlib.modeling.guessed_sizes import LEARNED, Misguessed, with_guessed_sizes
from fpnlib.modeling.torchvision_interop import detect


@pytest.fixture
def fresh_guesses(fresh_learned_guesses, monkeypatch):
    """Fresh guesses (``conftest.py``) on the grouped-NMS path, which a CPU takes when asked."""
    monkeypatch.setenv("FPNLIB_GROUP_NMS", "1")
    return fresh_learned_guesses


@pytest.fixture
def failures(monkeypatch):
    """Every failed check, as ``learn`` receives them."""
    seen = []
    learn = guessed_sizes.Guesses.learn

    def recording(self, failed):
        seen.extend(failed)
        learn(self, failed)

    monkeypatch.setattr(guessed_sizes.Guesses, "learn", recording)
    return seen


def test_too_few_rounds_fail_their_check_and_enough_give_greedy_nms(fresh_guesses):
    # a chain (each box overlaps the next one only) settles after 17 rounds; 30 padding boxes
    # make the group wider than that, so that a guess of fewer rounds than its width is checked
    chain = torch.tensor([[float(x), 0.0, x + 10.0, 10.0] for x in range(0, 90, 5)])
    boxes = torch.cat([chain, torch.zeros(30, 4)])[None]
    valid = torch.arange(48)[None] < 18
    expected = greedy_keep(boxes, valid, 0.3)
    assert expected[0, :18].tolist() == [i % 2 == 0 for i in range(18)]
    for rounds, right in ((4, False), (17, False), (18, True), (32, True)):
        fresh_guesses.rounds["test"] = rounds

        def run():
            keep = greedy_keep(boxes, valid, 0.3, site="test")
            return keep, guessed_sizes.read(keep.sum()) if guessed_sizes.active() else None

        guessed_sizes._state.guessing = guessed_sizes.Guessing()
        try:
            if right:
                keep, _ = run()
                assert torch.equal(keep, expected)
            else:
                with pytest.raises(Misguessed) as wrong:
                    run()
                assert wrong.value.failed == [(("rounds", "test"), 1)]
        finally:
            guessed_sizes._state.guessing = None


def test_a_failed_guess_runs_again_reading_the_sizes_and_learns(fresh_guesses, failures):
    calls = []

    def run():
        calls.append(guessed_sizes.active() is not None)
        guessed_sizes.active().check(("width", None), torch.tensor([3, 70, 5]), 64) if calls[-1] else None
        return guessed_sizes.read(torch.tensor([1, 2]))

    assert with_guessed_sizes(run) == [1, 2]
    assert calls == [True, False] and failures == [(("width", None), 70)] and fresh_guesses.width == 70
    calls.clear()
    assert with_guessed_sizes(run, enabled=False) == [1, 2] and calls == [False]


def _model_and_images(sizes):
    cfg = replace(bench.CONFIGS["tiny"], batch=len(sizes))
    model, _ = bench.build_pair(cfg)
    g = torch.Generator().manual_seed(1)
    return model.eval(), cfg, [torch.rand(3, h, w, generator=g) for h, w in sizes]


@pytest.mark.parametrize("sizes", [[(96, 128)] * 3, [(96, 128), (80, 120), (100, 90)]])
def test_guessed_detections_are_the_read_ones(fresh_guesses, failures, monkeypatch, sizes):
    model, cfg, images = _model_and_images(sizes)
    with torch.no_grad():
        monkeypatch.setenv("FPNLIB_GUESS_SIZES", "0")
        plain = detect(model, images, cfg.min_size, cfg.max_size)
        monkeypatch.setenv("FPNLIB_GUESS_SIZES", "1")
        monkeypatch.setattr(LEARNED, "width", 2)  # wrong on purpose: too narrow, too few groups and rounds
        monkeypatch.setattr(LEARNED, "groups", 1)
        monkeypatch.setattr(LEARNED, "rounds", {"proposals": 1, "detections": 1})
        first = detect(model, images, cfg.min_size, cfg.max_size)
        kinds = {kind for (kind, _), _ in failures}
        assert {"width", "groups"} <= kinds and "rounds" in kinds, failures
        failures.clear()  # one failed pass taught every guess: the next pass holds
        learned = detect(model, images, cfg.min_size, cfg.max_size)
        assert not failures, failures
    assert max(len(d["boxes"]) for d in plain) > 20
    for outputs in (first, learned):
        for a, b in zip(plain, outputs, strict=True):
            for key in ("boxes", "scores", "labels"):
                assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def test_proposal_counts_are_read_for_a_layout_where_the_guess_failed(fresh_guesses, failures, monkeypatch):
    model, cfg, images = _model_and_images([(96, 128)] * 2)
    # NMS at 0.2 leaves the images fewer proposals than post_nms_top_n_test (1000 candidates on P2 alone)
    monkeypatch.setattr(model.rpn.cfg, "nms_thresh", 0.2)
    with torch.no_grad():
        monkeypatch.setenv("FPNLIB_GUESS_SIZES", "0")
        plain = detect(model, images, cfg.min_size, cfg.max_size)
        monkeypatch.setenv("FPNLIB_GUESS_SIZES", "1")
        guessed = [detect(model, images, cfg.min_size, cfg.max_size) for _ in range(2)]
    assert [kind for (kind, _), _ in failures].count("counts") == 1, failures  # learned at once
    assert len(fresh_guesses.counts_read) == 1
    for outputs in guessed:
        for a, b in zip(plain, outputs, strict=True):
            assert all(torch.equal(a[key], b[key]) for key in ("boxes", "scores", "labels"))


def test_inference_with_learned_guesses_waits_once_on_the_cuda_path(fresh_guesses):
    model, cfg, images = _model_and_images([(96, 128)] * 2)

    def step():
        with torch.no_grad():
            detect(model, images, cfg.min_size, cfg.max_size)

    # the warm-up steps learn the guesses; on a CPU RoI extraction reads its levels' counts
    # once more (CUDA's RoIAlign kernel does not, see fpnlib.host_work)
    counts = count_host_work(step, cuda_path=True, warmup=4)
    assert counts["waits_by_kind"] == {"Tensor.tolist": 2}, counts["waits_by_kind"]
