"""The DataLoader: whole batches, worker-independent randomness, exact mid-epoch resume, caches, collate."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest_datasets import write_folder, write_image, write_toml
from PIL import Image

from fluxlora.config.dataset import DatasetFlags, load_dataset_config
from fluxlora.data.datasets import TrainingData, build_training_data
from fluxlora.data.loader import StepClock, collate_batch, make_dataloader, set_epoch

FLUX1_OUTPUTS = {"clip_pooled": "vector", "t5_out": "sequence", "t5_mask": "mask"}  # FLUX.1's text outputs

SMALL = """
[general]
resolution = 64
enable_bucket = true
min_bucket_reso = 32
max_bucket_reso = 128
bucket_reso_steps = 16
caption_extension = ".txt"
{general}
[[datasets]]
batch_size = {bs}
  [[datasets.subsets]]
  image_dir = "{d}"
  {subset}
"""


def small_data(tmp_path: Path, *, general: str = "", subset: str = "", bs: int = 2, n: int = 6,
               captions: list[str] | None = None, alpha: bool = False) -> TrainingData:
    sizes = [(64, 64), (96, 64), (64, 96), (80, 64), (64, 64), (96, 64), (64, 80), (64, 64)][:n]
    caps = captions or [f"tag{i}, red, blue, green, big" for i in range(n)]
    write_folder(tmp_path / "img", sizes, captions=caps, noise=True, alpha=alpha)
    text = SMALL.format(general=general, subset=subset, bs=bs, d=(tmp_path / "img").as_posix())
    return build_training_data(load_dataset_config(write_toml(tmp_path, text), DatasetFlags()), seed=0)


def collect(loader) -> list[dict]:
    return list(loader)


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x["captions"] == y["captions"] and x["image_paths"] == y["image_paths"]
        assert x["bucket"] == y["bucket"] and x["batch_index"] == y["batch_index"]
        assert torch.equal(x["images"], y["images"])


AUGMENT = 'flip_aug = true\nrandom_crop = true\ncolor_aug = true\nshuffle_caption = true\ncaption_dropout_rate = 0.2'


def test_workers_resume_and_set_epoch_give_identical_batches(tmp_path: Path) -> None:
    data = small_data(tmp_path, general=AUGMENT)
    serial = collect(make_dataloader(data, 1, seed=3, num_workers=0))
    loader = make_dataloader(data, 1, seed=3, num_workers=2, persistent_workers=True)
    assert_same_batches(serial, collect(loader))
    # the same persistent loader moved to epoch 2 equals a fresh serial epoch-2 loader, and differs from epoch 1
    set_epoch(loader, 2)
    epoch2 = collect(loader)
    assert_same_batches(epoch2, collect(make_dataloader(data, 2, seed=3)))
    assert [b["image_paths"] for b in epoch2] != [b["image_paths"] for b in serial] or any(
        not torch.equal(x["images"], y["images"]) for x, y in zip(epoch2, serial, strict=True))
    # mid-epoch resume: the tail of the epoch, batch for batch, without building the skipped ones
    resumed = collect(make_dataloader(data, 1, seed=3, start_batch=2))
    assert_same_batches(serial[2:], resumed)
    assert len(make_dataloader(data, 1, seed=3, start_batch=2)) == len(serial) - 2


def test_batch_contents(tmp_path: Path) -> None:
    img = tmp_path / "img"
    write_image(img / "a.png", (64, 64), seed=1)
    write_image(img / "b.png", (64, 64), seed=2)
    (img / "a.txt").write_text("a photo")
    text = SMALL.format(general="", bs=2, d=img.as_posix(),
                        subset="custom_attributes = { diff_output_preservation = true }\n  class_tokens = \"sks\"")
    data = build_training_data(load_dataset_config(write_toml(tmp_path, text), DatasetFlags()), seed=0)
    (batch,) = collect(make_dataloader(data, 1, seed=0))
    assert batch["bucket"] == (64, 64) and batch["images"].shape == (2, 3, 64, 64)
    assert batch["images"].dtype == torch.float32 and batch["alpha_masks"] is None
    assert batch["loss_weights"].dtype == torch.float32 and batch["loss_weights"].tolist() == [1.0, 1.0]
    assert batch["dop"].dtype == torch.bool and batch["dop"].tolist() == [True, True]
    by_path = dict(zip(batch["image_paths"], range(2), strict=True))
    ia, ib = by_path[str((img / "a.png").resolve())], by_path[str((img / "b.png").resolve())]
    assert batch["captions"][ia] == "a photo" and batch["captions"][ib] == "sks"
    # solid colour, no augmentation: every pixel is colour / 127.5 - 1
    colour = np.asarray(Image.open(img / "a.png"))[0, 0].astype(np.float32)
    expected = torch.from_numpy(colour / 127.5 - 1.0)[:, None, None].expand(3, 64, 64)
    assert torch.allclose(batch["images"][ia], expected, atol=1e-6)


def test_alpha_mask_and_reg_loss_weight(tmp_path: Path) -> None:
    train, reg = tmp_path / "train", tmp_path / "reg"
    p = train / "a.png"
    p.parent.mkdir()
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., 3] = 51  # alpha 0.2
    Image.fromarray(rgba, "RGBA").save(p)
    write_image(reg / "r.png", (64, 64))
    text = f"""
