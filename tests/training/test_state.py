"""State folders: complete round trip, atomic replacement, refusal of incomplete folders."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from fluxlora.errors import CheckpointError
from fluxlora.training.state import (
    COMPLETE_MARKER,
    TrainCounters,
    capture_rng,
    fingerprint_differences,
    load_state,
    restore_rng,
    save_state,
)


def _setup():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    for _ in range(3):
        model(torch.randn(2, 4)).pow(2).sum().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return model, opt, sched


def test_state_round_trip_restores_everything(tmp_path):
    model, opt, sched = _setup()
    counters = TrainCounters(epoch=2, batch_in_epoch=5, global_step=17, loss_history=[0.5, 0.25])
    params = {k: v for k, v in model.named_parameters()}
    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    save_state(tmp_path / "run-state", network_params=params, optimizer=opt, scheduler=sched,
               counters=counters, fingerprint={"network_dim": 4})
    expected_draws = (random.random(), float(np.random.rand()), float(torch.rand(1)))

    loaded = load_state(tmp_path / "run-state")
    assert loaded.counters == counters
    assert loaded.fingerprint == {"network_dim": 4}
    for k, v in params.items():
        assert torch.equal(loaded.network_params[k], v.detach())
    restored_opt = torch.optim.AdamW(torch.nn.Linear(4, 3).parameters(), lr=1e-2)
    restored_opt.load_state_dict(loaded.optimizer)
    for a, b in zip(opt.state.values(), restored_opt.state.values(), strict=True):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    assert loaded.scheduler["last_epoch"] == sched.state_dict()["last_epoch"] == 3
    restore_rng(loaded.rng)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected_draws


def test_rng_capture_restore_is_exact():
    state = capture_rng()
    first = (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist())
    restore_rng(state)
    assert (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist()) == first


def test_incomplete_folder_is_refused(tmp_path):
    model, opt, sched = _setup()
    d = save_state(tmp_path / "s", network_params=dict(model.named_parameters()), optimizer=opt, scheduler=sched,
                   counters=TrainCounters(), fingerprint={})
    (d / COMPLETE_MARKER).unlink()
    with pytest.raises(CheckpointError, match="COMPLETE"):
        load_state(d)
    with pytest.raises(CheckpointError, match="no such state folder"):
        load_state(tmp_path / "missing")


def test_resave_replaces_previous_state_atomically(tmp_path):
    model, opt, sched = _setup()
    params = dict(model.named_parameters())
    save_state(tmp_path / "s", network_params=params, optimizer=opt, scheduler=sched,
               counters=TrainCounters(global_step=1), fingerprint={})
    save_state(tmp_path / "s", network_params=params, optimizer=opt, scheduler=sched,
               counters=TrainCounters(global_step=2), fingerprint={})
    assert load_state(tmp_path / "s").counters.global_step == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]  # no temporary or old folders left


def test_fingerprint_differences_lists_each_change():
    diffs = fingerprint_differences({"network_dim": 4, "optimizer": "AdamW"}, {"network_dim": 8, "optimizer": "AdamW"})
    assert diffs == ["network_dim: 4 -> 8"]
