"""The training command line: every flag of sd-scripts' `flux_train_network.py` (spec §1), plus ours.

Names, types, nargs and choices equal sd-scripts', so existing command lines and `--config_file` TOMLs parse
unchanged. Every argparse default is `None`: a `None` after parsing means "not given", which lets us merge
`--config_file` values (CLI wins) and then fill either our defaults or sd-scripts' (`--sd_scripts_defaults`).
The sd-scripts default of each flag is recorded on the parser (`parser.sd_defaults`) and shown in `--help`.
"""

from __future__ import annotations

import argparse
import difflib
from collections.abc import Sequence
from typing import Any

from fluxlora.config.dataset_options import DATASET_OPTIONS, INTERPOLATIONS
from fluxlora.config.defaults import FLUXLORA_DEFAULTS
from fluxlora.errors import ConfigError

# Our own flags (not in sd-scripts) and their defaults; sd-scripts has no such flags, so "sd-scripts' default" for
# them is simply the value that reproduces sd-scripts' behaviour.
FLUXLORA_FLAGS = (
    "ignore_unsupported", "strict", "sample_grid", "sd_scripts_defaults", "overwrite", "resume_force", "cache_dir",
    "fp8_scaled", "max_nan_steps", "dry_run", "checkpoint_blocks", "text_encoder", "model_version",
    *(o.name for o in DATASET_OPTIONS if o.ours),
)


class FluxArgumentParser(argparse.ArgumentParser):
    """ArgumentParser that raises ConfigError instead of exiting, and remembers sd-scripts' default per flag."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sd_defaults: dict[str, Any] = {}

    def error(self, message: str):  # type: ignore[override]
        raise ConfigError(f"{message}; run with --help to see the accepted flags and values")


def int_or_float(value: str) -> int | float:
    """sd-scripts' `--lr_warmup_steps` syntax: an int step count, a float < 1 (fraction of the steps) or "N%"."""
    text = value.strip()
    if text.endswith("%"):
        try:
            return float(text[:-1]) / 100.0
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not a percentage like 10%") from None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an int, a fraction < 1 or a percentage") from None
    if number < 1:
        return number
    if not number.is_integer():
        raise argparse.ArgumentTypeError(f"{value!r}: a step count must be an integer (or a fraction < 1)")
    return int(number)


def int_or_auto(value: str) -> int | str:
    """`--blocks_to_swap N` or `--blocks_to_swap auto` (fluxlora picks N from the free GPU memory)."""
    if value.strip().lower() == "auto":
        return "auto"
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is neither an integer nor 'auto'") from None


def _adder(parser: FluxArgumentParser, group: argparse._ArgumentGroup):
    """Return `add(name, default, **kwargs)`: registers a flag with default None and records sd-scripts' default."""

    def add(name: str, default: Any = None, **kwargs: Any) -> None:
        dest = kwargs.pop("dest", name)
        flags = [f"--{name}"]
        help_ = kwargs.pop("help", "")
        if kwargs.get("action") == "store_true":
            default = False if default is None else default
        elif default is not None:
            who = "default" if dest in FLUXLORA_FLAGS else "sd-scripts default"
            help_ = f"{help_} ({who}: {default})".strip()
        parser.sd_defaults[dest] = default
        group.add_argument(*flags, dest=dest, default=None, help=help_, **kwargs)

    return add


def _flag(add, name: str, help_: str = "") -> None:
    add(name, action="store_true", help=help_)


