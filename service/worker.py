"""The worker: holds the model, runs jobs off the queue in batches.

    sd worker --redis redis://localhost:6379/0

Each turn of the loop:
  1. take up to max_batch jobs (blocking for the first, then a short gather window for more),
  2. group those that can share a forward pass: same mode, width, height, steps, sampler, strength,
     and split groups to at most max_batch images,
  3. run each group as ONE pipeline.generate call, every job with its own prompt, seed and guidance
     (a job's images are the same as when it runs alone), reporting progress at every step,
  4. encode each image as a PNG with its parameters chunk, store, signal the waiter, acknowledge.

LoRAs (service/loras.py): before a group runs, the LoRAs each of its jobs names (prompt tags, the loras field)
are loaded if they are not (kept within SD_LORA_CACHE_MB, least recently used out); a job whose LoRA cannot
be loaded (unknown, unreadable, unsafe, not fitting the model) fails with that error as its own fault, and the
rest of the group runs without it. Jobs with different LoRAs share a batch (each Request carries its own).

A group that raises is rerun job by job, so one bad job does not fail the others. A job that raises
ValueError (its own bad input) fails at once; any other error is retried up to max_attempts runs.
A cancelled job is stopped between steps (model.Cancelled) when every job of its group is cancelled,
and otherwise left out of the results; so is a job another worker took over (this one was thought dead).
On stop (SIGTERM), the running group finishes and the jobs taken but not started go back to the queue.
When the queue itself cannot be reached (Redis down) the running group stops (its jobs are not failed:
they are abandoned, and claimed again by this worker's next take once Redis answers) and the worker
retries with a growing pause until the queue answers.

Liveness: a thread of its own (keep_alive) refreshes the worker's liveness key (liveness_ttl, 5 s) and
its claims on the jobs it runs every fifth of the TTL, however long a step takes; when the worker dies
the key expires and any other worker claims its jobs at its next take (service/queue.py). The key says
which models the worker serves and their native sizes: the API routes and sizes requests by it
(service/models.py).

Models (service/registry.py): a worker serves the models SD_WORKER_MODELS names ("*": any of the registry's,
the default), takes only their jobs (the queue's lanes are per model), and keeps at most SD_MAX_LOADED_MODELS
of them in memory, least recently used out; a turn's jobs run model by model, each model's in batches.
"""

from __future__ import annotations

import collections
import io
import itertools
import logging
import os
import secrets
import signal
import socket
import threading
import time

from . import loras
from .metrics import observe
from .models import announcement
from .queue import NO_LANE
from .registry import Registry, UnknownModel

log = logging.getLogger("sd.worker")

PREVIEW_EVERY = 4      # steps between live previews of a watched job (and its first step)
PREVIEW_SIDE = 256     # the longer side of a preview PNG, at most (the job's aspect ratio)
TAKE_BLOCK = 1.0       # seconds a take blocks when the queue is empty (how soon a stop is noticed)
BACKOFF_MIN, BACKOFF_MAX = 0.5, 8.0  # seconds between tries while the queue is unreachable
MICRO_CONDITIONING = ("original_size", "crops_coords_top_left", "target_size", "negative_original_size",
                      "negative_crops_coords_top_left", "negative_target_size")  # job params passed to Request


class QueueLost(Exception):
    """The queue could not be reached in the middle of a batch. The batch's jobs are not at fault: they are
    not failed or retried here but abandoned; if the queue kept them, the next take claims them again."""


def load_pipeline(settings, path=None):
    """The pipeline of `path` (default: settings.weights), on the settings' device and dtype, levers applied."""
    from model import StableDiffusion

    device, path = settings.torch_device(), path or settings.weights
    log.info("loading %s on %s", path, device)
    pipe = StableDiffusion.from_pretrained(path, device=device, dtype=settings.torch_dtype(device))
    pipe.optimize(**settings.levers())
    if pipe.tuner is not None:      # levers chosen by measurement: measure the native size before the first job
        start = time.perf_counter()
        pipe.warm_up()
        log.info("warmed up in %.1f s: %d shapes measured in %.1f s, %d of them prepacked", time.perf_counter() - start,
                 len(pipe.tuner.timings), pipe.tuner.spent_s, list(pipe.tuner.choices.values()).count("prepacked"))
    return pipe


