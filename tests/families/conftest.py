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
tiny_pairs = _training.tiny_pairs
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


def write_images(folder, *, count: int = 4, size: int = 64, seed: int = 0, caption: str = "a photo of sks red square"):
    """`count` noisy images with a red square and a caption each (tests/training's dataset, for the families)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        pixels = (rng.random((size, size, 3)) * 255).astype("uint8")
        pixels[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = (230, 20, 20)
        Image.fromarray(pixels).save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(caption, encoding="utf-8")
    return folder


def smooth_images(folder, count: int, *, seed: int = 0, size: int = 64):
    """`count` smooth colour patterns (PNG), as uint8 arrays too: a learnable edit needs structure, not noise."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = []
    for i in range(count):
        y, x = np.mgrid[0:size, 0:size]
        a = np.stack([127 + 120 * np.sin(x * rng.uniform(0.05, 0.2) + rng.uniform(0, 6)),
                      127 + 120 * np.sin(y * rng.uniform(0.05, 0.2) + rng.uniform(0, 6)),
                      np.full((size, size), rng.uniform(0, 255))], -1)
        arrays.append(np.clip(a, 0, 255).astype(np.uint8))
        Image.fromarray(arrays[-1]).save(folder / f"{i:02d}.png")
    return arrays


def paired_task_loss(family_name: str, model_file, m, images, *, caption: str, extra: dict, lora=None) -> float:
    """The flow-matching loss of `family_name` on the images (folder) at fixed σ and noise, with the image
    conditioning `extra(ae)` gives and optionally a LoRA applied: the measure a paired task's training lowers."""
    import contextlib

    from fluxlora.data.buckets import to_pixels
    from fluxlora.data.images import load_image
    from fluxlora.families import family_named
    from fluxlora.inference.generate import read_lora_network

    family = family_named(family_name)
    info = family.inspect(model_file, flag="")
    model = family.load_transformer(info, dtype=torch.float32, device="cpu").eval()
    if lora is not None:
        read_lora_network(lora, 1.0, model, [None, None]).apply_to()
    paths = sorted(images.glob("*.png"))
    with torch.no_grad():
        x0 = m.ae.encode(torch.stack([to_pixels(load_image(p).rgb) for p in paths])).float()
    cond = {**flux_text_encoders(family, m, 16).encode([caption] * len(paths)), **extra}
    generator, total = torch.Generator().manual_seed(0), 0.0
    with torch.no_grad():
        for sigma in (0.25, 0.5, 0.75):
            noise = torch.randn(x0.shape, generator=generator)
            x_t = (1 - sigma) * x0 + sigma * noise
            pred = family.predict(model, x_t, torch.full((len(paths),), sigma), cond, guidance=1.0, mask_text=False,
                                  compute_dtype=torch.float32, autocast=contextlib.nullcontext)
            total += float(((pred - (noise - x0)) ** 2).mean())
    return total / 3


@pytest.fixture(scope="session")
def helpers():
    """This file's helper functions (test modules cannot import a conftest by name: several share it)."""
    from types import SimpleNamespace

    return SimpleNamespace(
        diffusers_flux_from=diffusers_flux_from, diffusers_vae=diffusers_vae, identity_scheduler=identity_scheduler,
        flux_text_encoders=flux_text_encoders, pipeline_components=pipeline_components, write_images=write_images,
        smooth_images=smooth_images, paired_task_loss=paired_task_loss)
