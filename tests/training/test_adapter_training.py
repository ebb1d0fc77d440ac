"""Every adapter algorithm through the real trainer on the tiny checkpoints: the loss falls, resume is bit-exact,
the saved file carries the algorithm's LyCORIS keys and `ss_network_module` / `ss_network_args`."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from fluxlora.training.cli import train

# (network module, network args): one case per algorithm, at the settings a user would pick on FLUX
ALGOS = {
    "lokr": ("lycoris.kohya", ["algo=lokr", "factor=4"]),
    "loha": ("lycoris.kohya", ["algo=loha"]),
    "locon": ("lycoris.kohya", ["algo=locon"]),
    "full": ("lycoris.kohya", ["algo=full"]),
    "dora": ("networks.lora_flux", ["dora_wd=True"]),
    "lokr-dora": ("lycoris.kohya", ["algo=lokr", "factor=4", "dora_wd=True"]),
}
KEYS = {"lokr": "lokr_w1", "loha": "hada_w1_a", "locon": "lora_up.weight", "full": "diff", "dora": "dora_scale",
        "lokr-dora": "dora_scale"}


def _flags(case: str) -> list[str]:
    module, args = ALGOS[case]
    return [f"--network_module={module}", "--network_args", *args]


@pytest.mark.parametrize("case", list(ALGOS))
def test_resume_is_bit_identical_and_the_file_is_lycoris(case, train_argv, tmp_path):
    flags = _flags(case)
    full = train(train_argv("--max_train_steps=4", *flags, output_dir=tmp_path / "full"))
    first = train(train_argv("--max_train_steps=2", "--save_state", *flags, output_dir=tmp_path / "a"))
    second = train(train_argv("--max_train_steps=4", f"--resume={tmp_path / 'a' / 'lora-state'}", *flags,
                              output_dir=tmp_path / "b"))
    assert first.losses == full.losses[:2] and second.losses == full.losses
    a, b = load_file(str(tmp_path / "full" / "lora.safetensors")), load_file(str(tmp_path / "b" / "lora.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.endswith("." + KEYS[case]) for k in a)
    assert all(k.startswith("lora_unet_") for k in a)
    with safe_open(str(tmp_path / "b" / "lora.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == ALGOS[case][0]
    assert json.loads(meta["ss_network_args"]) == dict(a.split("=") for a in ALGOS[case][1])


@pytest.mark.slow
@pytest.mark.parametrize("case", list(ALGOS))
def test_loss_falls_when_overfitting_one_image(case, train_argv):
    lr = {"full": "5e-4", "lokr": "2e-2", "lokr-dora": "2e-2"}.get(case, "5e-3")  # LoKr has few parameters
    result = train(train_argv("--max_train_steps=30", f"--learning_rate={lr}", "--timestep_sampling=sigmoid",
                              "--network_dim=8", "--cache_latents", *_flags(case), batch_size=1))
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < 0.6 * first, (first, last)
