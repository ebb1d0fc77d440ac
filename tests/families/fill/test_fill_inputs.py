"""Fill input: our 384-channel FLUX.1 fed (noisy ‖ masked latents ‖ packed mask) equals FluxTransformer2DModel fed
as FluxFillPipeline builds it."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from diffusers import FluxFillPipeline

from fluxlora.families.fill.inputs import (
    fill_conditioning,
    fill_input,
    pack,
    pack_mask,
)
from fluxlora.families.tiny import random_model, tiny_fill_params
from fluxlora.models.flux import Flux, FluxParams


def pipeline_conditioning(masked_latents: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """FluxFillPipeline.prepare_mask_latents itself (masked image given as latents; shift 0, scale 1)."""
    batch, channels, h, w = masked_latents.shape
    fake = SimpleNamespace(vae_scale_factor=8, vae=SimpleNamespace(config=SimpleNamespace(shift_factor=0.0,
                                                                                          scaling_factor=1.0)),
                           _pack_latents=FluxFillPipeline._pack_latents)
    packed_mask, packed_latents = FluxFillPipeline.prepare_mask_latents(
        fake, mask, masked_latents, batch, channels, 1, 8 * h, 8 * w, torch.float32, torch.device("cpu"), None)
    return torch.cat((packed_latents, packed_mask), dim=-1)


def random_mask(batch: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    mask = torch.zeros(batch, 1, height, width)
    for i in range(batch):
        top, left = (int(torch.randint(0, s // 2, (1,), generator=generator)) for s in (height, width))
        mask[i, :, top : top + height // 2 + 3, left : left + width // 3] = 1.0
    return mask


def compare(flux: Flux, theirs, *, grid=(6, 8), batch=2, txt_len=5, seed=0) -> float:
    p = flux.params
    g = torch.Generator().manual_seed(seed)
    h, w = grid
    noisy = torch.randn(batch, 16, h, w, generator=g)
    masked_latents = torch.randn(batch, 16, h, w, generator=g)
    mask = random_mask(batch, 8 * h, 8 * w, g)
    txt, y = torch.randn(batch, txt_len, p.context_in_dim, generator=g), torch.randn(batch, p.vec_in_dim, generator=g)
    t, guidance = torch.tensor([0.8, 0.3])[:batch], torch.full((batch,), 30.0)
    ids = torch.zeros(h // 2 * (w // 2), 3)
    ids[:, 1], ids[:, 2] = torch.arange(ids.shape[0]) // (w // 2), torch.arange(ids.shape[0]) % (w // 2)
    cond = fill_conditioning(masked_latents, mask)
    assert torch.equal(cond, pipeline_conditioning(masked_latents, mask))
    with torch.no_grad():
        latents = FluxFillPipeline._pack_latents(noisy, batch, 16, h, w)
        expected = theirs(hidden_states=torch.cat((latents, pipeline_conditioning(masked_latents, mask)), dim=2),
                          encoder_hidden_states=txt, pooled_projections=y, timestep=t, img_ids=ids,
                          txt_ids=torch.zeros(txt_len, 3), guidance=guidance, return_dict=False)[0]
        got = flux(fill_input(pack(noisy), cond), ids[None].expand(batch, -1, -1), txt, torch.zeros(batch, txt_len, 3),
                   t, y, guidance)
        other_mask = flux(fill_input(pack(noisy), fill_conditioning(masked_latents, 1 - mask)),
                          ids[None].expand(batch, -1, -1), txt, torch.zeros(batch, txt_len, 3), t, y, guidance)
    assert got.shape == (batch, h // 2 * (w // 2), 64) and expected.abs().max() > 0.1
    assert (got - other_mask).abs().max() > 1e-2  # the mask really takes part
    return float((got - expected).abs().max())


def test_mask_packing_by_hand() -> None:
    mask = torch.zeros(1, 1, 16, 32)
    mask[0, 0, 3, 21] = 1.0  # latent pixel (0, 2) → token 1 (its left column, top row), patch position (3, 5)
    packed = pack_mask(mask)
    assert packed.shape == (1, 2, 256)
    channel = ((3 * 8 + 5) * 2 + 0) * 2 + 0  # (ph·8 + pw) mask channel, then 2×2 packing (c·4 + py·2 + px)
    assert packed[0, 1, channel] == 1 and packed.sum() == 1
    with pytest.raises(ValueError, match="multiples of 16"):
        pack_mask(torch.zeros(1, 1, 8, 16))


def test_matches_diffusers_fill_feed_tiny(diffusers_flux) -> None:
    flux = random_model(Flux, tiny_fill_params(), torch.Generator().manual_seed(3))
    assert compare(flux, diffusers_flux(flux)) <= 1e-5


@pytest.mark.slow
def test_matches_diffusers_fill_feed_full_width(diffusers_flux) -> None:
    params = replace(FluxParams(depth=1, depth_single_blocks=1), in_channels=384, out_channels=64)
    flux = random_model(Flux, params, torch.Generator().manual_seed(0))
    assert compare(flux, diffusers_flux(flux), grid=(4, 4), batch=1, txt_len=4) <= 1e-5