def _model_args(parser: FluxArgumentParser) -> None:
    add = _adder(parser, parser.add_argument_group("model files (spec §1.1)"))
    add("pretrained_model_name_or_path", type=str, help="the transformer: BFL safetensors file or diffusers folder [required]")
    add("clip_l", type=str, help="CLIP-L text encoder safetensors [required by FLUX.1]")
    add("t5xxl", type=str, help="T5-XXL encoder safetensors (fp16/bf16/fp8 e4m3fn) [required by FLUX.1]")
    add("text_encoder", type=str, help="FLUX.2 text encoder safetensors: Mistral Small 3 (dev) or Qwen3 4B / 8B "
        "(klein) [required by FLUX.2]")
    add("ae", type=str, help="FLUX autoencoder safetensors [required]")
    add("model_type", type=str, help="model family (flux, ...); default: detected from the transformer file's header")
    add("model_version", type=str, choices=["dev", "klein-4b", "klein-9b", "klein-base-4b", "klein-base-9b"],
        help="FLUX.2 variant (musubi-tuner's spelling); default: from the file (klein base: 'base' in the file name)")
    add("tokenizer_cache_dir", type=str, help="folder with offline tokenizer copies")
    _flag(add, "disable_mmap_load_safetensors", "read safetensors without memory mapping")
    add("controlnet_model_name_or_path", type=str, help="ControlNet (not used by LoRA training)")
    _flag(add, "v2", "Stable Diffusion 2 (not FLUX)")
    _flag(add, "v_parameterization", "Stable Diffusion v-prediction (not FLUX)")
    add("clip_skip", type=int, help="Stable Diffusion CLIP skip (not FLUX)")
    add("vae", type=str, help="Stable Diffusion VAE (FLUX uses --ae)")
    add("max_token_length", type=int, choices=[None, 150, 225], help="SD token length (FLUX: --t5xxl_max_token_length)")


# argparse settings of a dataset option by its kind (`fluxlora.config.dataset_options`).
_KIND_TYPES = {"int": int, "pos_int": int, "nonneg_int": int, "float": float, "nonneg_float": float, "fraction": float,
               "str": str, "path": str, "resolution": str, "range": str}


def _dataset_args(parser: FluxArgumentParser) -> None:
    """The dataset flags: every row of the dataset option table that has a flag (the TOML wins over them)."""
    add = _adder(parser, parser.add_argument_group("dataset (spec §1.2; the dataset TOML wins)"))
    for option in DATASET_OPTIONS:
        name = option.flag_name
        if name is None:
            continue
        if option.kind == "bool":
            _flag(add, name, option.help)
        elif option.kind == "interpolation":
            add(name, option.default, type=str, choices=list(INTERPOLATIONS), help=option.help)
        else:
            add(name, option.default, type=_KIND_TYPES[option.kind], help=option.help)
        if name == "caption_extension":  # sd-scripts' old spelling, merged into caption_extension when parsed
            add("caption_extention", type=str, help="old spelling of --caption_extension")


def _network_args(parser: FluxArgumentParser) -> None:
    add = _adder(parser, parser.add_argument_group("network (spec §1.3)"))
    add("network_module", type=str, help="networks.lora_flux (alias of fluxlora.network.lora), or lycoris.kohya "
        "for LoKr / LoHa / LoCon / full adapters (--network_args algo=...)")
    add("network_dim", type=int, help="LoRA rank (sd-scripts: None means 4)")
    add("network_alpha", 1.0, type=float, help="LoRA alpha; scale = alpha / rank")
    add("network_dropout", type=float, help="dropout on the rank activation")
    add("network_args", type=str, nargs="*", help="k=v network options")
    add("network_weights", type=str, help="initial LoRA weights")
    _flag(add, "dim_from_weights", "take ranks and alphas from --network_weights")
    _flag(add, "network_train_unet_only", "train the DiT LoRA only")
    _flag(add, "network_train_text_encoder_only", "train the text-encoder LoRA only")
    add("unet_lr", type=float, help="DiT LoRA learning rate (default --learning_rate)")
    add("text_encoder_lr", type=float, nargs="*", help="text-encoder LR: one value, or CLIP-L then T5")
    add("base_weights", type=str, nargs="*", help="LoRAs merged into the base before training")
    add("base_weights_multiplier", type=float, nargs="*", help="multipliers of --base_weights")
    add("scale_weight_norms", type=float, help="max-norm regularisation")
    add("training_comment", type=str, help="stored as ss_training_comment")


