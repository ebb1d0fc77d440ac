"""`fluxlora make-tiny --family flux2` and `fluxlora inspect` on FLUX.2 files (and FLUX.1 files as before)."""

from __future__ import annotations

from fluxlora.cli import main


def test_make_tiny_and_inspect_flux2(tmp_path, capsys):
    assert main(["make-tiny", "--family", "flux2", str(tmp_path), "--model_version", "klein-base-9b"]) == 0
    capsys.readouterr()
    files = [tmp_path / "flux-2-klein-base-9b.safetensors", tmp_path / "qwen_3_8b.safetensors",
             tmp_path / "flux2-ae.safetensors"]
    assert main(["inspect", *map(str, files)]) == 0
    out = capsys.readouterr().out
    assert "variant:    klein-base-9b" in out and "guidance no" in out
    assert "Qwen3 (FLUX.2 [klein] text encoder)" in out and "width 48, 28 layers" in out
    assert "128 channels after 2×2 patching" in out


def test_make_tiny_flux1_is_unchanged(tmp_path, capsys):
    assert main(["make-tiny", str(tmp_path)]) == 0
    assert main(["inspect", str(tmp_path / "flux1-dev.safetensors")]) == 0
    assert "variant:    dev" in capsys.readouterr().out
    assert main(["make-tiny", "--family", "sd3", str(tmp_path)]) == 2
