"""Memory planner: parameter counts against the real module, activation bytes against autograd's saved tensors,
advice that really fits, and `fluxlora check` printing the plan."""

from __future__ import annotations

import pytest
import torch

from fluxlora import flow
from fluxlora.config.train_config import parse_train_config
from fluxlora.errors import ConfigError
from fluxlora.families.flux1.shape import (
    ACTIVATION_BYTES_PER_TOKEN_PER_WIDTH,
    block_params,
    flux_param_count,
    flux_shape,
    linear_weight_params,
    lora_param_count,
)
from fluxlora.models.flux import Flux, FluxParams, axes_dim_for
from fluxlora.models.tiny import random_flux
from fluxlora.network.lora import create_network
from fluxlora.training.cli import check_main
from fluxlora.training.plan import build_plan
from fluxlora.training.planner import Workload, estimate, fits_advice

GB = 1e9


@pytest.mark.parametrize("params", [FluxParams.dev(), FluxParams.schnell()], ids=["dev", "schnell"])
def test_parameter_counts_equal_the_module(params):
    with torch.device("meta"):
        flux = Flux(params)
    assert flux_param_count(params) == sum(p.numel() for p in flux.parameters())
    double, single = block_params(params)
    assert double == sum(p.numel() for p in flux.double_blocks[0].parameters())
    assert single == sum(p.numel() for p in flux.single_blocks[0].parameters())
    linear_double, _ = linear_weight_params(params)
    h = params.hidden_size
    # performance.md §1a: 113.27 M per-token weights per stream (12·3072²), plus the 6·3072² modulation
    assert linear_double == 2 * (113_246_208 + 6 * h * h)


def test_lora_count_matches_performance_table():
    assert abs(lora_param_count(FluxParams.dev(), 16) - 76.6e6) < 0.05e6  # performance.md §1a
    assert abs(lora_param_count(FluxParams.dev(), 128) - 612.6e6) < 0.1e6


def test_weights_by_dtype_and_swap_savings():
    dev = FluxParams.dev()
    bf16 = estimate(Workload(shape=flux_shape(dev), weight_dtype=torch.bfloat16)).device["DiT weights"]
    assert abs(bf16 - 2 * 11.901e9) < 0.01e9  # 23.8 GB: the bf16 flux1-dev.safetensors
    fp8 = estimate(Workload(shape=flux_shape(dev), fp8=True)).device["DiT weights"]
    assert 11.9e9 < fp8 < 12.1e9  # Linear weights 1 byte, biases / norms / embedders stay bf16
    swapped = estimate(Workload(shape=flux_shape(dev), blocks_to_swap=35, gradient_checkpointing=True))
    double, single = block_params(dev)
    # 17 double + 36 single blocks leave the device, a ring of 2 + 2 slots comes in (performance.md: 21.8 GB saved)
    assert swapped.device["DiT weights"] == bf16 - 2 * ((17 - 2) * double + (36 - 2) * single)
    assert swapped.host["swapped blocks (pinned)"] == 2 * (17 * double + 36 * single)


def _saved_bytes(block, inputs, dtype):
    seen: dict[int, int] = {}
    params = {p.untyped_storage().data_ptr() for p in block.parameters()}

    def pack(t):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(*inputs)
    return sum(n for ptr, n in seen.items() if ptr not in params)


def test_activation_bytes_match_saved_tensors_at_another_width():
    """The per-token coefficients (measured at width 256) predict autograd's saved bytes at width 128 within 10 %."""
    h = 128
    params = FluxParams(in_channels=64, vec_in_dim=8, context_in_dim=8, hidden_size=h, num_heads=2, depth=1,
                        depth_single_blocks=1, axes_dim=axes_dim_for(64))
    flux = random_flux(params).train()
    network = create_network(1.0, 4, 4, flux, [], train_text_encoder=False)
    network.apply_to()
    network.requires_grad_(True)
    n_img, n_txt = 96, 32
    g = torch.Generator().manual_seed(0)
    img, txt, vec = (torch.randn(1, n, h, generator=g) for n in (n_img, n_txt, 1))
    vec = vec[:, 0]
    ids = torch.cat([flow.text_ids(1, n_txt, device=torch.device("cpu")),
                     flow.image_ids(1, 8, 12, device=torch.device("cpu"))], dim=1)
    pe = flux.pe_embedder(ids)
    tokens = n_img + n_txt
    double = _saved_bytes(flux.double_blocks[0], (img, txt, vec, pe), torch.float32)
    single = _saved_bytes(flux.single_blocks[0], (torch.cat([txt, img], 1), vec, pe), torch.float32)
    assert double == pytest.approx(ACTIVATION_BYTES_PER_TOKEN_PER_WIDTH[("fp32", "double")] * h * tokens, rel=0.10)
    assert single == pytest.approx(ACTIVATION_BYTES_PER_TOKEN_PER_WIDTH[("fp32", "single")] * h * tokens, rel=0.10)


