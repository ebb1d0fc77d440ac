"""Two processes on a paired FLUX.1 Kontext dataset (reference latents cached to disk, each process its share):
both agree and equal one process whose batch is the union of theirs, as for FLUX.1 (test_ddp.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from ddp_launch import accelerate_launch, write_dataset
from PIL import Image
from safetensors.torch import load_file

from fluxlora.training.cli import train

pytestmark = pytest.mark.slow  # one 2-process launch: ~30-50 s on a 2-core CPU

HERE = Path(__file__).resolve().parent
STEPS = 4


def _argv(tiny, families, images: Path, references: Path, out: Path, *extra: str) -> list[str]:
    toml = out.parent / f"{out.name}.toml"
    toml.write_text(
        f'[general]\ncaption_extension = ".txt"\n[[datasets]]\nresolution = 64\nbatch_size = 2\n'
        f'  [[datasets.subsets]]\n  image_dir = "{images.as_posix()}"\n'
        f'  conditioning_data_dir = "{references.as_posix()}"\n', encoding="utf-8")
    return [f"--pretrained_model_name_or_path={families.kontext}", "--model_type=kontext", f"--clip_l={tiny.clip_l}",
            f"--t5xxl={tiny.t5xxl}", f"--ae={tiny.ae}", f"--dataset_config={toml}", f"--output_dir={out}",
            "--output_name=lora", "--network_module=networks.lora_flux", "--network_dim=4", "--learning_rate=1e-3",
            "--seed=7", "--t5xxl_max_token_length=16", "--network_train_unet_only", "--cache_latents_to_disk",
            "--cache_text_encoder_outputs_to_disk", f"--max_train_steps={STEPS}", *extra]


def test_kontext_two_processes_equal_one_process_with_the_union_batch(tiny_ckpts, tiny_family_ckpts,
                                                                      tmp_path) -> None:
    images = write_dataset(tmp_path / "img", count=8)
    references = tmp_path / "ref"
    references.mkdir()
    for image in sorted(images.glob("*.png")):
        Image.fromarray(255 - np.asarray(Image.open(image))).save(references / image.name)
    out = tmp_path / "two"
    proc = accelerate_launch(HERE / "ddp_worker.py", _argv(tiny_ckpts, tiny_family_ckpts, images, references, out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    p0, p1 = load_file(str(out / "process0.safetensors")), load_file(str(out / "process1.safetensors"))
    assert p0.keys() == p1.keys() and all(torch.equal(p0[k], p1[k]) for k in p0)
    r0 = json.loads((out / "process0.json").read_text())
    # the reference latents were cached once, in the folder beside the references' own
    assert len(list(references.glob("*_flux_latents.safetensors"))) == 8
    single = train(_argv(tiny_ckpts, tiny_family_ckpts, images, references, tmp_path / "single",
                         "--gradient_accumulation_steps=2"))
    ref, main = load_file(str(tmp_path / "single" / "lora.safetensors")), load_file(str(out / "lora.safetensors"))
    keys = [k for k in ref if not k.endswith(".alpha")]
    assert keys and all(torch.allclose(main[k], ref[k], rtol=0, atol=1e-6) for k in keys)
    assert single.losses == pytest.approx(r0["losses"], rel=1e-6, abs=1e-7)
