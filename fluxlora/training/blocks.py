"""Training policy around a transformer's blocks: gradient checkpointing of chosen blocks, with their kept inputs in
host memory (`--cpu_offload_checkpointing`). The model stays a plain model; this module changes how its blocks are
called, from outside.

Each wrapped block's class is swapped for a subclass whose `__call__` applies the policy and then calls the block as
usual (`nn.Module.__call__`: forward pre-hooks such as block swap's, then `forward`, compiled or not). Module names,
parameters and `state_dict` keys are unchanged (FSDP2 wraps modules the same way). Checkpointing recomputes through
that same call, so hooks (block swap loading the weights back) run again in backward, as they must.

Checkpointing only acts when it can save memory: the block is in training mode and autograd is on. Validation and
sampling (no_grad) run blocks plainly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from fluxlora.families.base import BlockLayout


@dataclass(frozen=True)
class BlockPolicy:
    """How one block is called while training."""

    checkpointed: bool
    offload: bool  # its activation stream lives in host memory between checkpointed blocks
    stream_args: int  # leading positional arguments that are the activation stream
    device: torch.device  # where it computes
    last: bool  # the last block: its output goes back to the device


def checkpointed_positions(total: int, n: int | None, swapped: Sequence[int] = ()) -> frozenset[int] | None:
    """Which of `total` blocks (execution order) to checkpoint so that `n` are: the `swapped` ones (block swap needs
    their recompute), then the first others in execution order. None = all blocks.

    The first blocks run first in forward and last in backward, so by the time they are recomputed the blocks after
    them have released their activations: a prefix keeps the peak at the start of backward.
    """
    if n is None or n >= total:
        return None
    if n < 0:
        raise ValueError(f"the number of checkpointed blocks must be at least 0, got {n}")
    must = sorted(set(swapped))
    if len(must) > n:
        raise ValueError(f"{len(must)} swapped blocks must all be checkpointed, but only {n} are")
    rest = [i for i in range(total) if i not in must]
    return frozenset(must + rest[: n - len(must)])


_POLICY_CLASSES: dict[type, type] = {}


def _policy_class(cls: type) -> type:
    """`cls` with a `__call__` that applies the instance's `_block_policy` (one subclass per block class)."""
    if cls not in _POLICY_CLASSES:
        _POLICY_CLASSES[cls] = type(cls.__name__, (cls,), {"__call__": _call_with_policy, "_policy_base": cls,
                                                            "__module__": cls.__module__})
    return _POLICY_CLASSES[cls]


def _plain_call(block: nn.Module, *args: Tensor | None) -> Tensor | tuple[Tensor, ...]:
    return nn.Module.__call__(block, *args)


def _call_with_policy(block: nn.Module, *args: Tensor | None) -> Tensor | tuple[Tensor, ...]:
    policy: BlockPolicy = block._block_policy
    if not (block.training and torch.is_grad_enabled()):
        return _plain_call(block, *args)
    n = policy.stream_args
    if not policy.checkpointed:
        if policy.offload:  # the stream arrives from the host after a checkpointed block
            args = (*(a.to(policy.device) for a in args[:n]), *args[n:])
        return _plain_call(block, *args)
    if policy.offload:
        args = (*(a.cpu() for a in args[:n]), *args[n:])  # checkpoint keeps these: keep them in host memory
        out = checkpoint(_offloaded, block, policy.device, n, *args, use_reentrant=False)
        if policy.last:
            return tuple(o.to(policy.device) for o in out) if isinstance(out, tuple) else out.to(policy.device)
        return out
    return checkpoint(_plain_call, block, *args, use_reentrant=False)


def _offloaded(block: nn.Module, device: torch.device, n: int, *args: Tensor | None) -> Tensor | tuple[Tensor, ...]:
    """Run `block` on `device` with its stream arriving from and returned to the host."""
    inputs = [a.to(device, non_blocking=True) for a in args[:n]]
    out = _plain_call(block, *inputs, *args[n:])
    if isinstance(out, tuple):
        return tuple(o.to("cpu") for o in out)
    return out.to("cpu")


def apply_block_policy(layout: BlockLayout, *, checkpointed: frozenset[int] | None, offload: bool,
                       device: torch.device | str) -> None:
    """Checkpoint the blocks at `checkpointed` positions (None = all of them; empty = none) while training, their
    kept inputs on the host with `offload`. Idempotent; `remove_block_policy` undoes it."""
    sequence = layout.sequence
    device = torch.device(device)
    for pos, block in enumerate(sequence):
        chosen = checkpointed is None or pos in checkpointed
        base = getattr(type(block), "_policy_base", type(block))
        block.__class__ = _policy_class(base)
        block._block_policy = BlockPolicy(checkpointed=chosen, offload=offload, stream_args=layout.stream_args(pos),
                                          device=device, last=pos == len(sequence) - 1)


def remove_block_policy(layout: BlockLayout) -> None:
    for block in layout.sequence:
        base = getattr(type(block), "_policy_base", None)
        if base is not None:
            block.__class__ = base
            del block._block_policy


def policy_of(block: nn.Module) -> BlockPolicy | None:
    return getattr(block, "_block_policy", None)
