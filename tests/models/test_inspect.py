"""`fluxlora inspect`: header-only descriptions of FLUX, LoRA and other files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fluxlora.cli import main as cli_main
from fluxlora.models import inspect
from fluxlora.models.diffusers_keys import bfl_to_diffusers


@pytest.fixture
def no_tensor_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    import safetensors

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("tensor data was read")
    monkeypatch.setattr(safetensors, "safe_open", refuse)
    monkeypatch.setattr("fluxlora.models.flux_loading.load_tensors", refuse)


def test_flux_files(flux_files: dict[str, Path], capsys: pytest.CaptureFixture, no_tensor_reads: None) -> None:
    assert inspect.main([str(flux_files["dev"]), str(flux_files["schnell"])]) == 0
    out = capsys.readouterr().out
    dev, schnell = out.split(str(flux_files["schnell"]))
    assert "variant:    dev" in dev and "variant:    schnell" in schnell
    assert "layout:     bfl" in dev and "F32 100.0%" in dev
    assert "width 64, 2 heads of 32, 2 double + 2 single blocks" in dev
    assert f"{flux_files['dev'].stat().st_size / 1e6:.2f} MB" in dev


def test_parameter_count_matches_tensors(flux_files: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    n = sum(t.numel() for t in load_file(str(flux_files["dev"])).values())
    assert inspect.main([str(flux_files["dev"])]) == 0
    assert f"parameters: {n:,}" in capsys.readouterr().out


def test_diffusers_file(tmp_path: Path, flux_files: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "diffusers.safetensors"
    save_file({k: v.contiguous() for k, v in bfl_to_diffusers(load_file(str(flux_files["schnell"]))).items()}, str(path))
    assert inspect.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "flux-diffusers" in out and "layout:     diffusers" in out and "variant:    schnell" in out


def test_lora_summary(tmp_path: Path, capsys: pytest.CaptureFixture, no_tensor_reads: None) -> None:
    path = tmp_path / "lora.safetensors"
    tensors = {}
    for name, rank in (("lora_unet_double_blocks_0_img_attn_qkv", 4), ("lora_unet_single_blocks_1_linear1", 8),
                       ("lora_te1_text_model_encoder_layers_0_mlp_fc1", 4)):
        tensors[f"{name}.lora_down.weight"] = torch.zeros(rank, 16)
        tensors[f"{name}.lora_up.weight"] = torch.zeros(16, rank)
        tensors[f"{name}.alpha"] = torch.tensor(float(rank))
    save_file(tensors, str(path), metadata={"ss_network_dim": "4", "ss_network_alpha": "1.0",
                                           "ss_network_module": "networks.lora_flux", "modelspec.title": "x"})
    assert inspect.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "kind:       lora" in out
    assert "modules:    3 (te1 1, unet 2)" in out
    assert "ranks:      4 ×2, 8 ×1" in out
    assert "alpha keys: 3" in out
    assert "ss_network_dim: 4" in out and "ss_network_module: networks.lora_flux" in out
    assert "3 ss_* keys, 1 other keys" in out


def test_bad_file_reported_and_others_still_printed(tmp_path: Path, flux_files: dict[str, Path],
                                                    capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "missing.safetensors"
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"x")
    assert inspect.main([str(missing), str(flux_files["dev"]), str(pickle)]) == 2
    captured = capsys.readouterr()
    assert "variant:    dev" in captured.out
    errors = captured.err.strip().splitlines()
    assert len(errors) == 2
    assert str(missing) in errors[0] and "not found" in errors[0]
    assert str(pickle) in errors[1] and "pickle" in errors[1]


def test_cli_dispatch(flux_files: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    assert cli_main(["inspect", str(flux_files["schnell"])]) == 0
    assert "variant:    schnell" in capsys.readouterr().out


def test_lycoris_summary_counts_each_algorithm(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "lokr.safetensors"
    tensors = {"lora_unet_double_blocks_0_img_attn_qkv.lokr_w1": torch.zeros(4, 4),
               "lora_unet_double_blocks_0_img_attn_qkv.lokr_w2": torch.zeros(12, 4),
               "lora_unet_single_blocks_0_linear2.hada_w1_a": torch.zeros(16, 2),
               "lora_unet_single_blocks_0_linear2.hada_w1_b": torch.zeros(2, 16),
               "lora_unet_single_blocks_0_linear2.hada_w2_a": torch.zeros(16, 2),
               "lora_unet_single_blocks_0_linear2.hada_w2_b": torch.zeros(2, 16),
               "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 16),
               "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(16, 2),
               "lora_te1_text_model_encoder_layers_0_mlp_fc1.dora_scale": torch.zeros(16, 1)}
    save_file(tensors, str(path))
    assert inspect.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "kind:       lora" in out and "modules:    3 (te1 1, unet 2)" in out
    assert "algorithms: LoHa 1, LoKr 1, LoRA + DoRA 1" in out
