"""What happens when something goes wrong: each fault of a sweep of bad inputs (issue #32) and
what it does now. Through the command line where the fault is the command line's (a subprocess:
its exit code and its one line asserted), through the API elsewhere. README's table "What
happens when something goes wrong" is read from these cases."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from fpnlib.data.coco import CocoDetection, CocoFormatError, load_coco_split
from fpnlib.data.prepare import STAMP, DataFolderError, dataset_for, ensure_dataset, generated_with
from fpnlib.engine.train import IterationBatchSampler, Schedule, train
from fpnlib.experiments.tables import reuse_evaluated

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def run_cli(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "fpnlib", *map(str, args)], capture_output=True, text=True,
                          env=None if env is None else {**os.environ, **env}, timeout=timeout)


def one_line(stderr: str) -> str:
    """The one line a failed command prints (progress bars aside), or an assertion error."""
    lines = [line for line in stderr.replace("\r", "\n").splitlines() if line.strip() and not line.startswith("Table ")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


def annotation_bytes(root: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted((root / "annotations").glob("*.json"))}


def copy_set(src: Path, dst: Path, damage=None) -> Path:
    """A copy of a data set, optionally damaged by ``damage(copy)``."""
    shutil.copytree(src, dst)
    if damage is not None:
        damage(dst)
    return dst


def cut_short(path: Path) -> None:
    """Keep the first half of a JPEG: its header is whole, its pixel data and end marker are gone."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def without_annotations(root: Path) -> None:
    for split in ("train", "val"):
        ann = root / "annotations" / f"instances_{split}.json"
        d = json.loads(ann.read_text())
        ann.write_text(json.dumps({**d, "annotations": []}))


# ------------------------------------------------------------ one row trained on a set of another seed


def eval_cli(runs, data):
    return run_cli("eval", "--table", 1, "--row", "fpn", "--preset", "smoke", "--runs", runs, "--data", data)


@pytest.fixture(scope="module")
def seed5(tmp_path_factory):
    """The issue's fault 1 as a user met it: ``data --seed 5 --root D``, then ``train --data D``;
    the row trained (1 iteration) and evaluated (its row cached) serves the eval cases below."""
    tmp = tmp_path_factory.mktemp("seed5")
    root, runs = tmp / "seed5", tmp / "runs"
    made = run_cli("data", "--preset", "smoke", "--seed", 5, "--root", root, "--workers", 0)
    assert made.returncode == 0, made.stderr
    before = annotation_bytes(root)
    trained = run_cli("train", "--table", 1, "--row", "fpn", "--preset", "smoke", "--iterations", 1, "--data", root,
                      "--runs", runs)
    assert trained.returncode == 0, trained.stderr
    evaluated = eval_cli(runs, root)
    assert evaluated.returncode == 0, evaluated.stderr
    return {"root": root, "runs": runs, "before": before, "row": json.loads(evaluated.stdout)}


def test_1_train_reads_a_given_data_folder_as_it_is(seed5):
    """Fault 1: the seed-5 set was overwritten by the seed-0 set. Now a given folder that holds a
    data set is read as it is."""
    assert annotation_bytes(seed5["root"]) == seed5["before"]
    assert generated_with(seed5["root"])["seed"] == 5
    assert (seed5["runs"] / "table1" / "fpn" / "last.pt").is_file()


def test_1_a_folder_that_is_no_data_set_is_refused_untouched(tmp_path):
    """A non-empty folder without a data set is neither generated into nor changed."""
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("my notes")
    out = run_cli("train", "--table", 1, "--row", "fpn", "--preset", "smoke", "--data", folder, "--runs", tmp_path)
    assert out.returncode == 1
    line = one_line(out.stderr)
    assert f"{folder}: is not empty and holds no data set" in line and "left as it is" in line
    assert [p.name for p in folder.iterdir()] == ["notes.txt"] and (folder / "notes.txt").read_text() == "my notes"


