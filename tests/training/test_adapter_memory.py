"""Training policy with every adapter algorithm: gradient checkpointing (with rank/module dropout, whose draws the
recompute replays), block swap and fp8 base weights give the outputs and adapter gradients of the plain run."""

from __future__ import annotations

import pytest
import torch

from fluxlora import flow
from fluxlora.errors import ConfigError
from fluxlora.families.flux1.family import FLUX1
from fluxlora.models.flux import FluxParams, axes_dim_for
from fluxlora.models.fp8 import store_linears_in_fp8
from fluxlora.models.tiny import random_flux
from fluxlora.network.adapter import base_weight
from fluxlora.network.lora import create_network
from fluxlora.training.blocks import apply_block_policy
from fluxlora.training.memory import BlockSwapper, swapped_positions

PARAMS = FluxParams(in_channels=64, vec_in_dim=24, context_in_dim=20, hidden_size=32, num_heads=2, depth=4,
                    depth_single_blocks=6, axes_dim=axes_dim_for(16), guidance_embed=True)
DROPOUTS = ["rank_dropout=0.3", "module_dropout=0.2"]
CASES = {
    "lokr": ["algo=lokr", "factor=4", *DROPOUTS],
    "loha": ["algo=loha", *DROPOUTS],
    "full": ["algo=full", *DROPOUTS],
    "dora": ["algo=lora", "dora_wd=True", *DROPOUTS],
    "lokr-dora": ["algo=lokr", "factor=2", "decompose_both=True", "dora_wd=True", *DROPOUTS],
}


def _model(case: str, *, fp8: bool = False):
    flux = random_flux(PARAMS, seed=3)
    if fp8:
        store_linears_in_fp8(flux, scaled=True)
    network = create_network(1.0, 4, 2.0, flux, [], train_text_encoder=False, network_args=CASES[case],
                             network_module="lycoris.kohya", generator=torch.Generator().manual_seed(1))
    network.apply_to()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # non-zero everywhere, so every factor gets a gradient
        for name, p in sorted(network.named_parameters()):
            p.add_(torch.randn(p.shape, generator=g) * (0.01 * p.abs().mean() if name.endswith("dora_scale") else 0.1))
    network.requires_grad_(True)
    flux.train()
    return flux, network


def _inputs(batch: int = 2, n_txt: int = 7):
    g = torch.Generator().manual_seed(5)
    img = torch.randn(batch, 12, PARAMS.in_channels, generator=g)
    txt = torch.randn(batch, n_txt, PARAMS.context_in_dim, generator=g)
    return (img, flow.image_ids(batch, 3, 4, device=torch.device("cpu")), txt,
            flow.text_ids(batch, n_txt, device=torch.device("cpu")), torch.rand(batch, generator=g),
            torch.randn(batch, PARAMS.vec_in_dim, generator=g), torch.full((batch,), 1.0))


def _step(flux, network, seed: int):
    for p in network.parameters():
        p.grad = None
    torch.manual_seed(seed)  # the dropout draws
    out = flux(*_inputs())
    out.square().mean().backward()
    return out.detach().clone(), {n: p.grad.clone() for n, p in network.named_parameters() if p.grad is not None}


def _same(a, b, atol: float = 0.0) -> None:
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=atol)
    assert a[1].keys() == b[1].keys() and a[1]
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], rtol=0 if atol == 0 else 1e-4, atol=atol, msg=name)


@pytest.mark.parametrize("case", list(CASES))
def test_checkpointing_and_block_swap_change_nothing(case):
    flux, network = _model(case)
    plain = [_step(flux, network, seed) for seed in (10, 11)]
    layout = FLUX1.blocks(flux)
    apply_block_policy(layout, checkpointed=None, offload=False, device="cpu")
    checkpointed = [_step(flux, network, seed) for seed in (10, 11)]
    for a, b in zip(plain, checkpointed, strict=True):
        _same(a, b)
    swapper = BlockSwapper(layout.sequence, swapped_positions(layout, 4), "cpu", ring_size=2)
    swapped = [_step(flux, network, seed) for seed in (10, 11)]
    swapper.remove()
    for a, b in zip(plain, swapped, strict=True):
        _same(a, b)
    assert not torch.equal(plain[0][0], plain[1][0])  # the seeds gave different dropout draws


@pytest.mark.parametrize("case", list(CASES))
def test_fp8_base_equals_its_dequantized_weights(case):
    quantized, q_network = _model(case, fp8=True)
    reference, r_network = _model(case)
    with torch.no_grad():
        for (_, q), (_, r) in zip(quantized.named_modules(), reference.named_modules(), strict=True):
            if isinstance(q, torch.nn.Linear):
                r.weight.copy_(base_weight(q))
        r_network.load_state_dict(q_network.state_dict())
    _same(_step(quantized, q_network, 10), _step(reference, r_network, 10), atol=2e-5)


def test_merging_into_fp8_is_refused():
    flux, network = _model("lokr", fp8=True)
    with pytest.raises(ValueError, match="fp8"):
        network.merge_into_base()


@pytest.mark.parametrize("args", [["algo=lokr", "split_qkv=True"], ["algo=loha", "dropout=0.1"],
                                  ["algo=full", "dora_wd=True"], ["algo=lokr", "loraplus_lr_ratio=4"],
                                  ["algo=ia3"], ["algo=lokr", "train_norm=True"], ["algo=lora", "use_scalar=True"]])
def test_settings_without_meaning_for_the_algorithm_are_errors(args):
    flux = random_flux(PARAMS, seed=3)
    with pytest.raises(ConfigError, match=args[-1].split("=")[0]):
        create_network(1.0, 4, 2.0, flux, [], network_args=args, network_module="lycoris.kohya")
