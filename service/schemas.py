"""Request and response bodies of the HTTP API (they are what /docs and /openapi.json show).

The limits of a request (max steps, images, pixels) are settings, so the request models are
made for one Settings by `request_models(settings)`: the OpenAPI schema then states the limits
the server really enforces. Every field's `description` starts with its rule, up to the first ";":
a 422 quotes it, "steps must be an integer in [1, 150], got 500". The pixel limit alone is not
checked here: unless SD_MAX_PIXELS sets it, it is the served model's (Settings.max_pixels_for its
native size), known once a worker has announced it, so the faces check it per request
(uploads.check_pixels with jobs.MaxPixels); the models only describe it.
"""

import json
from typing import Annotated, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from model.pipeline import MAX_MICRO
from model.samplers import SAMPLERS

Mode = Literal["txt2img", "img2img", "inpaint"]
Status = Literal["queued", "running", "done", "failed", "cancelled"]
Sampler = Literal[SAMPLERS]  # type: ignore[valid-type]
MAX_SEED = 2**32 - 1
MAX_SIDE = 4096


FORM_PAIRS = ("The SDXL fields original_size, crops_coords_top_left, target_size and their negative_ ones are "
              "the JSON endpoint's, each one form field of two integers: `original_size=1024,1024` (also "
              "`[1024, 1024]`, or the field sent twice). The loras field is JSON text: "
              "`loras=[{\"name\": \"ink\", \"scale\": 0.8}]` (or one object per field sent).")


def max_pixels_rule(settings) -> str:
    """The pixel limit as the API's descriptions state it (no ";": a 422 quotes a rule up to the first)."""
    if settings.max_pixels is not None:
        return str(settings.max_pixels)
    sd1, sd2, sdxl = (settings.max_pixels_for(side) for side in (512, 768, 1024))
    return (f"the served model's limit (4 x its native size squared, at least {sd1}: SD 1.x {sd1}, SD 2.x {sd2}, "
            f"SDXL {sdxl})")


