"""FLUX.1 Kontext images: our sampler with a reference image equals diffusers' FluxKontextPipeline given the same σ
and noise (the reference at the output size, so neither side resizes it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fluxlora import flow
from fluxlora.families import family_named
from fluxlora.inference.control_images import prompt_conditioning
from fluxlora.inference.prompts import SamplePrompt
from fluxlora.inference.sampler import decode_latents, denoise, encode_texts

H, W = 32, 48


def reference_image(path: Path) -> Path:
    y, x = np.mgrid[0:H, 0:W]
    pixels = np.stack([x * 255 / W, y * 255 / H, 128 + 100 * np.sin(x / 5.0)], axis=-1)
    Image.fromarray(np.rint(pixels).astype(np.uint8)).save(path)
    return path


def test_image_with_a_reference_matches_flux_kontext_pipeline(helpers, family_models, tmp_path) -> None:
    from diffusers import FluxKontextPipeline

    m = family_models
    family = family_named("kontext")
    info = family.inspect(Path(m.families.kontext), flag="")
    model = family.load_transformer(info, dtype=torch.float32, device="cpu").eval()
    text = helpers.flux_text_encoders(family, m)
    prompt = SamplePrompt("make it red", width=W, height=H, seed=5, steps=3, guidance=2.5,
                          control_image=str(reference_image(tmp_path / "ref.png")))
    cond = encode_texts(lambda t: text.encode(list(t)), [prompt.prompt])[prompt.prompt]
    images = prompt_conditioning(prompt, family.control_kind, m.ae, title=info.title)
    noise = family.initial_noise(prompt.seed, H, W)
    sigmas = family.sample_sigmas(info, prompt.steps, (H // 16) * (W // 16))
    with torch.no_grad():
        latents = denoise(family, model, noise, sigmas, {**cond, **images}, guidance=prompt.guidance)
        ours = ((decode_latents(m.ae, latents) + 1) / 2)[0].permute(1, 2, 0).numpy()
        plain = denoise(family, model, noise, sigmas, cond, guidance=prompt.guidance)
    assert (latents - plain).abs().max() > 1e-2  # the reference really takes part

    pipe = FluxKontextPipeline(transformer=helpers.diffusers_flux_from(model), **helpers.pipeline_components(m))
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        out = pipe(image=Image.open(prompt.control_image), prompt=prompt.prompt, height=H, width=W,
                   num_inference_steps=prompt.steps, sigmas=sigmas[:-1].tolist(), guidance_scale=prompt.guidance,
                   latents=flow.pack_latents(noise), max_sequence_length=32, _auto_resize=False, max_area=H * W,
                   output_type="np").images[0]
    assert out.shape == ours.shape == (H, W, 3) and out.std() > 0.05
    assert np.abs(ours - out).max() <= 1e-4