def test_1_a_hand_made_coco_folder_is_read_never_regenerated(smoke_root, tmp_path):
    """A COCO-format folder without the generator's stamp (a user's) is read as it is; the
    ``data`` verb refuses to generate into it, and into a generated set of another configuration
    unless asked to (``--force``)."""
    mine = copy_set(smoke_root, tmp_path / "coco", lambda r: (r / STAMP).unlink())
    before = annotation_bytes(mine)
    assert dataset_for("smoke", mine) == mine
    with pytest.raises(DataFolderError, match="holds a data set that fpnlib did not generate"):
        ensure_dataset("smoke", mine, progress=False)
    with pytest.raises(DataFolderError, match="holds a data set that fpnlib did not generate"):
        ensure_dataset("smoke", mine, progress=False, force=True)
    assert annotation_bytes(mine) == before and not (mine / STAMP).exists()

    other = copy_set(smoke_root, tmp_path / "seed0")
    with pytest.raises(DataFolderError, match=r"another configuration \(seed 0\).*--force"):
        ensure_dataset("smoke", other, progress=False, seed=3)
    assert generated_with(other)["seed"] == 0
    assert generated_with(ensure_dataset("smoke", other, progress=False, seed=3, force=True))["seed"] == 3


def test_1_an_interrupted_generation_is_made_again(smoke_root, tmp_path):
    """The generator marks a folder as its own before its first file: a generation that stopped
    is finished by the next command, in a folder given with ``--data`` too."""
    from fpnlib.data.prepare import GENERATING

    stopped = copy_set(smoke_root, tmp_path / "stopped")
    (stopped / STAMP).unlink()
    (stopped / GENERATING).write_text("{}")
    (stopped / "annotations" / "instances_val.json").unlink()
    assert dataset_for("smoke", stopped) == stopped
    assert annotation_bytes(stopped) == annotation_bytes(smoke_root)
    assert generated_with(stopped)["seed"] == 0 and not (stopped / GENERATING).exists()


# ------------------------------------------------------------ 2: the evaluation cache


CALLS: list[str] = []


@reuse_evaluated
def fake_row(variant: str, preset: str, data_root, out_dir, device: str = "cpu") -> dict:
    """Stands for a table's run_row: 'trains' (writes last.pt once), 'evaluates' (counts calls)."""
    CALLS.append(str(data_root))
    ckpt = Path(out_dir) / "last.pt"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    if not ckpt.exists():
        ckpt.write_bytes(b"weights")
    return {"variant": variant, "metrics": {"AR100": 1.0}}


def test_2_a_cached_row_is_reused_only_for_the_same_data_device_and_checkpoint(smoke_root, tmp_path):
    """Fault 2: ``eval`` returned the cached row for other data and another device. Now every
    input that decides the numbers is in the key, and the row says what it was computed from."""
    CALLS.clear()
    run = tmp_path / "run"
    first = fake_row("fpn", "smoke", smoke_root, run)
    assert set(first["computed_from"]) == {"checkpoint_sha256", "data_sha256", "device"}
    assert fake_row("fpn", "smoke", smoke_root, run)["reused_from"] == "row.json"
    same = copy_set(smoke_root, tmp_path / "same")  # a byte-identical copy holds the same data
    assert fake_row("fpn", "smoke", same, run)["reused_from"] == "row.json" and len(CALLS) == 1

    jpeg = sorted((smoke_root / "val").iterdir())[2].name
    others = {
        "truncated": copy_set(smoke_root, tmp_path / "truncated", lambda r: cut_short(r / "val" / jpeg)),
        "missing": copy_set(smoke_root, tmp_path / "missing", lambda r: (r / "val" / jpeg).unlink()),
        "no annotations": copy_set(smoke_root, tmp_path / "empty", without_annotations),
        "another seed": ensure_dataset("smoke", tmp_path / "seed1", progress=False, seed=1),
    }
    for what, root in others.items():
        row = fake_row("fpn", "smoke", root, run)
        assert "reused_from" not in row and CALLS[-1] == str(root), what
        assert row["computed_from"]["data_sha256"] != first["computed_from"]["data_sha256"], what
    row = fake_row("fpn", "smoke", smoke_root, run, device="cuda")
    assert "reused_from" not in row and row["computed_from"]["device"] == "cuda"
    (run / "last.pt").write_bytes(b"retrained")
    assert "reused_from" not in fake_row("fpn", "smoke", smoke_root, run, device="cuda")
    assert len(CALLS) == 1 + len(others) + 2


