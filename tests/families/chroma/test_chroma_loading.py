"""Loading Chroma transformers: BFL / prefixed / diffusers (file, folder, sharded) / fp8, the key map, bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import fluxlora.families.chroma.loading as chroma_loading
from fluxlora.errors import CheckpointError
from fluxlora.families.chroma.diffusers_keys import bfl_to_diffusers, diffusers_to_bfl
from fluxlora.families.chroma.loading import inspect_chroma, load_chroma
from fluxlora.families.tiny import tiny_chroma_params
from fluxlora.models.checkpoints import ModelKind, detect_kind, read_header
from fluxlora.models.flux_loading import load_flux


@pytest.fixture
def no_tensor_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if any tensor data is read: errors must come from headers alone."""
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("tensor data was read")
    monkeypatch.setattr(chroma_loading, "load_tensors", refuse)


def _inputs(p, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(1, 6, 3)
    ids[0, :, 2] = torch.arange(6)
    return (torch.randn(1, 6, p.in_channels, generator=g), ids, torch.randn(1, 5, p.context_in_dim, generator=g),
            torch.zeros(1, 5, 3), torch.tensor([0.4]))


@torch.no_grad()
def test_bfl_file_loads_strictly_and_inspect_reads_headers(tiny_family_ckpts, monkeypatch) -> None:
    path = tiny_family_ckpts.chroma
    model, info = load_chroma(path)
    assert (info.layout, info.file_dtype, info.variant) == ("bfl", "F32", "chroma")
    assert info.params == tiny_chroma_params()
    state = load_file(str(path))
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert detect_kind(read_header(path).tensors) is ModelKind.CHROMA
    monkeypatch.setattr(chroma_loading, "load_tensors", lambda *a, **k: pytest.fail("tensor data was read"))
    assert inspect_chroma(path).num_params == sum(v.numel() for v in state.values())


@torch.no_grad()
def test_prefixed_diffusers_file_folder_and_shards_give_the_same_output(tmp_path: Path, tiny_family_ckpts) -> None:
    from diffusers import ChromaTransformer2DModel

    reference, _ = load_chroma(tiny_family_ckpts.chroma)
    expected = reference.eval()(*_inputs(reference.params))
    state = load_file(str(tiny_family_ckpts.chroma))
    prefixed = tmp_path / "comfy.safetensors"
    save_file({f"model.diffusion_model.{k}": v for k, v in state.items()}, str(prefixed))
    single = tmp_path / "chroma-diffusers.safetensors"
    save_file({k: v.contiguous() for k, v in bfl_to_diffusers(state).items()}, str(single))
    assert detect_kind(read_header(single).tensors) is ModelKind.CHROMA_DIFFUSERS
    # a folder written by diffusers itself, in two shards
    p = reference.params
    theirs = ChromaTransformer2DModel(
        in_channels=p.in_channels, num_layers=p.depth, num_single_layers=p.depth_single_blocks,
        attention_head_dim=p.head_dim, num_attention_heads=p.num_heads, joint_attention_dim=p.context_in_dim,
        axes_dims_rope=p.axes_dim, approximator_num_channels=p.approximator_in_dim,
        approximator_hidden_dim=p.approximator_hidden_size, approximator_layers=p.approximator_depth)
    theirs.load_state_dict(bfl_to_diffusers(state), strict=True)
    theirs.save_pretrained(tmp_path / "pipe" / "transformer", max_shard_size="200KB")
    assert len(list((tmp_path / "pipe" / "transformer").glob("*.safetensors"))) > 1
    for path, layout in ((prefixed, "bfl"), (single, "diffusers"), (tmp_path / "pipe", "diffusers")):
        model, info = load_chroma(path)
        assert info.layout == layout and info.params == p, path
        assert torch.equal(model.eval()(*_inputs(p)), expected), path


def test_key_maps_are_inverse(tiny_family_ckpts) -> None:
    state = load_file(str(tiny_family_ckpts.chroma))
    diffusers = bfl_to_diffusers(state)
    assert "distilled_guidance_layer.layers.4.linear_2.weight" in diffusers
    assert "distilled_guidance_layer.norms.0.weight" in diffusers
    assert "single_transformer_blocks.1.proj_mlp.bias" in diffusers
    back = diffusers_to_bfl(diffusers)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)


