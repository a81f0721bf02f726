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
    for verb in ("data", "stats", "reproduce", "train", "eval"):
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


def test_train_then_eval_one_row(smoke_root, tmp_path):
    """``train`` makes the row's checkpoint in <runs>/table1/<row>; ``eval`` loads it (no retraining)."""
    common = ("--table", "1", "--preset", "smoke", "--runs", str(tmp_path), "--data", str(smoke_root))
    out = run_cli("eval", "--row", "c", *common)  # nothing trained yet
    assert out.returncode == 2 and "train --table 1 --row fpn" in out.stderr, out.stderr
    out = run_cli("train", "--row", "c", "--iterations", "2", *common)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout[:out.stdout.rindex("}") + 1])["iterations"] == 2
    assert (tmp_path / "table1" / "fpn" / "last.pt").exists()
    out = run_cli("eval", "--row", "fpn", *common)  # the checkpoint's 2 iterations are found by eval
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["trained_from_iteration"] == 2 and set(result["metrics"]) >= {"AR100", "AR1k", "AR1k_s"}


@pytest.mark.parametrize("args, expected", [
    (("train", "--table", "1", "--row", "zz"), "Table 1 has no row 'zz'"),
    (("eval", "--table", "2", "--row", "c"), "python -m fpnlib table 2 --preset smoke"),
])
def test_unknown_or_dependent_row_gives_one_clear_error(args, expected):
    out = run_cli(*args, "--preset", "smoke")
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], out.stderr


def test_preset_verb_shows_every_table_budget():
    from fpnlib.config import PRESETS, describe_preset
    from fpnlib.experiments import table1, table3

    for name in PRESETS:
        d = describe_preset(name)
        assert {"data", "table1", "table2", "table3", "table5", "table6"} <= set(d)
    cpu = describe_preset("cpu")
    assert cpu["table1"]["model"] == table1.BUDGETS["cpu"].model
    assert cpu["table3"]["schedule"]["iterations"] == table3.BUDGETS["cpu"].schedule.iterations
    assert cpu["table1"]["row_lr"] == table1.ROW_LR["cpu"]
    assert describe_preset("paper")["data"] == {"coco_root": "data/coco"}


def test_table_verb_passes_seed_and_jobs(tmp_path, monkeypatch, capsys):
    """``table N --seed S --jobs J`` trains the rows J at a time with seed S (the README's
    second-seed command); the table's Markdown is printed."""
    import fpnlib.data.prepare
    import fpnlib.experiments
    import fpnlib.experiments.claims

    calls = []

    def fake_run_table(number, preset, root, runs, out, **kw):
        calls.append((number, preset, str(runs), kw))
        (tmp_path / "out").mkdir(exist_ok=True)
        (tmp_path / "out" / f"table{number}.md").write_text("| rows |")

    monkeypatch.setattr(fpnlib.experiments, "run_table", fake_run_table)
    monkeypatch.setattr(fpnlib.data.prepare, "ensure_dataset", lambda preset: tmp_path / "data")
    monkeypatch.setattr(fpnlib.experiments.claims, "write_claims_report", lambda out, preset: None)
    main(["table", "6", "--preset", "cpu", "--seed", "1", "--jobs", "2", "--out", str(tmp_path / "out"),
          "--runs", str(tmp_path / "runs")])
    assert calls == [(6, "cpu", str(tmp_path / "runs"), {"seed": 1, "device": "cpu", "jobs": 2})]
    assert "| rows |" in capsys.readouterr().out
