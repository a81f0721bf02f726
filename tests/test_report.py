"""README's numbers come from results/: the generated blocks must match the recorded runs."""
from __future__ import annotations

import json

import pytest

from fpnlib.report import README, RESULTS_DIR, render_data_block, render_readme


def test_readme_blocks_match_results():
    text = README.read_text()
    assert render_readme(text) == text, "README is out of sync with results/: run `python -m fpnlib report`"


def test_data_block_reads_the_file(tmp_path):
    rec = {split: {"num_images": 3, "num_objects": 10, "share_small": 0.5, "share_medium": 0.3,
                   "share_large": 0.2, "sqrt_area_min": 8.0, "sqrt_area_max": 200.0, "octaves": 4.6,
                   "num_empty_images": 1, "num_grayscale_images": 0, "num_crowd_regions": 2}
           for split in ("train", "val")}
    rec["provenance"] = {"preset": "cpu", "seed": 0, "commit": "abc", "date": "2026-01-01",
                         "hardware": {"cpu": "X", "cpu_count": 2}, "versions": {"torch": "2"}}
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "data.json").write_text(json.dumps(rec))
    block = render_data_block(tmp_path)
    assert "| train | 3 | 10 | 50.0% | 30.0% | 20.0% |" in block
    assert "commit `abc`" in block


def test_missing_block_is_an_error():
    with pytest.raises(ValueError, match="fpnlib:data"):
        render_readme("no blocks here", RESULTS_DIR)
