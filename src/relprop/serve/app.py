"""The explorer's routes (Starlette): a hand-written page under /static and a JSON API under
/api/{model}/...; every error is JSON ``{"error": "..."}`` with a 4xx status (5xx only for a bug),
and the server keeps serving after any of them."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable, Optional

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..errors import InputError, RelpropError, TooLargeError, UnknownModelError
from . import export, views
from .models import ModelSet, ServedModel

STATIC = Path(__file__).parent / "static"
MAX_UPLOAD_BYTES = 8 * 1024 * 1024
MAX_PIXELS = 16_000_000
MAX_JSON_BYTES = 64 * 1024
CANVASES = 12
#: the page loads nothing but its own files; images are data: URLs, downloads blob: URLs
CSP = ("default-src 'self'; img-src 'self' data: blob:; object-src 'none'; base-uri 'none'; "
       "frame-ancestors 'none'; form-action 'none'")
SECURITY_HEADERS = [(b"content-security-policy", CSP.encode()), (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"no-referrer"), (b"x-frame-options", b"DENY"),
                    (b"cache-control", b"no-store")]
log = logging.getLogger("relprop.serve")


class SecurityHeaders:
    """Adds the CSP and friends to every response (pure ASGI: streaming responses too)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def with_headers(message):
            if message["type"] == "http.response.start":
                names = {name.lower() for name, _ in message.get("headers", [])}
                message["headers"] = list(message.get("headers", [])) + [
                    (name, value) for name, value in SECURITY_HEADERS if name not in names]
            await send(message)

        await self.app(scope, receive, with_headers)


def error_response(error: Exception) -> JSONResponse:
    if isinstance(error, UnknownModelError):
        status = 404
    elif isinstance(error, TooLargeError):
        status = 413
    elif isinstance(error, RelpropError):
        status = 400
    elif isinstance(error, HTTPException):
        return JSONResponse({"error": str(error.detail)}, status_code=error.status_code)
    else:
        log.exception("internal error")
        return JSONResponse({"error": f"internal error ({type(error).__name__}); the server keeps running"},
                            status_code=500)
    return JSONResponse({"error": str(error)}, status_code=status)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) past ``limit`` bytes without reading the rest."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise TooLargeError(f"the upload has {int(declared):,} bytes, over this server's limit of {limit:,}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise TooLargeError(f"the upload is over this server's limit of {limit:,} bytes")
    return bytes(body)


async def read_json(request: Request) -> dict:
    body = await read_body(request, MAX_JSON_BYTES)
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise InputError("the request is not valid JSON") from None
    if not isinstance(payload, dict):
        raise InputError("the request must be a JSON object")
    return payload


