"""Block swap (same outputs and LoRA gradients as without it), CPU-offloaded checkpointing, and the exact T5 trim."""

from __future__ import annotations

import pytest
import torch

from fluxlora import flow
from fluxlora.errors import ConfigError
from fluxlora.families.flux1.family import FLUX1
from fluxlora.models.flux import FluxParams, axes_dim_for
from fluxlora.models.tiny import random_flux
from fluxlora.network.lora import create_network
from fluxlora.training import step as step_module
from fluxlora.training.blocks import apply_block_policy
from fluxlora.training.memory import (
    BlockSwapper,
    check_blocks_to_swap,
    max_blocks_to_swap,
    move_except,
    swap_split,
    swapped_positions,
)
from fluxlora.training.step import training_loss


def flux_block_sequence(flux):
    return FLUX1.blocks(flux).sequence

PARAMS = FluxParams(in_channels=64, vec_in_dim=24, context_in_dim=20, hidden_size=32, num_heads=2, depth=4,
                    depth_single_blocks=6, axes_dim=axes_dim_for(16), guidance_embed=True)


def _model(dtype: torch.dtype = torch.float32):
    flux = random_flux(PARAMS, seed=3).to(dtype)
    network = create_network(1.0, 4, 2.0, flux, [], train_text_encoder=False, generator=torch.Generator().manual_seed(1))
    network.apply_to()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # non-zero up weights, so both factors get gradients
        for lora in network.loras:
            for w in lora.up_weights():
                w.copy_(torch.randn(w.shape, generator=g) * 0.1)
    network.to(dtype)
    network.requires_grad_(True)
    flux.train()
    return flux, network