def pairs_from_form(value):
    """A form's micro-conditioning field as the JSON list the rules check: FastAPI hands a form's list field
    over as the list of its values, ["1024,1024"] (or ["[1024, 1024]"], or ["1024", "1024"] for the field
    sent twice). An empty field is a field left out."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        text = value[0].strip().removeprefix("[").removesuffix("]").strip()
        return [x.strip() for x in text.split(",")] if text else None
    return value


MAX_LORAS = 16  # entries of a request's loras field
LORA_RULE = (f"a list of at most {MAX_LORAS} {{name, scale}} objects, name a LoRA of the server's folder "
             "(GET /sdapi/v1/loras), scale a number in [-10, 10]")


class LoraWeight(BaseModel):
    """One LoRA a request applies: `{"name": "ink", "scale": 0.8}` (as `<lora:ink:0.8>` in the prompt does)."""
    model_config = ConfigDict(extra="forbid")
    name: str = Field(..., min_length=1, max_length=255, description="a LoRA's name: its file's stem in the "
                                                                     "server's LoRA folder (SD_LORA_DIR)")
    scale: float = Field(1.0, ge=-10, le=10, description="a number in [-10, 10]; default 1")


def loras_from_form(value):
    """A form's loras field as the list the rules check: the JSON text of the list, or of one object per field
    sent (`-F 'loras=[{"name": "ink", "scale": 0.8}]'`, or `-F 'loras={"name": "ink"}'` once per LoRA)."""
    if isinstance(value, str):
        value = [value]
    if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        return value
    out = []
    for text in value:
        if not text.strip():
            continue
        try:
            item = json.loads(text)
        except ValueError:
            return value  # not JSON: the list's rule answers
        out.extend(item if isinstance(item, list) else [item])
    return out


def request_models(settings) -> dict[str, type[BaseModel]]:
    """{"txt2img": ..., "img2img": ..., "inpaint": ...}: the request models under these settings."""
    steps_rule = f"an integer in [1, {settings.max_steps}]"
    images_rule = f"an integer in [1, {settings.max_images}]"
    side_rule = (f"a multiple of 8 in [8, {MAX_SIDE}], with width * height at most {max_pixels_rule(settings)}; "
                 "default: the model's native size (txt2img) or the uploaded image's size rounded down to 8")

    class Generation(BaseModel):
        """What every mode shares: what to draw and how."""
        model_config = ConfigDict(extra="forbid")

        prompt: str = Field(..., max_length=4000, description="text of at most 4000 characters; what to draw",
                            examples=["a red circle on a blue background"])
        negative_prompt: str = Field("", max_length=4000,
                                     description="text of at most 4000 characters; what to steer away from")
        steps: int = Field(min(20, settings.max_steps), ge=1, le=settings.max_steps, description=steps_rule)
        guidance_scale: float = Field(7.5, ge=0, le=50, description="a number in [0, 50]; 1 = no guidance")
        sampler: Sampler = Field("ddim", description=f"one of {', '.join(SAMPLERS)}")
        seed: int = Field(-1, ge=-1, le=MAX_SEED,
                          description=f"an integer in [-1, {MAX_SEED}]; -1 or left out: drawn at random (and reported)")
        width: Optional[int] = Field(None, ge=8, le=MAX_SIDE, multiple_of=8, description=side_rule)
        height: Optional[int] = Field(None, ge=8, le=MAX_SIDE, multiple_of=8, description=side_rule)
        num_images: int = Field(1, ge=1, le=settings.max_images, description=images_rule)
        loras: list[LoraWeight] = Field(default_factory=list, max_length=MAX_LORAS,
                                        description=f"{LORA_RULE}; also `<lora:NAME:W>` tags in the prompt (their "
                                                    "weights add to these)")
        model: Optional[str] = Field(None, max_length=255,
                                     description="the checkpoint to run: a name of GET /v1/models (or its title or "
                                                 "hash); left out: the default model")

        @model_validator(mode="after")
        def _sides(self):
            # txt2img: the other side would be the model's native size, which only the worker knows, so
            # width * height could not be checked; img2img and inpaint take the other side from the upload
            if type(self) is Txt2ImgRequest and (self.width is None) != (self.height is None):
                raise ValueError("width and height must be given together, or neither (the model's native size)")
            return self

    micro_rule = (f"two integers [height, width] in [1, {MAX_MICRO}]; SDXL's micro-conditioning (other families "
                  "ignore it); default: the image's size")
    crop_rule = f"two integers [top, left] in [0, {MAX_MICRO}]; SDXL's micro-conditioning; default [0, 0]"
    Pair = Annotated[list[Annotated[int, Field(ge=1, le=MAX_MICRO)]], Field(min_length=2, max_length=2)]
    Crop = Annotated[list[Annotated[int, Field(ge=0, le=MAX_MICRO)]], Field(min_length=2, max_length=2)]

    class MicroConditioning(BaseModel):
        """SDXL's size micro-conditioning, as diffusers' StableDiffusionXLPipeline takes it (every mode)."""
        original_size: Optional[Pair] = Field(None, description=micro_rule)
        crops_coords_top_left: Optional[Crop] = Field(None, description=crop_rule)
        target_size: Optional[Pair] = Field(None, description=micro_rule)
        negative_original_size: Optional[Pair] = Field(None, description=micro_rule + " (with negative_target_size)")
        negative_crops_coords_top_left: Optional[Crop] = Field(None, description=crop_rule)
        negative_target_size: Optional[Pair] = Field(None, description=micro_rule + " (with negative_original_size)")

    class FormMicroConditioning(MicroConditioning):
        """The same fields and rules in a multipart form, each pair one field: `original_size=1024,1024`."""
        _from_form = field_validator(*MicroConditioning.model_fields, mode="before")(pairs_from_form)
        _loras_from_form = field_validator("loras", mode="before", check_fields=False)(loras_from_form)

    # (the mixin first: the fields of Generation then come first, in the schema and in the 422s' field lists)
    class Txt2ImgRequest(MicroConditioning, Generation):
        """Text-to-image: what to draw and how (JSON)."""

    class Img2ImgRequest(FormMicroConditioning, Generation):
        """Image-to-image (multipart form fields; the image is the `image` file)."""
        model_config = ConfigDict(extra="ignore")  # the form also carries the files
        strength: float = Field(0.75, ge=0, le=1, description="a number in [0, 1]; how far to move from the input")

    class InpaintRequest(FormMicroConditioning, Generation):
        """Inpainting (multipart form fields; files `image` and optional `mask`, white = repaint;
        without a mask the image's transparent pixels are repainted)."""
        model_config = ConfigDict(extra="ignore")
        strength: float = Field(1.0, ge=0, le=1, description="a number in [0, 1]; how far to move inside the mask")

    return {"txt2img": Txt2ImgRequest, "img2img": Img2ImgRequest, "inpaint": InpaintRequest}


class Parameters(BaseModel):
    """Everything needed to make the same images again."""
    mode: Mode
    prompt: str
    negative_prompt: str
    steps: int
    guidance_scale: float
    sampler: str
    seed: int = Field(..., description="the seed used (drawn at random when the request had none)")
    width: Optional[int] = Field(None, description="None until a worker has chosen the model's native size")
    height: Optional[int] = None
    num_images: int
    strength: Optional[float] = None
    loras: list[LoraWeight] = Field(default_factory=list, description="the loras field (the prompt keeps its tags)")
    model: Optional[str] = Field(None, description="the model that ran it (its registry name)")


class ImageOut(BaseModel):
    index: int = Field(..., description="0-based; images of one request share one seed and one noise draw")
    seed: int
    png_base64: str = Field(..., description="the PNG file, base64; its `parameters` text chunk holds the settings")


class GenerationResponse(BaseModel):
    """The JSON answer of a synchronous request (several images, or `Accept: application/json`)."""
    job_id: str
    seed: int
    images: list[ImageOut]
    parameters: Parameters


class Progress(BaseModel):
    step: int = Field(..., description="denoising steps done")
    total: int = Field(..., description="denoising steps in all (0 until the job starts)")


class JobStatus(BaseModel):
    id: str
    status: Status
    mode: Mode
    progress: Progress
    error: Optional[str] = Field(None, description="why the job failed (or the last error before a retry)")
    attempts: int = Field(..., description="runs started (a job that raises is retried)")
    seed: int
    images: list[str] = Field(..., description="URLs of the result PNGs, once done")
    parameters: Parameters
    created_at: float = Field(..., description="Unix time")
    started_at: Optional[float] = None
    finished_at: Optional[float] = None


class JobAccepted(BaseModel):
    """The 202 answer of POST /jobs/{mode}: poll `status_url`, then fetch `image_url`."""
    id: str
    status: Status
    seed: int
    status_url: str
    image_url: str


class Error(BaseModel):
    detail: str = Field(..., description="what went wrong, naming the field and its allowed values")


class Health(BaseModel):
    status: Literal["ok"]


class Ready(BaseModel):
    status: Literal["ready", "not ready"]
    queue: Literal["memory", "redis"]
    workers: int = Field(..., description="workers that reported in during the last 30 s")
    queue_depth: int = Field(..., description="jobs queued or running")
    models: dict[str, dict] = Field(default_factory=dict, description="model name -> {workers: live workers taking "
                                    "its jobs, loaded: workers holding it in memory}")
    reason: Optional[str] = None
