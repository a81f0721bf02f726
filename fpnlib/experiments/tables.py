"""What every table experiment shares: ours-beside-the-paper markdown, and the paper's claims
checked on our numbers (direction only, never tuned: a claim that fails is reported as such)."""
from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

# Differences below this many points (AR or AP) are called inconclusive: on a val split of a
# few hundred objects, one object found or missed moves the metric by about that much.
INCONCLUSIVE_BELOW = 1.0


@dataclass(frozen=True)
class Claim:
    """One claim with our two numbers and the paper's; the verdict compares directions only."""

    text: str
    metric: str
    rows: tuple[str, str]
    ours: tuple[float, float]
    paper: tuple[float, float]

    @property
    def reproduced(self) -> bool:
        return (self.ours[0] > self.ours[1]) == (self.paper[0] > self.paper[1])

    @property
    def verdict(self) -> str:
        if abs(self.ours[0] - self.ours[1]) < INCONCLUSIVE_BELOW:
            return "inconclusive"
        return "reproduced" if self.reproduced else "NOT reproduced"

    def __str__(self) -> str:
        (a, b), (pa, pb) = self.ours, self.paper
        return (f"{self.verdict:>14}: {self.text} — {self.metric} {self.rows[0]} vs {self.rows[1]}: "
                f"ours {a:.1f} vs {b:.1f} ({a - b:+.1f}), paper {pa:.1f} vs {pb:.1f} ({pa - pb:+.1f})")


def check_claims(record: dict, specs: Sequence[tuple[str, str, str, str]], paper: dict[str, dict],
                 paper_keys: dict[str, str]) -> list[Claim]:
    """``specs``: (row, row, metric, text), the first row expected higher; rows missing from
    ``record`` are skipped."""
    out = []
    for a, b, metric, text in specs:
        if a in record["rows"] and b in record["rows"]:
            ours = (record["rows"][a]["metrics"][metric], record["rows"][b]["metrics"][metric])
            out.append(Claim(text, metric, (a, b), ours, (paper[paper_keys[a]][metric], paper[paper_keys[b]][metric])))
    return out


def short_commit(commit: str) -> str:
    """12 hex digits, keeping the ``+dirty`` mark of a run made from uncommitted code."""
    return commit[:12] + ("+dirty" if commit.endswith("+dirty") else "")


def render_table(record: dict, paper: dict[str, dict], paper_keys: dict[str, str], letters: dict[str, str],
                 metrics: Sequence[str], extra: Sequence[tuple[str, Callable[[dict, dict], str]]],
                 setting: str, what: str, claims: Sequence[Claim], paper_only: Sequence[tuple[str, str]] = ()) -> str:
    """Markdown: a row per variant with ``extra`` columns (header, fn(our row, paper row)) and
    each metric as ``ours / paper``; provenance, the paper's setting, deviations and claims below.
    ``paper_only``: (label, paper key) rows the paper reports and we do not run, shown as "— / paper"."""
    lines = ["| row | " + " | ".join(h for h, _ in extra) + " | " + " | ".join(f"{m} ours / paper" for m in metrics) + " |",
             "|---|" + "---|" * (len(extra) + len(metrics))]
    for variant, row in record["rows"].items():
        p = paper[paper_keys[variant]]
        cells = [fn(row, p) for _, fn in extra] + [f"{row['metrics'][m]:.1f} / {p[m]:.1f}" for m in metrics]
        lines.append(f"| ({letters[variant]}) {variant} | " + " | ".join(cells) + " |")
    for label, key in paper_only:
        p = paper[key]
        cells = [fn(None, p) for _, fn in extra] + [f"– / {p[m]:.1f}" if p[m] is not None else "– / –" for m in metrics]
        lines.append(f"| {label} (paper only) | " + " | ".join(cells) + " |")
    prov = record["provenance"]
    lines += ["", f"Ours: preset `{prov['preset']}`, seed {prov['seed']}, commit `{short_commit(prov['commit'])}`, "
              f"{prov['hardware'].get('gpu') or prov['hardware']['cpu']}, "
              f"{sum(r['train_time_s'] for r in record['rows'].values()) / 60:.1f} min of training, "
              f"{prov['date']}; {what}.",
              f"Paper: {setting}", "", "Deviations from the paper:"]
    lines += [f"- {k}: {v}" for k, v in record["deviations"].items()]
    lines += [f"- diverged: ({letters[variant]}) {variant} diverged at lr "
              + " and at ".join(f"{d['lr']:g} (iteration {d['iteration']})" for d in row["diverged_at"])
              + f"; trained again from scratch at lr {row['lr']:g} (its diverged runs are kept in its run directory)"
              for variant, row in record["rows"].items() if row.get("diverged_at")]
    lines += ["", f"The paper's claims on our numbers (direction only; |difference| < {INCONCLUSIVE_BELOW} point: inconclusive):"]
    lines += [f"- {c}" for c in claims]
    return "\n".join(lines)


