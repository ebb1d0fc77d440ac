"""`fluxlora ui [--host 127.0.0.1] [--port N] [--root DIR ...]`: serve the web app (uvicorn, one process)."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import threading
from pathlib import Path

from fluxlora.errors import ConfigError

DEFAULT_PORT = 7861
DEFAULT_UPLOAD_MB = 200


def default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base) / "fluxlora" / "ui"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fluxlora ui", description="A local web app to prepare datasets, plan, "
                                     "launch and watch training runs.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; any other "
                        "address needs the token printed at start)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0 = any free)")
    parser.add_argument("--root", action="append", default=None, metavar="DIR",
                        help="a folder the UI may read and write (datasets, models, outputs); repeatable "
                             "(default: the current folder)")
    parser.add_argument("--state_dir", type=Path, default=None,
                        help=f"where the job database and logs live (default {default_state_dir()})")
    parser.add_argument("--devices", default=None, help="comma-separated CUDA device ids to queue jobs on "
                        "(default: one queue, the devices the UI sees)")
    parser.add_argument("--jobs_per_device", type=int, default=1, help="jobs running at once per device (default 1)")
    parser.add_argument("--max_upload_mb", type=float, default=DEFAULT_UPLOAD_MB,
                        help=f"largest file an upload may send, in MB (default {DEFAULT_UPLOAD_MB})")
    return parser


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0 = the OS picks), so the URL printed is the real one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as err:
        sock.close()
        raise ConfigError(f"--host {host} --port {port}: cannot listen there ({err.strerror}); choose another port "
                          "(--port 0 picks a free one)", key="--port") from err
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def _warm_up() -> None:
    import fluxlora.training.cli  # noqa: F401
    import fluxlora.training.presets  # noqa: F401


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    import uvicorn

    from fluxlora.ui.app import UIContext, create_app
    from fluxlora.ui.jobs import JobManager
    from fluxlora.ui.security import Guard, Roots
    from fluxlora.ui.store import JobStore

    if args.jobs_per_device < 1:
        raise ConfigError("--jobs_per_device must be at least 1", key="--jobs_per_device")
    roots = Roots.of(args.root or [Path.cwd()])
    state_dir = (args.state_dir or default_state_dir()).expanduser().resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    sock = bind(args.host, args.port)
    port = sock.getsockname()[1]
    guard = Guard.for_host(args.host, port)
    devices = [d.strip() for d in args.devices.split(",") if d.strip()] if args.devices else None
    jobs = JobManager(JobStore(state_dir / "jobs.sqlite3"), state_dir, devices=devices,
                      jobs_per_device=args.jobs_per_device)
    app = create_app(UIContext(roots=roots, state_dir=state_dir, guard=guard, jobs=jobs,
                               max_upload_bytes=int(args.max_upload_mb * 1e6)))
    shown = f"[{args.host}]" if ":" in args.host else args.host
    url = f"http://{shown}:{port}/"
    if guard.token is not None:
        url += f"?token={guard.token}"
        print(f"fluxlora ui: listening on {args.host} (not loopback): every request needs the token below; "
              "it is shown only now", flush=True)
    print(f"fluxlora ui: {url}", flush=True)
    print(f"fluxlora ui: roots {', '.join(map(str, roots.paths))}; jobs and logs in {state_dir}", flush=True)
    jobs.start()  # re-attach to runs a previous UI left running
    # The planner and preflight import torch (seconds): do it now in the background, so the page answers at once
    # and the first Check does not wait for it.
    threading.Thread(target=_warm_up, name="fluxlora-ui-warm-up", daemon=True).start()
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    try:
        config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=2)
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        jobs.close()  # the training processes go on; a new UI re-attaches
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
