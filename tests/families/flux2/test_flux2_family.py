"""The FLUX.2 family behind the seam: detection, the un-patched latent view, `predict` against the pipelines' token
layout, the starting noise, sampling through the generic sampler (= the diffusers pipelines' images), the files it
names, the planner's activation coefficients, and bad inputs refused in one line before any weight is read."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from fluxlora import families
from fluxlora.errors import CheckpointError, ConfigError
from fluxlora.families.flux2 import latents
from fluxlora.families.flux2.family import FLUX2, LatentView
from fluxlora.families.flux2.params import Flux2Params
from fluxlora.families.flux2.shape import ACTIVATION_BYTES_PER_TOKEN_PER_WIDTH
from fluxlora.families.flux2.tiny import random_flux2, small_flux2_params
from fluxlora.models.checkpoints import read_header
from fluxlora.network.lora import create_network
from fluxlora.training.cli import check_main


def test_the_registry_picks_flux2_from_the_header_and_flux1_keeps_its_files(flux2_tiny, tiny_ckpts):
    for version, title in (("dev", "FLUX.2 [dev]"), ("klein-4b", "FLUX.2 [klein] 4B"),
                           ("klein-base-4b", "FLUX.2 [klein] base 4B")):
        family, info = families.resolve_family(flux2_tiny[version].transformer, None, flag="--x")
        assert family is FLUX2 and info.variant == version and info.title == title
        assert FLUX2.architecture(info).lora_architecture == f"flux-2-{version.replace('base-', '')}/lora"
    family, info = families.resolve_family(tiny_ckpts.flux_dev, None, flag="--x")
    assert family.name == "flux1" and not FLUX2.claims(read_header(tiny_ckpts.flux_dev))
    assert not families.family_named("flux1").claims(read_header(flux2_tiny["dev"].transformer))


def test_predict_is_the_pipelines_patchify_pack_and_ids():
    """The un-patched latent [B, 32, 2h, 2w] packs into the very tokens the pipelines make from the patched
    [B, 128, h, w] latent; a reference image's tokens ride along with t = 10 and are cut from the prediction."""
    params = small_flux2_params(guidance=True, in_channels=128, context=24)
    model = random_flux2(params, seed=1)
    g = torch.Generator().manual_seed(0)
    patched, ref = torch.randn(2, 128, 3, 4, generator=g), torch.randn(2, 128, 2, 2, generator=g)
    txt, sigmas = torch.randn(2, 7, 24, generator=g), torch.tensor([0.3, 0.8])
    cond = {"prompt_embeds": txt, "reference_latents": latents.unpatchify(ref)}
    with torch.no_grad():
        ours = FLUX2.predict(model, latents.unpatchify(patched), sigmas, cond, guidance=3.0, mask_text=False,
                             compute_dtype=torch.float32, autocast=contextlib.nullcontext)
        ref_tokens, ref_ids = latents.reference_tokens([ref])
        x = torch.cat([latents.pack(patched), ref_tokens], dim=1)
        ids = torch.cat([latents.image_ids(3, 4, batch=2), ref_ids], dim=1)
        theirs = model(x, ids, txt, latents.text_ids(7, batch=2), sigmas, torch.full((2,), 3.0))[:, :12]
    assert ours.shape == (2, 32, 6, 8) and ref_ids[0, 0, 0] == 10
    torch.testing.assert_close(latents.patchify(ours), latents.unpack(theirs, 3, 4), rtol=0, atol=0)


def test_noise_and_latents_follow_the_pipelines_layout(flux2_tiny):
    noise = FLUX2.initial_noise(5, 64, 96)
    drawn = torch.randn(1, 128, 4, 6, generator=torch.Generator().manual_seed(5))  # Flux2Pipeline.prepare_latents
    assert noise.shape == (1, 32, 8, 12) and torch.equal(latents.patchify(noise), drawn)
    ae = FLUX2.load_autoencoder(flux2_tiny["dev"].ae, dtype=torch.float32, device="cpu")
    assert isinstance(ae, LatentView)
    pixels = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        z = ae.encode(pixels)
        assert z.shape == (1, 32, 4, 6)
        torch.testing.assert_close(latents.patchify(z), ae.ae.encode(pixels), rtol=0, atol=0)
        torch.testing.assert_close(ae.decode(z), ae.ae.decode(latents.patchify(z)), rtol=0, atol=0)


