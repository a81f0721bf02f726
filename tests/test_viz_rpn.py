"""Pictures of notebook 04 and the image conversion every picture uses."""
from __future__ import annotations

import json

import numpy as np
import torch

from fpnlib.data.transforms import Normalize
from fpnlib.viz import to_numpy_image
from fpnlib.viz_rpn import plot_proposals_by_level, plot_table1, plot_training_log, read_log


def test_normalized_images_are_shown_with_their_colours():
    raw = torch.rand(3, 8, 9)
    normalized, _ = Normalize()(raw, None)
    assert normalized.min() < 0
    np.testing.assert_allclose(to_numpy_image(normalized), raw.permute(1, 2, 0).numpy(), atol=1e-5)
    np.testing.assert_allclose(to_numpy_image(raw), raw.permute(1, 2, 0).numpy(), atol=1e-6)


def test_proposals_histogram_counts_each_level():
    boxes = torch.tensor([[0, 0, 8, 8], [0, 0, 10, 10], [5, 5, 60, 60]], dtype=torch.float32)
    fig = plot_proposals_by_level(torch.rand(3, 64, 64), boxes, torch.tensor([0, 0, 2]), ["p2", "p3", "p4"])
    ax_img, ax_hist = fig.axes
    assert len(ax_img.patches) == 3
    labels = [t.get_text() for t in ax_hist.get_legend().get_texts()]
    assert labels == ["p2: 2", "p3: 0", "p4: 1"]


def test_training_log_and_table_figures(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"iteration": i, "loss_objectness": 1 / i, "loss_rpn_box": 2 / i}) + "\n"
                           for i in (10, 20)))
    assert [r["iteration"] for r in read_log(log)] == [10, 20]
    fig = plot_training_log({"fpn": read_log(log)})
    assert len(fig.axes) == 2 and len(fig.axes[0].lines) == 1
    metrics = {"AR1k": 30.0, "AR1k_s": 20.0, "AR1k_m": 35.0, "AR1k_l": 40.0}
    fig = plot_table1({"rows": {"fpn": {"metrics": metrics}}}, {"c_fpn": {"AR1k": 56.3, "AR1k_s": 44.9,
                      "AR1k_m": 63.4, "AR1k_l": 66.2}}, {"fpn": "c_fpn"})
    assert len(fig.axes) == 4
    assert [p.get_height() for p in fig.axes[0].patches] == [30.0, 56.3]
