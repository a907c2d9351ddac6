"""OpenAI Images API on the same queue and worker as the native API.

    POST /v1/images/generations   JSON {prompt, n, size "WxH", response_format, model, ...} -> a txt2img job
    POST /v1/images/edits         multipart {image, mask?, prompt, n, size, ...}            -> an inpaint job

Answers are `{"created", "data": [{"b64_json"} or {"url"}], "model", "size", "output_format", "seed"}`;
every error, the API key's included, is `{"error": {"message", "type", "param", "code"}}`. The
service's API key is the OpenAI key (`Authorization: Bearer KEY`). The mask follows OpenAI: its
fully transparent pixels (alpha 0) are repainted; without a mask, the image's own transparent pixels.
`response_format="url"` answers links to /jobs/{id}/image/{n} (kept SD_RESULT_TTL seconds; they need
the API key like every other route). `model` picks one of GET /v1/models (OpenAI's own names, dall-e-* and
gpt-image-*, mean the default model); `quality`, `style`, `user` and the like are accepted and ignored.
The native fields negative_prompt, steps, guidance_scale, sampler, seed, loras (and strength for edits) may
be added to a request as extensions; `<lora:NAME:W>` tags in the prompt apply LoRAs as on every face.
"""

import base64
import io
import re
import time
from typing import Annotated, Literal, Optional

from fastapi import APIRouter, Depends, File, Form, HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import schemas
from ..errors import RETRY_AFTER, clear_detail, error_message, field_rules
from ..jobs import (IDEMPOTENCY_KEY, IdempotencyKeyReused, MaxPixels, get_queue, idempotency_of, submit,
                    wait_for_result)
from ..queue import QueueUnavailable
from ..settings import Settings
from ..uploads import FORM_BODY, JSON_BODY, check_pixels, open_image, read_image, size_from_image

DEFAULT_MODEL = "sd-from-scratch"
OPENAI_MODEL = re.compile(r"(dall-e|gpt-image)(-|$)")   # OpenAI's own names (clients' defaults): the default model
EXTENSIONS = ("negative_prompt", "steps", "guidance_scale", "sampler", "seed", "loras")  # native fields, passed through
# status of a native error -> (OpenAI status, type, code)
KINDS = {400: (400, "invalid_request_error", "invalid_value"), 413: (400, "invalid_request_error", "too_large"),
         415: (400, "invalid_request_error", "invalid_image_format"),
         422: (400, "invalid_request_error", "invalid_value"),
         401: (401, "invalid_request_error", "invalid_api_key"), 409: (409, "invalid_request_error", "job_cancelled"),
         429: (429, "requests", "rate_limit_exceeded"), 503: (503, "server_error", "queue_unavailable"),
         504: (504, "server_error", "timeout")}


class OpenAIErrorBody(BaseModel):
    message: str = Field(..., description="what went wrong, naming the field and its allowed values")
    type: str = Field(..., description="invalid_request_error, requests or server_error")
    param: Optional[str] = Field(None, description="the field at fault, if one is")
    code: Optional[str] = None


class OpenAIError(BaseModel):
    """Every error of this layer, as OpenAI's API answers them."""
    error: OpenAIErrorBody


ERRORS = {400: {"model": OpenAIError, "description": "a field is out of range (named in `param`), the image is not "
                                                      "one, too large, or the body cannot be parsed"},
          401: {"model": OpenAIError, "description": "missing or wrong API key (when keys are configured)"},
          409: {"model": OpenAIError, "description": "the job was cancelled"},
          429: {"model": OpenAIError, "description": "queue full; retry after the Retry-After seconds"},
          503: {"model": OpenAIError, "description": "queue unreachable; retry after the Retry-After seconds"},
          504: {"model": OpenAIError, "description": "the job did not finish in time; follow it at /jobs/{id}"}}


def error(status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
          headers: Optional[dict] = None) -> JSONResponse:
    """An error in OpenAI's shape, the native status mapped to OpenAI's."""
    status, kind, default_code = KINDS.get(status, (status, "server_error" if status >= 500 else
                                                    "invalid_request_error", None))
    body = {"error": {"message": message, "type": kind, "param": param, "code": code or default_code}}
    return JSONResponse(body, status, headers=headers)


def unauthorized(message: str, headers: dict) -> JSONResponse:
    """The 401 of a request under /v1 without a valid key, in OpenAI's shape (api.RequireKey answers it)."""
    return error(401, message, headers=headers)