def _inputs(batch: int = 2, n_img: int = 12, n_txt: int = 7, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(5)
    img = torch.randn(batch, n_img, PARAMS.in_channels, generator=g, dtype=dtype)
    img_ids = flow.image_ids(batch, 3, 4, device=torch.device("cpu"))
    txt = torch.randn(batch, n_txt, PARAMS.context_in_dim, generator=g, dtype=dtype)
    txt_ids = flow.text_ids(batch, n_txt, device=torch.device("cpu"))
    t = torch.rand(batch, generator=g)
    y = torch.randn(batch, PARAMS.vec_in_dim, generator=g, dtype=dtype)
    guidance = torch.full((batch,), 1.0)
    mask = torch.ones(batch, n_txt, dtype=torch.bool)
    mask[0, 4:] = False
    return img, img_ids, txt, txt_ids, t, y, guidance, mask


def _step(flux, network, inputs):
    for p in network.parameters():
        p.grad = None
    out = flux(*inputs)
    (out.square().mean()).backward()
    return out.detach().clone(), {n: p.grad.clone() for n, p in network.named_parameters() if p.grad is not None}


def test_split_follows_sd_scripts_and_the_limit_comes_from_the_block_counts():
    assert swap_split(35) == (17, 36)  # spec §7.1: n=35 → 17 double + 36 single
    assert swap_split(19) == (9, 20)
    assert swap_split(1) == (0, 2)
    assert max_blocks_to_swap(19, 38) == 35
    assert max_blocks_to_swap(4, 6) == 4  # 2 double (≤ 4−2) + 4 single (≤ 6−2); 5 would need 6 singles
    assert max_blocks_to_swap(2, 2) == 0
    with pytest.raises(ConfigError, match=r"--blocks_to_swap 5: .*4 double and 6 single.*at most 4"):
        check_blocks_to_swap(5, 4, 6)


def test_swapped_positions_are_the_last_blocks_of_each_list():
    flux = random_flux(PARAMS, seed=0)
    # 3 → 1 double (index 3) + 4 single (indices 2..5, sequence positions 4 + 2..5)
    assert swapped_positions(FLUX1.blocks(flux), 3) == [3, 6, 7, 8, 9]


@pytest.mark.parametrize("ring_size", [1, 2, 3])
def test_swap_gives_the_same_outputs_and_lora_gradients(ring_size):
    flux, network = _model()
    apply_block_policy(FLUX1.blocks(flux), checkpointed=None, offload=False, device="cpu")
    inputs = _inputs()
    reference = [_step(flux, network, inputs) for _ in range(2)]
    with torch.no_grad():
        flux.eval()
        ref_eval = flux(*inputs)
        flux.train()

    swapper = BlockSwapper(flux_block_sequence(flux), swapped_positions(FLUX1.blocks(flux), 4), "cpu", ring_size=ring_size,
                           record_order=True)
    blocks = flux_block_sequence(flux)
    host = {id(p): p.data.data_ptr() for pos in swapper.swapped_positions for p in blocks[pos].parameters()}
    for ref_out, ref_grads in reference:  # twice: the second step starts from the layout the first one left
        out, grads = _step(flux, network, inputs)
        torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
        assert grads.keys() == ref_grads.keys() and len(grads) == 2 * len(network.loras)
        for name in grads:
            torch.testing.assert_close(grads[name], ref_grads[name], rtol=0, atol=0)
    with torch.no_grad():
        flux.eval()
        torch.testing.assert_close(flux(*inputs), ref_eval, rtol=0, atol=0)  # forward-only (validation, sampling)
    # hooks saw forward order, then the checkpoint recompute in reverse order
    n = len(blocks)
    assert swapper.stats.order[: 2 * n] == [*range(n), *range(n - 1, -1, -1)]
    # a ring smaller than its block list reloads blocks for the recompute; nothing is ever written back
    assert swapper.stats.loads >= len(swapper.swapped_positions) + (4 - ring_size if ring_size < 4 else 0)
    if ring_size >= 2:
        assert swapper.stats.late == 0  # always prefetched ahead of use
    swapper.remove()
    # after removal every swapped parameter is again a view of its (unchanged) host copy
    assert all(p.data.data_ptr() == host[id(p)] for pos in swapper.swapped_positions for p in blocks[pos].parameters())


def test_swap_keeps_only_the_ring_resident():
    flux, _ = _model()
    swapper = BlockSwapper(flux_block_sequence(flux), swapped_positions(FLUX1.blocks(flux), 4), "cpu", ring_size=2)
    double = sum(p.numel() * 4 for p in flux.double_blocks[0].parameters())
    single = sum(p.numel() * 4 for p in flux.single_blocks[0].parameters())
    assert swapper.host_bytes() == 2 * double + 4 * single  # 4 → 2 double + 4 single blocks
    assert swapper.device_bytes() == 2 * double + 2 * single
    skip = swapper.swapped_parameters()
    move_except(flux, "meta", skip)  # everything else moves; swapped weights stay where the swapper put them
    blocks = flux_block_sequence(flux)
    for pos, block in enumerate(blocks):
        devices = {p.device.type for p in block.parameters()}
        assert devices == ({"cpu"} if pos in swapper.swapped_positions else {"meta"})


def test_cpu_offload_checkpointing_equals_plain_checkpointing():
    flux, network = _model()
    apply_block_policy(FLUX1.blocks(flux), checkpointed=None, offload=False, device="cpu")
    inputs = _inputs()
    ref_out, ref_grads = _step(flux, network, inputs)
    apply_block_policy(FLUX1.blocks(flux), checkpointed=None, offload=True, device="cpu")
    out, grads = _step(flux, network, inputs)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=0, atol=0)


def _settings() -> step_module.FlowSettings:
    return step_module.FlowSettings(
        t5xxl_max_token_length=None, apply_t5_attn_mask=True, guidance_scale=1.0, timestep_sampling="sigmoid",
        sigmoid_scale=1.0, discrete_flow_shift=3.1582, model_prediction_type="raw", weighting_scheme="none",
        logit_mean=0.0, logit_std=1.0, mode_scale=1.29, ip_noise_gamma=None, ip_noise_gamma_random_strength=False,
        loss_type="l2", huber_schedule="snr", huber_c=0.1, huber_scale=1.0)