def test_fp8_file_keeps_fp8_unless_cast(tmp_path: Path, tiny_family_ckpts) -> None:
    state = load_file(str(tiny_family_ckpts.chroma))
    path = tmp_path / "chroma-fp8.safetensors"
    save_file({k: v.to(torch.float8_e4m3fn) if v.ndim == 2 else v.bfloat16() for k, v in state.items()}, str(path))
    model, info = load_chroma(path)
    assert info.file_dtype == "F8_E4M3"
    assert model.double_blocks[0].img_attn.qkv.weight.dtype == torch.float8_e4m3fn
    cast, _ = load_chroma(path, dtype=torch.bfloat16)
    assert cast.double_blocks[0].img_attn.qkv.weight.dtype == torch.bfloat16


def _write(tmp_path: Path, state: dict, name: str = "bad.safetensors") -> Path:
    path = tmp_path / name
    save_file(state, str(path))
    return path


def test_missing_extra_and_mis_shaped_keys_fail_from_the_header(tmp_path: Path, tiny_family_ckpts,
                                                                 no_tensor_reads: None) -> None:
    state = load_file(str(tiny_family_ckpts.chroma))
    missing = _write(tmp_path, {k: v for k, v in state.items() if k != "double_blocks.1.txt_mlp.2.bias"}, "m.safetensors")
    with pytest.raises(CheckpointError, match=r"missing key.*double_blocks\.1\.txt_mlp\.2\.bias"):
        load_chroma(missing)
    extra = _write(tmp_path, {**state, "double_blocks.0.img_mod.lin.weight": torch.zeros(2, 2)}, "e.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected key.*img_mod"):
        load_chroma(extra)
    wrong = _write(tmp_path, {**state, "distilled_guidance_layer.out_proj.bias": torch.zeros(3)}, "w.safetensors")
    with pytest.raises(CheckpointError, match=r"shape mismatch.*out_proj\.bias"):
        load_chroma(wrong)
    no_approx = _write(tmp_path, {k: v for k, v in state.items() if not k.startswith("distilled_guidance_layer.in_")},
                       "n.safetensors")
    with pytest.raises(CheckpointError, match="expects a Chroma"):  # without in_proj it is no Chroma file at all
        load_chroma(no_approx)


def test_wrong_family_files_are_clear_errors(tiny_ckpts, tiny_family_ckpts, no_tensor_reads: None) -> None:
    with pytest.raises(CheckpointError, match=r"FLUX transformer \(BFL layout\).*expects a Chroma"):
        load_chroma(tiny_ckpts.flux_dev)
    with pytest.raises(CheckpointError, match=r"is a Chroma transformer.*expects a FLUX"):
        load_flux(tiny_family_ckpts.chroma)
    with pytest.raises(CheckpointError, match="autoencoder"):
        load_chroma(tiny_ckpts.ae)


def test_diffusers_unknown_and_missing_parts(tmp_path: Path, tiny_family_ckpts, no_tensor_reads: None) -> None:
    diffusers = {k: v.contiguous() for k, v in bfl_to_diffusers(load_file(str(tiny_family_ckpts.chroma))).items()}
    unknown = _write(tmp_path, {**diffusers, "transformer_blocks.0.norm1.linear.weight": torch.zeros(2, 2)}, "u.safetensors")
    with pytest.raises(CheckpointError, match=r"norm1\.linear\.weight.*is not a diffusers Chroma"):
        load_chroma(unknown)
    part = _write(tmp_path, {k: v for k, v in diffusers.items() if k != "transformer_blocks.1.attn.add_k_proj.weight"},
                  "p.safetensors")
    with pytest.raises(CheckpointError, match=r"add_k_proj.*is missing"):
        load_chroma(part)
