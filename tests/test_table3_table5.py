"""Tables 3 and 5 pipelines on the smoke set: rows, paper columns, provenance, claims, and the
CLI verb; learning is checked in test_learning_detection.py."""
from __future__ import annotations

import json
import math

import pytest

from fpnlib.experiments import run_table, table3, table5

pytestmark = pytest.mark.slow


def test_table3_and_table5_end_to_end(smoke_root, tmp_path):
    rec3 = run_table(3, "smoke", smoke_root, tmp_path / "runs", tmp_path / "out", iterations=2, progress=False)
    on_disk = json.loads((tmp_path / "out" / "table3.json").read_text())
    assert list(on_disk["rows"]) == list(table3.ROWS.values()) == list(rec3["rows"])
    for row in on_disk["rows"].values():
        assert set(row["metrics"]) >= set(table3.METRICS) and row["iterations"] == 2
        assert all(math.isfinite(row["metrics"][m]) for m in ("AP", "AP50"))
        assert row["inference_s_per_image"] > 0
    assert on_disk["provenance"]["preset"] == "smoke" and on_disk["provenance"]["commit"]
    md = (tmp_path / "out" / "table3.md").read_text()
    assert "| (c) fpn | RPN Pk | Pk | 2fc |" in md and "/ 33.9 |" in md  # the paper's AP of row (c)
    assert "(*) He et al. [16] (paper only)" in md and "— / 26.3" in md
    assert "FPN Faster R-CNN beats the C4/conv5 baseline" in md

    # Table 5 reuses Table 3(c)'s run (no retraining: its checkpoint is complete) and adds steps 3-4
    rec5 = run_table(5, "smoke", smoke_root, tmp_path / "runs", tmp_path / "out", iterations=2, progress=False)
    assert (tmp_path / "runs" / "table5" / "step3" / "last.pt").exists()
    assert (tmp_path / "runs" / "table5" / "step4" / "last.pt").exists()
    rows = rec5["rows"]
    assert rows["share"]["parameters"] < rows["no_share"]["parameters"]
    assert rows["share"]["train_time_s"] >= rows["no_share"]["train_time_s"]
    assert rows["no_share"]["metrics"]["AP"] == rec3["rows"]["fpn"]["metrics"]["AP"]
    md5 = (tmp_path / "out" / "table5.md").read_text()
    assert "/ 34.3 |" in md5 and "/ 33.9 |" in md5 and "Test time: sharing" in md5
    assert "sharing features helps a little" in md5
