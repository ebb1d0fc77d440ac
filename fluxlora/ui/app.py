"""The web app: Starlette routes over the UI's modules (datasets, catalog, forms, jobs), the security middleware,
and the static front-end (plain HTML/JS/CSS and a vendored uPlot; no build step, nothing from a CDN).

Every handler is thin: it resolves paths through `Roots`, calls one function, and turns the project's errors into
`{"error": message, "errors": [{field, message}]}` with a 4xx status.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from fluxlora.errors import FluxLoraError
from fluxlora.training.control import COMMANDS, events_path, output_files, read_events
from fluxlora.ui import catalog, datasets, forms
from fluxlora.ui.jobs import JobManager, log_tail, newest_state
from fluxlora.ui.security import TOKEN_COOKIE, AccessError, Guard, Roots

logger = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
MAX_EVENTS_PER_CALL = 5000


@dataclass
class UIContext:
    roots: Roots
    state_dir: Path
    guard: Guard
    jobs: JobManager
    max_upload_bytes: int


# ---- security middleware ----------------------------------------------------------------------------------------
class GuardMiddleware:
    """Host, token and CSRF checks before any route runs (see `fluxlora.ui.security`)."""

    def __init__(self, app: Callable, guard: Guard):
        self.app = app
        self.guard = guard

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        try:
            self.guard.check_host(headers.get("host"))
            if self.guard.token is not None:
                offered = (query.get("token") or [None])[0]
                if offered is not None and scope["method"] == "GET":
                    self.guard.check_token(offered)
                    # keep the token out of the address bar and history: a cookie from now on
                    rest = {k: v for k, v in query.items() if k != "token"}
                    target = scope["path"] + ("?" + urlencode(rest, doseq=True) if rest else "")
                    response = RedirectResponse(target, status_code=303)
                    response.set_cookie(TOKEN_COOKIE, offered, httponly=True, samesite="strict")
                    await response(scope, receive, send)
                    return
                cookie = SimpleCookie(headers.get("cookie", ""))
                bearer = headers.get("authorization", "")
                presented = bearer[7:] if bearer.lower().startswith("bearer ") else \
                    cookie[TOKEN_COOKIE].value if TOKEN_COOKIE in cookie else None
                self.guard.check_token(presented)
            self.guard.check_csrf(scope["method"], headers)
        except AccessError as err:
            await JSONResponse({"error": str(err)}, status_code=err.status)(scope, receive, send)
            return
        await self.app(scope, receive, send)


# ---- helpers ----------------------------------------------------------------------------------------------------
def _error(err: Exception) -> JSONResponse:
    if isinstance(err, forms.FormProblem):
        return JSONResponse({"error": str(err), "errors": err.errors}, status_code=400)
    if isinstance(err, AccessError):
        return JSONResponse({"error": str(err)}, status_code=err.status)
    if isinstance(err, FluxLoraError):
        return JSONResponse({"error": str(err), "errors": forms.split_problems(err)}, status_code=400)
    if isinstance(err, KeyError):
        return JSONResponse({"error": f"not found: {err}"}, status_code=404)
    return JSONResponse({"error": str(err)}, status_code=400)


def api(func: Callable) -> Callable:
    """A sync handler run in the thread pool, its known errors turned into JSON error responses."""

    @functools.wraps(func)
    async def endpoint(request: Request) -> Response:
        body: Any = None
        if request.method in ("POST", "PUT"):
            raw = await request.body()
            try:
                body = json.loads(raw) if raw.strip() else {}
            except ValueError:
                return JSONResponse({"error": "the request body must be JSON"}, status_code=400)
        try:
            result = await run_in_threadpool(func, request, body)
        except (FluxLoraError, forms.FormProblem, ValueError, KeyError) as err:
            return _error(err)
        return result if isinstance(result, Response) else JSONResponse(result)

    return endpoint


def ctx(request: Request) -> UIContext:
    return request.app.state.ctx


def _int(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


# ---- pages and files --------------------------------------------------------------------------------------------
async def index(request: Request) -> Response:
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})


@api
def info(request: Request, _: Any) -> dict:
    c = ctx(request)
    return {"csrf": c.guard.csrf, "roots": [str(r) for r in c.roots.paths], "devices": c.jobs.devices,
            "jobs_per_device": c.jobs.jobs_per_device, "max_upload_bytes": c.max_upload_bytes,
            "commands": list(COMMANDS)}


def _preset_sizes() -> tuple[int, ...]:
    from fluxlora.training.presets import VRAM_PRESETS_GB

    return VRAM_PRESETS_GB


@api
def browse(request: Request, _: Any) -> dict:
    return catalog.list_folder(ctx(request).roots, request.query_params.get("path"))


@api
def make_folder(request: Request, body: dict) -> dict:
    folder = ctx(request).roots.resolve(str(body.get("path", "")))
    folder.mkdir(parents=True, exist_ok=True)
    return {"path": str(folder)}


@api
def file_download(request: Request, _: Any) -> Response:
    path = ctx(request).roots.resolve(request.query_params.get("path", ""), must_exist=True)
    if not path.is_file():
        raise AccessError(f"{path}: not a file", status=404)
    download = request.query_params.get("download") == "1"
    return FileResponse(path, filename=path.name if download else None,
                        content_disposition_type="attachment" if download else "inline")


@api
def thumb(request: Request, _: Any) -> Response:
    path = ctx(request).roots.resolve(request.query_params.get("path", ""), must_exist=True)
    return Response(datasets.thumbnail(path), media_type="image/jpeg", headers={"Cache-Control": "no-cache"})


# ---- datasets ---------------------------------------------------------------------------------------------------
@api
def dataset(request: Request, _: Any) -> dict:
    q = request.query_params
    folder = ctx(request).roots.resolve(q.get("path", ""), must_exist=True)
    res = [int(v) for v in q.get("resolution", "1024").replace("x", ",").split(",") if v.strip()]
    settings = datasets.BucketSettings(
        resolution=(res[0], res[-1]), enable_bucket=q.get("enable_bucket", "1") == "1",
        bucket_no_upscale=q.get("bucket_no_upscale") == "1",
        min_bucket_reso=_int(q.get("min_bucket_reso"), min(256, *res)),
        max_bucket_reso=_int(q.get("max_bucket_reso"), max(1024, *res)),
        bucket_reso_steps=_int(q.get("bucket_reso_steps"), 64))
    return datasets.scan_folder(folder, caption_extension=q.get("caption_extension", ".txt"), buckets=settings)


@api
def caption(request: Request, body: dict) -> dict:
    image = ctx(request).roots.resolve(str(body.get("path", "")), must_exist=True)
    target = datasets.write_caption(image, str(body.get("caption", "")),
                                    caption_extension=str(body.get("caption_extension", ".txt")))
    return {"path": str(target), "caption": target.read_text(encoding="utf-8").strip()}


async def upload(request: Request) -> Response:
    """PUT the raw bytes of one file: refused by its Content-Length before reading, or as soon as the bytes
    received pass the limit; then checked with the trainer's readers before it takes its name."""
    c = ctx(request)
    limit = c.max_upload_bytes
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        return JSONResponse({"error": f"upload of {length} bytes refused: the limit is {limit} bytes "
                                      "(fluxlora ui --max_upload_mb)"}, status_code=413,
                            headers={"Connection": "close"})
    try:
        folder = c.roots.resolve(request.query_params.get("dir", ""), must_exist=True)
        name = datasets.check_upload_name(request.query_params.get("name", ""))
        if not folder.is_dir():
            raise AccessError(f"{folder}: not a folder", status=400)
    except (AccessError, FluxLoraError) as err:
        return _error(err)
    fd, tmp = datasets.temporary_upload(folder, name)
    received = 0
    try:
        with os.fdopen(fd, "wb") as handle:
            async for chunk in request.stream():
                received += len(chunk)
                if received > limit:
                    tmp.unlink(missing_ok=True)
                    return JSONResponse({"error": f"upload refused: more than the limit of {limit} bytes"},
                                        status_code=413, headers={"Connection": "close"})
                handle.write(chunk)
        overwrite = request.query_params.get("overwrite") == "1"
        result = await run_in_threadpool(datasets.finish_upload, tmp, folder / name, overwrite=overwrite)
    except FluxLoraError as err:
        return _error(err)
    finally:
        tmp.unlink(missing_ok=True)
    return JSONResponse(result)