def test_2_eval_on_damaged_data_evaluates_it_instead_of_returning_the_cache(seed5, tmp_path):
    """Through the command line: with the row of the seed-5 set cached, ``eval`` on a copy with an
    image cut short evaluates the row again, and names the image."""
    cached = json.loads((seed5["runs"] / "table1" / "fpn" / "row.json").read_text())
    assert cached["computed_from"] == seed5["row"]["computed_from"]
    jpeg = seed5["root"] / "val" / "000003.jpg"
    damaged = copy_set(seed5["root"], tmp_path / "damaged", lambda r: cut_short(r / "val" / jpeg.name))
    out = eval_cli(seed5["runs"], damaged)
    assert out.returncode == 1 and "reused_from" not in out.stdout
    line = one_line(out.stderr)
    assert f"{damaged / 'val' / jpeg.name}: cannot decode image" in line and "truncated" in line


# ------------------------------------------------------------ 3: a full disk while writing a checkpoint


class _Big(nn.Module):
    """A checkpoint of about 0.5 MiB (256 KiB of weights and as much momentum)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(65536))

    def forward(self, images, targets):
        return {"loss": (self.w - torch.stack(images).mean()).pow(2).mean()}


_BIG_SCHEDULE = Schedule(iterations=6, batch_size=2, warmup_iters=0, checkpoint_every=2, log_every=1000)


def _train_big(run: Path, fill_disk: Callable[[], object], after_first_checkpoint: bool):
    """Train ``_Big`` with a checkpoint every 2 iterations; the disk fills up (``fill_disk()``)
    after the first checkpoint or before it. Returns the ``CheckpointWriteError`` raised."""
    from fpnlib.engine.train import CheckpointWriteError

    def fill(it, losses):
        if it == (1 if after_first_checkpoint else 0):
            fill_disk()

    with pytest.raises(CheckpointWriteError) as caught:
        train(_Big(), [(torch.ones(1, 1, 1), {}) for _ in range(4)], _BIG_SCHEDULE, run, progress=False,
              on_iteration=fill)
    return caught.value


def _fill_tmpfs(folder: Path) -> None:
    """Fill the file system of ``folder`` but 100 kB."""
    with open(folder / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(bytes(1 << 16))
        except OSError:
            f.truncate(f.tell() - 100_000)


_TMPFS_SCRIPT = """
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from test_faults import _fill_tmpfs, _train_big
import torch

disk = Path(sys.argv[1])
error = _train_big(disk / "run", lambda: _fill_tmpfs(disk), after_first_checkpoint=True)
print(json.dumps({"message": str(error), "errno": error.errno, "files": sorted(p.name for p in (disk / "run").iterdir()),
                  "saved": torch.load(disk / "run" / "last.pt")["iteration"]}))
