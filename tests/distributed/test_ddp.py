"""Issue 10 acceptance: `accelerate launch --num_processes 2` on CPU (gloo) with the tiny model.

One 2-process run of 10 steps (step-5 state, disk caches) is shared by the tests of this file:
- both processes end with the same LoRA tensors, equal (<= 1e-6) to a single-process run whose batch is the union
  of the two processes' batches (gradient accumulation 2 over the same two batches of the epoch list: the same
  images, captions and noise, since every draw is a function of (seed, epoch, batch index));
- the disk caches are built once: each process encodes its share, no file twice;
- a 2-process run interrupted by Ctrl-C and resumed gives the losses and LoRA of the uninterrupted run, and
  leaves exactly one set of complete output files.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from ddp_launch import REPO, accelerate_launch, launch_and_interrupt
from safetensors.torch import load_file

from fluxlora.training.cli import train
from fluxlora.training.control import events_path, read_events
from fluxlora.training.state import load_state

# Two processes each importing torch/transformers on a 2-core CPU: ~30-50 s per launch (three launches).
pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent
STEPS, SAVE_EVERY = 10, 5
CACHE_FLAGS = ("--cache_latents_to_disk", "--cache_text_encoder_outputs_to_disk")


def _argv(tiny, dataset: Path, toml: Path, out: Path, *extra: str) -> list[str]:
    toml.write_text(
        f'[general]\ncaption_extension = ".txt"\n[[datasets]]\nresolution = 64\nbatch_size = 2\n'
        f'validation_split = 0.5\nvalidation_seed = 1\n'
        f'  [[datasets.subsets]]\n  image_dir = "{dataset.as_posix()}"\n  num_repeats = 1\n', encoding="utf-8")
    return [f"--pretrained_model_name_or_path={tiny.flux_dev}", f"--clip_l={tiny.clip_l}", f"--t5xxl={tiny.t5xxl}",
            f"--ae={tiny.ae}", f"--dataset_config={toml}", f"--output_dir={out}", "--output_name=lora",
            "--network_module=networks.lora_flux", "--network_dim=4", "--learning_rate=1e-3", "--seed=7",
            "--t5xxl_max_token_length=16", "--network_train_unet_only", "--validate_every_n_epochs=5", *CACHE_FLAGS,
            *extra]


def _check(proc) -> str:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc.stdout + proc.stderr


def _cache_counts(log: str, what: str) -> list[tuple[int, int]]:
    """(reused, computed) of every process's cache build, from its log line."""
    return [(int(a), int(b)) for a, b in re.findall(rf"{what}: (\d+) reused, (\d+) computed", log)]


@pytest.fixture(scope="module")
def two_process_run(tiny_ckpts, ddp_dataset, tmp_path_factory):
    base = tmp_path_factory.mktemp("ddp")
    out = base / "two"
    argv = _argv(tiny_ckpts, ddp_dataset, base / "dataset.toml", out, f"--max_train_steps={STEPS}",
                 f"--save_every_n_steps={SAVE_EVERY}", "--save_state")
    proc = accelerate_launch(HERE / "ddp_worker.py", argv)
    return {"base": base, "out": out, "log": _check(proc), "argv": argv}


def test_processes_agree_and_equal_one_process_with_the_union_batch(two_process_run, tiny_ckpts, ddp_dataset):
    out = two_process_run["out"]
    p0, p1 = load_file(str(out / "process0.safetensors")), load_file(str(out / "process1.safetensors"))
    r0, r1 = (json.loads((out / f"process{i}.json").read_text()) for i in (0, 1))
    assert r0["num_processes"] == r1["num_processes"] == 2
    assert p0.keys() == p1.keys() and all(torch.equal(p0[k], p1[k]) for k in p0)
    assert len(r0["losses"]) == STEPS and r0["losses"] == r1["losses"]  # the logged loss is the mean over both
    assert any(float(v.abs().max()) > 0 for k, v in p0.items() if "lora_up" in k)  # it trained

    base = two_process_run["base"]
    single = train(_argv(tiny_ckpts, ddp_dataset, base / "single.toml", base / "single", f"--max_train_steps={STEPS}",
                         "--gradient_accumulation_steps=2"))
    ref = load_file(str(base / "single" / "lora.safetensors"))
    main = load_file(str(out / "lora.safetensors"))
    lora_keys = [k for k in ref if not k.endswith(".alpha")]
    assert len(lora_keys) > 0
    for k in lora_keys:
        assert torch.allclose(main[k], ref[k], rtol=0, atol=1e-6), (k, float((main[k] - ref[k]).abs().max()))
    assert single.losses == pytest.approx(r0["losses"], rel=1e-6, abs=1e-7)
    # validation: each process scores one of the two held-out batches; the mean over both is the 1-process value
    assert r0["validation"] == r1["validation"] and [s for s, _ in r0["validation"]] == [5, 10]
    assert [v for _, v in single.validation] == pytest.approx([v for _, v in r0["validation"]], rel=1e-6)


