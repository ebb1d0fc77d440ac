"""Derived values and every cross-flag check of the training settings (used by `train_config.parse_train_config`).

Checks never stop at the first problem: each returns messages, and the caller reports them together.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fluxlora.config.dataset_options import cache_conflicts
from fluxlora.config.network_args import NetworkArgs, parse_network_args
from fluxlora.config.optim_specs import OptimizerSpec, SchedulerSpec, optim_specs
from fluxlora.errors import ConfigError

if TYPE_CHECKING:
    from fluxlora.config.train_config import TrainConfig

NETWORK_MODULES = ("networks.lora_flux", "fluxlora.network.lora", "lycoris.kohya")
MAX_BLOCKS_TO_SWAP = 35  # FLUX: 17 of 19 double + 36 of 38 single blocks (spec §7.1)
REQUIRED = {
    "pretrained_model_name_or_path": "the transformer checkpoint",
    "ae": "the autoencoder safetensors",
    "output_dir": "the folder for the LoRA files",
}
# flag -> what must exist: "file", "dir" or "any"
EXISTING_PATHS = {
    "pretrained_model_name_or_path": "any", "clip_l": "file", "t5xxl": "file", "text_encoder": "file",
    "ae": "file",
    "dataset_config": "file", "train_data_dir": "dir", "reg_data_dir": "dir", "in_json": "file",
    "network_weights": "file", "sample_prompts": "file", "resume": "dir", "log_tracker_config": "file",
}
PATH_FLAGS = (*EXISTING_PATHS, "tokenizer_cache_dir", "output_dir", "cache_dir", "logging_dir", "console_log_file")
def _nearest16(value: int) -> int:
    return max(16, math.floor(value / 16 + 0.5) * 16)  # round half up


def _parse_resolution(text: Any, errors: list[str]) -> tuple[int, int] | None:
    if text is None:
        return None
    parts = [p.strip() for p in str(text).split(",")]
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        sizes = []
    if len(sizes) not in (1, 2) or min(sizes) <= 0:
        errors.append(f"--resolution {text!r} must be 'size' or 'width,height' with positive integers, e.g. 1024,768")
        return None
    width, height = sizes if len(sizes) == 2 else (sizes[0], sizes[0])
    for side in dict.fromkeys((width, height)):
        if side % 16:
            errors.append(
                f"--resolution {text}: {side} is not a multiple of 16 (FLUX needs ×8 autoencoder and 2×2 patches); "
                f"use {_nearest16(side)}"
            )
    return width, height


def _parse_face_crop(text: Any, errors: list[str]) -> tuple[float, float] | None:
    if text is None:
        return None
    try:
        low, high = (float(p) for p in str(text).split(","))
    except ValueError:
        errors.append(f"--face_crop_aug_range {text!r} must be two numbers 'a,b', e.g. 2.0,4.0")
        return None
    return low, high


def derive(values: Mapping[str, Any], given: Mapping[str, Any]) -> tuple[dict[str, Any], list[str], list[str]]:
    """Compute derived values once. Returns (values, errors, notes)."""
    d = dict(values)
    errors: list[str] = []
    notes: list[str] = []
    if given.get("caption_extention") is not None:
        if "caption_extension" in given and given["caption_extension"] != given["caption_extention"]:
            errors.append("--caption_extension and its old spelling --caption_extention disagree; give only one")
        d["caption_extension"] = given["caption_extention"]
    ext = d["caption_extension"] or ""
    d["caption_extension"] = ext if not ext or ext.startswith(".") else "." + ext
    d["resolution"] = _parse_resolution(d["resolution"], errors)
    d["face_crop_aug_range"] = _parse_face_crop(d["face_crop_aug_range"], errors)
    d["cache_latents"] = bool(d["cache_latents"] or d["cache_latents_to_disk"])
    d["cache_text_encoder_outputs"] = bool(d["cache_text_encoder_outputs"] or d["cache_text_encoder_outputs_to_disk"])
    d["fp8_base"] = bool(d["fp8_base"] or d["fp8_base_unet"] or d["fp8_scaled"])
    if d["split_mode"]:
        if "blocks_to_swap" in given:
            notes.append("--split_mode is deprecated and ignored because --blocks_to_swap is given")
        else:
            d["blocks_to_swap"] = 18
            notes.append("--split_mode is deprecated: using --blocks_to_swap 18 instead")
    d["blocks_to_swap"] = d["blocks_to_swap"] or 0
    if d["dynamo_backend"] == "no":  # accelerate's "no compilation" (from a --config_file): no torch.compile
        if d["torch_compile"]:
            notes.append("--torch_compile is off: dynamo_backend = \"no\" means no compilation (accelerate, "
                         "sd-scripts)")
        d["torch_compile"] = False
    d["optimizer_type"] = _optimizer_name(d, errors)
    d["network_module"] = d["network_module"] or NETWORK_MODULES[0]
    d["network_dim"] = 4 if d["network_dim"] is None else d["network_dim"]
    if not d["network_alpha"]:
        d["network_alpha"] = float(d["network_dim"])
        notes.append(f"--network_alpha 0 means alpha = rank: using {d['network_alpha']}")
    for name in ("network_args", "optimizer_args", "lr_scheduler_args", "text_encoder_lr"):
        d[name] = tuple(d[name] or ())
    _parse_specs(d, errors)
    d["base_weights"] = tuple(Path(p) for p in d["base_weights"] or ())
    multipliers = tuple(d["base_weights_multiplier"] or ())
    if multipliers and len(multipliers) != len(d["base_weights"]):
        errors.append(f"--base_weights_multiplier has {len(multipliers)} values for {len(d['base_weights'])} "
                      "--base_weights files; give one per file (or none for 1.0 each)")
    d["base_weights_multiplier"] = multipliers or (1.0,) * len(d["base_weights"])
    for name in ("sample_every_n_steps", "sample_every_n_epochs"):
        if d[name] is not None and d[name] <= 0:
            notes.append(f"--{name} {d[name]} disables sampling (as in sd-scripts)")
            d[name] = None
    for name in PATH_FLAGS:
        d[name] = Path(d[name]) if d[name] is not None else None
    if d["logging_dir"] is not None and d["log_with"] is None:
        d["log_with"] = "tensorboard"  # sd-scripts turns TensorBoard on from --logging_dir alone
    return d, errors, notes


def _parse_specs(d: dict[str, Any], errors: list[str]) -> None:
    """--network_args, --optimizer_args and --lr_scheduler_args parsed once into their typed specs."""
    try:
        d["network_spec"] = parse_network_args(d["network_args"], network_dropout=d["network_dropout"],
                                               network_module=d["network_module"])
    except ConfigError as err:
        errors.append(str(err))
        d["network_spec"] = NetworkArgs()
    try:
        d["optimizer_spec"], d["scheduler_spec"] = optim_specs(d)
    except ConfigError as err:
        errors.append(str(err))
        d["optimizer_spec"], d["scheduler_spec"] = OptimizerSpec(d["optimizer_type"], d["learning_rate"]), SchedulerSpec()


def _optimizer_name(d: Mapping[str, Any], errors: list[str]) -> str:
    aliases = [name for flag, name in (("use_8bit_adam", "AdamW8bit"), ("use_lion_optimizer", "Lion")) if d[flag]]
    if len(aliases) > 1 or (aliases and d["optimizer_type"]):
        errors.append("--use_8bit_adam / --use_lion_optimizer are old aliases of --optimizer_type; give only one of them")
    return d["optimizer_type"] or (aliases[0] if aliases else "AdamW")


def _check_paths(d: Mapping[str, Any], errors: list[str]) -> None:
    for flag, what in REQUIRED.items():
        if d[flag] is None:
            errors.append(f"--{flag} is required ({what})")
    for flag, kind in EXISTING_PATHS.items():
        path = d[flag]
        if path is None:
            continue
        if not path.exists():
            errors.append(f"--{flag} {path} does not exist; check the path")
        elif kind == "file" and not path.is_file():
            errors.append(f"--{flag} {path} is a folder; give the file")
        elif kind == "dir" and not path.is_dir():
            errors.append(f"--{flag} {path} is a file; give the folder")
    for path in d["base_weights"]:
        if not path.is_file():
            errors.append(f"--base_weights {path} does not exist; check the path")
    if d["output_dir"] is not None and d["output_dir"].exists() and not d["output_dir"].is_dir():
        errors.append(f"--output_dir {d['output_dir']} is a file; give a folder")


def _check_dataset(d: Mapping[str, Any], given: Mapping[str, Any], errors: list[str]) -> None:
    cli_data = [f for f in ("train_data_dir", "reg_data_dir", "in_json") if d[f] is not None]
    if d["dataset_config"] is not None and cli_data:
        errors.append(f"--dataset_config and --{cli_data[0]} both describe the data (sd-scripts silently ignores "
                      f"--{cli_data[0]}); give only one")
    elif d["dataset_config"] is None and d["train_data_dir"] is None:
        errors.append("--dataset_config (or --train_data_dir) is required: no training data given")
    elif d["dataset_config"] is None and "resolution" not in given and d["train_data_dir"] is not None:
        errors.append("--resolution is required with --train_data_dir (e.g. --resolution 1024)")
    if d["bucket_reso_steps"] <= 0 or d["bucket_reso_steps"] % 16:
        errors.append(
            f"--bucket_reso_steps {d['bucket_reso_steps']} must be a positive multiple of 16: FLUX latents are "
            f"1/8 of the pixels and packed in 2×2 patches; use {_nearest16(d['bucket_reso_steps'])}"
        )
    if d["min_bucket_reso"] > d["max_bucket_reso"]:
        errors.append(f"--min_bucket_reso {d['min_bucket_reso']} is above --max_bucket_reso {d['max_bucket_reso']}")
    for name in ("caption_dropout_rate", "caption_tag_dropout_rate", "validation_split"):
        if not 0.0 <= d[name] <= 1.0:
            errors.append(f"--{name} {d[name]} must be between 0 and 1")


def _check_network(d: Mapping[str, Any], errors: list[str], notes: list[str]) -> None:
    module = d["network_module"]
    if module == "networks.oft_flux":
        errors.append("--network_module networks.oft_flux (OFT) is not supported; use networks.lora_flux")
    elif module not in NETWORK_MODULES:
        errors.append(f"--network_module {module} is not supported; use networks.lora_flux (LoRA, dora_wd=True for "
                      "DoRA) or lycoris.kohya (algo=lokr|loha|locon|full)")
    if d["network_dim"] <= 0:
        errors.append(f"--network_dim {d['network_dim']} must be a positive rank (e.g. 16)")
    if d["network_alpha"] < 0:
        errors.append(f"--network_alpha {d['network_alpha']} must not be negative")
    if len(d["text_encoder_lr"]) > 2 or any(lr < 0 for lr in d["text_encoder_lr"]):
        errors.append("--text_encoder_lr takes at most two non-negative values (CLIP-L, then T5)")
    if d["unet_lr"] is not None and d["unet_lr"] < 0:
        errors.append(f"--unet_lr {d['unet_lr']} must not be negative")
    if d["network_train_unet_only"] and d["network_train_text_encoder_only"]:
        errors.append("--network_train_unet_only and --network_train_text_encoder_only exclude each other; "
                      "give at most one")
    if d["dim_from_weights"] and d["network_weights"] is None:
        errors.append("--dim_from_weights needs --network_weights to read the ranks from")
    if d["cache_text_encoder_outputs"]:
        if d["network_spec"].train_t5xxl:
            errors.append("--cache_text_encoder_outputs cannot be used with network_args train_t5xxl=True: a trained "
                          "T5 changes its outputs every step; drop one of them")
        elif not d["network_train_unet_only"]:
            notes.append("CLIP-L LoRA is trained (no --network_train_unet_only), so CLIP-L runs every step and only "
                         "T5 outputs are cached (as in sd-scripts)")


def _check_caching_flags(d: Mapping[str, Any], errors: list[str]) -> None:
    for c in cache_conflicts(d, cache_latents=d["cache_latents"],
                             cache_text_encoder_outputs=d["cache_text_encoder_outputs"]):
        errors.append(f"{c.flag} cannot be used with --{c.name} (it {c.why}); drop one")
    if d["vae_batch_size"] < 1:
        errors.append(f"--vae_batch_size {d['vae_batch_size']} must be at least 1")
    if d["text_encoder_batch_size"] is not None and d["text_encoder_batch_size"] < 1:
        errors.append(f"--text_encoder_batch_size {d['text_encoder_batch_size']} must be at least 1")


def _check_precision_memory(d: Mapping[str, Any], given: Mapping[str, Any], errors: list[str],
                            warnings: list[str]) -> None:
    mp = d["mixed_precision"]
    if d["full_bf16"] and mp != "bf16":
        errors.append(f"--full_bf16 needs --mixed_precision bf16 (it is {mp})")
    if d["full_fp16"] and mp != "fp16":
        errors.append(f"--full_fp16 needs --mixed_precision fp16 (it is {mp})")
    if d["fp8_base"] and mp == "no":
        flag = next(f for f in ("fp8_base", "fp8_base_unet", "fp8_scaled") if given.get(f))
        errors.append(f"--{flag} needs --mixed_precision bf16 (or fp16): fp8 weights are computed under autocast")
    if mp == "fp16":
        warnings.append("--mixed_precision fp16: FLUX activations can overflow in fp16; prefer bf16 if the GPU has it")
    swap = d["blocks_to_swap"]
    if swap != "auto" and not 0 <= swap <= MAX_BLOCKS_TO_SWAP:
        errors.append(f"--blocks_to_swap {swap} must be between 0 and {MAX_BLOCKS_TO_SWAP} (or auto)")
    if swap and d["cpu_offload_checkpointing"]:
        errors.append("--blocks_to_swap cannot be used with --cpu_offload_checkpointing; choose one")
    if d["cpu_offload_checkpointing"] and not d["gradient_checkpointing"]:
        errors.append("--cpu_offload_checkpointing has no effect without --gradient_checkpointing; add it")
    _check_checkpoint_blocks(d, errors)
    if d["save_model_as"] in ("ckpt", "pt"):
        errors.append(f"--save_model_as {d['save_model_as']} is not supported: pickle files can run code when "
                      "loaded; use --save_model_as safetensors")


def _check_checkpoint_blocks(d: Mapping[str, Any], errors: list[str]) -> None:
    """--checkpoint_blocks: needs --gradient_checkpointing, is non-negative and covers the swapped blocks. The
    upper bound is the model's block count, checked in preflight from the file header."""
    n = d["checkpoint_blocks"]
    if n is None:
        return
    if not d["gradient_checkpointing"]:
        errors.append(f"--checkpoint_blocks {n} needs --gradient_checkpointing (it chooses how many blocks are "
                      "checkpointed); add --gradient_checkpointing or drop --checkpoint_blocks")
        return
    if n == "auto":
        return
    if n < 0:
        errors.append(f"--checkpoint_blocks {n} must be 0 or more (or auto)")
    swap = d["blocks_to_swap"]
    if swap not in ("auto", None) and 0 < swap <= MAX_BLOCKS_TO_SWAP:
        swapped = swap // 2 + 2 * (swap - swap // 2)  # sd-scripts' split: N//2 double + 2·(N − N//2) single
        if n < swapped:
            errors.append(f"--checkpoint_blocks {n} is below the {swapped} blocks --blocks_to_swap {swap} streams; "
                          f"swapped blocks must be recomputed in backward, so use --checkpoint_blocks {swapped} or "
                          "more")


