"""The argparse schema: every flag of spec §1, sd-scripts' types/nargs/choices/defaults, unknown flags."""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

import pytest

from fluxlora.config.args import build_parser, flag_actions, int_or_auto, int_or_float, parse_given
from fluxlora.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
SPEC = Path(os.environ.get("FLUXLORA_SHARED", REPO.parent / "shared")) / "reference" / "sd-scripts-flux-spec.md"


def _spec_section_1_flags() -> set[str]:
    """Every `--flag` written in spec §1 (the option tables), read from the spec itself."""
    text = SPEC.read_text(encoding="utf-8")
    section = text[text.index("## 1. Command-line options"): text.index("## 2. Dataset configuration")]
    flags = set(re.findall(r"--([a-z][a-z0-9_]*)", section))
    # "--metadata_title/author/..." and "--huggingface_repo_id/_repo_type/..." abbreviate families
    for family in re.findall(r"--(metadata_title|huggingface_repo_id)/([a-z_/]+)", section):
        head = "metadata_" if family[0].startswith("metadata") else "huggingface"
        for tail in family[1].split("/"):
            flags.add(head + tail if tail.startswith("_") else head + tail)
    return flags


def test_every_flag_of_spec_section_1_is_accepted():
    actions = flag_actions(build_parser())
    spec_flags = _spec_section_1_flags()
    assert len(spec_flags) > 150  # the tables list well over 150 flags: the extraction itself worked
    missing = sorted(f for f in spec_flags if f not in actions)
    assert missing == []


def test_our_own_flags_exist_with_their_defaults():
    parser = build_parser()
    for name in ("ignore_unsupported", "sd_scripts_defaults", "overwrite", "resume_force", "skip_bad_images",
                 "cache_dir", "fp8_scaled", "max_nan_steps", "dry_run"):
        assert name in flag_actions(parser)
    assert parser.sd_defaults["max_nan_steps"] == 5
    assert parse_given(["--cache_dir", "/c", "--dry_run", "--max_nan_steps", "2"]) == {
        "cache_dir": "/c", "dry_run": True, "max_nan_steps": 2}


def test_sd_scripts_defaults_recorded_as_in_the_spec_tables():
    d = build_parser().sd_defaults
    # values typed from spec §1 by hand
    expected = {
        "learning_rate": 2e-6, "max_train_steps": 1600, "max_grad_norm": 1.0, "lr_scheduler": "constant",
        "train_batch_size": 1, "caption_extension": ".caption", "caption_separator": ",", "keep_tokens": 0,
        "min_bucket_reso": 256, "max_bucket_reso": 1024, "bucket_reso_steps": 64, "network_alpha": 1.0,
        "mixed_precision": "no", "guidance_scale": 3.5, "timestep_sampling": "sigma", "sigmoid_scale": 1.0,
        "discrete_flow_shift": 3.0, "model_prediction_type": "sigma_scaled", "weighting_scheme": "uniform",
        "logit_mean": 0.0, "logit_std": 1.0, "mode_scale": 1.29, "loss_type": "l2", "huber_schedule": "snr",
        "huber_c": 0.1, "huber_scale": 1.0, "save_model_as": "safetensors", "max_data_loader_n_workers": 8,
        "vae_batch_size": 1, "prior_loss_weight": 1.0, "token_warmup_min": 1, "gradient_accumulation_steps": 1,
        "lr_scheduler_num_cycles": 1, "validation_split": 0.0, "dynamo_backend": "inductor", "optimizer_type": "",
        "network_dim": None, "blocks_to_swap": None, "seed": None, "cache_latents": False,
    }
    assert {k: d[k] for k in expected} == expected


def test_every_argparse_default_is_none_so_given_flags_are_known():
    parser = build_parser()
    assert all(a.default is None for a in flag_actions(parser).values())
    assert parse_given([], parser) == {}


def test_types_and_nargs_match_sd_scripts():
    given = parse_given([
        "--text_encoder_lr", "1e-4", "5e-5", "--network_args", "train_blocks=single", "split_qkv=True",
        "--optimizer_args", "weight_decay=0.01", "betas=0.9,0.999", "--resolution", "512,768",
        "--network_alpha", "8", "--caption_extention", "txt", "--base_weights", "a.safetensors", "b.safetensors",
        "--base_weights_multiplier", "0.5", "1",
    ])
    assert given["text_encoder_lr"] == [1e-4, 5e-5]
    assert given["network_args"] == ["train_blocks=single", "split_qkv=True"]
    assert given["optimizer_args"] == ["weight_decay=0.01", "betas=0.9,0.999"]
    assert given["resolution"] == "512,768"  # kept as text by the parser, like sd-scripts
    assert given["network_alpha"] == 8.0 and isinstance(given["network_alpha"], float)
    assert given["caption_extention"] == "txt"
    assert given["base_weights_multiplier"] == [0.5, 1.0]
    assert parse_given(["--text_encoder_lr"]) == {"text_encoder_lr": []}  # nargs='*' with no value


@pytest.mark.parametrize(("text", "expected"), [
    ("0", 0), ("100", 100), ("0.1", 0.1), ("10%", 0.1), ("2.0", 2), ("50%", 0.5),
])
def test_int_or_float(text, expected):
    value = int_or_float(text)
    assert value == pytest.approx(expected)
    assert isinstance(value, type(expected))


@pytest.mark.parametrize("text", ["1.5", "abc", "x%"])
def test_int_or_float_rejects(text):
    with pytest.raises(ConfigError, match="--lr_warmup_steps"):
        parse_given(["--lr_warmup_steps", text])
    with pytest.raises((argparse.ArgumentTypeError, ValueError)):
        int_or_float(text)


def test_blocks_to_swap_int_or_auto():
    assert int_or_auto("18") == 18
    assert parse_given(["--blocks_to_swap", "AUTO"]) == {"blocks_to_swap": "auto"}
    with pytest.raises(ConfigError, match="--blocks_to_swap"):
        parse_given(["--blocks_to_swap", "many"])


def test_invalid_choice_names_the_flag():
    with pytest.raises(ConfigError, match="--mixed_precision") as err:
        parse_given(["--mixed_precision", "fp32"])
    assert err.value.key == "--mixed_precision"
    with pytest.raises(ConfigError, match="--timestep_sampling"):
        parse_given(["--timestep_sampling", "logit"])


def test_unknown_flag_suggests_the_closest_name():
    with pytest.raises(ConfigError) as err:
        parse_given(["--netwrk_dim", "16", "--learning_rat=1e-4"])
    message = str(err.value)
    assert "unknown flag --netwrk_dim: did you mean --network_dim?" in message
    assert "unknown flag --learning_rat: did you mean --learning_rate?" in message
    assert "\n" not in message


def test_abbreviations_are_not_silently_expanded():
    with pytest.raises(ConfigError, match="did you mean --learning_rate"):
        parse_given(["--learning_ra", "1e-4"])


def test_stray_value_is_reported():
    with pytest.raises(ConfigError, match="unexpected value 'oops'"):
        parse_given(["--sdpa", "oops"])


def test_help_shows_our_default_next_to_sd_scripts_default(capsys):
    text = " ".join(build_parser().format_help().split())  # undo line wrapping
    assert "(default: 1.0; sd-scripts: 3.5)" in text  # --guidance_scale
    assert "(default: raw; sd-scripts: sigma_scaled)" in text
    assert "(sd-scripts default: 2e-06)" in text  # --learning_rate: unchanged
