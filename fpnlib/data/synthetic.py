"""A deterministic, COCO-format shapes data set built to exercise feature pyramids.

Why it looks the way it does. FPN's point (Sec. 1, Table 1) is that a detector reading a
single coarse map (C4 or C5) misses small objects, while a pyramid with a head on every
level finds objects over many octaves of scale. So the set is built around scale:

* object sides (sqrt of the area) are drawn **log-uniformly** over >= 4 octaves, which puts
  a large share of the objects in each of COCO's small / medium / large buckets (area < 32^2,
  32^2..96^2, > 96^2) at the ``cpu`` preset's image size (about 42 / 35 / 22 %), so the
  s/m/l APs of pycocotools measure what the paper's Table 1 measures;
* classes differ by **shape only**; colour, texture and rotation are drawn independently of
  the class, so a detector has to look at structure, not at a colour shortcut;
* clutter (gradients, noise, lines), unlabelled distractor shapes and mutual occlusion keep
  the task from being a blob detector;
* the COCO quirks a real loader meets are here too: polygon, uncompressed-RLE and
  compressed-RLE masks, ``iscrowd`` regions, non-contiguous category ids, grayscale images,
  images without objects, and varied aspect ratios.

Determinism: every image gets its own ``numpy`` Generator seeded by ``(seed, split, index)``,
so the bytes written do not depend on the number of worker processes; the JSON carries no
timestamps and JPEG quality is fixed.

Read top to bottom: shape vocabulary -> one object -> one image -> a split -> the set.
"""
from __future__ import annotations

import json
import multiprocessing as mp
from dataclasses import asdict
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from fpnlib.config import DataConfig

# --------------------------------------------------------------------------------------
# Shape vocabulary
# --------------------------------------------------------------------------------------

# Ids are deliberately NOT contiguous (as in COCO, whose 80 classes use ids 1..90), so that
# a loader has to map category ids to contiguous labels and back.
CATEGORIES: list[dict] = [
    {"id": 1, "name": "disk", "supercategory": "round"},
    {"id": 3, "name": "triangle", "supercategory": "polygon"},
    {"id": 4, "name": "square", "supercategory": "polygon"},
    {"id": 7, "name": "star", "supercategory": "polygon"},
    {"id": 9, "name": "cross", "supercategory": "polygon"},
    {"id": 12, "name": "ring", "supercategory": "round"},
    {"id": 15, "name": "crescent", "supercategory": "round"},
    {"id": 18, "name": "ell", "supercategory": "polygon"},
]

JPEG_QUALITY = 90
MIN_VISIBLE_FRAC = 0.3  # drop objects with less of their own area left visible ...
MIN_VISIBLE_AREA = 12  # ... or fewer visible pixels than this: the label would be noise
SPLIT_INDEX = {"train": 0, "val": 1}

# Deterministic placement of the rare COCO quirks (by image id, so even the 48-image smoke
# set has each of them); the residues do not collide for ids below 1000.
GRAY_EVERY, GRAY_AT = 20, 7  # 5% grayscale images
EMPTY_EVERY, EMPTY_AT = 25, 13  # 4% images without objects
CROWD_EVERY, CROWD_AT = 10, 4  # 10% images with an iscrowd region


def _circle(r: float = 1.0, n: int = 40) -> np.ndarray:
    t = np.linspace(0.0, 2 * np.pi, n, endpoint=False)
    return np.stack([r * np.cos(t), r * np.sin(t)], 1)


def _star(rng: np.random.Generator) -> np.ndarray:
    r = np.tile([1.0, rng.uniform(0.38, 0.5)], 5)
    t = np.pi / 2 + np.arange(10) * np.pi / 5
    return np.stack([r * np.cos(t), r * np.sin(t)], 1)


def _cross(rng: np.random.Generator) -> np.ndarray:
    a = rng.uniform(0.25, 0.4)  # half width of the arms
    return np.array([(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a),
                     (a, 1), (-a, 1), (-a, a), (-1, a), (-1, -a), (-a, -a)], float)


def _ell(rng: np.random.Generator) -> np.ndarray:
    t = rng.uniform(-0.45, -0.25)  # inner corner; arm thickness 0.55..0.75 of 2
    return np.array([(-1, -1), (1, -1), (1, t), (t, t), (t, 1), (-1, 1)], float)


