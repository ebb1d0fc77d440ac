"""`ss_*` / `modelspec.*` metadata: one builder for training, merge and extract, architecture strings as inputs."""

from __future__ import annotations

import json
from datetime import datetime

import pytest

from fluxlora.families.flux1.family import FLUX1
from fluxlora.network.metadata import ArchitectureStrings, build_metadata, model_metadata

DEV = FLUX1.architecture_of_variant("dev")

SPEC_SS_KEYS = """ss_session_id ss_training_started_at ss_training_finished_at ss_output_name ss_learning_rate
ss_text_encoder_lr ss_unet_lr ss_num_train_images ss_num_validation_images ss_num_reg_images ss_num_batches_per_epoch
ss_num_epochs ss_gradient_checkpointing ss_gradient_accumulation_steps ss_max_train_steps ss_lr_warmup_steps
ss_lr_scheduler ss_network_module ss_network_dim ss_network_alpha ss_network_dropout ss_mixed_precision ss_full_fp16
ss_v2 ss_base_model_version ss_clip_skip ss_max_token_length ss_cache_latents ss_seed ss_lowram ss_noise_offset
ss_multires_noise_iterations ss_multires_noise_discount ss_adaptive_noise_scale ss_zero_terminal_snr
ss_training_comment ss_sd_scripts_commit_hash ss_optimizer ss_max_grad_norm ss_caption_dropout_rate
ss_caption_dropout_every_n_epochs ss_caption_tag_dropout_rate ss_face_crop_aug_range ss_prior_loss_weight
ss_min_snr_gamma ss_scale_weight_norms ss_ip_noise_gamma ss_debiased_estimation ss_noise_offset_random_strength
ss_ip_noise_gamma_random_strength ss_loss_type ss_huber_schedule ss_huber_scale ss_huber_c ss_fp8_base
ss_fp8_base_unet ss_validation_seed ss_validation_split ss_max_validation_steps ss_validate_every_n_epochs
ss_validate_every_n_steps ss_resize_interpolation ss_steps ss_epoch ss_model_type ss_apply_t5_attn_mask
ss_weighting_scheme ss_logit_mean ss_logit_std ss_mode_scale ss_guidance_scale ss_timestep_sampling ss_sigmoid_scale
ss_model_prediction_type ss_discrete_flow_shift""".split()

INFO = {
    "network_dim": None, "network_alpha": 16, "network_args": {"split_qkv": "True"},
    "learning_rate": 1e-4, "text_encoder_lr": [5e-5], "unet_lr": None, "output_name": "my_lora", "seed": 42,
    "training_comment": "hello", "steps": 100, "epoch": 1, "num_train_images": 10, "optimizer": "torch.optim.AdamW()",
    "resolution": (768, 512), "metadata_author": "me", "metadata_tags": "a,b", "metadata_license": "mit",
    "timestep_sampling": "flux_shift", "guidance_scale": 1.0, "session_id": 7,
    "datasets": [{"is_dreambooth": True, "subsets": []}], "sd_model_name": "flux1-dev.safetensors",
}


def test_build_metadata_has_every_spec_key_as_strings() -> None:
    now = datetime(2025, 1, 2, 3, 4, 5, 678)
    meta = build_metadata(INFO, DEV, now=now)
    assert set(SPEC_SS_KEYS) <= set(meta)
    assert all(isinstance(v, str) for v in meta.values())
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "16.0"  # real rank, never "None"
    assert meta["ss_network_args"] == '{"split_qkv": "True"}' and json.loads(meta["ss_datasets"])[0]["is_dreambooth"]
    assert meta["ss_text_encoder_lr"] == "[5e-05]" and meta["ss_unet_lr"] == "None"
    assert meta["ss_training_comment"] == "hello" and meta["ss_epoch"] == "1" and meta["ss_steps"] == "100"
    assert meta["ss_base_model_version"] == "flux1" and meta["ss_network_module"] == "networks.lora_flux"
    assert meta["ss_sd_model_name"] == "flux1-dev.safetensors" and "ss_new_sd_model_hash" not in meta
    assert meta["modelspec.architecture"] == "flux-1-dev/lora"
    assert meta["modelspec.implementation"] == "https://github.com/black-forest-labs/flux"
    assert meta["modelspec.sai_model_spec"] == "1.0.1"
    assert meta["modelspec.title"] == "my_lora" and meta["modelspec.resolution"] == "768x512"
    assert meta["modelspec.date"] == "2025-01-02T03:04:05"
    assert meta["modelspec.implementation_version"].startswith("fluxlora/")
    assert meta["modelspec.author"] == "me" and meta["modelspec.tags"] == "a,b" and meta["modelspec.license"] == "mit"
    assert "modelspec.prediction_type" not in meta