def final_losses(log_path: Path) -> dict:
    """The last logged losses of a run: a row whose loss stayed high did not train."""
    lines = Path(log_path).read_text().splitlines() if Path(log_path).exists() else []
    last = json.loads(lines[-1]) if lines else {}
    return {k: round(v, 4) for k, v in last.items() if k.startswith("loss")}


@dataclass(frozen=True)
class RowJob:
    """``fn(variant, out_dir=runs_dir / variant, **kwargs)``: one table row as a picklable
    callable, so that ``run_rows`` can hand it to another process."""

    fn: Callable[..., dict]
    runs_dir: Path
    kwargs: dict

    def __call__(self, variant: str) -> dict:
        return self.fn(variant, out_dir=Path(self.runs_dir) / variant, **self.kwargs)


def row_schedule(schedule, row_lr: dict, variant: str, preset: str, iterations: int | None = None,
                 lr: float | None = None):
    """A row's ``Schedule``: ``schedule`` cut to ``iterations`` (if given), at the rate ``row_lr``
    (preset -> row -> lr) lists for the row on ``preset``, where a row needed a lower one, or at
    ``lr`` where given (a row trained again after it diverged, see ``halving_lr_on_divergence``)."""
    from fpnlib.engine.train import shortened

    s = shortened(schedule, iterations)
    if lr is None and variant in row_lr.get(preset, {}):
        lr = row_lr[preset][variant]
    return s if lr is None else replace(s, lr=lr)


def share_cores(processes: int) -> int:
    """Make this process one of ``processes`` side by side on the machine's cores: it gets
    ``cores // processes`` torch threads (at least one), and so do the processes it starts
    (``OMP_NUM_THREADS``). Returns the count. Used by ``run_rows``' workers and by the test
    suite's pytest-xdist workers (``tests/conftest.py``)."""
    import os

    import torch

    threads = max(1, (os.cpu_count() or 1) // processes)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    return threads


def _stop_with_parent(poll_s: float = 0.5, grace_s: float = 60.0) -> None:
    """In a row worker: send itself SIGTERM once its parent process is gone. Ctrl-C reaches the
    workers too, but a parent killed on its own (SIGTERM, SIGKILL) left them training, orphaned.
    SIGTERM stops a training run as an interrupt does: at a whole step, with a checkpoint that
    the next run resumes from (``fpnlib.engine.train``). The worker then waits for a task that
    no parent will send, so after ``grace_s`` it exits."""
    import os
    import signal
    import threading

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace_s)
        os._exit(1)

    threading.Thread(target=watch, name="fpnlib-parent-watch", daemon=True).start()


def _row_worker(processes: int) -> None:
    """``run_rows``' worker initializer: its share of the cores, and an end with its parent."""
    share_cores(processes)
    _stop_with_parent()


def _file_digest(path: Path) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# Arguments of a ``run_row`` that do not change its numbers (where files are, how it reports).
_NOT_IN_KEY = ("out_dir", "data_root", "proposals", "device", "progress", "workers")


def _row_key(arguments: dict) -> dict:
    """The arguments of a ``run_row`` call that set its numbers, as text. An ``lr`` of None (the
    row's own rate) stays out: rows were kept under these keys before ``run_row`` took an ``lr``."""
    return {k: repr(v) for k, v in arguments.items() if k not in _NOT_IN_KEY and not (k == "lr" and v is None)}


