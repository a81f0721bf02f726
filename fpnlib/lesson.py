"""Where a lesson notebook writes what it makes.

The committed ``figures/`` and ``results/`` come from one recorded run (``make reproduce``), which
passes ``record=True``. Any other run of a notebook, a student's above all, writes its figures
and records into the scratch folder instead (``scratch/`` in the repository, ignored by git;
``FPNLIB_SCRATCH`` names another), so running a lesson changes no tracked file.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from fpnlib.provenance import REPO_ROOT, shown_path

SCRATCH_ENV = "FPNLIB_SCRATCH"


def scratch_dir() -> Path:
    """The folder a run that does not record writes to."""
    return Path(os.environ.get(SCRATCH_ENV) or REPO_ROOT / "scratch")


@dataclass(frozen=True)
class LessonOutputs:
    figures: Path  # where this run writes its PNGs
    results: Path  # where it writes its records: <results>/table1.json, ...
    recorded: Path  # the recorded results of the preset, read by a notebook that shows them
    record: bool

    def __str__(self) -> str:
        if self.record:
            return f"recording: figures to {shown_path(self.figures)}/, records to {shown_path(self.results)}/"
        return (f"writing to the scratch folder {shown_path(self.figures.parent)}/ (ignored by git; "
                f"record=True writes figures/ and results/, as make reproduce does)")


def lesson_outputs(preset: str, record: bool, figures_dir: str | os.PathLike = "../figures",
                   results_dir: str | os.PathLike = "../results", with_recorded: bool = False) -> LessonOutputs:
    """The folders of a notebook run under ``preset``. ``record``: write to ``figures_dir`` and
    ``results_dir/<preset>`` (make reproduce); otherwise to the scratch folder's ``figures/`` and
    ``results/<preset>/``. ``with_recorded``: a run that does not record starts its results
    folder from a copy of the recorded ones, for a notebook that derives reports from them."""
    recorded = Path(results_dir) / preset
    if record:
        outputs = LessonOutputs(Path(figures_dir), recorded, recorded, True)
    else:
        scratch = scratch_dir()
        outputs = LessonOutputs(scratch / "figures", scratch / "results" / preset, recorded, False)
        if with_recorded and recorded.is_dir():
            shutil.copytree(recorded, outputs.results, dirs_exist_ok=True)
    outputs.figures.mkdir(parents=True, exist_ok=True)
    outputs.results.mkdir(parents=True, exist_ok=True)
    return outputs


# the folder of a row's checkpoint under runs/<preset>/table<N>/, where it is not the row's name
_ROW_DIRS = {3: {"fpn": "../table2/fpn"}, 5: {"share": "step4"}}  # Table 3(c) is Table 2(c)
# rows a table takes from another table's runs (Table 5's unshared row is Table 3(c))
_BORROWED = {5: ("no_share",)}


def _rows_of(table: int) -> list[str]:
    import importlib

    return list(importlib.import_module(f"fpnlib.experiments.table{table}").ROWS.values())


def training_notice(table: int, preset: str, runs_dir: str | os.PathLike, results_dir: str | os.PathLike = "../results",
                    iterations: int | None = None, rows: list[str] | None = None) -> str:
    """What a lesson says before it trains Table ``table``: which of its ``rows`` (default: all)
    have no checkpoint in ``runs_dir`` (``runs/<preset>/table<N>``) and will train now, an estimate
    of the minutes from the recorded run of the preset (its seconds per iteration, times the
    iterations to run), and how to have finished rows loaded instead."""
    import json

    runs_dir = Path(runs_dir)
    rows = [r for r in (rows or _rows_of(table)) if r not in _BORROWED.get(table, ())]
    missing = [r for r in rows if not (runs_dir / _ROW_DIRS.get(table, {}).get(r, r) / "last.pt").exists()]
    where = shown_path(runs_dir)
    if not missing:
        return f"Table {table}: every row has its checkpoint in {where}/: loaded, nothing is trained."
    record_path = Path(results_dir) / preset / f"table{table}.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else None
    minutes, basis = None, f"no recorded run of preset {preset!r} to estimate from"
    recorded = {r: v for r, v in (record or {}).get("rows", {}).items() if v.get("train_time_s")}
    if recorded:
        def seconds(v: dict) -> float:  # a recorded row's training time, for the iterations run now
            return v["train_time_s"] * (iterations / v["iterations"] if iterations and v.get("iterations") else 1)

        mean = sum(seconds(v) for v in recorded.values()) / len(recorded)
        minutes = sum(seconds(recorded[r]) if r in recorded else mean for r in missing) / 60
        hw = record["provenance"].get("hardware", {})
        basis = (f"the recorded rows' training times on {hw.get('gpu') or hw.get('cpu', 'its machine')} "
                 f"({hw.get('cpu_count', '?')} cores){', scaled to ' + str(iterations) + ' iterations' if iterations else ''}; "
                 f"this machine has {os.cpu_count()} cores")
    estimate = ("time unknown" if minutes is None else "under a minute" if minutes < 1 else f"about {minutes:.0f} min")
    return (f"**Table {table} is about to train {len(missing)} row{'s' if len(missing) > 1 else ''}** "
            f"({', '.join(missing)}): no checkpoint in {where}/. Estimate: {estimate} ({basis}). "
            f"To load finished rows instead, train them once outside the lesson, `make reproduce` or "
            f"`python -m fpnlib table {table} --preset {preset}` (the lessons then load {where}/), or copy the "
            f"runs/{preset}/ folder of a machine that did; `iterations = 20` in the parameters cell gives a quick, "
            f"untrained look.")