def _optimizer_args(parser: FluxArgumentParser) -> None:
    add = _adder(parser, parser.add_argument_group("optimizer and schedule (spec §1.4)"))
    add("optimizer_type", "", type=str, help="AdamW, AdamW8bit, Lion, Prodigy, Adafactor, ... or pkg.module.Class")
    _flag(add, "use_8bit_adam", "old alias of --optimizer_type AdamW8bit")
    _flag(add, "use_lion_optimizer", "old alias of --optimizer_type Lion")
    add("optimizer_args", type=str, nargs="*", help="k=v optimizer options")
    add("learning_rate", 2e-6, type=float, help="base learning rate")
    add("max_grad_norm", 1.0, type=float, help="gradient clipping norm (0 disables)")
    add("lr_scheduler", "constant", type=str, help="scheduler name")
    add("lr_warmup_steps", 0, type=int_or_float, help="warmup steps, fraction (< 1) or N%%")
    add("lr_decay_steps", 0, type=int_or_float, help="decay steps of warmup_stable_decay")
    add("lr_scheduler_num_cycles", 1, type=int, help="cosine_with_restarts cycles")
    add("lr_scheduler_power", 1.0, type=float, help="polynomial power")
    add("lr_scheduler_timescale", type=int, help="inverse_sqrt timescale")
    add("lr_scheduler_min_lr_ratio", type=float, help="cosine_with_min_lr / warmup_stable_decay floor")
    add("lr_scheduler_type", "", type=str, help="custom scheduler class")
    add("lr_scheduler_args", type=str, nargs="*", help="k=v scheduler options")
    _flag(add, "fused_backward_pass", "Adafactor fused backward (no effect on LoRA)")
    add("gradient_accumulation_steps", 1, type=int, help="micro-batches per optimizer step")
    add("max_train_steps", 1600, type=int, help="optimizer steps")
    add("max_train_epochs", type=int, help="epochs (overrides --max_train_steps)")
    add("seed", type=int, help="random seed")


def _precision_memory_args(parser: FluxArgumentParser) -> None:
    add = _adder(parser, parser.add_argument_group("precision and memory (spec §1.5)"))
    add("mixed_precision", "no", type=str, choices=["no", "fp16", "bf16"], help="autocast dtype")
    _flag(add, "full_bf16", "LoRA parameters in bf16")
    _flag(add, "full_fp16", "LoRA parameters in fp16")
    _flag(add, "fp8_base", "store the DiT (and T5) in float8 e4m3fn")
    _flag(add, "fp8_base_unet", "store only the DiT in fp8 (implies --fp8_base)")
    add("save_precision", type=str, choices=[None, "float", "fp16", "bf16"], help="dtype of saved LoRA tensors")
    _flag(add, "no_half_vae", "autoencoder in fp32")
    _flag(add, "gradient_checkpointing", "recompute block activations in backward")
    add("checkpoint_blocks", type=int_or_auto, metavar="N|auto",
        help="with --gradient_checkpointing: checkpoint only N of the DiT blocks (the blocks swapped by "
             "--blocks_to_swap, then the first ones in execution order; the others keep their activations and skip "
             "the recompute: faster, more memory), or 'auto' = the fewest whose estimate fits 95%% of the free GPU "
             "memory (all blocks on a CPU). Default: all blocks, as sd-scripts")
    _flag(add, "cpu_offload_checkpointing", "keep checkpointed activations on the CPU")
    add("blocks_to_swap", type=int_or_auto, help="DiT blocks streamed from CPU (0-35) or 'auto'")
    _flag(add, "split_mode", "deprecated: --blocks_to_swap 18")
    _flag(add, "sdpa", "accepted; FLUX always uses PyTorch SDPA")
    _flag(add, "xformers", "accepted; FLUX always uses PyTorch SDPA")
    _flag(add, "mem_eff_attn", "accepted; FLUX always uses PyTorch SDPA")
    _flag(add, "lowram", "keep models on the GPU while caching")
    _flag(add, "highvram", "skip cache clearing while caching latents")
    _flag(add, "torch_compile", "torch.compile the DiT")
    add("dynamo_backend", "inductor", type=str, help="torch.compile backend",
        choices=["eager", "aot_eager", "inductor", "aot_ts_nvfuser", "nvprims_nvfuser", "cudagraphs", "ofi",
                 "fx2trt", "onnxrt", "tensort", "ipex", "tvm"])
    add("dynamo_mode", type=str, choices=["default", "reduce-overhead", "max-autotune"], help="torch.compile mode")
    _flag(add, "dynamo_fullgraph", "torch.compile fullgraph")
    _flag(add, "dynamo_dynamic", "torch.compile dynamic shapes")
    add("ddp_timeout", type=int, help="DDP timeout in minutes")
    _flag(add, "ddp_gradient_as_bucket_view", "DDP gradient_as_bucket_view")
    _flag(add, "ddp_static_graph", "DDP static_graph")
    _flag(add, "deepspeed", "DeepSpeed (not supported)")
    add("zero_stage", 2, type=int, choices=[0, 1, 2, 3], help="DeepSpeed ZeRO stage")
    add("offload_optimizer_device", type=str, choices=[None, "cpu", "nvme"], help="DeepSpeed optimizer offload")
    add("offload_optimizer_nvme_path", type=str, help="DeepSpeed NVMe path")
    add("offload_param_device", type=str, choices=[None, "cpu", "nvme"], help="DeepSpeed parameter offload")
    add("offload_param_nvme_path", type=str, help="DeepSpeed NVMe path")
    _flag(add, "zero3_init_flag", "DeepSpeed ZeRO-3 init")
    _flag(add, "zero3_save_16bit_model", "DeepSpeed ZeRO-3 16-bit save")
    _flag(add, "fp16_master_weights_and_gradients", "DeepSpeed fp16 master weights")


