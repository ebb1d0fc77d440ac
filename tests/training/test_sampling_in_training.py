"""Sampling during training never changes the training (issue 7): with and without sampling every step the losses
and the LoRA are bit-identical, and the sample images are written under the spec §8 names."""

from __future__ import annotations

import dataclasses
import gc
import weakref

import numpy as np
import pytest
import torch
from PIL import Image
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


PROMPTS = ("a photo of sks red square --w 64 --h 64 --s 2 --d 5\n"
           "a blue circle --w 96 --h 64 --s 2 --d 6 --g 2.0 --l 2.0 --n a green blur\n")
CACHED = ("--cache_latents", "--cache_text_encoder_outputs")
SPLIT = "validation_split = 0.5\nvalidation_seed = 3"


def _pixels(folder):
    """{(event, prompt index): RGB array} of the sample images in `folder` (timestamps differ between runs)."""
    return {tuple(p.name.split("_")[1:3]): np.asarray(Image.open(p).convert("RGB"))
            for p in folder.glob("*.png") if "_grid" not in p.name}


def _keep_text_encoders(monkeypatch):
    """Residency as if a text-encoder LoRA were trained: the encoders stay loaded (the pre-change behaviour)."""
    import fluxlora.training.plan as plan

    real = plan.residency_for

    def keep(*args, **kwargs):  # residency_for(cfg, family)
        return dataclasses.replace(real(*args, **kwargs), drop_text_encoders=False)

    monkeypatch.setattr(plan, "residency_for", keep)


def _watch_text_encoders(monkeypatch):
    """Weak references to every CLIP-L / T5 module `load_models` loads."""
    import fluxlora.models.text_encoders as text_encoders

    refs: list[weakref.ref] = []
    for name in ("load_clip_l", "load_t5xxl"):
        real = getattr(text_encoders, name)
        monkeypatch.setattr(text_encoders, name,
                            lambda *a, _real=real, **k: refs.append(weakref.ref(m := _real(*a, **k))) or m)
    return refs


def test_cached_text_encoders_are_freed_and_samples_validation_and_training_are_unchanged(
        train_argv, tmp_path, monkeypatch):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS, encoding="utf-8")
    flags = ("--max_train_steps=3", *CACHED, f"--sample_prompts={prompts}", "--sample_every_n_steps=2",
             "--sample_at_first", "--validate_every_n_steps=2")
    refs = _watch_text_encoders(monkeypatch)
    seen: list[tuple] = []

    def look(run, step):
        gc.collect()
        text = run.models.text.modules
        seen.append((text["clip_l"], text["t5xxl"], [r() for r in refs], run.models.ae is not None,
                     run.sample_prompts is not None))

    freed = train(train_argv(*flags, toml_extra=SPLIT, output_dir=tmp_path / "freed"), callbacks=[look])
    assert len(refs) == 2 and seen
    for clip, t5, alive, has_ae, encoded_up_front in seen:
        assert clip is None and t5 is None and alive == [None, None]  # no module, no host copy anywhere
        assert has_ae and encoded_up_front  # the AE decodes the samples; the prompts were encoded before the free
    seen.clear()

    _keep_text_encoders(monkeypatch)
    kept = train(train_argv(*flags, toml_extra=SPLIT, output_dir=tmp_path / "kept"), callbacks=[look])
    assert all(clip is not None and t5 is not None and not encoded for clip, t5, _, _, encoded in seen)

    assert freed.losses == kept.losses and len(freed.losses) == 3
    assert freed.validation == kept.validation and freed.validation
    a, b = _pixels(tmp_path / "freed" / "sample"), _pixels(tmp_path / "kept" / "sample")
    # before training and after step 2, both prompts (the second with a negative prompt and true CFG)
    assert sorted(a) == sorted(b) == [("000002", "00"), ("000002", "01"), ("e000000", "00"), ("e000000", "01")]
    assert a[("e000000", "01")].shape == (64, 96, 3)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    x = load_file(str(tmp_path / "freed" / "lora.safetensors"))
    y = load_file(str(tmp_path / "kept" / "lora.safetensors"))
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.parametrize(("flags", "train_te", "te_kept", "ae_kept"), [
    ((), False, True, True),
    (("--cache_latents",), False, True, False),
    (("--cache_text_encoder_outputs",), False, False, True),
    (("--cache_text_encoder_outputs",), True, True, True),
], ids=["nothing-cached", "latents-cached", "te-cached", "te-cached-clip-lora"])
def test_encoders_stay_unless_their_outputs_are_cached_and_untrained(train_argv, flags, train_te, te_kept, ae_kept):
    from fluxlora.training.cli import prepare
    from fluxlora.training.setup import build_run

    argv = train_argv("--max_train_steps=1", *flags)
    if train_te:  # a CLIP-L LoRA runs the encoder every step
        argv.remove("--network_train_unet_only")
    run = build_run(prepare(argv))
    assert ("clip_l" in run.trainable.trained_encoders) == train_te
    assert all(m is not None for m in run.models.text.modules.values()) == te_kept
    # no --sample_prompts: with cached latents the AE has no further use and is freed
    assert (run.models.ae is not None) == ae_kept
