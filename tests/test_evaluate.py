"""Hand-computed cases for fpnlib.engine.evaluate, plus agreement with direct pycocotools.

IoU of a WxH box and the same box shifted by dx (COCO box IoU, no "+1"):
(W - dx) / (W + dx). For W = 100, dx = 16: 84/116 = 0.724, i.e. a match at the
thresholds 0.50, 0.55, 0.60, 0.65, 0.70 and a miss at 0.75 ... 0.95 (5 of 10).
"""

import contextlib
import io
import math

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from fpnlib.engine.evaluate import box_ap, proposal_recall, segment_proposal_recall, summarize

H, W = 240, 320
SHIFT = 16  # 100x100 box shifted by 16 px -> IoU 84/116 = 0.724 (see module docstring)


def make_coco(images, anns, cats=((1, "a"), (3, "b"))):
    """In-memory COCO. anns: (image_id, cat_id, xyxy, iscrowd); area = box area."""
    coco = COCO()
    coco.dataset = {
        "images": [{"id": i, "height": H, "width": W} for i in images],
        "categories": [{"id": c, "name": n} for c, n in cats],
        "annotations": [],
    }
    # ann ids start at 1: COCOeval reads id 0 as "unmatched"
    for k, (img, cat, (x1, y1, x2, y2), crowd) in enumerate(anns, start=1):
        m = np.zeros((H, W), np.uint8)
        m[y1:y2, x1:x2] = 1
        coco.dataset["annotations"].append({
            "id": k, "image_id": img, "category_id": cat, "iscrowd": crowd,
            "bbox": [x1, y1, x2 - x1, y2 - y1], "area": float((x2 - x1) * (y2 - y1)),
            "segmentation": mask_utils.encode(np.asfortranarray(m)),
        })
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


SMALL, MEDIUM, LARGE = (10, 10, 30, 30), (40, 40, 90, 90), (100, 100, 200, 200)  # 20², 50², 100²
CROWD = (200, 20, 310, 130)


@pytest.fixture(scope="module")
def gt():
    # image 1: small/medium/large + a crowd box; image 2: no objects; image 3: one medium
    return make_coco([1, 2, 3], [
        (1, 1, SMALL, 0), (1, 3, MEDIUM, 0), (1, 1, LARGE, 0), (1, 3, CROWD, 1),
        (3, 3, (150, 60, 210, 140), 0),
    ])


def gt_boxes(coco, img, crowd=False):
    anns = coco.imgToAnns[img]
    return [(a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3],
             a["category_id"]) for a in anns if bool(a["iscrowd"]) == crowd]


def perfect_proposals(coco):
    out = {}
    for img in coco.getImgIds():
        b = np.array([g[:4] for g in gt_boxes(coco, img)], np.float64).reshape(-1, 4)
        out[img] = (b, np.linspace(1, 0.5, len(b)))
    return out


def same(a, b, tol=1e-9):
    assert a.keys() == b.keys()
    for k in a:
        assert (math.isnan(a[k]) and math.isnan(b[k])) or abs(a[k] - b[k]) <= tol, (k, a[k], b[k])


# --------------------------------------------------------------------------- box proposal AR


def test_perfect_proposals_give_100(gt):
    props = perfect_proposals(gt)
    # junk on the object-less image changes nothing (no gt to miss, recall has no FP term)
    props[2] = (torch.tensor([[0.0, 0.0, 50.0, 50.0]]), torch.tensor([0.9]))
    r = proposal_recall(gt, props)
    assert list(r) == ["AR100", "AR1k", "AR1k_s", "AR1k_m", "AR1k_l"]
    assert all(v == pytest.approx(100.0) for v in r.values()), r


def test_bucket_without_gt_is_nan():
    coco = make_coco([1], [(1, 1, LARGE, 0)])
    r = proposal_recall(coco, perfect_proposals(coco))
    assert [r["AR100"], r["AR1k"], r["AR1k_l"]] == pytest.approx([100.0] * 3)
    assert math.isnan(r["AR1k_s"]) and math.isnan(r["AR1k_m"])


