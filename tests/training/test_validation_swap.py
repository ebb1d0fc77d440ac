"""Validation loss does not change when block swap is switched on (issue 6 acceptance).

Block swap needs blocks to spare, so this uses a tiny-width FLUX with 4 double + 6 single blocks (the shared tiny
model has 2 + 2, of which none can be swapped). On the CPU the swap machinery runs with the same scheduling code
as on a GPU, copying between host buffers and the "device" slots.
"""

from __future__ import annotations

import dataclasses

from fluxlora.files import save_safetensors
from fluxlora.models.tiny import random_flux, tiny_flux_params
from fluxlora.training.cli import train

SPLIT = "validation_split = 0.5\nvalidation_seed = 3"


def test_validation_and_losses_are_the_same_with_block_swap(train_argv, tmp_path):
    deep = dataclasses.replace(tiny_flux_params("dev"), depth=4, depth_single_blocks=6)
    flux = tmp_path / "deep-flux.safetensors"
    save_safetensors(flux, random_flux(deep, seed=0).state_dict())

    def run(swap: int, out: str):
        argv = [a if not a.startswith("--pretrained_model_name_or_path=") else f"--pretrained_model_name_or_path={flux}"
                for a in train_argv("--max_train_steps=2", "--gradient_checkpointing", "--validate_every_n_steps=1",
                                    f"--blocks_to_swap={swap}", toml_extra=SPLIT, output_dir=tmp_path / out)]
        return train(argv)

    plain, swapped = run(0, "plain"), run(2, "swap")
    assert swapped.validation and swapped.validation == plain.validation
    assert swapped.losses == plain.losses
