"""fluxgym's four VRAM presets, as fluxgym runs them (`bash outputs/<name>/train.sh` with `sd-scripts/` = this
repository), train and save a LoRA that loads; its sample images carry sd-scripts' names."""

from __future__ import annotations

import re

import pytest
from gui_clients import check_lora_loads, run_fluxgym, write_models

pytestmark = pytest.mark.slow

FLUXGYM_SAMPLE_NAME = re.compile(r"_(\d+)_(\d+)_(\d+)\.png$")  # fluxgym app.py (gallery and model card)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return write_models(tmp_path_factory.mktemp("gui_models"))


@pytest.mark.parametrize("script", ["train_20G", "train_16G", "train_12G", "train_20G_samples"])
def test_fluxgym_preset_trains_unchanged(script, models, tmp_path):
    result, outputs = run_fluxgym(script, models, tmp_path)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    metadata = check_lora_loads(outputs / "my-lora.safetensors", models)
    assert metadata["ss_steps"] == "4" and metadata["ss_network_dim"] == "4"  # 4 images x 1 repeat, 1 epoch
    if script == "train_12G":  # --split_mode: 18 blocks swapped, single blocks only
        assert "--split_mode is deprecated: using --blocks_to_swap 18" in log
        assert all("double_blocks" not in k for k in metadata.get("ss_network_args", "")) and \
            metadata["ss_network_args"] == '{"train_blocks": "single"}'
    assert "change nothing" not in log  # fluxgym writes nothing sd-scripts ignores

    samples = sorted((outputs / "sample").glob("*.png"))
    if script != "train_20G_samples":
        assert samples == []
        return
    # sample every step; fluxgym's prompt file as written sets --d 42, and sd-scripts then appends the seed:
    # my-lora_{step:06d}_{i:02d}_{YYYYmmddHHMMSS}_42.png (fluxgym's regex reads "_00_<ts>_42" there, as with
    # sd-scripts; without --d it reads the step, see test_fluxgym_reads_the_step_of_a_prompt_without_a_seed)
    names = [re.sub(r"_\d{14}_", "_<ts>_", p.name) for p in samples]
    assert names == [f"my-lora_00000{step}_00_<ts>_42.png" for step in (1, 2, 3, 4)]
    assert all(FLUXGYM_SAMPLE_NAME.search(p.name) for p in samples)  # the gallery lists every one
    assert not any("grid" in p.name for p in outputs.rglob("*.png"))  # no grid unless asked (--sample_grid)