@pytest.mark.parametrize("props", [
    {},
    {1: (np.zeros((0, 4)), np.zeros(0)), 2: (torch.zeros(0, 4), torch.zeros(0))},
])
def test_no_proposals_give_zero(gt, props):
    r = proposal_recall(gt, props)
    assert r == {"AR100": 0.0, "AR1k": 0.0, "AR1k_s": 0.0, "AR1k_m": 0.0, "AR1k_l": 0.0}


def test_crowd_gt_ignored(gt):
    # a proposal exactly on the crowd box is not a hit, and the crowd box is never a miss
    crowd_only = {1: (np.array([CROWD], float), np.ones(1))}
    assert proposal_recall(gt, crowd_only)["AR1k"] == 0.0
    # the crowd box is large, yet the large bucket is complete without it
    assert proposal_recall(gt, perfect_proposals(gt))["AR1k_l"] == pytest.approx(100.0)


def test_shifted_proposal_known_iou():
    coco = make_coco([1], [(1, 1, LARGE, 0)])
    x1, y1, x2, y2 = LARGE
    props = {1: (np.array([[x1 + SHIFT, y1, x2 + SHIFT, y2]], float), np.ones(1))}
    r = proposal_recall(coco, props)
    # IoU 0.724: recall 1 at 0.50..0.70 (5 thresholds), 0 at 0.75..0.95 -> 5/10 = 50%
    assert r["AR1k"] == pytest.approx(50.0) and r["AR100"] == pytest.approx(50.0)
    assert r["AR1k_l"] == pytest.approx(50.0)


def test_two_gts_one_found():
    coco = make_coco([1], [(1, 1, LARGE, 0), (1, 3, MEDIUM, 0)])
    # class-agnostic: the proposal finds the large gt (cat 1) although proposals carry no class
    r = proposal_recall(coco, {1: (np.array([LARGE], float), np.ones(1))})
    assert r["AR1k"] == pytest.approx(50.0)  # 1 of 2 gts at every threshold
    assert r["AR1k_l"] == pytest.approx(100.0) and r["AR1k_m"] == 0.0 and math.isnan(r["AR1k_s"])
    # plus the medium one shifted 10 px: IoU (50-10)/(50+10) = 0.667 -> found at 0.50..0.65
    # (4 of 10); recall per threshold = (1 + 1)/2 four times, 1/2 six times -> AR = 70%
    x1, y1, x2, y2 = MEDIUM
    props = {1: (np.array([LARGE, (x1 + 10, y1, x2 + 10, y2)], float), np.array([0.9, 0.8]))}
    r = proposal_recall(coco, props)
    assert r["AR1k"] == pytest.approx(70.0) and r["AR1k_m"] == pytest.approx(40.0)


@pytest.mark.parametrize("rank,ar100", [(100, 100.0), (101, 0.0)])
def test_100_vs_1000_limit(rank, ar100):
    coco = make_coco([1], [(1, 1, LARGE, 0)])
    junk = np.tile(np.array([[0.0, 0.0, 40.0, 40.0]]), (999, 1))  # IoU 0 with the gt
    boxes = np.concatenate([junk[: rank - 1], np.array([LARGE], float), junk[rank - 1:]])
    scores = np.linspace(1.0, 0.001, 1000)  # strictly decreasing: the gt box is ranked `rank`
    r = proposal_recall(coco, {1: (boxes, scores)})
    assert r["AR100"] == pytest.approx(ar100) and r["AR1k"] == pytest.approx(100.0)


def test_duplicate_proposals_count_once():
    # the same gt found by several proposals is still one recalled gt (recall <= 1); this
    # relies on detection ids starting at 1 -- COCOeval reads id 0 as "unmatched"
    coco = make_coco([1], [(1, 1, LARGE, 0), (1, 1, SMALL, 0)])
    boxes = np.array([LARGE, LARGE, LARGE], float)
    r = proposal_recall(coco, {1: (boxes, np.array([0.9, 0.8, 0.7]))})
    assert r["AR1k"] == pytest.approx(50.0) and r["AR1k_l"] == pytest.approx(100.0)


