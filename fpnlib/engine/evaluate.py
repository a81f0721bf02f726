"""COCO evaluation for the FPN paper's tables, always through pycocotools' ``COCOeval``.

Three entry points, each returning a ``dict`` of named floats in percent:

* :func:`proposal_recall` -- class-agnostic box-proposal average recall, Table 1
  (``AR100``, ``AR1k``, ``AR1k_s``, ``AR1k_m``, ``AR1k_l``).
* :func:`box_ap` -- standard COCO box AP, Tables 2-3
  (``AP``, ``AP50``, ``AP75``, ``AP_s``, ``AP_m``, ``AP_l``).
* :func:`segment_proposal_recall` -- class-agnostic mask-proposal average recall,
  Table 6 (``AR``, ``AR_s``, ``AR_m``, ``AR_l`` at 1000 proposals, plus ``AR100``,
  ``AR10``).

Conventions shared by all three:

* Predictions are in ORIGINAL image coordinates, keyed by COCO image id; boxes are
  ``xyxy`` and converted here to COCO ``xywh`` (``w = x2 - x1``, continuous
  coordinates, no "+1"). Torch tensors (any device) and numpy arrays are accepted.
* Every image of the ground truth is evaluated (``params.imgIds`` = all gt image ids,
  or ``img_ids`` when given); an image missing from the predictions counts as an image
  with no predictions, so empty input gives 0.0, never an exception.
* As "AR" in the paper (Sec. 5.1, following Hosang et al.), recall is averaged over
  IoU thresholds 0.50:0.05:0.95.
* Size buckets are pycocotools' area ranges: small < 32², medium 32²..96²,
  large > 96², decided by each ground truth's ``area`` field (the mask area in
  COCO's annotation files, not the box area).
* Crowd ground truths (``iscrowd=1``) are ignored by ``COCOeval``: they are not in
  the recall/precision denominator, and a prediction matched to one is neither a
  hit nor a false positive. This is COCO's own behaviour and is kept.
* A value is ``float('nan')`` when its bucket holds no (non-crowd) ground truth:
  ``COCOeval`` fills such entries with -1, and ``COCOeval.summarize`` would print -1.
* The numbers are read from ``cocoeval.eval["recall"]`` ([T,K,A,M]) and
  ``cocoeval.eval["precision"]`` ([T,R,K,A,M]) exactly as ``COCOeval.summarize``
  does (mean over the entries > -1), because ``summarize`` hard-codes the maxDets
  positions (1, 10, 100) and prints.
"""

from __future__ import annotations

import contextlib
import io
import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

__all__ = ["proposal_recall", "box_ap", "segment_proposal_recall", "summarize"]


# --------------------------------------------------------------------------- helpers


def _np(x: Any) -> np.ndarray:
    """Tensor (any device) or array-like -> numpy, without importing torch here."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _boxes_xywh(boxes: Any) -> np.ndarray:
    b = _np(boxes).astype(np.float64).reshape(-1, 4)
    return np.stack([b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], axis=1)


def _scores(scores: Any, n: int, what: str) -> np.ndarray:
    s = _np(scores).astype(np.float64).reshape(-1)
    if len(s) != n:
        raise ValueError(f"{what}: {n} predictions but {len(s)} scores")
    return s


def _det_name(n: int) -> str:
    """100 -> '100', 1000 -> '1k' (the paper's column names)."""
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n)


def _check_img_ids(coco_gt: COCO, preds: Mapping, img_ids: Iterable[int] | None) -> list[int]:
    gt_ids = set(coco_gt.getImgIds())
    unknown = [i for i in preds if int(i) not in gt_ids]
    if unknown:
        # Almost always a key mix-up (dataset index vs COCO image id); fail loudly.
        raise ValueError(f"predictions for image ids not in the ground truth: {unknown[:5]}")
    if img_ids is None:
        return sorted(gt_ids)
    ids = sorted({int(i) for i in img_ids})
    missing = [i for i in ids if i not in gt_ids]
    if missing:
        raise ValueError(f"img_ids not in the ground truth: {missing[:5]}")
    return ids


