"""fpnlib.narration: the lessons' sentences follow the records, whatever the numbers are."""
from __future__ import annotations

import json

import pytest

from fpnlib import narration
from fpnlib.experiments.tables import Claim
from fpnlib.report import RESULTS_DIR


def _table(metric: str, values: dict) -> dict:
    return {"rows": {name: {"metrics": {metric: v}} for name, v in values.items()}}


@pytest.mark.parametrize("ap,says,not_says", [
    (0.7, "has not learned to detect yet", "has learned:"),
    (8.0, "has learned a little", "not learned"),
    (31.5, "The detector has learned: the best AP of Table 2 is 31.5", "not learned"),
])
def test_detector_state_follows_the_best_ap(ap, says, not_says):
    text = narration.detector_state({"Table 2": _table("AP", {"fpn": ap, "c4_conv5": ap / 2})})
    assert says in text and not_says not in text
    assert f"{ap:.1f} (Table 2, row fpn)" in text and "25–34" in text  # the paper's Tables 2 and 3, read


def test_detector_state_takes_the_best_of_several_tables():
    text = narration.detector_state({"Table 3": _table("AP", {"fpn": 1.0}), "Table 5": _table("AP", {"share": 1.5})})
    assert "the best AP of Table 3 and Table 5 is 1.5 (Table 5, row share)" in text


def test_detections_on_image_says_when_nothing_is_drawn():
    assert "no box with score ≥ 0.3 (its highest score is 0.12)" in narration.detections_on_image({"scores": [0.12, 0.05]})
    assert "draws 2 boxes with score ≥ 0.3 (its highest score is 0.90)" in narration.detections_on_image(
        {"scores": [0.9, 0.5, 0.1]})


@pytest.mark.parametrize("d_time,says", [(1.55, "+55% time"), (1.08, "a small price")])
def test_figure1_costs_reads_the_measured_overhead(d_time, says):
    results = {"a": {"time_s": 5.0, "memory_mb": 700}, "b": {"time_s": 1.0, "memory_mb": 140},
               "c": {"time_s": 1.0, "memory_mb": 140}, "d": {"time_s": d_time, "memory_mb": 150}}
    text = narration.figure1_costs({"results": results, "network": {"fpn_channels": 256}})
    assert says in text and "5.0× a single pass" in text
    assert ("a real cost" in text) == (d_time > 1.15)


def _claim(diff: float, paper=(2.0, 1.0), text="the top-down pathway matters", rows=("fpn", "bottom_up")) -> Claim:
    return Claim(text, "AR1k", rows, (30.0 + diff, 30.0), paper)


def test_seeds_agreement_needs_both_seeds():
    x = {"text": "x", "rows": ("fpn", "c4")}
    text = narration.seeds_agreement([_claim(1.0), _claim(3.0, **x)], [_claim(0.5), _claim(2.5, **x)])
    assert "+1.0 on seed 0, +0.5 on seed 1: not established: the seeds disagree" in text
    assert "+3.0 on seed 0, +2.5 on seed 1: holds on both seeds" in text
    # the same words as the claims report's rule: against on both seeds, under a point on both
    assert "the opposite holds on both seeds" in narration.seeds_agreement([_claim(-2.0)], [_claim(-1.5)])
    assert "under a point on both seeds" in narration.seeds_agreement([_claim(0.9)], [_claim(-0.2)])
    assert "not established" in narration.seeds_agreement([_claim(-2.0)], [_claim(0.2)])
    assert "No second seed" in narration.seeds_agreement([_claim(1.0)], [])


def test_large_objects_says_whether_fpn_is_behind():
    behind = _table("AR1k_l", {"c4": 55.1, "fpn": 45.1, "p2_only": 60.3, "bottom_up": 45.5})
    text = narration.large_objects(behind, {"fpn": {"AR1k_l": 66.2}, "p2_only": {"AR1k_l": 67.6},
                                            "c4": {"AR1k_l": 62.2}, "bottom_up": {"AR1k_l": 68.0}})
    assert "FPN is behind: its AR1k_l is 45.1, below p2_only (60.3), c4 (55.1)." in text
    assert "bottom_up (45.5)" not in text  # within a point: not behind
    assert "no positive anchor" in text and "p2_only 67.6 vs 66.2" in text
    assert "not behind" in narration.large_objects(_table("AR1k_l", {"c4": 40.0, "fpn": 45.0}))


def test_segment_sizes_calls_large_objects_missed_only_when_they_are():
    rows = lambda l, s: {"rows": {"dual": {"metrics": {"AR_l": l, "AR_s": s}}}}  # noqa: E731
    assert "Large objects are missed" in narration.segment_sizes(rows(0.3, 15.5))
    assert "as in the paper" in narration.segment_sizes(rows(60.0, 30.0))
    assert "unlike the paper" in narration.segment_sizes(rows(20.0, 30.0))


def test_the_committed_records_read_as_they_are():
    """On results/cpu as committed: each sentence's number is the record's."""
    cpu = RESULTS_DIR / "cpu"
    t2, t3, t5 = (json.loads((cpu / f"table{n}.json").read_text()) for n in (2, 3, 5))
    best = max(r["metrics"]["AP"] for t in (t2, t3, t5) for r in t["rows"].values())
    text = narration.results_reading(cpu)
    assert f"is {best:.1f} (" in text
    assert ("has not learned" in text) == (best < narration.NOT_LEARNED_AP)
    claims = json.loads((cpu / "claims.json").read_text())["claims"]
    for n, cs in claims.items():
        held = sum(c["verdict"] == "reproduced" for c in cs)
        assert f"Table {n} (" in text and f"{held} of {len(cs)} reproduced" in text


def test_pretraining_sentence_reads_the_record():
    record = {"held_out": {"accuracy": 81.0, "crops": 436, "chance": 11.1,
                           "by_class": {"background": 77.1, "disk": 82.4, "crescent": 70.9, "star": 88.9},
                           "by_size": {"small": 86.4, "medium": 74.8, "large": None}},
              "budget": {"crop_size": 78, "schedule": {"iterations": 600, "batch_size": 128}}, "train_time_s": 312.2}
    text = narration.pretraining(record, "cpu")
    assert "**81.0%** of 436 held-out crops" in text and "guessing gets 11.1%" in text
    assert "from 71% (crescent) to 89% (star)" in text and "small 86%, medium 75% by object size" in text
    assert "600 iterations of 128 crops of 78 px (5.2 min)" in text
    assert "python -m fpnlib pretrain --preset cpu" in narration.pretraining(None, "cpu")
