"""The benchmark beside torchvision (``fpnlib.bench``) on its tiny configuration.

Only what the benchmark must get right is tested, never a speed (the machines are noisy; the
ratios are read from ``results/bench/``): both libraries hold the same weights and compute the
same detections, so a ratio compares two implementations of one computation, and the record
has every field README quotes, with finite positive numbers.
"""
from __future__ import annotations

import json
import math
from collections import defaultdict

import pytest
import torch

from fpnlib import bench

# Same weights, same inputs: any detection that differs by more than float noise means the two
# models do different work. The tolerance is float32 rounding on boxes of ~100 px.
BOX_TOLERANCE_PX = 1e-3


@pytest.mark.parametrize("name", ["tiny"])
def test_both_libraries_compute_the_same_detections(name):
    cfg = bench.CONFIGS[name]
    ours, theirs = bench.build_pair(cfg)
    images, _ = bench.synthetic_batch(cfg)
    same = bench.same_outputs(ours, theirs, cfg, images)
    counts = same["detections_per_image"]
    assert all(a == b for a, b in counts), counts
    assert sum(a for a, _ in counts) > 0, "no detections: the comparison would be empty"
    assert same["max_box_difference_px"] <= BOX_TOLERANCE_PX, same


def test_r50_pair_holds_the_same_weights():
    ours, theirs = bench.build_pair(bench.CONFIGS["r50_fpn"])
    from fpnlib.modeling.torchvision_interop import convert_torchvision_state_dict

    converted = convert_torchvision_state_dict(theirs.state_dict())
    mine = ours.state_dict()
    assert set(converted) == set(mine)
    assert all(torch.equal(converted[k], mine[k]) for k in mine)


def test_bench_writes_a_complete_record(tmp_path):
    path = bench.bench(("tiny",), reps=2, warmup=1, device="cpu", out_dir=tmp_path, memory=False, progress=False,
                       runtime=False)
    record = json.loads(path.read_text())
    assert path.name == f"{bench.hardware_slug()}.json"
    r = record["configs"]["tiny"]
    for mode in ("train", "infer"):
        assert all(len(v) == 2 and all(x > 0 for x in v) for v in r[mode]["seconds_per_step"].values())
        ratio = r[mode]["speedup_fpnlib_over_torchvision"]
        assert math.isfinite(ratio) and ratio > 0
        assert ratio == pytest.approx(r[mode]["median_s"]["torchvision"] / r[mode]["median_s"]["fpnlib"], rel=1e-2)
        stages = r[mode]["fpnlib_stages"]["seconds"]
        assert {"backbone", "fpn", "rpn head", "proposal selection (top-k, NMS)", "RoI extraction (Eq. 1)",
                "box head"} <= set(stages)
        assert all(v >= 0 for v in stages.values())
        work = r[mode]["host_work"]
        assert set(work) == {"fpnlib", "torchvision"} and all(w["ops"] > 0 and w["waits"] >= 0 for w in work.values())
    assert "anchor labeling + sampling + RPN loss" in r["train"]["fpnlib_stages"]["seconds"]
    # fpnlib's inference step runs the optimized path; it must still compute torchvision's detections
    assert "channels_last" in r["fpnlib_inference_path"]
    for key in ("same_outputs", "same_outputs_plain"):
        assert all(a == b for a, b in r[key]["detections_per_image"]), r[key]
        assert r[key]["max_box_difference_px"] <= BOX_TOLERANCE_PX, r[key]
        assert r[key]["torchvision_detections_found_iou_0.9"] == 1.0, r[key]
    assert 1.0 < r["infer"]["fpnlib_detector_over_backbone_fpn"] < 100  # the detector does more than its body
    assert "post-processing" in r["infer"]["fpnlib_stages"]["seconds"]
    assert record["provenance"]["preset"] == "bench" and record["provenance"]["commit"]
    assert "| tiny | train |" in bench.summary(record)