def test_disk_caches_are_built_once_across_processes(two_process_run, ddp_dataset):
    log = two_process_run["log"]
    latents, texts = _cache_counts(log, "latent cache"), _cache_counts(log, "text-encoder cache")
    # one line per process; each encoded its own half of the files, none twice
    assert sorted(latents) == [(0, 4), (0, 4)], latents  # 4 training + 4 validation images
    assert sorted(texts) == [(0, 4), (0, 4)], texts
    assert len(list(ddp_dataset.glob("*_flux_latents.safetensors"))) == 8
    assert len(list(ddp_dataset.glob("*_flux_te.safetensors"))) == 8


def test_step_state_of_a_two_process_run_holds_every_process_rng(two_process_run):
    saved = load_state(two_process_run["out"] / f"lora-step{SAVE_EVERY:08d}-state")
    assert saved.counters.global_step == SAVE_EVERY
    assert len(saved.rng_by_process) == 2  # every process's RNG state is in the folder
    assert saved.fingerprint["num_processes"] == 2


def test_a_save_command_is_acted_on_by_every_process_after_the_same_step(two_process_run):
    """ddp_worker.py drops a `save` command after step 2 on the main process only: the processes agree on it, so
    the state of step 2 holds both processes' RNG states, and the log records the command once."""
    out = two_process_run["out"]
    saved = load_state(out / "lora-step00000002-state")
    assert saved.counters.global_step == 2 and len(saved.rng_by_process) == 2
    events, _ = read_events(events_path(out, "lora"))
    commands = [e for e in events if e["event"] == "command"]
    assert len(commands) == 1 and commands[0]["command"] == "save" and commands[0]["step"] == 2
    assert "lora-step00000002-state" in commands[0]["files"]
    assert [e["step"] for e in events if e["event"] == "step"] == list(range(1, STEPS + 1))


def test_interrupted_two_process_run_resumes_exactly_with_one_set_of_outputs(two_process_run, tiny_ckpts,
                                                                              ddp_dataset):
    """Ctrl-C (SIGINT to every process and the launcher) after step 1: all processes stop after the same step and
    the main one saves; the resumed run ends as the uninterrupted one, bit for bit."""
    base, first = two_process_run["base"], two_process_run["out"]
    out = base / "interrupted"
    argv = _argv(tiny_ckpts, ddp_dataset, base / "int.toml", out, f"--max_train_steps={STEPS}", "--save_state",
                 "--save_every_n_steps=1")
    code, log = launch_and_interrupt(REPO / "flux_train_network.py", argv, out / "lora-step00000001.safetensors")
    assert code != 0 and "interrupted by SIGINT at step" in log, log[-4000:]
    stopped = load_state(out / "lora-state")
    assert 1 <= stopped.counters.global_step < STEPS and len(stopped.rng_by_process) == 2
    assert (out / "lora-interrupted.safetensors").is_file()

    resumed_out = base / "resumed"
    argv = _argv(tiny_ckpts, ddp_dataset, base / "resume.toml", resumed_out, f"--max_train_steps={STEPS}",
                 "--save_state", f"--resume={out / 'lora-state'}")
    log = _check(accelerate_launch(REPO / "flux_train_network.py", argv))  # the sd-scripts entry point

    full, resumed = load_state(first / "lora-state"), load_state(resumed_out / "lora-state")
    assert resumed.counters.global_step == STEPS
    assert resumed.counters.loss_history == full.counters.loss_history  # same losses as uninterrupted
    a, b = load_file(str(first / "lora.safetensors")), load_file(str(resumed_out / "lora.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the caches of the first run are reused by both processes
    assert sorted(_cache_counts(log, "latent cache")) == [(4, 0), (4, 0)]
    # one set of outputs, no temporary or partial files, each written once (only the main process saves)
    assert sorted(p.name for p in resumed_out.iterdir()) == [".lora.control", "lora-state", "lora.safetensors",
                                                             "loss.png"]
    # the event log is written by the main process only: every step of the resumed run once, then the outcome
    events, _ = read_events(events_path(resumed_out, "lora"))
    assert [e["step"] for e in events if e["event"] == "step"] == list(range(stopped.counters.global_step + 1,
                                                                             STEPS + 1))
    assert events[-1]["event"] == "finished"
    assert sorted(p.name for p in (resumed_out / "lora-state").iterdir()) == sorted(
        ["COMPLETE", "network.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "rng_1.pt",
         "train_state.json"])
    assert log.count(f"saved {resumed_out / 'lora.safetensors'}") == 1
