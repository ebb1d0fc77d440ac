"""Sampling during training: schedule, file names, grid, trackers, and that it never changes the training run."""

from __future__ import annotations

import random
import re
from datetime import datetime
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from fluxlora.families.flux1.family import FLUX1
from fluxlora.flow import image_ids, text_ids
from fluxlora.inference.prompts import SamplePrompt
from fluxlora.inference.sampler import generate_images
from fluxlora.inference.training_samples import (
    accelerate_image_logger,
    encode_sample_prompts,
    make_grid,
    sample_during_training,
    sample_grid_path,
    sample_image_path,
    sampling_due,
    tensorboard_image_logger,
)
from fluxlora.models.flux_loading import load_flux
from fluxlora.network.lora import create_network

NOW = datetime(2025, 3, 4, 5, 6, 7)
PROMPTS = [SamplePrompt("a cat", width=32, height=32, seed=1, steps=2),
           SamplePrompt("a dog", width=48, height=32, seed=2, steps=1, guidance=2.0)]


@pytest.mark.parametrize("step, epoch, n_steps, n_epochs, at_first, due", [
    (0, None, 10, None, True, True),  # before training
    (0, 0, None, 1, True, True),
    (0, None, 10, None, False, False),
    (10, None, 10, None, False, True),  # every 10 steps
    (15, None, 10, None, False, False),
    (20, 2, 10, None, False, False),  # epoch end is not a step event
    (10, None, 10, 2, False, False),  # --sample_every_n_epochs replaces the step rule
    (40, 2, 10, 2, False, True),
    (60, 3, None, 2, False, False),
    (10, None, None, None, False, False),  # nothing asked
    (10, None, 0, None, False, False),  # <= 0 is disabled
])
def test_sampling_due(step, epoch, n_steps, n_epochs, at_first, due):
    assert sampling_due(step=step, epoch=epoch, every_n_steps=n_steps, every_n_epochs=n_epochs,
                        at_first=at_first) is due


@pytest.mark.parametrize("name, step, epoch, seed, expected", [
    (None, 120, None, None, "out/sample/000120_03_20250304050607.png"),
    ("my_lora", 120, None, None, "out/sample/my_lora_000120_03_20250304050607.png"),
    ("my-lora", 120, None, 42, "out/sample/my-lora_000120_03_20250304050607_42.png"),  # the prompt set --d 42
    ("my_lora", 500, 2, None, "out/sample/my_lora_e000002_03_20250304050607.png"),
    (None, 0, 0, 7, "out/sample/e000000_03_20250304050607_7.png"),
])
def test_file_names_follow_sd_scripts(name, step, epoch, seed, expected):
    """sd-scripts' `{output_name}_{step:06d}_{i:02d}_{YYYYmmddHHMMSS}{_seed}.png`, `_seed` only with `--d`; the
    grid (on request) goes to sample_grid/, where GUI galleries do not look."""
    path = sample_image_path("out", name, step=step, epoch=epoch, index=3, seed=seed, timestamp="20250304050607")
    assert path.as_posix() == expected
    grid = sample_grid_path("out", name, step=step, epoch=epoch, timestamp="20250304050607")
    stem = expected.replace("_03_", "_").removesuffix(f"_{seed}.png" if seed is not None else ".png")
    assert grid.as_posix() == stem.replace("/sample/", "/sample_grid/") + "_grid.png"


FLUXGYM_SAMPLE_NAME = re.compile(r"_(\d+)_(\d+)_(\d+)\.png$")  # fluxgym app.py: step, prompt index, time stamp


def test_fluxgym_reads_the_step_of_a_prompt_without_a_seed():
    """fluxgym's model card sorts samples by the first number; for prompts without --d (fluxgym pre-fills the
    trigger word) it is the real step. With --d sd-scripts appends the seed and fluxgym misreads — as with sd-scripts."""
    for step in (1, 37, 120, 1600):
        path = sample_image_path("out", "my-lora", step=step, epoch=None, index=2, seed=None, timestamp="20260101120000")
        match = FLUXGYM_SAMPLE_NAME.search(path.name)
        assert match and tuple(int(g) for g in match.groups()) == (step, 2, 20260101120000)


