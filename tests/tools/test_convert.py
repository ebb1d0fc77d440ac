"""convert_flux_lora: sd-scripts <-> diffusers / PEFT / ai-toolkit files, nothing dropped silently (spec §10.2, §12.34)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from fluxlora.errors import CheckpointError, ConfigError
from fluxlora.network.formats import effective_deltas
from fluxlora.tools.convert import main

REPO = Path(__file__).resolve().parents[2]
KEYS = ["double_blocks.0.img_attn.qkv.weight", "double_blocks.1.txt_attn.qkv.weight", "double_blocks.1.img_mlp.2.weight",
        "single_blocks.0.linear1.weight", "single_blocks.1.linear2.weight", "img_in.weight", "txt_in.weight",
        "time_in.in_layer.weight", "guidance_in.out_layer.weight", "vector_in.in_layer.weight"]


@pytest.fixture
def kohya_file(h, write) -> tuple[Path, dict[str, torch.Tensor]]:
    flux = h.tiny_flux_sd(depth=2, single=2)
    sd = h.make_lora(flux, KEYS, "lora_unet", rank=4, alpha=2.0, seed=1)
    sd |= h.make_lora(h.clip_sd(), ["text_model.encoder.layers.0.self_attn.v_proj.weight",
                                    "text_model.encoder.layers.1.mlp.fc2.weight"], "lora_te1", alpha=8.0, seed=2)
    sd |= h.make_lora(h.t5_sd(), ["encoder.block.0.layer.1.DenseReluDense.wo.weight"], "lora_te3", alpha=None, seed=3)
    return write("kohya.safetensors", sd, {"ss_network_dim": "4", "modelspec.title": "t"}), sd


def _deltas_equal(a: dict, b: dict) -> None:
    da, db = effective_deltas(a), effective_deltas(b)
    assert set(da) == set(db)
    for name in da:
        torch.testing.assert_close(db[name], da[name], rtol=1e-6, atol=1e-6, msg=name)


@pytest.mark.parametrize("fmt", ["diffusers", "ai-toolkit", "peft"])
def test_round_trip_through_files(kohya_file, tmp_path, fmt):
    path, sd = kohya_file
    there, back = tmp_path / f"{fmt}.safetensors", tmp_path / "back.safetensors"
    assert main(["--src", "sd-scripts", "--dst", fmt, "--src_path", str(path), "--dst_path", str(there)]) == 0
    converted = load_file(str(there))
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in converted)
    expected_x = "x_embedder.lora_A.weight" if fmt == "peft" else "transformer.x_embedder.lora_A.weight"
    assert expected_x in converted  # input layers survive (sd-scripts dropped them)
    assert "text_encoder.text_model.encoder.layers.1.mlp.fc2.lora_B.weight" in converted
    assert "text_encoder_2.encoder.block.0.layer.1.DenseReluDense.wo.lora_A.weight" in converted
    main(["--src", fmt, "--dst", "sd-scripts", "--src_path", str(there), "--dst_path", str(back)])
    _deltas_equal(sd, load_file(str(back)))
    with safe_open(str(back), framework="pt") as f:
        assert f.metadata() == {"ss_network_dim": "4", "modelspec.title": "t"}  # copied unchanged


def test_default_direction_is_ai_toolkit_to_sd_scripts(kohya_file, tmp_path):
    path, sd = kohya_file
    ait = tmp_path / "ait.safetensors"
    main(["--dst", "ai-toolkit", "--src", "sd-scripts", "--src_path", str(path), "--dst_path", str(ait)])
    out = tmp_path / "k.safetensors"
    main(["--src_path", str(ait), "--dst_path", str(out)])
    _deltas_equal(sd, load_file(str(out)))


def test_unmapped_keys_fail_unless_dropped(kohya_file, write, tmp_path):
    _, sd = kohya_file
    bad = dict(sd) | {"lora_unet_final_layer_norm.lora_down.weight": torch.ones(2, 4),
                      "lora_unet_final_layer_norm.lora_up.weight": torch.ones(4, 2)}
    src, dst = write("bad.safetensors", bad), tmp_path / "d.safetensors"
    args = ["--src", "sd-scripts", "--dst", "diffusers", "--src_path", str(src), "--dst_path", str(dst)]
    with pytest.raises(CheckpointError, match=r"bad.safetensors.*lora_unet_final_layer_norm.*--drop_unmapped"):
        main(args)
    assert not dst.exists()
    main([*args, "--drop_unmapped"])
    back = tmp_path / "b.safetensors"
    main(["--src", "diffusers", "--dst", "sd-scripts", "--src_path", str(dst), "--dst_path", str(back)])
    _deltas_equal(sd, load_file(str(back)))


def test_wrong_src_and_bad_files(kohya_file, tmp_path):
    path, _ = kohya_file
    with pytest.raises(ConfigError, match="sd-scripts format but --src is diffusers"):
        main(["--src", "diffusers", "--dst", "sd-scripts", "--src_path", str(path), "--dst_path", str(tmp_path / "o")])
    with pytest.raises(CheckpointError, match="hidden_size is 3072"):
        main(["--src", "sd-scripts", "--dst", "diffusers", "--src_path", str(path),
              "--dst_path", str(tmp_path / "o.safetensors"), "--hidden_size", "3072"])
    pickle = tmp_path / "lora.safetensors.pt"
    torch.save({}, pickle)
    with pytest.raises(CheckpointError, match="pickle"):
        main(["--src_path", str(pickle), "--dst_path", str(tmp_path / "o.safetensors")])
    with pytest.raises(ConfigError, match="--dst_path"):
        main(["--src_path", str(path)])
    with pytest.raises(SystemExit):
        main(["--src", "kohya", "--src_path", str(path), "--dst_path", "x"])  # argparse choices


def test_root_shim_runs_as_a_script(kohya_file, tmp_path):
    """`python convert_flux_lora.py ...` as the guide writes it (exit codes of errors: see test_merge)."""
    path, sd = kohya_file
    out = tmp_path / "d.safetensors"
    cmd = [sys.executable, str(REPO / "convert_flux_lora.py"), "--src", "sd-scripts", "--dst", "diffusers",
           "--src_path", str(path), "--dst_path", str(out)]
    assert subprocess.run(cmd, cwd=REPO, capture_output=True, text=True).returncode == 0
    assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in load_file(str(out))


@pytest.mark.parametrize(("fmt", "says"), [
    ("sd-scripts", ("ComfyUI", "Forge", "diffusers")),
    ("diffusers", ("FluxPipeline.load_lora_weights", "--dst sd-scripts", "ComfyUI")),
    ("ai-toolkit", ("ai-toolkit", "--dst sd-scripts", "ComfyUI")),
    ("peft", ("load_lora_adapter", "--dst sd-scripts", "ComfyUI")),
])
def test_output_names_the_consumers_of_the_layout_written(kohya_file, tmp_path, capsys, fmt, says):
    """Who reads the file is printed with it; every layout ComfyUI cannot read in full points to the kohya one."""
    path, _ = kohya_file
    out = tmp_path / f"{fmt}.safetensors"
    assert main(["--src", "sd-scripts", "--dst", fmt, "--src_path", str(path), "--dst_path", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed
    for fragment in says:
        assert fragment in printed, (fragment, printed)
    if fmt == "sd-scripts":
        assert "--dst sd-scripts" not in printed  # nothing to recommend: it is the layout ComfyUI/Forge read