# A row whose loss diverges is trained again from scratch at half its rate, at most this many times.
LR_HALVINGS = 2
LOWERED_LR_FILE = "lowered_lr.json"


def _lowering(run_dir, row_lr: float, key: dict | None = None) -> dict | None:
    """The record of ``run_dir``'s row trained again at a lower rate, if its own rate is still
    ``row_lr`` (and its arguments ``key``, where given)."""
    path = Path(run_dir) / LOWERED_LR_FILE
    kept = json.loads(path.read_text()) if path.exists() else None
    return kept if kept and kept["row_lr"] == row_lr and key in (None, kept["key"]) else None


def lowered_lr(run_dir, row_lr: float) -> float | None:
    """The rate the row in ``run_dir``, whose own rate is ``row_lr``, was trained again at after it
    diverged (None: it did not diverge at that rate)."""
    kept = _lowering(run_dir, row_lr)
    return kept["lr"] if kept else None


def halving_lr_on_divergence(schedule_for: Callable[..., object]):
    """Decorate a table's ``run_row(variant, preset, ..., out_dir, ..., iterations, lr=None)``, whose
    rows train on ``schedule_for(variant, preset, iterations, lr).lr``: where the training diverges
    (``TrainingDiverged``), the attempt's files (checkpoint, log) move to ``out_dir/diverged-lr<rate>/``
    and the row trains again from scratch at half the rate, at most ``LR_HALVINGS`` times.

    An unattended ``make reproduce`` then finishes its tables instead of stopping at the first row
    that diverged (a row at the edge of stability diverges with some thread counts and not others).
    The lowered rate is kept in ``out_dir/lowered_lr.json``; a later or resumed call with the same
    arguments trains at it without diverging first, while the row's own rate is still the one that
    diverged (a changed ``ROW_LR`` or budget starts over). The row lists what diverged
    (``diverged_at``), and ``render_table`` states it among the deviations."""
    import functools
    import inspect
    import sys

    from fpnlib.engine.train import TrainingDiverged

    def decorate(run_row: Callable[..., dict]) -> Callable[..., dict]:
        sig = inspect.signature(run_row)

        @functools.wraps(run_row)
        def wrapper(*args, **kwargs) -> dict:
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            arguments, run_dir = dict(bound.arguments), Path(bound.arguments["out_dir"])
            own_lr = schedule_for(arguments["variant"], arguments["preset"], arguments["iterations"],
                                  arguments["lr"]).lr
            key, decision, diverged = _row_key(dict(arguments, lr=None)), run_dir / LOWERED_LR_FILE, []
            kept = _lowering(run_dir, own_lr, key)
            if kept:
                arguments, diverged = dict(arguments, lr=kept["lr"]), kept["diverged"]
            while True:
                try:
                    row = run_row(**arguments)
                    break
                except TrainingDiverged as err:
                    if err.lr is None:  # raised without saying its rate: nothing to halve
                        raise
                    if len(diverged) >= LR_HALVINGS:
                        raise TrainingDiverged(f"{err} It diverged at every rate tried: "
                                               f"{[d['lr'] for d in diverged] + [err.lr]}.", err.iteration, err.lr,
                                               err.losses) from err
                    attempt, n = run_dir / f"diverged-lr{err.lr:g}", 1
                    while attempt.exists():  # an earlier run's, with other arguments
                        n += 1
                        attempt = run_dir / f"diverged-lr{err.lr:g}-{n}"
                    attempt.mkdir()
                    for f in run_dir.iterdir():
                        if f.is_file() and f.name != decision.name:
                            f.rename(attempt / f.name)
                    diverged.append({"lr": err.lr, "iteration": err.iteration, "losses": err.losses,
                                     "kept_in": attempt.name})
                    arguments = dict(arguments, lr=err.lr / 2)
                    decision.write_text(json.dumps({"key": key, "row_lr": own_lr, "lr": arguments["lr"],
                                                    "diverged": diverged}, indent=1) + "\n")
                    print(f"{run_dir.name}: the loss diverged at lr {err.lr:g} (iteration {err.iteration}); that "
                          f"run is kept in {attempt}; training again from scratch at lr {arguments['lr']:g}",
                          file=sys.stderr, flush=True)
            if diverged:
                row["diverged_at"] = diverged
            return row

        return wrapper

    return decorate


