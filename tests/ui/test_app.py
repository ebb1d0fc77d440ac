"""The UI's HTTP API on a real `fluxlora ui` process: files confined to the roots (no `..`, no symlink escape), CSRF
and Host checks on loopback, a token off loopback, uploads refused early when too large and checked with the
trainer's image reader."""

from __future__ import annotations

import http.client
import io
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from ui_helpers import start_ui


def _png(width: int = 48, height: int = 32) -> bytes:
    out = io.BytesIO()
    Image.fromarray((np.arange(width * height * 3) % 251).astype("uint8").reshape(height, width, 3)).save(out, "PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("ui_api")
    root, outside = base / "root", base / "outside"
    (root / "data").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret.txt").write_text("do not serve me", encoding="utf-8")
    (root / "data" / "escape").symlink_to(outside, target_is_directory=True)
    (root / "data" / "escape.txt").symlink_to(outside / "secret.txt")
    ui = start_ui([root], base / "state", extra=("--max_upload_mb", "1"))
    yield {"ui": ui, "root": root, "outside": outside}
    ui.stop()


def test_files_are_confined_to_the_roots(server):
    ui, root, outside = server["ui"], server["root"], server["outside"]
    (root / "data" / "ok.txt").write_text("fine", encoding="utf-8")
    status, body = ui.request("GET", f"/api/file?path={root / 'data' / 'ok.txt'}")
    assert status == 200 and body == b"fine"
    for path in (f"{root}/data/../../outside/secret.txt", "../outside/secret.txt", str(outside / "secret.txt"),
                 str(root / "data" / "escape" / "secret.txt"), str(root / "data" / "escape.txt")):
        status, body = ui.request("GET", f"/api/file?path={path}")
        assert status == 403, (path, body)
        assert b"do not serve me" not in (body if isinstance(body, bytes) else str(body).encode())
    status, body = ui.request("GET", f"/api/browse?path={root / 'data' / 'escape'}")
    assert status == 403 and "outside the folders" in body["error"]
    status, body = ui.request("GET", f"/api/browse?path={root / 'data'}")
    assert status == 200 and {e["name"] for e in body["entries"]} == {"ok.txt"}  # the links out are not listed
    status, body = ui.request("PUT", "/api/caption", {"path": str(root / "data" / "escape.txt"), "caption": "x"})
    assert status == 403 and (outside / "secret.txt").read_text() == "do not serve me"


def test_state_changes_need_the_csrf_token_and_the_same_site(server):
    ui, root = server["ui"], server["root"]
    target = root / "made"
    status, body = ui.request("POST", "/api/mkdir", {"path": str(target)}, csrf=False)
    assert status == 403 and "X-CSRF-Token" in body["error"] and not target.exists()
    status, _ = ui.request("POST", "/api/mkdir", {"path": str(target)}, headers={"Origin": "http://evil.example"})
    assert status == 403 and not target.exists()
    status, _ = ui.request("POST", "/api/mkdir", {"path": str(target)}, headers={"Sec-Fetch-Site": "cross-site"})
    assert status == 403 and not target.exists()
    status, _ = ui.request("GET", "/api/info", headers={"Host": "attacker.example"})  # DNS rebinding
    assert status == 403
    status, body = ui.request("POST", "/api/mkdir", {"path": str(target)})
    assert status == 200 and target.is_dir()


def test_a_2_gb_upload_is_refused_before_its_body_is_read(server):
    ui, root = server["ui"], server["root"]
    host, port = ui.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.putrequest("PUT", f"/api/upload?dir={root / 'data'}&name=huge.png")
    conn.putheader("Content-Length", str(2 * 10**9))
    conn.putheader("X-CSRF-Token", ui.csrf)
    conn.endheaders()
    conn.send(b"\x89PNG" + b"\0" * 65536)  # 64 KiB of the announced 2 GB; the answer must not wait for the rest
    response = conn.getresponse()
    assert response.status == 413 and b"limit is 1000000 bytes" in response.read()
    conn.close()
    assert not list((root / "data").glob("*huge*")) and not list((root / "data").glob(".*.tmp"))


def test_an_upload_without_length_is_cut_off_at_the_limit(server):
    ui, root = server["ui"], server["root"]
    host, port = ui.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=60)
    sock.sendall(f"PUT /api/upload?dir={root / 'data'}&name=chunked.png HTTP/1.1\r\nHost: {host}:{port}\r\n"
                 f"X-CSRF-Token: {ui.csrf}\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
    chunk = b"\0" * 65536
    answer = b""
    try:
        for _ in range(64):  # up to 4 MiB, four times the limit
            sock.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
    except OSError:
        pass  # the server answered and closed: what we want
    try:
        answer = sock.recv(4096)
    finally:
        sock.close()
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert not list((root / "data").glob("*chunked*")) and not list((root / "data").glob(".*.tmp"))


def test_uploads_are_checked_with_the_trainer_image_reader(server):
    ui, root = server["ui"], server["root"]
    folder = root / "data"
    status, body = ui.request("PUT", f"/api/upload?dir={folder}&name=good.png", raw=_png())
    assert status == 200 and body["size"] == [48, 32] and (folder / "good.png").is_file()
    status, body = ui.request("PUT", f"/api/upload?dir={folder}&name=good.png", raw=_png())
    assert status == 400 and "already exists" in body["error"]
    data = _png()
    status, body = ui.request("PUT", f"/api/upload?dir={folder}&name=cut.png", raw=data[: len(data) // 2])
    assert status == 400 and "cut.png" in body["error"] and not (folder / "cut.png").exists()
    status, body = ui.request("PUT", f"/api/upload?dir={folder}&name=wrong.jpg", raw=_png())
    assert status == 400 and "PNG but named .jpg" in body["error"]
    status, body = ui.request("PUT", f"/api/upload?dir={folder}&name=run.sh", raw=b"#!/bin/sh")
    assert status == 400 and "only images" in body["error"]
    status, body = ui.request("PUT", f"/api/upload?dir={folder}&name=..%2Fescape.png", raw=_png())
    assert status == 400 and not (root / "escape.png").exists()
    status, body = ui.request("PUT", f"/api/upload?dir={folder}&name=good.txt", raw="a caption".encode("utf-16"))
    assert status == 400 and "UTF-8" in body["error"]
    names = {p.name for p in folder.iterdir()}
    assert "good.png" in names and not names & {"cut.png", "wrong.jpg", "run.sh", "good.txt"}
    assert not list(folder.glob(".*.tmp"))  # refused uploads leave nothing behind


def test_off_loopback_every_request_needs_the_token(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    ui = start_ui([root], tmp_path / "state", host="127.0.0.2")
    try:
        assert ui.token and any("not loopback" in line for line in ui.output)
        assert sum(ui.token in line for line in ui.output) == 1  # printed once
        for path in ("/", "/api/info", "/static/app.js", f"/api/browse?path={root}"):
            status, body = ui.request("GET", path, token=False)
            assert status == 401 and "token" in body["error"], path
        status, _ = ui.request("GET", "/api/info", token=False, headers={"Authorization": "Bearer wrong"})
        assert status == 401
        status, _ = ui.request("GET", "/api/info")  # Bearer token
        assert status == 200
        host, port = ui.url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.request("GET", f"/?token={ui.token}")
        response = conn.getresponse()
        cookie = response.getheader("Set-Cookie") or ""
        assert response.status == 303 and response.getheader("Location") == "/"
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
        response.read()
        conn.request("GET", "/api/info", headers={"Cookie": cookie.split(";")[0]})
        assert conn.getresponse().status == 200
        conn.close()
    finally:
        ui.stop()


def test_unreachable_roots_are_refused_at_start(tmp_path):
    from fluxlora.errors import FluxLoraError
    from fluxlora.ui.security import Roots

    with pytest.raises(FluxLoraError, match="--root .*: no such folder"):
        Roots.of([tmp_path / "missing"])
    roots = Roots.of([tmp_path])
    assert roots.resolve("a/b.txt") == tmp_path.resolve() / "a" / "b.txt"  # relative = inside the first root
    assert not roots.contains(Path("/")) and roots.contains(tmp_path)
