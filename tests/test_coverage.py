"""The anchor-coverage record behind Table 1's large-object gap (``fpnlib.experiments.coverage``)."""
from __future__ import annotations

import json

from fpnlib.experiments.coverage import anchor_coverage


def test_anchor_coverage_counts_every_val_object_per_size(smoke_root, tmp_path):
    out = tmp_path / "anchor_coverage.json"
    record = anchor_coverage("smoke", smoke_root, out, variants=("fpn", "c4", "p2_only"))
    assert json.loads(out.read_text())["variants"] == record["variants"]
    totals = {v: sum(b["objects"] for b in d["by_size"].values()) for v, d in record["variants"].items()}
    assert len(set(totals.values())) == 1 and totals["fpn"] > 0  # the same objects for every row
    for d in record["variants"].values():
        for b in d["by_size"].values():
            assert 0 <= b["no_positive_anchor"] <= b["objects"] and 0 <= b["best_iou_under_0.5"] <= b["objects"]
    # P2 alone holds all five sizes on its stride-4 grid: every large object finds a close anchor
    large = {v: d["by_size"]["large"] for v, d in record["variants"].items()}
    assert large["p2_only"]["median_best_iou"] >= large["fpn"]["median_best_iou"]
    assert record["variants"]["fpn"]["anchor_sizes"]["p6"] == [512 * 0.25]


def test_segment_coverage_reads_a_trained_row(smoke_root, tmp_path):
    from fpnlib.experiments import table6
    from fpnlib.experiments.coverage import segment_coverage

    table6.run_row("dual", "smoke", smoke_root, tmp_path / "dual", iterations=2, progress=False)
    record = segment_coverage("smoke", smoke_root, tmp_path / "dual", out_path=tmp_path / "segments.json")
    assert json.loads((tmp_path / "segments.json").read_text())["by_size"] == record["by_size"]
    for b in record["by_size"].values():
        assert 0 <= b["covered_at_iou_0.5"] <= b["objects"] and sum(b["slots"].values()) == b["objects"]
    # every image's 1000 proposals (fewer where an image has fewer locations) are spread over the 9 slots
    assert len(record["proposals_per_image_by_slot"]) <= 9 and all(v > 0 for v in record["proposals_per_image_by_slot"].values())
