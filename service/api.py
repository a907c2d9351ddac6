"""The HTTP API: FastAPI in front of the job queue.

    sd serve                                   # API + in-process worker, in-memory queue
    sd serve --redis redis://localhost:6379/0  # API only; run `sd worker --redis ...` beside it

Synchronous endpoints (POST /txt2img, /img2img, /inpaint) put a job on the queue and wait for
it; POST /jobs/{mode} answers 202 at once and the job is followed with GET /jobs/{id}. Checks
come before anything is decoded or computed, in this order: the API key before the body is read
(401), the body size from Content-Length or while it streams in (413), the Content-Type (415), the
fields by the schema (422), then the upload's format (415) and pixel count (413) from its header.
With API keys, each key sees only its own jobs (another key's answer 404, as an unknown id would).
The OpenAI Images API (/v1/images, compat_openai.py) and a subset of the AUTOMATIC1111 API
(/sdapi/v1, compat_a1111.py) make the same jobs on the same queue; the web page at / (web.py,
static/) is a client of the job API.
"""

import asyncio
import base64
import collections
import hashlib
import hmac
import io
import json
import logging
import re
import secrets
import struct
import threading
import time
from contextlib import asynccontextmanager
from typing import Annotated, Optional

from fastapi import APIRouter, Depends, FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import metrics, schemas
from .queue import (ENDED, Idempotency, IdempotencyConflict, Job, JobState, QueueFull, QueueUnavailable, make_queue,
                    new_job_id)
from .settings import Settings

log = logging.getLogger("sd.api")

RETRY_AFTER = "5"  # seconds, for 429 and 503
DISCONNECT_POLL = 0.5  # seconds between checks that a client waiting for its job is still connected
ERRORS = {  # documented error answers
    400: {"model": schemas.Error, "description": "the body could not be parsed (JSON that is not UTF-8, broken "
                                                 "multipart data)"},
    401: {"model": schemas.Error, "description": "missing or wrong API key (when keys are configured)"},
    413: {"model": schemas.Error, "description": "request body or image too large"},
    415: {"model": schemas.Error, "description": "the upload is not an image (PNG, JPEG, WebP, BMP, GIF), or the "
                                                 "body's Content-Type is not the endpoint's"},
    422: {"model": schemas.Error, "description": "a field is out of range; the message names it and the range"},
    429: {"model": schemas.Error, "description": "queue full; retry after the Retry-After seconds"},
    503: {"model": schemas.Error, "description": "queue unreachable; retry after the Retry-After seconds"},
}
SYNC_ERRORS = {**ERRORS, 409: {"model": schemas.Error, "description": "the job was cancelled"},
               504: {"model": schemas.Error, "description": "the job did not finish in time; poll /jobs/{id}"}}
PNG_OR_JSON = {200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
                     "description": "one PNG (headers X-Seed, X-Job-Id), or JSON for several images or "
                                    "with `Accept: application/json`"}}


# -----------------------------------------------------------------------------
# dependencies


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_queue(request: Request):
    return request.app.state.queue


def owner_of(request: Request) -> Optional[str]:
    """The digest of the API key this request was let in with (RequireKey); None when no keys are set."""
    return request.scope.get("state", {}).get("owner")


def require_content_type(*allowed: str):
    """A dependency: 415 unless the body is sent as one of `allowed` (a wrong one would only show up
    later as a confusing "field is required")."""
    def check(request: Request) -> None:
        given = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if given not in allowed:
            raise HTTPException(415, f"Content-Type must be {' or '.join(allowed)}, got {given or 'none'}")
    return Depends(check)


JSON_BODY = require_content_type("application/json")
FORM_BODY = require_content_type("multipart/form-data", "application/x-www-form-urlencoded")  # (urlencoded: no file)
Queue = Annotated[object, Depends(get_queue)]
Config = Annotated[Settings, Depends(get_settings)]


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
    later is closed by default. The key's sha256 goes into scope["state"]["owner"]: jobs are kept per key."""

    def __init__(self, app, api_keys: tuple[str, ...]):
        self.app, self.digests = app, [key_digest(k) for k in api_keys]

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
            if path.startswith("/v1/"):  # the OpenAI layer's error shape
                from .compat_openai import error
                response = error(401, UNAUTHORIZED, headers=headers)
            else:
                response = JSONResponse({"detail": UNAUTHORIZED}, 401, headers=headers)
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
# uploads


