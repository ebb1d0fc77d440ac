"""`fluxlora generate` / `flux_minimal_inference.py` per family: Chroma with true CFG and a negative prompt (no
--clip_l), Kontext with --control_image, Fill with --control_image and --mask_image; FLUX.1 Krea [dev] (the dev
layout) accepted whatever its file name; clear errors for flags a family does not read."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fluxlora.cli import main as cli_main
from fluxlora.errors import ConfigError
from fluxlora.families import resolve_family
from fluxlora.inference.generate import main as generate_main


def _image(path: Path, size=(48, 32), *, mask: bool = False) -> Path:
    w, h = size
    if mask:
        a = np.zeros((h, w), np.uint8)
        a[8:24, 8:32] = 255
        Image.fromarray(a, "L").save(path)
    else:
        y, x = np.mgrid[0:h, 0:w]
        Image.fromarray(np.stack([x * 5, y * 7, (x + y) * 3], -1).astype(np.uint8)).save(path)
    return path


def _common(m, out: Path) -> list[str]:
    return ["--t5xxl", str(m.ckpts.t5xxl), "--ae", str(m.ckpts.ae), "--dtype", "float32", "--device", "cpu",
            "--width", "48", "--height", "32", "--steps", "2", "--seed", "3", "--output_dir", str(out)]


def _one_png(folder: Path) -> tuple[np.ndarray, dict]:
    (path,) = sorted(folder.glob("*.png"))
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")), dict(image.text)


def test_chroma_with_true_cfg_needs_no_clip_l(family_models, tmp_path) -> None:
    m = family_models
    base = ["--ckpt_path", str(m.families.chroma), *_common(m, tmp_path / "a"), "--prompt", "a shrine"]
    assert cli_main(["generate", *base]) == 0
    plain, text = _one_png(tmp_path / "a")
    assert text["model_family"] == "chroma" and "Model: Chroma" in text["parameters"]
    cfg = [*base[:base.index("--output_dir")], "--output_dir", str(tmp_path / "b"), *base[base.index("--prompt"):],
           "--negative_prompt", "low quality", "--cfg_scale", "4.0", "--guidance", "0"]
    assert cli_main(["generate", *cfg]) == 0
    guided, text = _one_png(tmp_path / "b")
    assert text["negative_prompt"] == "low quality" and text["cfg_scale"] == "4.0"
    assert np.abs(plain.astype(int) - guided.astype(int)).max() > 0  # CFG with the negative prompt changed it


def test_kontext_with_a_control_image(family_models, tmp_path) -> None:
    m = family_models
    flags = ["--ckpt_path", str(m.families.kontext), "--model_type", "kontext", "--clip_l", str(m.ckpts.clip_l),
             *_common(m, tmp_path / "a"), "--prompt", "make it red"]
    control = _image(tmp_path / "ref.png")
    assert generate_main([*flags, "--control_image", str(control)]) == 0
    edited, text = _one_png(tmp_path / "a")
    assert text["model_family"] == "kontext" and text["control_image"] == str(control)
    flags[flags.index("--output_dir") + 1] = str(tmp_path / "b")
    assert generate_main(flags) == 0  # without a reference: text to image
    plain, _ = _one_png(tmp_path / "b")
    assert np.abs(edited.astype(int) - plain.astype(int)).max() > 0
    with pytest.raises(ConfigError, match=r"--mi is for FLUX.1 Fill"):
        generate_main([*flags, "--control_image", str(control), "--mask_image", str(control)])
    # the dev layout says nothing of Kontext: without --model_type the control image is refused, naming the fix
    dev = [f for f in flags if f not in ("--model_type", "kontext")]
    with pytest.raises(ConfigError, match=r"reads no control image; remove them, or choose FLUX.1 Kontext / Fill"):
        generate_main([*dev, "--control_image", str(control)])


def test_fill_with_an_image_and_a_mask(family_models, tmp_path) -> None:
    m = family_models
    flags = ["--ckpt_path", str(m.families.fill), "--clip_l", str(m.ckpts.clip_l), *_common(m, tmp_path / "a"),
             "--prompt", "a window", "--guidance", "30", "--control_image", str(_image(tmp_path / "img.png"))]
    with pytest.raises(ConfigError, match=r"paints into an image: give the image with --ci PATH and the mask"):
        generate_main(flags)
    assert generate_main([*flags, "--mask_image", str(_image(tmp_path / "mask.png", mask=True))]) == 0
    _, text = _one_png(tmp_path / "a")
    assert text["model_family"] == "fill" and text["mask_image"].endswith("mask.png")
    with pytest.raises(ConfigError, match=r"--mask_image .*missing.png: file not found"):
        generate_main([*flags, "--mask_image", str(tmp_path / "missing.png")])


def test_krea_dev_layout_is_flux1_dev_whatever_its_name(family_models, tmp_path) -> None:
    m = family_models
    krea = tmp_path / "flux1-krea-dev_fp8_scaled.safetensors"
    shutil.copyfile(m.ckpts.flux_dev, krea)
    family, info = resolve_family(krea, None, flag="--pretrained_model_name_or_path")
    assert (family.name, info.variant, info.title) == ("flux1", "dev", "FLUX.1-dev")
    assert generate_main(["--ckpt_path", str(krea), "--clip_l", str(m.ckpts.clip_l), *_common(m, tmp_path / "a"),
                          "--prompt", "a cat"]) == 0
