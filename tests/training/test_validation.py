"""Validation loss (spec §9, issue 6): the same number whenever it is computed at the same weights, whatever the
optimizer, and computing it never changes the training.

Block swap is not tested here: the shared tiny FLUX has 2 double + 2 single blocks, of which 0 can be swapped
(`--blocks_to_swap 1` is refused by the memory checks).
"""

from __future__ import annotations

import pytest

from fluxlora.training.cli import train

SPLIT = "validation_split = 0.5\nvalidation_seed = 3"


def _twice_per_step(result) -> list[float]:
    """With one training batch per epoch every step is also an epoch end: step and epoch validation both run."""
    steps = [s for s, _ in result.validation]
    assert steps == [s for s in range(1, len(steps) // 2 + 1) for _ in (0, 1)], steps
    values = [v for _, v in result.validation]
    assert values[0::2] == values[1::2]  # identical when computed twice at the same step
    return values[0::2]


@pytest.mark.parametrize(("optimizer", "family"), [("AdamW", "flux1"), ("AdamWScheduleFree", "flux1"),
                                                   ("AdamW", "chroma"), ("AdamW", "kontext"), ("AdamW", "fill")])
def test_validation_is_repeatable_and_does_not_touch_training(train_argv, tmp_path, optimizer, family):
    flags = ("--max_train_steps=3", f"--optimizer_type={optimizer}")
    without = train(train_argv(*flags, "--validate_every_n_epochs=1000", toml_extra=SPLIT, output_dir=tmp_path / "a",
                               family=family))
    assert without.validation == []
    with_val = train(train_argv(*flags, "--validate_every_n_steps=1", toml_extra=SPLIT, output_dir=tmp_path / "b",
                                family=family))
    assert with_val.losses == without.losses  # validation leaves the trajectory (and schedule-free's x/y) alone
    values = _twice_per_step(with_val)
    assert len(values) == 3 and all(v > 0 for v in values)
    assert values[0] != values[-1]  # it measures the LoRA as it trains