def _results_coco(coco_gt: COCO, anns: list[dict]) -> COCO:
    """The detections as a COCO object (what ``loadRes`` builds, but also for ``[]``)."""
    dt = COCO()
    dt.dataset = {
        "images": list(coco_gt.dataset.get("images", [])),
        "categories": list(coco_gt.dataset.get("categories", [])),
        "annotations": anns,
    }
    for i, a in enumerate(anns, start=1):
        a["id"] = i  # COCOeval treats id 0 as "unmatched": ids must start at 1
        a["iscrowd"] = 0
    with contextlib.redirect_stdout(io.StringIO()):
        dt.createIndex()
    return dt


def _run(coco_gt: COCO, dt: COCO, iou_type: str, img_ids: list[int], use_cats: bool,
         max_dets: Sequence[int] | None) -> COCOeval:
    ev = COCOeval(coco_gt, dt, iou_type)
    ev.params.imgIds = img_ids
    ev.params.useCats = int(use_cats)
    if max_dets is not None:
        ev.params.maxDets = sorted({int(m) for m in max_dets})
    with contextlib.redirect_stdout(io.StringIO()):
        ev.evaluate()
        ev.accumulate()
    return ev


def _mean(ev: COCOeval, ap: bool, iou: float | None = None, area: str = "all",
          max_det: int = 100) -> float:
    """One ``COCOeval.summarize`` entry, in percent; nan where summarize gives -1."""
    p = ev.params
    a = p.areaRngLbl.index(area)
    m = list(p.maxDets).index(max_det)
    s = ev.eval["precision"][..., a, m] if ap else ev.eval["recall"][..., a, m]
    if iou is not None:
        s = s[np.isclose(p.iouThrs, iou)]
    s = s[s > -1]
    return float(np.mean(s)) * 100.0 if s.size else float("nan")


def _proposal_cat(coco_gt: COCO) -> int:
    # With useCats=0 COCOeval still gathers detections over params.catIds, so the
    # class-agnostic proposals must carry one of the gt's category ids.
    cats = sorted(coco_gt.getCatIds())
    return cats[0] if cats else 1


# --------------------------------------------------------------------------- box proposals


def proposal_recall(coco_gt: COCO, proposals: Mapping[int, tuple[Any, Any]],
                    max_dets: Sequence[int] = (100, 1000), *,
                    img_ids: Iterable[int] | None = None) -> dict[str, float]:
    """Class-agnostic box-proposal average recall, as the paper's Table 1 (RPN).

    Args:
        coco_gt: ground truth (``pycocotools.coco.COCO``).
        proposals: ``{image_id: (boxes [N,4] xyxy, scores [N])}`` in original image
            coordinates; tensors or arrays. Higher score = ranked first.
        max_dets: proposal budgets per image (``params.maxDets``).
        img_ids: evaluate only these gt images (default: all of ``coco_gt``).

    Returns:
        ``{"AR100", "AR1k", "AR1k_s", "AR1k_m", "AR1k_l"}`` for the default budgets:
        ``AR{n}`` for each budget n (1000 is written ``1k``) and the size buckets
        ``_s/_m/_l`` at the largest budget. Percent.

    AR is recall averaged over IoU 0.50:0.05:0.95 (Sec. 5.1), computed by ``COCOeval``
    with ``useCats=0`` (proposals are class-agnostic: any proposal may match any
    ground truth). Buckets use the gt ``area`` field (small < 32², medium 32²..96²,
    large > 96²). Crowd ground truths are ignored. A bucket without ground truth
    gives ``nan``.
    """
    ids = _check_img_ids(coco_gt, proposals, img_ids)
    cat = _proposal_cat(coco_gt)
    anns = []
    for img_id, (boxes, scores) in proposals.items():
        xywh = _boxes_xywh(boxes)
        sc = _scores(scores, len(xywh), f"image {img_id}")
        for b, s in zip(xywh.tolist(), sc.tolist()):
            # area = box area, as loadRes sets it (only matters for unmatched dets' buckets)
            anns.append({"image_id": int(img_id), "category_id": cat, "bbox": b,
                         "score": s, "area": b[2] * b[3]})
    ev = _run(coco_gt, _results_coco(coco_gt, anns), "bbox", ids, False, max_dets)
    budgets = list(ev.params.maxDets)
    top = budgets[-1]
    out = {f"AR{_det_name(m)}": _mean(ev, False, max_det=m) for m in budgets}
    for area, sfx in (("small", "s"), ("medium", "m"), ("large", "l")):
        out[f"AR{_det_name(top)}_{sfx}"] = _mean(ev, False, area=area, max_det=top)
    return out


