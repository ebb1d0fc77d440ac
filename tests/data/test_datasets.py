"""Dataset assembly: image counts with repeats, reg rebalancing (spec §2.2), buckets, batches, epochs, split."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest
from conftest_datasets import write_folder, write_image, write_toml

from fluxlora.config.dataset import DatasetFlags, blueprint_from_flags, load_dataset_config
from fluxlora.data.datasets import (
    build_training_data,
    rebalance_reg_repeats,
    split_for_validation,
)
from fluxlora.errors import DatasetError

# The guide's multi-resolution example (seed guide, Japanese section 6), all three pointing at one folder.
GUIDE_TOML = """
[general]
flip_aug = true
color_aug = false
keep_tokens_separator= "|||"
shuffle_caption = false
caption_tag_dropout_rate = 0
caption_extension = ".txt"
{datasets}
"""
GUIDE_DATASET = """
[[datasets]]
batch_size = {bs}
enable_bucket = true
resolution = [{r}, {r}]

  [[datasets.subsets]]
  image_dir = "{d}"
  num_repeats = 1
"""


def test_guide_multi_resolution_counts_batches_and_buckets(tmp_path: Path) -> None:
    # 3 squares, 2 landscapes 3:2, 1 portrait 3:4
    sizes = [(1024, 1024)] * 3 + [(1536, 1024)] * 2 + [(768, 1024)]
    write_folder(tmp_path / "img", sizes, captions=[f"photo {i}" for i in range(6)])
    datasets = "".join(GUIDE_DATASET.format(bs=bs, r=r, d=(tmp_path / "img").as_posix())
                       for bs, r in ((2, 1024), (3, 768), (4, 512)))
    bp = load_dataset_config(write_toml(tmp_path, GUIDE_TOML.format(datasets=datasets)), DatasetFlags())
    data = build_training_data(bp, seed=1)
    assert data.num_train_images == 18 and data.num_reg_images == 0 and data.num_validation_images == 0
    # Buckets worked by hand from spec §2.5 (step 64, limits 256..1024); e.g. 3:2 at 1024²: (1024, 704) has
    # ratio 1.4545 (error 0.045) against (1024, 640) at 1.6 (error 0.1).
    expected = [
        {(1024, 1024): 3, (1024, 704): 2, (768, 1024): 1},
        {(768, 768): 3, (896, 640): 2, (640, 896): 1},
        {(512, 512): 3, (640, 384): 2, (448, 576): 1},
    ]
    for d, want in zip(data.datasets, expected, strict=True):
        assert {b: len(v) for b, v in d.bucket_items().items()} == want
    # per bucket ceil(n / batch_size): bs 2 -> 2+1+1, bs 3 -> 1+1+1, bs 4 -> 1+1+1
    assert [d.num_batches for d in data.datasets] == [4, 3, 3]
    assert data.num_batches_per_epoch == 10
    batches = data.epoch_batches(seed=1, epoch=1)
    assert len(batches) == 10
    for b in batches:
        d = data.datasets[b.dataset]
        assert 1 <= len(b.entries) <= d.config.batch_size
        assert all(d.entries[i].bucket == b.bucket for i in b.entries)  # never mixes buckets
    # the guide's general keys reached every subset; the raw caption is the caption file's first line
    for d in data.datasets:
        assert d.config.subsets[0].flip_aug and d.caption_options[0].keep_tokens_separator == "|||"
        assert sorted(e.caption for e in d.entries) == [f"photo {i}" for i in range(6)]
    meta = data.metadata()
    assert [m["batch_size_per_device"] for m in meta] == [2, 3, 4]
    assert meta[0]["bucket_info"]["buckets"][0]["resolution"] in ([768, 1024], [1024, 704], [1024, 1024])
    assert sum(b["count"] for b in meta[1]["bucket_info"]["buckets"].values()) == 6
    assert data.tag_frequency() == {"img": {f"photo {i}": 3 for i in range(6)}}


def test_dreambooth_with_regularisation_rebalanced_by_hand(tmp_path: Path) -> None:
    write_folder(tmp_path / "train", [(512, 512)] * 3, captions=["sks dog"] * 3)
    write_folder(tmp_path / "reg", [(512, 512)] * 4)  # no caption files: class_tokens
    text = f"""
