"""Stands in for `python -m fluxlora.cli train ARGV` in the job-queue tests: it writes the event log a trainer writes
(`fluxlora.training.control.EventLog`) and obeys `stop` as the trainer does, without torch, in a fraction of a second.

Environment: FAKE_DELAY (s per step), FAKE_EXIT (end with this exit code and a `failed` event), FAKE_SILENT (print an
error line and exit 2 before writing any event, like a command line that refuses its flags)."""

from __future__ import annotations

import os
import sys
import time

from fluxlora.training.control import EventLog, control_dir, events_path, pending_commands


def main(args: list[str]) -> int:
    argv = args[3:]  # after "-m fluxlora.cli train"
    opts = dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)
    if os.environ.get("FAKE_SILENT"):
        print("error: --learning_rate: invalid float value", file=sys.stderr)
        return 2
    out, name, steps = opts["output_dir"], opts.get("output_name"), int(opts.get("max_train_steps", "5"))
    log = EventLog(events_path(out, name))
    log.write("loading", pid=os.getpid())
    start = 3 if "--resume" in argv else 0  # a resumed run goes on from its state's step
    log.write("training", step=start, max_steps=steps)
    for step in range(start + 1, steps + 1):
        time.sleep(float(os.environ.get("FAKE_DELAY", "0.1")))
        log.write("step", step=step, max_steps=steps, loss=1.0 / step)
        commands = pending_commands(control_dir(out, name))
        for command in commands:
            command.path.unlink()
        if any(c.name == "stop" for c in commands):
            os.makedirs(os.path.join(out, f"{name}-state"), exist_ok=True)
            open(os.path.join(out, f"{name}-state", "COMPLETE"), "w").close()
            log.write("failed", exit_code=130, error=f"training interrupted by SIGINT at step {step}", interrupted=True)
            return 130
    code = int(os.environ.get("FAKE_EXIT", "0"))
    if code:
        log.write("failed", exit_code=code, error="boom")
        return code
    log.write("finished", exit_code=0, steps=steps)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
