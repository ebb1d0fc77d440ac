"""Fixtures for the family tests: diffusers' FluxTransformer2DModel holding our FLUX weights (the oracle); the
dataset and command-line fixtures of tests/training (the family tests train through the same command line)."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from fluxlora.models.diffusers_keys import bfl_to_diffusers
from fluxlora.models.flux import Flux

_spec = importlib.util.spec_from_file_location("training_fixtures", Path(__file__).parents[1] / "training" / "conftest.py")
_training = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_training)

tiny_dataset = _training.tiny_dataset
train_argv = _training.train_argv

def diffusers_flux_from(flux: Flux):
    """A diffusers FluxTransformer2DModel with `flux`'s weights (shared storage where the key map slices)."""
    from diffusers import FluxTransformer2DModel

    p = flux.params
    with torch.device("meta"):
        model = FluxTransformer2DModel(
            patch_size=1, in_channels=p.in_channels, out_channels=p.out_channels, num_layers=p.depth,
            num_single_layers=p.depth_single_blocks, attention_head_dim=p.head_dim, num_attention_heads=p.num_heads,
            joint_attention_dim=p.context_in_dim, pooled_projection_dim=p.vec_in_dim,
            guidance_embeds=p.guidance_embed, axes_dims_rope=p.axes_dim)
    model.load_state_dict(bfl_to_diffusers(flux.state_dict()), strict=True, assign=True)
    return model.eval()


@pytest.fixture(scope="session")
def diffusers_flux() -> Callable[[Flux], object]:
    return diffusers_flux_from


def diffusers_vae(ae):
    """diffusers' AutoencoderKL holding our AE's weights (its own LDM converter)."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    a = ae.params
    n = len(a.ch_mult)
    config = dict(
        in_channels=a.in_channels, out_channels=a.out_ch, down_block_types=["DownEncoderBlock2D"] * n,
        up_block_types=["UpDecoderBlock2D"] * n, block_out_channels=[a.ch * m for m in a.ch_mult],
        layers_per_block=a.num_res_blocks, latent_channels=a.z_channels, norm_num_groups=32,
        sample_size=a.resolution, scaling_factor=a.scale_factor, shift_factor=a.shift_factor,
        use_quant_conv=False, use_post_quant_conv=False)
    vae = AutoencoderKL(**config)
    vae.load_state_dict(convert_ldm_vae_checkpoint(ae.state_dict(), config), strict=True)
    return vae.eval()


def identity_scheduler():
    """The flow-matching Euler scheduler with no shift of its own: we hand it our (already shifted) σ."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=False, shift=1.0)


@pytest.fixture(scope="session")
def family_models(tiny_ckpts, tiny_family_ckpts):
    """The tiny AE, CLIP-L, T5 and tokenizers, read-only (fp32)."""
    from types import SimpleNamespace

    from fluxlora.models.autoencoder import load_ae
    from fluxlora.models.text_encoders import load_clip_l, load_t5xxl
    from fluxlora.models.tokenizers import load_tokenizers

    return SimpleNamespace(ae=load_ae(tiny_ckpts.ae, dtype=torch.float32).eval(),
                           clip=load_clip_l(tiny_ckpts.clip_l, dtype=torch.float32).eval(),
                           t5=load_t5xxl(tiny_ckpts.t5xxl, dtype=torch.float32).eval(),
                           tokenizers=load_tokenizers(), ckpts=tiny_ckpts, families=tiny_family_ckpts)


def flux_text_encoders(family, m, length: int = 32):
    """The family's CLIP-L + T5 text encoders on the tiny files (fp32, T5 unmasked as FLUX.1's default)."""
    import contextlib
    from pathlib import Path

    return family.load_text_encoders({"clip_l": Path(m.ckpts.clip_l), "t5xxl": Path(m.ckpts.t5xxl)},
                                     dtype=torch.float32, keep_fp8=False, device="cpu", tokenizer_dir=None,
                                     max_length=length, mask_padding=False, autocast=contextlib.nullcontext)


def pipeline_components(m) -> dict:
    """The text encoders, tokenizers, VAE and scheduler of a diffusers FLUX pipeline, holding the tiny weights."""
    return dict(scheduler=identity_scheduler(), vae=diffusers_vae(m.ae), text_encoder=m.clip,
                tokenizer=m.tokenizers.clip, text_encoder_2=m.t5, tokenizer_2=m.tokenizers.t5)