def _caching_args(parser: FluxArgumentParser) -> None:
    add = _adder(parser, parser.add_argument_group("caching (spec §1.6)"))
    _flag(add, "cache_latents", "encode every image once before training")
    _flag(add, "cache_latents_to_disk", "also keep the latent cache on disk (implies --cache_latents)")
    add("vae_batch_size", 1, type=int, help="autoencoder batch when caching")
    _flag(add, "skip_cache_check", "trust existing cache files without opening them")
    _flag(add, "cache_text_encoder_outputs", "encode every caption once before training")
    _flag(add, "cache_text_encoder_outputs_to_disk", "also keep the text cache on disk (implies the above)")
    add("text_encoder_batch_size", type=int, help="text-encoder batch when caching (default: batch size)")


def _flux_args(parser: FluxArgumentParser) -> None:
    add = _adder(parser, parser.add_argument_group("FLUX training (spec §1.7)"))
    add("t5xxl_max_token_length", type=int, help="T5 tokens (default 512 dev, 256 schnell)")
    _flag(add, "apply_t5_attn_mask", "mask T5 padding in T5 and the DiT")
    add("guidance_scale", 3.5, type=float, help="guidance input of FLUX.1 dev during training")
    add("timestep_sampling", "sigma", type=str, choices=["sigma", "uniform", "sigmoid", "shift", "flux_shift"],
        help="noise-level sampling")
    add("sigmoid_scale", 1.0, type=float, help="std multiplier for sigmoid/shift/flux_shift")
    add("discrete_flow_shift", 3.0, type=float, help="shift of 'shift' and of the 'sigma' schedule")
    add("model_prediction_type", "sigma_scaled", type=str, choices=["raw", "additive", "sigma_scaled"],
        help="how the model output is turned into the prediction")
    add("weighting_scheme", "uniform", type=str,
        choices=["sigma_sqrt", "logit_normal", "mode", "cosmap", "none", "uniform"], help="σ density / loss weights")
    add("logit_mean", 0.0, type=float, help="logit_normal mean")
    add("logit_std", 1.0, type=float, help="logit_normal std")
    add("mode_scale", 1.29, type=float, help="mode weighting scale")
    add("ip_noise_gamma", type=float, help="input-perturbation noise strength")
    _flag(add, "ip_noise_gamma_random_strength", "input-perturbation strength ~ U(0, gamma)")
    add("loss_type", "l2", type=str, choices=["l1", "l2", "huber", "smooth_l1"], help="loss function")
    add("huber_schedule", "snr", type=str, choices=["constant", "exponential", "snr"], help="huber_c schedule")
    add("huber_c", 0.1, type=float, help="Huber c")
    add("huber_scale", 1.0, type=float, help="Huber scale")
    add("noise_offset", type=float, help="SD noise offset (not FLUX)")
    _flag(add, "noise_offset_random_strength", "SD noise offset (not FLUX)")
    add("adaptive_noise_scale", type=float, help="SD noise offset (not FLUX)")
    add("multires_noise_iterations", type=int, help="SD multires noise (not FLUX)")
    add("multires_noise_discount", 0.3, type=float, help="SD multires noise (not FLUX)")
    _flag(add, "zero_terminal_snr", "SD zero terminal SNR (not FLUX)")
    add("min_timestep", type=int, help="SD timestep range (not FLUX)")
    add("max_timestep", type=int, help="SD timestep range (not FLUX)")
    add("min_snr_gamma", type=float, help="SD min-SNR weighting (not FLUX)")
    _flag(add, "scale_v_pred_loss_like_noise_pred", "SD v-prediction option (not FLUX)")
    add("v_pred_like_loss", type=float, help="SD v-prediction option (not FLUX)")
    _flag(add, "debiased_estimation_loss", "SD debiased estimation (not FLUX)")


