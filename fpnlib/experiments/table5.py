"""Table 5 of the paper: FPN Faster R-CNN with and without feature sharing (Sec. 5.2.3).

"no_share" is Table 3(c): RPN and detector with a backbone each (Table 1(c)'s RPN and Table 2(c)'s
Fast R-CNN, trained one after the other: steps 1 and 2). "share" makes them one network by steps
3 and 4 of the 4-step alternating training (``fpnlib.engine.four_step``). The paper reports AP50/AP and notes
that sharing costs training time and saves test time; both times are measured here.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from fpnlib.engine.four_step import share_backbone, train_shared
from fpnlib.engine.train import Schedule, shortened
from fpnlib.experiments import table3
from fpnlib.experiments.tables import (Claim, check_claims, inference_side_by_side, render_table, timing_setting,
                                       write_table)

ROWS = {"no": "no_share", "yes": "share"}
PAPER_KEYS = {"no_share": "no_share", "share": "share"}
METRICS = ("AP50", "AP")


@dataclass(frozen=True)
class FourStepBudget:
    """Steps 3 (RPN head) and 4 (detector head) of the 4-step training; steps 1-2 are Table 3(c)."""

    rpn: Schedule
    head: Schedule


BUDGETS = {
    "smoke": FourStepBudget(Schedule(iterations=100, batch_size=4, lr=0.01, warmup_iters=0, steps=(80,), checkpoint_every=100),
                            Schedule(iterations=100, batch_size=4, lr=0.01, warmup_iters=0, steps=(80,), checkpoint_every=100)),
    "cpu": FourStepBudget(Schedule(iterations=60, batch_size=4, lr=0.01, warmup_iters=0, steps=(48,), checkpoint_every=60),
                          Schedule(iterations=60, batch_size=4, lr=0.01, warmup_iters=0, steps=(48,), checkpoint_every=60)),
    "gpu": FourStepBudget(Schedule(iterations=3000, batch_size=8, lr=0.01, warmup_iters=0, steps=(2400,), checkpoint_every=1000),
                          Schedule(iterations=3000, batch_size=8, lr=0.01, warmup_iters=0, steps=(2400,), checkpoint_every=1000)),
    # Faster R-CNN's 4-step training repeats the RPN (Sec. 5.1) and Fast R-CNN (Sec. 5.2.1) schedules.
    "paper": FourStepBudget(Schedule(iterations=40000, batch_size=16, lr=0.02, warmup_iters=0, steps=(30000,), checkpoint_every=2000),
                            Schedule(iterations=80000, batch_size=16, lr=0.02, warmup_iters=0, steps=(60000,), checkpoint_every=2000)),
}
DEVIATIONS = {
    "steps_1_2": "steps 1-2 are Table 3(c): Table 1(c)'s RPN, then Table 2(c)'s Fast R-CNN on its proposals",
    "steps_3_4": "steps 3-4 fine-tune at half Table 3's learning rate for a fraction of its schedule "
                 "(the paper repeats full schedules)",
}


def paper_r50() -> dict[str, dict]:
    """The paper's R-50 columns under our metric names."""
    from fpnlib.reference import paper_rows

    return {k: {"AP50": v["R50_AP50"], "AP": v["R50_AP"], "share": v["share"]}
            for k, v in paper_rows("table5_sharing_features").items()}


def run_table5(preset: str, data_root, table3_runs, runs_dir, out_dir, seed: int = 0, device: str = "cpu",
               progress: bool = True, iterations: int | None = None, pretrained=None) -> dict:
    """Table 3(c) (trained here if its run is missing), then steps 3-4 on it; both evaluated with
    measured inference time. Writes ``out_dir/table5.json`` and ``table5.md``."""
    from fpnlib.provenance import provenance

    out_dir, runs_dir = Path(out_dir), Path(runs_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    base = table3.run_row("fpn", preset, data_root, Path(table3_runs) / "fpn", seed=seed, device=device,
                          iterations=iterations, progress=progress, pretrained=pretrained)
    train_set, val_set = table3.splits(preset, data_root)
    unshared = table3.load_row("fpn", preset, Path(table3_runs) / "fpn", train_set.num_classes, seed, device)
    shared = share_backbone(unshared)
    budget = BUDGETS[preset]
    # A shortened Table 3(c) gets steps 3-4 shortened alike (tests and notebooks under smoke).
    rpn_s, head_s = (shortened(budget.rpn, iterations), shortened(budget.head, iterations))
    runs = train_shared(shared, train_set, rpn_s, head_s, runs_dir, seed=seed, device=device, progress=progress)
    metrics, _ = table3.detection_metrics(shared, val_set, device=device, progress=progress)
    # Both test times from one setting: Table 3(c)'s own time was taken while another row trained beside it.
    timing = inference_side_by_side({"no_share": unshared, "share": shared}, val_set, device=device)
    steps_time = sum(r["train_time_s"] for r in runs.values())
    record = {
        "table": 5,
        "rows": {
            "no_share": {"metrics": {m: base["metrics"][m] for m in METRICS}, "train_time_s": base["train_time_s"],
                         "inference_s_per_image": timing["s_per_image"]["no_share"],
                         "parameters": sum(p.numel() for p in unshared.parameters())},
            "share": {"metrics": {m: metrics[m] for m in METRICS}, "train_time_s": round(base["train_time_s"] + steps_time, 1),
                      "inference_s_per_image": timing["s_per_image"]["share"],
                      "parameters": sum(p.numel() for p in shared.parameters()),
                      "steps_3_4_iterations": [rpn_s.iterations, head_s.iterations]},
        },
        "inference_timing": {k: v for k, v in timing.items() if k != "s_per_image"},
        "deviations": DEVIATIONS,
        "budget": {"steps_3_4": [vars(rpn_s), vars(head_s)]},
        "provenance": provenance(preset, seed, time.perf_counter() - t0, device=str(device)),
    }
    return write_table(record, out_dir, render_table5)


CLAIMS = (("share", "no_share", "AP", "sharing features helps a little (the paper: +0.4 AP)"),)


def claims(record: dict) -> list[Claim]:
    """Table 5's AP claim on a ``run_table5`` record; the time claim is in ``render_table5``."""
    return check_claims(record, CLAIMS, paper_r50(), PAPER_KEYS)


def render_table5(record: dict) -> str:
    """Markdown: AP50/AP ours / paper (R-50), measured train and test time, and the time claim."""
    from fpnlib.reference import paper_tables

    extra = [("share", lambda r, p: "yes" if p["share"] else "no"),
             ("train time (min)", lambda r, p: f"{r['train_time_s'] / 60:.1f}"),
             ("inference (s/image)", lambda r, p: f"{r['inference_s_per_image']:.3f}")]
    text = render_table(record, paper_r50(), PAPER_KEYS, {v: k for k, v in ROWS.items()}, METRICS, extra,
                        paper_tables()["setting"], "the embedded val set, box AP by pycocotools", claims(record))
    rows = record["rows"]
    t_no, t_yes = rows["no_share"]["inference_s_per_image"], rows["share"]["inference_s_per_image"]
    setting = f" ({timing_setting(record)})" if record.get("inference_timing") else ""
    return text + (f"\n- Test time: sharing {'reduces' if t_yes < t_no else 'does NOT reduce'} it here: "
                   f"{t_yes:.3f} vs {t_no:.3f} s/image ({t_no / t_yes:.2f}x){setting}; the paper: "
                   f"\"{paper_tables()['table5_sharing_features']['note']}\"")
