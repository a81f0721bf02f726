"""Learning works for the detectors: Faster R-CNN with the conv5 head and with the 2fc head on FPN
(Table 3), and the shared-feature detector of the 4-step training (Table 5), each trained with its
smoke budget and scored by pycocotools. (Fast R-CNN on saved proposals, Table 2, is
``test_learning_fast_rcnn.py``: a file of its own, so that pytest-xdist can run it beside this
one, whose conv5 row alone trains for about 8 minutes on one core.)

Box AP needs the class too, and the embedded set's eight classes differ by shape only: a slim
network trained from scratch for 200 iterations on 48 images reaches only a few AP50 points on
the 16 val images, while the same network untrained scores 0. The thresholds sit between the
two (measured on the dev machine, seed 0, at f73667c; trained with 2 threads and with 1 thread,
as ``make test`` runs each pytest-xdist worker, whose different summation order gives a
different but equally valid run):

    row                            untrained AP50   trained AP50, 2 / 1 threads   threshold
    Table 3 (c) fpn                0.0              2.0 / 1.9                     1.4
    Table 3 (a) c4_conv5           0.0              5.7 / 4.2                     2.0
    Table 5 share (4-step on (c))  -                1.7 / 1.3                     1.0
    Table 3 (c) on its train split 0.0              15.3 / 15.6                   8.0

Each run is deterministic, so a threshold that passes on a machine passes there every time.
(The measurement at 6cb9f64, before the RPN head's sparse backward of a79da1d changed the
rounding, gave 3.3 / 2.8 for (c): such rows move by about a point with the summation order,
which is why the thresholds sit well below them.)

(Table 3 (b), the 2fc head on C5, reached 4.3 / 3.5 against 1.1 untrained; it is left out to
keep CI short: the 2fc head is the one of rows (c) here and of Table 2.)

The FPN detector is also scored on its own training images, where it must do far better: a
detector that learns nothing stays at zero there as well. A broken loss, sampler, box coder or
label mapping leaves every row at its untrained value and the test fails. After training, the
Table 3 and Table 5 records are rendered from the same runs (finished rows are loaded, not
retrained): well-formed JSON and Markdown with the paper's columns.
"""
from __future__ import annotations

import json
import math

import pytest

from fpnlib.data.coco import load_coco_split
from fpnlib.data.transforms import build_transforms
from fpnlib.experiments import run_table, table3

pytestmark = pytest.mark.slow

# minimum AP50 on val after the smoke budget, percent
THRESHOLDS = {"fpn": 1.4, "c4_conv5": 2.0, "share": 1.0}
MIN_TRAIN_AP50_FPN = 8.0  # the FPN detector on its own training images


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("detection_runs")


@pytest.mark.parametrize("variant", ["fpn", "c4_conv5"])
def test_each_faster_rcnn_row_learns(variant, smoke_root, runs):
    row = table3.run_row(variant, "smoke", smoke_root, runs / "table3" / variant, progress=False)
    assert row["iterations"] == 200
    ap50 = row["metrics"]["AP50"]
    assert ap50 >= THRESHOLDS[variant], f"{variant}: val AP50 {ap50:.1f} < {THRESHOLDS[variant]}: {row['metrics']}"


def test_fpn_detector_fits_its_training_images(smoke_root, runs):
    train_eval = load_coco_split(smoke_root, "train", transforms=build_transforms(False, 160, 214), with_masks=False)
    model = table3.load_row("fpn", "smoke", runs / "table3" / "fpn", train_eval.num_classes)
    metrics, _ = table3.detection_metrics(model, train_eval, progress=False)
    assert metrics["AP50"] >= MIN_TRAIN_AP50_FPN, metrics


def test_shared_features_learn_and_tables_3_and_5_render(smoke_root, runs):
    rec3 = table3.run_table3("smoke", smoke_root, runs / "table3", runs / "out", variants=("c4_conv5", "fpn"),
                             progress=False)
    assert all(r.get("reused_from") == "row.json" for r in rec3["rows"].values()), "rows should be reused"
    rec5 = run_table(5, "smoke", smoke_root, runs, runs / "out", progress=False)
    share = rec5["rows"]["share"]
    assert share["steps_3_4_iterations"] == [100, 100]
    assert share["metrics"]["AP50"] >= THRESHOLDS["share"], share
    assert share["parameters"] < rec5["rows"]["no_share"]["parameters"]
    assert rec5["rows"]["no_share"]["metrics"]["AP"] == rec3["rows"]["fpn"]["metrics"]["AP"]

    on_disk = json.loads((runs / "out" / "table3.json").read_text())
    assert list(on_disk["rows"]) == ["c4_conv5", "fpn"]
    for row in on_disk["rows"].values():
        assert set(row["metrics"]) >= set(table3.METRICS) and all(math.isfinite(v) for v in row["metrics"].values())
        assert row["inference_s_per_image"] > 0
    assert on_disk["provenance"]["preset"] == "smoke" and on_disk["provenance"]["commit"]
    md = (runs / "out" / "table3.md").read_text()
    assert "| (c) fpn | RPN Pk | Pk | 2fc |" in md and "/ 33.9 |" in md  # the paper's AP of row (c)
    assert "(*) He et al. [16] (paper only)" in md and "– / 26.3" in md
    assert "FPN Faster R-CNN beats the C4/conv5 baseline" in md
    md5 = (runs / "out" / "table5.md").read_text()
    assert "/ 34.3 |" in md5 and "/ 33.9 |" in md5 and "Test time: sharing" in md5
    # both test times from one side-by-side measurement, not Table 3(c)'s time taken beside another row
    assert rec5["inference_timing"]["images"] == 16 and "side by side in one process" in md5  # smoke val: 16
    assert all(r["inference_s_per_image"] > 0 for r in rec5["rows"].values())

