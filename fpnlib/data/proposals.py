"""Fixed proposals for Fast R-CNN (Table 2): computed once by a trained RPN, saved, read back.

Sec. 5.2.1: "we train Fast R-CNN on a fixed set of proposals", those of the FPN RPN of
Table 1(c), so that the region head can be studied on its own. The file keeps the boxes in
each image's original pixels (the COCO frame), with where they came from; a data set wrapper
attaches them to each sample as ``target["proposals"]`` before the transforms, so they are
resized and flipped with the image and its ground truth.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset


def save_proposals(path: str | os.PathLike, proposals: dict[int, tuple[Tensor, Tensor]], **meta) -> Path:
    """Write ``{image_id: (boxes [K, 4] original pixels, scores [K])}`` and ``meta`` (e.g. the
    RPN checkpoint, preset, commit) to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta, "proposals": {int(i): (b.float().cpu(), s.float().cpu()) for i, (b, s) in proposals.items()}}
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def load_proposals(path: str | os.PathLike, image_ids=None) -> tuple[dict[int, tuple[Tensor, Tensor]], dict]:
    """Read a ``save_proposals`` file; with ``image_ids`` every id must be present. Errors name the file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no proposals file; compute it with a trained RPN first (Table 1c)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        proposals, meta = payload["proposals"], payload["meta"]
    except Exception as e:  # truncated, foreign or old file
        raise ValueError(f"{path}: not a readable proposals file ({e})") from e
    if not isinstance(proposals, dict):
        raise ValueError(f"{path}: 'proposals' is a {type(proposals).__name__}, not {{image id: (boxes, scores)}}")
    for img_id, entry in proposals.items():
        if not (isinstance(entry, (tuple, list)) and len(entry) == 2 and all(torch.is_tensor(t) for t in entry)):
            raise ValueError(f"{path}: image {img_id} has no (boxes, scores) pair of tensors")
        boxes, scores = entry
        if boxes.ndim != 2 or boxes.shape[1] != 4 or scores.shape != boxes.shape[:1]:
            raise ValueError(f"{path}: image {img_id} has boxes {tuple(boxes.shape)} and scores {tuple(scores.shape)}")
        if not (torch.isfinite(boxes).all() and torch.isfinite(scores).all()):
            raise ValueError(f"{path}: image {img_id} has non-finite boxes or scores")
        if ((boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])).any():
            raise ValueError(f"{path}: image {img_id} has boxes with x2 < x1 or y2 < y1 (not [x1, y1, x2, y2])")
    if image_ids is not None:
        missing = sorted(set(int(i) for i in image_ids) - set(proposals))
        if missing:
            raise ValueError(f"{path}: no proposals for {len(missing)} image(s) of the data set, e.g. ids {missing[:5]}")
    return proposals, meta


class WithProposals(Dataset):
    """``dataset`` (a ``CocoDetection`` built without transforms) with each target's
    ``"proposals"`` (the top ``max_proposals`` by score) added before ``transforms`` run."""

    def __init__(self, dataset, proposals: dict[int, tuple[Tensor, Tensor]], transforms=None,
                 max_proposals: int = 1000):
        if getattr(dataset, "transforms", None) is not None:
            raise ValueError("build the wrapped data set without transforms: they run after the proposals are added")
        self.dataset, self.proposals, self.transforms, self.max_proposals = dataset, proposals, transforms, max_proposals
        self.coco = dataset.coco  # evaluation reads the ground truth from here

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        image, target = self.dataset[i]
        boxes, scores = self.proposals[int(target["image_id"])]
        keep = scores.argsort(descending=True)[: self.max_proposals]
        target = dict(target, proposals=boxes[keep].clone())
        if self.transforms is not None:
            image, target = self.transforms(image, target)
            target["size"] = torch.tensor(image.shape[-2:], dtype=torch.int64)
        return image, target
