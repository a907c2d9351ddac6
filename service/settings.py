"""Service settings: environment variables first, then command-line flags on top.

    SD_WEIGHTS=weights/ SD_REDIS_URL=redis://localhost:6379/0 sd serve --port 8000
    sd worker --redis redis://localhost:6379/0 --max-batch 8

Every setting has an environment variable (SD_ + its name in capitals) and a flag
(--name-with-dashes); a flag given on the command line wins. Lists (API keys) are
comma-separated. Importing this module is cheap: it loads neither torch nor FastAPI.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional

LEVERS = ("prepack", "compile", "channels_last", "aot")   # StableDiffusion.optimize's keyword arguments
DEFAULT_WEIGHTS = Path(__file__).resolve().parent.parent / "weights"
LEAST_MAX_PIXELS = 4 * 512 * 512      # SD 1.x's pixel limit: the default one of any model with a smaller native size


@dataclass(frozen=True)
class Settings:
    weights: str = str(DEFAULT_WEIGHTS)   # native dir, diffusers dir or one .safetensors/.ckpt file
    redis_url: Optional[str] = None       # None: in-memory queue and an in-process worker
    key_prefix: str = "sd"                # Redis keys are "{key_prefix}:..." (several services can share a Redis)
    device: str = "auto"                  # "auto" (cuda when available), "cpu", "cuda", "cuda:1", ...
    dtype: str = "auto"                   # "auto" (fp16 on cuda, fp32 on cpu), "fp32", "fp16", "bf16"
    optimize: str = "auto"                # speed levers (model/speed.py): "auto" (chosen by measurement on this
                                          # machine: pipe.optimize()'s default), "none", or a comma list of
                                          # prepack, compile, channels_last, aot (those levers on, unmeasured)
    max_batch: int = 8                    # images per pipeline call (a bigger single job still runs, alone)
    batch_window: float = 0.01            # seconds a worker waits for more jobs once it has one
    queue_limit: int = 64                 # queued + running jobs; beyond it new jobs get 429
    queue_limit_per_key: int = 32         # queued + running jobs of one API key (with keys set); beyond it that
                                          # key alone gets 429; 0: no limit but queue_limit
    job_timeout: float = 300.0            # seconds a synchronous request waits before answering 504
    result_ttl: int = 3600                # seconds jobs, inputs and result PNGs are kept
    liveness_ttl: float = 5.0             # seconds a worker's liveness key lives; a thread refreshes it every fifth
                                          # of that. When it expires (the worker died) its jobs run elsewhere at once
    visibility_timeout: float = 300.0     # a safety net: seconds after which any job whose claim was not refreshed
                                          # is claimed by another worker, whatever its worker's liveness key says
    max_attempts: int = 3                 # a job that raises is retried until it has run this many times
    max_pixels: Optional[int] = None      # width * height of a request, and of an uploaded image; None: it scales
                                          # with the served model (max_pixels_for its native size)
    max_steps: int = 150
    max_images: int = 4                   # num_images of one request
    max_upload_bytes: int = 10 * 1024 * 1024  # a whole request body
    api_keys: tuple[str, ...] = field(default=(), repr=False)  # empty: no authentication
    lora_dir: Optional[str] = None        # LoRA files (*.safetensors, *.pt, *.ckpt), each named by its stem; None:
                                          # no LoRAs (a request naming one gets 422). API and workers see one folder
    lora_cache_mb: int = 1024             # MiB of LoRA tensors a worker keeps loaded (least recently used out)
    embeddings_dir: Optional[str] = None  # textual-inversion files (name = stem): workers load them all
    models_dir: Optional[str] = None      # more checkpoints, each served by name (folder name or file stem) beside
                                          # `weights`, the default model (service/registry.py)
    worker_models: str = "*"              # the models a worker serves: "*" any of the registry's, or a comma list
    max_loaded_models: int = 1            # models a worker keeps in memory (least recently used out)
    host: str = "127.0.0.1"
    port: int = 8000

    def __post_init__(self):
        positive = ("max_batch", "queue_limit", "job_timeout", "result_ttl", "liveness_ttl", "visibility_timeout",
                    "max_attempts", "max_pixels", "max_steps", "max_images", "max_upload_bytes", "max_loaded_models")
        for name in positive:
            if getattr(self, name) is not None and not getattr(self, name) > 0:  # (None: max_pixels's default)
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.lora_cache_mb < 0:
            raise ValueError(f"lora_cache_mb must be >= 0, got {self.lora_cache_mb!r}")
        if self.queue_limit_per_key < 0:
            raise ValueError(f"queue_limit_per_key must be >= 0 (0: no per-key limit), "
                             f"got {self.queue_limit_per_key!r}")
        if self.batch_window < 0:
            raise ValueError(f"batch_window must be >= 0, got {self.batch_window!r}")
        if self.dtype not in ("auto", "fp32", "fp16", "bf16"):
            raise ValueError(f"dtype must be one of auto, fp32, fp16, bf16, got {self.dtype!r}")
        if self.levers() is None:
            raise ValueError(f"optimize must be auto, none, or a comma list of {', '.join(LEVERS)}, "
                             f"got {self.optimize!r}")

    def max_pixels_for(self, native_size: Optional[int]) -> int:
        """The largest width * height, asked for or uploaded, for a model of this native size (None: not known
        yet): max_pixels when it is set, else 4 x native_size^2, twice the native side each way as SD 1.x's
        1048576 is for 512 (SD 2.x: 2359296, SDXL: 4194304), and never below 1048576, so a smaller model (this
        project's own, 64) keeps the limit the service always had. The one place the limit is computed: the
        API asks it per request (jobs.get_max_pixels), with the native size its workers announced."""
        if self.max_pixels is not None:
            return self.max_pixels
        return max(LEAST_MAX_PIXELS, 4 * (native_size or 0) ** 2)

    def levers(self) -> dict[str, bool] | None:
        """The optimize setting as pipe.optimize's keyword arguments ({} for auto: its defaults); None if invalid."""
        value = self.optimize.strip()
        if value == "auto":
            return {}
        names = [v.strip() for v in value.split(",")]
        if value == "none":
            names = []
        elif not set(names) <= set(LEVERS) or len(set(names)) != len(names):
            return None
        return {lever: lever in names for lever in LEVERS}

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides) -> "Settings":
        """Settings from SD_* variables (unset ones keep their defaults), then `overrides` (None = not given)."""
        environ = os.environ if environ is None else environ
        values = {}
        for f in dataclasses.fields(cls):
            raw = environ.get("SD_" + f.name.upper())
            if raw is not None and raw != "":
                values[f.name] = _parse(f.name, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @classmethod
    def from_args(cls, args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> "Settings":
        """Settings from the environment, then the flags add_arguments() defined."""
        names = {f.name for f in dataclasses.fields(cls)}
        given = {k: v for k, v in vars(args).items() if k in names}
        if isinstance(given.get("api_keys"), str):
            given["api_keys"] = _parse("api_keys", given["api_keys"])
        return cls.from_env(environ, **given)

    def torch_device(self) -> str:
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    def torch_dtype(self, device: str):
        import torch

        name = self.dtype if self.dtype != "auto" else ("fp16" if device.startswith("cuda") else "fp32")
        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def _parse(name: str, raw: str):
    f = {f.name: f for f in dataclasses.fields(Settings)}[name]
    kind = f.type if isinstance(f.type, str) else f.type.__name__
    kind = kind.removeprefix("Optional[").removesuffix("]")  # (max_pixels: None is its default, not a value)
    try:
        if name == "api_keys":
            return tuple(k.strip() for k in raw.split(",") if k.strip())
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        return raw
    except ValueError:
        raise ValueError(f"SD_{name.upper()} must be a{'n integer' if kind == 'int' else ' number'}, got {raw!r}")


def add_arguments(parser: argparse.ArgumentParser, *, http: bool) -> None:
    """The flags of `sd serve` (http=True) and `sd worker`. Defaults are None: unset flags leave the
    environment's value (or the built-in default) in place."""
    p = parser.add_argument
    p("--weights",
      help=f"native dir, diffusers dir or one .safetensors/.ckpt (env SD_WEIGHTS; default {DEFAULT_WEIGHTS})")
    p("--redis", dest="redis_url", metavar="URL",
      help="Redis URL, e.g. redis://localhost:6379/0 (env SD_REDIS_URL)" +
           ("; without it the API runs its own worker on an in-memory queue" if http else ""))
    p("--key-prefix", help="prefix of every Redis key (env SD_KEY_PREFIX; default sd)")
    if http:
        p("--host", help="address to listen on (env SD_HOST; default 127.0.0.1)")
        p("--port", type=int, help="port (env SD_PORT; default 8000)")
        p("--api-keys", metavar="K1,K2", help="accepted API keys; none: no authentication (env SD_API_KEYS)")
        p("--queue-limit", type=int, help="queued + running jobs before 429 (default 64)")
        p("--queue-limit-per-key", type=int, help="queued + running jobs of one API key before that key gets 429 "
          "(default 32; 0: none; only with API keys)")
        p("--job-timeout", type=float, help="seconds a synchronous request waits before 504 (default 300)")
        p("--max-pixels", type=int, help="largest width*height, asked for or uploaded (default: 4 x the served "
          "model's native size squared, at least 1048576: SD 1.x 1048576, SD 2.x 2359296, SDXL 4194304)")
        p("--max-steps", type=int, help="largest steps (default 150)")
        p("--max-images", type=int, help="largest num_images (default 4)")
        p("--max-upload-bytes", type=int, help="largest request body (default 10 MiB)")
    p("--lora-dir", metavar="DIR", help="folder of LoRA files (.safetensors, .pt, .ckpt), each named by its file's "
      "stem in <lora:NAME:W> tags and the native loras field; the API and the workers must see the same folder "
      "(env SD_LORA_DIR; default: none, no LoRAs)")
    p("--lora-cache-mb", type=int, help="MiB of LoRA tensors a worker keeps loaded, least recently used out (env "
      "SD_LORA_CACHE_MB; default 1024)")
    p("--embeddings-dir", metavar="DIR", help="folder of textual-inversion embeddings, each used by its file's stem "
      "in prompts; workers load them, the API lists them at /sdapi/v1/embeddings (env SD_EMBEDDINGS_DIR)")
    p("--models-dir", metavar="DIR", help="folder of more checkpoints (native or diffusers folders, .safetensors / "
      ".ckpt files), each served by its name (folder name or file stem) beside --weights, the default model; the "
      "API and the workers must see the same folder (env SD_MODELS_DIR)")
    if not http:
        p("--worker-models", metavar="M1,M2", help="the models this worker serves: * (any of the registry's, the "
          "default) or a comma list of names (env SD_WORKER_MODELS)")
    p("--max-loaded-models", type=int, help="models a worker keeps in memory, least recently used out (env "
      "SD_MAX_LOADED_MODELS; default 1)")
    p("--device", help="auto, cpu, cuda, cuda:N (env SD_DEVICE; default auto)")
    p("--dtype", choices=["auto", "fp32", "fp16", "bf16"], help="(env SD_DTYPE; default auto: fp16 on cuda)")
    p("--optimize", metavar="LEVERS", help="speed levers: auto, none, or a comma list of prepack, compile, "
      "channels_last, aot (the packages of `sd compile`), turned on without measuring (env SD_OPTIMIZE; "
      "default auto: the packages sd compile built here where they measured faster, and each convolution plain or "
      "prepacked, per layer shape, as measured on this machine; SD_TUNE_CACHE names the file that keeps the "
      "choices). compile: each new batch/image size compiles on first use (minutes on a CPU)")
    p("--max-batch", type=int, help="images per pipeline call (default 8)")
    p("--batch-window", type=float, help="seconds to wait for more jobs once one arrived (default 0.01)")
    p("--result-ttl", type=int, help="seconds jobs and results are kept (default 3600)")
    p("--liveness-ttl", type=float, help="seconds a worker's liveness key lives: a dead worker's jobs run elsewhere "
      "that soon (default 5)")
    p("--visibility-timeout", type=float, help="seconds before a job whose claim stopped being refreshed is claimed "
      "by another worker, whatever its worker's liveness (a safety net; default 300)")
    p("--max-attempts", type=int, help="runs of a failing job before it is marked failed (default 3)")
