"""Fixtures for multi-process tests: a captioned dataset of our own (its disk caches must not leak into the
shared training fixtures)."""

from __future__ import annotations

from pathlib import Path

import pytest
from ddp_launch import write_dataset


@pytest.fixture(scope="module")
def ddp_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("ddp_data") / "img", count=8)
