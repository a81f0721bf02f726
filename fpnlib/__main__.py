"""The command line: ``python -m fpnlib VERB …`` (``python -m fpnlib --help`` lists the verbs)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fpnlib.config import PRESETS
from fpnlib.experiments import TABLES


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: a mistyped flag gets one clear line, not a usage dump."""

    def error(self, message):
        sys.stderr.write(f"{self.prog}: error: {message} (see '{self.prog} --help')\n")
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m fpnlib",
                     description="Feature Pyramid Networks for Object Detection, reproduced step by step.")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    verbs.required = True

    p = verbs.add_parser("data", help="generate the embedded COCO-format data set of a preset")
    p.add_argument("--preset", choices=[k for k, v in PRESETS.items() if v.data is not None], default="cpu")
    p.add_argument("--root", default=None, help="output folder (default: data/<preset>)")
    p.add_argument("--workers", type=int, default=2, help="processes (the output does not depend on it)")
    p.add_argument("--seed", type=int, default=None, help="override the preset's seed")
    p.add_argument("--force", action="store_true", help="regenerate even if the set is there")

    p = verbs.add_parser("stats", help="print the statistics of a COCO-format annotation file")
    p.add_argument("ann_file")
    p.add_argument("--images", default=None, help="image folder (to count grayscale images)")

    p = verbs.add_parser("reproduce", help="data, statistics, the tables and every lesson notebook under a preset")
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--tables", type=int, nargs="*", choices=list(TABLES), default=None,
                   help=f"tables to run (default: all of {list(TABLES)}); trained rows are reused")
    p.add_argument("--workers", type=int, default=2)

    p = verbs.add_parser("table", help="regenerate one of the paper's tables beside the paper's numbers")
    p.add_argument("number", type=int, choices=list(TABLES), help="table number (Table 4 trains nothing: the paper's ranking + our best detector)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--out", default=None, help="results folder (default: results/<preset>)")
    p.add_argument("--runs", default=None, help="checkpoints root (default: runs/<preset>; table N uses <root>/tableN)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)

    verbs.add_parser("report", help="rewrite README's result blocks from results/")

    p = verbs.add_parser("student", help="write the student edition of the notebooks: solutions stubbed, outputs cleared")
    p.add_argument("--out", default="student", help="output folder (default: student/)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.verb == "data":
        from fpnlib.data.prepare import ensure_dataset

        if args.seed is None:  # the preset's own set: reused when already generated
            root = ensure_dataset(args.preset, root=args.root, workers=args.workers, force=args.force)
        else:
            from fpnlib.config import get_preset
            from fpnlib.data.synthetic import generate

            root = args.root or f"data/{args.preset}-seed{args.seed}"
            generate(root, get_preset(args.preset, seed=args.seed).data, workers=args.workers)
        print(f"data set of preset {args.preset!r} in {root}")
    elif args.verb == "stats":
        from fpnlib.data.stats import dataset_statistics

        print(json.dumps(dataset_statistics(args.ann_file, args.images), indent=1))
    elif args.verb == "reproduce":
        from fpnlib.reproduce import reproduce

        times = reproduce(args.preset, workers=args.workers, tables=args.tables)
        print(json.dumps({k: round(v, 1) for k, v in times.items()}, indent=1))
    elif args.verb == "table":
        from fpnlib.data.prepare import ensure_dataset
        from fpnlib.experiments import run_table
        from fpnlib.provenance import REPO_ROOT
        from fpnlib.report import RESULTS_DIR

        out = args.out or RESULTS_DIR / args.preset
        runs = args.runs or REPO_ROOT / "runs" / args.preset
        root = ensure_dataset(args.preset)
        run_table(args.number, args.preset, root, runs, out, seed=args.seed, device=args.device)
        from fpnlib.experiments.claims import write_claims_report

        write_claims_report(out, args.preset)  # the claims of every table run so far
        print((Path(out) / f"table{args.number}.md").read_text())
    elif args.verb == "report":
        from fpnlib.report import README, update_readme

        print(f"{README}: {'updated' if update_readme() else 'already in sync with results/'}")
    elif args.verb == "student":
        from fpnlib.student import write_student_editions

        for path in write_student_editions(args.out):
            print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
