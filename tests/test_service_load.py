"""
The service with the DEFAULT model (weights/, 64x64 images) as it is deployed: real uvicorn on a loopback
port, the real local Redis (db 15, a random key prefix, deleted afterwards) and `sd worker` as separate
processes. Shown here: every endpoint end to end (a 64x64 PNG with its parameters chunk, the same bytes
for the same seed and the same pixels as a direct pipeline call, JSON with several images, img2img,
inpaint keeping the unmasked pixels, the job API: 202, running progress, image, cancel of a queued job);
sixteen concurrent clients against one worker with max batch 8 each get the image their request makes
when run alone, and /metrics counts batches of more than one image; two workers on one Redis both run
jobs of one burst, again with the right images.
"""

import base64
import io
import os
import secrets
import signal
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
import redis
import uvicorn
from PIL import Image

from model import StableDiffusion
from model.pnginfo import read_parameters
from service.api import create_app
from service.settings import DEFAULT_WEIGHTS, Settings
from test_service_http import free_port, png
from test_service_http import wait_until as _wait_until

REDIS = "redis://127.0.0.1:6379/15"
STEPS = 10        # enough to exercise the sampler; few, to keep the file cheap on CPU
MAX_BATCH = 8

# sixteen requests that can share a batch (same mode, size, steps, sampler) but differ in everything else
PROMPTS = ["a large red circle in the center on a blue background",
           "a small green square in the top left on a white background",
           "a medium yellow triangle in the bottom right on a black background",
           "a large blue square in the top right on a yellow background"]
