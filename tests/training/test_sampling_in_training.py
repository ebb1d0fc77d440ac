"""Sampling during training never changes the training (issue 7): with and without sampling every step the losses
and the LoRA are bit-identical, and the sample images are written under the spec §8 names."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from fluxlora.training.cli import train


def test_sampling_every_step_leaves_losses_bit_identical(train_argv, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of sks red square --w 64 --h 64 --s 2 --d 5\n# a comment\n"
                       "a blue circle --w 64 --h 48 --s 2 --d 6 --g 2.0\n", encoding="utf-8")
    plain = train(train_argv("--max_train_steps=3", output_dir=tmp_path / "plain"))
    sampled = train(train_argv("--max_train_steps=3", f"--sample_prompts={prompts}", "--sample_every_n_steps=1",
                               "--sample_at_first", output_dir=tmp_path / "sampled"))
    assert sampled.losses == plain.losses and len(plain.losses) == 3
    a = load_file(str(tmp_path / "plain" / "lora.safetensors"))
    b = load_file(str(tmp_path / "sampled" / "lora.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    images = sorted(p.name for p in (tmp_path / "sampled" / "sample").glob("*.png") if "_grid" not in p.name)
    # before training (e000000) and after steps 1, 2, 3; prompt index and the seed in every name
    prefixes = [f"lora_{p}" for p in ("e000000", "000001", "000002", "000003")]
    assert len(images) == 8
    for prefix in prefixes:
        mine = [n for n in images if n.startswith(prefix + "_")]
        assert len(mine) == 2 and mine[0].split("_")[2] == "00" and mine[0].endswith("_5.png")
        assert mine[1].split("_")[2] == "01" and mine[1].endswith("_6.png")
    assert not (tmp_path / "plain" / "sample").exists()
