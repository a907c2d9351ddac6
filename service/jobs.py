"""Jobs as every API face makes and waits for them: the request's settings, queue, API key and pixel limit
(FastAPI dependencies), submission (seed drawn, queue limits, Idempotency-Key), the job's status, and waiting for
its result (a client that hangs up has its job cancelled, unless it sent an Idempotency-Key)."""

import asyncio
import hashlib
import json
import logging
import secrets
import time
from typing import Annotated, Optional

from fastapi import Depends, HTTPException, Request

from . import loras, schemas
from .errors import RETRY_AFTER, shown
from .queue import ENDED, Idempotency, IdempotencyConflict, Job, JobState, QueueFull, QueueUnavailable, new_job_id
from .registry import UnknownModel
from .settings import Settings

log = logging.getLogger("sd.api")

DISCONNECT_POLL = 0.5  # seconds between checks that a client waiting for its job is still connected


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_queue(request: Request):
    return request.app.state.queue


def owner_of(request: Request) -> Optional[str]:
    """The digest of the API key this request was let in with (RequireKey); None when no keys are set."""
    return request.scope.get("state", {}).get("owner")


async def get_max_pixels(request: Request) -> int:
    """The largest width * height this request may ask for or upload: SD_MAX_PIXELS when set, else the limit
    of the model that will run it (Settings.max_pixels_for its native size, as its workers announced it:
    service/models.py), SD 1.x's while no worker has."""
    settings = get_settings(request)
    if settings.max_pixels is not None:  # the operator's number: no need to know the model
        return settings.max_pixels
    model = await request.app.state.served.default()
    return settings.max_pixels_for(model.native_size if model else None)


Queue = Annotated[object, Depends(get_queue)]
Config = Annotated[Settings, Depends(get_settings)]
MaxPixels = Annotated[int, Depends(get_max_pixels)]


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
                                 f"got {shown(key)}")
    h = hashlib.sha256(request.url.path.encode())
    h.update(json.dumps(params, sort_keys=True, default=str).encode())
    for name in sorted(inputs):
        h.update(name.encode() + hashlib.sha256(inputs[name]).digest())
    return Idempotency(key, h.hexdigest())


async def choose_model(request: Request, wanted: Optional[str]) -> str:
    """The registry name of the model a request asks for (None: the default model). 422 for a name the registry
    lacks, listing those it has; 503 with Retry-After when workers are live but none takes jobs of the model
    (while no worker has announced itself, as when the service starts, jobs wait for one)."""
    registry = request.app.state.registry
    try:
        name = registry.find(wanted).name
    except UnknownModel as e:
        raise HTTPException(422, f"model: {e}; GET /sdapi/v1/sd-models or /v1/models lists them")
    served = request.app.state.served
    if await served.models() and not await served.workers_for(name):
        raise HTTPException(503, f"model {name!r} is served by no live worker now (start one with "
                                 f"SD_WORKER_MODELS={name}, or *); retry later", headers={"Retry-After": RETRY_AFTER})
    return name


async def submit(request: Request, mode: str, params: dict, inputs: dict,
                 idempotency: Optional[Idempotency] = None) -> JobState:
    """Queue a job of the request's API key (owner_of(request): the only key that may see it later) on the model
    its params name (choose_model). With `idempotency` (idempotency_of(request, ...)), a retry of a request gets
    back the job it made. Every face's jobs pass here: a LoRA the job names (prompt tags, the loras field) that
    the LoRA folder lacks is a 422 (loras.check)."""
    queue, settings, owner = get_queue(request), get_settings(request), owner_of(request)
    params = {**params, "model": await choose_model(request, params.get("model"))}
    try:
        loras.check(settings, params)
    except loras.LoraError as e:
        raise HTTPException(422, str(e))
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


def parameters_of(state: JobState) -> schemas.Parameters:
    p = state.params
    values = {k: p.get(k) for k in schemas.Parameters.model_fields}
    values["loras"] = values["loras"] or []  # (a job queued before the field was)
    return schemas.Parameters(**values)


def job_status(request: Request, state: JobState) -> schemas.JobStatus:
    return schemas.JobStatus(
        id=state.id, status=state.status, mode=state.mode,
        progress=schemas.Progress(step=state.step, total=state.total),
        error=state.error, attempts=state.attempts, seed=state.params["seed"],
        images=[str(request.url_for("job_image_n", job_id=state.id, n=n)) for n in range(state.images)],
        parameters=parameters_of(state), created_at=state.created, started_at=state.started,
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