@api
def dataset_toml(request: Request, body: dict) -> dict:
    roots = ctx(request).roots
    target = roots.resolve(str(body.get("path", "")))
    if target.suffix.lower() != ".toml":
        raise forms.FormProblem([{"field": "path", "message": f"{target.name}: a dataset config ends in .toml"}])
    subsets = []
    for subset in body.get("subsets") or []:
        folder = roots.resolve(str(subset.get("image_dir", "")), must_exist=True)
        subsets.append({**subset, "image_dir": str(folder)})
    if not subsets:
        raise forms.FormProblem([{"field": "image_dir", "message": "choose at least one image folder"}])
    res = [int(v) for v in str(body.get("resolution", "1024")).replace("x", ",").split(",") if v.strip()]
    text = datasets.dataset_toml(
        subsets, resolution=(res[0], res[-1]), batch_size=_int(body.get("batch_size"), 1),
        caption_extension=str(body.get("caption_extension", ".txt")),
        enable_bucket=bool(body.get("enable_bucket", True)), bucket_no_upscale=bool(body.get("bucket_no_upscale")),
        min_bucket_reso=_int(body.get("min_bucket_reso"), min(256, *res)),
        max_bucket_reso=_int(body.get("max_bucket_reso"), max(1024, *res)))
    datasets.write_dataset_toml(target, text)
    return {"path": str(target), "toml": text}


