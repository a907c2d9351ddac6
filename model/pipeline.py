"""Latent diffusion: text (+ image) in, images out.

    pipe = StableDiffusion.from_pretrained("weights/")
    pipe.txt2img("a red circle on a blue background", seed=0)        # -> [PIL.Image]
    pipe.img2img(image, "a blue circle", strength=0.6)
    pipe.inpaint(image, mask, "a yellow square")                      # mask: white = repaint

One generation, start to end:

    text   --tokenizer--> ids [B, 77] --CLIP--> context [B, 77, D]
                          (AUTOMATIC1111's prompt syntax: k chunks of 77 -> [77 k, D] each: model/conditioning.py)
    seed   --randn------> noise [B, C, h, w]                     (h, w = H/f, W/f; f = 8 for SD 1.x)
    image  --VAE enc----> x0 latents (img2img, inpaint: a posterior sample, drawn as diffusers draws it)
    mask   --max pool---> latent mask [B, 1, h, w]; known region kept on x0 (4-channel UNet) or
                          mask + masked-image latents fed to the UNet (9-channel inpainting UNet)
    for each step:  eps = UNet(x, t, context)  with classifier-free guidance
                    eps = eps_uncond + g * (eps_cond - eps_uncond)
                    x   = sampler step (model/samplers.py)
                    (on_latents: the step's denoised estimate x0_hat [B, C, h, w] to the caller, for
                     live previews: model/preview.py's linear latent -> RGB map, pipe.preview_images)
    latents --VAE dec--> images

`generate` is the batched entry point the service worker uses: several requests
(each with its own prompt, negative prompt, seed, guidance scale and input image)
that share mode, size, steps, sampler and strength run as one batch through the
UNet, and each request's images are the same as when it runs alone: its noise
comes from its own torch.Generator("cpu") seeded with its seed, drawn as
diffusers draws it, so the same seed and weights give diffusers' image.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from . import samplers
from .attention import RaggedContext
from .conditioning import Encoded, TextConditioner
from .prompts import CHUNK_LENGTH, extract_lora_tags
from .pnginfo import infotext
from .lora import Adapters
from .preview import LatentPreview
from .weights import Components, load

MODES = ("txt2img", "img2img", "inpaint")
MAX_SEED = 2**64 - 1


class Cancelled(Exception):
    """Raised by a progress callback to stop a generation between steps."""


@dataclass
class Request:
    """One user's part of a batch. Images of one request share one noise draw, as in diffusers."""
    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    guidance_scale: float = 7.5
    num_images: int = 1
    image: Optional[Image.Image] = None  # img2img / inpaint input
    mask: Optional[Image.Image] = None   # inpaint: white = repaint; None = the image's transparent pixels
    # SDXL's micro-conditioning, (height, width) / (top, left) pairs as diffusers takes them; other families
    # ignore them. None: the image's own size. The negative rows use the same unless both negative sizes are given.
    original_size: Optional[tuple[int, int]] = None
    crops_coords_top_left: tuple[int, int] = (0, 0)
    target_size: Optional[tuple[int, int]] = None
    negative_original_size: Optional[tuple[int, int]] = None
    negative_crops_coords_top_left: tuple[int, int] = (0, 0)
    negative_target_size: Optional[tuple[int, int]] = None
    # LoRAs by the names load_lora gave them -> weight (diffusers' set_adapters weights); None: the base model
    loras: Optional[dict] = None

    def lora_set(self) -> dict:
        """The LoRAs that change anything: weight 0 is the same as leaving it out."""
        return {name: w for name, w in (self.loras or {}).items() if w != 0}

    def time_ids(self, width: int, height: int, negative: bool = False) -> list[int]:
        """SDXL's six numbers for this request's (negative) rows: original size, crop top-left, target size."""
        if negative and self.negative_original_size is not None and self.negative_target_size is not None:
            sizes = (self.negative_original_size, self.negative_crops_coords_top_left, self.negative_target_size)
        else:
            sizes = (self.original_size, self.crops_coords_top_left, self.target_size)
        original, crop, target = sizes
        return [*(original or (height, width)), *crop, *(target or (height, width))]


MAX_MICRO = 16384  # the largest number SDXL's micro-conditioning takes here (pixels)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _check_size(name: str, value) -> None:
    _check(isinstance(value, int) and not isinstance(value, bool) and value > 0 and value % 8 == 0,
           f"{name} must be a positive multiple of 8, got {value!r}")


