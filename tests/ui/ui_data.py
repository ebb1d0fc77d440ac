"""Small captioned images for the UI tests (a module of its own: `conftest` names clash across test folders)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_images(folder: Path, *, count: int = 4, size: int = 64) -> Path:
    """`count` noisy images with a red square, each with a `.txt` caption."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        pixels = (rng.random((size, size, 3)) * 255).astype("uint8")
        pixels[16:48, 16:40] = (230, 20, 20)
        Image.fromarray(pixels).save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(f"a photo of sks red square {i}", encoding="utf-8")
    return folder
