"""Shared fixtures: paths to the real tokenizers and tiny real-format checkpoints."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FLUXLORA_SHARED", REPO.parent / "shared"))
TOKENIZERS = SHARED / "tokenizers"

# Tests are numerical comparisons on a 2-core CPU: one thread per worker is faster and deterministic.
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))


@pytest.fixture(scope="session")
def tokenizers_dir() -> Path:
    """The real CLIP-L and T5 tokenizer folders from ../shared/tokenizers (clip_l/, t5xxl/)."""
    assert (TOKENIZERS / "clip_l" / "vocab.json").is_file(), f"missing {TOKENIZERS}; set FLUXLORA_SHARED"
    return TOKENIZERS


@pytest.fixture(scope="session")
def tiny_ckpts(tmp_path_factory: pytest.TempPathFactory):
    """Tiny checkpoints in the real file formats, written once per test session (see fluxlora.models.tiny)."""
    from fluxlora.models.tiny import write_tiny_checkpoints

    return write_tiny_checkpoints(tmp_path_factory.mktemp("tiny_ckpts"), seed=0)


@pytest.fixture(scope="session")
def tiny_flux2_ckpts(tmp_path_factory: pytest.TempPathFactory):
    """{--model_version: tiny FLUX.2 file set} for dev, klein-4b, klein-9b and klein-base-4b, in the real layouts
    (see fluxlora.families.flux2.tiny), written once per test session."""
    from fluxlora.families.flux2.tiny import write_tiny_flux2

    root = tmp_path_factory.mktemp("tiny_flux2")
    return {v: write_tiny_flux2(root / v, v) for v in ("dev", "klein-4b", "klein-9b", "klein-base-4b")}


@pytest.fixture(scope="session")
def tiny_family_ckpts(tmp_path_factory: pytest.TempPathFactory):
    """Tiny Chroma, Kontext and Fill transformers in their real file layouts (see fluxlora.families.tiny)."""
    from fluxlora.families.tiny import write_tiny_family_checkpoints

    return write_tiny_family_checkpoints(tmp_path_factory.mktemp("tiny_family_ckpts"), seed=0)
