"""Where a number came from: every file in ``results/`` carries this record.

A figure without its preset, seed, commit, hardware, time and library versions cannot be
checked or compared, so nothing is written to ``results/`` without it.
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


# What a run writes itself (``make reproduce`` rewrites results, figures, README's blocks and
# executes the notebooks in place): changes there do not make the code that ran differ from HEAD.
RUN_OUTPUTS = ("results", "figures", "README.md", "notebooks")


def shown_path(path: str | Path) -> str:
    """``path`` as a record names it: relative to the repository where it lies inside (a record
    committed from one machine names no folder of that machine), else as given."""
    resolved = Path(path).resolve()
    return resolved.relative_to(REPO_ROOT).as_posix() if resolved.is_relative_to(REPO_ROOT) else str(path)


def git_commit(root: Path = REPO_ROOT) -> str:
    """The commit of the working tree, with ``+dirty`` when it has uncommitted changes outside
    ``RUN_OUTPUTS`` (so a run's own results do not mark the later steps of that run dirty).
    ``FPNLIB_COMMIT`` names it instead, for a copy of the tree sent elsewhere (a GPU machine)
    whose git metadata is not that commit's."""
    if os.environ.get("FPNLIB_COMMIT"):
        return os.environ["FPNLIB_COMMIT"]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                *(f":(exclude){p}" for p in RUN_OUTPUTS)], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def hardware() -> dict:
    """CPU model, core count and GPU (if any) of this machine."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _distribution_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:  # imported from a folder on the path, not installed
        return "unknown"


def versions() -> dict:
    """Versions of the libraries that shape the numbers."""
    import numpy
    import pycocotools
    import torch
    import torchvision

    import fpnlib

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": numpy.__version__,
        "pycocotools": getattr(pycocotools, "__version__", None) or _distribution_version("pycocotools"),
        "fpnlib": fpnlib.__version__,
    }


def provenance(preset: str, seed: int, wall_time_s: float | None = None, **extra) -> dict:
    """The record stored beside every result: preset, seed, commit, hardware, time, versions."""
    record = {
        "preset": preset,
        "seed": seed,
        "commit": git_commit(),
        "hardware": hardware(),
        "versions": versions(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if wall_time_s is not None:
        record["wall_time_s"] = round(float(wall_time_s), 2)
    record.update(extra)
    return record


def data_identity(root: str | Path) -> str:
    """sha256 of what a data set folder gives a result: the bytes of its annotation files and of
    its generation config (the generator's stamp), and the name and size of every other file (the
    images; hashing their bytes would read all of COCO). A copy with an image cut short or missing,
    another seed's set or a set without annotations differs; a byte-identical copy does not."""
    import hashlib

    from fpnlib.data.prepare import GENERATING, GENERATION, STAMP

    root = Path(root)
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        name = path.relative_to(root).as_posix()
        if name in (GENERATION, GENERATING):  # how long it took, not what it holds
            continue
        if name == STAMP or name.startswith("annotations/"):
            digest.update(f"{name}\0".encode() + hashlib.sha256(path.read_bytes()).digest())
        else:
            digest.update(f"{name}\0{path.stat().st_size}\0".encode())
    return digest.hexdigest()

