"""Fixtures for the config tests: real (empty) files for every path flag and the smallest valid command line."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    """Real (empty) files for every path flag, so existence checks pass."""
    paths = {name: tmp_path / f"{name}.safetensors" for name in ("flux", "clip_l", "t5xxl", "ae", "lora")}
    paths["dataset"] = tmp_path / "my_flux_dataset_config.toml"
    paths["prompts"] = tmp_path / "prompts.txt"
    for path in paths.values():
        path.write_bytes(b"x")
    paths["out"] = tmp_path / "out"
    paths["images"] = tmp_path / "images"
    paths["images"].mkdir()
    return paths


@pytest.fixture
def base(files) -> list[str]:
    """The smallest valid command line."""
    return ["--pretrained_model_name_or_path", str(files["flux"]), "--clip_l", str(files["clip_l"]),
            "--t5xxl", str(files["t5xxl"]), "--ae", str(files["ae"]), "--dataset_config", str(files["dataset"]),
            "--output_dir", str(files["out"])]
