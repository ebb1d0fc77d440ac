"""Moved: `--network_args` is parsed in `fluxlora.config.network_args` (typed once, with the other settings).

This module re-exports it so existing imports keep working.
"""

from fluxlora.config.network_args import *  # noqa: F403