def create_app(models: ModelSet, max_upload_bytes: int = MAX_UPLOAD_BYTES, max_pixels: int = MAX_PIXELS,
               allowed_hosts: Optional[list[str]] = None) -> Starlette:
    """The explorer over ``models``. ``allowed_hosts``: the Host header values accepted (DNS
    rebinding protection for a server on 127.0.0.1); None accepts any."""
    store = views.ImageStore()

    async def compute(served: ServedModel, work: Callable[[], Any]) -> Any:
        def locked():
            with served.lock:
                return work()
        return await run_in_threadpool(locked)

    def api(handler):
        async def endpoint(request: Request):
            try:
                served = models.get(request.path_params["model"]) if "model" in request.path_params else None
                return await handler(request, served)
            except Exception as error:          # noqa: BLE001 -- every failure is a JSON answer, never a crash
                return error_response(error)
        return endpoint

    def source(served: ServedModel, payload: dict):
        """What the request explains: a stored image (by its id), or the text."""
        if served.kind == "image":
            return store.get(payload.get("image"), served.name)
        return views.check_text(payload.get("text"))

    async def index(request: Request):
        return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8")

    async def list_models(request: Request, served):
        from ..attributions import method_names
        return JSONResponse({"models": [m.describe() for m in models.models.values()], "methods": method_names(),
                             "default_methods": list(views.DEFAULT_METHODS), "max_upload_bytes": max_upload_bytes,
                             "max_pixels": max_pixels, "whatif_step": views.WHATIF_STEP,
                             "max_new_tokens": views.MAX_NEW_TOKENS})

    async def canvases(request: Request, served):
        return JSONResponse(await run_in_threadpool(export.canvas_list, CANVASES))

    async def upload(request: Request, served: ServedModel):
        if served.kind != "image":
            raise InputError(f"{served.name} explains text, not images")
        data = await read_body(request, max_upload_bytes)
        image = await run_in_threadpool(views.decode_image, data, max_pixels)
        return await _stored(served, image)

    async def canvas(request: Request, served: ServedModel):
        if served.kind != "image":
            raise InputError(f"{served.name} explains text, not images")
        index = request.path_params["index"]
        image = await run_in_threadpool(export.canvas_image, index, CANVASES)
        return await _stored(served, image)

    async def _stored(served: ServedModel, image):
        stored = await compute(served, lambda: views.prepare_image(served, image))
        payload = await compute(served, lambda: views.image_classes(served, stored))
        payload["id"] = store.add(stored)
        return JSONResponse(payload)

    async def explain(request: Request, served: ServedModel):
        payload = await read_json(request)
        if served.kind == "generate":
            method = views.check_method(payload.get("method", "attnlrp"))
            prompt = views.check_text(payload.get("text"))
            return JSONResponse(await compute(served, lambda: views.generate_explain(
                served, prompt, method, payload.get("max_new_tokens", 8))))
        methods = views.check_methods(payload.get("methods"))
        given = source(served, payload)
        if served.kind == "image":
            work = lambda: views.image_explain(served, given, payload.get("target"), methods)  # noqa: E731
        else:
            work = lambda: views.text_explain(served, given, payload.get("target"), methods)  # noqa: E731
        return JSONResponse(await compute(served, work))

    def classifier_view(what: str, image_view, text_view, options: tuple[tuple[str, Any], ...]):
        """A route of one view of a classifier's input: (target, method, *options) from the request."""
        async def view(request: Request, served: ServedModel):
            payload = await read_json(request)
            if served.kind == "generate":
                raise InputError(f"the {what} is for classifiers; {served.name} generates text")
            method = views.check_method(payload.get("method"))
            given = source(served, payload)
            args = [payload.get("target"), method] + [payload.get(name, default) for name, default in options]
            fn = image_view if served.kind == "image" else text_view
            return JSONResponse(await compute(served, lambda: fn(served, given, *args)))
        return view

    inside = classifier_view("inside view", views.image_inside, views.text_inside,
                             (("block", None), ("head", "mean"), ("row", 0)))
    whatif = classifier_view("what-if test", views.image_whatif, views.text_whatif, (("percent", None), ("mode", "top")))

    async def download(request: Request, served: ServedModel):
        payload = await read_json(request)
        kind = request.path_params["kind"]
        if served.kind == "generate":
            raise InputError("exports are for classifiers; the generation view's JSON is its own download")
        given = source(served, payload)
        content, media, filename = await compute(served, lambda: export.export(served, given, payload, kind))
        return Response(content, media_type=media,
                        headers={"content-disposition": f'attachment; filename="{filename}"'})

    async def not_found(request: Request, error: Exception):
        status = getattr(error, "status_code", 404)
        return JSONResponse({"error": "not found" if status == 404 else str(getattr(error, "detail", error))},
                            status_code=status)

    routes = [
        Route("/", index),
        Route("/api/models", api(list_models)),
        Route("/api/canvases", api(canvases)),
        Route("/api/{model}/upload", api(upload), methods=["POST"]),
        Route("/api/{model}/canvas/{index:int}", api(canvas), methods=["POST"]),
        Route("/api/{model}/explain", api(explain), methods=["POST"]),
        Route("/api/{model}/inside", api(inside), methods=["POST"]),
        Route("/api/{model}/whatif", api(whatif), methods=["POST"]),
        Route("/api/{model}/export/{kind}", api(download), methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    middleware = [Middleware(SecurityHeaders)]
    if allowed_hosts is not None:
        middleware.append(Middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts))
    return Starlette(routes=routes, middleware=middleware, exception_handlers={HTTPException: not_found})
