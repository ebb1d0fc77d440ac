"""Content-keyed caches: exactly the affected entries are recomputed, corrupt files rebuilt, nothing stale reused."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from fluxlora.data.buckets import prepare_image
from fluxlora.data.caches import (
    LATENT_SUFFIX,
    TEXT_SUFFIX,
    LatentItem,
    TextItem,
    build_latent_cache,
    build_text_cache,
    cache_file_path,
    file_fingerprint,
    tensor_fingerprint,
)
from fluxlora.data.images import load_image
from fluxlora.errors import CacheError

FLUX1_OUTPUTS = {"clip_pooled": "vector", "t5_out": "sequence", "t5_mask": "mask"}  # FLUX.1's text outputs


class FakeAE:
    """Average-pools 8×8 and repeats to 16 channels; records the shape of every batch."""

    def __init__(self, bias: float = 0.0, nan_for_mean: float | None = None):
        self.calls: list[tuple[int, ...]] = []
        self.bias = bias
        self.nan_for_mean = nan_for_mean

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        self.calls.append(tuple(pixels.shape))
        out = F.avg_pool2d(pixels, 8).repeat(1, 6, 1, 1)[:, :16] + self.bias
        if self.nan_for_mean is not None:
            for i in range(out.shape[0]):
                if abs(float(pixels[i].mean()) - self.nan_for_mean) < 1e-6:
                    out[i] = float("nan")
        return out


def expected_latent(path: Path, bucket, flipped=False) -> torch.Tensor:
    prepared = prepare_image(load_image(path), bucket, interpolation=None, random_crop=False, flip=flipped,
                             color_aug=False, rng=random.Random(0), alpha_mask=False)
    return F.avg_pool2d(prepared.pixels[None], 8).repeat(1, 6, 1, 1)[0, :16]


@pytest.fixture
def dataset(image_dir, helpers):
    paths = [helpers.save_array(image_dir / f"img{i}.png", helpers.gradient(40 + 8 * i, 40, seed=i)) for i in range(3)]
    return image_dir, paths


def items_for(paths, bucket=(32, 32), **kw):
    return [LatentItem(path=p, bucket=bucket, **kw) for p in paths]


def build(items, ae=None, **kw):
    args = dict(ae_fingerprint="ae-1", batch_size=2, to_disk=True, cache_dir=None, flip_aug=False, progress=False)
    args.update(kw)
    return build_latent_cache(items, ae or FakeAE(), **args)


def counts(stats):
    return stats.hits, stats.computed, stats.stale, stats.corrupt


# --------------------------------------------------------------------------------------------------- latents


def test_in_memory_latents_match_encoder_and_flip(dataset):
    _, paths = dataset
    ae = FakeAE()
    cache, stats = build(items_for(paths), ae, to_disk=False, flip_aug=True)
    assert counts(stats) == (0, 6, 0, 0)
    for path in paths:
        key = (str(path), (32, 32))
        assert torch.allclose(cache.get(key), expected_latent(path, (32, 32)))
        assert torch.allclose(cache.get(key, flipped=True), expected_latent(path, (32, 32), flipped=True))
    # batches of 2 per orientation, never mixing buckets
    assert ae.calls == [(2, 3, 32, 32), (2, 3, 32, 32), (1, 3, 32, 32), (1, 3, 32, 32)]


def test_batches_group_buckets(dataset):
    _, paths = dataset
    ae = FakeAE()
    items = [LatentItem(paths[0], (32, 32)), LatentItem(paths[1], (48, 32)), LatentItem(paths[2], (32, 32))]
    cache, _ = build(items, ae, to_disk=False, batch_size=4)
    assert sorted(ae.calls) == [(1, 3, 32, 48), (2, 3, 32, 32)]
    assert cache.get(items[1]).shape == (16, 4, 6)


def test_disk_cache_reused_then_exactly_affected_recomputed(dataset, helpers):
    folder, paths = dataset
    items = items_for(paths)
    _, stats = build(items)
    assert counts(stats) == (0, 3, 0, 0)
    files = [cache_file_path(p, LATENT_SUFFIX, cache_dir=None, root=None) for p in paths]
    assert all(f.is_file() for f in files) and files[0].parent == folder
    mtimes = [f.stat().st_mtime_ns for f in files]

    ae = FakeAE()
    cache, stats = build(items, ae)
    assert counts(stats) == (3, 0, 0, 0) and ae.calls == []
    assert [f.stat().st_mtime_ns for f in files] == mtimes
    assert torch.allclose(cache.get(items[1].key), expected_latent(paths[1], (32, 32)))  # lazy read from disk

    # (a) new pixels, same size and name: only that image
    helpers.save_array(paths[1], helpers.gradient(48, 40, seed=99))
    cache, stats = build(items)
    assert counts(stats) == (2, 1, 1, 0)
    assert torch.allclose(cache.get(items[1].key), expected_latent(paths[1], (32, 32)))
    assert files[0].stat().st_mtime_ns == mtimes[0]

    # (c) another bucket for one image: only that entry
    changed = [items[0], LatentItem(paths[1], (48, 32)), items[2]]
    _, stats = build(changed)
    assert counts(stats) == (2, 1, 1, 0)

    # (f) flip_aug on: only the flipped orientations
    _, stats = build(items, flip_aug=True)
    assert counts(stats) == (3, 3, 3, 0)

    # (d) another autoencoder: everything
    _, stats = build(items, FakeAE(bias=1.0), ae_fingerprint="ae-2")
    assert counts(stats) == (0, 3, 3, 0)


def test_interpolation_is_part_of_the_key(dataset):
    _, paths = dataset
    build(items_for(paths))
    _, stats = build(items_for(paths[:1], interpolation="bicubic") + items_for(paths[1:]))
    assert counts(stats) == (2, 1, 1, 0)


def test_truncated_and_wrong_shape_files_are_rebuilt(dataset):
    _, paths = dataset
    items = items_for(paths)
    build(items)
    files = [cache_file_path(p, LATENT_SUFFIX, cache_dir=None, root=None) for p in paths]
    data = files[0].read_bytes()
    files[0].write_bytes(data[: len(data) // 2])
    from safetensors import safe_open

    with safe_open(str(files[2]), framework="pt") as handle:
        meta, names = handle.metadata(), list(handle.keys())
    save_file({names[0]: torch.zeros(16, 3, 3)}, str(files[2]), metadata=meta)  # right name, wrong shape
    cache, stats = build(items)
    assert counts(stats) == (1, 2, 0, 2)
    assert torch.allclose(cache.get(items[0].key), expected_latent(paths[0], (32, 32)))
    _, stats = build(items)
    assert counts(stats) == (3, 0, 0, 0)


def test_moved_dataset_still_hits(dataset, tmp_path):
    folder, paths = dataset
    build(items_for(paths))
    moved = tmp_path / "elsewhere"
    shutil.move(str(folder), str(moved))
    _, stats = build(items_for([moved / p.name for p in paths]))
    assert counts(stats) == (3, 0, 0, 0)


def test_cache_dir_mirrors_layout_and_survives_a_move(dataset, tmp_path):
    folder, paths = dataset
    cache_dir = tmp_path / "cache"
    before = set(folder.iterdir())
    _, stats = build(items_for(paths, root=folder), cache_dir=cache_dir)
    assert set(folder.iterdir()) == before  # nothing written beside the images
    assert (cache_dir / folder.name / ("img0" + LATENT_SUFFIX)).is_file()
    moved = tmp_path / "new_parent" / folder.name
    moved.parent.mkdir()
    shutil.move(str(folder), str(moved))
    _, stats = build(items_for([moved / p.name for p in paths], root=moved), cache_dir=cache_dir)
    assert counts(stats) == (3, 0, 0, 0)


def test_two_resolutions_share_a_file_without_evicting(dataset):
    _, paths = dataset
    build(items_for(paths, bucket=(32, 32)))
    _, stats = build(items_for(paths, bucket=(48, 48)))
    assert counts(stats) == (0, 3, 3, 0)
    _, stats = build(items_for(paths, bucket=(32, 32)))
    assert counts(stats) == (3, 0, 0, 0)


def test_nonfinite_latents_error_names_image_or_skip(dataset, helpers):
    folder, paths = dataset
    flat = helpers.save_array(folder / "flat.png", np.full((40, 40, 3), 200, np.uint8))
    target = 200 / 127.5 - 1
    with pytest.raises(CacheError) as err:
        build(items_for([*paths, flat]), FakeAE(nan_for_mean=target), to_disk=False)
    assert err.value.path == str(flat) and str(flat) in str(err.value)
    cache, stats = build(items_for([*paths, flat]), FakeAE(nan_for_mean=target), on_nonfinite="skip")
    assert stats.skipped == 1 and stats.skipped_paths == [flat]
    with pytest.raises(KeyError):
        cache.get((str(flat), (32, 32)))
    assert cache.get((str(paths[0]), (32, 32))).shape == (16, 4, 4)


def test_rank_split_never_writes_the_same_file(dataset):
    _, paths = dataset
    items = items_for(paths)
    _, first = build(items, rank=0, world_size=2)
    _, second = build(items, rank=1, world_size=2)
    assert (first.computed, second.computed) == (2, 1)
    cache, stats = build(items)
    assert counts(stats) == (3, 0, 0, 0)
    with pytest.raises(CacheError):
        build(items, to_disk=False, world_size=2)


def test_alpha_mask_is_cached_with_the_latents(image_dir):
    rgba = np.zeros((32, 48, 4), np.uint8)
    rgba[:, :24, 3] = 255
    from PIL import Image

    path = image_dir / "a.png"
    Image.fromarray(rgba, "RGBA").save(path)
    item = LatentItem(path, (32, 32), alpha_mask=True)
    for to_disk in (False, True):
        cache, _ = build([item], to_disk=to_disk)
        mask = cache.get_alpha_mask(item)
        assert mask.shape == (1, 32, 32)
        # 48 wide -> crop 8 from the left: columns 0..15 opaque, 16..31 transparent
        assert mask[0, :, :16].min() == 1 and mask[0, :, 16:].max() == 0
        assert torch.equal(cache.get_alpha_mask(item, flipped=True), mask.flip(-1))


# ------------------------------------------------------------------------------------------------ text


class FakeTE:
    def __init__(self, scale: float = 1.0):
        self.batches: list[list[str]] = []
        self.scale = scale

    def __call__(self, captions: list[str]) -> dict[str, torch.Tensor]:
        self.batches.append(list(captions))
        length = self.length
        codes = torch.tensor([[float(ord(c)) for c in (s + " " * length)[:length]] for s in captions])
        return {
            "clip_pooled": codes[:, :1].repeat(1, 768) * self.scale,
            "t5_out": codes[:, :, None].repeat(1, 1, 8) * self.scale,
            "t5_mask": (codes != 32.0).long(),
        }


def text_build(items, te=None, length=16, **kw):
    te = te or FakeTE()
    te.length = length
    args = dict(te_fingerprint=("clip-1", "t5-1"), t5_max_length=length, apply_t5_attn_mask=False, batch_size=2, outputs=FLUX1_OUTPUTS,
                to_disk=True, progress=False)
    args.update(kw)
    return build_text_cache(items, te, **args)


@pytest.fixture
def text_items(dataset):
    _, paths = dataset
    return [TextItem(paths[0], "a cat"), TextItem(paths[1], "a dog"), TextItem(paths[2], "a cat")]


def test_text_cache_in_memory_dedupes_captions(text_items):
    te = FakeTE()
    cache, stats = text_build(text_items, te, to_disk=False)
    assert te.batches == [["a cat", "a dog"]] and stats.computed == 2
    out = cache.get("a dog")
    assert out["t5_out"].shape == (16, 8) and out["clip_pooled"].shape == (768,)
    assert out["t5_out"][0, 0] == ord("a") and out["t5_mask"].tolist() == [1, 0, 1, 1, 1] + [0] * 11


def test_text_cache_disk_invalidation(text_items):
    _, stats = text_build(text_items)
    assert counts(stats) == (0, 3, 0, 0)
    files = [cache_file_path(i.path, TEXT_SUFFIX, cache_dir=None, root=None) for i in text_items]
    mtimes = [f.stat().st_mtime_ns for f in files]
    te = FakeTE()
    cache, stats = text_build(text_items, te)
    assert counts(stats) == (3, 0, 0, 0) and te.batches == []
    assert [f.stat().st_mtime_ns for f in files] == mtimes
    assert cache.get("a cat")["t5_out"][0, 0] == ord("a")

    # (b) one caption changed
    changed = [text_items[0], TextItem(text_items[1].path, "a red dog"), text_items[2]]
    _, stats = text_build(changed)
    assert counts(stats) == (2, 1, 1, 0)
    # (e) T5 length, attention-mask flag, (d) encoder weights: everything
    assert counts(text_build(text_items, length=24)[1]) == (0, 3, 3, 0)
    assert counts(text_build(text_items, apply_t5_attn_mask=True)[1]) == (0, 3, 3, 0)
    cache, stats = text_build(text_items, FakeTE(scale=2.0), te_fingerprint=("clip-1", "t5-2"))
    assert counts(stats) == (0, 3, 3, 0)
    assert cache.get("a cat")["t5_out"][0, 0] == 2 * ord("a")
    # back to the first settings: those entries were dropped when the settings changed
    assert counts(text_build(text_items)[1]) == (0, 3, 3, 0)
    # a second dataset with other captions for the same images does not evict the first one's entries
    other = [TextItem(i.path, "prefix, " + i.caption) for i in text_items]
    assert counts(text_build(other)[1]) == (0, 3, 3, 0)
    assert counts(text_build(text_items)[1]) == (3, 0, 0, 0)
    assert counts(text_build(other)[1]) == (3, 0, 0, 0)


def test_text_cache_truncated_file_rebuilt(text_items):
    text_build(text_items)
    path = cache_file_path(text_items[1].path, TEXT_SUFFIX, cache_dir=None, root=None)
    path.write_bytes(path.read_bytes()[:100])
    cache, stats = text_build(text_items)
    assert counts(stats) == (2, 1, 0, 1)
    assert cache.get("a dog")["t5_out"][0, 0] == ord("a")


def test_text_cache_rejects_bad_encoder_output(text_items):
    def wrong(captions):
        return {"clip_pooled": torch.zeros(len(captions), 768), "t5_out": torch.zeros(len(captions), 5, 8),
                "t5_mask": torch.zeros(len(captions), 5)}

    with pytest.raises(CacheError):
        build_text_cache(text_items, wrong, te_fingerprint="x", t5_max_length=16, apply_t5_attn_mask=False, outputs=FLUX1_OUTPUTS,
                         progress=False)

    def nan(captions):
        out = FakeTE()
        out.length = 16
        result = out(captions)
        result["t5_out"][:] = float("nan")
        return result

    with pytest.raises(CacheError) as err:
        build_text_cache(text_items, nan, te_fingerprint="x", t5_max_length=16, apply_t5_attn_mask=False, outputs=FLUX1_OUTPUTS,
                         progress=False)
    assert "a cat" in str(err.value) and str(text_items[0].path) in str(err.value)


# -------------------------------------------------------------------------------------------- fingerprints


def test_file_fingerprint_is_content_based(tmp_path):
    tensors = {"w": torch.arange(200_000, dtype=torch.float32)}
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file(tensors, str(a))
    shutil.copy(a, b)
    assert file_fingerprint(a) == file_fingerprint(b)
    save_file({"w": tensors["w"] + 1}, str(b))  # same header, different weights
    assert file_fingerprint(a) != file_fingerprint(b)
    save_file({"v": tensors["w"]}, str(b))  # same bytes, different key
    assert file_fingerprint(a) != file_fingerprint(b)
    os.truncate(b, 100)
    assert file_fingerprint(a) != file_fingerprint(b)


def test_tensor_fingerprint():
    sd = {"a": torch.ones(3, dtype=torch.bfloat16), "b": torch.zeros(2, 2)}
    assert tensor_fingerprint(sd) == tensor_fingerprint({k: v.clone() for k, v in sd.items()})
    assert tensor_fingerprint(sd) != tensor_fingerprint({**sd, "a": torch.full((3,), 2.0, dtype=torch.bfloat16)})
    assert tensor_fingerprint(sd) != tensor_fingerprint({**sd, "b": torch.zeros(4)})
    big = {"w": torch.arange(10_000, dtype=torch.float32)}
    assert tensor_fingerprint(big, max_elements=100) != tensor_fingerprint({"w": big["w"] * 2}, max_elements=100)