def test_schnell_title_and_no_metadata_minimal_set() -> None:
    now = datetime(2025, 1, 2, 3, 4, 5)
    info = {**INFO, "metadata_title": "Title", "network_dim": 8, "network_alpha": 0}
    meta = build_metadata(info, FLUX1.architecture_of_variant("schnell"), detail="minimal", now=now)
    assert {k for k in meta if k.startswith("ss_")} == {"ss_v2", "ss_base_model_version", "ss_network_module",
                                                       "ss_network_dim", "ss_network_alpha", "ss_network_args"}
    assert meta["ss_network_dim"] == "8" and meta["ss_network_alpha"] == "8.0"  # alpha 0 means rank
    assert meta["modelspec.architecture"] == "flux-1-schnell/lora" and meta["modelspec.title"] == "Title"
    untitled = build_metadata({}, DEV, detail="minimal", now=now)
    assert untitled["modelspec.title"] == f"LoRA@{int(now.timestamp())}" and "ss_network_args" not in untitled
    assert untitled["modelspec.resolution"] == "1024x1024"


def test_architecture_strings_are_inputs_written_as_given() -> None:
    """A model family supplies the strings; nothing in the builder knows FLUX.1's."""
    toy = ArchitectureStrings("toy-family-v1", "https://example.org/toy", "toy1")
    meta = build_metadata(INFO, toy, now=datetime(2025, 1, 2))
    assert meta["modelspec.architecture"] == "toy-family-v1/lora"
    assert meta["modelspec.implementation"] == "https://example.org/toy"
    assert meta["ss_base_model_version"] == "toy1"
    model = model_metadata(toy, title="Merged model", merged_from="a, b", now=datetime(2025, 1, 2))
    assert model["modelspec.architecture"] == "toy-family-v1" and model["ss_merged_from"] == "a, b"
    assert model["modelspec.title"] == "Merged model" and model["modelspec.merged_from"] == "a, b"


def test_tool_metadata_levels() -> None:
    """Merge / extract: minimal ss_* (ranks may be "Dynamic") plus ModelSpec; --no_metadata ("bare") drops ModelSpec."""
    info = {"network_dim": "Dynamic", "network_alpha": "Dynamic", "merged_from": "x, y", "metadata_title": "out"}
    minimal = build_metadata(info, DEV, detail="minimal", now=datetime(2025, 1, 2))
    assert minimal["ss_network_dim"] == "Dynamic" and minimal["ss_merged_from"] == "x, y"
    assert minimal["modelspec.title"] == "out" and "ss_session_id" not in minimal
    bare = build_metadata(info, DEV, detail="bare")
    assert bare == {k: v for k, v in minimal.items() if k.startswith("ss_")}
    extracted = build_metadata({"network_dim": "4", "network_alpha": "4.0", "network_args": {}}, DEV, detail="bare")
    assert extracted["ss_network_args"] == "{}" and extracted["ss_network_alpha"] == "4.0"


def test_unknown_variant_is_refused() -> None:
    with pytest.raises(ValueError, match="dev"):
        FLUX1.architecture_of_variant("flux-2")