"""


def test_3_a_full_disk_names_the_checkpoint_and_keeps_the_previous_one(tmp_path):
    """Fault 3: torch's ``enforce fail at inline_container.cc`` and a partial ``last.tmp`` left on
    the full disk. Now, on a 2 MiB tmpfs that fills up after the first checkpoint: one line naming
    the file and the cause, the partial file removed, the previous checkpoint kept."""
    import errno

    if shutil.which("unshare") is None:
        pytest.skip("no unshare to mount a private tmpfs")
    script, disk = tmp_path / "tmpfs_disk.py", tmp_path / "disk"
    script.write_text(_TMPFS_SCRIPT)
    disk.mkdir()
    command = " ".join(f"'{c}'" for c in (sys.executable, script, disk, Path(__file__).parent))
    done = subprocess.run(["unshare", "--map-root-user", "--mount", "sh", "-c",
                           f"mount -t tmpfs -o size=2m tmpfs '{disk}' && exec {command}"],
                          capture_output=True, text=True, timeout=120)
    if done.returncode != 0 and ("mount" in done.stderr or "unshare" in done.stderr):
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["errno"] == errno.ENOSPC
    assert result["message"].startswith(f"{disk / 'run' / 'last.pt'}: cannot write the checkpoint: "
                                        f"No space left on device (0.1 MiB free there)")
    assert result["message"].endswith("the partial file was removed, the previous checkpoint is kept")
    assert result["saved"] == 2 and result["files"] == ["last.pt", "log.jsonl"]


@contextlib.contextmanager
def _file_size_limit(limit: int):
    """Writes past ``limit`` bytes of a file fail (``EFBIG``), in this process: the full disk of
    machines where no tmpfs can be mounted."""
    import resource

    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an error, not the signal's kill
    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)
        signal.signal(signal.SIGXFSZ, handler)


@pytest.mark.parametrize("after_first_checkpoint", [True, False])
def test_3_a_failed_checkpoint_write_keeps_what_there_was_and_no_partial_file(tmp_path, after_first_checkpoint):
    """The same, where writes fail at a file size limit: after the first checkpoint (it is kept),
    and before any (the error says there is none, and no partial file is left)."""
    import errno

    with contextlib.ExitStack() as limits:
        error = _train_big(tmp_path / "run", lambda: limits.enter_context(_file_size_limit(100_000)),
                           after_first_checkpoint)
    ckpt = tmp_path / "run" / "last.pt"
    assert error.errno == errno.EFBIG
    assert str(error).startswith(f"{ckpt}: cannot write the checkpoint: File too large; the partial file was removed, ")
    if after_first_checkpoint:
        assert str(error).endswith("the previous checkpoint is kept")
        assert torch.load(ckpt, weights_only=False)["iteration"] == 2
        assert sorted(p.name for p in ckpt.parent.iterdir()) == ["last.pt", "log.jsonl"]
    else:
        assert str(error).endswith("there is no earlier checkpoint")
        assert sorted(p.name for p in ckpt.parent.iterdir()) == ["log.jsonl"]


# ------------------------------------------------------------ 4: iterations


@pytest.mark.parametrize("verb, iterations", [("train", "0"), ("train", "-5"), ("eval", "0")])
def test_4_iterations_must_be_positive(verb, iterations, tmp_path):
    """Fault 4: ``--iterations -5`` or ``0`` was accepted, and eval reported the untrained model."""
    out = run_cli(verb, "--table", 1, "--row", "fpn", "--preset", "smoke", "--iterations", iterations,
                  "--runs", tmp_path, "--data", tmp_path / "data")
    assert out.returncode == 2
    assert f"argument --iterations: must be a positive number of iterations, got {int(iterations)}" in one_line(out.stderr)
    assert not (tmp_path / "data").exists()


# ------------------------------------------------------------ 5: bad images, found before training


def test_5_images_are_checked_before_training_every_bad_one_named(smoke_root, tmp_path):
    """Fault 5: a bad image failed in the middle of training. Now every image of the split is
    checked first (headers, and the end of a JPEG), and one error lists every bad file."""
    names = [p.name for p in sorted((smoke_root / "train").iterdir())[:3]]

    def damage(root):
        cut_short(root / "train" / names[0])  # its header is whole: only its end tells
        (root / "train" / names[1]).unlink()
        (root / "train" / names[2]).write_text("not an image")

    root = copy_set(smoke_root, tmp_path / "bad", damage)
    with pytest.raises(CocoFormatError) as caught:
        load_coco_split(root, "train", with_masks=False).check_for_training(progress=False)
    message = str(caught.value)
    assert message.startswith(f"3 of 48 images of {root / 'annotations' / 'instances_train.json'} are unusable: ")
    assert f"{names[0]}: cannot decode image" in message and "truncated" in message
    assert f"{names[1]}: image file not found" in message
    assert f"{names[2]}: cannot decode image" in message and "UnidentifiedImageError" in message
    load_coco_split(smoke_root, "train", with_masks=False).check_for_training(progress=False)  # the good set passes


def test_5_train_on_a_bad_image_fails_before_the_first_step(smoke_root, tmp_path):
    name = sorted((smoke_root / "train").iterdir())[5].name
    root = copy_set(smoke_root, tmp_path / "bad", lambda r: cut_short(r / "train" / name))
    out = run_cli("train", "--table", 1, "--row", "fpn", "--preset", "smoke", "--iterations", 3, "--data", root,
                  "--runs", tmp_path / "runs")
    assert out.returncode == 1
    line = one_line(out.stderr)
    assert "1 of 48 images" in line and f"{root / 'train' / name}: cannot decode image" in line
    assert not (tmp_path / "runs" / "table1" / "fpn" / "last.pt").exists()


class _FailsAt(torch.utils.data.Dataset):
    """A data set whose image ``bad`` cannot be decoded while ``broken`` (a file damaged mid-run)."""

    def __init__(self, n: int, bad: int):
        self.items = [(torch.full((1, 1, 1), float(i)), {}) for i in range(n)]
        self.bad, self.broken = bad, True

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        if i == self.bad and self.broken:
            raise CocoFormatError(f"image {i}: cannot decode image")
        return self.items[i]


def test_5_an_error_in_a_training_step_writes_the_work_before_it_propagates(tmp_path):
    """The work done before the error is checkpointed, the error says where, and the same run
    resumes to exactly the weights of a run that never failed."""
    schedule = Schedule(iterations=8, batch_size=2, warmup_iters=0, checkpoint_every=100)
    order = [i for batch in IterationBatchSampler(8, 2, 8, seed=0) for i, _ in batch]
    data = _FailsAt(8, bad=order[7])  # in the batch of iteration 3 (its second image)
    failed = _Big()
    with pytest.raises(CocoFormatError) as caught:
        train(failed, data, schedule, tmp_path / "run", progress=False)
    assert caught.value.__notes__ == [f"checkpoint written: {tmp_path / 'run' / 'last.pt'} (iteration 3); "
                                      f"the same command resumes from it"]
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=False)["iteration"] == 3
    data.broken = False
    resumed, whole = _Big(), _Big()
    assert train(resumed, data, schedule, tmp_path / "run", progress=False)["resumed_from"] == 3
    train(whole, data, schedule, tmp_path / "whole", progress=False)
    assert torch.equal(resumed.w, whole.w)


# ------------------------------------------------------------ 6: image modes


def _one_image_set(tmp_path: Path, image: Image.Image, file_name: str) -> CocoDetection:
    (tmp_path / "images").mkdir()
    image.save(tmp_path / "images" / file_name)
    ann = {"images": [{"id": 1, "file_name": file_name, "width": image.width, "height": image.height}],
           "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 2, 2]}],
           "categories": [{"id": 1, "name": "thing"}]}
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    return CocoDetection(tmp_path / "images", tmp_path / "ann.json", with_masks=False)


_RAMP = np.linspace(0.0, 1.0, 16).reshape(2, 8)


@pytest.mark.parametrize("mode, pixels, file_name", [
    ("I;16", (_RAMP * 65535).round().astype(np.uint16), "gray16.png"),
    ("I", (_RAMP * 65535).round().astype(np.int32), "gray32.tif"),
    ("F", _RAMP.astype(np.float32), "float.tif"),
    ("L", (_RAMP * 255).round().astype(np.uint8), "gray8.png"),
])
def test_6_wide_and_gray_modes_are_scaled_not_clipped(tmp_path, mode, pixels, file_name):
    """Fault 6: a 16-bit grayscale PNG became a white image. Now each mode is scaled to [0, 1]
    by its own range: the ramp stays a ramp, in all three channels."""
    image = Image.fromarray(pixels)
    assert image.mode == mode
    rgb, _ = _one_image_set(tmp_path, image, file_name)[0]
    assert rgb.shape == (3, 2, 8) and torch.equal(rgb[0], rgb[1]) and torch.equal(rgb[0], rgb[2])
    assert torch.allclose(rgb[0].double(), torch.from_numpy(_RAMP), atol=1 / 255 / 2)


# ------------------------------------------------------------ 7: a split without annotations


def test_7_training_on_a_split_without_annotations_is_an_error(smoke_root, tmp_path):
    """Fault 7: a split with no annotations trained with loss_rpn_box 0.0. Now it is refused
    (``train`` checks its split as in the case of fault 5)."""
    root = copy_set(smoke_root, tmp_path / "empty", without_annotations)
    with pytest.raises(CocoFormatError, match=r"instances_train.json: no annotations"):
        load_coco_split(root, "train", with_masks=False).check_for_training(progress=False)


def test_7_eval_on_a_split_without_annotations_is_valid_json_with_null(seed5, tmp_path):
    """...and ``eval`` printed ``"AR100": NaN``, which is not JSON: now null."""
    root = copy_set(seed5["root"], tmp_path / "empty", without_annotations)
    out = eval_cli(seed5["runs"], root)
    assert out.returncode == 0, out.stderr

    def no_nan(constant):
        raise AssertionError(f"{constant} is not JSON")

    metrics = json.loads(out.stdout, parse_constant=no_nan)["metrics"]
    assert set(metrics) == {"AR100", "AR1k", "AR1k_s", "AR1k_m", "AR1k_l"} and all(v is None for v in metrics.values())


# ------------------------------------------------------------ 8: devices, checked first


@pytest.mark.parametrize("verb, device, expected", [
    ("train", "cuda", "--device cuda: this machine has no CUDA GPU that torch can use; use --device cpu"),
    ("eval", "gpu0", "--device gpu0: not a device (cpu, cuda, cuda:N, ...)"),
])
def test_8_an_unusable_device_is_one_line_before_any_data_or_model(verb, device, expected, tmp_path):
    """Fault 8: a torch traceback after the data and the model were loaded. (``CUDA_VISIBLE_DEVICES``
    empty: no GPU, on any machine.)"""
    out = run_cli(verb, "--table", 1, "--row", "fpn", "--preset", "smoke", "--device", device, "--runs", tmp_path,
                  "--data", tmp_path / "data", env={"CUDA_VISIBLE_DEVICES": ""})
    assert out.returncode == 2 and expected in one_line(out.stderr)
    assert not (tmp_path / "data").exists()


# ------------------------------------------------------------ 9: a damaged checkpoint


def test_9_eval_on_a_damaged_checkpoint_names_the_file(seed5, tmp_path):
    """Fault 9: torch's ``PytorchStreamReader failed reading zip archive``, without the file."""
    runs = tmp_path / "runs"
    shutil.copytree(seed5["runs"], runs)
    ckpt = runs / "table1" / "fpn" / "last.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    out = eval_cli(runs, seed5["root"])
    assert out.returncode == 1
    line = one_line(out.stderr)
    assert f"{ckpt}: not a readable fpnlib checkpoint" in line and "move it away and train the row again" in line


