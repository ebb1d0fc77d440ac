"""Flags sd-scripts accepts that mean nothing for FLUX, and flags fluxlora does not implement (spec §12.4).

Three kinds, each with the reason shown to the user:
- `IGNORED_FOR_FLUX`: sd-scripts accepts them and ignores them for FLUX. Given at a value that would change something
  they are listed in one warning block at start and the run goes on, as in sd-scripts; `--strict` makes them errors.
- `NOT_IMPLEMENTED`: sd-scripts does something with them that fluxlora does not (DeepSpeed, Hub uploads, ...), or
  sd-scripts itself refuses them for FLUX (`--weighted_captions`). An error, because the run would not be the one
  asked for; `--ignore_unsupported` turns it into a warning.
- `HARMLESS`: accepted with a note (the guide's own command line uses `--sdpa`).

A flag at its neutral value (not given, False, 0, empty, sd-scripts' default or a value of `NEUTRAL`) is silent: GUIs
write every field of their form, e.g. `clip_skip = 1`, `max_timestep = 1000`, `noise_offset = 0`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

_NOISE_OFFSET = "has no effect on FLUX: rectified flow has no noise offset"
_MULTIRES = "has no effect on FLUX: multires noise is a Stable Diffusion ε-prediction trick"
_SNR = ("has no effect on FLUX: SNR-based weighting needs a DDPM noise schedule; weight noise levels with "
        "--weighting_scheme / --timestep_sampling instead")
_VPRED = "is a Stable Diffusion v-prediction option; FLUX predicts a flow velocity"
_DEEPSPEED = ("is not supported (DeepSpeed); fit memory with --blocks_to_swap, --fp8_base and --gradient_checkpointing, "
              "and use `accelerate launch` (DDP) for several GPUs")
_HUB = "is not supported: fluxlora does not upload to the Hugging Face Hub; upload the files in --output_dir yourself"

# dest -> why it changes nothing for FLUX (sd-scripts accepts it and ignores it too)
IGNORED_FOR_FLUX: dict[str, str] = {
    "noise_offset": _NOISE_OFFSET,
    "noise_offset_random_strength": _NOISE_OFFSET,
    "adaptive_noise_scale": _NOISE_OFFSET,
    "multires_noise_iterations": _MULTIRES,
    "multires_noise_discount": _MULTIRES,
    "min_snr_gamma": _SNR,
    "debiased_estimation_loss": _SNR,
    "scale_v_pred_loss_like_noise_pred": _VPRED,
    "v_pred_like_loss": _VPRED,
    "v_parameterization": _VPRED,
    "zero_terminal_snr": "has no effect on FLUX: the flow schedule already reaches pure noise at σ = 1",
    "min_timestep": "has no effect on FLUX (sd-scripts only writes it to the metadata)",
    "max_timestep": "has no effect on FLUX (sd-scripts only writes it to the metadata)",
    "v2": "is a Stable Diffusion 2 option; FLUX is detected from --pretrained_model_name_or_path",
    "clip_skip": "does not apply to FLUX: only CLIP-L's pooled output is used",
    "max_token_length": "is a Stable Diffusion 1/2 option; use --t5xxl_max_token_length for FLUX",
    "vae": "is a Stable Diffusion option; FLUX's autoencoder is given with --ae",
    "sample_sampler": "has no effect on FLUX: samples always use the Euler flow-matching sampler",
    "controlnet_model_name_or_path": "is not used by LoRA training (only by sd-scripts' ControlNet trainer)",
    "conditioning_data_dir": "is ignored on the command line; set conditioning_data_dir per subset in the dataset TOML",
    "fused_backward_pass": "has no effect on LoRA training (sd-scripts only checks its preconditions)",
}

# dest -> why fluxlora refuses it
NOT_IMPLEMENTED: dict[str, str] = {
    "weighted_captions": "is not supported by the FLUX tokenizers (sd-scripts raises NotImplementedError too)",
    "deepspeed": _DEEPSPEED,
    "zero_stage": _DEEPSPEED,
    "offload_optimizer_device": _DEEPSPEED,
    "offload_optimizer_nvme_path": _DEEPSPEED,
    "offload_param_device": _DEEPSPEED,
    "offload_param_nvme_path": _DEEPSPEED,
    "zero3_init_flag": _DEEPSPEED,
    "zero3_save_16bit_model": _DEEPSPEED,
    "fp16_master_weights_and_gradients": _DEEPSPEED,
    "huggingface_repo_id": _HUB,
    "huggingface_repo_type": _HUB,
    "huggingface_path_in_repo": _HUB,
    "huggingface_token": _HUB,
    "huggingface_repo_visibility": _HUB,
    "save_state_to_huggingface": _HUB,
    "resume_from_huggingface": "is not supported: download the state from the Hugging Face Hub yourself and pass "
                               "its folder to --resume",
    "async_upload": _HUB,
    "dataset_class": "is not supported (custom dataset classes); describe the data with --dataset_config",
    "debug_dataset": "is not supported (sd-scripts' interactive dataset viewer); use --dry_run to check the dataset",
}

# Values that mean "off" besides None / False / 0 / empty / sd-scripts' default: clip_skip 1 uses CLIP's last
# layer (no skip), max_timestep 1000 is the whole range.
NEUTRAL: dict[str, tuple[Any, ...]] = {"clip_skip": (1,), "max_timestep": (1000,)}

# Accepted with a note: the guide's own command line uses --sdpa.
HARMLESS: dict[str, str] = {
    name: "accepted and not needed: FLUX always uses PyTorch's scaled_dot_product_attention"
    for name in ("sdpa", "xformers", "mem_eff_attn")
}


def is_active(value: Any, sd_default: Any, neutral: tuple[Any, ...] = ()) -> bool:
    """True when a value would change something: not None/False/0/empty, not sd-scripts' default, not neutral."""
    if value is None or value is False or value == sd_default or value in neutral:
        return False
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0:
        return False
    return not (isinstance(value, (str, list, tuple)) and len(value) == 0)


