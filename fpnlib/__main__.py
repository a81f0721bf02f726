"""The command line: ``python -m fpnlib VERB …`` (``python -m fpnlib --help`` lists the verbs)."""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from fpnlib.config import PRESETS
from fpnlib.experiments import TABLES


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: a mistyped flag gets one clear line, not a usage dump."""

    def error(self, message):
        sys.stderr.write(f"{self.prog}: error: {message} (see '{self.prog} --help')\n")
        raise SystemExit(2)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < 1:  # 0 or less would 'train' nothing, and eval would report the untrained model
        raise argparse.ArgumentTypeError(f"must be a positive number of iterations, got {value}")
    return value


def _with_debug(parser: argparse.ArgumentParser, default) -> None:
    parser.add_argument("--debug", action="store_true", default=default,
                        help="on an error, show the Python traceback instead of one line")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m fpnlib",
                     description="Feature Pyramid Networks for Object Detection, reproduced step by step.")
    _with_debug(parser, False)
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    verbs.required = True

    p = verbs.add_parser("data", help="generate the embedded COCO-format data set of a preset")
    p.add_argument("--preset", choices=[k for k, v in PRESETS.items() if v.data is not None], default="cpu")
    p.add_argument("--root", default=None, help="output folder (default: data/<preset>)")
    p.add_argument("--workers", type=int, default=2, help="processes (the output does not depend on it)")
    p.add_argument("--seed", type=int, default=None, help="override the preset's seed")
    p.add_argument("--force", action="store_true", help="regenerate a set fpnlib generated, even one of another "
                   "configuration in --root (a folder it did not make is never written)")

    p = verbs.add_parser("stats", help="print the statistics of a COCO-format annotation file")
    p.add_argument("ann_file")
    p.add_argument("--images", default=None, help="image folder (to count grayscale images)")

    p = verbs.add_parser("reproduce", help="data, statistics, the tables and every lesson notebook under a preset")
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--tables", type=int, nargs="*", choices=list(TABLES), default=None,
                   help=f"tables to run (default: all of {list(TABLES)}); trained rows are reused")
    p.add_argument("--workers", type=int, default=2, help="processes generating the data")
    p.add_argument("--jobs", type=int, default=2, help="table rows trained at once on a CPU (1: one at a time, "
                   "with all threads; on CUDA always 1)")

    p = verbs.add_parser("pretrain", help="pre-train a preset's bottom-up ResNet as a classifier of object crops "
                         "(the stand-in for ImageNet, Sec. 5); every table row starts from it")
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--out", default=None, help="results folder for pretrain.json (default: results/<preset>)")
    p.add_argument("--runs", default=None, help="checkpoints root (default: runs/<preset>; weights in <root>/pretrain)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)

    p = verbs.add_parser("table", help="regenerate one of the paper's tables beside the paper's numbers")
    p.add_argument("number", type=int, choices=list(TABLES), help="table number (Table 4 trains nothing: the paper's ranking + our best detector)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--out", default=None, help="results folder (default: results/<preset>)")
    p.add_argument("--runs", default=None, help="checkpoints root (default: runs/<preset>; table N uses <root>/tableN)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=1, help="rows trained at once on a CPU, one thread each when > 1 "
                   "(make reproduce trains 2 at once; a row's numbers depend on its thread count)")

    for verb, text in (("train", "train one row of a table with its preset's budget (resumable; runs under torchrun)"),
                       ("eval", "print the metrics of a row trained by 'train' (loads its finished checkpoint)")):
        p = verbs.add_parser(verb, help=text)
        p.add_argument("--table", type=int, required=True, choices=list(TABLES), help=f"table number ({text_rows()})")
        p.add_argument("--row", required=True, help="row: the paper's letter (a, b, ...) or our name (fpn, c4, ...)")
        p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
        p.add_argument("--iterations", type=_positive_int, default=None,
                       help="cut the budget to K > 0 iterations (lr steps kept at the same fractions)"
                            + ("" if verb == "train" else "; default: what the checkpoint was trained with"))
        p.add_argument("--runs", default=None, help="checkpoints root (default: runs/<preset>; the row trains "
                                                    "in <root>/table<N>/<row>, where 'table N' finds it)")
        p.add_argument("--data", default=None, help="data set root, read as it is (default: data/<preset>, generated "
                                                    "if missing; a new or empty folder gets the preset's set)")
        p.add_argument("--device", default="cpu", help="cpu, cuda (under torchrun: each process's own GPU)")
        p.add_argument("--seed", type=int, default=None,
                       help="default: 0" if verb == "train" else "default: the checkpoint's")

    verbs.add_parser("report", help="rewrite README's result blocks from results/")

    p = verbs.add_parser("preset", help="print everything a preset sets: data, and per table the model and schedule")
    p.add_argument("name", choices=sorted(PRESETS))

    p = verbs.add_parser("student", help="write the student edition of the notebooks: solutions stubbed, outputs cleared")
    p.add_argument("--out", default="student", help="output folder (default: student/)")

    p = verbs.add_parser("bench", help="fpnlib beside torchvision's FasterRCNN, same configuration: "
                         "images/s, per-stage time, peak memory -> results/bench/<hardware>.json")
    p.add_argument("--configs", nargs="*", default=None,
                   help="cpu_preset, r50_fpn (512 px), r50_fpn_gpu (800x1333); default: the two of the device")
    p.add_argument("--reps", type=int, default=10, help="timed repetitions per library and mode (after warm-up)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes")
    p.add_argument("--no-runtime", action="store_true", help="skip the paper's runtime comparison (Sec. 5.2.3)")
    p.add_argument("--out", default=None, help="output folder (default: results/bench/)")
    p.add_argument("--compile", action="store_true",
                   help="fpnlib's backbone and FPN through torch.compile (an A/B arm; compiled during warm-up)")
    for sub in verbs.choices.values():  # --debug after the verb too; SUPPRESS keeps one given before it
        _with_debug(sub, argparse.SUPPRESS)
    return parser


# ---------------------------------------------------------------- train / eval of one table row

TRAINABLE = (1, 6)  # tables whose rows train on their own; 2, 3 and 5 build on earlier tables' runs


def text_rows() -> str:
    return f"rows of Tables {', '.join(map(str, TRAINABLE))}; Tables 2 and 5 build on earlier runs: use 'table N'"


def _table_module(number: int):
    import importlib

    return importlib.import_module(f"fpnlib.experiments.table{number}")


def _resolve_row(number: int, row: str, preset: str) -> str:
    """The row's variant name (its run folder) from the paper's letter / label or our name; one
    clear error otherwise."""
    if number not in TRAINABLE:
        why = {2: "Table 2 trains Fast R-CNN on the proposals of Table 1's FPN RPN",
               3: "Table 3 is built from Table 1's RPNs and Fast R-CNNs trained on their proposals",
               5: "Table 5 builds on Table 3's FPN detector",
               4: "Table 4 trains nothing (the paper's ranking + our best detector)"}[number]
        raise _RowError(f"{why}; run the whole table instead: python -m fpnlib table {number} --preset {preset}")
    rows = _table_module(number).ROWS  # paper's letter / label -> our variant name
    if row in rows.values():
        return row
    if row in rows:
        return rows[row]
    choices = ", ".join(f"{k} ({v})" if k != v else v for k, v in rows.items())
    raise _RowError(f"Table {number} has no row {row!r}; choose one of: {choices}")


class _RowError(ValueError):
    pass


def _row_schedule(number: int, variant: str, preset: str, iterations: int | None, run_dir):
    """The schedule the table's ``run_row`` trains this row in ``run_dir`` with (the same function, at the
    rate a table run lowered it to if it diverged: ``tables.lowered_lr``)."""
    from fpnlib.experiments.tables import lowered_lr

    schedule_for = _table_module(number).schedule_for
    own = schedule_for(variant, preset, iterations)
    lowered = lowered_lr(run_dir, own.lr)
    return own if lowered is None else schedule_for(variant, preset, iterations, lowered)


def _train_row(number: int, variant: str, preset: str, data_root, run_dir, seed: int, device: str,
               iterations: int | None, progress: bool, pretrained) -> dict:
    """The training half of the table's ``run_row``: its model (``build_row``, started from the
    ``pretrained`` weights), its train split, its schedule. The evaluation half is ``eval`` (which
    calls ``run_row`` itself)."""
    from fpnlib.experiments.pretrain import initialised, start_from
    from fpnlib.config import get_preset
    from fpnlib.data.coco import load_coco_split
    from fpnlib.data.transforms import build_transforms
    from fpnlib.engine.train import train

    module = _table_module(number)
    data = get_preset(preset).data
    sizes = (data.image_size, data.max_size) if data else (800, 1333)
    train_set = load_coco_split(data_root, "train", transforms=build_transforms(True, *sizes), with_masks=number == 6)
    model = initialised(module.build_row(variant, preset, seed), pretrained)
    return train(model, train_set, _row_schedule(number, variant, preset, iterations, run_dir), run_dir, seed=seed,
                 device=device, progress=progress, description=f"Table {number} {variant}",
                 start_from=start_from(pretrained))


def _checkpointed_iterations(number: int, variant: str, preset: str, state: dict, run_dir) -> int | None:
    """The ``iterations`` argument that gives the checkpoint's schedule (None: the full budget)."""
    from dataclasses import asdict

    n = state["schedule"]["iterations"]
    for k in (None, n, n // 2):  # n // 2: Table 6's dual_2x_train runs twice the given iterations
        if asdict(_row_schedule(number, variant, preset, k, run_dir)) == state["schedule"]:
            return k
    raise _RowError(f"the checkpoint's schedule is not preset {preset!r}'s budget for this row; "
                    f"retrain it with python -m fpnlib train")


def _pretrained(args, root, seed: int, iterations: int | None):
    """The pre-trained weights a row of ``args.preset`` starts from (pre-trained first if missing;
    ``iterations`` cuts the pre-training as it cuts the row, as ``table`` does)."""
    from fpnlib.experiments.pretrain import pretrained_weights
    from fpnlib.provenance import REPO_ROOT

    return pretrained_weights(args.preset, root, Path(args.runs or REPO_ROOT / "runs" / args.preset), seed=seed,
                              device=args.device, progress=False, iterations=iterations)


def _check_device(device: str, parser) -> None:
    """A usage error for a device torch does not know or this machine lacks, before any data or
    model is loaded."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        parser.error(f"--device {device}: not a device (cpu, cuda, cuda:N, ...)")
    if dev.type == "cuda":  # counted, not touched: a tensor would hold a context on GPU 0 in every torchrun process
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            parser.error(f"--device {device}: this machine has no CUDA GPU that torch can use; use --device cpu")
        if (dev.index or 0) >= count:
            parser.error(f"--device {device}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    elif dev.type != "cpu":
        try:
            torch.empty(0, device=dev)
        except (RuntimeError, AssertionError) as e:  # a backend this torch was not built with, or no such device
            parser.error(f"--device {device}: this torch cannot use it ({str(e).splitlines()[0].split('. ')[0]})")


def _train_or_eval(args, parser) -> None:
    from fpnlib.data.coco import load_coco_split
    from fpnlib.data.prepare import dataset_for
    from fpnlib.engine import distributed
    from fpnlib.provenance import REPO_ROOT

    try:
        variant = _resolve_row(args.table, args.row, args.preset)
    except _RowError as e:
        parser.error(str(e))
    _check_device(args.device, parser)
    run_dir = Path(args.runs or REPO_ROOT / "runs" / args.preset) / f"table{args.table}" / variant
    retrain = (f"python -m fpnlib train --table {args.table} --row {variant} --preset {args.preset}"
               + (f" --runs {args.runs}" if args.runs else ""))
    if args.verb == "train":
        distributed.init_from_env()  # under torchrun: join the other processes (DDP); else nothing
        seed = 0 if args.seed is None else args.seed
        if distributed.is_main():  # one process generates the data set and pre-trains, the others then find them
            root = dataset_for(args.preset, root=args.data)
            # a bad image fails now, before the pre-training and the row, not hours in
            load_coco_split(root, "train", with_masks=False).check_for_training()
            weights = _pretrained(args, root, seed, args.iterations)
        distributed.barrier()
        if not distributed.is_main():
            root = dataset_for(args.preset, root=args.data)
            weights = _pretrained(args, root, seed, args.iterations)
        run = _train_row(args.table, variant, args.preset, root, run_dir, seed, args.device, args.iterations,
                         progress=distributed.is_main(), pretrained=weights)
        if distributed.is_main():
            _print_json({"table": args.table, "row": variant, "run_dir": str(run_dir),
                         "processes": distributed.world_size(), **{k: v for k, v in run.items() if k != "wall_time_s"}})
            print(f"metrics: python -m fpnlib eval --table {args.table} --row {variant} --preset {args.preset}"
                  + (f" --runs {args.runs}" if args.runs else "") + (f" --data {args.data}" if args.data else ""))
        distributed.shutdown()
        return
    from fpnlib.engine.train import _read_checkpoint

    if distributed.init_from_env():
        parser.error("eval runs in one process; start it with python, not torchrun")
    ckpt = run_dir / "last.pt"
    if not ckpt.exists():
        parser.error(f"no checkpoint in {run_dir}; train the row first: {retrain}")
    state = _read_checkpoint(ckpt, "cpu", ("iteration", "schedule", "seed"),
                             f"; move it away and train the row again: {retrain}")
    try:
        iterations = args.iterations if args.iterations is not None else \
            _checkpointed_iterations(args.table, variant, args.preset, state, run_dir)
    except _RowError as e:
        parser.error(str(e))
    total = _row_schedule(args.table, variant, args.preset, iterations, run_dir).iterations
    if state["iteration"] < total:
        parser.error(f"{ckpt} is unfinished (iteration {state['iteration']} of {total}); continue it: {retrain}"
                     + (f" --iterations {iterations}" if iterations is not None else ""))
    root = dataset_for(args.preset, root=args.data)
    seed = state["seed"] if args.seed is None else args.seed
    result = _table_module(args.table).run_row(variant, args.preset, root, run_dir, seed=seed, device=args.device,
                                               iterations=iterations, progress=False,
                                               pretrained=_pretrained(args, root, seed, iterations))
    _print_json(result)


def _print_json(record: dict) -> None:
    """``record`` as strict JSON: a metric that is not a number (no ground truth to recall, NaN
    in pycocotools' summary) is null, which every JSON reader takes."""
    def finite(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: finite(v) for k, v in x.items()}
        return [finite(v) for v in x] if isinstance(x, (list, tuple)) else x

    print(json.dumps(finite(record), indent=1, default=list, allow_nan=False))


def _one_line(error: BaseException) -> str:
    """An error's message and notes (where a checkpoint went) on one line."""
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__
    return "; ".join([text, *getattr(error, "__notes__", [])])


def _known(error: Exception) -> bool:
    """Errors that say what went wrong in their message (a bad file, a full disk, a diverged loss,
    a GPU out of memory): one line is enough. Any other is a bug, and keeps its traceback."""
    if isinstance(error, (ValueError, OSError)):
        return True
    if "torch" not in sys.modules:
        return False
    import torch

    from fpnlib.engine.train import TrainingDiverged

    return isinstance(error, (TrainingDiverged, torch.cuda.OutOfMemoryError))


def main(argv: list[str] | None = None) -> int:
    """Run a verb. A known error prints one line and returns 1; Ctrl-C or SIGTERM prints one line
    (with the checkpoint a training run wrote) and returns 128 + the signal's number, as a shell
    reports a process the signal stopped. ``--debug`` raises instead, with the traceback."""
    import signal

    parser = build_parser()
    args = parser.parse_args(argv)
    prog = f"{parser.prog} {args.verb}"
    try:
        return _run(args, parser)
    except KeyboardInterrupt as stop:
        if args.debug:
            raise
        sig = signal.SIGTERM if "SIGTERM" in str(stop) else signal.SIGINT  # train's handler names it
        notes = getattr(stop, "__notes__", [])
        sys.stderr.write(f"{prog}: stopped by {sig.name}" + "".join(f"; {n}" for n in notes) + "\n")
        return 128 + sig
    except Exception as error:
        if args.debug or not _known(error):
            raise
        sys.stderr.write(f"{prog}: error: {_one_line(error)}\n")
        return 1


def _run(args, parser) -> int:
    if args.verb == "data":
        from fpnlib.data.prepare import ensure_dataset

        # the preset's own set, or with another seed: reused when already generated
        root = ensure_dataset(args.preset, root=args.root, workers=args.workers, force=args.force, seed=args.seed)
        print(f"data set of preset {args.preset!r} in {root}")
    elif args.verb == "stats":
        from fpnlib.data.stats import dataset_statistics

        print(json.dumps(dataset_statistics(args.ann_file, args.images), indent=1))
    elif args.verb == "reproduce":
        from fpnlib.reproduce import reproduce

        times = reproduce(args.preset, workers=args.workers, tables=args.tables, jobs=args.jobs)
        print(json.dumps({k: round(v, 1) for k, v in times.items()}, indent=1))
    elif args.verb == "pretrain":
        from fpnlib.data.prepare import ensure_dataset
        from fpnlib.experiments.pretrain import pretrained_weights
        from fpnlib.provenance import REPO_ROOT
        from fpnlib.report import RESULTS_DIR

        out = Path(args.out or RESULTS_DIR / args.preset)
        path = pretrained_weights(args.preset, ensure_dataset(args.preset), Path(args.runs or REPO_ROOT / "runs" / args.preset),
                                  seed=args.seed, device=args.device, out_dir=out)
        print(json.dumps(json.loads((out / "pretrain.json").read_text())["held_out"], indent=1))
        print(f"weights: {path}")
    elif args.verb == "table":
        from fpnlib.data.prepare import ensure_dataset
        from fpnlib.experiments import run_table
        from fpnlib.provenance import REPO_ROOT
        from fpnlib.report import RESULTS_DIR

        _check_device(args.device, parser)
        out = args.out or RESULTS_DIR / args.preset
        runs = args.runs or REPO_ROOT / "runs" / args.preset
        root = ensure_dataset(args.preset)
        run_table(args.number, args.preset, root, runs, out, seed=args.seed, device=args.device, jobs=args.jobs)
        from fpnlib.experiments.claims import write_claims_report

        write_claims_report(out, args.preset)  # the claims of every table run so far
        print((Path(out) / f"table{args.number}.md").read_text())
    elif args.verb in ("train", "eval"):
        _train_or_eval(args, parser)
    elif args.verb == "report":
        from fpnlib.report import README, update_readme

        print(f"{README}: {'updated' if update_readme() else 'already in sync with results/'}")
    elif args.verb == "preset":
        from fpnlib.config import describe_preset

        print(json.dumps(describe_preset(args.name), indent=1, default=list))
    elif args.verb == "student":
        from fpnlib.student import write_student_editions

        for path in write_student_editions(args.out):
            print(path)
    elif args.verb == "bench":
        from fpnlib.bench import BENCH_DIR, bench, summary

        path = bench(args.configs, reps=args.reps, warmup=args.warmup, device=args.device,
                     out_dir=Path(args.out) if args.out else BENCH_DIR, memory=not args.no_memory,
                     runtime=not args.no_runtime, compile=args.compile)
        print(summary(json.loads(path.read_text())))
        print(f"written: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
