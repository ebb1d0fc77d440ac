"""Exact resume: a run interrupted at a saved state and resumed equals the uninterrupted run bit for bit on CPU —
across an epoch boundary, mid-epoch, with gradient accumulation, flip and caption randomness, schedule-free and
8-bit AdamW — and resuming with settings that would change the run is refused with the differences listed.

Each case trains the full run once (saving states along the way) and resumes a copy from a saved state."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from fluxlora.errors import ConfigError
from fluxlora.training.cli import train
from fluxlora.training.state import load_state

RANDOM_DATA = ("shuffle_caption = true\n  flip_aug = true\n  caption_dropout_rate = 0.25\n"
               "  caption_tag_dropout_rate = 0.3\n  keep_tokens = 1")


def _tensor_dtypes(tree) -> set[torch.dtype]:
    if torch.is_tensor(tree):
        return {tree.dtype}
    if isinstance(tree, dict):
        return set().union(*(_tensor_dtypes(v) for v in tree.values()))
    if isinstance(tree, (list, tuple)):
        return set().union(*(_tensor_dtypes(v) for v in tree))
    return set()


def _same_lora(a_path, b_path) -> None:
    a, b = load_file(str(a_path)), load_file(str(b_path))
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert different == [], different[:3]


def test_resume_across_epoch_boundary_and_mid_epoch_with_accumulation_and_random_data(argv_for, tmp_path):
    # batch 1, 4 images, accumulation 2: 2 optimizer steps per epoch; 5 steps = 3 epochs
    flags = ["--max_train_steps=5", "--gradient_accumulation_steps=2", "--save_state"]
    full = train(argv_for(*flags, "--save_every_n_steps=3", "--save_every_n_epochs=1", out=tmp_path / "full",
                          batch_size=1, subset=RANDOM_DATA))
    assert len(full.losses) == 5
    epoch_state = tmp_path / "full" / "lora-000001-state"  # end of epoch 1 (step 2): resumes at epoch 2, batch 0
    mid_state = tmp_path / "full" / "lora-step00000003-state"  # mid-epoch 2
    assert load_state(epoch_state).counters.global_step == 2
    assert load_state(mid_state).counters.global_step == 3
    for name, state in (("from_epoch", epoch_state), ("from_mid", mid_state)):
        resumed = train(argv_for(*flags, f"--resume={state}", out=tmp_path / name, batch_size=1, subset=RANDOM_DATA))
        assert resumed.losses == full.losses, name
        _same_lora(tmp_path / "full" / "lora.safetensors", tmp_path / name / "lora.safetensors")


def test_the_randomness_is_really_there(argv_for, tmp_path):
    """Guards the test above: with flip and caption randomness the losses differ from the plain run's."""
    flags = ["--max_train_steps=2", "--gradient_accumulation_steps=2"]
    plain = train(argv_for(*flags, out=tmp_path / "plain", batch_size=1))
    randomised = train(argv_for(*flags, out=tmp_path / "random", batch_size=1, subset=RANDOM_DATA))
    assert plain.losses != randomised.losses


@pytest.mark.parametrize("optimizer", [
    ["--optimizer_type=AdamWScheduleFree"],
    # the tiny LoRA's tensors are under bitsandbytes' 4096-element threshold; min_8bit_size makes them 8-bit
    ["--optimizer_type=AdamW8bit", "--optimizer_args", "min_8bit_size=16"],
], ids=["schedulefree", "adamw8bit"])
def test_resume_is_exact_with_stateful_optimizers(argv_for, tmp_path, optimizer):
    flags = ["--max_train_steps=4", "--save_state", *optimizer]
    full = train(argv_for(*flags, "--save_every_n_steps=2", out=tmp_path / "full"))
    state = tmp_path / "full" / "lora-step00000002-state"
    if "--optimizer_type=AdamW8bit" in optimizer:  # the 8-bit state really is 8-bit
        assert torch.uint8 in _tensor_dtypes(load_state(state).optimizer["state"])
    resumed = train(argv_for(*flags, f"--resume={state}", out=tmp_path / "resumed"))
    assert resumed.losses == full.losses
    _same_lora(tmp_path / "full" / "lora.safetensors", tmp_path / "resumed" / "lora.safetensors")


@pytest.fixture
def saved_state(argv_for, tmp_path):
    train(argv_for("--max_train_steps=1", "--save_state", out=tmp_path / "first"))
    return tmp_path / "first" / "lora-state"


@pytest.mark.parametrize(("change", "named"), [
    (["--network_dim=8"], "network_dim: 4 -> 8"),
    (["--optimizer_type=Lion"], "optimizer_type"),
    (["--gradient_accumulation_steps=2"], "gradient_accumulation_steps: 1 -> 2"),
    (["--seed=8"], "seed: 7 -> 8"),
    ("captions", "dataset_images"),
    ("more_images", "train_images"),
], ids=["network-shape", "optimizer", "accumulation", "seed", "captions", "more-images"])
def test_resume_with_changed_settings_is_refused_with_the_differences(argv_for, tmp_path, saved_state, change,
                                                                      named):
    from reliability_data import write_dataset

    extra: list[str] = [] if isinstance(change, str) else change
    images = None
    if change == "captions":
        images = write_dataset(tmp_path / "img2")
        (images / "01.txt").write_text("a different caption", encoding="utf-8")
    elif change == "more_images":
        images = write_dataset(tmp_path / "img3", count=6)
    argv = argv_for("--max_train_steps=3", f"--resume={saved_state}", *extra, out=tmp_path / "second",
                    images=images, toml_name="changed.toml")
    with pytest.raises(ConfigError) as info:
        train(argv)
    message = str(info.value)
    assert named in message and "--resume_force" in message and "\n" not in message
    assert info.value.key == "--resume"
    assert not (tmp_path / "second").exists()


def test_moved_dataset_folder_still_resumes_and_resume_force_overrides(argv_for, tmp_path, saved_state):
    from reliability_data import write_dataset

    moved = write_dataset(tmp_path / "elsewhere" / "img")  # same files in another folder: the same run
    result = train(argv_for("--max_train_steps=2", f"--resume={saved_state}", out=tmp_path / "moved", images=moved,
                            toml_name="moved.toml"))
    assert result.global_step == 2
    forced = train(argv_for("--max_train_steps=2", f"--resume={saved_state}", "--network_alpha=2", "--resume_force",
                            out=tmp_path / "forced"))
    assert forced.global_step == 2
