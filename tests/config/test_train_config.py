"""parse_train_config: the guide's command line, derived values, rejected flags, conflicts, start-up differences."""

from __future__ import annotations

import dataclasses
import logging

import pytest

from fluxlora.config.args import build_parser, flag_actions
from fluxlora.config.dataset import load_dataset_config
from fluxlora.config.train_config import (
    TrainConfig,
    check_caching_conflicts,
    describe_differences,
    parse_train_config,
)
from fluxlora.config.unsupported import IGNORED_FOR_FLUX, NOT_IMPLEMENTED
from fluxlora.errors import ConfigError


def guide_command(files) -> list[str]:
    """Seed guide §4, verbatim except for the paths."""
    return [
        f'--pretrained_model_name_or_path={files["flux"]}', f'--clip_l={files["clip_l"]}',
        f'--t5xxl={files["t5xxl"]}', f'--ae={files["ae"]}', f'--dataset_config={files["dataset"]}',
        f'--output_dir={files["out"]}', "--output_name=my_flux_lora", "--save_model_as=safetensors",
        "--network_module=networks.lora_flux", "--network_dim=16", "--network_alpha=1", "--learning_rate=1e-4",
        "--optimizer_type=AdamW8bit", "--lr_scheduler=constant", "--sdpa", "--max_train_epochs=10",
        "--save_every_n_epochs=1", "--mixed_precision=fp16", "--gradient_checkpointing", "--guidance_scale=1.0",
        "--timestep_sampling=flux_shift", "--blocks_to_swap=18", "--cache_text_encoder_outputs", "--cache_latents",
    ]


def test_guide_command_line_parses(files):
    cfg = parse_train_config(guide_command(files))
    assert cfg.model.clip_l == files["clip_l"] and cfg.saving.output_dir == files["out"]
    assert cfg.saving.output_name == "my_flux_lora" and cfg.saving.save_model_as == "safetensors"
    assert (cfg.network.network_module, cfg.network.network_dim, cfg.network.network_alpha) == (
        "networks.lora_flux", 16, 1.0)
    assert cfg.optim.learning_rate == 1e-4 and cfg.optim.optimizer_type == "AdamW8bit"
    assert cfg.training.max_train_epochs == 10 and cfg.saving.save_every_n_epochs == 1
    assert cfg.precision.mixed_precision == "fp16" and cfg.memory.gradient_checkpointing
    assert cfg.flow.guidance_scale == 1.0 and cfg.flow.timestep_sampling == "flux_shift"
    assert cfg.flow.model_prediction_type == "raw"  # our default (sd-scripts: sigma_scaled)
    assert cfg.memory.blocks_to_swap == 18
    assert cfg.caching.cache_text_encoder_outputs and cfg.caching.cache_latents
    assert any("fp16" in n and "bf16" in n for n in cfg.notes)  # the fp16 warning
    assert any(n.startswith("--sdpa") for n in cfg.notes)  # accepted with a note
    assert any("CLIP-L runs every step" in n for n in cfg.notes)
    assert "overflow in fp16" in cfg.warnings[0] and cfg.ignored == ()  # the guide's command changes nothing


def test_config_is_frozen_and_flat_uses_flag_names(base):
    cfg = parse_train_config(base)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.flow.guidance_scale = 2.0  # type: ignore[misc]
    flat = cfg.flat()
    parser_dests = set(flag_actions(build_parser()))
    assert set(flat) <= parser_dests  # every field is named after a flag
    assert flat["learning_rate"] == 2e-6


