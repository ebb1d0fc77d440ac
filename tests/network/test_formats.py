"""LoRA format maps: kohya <-> diffusers / PEFT / ai-toolkit, checked against diffusers' own converter and loader."""

from __future__ import annotations

import math

import pytest
import torch

from fluxlora.errors import CheckpointError
from fluxlora.network.formats import (
    detect_lora_format,
    diffusers_to_kohya,
    effective_deltas,
    from_kohya,
    kohya_module_path,
    kohya_to_diffusers,
    split_scale,
    to_kohya,
)


def _module(gen: torch.Generator, name: str, out: int, inp: int, rank: int, alpha: float | None) -> dict:
    sd = {f"{name}.lora_down.weight": torch.randn(rank, inp, generator=gen),
          f"{name}.lora_up.weight": torch.randn(out, rank, generator=gen)}
    if alpha is not None:
        sd[f"{name}.alpha"] = torch.tensor(float(alpha))
    return sd


def _hand_delta(sd: dict, name: str) -> torch.Tensor:
    """alpha/rank · up @ down computed in float64 straight from the kohya keys (spec §5.2)."""
    down, up = sd[f"{name}.lora_down.weight"].double(), sd[f"{name}.lora_up.weight"].double()
    alpha = sd.get(f"{name}.alpha", torch.tensor(float(down.shape[0]))).item()
    return alpha / down.shape[0] * (up @ down)


def _block_diag_up(gen: torch.Generator, sizes: list[int], r: int) -> torch.Tensor:
    up = torch.zeros(sum(sizes), r * len(sizes))
    row = 0
    for j, size in enumerate(sizes):
        up[row:row + size, j * r:(j + 1) * r] = torch.randn(size, r, generator=gen)
        row += size
    return up


H = 16  # tiny FLUX width


@pytest.fixture
def kohya_sd() -> dict[str, torch.Tensor]:
    """Every module family: double/single blocks (incl. the last double block 18), input layers, final layer, TEs."""
    g = torch.Generator().manual_seed(0)
    sd: dict[str, torch.Tensor] = {}
    for i in (0, 18):
        b = f"lora_unet_double_blocks_{i}"
        sd |= _module(g, f"{b}_img_attn_qkv", 3 * H, H, 4, 2.0)  # dense up: every part gets the full down
        sd |= _module(g, f"{b}_txt_attn_proj", H, H, 4, 16.0)  # scale 4
        sd |= _module(g, f"{b}_img_mlp_0", 4 * H, H, 4, None)  # missing alpha = rank
        sd |= _module(g, f"{b}_txt_mlp_2", H, 4 * H, 2, 0.5)
        sd |= _module(g, f"{b}_img_mod_lin", 6 * H, H, 4, 4.0)
    # split_qkv layout: block-diagonal up of rank 3·2
    sd["lora_unet_double_blocks_1_txt_attn_qkv.lora_down.weight"] = torch.randn(6, H, generator=g)
    sd["lora_unet_double_blocks_1_txt_attn_qkv.lora_up.weight"] = _block_diag_up(g, [H, H, H], 2)
    sd["lora_unet_double_blocks_1_txt_attn_qkv.alpha"] = torch.tensor(3.0)
    sd |= _module(g, "lora_unet_single_blocks_0_linear1", 7 * H, H, 4, 1.0)
    sd |= _module(g, "lora_unet_single_blocks_37_linear2", H, 5 * H, 4, 4.0)
    sd |= _module(g, "lora_unet_single_blocks_1_modulation_lin", 3 * H, H, 4, 8.0)
    for name, out, inp in [("img_in", H, 64), ("txt_in", H, 8), ("time_in_in_layer", H, 256),
                           ("time_in_out_layer", H, H), ("vector_in_in_layer", H, 8), ("guidance_in_out_layer", H, H),
                           ("final_layer_linear", 64, H), ("final_layer_adaLN_modulation_1", 2 * H, H)]:
        sd |= _module(g, f"lora_unet_{name}", out, inp, 2, 1.0)
    for proj in ("q", "k", "v", "out"):
        sd |= _module(g, f"lora_te1_text_model_encoder_layers_0_self_attn_{proj}_proj", 8, 8, 2, 1.0)
    sd |= _module(g, "lora_te1_text_model_encoder_layers_1_mlp_fc1", 12, 8, 2, 1.0)
    sd |= _module(g, "lora_te3_encoder_block_0_layer_0_SelfAttention_q", 8, 8, 2, 4.0)
    sd |= _module(g, "lora_te3_encoder_block_1_layer_1_DenseReluDense_wi_0", 12, 8, 2, 1.0)
    return sd


