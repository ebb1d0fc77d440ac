"""Optimizer parameter groups (spec §5.4): component LRs, regex LR groups, LoRA+, dropped zero-LR groups."""

from __future__ import annotations

import pytest
import torch
from network_helpers import small_flux, tiny_clip, tiny_t5

from fluxlora.errors import ConfigError
from fluxlora.network.groups import text_encoder_lrs
from fluxlora.network.lora import create_network


def group_map(groups) -> dict[str, tuple[float, set[int]]]:
    return {name: (g["lr"], {id(p) for p in g["params"]}) for name, g in zip(groups.names, groups.groups, strict=False)}


def params_of(network, component: str, *, up: bool | None = None) -> set[int]:
    out = set()
    for m in network.loras:
        if m.component != component:
            continue
        for name, p in m.named_parameters():
            if up is None or name.startswith("lora_up") == up:
                out.add(id(p))
    return out


@pytest.fixture(scope="module")
def models():
    return small_flux(), tiny_clip(), tiny_t5()


def test_text_encoder_lr_forms() -> None:
    assert text_encoder_lrs(None, 1e-4) == (1e-4, 1e-4)
    assert text_encoder_lrs([], 1e-4) == (1e-4, 1e-4)
    assert text_encoder_lrs([5e-5], 1e-4) == (5e-5, 5e-5)
    assert text_encoder_lrs(5e-5, 1e-4) == (5e-5, 5e-5)
    assert text_encoder_lrs([5e-5, 1e-5], 1e-4) == (5e-5, 1e-5)
    with pytest.raises(ConfigError, match="--text_encoder_lr"):
        text_encoder_lrs([1, 2, 3], 1e-4)


def test_component_groups_with_two_text_encoder_lrs(models) -> None:
    flux, clip, t5 = models
    network = create_network(1, 4, 1, flux, [clip, t5], network_args=["train_t5xxl=True"])
    groups = network.prepare_optimizer_params([5e-5, 1e-5], 2e-4, 1e-4)
    got = group_map(groups)
    assert groups.names == ["textencoder clip_l", "textencoder t5xxl", "unet"]
    assert got["textencoder clip_l"] == (5e-5, params_of(network, "clip_l"))
    assert got["textencoder t5xxl"] == (1e-5, params_of(network, "t5xxl"))
    assert got["unet"] == (2e-4, params_of(network, "unet"))
    # unet_lr None → learning_rate; every parameter in exactly one group
    groups = network.prepare_optimizer_params(None, None, 3e-4)
    assert [g["lr"] for g in groups.groups] == [3e-4, 3e-4, 3e-4]
    ids = [id(p) for g in groups.groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(network.parameters()))
    torch.optim.AdamW(groups.groups)  # a real optimizer accepts them


def test_loraplus_puts_up_weights_in_plus_groups(models) -> None:
    flux, clip, _ = models
    network = create_network(1, 4, 1, flux, [clip, None],
                             network_args=["loraplus_lr_ratio=16", "loraplus_unet_lr_ratio=4"])
    got = group_map(network.prepare_optimizer_params(None, 1e-4, 1e-3))
    assert set(got) == {"textencoder clip_l", "textencoder clip_l plus", "unet", "unet plus"}
    assert got["unet plus"] == (pytest.approx(4e-4), params_of(network, "unet", up=True))
    assert got["unet"] == (1e-4, params_of(network, "unet", up=False))
    assert got["textencoder clip_l plus"] == (pytest.approx(1.6e-2), params_of(network, "clip_l", up=True))


def test_regex_lr_groups_come_first_and_last_match_wins(models) -> None:
    flux = models[0]
    network = create_network(1, 4, 1, flux, [], train_text_encoder=False,
                             network_args=["network_reg_lrs=double_blocks=1e-5,double_blocks_1=2e-5,single_blocks_0=0",
                                           "loraplus_lr_ratio=2"])
    groups = network.prepare_optimizer_params(None, 1e-4, 1e-4)
    assert groups.names == ["unet reg_lr 0 (double_blocks)", "unet reg_lr 0 (double_blocks) plus",
                            "unet reg_lr 1 (double_blocks_1)", "unet reg_lr 1 (double_blocks_1) plus", "unet", "unet plus"]
    got = group_map(groups)
    block1 = {id(p) for m in network.loras if "double_blocks_1_" in m.lora_name for n, p in m.named_parameters()
              if n.startswith("lora_down")}
    assert got["unet reg_lr 1 (double_blocks_1)"] == (2e-5, block1)
    assert got["unet reg_lr 0 (double_blocks) plus"][0] == pytest.approx(2e-5)
    # LR 0 drops the group and freezes it; single_blocks_1 stays in the default group
    single0 = [p for m in network.loras if "single_blocks_0_" in m.lora_name for p in m.parameters()]
    assert all(not p.requires_grad for p in single0)
    default = {id(p) for m in network.loras if "single_blocks_1_" in m.lora_name for n, p in m.named_parameters()
               if n.startswith("lora_down")}
    assert got["unet"] == (1e-4, default)


def test_zero_text_encoder_lr_drops_the_group(models) -> None:
    flux, clip, _ = models
    network = create_network(1, 4, 1, flux, [clip, None])
    groups = network.prepare_optimizer_params([0.0], 1e-4, 1e-4)
    assert groups.names == ["unet"]
