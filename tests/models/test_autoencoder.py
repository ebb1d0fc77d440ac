"""The BFL-layout autoencoder against diffusers' AutoencoderKL loaded from the same file, plus strict loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fluxlora.errors import CheckpointError
from fluxlora.models.autoencoder import AutoEncoder, AutoEncoderParams, load_ae, params_from_shapes
from fluxlora.models.checkpoints import module_shapes

SCALE, SHIFT = 0.3611, 0.1159  # FLUX.1's AE latent convention (spec §3.4)


def _diffusers_config(p: AutoEncoderParams) -> dict:
    n = len(p.ch_mult)
    return dict(
        in_channels=p.in_channels, out_channels=p.out_ch,
        down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
        block_out_channels=[p.ch * m for m in p.ch_mult], layers_per_block=p.num_res_blocks,
        latent_channels=p.z_channels, norm_num_groups=32, sample_size=p.resolution,
        scaling_factor=SCALE, shift_factor=SHIFT, use_quant_conv=False, use_post_quant_conv=False,
    )


def _random_state(params: AutoEncoderParams, seed: int) -> dict[str, torch.Tensor]:
    """A seeded AE whose norms are perturbed too, so every parameter matters in the comparison."""
    torch.manual_seed(seed)
    model = AutoEncoder(params)
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, tensor in model.state_dict().items():
        if ".norm" in name:
            tensor = tensor + 0.1 * torch.randn(tensor.shape, generator=gen)
        state[name] = tensor.contiguous()
    return state


@pytest.fixture(scope="module")
def tiny_ae_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    state = _random_state(AutoEncoderParams.tiny(), seed=0)
    path = tmp_path_factory.mktemp("ae") / "ae.safetensors"
    save_file(state, str(path))
    return path, state


@pytest.fixture(scope="module")
def reference_vae(tiny_ae_file):
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    _, state = tiny_ae_file
    config = _diffusers_config(AutoEncoderParams.tiny())
    vae = AutoencoderKL(**config)
    vae.load_state_dict(convert_ldm_vae_checkpoint(dict(state), config), strict=True)
    return vae.eval()


def test_tiny_keeps_the_flux_latent_geometry():
    ae = AutoEncoder(AutoEncoderParams.tiny())
    x = torch.zeros(2, 3, 48, 32)
    z = ae.encode(x)
    assert z.shape == (2, 16, 6, 4) and z.dtype == torch.float32
    assert ae.decode(z).shape == (2, 3, 48, 32)


def test_encode_mean_and_decode_match_diffusers(tiny_ae_file, reference_vae):
    path, _ = tiny_ae_file
    ae = load_ae(path)
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 32, 40, generator=gen) * 2 - 1
    with torch.no_grad():
        ours = ae.encode(x)
        ref_dist = reference_vae.encode(x).latent_dist
        expected = (ref_dist.mean - SHIFT) * SCALE  # diffusers' documented FLUX convention
        assert ours.shape == (2, 16, 4, 5)
        assert torch.allclose(ours, expected, atol=1e-5, rtol=0)

        z = torch.randn(2, 16, 4, 5, generator=gen)
        decoded = ae.decode(z)
        expected_img = reference_vae.decode(z / SCALE + SHIFT).sample
        assert decoded.shape == (2, 3, 32, 40)
        assert torch.allclose(decoded, expected_img, atol=1e-5, rtol=0)


def test_sample_draws_from_the_posterior_with_an_explicit_generator(tiny_ae_file, reference_vae):
    path, _ = tiny_ae_file
    ae = load_ae(path)
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        a = ae.encode(x, sample=True, generator=torch.Generator().manual_seed(7))
        b = ae.encode(x, sample=True, generator=torch.Generator().manual_seed(7))
        dist = reference_vae.encode(x).latent_dist
    eps = torch.randn(a.shape, generator=torch.Generator().manual_seed(7))
    expected = ((dist.mean + dist.std * eps) - SHIFT) * SCALE
    assert torch.equal(a, b)
    assert torch.allclose(a, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(a, ae.encode(x))  # sampling is not the mean


def test_flux_params_convert_to_diffusers_flux_vae_shapes():
    """Our full-size key set is exactly the BFL ae.safetensors that diffusers' FLUX VAE config loads."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    params = AutoEncoderParams.flux()
    with torch.device("meta"):
        ours = AutoEncoder(params)
        config = _diffusers_config(params)
        ref = AutoencoderKL(**config)
    converted = convert_ldm_vae_checkpoint(ours.state_dict(), config)
    ref_shapes = module_shapes(ref)
    assert {k: tuple(v.shape) for k, v in converted.items()} == ref_shapes
    assert params_from_shapes(module_shapes(ours)) == params
    assert params_from_shapes(module_shapes(AutoEncoder(AutoEncoderParams.tiny()))) == AutoEncoderParams.tiny()


def test_load_ae_dtype_and_frozen(tiny_ae_file):
    path, state = tiny_ae_file
    ae = load_ae(path, dtype=torch.bfloat16)
    tensors = list(ae.parameters()) + list(ae.buffers())
    assert all(t.device.type == "cpu" and t.dtype == torch.bfloat16 for t in tensors)
    assert not any(p.requires_grad for p in ae.parameters()) and not ae.training
    assert torch.equal(ae.state_dict()["decoder.conv_out.weight"], state["decoder.conv_out.weight"].bfloat16())
    z = ae.encode(torch.zeros(1, 3, 16, 16))
    assert z.dtype == torch.float32 and torch.isfinite(z).all()


def _write(tmp_path: Path, state: dict[str, torch.Tensor], name: str = "ae.safetensors") -> Path:
    path = tmp_path / name
    save_file(state, str(path))
    return path


def test_bad_files_are_refused_naming_the_file(tmp_path, tiny_ae_file):
    _, state = tiny_ae_file
    missing = {k: v for k, v in state.items() if k != "decoder.up.1.block.1.conv1.bias"}
    with pytest.raises(CheckpointError, match=r"--ae .*missing.*decoder\.up\.1\.block\.1\.conv1\.bias"):
        load_ae(_write(tmp_path, missing, "missing.safetensors"))

    extra = dict(state, **{"decoder.extra.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"extra\.safetensors.*unexpected.*decoder\.extra\.weight"):
        load_ae(_write(tmp_path, extra, "extra.safetensors"))

    wrong = dict(state, **{"encoder.mid.attn_1.q.bias": torch.zeros(5)})
    with pytest.raises(CheckpointError, match=r"shape.*encoder\.mid\.attn_1\.q\.bias"):
        load_ae(_write(tmp_path, wrong, "wrong.safetensors"))

    clip_like = {"text_model.embeddings.token_embedding.weight": torch.zeros(4, 4)}
    with pytest.raises(CheckpointError, match=r"--ae .*clip.*CLIP-L text encoder.*autoencoder"):
        load_ae(_write(tmp_path, clip_like, "clip.safetensors"))

    with pytest.raises(CheckpointError, match=r"pickle"):
        load_ae(tmp_path / "ae.ckpt")
    with pytest.raises(CheckpointError, match=r"not found"):
        load_ae(tmp_path / "nope.safetensors", flag="--vae")