def _check_numbers(d: Mapping[str, Any], given: Mapping[str, Any], errors: list[str]) -> None:
    for name in ("learning_rate", "max_train_steps", "train_batch_size", "gradient_accumulation_steps"):
        if d[name] <= 0:
            errors.append(f"--{name} {d[name]} must be positive")
    if d["max_train_epochs"] is not None and d["max_train_epochs"] <= 0:
        errors.append(f"--max_train_epochs {d['max_train_epochs']} must be positive")
    non_negative = ("lr_warmup_steps", "lr_decay_steps", "max_grad_norm", "keep_tokens", "max_data_loader_n_workers",
                    "max_nan_steps", "initial_epoch", "initial_step", "ip_noise_gamma", "seed", "validation_seed")
    for name in non_negative:
        if d[name] is not None and d[name] < 0:
            errors.append(f"--{name} {d[name]} must not be negative")
    positive_if_given = ("save_every_n_epochs", "save_every_n_steps", "save_n_epoch_ratio", "save_last_n_epochs",
                         "save_last_n_epochs_state", "save_last_n_steps", "save_last_n_steps_state",
                         "validate_every_n_steps", "validate_every_n_epochs", "max_validation_steps",
                         "dataset_repeats", "lr_scheduler_num_cycles", "discrete_flow_shift", "sigmoid_scale")
    for name in positive_if_given:
        if d[name] is not None and d[name] <= 0:
            errors.append(f"--{name} {d[name]} must be positive")
    length = d["t5xxl_max_token_length"]
    if length is not None and not 1 <= length <= 512:
        errors.append(f"--t5xxl_max_token_length {length} must be between 1 and 512")
    if d["huber_schedule"] == "snr" and d["loss_type"] in ("huber", "smooth_l1"):  # l1/l2 never read it
        errors.append(f"--huber_schedule snr needs a DDPM noise schedule and fails with FLUX's flow matching "
                      f"(sd-scripts raises too) for --loss_type {d['loss_type']}; use constant or exponential")


