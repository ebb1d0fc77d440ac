"""The pieces of multi-process training that need no second process: per-process RNG in state folders, the
validation shards and their sum, and the hand-made DDP gradient all-reduce (with a stand-in for the collective)."""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from ddp_launch import write_dataset

from fluxlora.config.dataset import DatasetFlags, load_dataset_config
from fluxlora.data.datasets import build_training_data
from fluxlora.data.loader import make_dataloader
from fluxlora.training.processes import Processes
from fluxlora.training.state import TrainCounters, capture_rng, load_state, restore_rng, save_state
from fluxlora.training.validation import validation_loss


def _draws() -> tuple[float, float, float]:
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def test_state_folder_keeps_every_process_rng(tmp_path: Path) -> None:
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    states, expected = [], []
    for seed in (11, 22):  # two "processes" with different RNG streams
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        states.append(capture_rng())
        expected.append(_draws())
    save_state(tmp_path / "s", network_params=dict(model.named_parameters()), optimizer=opt, scheduler=sched,
               counters=TrainCounters(global_step=3), fingerprint={}, rng_states=states)
    assert (tmp_path / "s" / "rng.pt").is_file() and (tmp_path / "s" / "rng_1.pt").is_file()
    loaded = load_state(tmp_path / "s")
    assert len(loaded.rng_by_process) == 2
    for index in (1, 0):
        restore_rng(loaded.rng_of(index))
        assert _draws() == expected[index]
    restore_rng(loaded.rng_of(5))  # a process the saved run did not have starts from process 0's state
    assert _draws() == expected[0]

    save_state(tmp_path / "one", network_params=dict(model.named_parameters()), optimizer=opt, scheduler=sched,
               counters=TrainCounters(), fingerprint={})
    single = load_state(tmp_path / "one")
    assert len(single.rng_by_process) == 1 and not (tmp_path / "one" / "rng_1.pt").exists()


def _validation_data(tmp_path: Path):
    folder = write_dataset(tmp_path / "img", count=10)
    toml = tmp_path / "d.toml"
    toml.write_text(f'[general]\ncaption_extension = ".txt"\n[[datasets]]\nresolution = 64\nbatch_size = 1\n'
                    f'validation_split = 0.5\nvalidation_seed = 3\n  [[datasets.subsets]]\n'
                    f'  image_dir = "{folder.as_posix()}"\n', encoding="utf-8")
    return build_training_data(load_dataset_config(toml, DatasetFlags()), seed=0)


def test_validation_is_sharded_without_padding_and_sums_to_the_single_process_mean(tmp_path: Path) -> None:
    data = _validation_data(tmp_path)
    total = len(data.validation_batches())
    assert total == 5  # odd: a padded shard would score one batch twice

    def indices(n: int, p: int) -> list[int]:
        return [b["batch_index"] for b in make_dataloader(data, 1, seed=0, split="validation", num_processes=n,
                                                          process_index=p)]

    shards = [indices(2, 0), indices(2, 1)]
    assert sorted(shards[0] + shards[1]) == indices(1, 0) == list(range(total))
    assert set(shards[0]).isdisjoint(shards[1])

    def score(batch, sigmas, noise):  # a loss that depends on the batch's noise and image
        return SimpleNamespace(loss=noise.double().mean() * sigmas[0] + batch["images"].double().mean())

    def latents_of(batch):
        return torch.zeros(1, 4, 2, 2)

    def loader(p: int, n: int):
        return make_dataloader(data, 1, seed=0, split="validation", num_processes=n, process_index=p)

    single = validation_loss(loader(0, 1), score, latents_of, seed=5)
    captured: list[torch.Tensor] = []

    def capture(t: torch.Tensor) -> torch.Tensor:  # process 1's contribution to the all-reduce
        captured.append(t.clone())
        return t

    validation_loss(loader(1, 2), score, latents_of, seed=5, reduce_sum=capture)
    combined = validation_loss(loader(0, 2), score, latents_of, seed=5, reduce_sum=lambda t: t + captured[0])
    assert combined == pytest.approx(single, rel=1e-12)  # noise is keyed by the batch's place in the whole list, not the shard's
    assert int(captured[0][1]) == 4 * len(shards[1])  # 4 fixed σ per batch
    # max_validation_steps counts batches of the whole list on every process
    first2 = validation_loss(loader(0, 1), score, latents_of, seed=5, max_batches=2)
    validation_loss(loader(1, 2), score, latents_of, seed=5, max_batches=2, reduce_sum=capture)
    assert validation_loss(loader(0, 2), score, latents_of, seed=5, max_batches=2,
                           reduce_sum=lambda t: t + captured[-1]) \
        == pytest.approx(first2, rel=1e-12)


class _TwoProcessReduce:
    """accelerator.reduce(t, "mean") for this process, given the other process's tensor."""

    num_processes = 2

    def __init__(self, other: torch.Tensor):
        self.other = other

    def reduce(self, tensor: torch.Tensor, reduction: str) -> torch.Tensor:
        assert reduction == "mean"
        return (tensor + self.other) / 2


def test_gradient_average_is_one_flat_mean_with_missing_grads_as_zeros() -> None:
    for bucket_view in (False, True):
        a, b, frozen = (torch.nn.Parameter(torch.zeros(2, 3)), torch.nn.Parameter(torch.zeros(4)),
                        torch.nn.Parameter(torch.zeros(5), requires_grad=False))
        a.grad = torch.arange(6.0).view(2, 3)
        b.grad = None  # unused on this process (e.g. a module its batch never reached)
        other = torch.cat([torch.full((6,), 2.0), torch.tensor([1.0, 2.0, 3.0, 4.0])])  # the other process
        trainable = [p for p in (a, b, frozen) if p.requires_grad]  # what the step passes: `Trainable.params`
        Processes(_TwoProcessReduce(other), gradient_as_bucket_view=bucket_view).average_gradients(trainable)
        assert torch.equal(a.grad, (torch.arange(6.0).view(2, 3) + 2.0) / 2)
        assert torch.equal(b.grad, torch.tensor([0.5, 1.0, 1.5, 2.0]))
        assert frozen.grad is None
        shares_buffer = a.grad.untyped_storage().data_ptr() == b.grad.untyped_storage().data_ptr()
        assert shares_buffer == bucket_view  # --ddp_gradient_as_bucket_view: views into the reduced buffer
