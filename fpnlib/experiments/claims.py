"""The claims report: every headline claim of the paper that our tables can check, in one place.

Each table module lists its claims (row, row, metric, text: the first row expected higher) and
checks them on its record (``tables.check_claims``). This module gathers them from the records
in ``results/<preset>/``: our two numbers, the paper's two numbers and the verdict (reproduced,
NOT reproduced, or inconclusive when ours differ by less than ``INCONCLUSIVE_BELOW``). It is
never tuned: a table that is missing is listed as not run.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path

from fpnlib.experiments.tables import INCONCLUSIVE_BELOW

CLAIM_TABLES = (1, 2, 3, 5, 6)


def collect_claims(results_dir) -> dict[int, list | None]:
    """Table number -> its checked claims (``None``: no ``tableN.json`` in ``results_dir``)."""
    out = {}
    for n in CLAIM_TABLES:
        path = Path(results_dir) / f"table{n}.json"
        if not path.exists():
            out[n] = None
            continue
        module = importlib.import_module(f"fpnlib.experiments.table{n}")
        out[n] = module.claims(json.loads(path.read_text()))
    return out


def render_claims(claims: dict[int, list | None], preset: str) -> str:
    """Markdown: one line per claim, grouped by table, with a tally."""
    lines = [f"# The paper's claims, checked on our `{preset}` results", "",
             f"Direction only; |difference| < {INCONCLUSIVE_BELOW} point is inconclusive. "
             "Each table's own Markdown has its setting, provenance and deviations.", ""]
    tally: dict[str, int] = {}
    for n, found in claims.items():
        lines.append(f"## Table {n}")
        if found is None:
            lines += [f"- not run under `{preset}` yet (`python -m fpnlib table {n} --preset {preset}`)", ""]
            continue
        for c in found:
            tally[c.verdict] = tally.get(c.verdict, 0) + 1
            lines.append(f"- {c}")
        lines.append("")
    lines.append("Tally: " + (", ".join(f"{v} {k}" for k, v in sorted(tally.items())) or "no claims checked"))
    return "\n".join(lines)


def write_claims_report(results_dir, preset: str) -> Path:
    """``results_dir/claims.md`` and ``claims.json`` from the table records found there."""
    claims = collect_claims(results_dir)
    results_dir = Path(results_dir)
    (results_dir / "claims.md").write_text(render_claims(claims, preset) + "\n")
    from fpnlib.provenance import provenance

    record = {"claims": {str(n): None if found is None else [
        {"text": c.text, "metric": c.metric, "rows": list(c.rows), "ours": list(c.ours), "paper": list(c.paper),
         "verdict": c.verdict} for c in found] for n, found in claims.items()},
        # each claim's numbers come from these recorded tables, with their own provenance
        "sources": {f"table{n}.json": json.loads((results_dir / f"table{n}.json").read_text())["provenance"]
                    for n, found in claims.items() if found is not None},
        "provenance": provenance(preset, 0, step="claims report")}
    (results_dir / "claims.json").write_text(json.dumps(record, indent=1) + "\n")
    return results_dir / "claims.md"
