"""Loading FLUX transformers: BFL / prefixed / diffusers (file, folder, sharded) / fp8 / bf16, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import FluxTransformer2DModel
from safetensors.torch import load_file, save_file

import fluxlora.models.flux_loading as flux_loading
from fluxlora.errors import CheckpointError
from fluxlora.files import save_safetensors
from fluxlora.models.diffusers_keys import bfl_to_diffusers, diffusers_to_bfl
from fluxlora.models.flux import Flux, FluxParams
from fluxlora.models.flux_loading import inspect_flux, load_flux
from fluxlora.models.tiny import random_flux_inputs


def _no_meta(model: torch.nn.Module) -> bool:
    return not any(t.is_meta for t in [*model.parameters(), *model.buffers()])


@pytest.fixture
def no_tensor_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if any tensor data is read: errors must come from headers alone."""
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("tensor data was read")
    monkeypatch.setattr(flux_loading, "load_tensors", refuse)


def _reference(path: Path, params: FluxParams) -> Flux:
    model = Flux(params)
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.eval()


@torch.no_grad()
@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_bfl_file_loads_strictly(flux_files: dict[str, Path], small_flux_params: FluxParams, variant: str) -> None:
    model, info = load_flux(flux_files[variant])
    assert (info.variant, info.layout, info.file_dtype) == (variant, "bfl", "F32")
    assert info.params == small_flux_params.with_variant(variant)
    assert model.variant == variant and hasattr(model, "guidance_in") == (variant == "dev")
    assert _no_meta(model)
    file_state = load_file(str(flux_files[variant]))
    assert model.state_dict().keys() == file_state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in file_state.items())
    x = random_flux_inputs(info.params)
    if variant == "schnell":
        x["guidance"] = None
    assert torch.equal(model.eval()(**x), _reference(flux_files[variant], info.params)(**x))


def test_inspect_reads_headers_only(flux_files: dict[str, Path], small_flux_params: FluxParams,
                                    no_tensor_reads: None) -> None:
    info = inspect_flux(flux_files["schnell"])
    assert info.variant == "schnell" and info.params == small_flux_params.with_variant("schnell")
    assert info.num_params == sum(t.numel() for t in load_file(str(flux_files["schnell"])).values())


def test_prefixed_file_loads(tmp_path: Path, flux_files: dict[str, Path]) -> None:
    state = load_file(str(flux_files["dev"]))
    path = tmp_path / "comfy.safetensors"
    save_file({f"model.diffusion_model.{k}": v for k, v in state.items()}, str(path))
    model, info = load_flux(path)
    assert info.variant == "dev" and _no_meta(model)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_diffusers_single_file_and_folder_give_the_bfl_output(tmp_path: Path, flux_files: dict[str, Path]) -> None:
    bfl_model, bfl_info = load_flux(flux_files["dev"])
    diffusers_state = bfl_to_diffusers(load_file(str(flux_files["dev"])))
    single = tmp_path / "flux-diffusers.safetensors"
    save_file({k: v.contiguous() for k, v in diffusers_state.items()}, str(single))
    folder = tmp_path / "pipeline" / "transformer"
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in diffusers_state.items()}, str(folder / "diffusion_pytorch_model.safetensors"))
    x = random_flux_inputs(bfl_info.params)
    expected = bfl_model.eval()(**x)
    for path in (single, folder.parent, folder):
        model, info = load_flux(path)
        assert info.layout == "diffusers" and info.params == bfl_info.params, path
        assert _no_meta(model)
        assert torch.equal(model.eval()(**x), expected), path


