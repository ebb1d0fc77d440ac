"""Adapter sizes from shapes: they match what the network really builds and saves, and the planner's own shapes."""

from __future__ import annotations

import pytest
import torch
from network_helpers import SMALL, small_flux

from fluxlora.config.network_args import parse_network_args
from fluxlora.families.flux1.shape import flux_shape, lora_param_count
from fluxlora.models.flux import FluxParams
from fluxlora.network.lora import create_network
from fluxlora.network.sizes import adapter_file_bytes, adapter_params, flux_block_linears
from fluxlora.training.planner import Workload, estimate

CASES = {
    "lokr": ["algo=lokr", "factor=4"],
    "lokr-decompose-both": ["algo=lokr", "factor=16", "decompose_both=True"],
    "loha": ["algo=loha"],
    "full": ["algo=full"],
    "locon-dora": ["algo=locon", "dora_wd=True"],
    "loha-dora-input": ["algo=loha", "dora_wd=True", "wd_on_output=False"],
    "lokr-scalar": ["algo=lokr", "use_scalar=True"],
}


def test_block_linears_are_the_planners_shapes():
    full = FluxParams()
    assert len(flux_block_linears(full)) == 304
    for p in (full, SMALL):
        assert sum(4 * (o + i) for o, i in flux_block_linears(p)) == lora_param_count(p, 4)


@pytest.mark.parametrize("case", list(CASES))
def test_counts_equal_the_built_network_and_its_file(case, tmp_path):
    network = create_network(1.0, 3, 1, small_flux(), [], train_text_encoder=False, network_args=CASES[case],
                             network_module="lycoris.kohya")
    spec = parse_network_args(CASES[case], network_module="lycoris.kohya").adapter
    linears = flux_block_linears(SMALL)
    assert adapter_params(linears, spec, 3) == sum(p.numel() for p in network.parameters())
    path = tmp_path / "a.safetensors"
    network.save(path, dtype=torch.bfloat16)
    assert abs(adapter_file_bytes(linears, spec, 3) - path.stat().st_size) < 0.15 * path.stat().st_size + 2048


def test_planner_counts_adapter_parameters():
    p = FluxParams()
    spec = parse_network_args(["algo=full"], network_module="lycoris.kohya").adapter
    n = adapter_params(flux_block_linears(p), spec, 4)
    lora, full = estimate(Workload(shape=flux_shape(p))), estimate(Workload(shape=flux_shape(p), adapter_params=n))
    assert full.device["optimizer state"] == 8 * n > 100 * lora.device["optimizer state"]