# ------------------------------------------------------------ 10: one line, and --debug


def test_10_debug_shows_the_traceback_of_a_known_error(tmp_path):
    """Fault 10: every error printed a full traceback. Now a known one prints one line and exits 1
    (the cases above); ``--debug``, before or after the verb, shows the traceback."""
    from fpnlib.__main__ import build_parser

    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("my notes")
    out = run_cli("train", "--table", 1, "--row", "fpn", "--preset", "smoke", "--data", folder, "--runs", tmp_path,
                  "--debug")
    assert out.returncode == 1 and out.stderr.startswith("Traceback") and "DataFolderError: " in out.stderr
    for args in (["--debug", "eval"], ["eval", "--debug"], ["eval"]):
        parsed = build_parser().parse_args([*args, "--table", "1", "--row", "fpn"])
        assert parsed.debug == ("--debug" in args)


def test_10_sigterm_prints_one_line_naming_the_checkpoint(smoke_root, tmp_path):
    """...and SIGTERM printed 30 lines of KeyboardInterrupt. Now one line names the checkpoint
    written, and the exit code is a shell's for SIGTERM (128 + 15)."""
    run_dir = tmp_path / "runs" / "table1" / "fpn"
    proc = subprocess.Popen([sys.executable, "-m", "fpnlib", "train", "--table", "1", "--row", "fpn", "--preset",
                             "smoke", "--iterations", "200", "--data", str(smoke_root), "--runs", str(tmp_path / "runs")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600  # the row starts after the (shortened) pre-training
    while not (run_dir / "log.jsonl").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)  # the log is opened as the training loop starts
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "KeyboardInterrupt" not in stderr
    saved = torch.load(run_dir / "last.pt", weights_only=False)["iteration"]
    assert one_line(stderr) == (f"python -m fpnlib train: stopped by SIGTERM; checkpoint written: {run_dir / 'last.pt'} "
                                f"(iteration {saved}); the same command resumes from it")
