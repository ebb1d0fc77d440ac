"""Presets by GPU memory (`fluxlora.training.presets`, `fluxlora check --vram GB`): each preset really fits by the
planner's estimate, adds the least it can (one fewer swapped or checkpointed block would not fit), larger GPUs never
need more, and the dataset's caching conflicts are respected."""

from __future__ import annotations

from dataclasses import replace

import pytest

from fluxlora.config.train_config import parse_train_config
from fluxlora.errors import ConfigError
from fluxlora.families.flux1.shape import flux_shape, t5_encode_bytes
from fluxlora.models.flux import FluxParams
from fluxlora.training.cli import check_main
from fluxlora.training.plan import build_plan
from fluxlora.training.planner import Workload, estimate
from fluxlora.training.presets import (
    VRAM_PRESETS_GB,
    cached_workloads,
    pop_vram,
    preset_for_workload,
    usable_bytes,
)

CLIP_L, T5_FP16, T5_FP8, AE = int(0.123e9 * 2), int(4.762e9 * 2), int(4.762e9), int(83.8e6 * 2)


def _dev_1024(t5_bytes: int) -> tuple[Workload, list]:
    """FLUX.1 dev at 1024², rank 16, bf16 autocast, encoders on the device; and the same with everything cached."""
    te = CLIP_L + t5_bytes
    base = Workload(shape=flux_shape(FluxParams.dev()), image_tokens=4096, text_tokens=512, other_device_bytes=te + AE)
    cached = replace(base, other_device_bytes=0,
                     caching_device=(("text encoders", te), ("text encode batch", t5_encode_bytes(512, 2))))
    return base, [({"cache_latents": True, "cache_text_encoder_outputs": True}, cached)]


def _apply(base: Workload, cached: list, settings: dict) -> Workload:
    """Rebuild the workload a preset describes from its settings alone."""
    w = cached[0][1] if settings.get("cache_text_encoder_outputs") else base
    return replace(w, fp8=w.fp8 or bool(settings.get("fp8_base")),
                   gradient_checkpointing=w.gradient_checkpointing or bool(settings.get("gradient_checkpointing")),
                   checkpoint_blocks=settings.get("checkpoint_blocks", w.checkpoint_blocks),
                   blocks_to_swap=settings.get("blocks_to_swap", w.blocks_to_swap))


@pytest.mark.parametrize("t5_bytes", [T5_FP16, T5_FP8], ids=["t5-fp16", "t5-fp8"])
def test_every_preset_fits_and_adds_the_least(t5_bytes):
    base, cached = _dev_1024(t5_bytes)
    presets = {gb: preset_for_workload(base, gb, cached) for gb in VRAM_PRESETS_GB}
    swaps = []
    for gb, preset in presets.items():
        usable = usable_bytes(gb)
        assert usable < gb * 2**30  # room for the CUDA context and 5 % headroom
        if not preset.fits:
            continue
        w = _apply(base, cached, preset.settings)
        assert estimate(w).device_peak == preset.plan.device_peak <= usable
        n = preset.settings.get("blocks_to_swap")
        if n:
            assert estimate(replace(w, blocks_to_swap=n - 1)).device_peak > usable
        k = preset.settings.get("checkpoint_blocks")
        if k:
            assert estimate(replace(w, checkpoint_blocks=k - 1)).training_peak > usable
        swaps.append(n or 0)
        flags = preset.flags()
        assert all(f"--{name}" in flags for name in preset.settings)
        if n:
            assert flags[flags.index("--blocks_to_swap") + 1] == str(n)
    assert swaps == sorted(swaps, reverse=True)  # a larger GPU never swaps more
    assert presets[80].fits and presets[80].settings == {}  # 77.5 GB fits an 80 GB card as given
    assert presets[48].fits and "fp8_base" not in presets[48].settings and "blocks_to_swap" not in presets[48].settings
    assert presets[12].fits and presets[12].settings["fp8_base"] and presets[12].settings["blocks_to_swap"] > 0
    if t5_bytes == T5_FP16:
        # the caching phase alone holds the 9.5 GB T5: no training flag fixes that, and the advice says what does
        assert not presets[8].fits and "fp8 T5" in presets[8].advice
        assert presets[8].lines()[0].startswith("preset for a 8 GB GPU") and "does NOT fit" in presets[8].lines()[0]
    else:
        assert presets[8].fits and presets[8].settings["blocks_to_swap"] > presets[12].settings["blocks_to_swap"]


def test_caching_is_only_offered_where_the_dataset_allows_it(train_argv):
    cfg = parse_train_config(train_argv())
    offered = [set(changes) for changes, _ in cached_workloads(build_plan(cfg))]
    assert offered == [{"cache_latents", "cache_text_encoder_outputs"}, {"cache_text_encoder_outputs"},
                       {"cache_latents"}]
    cfg = parse_train_config(train_argv(toml_extra="shuffle_caption = true"))
    offered = [set(changes) for changes, _ in cached_workloads(build_plan(cfg))]
    assert offered == [{"cache_latents"}]  # shuffled captions cannot be cached as encoder outputs


def test_check_vram_prints_the_presets(train_argv, capsys):
    assert check_main(["--vram", "all", *train_argv()]) == 0
    out = capsys.readouterr().out
    for gb in VRAM_PRESETS_GB:
        assert f"preset for a {gb} GB GPU" in out
    assert "fits as given" in out  # the tiny model fits anything
    assert check_main([*train_argv(), "--vram=12,24"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("preset for")]
    assert [line.split(" GB GPU")[0] for line in lines] == ["preset for a 12", "preset for a 24"]


def test_vram_flag_errors_name_the_flag():
    assert pop_vram(["--a", "--vram", "16", "--b"]) == (["--a", "--b"], [16.0])
    for bad in (["--vram"], ["--vram", "lots"], ["--vram=-4"]):
        with pytest.raises(ConfigError, match="--vram") as err:
            pop_vram(bad)
        assert err.value.key == "--vram"