class Unsupported(NamedTuple):
    """The sorted verdicts on the given flags."""

    errors: list[str]
    ignored: list[str]  # one line per option that changes nothing for FLUX (the start-up warning block)
    warnings: list[str]
    notes: list[str]


def _shown(dest: str, value: Any) -> str:
    return f"--{dest}" if value is True else f"--{dest} {value}"


def check_unsupported(given: Mapping[str, Any], sd_defaults: Mapping[str, Any], *, ignore: bool,
                      strict: bool) -> Unsupported:
    """Sort the given flags (command line or config file) by the tables above.

    `strict` turns options sd-scripts ignores for FLUX into errors; `ignore` turns refused ones into warnings.
    """
    out = Unsupported([], [], [], [])
    for dest, value in given.items():
        if not is_active(value, sd_defaults.get(dest), NEUTRAL.get(dest, ())):
            continue
        if dest in IGNORED_FOR_FLUX:
            if strict:
                out.errors.append(f"{_shown(dest, value)} {IGNORED_FOR_FLUX[dest]} (sd-scripts ignores it for FLUX "
                                  "too); remove it, or drop --strict to train with a warning")
            else:
                out.ignored.append(f"{_shown(dest, value)}: {IGNORED_FOR_FLUX[dest]}")
        elif dest in NOT_IMPLEMENTED:
            if ignore:
                out.warnings.append(f"{_shown(dest, value)} is ignored (--ignore_unsupported): it "
                                    f"{NOT_IMPLEMENTED[dest]}")
            else:
                out.errors.append(f"{_shown(dest, value)} {NOT_IMPLEMENTED[dest]}; remove it (or pass "
                                  "--ignore_unsupported to continue without it)")
        elif dest in HARMLESS:
            out.notes.append(f"--{dest} {HARMLESS[dest]}")
    return out


def ignored_block(lines: list[str] | tuple[str, ...]) -> str:
    """The start-up warning block: every setting that changes nothing, one per line; '' when there is none."""
    if not lines:
        return ""
    head = (f"{len(lines)} setting(s) change nothing for FLUX (sd-scripts ignores them too; the run goes on; "
            "--strict makes them errors):")
    return "\n".join([head, *(f"  {line}" for line in lines)])
