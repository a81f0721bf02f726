"""The sentences the lessons say about their numbers, made from the records they show.

A lesson's text about a result is generated here from the record (``results/<preset>/*.json``,
a detection, a measured cost), so it reads right whatever the numbers become: an untrained
detector is called untrained, a trained one is compared with the paper, a claim whose seeds
disagree is called not established (the claims report's rule). Each function returns Markdown.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

from fpnlib.experiments.tables import INCONCLUSIVE_BELOW
from fpnlib.reference import paper_rows

# box AP (%) below which a detector has not learned to detect (a few lucky boxes), and from
# which it detects well enough for the paper's comparisons to be read as directions
NOT_LEARNED_AP = 2.0
LEARNED_AP = 20.0


def paper_span(tables: Sequence[str], metric: str, prefix: str = "") -> str:
    """"lo–hi" of ``metric`` over the paper's rows of ``tables`` (keys of ``fpnlib.reference``)
    whose key starts with ``prefix``."""
    values = [row[metric] for t in tables for key, row in paper_rows(t).items()
              if key.startswith(prefix) and row.get(metric) is not None]
    return f"{min(values):.0f}–{max(values):.0f}"


DETECTOR_TABLES = ("table2_fast_rcnn_fixed_proposals", "table3_faster_rcnn")
SEGMENT_TABLE = "table6_segment_proposals"


def _and(names: Sequence[str]) -> str:
    names = list(names)
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def best_row(record: Mapping, metric: str) -> tuple[str, float]:
    """(row, value) of the row of ``record`` with the highest ``metric``."""
    rows = {name: row["metrics"][metric] for name, row in record["rows"].items() if metric in row.get("metrics", {})}
    name = max(rows, key=rows.get)
    return name, rows[name]


def detector_state(records: Mapping[str, Mapping], metric: str = "AP") -> str:
    """What the detectors of ``records`` (a name such as "Table 2" -> its record) have learned,
    read from their best ``metric``, and what that means for the comparisons between their rows."""
    best = {name: best_row(rec, metric) for name, rec in records.items()}
    where, (row, value) = max(best.items(), key=lambda kv: kv[1][1])
    said = f"the best {metric} of {_and(best)} is {value:.1f} ({where}, row {row})"
    paper = paper_span(DETECTOR_TABLES, metric)
    if value < NOT_LEARNED_AP:
        return (f"**The detector has not learned to detect yet**: {said}, where the paper's rows reach {paper}. "
                f"At an {metric} under {NOT_LEARNED_AP:g} a detector finds a few objects by chance, so the "
                f"differences between its rows are noise: no comparison of them speaks for or against the paper, "
                f"whatever its verdict says.")
    if value < LEARNED_AP:
        return (f"The detector has learned a little: {said}, against the paper's {paper}. Differences of a point "
                f"or two between rows are within what a seed changes; read only the larger ones, as directions.")
    return (f"The detector has learned: {said} (the paper's rows: {paper}). The comparisons of its rows can be read as "
            f"directions, differences under {INCONCLUSIVE_BELOW:g} point as inconclusive.")


def detections_on_image(detections: Mapping, score_min: float = 0.3) -> str:
    """How many of a detector's outputs on one image the picture draws, and its highest score."""
    scores = [float(s) for s in detections["scores"]]
    drawn = sum(s >= score_min for s in scores)
    top = f"its highest score is {max(scores):.2f}" if scores else "it outputs no box at all"
    if drawn == 0:
        return (f"On this image the detector outputs no box with score ≥ {score_min:g} ({top}): the picture shows "
                f"the ground truth alone.")
    return f"On this image the detector draws {drawn} box{'es' if drawn > 1 else ''} with score ≥ {score_min:g} ({top})."


def figure1_costs(record: Mapping) -> str:
    """Fig. 1 measured (``figure1.json``): what FPN (d) adds to the plain hierarchy (c), and the
    image pyramid's (a) cost."""
    a, b, c, d = (record["results"][k] for k in "abcd")
    time_up = 100 * (d["time_s"] / c["time_s"] - 1)
    memory_up = 100 * (d["memory_mb"] / c["memory_mb"] - 1)
    pyramid = a["time_s"] / b["time_s"]
    cost = ("a small price" if time_up < 15 else
            f"a real cost: at d = {record['network']['fpn_channels']} channels the lateral, top-down and 3×3 output "
            f"convolutions run on every level, the finest (P2, stride 4) above all")
    return (f"FPN (d) adds {time_up:+.0f}% time and {memory_up:+.0f}% activation memory to the plain hierarchy (c) "
            f"it is built on: {cost}. The featurized image pyramid (a) pays for the whole network once per "
            f"scale: {pyramid:.1f}× a single pass. FPN gives every level the semantics of C5 for a fraction of "
            f"what an image pyramid costs.")


