"""What every table shares (``fpnlib.experiments.tables``): rows reused while their checkpoint is
unchanged, rows trained several at a time with the same numbers, a row that diverged trained
again at half its rate, test times that a claim compares measured side by side."""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from fpnlib.engine.train import TrainingDiverged
from fpnlib.experiments.tables import (LR_HALVINGS, RowJob, halving_lr_on_divergence, how_obtained,
                                       inference_side_by_side, lowered_lr, render_table, reuse_evaluated, run_rows,
                                       share_cores, timing_setting)

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


DIVERGES_ABOVE = {"lr": 0.006}  # the rate above which diverging_row's "training" diverges
OWN_LR = {"lr": 0.02}  # the rows' own rate (a table's budget and ROW_LR)


def fake_schedule_for(variant: str, preset: str, iterations: int | None = None, lr: float | None = None):
    from fpnlib.engine.train import Schedule

    return Schedule(iterations=iterations or 10, lr=OWN_LR["lr"] if lr is None else lr)


@reuse_evaluated
@halving_lr_on_divergence(fake_schedule_for)
def diverging_row(variant: str, preset: str, out_dir, iterations: int | None = None, lr: float | None = None) -> dict:
    """Stands for a row whose training diverges above ``DIVERGES_ABOVE``: like ``train``, it leaves a
    checkpoint and a log, then raises ``TrainingDiverged`` naming the iteration and its rate."""
    rate = fake_schedule_for(variant, preset, iterations, lr).lr
    CALLS.append(rate)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "last.pt").write_text(f"trained at {rate}")
    (out / "log.jsonl").write_text(f"log at {rate}\n")
    if rate > DIVERGES_ABOVE["lr"]:
        raise TrainingDiverged("loss became non-finite at iteration 7", iteration=7, lr=rate, losses={"loss": "nan"})
    return {"variant": variant, "metrics": {"AR": 1.0}, "lr": rate, "iterations": 10, "train_time_s": 1.0,
            "trained_from_iteration": 0}


def test_a_row_that_diverges_trains_again_at_half_its_rate_and_keeps_the_diverged_runs(tmp_path, monkeypatch):
    CALLS.clear()
    run_dir = tmp_path / "p2_only"
    row = diverging_row("p2_only", "smoke", run_dir)
    assert CALLS == [0.02, 0.01, 0.005] and row["lr"] == 0.005
    assert [(d["lr"], d["iteration"], d["losses"]) for d in row["diverged_at"]] == [(0.02, 7, {"loss": "nan"}),
                                                                                   (0.01, 7, {"loss": "nan"})]
    # nothing lost: each diverged run's checkpoint and log are kept beside the finished one
    for d in row["diverged_at"]:
        kept = run_dir / d["kept_in"]
        assert (kept / "last.pt").read_text() == f"trained at {d['lr']}"
        assert (kept / "log.jsonl").read_text() == f"log at {d['lr']}\n"
    assert (run_dir / "last.pt").read_text() == "trained at 0.005" and lowered_lr(run_dir, 0.02) == 0.005
    # the next call reuses the row; one that must evaluate again trains at the lowered rate at once
    again = diverging_row("p2_only", "smoke", run_dir)
    assert CALLS == [0.02, 0.01, 0.005] and again["reused_from"] and again["diverged_at"] == row["diverged_at"]
    (run_dir / "row.json").unlink()
    assert diverging_row("p2_only", "smoke", run_dir)["diverged_at"] == row["diverged_at"]
    assert CALLS == [0.02, 0.01, 0.005, 0.005]
    assert sorted(p.name for p in run_dir.iterdir() if p.is_dir()) == ["diverged-lr0.01", "diverged-lr0.02"]
    # other arguments (another preset): the row's own rate first, and the earlier diverged runs stay
    CALLS.clear()
    diverging_row("p2_only", "other", run_dir)
    assert CALLS == [0.02, 0.01, 0.005] and (run_dir / "diverged-lr0.02-2" / "last.pt").exists()
    # another own rate (ROW_LR or the budget changed; a row is reused by its arguments and checkpoint, so
    # its kept evaluation goes too): that rate is tried first, not the one lowered from 0.02
    monkeypatch.setitem(OWN_LR, "lr", 0.004)
    CALLS.clear()
    (run_dir / "row.json").unlink()
    assert lowered_lr(run_dir, 0.004) is None
    row = diverging_row("p2_only", "other", run_dir)
    assert CALLS == [0.004] and "diverged_at" not in row


def test_a_row_that_diverges_at_every_rate_stops_with_each_rate_named(tmp_path, monkeypatch):
    monkeypatch.setitem(DIVERGES_ABOVE, "lr", 0.001)
    CALLS.clear()
    with pytest.raises(TrainingDiverged, match=r"every rate tried: \[0.02, 0.01, 0.005\]"):
        diverging_row("p2_only", "smoke", tmp_path / "p2_only")
    assert len(CALLS) == LR_HALVINGS + 1


def test_the_table_states_a_row_trained_again_after_it_diverged(tmp_path):
    row = diverging_row("p2_only", "smoke", tmp_path / "p2_only")
    prov = {"preset": "smoke", "seed": 0, "commit": "0" * 40, "hardware": {"cpu": "cpu"}, "date": "today"}
    md = render_table({"rows": {"p2_only": row}, "provenance": prov, "deviations": {}}, {"P2": {"AR": 2.0}},
                      {"p2_only": "P2"}, {"p2_only": "f"}, ["AR"], [], "setting", "what", [])
    assert ("- diverged: (f) p2_only diverged at lr 0.02 (iteration 7) and at 0.01 (iteration 7); "
            "trained again from scratch at lr 0.005") in md


