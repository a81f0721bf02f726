"""The claims report: every headline claim of the paper that our tables can check, in one place.

Each table module lists its claims (row, row, metric, text: the first row expected higher) and
checks them on one record (``tables.check_claims``: the direction on that run). A claim is a
property of the method, not of one run, so this report reads every recorded seed of a table
(``results/<preset>/table<N>.json`` and ``results/<preset>/seed<k>/table<N>.json``) and calls a
claim, by the margin in the paper's direction on each seed (``across_seeds``):

* **reproduced**: it holds by at least ``INCONCLUSIVE_BELOW`` points on every seed;
* **NOT reproduced**: the opposite holds by at least that much on every seed;
* **inconclusive**: the margin is below that on every seed;
* **seed-dependent**: the seeds disagree (one holds, another does not).

With one recorded seed the verdict says so. A comparison whose two rows trained at different
learning rates (a row's own ``lr``) is marked confounded: its margin is not the features' alone.
Never tuned: a table that is missing is listed as not run.
"""
from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path

from fpnlib.experiments.tables import INCONCLUSIVE_BELOW, Claim

CLAIM_TABLES = (1, 2, 3, 5, 6)


def across_seeds(margins, paper_margin: float, threshold: float = INCONCLUSIVE_BELOW) -> str:
    """The verdict of a claim whose first-minus-second difference was ``margins`` on the seeds,
    against the paper's ``paper_margin`` (its sign is the claim's direction)."""
    sign = 1.0 if paper_margin >= 0 else -1.0
    states = {"holds" if m * sign >= threshold else "contradicted" if m * sign <= -threshold else "tie"
              for m in margins}
    if states == {"holds"}:
        return "reproduced"
    if states == {"contradicted"}:
        return "NOT reproduced"
    if states == {"tie"}:
        return "inconclusive"
    return "seed-dependent"


@dataclass(frozen=True)
class SeededClaim:
    """A claim checked on every recorded seed: ``ours`` is the first seed's pair (what a
    single-run figure shows), ``by_seed`` every seed's pair, ``confounded`` why the margin is not
    the compared features' alone (or "")."""

    text: str
    metric: str
    rows: tuple[str, str]
    paper: tuple[float, float]
    by_seed: dict[int, tuple[float, float]]
    confounded: str = ""

    @property
    def ours(self) -> tuple[float, float]:
        return self.by_seed[min(self.by_seed)]

    @property
    def margins(self) -> dict[int, float]:
        return {s: a - b for s, (a, b) in self.by_seed.items()}

    @property
    def verdict(self) -> str:
        return across_seeds(list(self.margins.values()), self.paper[0] - self.paper[1])

    def __str__(self) -> str:
        pa, pb = self.paper
        seeds = ", ".join(f"seed {s} {a:.1f} vs {b:.1f} ({a - b:+.1f})" for s, (a, b) in sorted(self.by_seed.items()))
        one = " (one seed recorded)" if len(self.by_seed) == 1 else ""
        why = f"; confounded: {self.confounded}" if self.confounded else ""
        return (f"{self.verdict:>14}{one}: {self.text} — {self.metric} {self.rows[0]} vs {self.rows[1]}: "
                f"ours {seeds}; paper {pa:.1f} vs {pb:.1f} ({pa - pb:+.1f}){why}")


def _confounded(records: list[dict], rows: tuple[str, str]) -> str:
    """Words for two rows that trained at different rates on any seed ("" when they did not)."""
    for record in records:
        lrs = [record["rows"][r].get("lr") for r in rows]
        if None not in lrs and lrs[0] != lrs[1]:
            return f"{rows[0]} trained at lr {lrs[0]:g}, {rows[1]} at {lrs[1]:g} (seed {record['provenance']['seed']})"
    return ""


def seed_records(results_dir, n: int) -> list[dict]:
    """Table ``n``'s records in ``results_dir`` (the recorded seed) and its ``seed*/`` folders."""
    base = Path(results_dir)
    paths = [base / f"table{n}.json"] + sorted(base.glob(f"seed*/table{n}.json"))
    return [json.loads(p.read_text()) for p in paths if p.exists()]


def combine(per_record: list[list[Claim]], records: list[dict]) -> list[SeededClaim]:
    """One ``SeededClaim`` per claim of the first record, with every record's numbers for it."""
    out = []
    for c in per_record[0]:
        by_seed = {}
        for found, record in zip(per_record, records):
            same = [x for x in found if (x.text, x.rows, x.metric) == (c.text, c.rows, c.metric)]
            if same:
                by_seed[record["provenance"]["seed"]] = same[0].ours
        out.append(SeededClaim(c.text, c.metric, c.rows, c.paper, by_seed, _confounded(records, c.rows)))
    return out


def collect_claims(results_dir) -> dict[int, list[SeededClaim] | None]:
    """Table number -> its claims over the recorded seeds (``None``: no ``tableN.json`` in ``results_dir``)."""
    out = {}
    for n in CLAIM_TABLES:
        records = seed_records(results_dir, n)
        if not (Path(results_dir) / f"table{n}.json").exists():
            out[n] = None
            continue
        module = importlib.import_module(f"fpnlib.experiments.table{n}")
        out[n] = combine([module.claims(r) for r in records], records)
    return out


def render_claims(claims: dict[int, list | None], preset: str) -> str:
    """Markdown: one line per claim, grouped by table, with a tally."""
    lines = [f"# The paper's claims, checked on our `{preset}` results", "",
             f"Direction only, on every recorded seed: reproduced = it holds by >= {INCONCLUSIVE_BELOW} point on "
             "each seed; NOT reproduced = the opposite holds by that much on each; inconclusive = under "
             f"{INCONCLUSIVE_BELOW} point on each; seed-dependent = the seeds disagree. "
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
         "by_seed": {str(k): list(v) for k, v in sorted(c.by_seed.items())}, "confounded": c.confounded,
         "verdict": c.verdict} for c in found] for n, found in claims.items()},
        # each claim's numbers come from these recorded tables, with their own provenance
        "sources": {p.relative_to(results_dir).as_posix(): json.loads(p.read_text())["provenance"]
                    for n, found in claims.items() if found is not None
                    for p in [results_dir / f"table{n}.json"] + sorted(results_dir.glob(f"seed*/table{n}.json"))},
        "provenance": provenance(preset, 0, step="claims report")}
    (results_dir / "claims.json").write_text(json.dumps(record, indent=1) + "\n")
    return results_dir / "claims.md"
