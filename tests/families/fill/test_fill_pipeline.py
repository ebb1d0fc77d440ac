"""FLUX.1 Fill images: our sampler with an image and a mask equals diffusers' FluxFillPipeline given the same σ and
noise (the masked image encoded to its mean by both: BFL's and diffusers' own Fill code draw a latent sample)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fluxlora import flow
from fluxlora.errors import ConfigError
from fluxlora.families import family_named
from fluxlora.inference.control_images import prompt_conditioning
from fluxlora.inference.prompts import SamplePrompt
from fluxlora.inference.sampler import decode_latents, denoise, encode_texts

H, W = 32, 48


def image_and_mask(folder: Path) -> tuple[Path, Path]:
    y, x = np.mgrid[0:H, 0:W]
    pixels = np.stack([x * 255 / W, y * 255 / H, 128 + 100 * np.sin(x / 5.0)], axis=-1)
    Image.fromarray(np.rint(pixels).astype(np.uint8)).save(folder / "image.png")
    mask = np.zeros((H, W), np.uint8)
    mask[8:24, 16:40] = 255
    Image.fromarray(mask, "L").save(folder / "mask.png")
    return folder / "image.png", folder / "mask.png"


def test_image_with_a_mask_matches_flux_fill_pipeline(helpers, family_models, tmp_path, monkeypatch) -> None:
    import diffusers.pipelines.flux.pipeline_flux_fill as fill_module
    from diffusers import FluxFillPipeline

    m = family_models
    family = family_named("fill")
    info = family.inspect(Path(m.families.fill), flag="")
    model = family.load_transformer(info, dtype=torch.float32, device="cpu").eval()
    text = helpers.flux_text_encoders(family, m)
    image, mask = image_and_mask(tmp_path)
    prompt = SamplePrompt("a window", width=W, height=H, seed=2, steps=3, guidance=30.0, control_image=str(image),
                          mask_image=str(mask))
    cond = encode_texts(lambda t: text.encode(list(t)), [prompt.prompt])[prompt.prompt]
    images = prompt_conditioning(prompt, family.control_kind, m.ae, title=info.title)
    noise = family.initial_noise(prompt.seed, H, W)
    sigmas = family.sample_sigmas(info, prompt.steps, (H // 16) * (W // 16))
    with torch.no_grad():
        ours = ((decode_latents(m.ae, denoise(family, model, noise, sigmas, {**cond, **images},
                                              guidance=prompt.guidance)) + 1) / 2)[0].permute(1, 2, 0).numpy()

    original = fill_module.retrieve_latents
    monkeypatch.setattr(fill_module, "retrieve_latents",
                        lambda output, generator=None, sample_mode="sample": original(output, sample_mode="argmax"))
    pipe = FluxFillPipeline(transformer=helpers.diffusers_flux_from(model), **helpers.pipeline_components(m))
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        out = pipe(prompt=prompt.prompt, image=Image.open(image), mask_image=Image.open(mask), height=H, width=W,
                   num_inference_steps=prompt.steps, sigmas=sigmas[:-1].tolist(), guidance_scale=prompt.guidance,
                   latents=flow.pack_latents(noise), max_sequence_length=32, output_type="np").images[0]
    assert out.shape == ours.shape == (H, W, 3) and out.std() > 0.05
    assert np.abs(ours - out).max() <= 1e-4


def test_fill_prompts_need_an_image_and_a_mask(family_models, tmp_path) -> None:
    image, mask = image_and_mask(tmp_path)
    family, kontext = family_named("fill"), family_named("kontext")
    with pytest.raises(ConfigError, match=r"paints into an image: give the image with --ci PATH and the mask"):
        prompt_conditioning(SamplePrompt("x", control_image=str(image)), family.control_kind, family_models.ae,
                            title="FLUX.1 Fill [dev]")
    with pytest.raises(ConfigError, match=r"--mi is for FLUX.1 Fill"):
        prompt_conditioning(SamplePrompt("x", control_image=str(image), mask_image=str(mask)), kontext.control_kind,
                            family_models.ae, title="FLUX.1 Kontext [dev]")
    with pytest.raises(ConfigError, match=r"--ci given, but FLUX.1-dev reads no control image"):
        prompt_conditioning(SamplePrompt("x", control_image=str(image)), None, family_models.ae, title="FLUX.1-dev")
