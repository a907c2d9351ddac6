"""The native API face: synchronous generation (POST /txt2img, /img2img, /inpaint: wait for the job, answer
its PNG, or JSON for several images) and jobs followed by id (POST /jobs/{mode}: 202 at once; GET /jobs/{id},
/jobs/{id}/image[/{n}], DELETE /jobs/{id}). With API keys, each key sees only its own jobs (another key's
answer 404, as an unknown id would)."""

import base64
from typing import Annotated, Optional

from fastapi import APIRouter, File, Form, HTTPException, Request, UploadFile
from fastapi.responses import JSONResponse, Response

from .. import schemas
from ..errors import ERRORS, PNG_OR_JSON, SYNC_ERRORS
from ..jobs import (Config, MaxPixels, Queue, idempotency_of, job_status, owner_of, parameters_of, submit,
                    wait_for_result)
from ..queue import JobState
from ..settings import Settings
from ..uploads import FORM_BODY, JSON_BODY, check_pixels, read_image, size_from_image


async def wait_and_answer(request: Request, queue, settings: Settings, state: JobState):
    """Wait for the job; one PNG, or JSON with every image, its seed and parameters."""
    state, pngs = await wait_for_result(queue, settings, state, request)
    job_id, seed = state.id, state.params["seed"]
    headers = {"X-Seed": str(seed), "X-Job-Id": job_id}
    if len(pngs) == 1 and "application/json" not in request.headers.get("accept", ""):
        return Response(pngs[0], media_type="image/png", headers=headers)
    images = [schemas.ImageOut(index=n, seed=seed, png_base64=base64.b64encode(p).decode()) for n, p in enumerate(pngs)]
    body = schemas.GenerationResponse(job_id=job_id, seed=seed, images=images, parameters=parameters_of(state))
    return JSONResponse(body.model_dump(), headers=headers)


def accepted(request: Request, state: JobState) -> JSONResponse:
    status_url = str(request.url_for("get_job", job_id=state.id))
    body = schemas.JobAccepted(id=state.id, status=state.status, seed=state.params["seed"], status_url=status_url,
                               image_url=str(request.url_for("job_image", job_id=state.id)))
    return JSONResponse(body.model_dump(), status_code=202, headers={"Location": status_url})