def test_training_diverged_keeps_where_it_diverged_across_processes():
    err = pickle.loads(pickle.dumps(TrainingDiverged("at iteration 3", iteration=3, lr=0.02, losses={"loss": "nan"})))
    assert (str(err), err.iteration, err.lr, err.losses) == ("at iteration 3", 3, 0.02, {"loss": "nan"})


def test_the_cli_trains_and_evaluates_a_row_at_the_rate_a_table_run_lowered_it_to(tmp_path):
    from fpnlib.__main__ import _row_schedule
    from fpnlib.experiments import table1

    assert _row_schedule(1, "fpn", "cpu", None, tmp_path).lr == table1.BUDGETS["cpu"].schedule.lr
    own = table1.BUDGETS["cpu"].schedule.lr
    (tmp_path / "lowered_lr.json").write_text(json.dumps({"key": {}, "row_lr": own, "lr": own / 4, "diverged": []}))
    assert _row_schedule(1, "fpn", "cpu", None, tmp_path).lr == own / 4
    # lowered from another rate than the row's own now: not applied
    assert _row_schedule(1, "p2_only", "cpu", None, tmp_path).lr == table1.ROW_LR["cpu"]["p2_only"]
    assert _row_schedule(6, "dual", "cpu", 20, tmp_path).iterations == 20


def test_a_real_row_that_diverges_is_trained_again_at_half_the_rate(smoke_root, tmp_path):
    from fpnlib.experiments import table1

    run_dir = tmp_path / "fpn"
    with pytest.raises(TrainingDiverged, match=r"every rate tried: \[1000000.0, 500000.0, 250000.0\]") as err:
        table1.run_row("fpn", "smoke", smoke_root, run_dir, iterations=4, progress=False, lr=1e6)
    assert err.value.lr == 250000.0 and err.value.iteration < 4
    for rate in ("1e+06", "500000"):  # each diverged run's log is kept
        assert (run_dir / f"diverged-lr{rate}" / "log.jsonl").exists()
    assert json.loads((run_dir / "lowered_lr.json").read_text())["lr"] == 250000.0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not Path(f"/proc/{pid}/stat").exists() or Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def test_row_workers_stop_when_their_parent_is_killed(tmp_path):
    """A table run killed on its own (SIGKILL: no handler, no Ctrl-C reaching the group) leaves
    no row worker training: each sees its parent gone and sends itself SIGTERM, which a training
    run turns into a checkpoint (``_stop_with_parent``). Before, the workers ran on orphaned."""
    import signal
    import subprocess
    import sys
    import time

    tests = Path(__file__).parent
    env = dict(os.environ, ORPHAN_DIR=str(tmp_path),
               PYTHONPATH=os.pathsep.join([str(tests), str(tests.parent), os.environ.get("PYTHONPATH", "")]))
    parent = subprocess.Popen([sys.executable, str(tests / "orphan_rows.py"), str(tmp_path)], env=env)
    try:
        pid_files = [tmp_path / "a.pid", tmp_path / "b.pid"]
        deadline = time.monotonic() + 120
        while not all(p.exists() and p.read_text() for p in pid_files):
            assert parent.poll() is None and time.monotonic() < deadline, "the row workers did not start"
            time.sleep(0.2)
        workers = [int(p.read_text()) for p in pid_files]
        assert all(_alive(w) for w in workers)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 15
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_alive(w) for w in workers), "row workers still running after their parent was killed"
    finally:
        if parent.poll() is None:
            parent.kill()
        for p in tmp_path.glob("*.pid"):
            if p.read_text() and _alive(int(p.read_text())):
                os.kill(int(p.read_text()), signal.SIGKILL)


def test_inference_side_by_side_takes_turns_and_keeps_each_models_median(monkeypatch):
    """A clock that only the stand-in inference moves: each model costs its seconds per image,
    plus a slow round for "b" (the median drops it), so the kept numbers are exact."""
    import fpnlib.experiments.tables as tables

    clock, calls = [0.0], []
    cost = {"a": 0.25, "b": 0.5}

    def infer(model, subset):
        calls.append((model, len(subset)))
        slow = 10.0 if model == "b" and sum(1 for m, n in calls if m == "b" and n > 1) == 2 else 1.0
        clock[0] += cost[model] * len(subset) * slow

    monkeypatch.setattr(tables.time, "perf_counter", lambda: clock[0])
    out = inference_side_by_side({"a": "a", "b": "b"}, list(range(50)), images=8, rounds=3, infer=infer)
    assert calls[:2] == [("a", 1), ("b", 1)]  # each model's warm-up, on one image
    assert [m for m, n in calls[2:]] == ["a", "b", "b", "a", "a", "b"]  # the order turns each round
    assert all(n == 8 for _, n in calls[2:])
    assert out["s_per_image"] == {"a": 0.25, "b": 0.5} and out["images"] == 8 and out["rounds"] == 3
    assert out["torch_threads"] == torch.get_num_threads()
    assert "8 val images, median of 3 rounds" in timing_setting({"inference_timing": out})
    assert timing_setting({}) == ""
    assert inference_side_by_side({"a": "a"}, list(range(3)), images=8, rounds=1, infer=infer)["images"] == 3
    with pytest.raises(ValueError, match="rounds"):
        inference_side_by_side({"a": "a"}, list(range(3)), rounds=0, infer=infer)
