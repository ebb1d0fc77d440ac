"""Block swap: frozen DiT blocks kept in (pinned) host memory and streamed to the device ahead of use.

sd-scripts' `--blocks_to_swap N` semantics (spec §7.1): `N // 2` double blocks and `2 · (N − N // 2)` single
blocks — the *last* ones of each list — live on the host. Unlike sd-scripts nothing is ever copied back: base
weights are frozen, so each swapped block keeps one master copy in host memory (pinned on CUDA) and the device
holds only a small ring of slots per block kind. Before a block runs, a forward pre-hook makes sure it sits in a
slot and enqueues the next blocks of each kind, in the direction the model is being walked (forward, or
backward's checkpoint recompute), on a side stream. CUDA events order the copies against the compute: a slot is
overwritten only after every kernel enqueued so far (which includes all users of its previous block) and a block
runs only after its copy. On a CPU the same scheduling code runs with synchronous copies, which is what the tests
compare against a model without swap. LoRA modules are not children of the blocks, so they stay on the device.

Training with swap needs `--gradient_checkpointing`: without it autograd would keep every swapped block's weights
alive for the backward pass, which is exactly the memory swap is meant to free.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from fluxlora.errors import ConfigError
from fluxlora.families.base import BlockLayout

logger = logging.getLogger(__name__)

DEFAULT_RING_SIZE = 2  # one slot computing, one being filled: double buffering per block kind


def swap_split(blocks_to_swap: int) -> tuple[int, int]:
    """sd-scripts' split of `--blocks_to_swap N`: (N // 2 double blocks, 2·(N − N // 2) single blocks)."""
    double = blocks_to_swap // 2
    return double, (blocks_to_swap - double) * 2


def max_blocks_to_swap(depth: int, depth_single: int) -> int:
    """Largest N whose split leaves at least two double and two single blocks resident (35 for 19 + 38 blocks)."""
    best = 0
    for n in range(0, 2 * (depth + depth_single) + 1):
        double, single = swap_split(n)
        if double <= depth - 2 and single <= depth_single - 2:
            best = n
    return best


def check_blocks_to_swap(blocks_to_swap: int, depth: int, depth_single: int) -> tuple[int, int]:
    """The (double, single) split of N, or a ConfigError naming the model's real limit."""
    limit = max_blocks_to_swap(depth, depth_single)
    if not 0 <= blocks_to_swap <= limit:
        raise ConfigError(f"--blocks_to_swap {blocks_to_swap}: this model has {depth} double and {depth_single} single "
                          f"blocks, so at most {limit} can be swapped; use a value from 0 to {limit}",
                          key="--blocks_to_swap")
    return swap_split(blocks_to_swap)


def _in_backward() -> bool:
    # The checkpoint recompute runs inside autograd's backward; that is when blocks are walked in reverse.
    return torch._C._current_graph_task_id() != -1


@dataclass
class _Block:
    module: nn.Module
    params: list[tuple[nn.Parameter, torch.dtype, int, torch.Size]]  # (param, dtype group, offset, shape)
    host: dict[torch.dtype, Tensor]  # master copy, one flat buffer per dtype
    ring: int  # index of its ring (one per block kind)


@dataclass
class _Ring:
    slots: list[dict[torch.dtype, Tensor]]
    holder: list[int | None]  # sequence position loaded in each slot
    positions: list[int]  # sorted sequence positions of the swapped blocks of this kind


@dataclass
class SwapStats:
    loads: int = 0  # host -> device block copies
    late: int = 0  # loads issued by the block's own hook (not prefetched: the compute waits for the copy)
    order: list[int] = field(default_factory=list)  # positions as hooks saw them (for tests and debugging)


def _layout(module: nn.Module) -> tuple[tuple[str, tuple[int, ...], torch.dtype], ...]:
    return tuple((name, tuple(p.shape), p.dtype) for name, p in module.named_parameters())