# --------------------------------------------------------------------------- box AP


def box_ap(coco_gt: COCO, detections: Mapping[int, Mapping[str, Any]],
           label_to_cat_id: Mapping[int, int], *,
           img_ids: Iterable[int] | None = None) -> dict[str, float]:
    """Standard COCO box AP (maxDets 100), as the paper's Tables 2-3.

    Args:
        coco_gt: ground truth (``pycocotools.coco.COCO``).
        detections: ``{image_id: {"boxes": [N,4] xyxy, "scores": [N], "labels": [N]}}``
            in original image coordinates (torchvision's detection output format).
        label_to_cat_id: model label -> COCO category id (COCO ids are not contiguous).
        img_ids: evaluate only these gt images (default: all of ``coco_gt``).

    Returns:
        ``{"AP", "AP50", "AP75", "AP_s", "AP_m", "AP_l"}`` in percent, equal to
        ``COCOeval.summarize`` stats[0:6] x 100. ``AP`` averages over IoU
        0.50:0.05:0.95 and categories, with COCO's 101-point interpolated precision.

    Buckets use the gt ``area`` field (small < 32², medium 32²..96², large > 96²);
    crowd ground truths are ignored; a bucket without ground truth gives ``nan``.
    ``COCOeval`` keeps the 100 best detections per image *and category*; limiting to
    100 per image overall (as COCO's test server expects) is the model's job.
    """
    ids = _check_img_ids(coco_gt, detections, img_ids)
    anns = []
    for img_id, det in detections.items():
        xywh = _boxes_xywh(det["boxes"])
        sc = _scores(det["scores"], len(xywh), f"image {img_id}")
        labels = _np(det["labels"]).reshape(-1)
        if len(labels) != len(xywh):
            raise ValueError(f"image {img_id}: {len(xywh)} boxes but {len(labels)} labels")
        for b, s, lab in zip(xywh.tolist(), sc.tolist(), labels.tolist()):
            anns.append({"image_id": int(img_id), "category_id": int(label_to_cat_id[int(lab)]),
                         "bbox": b, "score": s, "area": b[2] * b[3]})
    ev = _run(coco_gt, _results_coco(coco_gt, anns), "bbox", ids, True, None)
    return {
        "AP": _mean(ev, True),
        "AP50": _mean(ev, True, iou=0.5),
        "AP75": _mean(ev, True, iou=0.75),
        "AP_s": _mean(ev, True, area="small"),
        "AP_m": _mean(ev, True, area="medium"),
        "AP_l": _mean(ev, True, area="large"),
    }


# --------------------------------------------------------------------------- mask proposals


def _rles(coco_gt: COCO, img_id: int, masks: Any) -> list[dict]:
    """Masks [N,H,W] (bool/uint8; float thresholded at 0.5; [N,1,H,W] squeezed) or a
    list of COCO RLE dicts -> compressed RLEs at the image's size."""
    info = coco_gt.imgs[int(img_id)]
    h, w = info.get("height"), info.get("width")
    if isinstance(masks, (list, tuple)) and (len(masks) == 0 or isinstance(masks[0], dict)):
        out = []
        for r in masks:
            if isinstance(r.get("counts"), list):  # uncompressed RLE -> compressed
                r = mask_utils.frPyObjects(r, *r["size"])
            out.append(r)
    else:
        m = _np(masks)
        if m.ndim == 4 and m.shape[1] == 1:  # torchvision Mask R-CNN output layout
            m = m[:, 0]
        if m.size == 0:
            return []
        if m.ndim != 3:
            raise ValueError(f"image {img_id}: masks must be [N,H,W], got {m.shape}")
        m = m >= 0.5 if np.issubdtype(m.dtype, np.floating) else m != 0
        out = mask_utils.encode(np.asfortranarray(m.transpose(1, 2, 0).astype(np.uint8)))
    for r in out:
        if h is not None and w is not None and tuple(r["size"]) != (h, w):
            raise ValueError(f"image {img_id}: mask size {tuple(r['size'])} != image size {(h, w)};"
                             " masks must be pasted at the original resolution")
    return out