def test_sharded_folder_written_by_diffusers_loads(tmp_path: Path, flux_files: dict[str, Path]) -> None:
    """diffusers itself writes the folder (sharded, with index json); its forward is the oracle."""
    bfl_model, info = load_flux(flux_files["dev"])
    p = info.params
    theirs = FluxTransformer2DModel(
        patch_size=1, in_channels=p.in_channels, num_layers=p.depth, num_single_layers=p.depth_single_blocks,
        attention_head_dim=p.head_dim, num_attention_heads=p.num_heads, joint_attention_dim=p.context_in_dim,
        pooled_projection_dim=p.vec_in_dim, guidance_embeds=True, axes_dims_rope=p.axes_dim)
    theirs.load_state_dict(bfl_to_diffusers(bfl_model.state_dict()), strict=True)
    theirs.save_pretrained(tmp_path / "transformer", max_shard_size="600KB", safe_serialization=True)
    assert (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    model, loaded = load_flux(tmp_path, dtype=torch.float32)
    assert loaded.layout == "diffusers" and len(loaded.files) > 1 and loaded.params == p
    x = random_flux_inputs(p)
    with torch.no_grad():
        expected = theirs.eval()(hidden_states=x["img"], encoder_hidden_states=x["txt"], pooled_projections=x["y"],
                                 timestep=x["timesteps"], img_ids=x["img_ids"][0], txt_ids=x["txt_ids"][0],
                                 guidance=x["guidance"], return_dict=False)[0]
        assert (model.eval()(**x) - expected).abs().max() <= 1e-5


def test_key_maps_are_inverse(flux_files: dict[str, Path]) -> None:
    state = load_file(str(flux_files["dev"]))
    converted = bfl_to_diffusers(state)
    back = diffusers_to_bfl(converted)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    again = bfl_to_diffusers(back)
    assert again.keys() == converted.keys() and all(torch.equal(again[k], converted[k]) for k in converted)


def test_fp8_file_keeps_fp8_unless_cast(tmp_path: Path, flux_files: dict[str, Path]) -> None:
    state = load_file(str(flux_files["dev"]))
    fp8 = {k: (v.to(torch.float8_e4m3fn) if v.ndim == 2 else v.to(torch.bfloat16)) for k, v in state.items()}
    path = tmp_path / "flux1-dev-fp8.safetensors"
    save_file(fp8, str(path))
    assert inspect_flux(path).file_dtype == "F8_E4M3"
    model, _ = load_flux(path)
    assert model.double_blocks[0].img_attn.qkv.weight.dtype == torch.float8_e4m3fn
    assert model.double_blocks[0].img_attn.qkv.bias.dtype == torch.bfloat16
    model32, _ = load_flux(path, dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in model32.parameters())
    key = "single_blocks.1.linear1.weight"
    assert torch.equal(model32.state_dict()[key], fp8[key].float())


def test_bf16_file_and_cast(tmp_path: Path, flux_files: dict[str, Path]) -> None:
    state = load_file(str(flux_files["schnell"]))
    path = tmp_path / "flux1-schnell-bf16.safetensors"
    save_file({k: v.bfloat16() for k, v in state.items()}, str(path))
    model, info = load_flux(path)
    assert info.file_dtype == "BF16" and all(p.dtype == torch.bfloat16 for p in model.parameters())
    model, _ = load_flux(path, dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in model.parameters())


# --- bad input: each a one-line CheckpointError naming the file and the problem, before tensors are read ----


def _write(path: Path, state: dict[str, torch.Tensor]) -> Path:
    save_safetensors(path, state)
    return path


def _expect_error(path: Path, *needles: str) -> str:
    with pytest.raises(CheckpointError) as err:
        load_flux(path)
    message = str(err.value)
    assert "\n" not in message
    assert "--pretrained_model_name_or_path" in message
    for needle in (str(path), *needles):
        assert needle in message, (needle, message)
    return message


def test_truncated_file(tmp_path: Path, flux_files: dict[str, Path], no_tensor_reads: None) -> None:
    data = flux_files["dev"].read_bytes()
    path = tmp_path / "flux1-dev.safetensors"
    path.write_bytes(data[: len(data) - 1000])
    _expect_error(path, "truncated")


def test_missing_key(tmp_path: Path, flux_files: dict[str, Path], no_tensor_reads: None) -> None:
    state = load_file(str(flux_files["dev"]))
    del state["double_blocks.1.txt_attn.proj.bias"]
    _expect_error(_write(tmp_path / "m.safetensors", state), "missing", "double_blocks.1.txt_attn.proj.bias")


def test_extra_key(tmp_path: Path, flux_files: dict[str, Path], no_tensor_reads: None) -> None:
    state = load_file(str(flux_files["dev"]))
    state["double_blocks.0.img_attn.lora.weight"] = torch.zeros(2, 2)
    _expect_error(_write(tmp_path / "e.safetensors", state), "unexpected", "double_blocks.0.img_attn.lora.weight")


def test_wrong_shape(tmp_path: Path, flux_files: dict[str, Path], no_tensor_reads: None) -> None:
    state = load_file(str(flux_files["dev"]))
    state["single_blocks.0.linear2.weight"] = torch.zeros(64, 300)
    _expect_error(_write(tmp_path / "s.safetensors", state), "shape", "single_blocks.0.linear2.weight", "[64, 300]")


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin"])
def test_pickle_refused(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"flux1-dev{suffix}"
    path.write_bytes(b"\x80\x04not really a pickle")
    _expect_error(path, "pickle", "safetensors")


def test_missing_path(tmp_path: Path) -> None:
    _expect_error(tmp_path / "nope.safetensors", "not found")


def test_vae_instead_of_transformer(tmp_path: Path, no_tensor_reads: None) -> None:
    state = {"encoder.conv_in.weight": torch.zeros(4, 3, 3, 3), "decoder.conv_in.weight": torch.zeros(4, 16, 3, 3)}
    _expect_error(_write(tmp_path / "ae.safetensors", state), "autoencoder", "FLUX transformer")


def test_diffusers_unknown_and_missing_parts(tmp_path: Path, flux_files: dict[str, Path], no_tensor_reads: None) -> None:
    converted = bfl_to_diffusers(load_file(str(flux_files["dev"])))
    extra = {**converted, "transformer_blocks.0.attn.to_qq.weight": torch.zeros(2, 2)}
    _expect_error(_write(tmp_path / "x.safetensors", extra), "transformer_blocks.0.attn.to_qq.weight")
    missing = {k: v for k, v in converted.items() if k != "single_transformer_blocks.1.attn.to_k.bias"}
    _expect_error(_write(tmp_path / "y.safetensors", missing), "single_transformer_blocks.1.attn.to_k")


def test_empty_folder(tmp_path: Path) -> None:
    _expect_error(tmp_path, "no diffusers FLUX transformer")


def test_sharded_index_naming_a_missing_shard(tmp_path: Path, flux_files: dict[str, Path]) -> None:
    index = {"weight_map": {"x_embedder.weight": "diffusion_pytorch_model-00001-of-00002.safetensors"}}
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    _expect_error(tmp_path, "diffusion_pytorch_model-00001-of-00002.safetensors", "not found")
