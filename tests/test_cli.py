"""The command line: verbs listed, one-line errors, data generation end to end."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fpnlib.__main__ import main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "fpnlib", *args], capture_output=True, text=True)


def test_help_lists_every_verb():
    out = run_cli("--help")
    assert out.returncode == 0
    for verb in ("data", "stats", "reproduce"):
        assert verb in out.stdout


@pytest.mark.parametrize("args", [("data", "--bogus"), ("frobnicate",), ("data", "--preset", "huge")])
def test_bad_arguments_give_one_line_error(args):
    out = run_cli(*args)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0], out.stderr


def test_data_verb_generates_a_loadable_set(tmp_path, capsys):
    root = tmp_path / "smoke"
    assert main(["data", "--preset", "smoke", "--root", str(root), "--workers", "0"]) == 0
    for split in ("train", "val"):
        ann = root / "annotations" / f"instances_{split}.json"
        d = json.loads(ann.read_text())
        assert len(d["images"]) == {"train": 48, "val": 16}[split]
        assert all((root / split / im["file_name"]).exists() for im in d["images"])
    # a second call reuses the set (the stamp matches) instead of regenerating it
    mtime = (root / "annotations" / "instances_train.json").stat().st_mtime_ns
    assert main(["data", "--preset", "smoke", "--root", str(root)]) == 0
    assert (root / "annotations" / "instances_train.json").stat().st_mtime_ns == mtime
    capsys.readouterr()
    assert main(["stats", str(root / "annotations" / "instances_val.json")]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["num_images"] == 16 and stats["num_objects"] > 0
