"""The HTTP API: FastAPI in front of the job queue.

    sd serve                                   # API + in-process worker, in-memory queue
    sd serve --redis redis://localhost:6379/0  # API only; run `sd worker --redis ...` beside it

This module is the app: the middleware every request passes (API key, body size, request counts), the
error handlers, health, readiness and metrics, and the in-process worker of `sd serve` without Redis. The
routes are the API faces' (service/faces/: native, OpenAI, AUTOMATIC1111), each on the shared modules
jobs, uploads and errors; the web page at / (web.py, static/) is a client of the native job API.
Checks come before anything is decoded or computed, in this order: the API key before the body is read
(401), the body size from Content-Length or while it streams in (413), the Content-Type (415), the
fields by the schema (422), then the upload's format (415) and pixel count (413) from its header.
"""

import asyncio
import base64
import collections
import hashlib
import hmac
import logging
import threading
from contextlib import asynccontextmanager
from typing import Callable, Optional

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import metrics, schemas, web
from .errors import RETRY_AFTER, clear_detail, error_message, field_rules
from .faces import a1111, native, openai
from .jobs import Config, Queue
from .models import Served
from .options import Options
from .registry import Registry
from .queue import QueueUnavailable, make_queue
from .settings import Settings

log = logging.getLogger("sd.api")


# -----------------------------------------------------------------------------
# middleware: API keys, body size limit, request counts

# open without a key: health, metrics (counts only), the API docs, and the web page's own files (web.py; the
# page asks for a key when the API wants one). Everything else, a route added later included, needs a key.
OPEN_PATHS = ("/healthz", "/readyz", "/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc", "/")
OPEN_PREFIXES = ("/ui/",)
UNAUTHORIZED = "missing or invalid API key (send Authorization: Bearer KEY)"


def key_digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class RequireKey:
    """When SD_API_KEYS is set, every path but the open ones needs a key: `Authorization: Bearer KEY`,
    `X-API-Key: KEY`, or (under /sdapi, as the web UI's --api-auth) the password of HTTP basic auth.
    Checked before the body is read, so nothing of an unauthenticated request is parsed; a route added
    later is closed by default. The key's sha256 goes into scope["state"]["owner"]: jobs are kept per key.
    `shapes`: path prefix -> the 401 answer of a face with an error shape of its own (OpenAI's under /v1/)."""

    def __init__(self, app, api_keys: tuple[str, ...], shapes: Optional[dict[str, Callable]] = None):
        self.app, self.digests, self.shapes = app, [key_digest(k) for k in api_keys], shapes or {}

    def owner(self, headers: dict[bytes, bytes], basic: bool) -> Optional[str]:
        auth = headers.get(b"authorization", b"").decode("latin-1")
        given = [headers.get(b"x-api-key", b"").decode("latin-1")]
        if auth[:7].lower() == "bearer ":
            given.append(auth[7:].strip())
        elif basic and auth[:6].lower() == "basic ":
            try:
                given.append(base64.b64decode(auth[6:].strip()).decode().partition(":")[2])
            except ValueError:  # binascii.Error and UnicodeDecodeError are ValueErrors
                pass
        # digests have one length, and every key is compared in constant time (no early exit): how long
        # the check takes tells nothing about which key, or how much of one, was nearly right
        match = None
        for text in filter(None, given):
            digest = key_digest(text)
            for key in self.digests:
                if hmac.compare_digest(digest, key):
                    match = key
        return match.hex() if match else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.digests or scope["path"] in OPEN_PATHS or \
                scope["path"].startswith(OPEN_PREFIXES):
            return await self.app(scope, receive, send)
        path = scope["path"]
        owner = self.owner(dict(scope["headers"]), basic=path.startswith("/sdapi/"))
        if owner is None:
            headers = {"WWW-Authenticate": "Bearer"}
            shape = next((answer for prefix, answer in self.shapes.items() if path.startswith(prefix)), None)
            response = shape(UNAUTHORIZED, headers) if shape else JSONResponse({"detail": UNAUTHORIZED}, 401,
                                                                                headers=headers)
            return await response(scope, receive, send)
        scope.setdefault("state", {})["owner"] = owner
        await self.app(scope, receive, send)