def group_key(job) -> tuple:
    """Jobs with equal keys can run as one batch (their LoRAs may differ: not part of the key). (The model is not
    either: a turn's jobs are split by model first, Worker.run_once.)"""
    p = job.params
    return (job.mode, p["width"], p["height"], p["steps"], p["sampler"], p.get("strength"))


def served_models(settings, registry: Registry) -> list[str] | None:
    """The names SD_WORKER_MODELS gives ("*": None, any model), each checked against the registry."""
    wanted = [m.strip() for m in settings.worker_models.split(",") if m.strip()]
    if not wanted or "*" in wanted:
        return None
    return [registry.find(m).name for m in wanted]   # (UnknownModel: a worker started with a typo says so)


class Slot:
    """One loaded model of a worker: its pipeline, its LoRA cache, the embeddings it has loaded."""

    def __init__(self, pipe, settings):
        self.pipe = pipe
        self.lora_cache = loras.Cache(pipe, loras.lora_folder(settings), settings.lora_cache_mb * 2**20)
        self.embeddings: dict[str, tuple] = {}  # name -> (the file's (mtime_ns, size), loaded or not)


def plan_batches(jobs: list, max_images: int) -> list[list]:
    """Compatible jobs together, in order of arrival, at most max_images images per batch
    (a job with more images than that runs alone)."""
    groups: dict[tuple, list] = {}
    for job in jobs:
        groups.setdefault(group_key(job), []).append(job)
    batches = []
    for group in groups.values():
        batch, images = [], 0
        for job in group:
            n = job.params["num_images"]
            if batch and images + n > max_images:
                batches.append(batch)
                batch, images = [], 0
            batch.append(job)
            images += n
        batches.append(batch)
    return batches


def _open_image(data: bytes, what: str):
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as e:  # noqa: BLE001  (the API checked it already; this is a second line)
        raise ValueError(f"{what} is not a readable image: {e}") from e
    return image


