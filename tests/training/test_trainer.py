"""End-to-end training on the tiny real-format checkpoints: outputs, exact resume, the loss falls."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from fluxlora.training.cli import train
from fluxlora.training.state import load_state


def _lora(path):
    return load_file(str(path))


def test_training_writes_a_kohya_lora_with_metadata_and_plot(train_argv, tmp_path):
    result = train(train_argv("--max_train_steps=4", "--save_every_n_steps=2", "--save_state"))
    out = tmp_path / "out"
    assert result.global_step == 4 and len(result.losses) == 4
    assert (out / "lora.safetensors").is_file() and (out / "lora-step00000002.safetensors").is_file()
    assert (out / "loss.png").is_file() and (out / "lora-state" / "COMPLETE").is_file()
    tensors = _lora(out / "lora.safetensors")
    assert any(k.startswith("lora_unet_double_blocks_0_img_attn_qkv.") for k in tensors)
    assert all(float(v) != 0 for k, v in tensors.items() if k.endswith(".alpha"))
    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.architecture"] == "flux-1-dev/lora"
    assert meta["ss_network_dim"] == "4" and meta["ss_steps"] == "4"
    assert json.loads(meta["ss_datasets"])[0]["num_train_images"] == 4
    # the LoRA changed: lora_up starts at zero and is trained
    assert any(float(v.abs().max()) > 0 for k, v in tensors.items() if k.endswith("lora_up.weight"))


# "accum2-cached": the resumed run frees its text encoders after caching and parks the AE on the host, as the
# first part did; every model family resumes exactly (Kontext/Fill with their pairs, cached too)
ACCUM2_CACHED = ("--gradient_accumulation_steps=2", "--cache_latents", "--cache_text_encoder_outputs")


@pytest.mark.parametrize(("extra", "family"), [
    ((), "flux1"), (ACCUM2_CACHED, "flux1"), ((), "flux2"), (ACCUM2_CACHED, "flux2"), ((), "chroma"),
    (ACCUM2_CACHED, "kontext"), (ACCUM2_CACHED, "fill")],
    ids=["plain-flux1", "accum2-cached-flux1", "plain-flux2", "accum2-cached-flux2", "chroma", "kontext-accum2-cached",
         "fill-accum2-cached"])
def test_resume_is_bit_identical(train_argv, tmp_path, extra, family):
    full = train(train_argv("--max_train_steps=6", *extra, output_dir=tmp_path / "full", family=family))
    first = train(train_argv("--max_train_steps=3", "--save_state", *extra, output_dir=tmp_path / "a", family=family))
    state = tmp_path / "a" / "lora-state"
    assert load_state(state).counters.global_step == 3
    second = train(train_argv("--max_train_steps=6", f"--resume={state}", *extra, output_dir=tmp_path / "b",
                              family=family))
    assert first.losses == full.losses[:3]
    assert second.losses == full.losses  # the state carries the loss history of the first part
    a, b = _lora(tmp_path / "full" / "lora.safetensors"), _lora(tmp_path / "b" / "lora.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_loss_falls_when_overfitting_one_image(train_argv, tmp_path):
    result = train(train_argv("--max_train_steps=100", "--learning_rate=5e-3", "--timestep_sampling=sigmoid",
                              "--network_dim=8", "--cache_latents", batch_size=1))
    first, last = sum(result.losses[:10]) / 10, sum(result.losses[-10:]) / 10
    assert last < 0.5 * first, (first, last)


def test_initial_step_starts_at_the_absolute_step_and_skips_its_batches(train_argv, tmp_path):
    # A negligible learning rate keeps the LoRA at its start, so equal losses mean equal batches and draws.
    full = train(train_argv("--max_train_steps=4", "--learning_rate=1e-12", output_dir=tmp_path / "full"))
    late = train(train_argv("--max_train_steps=4", "--learning_rate=1e-12", "--initial_step=2",
                            "--save_every_n_steps=3", output_dir=tmp_path / "late"))
    assert late.global_step == 4
    assert late.losses == pytest.approx(full.losses[2:], rel=1e-6)  # steps 3 and 4 of the full run
    assert (tmp_path / "late" / "lora-step00000003.safetensors").is_file()  # file names use the absolute step


def test_gradient_checkpointing_is_applied_in_the_training_loop(train_argv, tmp_path, monkeypatch):
    # The loaded DiT is frozen (eval mode) and blocks are only checkpointed in training mode: the loop must switch it.
    import fluxlora.training.blocks as blocks_module
    from fluxlora.models.tiny import TINY_FLUX

    calls: list[int] = []
    real = blocks_module.checkpoint

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(blocks_module, "checkpoint", counting)
    plain = train(train_argv("--max_train_steps=2", output_dir=tmp_path / "plain"))
    assert calls == []
    ckpt = train(train_argv("--max_train_steps=2", "--gradient_checkpointing", output_dir=tmp_path / "ckpt"))
    assert len(calls) == 2 * (TINY_FLUX.depth + TINY_FLUX.depth_single_blocks)  # every block of each step's forward
    assert ckpt.losses == pytest.approx(plain.losses, rel=1e-6)  # recomputation changes nothing
