"""Generated images equal Flux2KleinPipeline (distilled and base with CFG) and Flux2Pipeline ([dev], guidance) given
the same noise; the schedule equals the pipelines' FlowMatchEulerDiscreteScheduler sigmas."""

from __future__ import annotations

import pytest
import torch
from diffusers import (
    AutoencoderKLFlux2,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Pipeline,
    Flux2Transformer2DModel,
)
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

from fluxlora.families.flux2 import latents
from fluxlora.families.flux2 import text_encoders as te
from fluxlora.families.flux2.autoencoder import load_flux2_ae
from fluxlora.families.flux2.keys import bfl_to_diffusers
from fluxlora.families.flux2.loading import load_flux2
from fluxlora.families.flux2.sampling import denoise, empirical_mu, schedule
from fluxlora.families.flux2.tiny import tiny_text_encoder, tiny_tokenizer

TXT_LEN = 32


def _scheduler() -> FlowMatchEulerDiscreteScheduler:
    """The scheduler config FLUX.2 [dev] / [klein] ship (dynamic exponential shifting; μ from the pipeline)."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                           base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                           max_image_seq_len=4096, time_shift_type="exponential")


@pytest.mark.parametrize(("steps", "seq_len"), [(4, 16), (28, 4096), (50, 6000)])
def test_schedule_matches_the_pipeline_scheduler(steps, seq_len):
    sched = _scheduler()
    sigmas = torch.linspace(1.0, 1.0 / steps, steps).numpy()
    sched.set_timesteps(steps, sigmas=sigmas, mu=empirical_mu(seq_len, steps))
    torch.testing.assert_close(schedule(steps, seq_len), sched.sigmas.float(), rtol=1e-6, atol=1e-6)


def _pipeline_parts(paths, version):
    transformer, info = load_flux2(paths.transformer)
    ae = load_flux2_ae(paths.ae)
    p = info.params
    dit = Flux2Transformer2DModel(in_channels=128, num_layers=p.depth, num_single_layers=p.depth_single_blocks,
                                  attention_head_dim=p.head_dim, num_attention_heads=p.num_heads,
                                  joint_attention_dim=p.context_in_dim, axes_dims_rope=p.axes_dim,
                                  guidance_embeds=p.guidance_embed).eval()
    dit.load_state_dict(bfl_to_diffusers(transformer.state_dict()))
    vae = AutoencoderKLFlux2(block_out_channels=(32,) * 4, layers_per_block=1, latent_channels=32).eval()
    ldm = {k.replace("encoder.quant_conv.", "quant_conv.").replace("decoder.post_quant_conv.", "post_quant_conv."): v
           for k, v in ae.state_dict().items()}
    vae.load_state_dict(convert_ldm_vae_checkpoint(dict(ldm), vae.config)
                        | {"bn.running_mean": ae.bn.running_mean, "bn.running_var": ae.bn.running_var}, strict=False)
    full, kind = tiny_text_encoder(version)
    return transformer, ae, dit, vae, full, kind


@pytest.mark.parametrize("version", ["klein-4b", "klein-base-4b", "dev"])
def test_images_match_the_diffusers_pipelines(flux2_tiny, version):
    paths = flux2_tiny[version]
    transformer, ae, dit, vae, full, kind = _pipeline_parts(paths, version)
    tokenizer = tiny_tokenizer(kind)
    noise = torch.randn(1, 128, 4, 4, generator=torch.Generator().manual_seed(3))
    steps, prompt = 3, "a photo of a cat"
    if version == "dev":
        pipe = Flux2Pipeline(scheduler=_scheduler(), vae=vae, text_encoder=full, tokenizer=tokenizer, transformer=dit)
        expected = pipe(prompt=prompt, height=64, width=64, num_inference_steps=steps, guidance_scale=4.0,
                        latents=noise, max_sequence_length=TXT_LEN, output_type="pt").images
    else:
        pipe = Flux2KleinPipeline(scheduler=_scheduler(), vae=vae, text_encoder=full, tokenizer=tokenizer,
                                  transformer=dit, is_distilled=(version == "klein-4b"))
        expected = pipe(prompt=prompt, height=64, width=64, num_inference_steps=steps, guidance_scale=4.0,
                        latents=noise, max_sequence_length=TXT_LEN, output_type="pt").images

    encoder, spec = te.load_text_encoder(paths.text_encoder)
    txt = te.encode(encoder, spec, *te.tokenize(tokenizer, kind, [prompt], TXT_LEN))
    negative = None
    if version == "klein-base-4b":
        negative = (te.encode(encoder, spec, *te.tokenize(tokenizer, kind, [""], TXT_LEN)), latents.text_ids(TXT_LEN))
    x = denoise(transformer, latents.pack(noise), latents.image_ids(4, 4), txt, latents.text_ids(TXT_LEN),
                schedule(steps, 16), guidance=4.0 if version == "dev" else None, negative=negative, cfg_scale=4.0)
    image = (ae.decode(latents.unpack(x, 4, 4)) / 2 + 0.5).clamp(0, 1)
    assert expected.std() > 0.01
    torch.testing.assert_close(image, expected, rtol=1e-4, atol=1e-4)
