"""What the UI lets a browser do: files only under the `--root` folders, a token off the loopback host, no
cross-site state changes.

- `Roots.resolve` turns a browser's path into a real path inside one of the roots, or refuses it: `..` parts are
  refused outright, and symlinks are resolved before the check, so a link pointing out of a root is refused too.
- Off 127.0.0.1 / ::1 / localhost a token (generated at start, printed once) is required on every request: as the
  `token` query parameter (which sets an HttpOnly, SameSite=Strict cookie), the cookie, or `Authorization: Bearer`.
- On the loopback host the Host header must name the loopback host (a DNS-rebinding page cannot pose as it).
- Every state-changing request (POST, PUT, PATCH, DELETE) must carry `X-CSRF-Token` (a secret the page reads from
  /api/info, which another site cannot read), and an `Origin` or `Sec-Fetch-Site`, when sent, must be this site.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

from fluxlora.errors import FluxLoraError

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})
TOKEN_COOKIE = "fluxlora_token"
CSRF_HEADER = "x-csrf-token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class AccessError(FluxLoraError):
    """A path outside the roots, a missing token, a cross-site request: refused with `status`."""

    def __init__(self, message: str, *, status: int = 403, path: str | Path | None = None, key: str | None = None):
        super().__init__(message, path=path, key=key)
        self.status = status


def needs_token(host: str) -> bool:
    """Only the loopback names serve without a token (any other bind address may be reachable from elsewhere)."""
    return host.strip("[]") not in LOOPBACK_HOSTS


@dataclass(frozen=True)
class Roots:
    """The folders the browser may read and write in (resolved once, at start)."""

    paths: tuple[Path, ...]

    @classmethod
    def of(cls, folders: Iterable[str | Path]) -> Roots:
        resolved = []
        for folder in folders:
            path = Path(folder).expanduser().resolve()
            if not path.is_dir():
                raise FluxLoraError(f"--root {folder}: no such folder; create it or choose another", path=folder,
                                    key="--root")
            resolved.append(path)
        if not resolved:
            raise FluxLoraError("give at least one --root folder", key="--root")
        return cls(tuple(resolved))

    def resolve(self, value: str | Path, *, must_exist: bool = False) -> Path:
        """The real path of `value` (absolute, or relative to the first root) if it lies inside a root."""
        text = str(value).strip()
        if not text:
            raise AccessError("empty path", status=400)
        if "\x00" in text:
            raise AccessError("a path may not contain NUL", status=400)
        parts = PurePosixPath(text.replace("\\", "/")).parts
        if ".." in parts:
            raise AccessError(f"{text}: '..' is not allowed in paths; give the path inside a root", path=text)
        path = Path(text).expanduser()
        if not path.is_absolute():
            path = self.paths[0] / path
        real = path.resolve()  # follows every symlink, existing or not
        if not any(real == root or real.is_relative_to(root) for root in self.paths):
            raise AccessError(f"{text}: outside the folders this UI may use ({', '.join(map(str, self.paths))})",
                              path=text)
        if must_exist and not real.exists():
            raise AccessError(f"{text}: no such file or folder", status=404, path=text)
        return real

    def contains(self, value: str | Path) -> bool:
        try:
            self.resolve(value)
        except AccessError:
            return False
        return True


@dataclass
class Guard:
    """The per-server secrets and the checks of each request (see the module docstring)."""

    host: str
    port: int
    token: str | None = None
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(24))

    @classmethod
    def for_host(cls, host: str, port: int) -> Guard:
        return cls(host=host, port=port, token=secrets.token_urlsafe(24) if needs_token(host) else None)

    def allowed_hosts(self) -> set[str]:
        names = ["127.0.0.1", "localhost", "[::1]"] if not needs_token(self.host) else [self.host]
        return {f"{name}:{self.port}" for name in names} | set(names)

    def check_token(self, presented: str | None) -> None:
        if self.token is None:
            return
        if not presented or not hmac.compare_digest(presented.encode(), self.token.encode()):
            raise AccessError("this UI needs its token (printed when it started): open the URL with ?token=...",
                              status=401)

    def check_host(self, host_header: str | None) -> None:
        if self.token is not None:
            return  # the token protects a public bind; the Host may be any name of the machine
        if (host_header or "").lower() not in self.allowed_hosts():
            raise AccessError(f"Host {host_header!r} is not this UI's loopback address; open "
                              f"http://127.0.0.1:{self.port}/", status=403)

    def check_csrf(self, method: str, headers: dict[str, str]) -> None:
        if method.upper() in SAFE_METHODS:
            return
        site = headers.get("sec-fetch-site")
        if site is not None and site not in ("same-origin", "none"):
            raise AccessError(f"cross-site request refused (Sec-Fetch-Site: {site})")
        origin = headers.get("origin")
        if origin is not None and urlsplit(origin).netloc.lower() != (headers.get("host") or "").lower():
            raise AccessError(f"cross-site request refused (Origin {origin})")
        presented = headers.get(CSRF_HEADER, "")
        if not hmac.compare_digest(presented.encode(), self.csrf.encode()):
            raise AccessError("missing or wrong X-CSRF-Token: reload the page", status=403)


__all__ = ["AccessError", "Guard", "LOOPBACK_HOSTS", "Roots", "TOKEN_COOKIE", "needs_token"]
