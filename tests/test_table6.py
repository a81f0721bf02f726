"""Table 6 bookkeeping: rows, budgets, paper columns, claims, and the pipeline end to end."""
from __future__ import annotations

import json
import math

import pytest

from fpnlib.experiments import table6
from fpnlib.provenance import provenance
from fpnlib.reference import paper_rows


def test_rows_budgets_and_paper_keys():
    paper = paper_rows(table6.TABLE)
    assert set(table6.PAPER_KEYS) == set(table6.ROWS.values()) == set(table6.ROW_MODELS)
    assert paper[table6.PAPER_KEYS["dual"]]["AR"] == 45.7 and paper["deepmask"]["image_pyramid"] is True
    assert set(table6.PAPER_ONLY.values()) | set(table6.PAPER_KEYS.values()) == set(paper)
    assert set(table6.BUDGETS) == {"smoke", "cpu", "gpu", "paper"}
    p = table6.BUDGETS["paper"]
    assert (p.schedule.lr, p.schedule.iterations, p.schedule.steps, p.schedule.batch_size) == (0.03, 80000, (60000,), 16)
    assert p.model["fpn_channels"] == 128 and p.model["scale"] == 1.0


def test_2x_train_doubles_the_schedule_and_nothing_else():
    base, twice = table6.schedule_for("dual", "cpu"), table6.schedule_for("dual_2x_train", "cpu")
    assert twice.iterations == 2 * base.iterations and twice.steps == tuple(2 * s for s in base.steps)
    assert twice.lr == base.lr and twice.batch_size == base.batch_size
    assert table6.schedule_for("dual_2x_train", "smoke", iterations=3).iterations == 6
    assert table6.build_row("dual_2x_train", "smoke").cfg == table6.build_row("dual", "smoke").cfg
    assert table6.build_row("dual_2x_mask", "smoke").cfg.mask_size == 28
    assert table6.build_row("single_7x7", "smoke").cfg.mlps == ("7x7",)


def _record(ar: dict[str, float]) -> dict:
    rows = {v: {"metrics": {m: ar[v] for m in table6.METRICS}, "time_per_image_s": 0.1, "train_time_s": 60.0}
            for v in ar}
    return {"rows": rows, "deviations": {"x": "y"}, "provenance": provenance("smoke", 0, 1.0)}


def test_claims_compare_directions():
    got = {c.rows: c for c in table6.claims(_record({"single_5x5": 30.0, "dual": 35.0, "dual_2x_mask": 34.0,
                                                      "dual_2x_train": 35.5}))}
    assert got[("dual", "single_5x5")].verdict == "reproduced" and got[("dual", "single_5x5")].paper == (45.7, 43.4)
    assert got[("dual_2x_mask", "dual")].verdict == "NOT reproduced"
    assert got[("dual_2x_train", "dual")].verdict == "inconclusive"


@pytest.mark.slow
def test_pipeline_end_to_end(smoke_root, tmp_path):
    rec = table6.run_table6("smoke", smoke_root, tmp_path / "runs", tmp_path / "out", variants=("dual", "single_5x5"),
                            iterations=2, progress=False)
    on_disk = json.loads((tmp_path / "out" / "table6.json").read_text())
    assert list(on_disk["rows"]) == ["dual", "single_5x5"] == list(rec["rows"])
    assert on_disk["provenance"]["preset"] == "smoke" and "smoke" in on_disk["deviations"]
    for row in on_disk["rows"].values():
        assert row["iterations"] == 2 and set(row["metrics"]) >= set(table6.METRICS)
        assert all(math.isfinite(row["metrics"][m]) for m in ("AR", "AR_s", "AR_m")) and row["time_per_image_s"] > 0
    md = (tmp_path / "out" / "table6.md").read_text()
    assert "| DeepMask (paper only) | yes | – / 0.49 | – / 37.1 |" in md
    assert "| InstanceFCN (paper only) |" in md and "– / –" in md
    assert "| (dual MLP [5x5, 7x7]) dual | no |" in md and " / 45.7 |" in md and " / 43.4 |" in md
    assert "the dual MLP beats a single 5x5 MLP" in md
    # the time column from one side-by-side measurement of both rows (the smoke val set: 16 images)
    assert on_disk["inference_timing"]["images"] == 16 and on_disk["inference_timing"]["rounds"] == 3
    assert "Our times per image: side by side in one process" in md
    # a second call reuses the finished row (unchanged checkpoint) instead of training or evaluating again
    again = table6.run_row("dual", "smoke", smoke_root, tmp_path / "runs" / "dual", iterations=2, progress=False)
    assert again["reused_from"] == "row.json" and again["metrics"] == rec["rows"]["dual"]["metrics"]
