"""fpnlib.lesson: where a lesson writes (scratch unless recording), and what it says before training."""
from __future__ import annotations

import json

from fpnlib.lesson import SCRATCH_ENV, lesson_outputs, scratch_dir, training_notice
from fpnlib.provenance import REPO_ROOT


def test_a_run_that_does_not_record_writes_to_scratch(tmp_path, monkeypatch):
    monkeypatch.delenv(SCRATCH_ENV, raising=False)
    assert scratch_dir() == REPO_ROOT / "scratch"  # ignored by git (.gitignore), like runs/ and data/
    monkeypatch.setenv(SCRATCH_ENV, str(tmp_path / "s"))
    recorded = tmp_path / "results" / "cpu"
    recorded.mkdir(parents=True)
    (recorded / "table1.json").write_text("{}")
    out = lesson_outputs("cpu", False, tmp_path / "figures", tmp_path / "results")
    assert (out.figures, out.results, out.recorded) == (tmp_path / "s" / "figures", tmp_path / "s" / "results" / "cpu",
                                                        recorded)
    assert out.figures.is_dir() and not (out.results / "table1.json").exists()
    assert "scratch folder" in str(out) and "record=True" in str(out)
    copied = lesson_outputs("cpu", False, tmp_path / "figures", tmp_path / "results", with_recorded=True)
    assert (copied.results / "table1.json").read_text() == "{}"  # 08 derives its reports from a copy
    assert not (tmp_path / "figures").exists()  # nothing where a recording run writes


def test_a_recording_run_writes_to_the_given_folders(tmp_path):
    out = lesson_outputs("cpu", True, tmp_path / "figures", tmp_path / "results")
    assert (out.figures, out.results, out.recorded) == (tmp_path / "figures", tmp_path / "results" / "cpu",
                                                        tmp_path / "results" / "cpu")
    assert out.figures.is_dir() and str(out).startswith("recording")


def _record(tmp_path, rows: dict) -> None:
    path = tmp_path / "results" / "cpu" / "table1.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"rows": {r: {"iterations": 300, "train_time_s": t} for r, t in rows.items()},
                                "provenance": {"hardware": {"cpu": "Some CPU", "cpu_count": 2}}}))


def test_training_notice_names_the_rows_to_train_and_their_minutes(tmp_path):
    _record(tmp_path, {"c4": 600, "c5": 300, "fpn": 900})
    runs = tmp_path / "runs" / "cpu" / "table1"
    (runs / "c4").mkdir(parents=True)
    (runs / "c4" / "last.pt").write_bytes(b"")
    text = training_notice(1, "cpu", runs, tmp_path / "results", rows=["c4", "c5", "fpn"])
    assert text.startswith("**Table 1 is about to train 2 rows** (c5, fpn)")
    assert "about 20 min" in text and "Some CPU (2 cores)" in text  # (300 + 900) s of the recorded rows
    assert "make reproduce" in text and "python -m fpnlib table 1 --preset cpu" in text
    assert "under a minute" in training_notice(1, "cpu", runs, tmp_path / "results", iterations=10, rows=["fpn"])
    # a row the record lacks counts at the recorded rows' mean; a preset never recorded has no estimate
    assert "about 10 min" in training_notice(1, "cpu", runs, tmp_path / "results", rows=["p2_only"])
    assert "time unknown" in training_notice(1, "gpu", tmp_path / "runs" / "gpu", tmp_path / "results")
    for row in ("c5", "fpn"):
        (runs / row).mkdir()
        (runs / row / "last.pt").write_bytes(b"")
    assert "nothing is trained" in training_notice(1, "cpu", runs, tmp_path / "results", rows=["c4", "c5", "fpn"])


def test_table5_notice_looks_for_its_shared_step_only(tmp_path):
    runs = tmp_path / "table5"
    text = training_notice(5, "cpu", runs, tmp_path)
    assert "1 row** (share)" in text  # the unshared row is Table 3(c), trained (or loaded) there
    (runs / "step4").mkdir(parents=True)
    (runs / "step4" / "last.pt").write_bytes(b"")
    assert "nothing is trained" in training_notice(5, "cpu", runs, tmp_path)
