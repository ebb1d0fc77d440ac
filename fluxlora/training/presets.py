"""Presets by GPU memory: the planner's answer to "what do I change so this run fits a GPU of N GB?".

`fluxlora check --vram N <flags>` prints it for a GPU the user may not have at hand, and the UI's presets (8, 12,
16, 24, 48 and 80 GB) are the same function. It only adds settings, cheapest first in speed, and stops at the first
that fits (the planner's estimate, `planner.estimate`):

1. the flags as given;
2. cached latents and text-encoder outputs (faster, and the encoders leave the device before training), where the
   dataset allows it (`check_caching_conflicts`: no caption shuffle/dropout, no random crop...);
3. gradient checkpointing of only as many blocks as needed (`smallest_checkpoint_blocks_that_fit`);
4. fp8 base weights, with as few checkpointed blocks as needed;
5. block swap (`smallest_swap_that_fits`) on top of fp8, with every block checkpointed.

Nothing fits: the planner's own advice (`fits_advice`) says what else to change.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from fluxlora.errors import ConfigError
from fluxlora.training.plan import RunPlan, residency_for, workload_for
from fluxlora.training.planner import (
    GB,
    MemoryPlan,
    Workload,
    estimate,
    fits_advice,
    smallest_checkpoint_blocks_that_fit,
    smallest_swap_that_fits,
)
from fluxlora.training.precision import precision_for

VRAM_PRESETS_GB: tuple[int, ...] = (8, 12, 16, 24, 48, 80)
GIB = 2**30
# A GPU sold as "24 GB" has 24 GiB; the CUDA context and the driver take about half a GiB before training starts,
# and --blocks_to_swap auto / --checkpoint_blocks auto plan for 95 % of what is then free: so do the presets.
CUDA_CONTEXT_BYTES = GIB // 2
HEADROOM = 0.95

CACHING_OPTIONS: tuple[dict[str, bool], ...] = (
    {"cache_latents": True, "cache_text_encoder_outputs": True},
    {"cache_text_encoder_outputs": True},
    {"cache_latents": True},
)


def usable_bytes(vram_gb: float) -> int:
    """Device bytes a run may plan for on a GPU of `vram_gb` (GiB, as GPUs are sold)."""
    return int(HEADROOM * (vram_gb * GIB - CUDA_CONTEXT_BYTES))


@dataclass(frozen=True)
class Preset:
    """What to add to the flags for a GPU of `vram_gb`, and the memory plan with it."""

    vram_gb: float
    usable: int
    settings: dict[str, Any] = field(default_factory=dict)  # flag name -> value to set (True for switches)
    plan: MemoryPlan | None = None
    fits: bool = False
    advice: str | None = None  # when nothing fits

    def flags(self) -> list[str]:
        """The settings as command-line flags, in the order they were added."""
        out: list[str] = []
        for name, value in self.settings.items():
            out += [f"--{name}"] if value is True else [f"--{name}", str(value)]
        return out

    def lines(self) -> list[str]:
        head = f"preset for a {self.vram_gb:g} GB GPU ({self.usable / GB:.1f} GB planned for): "
        if not self.fits:
            return [head + f"does NOT fit: {self.advice}"]
        added = " ".join(self.flags())
        lines = [head + (f"add {added}" if added else "fits as given")]
        if self.plan is not None:
            lines += [f"  {line}" for line in self.plan.lines()]
        return lines

    def as_dict(self) -> dict[str, Any]:
        return {"vram_gb": self.vram_gb, "usable_gb": self.usable / GB, "fits": self.fits, "advice": self.advice,
                "settings": dict(self.settings), "flags": self.flags(),
                "device_peak_gb": None if self.plan is None else self.plan.device_peak / GB,
                "host_peak_gb": None if self.plan is None else self.plan.host_peak / GB,
                "plan": [] if self.plan is None else self.plan.lines()}


def _fits(w: Workload, usable: int) -> bool:
    return estimate(w).device_peak <= usable


def _checkpointing(w: Workload, usable: int) -> tuple[dict[str, Any], Workload] | None:
    """Gradient checkpointing of the fewest blocks that fit, or None."""
    n = smallest_checkpoint_blocks_that_fit(w, usable)
    if n is None:
        return None
    total = w.shape.double_blocks + w.shape.single_blocks
    fitted = replace(w, gradient_checkpointing=True, checkpoint_blocks=None if n >= total else n)
    if not _fits(fitted, usable):  # the caching phase does not shrink with checkpointing
        return None
    settings: dict[str, Any] = {"gradient_checkpointing": True}
    if n < total:
        settings["checkpoint_blocks"] = n
    return settings, fitted


def choose(base: Workload, usable: int, cached: Sequence[tuple[dict[str, Any], Workload]] = ()
           ) -> tuple[dict[str, Any], Workload] | None:
    """The first rung of the ladder (module docstring) whose estimate fits `usable` bytes: (settings added, the
    workload with them), or None. `cached` are (caching flags, workload with them) the dataset allows."""
    if _fits(base, usable):
        return {}, base
    for changes, w in cached:
        if _fits(w, usable):
            return dict(changes), w
    start_changes, start = (dict(cached[0][0]), cached[0][1]) if cached else ({}, base)
    found = _checkpointing(start, usable)
    if found is not None:
        return {**start_changes, **found[0]}, found[1]
    mixed = start.compute_dtype is not None  # fp8 storage needs an autocast compute dtype
    if not start.fp8 and mixed:
        found = _checkpointing(replace(start, fp8=True), usable)
        if found is not None:
            return {**start_changes, "fp8_base": True, **found[0]}, found[1]
    # each rung keeps the ones before: swapping comes on top of fp8 (half the bytes to stream, so fewer blocks)
    changes: dict[str, Any] = {"gradient_checkpointing": True}
    w = replace(start, gradient_checkpointing=True, checkpoint_blocks=None)
    if not start.fp8 and mixed:
        changes, w = {"fp8_base": True, **changes}, replace(w, fp8=True)
    n = smallest_swap_that_fits(w, usable)
    if n is not None and n > w.blocks_to_swap and _fits(replace(w, blocks_to_swap=n), usable):
        return {**start_changes, **changes, "blocks_to_swap": n}, replace(w, blocks_to_swap=n)
    return None


def preset_for_workload(base: Workload, vram_gb: float,
                        cached: Sequence[tuple[dict[str, Any], Workload]] = ()) -> Preset:
    """The preset of a workload (pure arithmetic over the planner)."""
    usable = usable_bytes(vram_gb)
    found = choose(base, usable, cached)
    if found is None:
        worst = cached[0][1] if cached else base
        return Preset(vram_gb, usable, fits=False, advice=fits_advice(worst, usable), plan=estimate(worst))
    settings, w = found
    return Preset(vram_gb, usable, settings=settings, plan=estimate(w), fits=True)


def cached_workloads(plan: RunPlan) -> list[tuple[dict[str, Any], Workload]]:
    """(caching flags, workload) for each caching option the flags do not already have and the dataset allows."""
    from fluxlora.config.validate import check_caching_conflicts

    cfg = plan.cfg
    subsets = [s for d in plan.blueprint.datasets for s in d.subsets]
    found = []
    for option in CACHING_OPTIONS:
        missing = {k: v for k, v in option.items() if not getattr(cfg.caching, k)}
        if not missing:
            continue
        changed = replace(cfg, caching=replace(cfg.caching, **option))
        try:
            check_caching_conflicts(changed, subsets)
        except ConfigError:
            continue
        found.append((missing, workload_for(changed, plan.family, plan.model, plan.blueprint, plan.text_length,
                                            precision_for(changed), residency_for(changed, plan.family), plan.headers)))
    return found


def preset_for(plan: RunPlan, vram_gb: float) -> Preset:
    """The preset of a run plan (headers and dataset only, nothing loaded)."""
    if vram_gb <= CUDA_CONTEXT_BYTES / GIB:
        raise ConfigError(f"--vram {vram_gb:g}: a GPU needs more than {CUDA_CONTEXT_BYTES / GIB:g} GB; give its "
                          "memory in GB, e.g. --vram 24", key="--vram")
    return preset_for_workload(plan.workload, vram_gb, cached_workloads(plan))


def presets_for(plan: RunPlan, sizes: Sequence[float] = VRAM_PRESETS_GB) -> list[Preset]:
    return [preset_for(plan, gb) for gb in sizes]


def parse_vram(text: str) -> list[float]:
    """`--vram 24`, `--vram 12,24` or `--vram all` (the preset sizes)."""
    if text.strip().lower() == "all":
        return [float(g) for g in VRAM_PRESETS_GB]
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or any(v <= 0 for v in values):
        raise ConfigError(f"--vram {text}: give the GPU memory in GB (e.g. --vram 24, --vram 12,24 or --vram all)",
                          key="--vram")
    return values


def pop_vram(argv: list[str]) -> tuple[list[str], list[float] | None]:
    """Take `--vram GB` out of a `fluxlora check` command line (it is not a training flag)."""
    rest: list[str] = []
    found: list[float] | None = None
    i = 0
    while i < len(argv):
        token = argv[i]
        if token == "--vram":
            if i + 1 >= len(argv):
                raise ConfigError("--vram needs a value: the GPU memory in GB (e.g. --vram 24)", key="--vram")
            found, i = parse_vram(argv[i + 1]), i + 2
            continue
        if token.startswith("--vram="):
            found = parse_vram(token.split("=", 1)[1])
        else:
            rest.append(token)
        i += 1
    return rest, found


__all__ = ["CUDA_CONTEXT_BYTES", "Preset", "VRAM_PRESETS_GB", "choose", "parse_vram", "pop_vram", "preset_for",
           "preset_for_workload", "presets_for", "usable_bytes"]