async def read_image(upload: UploadFile, what: str, settings: Settings):
    """The upload's bytes and its opened (header-only) image; 413/415 before any pixel is decoded."""
    return open_image(await upload.read(), what, settings)


# the formats an upload may be: PIL reads dozens more (EPS would even run Ghostscript); none is needed
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")


def open_image(data: bytes, what: str, settings: Settings):
    """read_image for bytes already in hand (the compatibility APIs' base64 images)."""
    from PIL import Image, UnidentifiedImageError

    if len(data) > settings.max_upload_bytes:
        raise HTTPException(413, f"{what} is {len(data)} bytes; at most {settings.max_upload_bytes} are accepted")
    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)  # reads the header only
    except Image.DecompressionBombError as e:  # a header declaring billions of pixels: PIL refuses it unread
        declared = re.search(r"\((\d+) pixels\)", str(e))
        raise HTTPException(413, f"{what} declares {declared[1] if declared else 'too many'} pixels; "
                                 f"at most {settings.max_pixels} are accepted")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, struct.error):
        raise HTTPException(415, f"{what} is not an image this server reads (PNG, JPEG, WebP, BMP, GIF)")
    if image.width * image.height > settings.max_pixels:
        raise HTTPException(413, f"{what} is {image.width}x{image.height} = {image.width * image.height} pixels; "
                                 f"at most {settings.max_pixels} are accepted")
    try:
        image.load()
    except Exception:  # noqa: BLE001  (truncated or corrupt data)
        raise HTTPException(415, f"{what} is a damaged {image.format} file")
    return data, image


def _size(params: dict, image, settings: Settings) -> dict:
    """Default width/height of img2img and inpaint: the uploaded image's, rounded down to 8."""
    width = params["width"] or image.width // 8 * 8
    height = params["height"] or image.height // 8 * 8
    if width < 8 or height < 8:
        raise HTTPException(422, f"image must be at least 8x8 pixels, got {image.width}x{image.height}")
    if width * height > settings.max_pixels:
        raise HTTPException(422, f"width * height must be at most {settings.max_pixels}, got {width}x{height}")
    return {**params, "width": width, "height": height}


# -----------------------------------------------------------------------------
# jobs


IDEMPOTENCY_KEY = "Idempotency-Key"


class IdempotencyKeyReused(HTTPException):
    """422: an Idempotency-Key came again with a different request. Every API face answers it with 422
    (the OpenAI face too, in its error shape, param "Idempotency-Key")."""

    def __init__(self, key: str, job_id: str):
        super().__init__(422, f"{IDEMPOTENCY_KEY} {key!r} was already used with a different request (job {job_id}); "
                              f"send a new key for a new request")


def idempotency_of(request: Request, params: dict, inputs: dict) -> Optional[Idempotency]:
    """The request's Idempotency-Key with a fingerprint of what it asks for (path, fields as sent, uploads);
    None without the header. The same key from the same API key within the result TTL gets the job it made
    first; with another fingerprint it is refused (422)."""
    key = request.headers.get(IDEMPOTENCY_KEY)
    if key is None:
        return None
    if not 1 <= len(key) <= 255 or not all(" " <= c <= "~" for c in key):
        raise HTTPException(422, f"{IDEMPOTENCY_KEY} header must be 1 to 255 printable ASCII characters, "
                                 f"got {_shown(key)}")
    h = hashlib.sha256(request.url.path.encode())
    h.update(json.dumps(params, sort_keys=True, default=str).encode())
    for name in sorted(inputs):
        h.update(name.encode() + hashlib.sha256(inputs[name]).digest())
    return Idempotency(key, h.hexdigest())


async def submit(queue, settings: Settings, mode: str, params: dict, inputs: dict,
                 owner: Optional[str] = None, idempotency: Optional[Idempotency] = None) -> JobState:
    """Queue a job; `owner` (owner_of(request)) is the only key that may see it later. With `idempotency`
    (idempotency_of(request, ...)), a retry of a request gets back the job it made."""
    if params.get("seed") in (None, -1):
        params = {**params, "seed": secrets.randbelow(schemas.MAX_SEED + 1)}
    job = Job(new_job_id(), mode, {**params, "mode": mode}, inputs, created=time.time(), owner=owner)
    try:
        return await queue.submit(job, settings.queue_limit, idempotency=idempotency,
                                  lane_limit=settings.queue_limit_per_key if settings.api_keys else 0)
    except QueueFull as e:
        what = "queue full for this API key" if e.lane else "queue full"
        raise HTTPException(429, f"{what}: {e}; retry later", headers={"Retry-After": RETRY_AFTER})
    except IdempotencyConflict as e:
        raise IdempotencyKeyReused(idempotency.key, e.job_id)