class BodyLimit:
    """413 for a request body over `limit` bytes: at once from Content-Length, or as soon as a
    streamed body passes it (nothing over the limit is ever buffered)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    def _error(self, size: str) -> HTTPException:
        return HTTPException(413, f"request body is {size} bytes; at most {self.limit} are accepted")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            e = self._error(length.decode())
            return await JSONResponse({"detail": e.detail}, 413)(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise self._error(f"more than {self.limit}")
            return message

        await self.app(scope, limited_receive, send)


class CountRequests:
    """Counts answers by method, route template and status for /metrics."""

    def __init__(self, app, counts: collections.Counter):
        self.app, self.counts = app, counts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            self.counts[(scope["method"], getattr(route, "path", "unmatched"), status[0])] += 1


# -----------------------------------------------------------------------------
# the app


def create_app(settings: Optional[Settings] = None, *, queue=None, pipe=None, worker: Optional[bool] = None) -> FastAPI:
    """The app. `queue`: one to use instead of the settings' (tests); `pipe`: a loaded pipeline for the
    in-process worker; `worker`: run a worker in this process (default: when there is no Redis URL)."""
    settings = settings or Settings.from_env()
    run_worker = (not settings.redis_url) if worker is None else worker
    rules = field_rules(*schemas.request_models(settings).values())
    registry = Registry.from_settings(settings)  # the models jobs may name (the workers hold the same list)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.queue = queue or make_queue(settings)
        app.state.served = Served(app.state.queue)  # what the workers serve: the pixel limit follows it
        stop, thread = threading.Event(), None
        if run_worker:
            from .worker import Worker, load_pipeline

            def work():  # the model loads here, so /healthz answers at once and /readyz once it is loaded
                try:
                    w = Worker(pipe or load_pipeline(settings), app.state.queue, settings, name=f"api-{id(app):x}",
                               registry=registry)
                except Exception:  # noqa: BLE001
                    log.exception("the in-process worker could not load the model")
                    return
                app.state.worker = w
                w.run(stop)

            thread = threading.Thread(target=work, name="sd-worker", daemon=True)
            thread.start()
        yield
        if thread is not None:  # finish the running batch, give the rest back
            stop.set()
            await asyncio.to_thread(thread.join, 600)
        await app.state.queue.aclose()
        await app.state.options.aclose()

    app = FastAPI(title="Stable Diffusion from scratch", version="0.1.0", lifespan=lifespan,
                  description="txt2img, img2img and inpainting on a batching GPU worker. Errors are "
                              '`{"detail": "..."}`. Seeds left out are drawn at random and reported. Every POST '
                              "that makes jobs takes an `Idempotency-Key` header: a retry with the same key (and "
                              "the same request) gets the job the first send made, never a second one.")
    app.state.settings = settings
    app.state.registry = registry
    app.state.options = Options(settings)  # the web UI's server-wide options (Redis when there is one)
    app.state.requests = collections.Counter()
    app.state.worker = None
    app.add_middleware(BodyLimit, limit=settings.max_upload_bytes)
    app.add_middleware(RequireKey, api_keys=settings.api_keys,  # outside BodyLimit: no key, no body read
                       shapes={"/v1/": openai.unauthorized})
    app.add_middleware(CountRequests, counts=app.state.requests)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError):
        messages = [error_message(e, rules) for e in exc.errors()]
        return JSONResponse({"detail": "; ".join(messages)}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse({"detail": clear_detail(exc)}, exc.status_code, headers=exc.headers)

    @app.exception_handler(QueueUnavailable)
    async def on_unavailable(request: Request, exc: QueueUnavailable):
        return JSONResponse({"detail": f"queue unavailable: {exc}"}, 503, headers={"Retry-After": RETRY_AFTER})

    for face in (native, openai, a1111):
        app.include_router(face.router(settings))
    web.install(app, settings)  # the page at / (service/static/)

    @app.get("/healthz", response_model=schemas.Health, summary="Liveness: the process answers")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", response_model=schemas.Ready, responses={503: {"model": schemas.Ready}},
             summary="Readiness: the queue answers and a worker with a loaded model reported in")
    async def readyz(request: Request, queue: Queue, settings: Config):
        kind = "redis" if settings.redis_url else "memory"
        try:
            await queue.ping()
            workers, depth = await queue.workers(), await queue.depth()
        except QueueUnavailable as e:
            body = schemas.Ready(status="not ready", queue=kind, workers=0, queue_depth=0, reason=str(e))
            return JSONResponse(body.model_dump(), 503, headers={"Retry-After": RETRY_AFTER})
        ready = workers > 0
        models = await request.app.state.served.per_model(request.app.state.registry.names())
        body = schemas.Ready(status="ready" if ready else "not ready", queue=kind, workers=workers, queue_depth=depth,
                             models=models, reason=None if ready else "no worker has loaded the model yet")
        return JSONResponse(body.model_dump(), 200 if ready else 503,
                            headers={} if ready else {"Retry-After": RETRY_AFTER})

    @app.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics (text format 0.0.4)")
    async def metrics_page(request: Request, queue: Queue):
        models = await request.app.state.served.per_model(request.app.state.registry.names())
        text = metrics.render(await queue.stats(), dict(request.app.state.requests), await queue.depth(),
                              await queue.workers(), models)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


def main(settings: Settings) -> int:
    """`sd serve`."""
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    where = f"Redis {settings.redis_url} (run `sd worker` beside it)" if settings.redis_url else \
        "an in-memory queue with an in-process worker"
    log.info("serving on http://%s:%d with %s", settings.host, settings.port, where)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info",
                timeout_graceful_shutdown=60)
    return 0