[general]
resolution = 64
[[datasets]]
batch_size = 2
  [[datasets.subsets]]
  image_dir = "{train.as_posix()}"
  alpha_mask = true
  [[datasets.subsets]]
  image_dir = "{reg.as_posix()}"
  is_reg = true
"""
    data = build_training_data(load_dataset_config(write_toml(tmp_path, text), DatasetFlags(prior_loss_weight=0.25)),
                               seed=0)
    (batch,) = collect(make_dataloader(data, 1, seed=0))
    i = batch["image_paths"].index(str(p.resolve()))
    assert batch["alpha_masks"].shape == (2, 1, 64, 64)
    assert torch.allclose(batch["alpha_masks"][i], torch.full((1, 64, 64), 51 / 255))
    assert torch.equal(batch["alpha_masks"][1 - i], torch.ones(1, 64, 64))  # no mask for the reg subset
    assert batch["loss_weights"][i].item() == 1.0 and batch["loss_weights"][1 - i].item() == 0.25


def test_caption_epoch_and_step_come_from_the_batch(tmp_path: Path) -> None:
    data = small_data(tmp_path, general="caption_dropout_every_n_epochs = 2", n=4, bs=1)
    assert all(c != "" for b in make_dataloader(data, 1, seed=0) for c in b["captions"])
    assert all(c == "" for b in make_dataloader(data, 2, seed=0) for c in b["captions"])
    assert all(c != "" for b in make_dataloader(data, 3, seed=0) for c in b["captions"])


def test_token_warmup_uses_each_batch_step(tmp_path: Path) -> None:
    # 5 flexible tags, warm-up over 4 steps from 1 tag: step s keeps floor(s*(5-1)/4)+1 = s+1 tags (spec §2.4)
    caps = ["a, b, c, d, e"] * 6
    data = small_data(tmp_path, general="token_warmup_step = 4\ntoken_warmup_min = 1", n=6, bs=1, captions=caps)
    batches = collect(make_dataloader(data, 1, seed=0, gradient_accumulation_steps=2))
    counts = [len(b["captions"][0].split(", ")) for b in batches]
    steps = [b["step"] for b in batches]
    assert steps == [0, 0, 1, 1, 2, 2]
    assert counts == [min(s + 1, 5) for s in steps]
    # epoch 2 starts after ceil(6 / 2) = 3 optimizer steps
    assert [b["step"] for b in make_dataloader(data, 2, seed=0, gradient_accumulation_steps=2)] == [3, 3, 4, 4, 5, 5]


def test_step_clock() -> None:
    clock = StepClock(num_batches_per_epoch=10, gradient_accumulation_steps=3, num_processes=2)
    assert clock.steps_per_epoch == 2  # 5 batches per process, ceil(5 / 3)
    assert [clock.step(1, i) for i in range(10)] == [0, 0, 0, 0, 0, 0, 1, 1, 1, 1]
    assert clock.step(3, 0) == 4


class FakeLatents:
    """Stand-in for LatentCache (keyed by (path, bucket)): a tensor that encodes the path and the flip."""

    def get(self, key: tuple[str, tuple[int, int]], flipped: bool = False) -> torch.Tensor:
        path, bucket = key
        assert len(bucket) == 2
        return torch.full((16, 8, 8), float(zlib.crc32(path.encode()) % 1000) + (0.5 if flipped else 0.0))

    def get_alpha_mask(self, key: tuple[str, tuple[int, int]], flipped: bool = False) -> None:
        return None


class FakeText:
    """Stand-in for TextCache (keyed by caption): T5 lengths differ per caption so the batch must pad."""

    def get(self, caption: str) -> dict[str, torch.Tensor]:
        length = 3 + zlib.crc32(caption.encode()) % 5
        return {"clip_pooled": torch.ones(768), "t5_out": torch.ones(length, 4096), "t5_mask": torch.ones(length)}


@pytest.mark.parametrize("flip", [False, True])
def test_cached_latents_and_text(tmp_path: Path, flip: bool) -> None:
    general = "flip_aug = true" if flip else ""
    data = small_data(tmp_path, general=general, n=8, bs=4)
    loader = make_dataloader(data, 1, seed=0, latent_cache=FakeLatents(), text_cache=FakeText())
    flips = []
    for batch in loader:
        assert "images" not in batch and batch["latents"].shape[1:] == (16, 8, 8)
        for k, path in enumerate(batch["image_paths"]):
            base = float(zlib.crc32(path.encode()) % 1000)
            flips.append(batch["latents"][k, 0, 0, 0].item() - base)
        text = batch["text"]
        lengths = [3 + zlib.crc32(c.encode()) % 5 for c in batch["captions"]]
        longest = max(lengths)
        assert text["t5_out"].shape == (len(lengths), longest, 4096) and text["clip_pooled"].shape == (len(lengths), 768)
        for k, n in enumerate(lengths):
            assert text["t5_mask"][k].tolist() == [1.0] * n + [0.0] * (longest - n)
            assert text["t5_out"][k, n:].abs().sum() == 0
    assert len(flips) == 8
    assert set(flips) == ({0.0, 0.5} if flip else {0.0})  # flip_aug picks the flipped latent for some samples


def test_collate_without_masks_or_text() -> None:
    samples = [{"caption": c, "image_path": c, "loss_weight": 1.0, "dop": False, "alpha_mask": None,
                "image": torch.zeros(3, 16, 16)} for c in ("x", "y")]
    batch = collate_batch(samples)
    assert batch["images"].shape == (2, 3, 16, 16) and batch["alpha_masks"] is None and "text" not in batch


def test_validation_loader(tmp_path: Path) -> None:
    data = small_data(tmp_path, general="validation_split = 0.5\nflip_aug = true", n=6, bs=2)
    first = collect(make_dataloader(data, 1, seed=0, split="validation"))
    again = collect(make_dataloader(data, 5, seed=0, split="validation", num_workers=0))
    assert sum(len(b["captions"]) for b in first) == 3 == data.num_validation_images
    assert_same_batches(first, again)  # the same held-out batches every time
    train_paths = {p for b in make_dataloader(data, 1, seed=0) for p in b["image_paths"]}
    assert train_paths.isdisjoint(p for b in first for p in b["image_paths"])


def _fake_encode(pixels: torch.Tensor) -> torch.Tensor:
    """A deterministic 'autoencoder': 8x8 average pool, channels tiled to 16 (16 = 3*5 + 1)."""
    pooled = torch.nn.functional.avg_pool2d(pixels, 8)
    return torch.cat([pooled.repeat(1, 5, 1, 1), pooled[:, :1]], dim=1)


def test_real_caches_match_the_uncached_path(tmp_path: Path) -> None:
    from fluxlora.data.latent_cache import build_latent_cache
    from fluxlora.data.text_cache import build_text_cache

    data = small_data(tmp_path, general='flip_aug = true\ncaption_prefix = "a photo of"', n=6, bs=2,
                      captions=["x", "y, z", "x", "w", "v", "u"])
    latents, _ = build_latent_cache(data.latent_items(), _fake_encode, ae_fingerprint="fake", flip_aug=True,
                                    progress=False)

    def encode_text(captions: list[str]) -> dict[str, torch.Tensor]:
        lengths = torch.tensor([len(c) for c in captions], dtype=torch.float32)
        return {"clip_pooled": lengths[:, None].expand(-1, 4).clone(), "t5_out": torch.zeros(len(captions), 8, 2),
                "t5_mask": torch.ones(len(captions), 8)}

    items = data.text_items()
    assert {i.caption for i in items} == {"a photo of " + c for c in ("x", "y, z", "w", "v", "u")}
    text, _ = build_text_cache(items, encode_text, te_fingerprint="fake", t5_max_length=8, outputs=FLUX1_OUTPUTS,
                               apply_t5_attn_mask=False, progress=False)
    uncached = collect(make_dataloader(data, 1, seed=9))
    cached = collect(make_dataloader(data, 1, seed=9, latent_cache=latents, text_cache=text))
    for u, c in zip(uncached, cached, strict=True):
        assert u["image_paths"] == c["image_paths"] and u["captions"] == c["captions"]
        # same flip decision and crop: the cached latent is the encoding of the uncached pixels
        assert torch.allclose(c["latents"], _fake_encode(u["images"]), atol=1e-5)
        assert c["text"]["clip_pooled"][:, 0].tolist() == [float(len(cap)) for cap in c["captions"]]


def test_process_shards_cover_the_epoch_evenly(tmp_path: Path) -> None:
    data = small_data(tmp_path, n=7, bs=1)  # 7 batches over 3 processes: 3 each after wrapping 2 around
    full = [b.index for b in make_dataloader(data, 1, seed=0).sampler]
    shards = [[b.index for b in make_dataloader(data, 1, seed=0, num_processes=3, process_index=p).sampler]
              for p in range(3)]
    assert [len(s) for s in shards] == [3, 3, 3]
    assert set(full) == {i for s in shards for i in s}
    assert shards[0] == full[0::3] and shards[1] == full[1::3] + [full[0]]
    # resuming at global batch 3 skips the first round on every process
    resumed = make_dataloader(data, 1, seed=0, num_processes=3, process_index=1, start_batch=3)
    assert [b.index for b in resumed.sampler] == shards[1][1:] and len(resumed) == 2