BURST = [{"prompt": PROMPTS[i % 4], "seed": 100 + i, "guidance_scale": (7.5, 1.0, 3.0, 5.0)[i // 4],
          "negative_prompt": "blurry" if i % 5 == 0 else "", "steps": STEPS, "sampler": "ddim"} for i in range(16)]


# -----------------------------------------------------------------------------
# helpers


def wait_until(predicate, timeout=120, what="condition"):
    """test_service_http's, with longer patience: the default model loads and runs slower than the tiny one."""
    return _wait_until(predicate, timeout, what)


def pixels(data: bytes | Image.Image) -> np.ndarray:
    image = Image.open(io.BytesIO(data)) if isinstance(data, bytes) else data
    return np.asarray(image.convert("RGB"))


def same_image(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to float round-off. A batch's size and the CPU thread count change the order of float sums,
    which moves a few pixels by one level (measured with the default model: at most 1 level, in under 0.1%
    of the values); images of another seed or prompt differ in most of them."""
    d = np.abs(a.astype(int) - b.astype(int))
    return d.max() <= 1 and (d > 0).mean() < 0.01


def encode(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def metric_values(client) -> dict[str, float]:
    text = client.get("/metrics").text
    return {k: float(v) for k, v in (line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))}


def start_worker(weights, prefix, *extra):
    """`sd worker` in its own process, on one CPU thread."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SD_DEVICE": "cpu", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "service.cli", "worker", "--weights", str(weights), "--redis",
                             REDIS, "--key-prefix", prefix, "--max-batch", str(MAX_BATCH), *map(str, extra)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def stop_worker(proc) -> str:
    """SIGTERM: the worker finishes its batch and exits 0."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    assert proc.returncode == 0, out
    return out


def job_worker(client, job_id: str) -> str:
    """The name of the worker that ran the job (the queue writes it into the job's hash)."""
    return client.redis.hget(f"{client.prefix}:job:{job_id}", "worker").decode()


# -----------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def weights():
    """The default model the repository ships: weights/, a native folder."""
    assert (DEFAULT_WEIGHTS / "config.json").is_file(), f"{DEFAULT_WEIGHTS} holds no native weights"
    return DEFAULT_WEIGHTS


@pytest.fixture(scope="module")
def pipe(weights):
    return StableDiffusion.from_pretrained(weights)


@pytest.fixture(scope="module")
def references(pipe):
    """Each BURST request run alone through the pipeline: the pixels its image must have."""
    return [pixels(pipe.txt2img(b["prompt"], b["negative_prompt"], steps=STEPS, guidance_scale=b["guidance_scale"],
                                sampler=b["sampler"], seed=b["seed"])[0]) for b in BURST]


@pytest.fixture(scope="module")
def service(weights):
    """API (uvicorn, in this process, no model) + one `sd worker` process, on Redis with a fresh prefix."""
    prefix = f"test-{secrets.token_hex(4)}"
    settings = Settings(weights=str(weights), redis_url=REDIS, key_prefix=prefix, max_batch=MAX_BATCH)
    server = uvicorn.Server(uvicorn.Config(create_app(settings, worker=False), host="127.0.0.1", port=free_port(),
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    worker = start_worker(weights, prefix, "--batch-window", 0.1)
    r = redis.Redis.from_url(REDIS)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{server.config.port}", timeout=300) as c:
            wait_until(lambda: server.started, what="uvicorn")

            def ready():
                assert worker.poll() is None, worker.communicate()[0]
                return c.get("/readyz").status_code == 200
            wait_until(ready, what="the worker to load the model")
            c.redis, c.prefix, c.weights, c.worker = r, prefix, weights, worker
            yield c
    finally:
        stop_worker(worker)
        server.should_exit = True
        thread.join(60)
        keys = list(r.scan_iter(match=f"{prefix}:*"))
        if keys:
            r.delete(*keys)
        r.close()


# -----------------------------------------------------------------------------
# every endpoint, the default model


def test_txt2img_png_parameters_and_same_seed_same_image(service, pipe, weights):
    body = {"prompt": "a large red circle in the center on a blue background", "steps": STEPS, "seed": 42}
    r = service.post("/txt2img", json=body)
    assert png(r).size == (64, 64) and r.headers["x-seed"] == "42"
    params = read_parameters(r.content)
    assert params.splitlines()[0] == body["prompt"]
    assert f"Steps: {STEPS}, Sampler: ddim, CFG scale: 7.5, Seed: 42, Size: 64x64" in params

    assert service.post("/txt2img", json=body).content == r.content  # same seed: the same PNG, byte for byte
    alone = pipe.txt2img(body["prompt"], steps=STEPS, seed=42)[0]
    assert same_image(pixels(r.content), pixels(alone))  # the worker's image is the pipeline's
    other = service.post("/txt2img", json={**body, "seed": 43})
    assert not same_image(pixels(other.content), pixels(r.content))

    # several images: JSON with base64 PNGs, the seed and every parameter
    r = service.post("/txt2img", json={**body, "num_images": 3})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    out = r.json()
    assert out["seed"] == 42 and [i["index"] for i in out["images"]] == [0, 1, 2]
    assert out["parameters"] == {"mode": "txt2img", "prompt": body["prompt"], "negative_prompt": "", "steps": STEPS,
                                 "guidance_scale": 7.5, "sampler": "ddim", "seed": 42, "width": 64, "height": 64,
                                 "num_images": 3, "strength": None, "loras": [],
                                 "model": os.path.basename(str(weights).rstrip("/")).rsplit(".", 1)[0]}  # (the registry name)
    images = [base64.b64decode(i["png_base64"]) for i in out["images"]]
    assert all(Image.open(io.BytesIO(p)).size == (64, 64) and "Seed: 42" in read_parameters(p) for p in images)
    assert same_image(pixels(images[0]), pixels(alone))  # image 0 is the 1-image request's
    assert not same_image(pixels(images[1]), pixels(images[0])) and not same_image(pixels(images[2]), pixels(images[1]))


def test_img2img_and_inpaint(service):
    source = service.post("/txt2img", json={"prompt": "a large red circle in the center on a white background",
                                            "steps": STEPS, "seed": 7}).content
    r = service.post("/img2img", data={"prompt": "a large blue circle in the center on a white background",
                                       "strength": "0.6", "steps": str(STEPS), "seed": "8"},
                     files={"image": ("in.png", source, "image/png")})
    assert png(r).size == (64, 64)
    assert "Denoising strength: 0.6" in read_parameters(r.content) and "Mode: img2img" in read_parameters(r.content)
    assert not np.array_equal(pixels(r.content), pixels(source))

    mask = np.zeros((64, 64), np.uint8)
    mask[:32, :32] = 255  # repaint the top left quadrant only
    r = service.post("/inpaint", data={"prompt": "a small yellow square in the top left on a white background",
                                       "steps": str(STEPS), "seed": "9"},
                     files={"image": ("in.png", source, "image/png"),
                            "mask": ("mask.png", encode(Image.fromarray(mask, "L")), "image/png")})
    out, original = pixels(png(r)), pixels(source)
    keep = mask == 0
    assert out.shape == (64, 64, 3) and "Mode: inpaint" in read_parameters(r.content)
    assert np.array_equal(out[keep], original[keep]) and not np.array_equal(out[~keep], original[~keep])


def test_job_api_progress_image_and_cancel_a_queued_job(service):
    body = {"prompt": "a medium green triangle in the center on a black background", "steps": 40, "seed": 5}
    r = service.post("/jobs/txt2img", json=body)
    assert r.status_code == 202 and r.json()["status"] == "queued" and r.json()["seed"] == 5
    job = r.json()
    assert r.headers["location"] == job["status_url"]

    seen = []  # follow it: it runs, step by step

    def running():
        s = service.get(job["status_url"]).json()
        seen.append((s["status"], s["progress"]["step"], s["progress"]["total"]))
        return s["status"] == "running" and 0 < s["progress"]["step"] < 40
    wait_until(running, what="the job to make progress")
    assert seen[-1][2] == 40

    # the worker is inside a pipeline call: a job posted now waits in the queue, and a DELETE cancels it there
    queued = service.post("/jobs/txt2img", json={**body, "seed": 6}).json()
    assert service.get(queued["status_url"]).json()["status"] == "queued"
    s = service.delete(queued["status_url"]).json()
    assert s["status"] == "cancelled" and s["started_at"] is None

    wait_until(lambda: service.get(job["status_url"]).json()["status"] == "done", what="the job")
    s = service.get(job["status_url"]).json()
    assert s["progress"] == {"step": 40, "total": 40} and s["parameters"]["width"] == 64
    first = service.get(job["image_url"])
    assert png(first).size == (64, 64) and "Seed: 5" in read_parameters(first.content)
    assert service.get(s["images"][0]).content == first.content

    # the cancelled job never runs: the worker acknowledges it without a pipeline call
    after = service.post("/txt2img", json={**body, "steps": 2, "seed": 1})  # the worker has read past it
    assert after.status_code == 200
    s = service.get(queued["status_url"]).json()
    assert s["status"] == "cancelled" and s["started_at"] is None and s["progress"]["step"] == 0
    assert service.get(queued["image_url"]).status_code == 409


# -----------------------------------------------------------------------------
# load


def burst(client, requests) -> list[httpx.Response]:
    """Every request from its own client thread (its own connection), all at once."""
    answers, go = [None] * len(requests), threading.Barrier(len(requests))

    def send(i):
        with httpx.Client(base_url=str(client.base_url), timeout=300) as c:
            go.wait()
            answers[i] = c.post("/txt2img", json=requests[i])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    return answers


def test_sixteen_concurrent_clients_one_worker_max_batch_8(service, references):
    before = metric_values(service)
    answers = burst(service, BURST)

    for body, answer, reference in zip(BURST, answers, references):
        assert png(answer).size == (64, 64) and answer.headers["x-seed"] == str(body["seed"])
        assert f"Seed: {body['seed']}" in read_parameters(answer.content)
        assert same_image(pixels(answer.content), reference)  # the image it makes alone
    assert len({job_worker(service, a.headers["x-job-id"]) for a in answers}) == 1

    after = metric_values(service)
    delta = {k: after[k] - before.get(k, 0.0) for k in after if k.startswith("sd_batch_size")}
    calls, images = delta["sd_batch_size_count"], delta["sd_batch_size_sum"]
    assert images == 16 and calls < 16                       # sixteen images in fewer pipeline calls ...
    assert delta['sd_batch_size_bucket{le="1.0"}'] < calls   # ... some of them batches of more than one image
    assert delta['sd_batch_size_bucket{le="8.0"}'] == calls  # ... none over max batch
    done = 'sd_jobs_total{status="done"}'
    assert after[done] - before.get(done, 0.0) == 16


def test_two_workers_on_one_redis_share_the_load(service, references):
    second = start_worker(service.weights, service.prefix, "--batch-window", 0.1)
    try:
        def both_ready():
            assert second.poll() is None, second.communicate()[0]
            return service.get("/readyz").json()["workers"] == 2
        wait_until(both_ready, what="the second worker")

        # sixteen jobs at once: a worker holds at most 8, so the other must take the rest
        jobs = [service.post("/jobs/txt2img", json=body).json() for body in BURST]
        wait_until(lambda: all(service.get(j["status_url"]).json()["status"] == "done" for j in jobs),
                   what="the sixteen jobs")
        for job, reference in zip(jobs, references):
            assert same_image(pixels(png(service.get(job["image_url"]))), reference)
        ran = [job_worker(service, j["id"]) for j in jobs]
        assert len(set(ran)) == 2, ran
        assert {f"-{service.worker.pid}-", f"-{second.pid}-"} == {f"-{name.split('-')[-2]}-" for name in ran}
    finally:
        out = stop_worker(second)
    assert "finishing the running batch" in out


def test_a_wait_longer_than_the_redis_socket_timeout(monkeypatch):
    """Under load a synchronous request waits for its job much longer than one Redis reply may take (the
    client's socket timeout: 5 s by default in redis-py 8). The wait is a series of short blocking reads,
    so it is not mistaken for an unreachable Redis (a 503). Here with both times scaled down."""
    import asyncio

    from service import queue as queue_module
    from service.queue import Job, RedisQueue, new_job_id

    monkeypatch.setattr(queue_module, "SOCKET_TIMEOUT", 1.0)
    monkeypatch.setattr(queue_module, "BLOCK_SLICE", 0.3)
    q = RedisQueue(REDIS, prefix=f"test-{secrets.token_hex(4)}")
    job = Job(new_job_id(), "txt2img", {"prompt": "x", "seed": 1}, created=time.time())

    def worker():  # takes the job, works on it for 2.5 socket timeouts, stores the result
        (taken,) = q.take(1, block=5, gather=0)
        time.sleep(2.5)
        q.finish(taken, [b"png"])

    async def client():
        await q.submit(job, limit=10)
        t = threading.Thread(target=worker)
        t.start()
        try:
            return await q.wait(job.id, timeout=30)
        finally:
            await asyncio.to_thread(t.join, 30)
            await q.aclose()

    try:
        state = asyncio.run(client())
        assert state.status == "done" and asyncio.run(q.result(job.id, 0)) == b"png"
    finally:
        r = q._redis()
        keys = list(r.scan_iter(match=f"{q.prefix}:*"))
        if keys:
            r.delete(*keys)
        q.close()
