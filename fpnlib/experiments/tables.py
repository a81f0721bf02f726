"""What every table experiment shares: ours-beside-the-paper markdown, and the paper's claims
checked on our numbers (direction only, never tuned: a claim that fails is reported as such)."""
from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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
    lines += ["", f"The paper's claims on our numbers (direction only; |difference| < {INCONCLUSIVE_BELOW} point: inconclusive):"]
    lines += [f"- {c}" for c in claims]
    return "\n".join(lines)


def final_losses(log_path: Path) -> dict:
    """The last logged losses of a run: a row whose loss stayed high did not train."""
    lines = Path(log_path).read_text().splitlines() if Path(log_path).exists() else []
    last = json.loads(lines[-1]) if lines else {}
    return {k: round(v, 4) for k, v in last.items() if k.startswith("loss")}


def run_rows(record: dict, variants: Sequence[str], run_one: Callable[[str], dict], out_dir: Path,
             render: Callable[[dict], str], preset: str, seed: int, device) -> dict:
    """Run each row (``run_one(variant)`` returns its dict) and add its wall time; after every row
    write ``out_dir/table<N>.json`` with provenance (a stopped run shows what it has), at the end
    ``table<N>.md`` rendered by ``render``."""
    from fpnlib.provenance import provenance

    n = record["table"]
    t0 = time.perf_counter()
    for variant in variants:
        t = time.perf_counter()
        record["rows"][variant] = run_one(variant)
        record["rows"][variant]["wall_time_s"] = round(time.perf_counter() - t, 1)
        record["provenance"] = provenance(preset, seed, time.perf_counter() - t0, device=str(device))
        (Path(out_dir) / f"table{n}.json").write_text(json.dumps(record, indent=1, default=list) + "\n")
    (Path(out_dir) / f"table{n}.md").write_text(render(record) + "\n")
    return record
