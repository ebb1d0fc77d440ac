"""Chroma images: our sampler (true CFG with a negative prompt) equals diffusers' ChromaPipeline given the same σ
and noise; and the Chroma family's text conditioning (T5 only, masked, one padding token attended)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch

from fluxlora import flow
from fluxlora.families import family_named
from fluxlora.families.chroma.diffusers_keys import bfl_to_diffusers
from fluxlora.inference.sampler import decode_latents, denoise, encode_texts

H, W = 32, 48


def chroma_pipeline(helpers, model, m):
    from diffusers import ChromaPipeline, ChromaTransformer2DModel

    p = model.params
    transformer = ChromaTransformer2DModel(
        in_channels=p.in_channels, num_layers=p.depth, num_single_layers=p.depth_single_blocks,
        attention_head_dim=p.head_dim, num_attention_heads=p.num_heads, joint_attention_dim=p.context_in_dim,
        axes_dims_rope=p.axes_dim, approximator_num_channels=p.approximator_in_dim,
        approximator_hidden_dim=p.approximator_hidden_size, approximator_layers=p.approximator_depth)
    transformer.load_state_dict(bfl_to_diffusers(model.state_dict()), strict=True)
    for norm in transformer.distilled_guidance_layer.norms:  # BFL's RMSNorm eps (see test_chroma_model)
        norm.eps = 1e-6
    pipe = ChromaPipeline(scheduler=helpers.identity_scheduler(), vae=helpers.diffusers_vae(m.ae), text_encoder=m.t5,
                          tokenizer=m.tokenizers.t5, transformer=transformer.eval())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_image_with_true_cfg_matches_chroma_pipeline(helpers, family_models) -> None:
    m = family_models
    family = family_named("chroma")
    info = family.inspect(Path(m.families.chroma), flag="")
    model = family.load_transformer(info, dtype=torch.float32, device="cpu").eval()
    text = family.load_text_encoders({"t5xxl": Path(m.ckpts.t5xxl)}, dtype=torch.float32, keep_fp8=False,
                                     device="cpu", tokenizer_dir=None, max_length=32, mask_padding=False,
                                     autocast=contextlib.nullcontext)
    prompt, negative, seed, steps, cfg = "a red house by the sea", "blurry", 3, 3, 3.0
    cond = encode_texts(lambda t: text.encode(list(t)), [prompt, negative])
    noise = family.initial_noise(seed, H, W)
    sigmas = family.sample_sigmas(info, steps, (H // 16) * (W // 16))
    with torch.no_grad():
        ours = (decode_latents(m.ae, denoise(family, model, noise, sigmas, cond[prompt], guidance=None,
                                             negative=cond[negative], cfg_scale=cfg)) + 1) / 2
    ours = ours[0].permute(1, 2, 0).numpy()

    pipe = chroma_pipeline(helpers, model, m)
    with torch.no_grad():
        # diffusers' own T5 encoding and Chroma mask (real tokens + 1 padding); its float mask would be additive
        # and mask nothing (diffusers#13619), so it is handed over as the bool mask it stands for
        embeds, mask = pipe._get_t5_prompt_embeds(prompt, max_sequence_length=32)
        n_embeds, n_mask = pipe._get_t5_prompt_embeds(negative, max_sequence_length=32)
        out = pipe(prompt_embeds=embeds, prompt_attention_mask=mask.bool(), negative_prompt_embeds=n_embeds,
                   negative_prompt_attention_mask=n_mask.bool(), height=H, width=W, num_inference_steps=steps,
                   sigmas=sigmas[:-1].tolist(), guidance_scale=cfg, latents=flow.pack_latents(noise),
                   output_type="np").images[0]
    assert out.shape == ours.shape == (H, W, 3) and out.std() > 0.05
    assert np.abs(ours - out).max() <= 1e-4
    # our text conditioning is diffusers' T5 encoding (with its mask), token for token
    assert torch.allclose(cond[prompt]["t5_out"], embeds, atol=1e-5)
    assert torch.equal(cond[prompt]["t5_mask"].sum(), (mask.sum() - 1).long())  # the padding token is added later
