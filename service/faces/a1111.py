"""A subset of the AUTOMATIC1111 web UI API (/sdapi/v1), on the same queue and worker as the native API.

    POST /sdapi/v1/txt2img     {prompt, negative_prompt, steps, cfg_scale, sampler_name, seed, width, height,
                                batch_size, n_iter}                                    -> txt2img jobs
    POST /sdapi/v1/img2img     the same + init_images [base64], denoising_strength, mask (base64, white =
                                repaint), inpainting_mask_invert                       -> img2img / inpaint jobs
    GET  /sdapi/v1/samplers    the sampler names this server knows
    GET  /sdapi/v1/loras       the LoRA folder's files [{name, alias, path, metadata}]; POST refresh-loras
    GET  /sdapi/v1/embeddings  the embeddings folder's file names {"loaded": {name: {...}}, "skipped": {}}
    GET  /sdapi/v1/progress    progress of the oldest running request made here
    POST /sdapi/v1/interrupt   cancel that request's jobs; it answers the images already finished

Answers are `{"images": [base64 PNG], "parameters": {...}, "info": "<JSON string>"}`. As in the web UI,
the i-th of the batch_size * n_iter images has seed + i (each image is one job, so each is remade
alone by its seed), and seed -1 draws one. Fields this subset does not serve (hires fix, scripts,
styles, ...) are ignored. The web UI's API has no field for SDXL's micro-conditioning (it conditions on
the request's width and height, and crops only by its sdxl_crop_top/left options), so neither has this
subset. LoRAs are `<lora:NAME:W>` tags in the prompt, as in the web UI (service/loras.py). The API key
(when configured) is sent as `Authorization: Bearer KEY`, `X-API-Key: KEY`, or as the password of HTTP
basic auth (webuiapi's `set_auth`). Progress and interrupt see the requests of this API process only.
"""

import asyncio
import base64
import binascii
import dataclasses
import io
import json
import secrets
import time
from typing import Optional

from fastapi import APIRouter, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from model.pnginfo import parse_infotext

from .. import loras, schemas
from ..errors import ERRORS, SYNC_ERRORS, error_message, field_rules
from ..jobs import MaxPixels, idempotency_of, owner_of, submit, wait_for_result
from ..queue import ENDED
from ..registry import UnknownModel
from ..settings import Settings
from ..uploads import JSON_BODY, check_pixels, open_image, size_from_image

# the web UI's sampler names -> this project's
SAMPLERS = {"DDIM": "ddim", "DDPM": "ddpm", "Euler": "euler", "Euler a": "euler_a", "DPM++ 2M": "dpmpp_2m",
            "DPM++ 2M Karras": "dpmpp_2m_karras", "Euler Karras": "euler_karras", "Euler a Karras": "euler_a_karras"}
SCHEDULERS = ("automatic", "uniform", "karras")  # the web UI's scheduler names this subset serves


def sampler_of(name: Optional[str], scheduler: Optional[str]) -> str:
    """A web UI sampler name (or this project's), with the web UI's separate scheduler, as this project's."""
    by_name = {k.lower(): v for k, v in SAMPLERS.items()} | {v: v for v in SAMPLERS.values()}
    sampler = by_name.get((name or "Euler a").lower())
    if sampler is None:
        raise ValueError(f"sampler_name must be one of {', '.join(SAMPLERS)}, got {name!r}")
    scheduler = (scheduler or "automatic").lower()
    if scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {', '.join(SCHEDULERS)}, got {scheduler!r}")
    if scheduler == "karras" and not sampler.endswith("_karras"):
        if sampler + "_karras" not in SAMPLERS.values():
            raise ValueError(f"scheduler karras is served with Euler, Euler a and DPM++ 2M, not {name!r}")
        sampler += "_karras"
    return sampler