def test_derived_values(base, files):
    cfg = parse_train_config(base + [
        "--resolution", "1024,768", "--caption_extension", "txt", "--cache_latents_to_disk",
        "--cache_text_encoder_outputs_to_disk", "--network_train_unet_only", "--fp8_base_unet",
        "--mixed_precision", "bf16", "--split_mode", "--use_8bit_adam", "--network_alpha", "0",
        "--face_crop_aug_range", "2.0,4.0", "--sample_every_n_steps", "0",
    ])
    assert cfg.dataset_flags.resolution == (1024, 768)
    assert cfg.dataset_flags.caption_extension == ".txt"
    assert cfg.caching.cache_latents and cfg.caching.cache_text_encoder_outputs
    assert cfg.precision.fp8_base
    assert cfg.memory.blocks_to_swap == 18
    assert cfg.optim.optimizer_type == "AdamW8bit"
    assert cfg.network.network_dim == 4 and cfg.network.network_alpha == 4.0  # None -> 4; alpha 0 -> rank
    assert cfg.dataset_flags.face_crop_aug_range == (2.0, 4.0)
    assert cfg.sampling.sample_every_n_steps is None  # <= 0 disables, as in sd-scripts
    square = parse_train_config(base + ["--resolution", "512", "--caption_extention", ".cap",
                                        "--split_mode", "--blocks_to_swap", "4"])
    assert square.dataset_flags.resolution == (512, 512)
    assert square.dataset_flags.caption_extension == ".cap"
    assert square.memory.blocks_to_swap == 4  # split_mode is ignored when blocks_to_swap is given
    assert parse_train_config(base).optim.optimizer_type == "AdamW"
    assert parse_train_config(base).network.text_encoder_lr == ()


