"""Table 3 of the paper: Faster R-CNN with consistent proposals (Sec. 5.2.2).

Each row is a whole detector whose RPN and region head use the same kind of features:
(a) RPN on C4 + conv5 head, (b) RPN on C5 + 2fc head, (c) RPN on P2..P6 + 2fc head on the P_k
of Eq. (1). As in the paper, RPN and Fast R-CNN are trained separately and do not share
features (Table 5 shares them): each row's RPN is Table 1's RPN of that feature, and its Fast
R-CNN is trained on that RPN's fixed proposals, as Table 2 trains its rows. Row (c) is therefore
the very model of Table 2(c), trained once: the paper reports 33.9 AP for both. The paper's row
(*), He et al.'s published C4 number, is shown as a paper-only row.
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
from fpnlib.engine.train import Schedule, derive_seed, load_checkpoint
from fpnlib.experiments import table1, table2
from fpnlib.experiments.tables import Claim, RowJob, check_claims, render_table, run_rows
from fpnlib.modeling.faster_rcnn import FasterRCNN, FasterRCNNConfig
from fpnlib.modeling.rpn import RPNConfig
from fpnlib.provenance import shown_path

ROWS = {"a": "c4_conv5", "b": "c5_2fc", "c": "fpn"}
PAPER_KEYS = {"c4_conv5": "a_conv4", "c5_2fc": "b_conv5", "fpn": "c_fpn"}
PAPER_ONLY = (("(*) He et al. [16]", "star_he_et_al"),)
METRICS = ("AP50", "AP", "AP_s", "AP_m", "AP_l")


@dataclass(frozen=True)
class FasterRCNNBudget:
    """``FasterRCNNConfig`` overrides of one preset's Table 3 detector, and the schedule its Fast
    R-CNN trains with (Table 2's; its RPN is Table 1's row, on Table 1's schedule)."""

    model: dict
    schedule: Schedule


def _budget(preset: str) -> FasterRCNNBudget:
    """Table 2's Fast R-CNN (model and schedule) with Table 1's anchor scale for its RPN."""
    fast = table2.BUDGETS[preset]
    return FasterRCNNBudget(dict(fast.model, anchor_scale=table1.BUDGETS[preset].model["anchor_scale"]), fast.schedule)


BUDGETS = {preset: _budget(preset) for preset in table2.BUDGETS}
DEVIATIONS = {
    "protocol": "as the paper: RPN and Fast R-CNN trained separately (RPN = Table 1's row of the feature, Fast "
                "R-CNN on its fixed proposals with Table 2's budget); row (c) is Table 2(c)'s model",
    "budget": "the Fast R-CNN of each row has Table 2's budget and deviations (network, schedule, RoIs, "
              "test proposals)",
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


def detection_metrics(model, val_set, device: str = "cpu", progress: bool = True) -> tuple[dict, float]:
    """Box AP on ``val_set`` (pycocotools) and the measured inference seconds per image."""
    t0 = time.perf_counter()
    dets = predict(model, val_set, device=device, progress=progress, desc="detections")
    per_image = (time.perf_counter() - t0) / max(len(val_set), 1)
    return box_ap(val_set.coco, dets, val_set.label_to_cat_id), per_image


# Each row's RPN: Table 1's row on the same feature (Sec. 5.2.2: "consistent proposals").
RPN_OF = {"c4_conv5": "c4", "c5_2fc": "c5", "fpn": "fpn"}


def _runs_root(out_dir) -> Path:
    """``runs_root`` of a row's folder ``runs_root/table3/<row>`` (the tables' folder convention)."""
    return Path(out_dir).parent.parent


def fast_rcnn_run_dir(variant: str, out_dir) -> Path:
    """Where row ``variant``'s Fast R-CNN is trained: row (c) is Table 2(c), ``runs_root/table2/fpn``."""
    return _runs_root(out_dir) / "table2" / "fpn" if variant == "fpn" else Path(out_dir)


def rpn_proposals(variant: str, preset: str, data_root, out_dir, seed: int = 0, device: str = "cpu",
                  iterations: int | None = None, progress: bool = True, pretrained=None) -> dict[str, Path]:
    """The fixed train/val proposals of row ``variant``'s RPN (Table 1's row ``RPN_OF[variant]``,
    trained first if it is missing). Row (c) reads the files of Table 2."""
    runs_root, rpn = _runs_root(out_dir), RPN_OF[variant]
    table1.run_row(rpn, preset, data_root, runs_root / "table1" / rpn, seed=seed, device=device,
                   iterations=iterations, progress=progress, pretrained=pretrained)
    where = runs_root / "table2" if rpn == "fpn" else runs_root / "table3" / f"proposals_{rpn}"
    return table2.compute_fixed_proposals(preset, data_root, runs_root / "table1" / rpn, where, seed=seed,
                                          device=device, progress=progress, rpn_variant=rpn)


def run_row(variant: str, preset: str, data_root, out_dir, seed: int = 0, device: str = "cpu",
            iterations: int | None = None, progress: bool = True, pretrained=None) -> dict:
    """Row ``variant``: its RPN's proposals, and a Fast R-CNN trained on them with Table 2's budget
    (or loaded from its finished checkpoint), scored on val. Row (c) is Table 2(c)'s very run.
    ``out_dir`` is ``runs_root/table3/<row>``; Tables 1 and 2 are found beside it."""
    proposals = rpn_proposals(variant, preset, data_root, out_dir, seed, device, iterations, progress, pretrained)
    run_dir = fast_rcnn_run_dir(variant, out_dir)
    row = table2.run_row(variant, preset, data_root, proposals, run_dir, seed=seed, device=device,
                         iterations=iterations, progress=progress, pretrained=pretrained)
    return dict(row, rpn=f"Table 1 ({next(k for k, v in table1.ROWS.items() if v == RPN_OF[variant])}) "
                         f"{RPN_OF[variant]}", fast_rcnn_run=shown_path(run_dir))


def load_row(variant: str, preset: str, out_dir, num_classes: int, seed: int = 0, device: str = "cpu") -> FasterRCNN:
    """Row ``variant`` as one ``FasterRCNN`` (eval mode): the RPN network of its Table 1 row and the
    Fast R-CNN of its run, each with its own backbone, as trained (``out_dir``: as ``run_row``)."""
    rpn = table1.load_row(RPN_OF[variant], preset, _runs_root(out_dir) / "table1" / RPN_OF[variant], seed, device)
    fast = table2.build_row(variant, preset, num_classes, seed)
    load_checkpoint(fast, fast_rcnn_run_dir(variant, out_dir) / "last.pt", device=device)
    model = build_row(variant, preset, num_classes, seed)
    model.load_state_dict({**fast.state_dict(), **{f"rpn_network.{k}": v for k, v in rpn.state_dict().items()}})
    return model.to(device).eval()


def run_table3(preset: str, data_root, runs_dir, out_dir, seed: int = 0, device: str = "cpu",
               variants=tuple(ROWS.values()), progress: bool = True, iterations: int | None = None,
               jobs: int = 1, pretrained=None) -> dict:
    """Every row; writes ``out_dir/table3.json`` after each row and ``out_dir/table3.md`` at the end.
    ``runs_dir`` is ``runs_root/table3``: the RPNs of Table 1 and row (c) of Table 2 are read (or
    trained) in ``runs_root/table1`` and ``runs_root/table2``."""
    out_dir, runs_dir = Path(out_dir), Path(runs_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {"table": 3, "rows": {}, "deviations": {k: v for k, v in DEVIATIONS.items() if k not in BUDGETS or k == preset},
              "budget": {"model": BUDGETS[preset].model, "schedule": vars(BUDGETS[preset].schedule),
                         "row_overrides": ROW_OVERRIDES, "light_settings": table2.light_settings("c4_conv5", preset),
                         "protocol": "RPN = Table 1's row of the feature; Fast R-CNN trained on its fixed proposals "
                                     "with Table 2's budget; row (c) = Table 2(c)"}}

    row = RowJob(run_row, runs_dir, dict(preset=preset, data_root=data_root, seed=seed, device=device,
                                       iterations=iterations, progress=progress and jobs == 1, pretrained=pretrained))
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
