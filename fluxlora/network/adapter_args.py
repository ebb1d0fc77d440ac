"""Moved: LyCORIS' `--network_args` are parsed in `fluxlora.config.adapter_args` (typed once, with the other
settings). This module re-exports it so existing imports keep working."""

from fluxlora.config.adapter_args import *  # noqa: F403