def _check_schedules(d: Mapping[str, Any], errors: list[str]) -> None:
    for name in ("sample_every_n_steps", "sample_every_n_epochs"):
        if d[name] is not None and d["sample_prompts"] is None:
            errors.append(f"--{name} needs --sample_prompts (a .txt, .toml or .json prompt file)")
    if d["log_with"] in ("tensorboard", "all") and d["logging_dir"] is None:
        errors.append(f"--log_with {d['log_with']} needs --logging_dir for the TensorBoard files")
    if d["resume_force"] and d["resume"] is None:
        errors.append("--resume_force needs --resume STATE_DIR")
    output_dir = d["output_dir"]
    if output_dir is not None and d["resume"] is None and not d["overwrite"] and d["save_model_as"]:
        last = output_dir / f"{d['output_name'] or 'last'}.{d['save_model_as']}"
        if last.exists():
            errors.append(f"--output_dir already holds {last.name}; pass --overwrite to replace it, or choose "
                          "another --output_name")


def validate(d: Mapping[str, Any], given: Mapping[str, Any]) -> tuple[list[str], list[str], list[str]]:
    """Every cross-flag check on derived values. Returns (errors, warnings, notes)."""
    errors: list[str] = []
    warnings: list[str] = []
    notes: list[str] = []
    _check_paths(d, errors)
    _check_dataset(d, given, errors)
    _check_network(d, errors, notes)
    _check_caching_flags(d, errors)
    _check_precision_memory(d, given, errors, warnings)
    _check_numbers(d, given, errors)
    _check_schedules(d, errors)
    return errors, warnings, notes


def check_caching_conflicts(cfg: TrainConfig, subset_options: Iterable[Any]) -> None:
    """Check dataset-TOML subsets against the caching flags; raise one ConfigError listing every conflict.

    Each subset is a `SubsetConfig` or a mapping with the same keys; its `key` (e.g. "datasets[0].subsets[1]")
    names it in the message. The rules are the option table's (`dataset_options.cache_conflicts`).
    """
    problems: list[str] = []
    for index, subset in enumerate(subset_options):
        where = (subset.get("key") if isinstance(subset, Mapping) else getattr(subset, "key", None)) or f"subset {index}"
        problems += [f"{where}.{c.name} {c.why}, which {c.flag} cannot hold" for c in cache_conflicts(
            subset, cache_latents=cfg.caching.cache_latents,
            cache_text_encoder_outputs=cfg.caching.cache_text_encoder_outputs)]
    if problems:
        raise ConfigError(
            "; ".join(problems) + "; turn the option off in the dataset TOML or drop the caching flag",
            path=cfg.dataset_flags.dataset_config, key=problems[0].split(" ", 1)[0],
        )
