"""How well proposals can cover the val objects, by size: why FPN trails C4 on large objects in
Table 1, and why Table 6's large objects get no segment proposal.

Table 1 scales the paper's anchor sizes to the smaller images but not the strides (DEVIATIONS.md),
so the pyramid's largest anchors (P5, P6) sit on a grid of 2-3 anchor widths' spacing instead of
the paper's 8, while C4 puts all five sizes on its dense stride-16 map. A large object then finds
fewer well-placed anchors in FPN, and some none that the labelling rule gives it (Sec. 4.1: the
best anchor of an object can be matched to a neighbour it overlaps more). ``anchor_coverage``
counts that on a split, per COCO size bucket, for each RPN row; ``results/<preset>/anchor_coverage.json``
keeps it with provenance.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fpnlib.data.crops import SIZE_BUCKETS


def anchor_coverage(preset: str, data_root, out_path=None, variants=("fpn", "c4"), split: str = "val") -> dict:
    """Per variant and size bucket: objects, objects with no positive anchor, median best anchor IoU,
    and objects whose best anchor IoU is under 0.5."""
    from fpnlib.config import get_preset
    from fpnlib.data.coco import load_coco_split
    from fpnlib.data.transforms import build_transforms
    from fpnlib.experiments import table1
    from fpnlib.provenance import provenance
    from fpnlib.viz_anchors import coverage_over_split, gather_ground_truth

    data = get_preset(preset).data
    ds = load_coco_split(data_root, split, transforms=build_transforms(False, data.image_size, data.max_size),
                         with_masks=False)
    ground_truth = gather_ground_truth(ds)
    scale = table1.BUDGETS[preset].model["anchor_scale"]
    record = {"split": split, "anchor_scale": scale, "variants": {}}
    for variant in variants:
        c = coverage_over_split(ground_truth, variant, scale)
        area, positives, best = c["side"] ** 2, c["positives"].sum(1), c["best_iou"]
        buckets = {}
        for name, lo, hi in SIZE_BUCKETS:
            sel = (area >= lo) & (area < hi)
            buckets[name] = {"objects": int(sel.sum()), "no_positive_anchor": int((positives[sel] == 0).sum()),
                             "median_best_iou": round(float(np.median(best[sel])), 3) if sel.any() else None,
                             "best_iou_under_0.5": int((best[sel] < 0.5).sum())}
        record["variants"][variant] = {"anchor_sizes": {k: list(v) for k, v in c["sizes"].items()}, "by_size": buckets}
    record["provenance"] = provenance(preset, 0, step="anchor coverage")
    if out_path is not None:
        Path(out_path).write_text(json.dumps(record, indent=1) + "\n")
    return record


def segment_coverage(preset: str, data_root, run_dir, variant: str = "dual", out_path=None, seed: int = 0) -> dict:
    """Why Table 6's large objects get no segment proposal, measured on a trained row (``run_dir``):
    per COCO size bucket, the val objects, how many the best of the 1000 proposals covers at mask
    IoU >= 0.5, the median best IoU overall and among the proposals of the object's own slot (the
    canonical scale Appendix A assigns it), which slots the objects fall to, and how many proposals
    each slot holds per image."""
    import collections

    import torch

    from fpnlib.config import get_preset
    from fpnlib.data.coco import load_coco_split
    from fpnlib.data.transforms import build_transforms
    from fpnlib.experiments import table6
    from fpnlib.modeling import segment_proposals as sp
    from fpnlib.provenance import provenance, shown_path

    data = get_preset(preset).data
    val = load_coco_split(data_root, "val", transforms=build_transforms(False, data.image_size, data.max_size),
                          with_masks=True)
    model = table6.load_row(variant, preset, run_dir, seed)
    names = [f"{s.level}/{s.mlp} ({s.scale:.0f} px)" for s in model.slots]
    per_slot, objects = collections.Counter(), []
    with torch.no_grad():
        for i in range(len(val)):
            image, target = val[i]
            out = model([image])[0]
            per_slot.update(out["slots"].tolist())
            keep = target["iscrowd"] == 0
            gt, boxes = target["masks"][keep].flatten(1).float(), target["boxes"][keep]
            if len(gt) == 0:
                continue
            masks = out["masks"].flatten(1).float()
            inter = gt @ masks.T
            iou = inter / (gt.sum(1, keepdim=True) + masks.sum(1)[None] - inter).clamp(min=1)
            own = sp.assign_segment_levels(sp.mask_scale(boxes), model.slots)
            for g in range(len(gt)):
                same = out["slots"] == own[g]
                objects.append((float(gt[g].sum()), int(own[g]), float(iou[g].max()),
                                float(iou[g][same].max()) if bool(same.any()) else 0.0))
    buckets = {}
    for name, lo, hi in SIZE_BUCKETS:
        sel = [o for o in objects if lo <= o[0] < hi]
        med = (lambda xs: round(float(np.median(xs)), 3) if xs else None)
        buckets[name] = {"objects": len(sel), "covered_at_iou_0.5": sum(o[2] >= 0.5 for o in sel),
                         "median_best_iou": med([o[2] for o in sel]), "median_best_iou_own_slot": med([o[3] for o in sel]),
                         "slots": dict(collections.Counter(names[o[1]] for o in sel).most_common())}
    evaluated = Path(run_dir) / "row.json"  # the row's own record (``tables.reuse_evaluated``), when there is one
    row = json.loads(evaluated.read_text())["row"] if evaluated.exists() else {}
    record = {"variant": variant, "checkpoint": shown_path(Path(run_dir) / "last.pt"),
              "row": {k: row[k] for k in ("metrics", "iterations", "lr", "initialisation", "train_commits") if k in row},
              "by_size": buckets,
              "proposals_per_image_by_slot": {names[k]: round(v / len(val), 1) for k, v in sorted(per_slot.items())},
              "provenance": provenance(preset, seed, step="segment coverage")}
    if out_path is not None:
        Path(out_path).write_text(json.dumps(record, indent=1) + "\n")
    return record
