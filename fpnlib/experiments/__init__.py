"""The paper's experiments, one module per table: rows as configurations, results with provenance.

``run_table(n, …)`` runs table ``n`` with the folder conventions the CLI, ``reproduce`` and the
notebooks share: the pre-trained bottom-up weights in ``runs_root/pretrain`` (``pretrain``),
checkpoints in ``runs_root/table<n>/<row>``, results in ``out_dir/table<n>.json|md``. Tables 2, 3
and 5 build on earlier runs (2 on Table 1's FPN RPN; 3 on Table 1's RPNs and Table 2(c); 5 on
Table 3(c)), found in the same ``runs_root`` (and trained there first if missing); Table 4 reads
``out_dir``'s Tables 3 and 5 for our best detector.
"""
from __future__ import annotations

from pathlib import Path

TABLES = (1, 2, 3, 5, 4, 6)  # Table 4 trains nothing: the paper's COCO ranking + our best detector


def run_table(number: int, preset: str, data_root, runs_root, out_dir, seed: int = 0, device: str = "cpu",
              progress: bool = True, iterations: int | None = None, jobs: int = 1) -> dict:
    """Run Table ``number`` under ``preset``; returns its record (also written to ``out_dir``).
    ``jobs``: rows trained at once on a CPU (``tables.run_rows``); Tables 4 and 5 have one run each."""
    runs_root = Path(runs_root)
    common = dict(seed=seed, device=device, progress=progress, iterations=iterations)
    if number != 4:  # every network starts from the pre-trained bottom-up ResNet (Sec. 5)
        from .pretrain import pretrained_weights

        common["pretrained"] = pretrained_weights(preset, data_root, runs_root, out_dir=out_dir, **common)
    rows = dict(common, jobs=jobs)
    if number == 1:
        from .table1 import run_table1
        return run_table1(preset, data_root, runs_root / "table1", out_dir, **rows)
    if number == 2:
        from .table2 import run_table2
        return run_table2(preset, data_root, runs_root / "table1", runs_root / "table2", out_dir, **rows)
    if number == 3:
        from .table3 import run_table3
        return run_table3(preset, data_root, runs_root / "table3", out_dir, **rows)
    if number == 5:
        from .table5 import run_table5
        return run_table5(preset, data_root, runs_root / "table3", runs_root / "table5", out_dir, **common)
    if number == 4:
        from .table4 import run_table4
        return run_table4(preset, out_dir)
    if number == 6:
        from .table6 import run_table6
        return run_table6(preset, data_root, runs_root / "table6", out_dir, **rows)
    raise ValueError(f"no runnable Table {number}; choose one of {TABLES}")
