"""LR schedulers: each curve equals its formula (written here from the definitions, not from the library),
schedulers resume exactly, and bad combinations raise clear errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fluxlora.errors import ConfigError
from fluxlora.training import optim
from fluxlora.training.schedulers import build_scheduler, resolve_steps

BASE_LR = 0.1
T = 40  # training steps
W = 8  # warmup steps


def _opt(name: str = "AdamW", **args) -> torch.optim.Optimizer:
    model = nn.Linear(2, 2)
    opt, _ = optim.build_optimizer(
        name, [{"params": list(model.parameters())}], learning_rate=BASE_LR, optimizer_args=args
    )
    return opt


def _curve(sched, opt, steps: int) -> list[float]:
    lrs = []
    for _ in range(steps):
        lrs.append(sched.get_last_lr()[0])
        assert opt.param_groups[0]["lr"] == pytest.approx(lrs[-1])
        opt.step()  # no gradients: parameters stay, but the step order is the real one
        sched.step()
    return lrs


def _warm(s: int) -> float | None:
    return s / W if s < W else None


def linear(s):
    return _warm(s) if s < W else max(0.0, (T - s) / (T - W))


def cosine(s):
    return _warm(s) if s < W else 0.5 * (1 + math.cos(math.pi * (s - W) / (T - W)))


def cosine_restarts_3(s):
    if s < W:
        return _warm(s)
    p = (s - W) / (T - W)
    return 0.0 if p >= 1 else 0.5 * (1 + math.cos(math.pi * ((3 * p) % 1.0)))


def polynomial_2(s):
    lr_end = 1e-7  # transformers' default end LR, used by sd-scripts
    if s < W:
        return _warm(s)
    if s > T:
        return lr_end / BASE_LR  # stays at the end LR
    return ((BASE_LR - lr_end) * (1 - (s - W) / (T - W)) ** 2 + lr_end) / BASE_LR


def constant_with_warmup(s):
    return _warm(s) if s < W else 1.0


def inverse_sqrt_16(s):
    tau = 16
    return _warm(s) if s < W else 1 / math.sqrt((s + tau - W) / tau)


def cosine_min_lr(s, r=0.2, cycles=1):
    if s < W:
        return _warm(s)
    p = (s - W) / (T - W)
    # sd-scripts passes num_cycles/2: one "cycle" is a half cosine from 1 down to the floor
    return (0.5 * (1 + math.cos(math.pi * cycles * p))) * (1 - r) + r


def wsd(s, decay=10, r=0.1):
    stable = T - W - decay
    if s < W:
        return (s / W) * (1 - r) + r
    if s < W + stable:
        return 1.0
    if s < T:
        q = (s - W - stable) / decay
        return 0.5 * (1 + math.cos(math.pi * q)) * (1 - r) + r
    return r


def piecewise(s):
    return 1.0 if s < 10 else 0.1 if s < 20 else 0.01


CASES = [
    ("linear", {"num_warmup_steps": W}, linear),
    ("cosine", {"num_warmup_steps": W}, cosine),
    ("cosine_with_restarts", {"num_warmup_steps": W, "num_cycles": 3}, cosine_restarts_3),
    ("polynomial", {"num_warmup_steps": W, "power": 2.0}, polynomial_2),
    ("constant", {}, lambda s: 1.0),
    ("constant_with_warmup", {"num_warmup_steps": W}, constant_with_warmup),
    ("inverse_sqrt", {"num_warmup_steps": W, "timescale": 16}, inverse_sqrt_16),
    ("cosine_with_min_lr", {"num_warmup_steps": W, "min_lr_ratio": 0.2}, cosine_min_lr),
    ("warmup_stable_decay", {"num_warmup_steps": W, "num_decay_steps": 10, "min_lr_ratio": 0.1}, wsd),
    ("piecewise_constant", {"scheduler_args": {"step_rules": "1:10,0.1:20,0.01"}}, piecewise),
]


@pytest.mark.parametrize(("name", "kwargs", "formula"), CASES, ids=[c[0] for c in CASES])
def test_scheduler_curve_equals_formula(name, kwargs, formula):
    opt = _opt()
    sched = build_scheduler(name, opt, num_training_steps=T, **kwargs)
    lrs = _curve(sched, opt, T + 3)
    expected = [BASE_LR * formula(s) for s in range(T + 3)]
    assert lrs == pytest.approx(expected, abs=1e-12, rel=1e-9)


def test_fractional_and_percent_warmup():
    assert resolve_steps(0.25, 40, "--lr_warmup_steps") == 10
    assert resolve_steps("10%", 40, "--lr_warmup_steps") == 4
    assert resolve_steps("100%", 40, "--lr_warmup_steps") == 40
    assert resolve_steps(7, 40, "--lr_warmup_steps") == 7
    assert resolve_steps(None, 40, "--lr_warmup_steps") == 0
    for bad in (-1, 2.5, "x", "150%", float("nan")):
        with pytest.raises(ConfigError, match="--lr_warmup_steps"):
            resolve_steps(bad, 40, "--lr_warmup_steps")
    opt = _opt()
    sched = build_scheduler("constant_with_warmup", opt, num_training_steps=T, num_warmup_steps=W / T)
    assert _curve(sched, opt, W + 1) == pytest.approx(
        [BASE_LR * constant_with_warmup(s) for s in range(W + 1)]
    )


def test_custom_scheduler_type_bare_name_and_class_path():
    opt = _opt()
    sched = build_scheduler(
        "constant",
        opt,
        num_training_steps=T,
        scheduler_type="StepLR",
        scheduler_args={"step_size": 3, "gamma": 0.5},
    )
    assert _curve(sched, opt, 9) == pytest.approx([BASE_LR * 0.5 ** (s // 3) for s in range(9)])
    opt = _opt()
    sched = build_scheduler(
        "constant",
        opt,
        num_training_steps=T,
        scheduler_type="torch.optim.lr_scheduler.ExponentialLR",
        scheduler_args={"gamma": 0.9},
    )
    assert _curve(sched, opt, 5) == pytest.approx([BASE_LR * 0.9**s for s in range(5)])


def test_adafactor_schedule_reports_adafactor_step_size():
    opt = _opt("Adafactor", scale_parameter=False)
    sched = build_scheduler(
        "constant", opt, num_training_steps=T, initial_lr=1e-3
    )  # forced: relative_step=True
    assert sched.get_last_lr() == [1e-3]  # before the first step: the initial LR
    model_params = opt.param_groups[0]["params"]
    for _ in range(3):
        for p in model_params:
            p.grad = torch.ones_like(p)
        opt.step()
        sched.step()
        # Adafactor's relative step without warmup_init: min(1e-2, 1/√step); scale_parameter off
        assert sched.get_last_lr()[0] == pytest.approx(1e-2)
    with pytest.raises(ConfigError, match="relative_step=False"):
        build_scheduler("cosine", _opt("Adafactor"), num_training_steps=T)
    with pytest.raises(ConfigError, match="needs --optimizer_type Adafactor"):
        build_scheduler("adafactor", _opt(), num_training_steps=T)


@pytest.mark.parametrize("name", ["cosine_with_restarts", "warmup_stable_decay", "polynomial"])
def test_scheduler_resumes_exactly(name):
    kwargs = {"num_warmup_steps": 5, "num_decay_steps": 10, "num_cycles": 2}
    opt = _opt()
    sched = build_scheduler(name, opt, num_training_steps=T, **kwargs)
    full = _curve(sched, opt, T)

    opt1 = _opt()
    sched1 = build_scheduler(name, opt1, num_training_steps=T, **kwargs)
    first = _curve(sched1, opt1, 17)
    opt_state, sched_state = opt1.state_dict(), sched1.state_dict()

    opt2 = _opt()
    sched2 = build_scheduler(name, opt2, num_training_steps=T, **kwargs)
    opt2.load_state_dict(opt_state)
    sched2.load_state_dict(sched_state)
    rest = _curve(sched2, opt2, T - 17)
    assert first + rest == full


def test_warmup_for_schedulers_without_warmup_is_an_error():
    for name, extra in [
        ("constant", {}),
        ("piecewise_constant", {"scheduler_args": {"step_rules": "1:3,0.5"}}),
    ]:
        with pytest.raises(ConfigError, match="takes no warmup") as info:
            build_scheduler(name, _opt(), num_training_steps=T, num_warmup_steps=5, **extra)
        assert info.value.key == "--lr_warmup_steps"
    with pytest.raises(ConfigError, match="takes no warmup"):
        build_scheduler(
            "constant",
            _opt(),
            num_training_steps=T,
            num_warmup_steps=5,
            scheduler_type="StepLR",
            scheduler_args={"step_size": 2},
        )


def test_bad_scheduler_settings_give_clear_errors():
    with pytest.raises(ConfigError, match="--lr_scheduler 'cosine_forever' is unknown.*warmup_stable_decay"):
        build_scheduler("cosine_forever", _opt(), num_training_steps=T)
    with pytest.raises(ConfigError, match="--lr_scheduler_min_lr_ratio"):
        build_scheduler("cosine_with_min_lr", _opt(), num_training_steps=T)
    with pytest.raises(ConfigError, match="step_rules"):
        build_scheduler("piecewise_constant", _opt(), num_training_steps=T)
    with pytest.raises(ConfigError, match="exceed"):
        build_scheduler(
            "warmup_stable_decay", _opt(), num_training_steps=T, num_warmup_steps=30, num_decay_steps=20
        )
    with pytest.raises(ConfigError, match="--lr_scheduler_args"):
        build_scheduler("cosine", _opt(), num_training_steps=T, scheduler_args={"bogus": 1})
    with pytest.raises(ConfigError, match="--lr_scheduler_type"):
        build_scheduler("constant", _opt(), num_training_steps=T, scheduler_type="NoSuchLR")


def test_schedule_free_optimizers_take_only_constant():
    opt = _opt("AdamWScheduleFree")
    sched = build_scheduler("constant", opt, num_training_steps=T)
    assert _curve(sched, opt, 3) == [BASE_LR] * 3
    with pytest.raises(ConfigError, match="schedule-free.*warmup_steps"):
        build_scheduler("cosine", _opt("AdamWScheduleFree"), num_training_steps=T)


def test_check_scheduler_builds_over_a_dummy_parameter():
    from fluxlora.config.optim_specs import OptimizerSpec, SchedulerSpec
    from fluxlora.training.schedulers import check_scheduler

    adamw = OptimizerSpec("AdamW", 1e-3)
    check_scheduler(SchedulerSpec("cosine", lr_warmup_steps=0.5), adamw, num_training_steps=10)  # fine
    with pytest.raises(ConfigError, match="--lr_warmup_steps 11 exceeds the 10"):
        check_scheduler(SchedulerSpec("cosine", lr_warmup_steps=11), adamw, num_training_steps=10)
    with pytest.raises(ConfigError, match="schedule-free"):  # the optimizer decides what a schedule may be
        check_scheduler(SchedulerSpec("cosine"), OptimizerSpec("AdamWScheduleFree", 1e-3), num_training_steps=10)
    with pytest.raises(ConfigError, match="adafactor takes no warmup"):  # relative_step: the adafactor schedule
        check_scheduler(SchedulerSpec("cosine", lr_warmup_steps=2), OptimizerSpec("Adafactor", 1e-3),
                        num_training_steps=10)
