"""Fixtures for end-to-end training tests: a small captioned dataset and the command line for the tiny models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def write_dataset(folder: Path, *, count: int = 4, size: int = 64, seed: int = 0) -> Path:
    """`count` noisy images with a red square and a caption each (a visible concept to learn)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        pixels = (rng.random((size, size, 3)) * 255).astype("uint8")
        pixels[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = (230, 20, 20)
        Image.fromarray(pixels).save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text("a photo of sks red square", encoding="utf-8")
    return folder


def write_dataset_toml(path: Path, image_dir: Path, *, resolution: int = 64, batch_size: int = 2,
                       repeats: int = 1, extra: str = "") -> Path:
    path.write_text(
        f'[general]\ncaption_extension = ".txt"\n{extra}\n[[datasets]]\nresolution = {resolution}\n'
        f'batch_size = {batch_size}\n  [[datasets.subsets]]\n  image_dir = "{image_dir.as_posix()}"\n'
        f"  num_repeats = {repeats}\n",
        encoding="utf-8",
    )
    return path


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("dataset") / "img")


def model_flags(tiny) -> list[str]:
    return [
        f"--pretrained_model_name_or_path={tiny.flux_dev}", f"--clip_l={tiny.clip_l}", f"--t5xxl={tiny.t5xxl}",
        f"--ae={tiny.ae}",
    ]


def flux2_model_flags(paths) -> list[str]:
    """The command-line model files of a tiny FLUX.2 set (`fluxlora.families.flux2.tiny.TinyFlux2Paths`)."""
    return [f"--pretrained_model_name_or_path={paths.transformer}", f"--text_encoder={paths.text_encoder}",
            f"--ae={paths.ae}", f"--tokenizer_cache_dir={paths.tokenizer}"]


@pytest.fixture
def train_argv(tiny_ckpts, tiny_dataset, tmp_path, request):
    """Build a training command line for the tiny models; `extra` flags are appended. `family="flux2"` trains the
    tiny FLUX.2 klein base 4B (`version` another --model_version's files) instead of the tiny FLUX.1-dev."""

    def build(*extra: str, output_dir: Path | None = None, toml_extra: str = "", batch_size: int = 2,
              family: str = "flux1", version: str = "klein-base-4b") -> list[str]:
        toml = write_dataset_toml(tmp_path / "dataset.toml", tiny_dataset, batch_size=batch_size, extra=toml_extra)
        out = output_dir or tmp_path / "out"
        models = model_flags(tiny_ckpts) if family == "flux1" else \
            flux2_model_flags(request.getfixturevalue("tiny_flux2_ckpts")[version])
        return [*models, f"--dataset_config={toml}", f"--output_dir={out}", "--output_name=lora",
                "--network_module=networks.lora_flux", "--network_dim=4", "--learning_rate=1e-3", "--seed=7",
                "--t5xxl_max_token_length=16", "--network_train_unet_only", *extra]

    return build
