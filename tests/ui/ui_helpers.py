"""Start a real `fluxlora ui` process and talk to it over HTTP (standard library only), and launch Debian's Chromium
for the browser test. A module of its own: `conftest` names clash across test folders."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("FLUXLORA_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]


@dataclass
class UIServer:
    proc: subprocess.Popen
    url: str  # http://host:port (no trailing slash)
    token: str | None
    output: list[str] = field(default_factory=list)
    csrf: str = ""

    def request(self, method: str, path: str, body: Any = None, *, raw: bytes | None = None,
                headers: dict[str, str] | None = None, csrf: bool = True, token: bool = True,
                timeout: float = 120) -> tuple[int, Any]:
        """(status, parsed JSON or raw bytes) of one request; CSRF header and token added unless told not to."""
        hdrs = dict(headers or {})
        if csrf and method != "GET":
            hdrs.setdefault("X-CSRF-Token", self.csrf)
        if token and self.token:
            hdrs.setdefault("Authorization", f"Bearer {self.token}")
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
            hdrs.setdefault("Content-Type", "application/json")
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=hdrs)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                status, payload = resp.status, resp.read()
        except urllib.error.HTTPError as err:
            status, payload = err.code, err.read()
        try:
            return status, json.loads(payload)
        except ValueError:
            return status, payload

    def stop(self, sig: int | None = None) -> None:
        if self.proc.poll() is None:
            if sig is None:
                self.proc.terminate()
            else:
                self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start_ui(roots: list[Path], state_dir: Path, *, host: str = "127.0.0.1", extra: tuple[str, ...] = (),
             env: dict[str, str] | None = None, timeout: float = 120) -> UIServer:
    """`fluxlora ui --port 0` as a subprocess; waits for the URL it prints (and the token off loopback)."""
    command = [sys.executable, "-m", "fluxlora.cli", "ui", "--host", host, "--port", "0", "--state_dir", str(state_dir),
               *[a for r in roots for a in ("--root", str(r))], *extra]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                            env={**os.environ, **(env or {})})
    output: list[str] = []
    deadline = time.monotonic() + timeout
    url = token = None
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        output.append(line.rstrip())
        if line.startswith("fluxlora ui: http"):
            address = line.split(": ", 1)[1].strip()
            url, _, query = address.partition("/?")
            url = url.rstrip("/")
            token = query.split("token=", 1)[1] if "token=" in query else None
        if line.startswith("fluxlora ui: roots"):
            break
    if url is None:
        proc.kill()
        raise AssertionError("fluxlora ui did not start:\n" + "\n".join(output))
    server = UIServer(proc=proc, url=url, token=token, output=output)
    # keep draining its output so a chatty server never blocks on a full pipe
    import threading

    threading.Thread(target=lambda: [output.append(x.rstrip()) for x in proc.stdout], daemon=True).start()
    status, info = server.request("GET", "/api/info")
    assert status == 200, info
    server.csrf = info["csrf"]
    return server


def launch_chromium(playwright: Any, user_data_dir: Path) -> Any:
    """Debian's Chromium under Playwright (never a downloaded browser); a missing browser fails with the fix."""
    if not Path(CHROMIUM).is_file() or shutil.which(CHROMIUM) is None:
        pytest.fail(f"Chromium not found at {CHROMIUM}: install it with `apt-get install -y chromium` (the browser tests "
                    "drive Debian's Chromium; .ci/run installs it) or set FLUXLORA_CHROMIUM", pytrace=False)
    return playwright.chromium.launch_persistent_context(
        str(user_data_dir), executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS,
        viewport={"width": 1280, "height": 900})


__all__ = ["CHROMIUM", "UIServer", "launch_chromium", "start_ui"]
