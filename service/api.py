"""The HTTP API: FastAPI in front of the job queue.

    sd serve                                   # API + in-process worker, in-memory queue
    sd serve --redis redis://localhost:6379/0  # API only; run `sd worker --redis ...` beside it

Synchronous endpoints (POST /txt2img, /img2img, /inpaint) put a job on the queue and wait for
it; POST /jobs/{mode} answers 202 at once and the job is followed with GET /jobs/{id}. Limits
are checked before anything is decoded or computed: the body size while it streams in (413),
the upload's format (415) and pixel count (413) from its header, the fields by the schema (422).
The OpenAI Images API (/v1/images, compat_openai.py) and a subset of the AUTOMATIC1111 API
(/sdapi/v1, compat_a1111.py) make the same jobs on the same queue.
"""

import asyncio
import base64
import collections
import hmac
import io
import logging
import secrets
import threading
import time
from contextlib import asynccontextmanager
from typing import Annotated, Optional

from fastapi import APIRouter, Depends, FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from . import metrics, schemas
from .queue import ENDED, Job, JobState, QueueFull, QueueUnavailable, make_queue, new_job_id
from .settings import Settings

log = logging.getLogger("sd.api")

RETRY_AFTER = "5"  # seconds, for 429 and 503
ERRORS = {  # documented error answers
    401: {"model": schemas.Error, "description": "missing or wrong API key (when keys are configured)"},
    413: {"model": schemas.Error, "description": "request body or image too large"},
    415: {"model": schemas.Error, "description": "the upload is not an image"},
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


def require_api_key(request: Request, settings: Annotated[Settings, Depends(get_settings)]) -> None:
    """When SD_API_KEYS is set: `Authorization: Bearer KEY` or `X-API-Key: KEY`."""
    if not settings.api_keys:
        return
    auth = request.headers.get("authorization", "")
    given = auth[7:].strip() if auth[:7].lower() == "bearer " else request.headers.get("x-api-key", "")
    # compare against every key, in constant time, so timing tells nothing about which one nearly matched
    ok = False
    for key in settings.api_keys:
        ok |= hmac.compare_digest(given.encode(), key.encode())
    if not given or not ok:
        raise HTTPException(401, "missing or invalid API key (send Authorization: Bearer KEY)",
                            headers={"WWW-Authenticate": "Bearer"})


Queue = Annotated[object, Depends(get_queue)]
Config = Annotated[Settings, Depends(get_settings)]


# -----------------------------------------------------------------------------
# middleware: body size limit, request counts


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


def open_image(data: bytes, what: str, settings: Settings):
    """read_image for bytes already in hand (the compatibility APIs' base64 images)."""
    from PIL import Image, UnidentifiedImageError

    if len(data) > settings.max_upload_bytes:
        raise HTTPException(413, f"{what} is {len(data)} bytes; at most {settings.max_upload_bytes} are accepted")
    try:
        image = Image.open(io.BytesIO(data))  # reads the header only
    except (UnidentifiedImageError, OSError, ValueError):
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


async def submit(queue, settings: Settings, mode: str, params: dict, inputs: dict) -> JobState:
    if params.get("seed") in (None, -1):
        params = {**params, "seed": secrets.randbelow(schemas.MAX_SEED + 1)}
    job = Job(new_job_id(), mode, {**params, "mode": mode}, inputs, created=time.time())
    try:
        return await queue.submit(job, settings.queue_limit)
    except QueueFull as e:
        raise HTTPException(429, f"queue full: {e}; retry later", headers={"Retry-After": RETRY_AFTER})


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


async def wait_for_result(queue, settings: Settings, state: JobState) -> tuple[JobState, list[bytes]]:
    """Wait for the job; its final state and PNGs, or the HTTPException that says why there are none."""
    job_id = state.id
    state = await queue.wait(job_id, settings.job_timeout)
    if state is None:
        raise HTTPException(500, f"job {job_id} vanished from the queue (result TTL too short?)")
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


async def wait_and_answer(request: Request, queue, settings: Settings, state: JobState):
    """Wait for the job; one PNG, or JSON with every image, its seed and parameters."""
    state, pngs = await wait_for_result(queue, settings, state)
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


def _error_message(err: dict, rules: dict[str, str]) -> str:
    """One pydantic error as a sentence naming the field and what it accepts."""
    loc = [str(x) for x in err.get("loc", ()) if x not in ("body", "query", "path", "header")]
    name = ".".join(loc) or "body"
    given = f", got {err['input']!r}" if "input" in err and not isinstance(err["input"], (dict, list)) else ""
    kind = err.get("type", "")
    if kind == "missing":
        return f"{name} is required"
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
                              '`{"detail": "..."}`. Seeds left out are drawn at random and reported.')
    app.state.settings = settings
    app.state.requests = collections.Counter()
    app.state.worker = None
    app.add_middleware(BodyLimit, limit=settings.max_upload_bytes)
    app.add_middleware(CountRequests, counts=app.state.requests)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError):
        messages = [_error_message(e, rules) for e in exc.errors()]
        return JSONResponse({"detail": "; ".join(messages)}, status_code=422)

    @app.exception_handler(QueueUnavailable)
    async def on_unavailable(request: Request, exc: QueueUnavailable):
        return JSONResponse({"detail": f"queue unavailable: {exc}"}, 503, headers={"Retry-After": RETRY_AFTER})

    api = APIRouter(dependencies=[Depends(require_api_key)])
    Txt2Img, Img2Img, Inpaint = models["txt2img"], models["img2img"], models["inpaint"]

    async def txt2img_job(body, queue, settings):
        return await submit(queue, settings, "txt2img", body.model_dump(), {})

    async def img2img_job(params, image, queue, settings):
        data, img = await read_image(image, "image", settings)
        return await submit(queue, settings, "img2img", _size(params.model_dump(), img, settings), {"image": data})

    async def inpaint_job(params, image, mask, queue, settings):
        data, img = await read_image(image, "image", settings)
        inputs = {"image": data}
        if mask is not None:
            inputs["mask"], m = await read_image(mask, "mask", settings)
            if m.size != img.size:
                raise HTTPException(422, f"mask size {m.width}x{m.height} must equal the image size "
                                         f"{img.width}x{img.height}")
        elif not (img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info):
            raise HTTPException(422, "mask is required: the image has no transparent pixels to repaint")
        return await submit(queue, settings, "inpaint", _size(params.model_dump(), img, settings), inputs)

    ImageFile = Annotated[UploadFile, File(description="the input image (PNG, JPEG, WebP, ...)")]
    MaskFile = Annotated[Optional[UploadFile], File(description="white = repaint; left out: the image's "
                                                                "transparent pixels are repainted")]

    @api.post("/txt2img", response_model=schemas.GenerationResponse, responses={**PNG_OR_JSON, **SYNC_ERRORS},
              summary="Text to image; waits for the result")
    async def txt2img(request: Request, body: Txt2Img, queue: Queue, settings: Config):
        return await wait_and_answer(request, queue, settings, await txt2img_job(body, queue, settings))

    @api.post("/img2img", response_model=schemas.GenerationResponse, responses={**PNG_OR_JSON, **SYNC_ERRORS},
              summary="Image to image; waits for the result")
    async def img2img(request: Request, params: Annotated[Img2Img, Form()], image: ImageFile, queue: Queue,
                      settings: Config):
        return await wait_and_answer(request, queue, settings, await img2img_job(params, image, queue, settings))

    @api.post("/inpaint", response_model=schemas.GenerationResponse, responses={**PNG_OR_JSON, **SYNC_ERRORS},
              summary="Repaint the masked (or transparent) part of an image; waits for the result")
    async def inpaint(request: Request, params: Annotated[Inpaint, Form()], image: ImageFile, queue: Queue,
                      settings: Config, mask: MaskFile = None):
        return await wait_and_answer(request, queue, settings,
                                     await inpaint_job(params, image, mask, queue, settings))

    @api.post("/jobs/txt2img", status_code=202, response_model=schemas.JobAccepted, responses=ERRORS,
              summary="Queue a text-to-image job; answers at once")
    async def txt2img_async(request: Request, body: Txt2Img, queue: Queue, settings: Config):
        return accepted(request, await txt2img_job(body, queue, settings))

    @api.post("/jobs/img2img", status_code=202, response_model=schemas.JobAccepted, responses=ERRORS,
              summary="Queue an image-to-image job; answers at once")
    async def img2img_async(request: Request, params: Annotated[Img2Img, Form()], image: ImageFile, queue: Queue,
                            settings: Config):
        return accepted(request, await img2img_job(params, image, queue, settings))

    @api.post("/jobs/inpaint", status_code=202, response_model=schemas.JobAccepted, responses=ERRORS,
              summary="Queue an inpainting job; answers at once")
    async def inpaint_async(request: Request, params: Annotated[Inpaint, Form()], image: ImageFile, queue: Queue,
                            settings: Config, mask: MaskFile = None):
        return accepted(request, await inpaint_job(params, image, mask, queue, settings))

    async def _state(queue, job_id: str) -> JobState:
        state = await queue.state(job_id)
        if state is None:
            raise HTTPException(404, f"no job {job_id} (unknown, or expired)")
        return state

    NOT_FOUND = {404: {"model": schemas.Error, "description": "unknown or expired job"}}

    @api.get("/jobs/{job_id}", response_model=schemas.JobStatus, responses=NOT_FOUND, summary="A job's status")
    async def get_job(request: Request, job_id: str, queue: Queue):
        return job_status(request, await _state(queue, job_id))

    @api.get("/jobs/{job_id}/image", responses={**PNG_OR_JSON, **NOT_FOUND}, response_class=Response,
             summary="The job's first PNG")
    async def job_image(job_id: str, queue: Queue):
        return await job_image_n(job_id, 0, queue)

    @api.get("/jobs/{job_id}/image/{n}", responses={**PNG_OR_JSON, **NOT_FOUND,
                                                     409: {"model": schemas.Error, "description": "not done"}},
             response_class=Response, summary="The job's PNG number n (from 0)")
    async def job_image_n(job_id: str, n: int, queue: Queue):
        state = await _state(queue, job_id)
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
        state = await _state(queue, job_id)
        if state.status in ("done", "failed"):
            raise HTTPException(409, f"job {job_id} already {state.status}")
        return job_status(request, await queue.cancel(job_id))

    app.include_router(api)
    from . import compat_a1111, compat_openai  # they import this module

    app.include_router(compat_openai.router(settings))
    app.include_router(compat_a1111.router(settings))

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