def _saving_args(parser: FluxArgumentParser) -> None:
    add = _adder(parser, parser.add_argument_group("saving, state and resume (spec §1.8)"))
    add("output_dir", type=str, help="output folder [required]")
    add("output_name", type=str, help="base name of the LoRA files")
    add("save_model_as", "safetensors", type=str, choices=[None, "ckpt", "pt", "safetensors"], help="file format")
    add("save_every_n_epochs", type=int, help="save every N epochs")
    add("save_every_n_steps", type=int, help="save every N steps")
    add("save_n_epoch_ratio", type=int, help="save at least N times over the epochs")
    add("save_last_n_epochs", type=int, help="keep the last N epoch saves")
    add("save_last_n_epochs_state", type=int, help="keep the last N epoch states")
    add("save_last_n_steps", type=int, help="keep step saves of the last N steps")
    add("save_last_n_steps_state", type=int, help="keep step states of the last N steps")
    _flag(add, "save_state", "save the training state with each save")
    _flag(add, "save_state_on_train_end", "save the training state at the end")
    add("resume", type=str, help="state folder to resume from")
    add("initial_epoch", type=int, help="starting epoch (1 = first)")
    add("initial_step", type=int, help="starting step (overrides --initial_epoch)")
    _flag(add, "skip_until_initial_step", "consume batches up to the starting step")
    _flag(add, "no_metadata", "write only the minimal ss_* metadata")
    for field in ("title", "author", "description", "license", "tags", "usage_hint", "thumbnail", "merged_from",
                  "trigger_phrase", "preprocessor", "is_negative_embedding"):
        add(f"metadata_{field}", type=str, help=f"modelspec.{field}")
    add("huggingface_repo_id", type=str, help="upload (not supported)")
    add("huggingface_repo_type", type=str, help="upload (not supported)")
    add("huggingface_path_in_repo", type=str, help="upload (not supported)")
    add("huggingface_token", type=str, help="upload (not supported)")
    add("huggingface_repo_visibility", type=str, help="upload (not supported)")
    _flag(add, "save_state_to_huggingface", "upload (not supported)")
    _flag(add, "resume_from_huggingface", "download a state (not supported)")
    _flag(add, "async_upload", "upload (not supported)")