def _check_request(r: Request, mode: str) -> None:
    _check(isinstance(r.prompt, str), f"prompt must be a string, got {type(r.prompt).__name__}")
    _check(isinstance(r.negative_prompt, str), "negative_prompt must be a string")
    _check(isinstance(r.seed, int) and 0 <= r.seed <= MAX_SEED,
           f"seed must be an integer in [0, {MAX_SEED}], got {r.seed!r}")
    g = r.guidance_scale
    _check(isinstance(g, (int, float)) and math.isfinite(g) and g >= 0,
           f"guidance_scale must be a finite number >= 0, got {g!r}")
    _check(isinstance(r.num_images, int) and r.num_images >= 1,
           f"num_images must be an integer >= 1, got {r.num_images!r}")
    if mode != "txt2img":
        _check(isinstance(r.image, Image.Image), f"image is required for {mode}")
    for name in ("original_size", "crops_coords_top_left", "target_size", "negative_original_size",
                 "negative_crops_coords_top_left", "negative_target_size"):
        v, least = getattr(r, name), 0 if "crops" in name else 1
        _check(v is None or (isinstance(v, (tuple, list)) and len(v) == 2 and all(
            isinstance(x, int) and not isinstance(x, bool) and least <= x <= MAX_MICRO for x in v)),
            f"{name} must be two integers in [{least}, {MAX_MICRO}], got {v!r}")