def request_models(settings: Settings) -> dict[str, type[BaseModel]]:
    images_rule = f"an integer in [1, {settings.max_images}]; so is batch_size * n_iter"

    class WebUITxt2ImgRequest(BaseModel):
        """The web UI's txt2img request (the fields of this subset; others are ignored)."""
        model_config = ConfigDict(extra="ignore")

        prompt: str = ""
        negative_prompt: str = ""
        steps: int = 50
        cfg_scale: float = Field(7.0, ge=0, le=50, description="a number in [0, 50]")
        sampler_name: Optional[str] = Field(None, description=f"one of {', '.join(SAMPLERS)}")
        sampler_index: Optional[str] = Field(None, description="deprecated name of sampler_name")
        scheduler: Optional[str] = Field(None, description=f"one of {', '.join(SCHEDULERS)}")
        seed: int = -1
        width: Optional[int] = None
        height: Optional[int] = None
        batch_size: int = Field(1, ge=1, le=settings.max_images, description=images_rule)
        n_iter: int = Field(1, ge=1, le=settings.max_images, description=images_rule)
        override_settings: dict = Field(default_factory=dict, description="options for this request only; "
                                        "sd_model_checkpoint picks its model (else the server-wide option's)")

    class WebUIImg2ImgRequest(WebUITxt2ImgRequest):
        init_images: list[str] = Field(..., min_length=1, max_length=1,
                                       description="a list of one base64 image (PNG, JPEG, ...)")
        denoising_strength: float = Field(0.75, ge=0, le=1, description="a number in [0, 1]")
        mask: Optional[str] = Field(None, description="a base64 image; white = repaint")
        inpainting_mask_invert: int = Field(0, ge=0, le=1, description="0 or 1; 1: black = repaint")

    return {"txt2img": WebUITxt2ImgRequest, "img2img": WebUIImg2ImgRequest}


class PngInfoRequest(BaseModel):
    image: str = Field(..., description="a base64 PNG (with or without its data: URL head)")