# ---- models, flags, plans ---------------------------------------------------------------------------------------
@api
def models(request: Request, _: Any) -> dict:
    return {"files": catalog.model_catalog(ctx(request).roots)}


@api
def flags(request: Request, _: Any) -> dict:
    from dataclasses import asdict

    return {"flags": [asdict(s) for s in forms.flag_specs()], "common": list(forms.COMMON_FLAGS),
            "defaults": forms.FORM_DEFAULTS, "presets_gb": list(_preset_sizes())}


@api
def plan(request: Request, body: dict) -> dict:
    c = ctx(request)
    return forms.plan_run(dict(body.get("values") or {}), c.roots, c.state_dir).as_dict()


@api
def presets(request: Request, body: dict) -> dict:
    c = ctx(request)
    sizes = [float(s) for s in body.get("sizes") or _preset_sizes()]
    return forms.presets(dict(body.get("values") or {}), c.roots, c.state_dir, sizes)


# ---- jobs -------------------------------------------------------------------------------------------------------
def job_view(c: UIContext, job_id: int, *, log_lines: int = 0) -> dict:
    job = c.jobs.store.get(job_id)
    view = job.as_dict()
    if job.kind == "train":
        files = output_files(Path(job.output_dir))
        view["files"] = sorted(files)
        view["loras"] = sorted(f for f in files if f.endswith(".safetensors"))
        view["samples"] = sorted(f for f in files if f.startswith("sample/"))
        view["resumable"] = newest_state(job.output_dir) is not None and job.status in ("stopped", "failed", "lost")
    else:
        folder = Path(job.output_dir)
        view["images"] = sorted(p.name for p in folder.glob("*.png")) if folder.is_dir() else []
    if log_lines:
        view["log"] = log_tail(job.log_path, log_lines)
    return view


@api
def jobs_list(request: Request, _: Any) -> dict:
    c = ctx(request)
    c.jobs.tick()
    return {"jobs": [job_view(c, j.id) for j in reversed(c.jobs.store.all())]}


@api
def job_create(request: Request, body: dict) -> dict:
    c = ctx(request)
    result = forms.plan_run(dict(body.get("values") or {}), c.roots, c.state_dir)
    if result.errors:
        raise forms.FormProblem(result.errors)
    output_dir = Path(result.output_dir or ".")
    name = str(body.get("name") or result.output_name or output_dir.name)
    argv = list(result.argv)
    if result.prepared is not None and result.prepared.cfg.training.seed is None:
        argv.append(f"--seed={result.prepared.seed}")  # the seed preflight drew: a resume must use the same
    job = c.jobs.submit(kind="train", name=name, argv=argv, output_dir=output_dir,
                        output_name=result.output_name, extra={"form": body.get("values")})
    return job_view(c, job.id)


