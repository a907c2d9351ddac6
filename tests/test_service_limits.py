"""
The pixel limit follows the served model: 4 x its native size squared, at least SD 1.x's 1048576 (SD 2.x
2359296, SDXL 4194304), unless SD_MAX_PIXELS sets it. The API process learns the native size from what the
workers announce in their liveness keys (service/models.py): over real HTTP (uvicorn on loopback) and real
Redis, an API with no worker refuses 1536x1024 naming 1048576; once a worker serving a 1024 model has said so
(here its keep-alive call alone: no job runs), the same request is queued, uploads of that size too, the
OpenAI face and /ui/config follow, and when the worker's key expires the limit goes back. With
`sd serve`'s in-process worker the same, by its own announcement. Also: the native multipart endpoints take
SDXL's micro-conditioning fields as one form field each, and name the field when one is bad.
"""

import json
import secrets

import httpx
import pytest
import redis
from PIL import Image

from service.api import create_app
from service.queue import RedisQueue
from service.settings import Settings
from test_service_http import REDIS, Server, upload, wait_until

SDXL = {"model": "sdxl-base", "native_size": 1024}
BIG = {"prompt": "x", "width": 1536, "height": 1024}  # 1572864 pixels: over SD 1.x's limit, under SDXL's


def test_the_default_limit_scales_with_the_native_size_and_sd_max_pixels_wins():
    s = Settings()
    assert [s.max_pixels_for(n) for n in (None, 64, 512, 768, 1024)] == \
        [1048576, 1048576, 1048576, 2359296, 4194304]
    assert Settings(max_pixels=2_000_000).max_pixels_for(1024) == 2_000_000
    assert Settings.from_env({"SD_MAX_PIXELS": "2000000"}).max_pixels == 2_000_000
    with pytest.raises(ValueError, match="max_pixels must be > 0"):
        Settings(max_pixels=0)


@pytest.fixture
def redis_api():
    """An API on Redis (db 15, a random prefix) without a worker; `announce` says what a worker says."""
    prefix = f"test-{secrets.token_hex(4)}"
    queue, r = RedisQueue(REDIS, prefix=prefix), redis.Redis.from_url(REDIS)

    def serve(**settings):
        app = create_app(Settings(weights="unused", redis_url=REDIS, key_prefix=prefix, **settings))
        return Server(app)

    def announce(model, ttl=30.0):  # what a worker's keep-alive thread does (service/worker.py)
        queue.keep_alive("xl-worker", ttl, model)

    yield serve, announce, r, prefix
    queue.close()
    keys = list(r.scan_iter(match=f"{prefix}:*"))
    if keys:
        r.delete(*keys)
    r.close()


def blank_png(width, height) -> bytes:
    return upload(Image.new("RGB", (width, height), (40, 90, 200)))  # a few KB: the pixel count is what counts


def test_redis_api_takes_the_limit_of_the_model_its_workers_announce(redis_api):
    serve, announce, r, prefix = redis_api
    with serve() as s, httpx.Client(base_url=s.url, timeout=30) as c:
        # no worker yet: SD 1.x's limit, stated in the refusal
        refused = c.post("/jobs/txt2img", json=BIG)
        assert refused.status_code == 422
        assert refused.json()["detail"] == "width * height must be at most 1048576, got 1536x1024 = 1572864"
        assert c.get("/ui/config").json()["max_pixels"] == 1048576
        big_upload = {"image": ("big.png", blank_png(1536, 1024))}
        r413 = c.post("/jobs/img2img", data={"prompt": "x"}, files=big_upload)
        assert r413.status_code == 413 and "at most 1048576" in r413.json()["detail"]
        docs = c.get("/openapi.json").json()["components"]["schemas"]["Txt2ImgRequest"]["properties"]["width"]
        assert "the served model's limit" in docs["description"] and "SDXL 4194304" in docs["description"]

        announce(SDXL)  # an SDXL worker starts after the API
        assert c.post("/jobs/txt2img", json=BIG).status_code == 202
        assert c.post("/jobs/txt2img", json={"prompt": "x", "width": 2048, "height": 2048}).status_code == 202
        over = c.post("/jobs/txt2img", json={"prompt": "x", "width": 2048, "height": 2056})
        assert over.status_code == 422 and "at most 4194304, got 2048x2056" in over.json()["detail"]
        assert c.post("/jobs/img2img", data={"prompt": "x"}, files=big_upload).status_code == 202
        assert c.post("/jobs/img2img", data={"prompt": "x", "width": "1536", "height": "1024"},
                      files={"image": ("in.png", blank_png(16, 16))}).status_code == 202
        config = c.get("/ui/config").json()
        assert config["max_pixels"] == 4194304 and config["native_size"] == 1024
        e = c.post("/v1/images/generations", json={"prompt": "x", "size": "2048x2056"}).json()["error"]
        assert e["param"] == "size" and "at most 4194304" in e["message"], e
        e = c.post("/sdapi/v1/txt2img", json={"prompt": "x", "width": 2048, "height": 2056})
        assert e.status_code == 422 and "at most 4194304" in e.json()["detail"]

        r.delete(f"{prefix}:worker:xl-worker")  # the worker is gone (its key expired): back to SD 1.x's limit
        wait_until(lambda: c.get("/ui/config").json()["max_pixels"] == 1048576, timeout=10, what="the old limit")
        assert c.post("/jobs/txt2img", json=BIG).status_code == 422


