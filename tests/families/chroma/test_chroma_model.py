"""Chroma transformer: parity with diffusers' ChromaTransformer2DModel (tiny and width 3072), masks, parameters."""

from __future__ import annotations

import pytest
import torch
from diffusers import ChromaTransformer2DModel

from fluxlora.families.chroma.conditioning import chroma_text_mask
from fluxlora.families.chroma.diffusers_keys import bfl_to_diffusers
from fluxlora.families.chroma.model import Chroma, ChromaParams, approximator_input
from fluxlora.families.tiny import random_model

SMALL = ChromaParams(in_channels=64, context_in_dim=48, hidden_size=64, num_heads=2, depth=2, depth_single_blocks=2,
                     axes_dim=(4, 14, 14), approximator_depth=3, approximator_hidden_size=96)


def diffusers_chroma(p: ChromaParams) -> ChromaTransformer2DModel:
    model = ChromaTransformer2DModel(
        patch_size=1, in_channels=p.in_channels, num_layers=p.depth, num_single_layers=p.depth_single_blocks,
        attention_head_dim=p.head_dim, num_attention_heads=p.num_heads, joint_attention_dim=p.context_in_dim,
        axes_dims_rope=p.axes_dim, approximator_num_channels=p.approximator_in_dim,
        approximator_hidden_dim=p.approximator_hidden_size, approximator_layers=p.approximator_depth)
    return model


def align_rmsnorm_eps(model: ChromaTransformer2DModel) -> None:
    # diffusers builds the approximator's norms as nn.RMSNorm(dim) (eps = float32 machine epsilon); the model was
    # trained with BFL's RMSNorm (eps 1e-6), as sd-scripts, ComfyUI and lodestone-rock/flow run it, and as we do.
    for norm in model.distilled_guidance_layer.norms:
        norm.eps = 1e-6


