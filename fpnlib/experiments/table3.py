"""Table 3 of the paper: Faster R-CNN with consistent proposals (Sec. 5.2.2).

Each row is a whole detector whose RPN and region head use the same kind of features:
(a) RPN on C4 + conv5 head, (b) RPN on C5 + 2fc head, (c) RPN on P2..P6 + 2fc head on the P_k
of Eq. (1). As in the paper, RPN and head do not share features (each has its own backbone;
Table 5 shares them). They are trained jointly (``fpnlib.modeling.faster_rcnn``). The paper's
row (*), He et al.'s published C4 number, is shown as a paper-only row.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from fpnlib.config import get_preset
from fpnlib.data.coco import load_coco_split
from fpnlib.data.transforms import build_transforms
from fpnlib.engine.evaluate import box_ap
from fpnlib.engine.inference import predict
from fpnlib.engine.train import Schedule, derive_seed, load_checkpoint, train
from fpnlib.experiments import table1, table2
from fpnlib.experiments.tables import (Claim, RowJob, check_claims, final_losses, halving_lr_on_divergence,
                                       render_table, reuse_evaluated, row_schedule, run_rows)
from fpnlib.modeling.faster_rcnn import FasterRCNN, FasterRCNNConfig
from fpnlib.modeling.rpn import RPNConfig

ROWS = {"a": "c4_conv5", "b": "c5_2fc", "c": "fpn"}
PAPER_KEYS = {"c4_conv5": "a_conv4", "c5_2fc": "b_conv5", "fpn": "c_fpn"}
PAPER_ONLY = (("(*) He et al. [16]", "star_he_et_al"),)
METRICS = ("AP50", "AP", "AP_s", "AP_m", "AP_l")


@dataclass(frozen=True)
class FasterRCNNBudget:
    """``FasterRCNNConfig`` overrides and the schedule of one preset's Table 3."""

    model: dict
    schedule: Schedule


def _budget(preset: str, **head) -> dict:
    """Table 1's model (and anchor scale) + the head; Eq. (1)'s 224 scaled like the anchors."""
    return dict(table1.BUDGETS[preset].model, canonical_size=table2.canonical_size(preset), **head)


BUDGETS = {
    "smoke": FasterRCNNBudget(_budget("smoke", hidden=128, batch_per_image=128),
                              Schedule(iterations=200, batch_size=4, lr=0.02, warmup_iters=50, steps=(160,), checkpoint_every=100)),
    "cpu": FasterRCNNBudget(_budget("cpu", hidden=512, batch_per_image=128),
                            Schedule(iterations=200, batch_size=4, lr=0.02, warmup_iters=50, steps=(160,), checkpoint_every=100)),
    "gpu": FasterRCNNBudget(_budget("gpu", hidden=1024, batch_per_image=512),
                            Schedule(iterations=12000, batch_size=8, lr=0.02, warmup_iters=500, steps=(9000,), checkpoint_every=1000)),
    # Sec. 5.2.2 trains RPN and Fast R-CNN separately with the schedules of 5.1 and 5.2.1; one
    # joint schedule of Fast R-CNN's length stands for both here.
    "paper": FasterRCNNBudget(_budget("paper", hidden=1024, batch_per_image=512),
                              Schedule(iterations=80000, batch_size=16, lr=0.02, warmup_iters=500, steps=(60000,), checkpoint_every=2000)),
}
DEVIATIONS = {
    "smoke": "slim ResNet-18 from scratch (as Table 1), 2fc of 128, 128 RoIs per image, 200 iterations",
    "cpu": "slim ResNet-18 from scratch (as Table 1), 2fc of 512 instead of 1024, 128 RoIs per image, 200 iterations, "
           "300 test proposals per image, 100 for the conv5 row (Table 2's ``light_settings``)",
    "gpu": "ResNet-50 GroupNorm from scratch (as Table 1)",
    "training": "RPN and detector trained jointly (approximate joint training, proposals as constants) instead "
                "of one after the other; with unshared features the two losses touch disjoint weights",
    "conv5_on_cpu": table2.DEVIATIONS["conv5_on_cpu"],
    "canonical_size": "Eq. (1)'s 224 is scaled with the anchors (78 at 224 px images)",
    "single_map_candidates": "rows (a), (b): the RPN keeps 12000/6000 candidates before NMS on its one map "
                             "(Table 1's ``SINGLE_MAP_CANDIDATES``)",
}
ROW_OVERRIDES = {"c4_conv5": table1.SINGLE_MAP_CANDIDATES, "c5_2fc": table1.SINGLE_MAP_CANDIDATES}


def _sizes(preset: str) -> tuple[int, int]:
    data = get_preset(preset).data
    return (data.image_size, data.max_size) if data else (800, 1333)


def build_row(variant: str, preset: str, num_classes: int, seed: int = 0, share_features: bool = False) -> FasterRCNN:
    """The untrained detector of row ``variant`` under ``preset``'s budget (seeded init)."""
    torch.manual_seed(derive_seed(seed, 1))
    light = table2.light_settings(variant, preset)
    rpn = replace(RPNConfig(), **ROW_OVERRIDES.get(variant, {}))
    if "test_proposals" in light:
        rpn = replace(rpn, post_nms_top_n_test=light["test_proposals"])
    model = dict(BUDGETS[preset].model, **{k: v for k, v in light.items() if k != "test_proposals"})
    cfg = FasterRCNNConfig(variant=variant, num_classes=num_classes, share_features=share_features, rpn=rpn, **model)
    return FasterRCNN(cfg, generator=torch.Generator().manual_seed(derive_seed(seed, 3)))