[general]
resolution = 512
caption_extension = ".txt"
[[datasets]]
batch_size = 4
  [[datasets.subsets]]
  image_dir = "{(tmp_path / 'train').as_posix()}"
  num_repeats = 10
  [[datasets.subsets]]
  image_dir = "{(tmp_path / 'reg').as_posix()}"
  num_repeats = 3
  is_reg = true
  class_tokens = "dog"
"""
    bp = load_dataset_config(write_toml(tmp_path, text), DatasetFlags(prior_loss_weight=0.7))
    data = build_training_data(bp, seed=0)
    (d,) = data.datasets
    # train: 3 images x 10 = 30. reg: first pass 3+3+3+3 = 12, then +1 round-robin: 4 more rounds reach 28
    # (each image 7), then image 0 -> 29, image 1 -> 30. Final repeats [8, 8, 7, 7].
    reg = [e for e in d.entries if e.is_reg]
    assert [e.num_repeats for e in reg] == [8, 8, 7, 7]
    assert data.num_train_images == 30 and data.num_reg_samples == 30
    assert data.num_reg_images == 12  # sd-scripts' ss_num_reg_images: before rebalancing
    assert {e.loss_weight for e in reg} == {0.7} and {e.loss_weight for e in d.entries if not e.is_reg} == {1.0}
    assert {e.caption for e in reg} == {"dog"}
    assert data.num_batches_per_epoch == math.ceil(60 / 4)
    assert data.dataset_dirs() == {"train": {"n_repeats": 10, "img_count": 3}}


def test_rebalance_matches_spec_examples() -> None:
    assert rebalance_reg_repeats([3, 3, 3, 3], 30) == [8, 8, 7, 7]
    # more reg samples than training ones: registration stops once the count is reached, the rest are dropped
    assert rebalance_reg_repeats([5, 5, 5], 2) == [5, 0, 0]
    assert rebalance_reg_repeats([1, 2], 3) == [1, 2]
    assert rebalance_reg_repeats([1, 1], 5) == [3, 2]
    assert rebalance_reg_repeats([], 5) == []


def test_finetuning_json_and_jsonl(tmp_path: Path) -> None:
    img = tmp_path / "img"
    a = write_image(img / "a.png", (640, 512))
    b = write_image(img / "b.jpg", (512, 640))
    c = write_image(tmp_path / "elsewhere" / "c.png", (512, 512))
    meta_json = tmp_path / "meta.json"
    meta_json.write_text(json.dumps({
        "a": {"caption": "a cat", "tags": "tag1, tag2"},  # key without extension, looked up under image_dir
        "b.jpg": {"caption": "a dog", "image_size": [512, 640]},
        str(c): {"tags": "only tags"},
    }))
    meta_jsonl = tmp_path / "meta.jsonl"
    meta_jsonl.write_text(
        json.dumps({"image_path": str(a), "caption": "first"}) + "\n\n"
        + json.dumps({"image_path": "b.jpg", "caption": "second", "tags": "x"}) + "\n"
    )
    text = f"""
[general]
resolution = 512
enable_bucket = true
[[datasets]]
  [[datasets.subsets]]
  metadata_file = "{meta_json.as_posix()}"
  image_dir = "{img.as_posix()}"
  num_repeats = 2
[[datasets]]
  [[datasets.subsets]]
  metadata_file = "{meta_jsonl.as_posix()}"
  image_dir = "{img.as_posix()}"
