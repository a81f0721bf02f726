"""Counting a step's host work (``fpnlib.host_work``): operators and waits for the device.

Counts, not times: they are exact on any machine. ``test_a_step_waits_once_per_batch_not_per_image``
holds fpnlib's training and inference steps to what their batch-wide work gives on the CUDA path:
no wait per image, and a bounded number of operators per image.
"""
from __future__ import annotations

import os
from dataclasses import replace

import pytest
import torch

from fpnlib import bench
from fpnlib.host_work import count_host_work

# Operators an extra image adds to a tiny Faster R-CNN step on the CUDA path (batch 2 -> 4, per image,
# after a warm-up step on the same path). Training: 40, with anchor labelling, RoI sampling and
# proposal selection done for the batch and only the random draws made image by image (284 at
# a5ca6f0, where each image was labelled and sampled on its own; 76 at 7584eac). Inference, `detect`
# from photos to boxes: 18.5, with proposal selection, post-processing, preprocessing and the boxes'
# way back done for the batch (65.5 at 7584eac; 18.0 with its sizes guessed, `guessed_sizes`).
# The bounds leave room for grouped NMS's rounds, whose number follows the data.
OPS_PER_IMAGE_BOUND = {"train": 50, "infer": 25}


def test_reads_of_data_are_counted_as_waits_and_nothing_else_is():
    x = torch.arange(6.0)

    def step():
        y = x * 2 + 1  # two operators, no wait
        torch.nonzero_static(y > 3, size=2)  # a size given: no wait
        torch.where(y > 3, y, 0.0)
        y.sum().item()  # wait 1
        y.tolist()  # wait 2 (dispatches nothing on a CPU)
        y[y > 3]  # wait 3: a boolean mask calls nonzero
        torch.nonzero(y)  # wait 4
        torch.equal(y, x)  # wait 5: a Python bool

    counts = count_host_work(step)
    assert counts["waits"] == 5, counts
    assert counts["waits_by_kind"] == {"Tensor.tolist": 1, "aten._local_scalar_dense.default": 1,
                                       "aten.equal.default": 1, "aten.index.Tensor": 1, "aten.nonzero.default": 1}
    # mul, add, gt, nonzero_static, gt, scalar_tensor (the 0.0), where, sum, item, gt, index, nonzero, equal
    assert counts["ops"] == 13, counts


def test_cuda_path_switches_are_restored():
    before = {k: os.environ.get(k) for k in ("FPNLIB_GROUP_NMS", "FPNLIB_SPARSE_RPN_GRAD", "FPNLIB_BATCH_PREPROCESS")}
    seen = {}
    count_host_work(lambda: seen.update({k: os.environ.get(k) for k in before}), cuda_path=True)
    assert seen == {"FPNLIB_GROUP_NMS": "1", "FPNLIB_SPARSE_RPN_GRAD": "0", "FPNLIB_BATCH_PREPROCESS": "1"}
    assert {k: os.environ.get(k) for k in before} == before


def _step_counts(batch: int, mode: str) -> dict:
    cfg = replace(bench.CONFIGS["tiny"], batch=batch)
    ours, theirs = bench.build_pair(cfg)
    images, targets = bench.synthetic_batch(cfg)
    step = bench._steps(ours, theirs, cfg, images, targets, "cpu")["fpnlib"][mode]
    return count_host_work(step, cuda_path=True, warmup=1)  # lazily built state out of the count


def _waits_but_convergence_tests(counts: dict) -> int:
    """Waits other than grouped NMS's tests of convergence (``torch.equal``, one per two rounds),
    whose number follows the longest chain of suppressions in the batch, not its size."""
    return counts["waits"] - counts["waits_by_kind"].get("aten.equal.default", 0)


@pytest.mark.parametrize("mode", ["train", "infer"])
def test_a_step_waits_once_per_batch_not_per_image(mode):
    two, four = _step_counts(2, mode), _step_counts(4, mode)
    assert _waits_but_convergence_tests(two) == _waits_but_convergence_tests(four), (
        two["waits_by_kind"], four["waits_by_kind"])
    assert _waits_but_convergence_tests(four) <= 5, four["waits_by_kind"]
    assert four["ops"] - two["ops"] <= 2 * OPS_PER_IMAGE_BOUND[mode], (two["ops"], four["ops"])


def test_copies_between_host_and_device_count_where_they_wait():
    # "meta" stands for the GPU: the rule reads only the devices and the non_blocking flag
    from fpnlib.host_work import _is_wait

    dev, host = torch.empty(2, device="meta"), torch.empty(2)
    to_copy = "aten._to_copy.default"
    assert _is_wait(to_copy, (dev,), {"device": torch.device("cpu")}, "meta")  # device -> host
    assert _is_wait(to_copy, (host,), {"device": torch.device("meta")}, "meta")  # host -> device, blocking
    assert not _is_wait(to_copy, (host,), {"device": torch.device("meta"), "non_blocking": True}, "meta")
    assert not _is_wait(to_copy, (dev,), {"dtype": torch.float16}, "meta")  # a cast on the device
    assert _is_wait("aten.copy_.default", (host, dev), {}, "meta")
    assert not _is_wait("aten.copy_.default", (dev, host, True), {}, "meta")
    assert not _is_wait(to_copy, (host,), {"dtype": torch.float16}, "cpu")
    # a read of a CPU tensor in a GPU run waits for nothing; one of a device tensor does
    assert not _is_wait("aten.nonzero.default", (host,), {}, "meta")
    assert _is_wait("aten.nonzero.default", (dev,), {}, "meta")
    assert not _is_wait("aten.index.Tensor", (host, [host > 0]), {}, "meta")
    assert _is_wait("aten.index.Tensor", (dev, [dev > 0]), {}, "meta")
    counts = torch.tensor([1, 2])  # repeat_interleave with its output size given: no wait
    assert _is_wait("aten.repeat_interleave.Tensor", (counts,), {}, "cpu")
    assert not _is_wait("aten.repeat_interleave.Tensor", (counts,), {"output_size": 3}, "cpu")


def test_busy_share_is_the_union_of_intervals_over_their_span():
    from fpnlib.host_work import busy_share, busy_time

    assert busy_time([(20, 30), (0, 10), (5, 15)]) == 25 and busy_time([]) == 0
    assert busy_share([(20, 30), (0, 10), (5, 15)]) == 25 / 30  # overlaps count once, the gap 15-20 idles
    assert busy_share([(0, 10), (2, 3)]) == 1.0  # nested: all busy
    assert busy_share([(0, 1), (9, 10)]) == 0.2
    assert busy_share([]) == 0.0


def test_the_profilers_intervals_are_read_and_a_cpu_has_no_device_share():
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from fpnlib.host_work import _events, _intervals, device_busy, longest_by_name

    x = torch.randn(64, 64)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        (x @ x).relu().sum()
    spans = _intervals(_events(prof, DeviceType.CPU))  # the same reading a GPU's kernels get, on the CPU's operators
    assert spans and all(end >= start > 0 for start, end in spans)
    longest = longest_by_name(_events(prof, DeviceType.CPU), reps=1, top=2)
    assert len(longest) == 2 and "aten::matmul" in longest and all(ms > 0 for ms in longest.values()), longest
    assert list(longest.values()) == sorted(longest.values(), reverse=True)
    assert device_busy(lambda: x @ x, "cpu") is None

