"""The `ss_*` / `modelspec.*` metadata of every file fluxlora writes (spec §6.3): one builder for training, merge
and extract.

The strings that name the base model (`modelspec.architecture`, `modelspec.implementation`,
`ss_base_model_version`) are inputs (`ArchitectureStrings`): a model family supplies them. Everything else is a
pure function of the facts passed in. Fixes of spec §12.26: `ss_network_dim` is the real default rank (4, never
"None"); `ss_epoch` is whatever 1-based number the trainer passes; nothing here hashes the ~23 GB base checkpoint
(`ss_new_sd_model_hash` only when a value is passed); `ss_sd_model_name` is the file's base name.

How much is written (`detail`):
- "full": every `ss_*` key sd-scripts writes for a training run, plus ModelSpec (a training save);
- "minimal": the minimal `ss_*` set plus ModelSpec (training with `--no_metadata`; merge and extract by default);
- "bare": the minimal `ss_*` set only (merge / extract with `--no_metadata`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from fluxlora import __version__

Detail = Literal["full", "minimal", "bare"]


@dataclass(frozen=True)
class ArchitectureStrings:
    """How files name the base model they belong to (a model family supplies these)."""

    architecture: str  # ModelSpec architecture of the model itself, e.g. "flux-1-dev"; a LoRA adds "/lora"
    implementation: str  # modelspec.implementation: where the reference implementation lives
    base_model_version: str  # ss_base_model_version, e.g. "flux1" (what sd-scripts-based tools switch on)

    @property
    def lora_architecture(self) -> str:
        return f"{self.architecture}/lora"

    @classmethod
    def of_lora(cls, metadata: Mapping[str, str]) -> ArchitectureStrings | None:
        """The strings a LoRA file carries (None when it names no architecture: files of other tools)."""
        architecture = metadata.get("modelspec.architecture", "")
        if not architecture:
            return None
        return cls(architecture.removesuffix("/lora"), metadata.get("modelspec.implementation", ""),
                   metadata.get("ss_base_model_version", ""))


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


def _resolution_text(resolution: Any) -> str:
    if resolution is None:
        return "1024x1024"
    if isinstance(resolution, (int, float)):
        return f"{int(resolution)}x{int(resolution)}"
    if isinstance(resolution, str):
        parts = [p.strip() for p in resolution.split(",")]
        return f"{parts[0]}x{parts[-1]}"
    width, height = tuple(resolution)[0], tuple(resolution)[-1]
    return f"{int(width)}x{int(height)}"


def modelspec(info: Mapping[str, Any], architecture: ArchitectureStrings, *, lora: bool = True,
              now: datetime | None = None) -> dict[str, str]:
    """ModelSpec 1.0.1 keys of a LoRA (`lora=True`: architecture + "/lora") or of a whole model file.

    `info` may hold `metadata_title` (else `output_name`, else `LoRA@<time>`), the other `metadata_*` fields,
    `resolution`, `min_timestep` / `max_timestep` and `clip_skip`, as sd-scripts writes them.
    """
    now = now or datetime.now()
    title = info.get("metadata_title") or info.get("output_name") or f"LoRA@{int(now.timestamp())}"
    spec = {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": architecture.lora_architecture if lora else architecture.architecture,
        "modelspec.implementation": architecture.implementation,
        "modelspec.title": str(title),
        "modelspec.resolution": _resolution_text(info.get("resolution")),
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


def _minimal(info: Mapping[str, Any], architecture: ArchitectureStrings) -> dict[str, str]:
    dim, alpha = info.get("network_dim"), info.get("network_alpha")
    if not isinstance(dim, str) and not isinstance(alpha, str):  # tools pass "Dynamic" for mixed ranks
        dim, alpha = effective_dim_alpha(dim, alpha)
    minimal = {
        "ss_v2": "False",
        "ss_base_model_version": architecture.base_model_version,
        "ss_network_module": str(info.get("network_module") or NETWORK_MODULE),
        "ss_network_dim": str(dim),
        "ss_network_alpha": str(alpha),
    }
    if info.get("network_args") is not None:
        minimal["ss_network_args"] = json.dumps(dict(info["network_args"]))
    if info.get("merged_from") is not None:
        minimal["ss_merged_from"] = str(info["merged_from"])
    return minimal


def build_metadata(info: Mapping[str, Any], architecture: ArchitectureStrings, *, detail: Detail = "full",
                   now: datetime | None = None) -> dict[str, str]:
    """The metadata of a LoRA file except the `sshs_*` hashes (added by `save_lora`). Every value is a string.

    `info` holds sd-scripts' flag names (`learning_rate`, `network_dim`, `network_args` as the parsed raw dict —
    None leaves `ss_network_args` out —, `metadata_title`, …), training facts (`session_id`, `steps`, `epoch`
    1-based, `num_train_images`, `optimizer` "module.Class(k=v,…)", `datasets` …) and, for merges, `merged_from`.
    Absent flags are written as "None", as sd-scripts does; absent optional facts are left out. See the module
    docstring for `detail`.
    """
    minimal = _minimal(info, architecture)
    if detail == "bare":
        return minimal
    if detail == "minimal":
        return {**minimal, **modelspec(info, architecture, now=now)}
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
    meta.update(modelspec(info, architecture, now=now))
    return meta


def model_metadata(architecture: ArchitectureStrings, *, title: str, merged_from: str | None,
                   with_modelspec: bool = True, now: datetime | None = None) -> dict[str, str]:
    """The metadata of a whole model file written by a tool (a LoRA merged into FLUX.1 / CLIP-L / T5)."""
    metadata: dict[str, str] = {}
    if merged_from is not None:
        metadata["ss_merged_from"] = merged_from
    if with_modelspec:
        info = {"metadata_title": title, "metadata_merged_from": merged_from}
        metadata.update(modelspec(info, architecture, lora=False, now=now))
    return metadata