@pytest.mark.parametrize("version", ["klein-4b", "klein-base-4b", "dev"])
def test_the_generic_sampler_gives_the_pipelines_images(flux2_tiny, version):
    """`inference.sampler.generate_images` with the family (its encoders, schedule, noise, guidance / CFG and AE
    view) gives the image of Flux2Pipeline / Flux2KleinPipeline for the same seed."""
    from diffusers import Flux2KleinPipeline, Flux2Pipeline
    from test_flux2_sampling import TXT_LEN, _pipeline_parts, _scheduler

    from fluxlora.families.flux2.tiny import tiny_tokenizer
    from fluxlora.inference.prompts import SamplePrompt
    from fluxlora.inference.sampler import generate_images

    paths = flux2_tiny[version]
    _, _, dit, vae, full, kind = _pipeline_parts(paths, version)
    family, info = families.resolve_family(paths.transformer, None, flag="--x")
    model = family.load_transformer(info, dtype=torch.float32, device="cpu")
    ae = family.load_autoencoder(paths.ae, dtype=torch.float32, device="cpu")
    text = family.load_text_encoders({"text_encoder": paths.text_encoder}, dtype=torch.float32, keep_fp8=False,
                                     device="cpu", tokenizer_dir=paths.tokenizer, max_length=TXT_LEN,
                                     mask_padding=False, autocast=contextlib.nullcontext)
    cfg = 4.0 if version == "klein-base-4b" else 1.0
    prompt = SamplePrompt(prompt="a photo of a cat", width=64, height=64, seed=11, steps=3, guidance=4.0,
                          cfg_scale=cfg)
    ours = np.asarray(generate_images(family, info, model, ae, text.encode, [prompt], device="cpu")[0]).astype(int)

    noise = latents.patchify(family.initial_noise(11, 64, 64))
    pipe_cls = Flux2Pipeline if version == "dev" else Flux2KleinPipeline
    extra = {} if version == "dev" else {"is_distilled": version == "klein-4b"}
    pipe = pipe_cls(scheduler=_scheduler(), vae=vae, text_encoder=full, tokenizer=tiny_tokenizer(kind),
                    transformer=dit, **extra)
    image = pipe(prompt=prompt.prompt, height=64, width=64, num_inference_steps=3, guidance_scale=4.0, latents=noise,
                 max_sequence_length=TXT_LEN, output_type="np").images[0]
    expected = np.round(image * 255).astype(int)
    assert expected.std() > 2
    assert np.abs(ours - expected).max() <= 1  # 8-bit rounding of equal images


def test_activation_coefficients_match_saved_tensors_at_another_width():
    """The per-token coefficients (measured at width 256) predict autograd's saved bytes at width 128 within 10 %."""
    params = Flux2Params(in_channels=128, context_in_dim=24, hidden_size=128, num_heads=2, depth=1,
                         depth_single_blocks=1, axes_dim=(16, 16, 16, 16), guidance_embed=False)
    model = random_flux2(params, seed=0).train().requires_grad_(False)
    network = create_network(1.0, 4, 4, model, [], train_text_encoder=False)
    network.apply_to()
    network.requires_grad_(True)
    g = torch.Generator().manual_seed(0)
    n_img, n_txt, h = 96, 32, 128
    img, txt, vec = torch.randn(1, n_img, h, generator=g), torch.randn(1, n_txt, h, generator=g), torch.randn(1, h)
    ids = torch.cat([latents.text_ids(n_txt), latents.image_ids(8, 12)], dim=1)
    pe = model.pe_embedder(ids)
    img_mod, txt_mod = model.double_stream_modulation_img(vec), model.double_stream_modulation_txt(vec)
    (single_mod,) = model.single_stream_modulation(vec)
    tokens = n_img + n_txt
    double = saved_bytes(model.double_blocks[0], (img, txt, img_mod, txt_mod, pe))
    single = saved_bytes(model.single_blocks[0], (torch.cat([txt, img], 1), single_mod, pe))
    assert double == pytest.approx(ACTIVATION_BYTES_PER_TOKEN_PER_WIDTH[("fp32", "double")] * h * tokens, rel=0.10)
    assert single == pytest.approx(ACTIVATION_BYTES_PER_TOKEN_PER_WIDTH[("fp32", "single")] * h * tokens, rel=0.10)


