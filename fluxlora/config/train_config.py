"""The training settings as one typed, frozen object, parsed and validated once (`parse_train_config`).

Field names equal sd-scripts' flag names (so `grep` finds them); they are grouped by the stage that reads them.
Derived values are computed here once: resolution as (W, H), caption extension with its dot, `cache_latents`
implied by `--cache_latents_to_disk`, `fp8_base` implied by `--fp8_base_unet`, `--split_mode` as
blocks_to_swap 18, the optimizer name from the old `--use_8bit_adam` / `--use_lion_optimizer` aliases.
Nothing downstream reads an argparse Namespace.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fluxlora.config.args import build_parser, parse_given
from fluxlora.config.config_file import read_config_file
from fluxlora.config.dataset_options import DatasetFlags
from fluxlora.config.defaults import differing_defaults, effective_defaults, format_differences
from fluxlora.config.network_args import NetworkArgs
from fluxlora.config.optim_specs import OptimizerSpec, SchedulerSpec
from fluxlora.config.unsupported import check_unsupported, ignored_block
from fluxlora.config.validate import check_caching_conflicts, derive, validate
from fluxlora.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = ["DatasetFlags", "TrainConfig", "check_caching_conflicts", "describe_differences", "parse_train_config",
           "startup_report"]


@dataclass(frozen=True)
class ModelFiles:
    pretrained_model_name_or_path: Path
    clip_l: Path | None  # text-encoder files: which are required is the model family's (preflight checks)
    t5xxl: Path | None
    text_encoder: Path | None  # FLUX.2's one text encoder (Mistral Small 3 / Qwen3), musubi-tuner's flag
    ae: Path
    model_type: str | None  # None: the family is detected from the transformer file's header
    model_version: str | None  # FLUX.2 variant, musubi-tuner's spelling (dev, klein-base-4b, ...); None: from the file
    tokenizer_cache_dir: Path | None
    disable_mmap_load_safetensors: bool


@dataclass(frozen=True)
class NetworkSettings:
    network_module: str
    network_dim: int  # sd-scripts' None is resolved to 4
    network_alpha: float  # 0 is resolved to network_dim (sd-scripts' rule); never 0
    network_dropout: float | None
    network_args: tuple[str, ...]  # the "k=v" strings as given (ss_network_args, resume fingerprint)
    network_weights: Path | None
    dim_from_weights: bool
    network_train_unet_only: bool
    network_train_text_encoder_only: bool
    unet_lr: float | None
    text_encoder_lr: tuple[float, ...]  # () = --learning_rate for both
    base_weights: tuple[Path, ...]
    base_weights_multiplier: tuple[float, ...]  # one per base weight (1.0 when not given)
    scale_weight_norms: float | None
    training_comment: str | None
    network_spec: NetworkArgs  # --network_args parsed and validated (with --network_dropout)


@dataclass(frozen=True)
class OptimizerSettings:
    optimizer_type: str  # "AdamW" when none given; aliases resolved
    optimizer_args: tuple[str, ...]  # "k=v" strings, parsed by the optimizer builder
    learning_rate: float
    max_grad_norm: float
    lr_scheduler: str
    lr_warmup_steps: int | float  # float < 1 = fraction of the steps
    lr_decay_steps: int | float
    lr_scheduler_num_cycles: int
    lr_scheduler_power: float
    lr_scheduler_timescale: int | None
    lr_scheduler_min_lr_ratio: float | None
    lr_scheduler_type: str
    lr_scheduler_args: tuple[str, ...]
    optimizer_spec: OptimizerSpec  # the flags above, typed, with --optimizer_args parsed
    scheduler_spec: SchedulerSpec  # the --lr_* flags, typed, with --lr_scheduler_args parsed


@dataclass(frozen=True)
class TrainingSettings:
    max_train_steps: int
    max_train_epochs: int | None
    gradient_accumulation_steps: int
    seed: int | None
    max_nan_steps: int
    dry_run: bool


@dataclass(frozen=True)
class PrecisionSettings:
    mixed_precision: str
    full_bf16: bool
    full_fp16: bool
    fp8_base: bool  # also True with fp8_base_unet / fp8_scaled
    fp8_base_unet: bool
    fp8_scaled: bool
    save_precision: str | None
    no_half_vae: bool


@dataclass(frozen=True)
class MemorySettings:
    gradient_checkpointing: bool
    checkpoint_blocks: int | str | None  # None = every block (with gradient_checkpointing); "auto" = planner's choice
    cpu_offload_checkpointing: bool
    blocks_to_swap: int | str  # 0 = none; "auto" = chosen from the free GPU memory
    lowram: bool
    highvram: bool
    torch_compile: bool
    dynamo_backend: str
    dynamo_mode: str | None
    dynamo_fullgraph: bool
    dynamo_dynamic: bool
    ddp_timeout: int | None
    ddp_gradient_as_bucket_view: bool
    ddp_static_graph: bool


@dataclass(frozen=True)
class CachingSettings:
    cache_latents: bool  # also True with cache_latents_to_disk
    cache_latents_to_disk: bool
    vae_batch_size: int
    skip_cache_check: bool
    cache_text_encoder_outputs: bool  # also True with cache_text_encoder_outputs_to_disk
    cache_text_encoder_outputs_to_disk: bool
    text_encoder_batch_size: int | None
    cache_dir: Path | None


@dataclass(frozen=True)
class FlowSettings:
    t5xxl_max_token_length: int | None  # None = 512 for dev, 256 for schnell (known once the model is read)
    apply_t5_attn_mask: bool
    guidance_scale: float
    timestep_sampling: str
    sigmoid_scale: float
    discrete_flow_shift: float
    model_prediction_type: str
    weighting_scheme: str
    logit_mean: float
    logit_std: float
    mode_scale: float
    ip_noise_gamma: float | None
    ip_noise_gamma_random_strength: bool
    loss_type: str
    huber_schedule: str
    huber_c: float
    huber_scale: float


@dataclass(frozen=True)
class SavingSettings:
    output_dir: Path
    output_name: str | None
    save_model_as: str
    save_every_n_epochs: int | None
    save_every_n_steps: int | None
    save_n_epoch_ratio: int | None
    save_last_n_epochs: int | None
    save_last_n_epochs_state: int | None
    save_last_n_steps: int | None
    save_last_n_steps_state: int | None
    save_state: bool
    save_state_on_train_end: bool
    resume: Path | None
    resume_force: bool
    initial_epoch: int | None
    initial_step: int | None
    skip_until_initial_step: bool
    overwrite: bool
    no_metadata: bool
    metadata_title: str | None
    metadata_author: str | None
    metadata_description: str | None
    metadata_license: str | None
    metadata_tags: str | None
    metadata_usage_hint: str | None
    metadata_thumbnail: str | None
    metadata_merged_from: str | None
    metadata_trigger_phrase: str | None
    metadata_preprocessor: str | None
    metadata_is_negative_embedding: str | None


@dataclass(frozen=True)
class SamplingSettings:
    sample_prompts: Path | None
    sample_every_n_steps: int | None  # <= 0 is resolved to None (disabled), as in sd-scripts
    sample_every_n_epochs: int | None
    sample_at_first: bool
    sample_grid: bool  # also write a labelled grid per event to <output_dir>/sample_grid/


@dataclass(frozen=True)
class ValidationSettings:
    """When to validate; the split itself is `dataset_flags.validation_split` / `validation_seed`."""

    validate_every_n_steps: int | None
    validate_every_n_epochs: int | None
    max_validation_steps: int | None


@dataclass(frozen=True)
class LoggingSettings:
    logging_dir: Path | None
    log_with: str | None
    log_prefix: str | None
    log_tracker_name: str | None
    log_tracker_config: Path | None
    wandb_run_name: str | None
    wandb_api_key: str | None
    log_config: bool
    console_log_level: str | None
    console_log_file: Path | None
    console_log_simple: bool


# Typed views of several flags (not flags themselves): left out of `TrainConfig.flat()`.
SPEC_FIELDS = frozenset({"network_spec", "optimizer_spec", "scheduler_spec"})

_GROUPS: dict[str, type] = {
    "model": ModelFiles, "dataset_flags": DatasetFlags, "network": NetworkSettings, "optim": OptimizerSettings,
    "training": TrainingSettings, "precision": PrecisionSettings, "memory": MemorySettings,
    "caching": CachingSettings, "flow": FlowSettings, "saving": SavingSettings, "sampling": SamplingSettings,
    "validation": ValidationSettings, "logging": LoggingSettings,
}


@dataclass(frozen=True)
class TrainConfig:
    """Every training setting, validated. `explicit` names the flags the user gave (command line or config file)."""

    model: ModelFiles
    dataset_flags: DatasetFlags
    network: NetworkSettings
    optim: OptimizerSettings
    training: TrainingSettings
    precision: PrecisionSettings
    memory: MemorySettings
    caching: CachingSettings
    flow: FlowSettings
    saving: SavingSettings
    sampling: SamplingSettings
    validation: ValidationSettings
    logging: LoggingSettings
    explicit: frozenset[str]
    sd_scripts_defaults: bool
    ignore_unsupported: bool
    strict: bool  # settings that change nothing (sd-scripts ignores them) and unknown config keys are errors
    config_file: Path | None
    ignored: tuple[str, ...]  # settings that change nothing in this run, one line each (the start-up block)
    warnings: tuple[str, ...]  # found while validating
    notes: tuple[str, ...]  # the warnings and the informational notes found while validating

    def flat(self) -> dict[str, Any]:
        """{flag name: value} over every group (for metadata, --log_config and tests)."""
        out: dict[str, Any] = {}
        for name in _GROUPS:
            group = getattr(self, name)
            out.update({f.name: getattr(group, f.name) for f in dataclasses.fields(group) if f.name not in SPEC_FIELDS})
        return out


def describe_differences(cfg: TrainConfig) -> str:
    """The one start-up block listing every setting fluxlora filled with a value sd-scripts would not use.

    Flags the user gave are not listed (sd-scripts would use the same value); with `--sd_scripts_defaults`
    nothing differs and the block is ''.
    """
    rows = differing_defaults(
        cfg.explicit, sd_scripts_defaults=cfg.sd_scripts_defaults, sd_defaults=build_parser().sd_defaults
    )
    return format_differences(rows)


def _build(values: dict[str, Any], **top: Any) -> TrainConfig:
    groups = {name: cls(**{f.name: values[f.name] for f in dataclasses.fields(cls)}) for name, cls in _GROUPS.items()}
    return TrainConfig(**groups, **top)


def parse_train_config(argv: Sequence[str]) -> TrainConfig:
    """Parse the training command line (merged with --config_file) into a validated, frozen TrainConfig.

    Every problem found is reported together in one ConfigError. Nothing is logged here: the settings that change
    nothing, the warnings and the notes are kept in the config for `startup_report` (the command line logs them
    once logging is set up). `--output_config` is handled before this by `config_file.maybe_write_output_config`.
    """
    parser = build_parser()
    given = parse_given(argv, parser)
    if given.get("output_config"):
        raise ConfigError("--output_config writes a file and exits; call maybe_write_output_config(argv) first",
                          key="--output_config")
    unknown: list[str] = []
    if "config_file" in given:
        from_file = read_config_file(given["config_file"], parser)
        given = {**from_file.values, **given}  # the command line wins
        unknown = from_file.unknown
    strict = bool(given.get("strict"))
    verdict = check_unsupported(given, parser.sd_defaults, ignore=bool(given.get("ignore_unsupported")),
                                strict=strict)
    errors = list(verdict.errors)
    if strict:
        errors += [f"{u}; remove it, or drop --strict to train with a warning" for u in unknown]
        ignored = verdict.ignored
    else:
        ignored = [*unknown, *verdict.ignored]
    defaults = effective_defaults(parser.sd_defaults, sd_scripts_defaults=bool(given.get("sd_scripts_defaults")))
    values = {**defaults, **given}
    derived, derive_errors, derive_notes = derive(values, given)
    problems, warnings, more_notes = validate(derived, given)
    errors += derive_errors + problems
    warnings = verdict.warnings + warnings
    notes = verdict.notes + derive_notes + more_notes
    if errors:
        raise ConfigError(_join(errors), key=_first_flag(errors))
    return _build(
        derived,
        explicit=frozenset(given),
        sd_scripts_defaults=bool(values["sd_scripts_defaults"]),
        ignore_unsupported=bool(values["ignore_unsupported"]),
        strict=strict,
        config_file=Path(given["config_file"]) if "config_file" in given else None,
        ignored=tuple(ignored),
        warnings=tuple(warnings),
        notes=tuple(warnings + notes),
    )


def startup_report(cfg: TrainConfig) -> list[tuple[int, str]]:
    """(logging level, text) of what the start of a run says about its settings, in order: one warning block with
    every setting that changes nothing, the warnings, the notes, and the defaults that differ from sd-scripts'."""
    report = [(logging.WARNING, ignored_block(cfg.ignored))] if cfg.ignored else []
    report += [(logging.WARNING, w) for w in cfg.warnings]
    report += [(logging.INFO, n) for n in cfg.notes if n not in cfg.warnings]
    differences = describe_differences(cfg)
    if differences:
        report.append((logging.INFO, differences))
    return report


def _join(problems: list[str]) -> str:
    if len(problems) == 1:
        return problems[0]
    return f"{len(problems)} problems with the training flags: " + "; ".join(
        f"({i}) {p}" for i, p in enumerate(problems, 1)
    )


def _first_flag(problems: list[str]) -> str | None:
    for word in problems[0].replace(",", " ").split():
        if word.startswith("--"):
            return word.rstrip(":;.")
    return None