def test_custom_budgets():
    coco = make_coco([1], [(1, 1, LARGE, 0)])
    boxes = np.array([(0, 0, 40, 40)] * 10 + [LARGE], float)  # the gt box is ranked 11th
    r = proposal_recall(coco, {1: (boxes, np.linspace(1, 0.1, 11))}, max_dets=(300, 10))
    assert list(r) == ["AR10", "AR300", "AR300_s", "AR300_m", "AR300_l"]
    assert r["AR10"] == 0.0 and r["AR300"] == pytest.approx(100.0)


def test_unknown_image_id_raises(gt):
    with pytest.raises(ValueError, match="not in the ground truth"):
        proposal_recall(gt, {99: (np.zeros((1, 4)), np.ones(1))})


def test_img_ids_restricts_evaluation(gt):
    # only image 1 predicted; restricted to it, the medium gt of image 3 is not a miss
    props = {1: perfect_proposals(gt)[1]}
    assert proposal_recall(gt, props)["AR1k"] == pytest.approx(100 * 3 / 4)
    assert proposal_recall(gt, props, img_ids=[1])["AR1k"] == pytest.approx(100.0)


# --------------------------------------------------------------------------- box AP

L2C = {0: 1, 1: 3}  # contiguous model labels -> non-contiguous COCO category ids
C2L = {c: l for l, c in L2C.items()}


def perfect_dets(coco, relabel=lambda lab: lab):
    out = {}
    for img in coco.getImgIds():
        g = gt_boxes(coco, img)
        out[img] = {"boxes": torch.tensor([x[:4] for x in g], dtype=torch.float32).reshape(-1, 4),
                    "scores": torch.linspace(1, 0.5, len(g)),
                    "labels": torch.tensor([relabel(C2L[x[4]]) for x in g], dtype=torch.int64)}
    return out


def test_perfect_detections_ap_100(gt):
    r = box_ap(gt, perfect_dets(gt), L2C)
    assert list(r) == ["AP", "AP50", "AP75", "AP_s", "AP_m", "AP_l"]
    assert all(v == pytest.approx(100.0) for v in r.values()), r


def test_wrong_labels_ap_0(gt):
    r = box_ap(gt, perfect_dets(gt, relabel=lambda lab: 1 - lab), L2C)
    assert all(v == 0.0 for v in r.values()), r


def test_no_detections_ap_0(gt):
    assert all(v == 0.0 for v in box_ap(gt, {}, L2C).values())


def test_fp_above_tp():
    coco = make_coco([1], [(1, 1, LARGE, 0)])
    dets = {1: {"boxes": np.array([(0, 0, 40, 40), LARGE], float),
                "scores": np.array([0.9, 0.8]), "labels": np.array([0, 0])}}
    # ranks: FP (P=0, R=0), TP (P=1/2, R=1); interpolated precision is 1/2 at every one
    # of the 101 recall points -> AP = 50 at every IoU threshold
    r = box_ap(coco, dets, L2C)
    assert r["AP"] == pytest.approx(50.0) and r["AP50"] == pytest.approx(50.0)


def test_tp_fp_tp_101_point_interpolation():
    coco = make_coco([1], [(1, 1, LARGE, 0), (1, 1, (10, 120, 90, 200), 0)])
    dets = {1: {"boxes": np.array([LARGE, (0, 0, 40, 40), (10, 120, 90, 200)], float),
                "scores": np.array([0.9, 0.8, 0.7]), "labels": np.zeros(3, int)}}
    # ranks: TP (P=1, R=.5), FP (P=1/2, R=.5), TP (P=2/3, R=1). Interpolated (max to the
    # right) precision: 1 for recall points 0.00..0.50 (51 points), 2/3 for 0.51..1.00
    # (50 points) -> AP = (51 + 50*2/3)/101 = 253/303 = 83.498%
    r = box_ap(coco, dets, L2C)
    assert r["AP"] == pytest.approx(100 * 253 / 303) and r["AP75"] == pytest.approx(100 * 253 / 303)


