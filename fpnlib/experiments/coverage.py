"""How well each RPN's anchors cover the val objects, by size: why FPN trails C4 on large objects.

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
