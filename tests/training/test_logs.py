"""Loss recorder windows and the loss plot."""

from __future__ import annotations

import math

from PIL import Image

from fluxlora.training.logs import LossRecorder, plot_losses


def test_moving_average_uses_a_fixed_window_from_the_first_step():
    rec = LossRecorder(window=3)
    assert math.isnan(rec.moving_average)
    for v in (1.0, 2.0):
        rec.add(v)
    assert rec.moving_average == 1.5  # partial window during the first epoch
    for v in (3.0, 4.0, 5.0):
        rec.add(v)
    assert rec.moving_average == 4.0  # last three only
    assert rec.end_epoch() == 3.0
    rec.add(10.0)
    assert rec.end_epoch() == 10.0  # epoch means never mix epochs


def test_plot_losses_writes_a_png(tmp_path):
    out = plot_losses(tmp_path / "loss.png", [1.0 / (i + 1) for i in range(40)], validation=[(10, 0.2), (40, 0.1)])
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size == (800, 450)
