"""README's numbers come from results/: the generated blocks must match the recorded runs."""
from __future__ import annotations

import json

import pytest

from fpnlib.report import README, RESULTS_DIR, render_data_block, render_readme


def test_readme_blocks_match_results():
    text = README.read_text()
    assert render_readme(text) == text, "README is out of sync with results/: run `python -m fpnlib report`"


def test_data_block_reads_the_file(tmp_path):
    rec = {split: {"num_images": 3, "num_objects": 10, "share_small": 0.5, "share_medium": 0.3,
                   "share_large": 0.2, "sqrt_area_min": 8.0, "sqrt_area_max": 200.0, "octaves": 4.6,
                   "num_empty_images": 1, "num_grayscale_images": 0, "num_crowd_regions": 2}
           for split in ("train", "val")}
    rec["provenance"] = {"preset": "cpu", "seed": 0, "commit": "abc", "date": "2026-01-01",
                         "hardware": {"cpu": "X", "cpu_count": 2}, "versions": {"torch": "2"}}
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "data.json").write_text(json.dumps(rec))
    block = render_data_block(tmp_path)
    assert "| train | 3 | 10 | 50.0% | 30.0% | 20.0% |" in block
    assert "commit `abc`" in block


def test_missing_block_is_an_error():
    with pytest.raises(ValueError, match="fpnlib:data"):
        render_readme("no blocks here", RESULTS_DIR)


def test_notebook_times_are_recorded_and_rendered(tmp_path):
    from fpnlib.reproduce import record_notebook_time
    from fpnlib.report import render_notebooks_block

    assert "No recorded notebook times" in render_notebooks_block(tmp_path)
    record_notebook_time("cpu", "01_bottom_up.ipynb", 90.0, tmp_path)
    record_notebook_time("cpu", "00_data.ipynb", 12.0, tmp_path)
    record_notebook_time("cpu", "01_bottom_up.ipynb", 30.0, tmp_path)  # a rerun replaces its entry
    block = render_notebooks_block(tmp_path)
    assert "| `00_data.ipynb` | 0.2 min |" in block and "| `01_bottom_up.ipynb` | 0.5 min |" in block
    assert block.count("ipynb") == 2


def test_claims_block_lists_tables_not_run(tmp_path):
    from fpnlib.report import render_claims_block

    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "table1.json").write_text((RESULTS_DIR / "cpu" / "table1.json").read_text())
    block = render_claims_block(tmp_path)
    assert "## Table 1" in block and "FPN beats the single-scale C4 RPN" in block
    assert "## Table 3\n- not run under `cpu` yet" in block and block.strip().startswith("Direction only")


def test_bench_block_gives_the_hosts_part_of_each_stage_on_cuda(tmp_path):
    from fpnlib.report import render_bench_block

    rec = json.loads((RESULTS_DIR / "bench" / "cuda-nvidia-h100-80gb-hbm3.json").read_text())
    stages = rec["configs"]["r50_fpn_gpu"]["infer"]["fpnlib_stages"]
    assert "host_seconds" not in stages  # recorded before host times were
    stages["host_seconds"] = {"backbone": stages["seconds"]["backbone"] / 4}
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "cuda-x.json").write_text(json.dumps(rec))
    line = next(s for s in render_bench_block(tmp_path).splitlines() if s.startswith("- r50_fpn_gpu, infer"))
    assert "backbone 34% (host 25% of it)" in line and line.count("host") == 1


def test_bench_block_gives_the_gpus_busy_share_where_recorded(tmp_path):
    from fpnlib.bench import EAGER_ARM
    from fpnlib.report import render_bench_block

    rec = json.loads((RESULTS_DIR / "bench" / "cuda-nvidia-h100-80gb-hbm3.json").read_text())
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "cuda-x.json").write_text(json.dumps(rec))
    assert "busy share" not in render_bench_block(tmp_path)  # recorded before it was measured
    r50 = rec["configs"]["r50_fpn_gpu"]
    r50["train"]["device_busy"] = {"fpnlib": {"busy_share": 0.614, "reps": 3}, "torchvision": {"busy_share": 0.9, "reps": 3}}
    r50["infer"]["device_busy"] = {"error": "RuntimeError: no CUPTI"}
    (tmp_path / "bench" / "cuda-x.json").write_text(json.dumps(rec))
    lines = render_bench_block(tmp_path).splitlines()
    assert "- r50_fpn_gpu, train: fpnlib 61%, torchvision 90%" in lines
    assert "- r50_fpn_gpu, infer: fpnlib not measured, torchvision not measured (RuntimeError: no CUPTI)" in lines
    assert "device work alone" not in "\n".join(lines)
    # with graphs: the same model without them profiled too, and the busy time of a step
    r50["infer"]["device_busy"] = {lib: {"busy_share": share, "busy_s_per_step": s, "reps": 3} for lib, share, s in
                                   (("fpnlib", 0.9, 0.0131), (EAGER_ARM, 0.64, 0.0135), ("torchvision", 0.7, 0.05))}
    r50["infer"].update(fpnlib_device_s_per_step=0.0135, fpnlib_device_over_backbone_fpn=1.5)
    (tmp_path / "bench" / "cuda-x.json").write_text(json.dumps(rec))
    lines = render_bench_block(tmp_path).splitlines()
    assert ("- r50_fpn_gpu, infer: fpnlib 90% (13.1 ms a step), fpnlib without CUDA graphs 64% (13.5 ms a step), "
            "torchvision 70% (50.0 ms a step)") in lines
    assert ("- r50_fpn_gpu: fpnlib's device work alone is 1.50x backbone + FPN alone, the detector / body ratio if "
            "its host cost nothing") in lines