def saved_bytes(block, inputs) -> int:
    """Bytes autograd saves for backward in one forward of `block` (parameters excluded)."""
    seen: dict[int, int] = {}
    params = {p.untyped_storage().data_ptr() for p in block.parameters()}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(*inputs)
    return sum(n for ptr, n in seen.items() if ptr not in params)


# ---------------------------------------------------------------- bad inputs: one line, before any weight


def _argv(train_argv, **kw):
    return train_argv(family="flux2", **kw)


def _swap(argv, flag, value):
    return [a for a in argv if not a.startswith(f"{flag}=")] + ([f"{flag}={value}"] if value is not None else [])


def test_a_klein_transformer_with_the_dev_text_encoder_is_refused(train_argv, flux2_tiny):
    argv = _swap(_argv(train_argv), "--text_encoder", flux2_tiny["dev"].text_encoder)
    with pytest.raises(CheckpointError, match=r"--text_encoder .*a Mistral Small 3 encoder .*this FLUX.2 \[klein\] base 4B transformer .*\(Qwen3"):
        check_main(argv)


def test_a_flux1_autoencoder_or_transformer_is_refused(train_argv, tiny_ckpts):
    with pytest.raises(CheckpointError, match=r"--ae .*FLUX.1 autoencoder"):
        check_main(_swap(_argv(train_argv), "--ae", tiny_ckpts.ae))
    with pytest.raises(ConfigError, match=r"--text_encoder is required for flux2 models"):
        check_main(_swap(_argv(train_argv), "--text_encoder", None))


def test_model_version_must_match_the_file(train_argv):
    with pytest.raises(CheckpointError, match=r"--model_version dev does not match .*no guidance embedding: klein"):
        check_main(_argv(train_argv) + ["--model_version=dev"])
    # klein-base from a file named without "base": the flag decides
    assert check_main(_argv(train_argv) + ["--model_version=klein-base-4b"]) == 0


def test_model_version_is_refused_for_flux1(train_argv):
    with pytest.raises(ConfigError, match=r"--model_version klein-4b: only FLUX.2 models read it"):
        check_main(train_argv("--model_version=klein-4b"))


def test_a_flux1_lora_is_refused_before_weights(train_argv, tmp_path):
    from fluxlora.files import save_safetensors

    lora = tmp_path / "flux1.safetensors"
    save_safetensors(lora, {"lora_unet_double_blocks_0_img_mod_lin.lora_down.weight": torch.zeros(4, 64)},
                     {"ss_base_model_version": "flux1", "modelspec.architecture": "flux-1-dev/lora"})
    with pytest.raises(CheckpointError, match=r"--network_weights .*trained on FLUX.1 .*FLUX.2 \[klein\] base 4B"):
        check_main(_argv(train_argv) + [f"--network_weights={lora}"])
    other = tmp_path / "klein9b.safetensors"
    save_safetensors(other, {"lora_unet_img_in.lora_down.weight": torch.zeros(4, 128)},
                     {"ss_base_model_version": "flux2", "modelspec.architecture": "flux-2-klein-9b/lora"})
    with pytest.raises(CheckpointError, match=r"trained on flux-2-klein-9b .*FLUX.2 \[klein\] base 4B"):
        check_main(_argv(train_argv) + [f"--network_weights={other}"])


def test_missing_tokenizer_and_text_encoder_only_are_refused(train_argv, tmp_path):
    with pytest.raises(ConfigError, match=r"--tokenizer_cache_dir: the FLUX.2 text encoder needs the Qwen/Qwen3-4B"):
        check_main(_swap(_argv(train_argv), "--tokenizer_cache_dir", tmp_path))
    argv = [a for a in _argv(train_argv) if a != "--network_train_unet_only"]
    with pytest.raises(ConfigError, match=r"--network_train_text_encoder_only: the FLUX.2 text encoder carries no"):
        check_main(argv + ["--network_train_text_encoder_only"])
