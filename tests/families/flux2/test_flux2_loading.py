"""FLUX.2 transformer files: BFL, ComfyUI-prefixed, diffusers and fp8 layouts load to the same model; detection from
headers; wrong files are one-line errors before any weight is read."""

from __future__ import annotations

import pytest
import torch

from fluxlora.errors import CheckpointError
from fluxlora.families.flux2 import latents
from fluxlora.families.flux2.keys import bfl_to_diffusers
from fluxlora.families.flux2.loading import inspect_flux2, load_flux2
from fluxlora.families.flux2.tiny import random_flux2, small_flux2_params
from fluxlora.files import save_safetensors
from fluxlora.models.tiny import random_flux, tiny_flux_params


def _forward(model, guidance=True):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return model(torch.randn(1, 6, 16, generator=g), latents.image_ids(2, 3), torch.randn(1, 4, 24, generator=g),
                     latents.text_ids(4), torch.tensor([0.5]), torch.tensor([4.0]) if guidance else None)


def test_every_layout_loads_the_same_weights(tmp_path):
    model = random_flux2(small_flux2_params(guidance=True), seed=1)
    state = model.state_dict()
    bfl = tmp_path / "flux2-dev.safetensors"
    save_safetensors(bfl, state)
    comfy = tmp_path / "comfy.safetensors"
    save_safetensors(comfy, {f"model.diffusion_model.{k}": v for k, v in state.items()})
    folder = tmp_path / "FLUX.2-dev" / "transformer"
    folder.mkdir(parents=True)
    save_safetensors(folder / "diffusion_pytorch_model.safetensors",
                     {k: v.contiguous() for k, v in bfl_to_diffusers(state).items()})
    expected = _forward(model)
    for path, layout in ((bfl, "bfl"), (comfy, "bfl"), (folder.parent, "diffusers")):
        loaded, info = load_flux2(path)
        assert info.layout == layout and info.params == model.params
        assert torch.equal(_forward(loaded), expected), path


def test_fp8_file_stays_fp8_and_runs(tmp_path):
    model = random_flux2(small_flux2_params(guidance=False), seed=2)
    path = tmp_path / "flux-2-klein-4b-fp8.safetensors"
    save_safetensors(path, {k: v.to(torch.float8_e4m3fn) if v.ndim == 2 else v for k, v in model.state_dict().items()})
    loaded, info = load_flux2(path)
    assert info.file_dtype == "F8_E4M3"
    assert loaded.double_blocks[0].img_attn.qkv.weight.dtype == torch.float8_e4m3fn
    ours = _forward(loaded, guidance=False)
    ref = _forward(random_flux2(small_flux2_params(guidance=False), seed=2), guidance=False)
    assert torch.isfinite(ours).all() and (ours - ref).abs().max() < 0.2 * ref.abs().max()


def test_tiny_files_report_their_version(flux2_tiny):
    assert inspect_flux2(flux2_tiny["dev"].transformer).model_version == "dev"
    assert inspect_flux2(flux2_tiny["klein-9b"].transformer).model_version == "klein-9b"
    info = inspect_flux2(flux2_tiny["klein-base-4b"].transformer)
    assert info.base and info.model_version == "klein-base-4b"
    assert not inspect_flux2(flux2_tiny["klein-4b"].transformer).base


def test_model_version_must_match_the_file(flux2_tiny, tmp_path):
    path = flux2_tiny["klein-4b"].transformer
    assert inspect_flux2(path, model_version="klein-base-4b").base
    with pytest.raises(CheckpointError, match="guidance embedding"):
        inspect_flux2(flux2_tiny["dev"].transformer, model_version="klein-base-4b")
    with pytest.raises(CheckpointError, match="not a FLUX.2 version"):
        inspect_flux2(path, model_version="klein-12b")


def test_flux1_transformer_is_refused_by_name(tmp_path):
    path = tmp_path / "flux1-dev.safetensors"
    save_safetensors(path, random_flux(tiny_flux_params("dev")).state_dict())
    with pytest.raises(CheckpointError) as err:
        load_flux2(path)
    message = str(err.value)
    assert "FLUX.1 transformer, not a FLUX.2 transformer" in message and "\n" not in message


def test_scaled_fp8_and_damaged_files_fail_before_loading(tmp_path):
    state = random_flux2(small_flux2_params(guidance=True)).state_dict()
    scaled = tmp_path / "flux2_dev_fp8mixed.safetensors"
    save_safetensors(scaled, {**state, "double_blocks.0.img_attn.qkv.weight_scale": torch.ones(1)})
    with pytest.raises(CheckpointError, match="scaled / mixed fp8"):
        load_flux2(scaled)
    broken = tmp_path / "broken.safetensors"
    save_safetensors(broken, {k: v for k, v in state.items() if k != "single_blocks.1.linear2.weight"})
    with pytest.raises(CheckpointError, match="single_blocks.1.linear2.weight"):
        load_flux2(broken)
