"""The claims rule over seeds (``fpnlib.experiments.claims``), on hand-made records."""
from __future__ import annotations

import json

import pytest

from fpnlib.experiments.claims import across_seeds, collect_claims, render_claims, write_claims_report

METRICS = ("AR100", "AR1k", "AR1k_s", "AR1k_m", "AR1k_l")


@pytest.mark.parametrize("margins, paper, verdict", [
    ([3.0, 1.0], 8.0, "reproduced"),           # holds by >= 1 on both seeds
    ([1.0, 0.5], 6.8, "seed-dependent"),       # Table 1's top-down claim: +1.0 on seed 0, +0.5 on seed 1
    ([0.9, -0.9], 2.0, "inconclusive"),        # under one point on both seeds, whatever the sign
    ([-2.0, -1.5], 1.0, "NOT reproduced"),     # the opposite holds on both
    ([2.0, -2.0], 1.0, "seed-dependent"),      # the seeds contradict each other
    ([-3.0, -1.0], -5.0, "reproduced"),        # a claim whose paper direction is negative
    ([4.5], 2.3, "reproduced"),                # one seed: the rule applied to it alone
])
def test_across_seeds(margins, paper, verdict):
    assert across_seeds(margins, paper) == verdict


def _table1(seed: int, ar1k: dict[str, float], lr: dict[str, float] | None = None) -> dict:
    rows = {v: {"metrics": dict.fromkeys(METRICS, a), "lr": (lr or {}).get(v, 0.02)} for v, a in ar1k.items()}
    prov = {"preset": "cpu", "seed": seed, "commit": f"c{seed}", "date": "2026-01-01",
            "hardware": {"cpu": "X", "cpu_count": 2}, "versions": {}}
    return {"table": 1, "rows": rows, "provenance": prov}


def test_collect_claims_reads_every_seed_and_marks_a_confounded_comparison(tmp_path):
    seed0 = {"fpn": 40.0, "c4": 30.0, "bottom_up": 39.0, "top_down_no_lateral": 35.0, "p2_only": 41.0}
    seed1 = {"fpn": 38.0, "c4": 31.0, "bottom_up": 37.5, "top_down_no_lateral": 39.5, "p2_only": 40.0}
    (tmp_path / "seed1").mkdir()
    (tmp_path / "table1.json").write_text(json.dumps(_table1(0, seed0, {"p2_only": 0.005})))
    (tmp_path / "seed1" / "table1.json").write_text(json.dumps(_table1(1, seed1, {"p2_only": 0.005})))
    claims = collect_claims(tmp_path)
    assert claims[2] is None  # no Table 2 recorded
    got = {(c.rows, c.metric): c for c in claims[1]}
    fpn_c4 = got[(("fpn", "c4"), "AR1k")]
    assert fpn_c4.by_seed == {0: (40.0, 30.0), 1: (38.0, 31.0)} and fpn_c4.verdict == "reproduced"
    assert fpn_c4.ours == (40.0, 30.0) and fpn_c4.margins == {0: 10.0, 1: 7.0}
    assert got[(("fpn", "bottom_up"), "AR1k")].verdict == "seed-dependent"  # +1.0 then +0.5
    assert got[(("fpn", "top_down_no_lateral"), "AR1k")].verdict == "seed-dependent"  # +5.0 then -4.5
    p2 = got[(("fpn", "p2_only"), "AR1k")]
    assert p2.verdict == "NOT reproduced" and "p2_only at 0.005" in p2.confounded
    assert fpn_c4.confounded == ""

    text = render_claims(claims, "cpu")
    assert ("reproduced: FPN beats the single-scale C4 RPN — AR1k fpn vs c4: ours seed 0 40.0 vs 30.0 (+10.0), "
            "seed 1 38.0 vs 31.0 (+7.0); paper 56.3 vs 48.3 (+8.0)") in text
    assert "confounded: fpn trained at lr 0.02, p2_only at 0.005 (seed 0)" in text
    assert "- not run under `cpu` yet" in text

    write_claims_report(tmp_path, "cpu")
    record = json.loads((tmp_path / "claims.json").read_text())
    first = record["claims"]["1"][0]
    assert first["by_seed"] == {"0": [40.0, 30.0], "1": [38.0, 31.0]} and first["verdict"] == "reproduced"
    assert set(record["sources"]) == {"table1.json", "seed1/table1.json"}


def test_a_single_seed_says_so(tmp_path):
    (tmp_path / "table1.json").write_text(json.dumps(_table1(0, {"fpn": 40.0, "c4": 30.0})))
    text = render_claims(collect_claims(tmp_path), "cpu")
    assert "reproduced (one seed recorded): FPN beats the single-scale C4 RPN" in text
