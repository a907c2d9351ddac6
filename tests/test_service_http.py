"""
The service over real HTTP: a real uvicorn server on a free loopback port, the tiny random model, and
either the in-memory queue with the in-process worker or the real local Redis (db 15, a random key
prefix) with a worker thread the test starts. Shown here: txt2img answers a PNG with the parameters
chunk and the seed it used; img2img and inpaint take real uploaded PNGs; the async job API (202,
status with progress, image, DELETE cancel of a queued and of a running job); batching (concurrent
requests run as one pipeline call, and each image is byte-equal to the same request run alone);
errors as JSON with the right status (401, 413, 415, 422 naming the field and range, 429, 503, 504);
/metrics, /healthz, /readyz, /openapi.json.
"""

import base64
import io
import secrets
import socket
import threading
import time

import httpx
import numpy as np
import pytest
import redis
import uvicorn
from PIL import Image

from model.pnginfo import read_parameters
from service.api import create_app
from service.queue import RedisQueue
from service.settings import Settings
from service.worker import Worker

REDIS = "redis://127.0.0.1:6379/15"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """uvicorn serving `app` in a thread on a free loopback port, for the length of a `with`."""

    def __init__(self, app):
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
        self.url = f"http://127.0.0.1:{self.server.config.port}"
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(60)


class CountingPipe:
    """The tiny pipeline, recording each generate call's batch size; it can hold a batch at a step."""

    def __init__(self, pipe):
        self.pipe, self.batches, self.hold_at = pipe, [], None
        self.reached, self.release, self.returned = threading.Event(), threading.Event(), threading.Event()

    @property
    def native_size(self):
        return self.pipe.native_size

    def hold(self, step):
        self.hold_at = step
        self.reached.clear(), self.release.clear(), self.returned.clear()

    def generate(self, requests, callback=None, **kw):
        self.batches.append(len(requests))

        def cb(step, total):
            callback(step, total)
            if step == self.hold_at:
                self.reached.set()
                assert self.release.wait(60)

        try:
            return self.pipe.generate(requests, callback=cb, **kw)
        finally:
            self.returned.set()


