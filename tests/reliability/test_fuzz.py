"""Fuzzing (hypothesis): arbitrary bytes as a safetensors file, mutations of a valid one, arbitrary text and arbitrary
TOML trees as the dataset config never fail with anything but fluxlora's own error type (no crash, no generic
exception); a file accepted by the header check loads."""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from reliability_data import write_dataset

from fluxlora.config.dataset import DatasetFlags, load_dataset_config
from fluxlora.data.datasets import build_training_data
from fluxlora.errors import CheckpointError, FluxLoraError
from fluxlora.files import save_safetensors
from fluxlora.models.checkpoints import read_header
from fluxlora.network.saving import read_lora

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                        HealthCheck.too_slow])
SCRATCH = Path(tempfile.mkdtemp(prefix="fluxlora-fuzz-"))
IMAGES = write_dataset(SCRATCH / "img", count=2, size=32)


def _valid_lora_bytes() -> bytes:
    path = SCRATCH / "valid.safetensors"
    save_safetensors(path, {"lora_unet_x.lora_down.weight": torch.arange(8.0).reshape(2, 4),
                            "lora_unet_x.lora_up.weight": torch.ones(4, 2, dtype=torch.float16),
                            "lora_unet_x.alpha": torch.tensor(2.0)}, {"ss_network_dim": "2"})
    return path.read_bytes()


VALID = _valid_lora_bytes()


def _read_safetensors(data: bytes) -> None:
    path = SCRATCH / "fuzz.safetensors"
    path.write_bytes(data)
    try:
        header = read_header(path, flag="--network_weights")
    except CheckpointError as err:
        assert err.path == str(path) and "\n" not in str(err)
        return
    # accepted by the header check: the real reader must agree
    try:
        tensors, _ = read_lora(path)
    except CheckpointError:
        return
    assert set(tensors) == set(header.tensors)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12)
tensor_entry = st.fixed_dictionaries({
    "dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "F8_E4M3", "X9"]) | json_values,
    "shape": st.lists(st.integers(-2, 5), max_size=3) | json_values,
    "data_offsets": st.lists(st.integers(-4, 80), min_size=2, max_size=2) | json_values,
})
headers = st.dictionaries(st.text(max_size=12), tensor_entry | json_values, max_size=4)


@FUZZ
@given(st.binary(max_size=512))
@example(b"")
@example(struct.pack("<Q", 2**63))
@example(struct.pack("<Q", 2) + b"{}")
def test_arbitrary_bytes_as_safetensors(data):
    _read_safetensors(data)


@FUZZ
@given(headers, st.binary(max_size=96), st.integers(-8, 8))
@example({"": {"dtype": [], "shape": [], "data_offsets": [0, 0]}}, b"", 0)  # found by this test: unhashable dtype
def test_arbitrary_headers_as_safetensors(header, payload, length_error):
    raw = json.dumps(header).encode()
    _read_safetensors(struct.pack("<Q", max(0, len(raw) + length_error)) + raw + payload)


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), max_size=6),
       st.integers(0, len(VALID)))
def test_mutated_valid_file(flips, cut):
    data = bytearray(VALID)
    for position, value in flips:
        data[position] = value
    _read_safetensors(bytes(data[:cut]) if cut % 3 == 0 else bytes(data))


def _load_dataset(text: str) -> None:
    path = SCRATCH / "fuzz.toml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        blueprint = load_dataset_config(path, DatasetFlags(resolution=64, caption_extension=".txt"))
        build_training_data(blueprint, seed=0)
    except FluxLoraError as err:  # anything else escaping is the failure hypothesis looks for
        assert str(err) and "\n" not in str(err).strip("\n")


@FUZZ
@given(st.text(max_size=300))
@example('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "C:\\Users\\me"\n')
def test_arbitrary_text_as_dataset_toml(text):
    _load_dataset(text)


KEYS = ["batch_size", "resolution", "enable_bucket", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps",
        "num_repeats", "shuffle_caption", "keep_tokens", "flip_aug", "caption_dropout_rate", "validation_split",
        "caption_extension", "image_dir", "is_reg", "class_tokens", "metadata_file", "network_multiplier",
        "face_crop_aug_range", "random_crop", "color_aug", "secondary_separator", "keep_tokens_separator",
        "resize_interpolation", "interpolation_type", "caption_prefix", "caption_suffix", "alpha_mask", "bogus"]
text = st.text(st.characters(exclude_categories=("Cs",)), max_size=10)
toml_scalars = (st.booleans() | st.integers(-2**63, 2**63 - 1) | st.integers(0, 2048)
                | st.floats(allow_nan=True, allow_infinity=True) | text
                | st.sampled_from([str(IMAGES), str(SCRATCH / "missing"), "", ".txt", "64,64", "lanczos"]))
toml_values = st.recursive(toml_scalars, lambda c: st.lists(c, max_size=3)
                           | st.dictionaries(st.sampled_from(KEYS), c, max_size=3), max_leaves=6)
_bool, _size = st.booleans(), st.integers(0, 2048)
PLAUSIBLE = {"batch_size": st.integers(0, 4), "resolution": _size | st.lists(_size, max_size=3),
             "enable_bucket": _bool, "min_bucket_reso": _size, "max_bucket_reso": _size, "bucket_reso_steps": _size,
             "num_repeats": st.integers(0, 4), "shuffle_caption": _bool, "keep_tokens": st.integers(-1, 4),
             "flip_aug": _bool, "caption_dropout_rate": st.floats(-1, 2), "validation_split": st.floats(-1, 2),
             "caption_extension": st.sampled_from([".txt", ".caption", "txt", ""]), "is_reg": _bool,
             "random_crop": _bool, "color_aug": _bool, "alpha_mask": _bool, "network_multiplier": st.floats(-2, 2)}
# mostly plausible values for the key (so some configs get through to the image scan), sometimes anything
entry = st.sampled_from(KEYS).flatmap(
    lambda k: st.tuples(st.just(k), st.one_of(*[PLAUSIBLE.get(k, toml_scalars)] * 4, toml_values)))
options = st.lists(entry, max_size=2).map(dict)
subset = st.fixed_dictionaries({"image_dir": st.sampled_from([str(IMAGES), str(SCRATCH / "missing")])}).flatmap(
    lambda base: options.map(lambda extra: {**base, **extra}))
dataset = options.flatmap(lambda d: st.lists(subset, min_size=1, max_size=2).map(lambda subs: {**d, "subsets": subs}))
tree = st.fixed_dictionaries({"datasets": st.lists(dataset, min_size=1, max_size=2)},
                             optional={"general": options})


def _toml(value) -> str:
    """Inline TOML for any tree of dicts, lists and scalars (keys always quoted)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return {"inf": "inf", "-inf": "-inf", "nan": "nan"}.get(repr(value), repr(value))
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + "}"


@FUZZ
@given(tree)
def test_arbitrary_toml_trees_as_dataset_config(data):
    _load_dataset("\n".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in data.items()) + "\n")
