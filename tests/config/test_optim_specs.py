"""`--optimizer_args`, `--lr_scheduler_args` and `--network_args` as typed specs, parsed once with the other flags."""

from __future__ import annotations

import pytest

from fluxlora.config.optim_specs import OptimizerSpec, SchedulerSpec, parse_kv_args
from fluxlora.config.train_config import parse_train_config
from fluxlora.errors import ConfigError


def test_parse_train_config_fills_the_specs(base):
    cfg = parse_train_config([*base, "--use_8bit_adam", "--learning_rate", "3e-4", "--optimizer_args",
                              "weight_decay=0.05", "betas=0.8,0.95", "--lr_scheduler", "cosine_with_min_lr",
                              "--lr_warmup_steps", "10%", "--lr_scheduler_min_lr_ratio", "0.1",
                              "--lr_scheduler_args", "num_cycles=0.5", "--network_args", "train_blocks=single",
                              "split_qkv=True", "--network_dropout", "0.1"])
    assert cfg.optim.optimizer_spec == OptimizerSpec("AdamW8bit", 3e-4, {"weight_decay": 0.05, "betas": (0.8, 0.95)})
    assert cfg.optim.scheduler_spec == SchedulerSpec(
        lr_scheduler="cosine_with_min_lr", lr_warmup_steps=0.1, lr_scheduler_min_lr_ratio=0.1,
        args={"num_cycles": 0.5}, initial_lr=3e-4)
    spec = cfg.network.network_spec
    assert spec.train_blocks == "single" and spec.split_qkv and spec.dropout == 0.1
    assert cfg.network.network_args == ("train_blocks=single", "split_qkv=True")  # the strings stay as given
    assert "optimizer_spec" not in cfg.flat() and "network_spec" not in cfg.flat()  # flat() holds flags only


def test_a_malformed_item_is_reported_with_the_other_problems(base):
    with pytest.raises(ConfigError) as err:
        parse_train_config([*base, "--optimizer_args", "weight_decay", "--network_args", "trian_blocks=all",
                            "--learning_rate", "0"])
    message = str(err.value)
    assert "3 problems" in message and "--optimizer_args" in message and "weight_decay" in message
    assert "trian_blocks" in message and "did you mean 'train_blocks'" in message and "--learning_rate" in message


@pytest.mark.parametrize(("items", "expected"), [
    (["a=1", "b=0.5", "c=True", "d=cosine", "e=(1, 2)", "f=[3]"],
     {"a": 1, "b": 0.5, "c": True, "d": "cosine", "e": (1, 2), "f": [3]}),
    (None, {}),
])
def test_kv_values_are_python_literals_else_strings(items, expected):
    assert parse_kv_args(items, "--lr_scheduler_args") == expected


@pytest.mark.parametrize("items", [["novalue"], ["=1"], ["a b=1"], ["x=1", "x=2"]])
def test_bad_kv_items_name_the_flag(items):
    with pytest.raises(ConfigError, match="--lr_scheduler_args"):
        parse_kv_args(items, "--lr_scheduler_args")