def _computed_from(arguments: dict, checkpoint: Path) -> dict:
    """What a ``run_row`` call's numbers come from besides its key's arguments: the checkpoint's
    bytes, the data's identity (``provenance.data_identity``) and the device."""
    from fpnlib.provenance import data_identity

    inputs = {"checkpoint_sha256": _file_digest(checkpoint)}
    if arguments.get("data_root") is not None:
        inputs["data_sha256"] = data_identity(arguments["data_root"])
    if "device" in arguments:
        inputs["device"] = str(arguments["device"])
    return inputs


def reuse_evaluated(run_row: Callable[..., dict]) -> Callable[..., dict]:
    """Decorate a table's ``run_row(variant, ..., out_dir, ...)``: the row it returns (metrics,
    timings, its wall time and thread count) is kept in ``out_dir/row.json`` with what it was
    computed from (``_computed_from``: the checkpoint, the data, the device; in the row too), and
    returned again, without training or evaluating, while those and the arguments that set the
    numbers (preset, seed, iterations, ...) are the same. The notebooks show the rows ``make reproduce`` measured instead
    of measuring them again (re-evaluating every row cost minutes per notebook under ``cpu``)."""
    import functools
    import inspect

    sig = inspect.signature(run_row)

    @functools.wraps(run_row)
    def wrapper(*args, **kwargs) -> dict:
        import torch

        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        run_dir = Path(bound.arguments["out_dir"])
        checkpoint, cache = run_dir / "last.pt", run_dir / "row.json"
        key = _row_key(bound.arguments)
        if cache.exists() and checkpoint.exists():
            kept = json.loads(cache.read_text())
            if kept.get("key") == key and kept.get("computed_from") == _computed_from(bound.arguments, checkpoint):
                return dict(kept["row"], reused_from=str(cache.name))
        t = time.perf_counter()
        row = run_row(*args, **kwargs)
        row["wall_time_s"] = round(time.perf_counter() - t, 1)
        row["torch_threads"] = torch.get_num_threads()
        if checkpoint.exists():
            row["computed_from"] = _computed_from(bound.arguments, checkpoint)
            cache.write_text(json.dumps({"key": key, "computed_from": row["computed_from"], "row": row},
                                        indent=1, default=list) + "\n")
        return row

    return wrapper


def how_obtained(row: dict) -> str:
    """How a ``run_row`` call got its row, in words for the notebooks: reused (checkpoint and
    evaluation of an earlier run, see ``reuse_evaluated``), loaded (checkpoint, evaluated now)
    or trained now (from scratch or resumed)."""
    if row.get("reused_from"):
        return "reused: checkpoint and evaluation of an earlier run (unchanged checkpoint)"
    if row.get("trained_from_iteration") == row.get("iterations"):
        return "loaded from its checkpoint, evaluated now"
    start = row.get("trained_from_iteration") or 0
    return "trained now" + (f" (resumed at iteration {start})" if start else "")


