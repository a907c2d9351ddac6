"""
service/worker.py on the in-memory queue with the tiny model: compatible jobs are grouped and split by
image count; a job whose input is bad fails alone (its batch-mates still finish) and is not retried; a
job that raises anything else is retried and then succeeds, or fails after max_attempts; a stopping
worker finishes the running batch and gives the batches it has not started back to the queue.
"""

import asyncio
import io
import time

from PIL import Image

from service.queue import Job, MemoryQueue, new_job_id
from service.settings import Settings
from service.worker import Worker, plan_batches


def job(mode="txt2img", inputs=None, **params):
    p = dict(prompt="a red circle", negative_prompt="", seed=1, guidance_scale=7.5, num_images=1, steps=2,
             sampler="ddim", width=16, height=16, strength=None if mode == "txt2img" else 0.5)
    p.update(params)
    return Job(new_job_id(), mode, p, inputs or {}, created=time.time())


def submit(q, *jobs):
    for j in jobs:
        asyncio.run(q.submit(j, limit=100))


def state(q, j):
    return asyncio.run(q.state(j.id))


def png_bytes(color):
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), color).save(buf, format="PNG")
    return buf.getvalue()


class Flaky:
    """The pipeline, raising RuntimeError on its first `failures` calls."""

    def __init__(self, pipe, failures=1, on_call=None):
        self.pipe, self.failures, self.calls, self.on_call = pipe, failures, 0, on_call

    native_size = property(lambda self: self.pipe.native_size)

    def generate(self, requests, **kw):
        self.calls += 1
        if self.on_call:
            self.on_call()
        if self.calls <= self.failures:
            raise RuntimeError("CUDA error: out of memory (simulated)")
        return self.pipe.generate(requests, **kw)


def test_plan_batches_groups_compatible_jobs_and_caps_images():
    a, b, c = job(seed=1, num_images=3), job(seed=2, num_images=3), job(seed=3, steps=5)
    d, big = job(seed=4, num_images=2), job(seed=5, num_images=9)
    batches = plan_batches([a, b, c, d, big], max_images=8)
    assert [[j.params["seed"] for j in batch] for batch in batches] == [[1, 2, 4], [5], [3]]
    assert [[j.params["seed"] for j in batch] for batch in plan_batches([a, b, d], max_images=4)] == [[1], [2], [4]]


def test_bad_job_fails_alone_and_its_batch_mates_finish(tiny_pipe):
    q = MemoryQueue()
    good = job("img2img", {"image": png_bytes("red")}, seed=1)
    bad = job("img2img", {"image": b"not a png at all"}, seed=2)
    also_good = job("img2img", {"image": png_bytes("blue")}, seed=3)
    submit(q, good, bad, also_good)
    pipe = Flaky(tiny_pipe, failures=0)
    worker = Worker(pipe, q, Settings(max_batch=8, batch_window=0))
    assert worker.run_once() == 3
    assert pipe.calls == 2  # the batch of three failed on the bad input ... then each ran alone (bad one never ran)
    assert state(q, good).status == state(q, also_good).status == "done"
    s = state(q, bad)
    assert (s.status, s.error_kind, s.attempts) == ("failed", "invalid", 1) and "not a readable image" in s.error
    alone = tiny_pipe.img2img(Image.open(io.BytesIO(png_bytes("red"))), "a red circle", strength=0.5, steps=2, seed=1)[0]
    from model.pnginfo import png_bytes as encode
    assert asyncio.run(q.result(good.id, 0)) == encode(alone, alone.info["generation"])


def test_transient_error_is_retried_then_gives_up(tiny_pipe):
    q = MemoryQueue(max_attempts=2)
    j = job()
    submit(q, j)
    worker = Worker(Flaky(tiny_pipe, failures=1), q, Settings(batch_window=0))
    worker.run_once()
    s = state(q, j)
    assert (s.status, s.attempts) == ("queued", 1) and "out of memory" in s.error
    worker.run_once()
    s = state(q, j)
    assert (s.status, s.attempts, s.images) == ("done", 2, 1)

    k = job(seed=9)
    submit(q, k)
    worker = Worker(Flaky(tiny_pipe, failures=5), q, Settings(batch_window=0))
    worker.run_once(), worker.run_once()
    s = state(q, k)
    assert (s.status, s.error_kind, s.attempts) == ("failed", "error", 2)


def test_stop_finishes_the_running_batch_and_releases_the_rest(tiny_pipe):
    import threading

    q = MemoryQueue()
    first, second = job(steps=2), job(steps=3)  # incompatible: two batches
    submit(q, first, second)
    stop = threading.Event()
    worker = Worker(Flaky(tiny_pipe, failures=0, on_call=stop.set), q, Settings(batch_window=0))  # SIGTERM mid-batch
    worker.run_once(stop)
    assert state(q, first).status == "done"
    s = state(q, second)
    assert (s.status, s.attempts) == ("queued", 0)
    assert [j.id for j in q.take(8, block=0, gather=0)] == [second.id]
