"""The run's control channel (`fluxlora.training.control`): commands dropped into the control folder are acted on
between steps (save: LoRA + resumable state, sample: images now, stop: the SIGINT path, exactly resumable), and the
event log records every step, file, command and the outcome with its exit code."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
from safetensors.torch import load_file

from fluxlora.errors import ConfigError
from fluxlora.training.cli import train
from fluxlora.training.control import (
    EventLog,
    control_dir,
    ctl_main,
    events_path,
    pending_commands,
    read_events,
    send_command,
)
from fluxlora.training.state import load_state
from fluxlora.training.trainer import TrainingInterrupted


def test_commands_are_written_whole_and_read_oldest_first(tmp_path):
    first = send_command(tmp_path, "run", "save")
    second = send_command(tmp_path, "run", "stop")
    folder = control_dir(tmp_path, "run")
    assert folder == tmp_path / ".run.control"
    (folder / "commands" / ".half-written.json.tmp").write_text("{", encoding="utf-8")  # a write in progress
    (folder / "commands" / "00-broken.json").write_text("not json", encoding="utf-8")
    found = pending_commands(folder)
    assert [(c.name, c.id) for c in found] == [("save", first), ("stop", second)]
    assert not (folder / "commands" / "00-broken.json").exists()  # dropped, with a warning
    assert (folder / "commands" / ".half-written.json.tmp").exists()  # never touched
    with pytest.raises(ValueError, match="unknown command"):
        send_command(tmp_path, "run", "explode")


def test_event_log_reads_whole_lines_only_and_waits_for_the_output_folder(tmp_path):
    out = tmp_path / "out"
    log = EventLog(events_path(out, None))
    log.write("loading", pid=1)
    assert not out.exists()  # a run that fails while loading leaves no output folder
    out.mkdir()
    log.write("step", step=1, loss=float("nan"), path=out)
    events, offset = read_events(log.path)
    assert [e["event"] for e in events] == ["loading", "step"]
    assert events[1]["loss"] is None and events[1]["path"] == str(out)  # JSON has no NaN
    with open(log.path, "a", encoding="utf-8") as handle:
        handle.write('{"event": "st')  # a line being written
    more, offset2 = read_events(log.path, offset)
    assert more == [] and offset2 == offset
    with open(log.path, "a", encoding="utf-8") as handle:
        handle.write('ep", "step": 2}\n')
    more, _ = read_events(log.path, offset)
    assert more == [{"event": "step", "step": 2}]


def test_save_sample_stop_commands_act_between_steps_and_the_stop_resumes_exactly(train_argv, tmp_path):
    """ctl sends save after step 1 (LoRA + state although --save_state is off for it), sample after step 2, stop
    after step 3; the stopped run resumes to the same LoRA as an uninterrupted one, and the log tells it all."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of sks red square --w 32 --h 32 --s 2 --d 1\n", encoding="utf-8")
    out = tmp_path / "out"
    flags = ["--max_train_steps=5", "--save_state", f"--sample_prompts={prompts}"]
    sends = {1: "save", 2: "sample", 3: "stop"}
    seen_commands: list[int] = []

    def send(run, step):
        if step in sends:
            assert ctl_main([str(out), sends[step]]) == 0  # the user's `fluxlora ctl OUT CMD`
        seen_commands.append(len(pending_commands(control_dir(out, "lora"))))

    with pytest.raises(TrainingInterrupted) as stopped:
        train(train_argv(*flags, output_dir=out), callbacks=[send])
    assert stopped.value.exit_code == 130
    assert seen_commands == [1, 1, 1]  # each was pending after its step's user callback, then acted on the same step
    assert not pending_commands(control_dir(out, "lora"))

    # save: a step LoRA and a complete, loadable state of step 1
    assert load_state(out / "lora-step00000001-state").counters.global_step == 1
    load_file(str(out / "lora-step00000001.safetensors"))
    # sample: images of step 2 (sampled now, not on a schedule)
    assert [p.name.split("_")[:3] for p in (out / "sample").glob("*.png") if "grid" not in p.name] == \
        [["lora", "000002", "00"]]
    # stop: the SIGINT path's files
    assert load_state(out / "lora-state").counters.global_step == 3
    load_file(str(out / "lora-interrupted.safetensors"))

    events, _ = read_events(events_path(out, "lora"))
    kinds = [e["event"] for e in events]
    assert kinds[:2] == ["loading", "training"] and kinds[-1] == "failed"
    steps = [e for e in events if e["event"] == "step"]
    assert [e["step"] for e in steps] == [1, 2, 3]
    history = load_state(out / "lora-state").counters.loss_history
    assert [e["loss"] for e in steps] == pytest.approx(history)
    assert steps[-1]["avg_loss"] == pytest.approx(sum(history[-2:]) / 2)  # window = 2 batches per epoch
    assert all(e["s_per_step"] > 0 and e["eta_s"] >= 0 and e["lr"] == pytest.approx(1e-3) and e["ram_gb"] > 0
               for e in steps)
    done = {e["command"]: e for e in events if e["event"] == "command"}
    assert done["save"]["ok"] and set(done["save"]["files"]) >= {"lora-step00000001.safetensors",
                                                                  "lora-step00000001-state"}
    assert done["save"]["step"] == 1 and done["sample"]["step"] == 2 and done["stop"]["step"] == 3
    assert any(f.startswith("sample/") for f in done["sample"]["files"])
    assert events[-1]["exit_code"] == 130 and events[-1]["interrupted"]
    assert "interrupted by SIGINT at step 3" in events[-1]["error"]

    # resume from the state the stop saved: equal to an uninterrupted 5-step run
    result = train(train_argv(*flags, f"--resume={out / 'lora-state'}", output_dir=out))
    assert result.global_step == 5
    reference = train(train_argv(*flags, output_dir=tmp_path / "ref"))
    a, b = load_file(str(out / "lora.safetensors")), load_file(str(tmp_path / "ref" / "lora.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert result.losses == reference.losses
    events, _ = read_events(events_path(out, "lora"))
    assert events[-1]["event"] == "finished" and events[-1]["exit_code"] == 0 and events[-1]["steps"] == 5
    assert [e["step"] for e in events if e["event"] == "step"] == [1, 2, 3, 4, 5]


def test_commands_from_before_the_process_started_are_dropped(train_argv, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    send_command(out, "lora", "stop")  # clicked while no trainer ran
    stale = next((control_dir(out, "lora") / "commands").iterdir())
    old = time.time() - 3600
    os.utime(stale, (old, old))
    data = json.loads(stale.read_text())
    stale.write_text(json.dumps({**data, "sent": old}))
    result = train(train_argv("--max_train_steps=2", output_dir=out))
    assert result.global_step == 2  # not stopped
    events, _ = read_events(events_path(out, "lora"))
    dropped = [e for e in events if e["event"] == "command"]
    assert len(dropped) == 1 and not dropped[0]["ok"] and "before this training process started" in dropped[0]["message"]
    assert events[-1]["event"] == "finished"


def test_a_failure_while_loading_is_logged_with_its_exit_code(train_argv, tmp_path, monkeypatch):
    from fluxlora.errors import CheckpointError

    def broken(plan):
        raise CheckpointError("flux1-dev.safetensors: truncated file\nsecond line", key="--pretrained_model_name_or_path")

    monkeypatch.setattr("fluxlora.training.setup.build_run", broken)
    out = tmp_path / "out"
    out.mkdir()  # as the UI does before launching
    with pytest.raises(CheckpointError):
        train(train_argv("--max_train_steps=2", output_dir=out))
    events, _ = read_events(events_path(out, "lora"))
    assert [e["event"] for e in events] == ["loading", "failed"]
    assert events[-1]["exit_code"] == 2 and events[-1]["error"] == "flux1-dev.safetensors: truncated file"


def test_ctl_finds_the_run_and_refuses_what_it_cannot_do(tmp_path, capsys):
    with pytest.raises(ConfigError, match="no training run has started here"):
        ctl_main([str(tmp_path), "save"])
    EventLog(events_path(tmp_path, "a")).write("training", step=0)
    assert ctl_main([str(tmp_path), "sample"]) == 0
    assert [c.name for c in pending_commands(control_dir(tmp_path, "a"))] == ["sample"]
    assert "sent sample" in capsys.readouterr().out
    EventLog(events_path(tmp_path, "b")).write("finished", exit_code=0)
    with pytest.raises(ConfigError, match="several runs trained here"):
        ctl_main([str(tmp_path), "stop"])
    with pytest.raises(ConfigError, match="has ended"):
        ctl_main([str(tmp_path), "stop", "--output_name", "b"])
    assert ctl_main([str(tmp_path), "stop", "--output_name", "a", "--wait", "0.3"]) == 1  # nobody acts on it
    assert "no answer within" in capsys.readouterr().err
