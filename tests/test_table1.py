"""Table 1 bookkeeping: paper columns, claims, rendering (the training itself: test_learning.py)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from fpnlib.experiments.table1 import PAPER_KEYS, ROWS, claims, render_table1
from fpnlib.provenance import provenance
from fpnlib.reference import PAPER_TABLES, paper_rows

SHARED = Path(__file__).resolve().parents[2] / "shared" / "reference" / "fpn_paper_tables.json"


@pytest.mark.skipif(not SHARED.exists(), reason="../shared is not beside this checkout")
def test_project_copy_equals_shared_reference():
    assert json.loads(PAPER_TABLES.read_text()) == json.loads(SHARED.read_text())


def test_paper_rows_cover_every_variant():
    paper = paper_rows("table1_rpn")
    assert set(PAPER_KEYS) == set(ROWS.values())
    assert paper[PAPER_KEYS["fpn"]]["AR1k"] == 56.3 and paper[PAPER_KEYS["c4"]]["AR1k_s"] == 32.0


def _record(ar1k: dict[str, float]) -> dict:
    rows = {v: {"metrics": {m: ar1k[v] for m in ("AR100", "AR1k", "AR1k_s", "AR1k_m", "AR1k_l")},
                "anchors_800x1000": 200_000, "train_time_s": 60.0} for v in ar1k}
    return {"rows": rows, "deviations": {"x": "y"}, "provenance": provenance("smoke", 0, 1.0)}


def test_claims_compare_directions_and_flag_small_differences():
    got = {(*c.rows, c.metric): c for c in claims(_record({"fpn": 40.0, "c4": 30.0, "bottom_up": 45.0,
                                             "top_down_no_lateral": 39.5, "p2_only": 20.0}))}
    assert got[("fpn", "c4", "AR1k")].verdict == "reproduced"  # paper: FPN > C4
    assert got[("fpn", "bottom_up", "AR1k")].verdict == "NOT reproduced"
    assert got[("fpn", "top_down_no_lateral", "AR1k")].verdict == "inconclusive"  # 0.5 point apart
    assert got[("fpn", "c4", "AR1k")].paper == (56.3, 48.3)
    assert got[("fpn", "c4", "AR1k_s")].paper == (44.9, 32.0)


def test_claims_skip_missing_rows_and_render_shows_both_columns():
    rec = _record({"fpn": 40.0, "c4": 30.0})
    assert [c.rows for c in claims(rec)] == [("fpn", "c4"), ("fpn", "c4")]
    md = render_table1(rec)
    assert "| (c) fpn | Pk | 200k / 200k | nan | 40.0 / 44.0 | 40.0 / 56.3 |" in md
    assert "reproduced: FPN beats the single-scale C4 RPN" in md
