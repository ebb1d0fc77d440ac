"""FLUX transformer: parity with diffusers' FluxTransformer2DModel, maths, masks, params."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from diffusers import FluxTransformer2DModel
from diffusers.models.embeddings import CombinedTimestepTextProjEmbeddings

from fluxlora.models.diffusers_keys import bfl_to_diffusers
from fluxlora.models.flux import Flux, FluxParams, axes_dim_for
from fluxlora.models.flux_layers import (
    DoubleStreamBlock,
    SingleStreamBlock,
    apply_rope,
    rope,
    timestep_embedding,
)
from fluxlora.models.tiny import random_flux, random_flux_inputs


def diffusers_model(params: FluxParams) -> FluxTransformer2DModel:
    return FluxTransformer2DModel(
        patch_size=1, in_channels=params.in_channels, num_layers=params.depth,
        num_single_layers=params.depth_single_blocks, attention_head_dim=params.head_dim,
        num_attention_heads=params.num_heads, joint_attention_dim=params.context_in_dim,
        pooled_projection_dim=params.vec_in_dim, guidance_embeds=params.guidance_embed,
        axes_dims_rope=params.axes_dim,
    )


def diffusers_forward(model: FluxTransformer2DModel, x: dict[str, torch.Tensor], guidance: bool) -> torch.Tensor:
    # diffusers takes 2-D ids (shared by the batch) and the raw guidance scale.
    return model(hidden_states=x["img"], encoder_hidden_states=x["txt"], pooled_projections=x["y"],
                 timestep=x["timesteps"], img_ids=x["img_ids"][0], txt_ids=x["txt_ids"][0],
                 guidance=x["guidance"] if guidance else None, return_dict=False)[0]


@pytest.mark.parametrize("variant", ["dev", "schnell"])
@torch.no_grad()
def test_forward_matches_diffusers_tiny(small_flux_params: FluxParams, variant: str) -> None:
    params = small_flux_params.with_variant(variant)
    ours = random_flux(params, seed=3)
    theirs = diffusers_model(params)
    theirs.load_state_dict(bfl_to_diffusers(ours.state_dict()), strict=True)
    theirs.eval()
    x = random_flux_inputs(params, batch=2, grid=(4, 5), txt_len=6)
    x["timesteps"] = torch.tensor([0.7, 0.05])
    x["guidance"] = torch.tensor([3.5, 1.0])
    expected = diffusers_forward(theirs, x, guidance=params.guidance_embed)
    got = ours(**(x if params.guidance_embed else {**x, "guidance": None}))
    assert got.shape == x["img"].shape
    assert expected.abs().max() > 0.1  # a non-trivial output
    assert (got - expected).abs().max() <= 1e-5


@pytest.mark.slow
@torch.no_grad()
def test_forward_matches_diffusers_full_width_dev_and_schnell() -> None:
    """Width 3072 (24 heads × 128, axes 16/56/56), 1 double + 1 single block; schnell by dropping guidance_in."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    dev = FluxParams(depth=1, depth_single_blocks=1)
    ours = random_flux(dev, seed=0)
    state = ours.state_dict()
    converted = bfl_to_diffusers(state)
    # Our key map agrees with diffusers' own single-file converter (which is only right at width 3072).
    reference = convert_flux_transformer_checkpoint_to_diffusers(dict(state))
    assert set(converted) == set(reference)
    for key in ("transformer_blocks.0.attn.add_k_proj.weight", "single_transformer_blocks.0.proj_mlp.bias",
                "norm_out.linear.weight", "single_transformer_blocks.0.attn.to_v.weight"):
        assert torch.equal(converted[key], reference[key]), key
    del reference

    with torch.device("meta"):  # no init of 546 M parameters: all are assigned from our weights
        theirs = diffusers_model(dev)
    theirs.load_state_dict(converted, strict=True, assign=True)
    theirs.eval()
    x = random_flux_inputs(dev, batch=1, grid=(4, 4), txt_len=8)
    x["timesteps"] = torch.tensor([0.7])
    expected = diffusers_forward(theirs, x, guidance=True)
    assert (ours(**x) - expected).abs().max() <= 1e-5

    # schnell: same blocks, no guidance embedder (our model re-assembled from the same tensors, no copy).
    with torch.device("meta"):
        schnell = Flux(dev.with_variant("schnell"))
    schnell.load_state_dict({k: v for k, v in state.items() if not k.startswith("guidance_in.")},
                            strict=True, assign=True)
    embed = CombinedTimestepTextProjEmbeddings(embedding_dim=dev.hidden_size, pooled_projection_dim=dev.vec_in_dim)
    embed.timestep_embedder.load_state_dict(theirs.time_text_embed.timestep_embedder.state_dict())
    embed.text_embedder.load_state_dict(theirs.time_text_embed.text_embedder.state_dict())
    theirs.time_text_embed = embed
    expected = diffusers_forward(theirs, x, guidance=False)
    assert (schnell(**{**x, "guidance": None}) - expected).abs().max() <= 1e-5


