"""Table 4 of the paper: single-model results on COCO test-dev, shown as published.

Nothing here is trained: the paper's ranking is reproduced from its numbers, and our best
detector (the highest-AP row of our Tables 3 and 5) is shown BELOW it, in a row of its own,
because it was measured on the embedded val set with a small network (pre-trained on object crops,
not ImageNet) and
cannot be ranked among COCO test-dev results.
"""
from __future__ import annotations

import json
from pathlib import Path

TABLE = "table4_coco_single_model"
COLUMNS = ("dev_AP50", "dev_AP", "dev_AP_s", "dev_AP_m", "dev_AP_l")
OUR_METRICS = ("AP50", "AP", "AP_s", "AP_m", "AP_l")
LABELS = {"ours_faster_rcnn_fpn": "**FPN Faster R-CNN (the paper's)**", "g_rmi": "G-RMI (2016 winner)",
          "attractionet": "AttractioNet (2016)", "faster_rcnn_plus3": "Faster R-CNN +++ (2015 winner)",
          "multipath_minival": "Multipath (on minival)", "ion": "ION (2015)"}


def best_detector(results_dir) -> dict | None:
    """Our highest-AP detector row among ``table3.json`` and ``table5.json`` (None if neither exists)."""
    best = None
    for n in (3, 5):
        path = Path(results_dir) / f"table{n}.json"
        if not path.exists():
            continue
        record = json.loads(path.read_text())
        for name, row in record["rows"].items():
            if best is None or row["metrics"]["AP"] > best["metrics"]["AP"]:
                best = {"table": n, "row": name, "metrics": row["metrics"], "provenance": record["provenance"]}
    return best


def render_table4(results_dir, preset: str) -> str:
    """Markdown: the paper's Table 4 sorted by test-dev AP, then our best row, set apart."""
    from fpnlib.reference import paper_rows, paper_tables

    rows = paper_rows(TABLE)
    fmt = lambda v: "–" if v is None else f"{v:.1f}"  # noqa: E731
    order = sorted(rows, key=lambda k: -(rows[k]["dev_AP"] or 0))
    lines = ["| method (the paper's Table 4, COCO test-dev) | backbone | image pyramid | " + " | ".join(COLUMNS) + " |",
             "|---|---|---|" + "---|" * len(COLUMNS)]
    for k in order:
        r = rows[k]
        lines.append(f"| {LABELS.get(k, k)} | {r['backbone']} | {'yes' if r['image_pyramid'] else 'no'} | "
                     + " | ".join(fmt(r[c]) for c in COLUMNS) + " |")
    best = best_detector(results_dir)
    lines += ["", f"Paper: {paper_tables()[TABLE]['caption']}. {paper_tables()[TABLE].get('note', '')}", ""]
    if best is None:
        lines.append(f"Ours: no detector run under `{preset}` yet (Tables 3 and 5 provide it).")
    else:
        prov = best["provenance"]
        lines += ["**Ours — a different data set, NOT comparable with the rows above** (the embedded val set, "
                  "a small network pre-trained on object crops, not ImageNet):", "",
                  "| our row | " + " | ".join(OUR_METRICS) + " |", "|---|" + "---|" * len(OUR_METRICS),
                  f"| Table {best['table']} {best['row']} | " + " | ".join(fmt(best["metrics"][m]) for m in OUR_METRICS) + " |",
                  "", f"From `table{best['table']}.json`: preset `{prov['preset']}`, seed {prov['seed']}, "
                  f"commit `{prov['commit'][:12]}`, {prov['date']}."]
    return "\n".join(lines)


def run_table4(preset: str, out_dir) -> dict:
    """Write ``out_dir/table4.md`` and ``table4.json`` (the paper's rows + our best, if any)."""
    from fpnlib.provenance import provenance
    from fpnlib.reference import paper_rows

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {"table": 4, "paper_rows": paper_rows(TABLE), "ours_best": best_detector(out_dir),
              "provenance": provenance(preset, 0, step="Table 4 (rendered, nothing trained)")}
    (out_dir / "table4.json").write_text(json.dumps(record, indent=1) + "\n")
    (out_dir / "table4.md").write_text(render_table4(out_dir, preset) + "\n")
    return record
