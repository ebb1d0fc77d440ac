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
                       repeats: int = 1, extra: str = "", pairs: Path | None = None) -> Path:
    pair_line = f'  conditioning_data_dir = "{pairs.as_posix()}"\n' if pairs is not None else ""
    path.write_text(
        f'[general]\ncaption_extension = ".txt"\n{extra}\n[[datasets]]\nresolution = {resolution}\n'
        f'batch_size = {batch_size}\n  [[datasets.subsets]]\n  image_dir = "{image_dir.as_posix()}"\n'
        f"  num_repeats = {repeats}\n{pair_line}",
        encoding="utf-8",
    )
    return path


# The FLUX.1-family models the training tests run on (`family` parameter of `train_argv`).
FAMILIES = ("flux1", "chroma", "kontext", "fill")


@pytest.fixture(scope="session")
def tiny_pairs(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Pair folders for `tiny_dataset`: reference images (the image mirrored, Kontext) and masks (its centre, Fill)."""
    root = tmp_path_factory.mktemp("pairs")
    folders = {"kontext": root / "references", "fill": root / "masks"}
    for folder in folders.values():
        folder.mkdir()
    for image in sorted(tiny_dataset.glob("*.png")):
        pixels = np.asarray(Image.open(image))
        Image.fromarray(np.ascontiguousarray(pixels[:, ::-1])).save(folders["kontext"] / image.name)
        mask = np.zeros(pixels.shape[:2], np.uint8)
        mask[16:48, 8:40] = 255
        Image.fromarray(mask, "L").save(folders["fill"] / image.name)
    return folders


def family_model_flags(family: str, tiny, tiny_families) -> list[str]:
    """The model flags of a family's tiny files (Chroma reads no CLIP-L; Kontext is chosen with --model_type)."""
    if family == "flux1":
        return model_flags(tiny)
    transformer = getattr(tiny_families, family)
    flags = [f"--pretrained_model_name_or_path={transformer}", f"--t5xxl={tiny.t5xxl}", f"--ae={tiny.ae}"]
    if family != "chroma":
        flags.append(f"--clip_l={tiny.clip_l}")
    if family == "kontext":
        flags.append("--model_type=kontext")
    return flags


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
    """Build a training command line for the tiny models; `extra` flags are appended. `family` picks the model:
    FAMILIES (Kontext and Fill get their pairs in the dataset), or "flux2" the tiny FLUX.2 klein base 4B (`version`
    another --model_version's files)."""

    def build(*extra: str, output_dir: Path | None = None, toml_extra: str = "", batch_size: int = 2,
              family: str = "flux1", version: str = "klein-base-4b") -> list[str]:
        pairs = request.getfixturevalue("tiny_pairs").get(family) if family in ("kontext", "fill") else None
        toml = write_dataset_toml(tmp_path / "dataset.toml", tiny_dataset, batch_size=batch_size, extra=toml_extra,
                                  pairs=pairs)
        out = output_dir or tmp_path / "out"
        if family == "flux2":
            models = flux2_model_flags(request.getfixturevalue("tiny_flux2_ckpts")[version])
        else:
            families = request.getfixturevalue("tiny_family_ckpts") if family != "flux1" else None
            models = family_model_flags(family, tiny_ckpts, families)
        return [*models, f"--dataset_config={toml}", f"--output_dir={out}", "--output_name=lora",
                "--network_module=networks.lora_flux", "--network_dim=4", "--learning_rate=1e-3", "--seed=7",
                "--t5xxl_max_token_length=16", "--network_train_unet_only", *extra]

    return build