def inputs(p: ChromaParams, batch: int = 2, grid: tuple[int, int] = (3, 4), txt_len: int = 7, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    h, w = grid
    ids = torch.zeros(h * w, 3)
    ids[:, 1] = torch.arange(h * w) // w
    ids[:, 2] = torch.arange(h * w) % w
    return {"img": torch.randn(batch, h * w, p.in_channels, generator=g), "img_ids": ids,
            "txt": torch.randn(batch, txt_len, p.context_in_dim, generator=g), "timesteps": torch.rand(batch, generator=g)}


def ours_forward(model: Chroma, x: dict, mask: torch.Tensor | None = None) -> torch.Tensor:
    b, n, t = x["img"].shape[0], x["img"].shape[1], x["txt"].shape[1]
    return model(x["img"], x["img_ids"][None].expand(b, n, 3), x["txt"], torch.zeros(b, t, 3), x["timesteps"],
                 txt_mask=mask)


def theirs_forward(model: ChromaTransformer2DModel, x: dict, mask: torch.Tensor | None = None) -> torch.Tensor:
    # A bool mask over [text ‖ image] keys, as ChromaPipeline should build it (its own float mask is additive and
    # masks nothing, diffusers#13619).
    full = None
    if mask is not None:
        full = torch.cat([mask, torch.ones(mask.shape[0], x["img"].shape[1], dtype=torch.bool)], dim=1)
    return model(hidden_states=x["img"], encoder_hidden_states=x["txt"], timestep=x["timesteps"],
                 img_ids=x["img_ids"], txt_ids=torch.zeros(x["txt"].shape[1], 3), attention_mask=full,
                 return_dict=False)[0]


@torch.no_grad()
def test_forward_matches_diffusers_tiny() -> None:
    ours = random_model(Chroma, SMALL, torch.Generator().manual_seed(3))
    theirs = diffusers_chroma(SMALL)
    theirs.load_state_dict(bfl_to_diffusers(ours.state_dict()), strict=True)
    theirs.eval()
    x = inputs(SMALL)
    x["timesteps"] = torch.tensor([0.7, 0.05])
    t5_mask = torch.ones(2, 7, dtype=torch.bool)
    t5_mask[1, 3:] = False
    mask = chroma_text_mask(t5_mask)
    before = theirs_forward(theirs, x, mask)
    align_rmsnorm_eps(theirs)
    for m in (None, mask):
        expected = theirs_forward(theirs, x, m)
        got = ours_forward(ours, x, m)
        assert got.shape == x["img"].shape
        assert expected.abs().max() > 0.1
        assert (got - expected).abs().max() <= 1e-5
    # The eps difference alone is small but real (so the alignment above is what makes the match exact).
    assert 0 < (before - theirs_forward(theirs, x, mask)).abs().max() < 1e-3


@pytest.mark.slow
@torch.no_grad()
def test_forward_matches_diffusers_full_width() -> None:
    """Width 3072 (24 heads × 128, axes 16/56/56), 1 double + 1 single block, the real 5 × 5120 approximator, and
    diffusers' own single-file converter agreeing with our key map."""
    from diffusers.loaders.single_file_utils import convert_chroma_transformer_checkpoint_to_diffusers
    from diffusers.models.transformers.transformer_chroma import ChromaCombinedTimestepTextProjEmbeddings

    p = ChromaParams(depth=1, depth_single_blocks=1)
    ours = random_model(Chroma, p, torch.Generator().manual_seed(0))
    state = ours.state_dict()
    converted = bfl_to_diffusers(state)
    reference = convert_chroma_transformer_checkpoint_to_diffusers(dict(state))
    assert set(converted) == set(reference)
    assert all(torch.equal(converted[k], reference[k]) for k in reference)
    del reference
    with torch.device("meta"):
        theirs = diffusers_chroma(p)
    theirs.load_state_dict(converted, strict=True, assign=True)
    # its index-embedding table is a non-persistent buffer: rebuild it off the meta device
    theirs.time_text_embed = ChromaCombinedTimestepTextProjEmbeddings(p.approximator_in_dim // 4, p.mod_index_length)
    theirs.eval()
    align_rmsnorm_eps(theirs)
    x = inputs(p, batch=1, grid=(4, 4), txt_len=8)
    mask = chroma_text_mask(torch.tensor([[True] * 5 + [False] * 3]))
    assert (ours_forward(ours, x, mask) - theirs_forward(theirs, x, mask)).abs().max() <= 1e-5


def test_approximator_input_layout() -> None:
    # [emb(σ, 16) ‖ emb(guidance, 16) ‖ emb(index, 32)] per vector index, as lodestone-rock/flow and diffusers.
    from fluxlora.models.flux_layers import timestep_embedding

    t, g = torch.tensor([0.25, 0.9]), torch.tensor([0.0, 2.0])
    x = approximator_input(t, g, SMALL)
    assert x.shape == (2, SMALL.mod_index_length, 64) and x.dtype == torch.float32
    assert SMALL.mod_index_length == 3 * 2 + 12 * 2 + 2
    assert torch.equal(x[1, 5, :16], timestep_embedding(t, 16)[1])
    assert torch.equal(x[1, 5, 16:32], timestep_embedding(g, 16)[1])
    assert torch.equal(x[0, 5, 32:], timestep_embedding(torch.tensor([5.0]), 32)[0])
    assert ChromaParams().mod_index_length == 344  # the full model: 38 single + 19 double blocks


@torch.no_grad()
def test_padded_text_is_ignored_and_one_padding_token_is_attended() -> None:
    model = random_model(Chroma, SMALL, torch.Generator().manual_seed(5))
    x = inputs(SMALL, txt_len=8)
    t5_mask = torch.zeros(2, 8, dtype=torch.bool)
    t5_mask[0, :5] = True
    t5_mask[1, :2] = True
    mask = chroma_text_mask(t5_mask)
    assert mask.sum(1).tolist() == [6, 3]
    assert chroma_text_mask(torch.ones(1, 4, dtype=torch.bool)).all()  # no room for padding: stays within L
    changed = x["txt"].clone()
    changed[~mask] = torch.randn(int((~mask).sum()), SMALL.context_in_dim) * 10
    base = ours_forward(model, x, mask)
    assert (ours_forward(model, {**x, "txt": changed}, mask) - base).abs().max() <= 1e-6
    # the first padding token does take part
    changed[0, 5] += 10
    assert (ours_forward(model, {**x, "txt": changed}, mask) - base).abs().max() > 1e-3


def test_guidance_none_is_zero() -> None:
    model = random_model(Chroma, SMALL, torch.Generator().manual_seed(2))
    x = inputs(SMALL)
    b, n = x["img"].shape[:2]
    args = (x["img"], x["img_ids"][None].expand(b, n, 3), x["txt"], torch.zeros(b, 7, 3), x["timesteps"])
    with torch.no_grad():
        assert torch.equal(model(*args), model(*args, guidance=torch.zeros(b)))
        assert not torch.allclose(model(*args), model(*args, guidance=torch.full((b,), 4.0)))


def test_full_size_layout_and_from_shapes() -> None:
    with torch.device("meta"):
        model = Chroma(ChromaParams())
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["distilled_guidance_layer.in_proj.weight"] == (5120, 64)
    assert shapes["distilled_guidance_layer.layers.4.out_layer.weight"] == (5120, 5120)
    assert shapes["distilled_guidance_layer.norms.4.scale"] == (5120,)
    assert shapes["distilled_guidance_layer.out_proj.weight"] == (3072, 5120)
    assert shapes["final_layer.linear.weight"] == (64, 3072)
    assert not any(".img_mod." in k or ".txt_mod." in k or ".modulation." in k or "adaLN" in k for k in shapes)
    assert not any(k.startswith(("vector_in.", "guidance_in.", "time_in.")) for k in shapes)
    assert ChromaParams.from_shapes(shapes) == ChromaParams()
    # Chroma1-HD: 8.9 B parameters
    assert 8.85e9 < sum(v.numel() for v in model.state_dict().values()) < 8.95e9


def test_gradients_reach_the_blocks_and_approximator() -> None:
    model = random_model(Chroma, SMALL, torch.Generator().manual_seed(4)).train()
    x = inputs(SMALL)
    ours_forward(model, x).square().mean().backward()
    for name in ("double_blocks.0.img_attn.qkv.weight", "single_blocks.1.linear1.weight",
                 "distilled_guidance_layer.layers.0.in_layer.weight", "final_layer.linear.weight"):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().max() > 0, name


def test_fp8_storage_keeps_the_approximator_in_the_weight_dtype() -> None:
    from fluxlora.families import family_named
    from fluxlora.models.fp8 import store_linears_in_fp8

    model = random_model(Chroma, SMALL, torch.Generator().manual_seed(6))
    count = store_linears_in_fp8(model, keep=family_named("chroma").fp8_keep)
    assert model.double_blocks[0].img_attn.qkv.weight.dtype == torch.float8_e4m3fn
    assert model.final_layer.linear.weight.dtype == torch.float8_e4m3fn
    approximator = [m for m in model.distilled_guidance_layer.modules() if isinstance(m, torch.nn.Linear)]
    assert all(m.weight.dtype == torch.float32 for m in approximator)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert count == len(linears) - len(approximator)
    x = inputs(SMALL)
    with torch.no_grad():
        assert torch.isfinite(ours_forward(model, x)).all()