class BlockSwapper:
    """Streams the parameters of `sequence[i]` for i in `swapped` from host memory into a device ring.

    `sequence` lists every block in execution order (FLUX: double blocks, then single blocks); blocks not in
    `swapped` are left alone (the caller puts them on the device). Swapped blocks of the same parameter layout
    share a ring of `ring_size` device slots.
    """

    def __init__(self, sequence: Sequence[nn.Module], swapped: Sequence[int], device: torch.device | str, *,
                 ring_size: int = DEFAULT_RING_SIZE, record_order: bool = False):
        if ring_size < 1:
            raise ValueError(f"ring size must be at least 1, got {ring_size}")
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.ring_size = ring_size
        self.stats = SwapStats()
        self._record_order = record_order
        self._blocks: dict[int, _Block] = {}
        self._rings: list[_Ring] = []
        self._ready: dict[int, object] = {}  # position -> CUDA event of its pending copy
        self._hooks = []
        self._copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        pin = self.cuda
        kinds: dict[tuple, int] = {}
        for pos in sorted(set(swapped)):
            if not 0 <= pos < len(sequence):
                raise ValueError(f"swapped position {pos} outside the {len(sequence)} blocks")
            module = sequence[pos]
            ring = kinds.setdefault(_layout(module), len(kinds))
            self._blocks[pos] = self._to_host(module, ring, pin)
        for ring in sorted(kinds.values()):
            positions = sorted(p for p, b in self._blocks.items() if b.ring == ring)
            sizes = self._blocks[positions[0]].host
            slots = [{dt: torch.empty(buf.numel(), dtype=dt, device=self.device) for dt, buf in sizes.items()}
                     for _ in range(min(ring_size, len(positions)))]
            self._rings.append(_Ring(slots=slots, holder=[None] * len(slots), positions=positions))
        for pos, module in enumerate(sequence):
            self._hooks.append(module.register_forward_pre_hook(self._make_hook(pos)))

    # ---- setup ------------------------------------------------------------------------------------------------
    @staticmethod
    def _to_host(module: nn.Module, ring: int, pin: bool) -> _Block:
        totals: dict[torch.dtype, int] = {}
        params = []
        for p in module.parameters():
            offset = totals.get(p.dtype, 0)
            params.append((p, p.dtype, offset, p.shape))
            totals[p.dtype] = offset + p.numel()
        host = {dt: torch.empty(n, dtype=dt, pin_memory=pin) for dt, n in totals.items()}
        for p, dt, offset, shape in params:
            view = host[dt][offset:offset + p.numel()].view(shape)
            view.copy_(p.data)
            p.data = view
        return _Block(module=module, params=params, host=host, ring=ring)

    @property
    def swapped_positions(self) -> list[int]:
        return sorted(self._blocks)

    def swapped_parameters(self) -> set[int]:
        """ids of the swapped parameters (the caller moves every other tensor to the device)."""
        return {id(p) for b in self._blocks.values() for p, *_ in b.params}

    def device_bytes(self) -> int:
        """Bytes of the device ring."""
        return sum(t.numel() * t.element_size() for r in self._rings for s in r.slots for t in s.values())

    def host_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for b in self._blocks.values() for t in b.host.values())

    # ---- scheduling -------------------------------------------------------------------------------------------
    def _make_hook(self, pos: int):
        def hook(module: nn.Module, args: object) -> None:
            self.before(pos)

        return hook

    def before(self, pos: int) -> None:
        """Called before block `pos` runs: make it resident, then prefetch what comes next in this direction."""
        if self._record_order:
            self.stats.order.append(pos)
        step = -1 if _in_backward() else 1
        for ring_index, ring in enumerate(self._rings):
            upcoming = self._upcoming(ring, pos, step)
            for target in upcoming:
                if target not in ring.holder:
                    self._load(ring_index, target, keep=upcoming, late=target == pos)
        if pos in self._blocks:
            self._wait(pos)

    def _upcoming(self, ring: _Ring, pos: int, step: int) -> list[int]:
        """The next `len(slots)` swapped positions of this ring from `pos` (inclusive) in direction `step`."""
        n = len(ring.slots)
        if step > 0:
            i = bisect.bisect_left(ring.positions, pos)
            return ring.positions[i:i + n]
        i = bisect.bisect_right(ring.positions, pos)
        return ring.positions[max(0, i - n):i][::-1]

    def _load(self, ring_index: int, pos: int, *, keep: list[int], late: bool) -> None:
        ring = self._rings[ring_index]
        slot = next(i for i, h in enumerate(ring.holder) if h is None or h not in keep)
        evicted = ring.holder[slot]
        if evicted is not None:
            self._point(evicted, None)
            self._ready.pop(evicted, None)
        block = self._blocks[pos]
        buffers = ring.slots[slot]
        if self.cuda:
            # Every kernel enqueued so far (all users of the evicted block included) must finish first.
            free = torch.cuda.Event()
            free.record(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._copy_stream):
                self._copy_stream.wait_event(free)
                for dt, buf in buffers.items():
                    buf.copy_(block.host[dt], non_blocking=True)
                done = torch.cuda.Event()
                done.record(self._copy_stream)
            self._ready[pos] = done
        else:
            for dt, buf in buffers.items():
                buf.copy_(block.host[dt])
        ring.holder[slot] = pos
        self._point(pos, buffers)
        self.stats.loads += 1
        self.stats.late += int(late)

    def _point(self, pos: int, buffers: dict[torch.dtype, Tensor] | None) -> None:
        """Make the block's parameters views of a device slot, or of their host master copy (None)."""
        block = self._blocks[pos]
        source = block.host if buffers is None else buffers
        for p, dt, offset, shape in block.params:
            p.data = source[dt][offset:offset + shape.numel()].view(shape)

    def _wait(self, pos: int) -> None:
        event = self._ready.pop(pos, None)
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    # ---- teardown ---------------------------------------------------------------------------------------------
    def remove(self, device: torch.device | str | None = None) -> None:
        """Unhook; with `device`, give every swapped block its own copy there (no swap any more)."""
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_stream(self._copy_stream)
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        for pos, block in self._blocks.items():
            self._point(pos, None)
            if device is not None:
                for p, *_ in block.params:
                    p.data = p.data.to(device, copy=True)
        for ring in self._rings:
            ring.slots.clear()
            ring.holder.clear()
        self._ready.clear()


