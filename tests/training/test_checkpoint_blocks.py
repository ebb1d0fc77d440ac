"""`--checkpoint_blocks N|auto`: the planner's estimate per number of checkpointed blocks, its advice, `auto`,
the flag's validation, `fluxlora check`, and a short training run with one checkpointed block."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import load_file

from fluxlora.config.train_config import parse_train_config
from fluxlora.errors import ConfigError
from fluxlora.families.flux1.shape import ACTIVATION_BYTES_PER_TOKEN_PER_WIDTH, flux_shape
from fluxlora.models.flux import FluxParams
from fluxlora.training.blocks import policy_of
from fluxlora.training.cli import check_main, train
from fluxlora.training.memory import swap_split
from fluxlora.training.plan import build_plan
from fluxlora.training.planner import BACKWARD_BLOCKS, Workload, estimate, fits_advice

GB = 1e9
DEV = flux_shape(FluxParams.dev())
MEDIUM = flux_shape(FluxParams(depth=2, depth_single_blocks=2))


def _peak(**kw) -> int:
    return estimate(Workload(**kw)).device_peak


def _old_activations(w: Workload) -> int:
    """The planner's activation formula before --checkpoint_blocks (every block or none checkpointed)."""
    m = w.shape
    tokens = w.batch_size * (w.image_tokens + w.text_tokens)
    key = "fp32" if w.compute_dtype is None else "bf16"
    per_d = ACTIVATION_BYTES_PER_TOKEN_PER_WIDTH[(key, "double")] * m.width * tokens
    per_s = ACTIVATION_BYTES_PER_TOKEN_PER_WIDTH[(key, "single")] * m.width * tokens
    if w.gradient_checkpointing:
        kept = (m.double_blocks + m.single_blocks) * tokens * m.width * (4 if key == "fp32" else 2)
        return int(kept + (1 + BACKWARD_BLOCKS) * max(per_d, per_s))
    return int(m.double_blocks * per_d + m.single_blocks * per_s + BACKWARD_BLOCKS * max(per_d, per_s))


def _activations(w: Workload) -> int:
    return sum(v for k, v in estimate(w).device.items() if k.startswith("activations"))


@pytest.mark.parametrize("kw", [
    {"shape": DEV},  # 1024², bf16 autocast
    {"shape": DEV, "image_tokens": 1024, "fp8": True},
    {"shape": MEDIUM, "image_tokens": 256, "weight_dtype": torch.float32, "compute_dtype": None},
], ids=["dev-1024", "dev-512-fp8", "medium-fp32"])
def test_estimate_falls_with_every_checkpointed_block_and_keeps_the_old_ends(kw):
    total = kw["shape"].double_blocks + kw["shape"].single_blocks
    peaks = [_peak(**kw, gradient_checkpointing=True, checkpoint_blocks=n) for n in range(total + 1)]
    assert all(a > b for a, b in zip(peaks[:-1], peaks[1:-1], strict=False)), peaks
    # The last block is backpropagated first, while the largest block's recompute is the peak anyway: checkpointing
    # it too only adds its kept input (one activation of the stream) — the estimate says so honestly.
    w = Workload(**kw)
    stream = w.batch_size * (w.image_tokens + w.text_tokens) * w.shape.width * (2 if w.compute_dtype else 4)
    assert peaks[-1] - peaks[-2] == stream
    none, every = Workload(**kw), Workload(**kw, gradient_checkpointing=True)
    assert peaks[0] == estimate(none).device_peak and peaks[-1] == estimate(every).device_peak
    assert _activations(none) == _old_activations(none)
    assert _activations(every) == _old_activations(every)
    assert _activations(Workload(**kw, gradient_checkpointing=True, checkpoint_blocks=total)) == _old_activations(every)


def test_estimate_with_swap_counts_the_swapped_blocks_as_checkpointed():
    swapped = sum(swap_split(4))  # 2 double + 4 single
    peaks = [_peak(shape=DEV, gradient_checkpointing=True, blocks_to_swap=4, checkpoint_blocks=n)
             for n in range(swapped, 58)]
    assert all(a > b for a, b in zip(peaks, peaks[1:], strict=False))
    # fewer than the swapped blocks cannot be: they are checkpointed anyway
    assert _peak(shape=DEV, gradient_checkpointing=True, blocks_to_swap=4, checkpoint_blocks=0) == peaks[0]
    assert peaks[-1] == _peak(shape=DEV, gradient_checkpointing=True, blocks_to_swap=4)


def test_cpu_offload_moves_only_the_checkpointed_inputs_to_the_host():
    kw = {"shape": DEV, "gradient_checkpointing": True, "cpu_offload_checkpointing": True}
    host = [estimate(Workload(**kw, checkpoint_blocks=n)).host["checkpointed block inputs"] for n in (10, 20, 57)]
    assert host[0] * 2 == host[1] and host[0] * 57 == host[2] * 10