def wait_until(predicate, timeout=60, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def png(response) -> Image.Image:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    return Image.open(io.BytesIO(response.content))


def upload(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def picture(mode="RGB", size=16):
    rng = np.random.default_rng(0)
    channels = 4 if mode == "RGBA" else 3
    data = rng.integers(0, 256, (size, size, channels), dtype=np.uint8)
    if mode == "RGBA":
        data[..., 3] = 255
    return Image.fromarray(data, mode)


# -----------------------------------------------------------------------------
# servers


@pytest.fixture(scope="module")
def memory(tiny_weights, tiny_pipe):
    """`sd serve` without Redis: in-memory queue, in-process worker."""
    settings = Settings(weights=str(tiny_weights), batch_window=0.01)
    with Server(create_app(settings, pipe=tiny_pipe)) as server, httpx.Client(base_url=server.url, timeout=120) as c:
        wait_until(lambda: c.get("/readyz").status_code == 200, what="the in-process worker")
        yield c


@pytest.fixture
def redis_service(tiny_weights, tiny_pipe):
    """API on Redis without a worker; start one with service.start_worker()."""
    prefix = f"test-{secrets.token_hex(4)}"
    settings = Settings(weights=str(tiny_weights), redis_url=REDIS, key_prefix=prefix, max_batch=8, batch_window=0.2)
    pipe = CountingPipe(tiny_pipe)
    stop, threads = threading.Event(), []

    def start_worker():
        queue = RedisQueue(REDIS, prefix=prefix)
        worker = Worker(pipe, queue, settings, name="test-worker")
        thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
        thread.start()
        threads.append((thread, queue))

    r = redis.Redis.from_url(REDIS)
    with Server(create_app(settings)) as server, httpx.Client(base_url=server.url, timeout=120) as c:
        c.pipe, c.start_worker, c.redis, c.prefix = pipe, start_worker, r, prefix
        yield c
        stop.set()
        pipe.release.set()
        for thread, queue in threads:
            thread.join(60)
            queue.close()
    keys = list(r.scan_iter(match=f"{prefix}:*"))
    if keys:
        r.delete(*keys)
    r.close()


def strict_app(**kw):
    """A worker-less in-memory app with small limits and API keys, for error answers."""
    settings = dict(weights="unused", max_upload_bytes=20_000, max_pixels=64 * 64, max_steps=50, queue_limit=2,
                    job_timeout=0.3, api_keys=("key-one", "key-two"))
    return create_app(Settings(**{**settings, **kw}), worker=False)


AUTH = {"Authorization": "Bearer key-two"}


# -----------------------------------------------------------------------------
# txt2img, img2img, inpaint (in-memory queue, in-process worker)


def test_txt2img_png_with_parameters_and_seed(memory):
    r = memory.post("/txt2img", json={"prompt": "a red circle", "steps": 3, "seed": 42})
    img = png(r)
    assert img.size == (16, 16) and r.headers["x-seed"] == "42"
    params = read_parameters(r.content)
    assert params.startswith("a red circle\n") and "Seed: 42" in params and "Steps: 3" in params
    assert "Size: 16x16" in params

    # no seed: one is drawn, reported, and makes the same image again
    r1 = memory.post("/txt2img", json={"prompt": "a red circle", "steps": 3})
    seed = int(r1.headers["x-seed"])
    assert f"Seed: {seed}" in read_parameters(r1.content)
    r2 = memory.post("/txt2img", json={"prompt": "a red circle", "steps": 3, "seed": seed})
    assert r2.content == r1.content


def test_several_images_or_accept_json_give_json(memory):
    r = memory.post("/txt2img", json={"prompt": "a blue square", "steps": 2, "seed": 5, "num_images": 2})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["seed"] == 5 and [i["index"] for i in body["images"]] == [0, 1]
    assert body["parameters"]["width"] == 16 and body["parameters"]["num_images"] == 2
    pngs = [base64.b64decode(i["png_base64"]) for i in body["images"]]
    assert all("Seed: 5" in read_parameters(p) for p in pngs) and pngs[0] != pngs[1]

    r = memory.post("/txt2img", json={"prompt": "a blue square", "steps": 2, "seed": 5},
                    headers={"Accept": "application/json"})
    assert r.headers["content-type"] == "application/json" and len(r.json()["images"]) == 1
    # image 0 of a 2-image request is the same as a 1-image request with that seed (one noise draw each)
    assert r.json()["images"][0]["png_base64"] == body["images"][0]["png_base64"]


def test_img2img_and_inpaint_with_uploaded_pngs(memory):
    source = memory.post("/txt2img", json={"prompt": "a red circle", "steps": 2, "seed": 1}).content

    r = memory.post("/img2img", data={"prompt": "a blue circle", "strength": "0.5", "steps": "4", "seed": "3"},
                    files={"image": ("in.png", source, "image/png")})
    assert png(r).size == (16, 16)
    assert "Denoising strength: 0.5" in read_parameters(r.content) and "Mode: img2img" in read_parameters(r.content)

    # a mask file: white = repaint; every other pixel comes back unchanged
    original = np.asarray(Image.open(io.BytesIO(source)).convert("RGB"))
    mask = np.zeros((16, 16), np.uint8)
    mask[:8, :8] = 255
    r = memory.post("/inpaint", data={"prompt": "a yellow square", "steps": "3", "seed": "4"},
                    files={"image": ("in.png", source, "image/png"),
                           "mask": ("mask.png", upload(Image.fromarray(mask, "L")), "image/png")})
    out = np.asarray(png(r).convert("RGB"))
    keep = mask == 0
    assert np.array_equal(out[keep], original[keep]) and not np.array_equal(out[~keep], original[~keep])

    # no mask file: the upload's transparent pixels are repainted
    rgba = np.asarray(Image.open(io.BytesIO(source)).convert("RGBA")).copy()
    rgba[8:, 8:, 3] = 0
    r = memory.post("/inpaint", data={"prompt": "a yellow square", "steps": "3", "seed": "4"},
                    files={"image": ("holed.png", upload(Image.fromarray(rgba, "RGBA")), "image/png")})
    out = np.asarray(png(r).convert("RGB"))
    keep = rgba[..., 3] == 255
    assert np.array_equal(out[keep], rgba[..., :3][keep])
    assert "Mode: inpaint" in read_parameters(r.content)


def test_health_ready_metrics_openapi(memory):
    assert memory.get("/healthz").json() == {"status": "ok"}
    ready = memory.get("/readyz").json()
    assert ready["status"] == "ready" and ready["queue"] == "memory" and ready["workers"] == 1
    memory.post("/txt2img", json={"prompt": "x", "steps": 2, "seed": 0})
    memory.post("/txt2img", json={"prompt": "x", "steps": 999})
    r = memory.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert 'sd_http_requests_total{method="POST",path="/txt2img",status="200"}' in text
    assert 'sd_http_requests_total{method="POST",path="/txt2img",status="422"} 1' in text
    assert "# TYPE sd_batch_size histogram" in text and "sd_queue_depth 0" in text
    values = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    assert float(values["sd_batch_size_count"]) >= 1 and float(values["sd_step_seconds_count"]) >= 2
    assert float(values["sd_job_seconds_count"]) >= 1 and float(values['sd_jobs_total{status="done"}']) >= 1

    spec = memory.get("/openapi.json").json()
    assert {"/txt2img", "/img2img", "/inpaint", "/jobs/txt2img", "/jobs/{job_id}", "/jobs/{job_id}/image/{n}",
            "/healthz", "/readyz", "/metrics"} <= set(spec["paths"])
    steps = spec["components"]["schemas"]["Txt2ImgRequest"]["properties"]["steps"]
    assert (steps["minimum"], steps["maximum"]) == (1, 150)  # the limit the server enforces
    assert "image/png" in spec["paths"]["/txt2img"]["post"]["responses"]["200"]["content"]


# -----------------------------------------------------------------------------
# Redis: async jobs, cancel, batching


def test_async_jobs_progress_image_and_cancel(redis_service):
    c, pipe = redis_service, redis_service.pipe
    r = c.post("/jobs/txt2img", json={"prompt": "a red circle", "steps": 4, "seed": 11})
    assert r.status_code == 202 and r.headers["location"].endswith(f"/jobs/{r.json()['id']}")
    job = r.json()
    assert job["status"] == "queued" and job["seed"] == 11
    queued = c.post("/jobs/txt2img", json={"prompt": "never runs", "steps": 4}).json()
    cancelled = c.delete(f"/jobs/{queued['id']}").json()
    assert cancelled["status"] == "cancelled"

    s = c.get(f"/jobs/{job['id']}").json()
    assert s["status"] == "queued" and s["progress"] == {"step": 0, "total": 0}
    assert c.get(f"/jobs/{job['id']}/image").status_code == 409

    pipe.hold(2)
    c.start_worker()
    assert pipe.reached.wait(60)
    s = c.get(f"/jobs/{job['id']}").json()
    assert s["status"] == "running" and s["progress"] == {"step": 2, "total": 4} and s["attempts"] == 1
    pipe.release.set()
    wait_until(lambda: c.get(f"/jobs/{job['id']}").json()["status"] == "done", what="the job")
    s = c.get(f"/jobs/{job['id']}").json()
    assert s["progress"] == {"step": 4, "total": 4} and s["parameters"]["width"] == 16 and len(s["images"]) == 1
    first = c.get(f"/jobs/{job['id']}/image")
    assert png(first).size == (16, 16) and "Seed: 11" in read_parameters(first.content)
    assert c.get(s["images"][0]).content == first.content
    assert c.get(f"/jobs/{job['id']}/image/1").status_code == 404
    assert c.delete(f"/jobs/{job['id']}").status_code == 409          # already done
    assert pipe.batches == [1]                                          # the cancelled queued job never ran
    assert c.get(f"/jobs/{queued['id']}").json()["status"] == "cancelled"

    # cancel a running job: it stops at its next step
    pipe.hold(1)
    running = c.post("/jobs/txt2img", json={"prompt": "stop me", "steps": 20, "seed": 2}).json()
    assert pipe.reached.wait(60)
    assert c.delete(f"/jobs/{running['id']}").json()["status"] == "cancelled"
    pipe.release.set()
    assert pipe.returned.wait(60)
    s = c.get(f"/jobs/{running['id']}").json()
    assert s["status"] == "cancelled" and s["progress"]["step"] < 20
    assert c.get(f"/jobs/{running['id']}/image").status_code == 409
    assert c.get(f"/jobs/{'x' * 22}").status_code == 404


def test_batching_over_http_matches_running_alone(redis_service):
    c, pipe = redis_service, redis_service.pipe
    requests = [{"prompt": "a red circle", "seed": 1, "guidance_scale": 7.5},
                {"prompt": "a blue square on a green background", "seed": 2, "guidance_scale": 1.0},
                {"prompt": "a yellow triangle", "seed": 3, "guidance_scale": 3.0, "negative_prompt": "blurry"},
                {"prompt": "a red circle", "seed": 4, "guidance_scale": 7.5, "num_images": 2}]
    for body in requests:
        body.update(steps=3, sampler="euler")
    answers = [None] * len(requests)

    def send(i):
        answers[i] = c.post("/txt2img", json=requests[i], headers={"Accept": "application/json"})

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    wait_until(lambda: c.redis.xlen(f"{c.prefix}:jobs:weights/-") == len(requests), what="all jobs queued")
    c.start_worker()  # finds four jobs waiting: one batch
    for t in threads:
        t.join(120)
    assert pipe.batches == [4]
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]

    for body, batched in zip(requests, answers):  # now each alone
        alone = c.post("/txt2img", json=body, headers={"Accept": "application/json"})
        assert [i["png_base64"] for i in alone.json()["images"]] == [i["png_base64"] for i in batched.json()["images"]]
        assert alone.json()["seed"] == body["seed"]
    assert pipe.batches == [4, 1, 1, 1, 1]
    text = c.get("/metrics").text
    # sd_batch_size counts images per call: the batch had 5 (one job asked for 2), the lone runs 1, 1, 1, 2
    assert 'sd_batch_size_bucket{le="4.0"} 4' in text and 'sd_batch_size_bucket{le="8.0"} 5' in text


def test_redis_readyz_needs_a_worker(redis_service):
    r = redis_service.get("/readyz")
    assert r.status_code == 503 and r.json()["queue"] == "redis" and r.json()["workers"] == 0
    assert r.headers["retry-after"]
    redis_service.start_worker()
    wait_until(lambda: redis_service.get("/readyz").status_code == 200, what="ready")


# -----------------------------------------------------------------------------
# errors


def test_api_keys_and_open_health_endpoints():
    with Server(strict_app()) as s, httpx.Client(base_url=s.url) as c:
        body = {"prompt": "x"}
        r = c.post("/jobs/txt2img", json=body)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer" and "API key" in r.json()["detail"]
        assert c.post("/jobs/txt2img", json=body, headers={"Authorization": "Bearer nope"}).status_code == 401
        assert c.post("/jobs/txt2img", json=body, headers={"X-API-Key": "key-one"}).status_code == 202
        assert c.post("/jobs/txt2img", json=body, headers=AUTH).status_code == 202
        assert c.get("/healthz").status_code == 200 and c.get("/metrics").status_code == 200
        assert c.get("/readyz").status_code == 503  # no worker in this app


@pytest.mark.parametrize("field, value, message", [
    ("steps", 500, "steps must be an integer in [1, 50], got 500"),
    ("steps", 0, "steps must be an integer in [1, 50], got 0"),
    ("sampler", "plms", "sampler must be one of ddim, ddpm, euler"),
    ("width", 30, "width must be a multiple of 8 in [8, 4096]"),
    ("num_images", 9, "num_images must be an integer in [1, 4], got 9"),
    ("guidance_scale", -1, "guidance_scale must be a number in [0, 50], got -1"),
    ("seed", 2**40, "seed must be an integer in [-1, 4294967295]"),
    ("steps", "many", "steps must be an integer in [1, 50], got 'many'"),
    ("colour", "red", "colour is not a field of this request"),
])
def test_422_names_the_field_and_range(field, value, message):
    with Server(strict_app()) as s, httpx.Client(base_url=s.url, headers=AUTH) as c:
        r = c.post("/jobs/txt2img", json={"prompt": "x", field: value})
        assert r.status_code == 422 and message in r.json()["detail"], r.json()


def test_other_422s():
    with Server(strict_app()) as s, httpx.Client(base_url=s.url, headers=AUTH) as c:
        r = c.post("/jobs/txt2img", json={"steps": 2})
        assert r.status_code == 422 and r.json()["detail"] == "prompt is required"
        r = c.post("/jobs/txt2img", json={"prompt": "x", "width": 128, "height": 64})
        assert r.status_code == 422 and "width * height must be at most 4096, got 128x64" in r.json()["detail"]
        r = c.post("/jobs/txt2img", content=b"{not json", headers={"Content-Type": "application/json"})
        assert r.status_code == 422
        image = upload(picture())
        r = c.post("/jobs/img2img", data={"prompt": "x", "strength": "1.5"}, files={"image": ("a.png", image)})
        assert r.status_code == 422 and "strength must be a number in [0, 1], got '1.5'" in r.json()["detail"]
        r = c.post("/jobs/img2img", data={"prompt": "x"})
        assert r.status_code == 422 and r.json()["detail"] == "image is required"
        r = c.post("/jobs/inpaint", data={"prompt": "x"}, files={"image": ("a.png", image)})  # RGB, no mask
        assert r.status_code == 422 and "mask is required" in r.json()["detail"]
        r = c.post("/jobs/inpaint", data={"prompt": "x"},
                   files={"image": ("a.png", image), "mask": ("m.png", upload(picture(size=8)))})
        assert r.status_code == 422 and "mask size 8x8 must equal the image size 16x16" in r.json()["detail"]
        r = c.post("/jobs/img2img", data={"prompt": "x"}, files={"image": ("a.png", upload(picture(size=4)))})
        assert r.status_code == 422 and "at least 8x8" in r.json()["detail"]


def test_413_415():
    with Server(strict_app()) as s, httpx.Client(base_url=s.url, headers=AUTH) as c:
        big = secrets.token_bytes(30_000)  # over max_upload_bytes (20 000): refused from Content-Length
        r = c.post("/jobs/img2img", data={"prompt": "x"}, files={"image": ("a.png", big, "image/png")})
        assert r.status_code == 413 and "at most 20000" in r.json()["detail"]

        def chunks():  # no Content-Length: refused once the streamed body passes the limit
            for _ in range(10):
                yield b"x" * 5_000
        r = c.post("/jobs/txt2img", content=chunks(), headers={"Content-Type": "application/json"})
        assert r.status_code == 413

        huge = upload(Image.new("RGB", (1000, 1000)))  # small file, too many pixels: refused from the header
        r = c.post("/jobs/img2img", data={"prompt": "x"}, files={"image": ("a.png", huge, "image/png")})
        assert r.status_code == 413 and "1000x1000 = 1000000 pixels; at most 4096" in r.json()["detail"]

        r = c.post("/jobs/img2img", data={"prompt": "x"}, files={"image": ("a.txt", b"hello, not an image")})
        assert r.status_code == 415 and "not an image" in r.json()["detail"]
        truncated = upload(picture())[:-40]
        r = c.post("/jobs/img2img", data={"prompt": "x"}, files={"image": ("a.png", truncated)})
        assert r.status_code == 415
        r = c.post("/jobs/inpaint", data={"prompt": "x"},
                   files={"image": ("a.png", upload(picture("RGBA"))), "mask": ("m.txt", b"nope")})
        assert r.status_code == 415 and r.json()["detail"].startswith("mask")


def test_429_when_full_and_504_when_the_wait_times_out():
    with Server(strict_app()) as s, httpx.Client(base_url=s.url, headers=AUTH) as c:
        r = c.post("/txt2img", json={"prompt": "x"})  # no worker: waits job_timeout (0.3 s), then 504
        job_id = r.headers["x-job-id"]
        assert r.status_code == 504 and job_id in r.json()["detail"] and f"/jobs/{job_id}" in r.json()["detail"]
        assert c.get(f"/jobs/{job_id}").json()["status"] == "queued"  # still there to follow
        assert c.post("/jobs/txt2img", json={"prompt": "x"}).status_code == 202
        r = c.post("/jobs/txt2img", json={"prompt": "x"})  # queue_limit 2
        assert r.status_code == 429 and r.headers["retry-after"] and "queue full" in r.json()["detail"]


def test_503_when_redis_is_down():
    app = create_app(Settings(weights="unused", redis_url="redis://127.0.0.1:1/0"), worker=False)
    with Server(app) as s, httpx.Client(base_url=s.url) as c:
        r = c.post("/jobs/txt2img", json={"prompt": "x"})
        assert r.status_code == 503 and r.headers["retry-after"] and "unavailable" in r.json()["detail"]
        assert c.get("/jobs/abc").status_code == 503
        assert c.get("/readyz").status_code == 503 and c.get("/healthz").status_code == 200


# -----------------------------------------------------------------------------
# the commands, as subprocesses


def _sd(*args, **env):
    import os
    import subprocess
    import sys

    return subprocess.Popen([sys.executable, "-m", "service.cli", *map(str, args)], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "SD_DEVICE": "cpu", **env})


