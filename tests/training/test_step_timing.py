"""The trainer's per-step wall times and step-end callbacks (the extension point benchmarks and progress hooks use)."""

from __future__ import annotations

import time

from fluxlora.training.cli import train


def test_step_seconds_has_one_positive_entry_per_optimizer_step(train_argv):
    result = train(train_argv("--max_train_steps=3", "--gradient_accumulation_steps=2", "--cache_latents"))
    assert result.global_step == 3
    assert len(result.step_seconds) == 3
    assert all(s > 0 for s in result.step_seconds)


def test_callbacks_see_every_global_step_in_order_and_their_time_is_excluded(train_argv):
    seen: list[int] = []
    spans: list[tuple[float, float]] = []  # (entry, exit) of the callbacks of each step, on the trainer's clock

    def record(run, step):
        seen.append(step)
        assert step == run.counters.global_step
        spans.append((time.perf_counter(), 0.0))

    def slow(run, step):
        time.sleep(0.05)  # work a step must not be charged for
        spans[-1] = (spans[-1][0], time.perf_counter())

    started = time.perf_counter()
    result = train(train_argv("--max_train_steps=4"), callbacks=[record, slow])
    assert seen == [1, 2, 3, 4]
    assert len(result.step_seconds) == 4
    # Step k runs between the previous step's callbacks returning and its own callbacks starting; no tolerance is
    # needed because both sides are read from the same monotonic clock.
    assert result.step_seconds[0] <= spans[0][0] - started
    for k in range(1, 4):
        assert 0 < result.step_seconds[k] <= spans[k][0] - spans[k - 1][1]
