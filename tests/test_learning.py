"""Learning works: every Table 1 row, trained briefly on the smoke set, finds objects.

Each row trains the ``smoke`` budget of ``fpnlib.experiments.table1`` (slim ResNet-18, GroupNorm,
200 iterations of 4 images at 160 px, about 10-50 s on 2 CPU cores) and is scored on the 16
validation images by pycocotools. The thresholds sit well below what the rows reach and well
above what the same models reach untrained (measured on the dev machine, seed 0; trained at
f73667c with 2 threads and with 1 thread, as ``make test`` runs each pytest-xdist worker):

    row                  untrained AR100 / AR1k   trained AR100 / AR1k, 2 threads   1 thread
    c4                    4.6 / 18.5              22.5 / 32.1                       21.2 / 30.6
    c5                    3.8 / 18.8              16.2 / 19.0                       15.6 / 18.1
    fpn                   0.3 /  1.8              16.3 / 24.3                       18.4 / 24.0
    bottom_up             0.9 /  5.7              15.3 / 23.5                       15.3 / 23.4
    top_down_no_lateral   0.0 /  4.3              16.0 / 23.4                       16.9 / 23.2
    p2_only               7.6 / 17.2              23.1 / 37.4                       24.7 / 35.6

Float kernels differ by machine: on an AMD EPYC dev machine at 8845709 (and unchanged since) the
one-thread p2_only row reached 14.0 / 21.9, so its AR1k threshold is 20.0, still above the 17.2
of the untrained row.

AR1k alone cannot tell a trained single-map RPN from an untrained one on images this small
(C5 of a 160 x 214 image has 525 anchors, fewer than 1000 proposals), so AR100, where the
ranking of the proposals matters, is checked too. A broken loss, sampler or optimizer leaves
both near the untrained values and the test fails.
"""
from __future__ import annotations

import pytest

from fpnlib.experiments.table1 import run_row

pytestmark = pytest.mark.slow

# row: (minimum AR100, minimum AR1k), percent
THRESHOLDS = {
    "c4": (14.0, 24.0),
    "c5": (10.0, 12.0),
    "fpn": (10.0, 15.0),
    "bottom_up": (10.0, 15.0),
    "top_down_no_lateral": (10.0, 15.0),
    "p2_only": (12.0, 20.0),
}


@pytest.mark.parametrize("variant", list(THRESHOLDS))
def test_each_table1_row_learns(variant, smoke_root, tmp_path):
    row = run_row(variant, "smoke", smoke_root, tmp_path / variant, seed=0, progress=False)
    m = row["metrics"]
    min_ar100, min_ar1k = THRESHOLDS[variant]
    assert row["iterations"] == 200
    assert m["AR100"] >= min_ar100, f"{variant}: AR100 {m['AR100']:.1f} < {min_ar100} after training: {m}"
    assert m["AR1k"] >= min_ar1k, f"{variant}: AR1k {m['AR1k']:.1f} < {min_ar1k} after training: {m}"
