"""The family tests train through the same command line as tests/training: reuse its dataset and argv fixtures."""

from __future__ import annotations

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("training_fixtures", Path(__file__).parents[1] / "training" / "conftest.py")
_training = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_training)

tiny_dataset = _training.tiny_dataset
train_argv = _training.train_argv