def _crescent(rng: np.random.Generator) -> np.ndarray:
    """Unit disk minus a disk of radius r shifted by d: outer arc, then inner arc back."""
    d, r = rng.uniform(0.4, 0.55), rng.uniform(0.8, 0.9)
    x = (1 + d * d - r * r) / (2 * d)  # where the two circles cross, at (x, +-y)
    y = np.sqrt(1 - x * x)
    a0, b0 = np.arctan2(y, x), np.arctan2(y, x - d)
    outer = np.linspace(a0, 2 * np.pi - a0, 32)
    inner = np.linspace(2 * np.pi - b0, b0, 24)[1:-1]
    return np.concatenate([np.stack([np.cos(outer), np.sin(outer)], 1),
                           np.stack([d + r * np.cos(inner), r * np.sin(inner)], 1)])


# name -> rng -> (outer contour, holes), (N, 2) arrays in unit coordinates around the
# origin; size, aspect jitter and rotation are applied later, identically for every class.
SHAPES = {
    "disk": lambda rng: (_circle(), []),
    "triangle": lambda rng: (_circle(n=3), []),
    "square": lambda rng: (np.array([(-1, -1), (1, -1), (1, 1), (-1, 1)], float), []),
    "star": lambda rng: (_star(rng), []),
    "cross": lambda rng: (_cross(rng), []),
    "ring": lambda rng: (_circle(), [_circle(rng.uniform(0.45, 0.62))]),
    "crescent": lambda rng: (_crescent(rng), []),
    "ell": lambda rng: (_ell(rng), []),
}
assert [c["name"] for c in CATEGORIES] == list(SHAPES)


def _rasterize(rings: list[list[float]], h: int, w: int) -> np.ndarray:
    """Union of polygons as a boolean mask, rasterized exactly as pycocotools rasterizes a
    polygon annotation, so a polygon written to the JSON decodes to the drawn pixels."""
    return mask_utils.decode(mask_utils.frPyObjects(rings, h, w)).max(axis=2).astype(bool)


# --------------------------------------------------------------------------------------
# One object: a shape placed at a log-uniform size, rotated, with a random texture
# --------------------------------------------------------------------------------------

def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(np.exp2(rng.uniform(np.log2(lo), np.log2(hi))))


