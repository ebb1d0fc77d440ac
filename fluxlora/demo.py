"""`fluxlora demo` (= `make demo`): a complete training run on a CPU in about a minute.

It writes tiny real-format checkpoints, generates a small captioned dataset with a visible concept (a red disc
on varied backgrounds), trains a LoRA through the same `train` code path as a real run, and leaves the LoRA,
`loss.png` and before/after sample images in one folder.
"""

from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

logger = logging.getLogger(__name__)

CAPTION = "a photo of a sks red disc"


def write_concept_dataset(folder: Path, *, count: int = 8, size: int = 64, seed: int = 0) -> Path:
    """`count` images of a red disc on random smooth backgrounds, each with a caption file."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        top, bottom = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        ramp = np.linspace(0.0, 1.0, size)[:, None, None]
        pixels = (top * (1 - ramp) + bottom * ramp).repeat(size, axis=1).astype("uint8")
        image = Image.fromarray(pixels)
        r = int(size * rng.uniform(0.2, 0.3))
        cx, cy = rng.integers(r, size - r, 2)
        ImageDraw.Draw(image).ellipse((cx - r, cy - r, cx + r, cy + r), fill=(220, 20, 30))
        image.save(folder / f"disc_{i:02d}.png")
        (folder / f"disc_{i:02d}.txt").write_text(CAPTION, encoding="utf-8")
    return folder


def demo_argv(root: Path, models, *, steps: int) -> list[str]:
    """The training command line of the demo (what a user would type, with the tiny models)."""
    dataset = write_concept_dataset(root / "dataset" / "10_sks disc")
    toml = root / "dataset.toml"
    toml.write_text(
        '[general]\ncaption_extension = ".txt"\nflip_aug = true\n\n[[datasets]]\nresolution = 64\nbatch_size = 2\n\n'
        f'  [[datasets.subsets]]\n  image_dir = "{dataset.as_posix()}"\n  num_repeats = 1\n', encoding="utf-8")
    prompts = root / "prompts.txt"
    prompts.write_text(f"{CAPTION} --w 64 --h 64 --d 42 --s 8\n", encoding="utf-8")
    return [
        f"--pretrained_model_name_or_path={models.flux_dev}", f"--clip_l={models.clip_l}", f"--t5xxl={models.t5xxl}",
        f"--ae={models.ae}", f"--dataset_config={toml}", f"--output_dir={root / 'output'}",
        "--output_name=demo_lora", "--network_module=networks.lora_flux", "--network_dim=8", "--network_alpha=8",
        "--learning_rate=3e-3", "--optimizer_type=AdamW", "--lr_scheduler=constant", f"--max_train_steps={steps}",
        "--network_train_unet_only", "--cache_latents", "--cache_text_encoder_outputs", "--seed=42",
        "--timestep_sampling=sigmoid", "--t5xxl_max_token_length=32", f"--sample_prompts={prompts}",
        "--sample_at_first", f"--sample_every_n_steps={steps}", "--overwrite",
    ]


def _collect_samples(output: Path, root: Path) -> list[Path]:
    samples = sorted(p for p in (output / "sample").glob("*.png") if "grid" not in p.name) \
        if (output / "sample").is_dir() else []
    kept = []
    if len(samples) >= 2:
        for name, src in (("before.png", samples[0]), ("after.png", samples[-1])):
            shutil.copyfile(src, root / name)
            kept.append(root / name)
    return kept


def run_demo(root: Path, *, steps: int = 120) -> dict:
    """Run the demo in `root`; returns {losses, lora, plot, samples}."""
    from fluxlora.models.tiny import write_tiny_checkpoints
    from fluxlora.training.cli import train

    root.mkdir(parents=True, exist_ok=True)
    models = write_tiny_checkpoints(root / "models", seed=0)
    result = train(demo_argv(root, models, steps=steps))
    output = root / "output"
    return {"losses": result.losses, "lora": result.final_lora, "plot": output / "loss.png",
            "samples": _collect_samples(output, root)}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fluxlora demo", description=__doc__)
    parser.add_argument("--output_dir", type=Path, default=Path("demo_output"), help="folder for everything")
    parser.add_argument("--steps", type=int, default=120, help="optimizer steps (default 120)")
    args = parser.parse_args(argv)
    found = run_demo(args.output_dir, steps=args.steps)
    losses = found["losses"]
    k = max(1, min(10, len(losses) // 4))
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    print(f"\nfluxlora demo: {len(losses)} steps; mean loss of the first {k} steps {first:.4f}, "
          f"of the last {k} {last:.4f}")
    print(f"  LoRA:        {found['lora']}")
    print(f"  loss curve:  {found['plot']}")
    for sample in found["samples"]:
        print(f"  sample:      {sample}")
    return 0