# -----------------------------------------------------------------------------
# pixels <-> tensors


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> [3, H, W] in [-1, 1]."""
    data = torch.frombuffer(bytearray(image.convert("RGB").tobytes()), dtype=torch.uint8)
    return data.view(image.height, image.width, 3).permute(2, 0, 1).float() / 127.5 - 1.0


def to_pil(x: torch.Tensor) -> Image.Image:
    """[3, H, W] in [-1, 1] -> PIL RGB (rounded as diffusers' numpy_to_pil)."""
    x = ((x.float().clamp(-1, 1) + 1) / 2 * 255).round().to(torch.uint8)
    return Image.fromarray(x.permute(1, 2, 0).cpu().numpy())


def mask_of(image: Image.Image, mask: Optional[Image.Image]) -> torch.Tensor:
    """The repaint mask [1, H, W] in {0, 1} at the image's size: white (>= 128) in `mask`, or the
    image's transparent pixels (alpha 0, as the OpenAI edits API) when no mask is given."""
    if mask is None:
        _check(image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info,
               "mask is required: the image has no transparent pixels to repaint")
        m = _plane(image.convert("RGBA").getchannel("A")) == 0
    else:
        _check(mask.size == image.size,
               f"mask size {mask.size[0]}x{mask.size[1]} must equal the image size {image.size[0]}x{image.size[1]}")
        m = _plane(mask.convert("L")) >= 128
    return m.float()[None]


def _plane(image: Image.Image) -> torch.Tensor:
    """A one-channel PIL image as a [H, W] uint8 tensor."""
    return torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(image.height, image.width)


# -----------------------------------------------------------------------------
# the pipeline


class StableDiffusion:
    """Tokenizer, text encoder, VAE and UNet in memory, and the sampling loop around them."""

    def __init__(self, components: Components, name: str = "model"):
        self.tokenizer = components.tokenizer
        self.text_encoder = components.text_encoder
        self.text_encoder_2 = components.text_encoder_2  # SDXL's second (None for SD 1.x, 2.x)
        self.conditioner = TextConditioner(components.tokenizer, components.text_encoder, components.tokenizer_2,
                                           components.text_encoder_2, components.force_zeros_for_empty_prompt)
        self.vae = components.vae
        self.unet = components.unet
        if self.conditioner.dual and self.vae.config.force_upcast and self.vae_dtype == torch.float16:
            self.vae.float()  # as diffusers' SDXL pipelines (only they honour the flag): SDXL's VAE overflows in fp16
        self.schedule = (samplers.Schedule.from_diffusers(components.scheduler_config)
                         if components.scheduler_config else samplers.Schedule.sd15())
        self.name = name
        self.source: Path | None = None    # the weights it was loaded from (compiled packages live beside them)
        self.tuner = None                  # the Tuner of optimize(), once it is called
        self.compiled = None               # optimize()'s CompiledUNet, when packages for this machine exist
        # (prompt, the text encoders' LoRAs, its number of chunks) -> its conditioning
        self._text_cache: OrderedDict[tuple, Encoded] = OrderedDict()
        self.adapters = Adapters({"unet": self.unet, "text_encoder": self.text_encoder,
                                  "text_encoder_2": self.text_encoder_2})
        self._preview: LatentPreview | None = None  # fitted on first use of `preview`

    @classmethod
    def from_pretrained(cls, path, device="cpu", dtype=torch.float32, tokenizer=None) -> "StableDiffusion":
        """Load a native folder, a diffusers-layout folder or one original .safetensors/.ckpt file."""
        pipe = cls(load(path, device=device, dtype=dtype, tokenizer=tokenizer), name=Path(path).stem or "model")
        pipe.source = Path(path)
        return pipe

    def optimize(self, *, prepack: bool | str = "auto", channels_last: bool = False, compile: bool = False,
                 aot: bool = True, tuner=None) -> "StableDiffusion":
        """Turn on speed levers (model/speed.py), for inference: outputs stay within the parity tolerances and
        the state_dicts keep their keys. Call it after moving or casting the model.
        prepack: "auto" (the default) runs each convolution of the UNet and VAE plain or with its weight
        prepacked in oneDNN's layout, whichever a Tuner (model/tuning.py) measures faster for that layer and
        input shape on this machine, on the first call of the shape (CPU float32; a no-op elsewhere);
        True prepacks every k x k conv without measuring; False leaves them plain.
        compile: torch.compile the UNet, in place, instead of the above; each new batch size or image size
        pays for a compilation on its first call (minutes on a CPU), and on a CPU the weights are frozen into
        each compiled graph (a second copy; they must not change afterwards).
        aot: use the UNet packages `sd compile` built beside the weights for this machine (model/compiled.py),
        for the shapes where they measured faster than eager; other shapes run eager."""
        from . import compiled
        from .speed import optimize_unet, optimize_vae
        from .tuning import Tuner

        if aot and not compile and self.source is not None:    # before the convs change their weights' form
            self.compiled = compiled.load(self.unet, compiled.packages_dir(self.source))

        self.tuner = tuner if tuner is not None else Tuner() if prepack == "auto" else None
        optimize_unet(self.unet, prepack=prepack, channels_last=channels_last, compile=compile, tuner=self.tuner)
        optimize_vae(self.vae, prepack=prepack, channels_last=channels_last, tuner=self.tuner)
        return self

    def warm_up(self) -> None:
        """One guided 1-step txt2img at the native size, so that the first request does not pay what a first
        call costs: optimize()'s tuner measures the shapes of a one-image batch, oneDNN creates its primitives,
        the weights' pages are touched. Other shapes (bigger batches, other sizes) are measured when they come."""
        self.txt2img("", steps=1)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def vae_dtype(self) -> torch.dtype:
        """The VAE's own: the UNet's, but fp32 for an SDXL VAE that says force_upcast under fp16."""
        return next(self.vae.parameters()).dtype

    @property
    def latent_factor(self) -> int:
        return self.vae.config.downsample_factor

    @property
    def native_size(self) -> int:
        """The image side the model was trained at (512 for SD 1.x)."""
        return self.unet.config.sample_size * self.latent_factor

    @property
    def is_inpainting_model(self) -> bool:
        """A 9-channel UNet (sd-v1-5-inpainting layout) takes mask and masked-image latents as input."""
        return self.unet.config.in_channels == 9

    # --- LoRAs ---------------------------------------------------------------

    def load_lora(self, path, name: Optional[str] = None) -> str:
        """Load a LoRA file (kohya or diffusers / PEFT format: model/lora.py) under `name` (default: the file's
        stem), kept beside the weights, not merged: requests name it in `loras={name: weight}`, and one batch may
        mix requests with different LoRAs. Loading a name again replaces it. Returns the name."""
        name = self.adapters.load(path, name)
        self._text_cache = OrderedDict((k, v) for k, v in self._text_cache.items()
                                       if name not in dict(k[1]))  # encodings made with an older file of this name
        return name

    def _text_loras(self, loras: Optional[dict]) -> tuple:
        """The part of a request's LoRA set that changes its text encodings (the prompt cache's key)."""
        return tuple(sorted((n, w) for n, w in (loras or {}).items()
                            if self.adapters.loras[n].touches("text_encoder") or
                            self.adapters.loras[n].touches("text_encoder_2")))

    # --- textual inversion --------------------------------------------------

    def load_embedding(self, path, token: Optional[str] = None) -> str:
        """Load a textual inversion embedding (model/embeddings.py: the web UI's .pt, .safetensors with emb_params
        or SDXL's clip_l + clip_g, diffusers' learned_embeds) under `token` (default: the file's stem): that word
        written in a prompt then stands for its vectors. Loading a name again replaces it. Returns the name."""
        from .embeddings import load_embedding

        name = load_embedding(path, self.conditioner.encoders, token)
        self._text_cache.clear()  # a cached prompt may contain the name (or its older vectors)
        return name

    # --- text ---------------------------------------------------------------

    @torch.inference_mode()
    def encode_prompts(self, prompts: Sequence[str], negative: bool = False, loras: Optional[Sequence] = None,
                       chunks: Optional[Sequence[int]] = None):
        """[B] prompts -> (contexts [B, L, D], pooled [B, P] or None: model/conditioning.py). Each distinct
        prompt is encoded once; recent ones (the empty negative prompt above all) are kept in a small cache.
        negative: these are negative prompts (an empty one is zeros where the model says so: SDXL).
        loras: each prompt's {LoRA name: weight} (None: the base model); text-encoder LoRAs change encodings.
        chunks: each prompt's number of 77-token chunks (at least; the prompt syntax of model/prompts.py); they
        must come to one L. None: as many as the batch's longest prompt needs, as the web UI pads a batch."""
        if chunks is None:
            chunks = [max((self.conditioner.count_chunks(p) for p in prompts), default=1)] * len(prompts)
        encoded = self._encode(prompts, negative, loras, chunks)
        _check(len({e.context.shape for e in encoded}) <= 1, "chunks: the prompts' contexts differ in length")
        context = torch.stack([e.context for e in encoded])
        pooled = torch.stack([e.pooled for e in encoded]) if encoded and encoded[0].pooled is not None else None
        return context, pooled

    def _encode(self, prompts: Sequence[str], negative: bool, loras: Optional[Sequence],
                chunks: Sequence[int]) -> list[Encoded]:
        """encode_prompts, one Encoded per prompt (contexts of any length: prompt i's is 77 * max(chunks[i], the
        chunks it needs) tokens)."""
        keys = [(p, self._text_loras(r), k) for p, r, k in zip(prompts, loras or [None] * len(prompts), chunks)]
        missing = [k for k in dict.fromkeys(keys) if k not in self._text_cache]
        for text_loras in dict.fromkeys(k[1] for k in missing):     # one encoder pass per LoRA set
            group = [k for k in missing if k[1] == text_loras]
            sets = [dict(text_loras)] * len(group)
            with self.adapters.active("text_encoder", sets), self.adapters.active("text_encoder_2", sets):
                encoded = self.conditioner.encode([p for p, _, _ in group], self.device, [n for _, _, n in group])
                for k, e in zip(group, encoded):
                    self._text_cache[k] = e
        for k in keys:
            self._text_cache.move_to_end(k)
        encoded = [self._text_cache[k] for k in keys]
        while len(self._text_cache) > 64:
            self._text_cache.popitem(last=False)
        if negative and self.conditioner.zeros_for_empty_negative:
            encoded = [self.conditioner.zeros(e) if p == "" else e for p, e in zip(prompts, encoded)]
        return encoded

    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        """[B] prompts -> [B, L, D] contexts (encode_prompts without the pooled embeddings)."""
        return self.encode_prompts(prompts)[0]

    # --- latents <-> images -------------------------------------------------

    @torch.inference_mode()
    def encode_images(self, images: torch.Tensor, generators=None) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1] -> scaled latents [B, C, H/f, W/f]: the posterior mean (deterministic), or a
        sample of the posterior with one generator per image (as diffusers' img2img draws it)."""
        posterior = self.vae.encode(images.to(self.device, self.vae_dtype))
        z = posterior.mean if generators is None else posterior.sample(list(generators))
        return z.float() * self.vae.config.scaling_factor

    @torch.inference_mode()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> [B, 3, H, W] in [-1, 1]."""
        x = self.vae.decode((latents / self.vae.config.scaling_factor).to(self.vae_dtype))
        return x.float().clamp(-1, 1)

    @property
    def preview(self) -> LatentPreview:
        """The cheap linear latent -> RGB map of this model's VAE (model/preview.py), fitted on first use (a few
        small images through the encoder: ~50 ms for the default model, ~1 s for SD 1.5 on a CPU) and kept."""
        if self._preview is None:
            with torch.inference_mode():
                self._preview = LatentPreview.fit(self.vae)
        return self._preview

    def preview_images(self, latents: torch.Tensor, size: Optional[tuple[int, int]] = None) -> list[Image.Image]:
        """Scaled latents [B, C, h, w] (on_latents' x0_hat) -> B rough PIL previews of w x h, no VAE decode;
        size=(width, height) resizes them (bilinear), e.g. to the job's size or a smaller one of its aspect ratio."""
        return self.preview.to_images(latents, size)

    # --- the public calls ---------------------------------------------------

    def txt2img(self, prompt: str, negative_prompt: str = "", steps: int = 30, guidance_scale: float = 7.5,
                sampler: str = "ddim", seed: int = 0, width: Optional[int] = None, height: Optional[int] = None,
                num_images: int = 1, eta: float = 0.0, callback: Optional[Callable[[int, int], None]] = None,
                loras: Optional[dict] = None, **micro_conditioning):
        """Images from text. Returns num_images PIL images. loras: {name: weight} of LoRAs load_lora loaded.
        micro_conditioning: SDXL's original_size, crops_coords_top_left, target_size and their negative_
        counterparts (see Request)."""
        r = Request(prompt, negative_prompt, seed, guidance_scale, num_images, loras=loras, **micro_conditioning)
        return self.generate([r], mode="txt2img", steps=steps, sampler=sampler, width=width, height=height,
                             eta=eta, callback=callback)[0]

    def img2img(self, image: Image.Image, prompt: str, strength: float = 0.75, negative_prompt: str = "",
                steps: int = 30, guidance_scale: float = 7.5, sampler: str = "ddim", seed: int = 0,
                width: Optional[int] = None, height: Optional[int] = None, num_images: int = 1, eta: float = 0.0,
                callback: Optional[Callable[[int, int], None]] = None, loras: Optional[dict] = None,
                **micro_conditioning):
        """Images from an image and text: noise the image to the step `strength` picks (1 = all the way,
        as txt2img; 0 = not at all, the input comes back through the VAE) and denoise from there."""
        r = Request(prompt, negative_prompt, seed, guidance_scale, num_images, image=image, loras=loras,
                    **micro_conditioning)
        return self.generate([r], mode="img2img", steps=steps, sampler=sampler, width=width, height=height,
                             strength=strength, eta=eta, callback=callback)[0]

    def inpaint(self, image: Image.Image, mask: Optional[Image.Image], prompt: str, strength: float = 1.0,
                negative_prompt: str = "", steps: int = 30, guidance_scale: float = 7.5, sampler: str = "ddim",
                seed: int = 0, width: Optional[int] = None, height: Optional[int] = None, num_images: int = 1,
                eta: float = 0.0, callback: Optional[Callable[[int, int], None]] = None, loras: Optional[dict] = None,
                **micro_conditioning):
        """Repaint the white part of `mask` (or the image's transparent pixels when mask is None);
        every pixel outside the mask comes back unchanged. strength 1 repaints from noise alone; below 1 from
        the input noised to the step `strength` picks, as img2img (and diffusers' inpaint pipelines); 0 gives
        the input through the VAE inside the mask. A latent cell is repainted if any of its pixels is masked."""
        r = Request(prompt, negative_prompt, seed, guidance_scale, num_images, image=image, mask=mask,
                    loras=loras, **micro_conditioning)
        return self.generate([r], mode="inpaint", steps=steps, sampler=sampler, width=width, height=height,
                             strength=strength, eta=eta, callback=callback)[0]

    # --- the batched loop ---------------------------------------------------

    def generate(self, requests: Sequence[Request], *, mode: str = "txt2img", steps: int = 30, sampler: str = "ddim",
                 width: Optional[int] = None, height: Optional[int] = None, strength: Optional[float] = None,
                 eta: float = 0.0, callback: Optional[Callable[[int, int], None]] = None,
                 on_latents: Optional[Callable[[int, int, torch.Tensor], None]] = None) -> list[list[Image.Image]]:
        """Run requests that share mode, size, steps, sampler and strength as one batch.
        Returns one list of images per request. callback(step, total) may raise Cancelled.
        on_latents(step, total, x0), for live previews, is called after each step (after callback, with the same
        step, total) with x0 [B, C, h, w], float32: the step's denoised estimate x0_hat (what the sampler's
        denoiser returned, before the sampler steps on; a clearer preview than the noisy state), in the scaled
        latent space of encode_images / decode_latents (pipe.preview_images(x0) turns it into rough images).
        Rows: B = sum of num_images, request by request in the order given, each request's images in a row
        (requests [a (2 images), b (1)] -> rows [a0, a1, b0]); guidance's unconditional rows are not in it.
        Inpainting with a 4-channel UNet: the known region is the input's latents, as in the final image.
        Read-only (clone it to change it). None (the default): nothing extra is done. No steps (strength 0):
        never called. It may raise Cancelled too; it is called every step, so it decides how often to preview."""
        _check(mode in MODES, f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        _check(len(requests) > 0, "requests must not be empty")
        _check(on_latents is None or callable(on_latents), "on_latents must be callable or None")
        for r in requests:
            _check_request(r, mode)
            _check(r.loras is None or isinstance(r.loras, dict),
                   f"loras must be a dict of name: weight, got {r.loras!r}")
            self.adapters.check(r.lora_set())
        runs = [self._with_prompt_loras(r) for r in requests]   # what runs: tags out of the prompts, into loras
        _check(sampler in samplers.SAMPLERS, f"sampler must be one of {', '.join(samplers.SAMPLERS)}, got {sampler!r}")
        _check(isinstance(steps, int) and not isinstance(steps, bool) and 1 <= steps <= 1000,
               f"steps must be an integer in [1, 1000], got {steps!r}")
        _check(isinstance(eta, (int, float)) and math.isfinite(eta) and eta >= 0, f"eta must be >= 0, got {eta!r}")
        _check(eta == 0 or sampler == "ddim", f"eta only applies to the ddim sampler, got eta={eta} with {sampler!r}")
        if strength is None:
            strength = 1.0 if mode != "img2img" else 0.75
        _check(isinstance(strength, (int, float)) and 0.0 <= strength <= 1.0,
               f"strength must be a number in [0, 1], got {strength!r}")
        _check(mode != "txt2img" or strength == 1.0, "strength only applies to img2img and inpaint")
        if mode == "txt2img":
            width = self.native_size if width is None else width
            height = self.native_size if height is None else height
        else:  # the input image's size (rounded down to a multiple of 8) unless asked otherwise
            first = requests[0].image
            width = first.width // 8 * 8 if width is None else width
            height = first.height // 8 * 8 if height is None else height
        _check_size("width", width)
        _check_size("height", height)
        _check(width % self.latent_factor == 0 and height % self.latent_factor == 0,
               f"width and height must be multiples of {self.latent_factor} for this model")

        with torch.inference_mode():
            images = self._generate(runs, mode, steps, sampler, width, height, strength, eta, callback, on_latents)

        out, k = [], 0
        for r, run in zip(requests, runs):
            batch = []
            for i in range(r.num_images):
                img = to_pil(images[k])
                params = {"prompt": r.prompt, "negative_prompt": r.negative_prompt, "steps": steps,  # as written
                          "sampler": sampler, "guidance_scale": r.guidance_scale, "seed": r.seed, "width": width,
                          "height": height, "mode": mode, "model": self.name,
                          "strength": strength if mode != "txt2img" else None,
                          "loras": {n: (w, self.adapters.loras[n].sha256) for n, w in run.lora_set().items()},
                          "num_images": r.num_images, "index": i}
                img.info["generation"] = params
                img.info["parameters"] = infotext(params)
                batch.append(img)
                k += 1
            out.append(batch)
        return out

    def _with_prompt_loras(self, r: Request) -> Request:
        """The request as it runs: the <lora:NAME:W> tags of its prompt taken out of the text
        (prompts.extract_lora_tags) and added to its loras. A tag's weight ADDS to a loras= entry of the same
        name, as two tags of one name add up (the web UI applies each tag by itself, and a LoRA's change is linear
        in its weight); so "<lora:ink:0.8> a cat" runs exactly as Request("a cat", loras={"ink": 0.8}).
        The negative prompt keeps its tags as text, as the web UI does (it parses extra networks out of the
        prompts only: a LoRA applies to both halves of the guidance, so a negative one would mean nothing else)."""
        try:
            text, tags = extract_lora_tags(r.prompt)
        except ValueError as e:
            raise ValueError(f"prompt: {e}") from None
        if not tags:
            return r
        loras = dict(r.loras or {})
        for name, weight in tags.items():
            loras[name] = loras.get(name, 0.0) + weight
        run = replace(r, prompt=text, loras=loras)
        self.adapters.check(run.lora_set())    # an unknown tag name: the ValueError of an unknown loras= name
        return run

    def _added_conditioning(self, per_image: list, guided: list, pooled_uncond, pooled, width: int,
                            height: int) -> dict:
        """The UNet's added conditioning, for the rows [unconditional (the guided images), conditional (every
        image)]: SDXL's (text_time) pooled text embeddings and micro-conditioning time_ids (each image's
        request's; by default original size = target size = the image's, crop at the top-left corner, as
        diffusers). Other UNets take none: {}. per_image: the request of each image."""
        if self.unet.config.addition_embed_type != "text_time":
            return {}
        text_embeds = torch.cat([pooled_uncond, pooled]).to(self.dtype)                       # [B' + B, P]
        rows = [per_image[i].time_ids(width, height, negative=True) for i in guided] + \
               [r.time_ids(width, height) for r in per_image]
        time_ids = torch.tensor(rows, dtype=self.dtype, device=self.device)                  # [B' + B, 6]
        return {"text_embeds": text_embeds, "time_ids": time_ids}

    def _generate(self, requests, mode, steps, sampler, width, height, strength, eta, callback,
                  on_latents=None) -> torch.Tensor:
        f, C = self.latent_factor, self.vae.config.latent_channels
        shape = (C, height // f, width // f)
        counts = [r.num_images for r in requests]
        expand = lambda per_request: [v for v, n in zip(per_request, counts) for _ in range(n)]  # noqa: E731

        # Every request draws from its own generator: its initial noise, then any step noise (img2img and inpaint
        # draw posterior samples around the initial noise: see the input images below).
        generators = [torch.Generator("cpu").manual_seed(r.seed) for r in requests]

        def noise() -> torch.Tensor:
            draws = [torch.randn((n, *shape), generator=g) for g, n in zip(generators, counts)]
            return torch.cat(draws).to(self.device)

        # text: conditional contexts for all images, unconditional ones only where guidance needs them
        scales = torch.tensor(expand([float(r.guidance_scale) for r in requests]), device=self.device)
        guided = torch.nonzero(scales != 1.0).flatten()          # images that need the unconditional pass
        # A request's prompt and negative prompt get one number of 77-token chunks (model/prompts.py), the longer
        # one's, the shorter padded with empty chunks as the web UI's pad_cond_uncond option does, so that its two
        # rows have one context length; without guidance the negative prompt is not used, and does not pad.
        image_loras = expand([r.lora_set() for r in requests])                 # each image's LoRAs
        count = self.conditioner.count_chunks
        chunks = expand([max(count(r.prompt), count(r.negative_prompt) if r.guidance_scale != 1 else 1)
                         for r in requests])
        cond = self._encode(expand([r.prompt for r in requests]), False, image_loras, chunks)
        negatives = [expand([r.negative_prompt for r in requests])[i] for i in guided.tolist()]
        guided_loras = [image_loras[i] for i in guided.tolist()]
        uncond = self._encode(negatives, True, guided_loras, [chunks[i] for i in guided.tolist()])
        pooled = torch.stack([e.pooled for e in cond]) if cond[0].pooled is not None else None
        pooled_uncond = None if pooled is None else torch.stack([e.pooled for e in uncond]) if uncond else pooled[:0]
        g = scales[guided].view(-1, 1, 1, 1)
        added = self._added_conditioning(expand(requests), guided.tolist(), pooled_uncond, pooled, width, height)

        # The UNet's rows are [uncond (the guided images), cond (every image)], one context each. When they differ
        # in length (requests whose prompts need different numbers of chunks), the UNet still runs once for the whole
        # batch, with a RaggedContext (model/attention.py): every cross-attention projects the zero-padded contexts
        # at once, then attends each group of rows of one length to its own keys only. So a row attends to exactly
        # its own context, as alone, and nothing else of the UNet changes: a row differs from its run alone only as
        # batching already makes it differ (batch size). Against the two obvious ways (bench/mixed_lengths.py, an
        # SD 1.5 UNet, 1- and 3-chunk requests, CPU fp32): one UNet call per length (sub-batches) is exact but reads
        # the weights and launches every kernel once per length (1.36x one plain call at 32x32 latents, 0.95x at
        # 64x64; on a GPU, small calls are launch-bound); zero-padding plus a key mask costs the same as this
        # (1.07x, 1.01x) but needs the mask down every block of the UNet, a masked SDPA kernel and work on the
        # padded keys, and adds round-off where a row needs no padding. This: 1.03x and 1.01x.
        rows = [e.context for e in uncond + cond]
        context = torch.stack(rows) if len({c.shape for c in rows}) == 1 else RaggedContext.of(rows)

        # input images (img2img, inpaint), all at the batch's size: pixels [B, 3, H, W], pixel_masks [B, 1, H, W]
        # Each request's generator draws as diffusers' img2img and inpaint pipelines draw: first a sample of the
        # VAE posterior of its input (where the input's latents x0 are used), then its initial noise, then
        # (inpaint) a sample of the posterior of its masked image, then any step noise. One posterior sample a
        # request, shared by its images, as diffusers encodes one input image for num_images_per_prompt images.
        firsts = [sum(counts[:i]) for i in range(len(requests))]                               # request -> image
        rows = torch.repeat_interleave(torch.arange(len(requests)), torch.tensor(counts))      # image -> request

        def posterior_samples(images: torch.Tensor) -> torch.Tensor:  # [B, 3, H, W] -> [B, C, h, w]
            return self.encode_images(images[firsts], generators)[rows]

        x0 = masks = masked_latents = None
        if mode != "txt2img":
            pixels, pixel_masks = [], []
            for r in requests:
                image = r.image
                m = mask_of(image, r.mask) if mode == "inpaint" else None
                if image.size != (width, height):
                    image = image.convert("RGBA" if image.mode in ("RGBA", "LA", "PA") else "RGB")
                    image = image.resize((width, height), Image.LANCZOS)
                    if m is not None:
                        m = (F.interpolate(m[None], size=(height, width), mode="bilinear") > 0.5).float()[0]
                pixels += [to_tensor(image)] * r.num_images
                pixel_masks += [m] * r.num_images
            pixels = torch.stack(pixels)
            if strength == 0:  # nothing to denoise: the input's own latents, the posterior mean
                x0 = self.encode_images(pixels)
            elif mode == "img2img" or strength < 1 or not self.is_inpainting_model:
                # (a 9-channel UNet at strength 1 starts from noise alone and never reads x0: no draw, as diffusers)
                x0 = posterior_samples(pixels)

        n0 = noise()                                                                            # [B, C, h, w]

        if mode == "inpaint":
            pixel_masks = torch.stack(pixel_masks).to(self.device)                            # [B, 1, H, W]
            masks = F.adaptive_max_pool2d(pixel_masks, shape[1:])  # a latent cell is repainted if any pixel is
            if self.is_inpainting_model:
                masked_latents = posterior_samples(pixels.to(self.device) * (1 - pixel_masks))  # [B, C, h, w]
            else:
                # A 4-channel UNet never reads the masked image, but diffusers draws its posterior sample anyway:
                # draw (and drop) the same numbers, so that step noise (euler_a, ddpm) follows diffusers' stream.
                for generator in generators:
                    torch.randn((1, *shape), generator=generator, dtype=self.vae_dtype)

        plan = samplers.plan(sampler, steps, self.schedule, strength=strength)

        def denoise(x: torch.Tensor, i: int) -> torch.Tensor:
            sigma, t = plan.sigmas[i].item(), plan.timesteps[i]
            x_in = samplers.scale_model_input(x, sigma)
            if masked_latents is not None:  # 9-channel UNet: [latents, mask, masked-image latents]
                x_in = torch.cat([x_in, masks, masked_latents], dim=1)
            x_in = torch.cat([x_in[guided], x_in]).to(self.dtype)
            # (compiled packages: SD 1.x / 2.x shapes of 77 tokens without LoRAs, what they were built for; LoRAs add
            # their terms through eager hooks)
            plain = not added and not any(image_loras) and isinstance(context, torch.Tensor) and \
                context.shape[1] == CHUNK_LENGTH + 2
            unet = (self.compiled or self.unet) if plain else self.unet
            eps = unet(x_in, t.to(self.device), context, **added).float()
            eps_uncond, eps = eps[: len(guided)], eps[len(guided):].clone()
            eps[guided] = eps_uncond + g * (eps[guided] - eps_uncond)
            return samplers.to_x0(x, sigma, eps, self.schedule.prediction_type)

        if mode == "txt2img" or (mode == "inpaint" and strength == 1.0):
            x = samplers.start(plan, n0)
        else:
            x = samplers.add_noise(plan, x0, n0)

        between_steps = None
        if mode == "inpaint" and not self.is_inpainting_model:
            def between_steps(x, i):  # keep the known region on the original image, noised to step i
                return masks * x + (1 - masks) * samplers.add_noise(plan, x0, n0, step=i)

        if on_latents is not None:   # hand each step's x0_hat to on_latents, after callback
            known = None
            if mode == "inpaint" and not self.is_inpainting_model:
                def known(x0_hat):
                    return masks * x0_hat + (1 - masks) * x0
            denoise, callback = _watched(denoise, callback, on_latents, known)

        if plan.steps:
            # every UNet row (unconditional ones first, as denoise lays them out) with its image's LoRAs, for all steps
            with self.adapters.active("unet", guided_loras + image_loras):
                x = samplers.run(sampler, denoise, x, plan, noise=noise, eta=eta, between_steps=between_steps,
                                 callback=callback)
            latents = samplers.finish(plan, x)
        else:  # strength 0: nothing to denoise
            latents = x0
        if mode == "inpaint" and not self.is_inpainting_model:
            latents = masks * latents + (1 - masks) * x0
        images = self.decode_latents(latents)
        if mode == "inpaint":  # every pixel outside the mask is the input's own
            images = pixel_masks * images + (1 - pixel_masks) * pixels.to(self.device)
        return images


def _watched(denoise, callback, on_latents, known=None):
    """(denoise, callback) for samplers.run that also hand each step's x0_hat to on_latents(step, total, x0_hat):
    denoise keeps its last answer, and the step's callback passes it on (through known(x0_hat) where given)."""
    last = []

    def watched_denoise(x: torch.Tensor, i: int) -> torch.Tensor:
        x0_hat = denoise(x, i)
        last[:] = [x0_hat]
        return x0_hat

    def watched_callback(step: int, total: int) -> None:
        if callback is not None:
            callback(step, total)
        on_latents(step, total, last[0] if known is None else known(last[0]))

    return watched_denoise, watched_callback
