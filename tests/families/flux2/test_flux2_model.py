"""The FLUX.2 transformer equals diffusers' Flux2Transformer2DModel (same weights through our key map)."""

from __future__ import annotations

import pytest
import torch
from diffusers import Flux2Transformer2DModel

from fluxlora.errors import CheckpointError
from fluxlora.families.flux2 import latents
from fluxlora.families.flux2.keys import bfl_to_diffusers, diffusers_to_bfl
from fluxlora.families.flux2.model import Flux2
from fluxlora.families.flux2.params import ARCHITECTURES, Flux2Params, axes_dim_for
from fluxlora.families.flux2.tiny import random_flux2, small_flux2_params
from fluxlora.models.checkpoints import module_shapes


def _oracle(params: Flux2Params, model: Flux2) -> Flux2Transformer2DModel:
    ref = Flux2Transformer2DModel(
        in_channels=params.in_channels, num_layers=params.depth, num_single_layers=params.depth_single_blocks,
        attention_head_dim=params.head_dim, num_attention_heads=params.num_heads,
        joint_attention_dim=params.context_in_dim, axes_dims_rope=params.axes_dim, rope_theta=params.theta,
        mlp_ratio=params.mlp_ratio, guidance_embeds=params.guidance_embed).eval()
    ref.load_state_dict(bfl_to_diffusers(model.state_dict()), strict=True)
    return ref


@pytest.mark.parametrize("guidance", [True, False], ids=["dev-guidance", "klein-no-guidance"])
def test_matches_diffusers_with_reference_tokens(guidance):
    params = small_flux2_params(guidance=guidance)
    model = random_flux2(params, seed=3)
    ref = _oracle(params, model)
    g = torch.Generator().manual_seed(0)
    img = torch.randn(2, 12, 16, generator=g)
    ref_lat = torch.randn(2, 16, 2, 2, generator=g)
    ref_tokens, ref_ids = latents.reference_tokens([ref_lat])
    x = torch.cat([img, ref_tokens], dim=1)
    ids = torch.cat([latents.image_ids(3, 4, batch=2), ref_ids], dim=1)
    txt, txt_ids = torch.randn(2, 5, 24, generator=g), latents.text_ids(5, batch=2)
    t, gs = torch.rand(2, generator=g), torch.tensor([4.0, 2.5])
    with torch.no_grad():
        ours = model(x, ids, txt, txt_ids, t, gs if guidance else None)
        theirs = ref(hidden_states=x, encoder_hidden_states=txt, timestep=t, img_ids=ids[0], txt_ids=txt_ids[0],
                     guidance=gs if guidance else None, return_dict=False)[0]
    assert ours.shape == (2, 16, 16)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert ours.abs().max() > 0.1  # not a degenerate all-zero comparison


def test_reference_ids_use_bfl_time_offsets():
    _, ids = latents.reference_tokens([torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 1, 3)])
    assert ids[0, :4, 0].tolist() == [10.0] * 4 and ids[0, 4:, 0].tolist() == [20.0] * 3
    assert ids[0, 4:, 2].tolist() == [0.0, 1.0, 2.0]


def test_dev_requires_guidance():
    model = random_flux2(small_flux2_params(guidance=True))
    with pytest.raises(ValueError, match="guidance"):
        model(torch.zeros(1, 4, 16), latents.image_ids(2, 2), torch.zeros(1, 3, 24), latents.text_ids(3),
              torch.zeros(1))


def test_key_maps_are_inverse_and_cover_every_parameter():
    state = random_flux2(small_flux2_params(guidance=True)).state_dict()
    diff = bfl_to_diffusers(state)
    back = diffusers_to_bfl(diff)
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
    with pytest.raises(CheckpointError, match="vector_in"):
        bfl_to_diffusers({"vector_in.in_layer.weight": torch.zeros(2, 2)})


@pytest.mark.parametrize("name", ["dev", "klein-4b", "klein-9b"])
def test_real_shapes_name_their_architecture(name):
    with torch.device("meta"):
        model = Flux2(ARCHITECTURES[name])
    assert Flux2Params.from_shapes(module_shapes(model)) == ARCHITECTURES[name]
    assert Flux2Params.from_shapes(module_shapes(model)).architecture == name


def test_axes_split_needs_four_even_quarters():
    assert axes_dim_for(128) == (32, 32, 32, 32)
    with pytest.raises(ValueError, match="multiple of 8"):
        axes_dim_for(36)