def segment_proposal_recall(coco_gt: COCO, proposals: Mapping[int, tuple[Any, Any]],
                            max_dets: Sequence[int] = (10, 100, 1000), *,
                            img_ids: Iterable[int] | None = None) -> dict[str, float]:
    """Class-agnostic mask-proposal average recall, as the paper's Table 6 (Sec. 6).

    Args:
        coco_gt: ground truth with segmentations (``pycocotools.coco.COCO``).
        proposals: ``{image_id: (masks, scores [N])}``; masks are a bool/uint8
            array or tensor [N,H,W] at the original image size (float masks are
            thresholded at 0.5; [N,1,H,W] is accepted), or a list of COCO RLE dicts.
            Arrays are encoded with ``pycocotools.mask.encode`` (Fortran-order uint8).
        max_dets: proposal budgets per image.
        img_ids: evaluate only these gt images (default: all of ``coco_gt``).

    Returns:
        ``{"AR", "AR_s", "AR_m", "AR_l"}`` at the largest budget (1000 proposals, the
        paper's columns) plus ``AR{n}`` for each smaller budget (``AR100``, ``AR10``).
        Percent.

    AR is mask recall averaged over IoU 0.50:0.05:0.95 (``COCOeval`` "segm",
    ``useCats=0``: proposals are class-agnostic). Buckets use the gt ``area`` field
    (small < 32², medium 32²..96², large > 96²); crowd ground truths are ignored; a
    bucket without ground truth gives ``nan``.
    """
    ids = _check_img_ids(coco_gt, proposals, img_ids)
    cat = _proposal_cat(coco_gt)
    anns = []
    for img_id, (masks, scores) in proposals.items():
        rles = _rles(coco_gt, img_id, masks)
        sc = _scores(scores, len(rles), f"image {img_id}")
        if not rles:
            continue
        # one RLE at a time: pycocotools' area() of a list of more than 255 RLEs overflows under
        # NumPy 2 (its output array is made uint8), and Table 6 has 1000 proposals per image
        areas = [float(mask_utils.area(r)) for r in rles]
        bbs = mask_utils.toBbox(rles).tolist()
        for r, s, a, bb in zip(rles, sc.tolist(), areas, bbs):
            anns.append({"image_id": int(img_id), "category_id": cat, "segmentation": r,
                         "score": s, "area": float(a), "bbox": bb})
    ev = _run(coco_gt, _results_coco(coco_gt, anns), "segm", ids, False, max_dets)
    budgets = list(ev.params.maxDets)
    top = budgets[-1]
    out = {"AR": _mean(ev, False, max_det=top)}
    for area, sfx in (("small", "s"), ("medium", "m"), ("large", "l")):
        out[f"AR_{sfx}"] = _mean(ev, False, area=area, max_det=top)
    for m in reversed(budgets[:-1]):
        out[f"AR{_det_name(m)}"] = _mean(ev, False, max_det=m)
    return out


# --------------------------------------------------------------------------- formatting


def summarize(metrics: Mapping[str, float], digits: int = 1) -> str:
    """One line, e.g. ``"AP 36.2 | AP50 58.0 | ..."`` (nan shown as ``-``)."""
    return " | ".join(
        f"{k} {'-' if isinstance(v, float) and math.isnan(v) else format(v, f'.{digits}f')}"
        for k, v in metrics.items())
