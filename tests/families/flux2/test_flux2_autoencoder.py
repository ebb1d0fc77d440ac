"""The FLUX.2 AE equals diffusers' AutoencoderKLFlux2 plus the pipelines' patching and batch-norm normalisation."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKLFlux2, Flux2Pipeline
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

from fluxlora.errors import CheckpointError
from fluxlora.families.flux2.autoencoder import load_flux2_ae
from fluxlora.families.flux2.latents import patchify, unpatchify
from fluxlora.files import save_safetensors
from fluxlora.models.tiny import write_tiny_checkpoints


def _oracle(ae) -> AutoencoderKLFlux2:
    """diffusers' AE with our weights, mapped by diffusers' own LDM converter (quant convs at the top level there)."""
    ref = AutoencoderKLFlux2(block_out_channels=(32,) * 4, layers_per_block=1, latent_channels=32).eval()
    ldm = {k.replace("encoder.quant_conv.", "quant_conv.").replace("decoder.post_quant_conv.", "post_quant_conv."): v
           for k, v in ae.state_dict().items()}
    state = convert_ldm_vae_checkpoint(dict(ldm), ref.config)
    state |= {"bn.running_mean": ae.bn.running_mean, "bn.running_var": ae.bn.running_var,
              "bn.num_batches_tracked": torch.tensor(0)}
    ref.load_state_dict(state, strict=True)
    return ref


def test_encode_decode_match_diffusers(flux2_tiny):
    ae = load_flux2_ae(flux2_tiny["klein-4b"].ae)
    ref = _oracle(ae)
    x = torch.rand(2, 3, 64, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mean = ref.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(ref.bn.running_var.view(1, -1, 1, 1) + ref.config.batch_norm_eps)
    with torch.no_grad():
        ours = ae.encode(x)
        theirs = (Flux2Pipeline._patchify_latents(ref.encode(x).latent_dist.mode()) - mean) / std
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        assert ours.shape == (2, 128, 4, 3)
        decoded = ae.decode(ours)
        expected = ref.decode(Flux2Pipeline._unpatchify_latents(theirs * std + mean)).sample
    torch.testing.assert_close(decoded, expected, rtol=1e-4, atol=1e-4)


def test_diffusers_vae_folder_loads_the_same_weights(flux2_tiny, tmp_path):
    ae = load_flux2_ae(flux2_tiny["dev"].ae)
    (tmp_path / "vae").mkdir()
    save_safetensors(tmp_path / "vae" / "diffusion_pytorch_model.safetensors",
                     {k: v.contiguous() for k, v in _oracle(ae).state_dict().items()})
    loaded = load_flux2_ae(tmp_path)
    for key, value in ae.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_patchify_roundtrip():
    z = torch.randn(2, 32, 6, 4)
    assert torch.equal(unpatchify(patchify(z)), z)
    assert torch.equal(patchify(z), Flux2Pipeline._patchify_latents(z))


def test_flux1_ae_is_refused_by_name(tmp_path):
    paths = write_tiny_checkpoints(tmp_path, schnell=False)
    with pytest.raises(CheckpointError, match="FLUX.1 autoencoder"):
        load_flux2_ae(paths.ae)
