"""Saving and loading LoRA files: kohya keys, alpha, precision, strict loading, dim_from_weights, hashes, metadata."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from network_helpers import flux_inputs, randomize_lora_, small_flux, tiny_clip, tiny_t5
from safetensors import safe_open
from safetensors.torch import save, save_file

from fluxlora.errors import CheckpointError, ConfigError
from fluxlora.network.lora import create_network, create_network_from_weights
from fluxlora.network.saving import lora_hashes, read_lora, save_dtype


def trained(network_args=(), dim=4, alpha=2.0, seed=5, with_te=False):
    flux = small_flux()
    encoders = [tiny_clip(), tiny_t5()] if with_te else []
    network = create_network(1.0, dim, alpha, flux, encoders, network_args=list(network_args))
    randomize_lora_(network, seed=seed)
    network.apply_to(flux, encoders)
    return flux, encoders, network.eval()


def test_saved_file_has_kohya_keys_alpha_everywhere_and_reloads_with_file_alpha(tmp_path) -> None:
    flux, _, network = trained(dim=4, alpha=2.0)
    path = tmp_path / "lora.safetensors"
    network.save(path, None, {"ss_network_dim": "4"})
    tensors, metadata = read_lora(path)
    modules = {k.split(".")[0] for k in tensors}
    assert modules == {m.lora_name for m in network.loras}
    for name in modules:
        assert set(k for k in tensors if k.startswith(name + ".")) == {f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha"}
        assert tensors[f"{name}.alpha"].ndim == 0 and float(tensors[f"{name}.alpha"]) == 2.0
    assert metadata["ss_network_dim"] == "4" and len(metadata["sshs_model_hash"]) == 64

    # A network built with another alpha takes the file's alpha (spec §12.22 fixed): same outputs.
    flux2 = small_flux()
    other = create_network(1.0, 4, 0.5, flux2, [])
    info = other.load_weights(path)
    other.apply_to(flux2, [])
    other.eval()
    assert info.loaded == len(network.loras) and info.missing == [] and info.skipped == []
    assert all(m.scale == 0.5 for m in other.loras)
    with torch.no_grad():
        torch.testing.assert_close(flux2(**flux_inputs()), flux(**flux_inputs()), rtol=0, atol=1e-6)


def test_resume_state_dict_restores_alpha_and_scale() -> None:
    _, _, network = trained(alpha=3.0, network_args=["split_qkv=True"])
    other = create_network(1.0, 4, 1.0, small_flux(), [], network_args=["split_qkv=True"])
    other.load_state_dict(network.state_dict())  # what accelerate's load_state does on --resume
    assert all(m.scale == 0.75 for m in other.loras)
    for a, b in zip(network.parameters(), other.parameters(), strict=False):
        assert torch.equal(a, b)


@pytest.mark.parametrize(("precision", "dtype"), [("fp16", torch.float16), ("bf16", torch.bfloat16), ("float", torch.float32), (None, torch.float32)])
def test_save_precision(tmp_path, precision, dtype) -> None:
    _, _, network = trained()
    path = tmp_path / "p.safetensors"
    network.save(path, save_dtype(precision))
    with safe_open(str(path), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {dtype}  # alpha too, as sd-scripts
    with pytest.raises(ConfigError, match="--save_precision"):
        save_dtype("fp8")


def test_non_safetensors_and_pickle_files_are_refused(tmp_path) -> None:
    _, _, network = trained()
    with pytest.raises(ConfigError, match="safetensors"):
        network.save(tmp_path / "lora.pt")
    bad = tmp_path / "lora.ckpt"
    bad.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="pickle"):
        network.load_weights(bad)


def test_strict_loading_names_the_first_bad_keys_and_counts(tmp_path) -> None:
    _, _, network = trained()
    sd = network.state_dict_for_save()
    extra = dict(sd)
    extra["lora_unet_final_layer_linear.lora_down.weight"] = torch.zeros(4, 32)
    extra["lora_unet_nothing.alpha"] = torch.tensor(1.0)
    with pytest.raises(CheckpointError, match=r"2 key\(s\) that match no module.*lora_unet_final_layer_linear"):
        network.load_lora_state_dict(extra, path="x.safetensors")
    wrong = dict(sd)
    wrong["lora_unet_single_blocks_0_linear2.lora_down.weight"] = torch.zeros(8, 160)
    with pytest.raises(CheckpointError, match=r"1 shape problem.*single_blocks_0_linear2.lora_down.weight \(file \[8, 160\], network \[4, 160\]"):
        network.load_lora_state_dict(wrong)
    # a file made for another rank is reported too, with advice
    path = tmp_path / "r8.safetensors"
    trained(dim=8)[2].save(path)
    with pytest.raises(CheckpointError, match="--dim_from_weights"):
        network.load_weights(path)


def test_missing_modules_and_skipped_components_are_reported(tmp_path) -> None:
    _, _, full = trained(with_te=True)
    sd = full.state_dict_for_save()
    partial = {k: v for k, v in sd.items() if "single_blocks" not in k}
    network = create_network(1, 4, 2, small_flux(), [tiny_clip(), None], train_text_encoder=False)
    info = network.load_lora_state_dict(partial)
    assert info.skipped and all(k.startswith("lora_te1_") for k in info.skipped)
    assert info.missing == sorted(m.lora_name for m in network.loras if "single_blocks" in m.lora_name)
    # without alpha the scale is 1 (what diffusers and ComfyUI assume)
    no_alpha = {k: v for k, v in sd.items() if not k.endswith(".alpha") and k.startswith("lora_unet")}
    network.load_lora_state_dict(no_alpha)
    assert all(m.scale == 1.0 for m in network.loras)


def test_dim_from_weights_rebuilds_ranks_alphas_and_keeps_other_args(tmp_path) -> None:
    args = ["in_dims=[2,0,0,0,3]", "network_reg_dims=single_blocks_1=6", "train_t5xxl=True", "img_mod_dim=0"]
    flux, encoders, network = trained(args, dim=4, alpha=3.0, with_te=True)
    path = tmp_path / "lora.safetensors"
    network.save(path)
    flux2, encoders2 = small_flux(), [tiny_clip(), tiny_t5()]
    rebuilt, sd = create_network_from_weights(1.0, path, flux2, encoders2,
                                              network_args=["rank_dropout=0.1", "loraplus_lr_ratio=4"])
    assert {m.lora_name: (m.lora_dim, float(m.alpha)) for m in rebuilt.loras} == \
        {m.lora_name: (m.lora_dim, 3.0) for m in network.loras}
    assert rebuilt.args.rank_dropout == 0.1 and all(m.rank_dropout == 0.1 for m in rebuilt.loras)
    assert "textencoder clip_l plus" in rebuilt.prepare_optimizer_params(None, 1e-4, 1e-4).names
    rebuilt.load_lora_state_dict(sd, path=path)
    rebuilt.apply_to(flux2, encoders2)
    rebuilt.eval()
    with torch.no_grad():
        torch.testing.assert_close(flux2(**flux_inputs()), flux(**flux_inputs()), rtol=0, atol=1e-6)
        tok = torch.tensor([[4, 8, 1]])
        torch.testing.assert_close(encoders2[1](tok).last_hidden_state, encoders[1](tok).last_hidden_state)
    with pytest.raises(ConfigError, match="--network_weights"):
        create_network_from_weights(1.0, None, flux2, [])


def test_split_qkv_file_reloads_split_and_fused(tmp_path) -> None:
    flux, _, network = trained(["split_qkv=True"], dim=2, alpha=1.0)
    path = tmp_path / "split.safetensors"
    network.save(path)
    expected = flux(**flux_inputs()).detach()
    for args in (["split_qkv=True"], []):  # into a split network and into a plain one
        flux2 = small_flux()
        rebuilt, sd = create_network_from_weights(1.0, path, flux2, [], network_args=args)
        rebuilt.load_lora_state_dict(sd)
        rebuilt.apply_to(flux2, [])
        rebuilt.eval()
        qkv = rebuilt.get_submodule("lora_unet_double_blocks_0_img_attn_qkv")
        assert (qkv.lora_dim, qkv.parts) == ((2, 3) if args else (6, 1))
        with torch.no_grad():
            torch.testing.assert_close(flux2(**flux_inputs()), expected, rtol=0, atol=1e-6)
    # a plain (dense-up) file cannot be split
    plain_path = tmp_path / "plain.safetensors"
    trained(dim=12)[2].save(plain_path)  # rank divisible by 3 and 4
    split_net, sd = create_network_from_weights(1.0, plain_path, small_flux(), [], network_args=["split_qkv=True"])
    with pytest.raises(CheckpointError, match="not block-diagonal"):
        split_net.load_lora_state_dict(sd, path=plain_path)


# ---------------------------------------------------------------------------------------------- hashes
def test_sshs_hashes_follow_sd_scripts_definition(tmp_path) -> None:
    tensors = {"b.lora_up.weight": torch.linspace(-1, 1, 400_000).reshape(1000, 400), "a.alpha": torch.tensor(4.0)}
    metadata = {"ss_network_dim": "4", "ss_output_name": "x", "modelspec.title": "t", "sshs_model_hash": "old"}
    model_hash, legacy = lora_hashes(tensors, metadata)
    # independent: serialise with only ss_* metadata; sha256 after the 8+n header; 64 KiB at 1 MiB
    blob = save(tensors, metadata={"ss_network_dim": "4", "ss_output_name": "x"})
    n = int.from_bytes(blob[:8], "little")
    assert model_hash == hashlib.sha256(blob[8 + n:]).hexdigest()
    assert legacy == hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8]
    # user metadata (modelspec) does not change them
    assert lora_hashes(tensors, {**metadata, "modelspec.title": "other"}) == (model_hash, legacy)
    # the saved file's payload has the same sha256
    from fluxlora.network.saving import save_lora

    path = tmp_path / "h.safetensors"
    save_lora(path, tensors, metadata)
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    assert header["__metadata__"]["sshs_model_hash"] == hashlib.sha256(raw[8 + n:]).hexdigest() == model_hash
    assert header["__metadata__"]["sshs_legacy_hash"] == legacy


def test_read_lora_rejects_an_empty_file(tmp_path) -> None:
    path = tmp_path / "empty.safetensors"
    save_file({}, str(path))
    with pytest.raises(CheckpointError, match="no tensors"):
        read_lora(path)