def test_shifted_detection_ap50_vs_ap75():
    coco = make_coco([1], [(1, 1, LARGE, 0)])
    x1, y1, x2, y2 = LARGE
    dets = {1: {"boxes": np.array([[x1 + SHIFT, y1, x2 + SHIFT, y2]], float),
                "scores": np.ones(1), "labels": np.zeros(1, int)}}
    r = box_ap(coco, dets, L2C)  # IoU 0.724: AP 100 at 0.50..0.70, 0 at 0.75..0.95
    assert r["AP50"] == pytest.approx(100.0) and r["AP75"] == 0.0 and r["AP"] == pytest.approx(50.0)
    assert r["AP_l"] == pytest.approx(50.0) and math.isnan(r["AP_s"]) and math.isnan(r["AP_m"])


# --------------------------------------------------------------- agreement with pycocotools


def random_case(seed=0, n_img=20):
    rng = np.random.default_rng(seed)
    cats = ((1, "a"), (3, "b"), (7, "c"))
    anns, dets, props = [], {}, {}
    for img in range(1, n_img + 1):
        n = int(rng.integers(0, 6))
        for _ in range(n):
            w, h = rng.integers(8, 150, 2)
            x, y = rng.integers(0, W - w), rng.integers(0, H - h)
            anns.append((img, int(rng.choice([1, 3, 7])), (int(x), int(y), int(x + w), int(y + h)),
                         int(rng.random() < 0.1)))
    coco = make_coco(range(1, n_img + 1), anns, cats)
    for img in range(1, n_img + 1):
        if img % 7 == 0:
            continue  # some images without predictions
        g = np.array([b[:4] for b in gt_boxes(coco, img)], float).reshape(-1, 4)
        noisy = g + rng.normal(0, 6, g.shape)
        rand = rng.uniform(0, 1, (150, 4)) * [W, H, W, H]
        lo, hi = np.minimum(rand[:, :2], rand[:, 2:]), np.maximum(rand[:, :2], rand[:, 2:])
        rand = np.concatenate([lo, hi], 1)
        boxes = np.concatenate([noisy, rand])
        scores = rng.random(len(boxes))
        labels = rng.integers(0, 3, len(boxes))
        dets[img] = {"boxes": torch.tensor(boxes[:60]), "scores": torch.tensor(scores[:60]),
                     "labels": torch.tensor(labels[:60])}
        props[img] = (boxes, scores)  # up to 155 per image: the 100 cut matters
    return coco, dets, props


def direct(coco, anns, use_cats, max_dets=None):
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(coco, coco.loadRes(anns), "bbox")
        ev.params.useCats = use_cats
        if max_dets:
            ev.params.maxDets = max_dets
        ev.evaluate()
        ev.accumulate()
        if use_cats:
            ev.summarize()
    return ev


def to_results(dets, l2c, cat=None):
    out = []
    for img, d in dets.items():
        b, s = np.asarray(d["boxes"], float), np.asarray(d["scores"], float)
        labels = np.asarray(d["labels"]) if cat is None else np.zeros(len(b), int)
        for (x1, y1, x2, y2), sc, lab in zip(b.tolist(), s.tolist(), labels.tolist()):
            out.append({"image_id": img, "category_id": cat or l2c[lab],
                        "bbox": [x1, y1, x2 - x1, y2 - y1], "score": sc})
    return out


def test_box_ap_matches_pycocotools():
    coco, dets, _ = random_case()
    l2c = {0: 1, 1: 3, 2: 7}
    r = box_ap(coco, dets, l2c)
    stats = direct(coco, to_results(dets, l2c), 1).stats
    expect = dict(zip(["AP", "AP50", "AP75", "AP_s", "AP_m", "AP_l"], stats[:6] * 100))
    assert 0 < r["AP"] < 100  # a non-trivial case
    same(r, expect)