def test_trimming_padded_t5_tokens_gives_the_same_loss_and_gradients(monkeypatch):
    """With --apply_t5_attn_mask, a batch cut to its longest caption (5 of 64 tokens) trains exactly like the full pad."""
    flux, network = _model(torch.float64)
    g = torch.Generator().manual_seed(9)
    latents = torch.randn(2, 16, 8, 8, generator=g, dtype=torch.float64)
    mask = torch.zeros(2, 64, dtype=torch.bool)
    mask[0, :5] = True
    mask[1, :3] = True
    t5 = torch.randn(2, 64, PARAMS.context_in_dim, generator=g, dtype=torch.float64) * mask[..., None]
    cond = {"clip_pooled": torch.randn(2, PARAMS.vec_in_dim, generator=g, dtype=torch.float64), "t5_out": t5,
            "t5_mask": mask}
    seen: list[int] = []
    original_predict = FLUX1.predict

    def spy(model, x_t, sigmas, cond_, **kwargs):
        seen.append(cond_["t5_out"].shape[1])
        return original_predict(model, x_t, sigmas, cond_, **kwargs)

    monkeypatch.setattr(FLUX1, "predict", spy)

    def loss_and_grads():
        for p in network.parameters():
            p.grad = None
        out = training_loss(FLUX1, flux, latents, cond, _settings(), generator=torch.Generator().manual_seed(4),
                            guidance=1.0, compute_dtype=torch.float64)
        out.loss.backward()
        return out.loss.detach(), [p.grad.clone() for p in network.parameters()]

    trimmed_loss, trimmed_grads = loss_and_grads()
    monkeypatch.setattr(FLUX1, "trim_text", lambda c: c)  # the full 64-token padding
    full_loss, full_grads = loss_and_grads()
    assert seen == [5, 64]
    torch.testing.assert_close(trimmed_loss, full_loss, rtol=1e-12, atol=0)
    for a, b in zip(trimmed_grads, full_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-15)


def test_the_test_settings_are_a_configuration_a_user_can_write(tmp_path):
    """The settings the tests above train with are what the command line gives for the same flags (so they test a
    reachable configuration, and a new FlowSettings field with a default of its own shows up here)."""
    from fluxlora.config.train_config import parse_train_config

    files = {name: tmp_path / f"{name}.safetensors" for name in ("flux", "clip", "t5", "ae")}
    for path in [*files.values(), tmp_path / "d.toml"]:
        path.write_bytes(b"x")
    cfg = parse_train_config([
        f"--pretrained_model_name_or_path={files['flux']}", f"--clip_l={files['clip']}", f"--t5xxl={files['t5']}",
        f"--ae={files['ae']}", f"--dataset_config={tmp_path / 'd.toml'}", f"--output_dir={tmp_path / 'out'}",
        "--apply_t5_attn_mask", "--guidance_scale=1.0", "--timestep_sampling=sigmoid", "--discrete_flow_shift=3.1582",
        "--model_prediction_type=raw", "--weighting_scheme=none", "--huber_schedule=snr", "--loss_type=l2"])
    assert cfg.flow == _settings()


def test_preflight_refuses_swap_without_checkpointing():
    from types import SimpleNamespace

    from fluxlora.training.memory import check_memory_flags

    info = SimpleNamespace(double_blocks=19, single_blocks=38)
    cfg = SimpleNamespace(memory=SimpleNamespace(blocks_to_swap=19, gradient_checkpointing=False))
    with pytest.raises(ConfigError, match="--blocks_to_swap 19 needs --gradient_checkpointing"):
        check_memory_flags(cfg, info)
    cfg = SimpleNamespace(memory=SimpleNamespace(blocks_to_swap=36, gradient_checkpointing=True))
    with pytest.raises(ConfigError, match="at most 35"):
        check_memory_flags(cfg, info)
    check_memory_flags(SimpleNamespace(memory=SimpleNamespace(blocks_to_swap=35, gradient_checkpointing=True)), info)