def _poly_area(p: np.ndarray) -> float:
    x, y = p[:, 0], p[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _place(rng: np.random.Generator, outer: np.ndarray, holes: list[np.ndarray],
           side: float, region: tuple[float, float, float, float]) -> list[list[float]]:
    """Jitter the aspect a little, rotate, scale to area ``side**2`` (less if it would not
    fit) and put the whole shape inside ``region`` (x, y, w, h).

    ``side`` is the side of the square of equal area, the quantity COCO's s/m/l buckets
    threshold. Coordinates are rounded to 0.01 px *before* rasterizing, so the numbers in
    the JSON are exactly the ones that were drawn."""
    aspect = np.array([np.exp(rng.uniform(-0.2, 0.2)), 1.0])
    t = rng.uniform(0, 2 * np.pi)
    rot = np.array([[np.cos(t), np.sin(t)], [-np.sin(t), np.cos(t)]])
    pts = [(p * aspect) @ rot for p in [outer, *holes]]
    lo, hi = pts[0].min(0), pts[0].max(0)
    area = _poly_area(pts[0]) - sum(_poly_area(p) for p in pts[1:])
    scale = min(side / np.sqrt(area), float(np.min(np.asarray(region[2:]) / (hi - lo))))
    ext = (hi - lo) * scale
    rx, ry, rw, rh = region
    origin = np.array([rx + rng.uniform(0, max(rw - ext[0], 0)),
                       ry + rng.uniform(0, max(rh - ext[1], 0))])
    pts = [np.round((p - lo) * scale + origin, 2) for p in pts]
    return [p.ravel().tolist() for p in pts]


def _shape_mask(rings: list[list[float]], h: int, w: int) -> np.ndarray:
    """Outer contour minus the holes (only the ring has one)."""
    m = _rasterize(rings[:1], h, w)
    if len(rings) > 1:
        m &= ~_rasterize(rings[1:], h, w)
    return m


def _color(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, 255, 3).astype(np.float32)


def _texture(rng: np.random.Generator, hc: int, wc: int) -> np.ndarray:
    """A (hc, wc, 3) float texture: solid, stripes, speckle or gradient, any colour.
    Drawn from the rng alone, never from the class: colour carries no label."""
    kind = rng.integers(4)
    c0 = _color(rng)
    if kind == 0:
        return np.broadcast_to(c0, (hc, wc, 3))
    t = rng.uniform(0, 2 * np.pi)
    u = np.add.outer(np.arange(hc, dtype=np.float32) * np.float32(np.sin(t)),
                     np.arange(wc, dtype=np.float32) * np.float32(np.cos(t)))
    if kind == 1:
        stripe = (np.floor(u / rng.uniform(2.0, 10.0)) % 2).astype(bool)
        return np.where(stripe[..., None], _color(rng), c0)
    if kind == 2:
        return c0 + rng.normal(0, rng.uniform(15, 45), (hc, wc, 1)).astype(np.float32)
    u = (u - u.min()) / max(float(np.ptp(u)), 1.0)
    return c0 + u[..., None] * (_color(rng) - c0)


def _bbox_of(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(x0, y0, x1, y1), exclusive ends, of a boolean mask, or None if empty."""
    cols, rows = np.flatnonzero(mask.any(0)), np.flatnonzero(mask.any(1))
    if cols.size == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _paint(rng: np.random.Generator, canvas: np.ndarray, owner: np.ndarray,
           mask: np.ndarray, layer: int) -> None:
    """Paint a texture into ``canvas`` under ``mask`` and record ``layer`` as its owner."""
    box = _bbox_of(mask)
    if box is None:
        return
    x0, y0, x1, y1 = box
    m = mask[y0:y1, x0:x1]
    np.copyto(canvas[y0:y1, x0:x1], _texture(rng, y1 - y0, x1 - x0), where=m[..., None])
    owner[y0:y1, x0:x1][m] = layer


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE: run lengths over the column-major pixels, zeros first."""
    flat = mask.ravel(order="F")
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    counts = np.diff(np.concatenate([[0], change, [flat.size]]))
    if flat[0]:
        counts = np.concatenate([[0], counts])
    return {"counts": counts.tolist(), "size": list(mask.shape)}


def _compressed_rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"counts": rle["counts"].decode("ascii"), "size": list(rle["size"])}


# --------------------------------------------------------------------------------------
# One image: background clutter, objects and distractors back to front, visible masks
# --------------------------------------------------------------------------------------

def _image_shape(rng: np.random.Generator, cfg: DataConfig) -> tuple[int, int]:
    """Shorter side ``image_size``, longer side up to ``max_size``, either orientation."""
    long_side = int(rng.integers(cfg.image_size, cfg.max_size + 1))
    return (cfg.image_size, long_side) if rng.random() < 0.6 else (long_side, cfg.image_size)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Colour gradient + low-frequency colour blotches + random lines, float32 (h, w, 3).

    Gradient and blotches are built on a coarse grid and upsampled bilinearly once (a
    linear ramp survives bilinear upsampling), so no full-size float passes are needed."""
    gh, gw = int(rng.integers(2, 9)), int(rng.integers(2, 9))
    t = rng.uniform(0, 2 * np.pi)
    ramp = np.add.outer((np.arange(gh) + 0.5) / gh * np.sin(t), (np.arange(gw) + 0.5) / gw * np.cos(t))
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)
    c0, c1 = _color(rng), _color(rng)
    coarse = c0 + ramp[..., None] * (c1 - c0) + rng.uniform(-1, 1, (gh, gw, 3)) * rng.uniform(10, 70)
    img = Image.fromarray(np.clip(coarse, 0, 255).astype(np.uint8)).resize((w, h), Image.BILINEAR)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 10))):
        xy = [float(v) for v in rng.uniform(0, 1, 4) * [w, h, w, h]]
        draw.line(xy, fill=tuple(int(c) for c in _color(rng)), width=int(rng.integers(1, 4)))
    return np.asarray(img, dtype=np.float32)


def _distractor(rng: np.random.Generator, cfg: DataConfig, h: int, w: int) -> np.ndarray:
    """A shape of no category: an irregular jagged polygon or a thick scribble."""
    side = _log_uniform(rng, cfg.min_object, 0.4 * cfg.image_size)
    if rng.random() < 0.6:
        # Evenly spread, jittered angles and random radii: a spiky blob, never a clean
        # triangle or square that would be an unlabelled positive.
        n = int(rng.integers(7, 13))
        ang = (np.arange(n) + rng.uniform(-0.3, 0.3, n)) * (2 * np.pi / n)
        r = rng.uniform(0.3, 1.0, n)
        poly = np.stack([r * np.cos(ang), r * np.sin(ang)], 1)
        return _shape_mask(_place(rng, poly, [], side, (0, 0, w, h)), h, w)
    # A thin wiggly stroke (thin, so that a two-segment stroke never passes for an "ell").
    pts = rng.uniform(0, side, (int(rng.integers(4, 9)), 2))
    pts += [rng.uniform(0, max(w - side, 1)), rng.uniform(0, max(h - side, 1))]
    img = Image.new("L", (w, h))
    ImageDraw.Draw(img).line([tuple(p) for p in pts.tolist()], fill=1,
                             width=int(rng.integers(1, max(2, int(side / 16)) + 1)), joint="curve")
    return np.asarray(img).astype(bool)


def _crowd(rng: np.random.Generator, cfg: DataConfig, h: int, w: int) -> tuple[int, np.ndarray]:
    """A cluster of many small shapes of one class, annotated as one iscrowd region
    (like COCO's crowds of people): detectors must neither learn from nor be punished
    for the individual members."""
    cat = int(rng.integers(len(CATEGORIES)))
    name = CATEGORIES[cat]["name"]
    radius = rng.uniform(0.08, 0.18) * cfg.image_size
    cx, cy = rng.uniform(radius, w - radius), rng.uniform(radius, h - radius)
    mask = np.zeros((h, w), bool)
    for _ in range(int(rng.integers(8, 21))):
        side = rng.uniform(0.02, 0.045) * cfg.image_size + 3
        outer, holes = SHAPES[name](rng)
        rings = _place(rng, outer, holes, side, (cx - radius, cy - radius, 2 * radius, 2 * radius))
        mask |= _shape_mask(rings, h, w)
    return cat, mask


def generate_image(rng: np.random.Generator, cfg: DataConfig, image_id: int
                   ) -> tuple[Image.Image, list[dict]]:
    """Render one image and its annotations (with ``image_id``, without ``id``).

    A pure function of ``rng``, ``cfg`` and ``image_id`` (the id only decides the rare
    quirks: grayscale, empty, crowd). Layers are painted back to front; an object's
    annotation is the part of it still visible at the end, and objects left mostly
    hidden are dropped (their pixels stay, unlabelled, like clutter).
    """
    h, w = _image_shape(rng, cfg)
    canvas = _background(rng, h, w)
    owner = np.zeros((h, w), np.int32)  # 0 background, -1 distractor, k > 0 layer k
    empty = image_id % EMPTY_EVERY == EMPTY_AT

    # (depth, kind, payload): larger things tend to sit behind smaller ones, with noise,
    # so occlusion happens both ways but small objects are not wiped out wholesale.
    lo, hi = cfg.min_object, cfg.max_object_frac * cfg.image_size
    layers = []
    for _ in range(0 if empty else int(rng.integers(1, cfg.max_objects + 1))):
        cat = int(rng.integers(len(CATEGORIES)))
        side = _log_uniform(rng, lo, hi)
        layers.append((np.log2(side) + rng.normal(0, 1.0), "object", (cat, side)))
    for _ in range(int(rng.integers(1, 6))):
        layers.append((rng.uniform(np.log2(lo), np.log2(hi)), "distractor", None))
    if image_id % CROWD_EVERY == CROWD_AT:
        layers.append((rng.uniform(np.log2(lo), np.log2(hi)), "crowd", None))
    layers.sort(key=lambda layer: -layer[0])

    drawn = []  # (layer id, category index, full mask, rings or None, iscrowd)
    for k, (_, kind, payload) in enumerate(layers, start=1):
        if kind == "object":
            cat, side = payload
            outer, holes = SHAPES[CATEGORIES[cat]["name"]](rng)
            rings = _place(rng, outer, holes, side, (0, 0, w, h))
            mask = _shape_mask(rings, h, w)
            drawn.append((k, cat, mask, rings, 0))
        elif kind == "crowd":
            cat, mask = _crowd(rng, cfg, h, w)
            drawn.append((k, cat, mask, None, 1))
        else:
            mask = _distractor(rng, cfg, h, w)
        _paint(rng, canvas, owner, mask, k if kind != "distractor" else -1)

    anns = []
    for k, cat, full, rings, iscrowd in drawn:
        visible = owner == k
        area = int(visible.sum())
        if area < MIN_VISIBLE_AREA or (not iscrowd and area < MIN_VISIBLE_FRAC * full.sum()):
            continue
        x0, y0, x1, y1 = _bbox_of(visible)
        if iscrowd:
            segm = _uncompressed_rle(visible)  # as COCO stores its crowds
        elif len(rings) > 1:
            segm = _compressed_rle(visible)  # a ring has a hole: no polygon can say that
        elif area == int(full.sum()):
            segm = [rings[0]]  # fully visible simple polygon
        else:
            segm = _uncompressed_rle(visible)  # occluded: what is left is any shape
        anns.append({
            "image_id": image_id,
            "category_id": CATEGORIES[cat]["id"],
            "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
            "area": float(area),
            "iscrowd": iscrowd,
            "segmentation": segm,
        })

    # A little sensor noise over everything, then 8 bits.
    canvas += rng.normal(0, rng.uniform(0, 6), (h, w, 1)).astype(np.float32)
    image = Image.fromarray(np.clip(canvas + 0.5, 0, 255).astype(np.uint8))
    if image_id % GRAY_EVERY == GRAY_AT:
        image = image.convert("L")  # a few COCO images are single channel too
    return image, anns


# --------------------------------------------------------------------------------------
# A split: images written as JPEG, annotations collected in index order
# --------------------------------------------------------------------------------------

def _split_size(cfg: DataConfig, split: str) -> int:
    if split not in SPLIT_INDEX:
        raise ValueError(f"unknown split {split!r}; choose from {sorted(SPLIT_INDEX)}")
    return cfg.num_train if split == "train" else cfg.num_val


def _render_one(job: tuple[DataConfig, str, int, str]) -> tuple[dict, list[dict]]:
    """Generate, save and describe image ``index`` of ``split`` (runs in a worker too).
    Its rng depends on (seed, split, index) only, hence on no other image or worker."""
    cfg, split, index, image_dir = job
    rng = np.random.default_rng([cfg.seed, SPLIT_INDEX[split], index])
    image_id = index + 1
    image, anns = generate_image(rng, cfg, image_id)
    file_name = f"{image_id:06d}.jpg"
    image.save(Path(image_dir) / file_name, format="JPEG", quality=JPEG_QUALITY)
    record = {"id": image_id, "file_name": file_name, "width": image.width,
              "height": image.height, "license": 1}
    return record, anns


def _coco_dict(cfg: DataConfig, split: str, results) -> dict:
    images, annotations = [], []
    for record, anns in results:
        images.append(record)
        for ann in anns:
            annotations.append({"id": len(annotations) + 1, **ann})
    return {
        "info": {"description": "fpnlib synthetic shapes (FPN reproduction)", "version": "1.0",
                 "split": split, "config": asdict(cfg)},
        "licenses": [{"id": 1, "name": "CC0 1.0", "url": "https://creativecommons.org/publicdomain/zero/1.0/"}],
        "images": images,
        "annotations": annotations,
        "categories": [dict(c) for c in CATEGORIES],
    }


# --------------------------------------------------------------------------------------
# The set
# --------------------------------------------------------------------------------------

def generate(root: str | Path, cfg: DataConfig, splits=("train", "val"), progress: bool = True,
             workers: int = 0) -> dict[str, Path]:
    """Write ``root/{split}/NNNNNN.jpg`` and ``root/annotations/instances_{split}.json``
    (COCO's layout) for each split; return ``{split: annotation path}``.

    ``workers > 0`` renders images in that many processes; the bytes written are the same
    as with ``workers=0``.
    """
    from tqdm.auto import tqdm

    root = Path(root)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    pool = None
    if workers > 0:
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        pool = mp.get_context(method).Pool(workers)
    paths = {}
    try:
        for split in splits:
            n = _split_size(cfg, split)
            image_dir = root / split
            image_dir.mkdir(parents=True, exist_ok=True)
            jobs = [(cfg, split, i, str(image_dir)) for i in range(n)]
            results = pool.imap(_render_one, jobs, chunksize=8) if pool else map(_render_one, jobs)
            results = list(tqdm(results, total=n, desc=f"synthetic {split}", disable=not progress))
            path = root / "annotations" / f"instances_{split}.json"
            text = json.dumps(_coco_dict(cfg, split, results), separators=(",", ":"))
            path.write_text(text, encoding="utf-8")
            paths[split] = path
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    return paths