def _parameters(state: JobState) -> schemas.Parameters:
    p = state.params
    return schemas.Parameters(**{k: p.get(k) for k in schemas.Parameters.model_fields})


def job_status(request: Request, state: JobState) -> schemas.JobStatus:
    return schemas.JobStatus(
        id=state.id, status=state.status, mode=state.mode, progress=schemas.Progress(step=state.step, total=state.total),
        error=state.error, attempts=state.attempts, seed=state.params["seed"],
        images=[str(request.url_for("job_image_n", job_id=state.id, n=n)) for n in range(state.images)],
        parameters=_parameters(state), created_at=state.created, started_at=state.started,
        finished_at=state.finished)


async def wait_for_result(queue, settings: Settings, state: JobState,
                          request: Optional[Request] = None) -> tuple[JobState, list[bytes]]:
    """Wait for the job; its final state and PNGs, or the HTTPException that says why there are none.
    With `request`, a client that hangs up while it waits has its job cancelled: no one is left to take
    the result, so it is not run for nobody; unless it sent an Idempotency-Key: then it may come back for it."""
    job_id = state.id
    try:
        if request is None or IDEMPOTENCY_KEY in request.headers:
            state = await queue.wait(job_id, settings.job_timeout)
        else:
            state = await _wait_while_connected(request, queue, job_id, settings.job_timeout)
    except QueueUnavailable as e:  # Redis went away while we waited: say which job, it may come back with it
        raise HTTPException(503, f"queue unavailable while waiting for job {job_id} ({e}); follow it at "
                                 f"/jobs/{job_id} once the queue is back, or send the request again",
                            headers={"Retry-After": RETRY_AFTER, "X-Job-Id": job_id})
    if state is None:  # Redis restarted without persistence (or the result TTL is shorter than the wait)
        raise HTTPException(503, f"job {job_id} is gone from the queue (Redis lost it); send the request again",
                            headers={"Retry-After": RETRY_AFTER, "X-Job-Id": job_id})
    if state.status not in ENDED:
        raise HTTPException(504, f"job {job_id} is still {state.status} after {settings.job_timeout:g} s; "
                                 f"follow it at /jobs/{job_id}", headers={"X-Job-Id": job_id})
    if state.status == "cancelled":
        raise HTTPException(409, f"job {job_id} was cancelled", headers={"X-Job-Id": job_id})
    if state.status == "failed":
        status = 422 if state.error_kind == "invalid" else 500
        raise HTTPException(status, state.error or "failed", headers={"X-Job-Id": job_id})
    pngs = [await queue.result(job_id, n) for n in range(state.images)]
    if any(p is None for p in pngs):
        raise HTTPException(500, f"the results of job {job_id} expired")
    return state, pngs


async def _wait_while_connected(request: Request, queue, job_id: str, timeout: float) -> Optional[JobState]:
    """queue.wait, checking every DISCONNECT_POLL s that the client is still there; if it hung up, cancel
    the job (queued: it never runs; running: it stops, or is left out of its batch's results)."""
    waiting = asyncio.ensure_future(queue.wait(job_id, timeout))
    try:
        while not (await asyncio.wait({waiting}, timeout=DISCONNECT_POLL))[0]:
            if await request.is_disconnected():
                log.info("the client waiting for job %s hung up: cancelling the job", job_id)
                await queue.cancel(job_id)
                raise HTTPException(409, f"job {job_id} was cancelled: its client disconnected")
        return waiting.result()
    finally:
        waiting.cancel()  # (a no-op once it is done)


async def wait_and_answer(request: Request, queue, settings: Settings, state: JobState):
    """Wait for the job; one PNG, or JSON with every image, its seed and parameters."""
    state, pngs = await wait_for_result(queue, settings, state, request)
    job_id, seed = state.id, state.params["seed"]
    headers = {"X-Seed": str(seed), "X-Job-Id": job_id}
    if len(pngs) == 1 and "application/json" not in request.headers.get("accept", ""):
        return Response(pngs[0], media_type="image/png", headers=headers)
    images = [schemas.ImageOut(index=n, seed=seed, png_base64=base64.b64encode(p).decode()) for n, p in enumerate(pngs)]
    body = schemas.GenerationResponse(job_id=job_id, seed=seed, images=images, parameters=_parameters(state))
    return JSONResponse(body.model_dump(), headers=headers)


