"""Fixtures for the FLUX.2 family tests: tiny real-layout file sets, one per --model_version."""

from __future__ import annotations

import pytest

from fluxlora.families.flux2.tiny import write_tiny_flux2


@pytest.fixture(scope="session")
def flux2_tiny(tmp_path_factory):
    """{model_version: TinyFlux2Paths} for dev, klein-4b, klein-9b, klein-base-4b (written once per session)."""
    root = tmp_path_factory.mktemp("flux2_tiny")
    return {v: write_tiny_flux2(root / v, v) for v in ("dev", "klein-4b", "klein-9b", "klein-base-4b")}