def test_dev_without_guidance_is_an_error(small_flux_params: FluxParams) -> None:
    model = random_flux(small_flux_params)
    x = random_flux_inputs(small_flux_params)
    with pytest.raises(ValueError, match="guidance"):
        model(**{**x, "guidance": None})


@torch.no_grad()
def test_text_key_mask_ignores_padded_tokens(small_flux_params: FluxParams) -> None:
    model = random_flux(small_flux_params, seed=5)
    x = random_flux_inputs(small_flux_params, batch=2, txt_len=8)
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[0, 5:] = False
    mask[1, 2:] = False
    changed = x["txt"].clone()
    changed[~mask] = torch.randn(int((~mask).sum()), small_flux_params.context_in_dim) * 10
    base = model(**x, txt_mask=mask)
    assert (model(**{**x, "txt": changed}, txt_mask=mask) - base).abs().max() <= 1e-6
    # Without the mask the padded tokens do take part (so the test above is not vacuous).
    assert (model(**{**x, "txt": changed}) - model(**x)).abs().max() > 1e-3
    # An all-True mask is the same as no mask.
    assert torch.allclose(model(**x, txt_mask=torch.ones(2, 8, dtype=torch.bool)), model(**x), atol=1e-6)


def test_timestep_embedding_formula() -> None:
    # spec §3.1: 256-d [cos ‖ sin] of 1000·σ with freq_i = exp(−ln(10000)·i/128), computed in fp32 from an fp32 σ.
    sigma = torch.tensor([0.7001, 0.05], dtype=torch.float32)
    emb = timestep_embedding(sigma, 256)
    assert emb.dtype == torch.float32 and emb.shape == (2, 256)
    for row, s in enumerate(sigma.tolist()):
        for i in (0, 1, 57, 127):
            angle = 1000 * s * math.exp(-math.log(10000) * i / 128)
            assert emb[row, i].item() == pytest.approx(math.cos(angle), abs=2e-4)
            assert emb[row, 128 + i].item() == pytest.approx(math.sin(angle), abs=2e-4)
    # σ given in bf16 still gets its embedding computed in fp32
    assert timestep_embedding(sigma.bfloat16(), 256).dtype == torch.float32