def move_except(module: nn.Module, device: torch.device | str, skip: set[int]) -> None:
    """Move every parameter and buffer of `module` to `device`, except the parameters whose id is in `skip`."""
    for sub in module.modules():
        for name, p in sub._parameters.items():
            if p is not None and id(p) not in skip and p.device != torch.device(device):
                moved = p.data.to(device)
                if torch._has_compatible_shallow_copy_type(p.data, moved):
                    p.data = moved
                else:  # e.g. to the meta device: a new Parameter, as nn.Module._apply does
                    sub._parameters[name] = nn.Parameter(moved, requires_grad=p.requires_grad)
        for name, b in sub._buffers.items():
            if b is not None:
                sub._buffers[name] = b.to(device)


def swapped_positions_of(depth: int, depth_single: int, blocks_to_swap: int) -> list[int]:
    """Sequence positions of the last N//2 double and 2·(N − N//2) single blocks (sd-scripts' choice)."""
    double, single = check_blocks_to_swap(blocks_to_swap, depth, depth_single)
    return [*range(depth - double, depth), *(depth + i for i in range(depth_single - single, depth_single))]


def swapped_positions(layout: BlockLayout, blocks_to_swap: int) -> list[int]:
    return swapped_positions_of(len(layout.double), len(layout.single), blocks_to_swap)


def place_model(model: nn.Module, layout: BlockLayout, device: torch.device | str, blocks_to_swap: int = 0, *,
                ring_size: int = DEFAULT_RING_SIZE) -> BlockSwapper | None:
    """Put a (CPU-loaded) transformer on `device`, with `blocks_to_swap` of its blocks streamed from host memory."""
    device = torch.device(device)
    if not blocks_to_swap:
        model.to(device)
        return None
    swapper = BlockSwapper(layout.sequence, swapped_positions(layout, blocks_to_swap), device, ring_size=ring_size)
    move_except(model, device, swapper.swapped_parameters())
    logger.info("--blocks_to_swap %d: %d double + %d single blocks in %s host memory (%.2f GB), device ring %.2f GB",
                blocks_to_swap, *swap_split(blocks_to_swap), "pinned" if swapper.cuda else "",
                swapper.host_bytes() / 1e9, swapper.device_bytes() / 1e9)
    return swapper


def check_memory_flags(cfg, info) -> None:
    """Preflight: --blocks_to_swap within the model's real block counts, and with the checkpointing it needs."""
    swap = cfg.memory.blocks_to_swap
    if swap != "auto":
        check_blocks_to_swap(int(swap), info.double_blocks, info.single_blocks)
    if swap and not cfg.memory.gradient_checkpointing:
        raise ConfigError(f"--blocks_to_swap {swap} needs --gradient_checkpointing: swapped weights are on the device "
                          "only while their block runs, so backward must recompute the block; add "
                          "--gradient_checkpointing", key="--blocks_to_swap")
