"""Dataset writers shared by the reliability tests (a module of its own: `conftest` names clash across folders)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_dataset(folder: Path, *, count: int = 4, size: int = 64, seed: int = 0) -> Path:
    """`count` noisy images with a red square, each with a multi-tag caption (so caption shuffling matters)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        pixels = (rng.random((size, size, 3)) * 255).astype("uint8")
        pixels[size // 4: 3 * size // 4, size // 4: size // 2] = (230, 20, 20)  # not mirror-symmetric: flips matter
        Image.fromarray(pixels).save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(f"sks, red square, photo, noise {i}, detailed", encoding="utf-8")
    return folder


def write_toml(path: Path, image_dir: Path, *, resolution: int = 64, batch_size: int = 2, general: str = "",
               subset: str = "") -> Path:
    path.write_text(
        f'[general]\ncaption_extension = ".txt"\n{general}\n[[datasets]]\nresolution = {resolution}\n'
        f'batch_size = {batch_size}\n  [[datasets.subsets]]\n  image_dir = "{image_dir.as_posix()}"\n  {subset}\n',
        encoding="utf-8",
    )
    return path


def model_flags(tiny) -> list[str]:
    return [f"--pretrained_model_name_or_path={tiny.flux_dev}", f"--clip_l={tiny.clip_l}", f"--t5xxl={tiny.t5xxl}",
            f"--ae={tiny.ae}"]


COMMON = ["--output_name=lora", "--network_module=networks.lora_flux", "--network_dim=4", "--learning_rate=1e-3",
          "--seed=7", "--t5xxl_max_token_length=16", "--network_train_unet_only"]
