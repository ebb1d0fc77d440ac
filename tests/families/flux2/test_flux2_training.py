"""FLUX.2 through the unchanged trainer: a klein-base LoRA lowers the training loss; [dev] trains with its guidance
input, samples and validates, frees its text encoder after caching and names FLUX.2 in its files; gradient
checkpointing, block swap and fp8 storage act on FLUX.2's blocks (shared modulation passed in) and change nothing.
Resume is bit-exact (tests/training/test_trainer.py, parametrised over both families)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from fluxlora.families.flux2 import latents
from fluxlora.families.flux2.family import FLUX2
from fluxlora.families.flux2.params import Flux2Params, axes_dim_for
from fluxlora.families.flux2.tiny import random_flux2
from fluxlora.network.lora import create_network
from fluxlora.training.blocks import apply_block_policy
from fluxlora.training.cli import train
from fluxlora.training.memory import BlockSwapper, swapped_positions


def test_a_klein_base_lora_lowers_the_training_loss(train_argv, tmp_path):
    """Paired: a run with a negligible learning rate draws the same batches, σ and noise, so step for step the
    trained LoRA's loss is compared with the base model's on identical inputs."""
    flags = ("--max_train_steps=60", "--timestep_sampling=sigmoid", "--network_dim=8", "--cache_latents",
             "--cache_text_encoder_outputs")
    trained = train(train_argv(*flags, "--learning_rate=1e-2", batch_size=1, family="flux2",
                               output_dir=tmp_path / "trained"))
    base = train(train_argv(*flags, "--learning_rate=1e-12", batch_size=1, family="flux2", output_dir=tmp_path / "base"))
    assert trained.losses[0] == pytest.approx(base.losses[0], rel=1e-6)  # same first batch, LoRA still zero
    late_trained, late_base = sum(trained.losses[-20:]) / 20, sum(base.losses[-20:]) / 20
    assert late_trained < 0.75 * late_base, (late_trained, late_base)


def test_dev_trains_with_guidance_samples_validates_and_names_flux2(train_argv, tmp_path, monkeypatch):
    seen: list[float | None] = []
    real = FLUX2.predict

    def spy(model, x_t, sigmas, cond, **kw):
        seen.append(kw["guidance"])
        return real(model, x_t, sigmas, cond, **kw)

    monkeypatch.setattr(FLUX2, "predict", spy)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square --w 32 --h 32 --d 3 --s 2 --g 4\n", encoding="utf-8")
    out = tmp_path / "out"
    # no --network_train_unet_only: FLUX.2's encoder carries no LoRA, so the cached run still frees it
    argv = [a for a in train_argv("--max_train_steps=4", "--cache_latents", "--cache_text_encoder_outputs",
                                  "--guidance_scale=2.5", f"--sample_prompts={prompts}", "--sample_every_n_steps=4",
                                  output_dir=out, family="flux2", version="dev",
                                  toml_extra="validation_split = 0.5\nvalidation_seed = 3")
            if a != "--network_train_unet_only"]
    freed: list[bool] = []
    import fluxlora.training.models as models_module

    real_load = models_module.load_transformer

    def spy_load(plan, device):
        freed.append(plan.residency.drop_text_encoders)
        return real_load(plan, device)

    monkeypatch.setattr(models_module, "load_transformer", spy_load)
    result = train(argv)
    assert result.global_step == 4 and all(torch.isfinite(torch.tensor(result.losses)))
    assert freed == [True]
    assert 2.5 in seen and 4.0 in seen  # training's --guidance_scale, the prompt's --g while sampling
    assert result.validation and all(torch.isfinite(torch.tensor([v for _, v in result.validation])))
    assert [p for p in (out / "sample").glob("*.png") if "_grid" not in p.name]
    lora = load_file(str(result.final_lora))
    names = {k.split(".")[0] for k in lora}
    assert {"lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_double_blocks_1_txt_mlp_2",
            "lora_unet_single_blocks_0_linear1", "lora_unet_single_blocks_1_linear2"} <= names
    assert len(names) == 2 * 8 + 2 * 2  # every block Linear of 2 double + 2 single blocks, nothing else
    with safe_open(str(result.final_lora), "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.architecture"] == "flux-2-dev/lora" and meta["ss_base_model_version"] == "flux2"
    assert meta["modelspec.implementation"] == "https://github.com/black-forest-labs/flux2"


def _step(model, network, inputs, seed):
    torch.manual_seed(seed)
    x, sigmas, cond = inputs
    out = FLUX2.predict(model, x, sigmas, cond, guidance=None, mask_text=False, compute_dtype=torch.float32,
                        autocast=contextlib.nullcontext)
    out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in network.named_parameters() if p.grad is not None}
    network.zero_grad(set_to_none=True)
    return out.detach().clone(), grads


def test_checkpointing_and_block_swap_act_on_flux2_blocks_and_change_nothing():
    params = Flux2Params(in_channels=128, context_in_dim=24, hidden_size=64, num_heads=2, depth=4,
                         depth_single_blocks=4, axes_dim=axes_dim_for(32), guidance_embed=False)
    model = random_flux2(params, seed=2).requires_grad_(False)
    network = create_network(1.0, 4, 4, model, [], train_text_encoder=False, network_args=["split_qkv=True"])
    network.apply_to()
    network.requires_grad_(True)
    with torch.no_grad():
        for name, param in network.named_parameters():  # non-zero up weights: every LoRA reaches the output
            if "lora_up" in name:
                param.normal_(0, 0.1)
    model.train()
    g = torch.Generator().manual_seed(0)
    inputs = (torch.randn(2, 32, 4, 6, generator=g), torch.tensor([0.2, 0.7]),
              {"prompt_embeds": torch.randn(2, 5, 24, generator=g),
               "reference_latents": latents.unpatchify(torch.randn(2, 128, 1, 2, generator=g))})
    plain = _step(model, network, inputs, 1)
    layout = FLUX2.blocks(model)
    assert layout.stream_args(0) == 2 and layout.stream_args(len(layout.double)) == 1
    apply_block_policy(layout, checkpointed=None, offload=False, device="cpu")
    checkpointed = _step(model, network, inputs, 1)
    swapper = BlockSwapper(layout.sequence, swapped_positions(layout, 2), "cpu", ring_size=2)
    swapped = _step(model, network, inputs, 1)
    swapper.remove()
    for other in (checkpointed, swapped):
        torch.testing.assert_close(other[0], plain[0], rtol=0, atol=0)
        assert other[1].keys() == plain[1].keys()
        assert len(plain[1]) == sum(1 for p in network.parameters() if p.requires_grad)  # every LoRA weight
        for name in plain[1]:
            torch.testing.assert_close(other[1][name], plain[1][name], rtol=0, atol=0)


@pytest.mark.parametrize("flags", [("--fp8_base", "--mixed_precision=bf16"), ("--gradient_checkpointing", "--cache_latents")],
                         ids=["fp8", "checkpointing"])
def test_memory_flags_train_flux2(train_argv, tmp_path, flags):
    plain = train(train_argv("--max_train_steps=2", "--cache_latents", output_dir=tmp_path / "plain", family="flux2"))
    other = train(train_argv("--max_train_steps=2", *flags, output_dir=tmp_path / "other", family="flux2"))
    assert all(torch.isfinite(torch.tensor(other.losses)))
    if "--fp8_base" in flags:  # e4m3 weights: close, not equal
        assert other.losses == pytest.approx(plain.losses, rel=0.2)
    else:
        assert other.losses == pytest.approx(plain.losses, rel=1e-6)
