"""Fixtures for the reliability tests: a small captioned dataset and training command lines for the tiny models."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from reliability_data import COMMON, model_flags, write_dataset, write_toml


@pytest.fixture(scope="session")
def rel_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("rel_dataset") / "img")


@pytest.fixture
def argv_for(tiny_ckpts, rel_images, tmp_path) -> Callable[..., list[str]]:
    """argv_for(*extra, out=..., general=..., subset=..., batch_size=..., images=...) -> training command line."""

    def build(*extra: str, out: Path | None = None, general: str = "", subset: str = "", batch_size: int = 2,
              images: Path | None = None, toml_name: str = "dataset.toml") -> list[str]:
        toml = write_toml(tmp_path / toml_name, images or rel_images, batch_size=batch_size, general=general,
                          subset=subset)
        return [*model_flags(tiny_ckpts), f"--dataset_config={toml}", f"--output_dir={out or tmp_path / 'out'}",
                *COMMON, *extra]

    return build
