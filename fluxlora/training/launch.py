"""How many processes the launcher started (read from its environment, before accelerate joins them)."""

from __future__ import annotations

import os


def launched_world_size() -> int:
    """Processes the launcher (accelerate launch, torchrun, MPI) started; 1 for a plain `python` run."""
    for name in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 1
