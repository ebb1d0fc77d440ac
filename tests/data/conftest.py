"""Small generated images for the data tests (written with Pillow into tmp_path; no binary files in git)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def save_array(path: Path, array: np.ndarray, mode: str | None = None, **save_kwargs) -> Path:
    """Write `array` as an image file (format from the suffix unless `format=` is given)."""
    image = Image.fromarray(array) if mode is None else Image.fromarray(array).convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **save_kwargs)
    return path


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG that declares width×height in its IHDR but carries no pixel data (decompression-bomb bait)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 16)  # a few bytes of a first row; the rest is missing
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def gradient(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A deterministic RGB test pattern, uint8 H×W×3."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    return folder


@pytest.fixture
def helpers():
    """The image-writing helpers above, as a fixture (tests/ is not a package, so they cannot be imported)."""
    from types import SimpleNamespace

    return SimpleNamespace(save_array=save_array, png_header_only=png_header_only, gradient=gradient)
