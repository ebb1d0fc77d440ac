"""Helpers for the dataset and loader tests (imported explicitly; tests/data/conftest.py belongs to images/captions)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_image(path: Path, size: tuple[int, int], *, seed: int = 0, alpha: bool = False, noise: bool = False) -> Path:
    """A PNG of `size` (width, height): a solid colour from `seed`, or random pixels with `noise`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    channels = 4 if alpha else 3
    if noise:
        pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    else:
        pixels = np.broadcast_to(rng.integers(0, 256, channels, dtype=np.uint8), (size[1], size[0], channels)).copy()
    Image.fromarray(pixels, "RGBA" if alpha else "RGB").save(path)
    return path


def write_folder(folder: Path, sizes: list[tuple[int, int]], *, captions: list[str] | None = None,
                 ext: str = ".txt", noise: bool = False, alpha: bool = False) -> list[Path]:
    """Images img000.png, img001.png, ... with optional caption files beside them."""
    paths = []
    for i, size in enumerate(sizes):
        p = write_image(folder / f"img{i:03d}.png", size, seed=i, noise=noise, alpha=alpha)
        if captions is not None:
            p.with_suffix(ext).write_text(captions[i], encoding="utf-8")
        paths.append(p)
    return paths


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "dataset.toml"
    path.write_text(text, encoding="utf-8")
    return path
