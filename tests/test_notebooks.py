"""Every lesson notebook runs under the smoke preset (papermill) as a student runs it and writes
what it promises, into the scratch folder only: the repository is left as it was.

Assertions are on the files a notebook wrote (figures, results) and on git's view of the
repository; of cell text only the exercise checks' verdicts are read.
"""
from __future__ import annotations

import json
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from fpnlib.lesson import SCRATCH_ENV
from fpnlib.provenance import REPO_ROOT
from fpnlib.reproduce import execute_notebook, lesson_notebooks
from fpnlib.student import student_edition

# What each notebook must write into figures_dir.
EXPECTED_FIGURES = {
    "00_data.ipynb": ["00_samples.png", "00_sizes.png", "00_categories.png"],
    "01_bottom_up.ipynb": ["01_bottom_up_stages.png", "01_figure1_costs.png"],
    "02_top_down_lateral.ipynb": ["02_pyramid_levels.png", "02_merge_block.png", "02_ablation_dependencies.png"],
    "03_anchors.ipynb": ["03_cell_anchors.png", "03_anchor_grids.png", "03_positives_per_level.png", "03_uncovered_gts.png"],
    "04_rpn_table1.ipynb": ["04_fpn_losses.png", "04_proposals_by_level.png", "04_table1.png", "04_table1_losses.png"],
    "05_fast_rcnn_table2.ipynb": ["05_eq1.png", "05_roi_levels.png", "05_roi_features.png", "05_table2.png",
                                  "05_detections.png"],
    "06_faster_rcnn_tables3_5.ipynb": ["06_losses.png", "06_table3.png", "06_table5.png", "06_detections.png"],
    "07_segment_proposals_table6.ipynb": ["07_slots.png", "07_positives.png", "07_masks.png", "07_table6.png"],
    "08_results.ipynb": ["08_claims.png"],
}
# Notebooks that write results (and checkpoints): checkpoints go inside the test's tmp_path; the
# training ones train briefly: learning itself is tested by test_learning.py, here only that
# the lesson runs end to end.
WRITERS = {"01_bottom_up.ipynb": {"repeats": 2}, "04_rpn_table1.ipynb": {"iterations": 10, "runs_dir": "runs"},
           "05_fast_rcnn_table2.ipynb": {"iterations": 5, "runs_dir": "runs"},
           "06_faster_rcnn_tables3_5.ipynb": {"iterations": 5, "runs_dir": "runs"},
           "07_segment_proposals_table6.ipynb": {"iterations": 5, "runs_dir": "runs"},
           "08_results.ipynb": {}}
RESULTS = Path(__file__).resolve().parents[1] / "results"
NOTEBOOKS = lesson_notebooks()


def png_size(path):
    """(width, height) from a PNG header; fails on anything that is not a PNG."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def test_every_notebook_has_expectations():
    assert NOTEBOOKS, "no lesson notebooks found"
    assert {nb.name for nb in NOTEBOOKS} == set(EXPECTED_FIGURES)


def git_status() -> str | None:
    """``git status --porcelain`` of the repository (None outside a git checkout)."""
    done = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=REPO_ROOT,
                          capture_output=True, text=True)
    return done.stdout if done.returncode == 0 else None


def check_verdicts(nb: dict) -> list[str]:
    """What each exercise's check cell printed, one string per check cell."""
    return ["".join("".join(o["text"]) for o in c["outputs"] if "text" in o) for c in nb["cells"]
            if c["cell_type"] == "code" and "from fpnlib.exercises import check_" in "".join(c["source"])]