def test_advice_names_the_fewest_checkpointed_blocks_that_fit():
    w = Workload(shape=DEV)  # 1024², bf16: ~68 GB without checkpointing, ~28 GB with every block
    for available, prefix in ((45, "add --gradient_checkpointing --checkpoint_blocks "), (30, "add --gradient_che")):
        advice = fits_advice(w, int(available * GB))
        assert advice is not None and advice.startswith(prefix)
        n = int(advice.rsplit(" ", 1)[1])
        assert 0 < n < 57
        assert _peak(shape=DEV, gradient_checkpointing=True, checkpoint_blocks=n) <= available * GB
        assert _peak(shape=DEV, gradient_checkpointing=True, checkpoint_blocks=n - 1) > available * GB
        too_few = fits_advice(Workload(shape=DEV, gradient_checkpointing=True, checkpoint_blocks=5),
                              int(available * GB))
        assert too_few == f"set --checkpoint_blocks {n}"
    # below what every checkpointed block needs, the advice moves on to fp8 and block swap
    assert fits_advice(Workload(shape=DEV, gradient_checkpointing=True, checkpoint_blocks=5), int(20 * GB)) == \
        "add --fp8_base and remove --checkpoint_blocks"


def test_auto_checkpoints_every_block_without_a_gpu(train_argv, caplog):
    cfg = parse_train_config(train_argv("--gradient_checkpointing", "--checkpoint_blocks=auto"))
    with caplog.at_level(logging.INFO, logger="fluxlora.training.plan"):
        assert build_plan(cfg).checkpointed is None  # None = every block
    assert "--checkpoint_blocks auto: no GPU, all 4 blocks are checkpointed" in caplog.text
    fixed = parse_train_config(train_argv("--gradient_checkpointing", "--checkpoint_blocks=3"))
    assert build_plan(fixed).checkpointed == {0, 1, 2}
    assert build_plan(parse_train_config(train_argv())).checkpointed == frozenset()  # checkpointing off


@pytest.mark.parametrize(("flags", "message"), [
    (["--checkpoint_blocks=2"], "--checkpoint_blocks 2 needs --gradient_checkpointing"),
    (["--checkpoint_blocks=auto"], "--checkpoint_blocks auto needs --gradient_checkpointing"),
    (["--gradient_checkpointing", "--checkpoint_blocks=-1"], "--checkpoint_blocks -1 must be 0 or more"),
    (["--gradient_checkpointing", "--blocks_to_swap=4", "--checkpoint_blocks=5"],
     "--checkpoint_blocks 5 is below the 6 blocks --blocks_to_swap 4 streams"),
    (["--gradient_checkpointing", "--checkpoint_blocks=some"], "'some' is neither an integer nor 'auto'"),
])
def test_bad_checkpoint_blocks_are_refused_naming_the_flag(train_argv, flags, message):
    with pytest.raises(ConfigError, match=message) as err:
        parse_train_config(train_argv(*flags))
    assert "--checkpoint_blocks" in str(err.value)


def test_more_blocks_than_the_model_has_is_refused_in_preflight(train_argv):
    cfg = parse_train_config(train_argv("--gradient_checkpointing", "--checkpoint_blocks=5"))
    with pytest.raises(ConfigError, match=r"--checkpoint_blocks 5: this model has 2 double and 2 single blocks, so "
                                          r"at most 4") as err:
        build_plan(cfg)
    assert err.value.key == "--checkpoint_blocks"
    build_plan(parse_train_config(train_argv("--gradient_checkpointing", "--checkpoint_blocks=4")))


def test_check_prints_how_many_blocks_are_checkpointed(train_argv, capsys):
    assert check_main(train_argv("--gradient_checkpointing", "--checkpoint_blocks=1")) == 0
    assert "gradient checkpointing: 1 of 4 blocks" in capsys.readouterr().out
    assert check_main(train_argv("--gradient_checkpointing", "--checkpoint_blocks=auto")) == 0
    assert "gradient checkpointing: 4 of 4 blocks (--checkpoint_blocks auto: without a GPU auto checkpoints every " \
           "block)" in capsys.readouterr().out


@pytest.mark.parametrize("family", ["flux1", "chroma", "kontext"])
def test_training_with_one_checkpointed_block_equals_checkpointing_all(train_argv, tmp_path, family):
    seen, calls = [], [0] * 4

    def spy(run, step):
        blocks = run.models.layout.sequence
        seen.append(frozenset(i for i, b in enumerate(blocks) if policy_of(b).checkpointed))
        if step == 1:  # count block runs during the second step: a checkpointed block runs again in backward
            for i, block in enumerate(blocks):
                block.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))

    partial = train(train_argv("--max_train_steps=2", "--gradient_checkpointing", "--checkpoint_blocks=1",
                               output_dir=tmp_path / "one", family=family), callbacks=[spy])
    every = train(train_argv("--max_train_steps=2", "--gradient_checkpointing", output_dir=tmp_path / "all",
                             family=family))
    assert seen == [frozenset({0}), frozenset({0})]  # the first double block only
    assert calls == [2, 1, 1, 1]
    assert partial.losses == every.losses and len(partial.losses) == 2
    a, b = load_file(str(partial.final_lora)), load_file(str(every.final_lora))
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.equal(a[key], b[key]), key