def test_proposal_recall_matches_pycocotools():
    coco, _, props = random_case(seed=1)
    r = proposal_recall(coco, props)
    dets = {i: {"boxes": b, "scores": s} for i, (b, s) in props.items()}
    ev = direct(coco, to_results(dets, None, cat=1), 0, [100, 1000])
    rec = ev.eval["recall"]  # [T, K=1, A, M]; the summarize way: mean over entries > -1

    def mean(a, m):
        s = rec[:, :, a, m]
        return 100 * np.mean(s[s > -1])

    expect = {"AR100": mean(0, 0), "AR1k": mean(0, 1), "AR1k_s": mean(1, 1),
              "AR1k_m": mean(2, 1), "AR1k_l": mean(3, 1)}
    assert r["AR100"] < r["AR1k"] < 100  # the 100 cut matters in this case
    same(r, expect)


# --------------------------------------------------------------------------- mask proposal AR


def box_mask(box, dx=0):
    m = np.zeros((H, W), bool)
    x1, y1, x2, y2 = box
    m[y1:y2, x1 + dx:x2 + dx] = True
    return m


def test_segment_perfect_masks(gt):
    props = {}
    for img in gt.getImgIds():
        g = [box_mask(b[:4]) for b in gt_boxes(gt, img)]
        props[img] = (np.array(g, bool).reshape(-1, H, W), np.ones(len(g)))
    r = segment_proposal_recall(gt, props)
    assert list(r) == ["AR", "AR_s", "AR_m", "AR_l", "AR100", "AR10"]
    assert all(v == pytest.approx(100.0) for v in r.values()), r


def test_segment_shifted_masks():
    coco = make_coco([1], [(1, 1, SMALL, 0), (1, 1, LARGE, 0)])
    masks = torch.from_numpy(np.stack([box_mask(SMALL), box_mask(LARGE, dx=SHIFT)]))
    r = segment_proposal_recall(coco, {1: (masks, torch.tensor([0.9, 0.8]))})
    # small exact (found at all 10 thresholds), large with mask IoU 84/116 = 0.724 (found at
    # 5 of 10) -> AR = (10 + 5)/20 = 75%, AR_s = 100, AR_l = 50, no medium gt -> nan
    assert r["AR"] == pytest.approx(75.0) and r["AR_l"] == pytest.approx(50.0)
    assert r["AR_s"] == pytest.approx(100.0)
    assert math.isnan(r["AR_m"])


def test_segment_float_masks_thresholded_at_half():
    # Mask R-CNN-style [N,1,H,W] probabilities: >= 0.5 is foreground
    coco = make_coco([1], [(1, 1, LARGE, 0)])
    prob = np.where(box_mask(LARGE), 0.6, 0.4).astype(np.float32)[None, None]
    r = segment_proposal_recall(coco, {1: (torch.from_numpy(prob), torch.ones(1))})
    assert r["AR"] == pytest.approx(100.0)


def test_segment_tensor_and_rle_agree(gt):
    rng = np.random.default_rng(0)
    props_t, props_rle = {}, {}
    for img in gt.getImgIds():
        g = [box_mask(b[:4], dx=int(rng.integers(-8, 9))) for b in gt_boxes(gt, img)]
        noise = [rng.random((H, W)) < 0.02 for _ in range(5)]
        m = np.stack(g + noise)
        s = rng.random(len(m))
        props_t[img] = (torch.from_numpy(m.astype(np.uint8)), torch.from_numpy(s))
        rles = mask_utils.encode(np.asfortranarray(m.transpose(1, 2, 0).astype(np.uint8)))
        for r in rles:
            r["counts"] = r["counts"].decode()  # as read back from a JSON results file
        props_rle[img] = (rles, s)
    a, b = segment_proposal_recall(gt, props_t), segment_proposal_recall(gt, props_rle)
    assert 0 < a["AR"] < 100
    same(a, b, tol=0)


def test_segment_empty_and_wrong_size(gt):
    r = segment_proposal_recall(gt, {1: (np.zeros((0, H, W), bool), np.zeros(0))})
    assert all(v == 0.0 for v in r.values())
    with pytest.raises(ValueError, match="original resolution"):
        segment_proposal_recall(gt, {1: (np.ones((1, H // 2, W // 2), bool), np.ones(1))})


def test_summarize_line():
    assert summarize({"AP": 36.24, "AP_s": float("nan")}) == "AP 36.2 | AP_s -"
