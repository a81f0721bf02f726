"""Table 2 pipeline: fixed proposals from the Table 1(c) RPN, Fast R-CNN rows, AP, report."""
from __future__ import annotations

import json

import pytest

from fpnlib.data.proposals import load_proposals
from fpnlib.experiments import table1, table2
from fpnlib.provenance import REPO_ROOT, shown_path

pytestmark = pytest.mark.slow


def test_pipeline_end_to_end(smoke_root, tmp_path):
    # a barely trained RPN is enough to exercise the plumbing; learning is test_learning.py's job
    table1.run_row("fpn", "smoke", smoke_root, tmp_path / "t1" / "fpn", iterations=2, progress=False)
    rec = table2.run_table2("smoke", smoke_root, tmp_path / "t1", tmp_path / "t2", tmp_path / "out",
                            variants=("fpn", "c4_conv5"), iterations=2, progress=False)
    props, meta = load_proposals(tmp_path / "t2" / "proposals_val.pt")
    assert len(props) == 16 and meta["per_image"] == 1000 and meta["preset"] == "smoke"
    assert max(len(b) for b, _ in props.values()) <= 1000
    on_disk = json.loads((tmp_path / "out" / "table2.json").read_text())
    assert list(on_disk["rows"]) == ["fpn", "c4_conv5"] == list(rec["rows"])
    assert on_disk["proposals"]["val"] == str(tmp_path / "t2" / "proposals_val.pt")  # outside the repository: as given
    for row in on_disk["rows"].values():
        assert set(row["metrics"]) >= set(table2.METRICS) and row["iterations"] == 2
    md = (tmp_path / "out" / "table2.md").read_text()
    assert "| (c) fpn | Pk | 2fc |" in md and "| (a) c4_conv5 | C4 | conv5 |" in md
    assert "FPN's 2fc head beats the conv5 head on C4" in md


def test_records_name_paths_inside_the_repository_relative_to_it():
    """A record committed from one machine names no folder of that machine (e.g. Table 2's
    proposal files under ``runs/``)."""
    assert shown_path(REPO_ROOT / "runs" / "cpu" / "table2" / "proposals_val.pt") == "runs/cpu/table2/proposals_val.pt"
    assert shown_path(REPO_ROOT / "runs" / ".." / "runs" / "x.pt") == "runs/x.pt"
    assert shown_path("/elsewhere/proposals_val.pt") == "/elsewhere/proposals_val.pt"