def _stop(proc) -> str:
    import signal

    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    # uvicorn shuts down cleanly, then re-raises the signal it caught: killed by SIGTERM is its normal end
    assert proc.returncode == 0 or (proc.returncode == -signal.SIGTERM and "shutdown complete" in out), out
    return out


def _ready(url, proc):
    def check():
        assert proc.poll() is None, proc.communicate()[0]
        try:
            return httpx.get(url + "/readyz").status_code == 200
        except httpx.TransportError:
            return False
    wait_until(check, timeout=120, what="the server")


def test_sd_serve_in_process_answers_txt2img(tiny_weights):
    port = free_port()
    proc = _sd("serve", "--port", port, "--weights", tiny_weights)
    try:
        _ready(f"http://127.0.0.1:{port}", proc)
        r = httpx.post(f"http://127.0.0.1:{port}/txt2img", json={"prompt": "a red circle", "steps": 2, "seed": 3},
                       timeout=120)
        assert png(r).size == (16, 16) and "Seed: 3" in read_parameters(r.content)
    finally:
        out = _stop(proc)
    assert "in-memory queue" in out


def test_sd_serve_with_redis_and_sd_worker(tiny_weights):
    port, prefix = free_port(), f"test-{secrets.token_hex(4)}"
    env = {"SD_REDIS_URL": REDIS, "SD_KEY_PREFIX": prefix}
    api = _sd("serve", "--port", port, **env)
    worker = _sd("worker", "--weights", tiny_weights, "--max-batch", 4, **env)
    try:
        _ready(f"http://127.0.0.1:{port}", api)
        r = httpx.post(f"http://127.0.0.1:{port}/txt2img", json={"prompt": "a red circle", "steps": 2, "seed": 3},
                       timeout=120)
        assert png(r).size == (16, 16)
        assert "finishing the running batch" in _stop(worker) and worker.returncode == 0  # graceful
        assert httpx.get(f"http://127.0.0.1:{port}/jobs/{r.headers['x-job-id']}").json()["status"] == "done"
    finally:
        if worker.poll() is None:
            worker.kill()
        r = redis.Redis.from_url(REDIS)
        keys = list(r.scan_iter(match=f"{prefix}:*"))
        if keys:
            r.delete(*keys)
        r.close()
        _stop(api)
