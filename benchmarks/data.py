"""Data-path speed at 1024²: images/s of the uncached loader (decode, resize, crop, augment, collate) and of
cache reads (latents from memory and from disk, text-encoder outputs from disk), on this machine.

    python benchmarks/data.py [--num_images 16] [--workers 0 2] [--epochs 2]

Images are generated JPEGs (smooth random fields, 1536x1024 and 1024x1024, quality 90) so decode cost is
realistic; the "autoencoder" is an 8x8 average pool, so the cache numbers measure reading, not encoding.
The ratio uncached/cached tells how much caching buys on this machine.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fluxlora.config.dataset import DatasetFlags, blueprint_from_flags
from fluxlora.data.datasets import TrainingData, build_training_data
from fluxlora.data.latent_cache import build_latent_cache
from fluxlora.data.loader import make_dataloader
from fluxlora.data.text_cache import build_text_cache

FLUX1_OUTPUTS = {"clip_pooled": "vector", "t5_out": "sequence", "t5_mask": "mask"}  # FLUX.1's text outputs


def write_images(folder: Path, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for i in range(n):
        w, h = (1536, 1024) if i % 2 else (1024, 1024)
        low = rng.integers(0, 256, (h // 32, w // 32, 3), dtype=np.uint8)
        img = Image.fromarray(low).resize((w, h), Image.Resampling.BICUBIC)
        img.save(folder / f"img{i:04d}.jpg", quality=90)
        (folder / f"img{i:04d}.txt").write_text(f"a photo, number {i}, smooth colours", encoding="utf-8")


def fake_ae(pixels: torch.Tensor) -> torch.Tensor:
    pooled = torch.nn.functional.avg_pool2d(pixels, 8)
    return torch.cat([pooled.repeat(1, 5, 1, 1), pooled[:, :1]], dim=1)


def fake_te(captions: list[str]) -> dict[str, torch.Tensor]:
    b = len(captions)
    return {"clip_pooled": torch.randn(b, 768), "t5_out": torch.randn(b, 512, 4096).to(torch.bfloat16),
            "t5_mask": torch.ones(b, 512)}


def images_per_second(data: TrainingData, epochs: int, **loader_kwargs) -> float:
    loader = make_dataloader(data, 1, seed=0, **loader_kwargs)
    next(iter(loader))  # warm-up: worker start, first file opens
    count, start = 0, time.perf_counter()
    for epoch in range(1, epochs + 1):
        loader.sampler.set_epoch(epoch)
        for batch in loader:
            count += len(batch["captions"])
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_images", type=int, default=16)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_images(root / "train" / "1_photo", args.num_images)
        defaults = DatasetFlags(train_data_dir=root / "train", resolution=1024, enable_bucket=True,
                                   caption_extension=".txt", flip_aug=True)
        data = build_training_data(blueprint_from_flags(defaults), seed=0)
        print(f"data path at 1024², {args.num_images} JPEGs, batch size 1, cpu_count={os.cpu_count()}, "
              f"torch threads=1")
        uncached = {}
        for workers in args.workers:
            uncached[workers] = images_per_second(data, args.epochs, num_workers=workers,
                                                  persistent_workers=workers > 0)
            print(f"uncached loader, {workers} workers: {uncached[workers]:8.1f} images/s")
        mem, _ = build_latent_cache(data.latent_items(), fake_ae, ae_fingerprint="bench", flip_aug=True,
                                    progress=False)
        disk, _ = build_latent_cache(data.latent_items(), fake_ae, ae_fingerprint="bench", flip_aug=True,
                                     to_disk=True, cache_dir=root / "cache", progress=False)
        text, _ = build_text_cache(data.text_items(), fake_te, te_fingerprint="bench", t5_max_length=512, outputs=FLUX1_OUTPUTS,
                                   apply_t5_attn_mask=False, to_disk=True, cache_dir=root / "cache", progress=False)
        mem_rate = images_per_second(data, args.epochs, latent_cache=mem)
        disk_rate = images_per_second(data, args.epochs, latent_cache=disk)
        both_rate = images_per_second(data, args.epochs, latent_cache=disk, text_cache=text)
        print(f"cached latents (memory), 0 workers: {mem_rate:8.1f} images/s")
        print(f"cached latents (disk), 0 workers:   {disk_rate:8.1f} images/s")
        print(f"cached latents + T5 512x4096 bf16 (disk), 0 workers: {both_rate:8.1f} images/s")
        print(f"speed-up of disk-cached latents over the uncached loader (0 workers): "
              f"{disk_rate / uncached.get(0, next(iter(uncached.values()))):.1f}x")


if __name__ == "__main__":
    main()
