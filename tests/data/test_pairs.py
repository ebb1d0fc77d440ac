"""Paired images (conditioning_data_dir / control_directory): matching by stem, checks found before weights load,
the same bucket, crop and flip for both images of a pair, and content-keyed caches of the pair's latents."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest_datasets import write_image, write_toml
from PIL import Image

from fluxlora.config.dataset import DatasetDefaults, load_dataset_config
from fluxlora.data.datasets import build_training_data
from fluxlora.data.images import load_image
from fluxlora.data.loader import make_dataloader
from fluxlora.data.pairs import PairError, control_index, find_control, masked_image
from fluxlora.errors import DatasetError

TOML = """
[general]
resolution = 64
enable_bucket = true
min_bucket_reso = 32
max_bucket_reso = 128
bucket_reso_steps = 16
caption_extension = ".txt"
{general}
[[datasets]]
batch_size = 2
  [[datasets.subsets]]
  image_dir = "{images}"
  {control_key} = "{controls}"
"""
SIZES = [(64, 64), (96, 64), (64, 96), (96, 64)]


def write_pairs(tmp_path: Path, kind: str, *, half: bool = False) -> tuple[Path, Path]:
    """Images img000..003 and their pairs: the same pixels (references; at half size with `half`) or masks whose
    left third is white."""
    images = []
    for i, (w, h) in enumerate(SIZES):  # smooth patterns: a half-size copy stays close, a shift or flip does not
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        pixels = np.stack([255 * x / w, 255 * y / h, 127.5 + 127 * np.sin((x + 2 * y + 7 * i) / 9)], axis=-1)
        images.append(tmp_path / "img" / f"img{i:03d}.png")
        images[-1].parent.mkdir(exist_ok=True)
        Image.fromarray(np.rint(pixels).astype(np.uint8)).save(images[-1])
        images[-1].with_suffix(".txt").write_text(f"c{i}", encoding="utf-8")
    folder = tmp_path / "control"
    folder.mkdir()
    for image in images:
        pixels = np.asarray(Image.open(image))
        if kind == "reference":
            out = Image.fromarray(pixels)
            if half:
                out = out.resize((out.width // 2, out.height // 2), Image.Resampling.BOX)
            out.save(folder / f"{image.stem}.jpg" if half else folder / f"{image.stem}.png", quality=100)
        else:
            mask = np.zeros(pixels.shape[:2], np.uint8)
            mask[:, : pixels.shape[1] // 3] = 255
            Image.fromarray(mask, "L").save(folder / f"{image.stem}.png")
    return tmp_path / "img", folder


def data_for(tmp_path: Path, kind: str | None, *, general: str = "", key: str = "conditioning_data_dir",
             half: bool = False, folders: tuple[Path, Path] | None = None):
    images, controls = folders or write_pairs(tmp_path, kind or "reference", half=half)
    text = TOML.format(general=general, images=images.as_posix(), controls=controls.as_posix(), control_key=key)
    return build_training_data(load_dataset_config(write_toml(tmp_path, text), DatasetDefaults()), seed=0,
                               control_kind=kind)


def test_find_control_by_stem_and_its_errors(tmp_path: Path) -> None:
    image = write_image(tmp_path / "a" / "cat.png", (64, 48))
    folder = tmp_path / "c"
    write_image(folder / "cat.webp", (32, 24))  # another extension, half size, same aspect: fine
    assert find_control(image, (64, 48), folder, control_index(folder), kind="reference") == folder / "cat.webp"
    with pytest.raises(PairError, match=r"cat.png: no reference image named cat\.\* in conditioning_data_dir"):
        find_control(image, (64, 48), folder, {}, kind="reference")
    write_image(folder / "cat.png", (64, 48))
    with pytest.raises(PairError, match=r"several masks match it .*cat.png, cat.webp"):
        find_control(image, (64, 48), folder, control_index(folder), kind="mask")
    (folder / "cat.png").unlink()
    write_image(folder / "cat.webp", (48, 48))
    with pytest.raises(PairError, match=r"is 48x48 but the image is 64x48; a pair must have the same aspect ratio"):
        find_control(image, (64, 48), folder, control_index(folder), kind="reference")
    (folder / "cat.webp").write_bytes(b"not an image")
    with pytest.raises(DatasetError, match="cat.webp") as err:
        find_control(image, (64, 48), folder, control_index(folder), kind="reference")
    assert not isinstance(err.value, PairError)  # an unreadable file, which --skip_bad_images may skip


def test_dataset_problems_are_reported_together_before_any_weight(tmp_path: Path) -> None:
    images, controls = write_pairs(tmp_path, "reference")
    (controls / "img001.png").unlink()
    write_image(controls / "img002.png", (64, 64))  # the image is 64x96
    with pytest.raises(DatasetError) as err:
        data_for(tmp_path, "reference", folders=(images, controls))
    message = str(err.value)
    assert "2 dataset problem(s)" in message
    assert "img001.png: no reference image named img001.*" in message and "img002.png: its reference image" in message
    # the folder given to a model that reads no pairs, or a pair model without the folder
    with pytest.raises(DatasetError, match=r"conditioning_data_dir: this model reads no paired images"):
        data_for(tmp_path, None, folders=(images, controls))
    text = TOML.format(general="", images=images.as_posix(), controls="", control_key="# no folder")
    blueprint = load_dataset_config(write_toml(tmp_path, text.replace('# no folder = ""', "")), DatasetDefaults())
    with pytest.raises(DatasetError, match=r"this model trains on pairs: set conditioning_data_dir \(or "
                                           r"control_directory\) to the folder of its masks"):
        build_training_data(blueprint, seed=0, control_kind="mask")


def test_musubi_control_directory_alias_and_entries(tmp_path: Path) -> None:
    data = data_for(tmp_path, "reference", key="control_directory")
    entries = data.datasets[0].entries
    assert data.control_kind == "reference" and len(entries) == 4
    assert all(e.control == (tmp_path / "control" / f"{e.path.stem}.png").resolve() for e in entries)


@pytest.mark.parametrize("half", [False, True])
def test_reference_gets_the_image_bucket_crop_and_flip(tmp_path: Path, half: bool) -> None:
    data = data_for(tmp_path, "reference", general="flip_aug = true\nrandom_crop = true", half=half)
    batches = list(make_dataloader(data, 1, seed=3))
    assert sum(len(b["captions"]) for b in batches) == 4
    for batch in batches:
        assert batch["control_images"].shape == batch["images"].shape
        difference = (batch["control_images"] - batch["images"]).abs().mean()
        # the same pixels: equal; half-size JPEG copies: close (a shifted crop or a missed flip would be far off)
        assert difference == 0 if not half else difference < 0.05, difference
        if half:  # not vacuous: the flipped image is far off
            assert (batch["control_images"] - batch["images"].flip(-1)).abs().mean() > 0.2


def test_mask_pairs_give_masks_and_masked_images(tmp_path: Path) -> None:
    data = data_for(tmp_path, "mask", general="flip_aug = true")
    seen_flipped = set()
    batches = [b for epoch in (1, 2, 3) for b in make_dataloader(data, epoch, seed=1)]
    for batch in batches:
        masks, images = batch["masks"], batch["images"]
        assert masks.shape[1] == 1 and set(masks.unique().tolist()) == {0.0, 1.0}
        assert torch.equal(batch["masked_images"], masked_image(images, masks))
        for mask in masks:  # a third of the width is white, on the left or (flipped with its image) the right
            left = bool(mask[0, :, 0].all())
            seen_flipped.add(not left)
            assert bool(mask[0, :, -1].any()) != left
    assert seen_flipped == {False, True}


def _fake_encode(pixels: torch.Tensor) -> torch.Tensor:
    """A deterministic 'autoencoder': 8x8 average pool, channels tiled to 16."""
    pooled = torch.nn.functional.avg_pool2d(pixels, 8)
    return torch.cat([pooled.repeat(1, 5, 1, 1), pooled[:, :1]], dim=1)


@pytest.mark.parametrize("kind", ["reference", "mask"])
def test_cached_pairs_match_the_uncached_path(tmp_path: Path, kind: str) -> None:
    from fluxlora.data.latent_cache import build_latent_cache

    data = data_for(tmp_path, kind, general="flip_aug = true", half=kind == "reference")
    items = data.latent_items()
    assert len(items) == 8  # each image and its reference image / masked image
    cache, stats = build_latent_cache(items, _fake_encode, ae_fingerprint="fake", flip_aug=True, progress=False,
                                      to_disk=True)
    assert stats.computed == 16
    uncached = list(make_dataloader(data, 1, seed=9))
    cached = list(make_dataloader(data, 1, seed=9, latent_cache=cache))
    for u, c in zip(uncached, cached, strict=True):
        assert u["image_paths"] == c["image_paths"]
        if kind == "reference":
            assert torch.allclose(c["control_latents"], _fake_encode(u["control_images"]), atol=1e-5)
        else:
            assert torch.equal(c["masks"], u["masks"])
            assert torch.allclose(c["masked_latents"], _fake_encode(u["masked_images"]), atol=1e-5)
    # content-keyed: a second build reuses everything; an edited pair file recomputes exactly its entries
    _, again = build_latent_cache(items, _fake_encode, ae_fingerprint="fake", flip_aug=True, progress=False,
                                  to_disk=True)
    assert (again.hits, again.computed) == (16, 0)
    pair = data.datasets[0].entries[0].control
    edited = np.asarray(load_image(pair).rgb)[..., 0].copy()
    edited[:, -4:] = 255 - edited[:, -4:]
    Image.fromarray(edited, "L").convert("RGB").save(pair)
    _, after = build_latent_cache(items, _fake_encode, ae_fingerprint="fake", flip_aug=True, progress=False,
                                  to_disk=True)
    assert (after.hits, after.computed) == (14, 2)
