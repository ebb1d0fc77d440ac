"""FLUX.1 Kontext training on a paired dataset (reference → edited image): the LoRA lowers the loss of the task."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from fluxlora.data.buckets import to_pixels
from fluxlora.data.images import load_image
from fluxlora.data.pairs import REFERENCE_LATENTS
from fluxlora.training.cli import train

CAPTION = "invert the colors"


@pytest.mark.slow
def test_kontext_lora_learns_an_edit_from_pairs(helpers, family_models, tmp_path) -> None:
    m = family_models
    images, references = tmp_path / "img", tmp_path / "ref"
    for i, array in enumerate(helpers.smooth_images(references, 6)):  # the edit: colours inverted
        images.mkdir(exist_ok=True)
        Image.fromarray(255 - array).save(images / f"{i:02d}.png")
        (images / f"{i:02d}.txt").write_text(CAPTION, encoding="utf-8")
    toml = tmp_path / "dataset.toml"
    toml.write_text(f'[general]\ncaption_extension = ".txt"\n[[datasets]]\nresolution = 64\nbatch_size = 2\n'
                    f'  [[datasets.subsets]]\n  image_dir = "{images.as_posix()}"\n'
                    f'  control_directory = "{references.as_posix()}"\n', encoding="utf-8")
    result = train([
        f"--pretrained_model_name_or_path={m.families.kontext}", "--model_type=kontext", f"--clip_l={m.ckpts.clip_l}",
        f"--t5xxl={m.ckpts.t5xxl}", f"--ae={m.ckpts.ae}", f"--dataset_config={toml}", f"--output_dir={tmp_path / 'out'}",
        "--output_name=lora", "--network_module=networks.lora_flux", "--network_dim=8", "--learning_rate=1e-3",
        "--seed=1", "--t5xxl_max_token_length=16", "--network_train_unet_only", "--max_train_steps=30",
        "--optimizer_type=AdamW", "--cache_latents", "--cache_text_encoder_outputs"])
    assert result.global_step == 30
    with safe_open(str(result.final_lora), "pt") as f:
        assert f.metadata()["modelspec.architecture"] == "flux-1-kontext-dev/lora"

    with torch.no_grad():
        refs = m.ae.encode(torch.stack([to_pixels(load_image(p).rgb) for p in sorted(references.glob("*.png"))]))
    extra = {REFERENCE_LATENTS: refs.float()}
    before = helpers.paired_task_loss("kontext", m.families.kontext, m, images, caption=CAPTION, extra=extra)
    after = helpers.paired_task_loss("kontext", m.families.kontext, m, images, caption=CAPTION, extra=extra,
                             lora=result.final_lora)
    assert np.isfinite(before) and after < 0.9 * before, (before, after)
