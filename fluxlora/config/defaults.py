"""Our defaults versus sd-scripts' defaults, and the start-up block that lists where they differ.

Where sd-scripts' parser default is a documented mistake (spec §12.1, §12.3) fluxlora uses the value the
sd-scripts guide itself recommends; `--sd_scripts_defaults` restores sd-scripts' defaults exactly.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any, NamedTuple


class DefaultChange(NamedTuple):
    """A flag whose fluxlora default differs from sd-scripts', and why."""

    value: Any
    reason: str


FLUXLORA_DEFAULTS: dict[str, DefaultChange] = {
    "model_prediction_type": DefaultChange(
        "raw",
        "the only proper rectified-flow velocity loss; sigma_scaled compares an x0 estimate with the ε−x0 target "
        "(spec §12.1); the sd-scripts guide recommends raw",
    ),
    "guidance_scale": DefaultChange(
        1.0, "the sd-scripts guide says to train FLUX.1 dev with guidance 1.0 (3.5 is the inference value)"
    ),
    "timestep_sampling": DefaultChange(
        "flux_shift", "resolution-dependent shift as in FLUX.1 dev inference; the sd-scripts guide recommends it"
    ),
    "huber_schedule": DefaultChange(
        "constant", "sd-scripts' snr schedule raises with the flow-matching scheduler (spec §12.3)"
    ),
}


def effective_defaults(sd_defaults: Mapping[str, Any], *, sd_scripts_defaults: bool) -> dict[str, Any]:
    """Defaults to fill for flags that were not given: sd-scripts' own, or with fluxlora's changes applied."""
    defaults = dict(sd_defaults)
    if not sd_scripts_defaults:
        defaults.update({dest: change.value for dest, change in FLUXLORA_DEFAULTS.items()})
    return defaults


def differing_defaults(
    explicit: Collection[str], *, sd_scripts_defaults: bool, sd_defaults: Mapping[str, Any]
) -> list[tuple[str, Any, Any, str]]:
    """(flag, our value, sd-scripts' value, reason) for every default we filled that sd-scripts would not."""
    if sd_scripts_defaults:
        return []
    return [
        (dest, change.value, sd_defaults.get(dest), change.reason)
        for dest, change in FLUXLORA_DEFAULTS.items()
        if dest not in explicit and change.value != sd_defaults.get(dest)
    ]


def format_differences(rows: list[tuple[str, Any, Any, str]]) -> str:
    """The start-up block: one line per setting, `name: ours (sd-scripts: theirs) — why`; '' when none differ."""
    if not rows:
        return ""
    lines = ["fluxlora settings that differ from sd-scripts' defaults (--sd_scripts_defaults restores them):"]
    lines += [f"  {dest}: {ours} (sd-scripts: {theirs}) — {reason}" for dest, ours, theirs, reason in rows]
    return "\n".join(lines)
