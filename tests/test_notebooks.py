"""Every lesson notebook runs under the smoke preset (papermill) and writes what it promises.

Assertions are on the files a notebook wrote (figures, results), never on cell text.
"""
from __future__ import annotations

import json
import struct

import pytest

from fpnlib.reproduce import execute_notebook, lesson_notebooks

# What each notebook must write into figures_dir.
EXPECTED_FIGURES = {
    "00_data.ipynb": ["00_samples.png", "00_sizes.png", "00_categories.png"],
    "02_top_down_lateral.ipynb": ["02_pyramid_levels.png", "02_merge_block.png", "02_ablation_dependencies.png"],
    "03_anchors.ipynb": ["03_cell_anchors.png", "03_anchor_grids.png", "03_positives_per_level.png", "03_uncovered_gts.png"],
    "04_rpn_table1.ipynb": ["04_fpn_losses.png", "04_proposals_by_level.png", "04_table1.png", "04_table1_losses.png"],
}
# Training notebooks write results and checkpoints into the test's folder and train briefly:
# the learning itself is tested by test_learning.py, here only that the lesson runs end to end.
TRAINING = {"04_rpn_table1.ipynb": {"iterations": 10}}
NOTEBOOKS = lesson_notebooks()


def png_size(path):
    """(width, height) from a PNG header; fails on anything that is not a PNG."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def test_every_notebook_has_expectations():
    assert NOTEBOOKS, "no lesson notebooks found"
    assert {nb.name for nb in NOTEBOOKS} == set(EXPECTED_FIGURES)


@pytest.mark.notebook
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_under_smoke(notebook, tmp_path, smoke_root):
    figures = tmp_path / "figures"
    params = {"preset": "smoke", "data_root": str(smoke_root), "figures_dir": str(figures)}
    if notebook.name in TRAINING:
        params.update(TRAINING[notebook.name], results_dir=str(tmp_path / "results"), runs_dir=str(tmp_path / "runs"))
    execute_notebook(notebook, params, out_path=tmp_path / notebook.name, cell_timeout=300)
    for name in EXPECTED_FIGURES[notebook.name]:
        w, h = png_size(figures / name)
        assert w >= 300 and h >= 150, f"{name}: {w}x{h} is too small to be a figure"
        assert (figures / name).stat().st_size < 1_000_000, f"{name} is over 1 MB"
    if notebook.name in TRAINING:  # the table the lesson regenerates, with a row per Table 1 variant
        record = json.loads((tmp_path / "results" / "smoke" / "table1.json").read_text())
        assert len(record["rows"]) == 6
        assert all(r["iterations"] == TRAINING[notebook.name]["iterations"] for r in record["rows"].values())
        assert (tmp_path / "results" / "smoke" / "table1.md").read_text().count("ours / paper") == 5
