"""Optimizer factory: every sd-scripts optimizer name trains a small model, arguments parse, errors are clear."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from fluxlora.errors import ConfigError
from fluxlora.training import optim

# (sd-scripts name, learning rate, expected class module prefix, expected class name)
OPTIMIZER_CASES = [
    ("AdamW", 1e-3, "torch.optim", "AdamW"),
    ("AdamW8bit", 1e-3, "bitsandbytes", "AdamW8bit"),
    ("PagedAdamW", 1e-3, "bitsandbytes", "PagedAdamW"),
    ("PagedAdamW8bit", 1e-3, "bitsandbytes", "PagedAdamW8bit"),
    ("PagedAdamW32bit", 1e-3, "bitsandbytes", "PagedAdamW32bit"),
    ("AdEMAMix8bit", 1e-3, "bitsandbytes", "AdEMAMix8bit"),
    ("PagedAdEMAMix8bit", 1e-3, "bitsandbytes", "PagedAdEMAMix8bit"),
    ("Lion", 1e-4, "lion_pytorch", "Lion"),
    ("Lion8bit", 1e-4, "bitsandbytes", "Lion8bit"),
    ("PagedLion8bit", 1e-4, "bitsandbytes", "PagedLion8bit"),
    ("SGDNesterov", 1e-2, "torch.optim", "SGD"),
    ("SGDNesterov8bit", 1e-2, "bitsandbytes", "SGD8bit"),
    ("DAdaptation", 1.0, "dadaptation", "DAdaptAdamPreprint"),
    ("DAdaptAdamPreprint", 1.0, "dadaptation", "DAdaptAdamPreprint"),
    ("DAdaptAdaGrad", 1.0, "dadaptation", "DAdaptAdaGrad"),
    ("DAdaptAdam", 1.0, "dadaptation", "DAdaptAdam"),
    ("DAdaptAdan", 1.0, "dadaptation", "DAdaptAdan"),
    ("DAdaptAdanIP", 1.0, "dadaptation", "DAdaptAdanIP"),
    ("DAdaptLion", 1.0, "dadaptation", "DAdaptLion"),
    ("DAdaptSGD", 1.0, "dadaptation", "DAdaptSGD"),
    ("Prodigy", 1.0, "prodigyopt", "Prodigy"),
    ("Adafactor", 1e-3, "transformers", "Adafactor"),
    ("RAdamScheduleFree", 1e-3, "schedulefree", "RAdamScheduleFree"),
    ("AdamWScheduleFree", 1e-3, "schedulefree", "AdamWScheduleFree"),
    ("SGDScheduleFree", 1e-2, "schedulefree", "SGDScheduleFree"),
    ("pytorch_optimizer.CAME", 1e-3, "pytorch_optimizer", "CAME"),
    ("RMSprop", 1e-3, "torch.optim", "RMSprop"),
    ("adamw8BIT", 1e-3, "bitsandbytes", "AdamW8bit"),  # names are case-insensitive
]


def _model() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(64, 64)  # weight has 4096 elements: bitsandbytes keeps 8-bit state from 4096 up


def _train(optimizer: torch.optim.Optimizer, model: nn.Module, steps: int = 5) -> list[float]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 64, generator=g)
    y = torch.randn(16, 64, generator=g)
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize(
    ("name", "lr", "module", "cls_name"), OPTIMIZER_CASES, ids=[c[0] for c in OPTIMIZER_CASES]
)
def test_each_optimizer_trains_and_changes_params(name, lr, module, cls_name):
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    opt, description = optim.build_optimizer(
        name, [{"params": list(model.parameters())}], learning_rate=lr, optimizer_args={}
    )
    assert type(opt).__name__ == cls_name and type(opt).__module__.startswith(module)
    assert description.startswith(f"{type(opt).__module__}.{cls_name}")
    losses = _train(opt, model)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert all(not torch.equal(b, p.detach()) for b, p in zip(before, model.parameters(), strict=True))
    if "8bit" in cls_name:
        state = opt.state[model.weight]
        assert state["state1"].dtype == torch.uint8  # the 8-bit path really ran


def test_sgd_nesterov_defaults_momentum_and_nesterov():
    opt, _ = optim.build_optimizer(
        "sgdnesterov", [{"params": list(_model().parameters())}], learning_rate=0.1
    )
    assert opt.param_groups[0]["nesterov"] is True and opt.param_groups[0]["momentum"] == 0.9
    opt, _ = optim.build_optimizer(
        "SGDNesterov",
        [{"params": list(_model().parameters())}],
        learning_rate=0.1,
        optimizer_args={"momentum": 0.5},
    )
    assert opt.param_groups[0]["momentum"] == 0.5


def test_optimizer_args_reach_the_optimizer_and_the_description():
    opt, description = optim.build_optimizer(
        "AdamW",
        [{"params": list(_model().parameters())}],
        learning_rate=2e-4,
        optimizer_args=optim.parse_optimizer_args(["weight_decay=0.05", "betas=0.8,0.95"]),
    )
    group = opt.param_groups[0]
    assert group["lr"] == 2e-4 and group["weight_decay"] == 0.05 and group["betas"] == (0.8, 0.95)
    assert description == "torch.optim.adamw.AdamW(weight_decay=0.05,betas=(0.8, 0.95))"


def test_param_group_learning_rates_are_kept_and_inputs_not_mutated():
    a, b = _model(), _model()
    groups = [{"params": list(a.parameters()), "lr": 1e-4}, {"params": list(b.parameters())}]
    opt, _ = optim.build_optimizer("AdamW", groups, learning_rate=1e-3)
    assert [g["lr"] for g in opt.param_groups] == [1e-4, 1e-3]
    assert groups[0]["lr"] == 1e-4 and "lr" not in groups[1]


def test_adafactor_relative_step_default_requires_its_scheduler(caplog):
    groups = [{"params": list(_model().parameters()), "lr": 1e-3}]
    with caplog.at_level(logging.WARNING, logger="fluxlora.training.optim"):
        opt, description = optim.build_optimizer("adafactor", groups, learning_rate=1e-3)
    assert opt.defaults["relative_step"] is True and opt.param_groups[0]["lr"] is None
    assert "relative_step=True" in description
    assert optim.required_scheduler(opt) == "adafactor"
    assert groups[0]["lr"] == 1e-3  # caller's groups untouched
    assert "ignores the per-group learning rates" in caplog.text
    fixed, _ = optim.build_optimizer(
        "Adafactor",
        [{"params": list(_model().parameters())}],
        learning_rate=1e-3,
        optimizer_args={"relative_step": False, "scale_parameter": False, "warmup_init": False},
    )
    assert optim.required_scheduler(fixed) is None and fixed.param_groups[0]["lr"] == 1e-3
    forced, _ = optim.build_optimizer(
        "Adafactor",
        [{"params": list(_model().parameters())}],
        learning_rate=1e-3,
        optimizer_args={"relative_step": False, "warmup_init": True},
    )
    assert forced.defaults["relative_step"] is True  # warmup_init needs relative steps (as sd-scripts)


def test_dadaptation_and_prodigy_warn_on_small_lr(caplog):
    with caplog.at_level(logging.WARNING, logger="fluxlora.training.optim"):
        optim.build_optimizer("Prodigy", [{"params": list(_model().parameters())}], learning_rate=1e-4)
    assert "expect about 1.0" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fluxlora.training.optim"):
        optim.build_optimizer("DAdaptAdam", [{"params": list(_model().parameters())}], learning_rate=1.0)
    assert "expect about 1.0" not in caplog.text


def test_unknown_and_missing_optimizers_give_clear_errors():
    params = [{"params": list(_model().parameters())}]
    with pytest.raises(ConfigError, match="AdamW8bit.*Prodigy") as info:
        optim.build_optimizer("AdamX", params, learning_rate=1e-3)
    assert info.value.key == "--optimizer_type"
    with pytest.raises(ConfigError, match="pip install no-such-optim"):
        optim.build_optimizer("no_such_optim.Fast", params, learning_rate=1e-3)
    with pytest.raises(ConfigError, match="has no class NoSuch"):
        optim.build_optimizer("torch.optim.NoSuch", params, learning_rate=1e-3)
    with pytest.raises(ConfigError, match="--optimizer_args") as info:
        optim.build_optimizer("AdamW", params, learning_rate=1e-3, optimizer_args={"wieght_decay": 0.1})
    assert info.value.key == "--optimizer_args"


def test_parse_optimizer_args_literals_and_strings():
    parsed = optim.parse_optimizer_args(
        [
            "weight_decay=0.01",
            "betas=(0.9, 0.99)",
            "eps=1e-8",
            "decouple=True",
            "d_coef=2",
            "mode=cosine",
            "rules= a=b ",
            "none=None",
        ]
    )
    assert parsed == {
        "weight_decay": 0.01,
        "betas": (0.9, 0.99),
        "eps": 1e-8,
        "decouple": True,
        "d_coef": 2,
        "mode": "cosine",
        "rules": "a=b",
        "none": None,
    }
    assert optim.parse_optimizer_args(None) == {}
    for bad in (["weight_decay"], ["=0.1"], ["two words=1"]):
        with pytest.raises(ConfigError, match="--optimizer_args.*key=value"):
            optim.parse_optimizer_args(bad)
    with pytest.raises(ConfigError, match="twice"):
        optim.parse_optimizer_args(["eps=1", "eps=2"])


def test_resolve_optimizer_name_legacy_flags():
    assert optim.resolve_optimizer_name("", False, False) == "AdamW"
    assert optim.resolve_optimizer_name(None, True, False) == "AdamW8bit"
    assert optim.resolve_optimizer_name("", False, True) == "Lion"
    assert optim.resolve_optimizer_name("Prodigy", False, False) == "Prodigy"
    with pytest.raises(ConfigError, match="--use_8bit_adam and --use_lion_optimizer"):
        optim.resolve_optimizer_name("", True, True)
    with pytest.raises(
        ConfigError, match="--use_lion_optimizer cannot be combined with --optimizer_type AdamW"
    ):
        optim.resolve_optimizer_name("AdamW", False, True)


def test_schedule_free_eval_mode_swaps_parameters_and_restores_them():
    model = _model()
    opt, _ = optim.build_optimizer(
        "AdamWScheduleFree", [{"params": list(model.parameters())}], learning_rate=1e-2
    )
    assert optim.is_schedule_free(opt) and opt.param_groups[0]["train_mode"] is True
    _train(opt, model)
    train_weights = model.weight.detach().clone()
    with optim.eval_mode(opt):
        assert opt.param_groups[0]["train_mode"] is False
        assert not torch.allclose(model.weight, train_weights)  # evaluation uses the averaged iterate x
    assert opt.param_groups[0]["train_mode"] is True
    assert torch.allclose(model.weight, train_weights, atol=1e-6)
    optim.optimizer_eval_mode(opt)  # already in eval: the context keeps eval afterwards
    with optim.eval_mode(opt):
        pass
    assert opt.param_groups[0]["train_mode"] is False


def test_eval_mode_is_a_no_op_for_ordinary_optimizers():
    model = _model()
    opt, _ = optim.build_optimizer("AdamW", [{"params": list(model.parameters())}], learning_rate=1e-2)
    assert not optim.is_schedule_free(opt)
    weights = model.weight.detach().clone()
    with optim.eval_mode(opt):
        assert torch.equal(model.weight, weights)
    optim.optimizer_train_mode(opt)
    assert torch.equal(model.weight, weights)
