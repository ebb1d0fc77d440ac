"""LoRA files: save with `sshs_*` hashes, read strictly, and build the `ss_*` / `modelspec.*` metadata (spec §6.3).

`build_metadata` is a pure function of the training facts the trainer collects; it fixes the metadata bugs of spec
§12.26: `ss_network_dim` is the real default rank (4, never "None"), `ss_epoch` is 1-based for every save (the
epoch in progress for step saves, the finished one for epoch saves: the trainer passes that number), and nothing
here hashes the ~23 GB base checkpoint: `ss_new_sd_model_hash` is written only when the trainer passes a value (it
should pass the cheap fingerprint it already has, or nothing), `ss_sd_model_name` is the file's base name.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from fluxlora import __version__
from fluxlora.errors import CheckpointError, ConfigError
from fluxlora.files import save_safetensors

SAVE_PRECISIONS: dict[str | None, torch.dtype | None] = {
    None: None, "float": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
}
ARCHITECTURES = {"dev": "flux-1-dev/lora", "schnell": "flux-1-schnell/lora", "chroma": "chroma/lora"}
IMPLEMENTATIONS = {"dev": "https://github.com/black-forest-labs/flux", "schnell": "https://github.com/black-forest-labs/flux",
                   "chroma": "https://huggingface.co/lodestones/Chroma"}
NETWORK_MODULE = "networks.lora_flux"
DEFAULT_DIM = 4
DEFAULT_ALPHA = 1.0

# ss_<key> ← info[<flag name>] (sd-scripts' arg names), written as str(value) ("None" when absent).
_ARG_KEYS: tuple[str, ...] = (
    "output_name", "learning_rate", "text_encoder_lr", "unet_lr", "gradient_checkpointing", "gradient_accumulation_steps",
    "max_train_steps", "lr_warmup_steps", "lr_scheduler", "network_dropout", "mixed_precision", "full_fp16", "clip_skip",
    "max_token_length", "cache_latents", "seed", "lowram", "noise_offset", "multires_noise_iterations",
    "multires_noise_discount", "adaptive_noise_scale", "zero_terminal_snr", "training_comment", "max_grad_norm",
    "caption_dropout_rate", "caption_dropout_every_n_epochs", "caption_tag_dropout_rate", "face_crop_aug_range",
    "prior_loss_weight", "min_snr_gamma", "scale_weight_norms", "ip_noise_gamma", "debiased_estimation",
    "noise_offset_random_strength", "ip_noise_gamma_random_strength", "loss_type", "huber_schedule", "huber_scale",
    "huber_c", "fp8_base", "fp8_base_unet", "validation_seed", "validation_split", "max_validation_steps",
    "validate_every_n_epochs", "validate_every_n_steps", "resize_interpolation",
    # FLUX additions
    "model_type", "apply_t5_attn_mask", "weighting_scheme", "logit_mean", "logit_std", "mode_scale", "guidance_scale",
    "timestep_sampling", "sigmoid_scale", "model_prediction_type", "discrete_flow_shift",
)
# ss_<key> ← facts the trainer computes.
_FACT_KEYS: tuple[str, ...] = (
    "session_id", "training_started_at", "training_finished_at", "num_train_images", "num_validation_images",
    "num_reg_images", "num_batches_per_epoch", "num_epochs", "optimizer", "steps", "epoch",
)
# Optional keys written only when present: dataset description (JSON or plain) and base-model identity.
_OPTIONAL_KEYS: tuple[str, ...] = (
    "datasets", "tag_frequency", "dataset_dirs", "reg_dataset_dirs", "bucket_info", "batch_size_per_device",
    "total_batch_size", "resolution", "color_aug", "flip_aug", "random_crop", "shuffle_caption", "enable_bucket",
    "bucket_no_upscale", "min_bucket_reso", "max_bucket_reso", "keep_tokens", "sd_model_name", "sd_model_hash",
    "new_sd_model_hash", "vae_name", "vae_hash", "new_vae_hash",
)
_MODELSPEC_FIELDS: tuple[str, ...] = (
    "author", "description", "license", "tags", "usage_hint", "thumbnail", "merged_from", "trigger_phrase", "preprocessor",
    "is_negative_embedding",
)


def save_dtype(precision: str | None) -> torch.dtype | None:
    """`--save_precision` name → dtype (None keeps the fp32 parameters)."""
    if precision not in SAVE_PRECISIONS:
        raise ConfigError(f"--save_precision {precision!r}: expected one of float, fp16, bf16", key="save_precision")
    return SAVE_PRECISIONS[precision]


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) or (isinstance(value, (list, tuple)) and any(isinstance(v, dict) for v in value)):
        return json.dumps(value)
    if isinstance(value, tuple):
        value = list(value)
    return str(value)


def effective_dim_alpha(network_dim: int | None, network_alpha: float | None) -> tuple[int, float]:
    """The rank and alpha the network really uses: dim None → 4, alpha None → 1, alpha 0 → rank."""
    dim = DEFAULT_DIM if network_dim is None else int(network_dim)
    alpha = DEFAULT_ALPHA if network_alpha is None else float(network_alpha)
    return dim, (float(dim) if alpha == 0 else alpha)


def modelspec(info: Mapping[str, Any], *, now: datetime | None = None) -> dict[str, str]:
    """ModelSpec 1.0.1 keys for a FLUX LoRA (`modelspec.architecture` flux-1-dev/lora or flux-1-schnell/lora)."""
    strings = info.get("family_metadata")  # the model family's strings (`ModelFamily.lora_metadata`)
    if not strings:
        variant = info.get("model_variant") or "dev"
        if variant not in ARCHITECTURES:
            raise ValueError(f"model_variant must be one of {sorted(ARCHITECTURES)}, got {variant!r}")
        strings = {"modelspec.architecture": ARCHITECTURES[variant], "modelspec.implementation": IMPLEMENTATIONS[variant]}
    now = now or datetime.now()
    resolution = info.get("resolution")
    if resolution is None:
        reso = "1024x1024"
    elif isinstance(resolution, (int, float)):
        reso = f"{int(resolution)}x{int(resolution)}"
    elif isinstance(resolution, str):
        parts = [p.strip() for p in resolution.split(",")]
        reso = f"{parts[0]}x{parts[-1]}"
    else:
        width, height = tuple(resolution)[0], tuple(resolution)[-1]
        reso = f"{int(width)}x{int(height)}"
    title = info.get("metadata_title") or info.get("output_name") or f"LoRA@{int(now.timestamp())}"
    spec = {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": strings["modelspec.architecture"],
        "modelspec.implementation": strings["modelspec.implementation"],
        "modelspec.title": str(title),
        "modelspec.resolution": reso,
        "modelspec.date": now.replace(microsecond=0).isoformat(),
        "modelspec.implementation_version": f"fluxlora/{__version__}",
    }
    for name in _MODELSPEC_FIELDS:
        value = info.get(f"metadata_{name}")
        if value is not None:
            spec[f"modelspec.{name}"] = _text(value)
    if info.get("min_timestep") is not None or info.get("max_timestep") is not None:
        spec["modelspec.timestep_range"] = f"{info.get('min_timestep') or 0},{info.get('max_timestep') or 1000}"
    if info.get("clip_skip") is not None:
        spec["modelspec.encoder_layer"] = str(info["clip_skip"])
    return spec


def build_metadata(info: Mapping[str, Any], *, no_metadata: bool = False, now: datetime | None = None) -> dict[str, str]:
    """All metadata of a saved LoRA except the `sshs_*` hashes (added by `save_lora`). Every value is a string.

    `info` holds sd-scripts' flag names (`learning_rate`, `network_dim`, `network_args` as the parsed raw dict,
    `metadata_title`, …) and training facts (`model_variant` "dev"/"schnell", `session_id`, `steps`, `epoch`
    1-based, `num_train_images`, `optimizer` "module.Class(k=v,…)", `datasets` …). Absent flags are written as
    "None", as sd-scripts does; absent optional facts are left out. `no_metadata` keeps only the minimal `ss_*` set
    (plus the ModelSpec keys, which are always written).
    """
    dim, alpha = effective_dim_alpha(info.get("network_dim"), info.get("network_alpha"))
    network_args = info.get("network_args")
    minimal = {
        "ss_v2": "False",
        "ss_base_model_version": (info.get("family_metadata") or {}).get("ss_base_model_version")
        or ("chroma" if info.get("model_variant") == "chroma" else "flux1"),
        "ss_network_module": str(info.get("network_module") or NETWORK_MODULE),
        "ss_network_dim": str(dim),
        "ss_network_alpha": str(alpha),
    }
    if network_args:
        minimal["ss_network_args"] = json.dumps(dict(network_args))
    if no_metadata:
        return {**minimal, **modelspec(info, now=now)}
    meta: dict[str, str] = {}
    for key in _FACT_KEYS:
        meta[f"ss_{key}"] = _text(info.get(key))
    if info.get("session_id") is None:
        meta["ss_session_id"] = str(int(time.time_ns() % 2**31))
    for key in _ARG_KEYS:
        meta[f"ss_{key}"] = _text(info.get(key))
    for key in _OPTIONAL_KEYS:
        if info.get(key) is not None:
            meta[f"ss_{key}"] = _text(info[key])
    meta["ss_sd_scripts_commit_hash"] = f"fluxlora/{__version__}"
    meta.update(minimal)
    meta.update(modelspec(info, now=now))
    return meta


def _addnet_hash(payload: bytes) -> str:
    """SHA-256 of the tensor data after the header (sd-scripts `addnet_hash_safetensors`)."""
    header_len = int.from_bytes(payload[:8], "little")
    return hashlib.sha256(payload[8 + header_len :]).hexdigest()


def _legacy_hash(payload: bytes) -> str:
    """First 8 hex digits of SHA-256 of the 64 KiB at offset 1 MiB (sd-scripts `addnet_hash_legacy`)."""
    return hashlib.sha256(payload[0x100000 : 0x100000 + 0x10000]).hexdigest()[:8]


def lora_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None) -> tuple[str, str]:
    """(`sshs_model_hash`, `sshs_legacy_hash`) as sd-scripts computes them (spec §5.7): on a re-serialisation whose
    metadata is only the `ss_*` keys, so later edits of user metadata (titles, thumbnails) do not change the hash."""
    from safetensors.torch import save

    ss_only = {k: v for k, v in (metadata or {}).items() if k.startswith("ss_")}
    data = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    payload = save(data, metadata=ss_only or None)
    return _addnet_hash(payload), _legacy_hash(payload)


def save_lora(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> None:
    """Write a LoRA `.safetensors` atomically with `sshs_model_hash` / `sshs_legacy_hash` added to the metadata."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise ConfigError(f"{path}: LoRA files are saved as .safetensors only (pickle formats can run code when "
                          "loaded); use --save_model_as safetensors", path=path, key="save_model_as")
    meta = dict(metadata or {})
    meta["sshs_model_hash"], meta["sshs_legacy_hash"] = lora_hashes(tensors, meta)
    save_safetensors(path, tensors, meta)


def read_lora(path: str | Path, *, flag: str = "--network_weights") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a LoRA file (header validated first; pickles refused) → (tensors on CPU, metadata)."""
    from fluxlora.models.checkpoints import load_tensors, read_header

    header = read_header(path, flag=flag)
    if not header.tensors:
        raise CheckpointError(f"{flag} {path}: the file holds no tensors; pass a LoRA .safetensors file",
                              path=path, key=flag)
    return load_tensors(header), dict(header.metadata)
