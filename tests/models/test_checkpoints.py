"""safetensors header reading, kind detection and strict key checks (fluxlora.models.checkpoints)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from fluxlora.errors import CheckpointError
from fluxlora.models.checkpoints import (
    ModelKind,
    check_keys,
    check_path,
    detect_kind,
    load_tensors,
    module_shapes,
    read_header,
    require_kind,
    strip_prefix,
)

TENSORS = {"a.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.ones(5, dtype=torch.bfloat16),
           "c": torch.zeros(2, 2, dtype=torch.float16)}


@pytest.fixture
def valid(tmp_path: Path) -> Path:
    path = tmp_path / "model.safetensors"
    save_file(TENSORS, str(path), metadata={"ss_network_dim": "4"})
    return path


def _raw(header: dict, payload: bytes = b"") -> bytes:
    blob = json.dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob + payload


def test_read_header(valid: Path) -> None:
    header = read_header(valid)
    assert header.shapes == {"a.weight": (3, 4), "b": (5,), "c": (2, 2)}
    assert header.metadata == {"ss_network_dim": "4"}
    assert header.num_params == 12 + 5 + 4
    assert header.dtype_counts() == {"F32": 12, "BF16": 5, "F16": 4}
    assert header.file_size == valid.stat().st_size


@pytest.mark.parametrize(("content", "reason"), [
    (b"\x01\x02", "only 2 bytes"),
    (struct.pack("<Q", 10**12) + b"{}", "header length"),
    (struct.pack("<Q", 4) + b"{abc", "not JSON"),
    (_raw([1, 2]), "not a JSON object"),
    (_raw({"x": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 1]}}, b"\0"), "unsupported dtype"),
    (_raw({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4), "does not match shape"),
    (_raw({"x": {"dtype": "F32", "shape": [2], "data_offsets": [4, 0]}}, b"\0" * 8), "invalid shape or byte range"),
    (_raw({"x": {"dtype": "F32", "shape": [2]}}, b"\0" * 8), "malformed entry"),
    (_raw({"__metadata__": {"a": 1}}), "__metadata__"),
    (_raw({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8), "truncated"),
])
def test_bad_headers_named(tmp_path: Path, content: bytes, reason: str) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=reason) as err:
        read_header(path, flag="--ae")
    assert str(path) in str(err.value) and str(err.value).startswith("--ae ") and "\n" not in str(err.value)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(min_value=0, max_value=10_000), flip=st.integers(min_value=8, max_value=200),
       byte=st.integers(min_value=0, max_value=255))
def test_corrupted_files_raise_checkpoint_error(tmp_path: Path, valid: Path, cut: int, flip: int, byte: int) -> None:
    data = bytearray(valid.read_bytes())
    truncated = tmp_path / "t.safetensors"
    truncated.write_bytes(data[: cut % len(data)])
    with pytest.raises(CheckpointError):
        read_header(truncated)
    # a flipped header byte is either still a valid header or a CheckpointError, never another exception
    data[flip % (8 + struct.unpack("<Q", data[:8])[0])] = byte
    flipped = tmp_path / "f.safetensors"
    flipped.write_bytes(bytes(data))
    try:
        read_header(flipped)
    except CheckpointError:
        pass


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth", ".bin", ".pkl"])
def test_pickles_refused(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"anything")
    with pytest.raises(CheckpointError, match="convert it to .safetensors"):
        check_path(path, flag="--clip_l")


def test_missing_path_and_folder(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        check_path(tmp_path / "none.safetensors")
    with pytest.raises(CheckpointError, match="is a folder"):
        read_header(tmp_path)


@pytest.mark.parametrize(("keys", "kind"), [
    (["double_blocks.0.img_attn.qkv.weight", "img_in.weight"], ModelKind.FLUX),
    (["model.diffusion_model.img_in.weight"], ModelKind.FLUX),
    (["transformer_blocks.0.attn.to_q.weight", "x_embedder.weight"], ModelKind.FLUX_DIFFUSERS),
    (["encoder.conv_in.weight", "decoder.conv_in.weight"], ModelKind.AE),
    (["text_model.encoder.layers.0.mlp.fc1.weight"], ModelKind.CLIP_L),
    (["encoder.block.0.layer.0.SelfAttention.q.weight", "shared.weight"], ModelKind.T5XXL),
    (["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"], ModelKind.LORA),
    (["transformer.x.lora_A.weight"], ModelKind.LORA),
    (["something.else"], ModelKind.UNKNOWN),
])
def test_detect_kind(keys: list[str], kind: ModelKind) -> None:
    assert detect_kind(keys) is kind


def test_require_kind_names_both_kinds(tmp_path: Path) -> None:
    path = tmp_path / "ae.safetensors"
    save_file({"encoder.conv_in.weight": torch.zeros(1), "decoder.conv_in.weight": torch.zeros(1)}, str(path))
    with pytest.raises(CheckpointError, match="autoencoder.*--clip_l expects a CLIP-L"):
        require_kind(read_header(path), ModelKind.CLIP_L, flag="--clip_l")
    assert require_kind(read_header(path), (ModelKind.CLIP_L, ModelKind.AE), flag="--ae") is ModelKind.AE


def test_strip_prefix_only_when_all_keys_have_it() -> None:
    assert strip_prefix(["model.diffusion_model.a", "model.diffusion_model.b"]) == {
        "model.diffusion_model.a": "a", "model.diffusion_model.b": "b"}
    assert strip_prefix(["model.diffusion_model.a", "b"]) == {"model.diffusion_model.a": "model.diffusion_model.a",
                                                              "b": "b"}


def test_check_keys_messages() -> None:
    expected = {"a": (2,), "b": (3, 3), "c": (1,)}
    check_keys(dict(expected), expected, path="f.safetensors", what="X")
    with pytest.raises(CheckpointError) as err:
        check_keys({"a": (2,), "b": (3, 4), "d": (1,)}, expected, path="f.safetensors", what="X", flag="--ae")
    message = str(err.value)
    assert "1 missing key(s), first 'c'" in message
    assert "1 unexpected key(s), first 'd'" in message
    assert "'b': file [3, 4] vs model [3, 3]" in message
    assert message.startswith("--ae f.safetensors: does not fit X")


def test_load_tensors_rename_cast_keep_fp8(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_file({"w": torch.full((2, 2), 1.5), "f8": torch.full((2,), 0.5).to(torch.float8_e4m3fn),
               "i": torch.arange(3)}, str(path))
    header = read_header(path)
    out = load_tensors(header, rename={"w": "renamed"}, dtype=torch.bfloat16)
    assert set(out) == {"renamed", "f8", "i"}
    assert out["renamed"].dtype == torch.bfloat16 and torch.equal(out["renamed"].float(), torch.full((2, 2), 1.5))
    assert out["f8"].dtype == torch.float8_e4m3fn and out["i"].dtype == torch.int64
    assert load_tensors(header, dtype=torch.float32, keep_fp8=False)["f8"].dtype == torch.float32


def test_module_shapes_on_meta() -> None:
    with torch.device("meta"):
        module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    assert module_shapes(module) == {"0.weight": (4, 3), "0.bias": (4,), "1.weight": (4,), "1.bias": (4,)}
