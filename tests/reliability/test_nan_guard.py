"""The NaN / inf guard: a non-finite loss skips the optimizer step (weights untouched) with a warning naming the step
and the batch's images; K consecutive ones stop the run, save the last good LoRA and name the usual causes."""

from __future__ import annotations

import logging

import pytest
import torch
from faults import Faults
from safetensors.torch import load_file

from fluxlora.errors import TrainingError
from fluxlora.training.cli import train


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_one_nan_step_is_skipped_and_logged_with_images(argv_for, tmp_path):
    records = _Records()  # on the trainer's logger itself: the CLI reconfigures the root logger's handlers
    logging.getLogger("fluxlora.training.trainer").addHandler(records)
    try:
        result = train(argv_for("--max_train_steps=3", "--save_every_n_steps=1", out=tmp_path / "out"),
                       loss_hook=Faults("nan_loss=2").loss)
    finally:
        logging.getLogger("fluxlora.training.trainer").removeHandler(records)
    # the skipped attempt is not a step: still 3 optimizer steps, all with finite losses
    assert result.global_step == 3 and len(result.losses) == 3
    assert all(torch.isfinite(torch.tensor(result.losses)))
    warnings = [m for m in records.messages if "non-finite" in m]
    assert len(warnings) == 1
    warning = warnings[0]
    assert "step 2" in warning and "skipped" in warning and ".png" in warning


def test_consecutive_nans_stop_and_keep_the_last_good_lora(argv_for, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(TrainingError) as info:
        train(argv_for("--max_train_steps=10", "--save_every_n_steps=1", "--max_nan_steps=3", out=out),
              loss_hook=Faults("nan_loss=3-20").loss)
    message = str(info.value)
    assert "3 optimizer steps in a row" in message and "stopped at step 2" in message
    assert info.value.key == "--max_nan_steps"
    assert "fp16" in message and "learning rate" in message and "Prodigy" in message and "\n" not in message
    stopped = out / "lora-nan-stopped.safetensors"
    assert str(stopped) in message
    # the weights after step 2 are what was saved: the NaN steps changed nothing
    assert _equal(load_file(str(stopped)), load_file(str(out / "lora-step00000002.safetensors")))
    assert not (out / "lora-step00000003.safetensors").exists() and not (out / "lora.safetensors").exists()
