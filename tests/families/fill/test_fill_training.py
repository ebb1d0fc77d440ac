"""FLUX.1 Fill training with masks: the LoRA lowers the loss of painting the masked region back."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from fluxlora.data.buckets import to_pixels
from fluxlora.data.images import load_image
from fluxlora.data.pairs import MASK, MASKED_LATENTS, masked_image
from fluxlora.training.cli import train

CAPTION = "a smooth pattern"


@pytest.mark.slow
def test_fill_lora_learns_to_paint_masked_regions(helpers, family_models, tmp_path) -> None:
    m = family_models
    images, masks = tmp_path / "img", tmp_path / "masks"
    masks.mkdir()
    for i, _ in enumerate(helpers.smooth_images(images, 6, seed=3)):
        (images / f"{i:02d}.txt").write_text(CAPTION, encoding="utf-8")
        mask = np.zeros((64, 64), np.uint8)
        mask[8 + 4 * i: 40 + 4 * i, 16:48] = 255
        Image.fromarray(mask, "L").save(masks / f"{i:02d}.png")
    toml = tmp_path / "dataset.toml"
    toml.write_text(f'[general]\ncaption_extension = ".txt"\nflip_aug = true\n[[datasets]]\nresolution = 64\n'
                    f'batch_size = 2\n  [[datasets.subsets]]\n  image_dir = "{images.as_posix()}"\n'
                    f'  conditioning_data_dir = "{masks.as_posix()}"\n', encoding="utf-8")
    result = train([
        f"--pretrained_model_name_or_path={m.families.fill}", f"--clip_l={m.ckpts.clip_l}", f"--t5xxl={m.ckpts.t5xxl}",
        f"--ae={m.ckpts.ae}", f"--dataset_config={toml}", f"--output_dir={tmp_path / 'out'}", "--output_name=lora",
        "--network_module=networks.lora_flux", "--network_dim=8", "--learning_rate=1e-3", "--seed=1",
        "--t5xxl_max_token_length=16", "--network_train_unet_only", "--max_train_steps=30", "--optimizer_type=AdamW",
        "--guidance_scale=30"])
    assert result.global_step == 30  # the family was found from the header (img_in reads 384 channels)
    with safe_open(str(result.final_lora), "pt") as f:
        assert f.metadata()["modelspec.architecture"] == "flux-1-fill-dev/lora"

    pixels = torch.stack([to_pixels(load_image(p).rgb) for p in sorted(images.glob("*.png"))])
    mask = torch.stack([torch.from_numpy(np.asarray(Image.open(p)) >= 128).float()[None]
                        for p in sorted(masks.glob("*.png"))])
    with torch.no_grad():
        extra = {MASK: mask, MASKED_LATENTS: m.ae.encode(masked_image(pixels, mask)).float()}
    before = helpers.paired_task_loss("fill", m.families.fill, m, images, caption=CAPTION, extra=extra)
    after = helpers.paired_task_loss("fill", m.families.fill, m, images, caption=CAPTION, extra=extra,
                                     lora=result.final_lora)
    assert np.isfinite(before) and after < 0.9 * before, (before, after)