def test_sd_max_pixels_wins_over_the_models_limit(redis_api):
    serve, announce, _, _ = redis_api
    announce(SDXL)
    with serve(max_pixels=2_000_000) as s, httpx.Client(base_url=s.url, timeout=30) as c:
        assert c.post("/jobs/txt2img", json=BIG).status_code == 202
        r = c.post("/jobs/txt2img", json={"prompt": "x", "width": 2048, "height": 1024})
        assert r.status_code == 422 and "at most 2000000, got 2048x1024" in r.json()["detail"]
        assert c.get("/ui/config").json()["max_pixels"] == 2_000_000
        width = c.get("/openapi.json").json()["components"]["schemas"]["Txt2ImgRequest"]["properties"]["width"]
        assert "width * height at most 2000000;" in width["description"]


class Native1024:
    """A stand-in for an SDXL pipeline in `sd serve`'s in-process worker: it announces native size 1024 and
    refuses to run (no job here should cost an SDXL-sized generation)."""
    name, native_size = "sdxl-stand-in", 1024

    def generate(self, requests, **kw):
        raise ValueError("not run in this test")


def test_in_process_worker_announces_its_model(tiny_pipe):
    with Server(create_app(Settings(weights="unused"), pipe=Native1024())) as s, \
            httpx.Client(base_url=s.url, timeout=30) as c:
        wait_until(lambda: c.get("/readyz").status_code == 200, what="the in-process worker")
        config = c.get("/ui/config").json()
        assert config["max_pixels"] == 4194304 and config["native_size"] == 1024
        assert c.post("/jobs/txt2img", json=BIG).status_code == 202
    # the default kind of model (SD 1.x family, native size at most 512) keeps SD 1.x's limit
    with Server(create_app(Settings(weights="unused"), pipe=tiny_pipe)) as s, \
            httpx.Client(base_url=s.url, timeout=30) as c:
        wait_until(lambda: c.get("/readyz").status_code == 200, what="the in-process worker")
        r = c.post("/jobs/txt2img", json=BIG)
        assert r.status_code == 422 and "at most 1048576, got 1536x1024" in r.json()["detail"]


@pytest.mark.parametrize("field, value, words", [
    ("original_size", "0,64", ["original_size must be two integers [height, width] in [1, 16384]",
                               "original_size.0", "got '0'"]),
    ("target_size", "64", ["target_size must be two integers [height, width]"]),
    ("crops_coords_top_left", "[1, 2, 3]", ["crops_coords_top_left must be two integers [top, left] in [0, 16384]"]),
    ("negative_original_size", "big,64", ["negative_original_size must be two integers", "got 'big'"]),
])
def test_multipart_micro_conditioning_fields_are_checked_as_in_json(field, value, words):
    app = create_app(Settings(weights="unused"), worker=False)
    with Server(app) as s, httpx.Client(base_url=s.url, timeout=30) as c:
        for path in ("/jobs/img2img", "/jobs/inpaint", "/img2img"):
            r = c.post(path, data={"prompt": "x", field: value}, files={"image": ("in.png", blank_png(16, 16))})
            assert r.status_code == 422 and all(w in r.json()["detail"] for w in words), (path, r.text)
        # the accepted forms: one field "H,W", JSON-style "[H, W]", or the field twice
        for form in ({"original_size": "64,48"}, {"target_size": "[40, 24]"}, {"crops_coords_top_left": ["4", "8"]},
                     {"negative_target_size": ""}):
            r = c.post("/jobs/img2img", data={"prompt": "x", **form}, files={"image": ("in.png", blank_png(16, 16))})
            assert r.status_code == 202, (form, r.text)
        description = c.get("/openapi.json").json()["paths"]["/img2img"]["post"]["description"]
        assert "original_size=1024,1024" in description


def test_micro_conditioning_reaches_the_job(redis_api):
    """A multipart job carries the pairs as a JSON one does (the worker passes them to the pipeline: the
    image's equality with the Python API's is tests/test_families.py's SDXL service test)."""
    serve, _, r, prefix = redis_api
    with serve() as s, httpx.Client(base_url=s.url, timeout=30) as c:
        job = c.post("/jobs/img2img", data={"prompt": "x", "original_size": "64,48", "crops_coords_top_left": "[4, 8]"},
                     files={"image": ("in.png", blank_png(16, 16))})
        assert job.status_code == 202, job.text
    params = json.loads(r.hget(f"{prefix}:job:{job.json()['id']}", "params"))
    assert params["original_size"] == [64, 48] and params["crops_coords_top_left"] == [4, 8]
    assert params["target_size"] is None