@api
def job_detail(request: Request, _: Any) -> dict:
    c = ctx(request)
    return job_view(c, int(request.path_params["job_id"]), log_lines=_int(request.query_params.get("log"), 60))


@api
def job_events(request: Request, _: Any) -> dict:
    """Events of a run from byte `offset` on; `more` when the page should ask again at once."""
    c = ctx(request)
    job = c.jobs.store.get(int(request.path_params["job_id"]))
    offset = _int(request.query_params.get("offset"), 0)
    if job.kind != "train":
        return {"events": [], "offset": offset, "more": False}
    events, end = read_events(events_path(job.output_dir, job.output_name), offset, MAX_EVENTS_PER_CALL)
    return {"events": events, "offset": end, "more": len(events) == MAX_EVENTS_PER_CALL}


@api
def job_command(request: Request, body: dict) -> dict:
    command = str(body.get("command", ""))
    if command not in COMMANDS:
        raise forms.FormProblem([{"field": "command", "message": f"unknown command {command!r}"}])
    return ctx(request).jobs.command(int(request.path_params["job_id"]), command)


@api
def job_resume(request: Request, _: Any) -> dict:
    c = ctx(request)
    job = c.jobs.resume(int(request.path_params["job_id"]))
    return job_view(c, job.id)


# ---- outputs ----------------------------------------------------------------------------------------------------
@api
def outputs(request: Request, _: Any) -> dict:
    c = ctx(request)
    runs = []
    for job in reversed(c.jobs.store.all()):
        if job.kind != "train":
            continue
        folder = Path(job.output_dir)
        loras = [catalog.identify(folder / name) for name in sorted(output_files(folder))
                 if name.endswith(".safetensors") and (folder / name).is_file()]
        form = job.extra.get("form") or {}
        runs.append({"job": job.id, "name": job.name, "status": job.status, "output_dir": job.output_dir,
                     "loras": loras, "models": {k: form.get(k) for k in
                                                ("pretrained_model_name_or_path", "clip_l", "t5xxl", "ae")}})
    generated = [job_view(c, j.id) for j in reversed(c.jobs.store.all()) if j.kind == "generate"]
    return {"runs": runs, "generated": generated}


@api
def generate(request: Request, body: dict) -> dict:
    c = ctx(request)
    values = dict(body or {})
    lora = c.roots.resolve(str(values.get("lora_weights", "")), must_exist=True)
    values.setdefault("output_dir", str(lora.parent / "generated"))
    argv, out = forms.generate_argv(values, c.roots)
    out = c.roots.resolve(out)
    out.mkdir(parents=True, exist_ok=True)
    job = c.jobs.submit(kind="generate", name=f"generate with {lora.name}", argv=argv, output_dir=out,
                        output_name=None)
    return job_view(c, job.id)


def create_app(context: UIContext) -> Starlette:
    routes = [
        Route("/", index),
        Route("/api/info", info),
        Route("/api/browse", browse),
        Route("/api/mkdir", make_folder, methods=["POST"]),
        Route("/api/file", file_download),
        Route("/api/thumb", thumb),
        Route("/api/dataset", dataset),
        Route("/api/caption", caption, methods=["PUT"]),
        Route("/api/upload", upload, methods=["PUT"]),
        Route("/api/dataset/toml", dataset_toml, methods=["POST"]),
        Route("/api/models", models),
        Route("/api/flags", flags),
        Route("/api/plan", plan, methods=["POST"]),
        Route("/api/presets", presets, methods=["POST"]),
        Route("/api/jobs", jobs_list),
        Route("/api/jobs", job_create, methods=["POST"]),
        Route("/api/jobs/{job_id:int}", job_detail),
        Route("/api/jobs/{job_id:int}/events", job_events),
        Route("/api/jobs/{job_id:int}/command", job_command, methods=["POST"]),
        Route("/api/jobs/{job_id:int}/resume", job_resume, methods=["POST"]),
        Route("/api/outputs", outputs),
        Route("/api/generate", generate, methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    app = Starlette(routes=routes)
    app.state.ctx = context
    app.add_middleware(GuardMiddleware, guard=context.guard)
    return app


__all__ = ["UIContext", "create_app"]