def b64decode(text: str, what: str) -> bytes:
    """A web UI base64 image, with or without its `data:image/png;base64,` head."""
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise HTTPException(422, f"{what} is not base64 text")


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def router(settings: Settings) -> APIRouter:
    native = schemas.request_models(settings)
    models = request_models(settings)
    rules = field_rules(*native.values(), *models.values())
    active: list[tuple[Optional[str], list[str]]] = []  # (API key digest, job ids) of the requests in progress
                                                        # here, oldest first; each key sees only its own

    class Errors(APIRoute):
        """422 messages that name the web UI's fields and their ranges."""

        def get_route_handler(self):
            handler = super().get_route_handler()

            async def route(request: Request):
                try:
                    return await handler(request)
                except RequestValidationError as e:
                    return JSONResponse({"detail": "; ".join(error_message(x, rules) for x in e.errors())}, 422)

            return route

    # the API key (bearer, X-API-Key or basic auth's password) is checked by api.RequireKey, before any route
    api = APIRouter(prefix="/sdapi/v1", tags=["AUTOMATIC1111 compatible"], route_class=Errors)
    Txt2Img, Img2Img = models["txt2img"], models["img2img"]

    def native_params(body, mode: str, seed: int, max_pixels: int, model: Optional[str]) -> dict:
        """The native request of one image (so the job is the one the native endpoint makes)."""
        params = {"prompt": body.prompt, "negative_prompt": body.negative_prompt, "steps": body.steps,
                  "guidance_scale": body.cfg_scale, "seed": seed, "width": body.width, "height": body.height,
                  "num_images": 1, "model": model}
        if mode != "txt2img":
            params["strength"] = body.denoising_strength
        try:
            params["sampler"] = sampler_of(body.sampler_name or body.sampler_index, body.scheduler)
            params = native[mode](**params).model_dump()
        except ValueError as e:  # pydantic's ValidationError is one
            errors = e.errors() if isinstance(e, ValidationError) else [{"type": "value_error", "loc": (),
                                                                         "msg": str(e)}]
            raise RequestValidationError(errors)
        check_pixels(params["width"], params["height"], max_pixels)
        return params

    async def run(request: Request, body, mode: str, params: dict, inputs: dict) -> JSONResponse:
        """One job per image, seeds seed, seed + 1, ...; wait for all; the web UI's answer."""
        queue, count = request.app.state.queue, body.batch_size * body.n_iter
        if count > settings.max_images:
            raise HTTPException(422, f"batch_size * n_iter must be at most {settings.max_images}, got {count}")
        idem = idempotency_of(request, {**params, "count": count}, inputs)  # (before a random seed is drawn)
        if body.seed == -1:
            params = {**params, "seed": secrets.randbelow(schemas.MAX_SEED + 1 - count)}
        seed = params["seed"]
        if seed + count - 1 > schemas.MAX_SEED:
            raise HTTPException(422, f"seed + batch_size * n_iter - 1 must be at most {schemas.MAX_SEED}")
        ids: list[str] = []
        entry = (owner_of(request), ids)
        active.append(entry)
        try:
            try:
                for i in range(count):
                    part = dataclasses.replace(idem, part=i) if idem else None
                    state = await submit(request, mode, {**params, "seed": seed + i}, inputs, part)
                    ids.append(state.id)
                    if i == 0:
                        seed = state.params["seed"]  # (a retry with an Idempotency-Key: the first request's)
            except HTTPException:  # queue full part way: take back what went in
                for job_id in ids:
                    await queue.cancel(job_id)
                raise
            images, seeds, interrupted = [], [], False
            for job_id in ids:
                try:
                    state, pngs = await wait_for_result(queue, settings, await queue.state(job_id), request)
                except HTTPException as e:
                    if e.status_code != 409:  # 409: cancelled by /interrupt (or DELETE /jobs/{id})
                        raise
                    interrupted = True
                    continue
                images.append(base64.b64encode(pngs[0]).decode())
                seeds.append(state.params["seed"])
        finally:
            active.remove(entry)
        p = params
        sampler = next((k for k, v in SAMPLERS.items() if v == p["sampler"]), p["sampler"])
        width, height = p["width"], p["height"]
        if width is None and seeds:  # txt2img left the size to the worker: the model's native size
            width, height = state.params["width"], state.params["height"]
        n, infotexts = len(seeds), [f"{p['prompt']}\nNegative prompt: {p['negative_prompt']}\nSteps: {p['steps']}, "
                                    f"Sampler: {sampler}, CFG scale: {p['guidance_scale']:g}, Seed: {s}, "
                                    f"Size: {width}x{height}" for s in seeds]
        info = {"prompt": p["prompt"], "all_prompts": [p["prompt"]] * n, "negative_prompt": p["negative_prompt"],
                "all_negative_prompts": [p["negative_prompt"]] * n, "seed": seed, "all_seeds": seeds,
                "subseed": -1, "all_subseeds": [-1] * n, "subseed_strength": 0, "width": width, "height": height,
                "sampler_name": sampler, "cfg_scale": p["guidance_scale"], "steps": p["steps"],
                "batch_size": body.batch_size, "n_iter": body.n_iter, "denoising_strength": p.get("strength"),
                "infotexts": infotexts, "mode": mode, "job_ids": ids, "interrupted": interrupted}
        parameters = body.model_dump(exclude={"init_images", "mask"})
        return JSONResponse({"images": images, "parameters": parameters, "info": json.dumps(info)})

    async def model_of(request: Request, body) -> Optional[str]:
        """The model a web UI request runs on: its override_settings' sd_model_checkpoint, else the server-wide
        option's (POST /options), else the default (None)."""
        wanted = body.override_settings.get("sd_model_checkpoint")
        if wanted is None:
            wanted = (await request.app.state.options.get()).get("sd_model_checkpoint")
        if wanted is not None and not isinstance(wanted, str):
            raise HTTPException(422, f"sd_model_checkpoint must be a model title or name, got {wanted!r}")
        return wanted

    def sd_model(registry, checkpoint) -> dict:
        sha = registry.sha256(checkpoint)
        return {"title": registry.title(checkpoint), "model_name": checkpoint.name,
                "hash": sha[:10] if sha else None, "sha256": sha, "filename": str(checkpoint.path), "config": None}

    @api.get("/sd-models", summary="Web UI: the checkpoints this server serves (title = 'name [hash]')",
             responses={401: ERRORS[401]})
    def sd_models(request: Request):  # (a plain def: FastAPI runs it in a thread, as the first call hashes files)
        registry = request.app.state.registry
        return [sd_model(registry, c) for c in registry.checkpoints().values()]

    @api.post("/refresh-checkpoints", summary="Web UI: list the models folder again", responses={401: ERRORS[401]})
    def refresh_checkpoints(request: Request):
        request.app.state.registry.refresh()
        request.app.state.registry.checkpoints()
        return None

    @api.get("/options", summary="Web UI: the server-wide options (sd_model_checkpoint, and what clients stored)",
             responses={k: ERRORS[k] for k in (401, 503)})
    async def get_options(request: Request):
        registry, stored = request.app.state.registry, await request.app.state.options.get()
        try:
            checkpoint = registry.find(stored.get("sd_model_checkpoint"))
        except (UnknownModel, AttributeError):   # (a model since removed from the folder: the default again)
            checkpoint = registry.default
        title = await asyncio.to_thread(registry.title, checkpoint)
        return {**stored, "sd_model_checkpoint": title, "sd_checkpoint_hash": registry.sha256(checkpoint)}

    @api.post("/options", summary="Web UI: store options; sd_model_checkpoint must name a model of /sd-models",
              dependencies=[JSON_BODY], responses={k: ERRORS[k] for k in (400, 401, 413, 422, 503)})
    async def set_options(request: Request, body: dict):
        registry = request.app.state.registry
        if "sd_model_checkpoint" in body:
            wanted = body["sd_model_checkpoint"]
            try:
                checkpoint = registry.find(wanted if isinstance(wanted, str) else repr(wanted))
            except UnknownModel as e:
                raise HTTPException(422, f"sd_model_checkpoint: {e}")
            body = {**body, "sd_model_checkpoint": checkpoint.name}
        try:
            await request.app.state.options.update(body)
        except ValueError as e:
            raise HTTPException(422, str(e))
        return None

    @api.post("/png-info", summary="Web UI: the generation parameters a PNG carries (its `parameters` chunk)",
              dependencies=[JSON_BODY], responses={k: ERRORS[k] for k in (400, 401, 413, 415, 422)})
    async def png_info(body: PngInfoRequest):
        data = b64decode(body.image, "image")
        try:
            with Image.open(io.BytesIO(data)) as img:
                chunks = {k: v for k, v in getattr(img, "text", {}).items() if isinstance(v, str)}
        except Exception:  # noqa: BLE001  (not an image)
            raise HTTPException(415, "image is not a readable image")
        text = chunks.pop("parameters", "")
        return {"info": text, "items": chunks, "parameters": parse_infotext(text) if text else {}}

    @api.post("/txt2img", summary="Web UI: text to image", dependencies=[JSON_BODY], responses=SYNC_ERRORS)
    async def txt2img(request: Request, body: Txt2Img, max_pixels: MaxPixels):
        model = await model_of(request, body)
        return await run(request, body, "txt2img", native_params(body, "txt2img", body.seed, max_pixels, model), {})

    @api.post("/img2img", summary="Web UI: image to image; with a mask (white = repaint), inpainting",
              dependencies=[JSON_BODY], responses=SYNC_ERRORS)
    async def img2img(request: Request, body: Img2Img, max_pixels: MaxPixels):
        data, image = open_image(b64decode(body.init_images[0], "init_images[0]"), "init_images[0]", settings,
                                 max_pixels)
        inputs, mode = {"image": data}, "img2img"
        if body.mask is not None:
            mask_data, mask = open_image(b64decode(body.mask, "mask"), "mask", settings, max_pixels)
            if mask.size != image.size:
                raise HTTPException(422, f"mask size {mask.width}x{mask.height} must equal the size of "
                                         f"init_images[0], {image.width}x{image.height}")
            if body.inpainting_mask_invert:
                from PIL import ImageOps

                mask_data = png_bytes(ImageOps.invert(mask.convert("L")))
            inputs["mask"], mode = mask_data, "inpaint"
        model = await model_of(request, body)
        params = size_from_image(native_params(body, mode, body.seed, max_pixels, model), image, max_pixels)
        return await run(request, body, mode, params, inputs)

    @api.get("/loras", summary="Web UI: the LoRAs of the server's folder (name = the file's stem)",
             responses={401: ERRORS[401]})
    def list_loras():  # (a plain def: FastAPI runs it in a thread, as it reads the files' headers)
        folder = loras.lora_folder(settings)
        if folder is None:
            return []
        return [{"name": name, "alias": name, "path": str(file), "metadata": folder.metadata(file)}
                for name, file in folder.files().items()]

    @api.post("/refresh-loras", summary="Web UI: list the LoRA folder again", responses={401: ERRORS[401]})
    def refresh_loras():
        for folder in (loras.lora_folder(settings), loras.embeddings_folder(settings)):
            if folder is not None:
                folder.refresh()
                folder.files()
        return None

    @api.get("/embeddings", summary="Web UI: the embeddings of the server's folder (names only)",
             responses={401: ERRORS[401]})
    def list_embeddings():
        folder = loras.embeddings_folder(settings)
        unknown = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": None, "vectors": None}
        return {"loaded": {name: dict(unknown) for name in (folder.names() if folder is not None else [])},
                "skipped": {}}

    @api.get("/samplers", summary="Web UI: the samplers (name, aliases = this project's name)",
             responses={401: ERRORS[401]})
    async def samplers():
        return [{"name": name, "aliases": [ours], "options": {}} for name, ours in SAMPLERS.items()]

    async def current(queue, owner: Optional[str]) -> list:
        """The states of the oldest request in progress here made with this API key."""
        for who, ids in list(active):
            if who != owner:
                continue
            states = [s for s in [await queue.state(i) for i in ids] if s is not None]
            if any(s.status not in ENDED for s in states):
                return states
        return []

    @api.get("/progress", summary="Web UI: progress of the oldest request in progress",
             responses={k: ERRORS[k] for k in (401, 422, 503)})
    async def progress(request: Request, skip_current_image: bool = False):
        states = await current(request.app.state.queue, owner_of(request))
        steps = [s.params["steps"] for s in states]
        done = [s.params["steps"] if s.status in ENDED else min(s.step, s.params["steps"]) for s in states]
        fraction = sum(done) / sum(steps) if steps else 0.0
        running = next((s for s in states if s.status == "running"), None)
        started = min((s.started for s in states if s.started), default=None)
        elapsed = time.time() - started if started else 0.0
        eta = elapsed / fraction - elapsed if fraction > 0 else 0.0
        state = {"skipped": False, "interrupted": any(s.status == "cancelled" for s in states),
                 "stopping_generation": False, "job": states[0].id if states else "", "job_count": len(states),
                 "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.gmtime(states[0].created)) if states else "0",
                 "job_no": sum(s.status in ENDED for s in states),
                 "sampling_step": running.step if running else 0,
                 "sampling_steps": running.params["steps"] if running else 0}
        current_image = None
        if running is not None and not skip_current_image:   # the web UI's live preview: base64 PNG
            queue = request.app.state.queue
            await queue.watch(running.id)
            png = await queue.preview(running.id)
            current_image = base64.b64encode(png).decode() if png else None
        return {"progress": round(fraction, 4), "eta_relative": round(eta, 3), "state": state,
                "current_image": current_image, "textinfo": None,
                "current_task": states[0].id if states else None}

    @api.post("/interrupt", summary="Web UI: stop the oldest request in progress (its finished images come back)",
              responses={k: ERRORS[k] for k in (401, 503)})
    async def interrupt(request: Request):
        queue = request.app.state.queue
        for state in await current(queue, owner_of(request)):
            if state.status not in ENDED:
                await queue.cancel(state.id)
        return {}

    return api