def test_rope_is_a_complex_rotation_of_consecutive_pairs() -> None:
    g = torch.Generator().manual_seed(0)
    dim, theta = 8, 10000
    pos = torch.tensor([[0.0, 1.0, 5.0, 37.0]])  # [B=1, N=4]
    q = torch.randn(1, 2, 4, dim, generator=g)  # [B, H, N, D]
    k = torch.randn(1, 2, 4, dim, generator=g)
    pe = rope(pos, dim, theta).unsqueeze(1)
    q_rot, k_rot = apply_rope(q, k, pe)
    omega = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    phase = torch.polar(torch.ones(4, dim // 2, dtype=torch.float64), pos[0].double()[:, None] * omega)
    for x, x_rot in ((q, q_rot), (k, k_rot)):
        z = torch.view_as_complex(x.double().reshape(1, 2, 4, dim // 2, 2).contiguous())
        expected = torch.view_as_real(z * phase).reshape(1, 2, 4, dim)
        assert torch.allclose(x_rot.double(), expected, atol=1e-5)


@pytest.mark.parametrize(("head_dim", "axes"), [(128, (16, 56, 56)), (32, (4, 14, 14)), (64, (8, 28, 28)),
                                                (16, (4, 6, 6))])
def test_axes_dim_rule(head_dim: int, axes: tuple[int, int, int]) -> None:
    assert axes_dim_for(head_dim) == axes


def _meta_model(params: FluxParams) -> Flux:
    with torch.device("meta"):
        return Flux(params)


def test_dev_layout_matches_spec_key_shapes() -> None:
    model = _meta_model(FluxParams.dev())
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    # spec §3.2
    assert shapes["double_blocks.0.img_mod.lin.weight"] == (18432, 3072)
    assert shapes["double_blocks.18.txt_attn.qkv.weight"] == (9216, 3072)
    assert shapes["double_blocks.0.img_attn.norm.query_norm.scale"] == (128,)
    assert shapes["double_blocks.0.txt_mlp.0.weight"] == (12288, 3072)
    assert shapes["double_blocks.0.txt_mlp.2.weight"] == (3072, 12288)
    assert shapes["single_blocks.37.linear1.weight"] == (21504, 3072)
    assert shapes["single_blocks.0.linear2.weight"] == (3072, 15360)
    assert shapes["single_blocks.0.modulation.lin.weight"] == (9216, 3072)
    assert shapes["final_layer.adaLN_modulation.1.weight"] == (6144, 3072)
    assert "guidance_in.in_layer.bias" in shapes and "single_blocks.38.linear1.weight" not in shapes
    assert isinstance(model.double_blocks[0], DoubleStreamBlock) and isinstance(model.single_blocks[0], SingleStreamBlock)
    # performance.md §1a, by hand: one double block, one single block, embedders + final layer
    h, m = 3072, 12288
    stream = (h * 6 * h + 6 * h) + (h * 3 * h + 3 * h) + (h * h + h) + (h * m + m) + (m * h + h) + 2 * 128
    single = (h * (3 * h + m) + 3 * h + m) + ((h + m) * h + h) + (h * 3 * h + 3 * h) + 2 * 128
    embed = 3 * (256 * h + h + h * h + h) - (256 * h + h) + (768 * h + h) + (4096 * h + h) + (64 * h + h)
    final = (h * 64 + 64) + (h * 2 * h + 2 * h)
    total = sum(v.numel() for v in model.state_dict().values())
    assert total == 19 * 2 * stream + 38 * single + embed + final
    assert round(total / 1e9, 3) == 11.901


@pytest.mark.parametrize("params", [
    FluxParams.dev(),
    FluxParams.schnell(),
    FluxParams(hidden_size=64, num_heads=2, depth=2, depth_single_blocks=2, axes_dim=(4, 14, 14), vec_in_dim=32,
               context_in_dim=48),
    FluxParams(depth=3, depth_single_blocks=0, guidance_embed=False),  # pruned
    FluxParams(hidden_size=96, num_heads=3, depth=0, depth_single_blocks=4, axes_dim=(8, 12, 12), mlp_ratio=2.0),
])
def test_params_recovered_from_shapes(params: FluxParams) -> None:
    shapes = {k: tuple(v.shape) for k, v in _meta_model(params).state_dict().items()}
    recovered = FluxParams.from_shapes(shapes)
    assert recovered.axes_dim == axes_dim_for(params.head_dim)
    assert recovered == replace(params, axes_dim=axes_dim_for(params.head_dim))
    assert recovered.variant == ("dev" if "guidance_in.in_layer.weight" in shapes else "schnell")


def test_bad_params_rejected() -> None:
    with pytest.raises(ValueError, match="divisible"):
        FluxParams(hidden_size=100, num_heads=3)
    with pytest.raises(ValueError, match="axes_dim"):
        FluxParams(axes_dim=(16, 56, 50))
