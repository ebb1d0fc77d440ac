"""Fixtures for the FLUX.2 family tests: tiny real-layout file sets, one per --model_version."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def flux2_tiny(tiny_flux2_ckpts):
    """{model_version: TinyFlux2Paths} for dev, klein-4b, klein-9b, klein-base-4b (tests/conftest.py)."""
    return tiny_flux2_ckpts
