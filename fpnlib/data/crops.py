"""Object crops of a detection split: the image-classification set that stands in for ImageNet.

The paper's networks start from a ResNet pre-trained on ImageNet-1k classification (Sec. 5):
the bottom-up pathway has learned what objects look like before it ever sees a box. No such
weights reach this kit, so ``fpnlib.experiments.pretrain`` trains the same bottom-up ResNet as a
classifier on crops of the train split: every object, and background boxes that overlap no
object, each resized to one square crop size. ImageNet's images are 224 px crops, and Eq. (1)
names 224 "the canonical ImageNet pre-training size"; the crop size here is the preset's
canonical size, so the two keep agreeing (an RoI of the pre-training size is pooled from P4).

``ObjectCrops[i]`` is ``(crop, {"labels": label})``: a normalised ``[3, S, S]`` crop and its
class (``1..K`` as in the detection set, ``0`` for background), drawn with torch's RNG for the
context jitter and the flip (``fpnlib.engine.train.SeededSamples`` seeds it per sample).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torchvision.ops import box_iou, roi_align

from fpnlib.data.coco import CocoDetection, _rgb_tensor
from fpnlib.data.transforms import Normalize

BACKGROUND = 0
# COCO's size buckets by object area (px^2): small < 32^2 <= medium < 96^2 <= large
SIZE_BUCKETS = (("small", 0.0, 32.0**2), ("medium", 32.0**2, 96.0**2), ("large", 96.0**2, math.inf))


def size_bucket(area: float) -> str:
    """COCO's name for an object of ``area`` px^2."""
    return next(name for name, lo, hi in SIZE_BUCKETS if lo <= area < hi)


def background_boxes(gt: torch.Tensor, height: int, width: int, count: int, min_side: float, max_side: float,
                     rng: np.random.Generator, max_iou: float = 0.3, tries: int = 50) -> torch.Tensor:
    """Up to ``count`` boxes (sides log-uniform in ``[min_side, max_side]``) inside the image that
    overlap every ground-truth box by IoU < ``max_iou``: what a detector must call background."""
    found = []
    for _ in range(count * tries):
        if len(found) == count:
            break
        w, h = (float(np.exp(rng.uniform(np.log(min_side), np.log(min(max_side, s))))) for s in (width, height))
        x0, y0 = rng.uniform(0, width - w), rng.uniform(0, height - h)
        box = torch.tensor([[x0, y0, x0 + w, y0 + h]])
        if len(gt) == 0 or float(box_iou(box, gt).max()) < max_iou:
            found.append(box[0])
    return torch.stack(found) if found else torch.zeros((0, 4))


class ObjectCrops(torch.utils.data.Dataset):
    """Crops of ``images`` (indices into ``split``) for classification.

    Args:
        split: a detection split loaded without transforms (original pixels).
        images: which of its images to crop from (the held-out ones are left out by the caller).
        crop_size: side S of every crop, px.
        train: jitter the context (the crop is the box enlarged 1.0-1.3x and shifted by up to 10%
            of its side, as detection proposals are rarely tight) and flip; otherwise a fixed
            1.15x context and no flip.
        seed: draws the background boxes, one set for the life of the data set.
    """

    def __init__(self, split: CocoDetection, images, crop_size: int, train: bool = True, seed: int = 0,
                 min_side: float = 8.0):
        self.split, self.crop_size, self.train = split, crop_size, train
        self.normalize = Normalize()
        rng = np.random.default_rng(seed)
        self.items: list[tuple[int, torch.Tensor, int, float]] = []  # (image index, xyxy box, label, area)
        objects_seen, backgrounds = 0, 0
        for i in images:
            img_id = split.ids[i]
            info = split.coco.imgs[img_id]
            anns = [a for a in split.coco.imgToAnns.get(img_id, []) if not a["iscrowd"]]
            gt = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                               for a in anns], dtype=torch.float32).reshape(-1, 4)
            for a, box in zip(anns, gt):
                self.items.append((i, box, split.cat_id_to_label[a["category_id"]], float(a["area"])))
            objects_seen += len(anns)
            # background as frequent as an average class: one box per num_classes objects, carried over images
            want = objects_seen // split.num_classes - backgrounds
            for box in background_boxes(gt, info["height"], info["width"], max(want, 0), min_side,
                                        0.8 * min(info["height"], info["width"]), rng):
                self.items.append((i, box, BACKGROUND, float((box[2] - box[0]) * (box[3] - box[1]))))
                backgrounds += 1
        self._pixels: dict[int, torch.Tensor] = {}  # decoded images, uint8, kept: every crop re-reads them

    def __len__(self) -> int:
        return len(self.items)

    def _image(self, i: int) -> torch.Tensor:
        if i not in self._pixels:
            with self.split._open_checked(self.split.ids[i]) as pil:  # any mode, as the detection set reads it
                self._pixels[i] = _rgb_tensor(pil).mul_(255.0).round_().to(torch.uint8)
        return self._pixels[i]

    def crop_box(self, box: torch.Tensor) -> torch.Tensor:
        """The region cropped for an object box: context around it, jittered when training."""
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        w, h = box[2] - box[0], box[3] - box[1]
        if self.train:
            scale = 1.0 + 0.3 * float(torch.rand(()))
            cx = cx + w * 0.1 * (2 * float(torch.rand(())) - 1)
            cy = cy + h * 0.1 * (2 * float(torch.rand(())) - 1)
        else:
            scale = 1.15
        w, h = w * scale, h * scale
        return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])

    def __getitem__(self, index: int):
        i, box, label, _ = self.items[index]
        image = self._image(i).float().div_(255.0)
        s = self.crop_size
        # RoIAlign as the resampler: bilinear, averaging ceil(box / S) samples per output cell
        # (sampling_ratio=0), so a large object is shrunk without aliasing
        crop = roi_align(image[None], [self.crop_box(box)[None]], output_size=(s, s), sampling_ratio=0,
                         aligned=True)[0]
        if self.train and float(torch.rand(())) < 0.5:
            crop = crop.flip(-1)
        crop, _ = self.normalize(crop)
        return crop, {"labels": torch.tensor(label)}

    def labels(self) -> torch.Tensor:
        return torch.tensor([it[2] for it in self.items])

    def sizes(self) -> list[str]:
        """Each item's COCO size bucket (of the object's own area, not of its crop)."""
        return [size_bucket(it[3]) for it in self.items]
