"""The sampler against diffusers' FluxPipeline built from the same tiny weights, plus its maths by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from fluxlora.errors import ConfigError
from fluxlora.families.flux1.family import FLUX1
from fluxlora.inference.prompts import SamplePrompt
from fluxlora.inference.sampler import (
    decode_latents,
    denoise,
    encode_texts,
    flux_schedule,
    generate_images,
    packed_noise,
    save_png,
)
from fluxlora.models.diffusers_keys import bfl_to_diffusers

H, W = 32, 48  # non-square: a swapped height/width shows up as a different image
SEQ_LEN = (H // 16) * (W // 16)


def _diffusers_pipeline(models, variant: str):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    flux = models.flux[variant]
    p = flux.params
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=p.in_channels, num_layers=p.depth, num_single_layers=p.depth_single_blocks,
        attention_head_dim=p.head_dim, num_attention_heads=p.num_heads, joint_attention_dim=p.context_in_dim,
        pooled_projection_dim=p.vec_in_dim, guidance_embeds=p.guidance_embed, axes_dims_rope=p.axes_dim)
    transformer.load_state_dict(bfl_to_diffusers(flux.state_dict()), strict=True)
    a = models.ae.params
    n = len(a.ch_mult)
    config = dict(
        in_channels=a.in_channels, out_channels=a.out_ch, down_block_types=["DownEncoderBlock2D"] * n,
        up_block_types=["UpDecoderBlock2D"] * n, block_out_channels=[a.ch * m for m in a.ch_mult],
        layers_per_block=a.num_res_blocks, latent_channels=a.z_channels, norm_num_groups=32,
        sample_size=a.resolution, scaling_factor=a.scale_factor, shift_factor=a.shift_factor,
        use_quant_conv=False, use_post_quant_conv=False)
    vae = AutoencoderKL(**config)
    vae.load_state_dict(convert_ldm_vae_checkpoint(models.ae.state_dict(), config), strict=True)
    # We pass our (already shifted) sigmas, so diffusers' own dynamic shift must be off: shift=1 is the identity.
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=False, shift=1.0)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=models.clip, tokenizer=models.tokenizers.clip,
                        text_encoder_2=models.t5, tokenizer_2=models.tokenizers.t5, transformer=transformer.eval())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _ours(models, variant: str, prompt: SamplePrompt, *, mask: bool = False) -> torch.Tensor:
    """Our float image [1, 3, H, W] in [0, 1] (before 8-bit rounding)."""
    flux = models.flux[variant]
    cond = encode_texts(models.encode_fn(variant, apply_t5_attn_mask=mask), [prompt.prompt, prompt.negative_prompt])
    sigmas = flux_schedule(prompt.steps, SEQ_LEN, shift=variant == "dev")
    negative = cond[prompt.negative_prompt] if prompt.cfg_scale != 1.0 else None
    x = denoise(FLUX1, flux, FLUX1.initial_noise(prompt.seed, H, W), sigmas, cond[prompt.prompt],
                guidance=prompt.guidance if variant == "dev" else None, negative=negative, cfg_scale=prompt.cfg_scale,
                mask_text=mask)
    return (decode_latents(models.ae, x) + 1) / 2


def _reference(models, variant: str, prompt: SamplePrompt) -> np.ndarray:
    pipe = _diffusers_pipeline(models, variant)
    sigmas = flux_schedule(prompt.steps, SEQ_LEN, shift=variant == "dev")
    kwargs = {}
    if prompt.cfg_scale != 1.0:
        kwargs = dict(negative_prompt=prompt.negative_prompt, true_cfg_scale=prompt.cfg_scale)
    with torch.no_grad():
        out = pipe(prompt.prompt, height=H, width=W, num_inference_steps=prompt.steps, sigmas=sigmas[:-1].tolist(),
                   guidance_scale=prompt.guidance, latents=packed_noise(prompt.seed, H, W),
                   max_sequence_length=512 if variant == "dev" else 256, output_type="np", **kwargs)
    return out.images[0]  # [H, W, 3] in [0, 1]


# ------------------------------------------------------------------------------------ diffusers parity


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_image_matches_diffusers_flux_pipeline(tiny_models, variant):
    prompt = SamplePrompt("a photo of a cat", width=W, height=H, seed=7, steps=3, guidance=3.5)
    ours = _ours(tiny_models, variant, prompt)[0].permute(1, 2, 0).numpy()
    ref = _reference(tiny_models, variant, prompt)
    assert ours.shape == ref.shape == (H, W, 3)
    assert ref.std() > 0.05  # a real image, not a constant
    assert np.abs(ours - ref).max() <= 1e-4


def test_true_cfg_matches_diffusers(tiny_models):
    prompt = SamplePrompt("a red house", negative_prompt="blurry, dark", width=W, height=H, seed=3, steps=2,
                          guidance=2.0, cfg_scale=2.5)
    ours = _ours(tiny_models, "dev", prompt)[0].permute(1, 2, 0).numpy()
    ref = _reference(tiny_models, "dev", prompt)
    assert np.abs(ours - ref).max() <= 1e-4
    no_cfg = _ours(tiny_models, "dev", SamplePrompt(**{**prompt.__dict__, "cfg_scale": 1.0}))[0].permute(1, 2, 0)
    assert np.abs(no_cfg.numpy() - ref).max() > 1e-3  # CFG really changed the image


def test_generate_images_rounds_the_reference_and_records_settings(tiny_models):
    prompt = SamplePrompt("a photo of a cat", width=W, height=H, seed=7, steps=3)
    ref = _reference(tiny_models, "schnell", prompt)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    (image,) = generate_images(FLUX1, tiny_models.info["schnell"], tiny_models.flux["schnell"], tiny_models.ae,
                               tiny_models.encode_fn("schnell"), [prompt], device="cpu")
    assert torch.equal(torch.rand(3), expected_next)  # the global RNG was not touched
    assert isinstance(image, Image.Image) and image.size == (W, H) and image.mode == "RGB"
    assert np.abs(np.asarray(image).astype(np.float64) - ref * 255).max() <= 0.5 + 255e-4
    assert image.info["seed"] == "7" and image.info["steps"] == "3" and image.info["variant"] == "schnell"


def test_random_seed_is_recorded_and_reproduces_the_image(tiny_models):
    models = (FLUX1, tiny_models.info["dev"], tiny_models.flux["dev"], tiny_models.ae, tiny_models.encode_fn("dev"))
    (first,) = generate_images(*models, [SamplePrompt("a tree", width=32, height=32, steps=1)], device="cpu")
    seed = int(first.info["seed"])
    (again,) = generate_images(*models, [SamplePrompt("a tree", width=32, height=32, steps=1, seed=seed)],
                               device="cpu")
    assert np.array_equal(np.asarray(first), np.asarray(again))


# ------------------------------------------------------------------------------------------ maths


@pytest.mark.parametrize("steps", [1, 4, 20])
@pytest.mark.parametrize("seq_len", [4, 256, 1024, 4096])
def test_shifted_schedule_equals_diffusers_dynamic_shift(steps, seq_len):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=calculate_shift(seq_len))
    ours = flux_schedule(steps, seq_len, shift=True)
    assert ours.dtype == torch.float32 and ours.shape == (steps + 1,)
    assert torch.allclose(ours, scheduler.sigmas.float(), atol=1e-6, rtol=0)
    assert ours[0] == 1.0 and ours[-1] == 0.0


def test_schedule_by_hand():
    # 256 tokens: μ = 0.5, so the midpoint t = 1/2 maps to e^0.5 / (e^0.5 + 1).
    shifted = flux_schedule(2, 256, shift=True)
    assert shifted[1].item() == pytest.approx(math.exp(0.5) / (math.exp(0.5) + 1.0), abs=1e-7)
    # schnell: the plain linspace, no shift
    assert torch.equal(flux_schedule(4, 4096, shift=False), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))


class _LinearFlow(torch.nn.Module):
    """A stand-in DiT whose velocity is k·x: each Euler step multiplies x by (1 + k·dt)."""

    def __init__(self, k: float):
        super().__init__()
        self.k = k
        self.anchor = torch.nn.Parameter(torch.zeros(()))
        self.calls: list[dict] = []

    def forward(self, img, img_ids, txt, txt_ids, timesteps, y, guidance=None, txt_mask=None):
        self.calls.append(dict(t=timesteps.clone(), guidance=guidance, mask=txt_mask, img_ids=img_ids))
        return self.k * img


def test_euler_steps_by_hand():
    model = _LinearFlow(k=0.5)
    x0 = torch.randn(1, 16, 4, 6, generator=torch.Generator().manual_seed(0))  # 32 × 48 pixels
    sigmas = torch.tensor([1.0, 0.6, 0.2, 0.0])
    cond = {"clip_pooled": torch.zeros(1, 4), "t5_out": torch.zeros(1, 5, 8), "t5_mask": torch.ones(1, 5, dtype=torch.bool)}
    out = denoise(FLUX1, model, x0, sigmas, cond, guidance=4.0)
    factor = (1 - 0.5 * 0.4) * (1 - 0.5 * 0.4) * (1 - 0.5 * 0.2)
    assert torch.allclose(out, x0 * factor, atol=1e-6)
    assert [c["t"].tolist() for c in model.calls] == [[1.0], [pytest.approx(0.6)], [pytest.approx(0.2)]]
    assert model.calls[0]["guidance"].tolist() == [4.0] and model.calls[0]["mask"] is None
    # image ids are (0, row, col) over a 2 × 3 token grid
    assert model.calls[0]["img_ids"][0, :, 1:].tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]


def test_cfg_combination_by_hand():
    class Split(torch.nn.Module):  # velocity = the pooled vector's first entry, per batch row
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(()))

        def forward(self, img, img_ids, txt, txt_ids, timesteps, y, guidance=None, txt_mask=None):
            return y[:, :1, None].expand_as(img).clone()

    cond = {"clip_pooled": torch.tensor([[3.0]]), "t5_out": torch.zeros(1, 2, 4), "t5_mask": torch.ones(1, 2)}
    neg = {"clip_pooled": torch.tensor([[1.0]]), "t5_out": torch.zeros(1, 2, 4), "t5_mask": torch.ones(1, 2)}
    out = denoise(FLUX1, Split(), torch.zeros(1, 16, 2, 2), torch.tensor([1.0, 0.0]), cond, guidance=1.0,
                  negative=neg, cfg_scale=4.0)
    # v = v_neg + s·(v_pos − v_neg) = 1 + 4·2 = 9; one step of dt = −1
    assert torch.allclose(out, torch.full((1, 16, 2, 2), -9.0))


def test_packed_noise_is_seeded_fp32_and_leaves_the_global_rng_alone():
    torch.manual_seed(0)
    before = torch.get_rng_state()
    a = packed_noise(42, 32, 64)
    assert torch.equal(torch.get_rng_state(), before)
    assert a.shape == (1, 2 * 4, 64) and a.dtype == torch.float32
    assert torch.equal(a, packed_noise(42, 32, 64)) and not torch.equal(a, packed_noise(43, 32, 64))
    assert abs(float(packed_noise(1, 512, 512).std()) - 1.0) < 0.02


def test_t5_mask_equals_running_without_the_padding(tiny_models):
    """With the mask, padding tokens are invisible: same image as with T5 cut to the real tokens, unmasked."""
    text = "a small boat"
    n_real = int(tiny_models.tokenizers.tokenize([text], 512).t5_mask.sum())
    flux = tiny_models.flux["dev"]
    sigmas = flux_schedule(2, 4, shift=True)
    outs = []
    for mask, length in ((True, 512), (False, n_real)):
        cond = encode_texts(tiny_models.encode_fn("dev", apply_t5_attn_mask=mask, t5_max_length=length), [text])[text]
        outs.append(denoise(FLUX1, flux, FLUX1.initial_noise(1, 32, 32), sigmas, cond, guidance=3.5, mask_text=mask))
    unmasked = encode_texts(tiny_models.encode_fn("dev"), [text])[text]
    plain = denoise(FLUX1, flux, FLUX1.initial_noise(1, 32, 32), sigmas, unmasked, guidance=3.5)
    assert torch.allclose(outs[0], outs[1], atol=1e-5)
    assert not torch.allclose(outs[0], plain, atol=1e-3)  # the mask matters


def test_nan_text_embedding_is_a_clear_error():
    def encode(texts):
        return {"clip_pooled": torch.zeros(len(texts), 4), "t5_out": torch.full((len(texts), 3, 8), float("nan")),
                "t5_mask": torch.ones(len(texts), 3, dtype=torch.bool)}

    with pytest.raises(ConfigError, match="NaN"):
        encode_texts(encode, ["x"])


def test_sizes_must_be_multiples_of_16(tiny_models):
    with pytest.raises(ConfigError, match="multiple of 16"):
        generate_images(FLUX1, tiny_models.info["dev"], tiny_models.flux["dev"], tiny_models.ae,
                        tiny_models.encode_fn("dev"), [SamplePrompt("x", width=40, height=32, seed=1, steps=1)],
                        device="cpu")


def test_png_text_chunks_round_trip(tmp_path):
    image = Image.new("RGB", (16, 16))
    image.info.update({"prompt": "ein Bär — 熊", "seed": "5"})
    path = save_png(image, tmp_path / "a.png")
    with Image.open(path) as loaded:
        assert loaded.text["prompt"] == "ein Bär — 熊" and loaded.text["seed"] == "5"
