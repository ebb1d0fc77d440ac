"""Partial gradient checkpointing (`training.blocks`, `--checkpoint_blocks`): which blocks are chosen, and that
outputs and LoRA gradients are bit for bit those of no checkpointing and of checkpointing every block."""

from __future__ import annotations

import pytest
import torch

from fluxlora import flow
from fluxlora.families.flux1.family import FLUX1
from fluxlora.models.flux import FluxParams, axes_dim_for
from fluxlora.models.tiny import random_flux
from fluxlora.network.lora import create_network
from fluxlora.training.blocks import apply_block_policy, checkpointed_positions
from fluxlora.training.memory import BlockSwapper, swapped_positions

PARAMS = FluxParams(in_channels=64, vec_in_dim=24, context_in_dim=20, hidden_size=32, num_heads=2, depth=3,
                    depth_single_blocks=4, axes_dim=axes_dim_for(16), guidance_embed=True)
TOTAL = PARAMS.depth + PARAMS.depth_single_blocks


def _model():
    flux = random_flux(PARAMS, seed=3)
    network = create_network(1.0, 4, 2.0, flux, [], train_text_encoder=False, generator=torch.Generator().manual_seed(1))
    network.apply_to()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # non-zero up weights, so both LoRA factors get gradients
        for lora in network.loras:
            for w in lora.up_weights():
                w.copy_(torch.randn(w.shape, generator=g) * 0.1)
    network.requires_grad_(True)
    flux.train()
    return flux, network


def _inputs(batch: int = 2, n_txt: int = 7):
    g = torch.Generator().manual_seed(5)
    img = torch.randn(batch, 12, PARAMS.in_channels, generator=g)
    txt = torch.randn(batch, n_txt, PARAMS.context_in_dim, generator=g)
    mask = torch.ones(batch, n_txt, dtype=torch.bool)
    mask[0, 4:] = False
    return (img, flow.image_ids(batch, 3, 4, device=torch.device("cpu")), txt,
            flow.text_ids(batch, n_txt, device=torch.device("cpu")), torch.rand(batch, generator=g),
            torch.randn(batch, PARAMS.vec_in_dim, generator=g), torch.full((batch,), 1.0), mask)


def _step(flux, network, inputs):
    for p in network.parameters():
        p.grad = None
    out = flux(*inputs)
    out.square().mean().backward()
    return out.detach().clone(), {n: p.grad.clone() for n, p in network.named_parameters()}


def _count_calls(flux) -> list[int]:
    calls = [0] * TOTAL
    for pos, block in enumerate(FLUX1.blocks(flux).sequence):
        block.register_forward_pre_hook(lambda *_, i=pos: calls.__setitem__(i, calls[i] + 1))
    return calls


def _assert_same(result, reference) -> None:
    out, grads = result
    ref_out, ref_grads = reference
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    assert grads.keys() == ref_grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=0, atol=0)


def test_positions_are_the_swapped_blocks_then_the_first_in_execution_order():
    assert checkpointed_positions(7, None) is None  # default: every block
    assert checkpointed_positions(7, 7) is None and checkpointed_positions(7, 9) is None
    assert checkpointed_positions(7, 0) == frozenset()
    assert checkpointed_positions(7, 2) == {0, 1}
    assert checkpointed_positions(7, 4) == {0, 1, 2, 3}  # all double blocks, then the first single block
    assert checkpointed_positions(7, 3, swapped=[2, 5, 6]) == {2, 5, 6}
    assert checkpointed_positions(7, 5, swapped=[2, 5, 6]) == {0, 1, 2, 5, 6}
    with pytest.raises(ValueError, match="3 swapped blocks must all be checkpointed, but only 2"):
        checkpointed_positions(7, 2, swapped=[2, 5, 6])
    with pytest.raises(ValueError, match="at least 0"):
        checkpointed_positions(7, -1)


@pytest.mark.parametrize("n", [0, 1, 3, 4, 6])
def test_partial_checkpointing_gives_the_same_outputs_and_lora_gradients(n):
    flux, network = _model()
    inputs = _inputs()
    calls = _count_calls(flux)
    none = _step(flux, network, inputs)
    assert calls == [1] * TOTAL
    apply_block_policy(FLUX1.blocks(flux), checkpointed=None, offload=False, device="cpu")
    every = _step(flux, network, inputs)
    assert calls == [3] * TOTAL  # every block recomputed in backward
    _assert_same(every, none)

    apply_block_policy(FLUX1.blocks(flux), checkpointed=checkpointed_positions(TOTAL, n), offload=False, device="cpu")
    calls[:] = [0] * TOTAL
    partial = _step(flux, network, inputs)
    # the first n blocks in execution order are recomputed in backward; the others ran once
    assert calls == [2] * n + [1] * (TOTAL - n)
    _assert_same(partial, none)
    _assert_same(partial, every)
    with torch.no_grad():  # forward-only (validation, sampling) is untouched by the selection
        flux.eval()
        torch.testing.assert_close(flux(*inputs), none[0], rtol=0, atol=0)


def test_partial_checkpointing_with_cpu_offload_is_the_same():
    flux, network = _model()
    inputs = _inputs()
    apply_block_policy(FLUX1.blocks(flux), checkpointed=None, offload=False, device="cpu")
    reference = _step(flux, network, inputs)
    apply_block_policy(FLUX1.blocks(flux), checkpointed=checkpointed_positions(TOTAL, 4), offload=True, device="cpu")
    _assert_same(_step(flux, network, inputs), reference)


def test_partial_checkpointing_with_block_swap_checkpoints_the_swapped_blocks():
    flux, network = _model()
    inputs = _inputs()
    reference = _step(flux, network, inputs)
    layout = FLUX1.blocks(flux)
    swapped = swapped_positions(layout, 2)  # the last double block and the last two single blocks
    assert swapped == [2, 5, 6]
    swapper = BlockSwapper(layout.sequence, swapped, "cpu", ring_size=1)
    apply_block_policy(layout, checkpointed=checkpointed_positions(TOTAL, 4, swapped), offload=False, device="cpu")
    calls = _count_calls(flux)
    _assert_same(_step(flux, network, inputs), reference)
    assert calls == [2, 1, 2, 1, 1, 2, 2]  # swapped blocks + the first other one are recomputed
    swapper.remove()


def test_gradient_checkpointing_same_gradients() -> None:
    small_flux_params = PARAMS
    x = {k: v for k, v in zip(("img", "img_ids", "txt", "txt_ids", "timesteps", "y", "guidance", "txt_mask"), _inputs(), strict=True)}
    grads = []
    calls = []
    for use_checkpointing in (False, True):
        model = random_flux(small_flux_params, seed=2).train()
        apply_block_policy(FLUX1.blocks(model), checkpointed=None if use_checkpointing else frozenset(), offload=False,
                           device="cpu")
        counter = [0]
        model.double_blocks[0].register_forward_pre_hook(lambda *_, c=counter: c.__setitem__(0, c[0] + 1))
        model(**x).square().mean().backward()
        calls.append(counter[0])
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert calls == [1, 2]  # checkpointing really recomputes the block in backward
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5), name
