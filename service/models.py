"""The models this service serves, as its workers announce them, and what the API takes from that.

A worker says which model it serves in its liveness key (queue.keep_alive's `model`, `announcement(pipe)`),
so what the API knows comes and goes with the workers: in `sd serve` without Redis the in-process worker
says it once its model is loaded; with Redis, workers started before or after the API say it in the key
the API already reads to count them. The API process never loads a model, yet a request is checked
against the limits of the model that will run it: Settings.max_pixels_for(model.native_size). Until a
worker has said anything, the model is None and the limits are SD 1.x's (the service's defaults).
Each announcement also says which models the worker takes jobs of (`serves`, "*": any) and which it has
loaded: `workers_for(name)` is how many live workers would run a job of that model (the API's 503 when none).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Optional

from .queue import QueueUnavailable

CACHE_S = 1.0  # seconds the API keeps what the workers announced: one Redis read a second, not one a request


@dataclass(frozen=True)
class Model:
    """What one live worker announced."""
    name: Optional[str]   # the pipeline's name (its weights' file or folder name) it ran last
    native_size: int      # the image side it was trained at: 512 SD 1.x, 768 SD 2.x, 1024 SDXL
    serves: tuple = ("*",)   # the registry names it takes jobs of ("*": any)
    loaded: tuple = ()       # ((name, native size), ...) of the models in its memory

    def takes(self, model: str) -> bool:
        return "*" in self.serves or model in self.serves


def announcement(pipe) -> dict:
    """What a worker serving `pipe` publishes with its liveness key."""
    return {"model": getattr(pipe, "name", None), "native_size": int(pipe.native_size)}


class Served:
    """The models the live workers announced, read from the queue at most every CACHE_S seconds."""

    def __init__(self, queue, cache_s: float = CACHE_S):
        self.queue, self.cache_s = queue, cache_s
        self._known: list[Model] = []
        self._read_at = -math.inf

    async def models(self) -> list[Model]:
        # nothing known is not kept: the first worker is seen by the first request after it says so
        if self._known and time.monotonic() - self._read_at < self.cache_s:
            return self._known
        try:
            announced = await self.queue.models()
        except QueueUnavailable:  # the last known ones; the request's submit answers the 503
            return self._known
        self._known = [Model(m.get("model"), m["native_size"], tuple(m.get("serves") or ("*",)),
                             tuple(sorted((m.get("loaded") or {}).items())))
                       for m in announced if isinstance(m.get("native_size"), int) and m["native_size"] > 0]
        self._read_at = time.monotonic()
        return self._known

    async def default(self) -> Optional[Model]:
        """The model a request that names none runs on; None until a worker has announced one. Were workers
        of different models on one queue (any of them may take a job), the one of the smallest native size:
        its limits are the ones every worker can be held to."""
        models = await self.models()
        return min(models, key=lambda m: m.native_size) if models else None

    async def workers_for(self, model: str) -> int:
        """How many live workers take jobs of `model`."""
        return sum(1 for m in await self.models() if m.takes(model))

    async def per_model(self, names: list[str]) -> dict[str, dict]:
        """name -> {"workers": live workers that take its jobs, "loaded": workers that hold it in memory}."""
        models = await self.models()
        return {n: {"workers": sum(1 for m in models if m.takes(n)),
                    "loaded": sum(1 for m in models if n in dict(m.loaded))} for n in names}