def test_sample_event_writes_images_grid_and_logs(tiny_models, tmp_path):
    logged = []
    paths = sample_during_training(
        family=FLUX1, info=tiny_models.info["dev"], model=tiny_models.flux["dev"], ae=tiny_models.ae,
        encode_fn=tiny_models.encode_fn("dev"), prompts=PROMPTS, output_dir=tmp_path, output_name="run", step=7,
        epoch=None, device="cpu", now=NOW,
        tracker=lambda images, step: logged.append((dict(images), step)), grid=True)
    assert [p.relative_to(tmp_path).as_posix() for p in paths] == [
        "sample/run_000007_00_20250304050607_1.png", "sample/run_000007_01_20250304050607_2.png",
        "sample_grid/run_000007_20250304050607_grid.png"]
    expected = generate_images(FLUX1, tiny_models.info["dev"], tiny_models.flux["dev"], tiny_models.ae,
                               tiny_models.encode_fn("dev"), PROMPTS, device="cpu")
    for path, image in zip(paths[:2], expected, strict=True):
        with Image.open(path) as written:
            assert np.array_equal(np.asarray(written), np.asarray(image))
            assert written.text["prompt"] == image.info["prompt"] and written.text["step"] == "7"
    with Image.open(paths[2]) as grid:
        assert grid.width >= 32 + 48 and grid.height > 32  # side by side, with a label strip below
    ((images, step),) = logged
    assert step == 7 and sorted(images) == ["sample_0", "sample_1", "sample_grid"]
    without_grid = sample_during_training(
        family=FLUX1, info=tiny_models.info["dev"], model=tiny_models.flux["dev"], ae=tiny_models.ae,
        encode_fn=tiny_models.encode_fn("dev"), prompts=PROMPTS, output_dir=tmp_path / "plain", output_name="run",
        step=7, epoch=None, device="cpu", now=NOW)
    assert [p.name for p in without_grid] == [p.name for p in paths[:2]]
    assert sorted(p.name for p in (tmp_path / "plain").rglob("*.png")) == sorted(p.name for p in paths[:2])


def test_prompts_are_shared_round_robin_between_processes(tiny_models, tmp_path):
    prompts = PROMPTS + [SamplePrompt("a bird", width=32, height=32, seed=3, steps=1)]
    paths = sample_during_training(
        family=FLUX1, info=tiny_models.info["schnell"], model=tiny_models.flux["schnell"], ae=tiny_models.ae,
        encode_fn=tiny_models.encode_fn("schnell"), prompts=prompts, output_dir=tmp_path, output_name=None, step=0,
        epoch=0, device="cpu",
        process_index=1, num_processes=2, now=NOW, grid=True)
    assert [p.name for p in paths] == ["e000000_01_20250304050607_2.png", "e000000_20250304050607_grid_rank1.png"]


def test_grid_places_images_side_by_side_with_labels():
    red, blue = Image.new("RGB", (100, 60), (255, 0, 0)), Image.new("RGB", (120, 40), (0, 0, 255))
    grid = make_grid([red, blue], ["first prompt", "second"])
    assert grid.size == (2 * 120, 60 + 3 * 12 + 4)
    assert grid.getpixel((50, 30)) == (255, 0, 0) and grid.getpixel((120 + 60, 20)) == (0, 0, 255)
    label_strip = np.asarray(grid)[60:, :120]
    assert (label_strip < 128).any()  # text was drawn below the first image


def test_tensorboard_logging_reads_back(tmp_path):
    from accelerate.tracking import TensorBoardTracker
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    image = Image.new("RGB", (32, 16), (10, 200, 30))
    writer = SummaryWriter(str(tmp_path / "direct"))
    tensorboard_image_logger(writer)({"sample_0": image}, 5)
    writer.close()
    tracker = TensorBoardTracker("run", str(tmp_path / "acc"))
    tracker.start()  # what Accelerator.init_trackers does
    accelerate_image_logger(SimpleNamespace(trackers=[tracker]))({"sample_grid": image}, 9)
    tracker.finish()
    for folder, tag, step in ((tmp_path / "direct", "sample_0", 5), (tmp_path / "acc" / "run", "sample_grid", 9)):
        events = EventAccumulator(str(folder), size_guidance={"images": 0})
        events.Reload()
        (entry,) = events.Images(tag)
        assert (entry.step, entry.width, entry.height) == (step, 32, 16)
    assert accelerate_image_logger(SimpleNamespace(trackers=[])) is None


# ------------------------------------------------------------------------------ training is untouched