def _diff(claim) -> float:
    return claim.ours[0] - claim.ours[1]


# how a lesson says each verdict of the claims rule over seeds (``claims.across_seeds``)
SEED_WORDS = {"reproduced": "holds on both seeds", "NOT reproduced": "the opposite holds on both seeds",
              "inconclusive": "under a point on both seeds", "seed-dependent": "not established: the seeds disagree"}


def seeds_agreement(claims: Sequence, other_seed: Sequence, seeds: tuple[int, int] = (0, 1)) -> str:
    """Each claim's difference on two seeds, and its verdict by the claims report's rule over seeds
    (``fpnlib.experiments.claims.across_seeds``). Claims are ``tables.Claim``."""
    from fpnlib.experiments.claims import across_seeds

    others = {(c.rows, c.metric): c for c in other_seed}
    lines = []
    for c in claims:
        o = others.get((c.rows, c.metric))
        if o is None:
            continue
        what = SEED_WORDS[across_seeds([_diff(c), _diff(o)], c.paper[0] - c.paper[1])]
        lines.append(f"- {c.text} ({c.metric}): {_diff(c):+.1f} on seed {seeds[0]}, {_diff(o):+.1f} on seed {seeds[1]}: "
                     f"{what}")
    if not lines:
        return "No second seed has been recorded: every verdict above rests on one seed."
    return (f"The same claims on a second seed (a claim counts when it holds by {INCONCLUSIVE_BELOW:g} point or more "
            f"on both):\n" + "\n".join(lines))


def large_objects(record: Mapping, paper: Mapping[str, Mapping] | None = None, metric: str = "AR1k_l",
                  row: str = "fpn") -> str:
    """Where ``row`` stands on large objects against the other rows of an RPN table; ``paper``
    (row -> the paper's metrics) adds the paper's own standing."""
    ours = record["rows"][row]["metrics"][metric]
    best, value = best_row(record, metric)
    ahead = sorted((n for n, r in record["rows"].items() if r["metrics"][metric] > ours + INCONCLUSIVE_BELOW),
                   key=lambda n: -record["rows"][n]["metrics"][metric])
    if not ahead:
        return f"On large objects FPN is not behind here: its {metric} is {ours:.1f}, the best row's {value:.1f}."
    text = (f"On large objects FPN is behind: its {metric} is {ours:.1f}, below "
            + ", ".join(f"{n} ({record['rows'][n]['metrics'][metric]:.1f})" for n in ahead)
            + ". Notebook 03 showed one reason: the objects that end up with no positive anchor on the pyramid "
              "are mostly large ones, which share their few coarse-level anchors (P6: one location every 64 px) "
              "with a neighbour, so the RPN is never trained to propose them.")
    if paper:
        theirs = [n for n in record["rows"] if n in paper and paper[n][metric] > paper[row][metric]]
        text += (" In the paper FPN is behind on large objects too, by less: " + ", ".join(
            f"{n} {paper[n][metric]:.1f} vs {paper[row][metric]:.1f}" for n in theirs) + "." if theirs else
            f" In the paper FPN is not behind on large objects ({paper[row][metric]:.1f}).")
    return text


def segment_sizes(record: Mapping) -> str:
    """Table 6 by object size: large objects found or not."""
    ar_l = {n: r["metrics"]["AR_l"] for n, r in record["rows"].items()}
    ar_s = {n: r["metrics"]["AR_s"] for n, r in record["rows"].items()}
    top_l, top_s = max(ar_l.values()), max(ar_s.values())
    paper_l, paper_s = paper_span([SEGMENT_TABLE], "AR_l", "fpn"), paper_span([SEGMENT_TABLE], "AR_s", "fpn")
    if top_l < NOT_LEARNED_AP:
        return (f"**Large objects are missed**: AR_l is at most {top_l:.1f} in every row (AR_s up to {top_s:.1f}), "
                f"where the paper's FPN rows reach {paper_l}. The masks proposed are those of small and medium "
                f"objects; every AR above is theirs.")
    return (f"AR_l reaches {top_l:.1f} and AR_s {top_s:.1f}: " +
            ("large objects are proposed better than small ones, as in the paper." if top_l > top_s else
             f"small objects are proposed better than large ones, unlike the paper (AR_l {paper_l} above AR_s "
             f"{paper_s})."))


