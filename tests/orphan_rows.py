"""Helpers of ``tests/test_tables.py``'s orphan test: a parent that runs rows in workers (run as
a script), and the row a worker runs (imported by the spawned workers, so a module of its own)."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path


def sleeping_row(variant: str) -> dict:
    """A row that records its process and then sleeps far longer than the test waits."""
    (Path(os.environ["ORPHAN_DIR"]) / f"{variant}.pid").write_text(str(os.getpid()))
    time.sleep(300)
    return {}


if __name__ == "__main__":
    from fpnlib.experiments.tables import run_rows

    out = Path(sys.argv[1])
    run_rows({"table": 0}, ["a", "b"], sleeping_row, out, render=str, preset="smoke", seed=0, device="cpu", jobs=2)
