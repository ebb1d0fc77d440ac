"""The family seam is real: a test-only family (tests/families/toy_family.py: one text encoder, no pooled vector, no
guidance, its own schedule and metadata) trains, resumes exactly, samples, plans memory and saves a LoRA through the
unchanged trainer, chosen with `--model_type toy`."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from toy_family import TOY

from fluxlora import families
from fluxlora.errors import ConfigError
from fluxlora.files import save_safetensors
from fluxlora.models.text_encoders import tiny_t5xxl_config
from fluxlora.models.tiny import tiny_flux_params, tiny_flux_state_dict
from fluxlora.training.cli import check_main, train

PROMPTS = "a red square --w 32 --h 32 --d 3 --s 2\n"


@pytest.fixture
def toy(tmp_path_factory):
    families.register(TOY)
    yield
    families.unregister(TOY.name)


@pytest.fixture(scope="module")
def toy_model(tmp_path_factory) -> Path:
    """The toy transformer: the tiny FLUX layout, schnell (no guidance), `y` as wide as T5's states."""
    params = replace(tiny_flux_params("schnell"), vec_in_dim=tiny_t5xxl_config().d_model)
    path = tmp_path_factory.mktemp("toy") / "toy.safetensors"
    save_safetensors(path, tiny_flux_state_dict("schnell", seed=5, params=params))
    return path


def _argv(train_argv, toy_model, *extra, output_dir=None):
    argv = [a for a in train_argv(*extra, output_dir=output_dir)
            if not a.startswith(("--pretrained_model_name_or_path=", "--clip_l="))]
    return [f"--pretrained_model_name_or_path={toy_model}", "--model_type=toy", *argv]


def test_toy_family_trains_samples_and_saves_through_the_same_trainer(toy, train_argv, toy_model, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS, encoding="utf-8")
    out = tmp_path / "out"
    result = train(_argv(train_argv, toy_model, "--max_train_steps=6", "--cache_text_encoder_outputs",
                         "--cache_latents", f"--sample_prompts={prompts}", "--sample_every_n_steps=6",
                         output_dir=out))
    assert result.global_step == 6 and all(torch.isfinite(torch.tensor(result.losses)))
    lora = load_file(str(result.final_lora))
    assert lora and all(k.startswith("lora_unet_") for k in lora)  # no CLIP-L: no lora_te1 modules
    with safe_open(str(result.final_lora), "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.architecture"] == "toy/lora" and meta["ss_base_model_version"] == "toy"
    # the sampler ran the toy's predict and schedule: one image at step 6
    samples = sorted((out / "sample").glob("*.png"))
    assert [p for p in samples if "_grid" not in p.name and "000006" in p.name]


def test_toy_family_resumes_exactly(toy, train_argv, toy_model, tmp_path):
    flags = ("--max_train_steps=4", "--save_every_n_steps=2", "--save_state")
    whole = train(_argv(train_argv, toy_model, *flags, output_dir=tmp_path / "whole"))
    first = train(_argv(train_argv, toy_model, "--max_train_steps=2", "--save_state", output_dir=tmp_path / "a"))
    resumed = train(_argv(train_argv, toy_model, *flags, f"--resume={tmp_path / 'a' / 'lora-state'}",
                          output_dir=tmp_path / "b"))
    assert first.losses + resumed.losses[2:] == whole.losses and len(whole.losses) == 4
    a, b = load_file(str(whole.final_lora)), load_file(str(resumed.final_lora))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_toy_family_plans_and_names_its_own_files(toy, train_argv, toy_model, capsys):
    assert check_main(_argv(train_argv, toy_model)) == 0
    out = capsys.readouterr().out
    assert "ok: Toy (2 double + 2 single blocks" in out and "memory plan" in out
    no_t5 = [a for a in _argv(train_argv, toy_model) if not a.startswith("--t5xxl=")]
    with pytest.raises(ConfigError, match="--t5xxl is required for toy models"):
        check_main(no_t5)