def test_advice_names_flags_that_really_fit():
    dev = FluxParams.dev()
    w = Workload(shape=flux_shape(dev), image_tokens=4096, text_tokens=512)  # 1024², bf16, no checkpointing
    assert estimate(w).device_peak > 60 * GB  # does not fit a 24 GB card
    advice = fits_advice(w, int(24 * GB))
    assert advice is not None and "--gradient_checkpointing" in advice
    assert "--fp8_base" in advice or "--blocks_to_swap" in advice
    assert fits_advice(Workload(shape=flux_shape(dev), gradient_checkpointing=True), int(80 * GB)) is None
    swap = fits_advice(Workload(shape=flux_shape(dev), gradient_checkpointing=True, fp8=True), int(8 * GB))
    assert swap is not None and "--blocks_to_swap" in swap
    n = int(swap.split("--blocks_to_swap ")[1].split()[0])
    fitted = Workload(shape=flux_shape(dev), gradient_checkpointing=True, fp8=True, blocks_to_swap=n)
    assert estimate(fitted).device_peak <= 8 * GB < estimate(Workload(shape=flux_shape(dev), gradient_checkpointing=True,
                                                                      fp8=True, blocks_to_swap=n - 1)).device_peak


def test_check_prints_the_plan(train_argv, capsys):
    assert check_main(train_argv()) == 0
    out = capsys.readouterr().out
    assert "memory plan" in out and "device peak" in out and "system RAM peak" in out


def test_swap_beyond_the_model_or_without_checkpointing_is_refused(train_argv):
    with pytest.raises(ConfigError, match=r"--blocks_to_swap 1: this model has 2 double and 2 single blocks"):
        build_plan(parse_train_config(train_argv("--blocks_to_swap=1", "--gradient_checkpointing")))


def _workload(argv):
    return build_plan(parse_train_config(argv)).workload


def _loaded_bytes(path, element_size):
    from fluxlora.models.checkpoints import read_header

    return sum(read_header(path).dtype_counts().values()) * element_size


def test_cached_outputs_move_the_encoders_from_training_to_the_caching_phase(train_argv, tiny_ckpts, capsys):
    bf16 = ("--mixed_precision=bf16", "--max_train_steps=1")
    te = _loaded_bytes(tiny_ckpts.clip_l, 2) + _loaded_bytes(tiny_ckpts.t5xxl, 2)
    ae = _loaded_bytes(tiny_ckpts.ae, 2)
    plain = estimate(_workload(train_argv(*bf16)))
    te_cached = estimate(_workload(train_argv(*bf16, "--cache_text_encoder_outputs")))
    both = estimate(_workload(train_argv(*bf16, "--cache_text_encoder_outputs", "--cache_latents")))
    clip_lora = train_argv(*bf16, "--cache_text_encoder_outputs")
    clip_lora.remove("--network_train_unet_only")
    te_trained = estimate(_workload(clip_lora))

    assert not plain.caching and plain.device_peak == plain.training_peak
    assert plain.device["text encoders + AE"] == te + ae
    # the training phase drops exactly the freed encoders (and the AE that leaves the device with cached latents)
    assert plain.training_peak - te_cached.training_peak == te
    assert plain.training_peak - both.training_peak == te + ae
    # a CLIP-L LoRA keeps both encoders on the device for training
    assert te_trained.training_peak == plain.training_peak
    # the caching phase holds the encoders (next to the AE unless latents were cached first) and their batch
    assert te_cached.caching["text encoders"] == te and te_cached.caching["AE"] == ae
    assert both.caching["text encoders"] == te and both.caching["AE"] == 0
    assert te_cached.caching["text encode batch"] > 0
    for plan in (te_cached, both):
        assert plan.device_peak == max(plan.caching_peak, plan.training_peak)

    assert check_main(train_argv(*bf16, "--cache_text_encoder_outputs")) == 0
    out = capsys.readouterr().out
    assert "caching ≈" in out and "training ≈" in out and "text encode batch" in out


def test_a_caching_phase_that_does_not_fit_gets_its_own_advice():
    dev = FluxParams.dev()
    w = Workload(shape=flux_shape(dev), gradient_checkpointing=True, fp8=True, blocks_to_swap=30,
                 caching_device=(("text encoders", int(9.6 * GB)), ("text encode batch", int(0.2 * GB))))
    plan = estimate(w)
    assert plan.device_peak == plan.caching_peak > plan.training_peak
    advice = fits_advice(w, int(8 * GB))
    assert advice is not None and "--text_encoder_batch_size" in advice
    assert fits_advice(w, int(12 * GB)) is None


def test_cpu_only_peak_is_the_larger_phase_plus_the_runtime_not_the_files_twice(train_argv, capsys):
    plan = estimate(_workload(train_argv("--cache_text_encoder_outputs", "--cache_latents")))
    assert plan.caching and plan.host["model files read"] > 0
    # the files become the weights as they are read (memory-mapped), so on a CPU they are not added to the weights
    assert plan.cpu_peak == plan.device_peak + plan.host["runtime"] + plan.host["swapped blocks (pinned)"]
    assert plan.cpu_peak < plan.device_peak + plan.host_peak
    assert check_main(train_argv("--cache_text_encoder_outputs", "--cache_latents")) == 0
    assert f"peak ≈ {plan.cpu_peak / GB:.2f} GB" in capsys.readouterr().out