"""
    data = build_training_data(load_dataset_config(write_toml(tmp_path, text), DatasetFlags()), seed=0)
    first, second = data.datasets
    assert not first.config.is_dreambooth
    got = {e.path: e.caption for e in first.entries}
    assert got == {a.resolve(): "a cat,tag1, tag2", b.resolve(): "a dog", c.resolve(): "only tags"}
    assert {e.path: e.caption for e in second.entries} == {a.resolve(): "first", b.resolve(): "second,x"}
    assert data.num_train_images == 3 * 2 + 2
    assert first.tag_frequency == {"meta.json": {"tag1": 1, "tag2": 1, "only tags": 1}}


def test_finetuning_missing_image_is_reported(tmp_path: Path) -> None:
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"ghost": {"caption": "x"}}))
    (tmp_path / "img").mkdir()
    text = f'[[datasets]]\nresolution = 512\n  [[datasets.subsets]]\n  metadata_file = "{meta.as_posix()}"\n  image_dir = "{(tmp_path / "img").as_posix()}"\n'
    with pytest.raises(DatasetError, match=r"meta.json: image 'ghost' not found"):
        build_training_data(load_dataset_config(write_toml(tmp_path, text), DatasetFlags()), seed=0)


def test_flags_without_toml(tmp_path: Path) -> None:
    write_folder(tmp_path / "train" / "10_sks dog", [(512, 512), (512, 768)])
    write_folder(tmp_path / "reg" / "1_dog", [(512, 512)] * 5)
    bp = blueprint_from_flags(DatasetFlags(train_data_dir=tmp_path / "train", reg_data_dir=tmp_path / "reg",
                                              resolution=512, enable_bucket=True, train_batch_size=2))
    data = build_training_data(bp, seed=0)
    (d,) = data.datasets
    train = [e for e in d.entries if not e.is_reg]
    assert [e.caption for e in train] == ["sks dog", "sks dog"]  # class tokens from the folder name
    assert [e.num_repeats for e in train] == [10, 10]
    # 20 training samples, 5 reg images x 1: first pass 5, then +1 round-robin 15 times -> 4 each
    assert [e.num_repeats for e in d.entries if e.is_reg] == [4, 4, 4, 4, 4]
    # 2:3 = 0.667 at 512²: (384, 640) = 0.6 (error 0.067) beats (448, 576) = 0.778 (error 0.111)
    assert {e.bucket for e in train} == {(512, 512), (384, 640)}


def test_empty_dataset_and_bad_image_reported_together(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    write_folder(tmp_path / "ok", [(512, 512)])
    (tmp_path / "ok" / "broken.png").write_bytes(b"not an image")
    text = f"""
[general]
resolution = 512
[[datasets]]
  [[datasets.subsets]]
  image_dir = "{(tmp_path / 'empty').as_posix()}"
[[datasets]]
  [[datasets.subsets]]
  image_dir = "{(tmp_path / 'ok').as_posix()}"
"""
    bp = load_dataset_config(write_toml(tmp_path, text), DatasetFlags())
    with pytest.raises(DatasetError) as info:
        build_training_data(bp, seed=0)
    msg = str(info.value)
    assert "2 dataset problem(s)" in msg and "datasets[0]: no training images found" in msg
    assert "broken.png" in msg and info.value.path == str(bp.source)
    only_ok = f'[general]\nresolution = 512\n[[datasets]]\n  [[datasets.subsets]]\n  image_dir = "{(tmp_path / "ok").as_posix()}"\n'
    data = build_training_data(load_dataset_config(write_toml(tmp_path, only_ok), DatasetFlags()),
                               seed=0, skip_bad_images=True)
    assert data.num_train_images == 1 and data.num_skipped_images == 1


@pytest.mark.parametrize("split", [0.05, 0.1, 0.2, 0.5])
def test_validation_split_disjoint_covering_stable(split: float) -> None:
    for n in range(1, 201):
        paths = [Path(f"/d/img{i:04d}.png") for i in range(n)]
        train, val = split_for_validation(list(reversed(paths)), split, seed=1234)
        assert set(train).isdisjoint(val)
        assert sorted(train + val) == paths
        assert (train, val) == split_for_validation(paths, split, seed=1234)  # stable, input order irrelevant
        if n >= 2:
            assert 1 <= len(val) <= n - 1 and len(val) == min(max(round(n * split), 1), n - 1)
        else:
            assert val == []


def test_validation_split_edges_and_seed() -> None:
    paths = sorted(Path(f"/d/{i}.png") for i in range(50))
    assert split_for_validation(paths, 0.0, 1) == (paths, [])
    assert split_for_validation(paths, 1.0, 1) == ([], paths)
    assert split_for_validation(paths, 0.2, 1)[1] != split_for_validation(paths, 0.2, 2)[1]


def test_validation_split_in_datasets_never_holds_out_reg(tmp_path: Path) -> None:
    write_folder(tmp_path / "train", [(512, 512)] * 10)
    write_folder(tmp_path / "reg", [(512, 512)] * 4)
    meta = tmp_path / "meta.json"
    write_folder(tmp_path / "ft", [(512, 512)] * 5)
    meta.write_text(json.dumps({f"img{i:03d}": {"caption": f"c{i}"} for i in range(5)}))
    text = f"""
