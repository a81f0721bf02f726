"""The trainer: schedule, seeded batches, exact resume, NaN guard, checkpoints."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from fpnlib.data.coco import load_coco_split
from fpnlib.data.transforms import build_transforms
from fpnlib.engine.train import (IterationBatchSampler, Schedule, TrainingDiverged, learning_rate,
                                 load_checkpoint, train)
from fpnlib.modeling.detectors import build_rpn_detector


class _Toy(nn.Module):
    """A linear regressor in the detection convention; returns NaN from ``nan_at`` calls on."""

    def __init__(self, nan_at: int | None = None):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(3))
        self.calls, self.nan_at = 0, nan_at

    def forward(self, images, targets):
        x = torch.stack([im.flatten()[:3] for im in images])
        y = torch.stack([t["y"] for t in targets])
        loss = ((x * self.w).sum(1) - y).pow(2).mean()
        self.calls += 1
        if self.nan_at is not None and self.calls > self.nan_at:
            loss = loss * float("nan")
        return {"loss": loss}


def _toy_data(n=10):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(3, 2, 2, generator=g), {"y": torch.randn((), generator=g)}) for _ in range(n)]


def test_learning_rate_warmup_and_steps():
    s = Schedule(iterations=100, lr=0.02, warmup_iters=10, warmup_factor=0.25, steps=(50, 80), gamma=0.1)
    assert learning_rate(0, s) == pytest.approx(0.005)
    assert learning_rate(5, s) == pytest.approx(0.02 * (0.25 * 0.5 + 0.5))
    assert learning_rate(10, s) == pytest.approx(0.02)
    assert learning_rate(49, s) == pytest.approx(0.02)
    assert learning_rate(50, s) == pytest.approx(0.002)
    assert learning_rate(80, s) == pytest.approx(0.0002)


def test_batches_depend_only_on_iteration():
    full = list(IterationBatchSampler(7, 3, iterations=10, seed=5))
    resumed = list(IterationBatchSampler(7, 3, iterations=10, seed=5, start=4))
    assert resumed == full[4:]
    # every image is seen once per epoch: the first 7 positions are a permutation
    first_epoch = [i for batch in full for i, _ in batch][:7]
    assert sorted(first_epoch) == list(range(7))
    assert list(IterationBatchSampler(7, 3, iterations=10, seed=6)) != full


def test_same_seed_same_weights_and_resume_is_exact(smoke_root, tmp_path):
    """An interrupted-and-resumed run ends bit-identical to an uninterrupted one (CPU)."""
    ds = load_coco_split(smoke_root, "train", transforms=build_transforms(True, 96, 128), with_masks=False)
    sched = Schedule(iterations=6, batch_size=2, lr=0.01, warmup_iters=2, checkpoint_every=100, log_every=1)

    def model():
        torch.manual_seed(0)
        return build_rpn_detector("fpn", depth=18, width=8, norm="gn", freeze_at=0, fpn_channels=16,
                                  anchor_scale=0.25)

    a = model()
    train(a, ds, sched, tmp_path / "a", seed=3, progress=False)

    b = model()

    def interrupt(it, losses):
        if it == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(b, ds, sched, tmp_path / "b", seed=3, progress=False, on_iteration=interrupt)
    assert torch.load(tmp_path / "b" / "last.pt", weights_only=False)["iteration"] == 3
    b = model()  # a fresh process would start from fresh weights too
    info = train(b, ds, sched, tmp_path / "b", seed=3, progress=False)
    assert info["resumed_from"] == 3 and info["iterations"] == 6

    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    log_a = [json.loads(x) for x in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    log_b = [json.loads(x) for x in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [x["iteration"] for x in log_b] == list(range(1, 7))
    assert [x["loss"] for x in log_a] == [x["loss"] for x in log_b]

    # a third run with the same seed gives the same weights again; another seed does not
    c = model()
    train(c, ds, sched, tmp_path / "c", seed=3, progress=False)
    assert all(torch.equal(sa[k], c.state_dict()[k]) for k in sa)
    d = model()
    train(d, ds, sched, tmp_path / "d", seed=4, progress=False)
    assert not all(torch.equal(sa[k], d.state_dict()[k]) for k in sa)


def test_completed_run_is_loaded_not_retrained(tmp_path):
    sched = Schedule(iterations=4, batch_size=2, warmup_iters=0)
    m = _Toy()
    train(m, _toy_data(), sched, tmp_path, progress=False)
    w = m.w.detach().clone()
    m2 = _Toy()
    info = train(m2, _toy_data(), sched, tmp_path, progress=False)
    assert info["resumed_from"] == 4 and m2.calls == 0
    assert torch.equal(m2.w.detach(), w)
    # provenance: the code version that trained it is in the checkpoint, and loading adds none
    from fpnlib.provenance import git_commit

    assert info["commits"] == [git_commit()] == torch.load(tmp_path / "last.pt", weights_only=False)["commits"]


def test_resume_with_another_schedule_is_refused(tmp_path):
    train(_Toy(), _toy_data(), Schedule(iterations=2, batch_size=2), tmp_path, progress=False)
    with pytest.raises(ValueError, match="another seed or schedule"):
        train(_Toy(), _toy_data(), Schedule(iterations=3, batch_size=2), tmp_path, progress=False)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    sched = Schedule(iterations=10, batch_size=2, lr=0.01, warmup_iters=0, checkpoint_every=2)
    m = _Toy(nan_at=5)
    with pytest.raises(TrainingDiverged, match="iteration 5") as err:
        train(m, _toy_data(), sched, tmp_path, progress=False)
    assert "last.pt (iteration 4)" in str(err.value)  # the checkpoint's iteration, not the last step's
    assert (err.value.iteration, err.value.lr) == (5, 0.01) and "nan" in err.value.losses.values()
    assert torch.isfinite(m.w).all()  # the bad step was not taken
    meta = load_checkpoint(_Toy(), tmp_path / "last.pt")
    assert meta["iteration"] == 4


class _NanGrad(_Toy):
    """A finite loss whose gradient is NaN on call ``bad_at``: the step is taken on it."""

    def __init__(self, bad_at: int):
        super().__init__()
        self.bad_at = bad_at

    def forward(self, images, targets):
        x = torch.stack([im.flatten()[:3] for im in images])
        y = torch.stack([t["y"] for t in targets])
        w = self.w * 1.0
        self.calls += 1
        if self.calls == self.bad_at:
            w.register_hook(lambda g: torch.full_like(g, float("nan")))
        return {"loss": ((x * w).sum(1) - y).pow(2).mean()}


def test_weights_made_nan_by_a_finite_loss_are_never_saved(tmp_path):
    sched = Schedule(iterations=10, batch_size=2, lr=0.01, warmup_iters=0, checkpoint_every=2)
    with pytest.raises(TrainingDiverged, match="weights became non-finite by iteration 4") as err:
        train(_NanGrad(bad_at=4), _toy_data(), sched, tmp_path, progress=False)
    assert "last.pt (iteration 2)" in str(err.value)
    state = torch.load(tmp_path / "last.pt", weights_only=False)
    assert state["iteration"] == 2 and torch.isfinite(state["model"]["w"]).all()


def test_resume_from_a_damaged_checkpoint_names_the_file(tmp_path):
    sched = Schedule(iterations=2, batch_size=2, warmup_iters=0)
    (tmp_path / "last.pt").write_bytes(b"cut off")
    with pytest.raises(ValueError, match=r"last\.pt: not a readable fpnlib checkpoint"):
        train(_Toy(), _toy_data(), sched, tmp_path, progress=False)
    torch.save({"model": {}}, tmp_path / "last.pt")
    with pytest.raises(ValueError, match=r"last\.pt: not a train\(\) checkpoint \(missing optimizer"):
        train(_Toy(), _toy_data(), sched, tmp_path, progress=False)


def _interrupted_at_2(tmp_path):
    sched = Schedule(iterations=4, batch_size=2, warmup_iters=0, log_every=1)

    def stop(it, losses):
        if it == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(_Toy(), _toy_data(), sched, tmp_path, progress=False, on_iteration=stop)
    return sched, tmp_path / "log.jsonl"


def test_resume_drops_a_log_line_cut_off_by_a_crash(tmp_path):
    sched, log = _interrupted_at_2(tmp_path)
    with open(log, "a") as f:
        f.write('{"iteration": 3, "lo')  # the crash came while this line was written
    info = train(_Toy(), _toy_data(), sched, tmp_path, progress=False)
    assert info["resumed_from"] == 2
    assert [json.loads(x)["iteration"] for x in log.read_text().splitlines()] == [1, 2, 3, 4]


def test_resume_with_a_damaged_log_names_the_line(tmp_path):
    sched, log = _interrupted_at_2(tmp_path)
    log.write_text("garbage\n" + log.read_text())
    with pytest.raises(ValueError, match=r"log\.jsonl, line 1: not a training log record"):
        train(_Toy(), _toy_data(), sched, tmp_path, progress=False)
    assert log.read_text().startswith("garbage\n")  # nothing rewritten


_SIGNAL_IN_STEP_SCRIPT = """
import json, os, signal, sys, torch
from fpnlib.engine import train as T
sys.path.insert(0, sys.argv[2])
from test_train import _Toy, _toy_data