def size_of(size: Optional[str]) -> tuple[Optional[int], Optional[int]]:
    """'WIDTHxHEIGHT' -> (width, height); None or 'auto' -> (None, None): the native or the image's size.
    (WIDTH * HEIGHT is checked against the request's pixel limit apart: uploads.check_pixels.)"""
    if size is None or size == "auto":
        return None, None
    w, _, h = size.lower().partition("x")
    if not (w.isdigit() and h.isdigit()):
        raise ValueError("not WIDTHxHEIGHT")
    width, height = int(w), int(h)
    if not all(8 <= s <= schemas.MAX_SIDE and s % 8 == 0 for s in (width, height)):
        raise ValueError("out of range")
    return width, height


def request_models(settings: Settings) -> dict[str, type[BaseModel]]:
    n_rule = f"an integer in [1, {settings.max_images}]"
    size_rule = (f"'WIDTHxHEIGHT' with multiples of 8 in [8, {schemas.MAX_SIDE}] and WIDTH * HEIGHT at most "
                 f"{schemas.max_pixels_rule(settings)}, or 'auto'; default: the model's native size (the image's, "
                 "for edits)")

    class OpenAIImageRequest(BaseModel):
        """OpenAI's image generation request (plus the native fields of EXTENSIONS)."""
        model_config = ConfigDict(extra="forbid")

        prompt: str = Field(..., description="text of at most 4000 characters; what to draw")
        model: Optional[str] = Field(None, description="a model id of GET /v1/models; OpenAI's own names (dall-e-*, "
                                                       "gpt-image-*) and none: the default model")
        n: Optional[int] = Field(1, ge=1, le=settings.max_images, description=n_rule)
        size: Optional[str] = Field(None, description=size_rule)
        response_format: Optional[Literal["b64_json", "url"]] = Field(
            "b64_json", description="one of b64_json, url; url: links to /jobs/{id}/image/{n}")
        output_format: Optional[Literal["png"]] = Field(None, description="png; the only format served")
        stream: Optional[Literal[False]] = Field(None, description="false; streaming is not served")
        quality: Optional[str] = Field(None, description="any text; ignored")
        style: Optional[str] = Field(None, description="any text; ignored")
        user: Optional[str] = Field(None, description="any text; ignored")
        safety_identifier: Optional[str] = Field(None, description="any text; ignored")
        background: Optional[str] = Field(None, description="any text; ignored")
        moderation: Optional[str] = Field(None, description="any text; ignored")
        # native extensions: validated by the native request model
        negative_prompt: Optional[str] = None
        steps: Optional[int] = None
        guidance_scale: Optional[float] = None
        sampler: Optional[str] = None
        seed: Optional[int] = None
        loras: Optional[list] = None

        @field_validator("size")
        @classmethod
        def _size(cls, v):
            size_of(v)
            return v

    class OpenAIEditRequest(OpenAIImageRequest):
        """OpenAI's image edit request (multipart form fields; files `image` and optional `mask`)."""
        model_config = ConfigDict(extra="ignore")  # the form also carries the files
        strength: Optional[float] = None

    return {"generation": OpenAIImageRequest, "edit": OpenAIEditRequest}


def has_alpha(image) -> bool:
    return image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info


def repaint_mask(data: bytes, image, settings: Settings, max_pixels: int) -> bytes:
    """OpenAI's mask (alpha 0 = repaint) as the native one (white = repaint), a PNG."""
    from PIL import Image

    _, mask = open_image(data, "mask", settings, max_pixels)
    if mask.size != image.size:
        raise HTTPException(422, f"mask size {mask.width}x{mask.height} must equal the image size "
                                 f"{image.width}x{image.height}")
    if not has_alpha(mask):
        raise HTTPException(422, "mask must have an alpha channel: its fully transparent pixels (alpha 0) mark "
                                 "what to repaint")
    alpha = mask.convert("RGBA").getchannel("A")
    white = Image.eval(alpha, lambda a: 255 if a == 0 else 0)
    buf = io.BytesIO()
    white.save(buf, format="PNG")
    return buf.getvalue()