def accepted(request: Request, state: JobState) -> JSONResponse:
    status_url = str(request.url_for("get_job", job_id=state.id))
    body = schemas.JobAccepted(id=state.id, status=state.status, seed=state.params["seed"], status_url=status_url,
                               image_url=str(request.url_for("job_image", job_id=state.id)))
    return JSONResponse(body.model_dump(), status_code=202, headers={"Location": status_url})


# -----------------------------------------------------------------------------
# the app


def clear_detail(exc) -> str:
    """An HTTPException's detail; FastAPI's own for a body it could not parse, made to say what to send."""
    if exc.status_code == 400 and exc.detail == "There was an error parsing the body":
        return "the body could not be parsed: JSON must be UTF-8 text, a form valid multipart/form-data"
    return str(exc.detail)


def _shown(value, limit: int = 60) -> str:
    """A rejected value as the error quotes it: long text cut, so a 10,000-character prompt is not echoed back."""
    text = repr(value)
    if len(text) <= limit:
        return text
    size = f"{len(value)} bytes" if isinstance(value, bytes) else f"{len(value)} characters" \
        if isinstance(value, str) else "cut"
    return f"{text[:limit]}... ({size})"


def _error_message(err: dict, rules: dict[str, str]) -> str:
    """One pydantic error as a sentence naming the field and what it accepts."""
    kind = err.get("type", "")
    if kind == "json_invalid":  # loc is ("body", character offset)
        return f"the body is not valid JSON: {err.get('ctx', {}).get('error', 'decode error')} " \
               f"(at character {err['loc'][-1]})"
    loc = [str(x) for x in err.get("loc", ()) if x not in ("body", "query", "path", "header")]
    name = ".".join(loc) or "body"
    given = f", got {_shown(err['input'])}" if "input" in err and not isinstance(err["input"], (dict, list)) else ""
    if not loc and kind in ("model_attributes_type", "dict_type", "model_type"):
        return f"the body must be a JSON object with the fields {', '.join(rules)}{given}"
    if kind == "string_unicode":
        return f"{name} must be valid Unicode text (no lone surrogates)"
    if kind == "missing":
        return f"{name} is required" if loc else f"the body is required: a JSON object with the fields {', '.join(rules)}"
    if kind == "extra_forbidden":
        return f"{name} is not a field of this request (fields: {', '.join(rules)})"
    if kind == "value_error" and not loc:  # a model validator (width * height)
        return err["msg"].removeprefix("Value error, ")
    if name in rules:
        return f"{name} must be {rules[name]}{given}"
    return f"{name}: {err.get('msg', 'invalid')}{given}"


