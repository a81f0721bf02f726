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
