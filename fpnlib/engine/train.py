"""The training loop every model of the paper shares (Sec. 5.1: synchronized SGD, momentum 0.9,
weight decay 1e-4, a step-decayed learning rate).

What it promises:
  * **Deterministic by seed.** All randomness of an iteration (which images, their flips, the
    RPN's anchor sampling) is drawn from seeds derived from ``(seed, iteration)``, not from a
    stream that carries over. So the same command gives the same numbers, and a run resumed
    from a checkpoint continues exactly as if it had never stopped.
  * **Nothing lost.** A checkpoint every ``checkpoint_every`` iterations, on Ctrl-C and before
    an error in a training step propagates, each written atomically (``_save``);
    ``resume=True`` continues from the last one (and returns at once if the run is complete,
    which is how notebooks "train or load"). A NaN/inf loss stops the run with
    :class:`TrainingDiverged` before the bad step is taken; the last good checkpoint stays (and
    weights that a step with non-finite gradients made non-finite are never saved). A stop
    signal during the weight update waits for the update to finish, so the checkpoint written
    on the interrupt holds whole steps.
  * **Visible.** A tqdm bar with the loss and speed, and ``log.jsonl`` with every logged
    iteration's losses, learning rate and timing.
  * **Several processes, same run.** Under ``torchrun`` (see :mod:`fpnlib.engine.distributed`)
    each process takes its contiguous share of the SAME global batch a single process would
    draw, the model is wrapped in ``DistributedDataParallel`` (gradients averaged over the
    processes before every step: synchronized SGD), and only rank 0 writes the checkpoint and
    the log and shows the bar. Every process loads the checkpoint on resume. What stays
    different from one process, and by how much, is measured in ``tests/test_ddp.py``.

Models follow torchvision's convention: ``model(images, targets)`` returns a dict of losses
in train mode.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from fpnlib.data.transforms import collate_fn
from fpnlib.engine import distributed


class TrainingDiverged(RuntimeError):
    """A loss became NaN or infinite; the message names the iteration and the last good checkpoint.

    ``iteration``, ``lr`` (the schedule's rate, before warm-up and steps) and ``losses`` (the
    step's, non-finite ones as text) say where, for code that reacts: a table's row is trained
    again at half the rate (``tables.halving_lr_on_divergence``)."""

    def __init__(self, message: str, iteration: int | None = None, lr: float | None = None,
                 losses: dict | None = None):
        super().__init__(message)
        self.iteration, self.lr, self.losses = iteration, lr, losses or {}

    def __reduce__(self):  # keeps the fields across processes (``run_rows``' workers)
        return type(self), (str(self), self.iteration, self.lr, self.losses)


@dataclass
class Schedule:
    """SGD schedule. ``lr`` is for ``batch_size`` images (the paper: 0.02 for 16 images)."""

    iterations: int
    batch_size: int = 4
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 100
    warmup_factor: float = 1.0 / 3.0  # lr starts at lr * warmup_factor and rises linearly
    steps: tuple[int, ...] = ()  # iterations at which lr is multiplied by gamma
    gamma: float = 0.1
    checkpoint_every: int = 500
    log_every: int = 10


def shortened(s: Schedule, iterations: int | None) -> Schedule:
    """``s`` cut to ``iterations`` with its lr steps at the same fractions (quick test runs);
    ``None`` keeps ``s``."""
    if iterations is None:
        return s
    return replace(s, iterations=iterations, steps=tuple(int(step * iterations / s.iterations) for step in s.steps))


def learning_rate(it: int, s: Schedule) -> float:
    """Linear warm-up (Goyal et al. 2017, used by Detectron's FPN) then step decay."""
    lr = s.lr * s.gamma ** sum(it >= step for step in s.steps)
    if it < s.warmup_iters:
        alpha = it / s.warmup_iters
        lr *= s.warmup_factor * (1 - alpha) + alpha
    return lr


def derive_seed(*keys: int) -> int:
    """A well-mixed 63-bit seed from integer keys (numpy's SeedSequence hashing)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint64)[0] >> np.uint64(1))


class IterationBatchSampler(Sampler):
    """Batches of ``(index, sample_seed)`` for iterations ``start .. iterations - 1``.

    Images are visited epoch by epoch in a permutation seeded by ``(seed, epoch)``; iteration
    ``it`` takes positions ``it * batch_size …`` of that endless sequence. Each sample also
    carries a seed for its own augmentation, so the batch of iteration ``it`` does not depend
    on where the run started or on the number of loader workers.

    With ``world_size`` processes, process ``rank`` yields its contiguous block of each global
    batch, items ``rank * b … (rank + 1) * b - 1`` with ``b = batch_size // world_size``: the
    processes together see exactly the batch one process would, with the same sample seeds.
    """

    def __init__(self, num_samples: int, batch_size: int, iterations: int, seed: int, start: int = 0,
                 rank: int = 0, world_size: int = 1):
        if num_samples < 1:
            raise ValueError("cannot train on an empty data set")
        if batch_size % world_size:
            raise ValueError(f"batch size {batch_size} does not split evenly over {world_size} processes")
        self.n, self.batch_size, self.iterations, self.seed, self.start = num_samples, batch_size, iterations, seed, start
        self.rank, self.world_size = rank, world_size
        self._perm_epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(derive_seed(self.seed, 0, epoch))
            self._perm_epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        return self._perm

    def batch(self, it: int) -> list[tuple[int, int]]:
        out = []
        for j in range(self.batch_size):
            pos = it * self.batch_size + j
            index = int(self._permutation(pos // self.n)[pos % self.n])
            out.append((index, derive_seed(self.seed, 1, it, j)))
        return out

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        b = self.batch_size // self.world_size
        for it in range(self.start, self.iterations):
            yield self.batch(it)[self.rank * b:(self.rank + 1) * b]

    def __len__(self) -> int:
        return max(self.iterations - self.start, 0)


class SeededSamples(Dataset):
    """``dataset[(index, seed)]`` = ``dataset[index]`` with torch's RNG seeded first, so random
    transforms (the flip) are a function of the sample's seed, in any worker process."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        torch.manual_seed(seed)
        return self.dataset[index]

    def __len__(self) -> int:
        return len(self.dataset)


def build_optimizer(model: nn.Module, s: Schedule) -> torch.optim.SGD:
    """SGD with momentum and weight decay on the trainable parameters (Sec. 5.1)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, a read-only folder); the message names the
    file and the cause. The partial file is removed and the previous checkpoint is kept."""


class _RecordedWrites:
    """A file for ``torch.save`` that keeps the ``OSError`` of a failed write: torch reports it
    as an unrelated ``RuntimeError`` (``enforce fail at inline_container.cc``)."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.file.flush()


def _save(path: Path, payload: dict) -> None:
    """Write atomically: a temp file in the same folder, flushed to the disk, then renamed over
    ``path``, so that a crash, a kill or a full disk leaves the previous checkpoint whole. A failed
    write raises ``CheckpointWriteError`` after removing the temp file (it would keep a full disk
    full)."""
    tmp = path.with_name(path.name + ".tmp")
    recorded = None
    try:
        with open(tmp, "wb") as f:
            recorded = _RecordedWrites(f)
            torch.save(payload, recorded)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        cause = recorded.error if recorded is not None and recorded.error is not None else e
        if not isinstance(cause, OSError):
            raise
        error = CheckpointWriteError(_write_failure(path, cause))
        error.errno = cause.errno
        raise error from e
    with contextlib.suppress(OSError):  # the rename itself reaches the disk (not every file system can)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_failure(path: Path, cause: OSError) -> str:
    """One line: which checkpoint, why, the space left where the disk is full, what is kept."""
    import errno
    import shutil

    why = cause.strerror or str(cause)
    if cause.errno in (errno.ENOSPC, errno.EDQUOT):
        with contextlib.suppress(OSError):
            why += f" ({shutil.disk_usage(path.parent).free / 2**20:.1f} MiB free there)"
    kept = "the previous checkpoint is kept" if path.exists() else "there is no earlier checkpoint"
    return f"{path}: cannot write the checkpoint: {why}; the partial file was removed, {kept}"


def _add_note(error: BaseException, note: str) -> None:
    """``error.add_note(note)``, also on Python 3.10 (the CLI prints the notes on the error's line)."""
    error.__notes__ = [*getattr(error, "__notes__", []), note]


def _checkpoint_on_error(error: Exception, checkpoint: Callable[[int], None], completed: int,
                         saved: int | None, path: Path, main: bool) -> None:
    """After an exception in a training step (a bad image, an out-of-memory, a lost process): the
    steps completed since the last checkpoint are written before the error propagates, and the
    error says where they are. A diverged loss or a failed write has nothing good to add."""
    if isinstance(error, (TrainingDiverged, CheckpointWriteError)) or completed == (saved or 0):
        return
    try:
        checkpoint(completed)
    except (TrainingDiverged, CheckpointWriteError) as e:  # non-finite weights, a full disk
        _add_note(error, f"the steps since the last checkpoint were not saved: {e}")
        return
    if main:
        _add_note(error, f"checkpoint written: {path} (iteration {completed}); the same command resumes from it")


def _to(device: torch.device, images, targets):
    images = [im.to(device, non_blocking=True) for im in images]
    targets = [{k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in t.items()}
               for t in targets]
    return images, targets


def _trim_log(log_path: Path, last_iteration: int) -> None:
    """After a resume, drop log lines of iterations the checkpoint does not contain.

    A last line that does not parse was cut off while it was written (a crash, a kill): it is
    dropped. A broken line before it is a damaged log, and stops the resume with the file and
    line named."""
    if not log_path.exists():
        return
    lines = [line for line in log_path.read_text().splitlines() if line.strip()]
    keep = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            iteration = record["iteration"]
        except (json.JSONDecodeError, TypeError, KeyError) as e:
            if number == len(lines):
                break  # torn by the crash that stopped the run
            raise ValueError(f"{log_path}, line {number}: not a training log record ({e}); "
                             f"move the file away to resume without it") from e
        if iteration <= last_iteration:
            keep.append(line)
    tmp = log_path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, log_path)  # a crash now leaves the old log whole


def _read_checkpoint(path: Path, device, needs: tuple[str, ...], remedy: str = "") -> dict:
    """A ``train`` checkpoint with the keys ``needs``, or an error naming the file (and ``remedy``)."""
    try:
        state = torch.load(path, map_location=device, weights_only=False)
    except Exception as e:  # a truncated or foreign file
        raise ValueError(f"{path}: not a readable fpnlib checkpoint ({type(e).__name__}: {e}){remedy}") from e
    missing = [k for k in needs if not isinstance(state, dict) or k not in state]
    if missing:
        raise ValueError(f"{path}: not a train() checkpoint (missing {', '.join(missing)}){remedy}")
    return state


class _StopSignals:
    """SIGTERM and SIGINT raise ``KeyboardInterrupt`` while training, so that ``kill``, a job
    scheduler or Ctrl-C in a background job (where SIGINT is otherwise ignored) all end with a
    checkpoint instead of lost work. A signal that arrives while the weights are being updated
    (:meth:`updating`) is held until the update is complete: the checkpoint written on the
    interrupt then holds whole steps only, and the resumed run is exact."""

    def __init__(self):
        self._updating, self._held = False, None

    def _interrupt(self, signum, frame):
        name = signal.Signals(signum).name
        if self._updating:
            self._held = name
            return
        raise KeyboardInterrupt(f"signal {name}")

    @contextlib.contextmanager
    def updating(self):
        self._updating = True
        try:
            yield
        finally:
            self._updating = False
        if self._held is not None:
            raise KeyboardInterrupt(f"signal {self._held}")

    @contextlib.contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield self  # signal handlers can only be set from the main thread
            return
        previous = {sig: signal.signal(sig, self._interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _finite_weights(model: nn.Module) -> bool:
    """Whether every parameter is finite: a step taken on a finite loss can still have had
    non-finite gradients (an overflow in the backward pass), and such weights are never saved."""
    return bool(torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all())


def train(
    model: nn.Module,
    dataset: Dataset,
    schedule: Schedule,
    out_dir: str | os.PathLike,
    seed: int = 0,
    device: str | torch.device = "cpu",
    resume: bool = True,
    workers: int = 0,
    progress: bool = True,
    amp: bool = True,
    on_iteration: Callable[[int, dict], None] | None = None,
    description: str = "train",
    start_from: str = "random",
) -> dict:
    """Train ``model`` on ``dataset`` for ``schedule.iterations`` iterations.

    Writes ``out_dir/last.pt`` (model, optimizer, iteration, schedule, seed) and
    ``out_dir/log.jsonl``. With ``resume`` (default) an existing ``last.pt`` is continued.
    ``amp`` enables bf16 autocast on CUDA (ignored on CPU, where runs stay bit-reproducible).
    ``on_iteration(it, losses)`` is called after each completed step (in every process).
    ``start_from`` names the weights the model was initialised with (e.g. the sha256 of a
    pre-trained backbone); it is kept in the checkpoint, and a checkpoint started from other
    weights is not resumed.

    Under ``torchrun`` (an initialised process group of size > 1, see
    :func:`fpnlib.engine.distributed.init_from_env`) the run is data-parallel:
    ``schedule.batch_size`` is the GLOBAL batch, split evenly over the processes (each takes a
    contiguous block, see ``IterationBatchSampler``); gradients are averaged by
    ``DistributedDataParallel``; the logged losses are the processes' mean; rank 0 writes
    ``last.pt`` and ``log.jsonl``. The model's own sampling (anchors, RoIs) is seeded per
    iteration: rank 0 with the single-process seed, so its images draw what they draw in a
    single-process run; rank ``r > 0`` with a seed of its own. A CUDA ``device`` without an index
    means the process's ``LOCAL_RANK`` GPU.

    Returns ``{"iterations", "resumed_from", "wall_time_s"`` (this call), ``"train_time_s"`` (all
    sessions of the run, as recorded in the checkpoint), ``"last_losses", "checkpoint"}``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path, log_path = out_dir / "last.pt", out_dir / "log.jsonl"
    rank, world, main = distributed.rank(), distributed.world_size(), distributed.is_main()
    device = torch.device(device)
    if world > 1 and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", distributed.local_rank())
    model.to(device)
    if device.type == "cuda":
        from fpnlib.modeling.fast_inference import for_cuda_training

        for_cuda_training(model)  # channels_last + cuDNN autotuning; a CPU run is left as it is
    optimizer = build_optimizer(model, schedule)

    from fpnlib.provenance import git_commit

    start, earlier_time = 0, 0.0  # earlier_time: training seconds of the sessions before this one
    saved = None  # the iteration last.pt holds
    commits = []  # the code version of every session that trained this run (provenance)
    if resume and ckpt_path.exists():
        state = _read_checkpoint(ckpt_path, device, ("model", "optimizer", "iteration", "schedule", "seed"),
                                 "; move it away, or pass resume=False, to train from scratch")
        if state["seed"] != seed or state["schedule"] != asdict(schedule):
            raise ValueError(f"{ckpt_path}: checkpoint was made with another seed or schedule "
                             f"({state['seed']}, {state['schedule']}); use another out_dir or resume=False")
        if state.get("start_from", "random") != start_from:
            raise ValueError(f"{ckpt_path}: checkpoint was started from other weights ({state.get('start_from', 'random')}"
                             f", not {start_from}); use another out_dir or resume=False")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start, earlier_time = state["iteration"], state.get("train_time_s", 0.0)
        saved = start
        commits = list(state.get("commits", []))
        if main:
            _trim_log(log_path, start)
    elif log_path.exists() and main:
        log_path.unlink()
    distributed.barrier()  # every process has read the checkpoint before rank 0 may overwrite it
    net = model  # what the loop calls: the model itself, or its DDP wrapper that averages gradients
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def checkpoint(iteration: int) -> None:
        nonlocal saved
        if not _finite_weights(model):  # every process: the replicas are equal, all stop together
            raise TrainingDiverged(
                f"weights became non-finite by iteration {iteration} (a step with a finite loss but non-finite "
                f"gradients); they were not saved. Last good checkpoint: {_last_good()}. Lower the learning "
                f"rate or lengthen the warm-up and train again, in another out_dir.",
                iteration=iteration, lr=schedule.lr, losses={})
        if not main:
            return
        _save(ckpt_path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                          "iteration": iteration, "schedule": asdict(schedule), "seed": seed, "start_from": start_from,
                          "train_time_s": earlier_time + time.perf_counter() - t_start, "commits": commits})
        saved = iteration

    def _last_good() -> str:
        return f"{ckpt_path} (iteration {saved})" if saved is not None else "none yet"

    sampler = IterationBatchSampler(len(dataset), schedule.batch_size, schedule.iterations, seed, start,
                                    rank=rank, world_size=world)
    loader = DataLoader(SeededSamples(dataset), batch_sampler=sampler, collate_fn=collate_fn,
                        num_workers=workers, pin_memory=device.type == "cuda",
                        persistent_workers=False)
    autocast = device.type == "cuda" and amp

    from tqdm.auto import tqdm

    bar = tqdm(total=schedule.iterations, initial=start, desc=description, disable=not (progress and main),
               unit="it", dynamic_ncols=True)
    model.train()
    if start < schedule.iterations and (not commits or commits[-1] != git_commit()):
        commits.append(git_commit())  # this session trains: record its code version
    completed, losses_out, t_start = start, {}, time.perf_counter()
    t_last = time.perf_counter()
    try:
        with _StopSignals().installed() as signals, \
                (open(log_path, "a") if main else contextlib.nullcontext()) as log:
            for it, (images, targets) in zip(range(start, schedule.iterations), loader):
                t_data = time.perf_counter() - t_last
                images, targets = _to(device, images, targets)
                lr = learning_rate(it, schedule)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                # the model's own sampling; rank 0 draws as a single process would
                torch.manual_seed(derive_seed(seed, 2, it) if rank == 0 else derive_seed(seed, 2, it, rank))
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                    losses = net(images, targets)
                total = sum(losses.values())
                # the global batch's losses (every process's mean), so that all stop together on a NaN
                losses_out = distributed.mean_over_processes(
                    {"<total>": float(total.detach()), **{k: float(v.detach()) for k, v in losses.items()}}, device)
                loss_value = losses_out.pop("<total>")
                if not math.isfinite(loss_value):
                    bad = losses_out
                    raise TrainingDiverged(
                        f"loss became non-finite at iteration {it} ({bad}); the step was not taken. "
                        f"Last good checkpoint: {_last_good()}. Lower the learning rate "
                        f"or lengthen the warm-up and train again, in another out_dir (a checkpoint of "
                        f"another schedule is not resumed).", iteration=it, lr=schedule.lr,
                        losses={k: v if math.isfinite(v) else str(v) for k, v in bad.items()})
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                with signals.updating():  # a stop waits for the whole step
                    optimizer.step()
                    completed = it + 1
                now = time.perf_counter()
                if main and (completed % schedule.log_every == 0 or completed == schedule.iterations):
                    log.write(json.dumps({"iteration": completed, "lr": lr, "loss": loss_value, **losses_out,
                                          "time_per_iter_s": round(now - t_last, 4),
                                          "data_time_s": round(t_data, 4)}) + "\n")
                    log.flush()
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.4f}")
                if completed % schedule.checkpoint_every == 0:
                    checkpoint(completed)
                if on_iteration is not None:
                    on_iteration(it, losses_out)
                t_last = time.perf_counter()
    except KeyboardInterrupt as stop:
        checkpoint(completed)  # the state after the last completed step
        bar.close()
        if main:
            _add_note(stop, f"checkpoint written: {ckpt_path} (iteration {completed}); the same command resumes from it")
        raise
    except Exception as error:
        bar.close()
        _checkpoint_on_error(error, checkpoint, completed, saved, ckpt_path, main)
        raise
    bar.close()
    if completed != start or not ckpt_path.exists():
        checkpoint(completed)
    distributed.barrier()  # the checkpoint exists for every process once train returns
    return {"iterations": completed, "resumed_from": start, "wall_time_s": time.perf_counter() - t_start,
            "commits": commits,
            "train_time_s": earlier_time + (time.perf_counter() - t_start if completed != start else 0.0),
            "last_losses": losses_out, "checkpoint": str(ckpt_path)}


def load_checkpoint(model: nn.Module, path: str | os.PathLike, device: str | torch.device = "cpu") -> dict:
    """Load a ``train`` checkpoint's weights into ``model``; returns the checkpoint's metadata."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    state = _read_checkpoint(path, device, ("model",))
    model.load_state_dict(state["model"])
    return {k: v for k, v in state.items() if k not in ("model", "optimizer")}