def _assert_same_deltas(a: dict, b: dict) -> None:
    da, db = effective_deltas(a), effective_deltas(b)
    assert set(da) == set(db)
    for name in da:
        torch.testing.assert_close(db[name], da[name], rtol=1e-6, atol=1e-6, msg=name)


def test_kohya_names_parse_for_every_block_index():
    for i in range(19):
        assert kohya_module_path(f"lora_unet_double_blocks_{i}_txt_mod_lin") == ("lora_unet", f"double_blocks.{i}.txt_mod.lin")
    assert kohya_module_path("lora_unet_single_blocks_37_modulation_lin") == ("lora_unet", "single_blocks.37.modulation.lin")
    assert kohya_module_path("lora_unet_guidance_in_in_layer") == ("lora_unet", "guidance_in.in_layer")
    assert kohya_module_path("lora_te1_text_model_encoder_layers_11_self_attn_out_proj") == (
        "lora_te1", "text_model.encoder.layers.11.self_attn.out_proj")
    assert kohya_module_path("lora_te3_encoder_block_23_layer_1_DenseReluDense_wi_1") == (
        "lora_te3", "encoder.block.23.layer.1.DenseReluDense.wi_1")
    for bad in ("lora_unet_double_blocks_0_img_attn_norm_query_norm", "lora_unet_foo", "lora_te2_x", "double_blocks_0"):
        assert kohya_module_path(bad) is None


def test_detect_format(kohya_sd):
    assert detect_lora_format(kohya_sd) == "kohya"
    diff = kohya_to_diffusers(kohya_sd)
    assert detect_lora_format(diff) == "diffusers"
    assert detect_lora_format(diff, {"software": '{"name": "ai-toolkit"}'}) == "ai-toolkit"
    assert detect_lora_format(kohya_to_diffusers(kohya_sd, dst="peft")) == "peft"
    with pytest.raises(CheckpointError, match="not a LoRA"):
        detect_lora_format(["img_in.weight"])


@pytest.mark.parametrize("scale", [1.0, 0.25, 4.0, 0.03, 7.0, -2.0])
def test_split_scale_is_exact_and_balanced(scale):
    down, up = split_scale(scale)
    assert down * up == pytest.approx(scale, rel=1e-15)
    assert math.log2(abs(up)).is_integer()  # a power of two: multiplying by it is exact
    assert abs(math.log2(abs(down)) - math.log2(abs(up))) <= 1.0 + 1e-9


def test_scale_one_changes_no_bit(kohya_sd):
    out = kohya_to_diffusers(kohya_sd)
    assert torch.equal(out["transformer.single_transformer_blocks.37.proj_out.lora_A.weight"],
                       kohya_sd["lora_unet_single_blocks_37_linear2.lora_down.weight"])
    assert torch.equal(out["transformer.x_embedder.lora_B.weight"], kohya_sd["lora_unet_img_in.lora_up.weight"])


def test_kohya_to_diffusers_splits_fused_modules_by_rows(kohya_sd):
    out = kohya_to_diffusers(kohya_sd)
    full = _hand_delta(kohya_sd, "lora_unet_double_blocks_0_img_attn_qkv")
    for j, part in enumerate(("to_q", "to_k", "to_v")):
        p = f"transformer.transformer_blocks.0.attn.{part}"
        got = out[f"{p}.lora_B.weight"].double() @ out[f"{p}.lora_A.weight"].double()
        torch.testing.assert_close(got, full[j * H:(j + 1) * H], rtol=1e-6, atol=1e-6)
    # single-block linear1: q, k, v of width H then the MLP part (rows − 3H), width read from the down's inputs
    full = _hand_delta(kohya_sd, "lora_unet_single_blocks_0_linear1")
    bands = {"attn.to_q": (0, H), "attn.to_k": (H, 2 * H), "attn.to_v": (2 * H, 3 * H), "proj_mlp": (3 * H, 7 * H)}
    for part, (a, b) in bands.items():
        p = f"transformer.single_transformer_blocks.0.{part}"
        got = out[f"{p}.lora_B.weight"].double() @ out[f"{p}.lora_A.weight"].double()
        torch.testing.assert_close(got, full[a:b], rtol=1e-6, atol=1e-6)
    # block-diagonal (split_qkv) up: each part keeps only its own rank-2 block
    assert out["transformer.transformer_blocks.1.attn.add_k_proj.lora_A.weight"].shape == (2, H)
    # final layer: diffusers stores (scale, shift), BFL (shift, scale)
    full = _hand_delta(kohya_sd, "lora_unet_final_layer_adaLN_modulation_1")
    got = out["transformer.norm_out.linear.lora_B.weight"].double() @ out["transformer.norm_out.linear.lora_A.weight"].double()
    torch.testing.assert_close(got, torch.cat([full[H:], full[:H]]), rtol=1e-6, atol=1e-6)
    # text encoders
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight" in out
    assert "text_encoder_2.encoder.block.1.layer.1.DenseReluDense.wi_0.lora_B.weight" in out


