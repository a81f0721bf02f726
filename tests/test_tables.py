"""What every table shares (``fpnlib.experiments.tables``): rows reused while their checkpoint is
unchanged, rows trained several at a time with the same numbers."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from fpnlib.experiments.tables import RowJob, how_obtained, reuse_evaluated, run_rows, share_cores

CALLS: list[str] = []


@reuse_evaluated
def fake_row(variant: str, preset: str, out_dir, iterations: int | None = None, progress: bool = True) -> dict:
    """Stands for a table's run_row: 'trains' (writes last.pt once) and 'evaluates' (counts calls)."""
    CALLS.append(variant)
    ckpt = Path(out_dir) / "last.pt"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    if not ckpt.exists():
        ckpt.write_bytes(variant.encode())
    return {"variant": variant, "metrics": {"AR": float(len(variant))}, "iterations": iterations or 10,
            "trained_from_iteration": 0}


def test_a_row_is_reused_until_its_checkpoint_or_arguments_change(tmp_path):
    CALLS.clear()
    first = fake_row("fpn", "smoke", tmp_path / "fpn", progress=False)
    assert CALLS == ["fpn"] and first["wall_time_s"] >= 0 and first["torch_threads"] >= 1
    assert how_obtained(first) == "trained now"
    again = fake_row("fpn", "smoke", out_dir=tmp_path / "fpn")  # where and how it reports do not matter
    assert CALLS == ["fpn"] and again["reused_from"] == "row.json" and again["metrics"] == first["metrics"]
    assert how_obtained(again).startswith("reused")
    fake_row("fpn", "smoke", tmp_path / "fpn", iterations=5)  # another budget: evaluated again
    assert CALLS == ["fpn", "fpn"]
    (tmp_path / "fpn" / "last.pt").write_bytes(b"retrained")  # another checkpoint: evaluated again
    fake_row("fpn", "smoke", tmp_path / "fpn", iterations=5)
    assert CALLS == ["fpn", "fpn", "fpn"]


def test_rows_in_parallel_give_the_rows_in_table_order(tmp_path):
    record = {"table": 9, "rows": {}}
    job = RowJob(fake_row, tmp_path / "runs", {"preset": "smoke", "progress": False})
    out = run_rows(record, ["c4", "fpn", "p2_only"], job, tmp_path, lambda r: "md", "smoke", 0, "cpu", jobs=2)
    assert list(out["rows"]) == ["c4", "fpn", "p2_only"]
    assert {r["metrics"]["AR"] for r in out["rows"].values()} == {2.0, 3.0, 7.0}
    assert all(r["torch_threads"] >= 1 for r in out["rows"].values())
    on_disk = json.loads((tmp_path / "table9.json").read_text())
    assert list(on_disk["rows"]) == ["c4", "fpn", "p2_only"] and on_disk["provenance"]["row_jobs"] == 2
    assert (tmp_path / "table9.md").read_text() == "md\n"


def test_processes_side_by_side_share_the_cores(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.setenv("OMP_NUM_THREADS", "8")  # restored after the test
    before = torch.get_num_threads()
    try:
        assert share_cores(3) == 2 and torch.get_num_threads() == 2 and os.environ["OMP_NUM_THREADS"] == "2"
        assert share_cores(16) == 1 and torch.get_num_threads() == 1  # at least one thread each
    finally:
        torch.set_num_threads(before)


def test_a_row_listed_in_row_lr_trains_at_its_rate_on_its_preset_only():
    from fpnlib.experiments import table1, table2, table6
    from fpnlib.experiments.tables import row_schedule

    for module, row in ((table1, "p2_only"), (table2, "p2_only"), (table6, "dual_2x_mask")):
        base = module.BUDGETS["cpu"].schedule
        lowered = row_schedule(base, module.ROW_LR, row, "cpu")
        assert lowered.lr == module.ROW_LR["cpu"][row] < base.lr
        assert row_schedule(base, module.ROW_LR, "fpn", "cpu") == base  # other rows keep the preset's
        assert row_schedule(module.BUDGETS["gpu"].schedule, module.ROW_LR, row, "gpu").lr == module.BUDGETS["gpu"].schedule.lr
        short = row_schedule(base, module.ROW_LR, row, "cpu", iterations=20)
        assert short.iterations == 20 and short.lr == lowered.lr