def splits(preset: str, data_root):
    """The train (with flips) and val splits at the preset's image size."""
    min_size, max_size = _sizes(preset)
    train_set = load_coco_split(data_root, "train", transforms=build_transforms(True, min_size, max_size), with_masks=False)
    val_set = load_coco_split(data_root, "val", transforms=build_transforms(False, min_size, max_size), with_masks=False)
    return train_set, val_set


def load_row(variant: str, preset: str, run_dir, num_classes: int, seed: int = 0, device: str = "cpu") -> FasterRCNN:
    """Row ``variant`` with the weights of ``run_dir/last.pt`` (eval mode)."""
    model = build_row(variant, preset, num_classes, seed)
    load_checkpoint(model, Path(run_dir) / "last.pt", device=device)
    return model.to(device).eval()


def detection_metrics(model, val_set, device: str = "cpu", progress: bool = True) -> tuple[dict, float]:
    """Box AP on ``val_set`` (pycocotools) and the measured inference seconds per image."""
    t0 = time.perf_counter()
    dets = predict(model, val_set, device=device, progress=progress, desc="detections")
    per_image = (time.perf_counter() - t0) / max(len(val_set), 1)
    return box_ap(val_set.coco, dets, val_set.label_to_cat_id), per_image


def schedule_for(variant: str, preset: str, iterations: int | None = None, lr: float | None = None) -> Schedule:
    """The row's schedule: the preset's (cut to ``iterations`` if given; at ``lr`` if given). Every row trains
    at the preset's rate (no ``ROW_LR``)."""
    return row_schedule(BUDGETS[preset].schedule, {}, variant, preset, iterations, lr)


@reuse_evaluated
@halving_lr_on_divergence(schedule_for)
def run_row(variant: str, preset: str, data_root, out_dir, seed: int = 0, device: str = "cpu",
            iterations: int | None = None, progress: bool = True, lr: float | None = None) -> dict:
    """Train row ``variant`` (or load its finished checkpoint), then its box AP on val."""
    schedule = schedule_for(variant, preset, iterations, lr)
    train_set, val_set = splits(preset, data_root)
    model = build_row(variant, preset, train_set.num_classes, seed)
    run = train(model, train_set, schedule, Path(out_dir), seed=seed, device=device, progress=progress,
                description=f"Table 3 {variant}")
    metrics, per_image = detection_metrics(model, val_set, device=device, progress=progress)
    return {"variant": variant, "metrics": metrics, "iterations": schedule.iterations, "lr": schedule.lr,
            "train_time_s": round(run["train_time_s"], 1),
            "trained_from_iteration": run["resumed_from"], "train_commits": run["commits"],
            "final_losses": final_losses(Path(out_dir) / "log.jsonl"),
            "inference_s_per_image": round(per_image, 4)}


def run_table3(preset: str, data_root, runs_dir, out_dir, seed: int = 0, device: str = "cpu",
               variants=tuple(ROWS.values()), progress: bool = True, iterations: int | None = None,
               jobs: int = 1) -> dict:
    """Every row; writes ``out_dir/table3.json`` after each row and ``out_dir/table3.md`` at the end."""
    out_dir, runs_dir = Path(out_dir), Path(runs_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {"table": 3, "rows": {}, "deviations": {k: v for k, v in DEVIATIONS.items() if k not in BUDGETS or k == preset},
              "budget": {"model": BUDGETS[preset].model, "schedule": vars(BUDGETS[preset].schedule),
                         "row_overrides": ROW_OVERRIDES, "light_settings": table2.light_settings("c4_conv5", preset)}}

    row = RowJob(run_row, runs_dir, dict(preset=preset, data_root=data_root, seed=seed, device=device,
                                       iterations=iterations, progress=progress and jobs == 1))
    return run_rows(record, variants, row, out_dir, render_table3, preset, seed, device, jobs=jobs)


CLAIMS = (
    ("fpn", "c4_conv5", "AP", "FPN Faster R-CNN beats the C4/conv5 baseline (the paper: +2.3 AP)"),
    ("fpn", "c4_conv5", "AP_s", "FPN helps small objects most (the paper: +4.6 AP_s)"),
    ("fpn", "c5_2fc", "AP", "FPN beats the same 2fc head on C5 (the paper: +5.9 AP)"),
)


def claims(record: dict) -> list[Claim]:
    """Table 3's claims checked on a ``run_table3`` record."""
    from fpnlib.reference import paper_rows

    return check_claims(record, CLAIMS, paper_rows("table3_faster_rcnn"), PAPER_KEYS)


def render_table3(record: dict) -> str:
    """Markdown: each metric as ``ours / paper``, the paper-only row (*), provenance, claims."""
    from fpnlib.reference import paper_rows, paper_tables

    extra = [("proposals", lambda r, p: p["proposals"]), ("feature", lambda r, p: p["feature"]),
             ("head", lambda r, p: p["head"])]
    return render_table(record, paper_rows("table3_faster_rcnn"), PAPER_KEYS, {v: k for k, v in ROWS.items()},
                        METRICS, extra, paper_tables()["setting"], "the embedded val set, box AP by pycocotools",
                        claims(record), paper_only=PAPER_ONLY)