def test_matches_diffusers_converter_at_full_width():
    """diffusers' `_convert_kohya_flux_lora_to_diffusers` (hard-coded width 3072) is the oracle for names and deltas."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    g = torch.Generator().manual_seed(1)
    sd = _module(g, "lora_unet_single_blocks_5_linear1", 21504, 3072, 2, 1.0)
    sd |= _module(g, "lora_unet_double_blocks_18_img_attn_qkv", 48, 16, 4, 2.0)
    sd |= _module(g, "lora_unet_double_blocks_3_txt_mlp_0", 64, 16, 4, 16.0)
    sd["lora_unet_double_blocks_2_txt_attn_qkv.lora_down.weight"] = torch.randn(6, 16, generator=g)
    sd["lora_unet_double_blocks_2_txt_attn_qkv.lora_up.weight"] = _block_diag_up(g, [16, 16, 16], 2)
    ref = _convert_kohya_flux_lora_to_diffusers({k: v.clone() for k, v in sd.items()})
    ours = kohya_to_diffusers(sd)
    assert set(ours) == set(ref)
    for key in ref:
        if key.endswith("lora_A.weight"):
            p = key[: -len(".lora_A.weight")]
            assert ours[key].shape == ref[key].shape
            torch.testing.assert_close(ours[f"{p}.lora_B.weight"] @ ours[key], ref[f"{p}.lora_B.weight"] @ ref[key],
                                       rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("fmt", ["diffusers", "ai-toolkit", "peft"])
def test_round_trip_is_exact_and_keeps_every_module(kohya_sd, fmt):
    there = from_kohya(kohya_sd, fmt)
    if fmt == "peft":
        assert "transformer_blocks.0.attn.to_q.lora_A.weight" in there
        assert "x_embedder.lora_A.weight" in there
    back = to_kohya(there, fmt)
    _assert_same_deltas(kohya_sd, back)
    # fused modules come back in their original layout: compact stays compact, block-diagonal stays block-diagonal
    assert back["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape == (4, H)
    assert back["lora_unet_double_blocks_1_txt_attn_qkv.lora_down.weight"].shape == (6, H)
    assert back["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (7 * H, 4)


def test_diffusers_to_kohya_fuses_distinct_downs_block_diagonally():
    g = torch.Generator().manual_seed(2)
    sd, ranks = {}, {"to_q": 2, "to_k": 3, "to_v": 1}
    for part, r in ranks.items():
        sd[f"transformer.transformer_blocks.4.attn.{part}.lora_A.weight"] = torch.randn(r, H, generator=g)
        sd[f"transformer.transformer_blocks.4.attn.{part}.lora_B.weight"] = torch.randn(H, r, generator=g)
    out = diffusers_to_kohya(sd)
    name = "lora_unet_double_blocks_4_img_attn_qkv"
    assert out[f"{name}.lora_down.weight"].shape == (6, H)
    assert out[f"{name}.alpha"].item() == 6.0  # alpha = total rank: scale 1 (spec §10.2)
    delta = effective_deltas(out)[name].double()
    for j, part in enumerate(ranks):
        p = f"transformer.transformer_blocks.4.attn.{part}"
        expected = sd[f"{p}.lora_B.weight"].double() @ sd[f"{p}.lora_A.weight"].double()
        torch.testing.assert_close(delta[j * H:(j + 1) * H], expected, rtol=1e-6, atol=1e-6)


def test_absent_part_gets_zero_rows_and_alpha_keys_are_honoured():
    g = torch.Generator().manual_seed(3)
    p = "transformer.single_transformer_blocks.0"
    sd = {f"{p}.attn.to_q.lora_A.weight": torch.randn(2, H, generator=g),
          f"{p}.attn.to_q.lora_B.weight": torch.randn(H, 2, generator=g),
          f"{p}.proj_mlp.lora_A.weight": torch.randn(2, H, generator=g),
          f"{p}.proj_mlp.lora_B.weight": torch.randn(4 * H, 2, generator=g),
          f"{p}.proj_mlp.alpha": torch.tensor(1.0)}  # scale 1/2 on the mlp part
    delta = effective_deltas(diffusers_to_kohya(sd))["lora_unet_single_blocks_0_linear1"].double()
    assert delta.shape == (7 * H, H)
    assert not delta[H:3 * H].any()
    torch.testing.assert_close(delta[:H], sd[f"{p}.attn.to_q.lora_B.weight"].double() @ sd[f"{p}.attn.to_q.lora_A.weight"].double())
    torch.testing.assert_close(delta[3 * H:], 0.5 * sd[f"{p}.proj_mlp.lora_B.weight"].double() @ sd[f"{p}.proj_mlp.lora_A.weight"].double())


def test_transformers5_clip_names_are_accepted():
    g = torch.Generator().manual_seed(4)
    sd = {"text_encoder.encoder.layers.2.mlp.fc2.lora_A.weight": torch.randn(2, 12, generator=g),
          "text_encoder.encoder.layers.2.mlp.fc2.lora_B.weight": torch.randn(8, 2, generator=g)}
    assert "lora_te1_text_model_encoder_layers_2_mlp_fc2.lora_up.weight" in diffusers_to_kohya(sd)


def test_unmapped_keys_are_errors_unless_dropped(kohya_sd):
    g = torch.Generator().manual_seed(5)
    bad = dict(kohya_sd) | _module(g, "lora_unet_double_blocks_0_img_attn_norm_query_norm", 8, 8, 2, 1.0)
    bad["lora_unet_img_in.dora_scale"] = torch.ones(1, 64)
    with pytest.raises(CheckpointError, match="4 sd-scripts LoRA key.*drop_unmapped"):
        kohya_to_diffusers(bad)
    out = kohya_to_diffusers(bad, drop_unmapped=True)
    _assert_same_deltas(kohya_sd, diffusers_to_kohya(out))
    diff = kohya_to_diffusers(kohya_sd) | {"transformer.pos_embed.lora_A.weight": torch.ones(2, 2),
                                           "transformer.pos_embed.lora_B.weight": torch.ones(2, 2)}
    with pytest.raises(CheckpointError, match="transformer.pos_embed"):
        diffusers_to_kohya(diff)


def test_incomplete_module_and_hidden_size_check(kohya_sd):
    sd = dict(kohya_sd)
    del sd["lora_unet_img_in.lora_up.weight"]
    with pytest.raises(CheckpointError, match="lora_unet_img_in.*no up"):
        kohya_to_diffusers(sd)
    with pytest.raises(CheckpointError, match="hidden_size is 3072"):
        kohya_to_diffusers(kohya_sd, hidden_size=3072)


def test_diffusers_loads_our_file_like_a_hand_merge():
    """diffusers + peft as the real client: our diffusers-format LoRA fused into FluxTransformer2DModel equals
    the hand merge W += alpha/rank·up@down done on BFL weights and converted with the BFL->diffusers map."""
    from diffusers import FluxTransformer2DModel

    from fluxlora.models.diffusers_keys import bfl_to_diffusers, diffusers_to_bfl

    torch.manual_seed(0)  # diffusers' model init uses the global RNG; the weights are overwritten below anyway
    model = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
                                   num_attention_heads=2, joint_attention_dim=8, pooled_projection_dim=8,
                                   guidance_embeds=True, axes_dims_rope=(2, 2, 4)).eval()
    bfl = {k: v.detach().clone() for k, v in diffusers_to_bfl(model.state_dict()).items()}
    g = torch.Generator().manual_seed(6)
    lora: dict[str, torch.Tensor] = {}
    for key, w in bfl.items():
        if key.endswith(".weight") and w.dim() == 2 and not key.startswith("final_layer"):
            lora |= _module(g, "lora_unet_" + key[:-7].replace(".", "_"), w.shape[0], w.shape[1], 2, 3.0)
    merged = dict(bfl)
    for name, delta in effective_deltas(lora).items():
        key = kohya_module_path(name)[1] + ".weight"
        merged[key] = bfl[key] + delta
    model.load_lora_adapter(kohya_to_diffusers(lora), prefix="transformer", adapter_name="x")
    model.fuse_lora(lora_scale=1.0)
    model.unload_lora()
    got = model.state_dict()
    expected, before = bfl_to_diffusers(merged), bfl_to_diffusers(bfl)
    changed = 0
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=key)
        changed += not torch.equal(value, before[key])
    assert changed >= 12  # every targeted Linear (incl. x_embedder, linear1 parts) really moved
