"""The dataset page's work (`fluxlora.ui.datasets`): problems flagged with the trainer's own checks, the bucket each
image lands in equal to the trainer's, captions and TOMLs written atomically and read back by the trainer."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fluxlora.config.dataset import DatasetDefaults, load_dataset_config
from fluxlora.data.buckets import assign_bucket, make_buckets
from fluxlora.errors import DatasetError
from fluxlora.ui.datasets import BucketSettings, dataset_toml, scan_folder, write_caption, write_dataset_toml


def _image(path, width, height):
    Image.fromarray((np.arange(width * height * 3) % 251).astype("uint8").reshape(height, width, 3)).save(path)


def test_scan_flags_problems_and_assigns_the_trainers_buckets(tmp_path):
    sizes = {"wide.png": (300, 200), "tall.jpg": (200, 320), "square.png": (256, 256)}
    for name, (w, h) in sizes.items():
        _image(tmp_path / name, w, h)
    (tmp_path / "wide.txt").write_text("a wide photo\n", encoding="utf-8")
    (tmp_path / "tall.txt").write_text("a tall photo", encoding="utf-8")
    _image(tmp_path / "wide.jpg", 64, 64)  # same stem as wide.png: one caption file for two images
    (tmp_path / "broken.png").write_bytes((tmp_path / "square.png").read_bytes()[:200])  # cut short
    (tmp_path / "utf16.png").write_bytes((tmp_path / "square.png").read_bytes())
    (tmp_path / "utf16.txt").write_bytes("caption".encode("utf-16"))

    result = scan_folder(tmp_path, caption_extension="txt", buckets=BucketSettings(resolution=(256, 256),
                                                                                     min_bucket_reso=64,
                                                                                     max_bucket_reso=512))
    images = {i["name"]: i for i in result["images"]}
    assert set(images) == {*sizes, "wide.jpg", "broken.png", "utf16.png"}
    buckets = make_buckets((256, 256), 64, 512, 64)
    for name, size in sizes.items():
        expected, _ = assign_bucket(size, resolution=(256, 256), enable_bucket=True, buckets=buckets, step=64)
        assert tuple(images[name]["bucket"]) == expected and tuple(images[name]["size"]) == size
    assert images["wide.png"]["caption"] == "a wide photo" and images["tall.jpg"]["caption"] == "a tall photo"
    assert any("no caption" in p for p in images["square.png"]["problems"])
    assert any("duplicate stem 'wide'" in p for p in images["wide.jpg"]["problems"])
    assert any("wide.jpg and wide.png share the stem" in p or "wide.png and wide.jpg share" in p
               for p in result["problems"])
    assert any("damaged or cut short" in p or "cannot read" in p or "truncated" in p
               for p in images["broken.png"]["problems"])
    assert images["broken.png"]["bucket"] is None
    assert any("UTF-16" in p for p in images["utf16.png"]["problems"])
    assert result["bad"] == 5  # square (no caption), wide.png + wide.jpg (stem), broken, utf16
    assert sum(result["buckets"].values()) == 5  # every readable image has its bucket


def test_captions_are_written_atomically_beside_the_image(tmp_path):
    _image(tmp_path / "a.png", 32, 32)
    path = write_caption(tmp_path / "a.png", "  sks dog, grass \n", caption_extension=".caption")
    assert path == tmp_path / "a.caption" and path.read_text(encoding="utf-8") == "sks dog, grass\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.caption", "a.png"]  # no temporary file left


def test_the_toml_is_the_guides_and_is_checked_by_the_trainer_before_it_is_written(tmp_path):
    images = tmp_path / "img"
    images.mkdir()
    text = dataset_toml([{"image_dir": images, "num_repeats": 10, "class_tokens": 'sks "dog"'}], resolution=(512, 768),
                        batch_size=2, min_bucket_reso=256, max_bucket_reso=1024)
    target = write_dataset_toml(tmp_path / "ds.toml", text)
    blueprint = load_dataset_config(target, DatasetDefaults())
    dataset = blueprint.datasets[0]
    subset = dataset.subsets[0]
    assert dataset.resolution == (512, 768) and dataset.batch_size == 2 and dataset.enable_bucket
    assert subset.image_dir == images and subset.num_repeats == 10 and subset.class_tokens == 'sks "dog"'
    assert subset.caption_extension == ".txt"
    bad = dataset_toml([{"image_dir": images}], resolution=(500, 500))  # not a multiple of 16
    with pytest.raises(DatasetError) as err:
        write_dataset_toml(target, bad)
    assert str(target) in str(err.value) and target.read_text(encoding="utf-8") == text  # the old file is kept
