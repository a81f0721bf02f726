"""The instructors' path: everything of one preset, unattended.

``python -m fpnlib reproduce --preset cpu`` (``make reproduce``) generates the embedded data
set, records its statistics, pre-trains the bottom-up ResNet (``experiments.pretrain``, the
stand-in for ImageNet), regenerates the paper's tables (``fpnlib.experiments.TABLES``; trained
rows are reused from ``runs/<preset>/``), then executes the lesson notebooks in order with papermill,
in place and with ``record=True`` (the one run that writes the repository's figures and records),
so the committed notebooks, ``figures/`` and ``results/<preset>/`` all come from one recorded run.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from fpnlib.config import get_preset
from fpnlib.data.prepare import ensure_dataset, generation_time
from fpnlib.data.stats import dataset_statistics
from fpnlib.provenance import REPO_ROOT, provenance, shown_path
from fpnlib.report import RESULTS_DIR, update_readme

NOTEBOOKS_DIR = REPO_ROOT / "notebooks"


def lesson_notebooks(notebooks_dir: Path = NOTEBOOKS_DIR) -> list[Path]:
    """The numbered lesson notebooks, in order (``00_data.ipynb``, ``01_…``)."""
    return sorted(p for p in Path(notebooks_dir).glob("[0-9][0-9]_*.ipynb"))


def write_data_statistics(preset: str, root: Path, results_dir: Path, seed: int,
                          wall_time_s: float | None = None) -> Path:
    """``results/<preset>/data.json``: the generated set's statistics with provenance."""
    out = Path(results_dir) / preset / "data.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {split: dataset_statistics(root / "annotations" / f"instances_{split}.json", root / split)
              for split in ("train", "val")}
    for split in record:  # paths relative to the data root: the same on every machine
        record[split]["annotation_file"] = f"annotations/instances_{split}.json"
    record["provenance"] = provenance(preset, seed, wall_time_s, step="data generation")
    out.write_text(json.dumps(record, indent=1) + "\n")
    return out


WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def strip_widget_state(path: Path) -> None:
    """Drop what a notebook's widgets leave in it (tqdm bars are widgets in a kernel): the widget
    state papermill saves (large, useless without the kernel; a committed notebook must stay
    small) and each widget's output, whose plain-text form is the widget as it was created (a
    bar at 0 %), not as it ended. Papermill's record of the run names its notebook as the
    repository does, not by the folder of the machine that ran it."""
    nb = json.loads(Path(path).read_text())
    nb.get("metadata", {}).pop("widgets", None)
    run = nb.get("metadata", {}).get("papermill", {})
    for key in ("input_path", "output_path"):
        if run.get(key):
            run[key] = shown_path(run[key])
    for cell in nb.get("cells", []):
        if "outputs" in cell:
            cell["outputs"] = [o for o in cell["outputs"] if WIDGET_VIEW not in o.get("data", {})]
    Path(path).write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")


def execute_notebook(path: Path, parameters: dict, out_path: Path | None = None,
                     cell_timeout: int | None = 1800) -> Path:
    """Run one notebook with papermill (kernel: this interpreter's ``python3``); a cell that
    runs past ``cell_timeout`` seconds fails the run instead of hanging it."""
    import papermill as pm

    out_path = Path(out_path or path)
    pm.execute_notebook(str(path), str(out_path), parameters=parameters, kernel_name="python3",
                        cwd=str(Path(path).parent), progress_bar=False,
                        execution_timeout=cell_timeout)
    strip_widget_state(out_path)
    return out_path


def record_notebook_time(preset: str, name: str, seconds: float, results_dir: Path = RESULTS_DIR) -> Path:
    """Add one notebook's measured wall time, with its provenance, to ``results/<preset>/notebooks.json``."""
    path = Path(results_dir) / preset / "notebooks.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    record = json.loads(path.read_text()) if path.exists() else {}
    record[name] = {"seconds": round(seconds, 1), "provenance": provenance(preset, 0, seconds)}
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path


def reproduce(preset: str = "cpu", workers: int = 2, results_dir: Path = RESULTS_DIR,
              notebooks: list[Path] | None = None, tables=None, jobs: int = 2) -> dict:
    """Data, statistics, the tables, then every lesson notebook under ``preset``; returns wall times.
    ``jobs``: table rows trained at once on a CPU (``fpnlib.experiments.tables.run_rows``)."""
    from tqdm.auto import tqdm

    times = {}
    t0 = time.perf_counter()
    root = ensure_dataset(preset, workers=workers)
    times["data"] = time.perf_counter() - t0
    # the generation's own time (the set may have been made by an earlier run and reused)
    write_data_statistics(preset, root, results_dir, seed=get_preset(preset).data.seed if get_preset(preset).data else 0,
                          wall_time_s=generation_time(root))
    import torch

    from fpnlib.experiments import TABLES, run_table

    seed = get_preset(preset).data.seed if get_preset(preset).data else 0
    device = "cuda" if torch.cuda.is_available() else "cpu"
    from fpnlib.experiments.pretrain import pretrained_weights

    t = time.perf_counter()  # the stand-in for ImageNet, before any table (each would otherwise start it)
    pretrained_weights(preset, root, REPO_ROOT / "runs" / preset, seed=seed, device=device,
                       out_dir=Path(results_dir) / preset)
    times["pretrain"] = time.perf_counter() - t
    for number in TABLES if tables is None else tables:
        t = time.perf_counter()
        run_table(number, preset, root, REPO_ROOT / "runs" / preset, Path(results_dir) / preset, seed=seed,
                  device=device, jobs=jobs)
        times[f"table{number}"] = time.perf_counter() - t
    from fpnlib.experiments.claims import write_claims_report

    write_claims_report(Path(results_dir) / preset, preset)
    for nb in tqdm(notebooks or lesson_notebooks(), desc=f"notebooks ({preset})", unit="nb"):
        t = time.perf_counter()
        execute_notebook(nb, {"preset": preset, "record": True})  # the run that writes figures/ and results/
        times[nb.name] = time.perf_counter() - t
        record_notebook_time(preset, nb.name, times[nb.name], results_dir)
    out = Path(results_dir) / preset / "reproduce_times.json"
    out.write_text(json.dumps({"seconds": {k: round(v, 1) for k, v in times.items()},
                               # (the tables' own records are rewritten by the notebooks, which reuse the rows)
                               "provenance": provenance(preset, 0, sum(times.values()),
                                                        row_jobs=jobs if device == "cpu" else 1)}, indent=1) + "\n")
    if Path(results_dir).resolve() == RESULTS_DIR.resolve():
        update_readme()  # README's numbers follow the recorded run
    return times
