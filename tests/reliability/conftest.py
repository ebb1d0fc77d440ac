"""Fixtures for the reliability tests: a small captioned dataset and training command lines for the tiny models."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from reliability_data import write_dataset, write_toml

HERE = Path(__file__).resolve().parent


def model_flags(tiny) -> list[str]:
    return [f"--pretrained_model_name_or_path={tiny.flux_dev}", f"--clip_l={tiny.clip_l}", f"--t5xxl={tiny.t5xxl}",
            f"--ae={tiny.ae}"]


COMMON = ["--output_name=lora", "--network_module=networks.lora_flux", "--network_dim=4", "--learning_rate=1e-3",
          "--seed=7", "--t5xxl_max_token_length=16", "--network_train_unet_only"]


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