def router(settings: Settings) -> APIRouter:
    """The native routes, their fields' ranges from `settings`."""
    models = schemas.request_models(settings)
    api = APIRouter()  # the API key is checked by RequireKey, before any route
    Txt2Img, Img2Img, Inpaint = models["txt2img"], models["img2img"], models["inpaint"]

    async def txt2img_job(request, body, queue, settings, max_pixels):
        check_pixels(body.width, body.height, max_pixels)
        params = body.model_dump()
        return await submit(request, "txt2img", params, {},
                            idempotency_of(request, params, {}))

    async def img2img_job(request, params, image, queue, settings, max_pixels):
        check_pixels(params.width, params.height, max_pixels)  # (a size asked for: before the upload is read)
        data, img = await read_image(image, "image", settings, max_pixels)
        params = size_from_image(params.model_dump(), img, max_pixels)
        return await submit(request, "img2img", params, {"image": data},
                            idempotency_of(request, params, {"image": data}))

    async def inpaint_job(request, params, image, mask, queue, settings, max_pixels):
        check_pixels(params.width, params.height, max_pixels)
        data, img = await read_image(image, "image", settings, max_pixels)
        inputs = {"image": data}
        if mask is not None:
            inputs["mask"], m = await read_image(mask, "mask", settings, max_pixels)
            if m.size != img.size:
                raise HTTPException(422, f"mask size {m.width}x{m.height} must equal the image size "
                                         f"{img.width}x{img.height}")
        elif not (img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info):
            raise HTTPException(422, "mask is required: the image has no transparent pixels to repaint")
        params = size_from_image(params.model_dump(), img, max_pixels)
        return await submit(request, "inpaint", params, inputs,
                            idempotency_of(request, params, inputs))

    ImageFile = Annotated[UploadFile, File(description="the input image (PNG, JPEG, WebP, ...)")]
    MaskFile = Annotated[Optional[UploadFile], File(description="white = repaint; left out: the image's "
                                                                "transparent pixels are repainted")]

    @api.post("/txt2img", response_model=schemas.GenerationResponse, responses={**PNG_OR_JSON, **SYNC_ERRORS},
              summary="Text to image; waits for the result", dependencies=[JSON_BODY])
    async def txt2img(request: Request, body: Txt2Img, queue: Queue, settings: Config, max_pixels: MaxPixels):
        return await wait_and_answer(request, queue, settings,
                                     await txt2img_job(request, body, queue, settings, max_pixels))

    @api.post("/img2img", response_model=schemas.GenerationResponse, responses={**PNG_OR_JSON, **SYNC_ERRORS},
              summary="Image to image; waits for the result", description=schemas.FORM_PAIRS,
              dependencies=[FORM_BODY])
    async def img2img(request: Request, params: Annotated[Img2Img, Form()], image: ImageFile, queue: Queue,
                      settings: Config, max_pixels: MaxPixels):
        return await wait_and_answer(request, queue, settings,
                                     await img2img_job(request, params, image, queue, settings, max_pixels))

    @api.post("/inpaint", response_model=schemas.GenerationResponse, responses={**PNG_OR_JSON, **SYNC_ERRORS},
              summary="Repaint the masked (or transparent) part of an image; waits for the result",
              description=schemas.FORM_PAIRS, dependencies=[FORM_BODY])
    async def inpaint(request: Request, params: Annotated[Inpaint, Form()], image: ImageFile, queue: Queue,
                      settings: Config, max_pixels: MaxPixels, mask: MaskFile = None):
        return await wait_and_answer(request, queue, settings,
                                     await inpaint_job(request, params, image, mask, queue, settings, max_pixels))

    @api.post("/jobs/txt2img", status_code=202, response_model=schemas.JobAccepted, responses=ERRORS,
              summary="Queue a text-to-image job; answers at once", dependencies=[JSON_BODY])
    async def txt2img_async(request: Request, body: Txt2Img, queue: Queue, settings: Config, max_pixels: MaxPixels):
        return accepted(request, await txt2img_job(request, body, queue, settings, max_pixels))

    @api.post("/jobs/img2img", status_code=202, response_model=schemas.JobAccepted, responses=ERRORS,
              summary="Queue an image-to-image job; answers at once", description=schemas.FORM_PAIRS,
              dependencies=[FORM_BODY])
    async def img2img_async(request: Request, params: Annotated[Img2Img, Form()], image: ImageFile, queue: Queue,
                            settings: Config, max_pixels: MaxPixels):
        return accepted(request, await img2img_job(request, params, image, queue, settings, max_pixels))

    @api.post("/jobs/inpaint", status_code=202, response_model=schemas.JobAccepted, responses=ERRORS,
              summary="Queue an inpainting job; answers at once", description=schemas.FORM_PAIRS,
              dependencies=[FORM_BODY])
    async def inpaint_async(request: Request, params: Annotated[Inpaint, Form()], image: ImageFile, queue: Queue,
                            settings: Config, max_pixels: MaxPixels, mask: MaskFile = None):
        return accepted(request, await inpaint_job(request, params, image, mask, queue, settings, max_pixels))

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

    @api.get("/jobs/{job_id}/preview", response_class=Response,
             responses={200: {"content": {"image/png": {}},
                              "description": "the latest preview (done: the first image)"},
                        204: {"description": "no preview yet: ask again in a moment"}, **NOT_FOUND},
             summary="A live preview of a running job: a small PNG at the job's aspect ratio, made from its latents "
                     "every few steps while someone asks (not a VAE decode)")
    async def job_preview(request: Request, job_id: str, queue: Queue):
        state = await _state(request, queue, job_id)
        if state.status == "done" and state.images:
            png = await queue.result(job_id, 0)
        else:
            if state.status in ("queued", "running"):
                await queue.watch(job_id)   # its worker makes previews for the next WATCH_S s
            png = await queue.preview(job_id)
        if png is None:
            return Response(status_code=204, headers={"X-Job-Status": state.status, "Retry-After": "1"})
        return Response(png, media_type="image/png", headers={"X-Job-Id": job_id, "X-Job-Status": state.status,
                                                              "Cache-Control": "no-store"})

    @api.delete("/jobs/{job_id}", response_model=schemas.JobStatus,
                responses={**NOT_FOUND, 409: {"model": schemas.Error, "description": "already finished"}},
                summary="Cancel a job: a queued one never runs, a running one stops at its next step")
    async def cancel_job(request: Request, job_id: str, queue: Queue):
        state = await _state(request, queue, job_id)
        if state.status in ("done", "failed"):
            raise HTTPException(409, f"job {job_id} already {state.status}")
        return job_status(request, await queue.cancel(job_id))
    return api