def test_stage_timer_undoes_its_instrumentation():
    import fpnlib.modeling.rpn as rpn

    ours, _ = bench.build_pair(bench.CONFIGS["tiny"])
    before = rpn.select_proposals
    host = defaultdict(list)
    with bench.stage_timer(ours, "cpu", host) as times:
        assert rpn.select_proposals is not before
        ours.eval()
        with torch.no_grad():
            ours([torch.rand(3, 96, 128)])
    assert set(host) == set(times) and "backbone" in times
    # the host's part of a stage ends before the wait for the device that ends the stage
    assert all(h <= t for stage in times for h, t in zip(host[stage], times[stage], strict=True))
    assert rpn.select_proposals is before
    assert not ours.backbone._forward_hooks and not ours.backbone._forward_pre_hooks


def test_memory_probe_reports_a_peak():
    # the probe sets the thread count of the process it runs in (bench runs it in a fresh one)
    threads = torch.get_num_threads()
    try:
        out = bench._memory_probe("tiny", "fpnlib", "infer", threads)
    finally:
        torch.set_num_threads(threads)
    assert out["peak_rss_mib"] >= out["rss_before_mib"] > 0


def test_paper_runtime_times_the_three_detectors():
    out = bench.paper_runtime("cpu", 64, 96, reps=1, warmup=0, progress=False, proposals=16)
    assert set(out["s_per_image"]) == set(bench.RUNTIME_MODELS)
    assert out["rois_per_image"] == {name: 16 for name in bench.RUNTIME_MODELS}  # every head gets the same work
    assert all(v > 0 for v in out["s_per_image"].values())
    assert out["paper_s_per_image_M40"]["faster_rcnn_fpn_r50_s_per_image_M40"] == 0.148  # the reference file's
    assert out["not_shared_over_shared"] == pytest.approx(
        out["s_per_image"]["fpn_not_shared"] / out["s_per_image"]["fpn_shared"], rel=1e-2)


def test_agreement_counts_matching_detections():
    box = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 40.0, 40.0]])
    a = [{"boxes": box, "labels": torch.tensor([1, 2])}]
    assert bench.agreement(a, a) == 1.0
    shifted = [{"boxes": box + torch.tensor([3.0, 0.0, 3.0, 0.0]), "labels": torch.tensor([1, 2])}]
    assert bench.agreement(shifted, a) == 0.0  # IoU 0.54 and 0.74: below 0.9
    relabeled = [{"boxes": box, "labels": torch.tensor([1, 3])}]
    assert bench.agreement(relabeled, a) == 0.5


def _record(device, ratios, detector_over_body=2.0):
    configs = {name: {mode: {"speedup_fpnlib_over_torchvision": v} for mode, v in modes.items()}
               for name, modes in ratios.items()}
    for r in configs.values():
        r["infer"]["fpnlib_detector_over_backbone_fpn"] = detector_over_body
    return {"provenance": {"device": device}, "configs": configs}


def test_targets_are_read_off_the_record():
    cpu = bench.targets(_record("cpu", {"cpu_preset": {"train": 1.33, "infer": 1.2},
                                        "r50_fpn": {"train": 1.05, "infer": 1.4}}))
    assert [(t["config"], t["measure"], t["met"]) for t in cpu] == [
        ("cpu_preset", "train", True), ("cpu_preset", "infer", True), ("r50_fpn", "train", False), ("r50_fpn", "infer", True)]
    gpu = bench.targets(_record("cuda", {"r50_fpn_gpu": {"train": 1.6, "infer": 1.9}}, detector_over_body=1.4))
    assert [(t["measure"], t["met"]) for t in gpu] == [("train", True), ("infer", False),
                                                       ("detector / backbone+FPN", True)]


