"""Flags sd-scripts accepts that mean nothing for FLUX or that fluxlora does not implement (spec §12.4).

sd-scripts parses these and silently ignores most of them. fluxlora rejects a flag that is *active* (given with a
value that would change something) with the reason, unless `--ignore_unsupported` turns the rejection into a
warning. A flag left at its neutral value (False, 0, empty, sd-scripts' default) is accepted: GUI-written config
files list every flag, e.g. `noise_offset = 0`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

_NOISE_OFFSET = "has no effect on FLUX: rectified flow has no noise offset (sd-scripts ignores it silently)"
_MULTIRES = "has no effect on FLUX: multires noise is a Stable Diffusion ε-prediction trick sd-scripts never applies to FLUX"
_SNR = ("has no effect on FLUX: SNR-based weighting needs a DDPM noise schedule; weight noise levels with "
        "--weighting_scheme / --timestep_sampling instead")
_VPRED = "is a Stable Diffusion v-prediction option; FLUX predicts a flow velocity"
_DEEPSPEED = ("is not supported (DeepSpeed); fit memory with --blocks_to_swap, --fp8_base and --gradient_checkpointing, "
              "and use `accelerate launch` (DDP) for several GPUs")
_HUB = "is not supported: fluxlora does not upload to the Hugging Face Hub; upload the files in --output_dir yourself"

# dest -> why it is rejected
UNSUPPORTED: dict[str, str] = {
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
    "min_timestep": "has no effect on FLUX in sd-scripts (only written to metadata); fluxlora has no timestep range",
    "max_timestep": "has no effect on FLUX in sd-scripts (only written to metadata); fluxlora has no timestep range",
    "v2": "is a Stable Diffusion 2 option; FLUX is detected from --pretrained_model_name_or_path",
    "clip_skip": "does not apply to FLUX: only CLIP-L's pooled output is used",
    "max_token_length": "is a Stable Diffusion 1/2 option; use --t5xxl_max_token_length for FLUX",
    "vae": "is a Stable Diffusion option; FLUX's autoencoder is given with --ae",
    "sample_sampler": "has no effect on FLUX: samples always use the Euler flow-matching sampler",
    "controlnet_model_name_or_path": "is not used by LoRA training (only by sd-scripts' ControlNet trainer)",
    "conditioning_data_dir": ("is ignored by sd-scripts on the command line; set conditioning_data_dir per subset in "
                              "the dataset TOML (with --masked_loss)"),
    "weighted_captions": "is not supported by the FLUX tokenizers (sd-scripts raises NotImplementedError)",
    "fused_backward_pass": "has no effect on LoRA training (sd-scripts only checks its preconditions)",
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

# Accepted with a note: the guide's own command line uses --sdpa.
HARMLESS: dict[str, str] = {
    name: "accepted and not needed: FLUX always uses PyTorch's scaled_dot_product_attention"
    for name in ("sdpa", "xformers", "mem_eff_attn")
}


def is_active(value: Any, sd_default: Any) -> bool:
    """True when a value would change something: not None/False/0/empty and not sd-scripts' default."""
    if value is None or value is False or value == sd_default:
        return False
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0:
        return False
    return not (isinstance(value, (str, list, tuple)) and len(value) == 0)


def check_unsupported(
    given: Mapping[str, Any], sd_defaults: Mapping[str, Any], *, ignore: bool
) -> tuple[list[str], list[str], list[str]]:
    """Sort the given flags into (errors, warnings, notes) by the tables above.

    `given` holds only flags from the command line or config file. With `ignore`, rejections become warnings.
    """
    errors: list[str] = []
    warnings: list[str] = []
    notes: list[str] = []
    for dest, value in given.items():
        if dest in UNSUPPORTED and is_active(value, sd_defaults.get(dest)):
            shown = "" if value is True else f" {value}"
            if ignore:
                warnings.append(f"--{dest}{shown} is ignored (--ignore_unsupported): it {UNSUPPORTED[dest]}")
            else:
                errors.append(
                    f"--{dest}{shown} {UNSUPPORTED[dest]}; remove it (or pass --ignore_unsupported to continue anyway)"
                )
        elif dest in HARMLESS and value:
            notes.append(f"--{dest} {HARMLESS[dest]}")
    return errors, warnings, notes
