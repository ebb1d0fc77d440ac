"""The shared adapter interface (fluxlora.network.adapter) across algorithms: strict loading, rebuilding a network
from a file, multiplier semantics, merge and detach."""

from __future__ import annotations

import pytest
import torch
from network_helpers import flux_inputs, small_flux, tiny_clip
from test_lycoris_reference import randomize_dora_

from fluxlora.errors import CheckpointError
from fluxlora.network.lora import create_network, create_network_from_weights

CASES = {
    "lokr": ["algo=lokr", "factor=4", "decompose_both=True"],
    "loha": ["algo=loha", "use_scalar=True"],
    "full": ["algo=full"],
    "dora": ["algo=lora", "dora_wd=True"],
    "loha-dora-input": ["algo=loha", "dora_wd=True", "wd_on_output=False"],
}


def _network(case: str, flux=None, clip=None):
    flux, clip = flux or small_flux(), clip or tiny_clip()
    network = create_network(1.0, 3, 2, flux, [clip, None], network_args=CASES[case], network_module="lycoris.kohya")
    randomize_dora_(network)
    return network, flux, clip


@pytest.mark.parametrize("case", list(CASES))
def test_network_rebuilt_from_its_file_is_the_same_network(case, tmp_path):
    network, flux, clip = _network(case)
    path = tmp_path / "a.safetensors"
    network.save(path)
    flux2, clip2 = small_flux(), tiny_clip()
    rebuilt, weights = create_network_from_weights(1.0, path, flux2, [clip2, None])
    rebuilt.load_lora_state_dict(weights, path=path)
    assert [type(m) for m in rebuilt.loras] == [type(m) for m in network.loras]
    for a, b in zip(network.loras, rebuilt.loras, strict=True):
        torch.testing.assert_close(a.delta_weight(), b.delta_weight(), rtol=0, atol=1e-6, msg=a.lora_name)
    network.apply_to(), rebuilt.apply_to()
    network.eval(), rebuilt.eval()
    with torch.no_grad():
        torch.testing.assert_close(flux(**flux_inputs()), flux2(**flux_inputs()), rtol=0, atol=1e-6)


@pytest.mark.parametrize("case", list(CASES))
def test_multiplier_zero_is_the_base_and_merge_then_detach(case):
    network, flux, _ = _network(case)
    base = small_flux()
    with torch.no_grad():
        reference = base(**flux_inputs())
        network.apply_to()
        network.eval()
        network.set_multiplier(0.0)
        assert torch.equal(flux(**flux_inputs()), reference)
        network.set_multiplier(0.6)
        on_the_fly = flux(**flux_inputs())
        assert (on_the_fly - reference).abs().max() > 1e-5
        deltas = {m.lora_name: (m.delta_weight(), m.base.weight.clone()) for m in network.loras}
        network.merge_into_base()
        for m in network.loras:
            delta, weight = deltas[m.lora_name]
            torch.testing.assert_close(m.base.weight, weight + delta, rtol=0, atol=1e-6)
            assert "forward" not in vars(m.base)  # detached: the Linear's own forward again
        torch.testing.assert_close(flux(**flux_inputs()), on_the_fly, rtol=0, atol=1e-5)


def test_a_file_of_another_algorithm_is_refused_naming_the_keys(tmp_path):
    lokr, *_ = _network("lokr")
    path = tmp_path / "lokr.safetensors"
    lokr.save(path)
    loha, *_ = _network("loha")
    with pytest.raises(CheckpointError, match=r"--network_weights .*lokr.safetensors: this LoRA does not fit.*1?\d+ "
                                              r"module\(s\) of another algorithm.*file lokr, network loha"):
        loha.load_weights(path)
    dora, *_ = _network("dora")
    with pytest.raises(CheckpointError, match="file lora, network lora \\+ DoRA"):
        dora.load_lora_state_dict({k: v for k, v in dora.state_dict_for_save().items() if "dora_scale" not in k})


@pytest.mark.parametrize("case", ["dora", "lokr-dora"])
def test_fast_output_axis_dora_equals_the_rebuilt_weight_in_value_and_gradient(case):
    """LoRA / LoKr output-axis DoRA never forms W + ΔW in the forward; it must equal the dense rebuild exactly
    (values and gradients, with rank dropout's row mask), which is LyCORIS' formula."""
    args = {"dora": ["algo=lora", "dora_wd=True", "rank_dropout=0.3"],
            "lokr-dora": ["algo=lokr", "factor=4", "decompose_both=True", "dora_wd=True", "rank_dropout=0.3"]}[case]
    results = []
    for dense in (False, True):
        flux = small_flux()
        network = create_network(1.0, 3, 2, flux, [], network_args=args, network_module="lycoris.kohya")
        randomize_dora_(network)
        if dense:
            for m in network.loras:
                m.dora_row_terms = None  # the dense path: DoRA(W, ΔW) built as a matrix
        network.apply_to()
        network.train()
        torch.manual_seed(3)
        out = flux(**flux_inputs())
        out.square().mean().backward()
        results.append((out.detach(), {n: p.grad for n, p in network.named_parameters()}))
    (fast, fast_grads), (dense, dense_grads) = results
    torch.testing.assert_close(fast, dense, rtol=0, atol=1e-5)
    for name, grad in dense_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