def _sampling_validation_logging_args(parser: FluxArgumentParser) -> None:
    add = _adder(parser, parser.add_argument_group("sampling during training (spec §1.9)"))
    add("sample_prompts", type=str, help="prompt file (.txt, .toml, .json)")
    add("sample_every_n_steps", type=int, help="sample every N steps")
    add("sample_every_n_epochs", type=int, help="sample every N epochs (overrides steps)")
    _flag(add, "sample_at_first", "sample before the first step")
    _flag(add, "sample_grid", "(fluxlora) also write each event's samples side by side, labelled, to "
          "<output_dir>/sample_grid/ (outside sample/, which GUIs scan)")
    add("sample_sampler", "ddim", type=str, help="ignored by FLUX (always the Euler flow sampler)",
        choices=["ddim", "pndm", "lms", "euler", "euler_a", "heun", "dpm_2", "dpm_2_a", "dpmsolver", "dpmsolver++",
                 "dpmsingle", "k_lms", "k_euler", "k_euler_a", "k_dpm_2", "k_dpm_2_a"])
    add = _adder(parser, parser.add_argument_group("validation (spec §1.10)"))
    add("validate_every_n_steps", type=int, help="validate every N steps")
    add("validate_every_n_epochs", type=int, help="validate every N epochs")
    add("max_validation_steps", type=int, help="cap on validation batches")
    add = _adder(parser, parser.add_argument_group("logging (spec §1.11)"))
    add("logging_dir", type=str, help="TensorBoard folder")
    add("log_with", type=str, choices=["tensorboard", "wandb", "all"], help="trackers")
    add("log_prefix", type=str, help="prefix of the log folder")
    add("log_tracker_name", type=str, help="tracker run name")
    add("log_tracker_config", type=str, help="TOML of tracker init kwargs")
    add("wandb_run_name", type=str, help="W&B run name")
    add("wandb_api_key", type=str, help="W&B API key")
    _flag(add, "log_config", "log the settings to the tracker")
    add("console_log_level", type=str, choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"], help="console level")
    add("console_log_file", type=str, help="also log to this file")
    _flag(add, "console_log_simple", "plain console log format")


def _config_and_fluxlora_args(parser: FluxArgumentParser) -> None:
    add = _adder(parser, parser.add_argument_group("config file"))
    add("config_file", type=str, help="flattened TOML of flags (the command line wins)")
    _flag(add, "output_config", "write the given flags to --config_file and exit")
    add = _adder(parser, parser.add_argument_group("fluxlora"))
    _flag(add, "ignore_unsupported", "warn instead of failing on flags fluxlora does not implement (DeepSpeed, Hub "
          "uploads, ...)")
    _flag(add, "strict", "make settings that change nothing for FLUX (sd-scripts ignores them: noise_offset, "
          "min_snr_gamma, clip_skip, ...) and unknown --config_file keys errors instead of warnings")
    _flag(add, "sd_scripts_defaults", "use sd-scripts' defaults exactly (see the start-up notes)")
    _flag(add, "overwrite", "allow replacing an existing LoRA of the same name in --output_dir")
    _flag(add, "resume_force", "resume even if the state does not match the current settings")
    add("cache_dir", type=str, help="folder for latent and text caches (default: next to the images)")
    _flag(add, "fp8_scaled", "fp8 storage with per-block scales (implies --fp8_base)")
    add("max_nan_steps", 5, type=int, help="stop after this many consecutive non-finite losses")
    _flag(add, "dry_run", "check everything, then stop before loading weights")


def build_parser(prog: str = "flux_train_network.py") -> FluxArgumentParser:
    """The parser of every training flag. Defaults are None ("not given"); see `parser.sd_defaults`."""
    parser = FluxArgumentParser(
        prog=prog,
        description="Train a FLUX.1 LoRA (flags of sd-scripts' flux_train_network.py).",
        allow_abbrev=False,  # a typo must be an error with a suggestion, never a silent prefix match
        exit_on_error=False,
    )
    for add_group in (_model_args, _dataset_args, _network_args, _optimizer_args, _precision_memory_args,
                      _caching_args, _flux_args, _saving_args, _sampling_validation_logging_args,
                      _config_and_fluxlora_args):
        add_group(parser)
    for action in parser._actions:  # --help states fluxlora's default where it differs from sd-scripts'
        if action.dest in FLUXLORA_DEFAULTS:
            ours, theirs = FLUXLORA_DEFAULTS[action.dest].value, parser.sd_defaults[action.dest]
            action.help = f"{(action.help or '').split(' (sd-scripts default')[0]} (default: {ours}; sd-scripts: {theirs})"
    return parser


def flag_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """dest -> action for every long flag (help excluded)."""
    return {a.dest: a for a in parser._actions if a.option_strings and a.dest != "help"}


def _unknown_flag_message(token: str, known: Sequence[str]) -> str:
    name = token.split("=", 1)[0]
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]}?" if close else "run with --help to list the flags"
    return f"unknown flag {name}: {hint}"


def parse_given(argv: Sequence[str], parser: FluxArgumentParser | None = None) -> dict[str, Any]:
    """Parse a command line and return only the flags that were given, {dest: value}.

    Unknown flags and stray values are reported together in one ConfigError with did-you-mean suggestions.
    """
    parser = parser or build_parser()
    try:
        namespace, extras = parser.parse_known_args(list(argv))
    except argparse.ArgumentError as err:
        raise ConfigError(f"{err}; run with --help to see the accepted values", key=err.argument_name) from None
    if extras:
        known = [s for a in flag_actions(parser).values() for s in a.option_strings]
        problems, previous_unknown = [], False
        for token in extras:
            if token.startswith("-"):
                problems.append(_unknown_flag_message(token, known))
                previous_unknown = "=" not in token
            elif not previous_unknown:
                problems.append(f"unexpected value {token!r} (values follow their flag: --flag value)")
        if problems:
            first = extras[0].split("=", 1)[0] if extras[0].startswith("-") else None
            raise ConfigError("; ".join(problems), key=first)
    return {k: v for k, v in vars(namespace).items() if v is not None}