def test_the_dataset_toml_resolves_against_the_dataset_flags(base, tmp_path):
    cfg = parse_train_config(base + ["--resolution", "768", "--shuffle_caption", "--validation_split", "0.1",
                                     "--train_batch_size", "3", "--caption_extension", "txt"])
    (tmp_path / "img").mkdir()
    toml = tmp_path / "d.toml"
    toml.write_text(f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{(tmp_path / "img").as_posix()}"\n')
    (dataset,) = load_dataset_config(toml, cfg.dataset_flags).datasets
    assert dataset.resolution == (768, 768) and dataset.batch_size == 3 and dataset.validation_split == 0.1
    assert dataset.subsets[0].shuffle_caption and dataset.subsets[0].caption_extension == ".txt"


def _active_argv(dest: str) -> list[str]:
    """A value for the flag that would change something (never its neutral/default value)."""
    action = flag_actions(build_parser())[dest]
    special = {"model_type": "chroma", "sample_sampler": "euler_a", "zero_stage": "3", "max_token_length": "150",
               "multires_noise_discount": "0.5", "offload_optimizer_device": "cpu", "offload_param_device": "cpu"}
    if action.nargs == 0:
        return [f"--{dest}"]
    if dest in special:
        return [f"--{dest}", special[dest]]
    value = {int: "3", float: "0.1"}.get(action.type, "somewhere")
    return [f"--{dest}", value]


@pytest.mark.parametrize("dest", sorted(IGNORED_FOR_FLUX))
def test_options_sd_scripts_ignores_for_flux_warn_and_strict_refuses(base, dest):
    cfg = parse_train_config(base + _active_argv(dest))
    (line,) = cfg.ignored
    assert line.startswith(f"--{dest}") and IGNORED_FOR_FLUX[dest] in line
    with pytest.raises(ConfigError) as err:
        parse_train_config(base + _active_argv(dest) + ["--strict"])
    message = str(err.value)
    assert f"--{dest}" in message and "sd-scripts ignores it for FLUX too" in message and "--strict" in message


@pytest.mark.parametrize("dest", sorted(NOT_IMPLEMENTED))
def test_options_fluxlora_does_not_implement_are_refused_with_reason(base, dest):
    with pytest.raises(ConfigError) as err:
        parse_train_config(base + _active_argv(dest))
    message = str(err.value)
    assert f"--{dest}" in message and NOT_IMPLEMENTED[dest] in message and "--ignore_unsupported" in message
    cfg = parse_train_config(base + _active_argv(dest) + ["--ignore_unsupported"])
    assert any(n.startswith(f"--{dest}") and "ignored" in n for n in cfg.notes) and cfg.ignored == ()


def test_neutral_values_are_silent(base):
    """What GUIs write for every run: each option at the value that turns it off."""
    cfg = parse_train_config(base + ["--noise_offset", "0", "--min_snr_gamma", "0", "--sample_sampler", "ddim",
                                     "--model_type", "flux", "--zero_stage", "2", "--multires_noise_discount", "0.3",
                                     "--clip_skip", "1", "--max_timestep", "1000", "--min_timestep", "0",
                                     "--huber_schedule", "snr", "--loss_type", "l2", "--strict"])
    assert cfg.notes == () and cfg.ignored == ()


def test_kohya_values_warn_in_one_block_and_the_run_goes_on(base):
    from fluxlora.config.train_config import startup_report

    cfg = parse_train_config(base + ["--noise_offset", "0.05", "--min_snr_gamma", "7", "--sample_sampler", "euler"])
    assert [line.split(":")[0] for line in cfg.ignored] == ["--noise_offset 0.05", "--min_snr_gamma 7.0",
                                                            "--sample_sampler euler"]
    ((level, block),) = [entry for entry in startup_report(cfg) if entry[1].startswith("3 setting")]
    assert level == logging.WARNING and block.count("\n") == 3 and "sd-scripts ignores them too" in block


def test_huber_schedule_is_only_checked_for_huber_losses(base):
    assert parse_train_config(base + ["--huber_schedule", "snr"]).flow.huber_schedule == "snr"  # l2: never read
    for loss in ("huber", "smooth_l1"):
        with pytest.raises(ConfigError, match=f"--huber_schedule snr .* --loss_type {loss}"):
            parse_train_config(base + ["--huber_schedule", "snr", "--loss_type", loss])
    assert parse_train_config(base + ["--loss_type", "huber"]).flow.huber_schedule == "constant"  # our default


def test_noise_offset_message_explains_flux(base):
    cfg = parse_train_config(base + ["--noise_offset", "0.1"])
    assert "rectified flow has no noise offset" in cfg.ignored[0]


@pytest.mark.parametrize("flag", ["--sdpa", "--xformers", "--mem_eff_attn"])
def test_attention_flags_are_accepted_with_a_note(base, flag):
    cfg = parse_train_config(base + [flag])
    assert any(n.startswith(flag) and "scaled_dot_product_attention" in n for n in cfg.notes)


CONFLICTS = [
    (["--cache_text_encoder_outputs", "--shuffle_caption"], ["--cache_text_encoder_outputs", "--shuffle_caption"]),
    (["--cache_text_encoder_outputs", "--caption_dropout_rate", "0.1"], ["--caption_dropout_rate"]),
    (["--cache_text_encoder_outputs", "--caption_tag_dropout_rate", "0.1"], ["--caption_tag_dropout_rate"]),
    (["--cache_text_encoder_outputs", "--token_warmup_step", "10"], ["--token_warmup_step"]),
    (["--cache_text_encoder_outputs", "--caption_dropout_every_n_epochs", "2"], ["--caption_dropout_every_n_epochs"]),
    (["--cache_text_encoder_outputs_to_disk", "--enable_wildcard"], ["--cache_text_encoder_outputs", "--enable_wildcard"]),
    (["--cache_text_encoder_outputs", "--network_args", "train_t5xxl=True"], ["train_t5xxl", "--cache_text_encoder_outputs"]),
    (["--blocks_to_swap", "8", "--gradient_checkpointing", "--cpu_offload_checkpointing"],
     ["--blocks_to_swap", "--cpu_offload_checkpointing"]),
    (["--cpu_offload_checkpointing"], ["--cpu_offload_checkpointing", "--gradient_checkpointing"]),
    (["--full_bf16"], ["--full_bf16", "--mixed_precision bf16"]),
    (["--full_bf16", "--mixed_precision", "fp16"], ["--full_bf16"]),
    (["--full_fp16", "--mixed_precision", "bf16"], ["--full_fp16", "--mixed_precision fp16"]),
    (["--fp8_base"], ["--fp8_base", "--mixed_precision"]),
    (["--fp8_base_unet", "--mixed_precision", "no"], ["--fp8_base_unet"]),
    (["--network_train_unet_only", "--network_train_text_encoder_only"],
     ["--network_train_unet_only", "--network_train_text_encoder_only"]),
    (["--cache_latents", "--color_aug"], ["--cache_latents", "--color_aug"]),
    (["--cache_latents_to_disk", "--random_crop"], ["--cache_latents", "--random_crop"]),
    (["--sample_every_n_steps", "100"], ["--sample_every_n_steps", "--sample_prompts"]),
    (["--sample_every_n_epochs", "1"], ["--sample_every_n_epochs", "--sample_prompts"]),
    (["--loss_type", "huber", "--sd_scripts_defaults"], ["--huber_schedule snr"]),
    (["--learning_rate", "0"], ["--learning_rate"]),
    (["--learning_rate", "-1e-4"], ["--learning_rate"]),
    (["--max_train_steps", "0"], ["--max_train_steps"]),
    (["--max_train_epochs", "-1"], ["--max_train_epochs"]),
    (["--train_batch_size", "0"], ["--train_batch_size"]),
    (["--gradient_accumulation_steps", "0"], ["--gradient_accumulation_steps"]),
    (["--resolution", "1020"], ["--resolution", "1020 is not a multiple of 16", "use 1024"]),
    (["--resolution", "1024,590"], ["--resolution", "590 is not", "use 592"]),
    (["--resolution", "big"], ["--resolution"]),
    (["--bucket_reso_steps", "36"], ["--bucket_reso_steps", "multiple of 16", "2×2", "use 32"]),
    (["--network_module", "networks.oft_flux"], ["--network_module", "networks.oft_flux", "not supported"]),
    (["--network_module", "networks.lora"], ["--network_module", "networks.lora_flux"]),
    (["--save_model_as", "ckpt"], ["--save_model_as", "pickle", "safetensors"]),
    (["--save_model_as", "pt"], ["--save_model_as"]),
    (["--blocks_to_swap", "36"], ["--blocks_to_swap"]),
    (["--network_args", "split_qkv"], ["--network_args", "key=value"]),
    (["--optimizer_args", "=3"], ["--optimizer_args"]),
    (["--text_encoder_lr", "1", "2", "3"], ["--text_encoder_lr"]),
    (["--use_8bit_adam", "--optimizer_type", "Lion"], ["--use_8bit_adam"]),
    (["--dim_from_weights"], ["--dim_from_weights", "--network_weights"]),
    (["--log_with", "tensorboard"], ["--log_with", "--logging_dir"]),
    (["--resume_force"], ["--resume_force", "--resume"]),
    (["--caption_dropout_rate", "1.5"], ["--caption_dropout_rate"]),
    (["--train_data_dir", "IMAGES"], ["--dataset_config", "--train_data_dir"]),
    (["--base_weights", "LORA", "--base_weights_multiplier", "1", "2"], ["--base_weights_multiplier"]),
    (["--t5xxl_max_token_length", "1024"], ["--t5xxl_max_token_length"]),
    (["--caption_extension", ".txt", "--caption_extention", ".cap"], ["--caption_extention"]),
]


@pytest.mark.parametrize(("extra", "expected"), CONFLICTS, ids=[" ".join(c[0]) for c in CONFLICTS])
def test_conflicts_are_errors_naming_the_flags(base, files, extra, expected):
    extra = [str(files["images"]) if a == "IMAGES" else str(files["lora"]) if a == "LORA" else a for a in extra]
    with pytest.raises(ConfigError) as err:
        parse_train_config(base + extra)
    message = str(err.value)
    for text in expected:
        assert text in message
    assert "\n" not in message


def test_fixed_versions_of_the_conflicts_parse(base, files):
    cfg = parse_train_config(base + [
        "--cache_text_encoder_outputs", "--network_train_unet_only", "--caption_dropout_rate", "0",
        "--blocks_to_swap", "auto", "--gradient_checkpointing", "--full_bf16", "--mixed_precision", "bf16",
        "--fp8_base", "--loss_type", "huber", "--sample_every_n_steps", "100", "--sample_prompts",
        str(files["prompts"]), "--bucket_reso_steps", "32", "--resolution", "1008",
    ])
    assert cfg.memory.blocks_to_swap == "auto" and cfg.flow.huber_schedule == "constant"
    assert cfg.sampling.sample_every_n_steps == 100 and cfg.dataset_flags.resolution == (1008, 1008)


def test_cpu_offload_checkpointing_with_checkpointing_is_fine(base):
    cfg = parse_train_config(base + ["--cpu_offload_checkpointing", "--gradient_checkpointing"])
    assert cfg.memory.cpu_offload_checkpointing and cfg.memory.blocks_to_swap == 0


def test_train_data_dir_needs_resolution(files, base):
    argv = [a for a in base if a not in ("--dataset_config", str(files["dataset"]))]
    with pytest.raises(ConfigError, match="--resolution is required"):
        parse_train_config(argv + ["--train_data_dir", str(files["images"])])
    cfg = parse_train_config(argv + ["--train_data_dir", str(files["images"]), "--resolution", "512"])
    assert cfg.dataset_flags.train_data_dir == files["images"]


def test_missing_required_paths_are_all_named():
    with pytest.raises(ConfigError) as err:
        parse_train_config([])
    message = str(err.value)
    for flag in ("--pretrained_model_name_or_path", "--ae", "--output_dir"):
        assert f"{flag} is required" in message
    # which text encoders are required is the model family's: preflight says so once the file is read
    assert "--clip_l is required" not in message
    assert "--dataset_config (or --train_data_dir) is required" in message
    assert err.value.key == "--pretrained_model_name_or_path"


def test_path_that_does_not_exist_names_flag_and_path(base, tmp_path):
    missing = tmp_path / "nope" / "clip.safetensors"
    argv = list(base)
    argv[argv.index("--clip_l") + 1] = str(missing)
    with pytest.raises(ConfigError) as err:
        parse_train_config(argv + ["--network_weights", str(tmp_path)])
    assert f"--clip_l {missing} does not exist" in str(err.value)
    assert f"--network_weights {tmp_path} is a folder" in str(err.value)


def test_existing_lora_needs_overwrite(base, files):
    files["out"].mkdir()
    (files["out"] / "mine.safetensors").write_bytes(b"x")
    with pytest.raises(ConfigError, match="--overwrite"):
        parse_train_config(base + ["--output_name", "mine"])
    assert parse_train_config(base + ["--output_name", "mine", "--overwrite"]).saving.overwrite


def test_unknown_flag_in_train_command(base):
    with pytest.raises(ConfigError, match="did you mean --gradient_checkpointing"):
        parse_train_config(base + ["--gradient_checkpoint"])


def test_describe_differences_lists_our_defaults_with_sd_scripts_values(base):
    text = describe_differences(parse_train_config(base))
    assert "model_prediction_type: raw (sd-scripts: sigma_scaled)" in text
    assert "guidance_scale: 1.0 (sd-scripts: 3.5)" in text
    assert "timestep_sampling: flux_shift (sd-scripts: sigma)" in text
    assert "huber_schedule: constant (sd-scripts: snr)" in text
    assert "--sd_scripts_defaults" in text
    # a value the user chose is theirs, not a difference from sd-scripts
    chosen = describe_differences(parse_train_config(base + ["--guidance_scale", "1.0",
                                                             "--model_prediction_type", "sigma_scaled"]))
    assert "guidance_scale" not in chosen and "model_prediction_type" not in chosen
    assert "timestep_sampling: flux_shift" in chosen


def test_sd_scripts_defaults_restores_sd_scripts_exactly(base):
    cfg = parse_train_config(base + ["--sd_scripts_defaults"])
    sd = build_parser().sd_defaults
    assert describe_differences(cfg) == ""
    assert (cfg.flow.model_prediction_type, cfg.flow.guidance_scale, cfg.flow.timestep_sampling,
            cfg.flow.huber_schedule) == ("sigma_scaled", 3.5, "sigma", "snr")
    flat = cfg.flat()
    # derived fields hold the meaning of sd-scripts' value: "" optimizer is AdamW
    untouched = [k for k in flat if k in sd and not isinstance(sd[k], (list, type(None))) and k != "optimizer_type"]
    assert {k: flat[k] for k in untouched} == {k: sd[k] for k in untouched}
    assert cfg.optim.optimizer_type == "AdamW"


def test_check_caching_conflicts_on_dataset_subsets(base):
    cfg = parse_train_config(base + ["--cache_text_encoder_outputs", "--cache_latents", "--network_train_unet_only"])

    @dataclasses.dataclass
    class Subset:
        key: str
        shuffle_caption: bool = False
        color_aug: bool = False
        enable_wildcard: bool = False

    check_caching_conflicts(cfg, [Subset("datasets[0].subsets[0]"), {"key": "datasets[1].subsets[0]"}])
    with pytest.raises(ConfigError) as err:
        check_caching_conflicts(cfg, [
            Subset("datasets[0].subsets[1]", shuffle_caption=True),
            {"key": "datasets[1].subsets[0]", "color_aug": True, "caption_dropout_rate": 0.1},
        ])
    message = str(err.value)
    assert "datasets[0].subsets[1].shuffle_caption" in message
    assert "datasets[1].subsets[0].color_aug" in message and "--cache_latents" in message
    assert "datasets[1].subsets[0].caption_dropout_rate" in message
    uncached = parse_train_config(base)
    check_caching_conflicts(uncached, [Subset("s", shuffle_caption=True, color_aug=True)])  # no caching: fine


def test_parse_returns_train_config(base):
    assert isinstance(parse_train_config(base), TrainConfig)