def test_bench_block_gives_the_graphs_beside_the_same_model_without_where_recorded(tmp_path):
    from fpnlib.bench import EAGER_ARM
    from fpnlib.report import render_bench_block

    rec = json.loads((RESULTS_DIR / "bench" / "cuda-nvidia-h200.json").read_text())
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "cuda-x.json").write_text(json.dumps(rec))
    assert "CUDA graphs (" not in render_bench_block(tmp_path)  # recorded without graphs
    infer = rec["configs"]["r50_fpn_gpu"]["infer"]
    infer["median_s"] = {"fpnlib": 0.0125, "torchvision": 0.078, EAGER_ARM: 0.02}
    infer.update(fpnlib_backbone_fpn_alone_s=0.009, fpnlib_backbone_fpn_alone_graphed_s=0.0085,
                 fpnlib_detector_over_backbone_fpn=1.471, cuda_graphs_speedup=1.6,
                 fpnlib_without_graphs_detector_over_backbone_fpn=2.222,
                 cuda_graph_passes={"eager": 2, "captured": 1, "replayed": 15})
    (tmp_path / "bench" / "cuda-x.json").write_text(json.dumps(rec))
    assert ("- r50_fpn_gpu: 12.5 ms a batch replayed, 20.0 ms without graphs (1.60x); backbone + FPN alone 9.0 ms "
            "eager, 8.5 ms replayed; detector / body 1.47 (against the faster body), without graphs 2.22; "
            "passes: eager 2, captured 1, replayed 15") in render_bench_block(tmp_path).splitlines()
    infer["fpnlib_backbone_fpn_alone_graphed_s"] = "RuntimeError: capture failed"
    (tmp_path / "bench" / "cuda-x.json").write_text(json.dumps(rec))
    assert "backbone + FPN alone 9.0 ms eager (replayed: RuntimeError: capture failed); " in render_bench_block(tmp_path)


def test_reproduce_block_says_how_many_rows_trained_at_once_only_where_recorded(tmp_path):
    from fpnlib.report import render_reproduce_block

    (tmp_path / "cpu").mkdir()
    prov = {"preset": "cpu", "seed": 0, "commit": "abc", "date": "2026-01-01",
            "hardware": {"cpu": "X", "cpu_count": 2}, "versions": {"torch": "2"}}
    for recorded, said in ((None, None), (2, "table rows trained 2 at a time.")):
        rec = {"seconds": {"table1": 60.0}, "provenance": dict(prov, **({"row_jobs": recorded} if recorded else {}))}
        (tmp_path / "cpu" / "reproduce_times.json").write_text(json.dumps(rec))
        block = render_reproduce_block(tmp_path)
        assert "| table1 | 1.0 min |" in block
        assert (said in block) if said else ("at a time" not in block)


def _table6_record(seed: int, ar: dict[str, float]) -> dict:
    prov = {"preset": "cpu", "seed": seed, "commit": f"c{seed}", "date": "2026-01-01",
            "hardware": {"cpu": "X", "cpu_count": 2}, "versions": {"torch": "2"}}
    rows = {v: {"metrics": {"AR": a, "AR_s": a + 5}, "torch_threads": 1} for v, a in ar.items()}
    return {"table": 6, "rows": rows, "provenance": prov}


def test_seeds_block_sets_each_row_and_claim_beside_the_other_seed(tmp_path):
    from fpnlib.report import render_seeds_block

    assert "No table trained with another seed" in render_seeds_block(tmp_path)
    (tmp_path / "cpu" / "seed1").mkdir(parents=True)
    ar0 = {"single_5x5": 6.0, "dual": 10.0, "dual_2x_mask": 4.0, "dual_2x_train": 12.5}
    ar1 = dict(ar0, dual=6.5)  # seed 1: the dual row lands lower
    (tmp_path / "cpu" / "table6.json").write_text(json.dumps(_table6_record(0, ar0)))
    (tmp_path / "cpu" / "seed1" / "table6.json").write_text(json.dumps(_table6_record(1, ar1)))
    block = render_seeds_block(tmp_path)
    assert "| row | AR seed 0 | AR seed 1 | AR_s seed 0 | AR_s seed 1 |" in block
    assert "| dual | 10.0 | 6.5 | 15.0 | 11.5 |" in block
    # one claim, two verdicts: the dual MLP's margin over 5x5 shrinks below the inconclusive 1 point
    line = next(x for x in block.splitlines() if x.startswith("| the dual MLP beats a single 5x5 MLP"))
    assert line.endswith("| +4.0 (reproduced) | +0.5 (inconclusive) |")
    line = next(x for x in block.splitlines() if x.startswith("| 2x training helps"))
    assert line.endswith("| +2.5 (reproduced) | +6.0 (reproduced) |")
    assert "`results/cpu/seed1/table6.json` (preset `cpu`, seed 1, commit `c1`" in block
    assert "1 thread(s) per row" in block
