"""COCO-format detection data set, validated once at construction.

The paper trains and evaluates on COCO (Lin et al., 2017, Sec. 5): 80 categories whose ids
run non-contiguously from 1 to 90. Here they are mapped to contiguous labels ``1..K``
(``0`` is background, the torchvision detection convention), and every sample is returned as
``(image, target)`` with ``boxes`` in ``xyxy`` pixels, ``labels``, ``masks``, ``iscrowd``...

Everything that can be checked from the JSON is checked when the data set is built, so that
a broken annotation file fails at once with a message naming the file and the problem,
rather than hours into training. Image files are only opened in ``__getitem__``, or all at
once by :meth:`CocoDetection.validate_images` (headers only), which the command line runs
before it trains (:meth:`CocoDetection.check_for_training`).
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from pycocotools.coco import COCO
from torchvision.transforms.functional import pil_to_tensor

__all__ = ["CocoFormatError", "CocoFormatWarning", "CocoDetection", "load_coco_split"]

# pycocotools' compiled decoder trips a NumPy 2 deprecation on every mask; it is harmless
# and would flood training logs, so silence exactly that message from that module.
warnings.filterwarnings(
    "ignore", message="__array__ implementation doesn't accept a copy keyword",
    category=DeprecationWarning, module="pycocotools",
)

_REQUIRED_TOP = ("images", "annotations", "categories")
_REQUIRED_IMAGE = ("id", "file_name", "width", "height")
_REQUIRED_ANN = ("id", "image_id", "category_id", "bbox")


class CocoFormatError(ValueError):
    """A COCO annotation file or one of its images is unusable; the message names which."""


class CocoFormatWarning(UserWarning):
    """Something in a COCO file was skipped (e.g. degenerate boxes) rather than fatal."""


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _clipped_xyxy(bbox, width: float, height: float) -> tuple[float, float, float, float]:
    """COCO ``[x, y, w, h]`` -> ``[x1, y1, x2, y2]`` clipped to the image."""
    x, y, w, h = bbox
    return (
        min(max(x, 0.0), width),
        min(max(y, 0.0), height),
        min(max(x + w, 0.0), width),
        min(max(y + h, 0.0), height),
    )


def _is_degenerate(bbox, width: float, height: float) -> bool:
    if not all(math.isfinite(v) for v in bbox) or bbox[2] <= 0 or bbox[3] <= 0:
        return True
    x1, y1, x2, y2 = _clipped_xyxy(bbox, width, height)
    return x2 <= x1 or y2 <= y1  # lies wholly outside the image


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CocoFormatError(
            f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}"
        ) from e
    except (OSError, UnicodeDecodeError) as e:
        raise CocoFormatError(f"{path}: cannot read annotation file ({e})") from e


def _check_segmentation(segm, ann_id, img: dict, path: Path):
    """Validate a polygon list or RLE dict; return it with sub-3-point polygons removed.

    pycocotools reads a first polygon of exactly 4 numbers as a *box*, and an empty polygon
    list crashes it, so such zero-area polygons are dropped here rather than decoded wrongly.
    """
    if isinstance(segm, list):
        for poly in segm:
            if not isinstance(poly, list) or len(poly) % 2 or not all(_is_number(v) for v in poly):
                raise CocoFormatError(
                    f"{path}: annotation {ann_id} has a polygon that is not an even-length "
                    f"list of numbers"
                )
        return [poly for poly in segm if len(poly) >= 6]
    if isinstance(segm, dict):
        counts, size = segm.get("counts"), segm.get("size")
        if not isinstance(counts, (list, str)) or not (
            isinstance(size, list) and len(size) == 2 and all(_is_int(v) for v in size)
        ):
            raise CocoFormatError(
                f"{path}: annotation {ann_id} has an RLE segmentation without a list/str "
                f"'counts' and an [h, w] 'size'"
            )
        if size != [img["height"], img["width"]]:
            raise CocoFormatError(
                f"{path}: annotation {ann_id} has an RLE of size {size} but its image "
                f"{img['id']} is {img['height']}x{img['width']} (h x w)"
            )
        return segm
    raise CocoFormatError(
        f"{path}: annotation {ann_id} has a segmentation that is neither a polygon list nor an RLE dict"
    )


def _validate(d, path: Path, with_masks: bool) -> tuple[dict, list]:
    """Check the structure of a COCO dict; return it without degenerate boxes, plus their ids.

    Missing optional fields are filled the way COCO defines them (``iscrowd`` 0, ``area`` the
    box area) because ``COCOeval`` reads ``area`` for its small/medium/large split.
    """
    if not isinstance(d, dict):
        raise CocoFormatError(f"{path}: top level must be a JSON object, got {type(d).__name__}")
    for key in _REQUIRED_TOP:
        if key not in d:
            raise CocoFormatError(f"{path}: missing top-level key {key!r}")
        if not isinstance(d[key], list):
            raise CocoFormatError(f"{path}: top-level {key!r} must be a list")

    images = {}
    for k, img in enumerate(d["images"]):
        if not isinstance(img, dict):
            raise CocoFormatError(f"{path}: images[{k}] is not an object")
        for key in _REQUIRED_IMAGE:
            if key not in img:
                raise CocoFormatError(f"{path}: images[{k}] (id {img.get('id')!r}) is missing key {key!r}")
        if not _is_int(img["id"]):
            raise CocoFormatError(f"{path}: images[{k}] has a non-integer id {img['id']!r}")
        if img["id"] in images:
            raise CocoFormatError(f"{path}: duplicate image id {img['id']}")
        if not isinstance(img["file_name"], str) or not img["file_name"].strip():
            raise CocoFormatError(f"{path}: image {img['id']} has file_name {img['file_name']!r}; expected a path")
        for key in ("width", "height"):
            v = img[key]
            if not _is_number(v) or not math.isfinite(v) or v != int(v) or v <= 0:
                raise CocoFormatError(f"{path}: image {img['id']} has invalid {key} {v!r}")
            img[key] = int(v)
        images[img["id"]] = img

    cat_ids = set()
    for k, cat in enumerate(d["categories"]):
        if not isinstance(cat, dict) or "id" not in cat:
            raise CocoFormatError(f"{path}: categories[{k}] is missing key 'id'")
        if not _is_int(cat["id"]):
            raise CocoFormatError(f"{path}: categories[{k}] has a non-integer id {cat['id']!r}")
        if cat["id"] in cat_ids:
            raise CocoFormatError(f"{path}: duplicate category id {cat['id']}")
        cat_ids.add(cat["id"])

    kept, dropped, ann_ids = [], [], set()
    required = _REQUIRED_ANN + (("segmentation",) if with_masks else ())
    for k, ann in enumerate(d["annotations"]):
        if not isinstance(ann, dict):
            raise CocoFormatError(f"{path}: annotations[{k}] is not an object")
        for key in required:
            if key not in ann:
                raise CocoFormatError(
                    f"{path}: annotations[{k}] (id {ann.get('id')!r}) is missing key {key!r}"
                )
        aid = ann["id"]
        if aid in ann_ids:  # pycocotools indexes by id and would silently keep only one
            raise CocoFormatError(f"{path}: duplicate annotation id {aid}")
        ann_ids.add(aid)
        if not _is_int(ann["image_id"]) or ann["image_id"] not in images:
            raise CocoFormatError(f"{path}: annotation {aid} refers to unknown image id {ann['image_id']!r}")
        if not _is_int(ann["category_id"]) or ann["category_id"] not in cat_ids:
            raise CocoFormatError(
                f"{path}: annotation {aid} refers to unknown category id {ann['category_id']!r}"
            )
        bbox = ann["bbox"]
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
            raise CocoFormatError(f"{path}: annotation {aid} has bbox {bbox!r}; expected 4 numbers [x, y, w, h]")
        img = images[ann["image_id"]]
        if with_masks:
            ann["segmentation"] = _check_segmentation(ann["segmentation"], aid, img, path)
        if _is_degenerate(bbox, img["width"], img["height"]):
            dropped.append(aid)
            continue
        ann.setdefault("iscrowd", 0)
        ann.setdefault("area", float(bbox[2] * bbox[3]))
        kept.append(ann)
    return {**d, "annotations": kept}, dropped


class CocoDetection(torch.utils.data.Dataset):
    """A COCO-format detection/instance-segmentation data set.

    ``dataset[i]`` is ``(image, target)``: ``image`` a float ``[3, H, W]`` RGB tensor in
    ``[0, 1]``, ``target`` a dict with ``boxes`` (float32 ``[N, 4]`` xyxy pixels, clipped to
    the image), ``labels`` (int64 ``[N]``, contiguous ``1..K``), ``masks`` (uint8 ``[N, H, W]``,
    only when ``with_masks``), ``image_id`` (int64 scalar), ``iscrowd`` (int64 ``[N]``; crowd
    regions are kept and flagged, the model decides), ``area`` (float32 ``[N]``, COCO's field),
    ``orig_size`` and ``size`` (int64 ``[2]``, ``(h, w)`` of the file and after ``transforms``).

    Annotations whose box is degenerate (``w`` or ``h`` <= 0, non-finite, or outside the
    image) are dropped with one warning; their count is ``num_dropped``. ``coco`` is a
    pycocotools ``COCO`` over the validated annotations, ready for ``COCOeval``.
    """

    def __init__(self, img_dir, ann_file, transforms=None, with_masks: bool = True):
        self.img_dir = Path(img_dir)
        self.ann_file = Path(ann_file)
        self.transforms = transforms
        self.with_masks = with_masks

        d, dropped = _validate(_read_json(self.ann_file), self.ann_file, with_masks)
        self.num_dropped = len(dropped)
        if dropped:
            shown = ", ".join(map(str, dropped[:20])) + (", ..." if len(dropped) > 20 else "")
            warnings.warn(
                f"{self.ann_file}: dropped {len(dropped)} annotations with degenerate boxes "
                f"(w or h <= 0, non-finite, or outside the image): ids [{shown}]",
                CocoFormatWarning,
                stacklevel=2,
            )

        with contextlib.redirect_stdout(io.StringIO()):  # COCO() prints progress
            self.coco = COCO()
            self.coco.dataset = d
            self.coco.createIndex()

        self.ids = sorted(self.coco.imgs)
        self.cat_ids = sorted(self.coco.cats)
        self.cat_id_to_label = {c: i + 1 for i, c in enumerate(self.cat_ids)}
        self.label_to_cat_id = {i: c for c, i in self.cat_id_to_label.items()}
        self.num_classes = len(self.cat_ids)
        self.categories = [self.coco.cats[c] for c in self.cat_ids]

    def __len__(self) -> int:
        return len(self.ids)

    def _image_path(self, img_id: int) -> Path:
        return self.img_dir / self.coco.imgs[img_id]["file_name"]

    def _open_checked(self, img_id: int, verify: bool = False) -> Image.Image:
        """Open (and fully decode, or only ``verify``) one image, with clear errors."""
        info = self.coco.imgs[img_id]
        path = self._image_path(img_id)
        if not path.is_file():
            raise CocoFormatError(
                f"{path}: image file not found (image id {img_id} in {self.ann_file})"
            )
        img = None
        try:
            img = Image.open(path)
            if verify:
                img.verify()
            else:
                img.load()
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... on bad files
            if img is not None:
                img.close()
            raise CocoFormatError(
                f"{path}: cannot decode image (image id {img_id} in {self.ann_file}): "
                f"{type(e).__name__}: {e}"
            ) from e
        if img.size != (info["width"], info["height"]):
            img.close()
            raise CocoFormatError(
                f"{path}: image is {img.size[0]}x{img.size[1]} (w x h) but {self.ann_file} "
                f"says {info['width']}x{info['height']} for image id {img_id}"
            )
        return img

    def validate_images(self, progress: bool | None = None) -> None:
        """Check every image file quickly, before hours of training depend on it; raise one
        ``CocoFormatError`` that lists every bad file.

        The check reads headers, not pixels: a file that is missing, is no image, has a broken
        header or another size than the annotation file says, a PNG with a damaged chunk
        (``PIL.Image.verify``), and a JPEG cut short (no end-of-image marker: only such a file is
        decoded, to be sure). ``progress`` shows a bar (default: on sets of 1000 images or more).
        """
        from tqdm.auto import tqdm

        bad = []
        for img_id in tqdm(self.ids, desc=f"checking images in {self.img_dir}", unit="image",
                           disable=not (len(self.ids) >= 1000 if progress is None else progress)):
            try:
                self._open_checked(img_id, verify=True).close()
                if _cut_short(self._image_path(img_id)):
                    self._open_checked(img_id).close()  # raises if it is
            except CocoFormatError as e:
                bad.append(str(e))
        if bad:
            shown = "; ".join(bad[:10]) + (f"; and {len(bad) - 10} more" if len(bad) > 10 else "")
            raise CocoFormatError(f"{len(bad)} of {len(self.ids)} images of {self.ann_file} are unusable: {shown}")

    def check_for_training(self, progress: bool | None = None) -> None:
        """Raise ``CocoFormatError`` unless the split has something to learn from (an annotation)
        and every image passes ``validate_images``."""
        if not self.coco.anns:
            raise CocoFormatError(f"{self.ann_file}: no annotations (after {self.num_dropped} degenerate boxes were "
                                  f"dropped); a split without objects trains nothing")
        self.validate_images(progress)

    def _mask(self, ann: dict, h: int, w: int) -> np.ndarray:
        if isinstance(ann["segmentation"], list) and not ann["segmentation"]:
            return np.zeros((h, w), dtype=np.uint8)  # every polygon was degenerate
        return self.coco.annToMask(ann)

    def __getitem__(self, i: int):
        img_id = self.ids[i]
        with self._open_checked(img_id) as pil:
            image = _rgb_tensor(pil)
        h, w = image.shape[-2:]

        anns = self.coco.imgToAnns.get(img_id, [])
        boxes = torch.tensor([_clipped_xyxy(a["bbox"], w, h) for a in anns], dtype=torch.float32)
        target = {
            "boxes": boxes.reshape(-1, 4),
            "labels": torch.tensor([self.cat_id_to_label[a["category_id"]] for a in anns], dtype=torch.int64),
            "image_id": torch.tensor(img_id, dtype=torch.int64),
            "iscrowd": torch.tensor([int(a["iscrowd"]) for a in anns], dtype=torch.int64),
            "area": torch.tensor([a["area"] for a in anns], dtype=torch.float32),
            "orig_size": torch.tensor([h, w], dtype=torch.int64),
            "size": torch.tensor([h, w], dtype=torch.int64),
        }
        if self.with_masks:
            masks = np.stack([self._mask(a, h, w) for a in anns]) if anns else np.zeros((0, h, w), np.uint8)
            target["masks"] = torch.from_numpy(masks)

        if self.transforms is not None:
            image, target = self.transforms(image, target)
            target["size"] = torch.tensor(image.shape[-2:], dtype=torch.int64)
        return image, target

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({len(self)} images, {len(self.coco.anns)} annotations, "
            f"{self.num_classes} classes, ann_file={str(self.ann_file)!r})"
        )


def _cut_short(path: Path) -> bool:
    """Whether a JPEG file lacks its end-of-image marker (a download or copy cut short); JPEG
    writers may leave a few bytes after it."""
    with open(path, "rb") as f:
        if f.read(2) != b"\xff\xd8":
            return False  # not a JPEG: its own header check decides
        f.seek(0, 2)
        f.seek(max(f.tell() - 64, 0))
        return b"\xff\xd9" not in f.read()


# Integer modes whose values are not 8 bits, with the largest value of their range: PIL's
# convert("RGB") clips them at 255 (a 16-bit PNG turns white), so they are scaled instead.
_WIDE_MODES = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535}


def _rgb_tensor(pil: Image.Image) -> torch.Tensor:
    """A float ``[3, H, W]`` RGB tensor in ``[0, 1]`` of any PIL mode: ``convert`` covers L, LA,
    P, RGBA, CMYK... (COCO has a few grayscale images); 16-bit, 32-bit integer (``I``, as some
    PIL versions open 16-bit PNGs) and float (``F``) images are scaled to their range."""
    if pil.mode not in _WIDE_MODES and pil.mode not in ("I", "F"):
        return pil_to_tensor(pil.convert("RGB")).float().div_(255.0)
    values = np.asarray(pil, dtype=np.float64)
    top = _WIDE_MODES.get(pil.mode)
    if top is None:  # I or F: 16 bits or [0, 1] when the values fit, else their own maximum
        peak = float(values.max(initial=0.0))
        top = 1.0 if pil.mode == "F" and peak <= 1.0 else 65535.0 if peak <= 65535 else peak
    gray = torch.from_numpy(np.clip(values / top, 0.0, 1.0)).float()
    return gray.expand(3, *gray.shape).contiguous()


def load_coco_split(root, split: str, **kwargs) -> CocoDetection:
    """``root/annotations/instances_{split}.json`` with images in ``root/{split}``.

    The layout of COCO 2017 (``split="train2017"``/``"val2017"``) and of the generated set.
    Keyword arguments go to :class:`CocoDetection`.
    """
    root = Path(root)
    ann_file = root / "annotations" / f"instances_{split}.json"
    if not ann_file.is_file():
        raise CocoFormatError(
            f"{ann_file}: annotation file not found (expected root/annotations/instances_{split}.json "
            f"and images in root/{split})"
        )
    return CocoDetection(root / split, ann_file, **kwargs)
