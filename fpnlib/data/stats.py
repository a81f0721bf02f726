"""What a data set holds, in COCO's terms: object sizes against the small / medium / large
limits that split the paper's AR and AP columns (AR_s, AR_m, AR_l in Tables 1, 2, 3, 6)."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

# COCO's area limits (pixels of the object's mask): small < 32², medium < 96², large above.
SMALL_MAX_AREA = 32.0**2
MEDIUM_MAX_AREA = 96.0**2


def scale_bucket(area: float) -> str:
    """COCO's size bucket of an object of ``area`` pixels."""
    if area < SMALL_MAX_AREA:
        return "small"
    return "medium" if area < MEDIUM_MAX_AREA else "large"


def dataset_statistics(ann_file: str | Path, img_dir: str | Path | None = None) -> dict:
    """Counts a reader wants before training: objects per size bucket and category, and the
    COCO quirks present (crowd regions, empty and grayscale images, polygon vs RLE masks).

    Crowd regions are counted apart and left out of the size shares, as COCO's evaluation
    ignores them. ``img_dir`` (optional) lets grayscale images be counted from the files.
    """
    d = json.loads(Path(ann_file).read_text())
    names = {c["id"]: c["name"] for c in d["categories"]}
    objects = [a for a in d["annotations"] if not a.get("iscrowd", 0)]
    areas = np.array([a["area"] for a in objects], dtype=np.float64)
    buckets = Counter(scale_bucket(a) for a in areas)
    n = max(len(objects), 1)
    with_objects = {a["image_id"] for a in d["annotations"]}
    seg_kinds = Counter("polygon" if isinstance(a["segmentation"], list) else "rle"
                        for a in d["annotations"] if "segmentation" in a)
    stats = {
        "annotation_file": str(ann_file),
        "num_images": len(d["images"]),
        "num_objects": len(objects),
        "num_crowd_regions": len(d["annotations"]) - len(objects),
        "num_empty_images": sum(im["id"] not in with_objects for im in d["images"]),
        "share_small": buckets["small"] / n,
        "share_medium": buckets["medium"] / n,
        "share_large": buckets["large"] / n,
        "sqrt_area_min": float(np.sqrt(areas.min())) if len(areas) else 0.0,
        "sqrt_area_max": float(np.sqrt(areas.max())) if len(areas) else 0.0,
        "octaves": float(np.log2(np.sqrt(areas.max() / areas.min()))) if len(areas) else 0.0,
        "objects_per_category": {names[c]: k for c, k in sorted(Counter(a["category_id"] for a in objects).items())},
        "category_ids": sorted(names),
        "segmentation_kinds": dict(seg_kinds),
    }
    if img_dir is not None:
        stats["num_grayscale_images"] = sum(
            Image.open(Path(img_dir) / im["file_name"]).mode == "L" for im in d["images"])
    return stats


def object_areas(ann_file: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Areas and category ids of the non-crowd objects (for histograms)."""
    d = json.loads(Path(ann_file).read_text())
    objects = [a for a in d["annotations"] if not a.get("iscrowd", 0)]
    return (np.array([a["area"] for a in objects], dtype=np.float64),
            np.array([a["category_id"] for a in objects], dtype=np.int64))