class SignalOnThirdStep(torch.optim.SGD):
    calls = 0
    def step(self, closure=None):
        super().step(closure)  # the weights are updated ...
        SignalOnThirdStep.calls += 1
        if SignalOnThirdStep.calls == 3:  # ... and the stop arrives before the trainer counts the step
            os.kill(os.getpid(), signal.SIGTERM)

build = T.build_optimizer
sched = T.Schedule(iterations=6, batch_size=2, lr=0.1, warmup_iters=0, checkpoint_every=100)
T.build_optimizer = lambda m, s: SignalOnThirdStep([p for p in m.parameters()], lr=s.lr, momentum=s.momentum,
                                                   weight_decay=s.weight_decay)
try:
    T.train(_Toy(), _toy_data(), sched, sys.argv[1] + "/b", progress=False)
    stopped = False
except KeyboardInterrupt:
    stopped = True
T.build_optimizer = build
saved = torch.load(sys.argv[1] + "/b/last.pt", weights_only=False)["iteration"]
resumed, whole = _Toy(), _Toy()
T.train(resumed, _toy_data(), sched, sys.argv[1] + "/b", progress=False)
T.train(whole, _toy_data(), sched, sys.argv[1] + "/a", progress=False)
print(json.dumps({"stopped": stopped, "saved": saved, "same": bool(torch.equal(resumed.w, whole.w))}))
"""


def test_a_stop_during_the_weight_update_saves_whole_steps(tmp_path):
    """SIGTERM that lands inside ``optimizer.step`` is held until the step is counted: the
    checkpoint holds 3 whole steps, and the resumed run equals an uninterrupted one. (Run in a
    subprocess, whose main thread receives the signal.)"""
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "signal_in_step.py"
    script.write_text(_SIGNAL_IN_STEP_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path), str(Path(__file__).parent)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"stopped": True, "saved": 3, "same": True}


def test_load_checkpoint_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_checkpoint(_Toy(), tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.pt"):
        load_checkpoint(_Toy(), bad)


_SIGTERM_SCRIPT = """
import sys, time, torch
from torch import nn
from fpnlib.engine.train import Schedule, train

class Slow(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(2))
    def forward(self, images, targets):
        time.sleep(0.05)
        return {"loss": (self.w - 1).pow(2).sum()}

data = [(torch.zeros(1, 2, 2), {}) for _ in range(8)]
def report(it, losses):
    print("it", it, flush=True)
train(Slow(), data, Schedule(iterations=10_000, batch_size=2, warmup_iters=0, checkpoint_every=10_000),
      sys.argv[1], progress=False, on_iteration=report)
"""


def test_sigterm_saves_a_checkpoint(tmp_path):
    """A background job killed by SIGTERM (or SIGINT, ignored by default there) keeps its work."""
    import signal
    import subprocess
    import sys

    script = tmp_path / "slow_train.py"
    script.write_text(_SIGTERM_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "run")], stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("it 5"):
            break
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode != 0  # the run stopped; it did not finish 10k iterations
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    assert 6 <= state["iteration"] < 10_000


def test_shortened_schedule_keeps_step_fractions():
    from fpnlib.engine.train import shortened

    s = Schedule(iterations=1000, steps=(800,))
    assert shortened(s, None) is s
    short = shortened(s, 10)
    assert (short.iterations, short.steps, short.lr) == (10, (8,), s.lr)
