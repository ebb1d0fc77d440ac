"""Fixtures for the LoRA network tests (helpers live in network_helpers.py)."""

from __future__ import annotations

import pytest
from network_helpers import small_flux

from fluxlora.models.flux import Flux


@pytest.fixture
def flux() -> Flux:
    """A fresh small FLUX per test: attaching a network replaces Linear forwards."""
    return small_flux()