def claims_summary(claims: Mapping[int, Sequence | None], detectors: Mapping[str, Mapping],
                   segments: Mapping | None = None) -> str:
    """08's reading of the claims report (its verdicts already read every recorded seed): a tally
    per table, then what it means: Table 1's claims, the detectors' state
    (``detector_state`` of ``detectors``), which decides how much Tables 2, 3 and 5 say, and
    Table 6 by object size (``segments``, its record)."""
    names = {1: "RPNs", 2: "Fast R-CNN on fixed proposals", 3: "Faster R-CNN", 5: "shared features", 6: "segment proposals"}
    lines = []
    for n, cs in claims.items():
        if cs is None:
            lines.append(f"- Table {n} ({names.get(n, '')}): not run yet.")
            continue
        verdicts = [c.verdict for c in cs]
        lines.append(f"- Table {n} ({names.get(n, '')}): {verdicts.count('reproduced')} of {len(cs)} reproduced, "
                     f"{verdicts.count('inconclusive')} inconclusive, {verdicts.count('seed-dependent')} seed-dependent, "
                     f"{verdicts.count('NOT reproduced')} not reproduced.")
    reading = []
    rpn = claims.get(1) or []
    if rpn:
        held = [c for c in rpn if c.verdict == "reproduced"]
        small = any(c.metric.endswith("_s") for c in held)
        seeds = max(len(c.by_seed) for c in rpn) if hasattr(rpn[0], "by_seed") else 1
        reading.append(f"Table 1, the pyramid's effect on proposals: {len(held)} of {len(rpn)} claims show on this "
                       f"budget{', small objects among them' if small else ''}"
                       f"{f', on each of {seeds} seeds' if seeds > 1 else ''}.")
    if detectors:
        reading.append(detector_state(detectors))
    if segments:
        reading.append(segment_sizes(segments))
    return "\n".join(lines) + "\n\n" + " ".join(reading)


def results_reading(results_dir) -> str:
    """:func:`claims_summary` of the records in ``results_dir`` (``results/<preset>``): its claims,
    Table 1's on the ``seed1/`` records when there are any, the detectors of Tables 2, 3 and 5,
    Table 6 by object size."""
    import json
    from pathlib import Path

    from fpnlib.experiments.claims import collect_claims

    folder = Path(results_dir)
    records = {n: json.loads((folder / f"table{n}.json").read_text()) for n in (2, 3, 5, 6)
               if (folder / f"table{n}.json").exists()}
    return claims_summary(collect_claims(folder), {f"Table {n}": records[n] for n in (2, 3, 5) if n in records},
                          records.get(6))


def pretraining(record: Mapping | None, preset: str) -> str:
    """What the stand-in for ImageNet pre-training reached (``pretrain.json``), or how to run it."""
    if record is None:
        return (f"No pre-training recorded under `{preset}` yet: `python -m fpnlib pretrain --preset {preset}` "
                "(or `make reproduce`, whose first table runs it) trains the classifier and writes its record.")
    held = record["held_out"]
    classes = {k: v for k, v in held["by_class"].items() if v is not None}
    worst, best = min(classes, key=classes.get), max(classes, key=classes.get)
    sizes = ", ".join(f"{k} {v:.0f}%" for k, v in held["by_size"].items() if v is not None)
    s = record["budget"]["schedule"]
    return (f"The classifier was trained for {s['iterations']} iterations of {s['batch_size']} crops of "
            f"{record['budget']['crop_size']} px ({record['train_time_s'] / 60:.1f} min) and classifies "
            f"**{held['accuracy']:.1f}%** of {held['crops']} held-out crops right, where guessing gets "
            f"{held['chance']:.1f}%: from {classes[worst]:.0f}% ({worst}) to {classes[best]:.0f}% ({best}) by class, "
            f"{sizes} by object size. Every RPN and detector of the tables starts from its bottom-up weights.")