[general]
resolution = 512
validation_split = 0.2
[[datasets]]
validation_seed = 7
  [[datasets.subsets]]
  image_dir = "{(tmp_path / 'train').as_posix()}"
  num_repeats = 3
  [[datasets.subsets]]
  image_dir = "{(tmp_path / 'reg').as_posix()}"
  is_reg = true
[[datasets]]
  [[datasets.subsets]]
  metadata_file = "{meta.as_posix()}"
  image_dir = "{(tmp_path / 'ft').as_posix()}"
"""
    bp = load_dataset_config(write_toml(tmp_path, text), DatasetFlags())
    data = build_training_data(bp, seed=5)
    assert data.num_validation_images == 2 + 1
    for train, val in zip(data.datasets, data.validation, strict=True):
        train_paths = {e.path for e in train.entries}
        assert train_paths.isdisjoint(e.path for e in val.entries)
        assert not any(e.is_reg for e in val.entries) and all(e.num_repeats == 1 for e in val.entries)
    assert data.num_train_images == 8 * 3 + 4  # reg rebalanced against the 24 remaining samples
    assert data.num_reg_samples == 24
    # validation_seed given: the run seed does not change the split; without it, the run seed decides
    again = build_training_data(bp, seed=6)
    assert [e.path for e in again.validation[0].entries] == [e.path for e in data.validation[0].entries]
    vb = data.validation_batches()
    assert sum(len(b.entries) for b in vb) == 3 and vb == data.validation_batches()


def test_epoch_batches_pure_and_reshuffled(tmp_path: Path) -> None:
    sizes = [(512, 512)] * 7 + [(768, 512)] * 5 + [(512, 768)] * 3
    write_folder(tmp_path / "2_thing", sizes)
    data = build_training_data(blueprint_from_flags(DatasetFlags(
        train_data_dir=tmp_path, resolution=512, enable_bucket=True, train_batch_size=3)), seed=0)
    e1 = data.epoch_batches(seed=42, epoch=1)
    assert e1 == data.epoch_batches(seed=42, epoch=1)
    assert e1 != data.epoch_batches(seed=42, epoch=2)
    assert e1 != data.epoch_batches(seed=43, epoch=1)
    # every sample (with repeats) exactly once per epoch, batches never mix buckets
    (d,) = data.datasets
    for epoch in (1, 2, 3):
        batches = data.epoch_batches(seed=42, epoch=epoch)
        assert Counter(i for b in batches for i in b.entries) == Counter({i: 2 for i in range(15)})
        assert all(len({d.entries[i].bucket for i in b.entries}) == 1 for b in batches)
        assert [b.index for b in batches] == list(range(len(batches)))
        # buckets 14, 10, 6 samples at batch size 3: 5 + 4 + 2 batches
        assert len(batches) == 11 == data.num_batches_per_epoch


def test_cache_conflicts_name_the_subset(tmp_path: Path) -> None:
    write_folder(tmp_path / "img", [(512, 512)])
    text = f"""
[general]
resolution = 512
[[datasets]]
  [[datasets.subsets]]
  image_dir = "{(tmp_path / 'img').as_posix()}"
  color_aug = true
  shuffle_caption = true
"""
    data = build_training_data(load_dataset_config(write_toml(tmp_path, text), DatasetFlags()), seed=0)
    assert data.cache_conflicts(cache_latents=False, cache_text_encoder_outputs=False) == []
    latents = data.cache_conflicts(cache_latents=True, cache_text_encoder_outputs=False)
    assert len(latents) == 1 and latents[0].startswith("datasets[0].subsets[0].color_aug:")
    text_c = data.cache_conflicts(cache_latents=False, cache_text_encoder_outputs=True)
    assert len(text_c) == 1 and text_c[0].startswith("datasets[0].subsets[0].shuffle_caption:")