@pytest.mark.notebook
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_student_runs_notebook_under_smoke(notebook, tmp_path, smoke_root, monkeypatch):
    """The student edition (``make student``: solutions stubbed, outputs cleared) run end to end as
    a student runs it, without ``record=True``: it writes into the scratch folder, changes no file
    git sees, and each exercise's check reports the stub as not written yet instead of stopping
    the run. (The reference solutions pass their checks in tests/test_exercises.py.)"""
    scratch = tmp_path / "scratch"
    monkeypatch.setenv(SCRATCH_ENV, str(scratch))  # the kernel inherits it
    lesson = student_edition(notebook, tmp_path / "student" / notebook.name)
    params = {"preset": "smoke", "data_root": str(smoke_root)}
    if notebook.name in WRITERS:
        extra = dict(WRITERS[notebook.name])
        if "runs_dir" in extra:
            extra["runs_dir"] = str(tmp_path / extra["runs_dir"])
        params.update(extra)
    if notebook.name == "08_results.ipynb":  # it reads recorded results: a copy of the cpu run's, as "smoke"
        shutil.copytree(RESULTS / "cpu", tmp_path / "results" / "smoke")
        params["results_dir"] = str(tmp_path / "results")
    before = git_status()
    executed = execute_notebook(lesson, params, out_path=tmp_path / notebook.name, cell_timeout=300)
    assert git_status() == before, f"running {notebook.name} changed the repository:\n{git_status()}"
    verdicts = check_verdicts(json.loads(executed.read_text()))
    assert len(verdicts) == len(check_verdicts(json.loads(lesson.read_text())))  # every check cell ran
    assert all("is not written yet" in v for v in verdicts), verdicts
    figures, results = scratch / "figures", scratch / "results" / "smoke"
    for name in EXPECTED_FIGURES[notebook.name]:
        w, h = png_size(figures / name)
        assert w >= 300 and h >= 150, f"{name}: {w}x{h} is too small to be a figure"
        assert (figures / name).stat().st_size < 1_000_000, f"{name} is over 1 MB"
    if notebook.name == "01_bottom_up.ipynb":  # Fig. 1 measured: four architectures, positive costs
        record = json.loads((results / "figure1.json").read_text())
        assert set(record["results"]) == {"a", "b", "c", "d"}
        assert all(r["time_s"] > 0 and r["memory_mb"] > 0 for r in record["results"].values())
        assert record["provenance"]["preset"] == "smoke"
    if notebook.name == "04_rpn_table1.ipynb":  # the table the lesson regenerates, a row per variant
        record = json.loads((results / "table1.json").read_text())
        assert len(record["rows"]) == 6
        assert all(r["iterations"] == WRITERS[notebook.name]["iterations"] for r in record["rows"].values())
        md = (results / "table1.md").read_text()
        assert "| AR1k ours / paper |" in md and md.count("\n| (") == 6  # a line per row
    if notebook.name == "05_fast_rcnn_table2.ipynb":  # Table 2: six rows on the saved proposals
        record = json.loads((results / "table2.json").read_text())
        assert len(record["rows"]) == 6 and (tmp_path / "runs" / "smoke" / "table2" / "proposals_val.pt").exists()
    if notebook.name == "06_faster_rcnn_tables3_5.ipynb":  # Tables 3 and 5 from the same runs
        t3 = json.loads((results / "table3.json").read_text())
        t5 = json.loads((results / "table5.json").read_text())
        assert list(t3["rows"]) == ["c4_conv5", "c5_2fc", "fpn"] and set(t5["rows"]) == {"no_share", "share"}
        assert t5["rows"]["no_share"]["metrics"]["AP"] == t3["rows"]["fpn"]["metrics"]["AP"]
    if notebook.name == "07_segment_proposals_table6.ipynb":  # Table 6: the five FPN rows
        record = json.loads((results / "table6.json").read_text())
        assert len(record["rows"]) == 5
    if notebook.name == "08_results.ipynb":  # the claims report and Table 4 from the recorded tables
        claims = json.loads((results / "claims.json").read_text())
        assert claims["claims"]["1"] and all(c["verdict"] for c in claims["claims"]["1"])
        assert claims["sources"]["table1.json"]["commit"] and claims["provenance"]["preset"] == "smoke"
        assert "NOT comparable" in (results / "table4.md").read_text() or \
            "no detector run" in (results / "table4.md").read_text()


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_is_small_and_has_no_widget_state(notebook):
    nb = json.loads(notebook.read_text())
    assert notebook.stat().st_size < 2_000_000, f"{notebook.name} is over 2 MB"
    assert "widgets" not in nb["metadata"], f"{notebook.name} carries a widget state dump"
    views = [o for c in nb["cells"] for o in c.get("outputs", []) if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert not views, f"{notebook.name} has {len(views)} widget outputs that render nowhere without a kernel"


def test_strip_widget_state_removes_dumps_and_stale_bars(tmp_path):
    from fpnlib.provenance import REPO_ROOT
    from fpnlib.reproduce import WIDGET_VIEW, strip_widget_state

    path = tmp_path / "nb.ipynb"
    bar = {"output_type": "display_data", "metadata": {}, "data": {WIDGET_VIEW: {"model_id": "x"}, "text/plain": "bar 0%"}}
    text = {"output_type": "stream", "name": "stdout", "text": "done\n"}
    ran = str(REPO_ROOT / "notebooks" / "nb.ipynb")
    path.write_text(json.dumps({"metadata": {"widgets": {"state": {"x": 1}},
                                             "papermill": {"input_path": ran, "output_path": ran}},
                                "nbformat": 4, "nbformat_minor": 5,
                                "cells": [{"cell_type": "code", "source": "", "metadata": {}, "execution_count": 1,
                                           "outputs": [bar, text]}]}))
    strip_widget_state(path)
    nb = json.loads(path.read_text())
    assert "widgets" not in nb["metadata"]
    assert nb["cells"][0]["outputs"] == [text]  # the bar's text is its state when made (0 %): it goes too
    assert nb["metadata"]["papermill"]["input_path"] == "notebooks/nb.ipynb" == nb["metadata"]["papermill"]["output_path"]