def run_rows(record: dict, variants: Sequence[str], run_one: Callable[[str], dict], out_dir: Path,
             render: Callable[[dict], str], preset: str, seed: int, device, jobs: int = 1) -> dict:
    """Run each row (``run_one(variant)`` returns its dict, with its wall time: see
    ``reuse_evaluated``); after every row
    write ``out_dir/table<N>.json`` with provenance (a stopped run shows what it has), at the end
    ``table<N>.md`` rendered by ``render``.

    ``jobs > 1`` (CPU only; ``run_one`` must be picklable, e.g. a ``RowJob``) trains that many
    rows at once in spawned processes, sharing the cores between them (``torch_threads`` per row
    is recorded). Small models use two cores badly from one process: two one-thread rows side by
    side gave 1.23x the throughput of one two-thread row (measured on the 2-core dev machine).
    A row's numbers depend on its thread count, not on which rows ran beside it."""
    from fpnlib.provenance import provenance

    n = record["table"]
    t0 = time.perf_counter()
    jobs = min(jobs, len(variants)) if str(device) == "cpu" else 1
    done: dict[str, dict] = {}

    def finished(variant: str, row: dict) -> None:
        done[variant] = row
        record["rows"] = {v: done[v] for v in variants if v in done}  # the table's own order
        record["provenance"] = provenance(preset, seed, time.perf_counter() - t0, device=str(device), row_jobs=jobs)
        write_table(record, out_dir)

    if jobs <= 1:
        for variant in variants:
            finished(variant, run_one(variant))
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        from tqdm.auto import tqdm

        with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"), initializer=_row_worker,
                                 initargs=(jobs,)) as pool:
            futures = {pool.submit(run_one, v): v for v in variants}
            for fut in tqdm(as_completed(futures), total=len(futures), desc=f"Table {n} rows ({jobs} at once)"):
                finished(futures[fut], fut.result())
    return write_table(record, out_dir, render)


def write_table(record: dict, out_dir: Path, render: Callable[[dict], str] | None = None) -> dict:
    """``out_dir/table<N>.json`` (N: ``record["table"]``), and ``table<N>.md`` by ``render`` if given."""
    n = record["table"]
    (Path(out_dir) / f"table{n}.json").write_text(json.dumps(record, indent=1, default=list) + "\n")
    if render is not None:
        (Path(out_dir) / f"table{n}.md").write_text(render(record) + "\n")
    return record


def retimed(record: dict, timing: dict, field: str, out_dir: Path, render: Callable[[dict], str]) -> dict:
    """``record`` with each row's ``field`` set to its time from ``inference_side_by_side``
    (``timing``) and the setting kept as ``inference_timing``; ``table<N>.json`` and ``.md``
    written again (the provenance is ``run_rows``'s)."""
    for variant, seconds in timing["s_per_image"].items():
        record["rows"][variant][field] = seconds
    record["inference_timing"] = {k: v for k, v in timing.items() if k != "s_per_image"}
    return write_table(record, out_dir, render)


def inference_side_by_side(models: dict[str, object], dataset, device="cpu", images: int = 32, rounds: int = 3,
                           infer: Callable[[object, object], object] | None = None) -> dict:
    """Seconds per image of each model's inference on the first ``images`` of ``dataset``,
    measured in this process, with its thread count, the models taking turns (the order turns
    each round) and the median of ``rounds`` kept. ``infer(model, images)`` runs one model on
    a subset (default: ``fpnlib.engine.inference.predict``).

    Why: a time a table row records while it trains beside another row (``run_rows`` with
    ``jobs > 1``, one thread each) depends on what that neighbour was doing. Times that a table
    compares must come from one setting, and this is that setting."""
    import statistics

    import torch
    from torch.utils.data import Subset

    if infer is None:
        from fpnlib.engine.inference import predict

        def infer(model, subset):
            return predict(model, subset, device=device, progress=False)
    if images < 1 or rounds < 1:
        raise ValueError(f"inference_side_by_side: images ({images}) and rounds ({rounds}) must be >= 1")
    subset = Subset(dataset, range(min(images, len(dataset))))
    names = list(models)
    for model in models.values():  # first-call costs (allocations, kernel choices), untimed
        infer(model, Subset(dataset, [0]))
    seconds: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            t0 = time.perf_counter()
            infer(models[name], subset)
            seconds[name].append((time.perf_counter() - t0) / len(subset))
    return {"s_per_image": {n: round(statistics.median(s), 4) for n, s in seconds.items()},
            "images": len(subset), "rounds": rounds, "torch_threads": torch.get_num_threads(),
            "how": "measured side by side in one process, taking turns; median of the rounds"}


def timing_setting(record: dict) -> str:
    """The words for how a record's test times were taken (``inference_side_by_side``), or ""."""
    t = record.get("inference_timing")
    return (f"side by side in one process, {t['torch_threads']} threads, the first {t['images']} val images, "
            f"median of {t['rounds']} rounds") if t else ""
