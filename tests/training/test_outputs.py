"""Output names and retention (spec §6.1) as pure functions."""

from __future__ import annotations

from pathlib import Path

from fluxlora.training.outputs import (
    OutputNames,
    epoch_to_remove,
    should_save_epoch,
    step_to_remove,
)


def test_sd_scripts_file_names():
    named, unnamed = OutputNames(Path("out"), "my_lora"), OutputNames(Path("out"), None)
    assert named.epoch_file(3) == Path("out/my_lora-000003.safetensors")
    assert named.step_file(250) == Path("out/my_lora-step00000250.safetensors")
    assert named.last_file() == Path("out/my_lora.safetensors")
    assert named.last_file("-interrupted") == Path("out/my_lora-interrupted.safetensors")
    assert named.epoch_state(3) == Path("out/my_lora-000003-state")
    assert named.step_state(250) == Path("out/my_lora-step00000250-state")
    assert named.last_state() == Path("out/my_lora-state")
    assert unnamed.epoch_file(1).name == "epoch-000001.safetensors"
    assert unnamed.step_file(1).name == "at-step00000001.safetensors"
    assert unnamed.last_file().name == "last.safetensors" and unnamed.last_state().name == "last-state"


def test_epoch_saves_skip_the_last_epoch():
    assert [e for e in range(1, 11) if should_save_epoch(e, 10, 3)] == [3, 6, 9]
    assert [e for e in range(1, 5) if should_save_epoch(e, 4, 1)] == [1, 2, 3]
    assert not any(should_save_epoch(e, 10, None) for e in range(1, 11))


def test_retention_keeps_the_last_n():
    # every 2 epochs, keep 2: saving epoch 6 drops epoch 2; nothing before epoch 5
    assert [epoch_to_remove(e, 2, 2) for e in (2, 4, 6, 8)] == [None, None, 2, 4]
    assert epoch_to_remove(6, 2, None) is None
    # --save_last_n_steps counts steps, not files (sd-scripts): every 100 steps, keep the last 300 steps' files;
    # saving 500 drops 100 (r = step - n - 1, floored to the period)
    assert [step_to_remove(s, 100, 300) for s in (100, 200, 300, 400, 500, 600)] == [None, None, None, None, 100, 200]
