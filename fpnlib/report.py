"""README blocks rendered from ``results/``: the numbers a reader sees in README are read from
the recorded runs, never typed by hand.

README marks each generated block with ``<!-- fpnlib:NAME -->`` … ``<!-- /fpnlib:NAME -->``;
``python -m fpnlib report`` rewrites them from the JSON files, and a test fails when README
and ``results/`` disagree.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from fpnlib.provenance import REPO_ROOT

RESULTS_DIR = REPO_ROOT / "results"
README = REPO_ROOT / "README.md"


def _provenance_line(prov: dict) -> str:
    hw, ver = prov["hardware"], prov["versions"]
    where = hw.get("gpu") or f"{hw['cpu']} ({hw['cpu_count']} cores)"
    return (f"preset `{prov['preset']}`, seed {prov['seed']}, commit `{prov['commit'][:12]}`, {where}, "
            f"torch {ver['torch']}, {prov['date']}")


def render_data_block(results_dir: Path = RESULTS_DIR, preset: str = "cpu") -> str:
    """The embedded set of ``preset``: size shares against COCO's small/medium/large limits."""
    path = Path(results_dir) / preset / "data.json"
    if not path.exists():
        return f"_No recorded data statistics yet: run `make reproduce` (writes `{path.relative_to(REPO_ROOT)}`)._"
    rec = json.loads(path.read_text())
    rows = ["| split | images | objects | small | medium | large | object side (px) | empty images | grayscale | crowd regions |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for split in ("train", "val"):
        s = rec[split]
        rows.append(f"| {split} | {s['num_images']} | {s['num_objects']} | {100 * s['share_small']:.1f}% | "
                    f"{100 * s['share_medium']:.1f}% | {100 * s['share_large']:.1f}% | "
                    f"{s['sqrt_area_min']:.0f}–{s['sqrt_area_max']:.0f} ({s['octaves']:.1f} octaves) | "
                    f"{s['num_empty_images']} | {s.get('num_grayscale_images', '?')} | {s['num_crowd_regions']} |")
    rows.append("")
    rows.append(f"From `results/{preset}/data.json` ({_provenance_line(rec['provenance'])}).")
    return "\n".join(rows)


def _table_block(n: int, results_dir: Path, preset: str) -> str:
    """Table ``n`` of ``preset`` as its module renders it (ours beside the paper's, provenance)."""
    import importlib

    path = Path(results_dir) / preset / f"table{n}.json"
    if not path.exists():
        return f"_No recorded Table {n} yet: run `python -m fpnlib table {n} --preset {preset}`._"
    render = getattr(importlib.import_module(f"fpnlib.experiments.table{n}"), f"render_table{n}")
    return render(json.loads(path.read_text()))


def _table_renderer(n: int):
    def render(results_dir: Path = RESULTS_DIR, preset: str = "cpu") -> str:
        return _table_block(n, results_dir, preset)

    render.__doc__ = f"Table {n} of ``preset`` as ``fpnlib.experiments.table{n}`` renders it."
    return render


def render_figure1_block(results_dir: Path = RESULTS_DIR, preset: str = "cpu") -> str:
    """Fig. 1's four architectures measured (notebook 01): time and activation memory."""
    path = Path(results_dir) / preset / "figure1.json"
    if not path.exists():
        return f"_No recorded Figure 1 measurement yet: run `make reproduce` (writes `{path.relative_to(REPO_ROOT)}`)._"
    rec = json.loads(path.read_text())
    res, net = rec["results"], rec["network"]
    rows = ["| | architecture | maps | one forward pass (ms) | activations (MB) |", "|---|---|---|---|---|"]
    rows += [f"| ({a}) | {r['name']} | {len(r['maps'])} | {1000 * r['time_s']:.0f} | {r['memory_mb']:.0f} |"
             for a, r in res.items()]
    rows += ["", f"ResNet-{net['depth']} (width {net['width']}), d = {net['fpn_channels']}, a {rec['image_hw'][0]}x"
             f"{rec['image_hw'][1]} image, (a) at scales {rec['scales_of_a']}, median of {rec['repeats']}, "
             f"{rec['provenance']['threads']} threads; memory: {next(iter(res.values()))['memory_kind']}. "
             f"From `results/{preset}/figure1.json` ({_provenance_line(rec['provenance'])})."]
    return "\n".join(rows)


def render_reproduce_block(results_dir: Path = RESULTS_DIR, preset: str = "cpu") -> str:
    """Wall time of each step of the last ``make reproduce`` (``reproduce_times.json``)."""
    path = Path(results_dir) / preset / "reproduce_times.json"
    if not path.exists():
        return f"_No recorded `make reproduce` yet: it writes `results/{preset}/reproduce_times.json`._"
    rec = json.loads(path.read_text())
    secs = rec["seconds"]
    rows = ["| step | wall time |", "|---|---|"]
    rows += [f"| {step} | {s / 60:.1f} min |" for step, s in secs.items()]
    jobs = rec["provenance"].get("row_jobs")  # (not recorded before 2026-11-27: then not said)
    rows += [f"| **all** | **{sum(secs.values()) / 60:.1f} min** |", "",
             f"From `results/{preset}/reproduce_times.json` ({_provenance_line(rec['provenance'])})"
             + (f"; table rows trained {jobs} at a time." if jobs else ".")]
    return "\n".join(rows)


def render_bench_block(results_dir: Path = RESULTS_DIR, preset: str = "cpu") -> str:
    """Every ``results/bench/<hardware>.json``: images/s beside torchvision and where the time goes."""
    from fpnlib.bench import EAGER_ARM, summary, targets

    files = sorted((Path(results_dir) / "bench").glob("*.json"))
    if not files:
        return "_No recorded benchmark yet: run `make bench` (writes `results/bench/<hardware>.json`)._"
    out = []
    for path in files:
        rec = json.loads(path.read_text())
        out += [f"`results/bench/{path.name}` ({_provenance_line(rec['provenance'])}):", "", summary(rec), ""]
        out += ["Targets: " + "; ".join(f"{t['config']} {t['measure']} {t['measured']:.2f} (target {t['target']}: "
                                        f"{'met' if t['met'] else '**NOT met**'})" for t in targets(rec)), ""]
        out.append("Where the time goes (fpnlib's step, stage by stage, each stage timed with a device sync):")
        out.append("")
        for name, r in rec["configs"].items():
            for mode in ("train", "infer"):
                st = r[mode]["fpnlib_stages"]
                top = sorted(st["seconds"].items(), key=lambda kv: -kv[1])[:5]
                host = st.get("host_seconds", {})  # CUDA records: the host's part of each stage
                out.append(f"- {name}, {mode} step {1000 * st['step_s']:.0f} ms: " + ", ".join(
                    f"{k} {100 * v / st['step_s']:.0f}%" + (f" (host {100 * host[k] / v:.0f}% of it)" if k in host and v > 0 else "")
                    for k, v in top))
        work = [(name, mode, r[mode]["host_work"]) for name, r in rec["configs"].items() for mode in ("train", "infer")
                if "host_work" in r[mode]]
        if work:
            out += ["", "Host work of one step, operators dispatched / waits for the device (exact counts; fpnlib "
                        "counted on its CUDA path, `fpnlib/host_work.py`):", ""]
            out += [f"- {name}, {mode}: fpnlib {w['fpnlib']['ops']} / {w['fpnlib']['waits']}, torchvision "
                    f"{w['torchvision']['ops']} / {w['torchvision']['waits']}" for name, mode, w in work]
        busy = [(name, mode, r[mode]["device_busy"]) for name, r in rec["configs"].items() for mode in ("train", "infer")
                if "device_busy" in r[mode]]
        if busy:
            out += ["", "The GPU's busy share of back-to-back steps (profiled; well below 100%: it waits for the host, "
                        "`host_work.device_busy`):", ""]
            out += [f"- {name}, {mode}: " + ", ".join(
                f"{lib} " + _busy(b.get(lib)) for lib in ("fpnlib", EAGER_ARM, "torchvision") if lib != EAGER_ARM or lib in b)
                    + (f" ({b['error']})" if "error" in b else "") for name, mode, b in busy]
            out += [f"- {name}: fpnlib's device work alone is {r['infer']['fpnlib_device_over_backbone_fpn']:.2f}x "
                    f"backbone + FPN alone, the detector / body ratio if its host cost nothing"
                    for name, r in rec["configs"].items() if "fpnlib_device_over_backbone_fpn" in r["infer"]]
        graphed = [(name, r["infer"]) for name, r in rec["configs"].items() if "cuda_graphs_speedup" in r["infer"]]
        if graphed:
            out += ["", "Inference replayed from CUDA graphs (`fpnlib/modeling/cuda_graphs.py`), beside the same model "
                        "with its graphs paused in the same alternation:", ""]
            for name, i in graphed:
                body = f"{1000 * i['fpnlib_backbone_fpn_alone_s']:.1f} ms eager"
                replayed = i.get("fpnlib_backbone_fpn_alone_graphed_s")  # seconds, or why its capture failed
                if replayed is not None:
                    body += f", {1000 * replayed:.1f} ms replayed" if isinstance(replayed, float) else f" (replayed: {replayed})"
                out.append(f"- {name}: {1000 * i['median_s']['fpnlib']:.1f} ms a batch replayed, "
                           f"{1000 * i['median_s'][EAGER_ARM]:.1f} ms without graphs ({i['cuda_graphs_speedup']:.2f}x); "
                           f"backbone + FPN alone {body}; detector / body "
                           f"{i['fpnlib_detector_over_backbone_fpn']:.2f} (against the faster body), without graphs "
                           f"{i['fpnlib_without_graphs_detector_over_backbone_fpn']:.2f}; passes: "
                           + ", ".join(f"{k} {v}" for k, v in i["cuda_graph_passes"].items()))
        out += ["", "Same detections, and memory:", ""]
        for name, r in rec["configs"].items():
            opt, plain, mem = r["same_outputs"], r["same_outputs_plain"], r.get("peak_memory", {})
            line = (f"- {name}: the float32 plain path finds "
                    f"{100 * plain['torchvision_detections_found_iou_0.9']:.1f}% of torchvision's detections, largest "
                    f"box difference {plain['max_box_difference_px']:.2g} px (position by position); the timed path ({', '.join(r['fpnlib_inference_path'])}) "
                    f"finds {100 * opt['torchvision_detections_found_iou_0.9']:.1f}% of torchvision's detections "
                    f"(same label, IoU >= 0.9); inference is {r['infer']['fpnlib_detector_over_backbone_fpn']:.1f}x "
                    f"backbone + FPN alone")
            if mem:
                line += "; peak memory over the inputs, fpnlib / torchvision: " + ", ".join(
                    f"{mode} {mem[f'fpnlib_{mode}']['peak_over_before_mib']:.0f} / "
                    f"{mem[f'torchvision_{mode}']['peak_over_before_mib']:.0f} MiB" for mode in ("train", "infer"))
            out.append(line)
        if "paper_runtime" in rec:
            rt = rec["paper_runtime"]
            t, paper = rt["s_per_image"], rt["paper_s_per_image_M40"]
            faster = t["fpn_shared"] < t["c4_conv5_single_scale"]
            out += ["", f"The paper's runtime (Sec. 5.2.3), ResNet-50, one {rt['image_size'][0]}x{rt['image_size'][1]} image, "
                        f"median of {rt['reps']}, each head given "
                        f"{'/'.join(str(n) for n in sorted(set(rt.get('rois_per_image', {}).values()))) or '?'} RoIs: "
                        f"FPN Faster R-CNN {1000 * t['fpn_shared']:.1f} ms shared, "
                        f"{1000 * t['fpn_not_shared']:.1f} ms not shared; single-scale C4 + conv5 baseline "
                        f"{1000 * t['c4_conv5_single_scale']:.1f} ms (paper, M40: "
                        f"{1000 * paper['faster_rcnn_fpn_r50_s_per_image_M40']:.0f} vs "
                        f"{1000 * paper['single_scale_r50_baseline_s_per_image_M40']:.0f} ms). "
                        + ("FPN is faster than the baseline here, as in the paper." if faster else
                           "FPN is **NOT** faster than the baseline here (the paper's claim does not reproduce on "
                           "this hardware).")]
        out.append("")
    return "\n".join(out).rstrip()


def _busy(b: dict | None) -> str:
    """One library's entry of the busy-share lines: share, and the busy time where recorded."""
    if not b or b.get("busy_share") is None:
        return "not measured"
    return f"{100 * b['busy_share']:.0f}%" + (f" ({1000 * b['busy_s_per_step']:.1f} ms a step)"
                                             if "busy_s_per_step" in b else "")


def render_claims_block(results_dir: Path = RESULTS_DIR, preset: str = "cpu") -> str:
    """Every checked claim of ``preset``'s recorded tables (``fpnlib.experiments.claims``)."""
    from fpnlib.experiments.claims import collect_claims, render_claims

    text = render_claims(collect_claims(Path(results_dir) / preset), preset)
    return "\n".join(text.split("\n")[2:])  # without the title: README has its own heading


def render_notebooks_block(results_dir: Path = RESULTS_DIR, preset: str = "cpu") -> str:
    """Measured wall time of each lesson notebook under ``preset`` (``notebooks.json``)."""
    path = Path(results_dir) / preset / "notebooks.json"
    if not path.exists():
        return f"_No recorded notebook times yet: run `make reproduce` (writes `results/{preset}/notebooks.json`)._"
    rec = json.loads(path.read_text())
    rows = [f"| notebook | wall time under `{preset}` | run |", "|---|---|---|"]
    rows += [f"| `{name}` | {e['seconds'] / 60:.1f} min | commit `{e['provenance']['commit'][:12]}`, "
             f"{e['provenance']['date'][:10]} |" for name, e in sorted(rec.items())]
    any_prov = next(iter(rec.values()))["provenance"]
    rows += ["", f"From `results/{preset}/notebooks.json` ({_provenance_line(any_prov)}); a notebook that loads "
             "finished checkpoints takes minutes, one that trains its table's rows takes the table's training time."]
    return "\n".join(rows)


SEED_METRICS = {1: ("AR1k", "AR1k_s"), 6: ("AR", "AR_s")}  # the metrics the tables' claims compare


def _threads(record: dict) -> str:
    """The rows' thread counts (a row's numbers depend on them)."""
    counts = sorted({r.get("torch_threads") for r in record["rows"].values()} - {None})
    return f"{'/'.join(map(str, counts))} thread(s) per row" if counts else "threads not recorded"


def render_seeds_block(results_dir: Path = RESULTS_DIR, preset: str = "cpu") -> str:
    """Tables trained again with another training seed (``results/<preset>/seed<k>/``), beside
    the recorded seed: each row's headline metrics and each claim's difference and verdict, so a
    reader sees how far a row moves when only the seed changes (same data, same budget)."""
    import importlib

    base = Path(results_dir) / preset
    others = sorted(base.glob("seed*/table*.json"))
    if not others:
        return (f"_No table trained with another seed yet under `{preset}`: "
                f"`python -m fpnlib table 6 --preset {preset} --seed 1 --jobs 2 --out results/{preset}/seed1 "
                f"--runs runs/{preset}-seed1`._")
    out = []
    for n in sorted({int(p.stem[5:]) for p in others}):
        if not (base / f"table{n}.json").exists():
            continue
        paths = [base / f"table{n}.json"] + [p for p in others if p.stem == f"table{n}"]
        records = [json.loads(p.read_text()) for p in paths]
        seeds = [r["provenance"]["seed"] for r in records]
        metrics = SEED_METRICS.get(n, ())
        out += [f"Table {n}:", "",
                "| row | " + " | ".join(f"{m} seed {s}" for m in metrics for s in seeds) + " |",
                "|---|" + "---|" * (len(metrics) * len(seeds))]
        for row in records[0]["rows"]:
            cells = [f"{r['rows'][row]['metrics'][m]:.1f}" if row in r["rows"] else "–" for m in metrics for r in records]
            out.append(f"| {row} | " + " | ".join(cells) + " |")
        claims = importlib.import_module(f"fpnlib.experiments.table{n}").claims
        checked = [claims(r) for r in records]
        out += ["", "| claim | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|" + "---|" * len(seeds)]
        for c in checked[0]:
            cells = []
            for found in checked:
                same = [x for x in found if (x.text, x.rows, x.metric) == (c.text, c.rows, c.metric)]
                cells.append(f"{same[0].ours[0] - same[0].ours[1]:+.1f} ({same[0].verdict})" if same else "–")
            out.append(f"| {c.text} ({c.metric} {c.rows[0]} vs {c.rows[1]}) | " + " | ".join(cells) + " |")
        out += ["", "; ".join(f"seed {s}: `results/{preset}/{p.relative_to(base).as_posix()}` "
                              f"({_provenance_line(r['provenance'])}, {_threads(r)})"
                              for p, r, s in zip(paths, records, seeds)) + ".", ""]
    return "\n".join(out).rstrip()


def _coverage_record(results_dir: Path, preset: str, name: str) -> dict | str:
    """``results/<preset>/<name>.json`` (written by ``fpnlib.experiments.coverage.<name>``), or the
    line a README block shows while it is not recorded."""
    path = Path(results_dir) / preset / f"{name}.json"
    if not path.exists():
        return f"_Not recorded yet under `{preset}` (`fpnlib.experiments.coverage.{name}`)._"
    return json.loads(path.read_text())


def render_coverage_block(results_dir: Path = RESULTS_DIR, preset: str = "cpu") -> str:
    """The anchor coverage of the val objects by size and RPN (``anchor_coverage.json``)."""
    rec = _coverage_record(results_dir, preset, "anchor_coverage")
    if isinstance(rec, str):
        return rec
    rows = ["| RPN | anchors (px) | large objects | with no positive anchor | median best-anchor IoU |"
            " small: best IoU < 0.5 |", "|---|---|---|---|---|---|"]
    for variant, d in rec["variants"].items():
        sizes = sorted({s for v in d["anchor_sizes"].values() for s in v})
        large, small = d["by_size"]["large"], d["by_size"]["small"]
        rows.append(f"| {variant} | {', '.join(f'{s:.0f}' for s in sizes)} on {', '.join(d['anchor_sizes'])} | "
                    f"{large['objects']} | {large['no_positive_anchor']} | {large['median_best_iou']} | "
                    f"{small['best_iou_under_0.5']} of {small['objects']} |")
    return "\n".join(rows + ["", f"From `results/{preset}/anchor_coverage.json` ({rec['split']} split, "
                                  f"{_provenance_line(rec['provenance'])})."])


def render_segment_coverage_block(results_dir: Path = RESULTS_DIR, preset: str = "cpu") -> str:
    """Table 6's val objects against a trained row's 1000 segment proposals (``segment_coverage.json``)."""
    rec = _coverage_record(results_dir, preset, "segment_coverage")
    if isinstance(rec, str):
        return rec
    rows = ["| objects | count | covered at mask IoU >= 0.5 | median best IoU | ... among its own slot's proposals "
            "| slots they fall to |", "|---|---|---|---|---|---|"]
    for name, b in rec["by_size"].items():
        slots = ", ".join(f"{k}: {v}" for k, v in b["slots"].items())
        rows.append(f"| {name} | {b['objects']} | {b['covered_at_iou_0.5']} | {b['median_best_iou']} | "
                    f"{b['median_best_iou_own_slot']} | {slots} |")
    per = rec["proposals_per_image_by_slot"]
    row = rec.get("row", {})
    ar = row.get("metrics", {})
    made = (f"row `{rec['variant']}` ({row.get('iterations', '?')} iterations, AR {ar.get('AR', float('nan')):.1f}, "
            f"AR_l {ar.get('AR_l', float('nan')):.1f}, backbone {row.get('initialisation', {}).get('backbone', '?')})")
    return "\n".join(rows + ["", "Proposals per image by slot: " + ", ".join(f"{k} {v:g}" for k, v in per.items()) + ".",
                              "", f"From `results/{preset}/segment_coverage.json`: {made}, "
                                  f"{_provenance_line(rec['provenance'])}."])


def render_curves_block(results_dir: Path = RESULTS_DIR, preset: str = "cpu") -> str:
    """Every recorded learning curve of ``preset`` (``curve_*.json``, ``fpnlib.experiments.curves``):
    the metric at each scored iteration and the training time it took."""
    paths = sorted((Path(results_dir) / preset).glob("curve_*.json"))
    if not paths:
        return f"_No learning curve recorded under `{preset}` yet (`fpnlib.experiments.curves`)._"
    out = []
    for path in paths:
        rec = json.loads(path.read_text())
        metrics = ("AR1k", "AR1k_s", "AR1k_l") if "AR1k" in rec["points"][0] else ("AP50", "AP", "AP_s", "AP_l")
        s = rec["schedule"]
        out += [f"{rec['what']} (`{path.name}`; {s['batch_size']} images per iteration, lr {s['lr']:g}, "
                f"x{s['gamma']:g} at {', '.join(map(str, s['steps'])) or 'no step'}"
                + (f"; {rec['model_overrides']}" if rec.get("model_overrides") else "") + "):", "",
                "| iterations | training (min) | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
        out += [f"| {p['iteration']} | {p['train_time_s'] / 60:.1f} | " + " | ".join(f"{p[m]:.1f}" for m in metrics) + " |"
                for p in rec["points"]]
        prov = rec["provenance"]
        out += ["", f"{_provenance_line(prov)}, {prov.get('torch_threads', '?')} thread(s).", ""]
    return "\n".join(out).rstrip()


BLOCKS = {"data": render_data_block, "coverage": render_coverage_block, "curves": render_curves_block,
          "segment_coverage": render_segment_coverage_block, "figure1": render_figure1_block, "reproduce": render_reproduce_block,
          **{f"table{n}": _table_renderer(n) for n in (1, 2, 3, 5, 6)},
          "claims": render_claims_block, "notebooks": render_notebooks_block, "bench": render_bench_block,
          "seeds": render_seeds_block}


def render_readme(text: str, results_dir: Path = RESULTS_DIR) -> str:
    """``text`` with every ``fpnlib:NAME`` block replaced by its rendering from ``results_dir``."""
    for name, render in BLOCKS.items():
        pattern = re.compile(rf"(<!-- fpnlib:{name} -->\n)(?:.*?\n)?(<!-- /fpnlib:{name} -->)", re.S)
        if not pattern.search(text):
            raise ValueError(f"README has no block <!-- fpnlib:{name} --> … <!-- /fpnlib:{name} -->")
        body = render(results_dir)
        text = pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(2), text)
    return text


def update_readme(readme: Path = README, results_dir: Path = RESULTS_DIR) -> bool:
    """Rewrite README's generated blocks; returns whether anything changed."""
    old = Path(readme).read_text()
    new = render_readme(old, results_dir)
    if new != old:
        Path(readme).write_text(new)
    return new != old