class Worker:
    """`pipe`: the first model it serves, loaded (the first of SD_WORKER_MODELS, or the default model)."""

    def __init__(self, pipe, queue, settings, name: str | None = None, registry: Registry | None = None):
        self.queue, self.settings = queue, settings
        self.registry = registry or Registry.from_settings(settings)
        self.name = name or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.calls = 0  # pipeline calls made: one per batch
        self.serves = served_models(settings, self.registry)   # None: any model
        first = self.serves[0] if self.serves else self.registry.default.name
        self.loaded: collections.OrderedDict[str, Slot] = collections.OrderedDict({first: Slot(pipe, settings)})
        self.current = first
        self._announce()

    # the loaded model the running batch uses
    @property
    def pipe(self):
        return self.loaded[self.current].pipe

    @property
    def lora_cache(self):
        return self.loaded[self.current].lora_cache

    @property
    def embeddings(self) -> dict:
        return self.loaded[self.current].embeddings

    def _announce(self) -> None:
        """What the liveness key says (service/models.py): the models served and the native sizes of those loaded."""
        self.model = {**announcement(self.loaded[next(reversed(self.loaded))].pipe),
                      "serves": ["*"] if self.serves is None else list(self.serves),
                      "loaded": {n: int(s.pipe.native_size) for n, s in self.loaded.items()}}

    def use(self, model: str) -> None:
        """Make `model` the current one, loading it (and unloading the least recently used beyond
        max_loaded_models) if it is not in memory. UnknownModel if the registry has no such model."""
        if model not in self.loaded:
            checkpoint = self.registry.find(model)
            if self.settings.max_loaded_models == 1:   # (memory for one model only: the old one goes first)
                self.loaded.clear()
            try:
                slot = Slot(load_pipeline(self.settings, checkpoint.path), self.settings)
            except Exception:
                if self.loaded:   # (what it still holds; the new model's slot is announced below)
                    self._announce()
                raise
            while len(self.loaded) >= self.settings.max_loaded_models:
                gone, _ = self.loaded.popitem(last=False)
                log.info("unloading %s (max_loaded_models=%d)", gone, self.settings.max_loaded_models)
            self.loaded[checkpoint.name] = slot
            model = checkpoint.name
        self.loaded.move_to_end(model)
        self.current = model
        self._announce()

    def model_of(self, job) -> str:
        return job.params.get("model") or self.registry.default.name

    def sync_embeddings(self) -> None:
        """Load the embeddings folder's files that are new or changed since last time (a name then stands for its
        vectors in every prompt, as in the web UI); one that does not load is logged and skipped until its file
        changes. A folder listing (cached on its mtime) a batch when nothing changed."""
        folder = loras.embeddings_folder(self.settings)
        if folder is None or not hasattr(self.pipe, "load_embedding"):
            return
        for name, file in folder.files().items():
            try:
                stat = file.stat()
            except OSError:
                continue
            version = (stat.st_mtime_ns, stat.st_size)
            if self.embeddings.get(name, (None,))[0] == version:
                continue
            try:
                self.pipe.load_embedding(file, name)
                self.embeddings[name] = (version, True)
            except ValueError as e:   # not an embedding, the wrong width, a pickle that would run code
                log.warning("embedding %s skipped: %s", file, e)
                self.embeddings[name] = (version, False)

    def run(self, stop: threading.Event) -> None:
        """Work until `stop` is set; then finish the running batch and release the rest. While the queue
        cannot be reached (Redis down) the worker stays up and tries again after a pause that doubles each
        time, from BACKOFF_MIN to BACKOFF_MAX s: no tight loop, and back to work soon after Redis is."""
        log.info("worker %s ready (max_batch=%d)", self.name, self.settings.max_batch)
        alive = threading.Event()  # set when run() ends: the keep-alive thread stops with it
        keeper = threading.Thread(target=self.keep_alive, args=(alive,), name="sd-keep-alive", daemon=True)
        keeper.start()
        try:
            self._work(stop)
        finally:
            alive.set()
            keeper.join(10)
        log.info("worker %s stopped", self.name)

    def keep_alive(self, stop: threading.Event) -> None:
        """Until `stop`: refresh this worker's liveness key and its claims on the jobs it runs, at once and then
        every fifth of the liveness TTL. A thread of its own, so a step of any length never lets the key expire;
        while the queue is unreachable it keeps trying (one warning an outage)."""
        ttl = self.settings.liveness_ttl
        failing = False
        while True:
            try:
                self.queue.keep_alive(self.name, ttl, self.model)
                failing = False
            except Exception as e:  # noqa: BLE001
                if not failing:
                    log.warning("keep-alive failed (%s: %s); retrying", type(e).__name__, e)
                failing = True
            if stop.wait(ttl / 5):
                return

    def _work(self, stop: threading.Event) -> None:
        pause = BACKOFF_MIN
        while not stop.is_set():
            try:
                self.run_once(stop)
                pause = BACKOFF_MIN
            except Exception as e:  # noqa: BLE001  (Redis down, ...: keep the worker alive and try again)
                if pause == BACKOFF_MIN:  # the first failure in a row: the whole story, once
                    log.exception("worker loop error")
                log.warning("queue error (%s: %s); retrying in %.1f s", type(e).__name__, e, pause)
                stop.wait(pause)
                pause = min(2 * pause, BACKOFF_MAX)

    def run_once(self, stop: threading.Event | None = None) -> int:
        """One turn: take, group, run. Returns how many jobs were taken. (Liveness is run()'s keep-alive thread's.)"""
        lanes = None
        if self.serves is not None:   # (jobs that name no model are the default model's)
            lanes = self.serves + ([NO_LANE] if self.registry.default.name in self.serves else [])
        jobs = self.queue.take(self.settings.max_batch, block=TAKE_BLOCK, gather=self.settings.batch_window,
                               consumer=self.name, models=lanes)
        by_model: dict[str, list] = {}
        for job in jobs:
            by_model.setdefault(self.model_of(job), []).append(job)
        # the loaded model first: a model switch costs a load
        order = sorted(by_model, key=lambda m: (m not in self.loaded, m != self.current))
        try:
            for k, model in enumerate(order):
                if stop is not None and stop.is_set():
                    self.queue.release([job for m in order[k:] for job in by_model[m]])
                    break
                self.run_model(model, by_model[model], stop)
        except BaseException:  # the queue failed under us (or we are killed): what did not end runs again
            self.queue.abandon(jobs)
            raise
        return len(jobs)

    def run_model(self, model: str, jobs: list, stop: threading.Event | None) -> None:
        """A turn's jobs of one model, in batches."""
        try:
            self.use(model)
        except UnknownModel as e:   # (the API checks names: a model removed from the folder since)
            for job in jobs:
                self.queue.fail(job, str(e), retry=False, kind="invalid")
            return
        except Exception as e:  # noqa: BLE001  (out of memory, a broken file: another worker may do better)
            log.exception("model %s failed to load", model)
            for job in jobs:
                self.queue.fail(job, f"model {model} failed to load: {type(e).__name__}: {e}", retry=True)
            return
        for job in jobs:  # txt2img jobs may leave the size to the model
            job.params = {**job.params, "width": job.params.get("width") or self.pipe.native_size,
                          "height": job.params.get("height") or self.pipe.native_size}
        batches = plan_batches(jobs, self.settings.max_batch)
        for i, batch in enumerate(batches):
            if stop is not None and stop.is_set():
                self.queue.release([job for b in batches[i:] for job in b])
                break
            self.run_batch(batch)

    def with_loras(self, jobs: list) -> list:
        """The jobs whose LoRAs are loaded, loading them first; each other job fails with its LoRA's error
        (a LoraError: the request's own, not retried), so it never fails its batch-mates."""
        ready, in_use = [], set()
        for job in jobs:
            try:
                names = loras.wanted(job.params)
                self.lora_cache.ensure(names, keep=in_use)
            except loras.LoraError as e:
                self.queue.fail(job, str(e), retry=False, kind="invalid")
                continue
            except Exception as e:  # noqa: BLE001  (out of memory moving it to the GPU, ...: may pass)
                log.exception("job %s: its LoRAs failed to load (attempt %d)", job.id, job.attempts)
                self.queue.fail(job, f"{type(e).__name__}: {e}", retry=True)
                continue
            in_use |= names
            ready.append(job)
        return ready

    def run_batch(self, jobs: list) -> None:
        from model import Cancelled

        self.sync_embeddings()
        jobs = self.with_loras(jobs)
        if not jobs:
            return
        cancelled: set[str] = set()
        try:
            images = self._generate(jobs, cancelled)
        except Cancelled:
            for job in jobs:
                self.queue.cancelled(job)
            return
        except QueueLost:  # not the jobs' fault: stop the batch, let run() back off
            raise
        except Exception as e:  # noqa: BLE001
            if len(jobs) > 1:
                log.warning("batch of %d failed (%s); running its jobs one by one", len(jobs), e)
                for job in jobs:
                    self.run_batch([job])
                return
            job = jobs[0]
            if isinstance(e, ValueError):  # the request's own fault: retrying cannot help
                self.queue.fail(job, str(e), retry=False, kind="invalid")
            else:
                log.exception("job %s failed (attempt %d)", job.id, job.attempts)
                self.queue.fail(job, f"{type(e).__name__}: {e}", retry=True)
            return
        from model.pnginfo import png_bytes

        for job, job_images in zip(jobs, images):
            if job.id in cancelled:
                self.queue.cancelled(job)
            else:
                self.queue.finish(job, [png_bytes(img, img.info["generation"]) for img in job_images])

    def _generate(self, jobs: list, cancelled: set[str]) -> list[list]:
        from model import Cancelled, Request

        requests = []
        for job in jobs:
            p = job.params
            image = _open_image(job.inputs["image"], "image") if "image" in job.inputs else None
            mask = _open_image(job.inputs["mask"], "mask") if "mask" in job.inputs else None
            micro = {k: tuple(p[k]) for k in MICRO_CONDITIONING if p.get(k) is not None}  # (SDXL's; JSON lists)
            job_loras = loras.field_loras(p.get("loras")) or None   # (the prompt's tags: the pipeline's)
            requests.append(Request(p["prompt"], p["negative_prompt"], p["seed"], p["guidance_scale"],
                                    p["num_images"], image=image, mask=mask, loras=job_loras, **micro))
        step_times: list[float] = []
        last = [time.monotonic()]  # the previous step's end

        def callback(step: int, total: int) -> None:
            now = time.monotonic()
            step_times.append(now - last[0])
            last[0] = now
            try:  # the jobs to stop: cancelled, expired, or taken over by another worker
                cancelled.update(self.queue.progress(jobs, step, total, consumer=self.name))
            except Exception as e:  # noqa: BLE001
                raise QueueLost(f"{type(e).__name__}: {e}") from e
            if len(cancelled) == len(jobs):
                raise Cancelled()

        from model.pnginfo import png_bytes

        mode, width, height, steps, sampler, strength = group_key(jobs[0])
        scale = min(1.0, PREVIEW_SIDE / max(width, height))
        preview_size = (max(1, round(width * scale)), max(1, round(height * scale)))

        def on_latents(step: int, total: int, x0) -> None:
            """Every PREVIEW_EVERY steps, a preview of each watched job's first image (none watched: one Redis
            read, nothing else). Best effort: a failure here never fails the batch."""
            if step % PREVIEW_EVERY != 1 % PREVIEW_EVERY or step == total:
                return
            try:
                watched = self.queue.watched(jobs) - cancelled
                row = 0
                for job, request in zip(jobs, requests):
                    if job.id in watched:
                        image = self.pipe.preview_images(x0[row:row + 1], size=preview_size)[0]
                        self.queue.store_preview(job, png_bytes(image))
                    row += request.num_images
            except Exception as e:  # noqa: BLE001
                log.warning("preview failed: %s: %s", type(e).__name__, e)

        previews = {"on_latents": on_latents} if hasattr(self.pipe, "preview_images") else {}
        self.calls += 1
        try:
            return self.pipe.generate(requests, mode=mode, steps=steps, sampler=sampler, width=width,
                                      height=height, strength=strength, callback=callback, **previews)
        finally:
            stats = observe("sd_batch_size", sum(r.num_images for r in requests))
            for t in step_times:
                for k, v in observe("sd_step_seconds", t).items():
                    stats[k] = stats.get(k, 0.0) + v
            try:
                self.queue.record(stats)
            except Exception as e:  # noqa: BLE001  (metrics are best effort; never mask the batch's own error)
                log.warning("could not record batch metrics: %s", e)