def create_app(settings: Optional[Settings] = None, *, queue=None, pipe=None, worker: Optional[bool] = None) -> FastAPI:
    """The app. `queue`: one to use instead of the settings' (tests); `pipe`: a loaded pipeline for the
    in-process worker; `worker`: run a worker in this process (default: when there is no Redis URL)."""
    settings = settings or Settings.from_env()
    run_worker = (not settings.redis_url) if worker is None else worker
    models = schemas.request_models(settings)
    rules = {name: f.description.split(";")[0] for m in models.values()
             for name, f in m.model_fields.items() if f.description}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.queue = queue or make_queue(settings)
        stop, thread = threading.Event(), None
        if run_worker:
            from .worker import Worker, load_pipeline

            def work():  # the model loads here, so /healthz answers at once and /readyz once it is loaded
                try:
                    w = Worker(pipe or load_pipeline(settings), app.state.queue, settings, name=f"api-{id(app):x}")
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

    app = FastAPI(title="Stable Diffusion from scratch", version="0.1.0", lifespan=lifespan,
                  description="txt2img, img2img and inpainting on a batching GPU worker. Errors are "
                              '`{"detail": "..."}`. Seeds left out are drawn at random and reported. Every POST '
                              "that makes jobs takes an `Idempotency-Key` header: a retry with the same key (and "
                              "the same request) gets the job the first send made, never a second one.")
    app.state.settings = settings
    app.state.requests = collections.Counter()
    app.state.worker = None
    app.add_middleware(BodyLimit, limit=settings.max_upload_bytes)
    app.add_middleware(RequireKey, api_keys=settings.api_keys)  # outside BodyLimit: no key, no body read
    app.add_middleware(CountRequests, counts=app.state.requests)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError):
        messages = [_error_message(e, rules) for e in exc.errors()]
        return JSONResponse({"detail": "; ".join(messages)}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse({"detail": clear_detail(exc)}, exc.status_code, headers=exc.headers)

    @app.exception_handler(QueueUnavailable)
    async def on_unavailable(request: Request, exc: QueueUnavailable):
        return JSONResponse({"detail": f"queue unavailable: {exc}"}, 503, headers={"Retry-After": RETRY_AFTER})

    api = APIRouter()  # the API key is checked by RequireKey, before any route
    Txt2Img, Img2Img, Inpaint = models["txt2img"], models["img2img"], models["inpaint"]

    async def txt2img_job(request, body, queue, settings):
        params = body.model_dump()
        return await submit(queue, settings, "txt2img", params, {}, owner_of(request),
                            idempotency_of(request, params, {}))

    async def img2img_job(request, params, image, queue, settings):
        data, img = await read_image(image, "image", settings)
        params = _size(params.model_dump(), img, settings)
        return await submit(queue, settings, "img2img", params, {"image": data}, owner_of(request),
                            idempotency_of(request, params, {"image": data}))

    async def inpaint_job(request, params, image, mask, queue, settings):
        data, img = await read_image(image, "image", settings)
        inputs = {"image": data}
        if mask is not None:
            inputs["mask"], m = await read_image(mask, "mask", settings)
            if m.size != img.size:
                raise HTTPException(422, f"mask size {m.width}x{m.height} must equal the image size "
                                         f"{img.width}x{img.height}")
        elif not (img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info):
            raise HTTPException(422, "mask is required: the image has no transparent pixels to repaint")
        params = _size(params.model_dump(), img, settings)
        return await submit(queue, settings, "inpaint", params, inputs, owner_of(request),
                            idempotency_of(request, params, inputs))

    ImageFile = Annotated[UploadFile, File(description="the input image (PNG, JPEG, WebP, ...)")]
    MaskFile = Annotated[Optional[UploadFile], File(description="white = repaint; left out: the image's "
                                                                "transparent pixels are repainted")]

    @api.post("/txt2img", response_model=schemas.GenerationResponse, responses={**PNG_OR_JSON, **SYNC_ERRORS},
              summary="Text to image; waits for the result", dependencies=[JSON_BODY])
    async def txt2img(request: Request, body: Txt2Img, queue: Queue, settings: Config):
        return await wait_and_answer(request, queue, settings, await txt2img_job(request, body, queue, settings))

    @api.post("/img2img", response_model=schemas.GenerationResponse, responses={**PNG_OR_JSON, **SYNC_ERRORS},
              summary="Image to image; waits for the result", dependencies=[FORM_BODY])
    async def img2img(request: Request, params: Annotated[Img2Img, Form()], image: ImageFile, queue: Queue,
                      settings: Config):
        return await wait_and_answer(request, queue, settings,
                                     await img2img_job(request, params, image, queue, settings))

    @api.post("/inpaint", response_model=schemas.GenerationResponse, responses={**PNG_OR_JSON, **SYNC_ERRORS},
              summary="Repaint the masked (or transparent) part of an image; waits for the result",
              dependencies=[FORM_BODY])
    async def inpaint(request: Request, params: Annotated[Inpaint, Form()], image: ImageFile, queue: Queue,
                      settings: Config, mask: MaskFile = None):
        return await wait_and_answer(request, queue, settings,
                                     await inpaint_job(request, params, image, mask, queue, settings))

    @api.post("/jobs/txt2img", status_code=202, response_model=schemas.JobAccepted, responses=ERRORS,
              summary="Queue a text-to-image job; answers at once", dependencies=[JSON_BODY])
    async def txt2img_async(request: Request, body: Txt2Img, queue: Queue, settings: Config):
        return accepted(request, await txt2img_job(request, body, queue, settings))

    @api.post("/jobs/img2img", status_code=202, response_model=schemas.JobAccepted, responses=ERRORS,
              summary="Queue an image-to-image job; answers at once", dependencies=[FORM_BODY])
    async def img2img_async(request: Request, params: Annotated[Img2Img, Form()], image: ImageFile, queue: Queue,
                            settings: Config):
        return accepted(request, await img2img_job(request, params, image, queue, settings))

    @api.post("/jobs/inpaint", status_code=202, response_model=schemas.JobAccepted, responses=ERRORS,
              summary="Queue an inpainting job; answers at once", dependencies=[FORM_BODY])
    async def inpaint_async(request: Request, params: Annotated[Inpaint, Form()], image: ImageFile, queue: Queue,
                            settings: Config, mask: MaskFile = None):
        return accepted(request, await inpaint_job(request, params, image, mask, queue, settings))

    async def _state(request: Request, queue, job_id: str) -> JobState:
        """The job, if this request's API key made it: another key's job is answered as unknown (404, not
        403), so a job id tells nothing to anyone but its owner."""
        state = await queue.state(job_id)
        if state is None or (settings.api_keys and state.owner != owner_of(request)):
            raise HTTPException(404, f"no job {job_id} (unknown, or expired)")
        return state

    NOT_FOUND = {404: {"model": schemas.Error, "description": "unknown or expired job (or another API key's)"},
                 **{k: ERRORS[k] for k in (401, 422, 503)}}

    @api.get("/jobs/{job_id}", response_model=schemas.JobStatus, responses=NOT_FOUND, summary="A job's status")
    async def get_job(request: Request, job_id: str, queue: Queue):
        return job_status(request, await _state(request, queue, job_id))

    @api.get("/jobs/{job_id}/image", responses={**PNG_OR_JSON, **NOT_FOUND}, response_class=Response,
             summary="The job's first PNG")
    async def job_image(request: Request, job_id: str, queue: Queue):
        return await job_image_n(request, job_id, 0, queue)

    @api.get("/jobs/{job_id}/image/{n}", responses={**PNG_OR_JSON, **NOT_FOUND,
                                                     409: {"model": schemas.Error, "description": "not done"}},
             response_class=Response, summary="The job's PNG number n (from 0)")
    async def job_image_n(request: Request, job_id: str, n: int, queue: Queue):
        state = await _state(request, queue, job_id)
        if state.status != "done":
            raise HTTPException(409, f"job {job_id} is {state.status}, not done" +
                                (f": {state.error}" if state.error and state.status == "failed" else ""))
        if not 0 <= n < state.images:
            raise HTTPException(404, f"job {job_id} has images 0..{state.images - 1}, not {n}")
        png = await queue.result(job_id, n)
        if png is None:
            raise HTTPException(404, f"image {n} of job {job_id} expired")
        return Response(png, media_type="image/png", headers={"X-Seed": str(state.params["seed"]), "X-Job-Id": job_id})

    @api.delete("/jobs/{job_id}", response_model=schemas.JobStatus,
                responses={**NOT_FOUND, 409: {"model": schemas.Error, "description": "already finished"}},
                summary="Cancel a job: a queued one never runs, a running one stops at its next step")
    async def cancel_job(request: Request, job_id: str, queue: Queue):
        state = await _state(request, queue, job_id)
        if state.status in ("done", "failed"):
            raise HTTPException(409, f"job {job_id} already {state.status}")
        return job_status(request, await queue.cancel(job_id))

    app.include_router(api)
    from . import compat_a1111, compat_openai, web  # they import this module

    app.include_router(compat_openai.router(settings))
    app.include_router(compat_a1111.router(settings))
    web.install(app, settings)  # the page at / (service/static/)

    @app.get("/healthz", response_model=schemas.Health, summary="Liveness: the process answers")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", response_model=schemas.Ready, responses={503: {"model": schemas.Ready}},
             summary="Readiness: the queue answers and a worker with a loaded model reported in")
    async def readyz(queue: Queue, settings: Config):
        kind = "redis" if settings.redis_url else "memory"
        try:
            await queue.ping()
            workers, depth = await queue.workers(), await queue.depth()
        except QueueUnavailable as e:
            body = schemas.Ready(status="not ready", queue=kind, workers=0, queue_depth=0, reason=str(e))
            return JSONResponse(body.model_dump(), 503, headers={"Retry-After": RETRY_AFTER})
        ready = workers > 0
        body = schemas.Ready(status="ready" if ready else "not ready", queue=kind, workers=workers, queue_depth=depth,
                             reason=None if ready else "no worker has loaded the model yet")
        return JSONResponse(body.model_dump(), 200 if ready else 503,
                            headers={} if ready else {"Retry-After": RETRY_AFTER})

    @app.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics (text format 0.0.4)")
    async def metrics_page(request: Request, queue: Queue):
        text = metrics.render(await queue.stats(), dict(request.app.state.requests), await queue.depth(),
                              await queue.workers())
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