def router(settings: Settings) -> APIRouter:
    """The /v1/images routes; their errors, validation and API key included, in OpenAI's shape."""
    native = schemas.request_models(settings)
    models = request_models(settings)
    rules = field_rules(*native.values(), *models.values())
    fields = set(rules) | {"image", "mask"}

    def invalid(errors: list) -> JSONResponse:
        err = errors[0]
        loc = [str(x) for x in err.get("loc", ()) if x not in ("body", "query", "path", "header")]
        param = loc[0] if loc and err.get("type") != "json_invalid" else None  # json_invalid: loc is an offset
        code = {"missing": "missing_required_parameter", "extra_forbidden": "unknown_parameter"}.get(err.get("type"))
        return error(400, "; ".join(error_message(e, rules) for e in errors), param, code)

    class OpenAIErrors(APIRoute):
        def get_route_handler(self):
            handler = super().get_route_handler()

            async def route(request: Request):
                try:
                    return await handler(request)
                except RequestValidationError as e:
                    return invalid(e.errors())
                except IdempotencyKeyReused as e:  # 422, not mapped to 400: the issue of the key, not the body
                    body = {"error": {"message": e.detail, "type": "invalid_request_error", "param": IDEMPOTENCY_KEY,
                                      "code": "idempotency_key_reused"}}
                    return JSONResponse(body, 422)
                except StarletteHTTPException as e:
                    first = str(e.detail).split(" ")[0].removesuffix(":")  # ("prompt: unknown LoRA ...")
                    param = first if first in fields else None
                    code = "unsupported_content_type" if e.status_code == 415 and param is None else None
                    return error(e.status_code, clear_detail(e), param, code, headers=e.headers)
                except QueueUnavailable as e:
                    return error(503, f"queue unavailable: {e}", headers={"Retry-After": RETRY_AFTER})

            return route

    # the API key is checked (and its 401 given in OpenAI's shape) by api.RequireKey, before any route
    api = APIRouter(prefix="/v1", tags=["OpenAI compatible"], route_class=OpenAIErrors)
    ImageRequest, EditRequest = models["generation"], models["edit"]

    def native_params(body, mode: str, max_pixels: int) -> dict:
        """The native request these fields make (so the job is the one the native endpoint makes)."""
        width, height = size_of(body.size)
        check_pixels(width, height, max_pixels, what="size (WIDTH * HEIGHT)")  # (param "size")
        extras = EXTENSIONS + (("strength",) if mode == "inpaint" else ())
        params = {"prompt": body.prompt, "num_images": body.n or 1, "width": width, "height": height,
                  "model": None if OPENAI_MODEL.match(body.model or "") else body.model,
                  **{k: getattr(body, k) for k in extras if getattr(body, k) is not None}}
        try:
            return native[mode](**params).model_dump()
        except ValidationError as e:
            raise RequestValidationError(e.errors())

    async def answer(request: Request, body, state) -> JSONResponse:
        state, pngs = await wait_for_result(request.app.state.queue, settings, state, request)
        if body.response_format == "url":
            data = [{"url": str(request.url_for("job_image_n", job_id=state.id, n=n))} for n in range(len(pngs))]
        else:
            data = [{"b64_json": base64.b64encode(p).decode()} for p in pngs]
        p = state.params
        return JSONResponse({"created": int(state.finished or time.time()), "data": data,
                             "model": body.model or DEFAULT_MODEL, "output_format": "png",
                             "size": f"{p['width']}x{p['height']}" if p.get("width") else None,
                             "seed": p["seed"], "job_id": state.id})

    @api.post("/images/generations", summary="OpenAI: create images from a prompt (a txt2img job)",
              dependencies=[JSON_BODY], responses=ERRORS)
    async def generations(request: Request, body: ImageRequest, max_pixels: MaxPixels, queue=Depends(get_queue)):
        params = native_params(body, "txt2img", max_pixels)
        state = await submit(request, "txt2img", params, {},
                             idempotency_of(request, params, {}))
        return await answer(request, body, state)

    @api.post("/images/edits", summary="OpenAI: repaint an image where the mask is transparent (an inpaint job)",
              dependencies=[FORM_BODY], responses=ERRORS)
    async def edits(request: Request, body: Annotated[EditRequest, Form()], max_pixels: MaxPixels,
                    queue=Depends(get_queue),
                    image: Annotated[Optional[UploadFile], File(description="the image to edit")] = None,
                    images: Annotated[Optional[list[UploadFile]], File(alias="image[]")] = None,
                    mask: Annotated[Optional[UploadFile], File(description="alpha 0 = repaint")] = None):
        uploads = ([image] if image is not None else []) + (images or [])
        if len(uploads) != 1:
            raise HTTPException(422, f"image is required, exactly one (got {len(uploads)})")
        data, img = await read_image(uploads[0], "image", settings, max_pixels)
        inputs = {"image": data}
        if mask is not None:
            inputs["mask"] = repaint_mask(await mask.read(), img, settings, max_pixels)
        elif not has_alpha(img):
            raise HTTPException(422, "mask is required: the image has no transparent pixels to repaint")
        params = size_from_image(native_params(body, "inpaint", max_pixels), img, max_pixels)
        state = await submit(request, "inpaint", params, inputs,
                             idempotency_of(request, params, inputs))
        return await answer(request, body, state)

    @api.get("/models", summary="OpenAI: the models this server serves (ids for the `model` field)")
    async def list_models(request: Request):
        registry = request.app.state.registry

        def created(checkpoint) -> int:
            try:
                return int(checkpoint.path.stat().st_mtime)
            except OSError:
                return 0
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created(c),
                                             "owned_by": "sd-from-scratch"}
                                            for name, c in registry.checkpoints().items()]}

    return api