def _train(ckpts, *, sample: bool, tmp_path) -> tuple[list[float], dict[str, torch.Tensor], list[bool]]:
    """Three LoRA steps with dropout on the global RNG, the base in train mode; optionally sampling after each."""
    flux, _ = load_flux(ckpts.flux_dev, dtype=torch.float32)
    flux.train()
    flux.double_blocks[0].eval()  # a submodule deliberately in eval mode must stay so
    network = create_network(1.0, 4, 4.0, flux, [], neuron_dropout=0.3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for lora in network.loras:
            for up in lora.up_weights():
                up.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    network.apply_to()
    network.train()
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1)
    torch.manual_seed(1234)
    random.seed(5)
    np.random.seed(6)
    losses = []
    for step in range(1, 4):
        img, txt, y = torch.randn(2, 4, 64), torch.randn(2, 5, 32), torch.randn(2, 32)
        out = flux(img, image_ids(2, 2, 2), txt, text_ids(2, 5), torch.rand(2), y, guidance=torch.full((2,), 1.0))
        loss = out.pow(2).mean() + 0.0 * random.random() + 0.0 * float(np.random.rand())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if sample:
            sample_during_training(family=FLUX1, info=ckpts.info, model=flux, ae=ckpts.ae_model,
                                   encode_fn=ckpts.encode, prompts=PROMPTS[:1], output_dir=tmp_path,
                                   output_name=None, step=step, epoch=None, device="cpu", modules=[network], now=NOW)
            assert torch.is_grad_enabled()
    modes = [m.training for m in [*flux.modules(), *network.modules()]]
    return losses, {k: v.clone() for k, v in network.state_dict().items()}, [random.random(), float(np.random.rand())] + modes


def test_sampling_does_not_change_the_training_trajectory(tiny_ckpts, tiny_models, tmp_path):
    ckpts = SimpleNamespace(flux_dev=tiny_ckpts.flux_dev, ae_model=tiny_models.ae, encode=tiny_models.encode_fn("dev"),
                            info=tiny_models.info["dev"])
    losses_a, weights_a, tail_a = _train(ckpts, sample=False, tmp_path=tmp_path)
    losses_b, weights_b, tail_b = _train(ckpts, sample=True, tmp_path=tmp_path)
    assert len(list(tmp_path.glob("sample/*.png"))) == 3  # 3 events × 1 image (no grid unless asked)
    assert losses_a == losses_b  # bit-identical
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    assert tail_a == tail_b  # python/numpy RNGs and every module's train/eval flag
    assert tail_b[2] is True and False in tail_b[2:]  # the mix of modes really was there to restore


def test_with_gather_only_the_main_process_writes_every_prompt(tiny_models, tmp_path):
    prompts = PROMPTS + [SamplePrompt("a bird", width=32, height=32, seed=3, steps=1)]
    common = dict(family=FLUX1, info=tiny_models.info["schnell"], model=tiny_models.flux["schnell"], ae=tiny_models.ae,
                  encode_fn=tiny_models.encode_fn("schnell"), prompts=prompts, output_dir=tmp_path, output_name=None,
                  step=0, epoch=0,
                  device="cpu", num_processes=2, now=NOW)
    shares: list = []
    # Process 1 generates its share and hands it over; it writes nothing.
    assert sample_during_training(**common, process_index=1, gather=lambda share: shares.append(share) or []) == []
    assert not (tmp_path / "sample").exists()
    paths = sample_during_training(**common, process_index=0, gather=lambda share: [share, shares[0]])
    assert [p.name for p in paths] == ["e000000_00_20250304050607_1.png", "e000000_01_20250304050607_2.png",
                                       "e000000_02_20250304050607_3.png"]


@pytest.mark.parametrize("process_index", [0, 1])
def test_prompts_encoded_up_front_give_the_same_images_as_live_encoders(tiny_models, tmp_path, process_index):
    prompts = PROMPTS + [SamplePrompt("a bird", negative_prompt="blurry", width=32, height=32, seed=3, steps=1,
                                      cfg_scale=2.0)]
    calls: list[list[str]] = []

    def counting(texts):
        calls.append(list(texts))
        return tiny_models.encode_fn("dev")(texts)

    encoded = encode_sample_prompts(prompts, counting, process_index=process_index, num_processes=2)
    # only this process's share (prompt i goes to process i mod 2), negative prompts of true-CFG prompts included
    mine = {0: ["a cat", "a bird", "blurry"], 1: ["a dog"]}[process_index]
    assert calls == [mine] and sorted(encoded.conds) == sorted(mine)
    assert all(t.device.type == "cpu" for c in encoded.conds.values() for t in c.values())
    assert list(encoded.prompts) == prompts
    common = dict(family=FLUX1, info=tiny_models.info["dev"], model=tiny_models.flux["dev"], ae=tiny_models.ae,
                  prompts=prompts, output_name="run", step=3, epoch=None, device="cpu", now=NOW,
                  process_index=process_index, num_processes=2)
    live = sample_during_training(encode_fn=tiny_models.encode_fn("dev"), output_dir=tmp_path / "live", **common)
    cached = sample_during_training(encode_fn=encoded.encode, output_dir=tmp_path / "cached", **common)
    assert [p.name for p in live] == [p.name for p in cached] and len(live) == {0: 2, 1: 1}[process_index]
    for a, b in zip(live, cached, strict=True):
        with Image.open(a) as x, Image.open(b) as y:
            assert np.array_equal(np.asarray(x), np.asarray(y))
    with pytest.raises(KeyError, match="was not encoded"):
        encoded.encode(["a prompt nobody encoded"])