def test_the_compile_arm_compiles_both_models_and_keeps_the_detections(tmp_path, monkeypatch):
    """``bench --compile``: fpnlib's inference and training models both run their backbone and
    FPN compiled, and the record says so. Dynamo's "eager" backend stands in for inductor here
    (same tracing, no code generation, seconds instead of minutes)."""
    from fpnlib.modeling import fast_inference

    compiled = []
    original = fast_inference.compile_body

    def traced_only(model, backend="inductor"):
        parts = original(model, backend="eager")
        compiled.append((hasattr(model, "optimizations"), parts))  # only the inference copy has it
        return parts

    monkeypatch.setattr(fast_inference, "compile_body", traced_only)
    with pytest.raises(ValueError, match="warmup"):
        bench.bench(("tiny",), warmup=0, out_dir=tmp_path, compile=True)
    r = bench.run_config("tiny", reps=1, warmup=1, memory=False, progress=False, compile=True)
    assert compiled == [(True, ["backbone", "neck"]), (False, ["backbone", "neck"])]  # inference copy, trained model
    assert r["fpnlib_inference_path"][-1] == r["fpnlib_training_path"][-1] == "torch.compile (backbone, neck)"
    assert all(a == b for a, b in r["same_outputs"]["detections_per_image"]), r["same_outputs"]
    assert r["same_outputs"]["max_box_difference_px"] <= BOX_TOLERANCE_PX


@pytest.mark.parametrize("body_capture", ["works", "fails"])
def test_with_cuda_graphs_the_bench_times_the_graphs_beside_the_same_model_without(monkeypatch, fresh_learned_guesses,
                                                                                  body_capture):
    """``FPNLIB_CUDA_GRAPHS=1``: fpnlib's inference is timed replayed and, in the same
    alternation, with its graphs paused; the record keeps both and how the passes ran. On a CPU
    the graphs' stand-in replays by running the pass again (``cuda_graphs.RerunBackend``).
    Backbone + FPN alone is timed eagerly and replayed; a failed capture of the body leaves its
    error in the record and the eager body as the target's."""
    from fpnlib.modeling import cuda_graphs

    if body_capture == "fails":
        eager_only = bench.body_seconds

        def body_seconds(*args, graphed=False, **kwargs):
            if graphed:
                raise RuntimeError("capture failed")
            return eager_only(*args, **kwargs)
        monkeypatch.setattr(bench, "body_seconds", body_seconds)
    monkeypatch.setenv("FPNLIB_CUDA_GRAPHS", "1")
    monkeypatch.setenv("FPNLIB_GROUP_NMS", "1")
    monkeypatch.setattr(cuda_graphs, "CudaGraphBackend", cuda_graphs.RerunBackend)
    r = bench.run_config("tiny", reps=2, warmup=1, memory=False, progress=False)
    infer = r["infer"]
    assert set(infer["seconds_per_step"]) == {"fpnlib", "torchvision", bench.EAGER_ARM}
    assert all(len(v) == 2 for v in infer["seconds_per_step"].values())
    # first seen by same_outputs, captured in the warm-up step, replayed in the timed ones
    assert infer["cuda_graph_passes"] == {"eager": 2, "captured": 1, "replayed": 2}, infer["cuda_graph_passes"]
    assert infer["cuda_graphs_speedup"] == pytest.approx(
        infer["median_s"][bench.EAGER_ARM] / infer["median_s"]["fpnlib"], rel=1e-2)
    # the target's ratio takes the faster of the body alone eager and replayed from its own graph
    if body_capture == "fails":
        assert infer["fpnlib_backbone_fpn_alone_graphed_s"] == "RuntimeError: capture failed"
        body = infer["fpnlib_backbone_fpn_alone_s"]
    else:
        body = min(infer["fpnlib_backbone_fpn_alone_s"], infer["fpnlib_backbone_fpn_alone_graphed_s"])
    assert infer["fpnlib_detector_over_backbone_fpn"] == pytest.approx(infer["median_s"]["fpnlib"] / body, rel=1e-2)
    assert infer["fpnlib_without_graphs_detector_over_backbone_fpn"] == pytest.approx(
        infer["median_s"][bench.EAGER_ARM] / infer["fpnlib_backbone_fpn_alone_s"], rel=1e-2)
    assert infer["fpnlib_without_graphs_detector_over_backbone_fpn"] > 1.0
    assert set(r["train"]["seconds_per_step"]) == {"fpnlib", "torchvision"}
    assert all(a == b for a, b in r["same_outputs"]["detections_per_image"]), r["same_outputs"]
