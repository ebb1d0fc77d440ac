"""The kohya_ss GUI's FLUX preset, as the GUI launches it (`accelerate launch ... --config_file config_lora.toml`),
trains and saves a LoRA that loads: its bookkeeping keys and neutral values pass silently, the options sd-scripts
ignores for FLUX are one warning block, `--logging_dir` turns TensorBoard on, samples carry sd-scripts' names."""

from __future__ import annotations

import re

import pytest
from gui_clients import KOHYA_NAME, check_lora_loads, run_kohya_ss, write_models

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return write_models(tmp_path_factory.mktemp("gui_models"))


@pytest.mark.parametrize("preset", ["flux1D-adamw8bit-fp8", "flux1D-adamw8bit-fp8+split_mode+samples"])
def test_kohya_ss_preset_trains_unchanged(preset, models, tmp_path):
    result, out = run_kohya_ss(preset, models, tmp_path)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    metadata = check_lora_loads(out / f"{KOHYA_NAME}.safetensors", models)
    assert metadata["ss_network_module"] == "networks.lora_flux" and metadata["ss_network_dim"] == "16"
    assert metadata["ss_steps"] == "2" and metadata["modelspec.architecture"] == "flux-1-dev/lora"

    # what the GUI writes for every run: bookkeeping keys and neutral values are silent, ignored options one block
    block = log[log.index("3 setting(s) change nothing"):]
    block = block[:block.index("\n", block.index("--sample_sampler"))]
    for option in ("--noise_offset 0.05", "--min_snr_gamma 7.0", "--sample_sampler euler"):
        assert option in block
    for silent in ("unknown key", "epoch", "noise_offset_type", "dynamo_backend", "clip_skip", "max_timestep",
                   "huber_schedule snr"):
        assert silent not in block, silent
    assert " ERROR " not in log and "Traceback" not in log

    events = list((tmp_path / "tmp" / "logs").glob("*/network_train/events.out.tfevents.*"))
    assert len(events) == 1 and re.fullmatch(r"\d{14}", events[0].parent.parent.name)  # --logging_dir alone

    samples = sorted(p.name for p in (out / "sample").glob("*.png"))
    if "samples" in preset:  # sample every step; the prompt sets --d 42, so sd-scripts appends the seed
        assert [re.sub(r"_\d{14}_", "_<ts>_", n) for n in samples] == [
            f"{KOHYA_NAME}_00000{step}_00_<ts>_42.png" for step in (1, 2)]
    else:
        assert samples == []
    assert not (out / "sample_grid").exists()