def start_in_thread(pipe, queue, settings) -> tuple[Worker, threading.Thread, threading.Event]:
    """A worker in a daemon thread of this process (`sd serve` without Redis)."""
    worker, stop = Worker(pipe, queue, settings, name=f"inprocess-{os.getpid()}"), threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), name="sd-worker", daemon=True)
    thread.start()
    return worker, thread, stop


def main(settings) -> int:
    """`sd worker`: load the model once, then work until SIGTERM/SIGINT."""
    from .queue import make_queue

    if not settings.redis_url:
        print("sd worker: --redis URL (or SD_REDIS_URL) is required", flush=True)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    queue = make_queue(settings)  # a RedisQueue: there is a Redis URL
    registry = Registry.from_settings(settings)
    try:
        serves = served_models(settings, registry)
    except UnknownModel as e:
        print(f"sd worker: SD_WORKER_MODELS: {e}", flush=True)
        return 2
    first = registry.find(serves[0]) if serves else registry.default
    worker = Worker(load_pipeline(settings, first.path), queue, settings, registry=registry)
    stop = threading.Event()
    signals = itertools.count()

    def on_signal(signum, frame):
        if next(signals) == 0:
            log.info("signal %d: finishing the running batch, then stopping", signum)
            stop.set()
        else:  # a second signal: stop now (taken jobs run elsewhere once the liveness key expires)
            raise SystemExit(1)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    worker.run(stop)
    queue.close()
    return 0
