"""Regional torch.compile (`--torch_compile`): each DiT block's `forward` is compiled on its own.

All double blocks share one compiled graph and all single blocks another (parameters are graph inputs), so
compile time is paid per block kind and input shape, not for a 57-block graph, and the parts around the blocks
(checkpointing, block-swap hooks, which run in `Module.__call__`) stay eager. Shapes are static: each
resolution bucket compiles once per block kind, so the number of buckets bounds the recompiles; the cache limit
is raised to allow for them.
"""

from __future__ import annotations

import logging

import torch

from fluxlora.families.base import BlockLayout

logger = logging.getLogger(__name__)

RECOMPILE_LIMIT = 64  # shapes (buckets × batch sizes) per block kind before dynamo falls back to eager


def _raise_recompile_limit(limit: int) -> None:
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # renamed in torch 2.7; keep both spellings
        if hasattr(config, name) and getattr(config, name) < limit:
            setattr(config, name, limit)


def compile_blocks(layout: BlockLayout, *, backend: str = "inductor", mode: str | None = None, fullgraph: bool = False,
                   dynamic: bool = False) -> int:
    """Compile the `forward` of every double and single block in place; returns how many blocks."""
    _raise_recompile_limit(RECOMPILE_LIMIT)
    mode = None if mode in (None, "default") else mode
    blocks = layout.sequence
    for block in blocks:
        # The instance attribute wins over the class method: `Module.__call__` (hooks) stays eager.
        block.forward = torch.compile(block.forward, backend=backend, mode=mode, fullgraph=fullgraph, dynamic=dynamic)
    logger.info("--torch_compile: %d blocks compiled one by one (backend %s%s, %s shapes)", len(blocks), backend,
                f", mode {mode}" if mode else "", "dynamic" if dynamic else "static")
    return len(blocks)
