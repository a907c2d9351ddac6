"""
The OpenAI Images API and the AUTOMATIC1111 API subset, driven by their real clients (the `openai` SDK
and `webuiapi`) against a real uvicorn server on loopback with the tiny random model, the in-memory
queue and the in-process worker. Shown here: both make the very job the native endpoints make (the
images are pixel-equal to the native API's for the same fields); the masks follow each API's
convention (OpenAI: alpha 0 = repaint; web UI: white = repaint, inpainting_mask_invert flips it),
proved by the pixels outside the mask coming back unchanged; the web UI's seeds are seed, seed + 1,
...; progress and interrupt act on a running request; the API key is the OpenAI key (the SDK raises
AuthenticationError without it) and the web UI's basic-auth password; errors have each API's shape
with the field and its range named.
"""

import base64
import io
import json
import socket
import threading
import time

import httpx
import numpy as np
import openai
import pytest
import uvicorn
import webuiapi
from PIL import Image

from service.api import create_app
from service.settings import Settings

KEY = "sk-test-key"


class Server:
    """uvicorn serving `app` in a thread on a free loopback port, for the length of a `with`."""

    def __init__(self, app):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.port, self.url = port, f"http://127.0.0.1:{port}"
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


class HoldingPipe:
    """The tiny pipeline; once armed with hold(step), a batch waits at that step until released."""

    def __init__(self, pipe):
        self.pipe, self.hold_at = pipe, None
        self.reached, self.release = threading.Event(), threading.Event()

    @property
    def native_size(self):
        return self.pipe.native_size

    def hold(self, step):
        self.hold_at = step
        self.reached.clear(), self.release.clear()

    def generate(self, requests, callback=None, **kw):
        def cb(step, total):
            callback(step, total)
            if step == self.hold_at:
                self.hold_at = None
                self.reached.set()
                assert self.release.wait(120)

        return self.pipe.generate(requests, callback=cb, **kw)


def serve(settings, pipe):
    server = Server(create_app(settings, pipe=pipe))
    server.__enter__()
    client = httpx.Client(base_url=server.url, timeout=120, headers={"Authorization": f"Bearer {KEY}"})
    deadline = time.monotonic() + 60
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, "the in-process worker did not start"
        time.sleep(0.05)
    return server, client


@pytest.fixture(scope="module")
def service(tiny_weights, tiny_pipe):
    """No API keys; the worker's pipeline can be held at a step."""
    pipe = HoldingPipe(tiny_pipe)
    server, client = serve(Settings(weights=str(tiny_weights), batch_window=0.01, max_steps=50), pipe)
    client.server, client.pipe = server, pipe
    yield client
    pipe.release.set()
    client.close()
    server.__exit__()


@pytest.fixture(scope="module")
def keyed(tiny_weights, tiny_pipe):
    """SD_API_KEYS configured."""
    server, client = serve(Settings(weights=str(tiny_weights), batch_window=0.01, api_keys=(KEY,)), tiny_pipe)
    client.server = server
    yield client
    client.close()
    server.__exit__()


def png_of(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG" and image.size == (16, 16)
    return np.asarray(image.convert("RGB"))


def picture() -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8), "RGB")


def left_half(white=255, black=0, mode="L") -> Image.Image:
    m = np.full((16, 16), black, np.uint8)
    m[:, :8] = white
    return Image.fromarray(m, mode)


def native_pixels(client, path, seed, num_images=1, files=None, **fields) -> list[np.ndarray]:
    """The native API's images for the same request."""
    kw = {"data": {**fields, "seed": seed, "num_images": num_images}, "files": files} if files else \
        {"json": {**fields, "seed": seed, "num_images": num_images}}
    r = client.post(path, headers={"Accept": "application/json"}, **kw)
    assert r.status_code == 200, r.text
    return [decode_png(base64.b64decode(i["png_base64"])) for i in r.json()["images"]]


def openai_client(server, key=KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=120)


# -----------------------------------------------------------------------------
# OpenAI


def test_openai_generate_is_the_native_txt2img_job(service):
    client = openai_client(service.server)
    r = client.images.generate(prompt="a red circle", n=2, size="16x16", model="weights", quality="high",
                               style="vivid", extra_body={"seed": 7, "steps": 2})
    assert isinstance(r.created, int) and len(r.data) == 2
    assert r.model_extra["model"] == "weights" and r.size == "16x16" and r.model_extra["seed"] == 7
    images = [decode_png(base64.b64decode(d.b64_json)) for d in r.data]
    expected = native_pixels(service, "/txt2img", 7, num_images=2, prompt="a red circle", steps=2)
    assert all(np.array_equal(a, b) for a, b in zip(images, expected))

    # default size (the model's native one), and response_format="url" served from the job API
    r = client.images.generate(prompt="a red circle", response_format="url", extra_body={"seed": 7, "steps": 2})
    assert len(r.data) == 1 and r.data[0].b64_json is None and r.size == "16x16"
    assert r.data[0].url.startswith(service.server.url + "/jobs/")
    assert np.array_equal(decode_png(httpx.get(r.data[0].url).content), expected[0])


def test_openai_edit_repaints_where_the_mask_is_transparent(service):
    client = openai_client(service.server)
    image = picture()
    mask = Image.fromarray(np.dstack([np.zeros((16, 16, 3), np.uint8), 255 - np.asarray(left_half())]), "RGBA")
    r = client.images.edit(image=("in.png", png_of(image), "image/png"), mask=("mask.png", png_of(mask), "image/png"),
                           prompt="a yellow square", n=1, size="16x16", extra_body={"seed": 3, "steps": 2})
    out = decode_png(base64.b64decode(r.data[0].b64_json))
    src = np.asarray(image)
    assert np.array_equal(out[:, 8:], src[:, 8:])  # opaque in the mask: unchanged
    assert not np.array_equal(out[:, :8], src[:, :8])  # alpha 0: repainted
    # the native inpaint job with the native mask (white = repaint) makes the same image
    native = native_pixels(service, "/inpaint", 3, prompt="a yellow square", steps=2,
                           files={"image": png_of(image), "mask": png_of(left_half())})
    assert np.array_equal(out, native[0])

    # no mask: the image's own transparent pixels are repainted
    rgba = image.convert("RGBA")
    rgba.putalpha(Image.fromarray(255 - np.asarray(left_half())))
    r = client.images.edit(image=("in.png", png_of(rgba), "image/png"), prompt="a yellow square",
                           extra_body={"seed": 3, "steps": 2})
    assert np.array_equal(decode_png(base64.b64decode(r.data[0].b64_json)), out)
    # a list of one image (sent as the multipart field image[])
    r = client.images.edit(image=[("in.png", png_of(rgba), "image/png")], prompt="a yellow square",
                           extra_body={"seed": 3, "steps": 2})
    assert np.array_equal(decode_png(base64.b64decode(r.data[0].b64_json)), out)


def test_openai_errors_have_openai_shape(service):
    def err(r, status, param, *words, code=None):
        assert r.status_code == status, r.text
        e = r.json()["error"]
        assert set(e) == {"message", "type", "param", "code"} and e["param"] == param
        assert e["type"] == "invalid_request_error" and all(w in e["message"] for w in words), e
        if code:
            assert e["code"] == code
        return e

    gen = "/v1/images/generations"
    err(service.post(gen, json={"prompt": "x", "n": 99}), 400, "n", "n must be an integer in [1, 4]", "99")
    err(service.post(gen, json={"prompt": "x", "size": "17x16"}), 400, "size", "size must be 'WIDTHxHEIGHT'", "17x16")
    err(service.post(gen, json={"prompt": "x", "size": "big"}), 400, "size", "multiples of 8")
    err(service.post(gen, json={"prompt": "x", "response_format": "gif"}), 400, "response_format", "b64_json, url")
    err(service.post(gen, json={"n": 1}), 400, "prompt", "prompt is required", code="missing_required_parameter")
    err(service.post(gen, json={"prompt": "x", "colour": "red"}), 400, "colour", "colour is not a field",
        code="unknown_parameter")
    err(service.post(gen, json={"prompt": "x", "steps": 500}), 400, "steps", "steps must be an integer in [1, 50]")
    err(service.post(gen, json={"prompt": "x", "sampler": "plms"}), 400, "sampler", "sampler must be one of ddim")

    edits = "/v1/images/edits"
    opaque = png_of(picture())
    err(service.post(edits, data={"prompt": "x"}, files={"image": opaque}), 400, "mask", "mask is required")
    err(service.post(edits, data={"prompt": "x"}, files={"image": opaque, "mask": png_of(left_half())}), 400,
        "mask", "alpha channel")
    err(service.post(edits, data={"prompt": "x"}, files={"image": b"not an image", "mask": opaque}), 400,
        "image", "not an image", code="invalid_image_format")
    err(service.post(edits, data={"prompt": "x"}, files={"mask": opaque}), 400, "image", "image is required")
    with pytest.raises(openai.BadRequestError) as e:
        openai_client(service.server).images.generate(prompt="x", n=9)
    assert e.value.param == "n" and "[1, 4]" in e.value.message


def test_openai_key_is_the_service_api_key(keyed):
    with pytest.raises(openai.AuthenticationError) as e:
        openai_client(keyed.server, "wrong").images.generate(prompt="x")
    assert e.value.status_code == 401 and e.value.code == "invalid_api_key" and "API key" in e.value.message
    r = httpx.post(keyed.server.url + "/v1/images/generations", json={"prompt": "x"})  # no key at all
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = openai_client(keyed.server).images.generate(prompt="a red circle", extra_body={"steps": 1})
    decode_png(base64.b64decode(r.data[0].b64_json))


def test_queue_full_and_timeout(tiny_weights):
    """No worker, room for one job: the web UI's request of two images takes its first job back when the
    second does not fit; OpenAI's 504 (timeout) and 429 (queue full) in OpenAI's shape."""
    settings = Settings(weights=str(tiny_weights), queue_limit=1, job_timeout=0.3)
    with Server(create_app(settings, worker=False)) as server, httpx.Client(base_url=server.url, timeout=60) as c:
        r = c.post("/sdapi/v1/txt2img", json={"prompt": "x", "n_iter": 2})
        assert r.status_code == 429 and "queue full" in r.json()["detail"]
        assert c.get("/readyz").json()["queue_depth"] == 0  # the first job was cancelled
        r = c.post("/v1/images/generations", json={"prompt": "x"})
        assert r.status_code == 504 and r.json()["error"]["type"] == "server_error"
        assert r.json()["error"]["code"] == "timeout" and "/jobs/" in r.json()["error"]["message"]
        r = c.post("/v1/images/generations", json={"prompt": "x"})
        assert r.status_code == 429 and r.headers["retry-after"] == "5"
        assert r.json()["error"]["code"] == "rate_limit_exceeded"


# -----------------------------------------------------------------------------
# AUTOMATIC1111


def webui(server) -> webuiapi.WebUIApi:
    return webuiapi.WebUIApi(host="127.0.0.1", port=server.port)


def test_webui_txt2img_seeds_and_samplers(service):
    api = webui(service.server)
    names = [s["name"] for s in api.get_samplers()]
    assert {"DDIM", "Euler", "Euler a", "DPM++ 2M", "DPM++ 2M Karras", "DDPM"} <= set(names)

    r = api.txt2img(prompt="a blue square", seed=11, steps=2, cfg_scale=5, width=16, height=16, batch_size=2,
                    n_iter=1, sampler_name="DPM++ 2M Karras")
    assert len(r.images) == 2 and all(isinstance(i, Image.Image) and i.size == (16, 16) for i in r.images)
    assert r.info["seed"] == 11 and r.info["all_seeds"] == [11, 12] and r.info["sampler_name"] == "DPM++ 2M Karras"
    assert "Seed: 12" in r.info["infotexts"][1] and r.parameters["cfg_scale"] == 5
    # image i is the native job with seed + i
    for i, seed in enumerate((11, 12)):
        native = native_pixels(service, "/txt2img", seed, prompt="a blue square", steps=2, guidance_scale=5,
                               sampler="dpmpp_2m_karras")
        assert np.array_equal(np.asarray(r.images[i].convert("RGB")), native[0])

    # the newer web UI's separate scheduler, seed -1 drawn and reported
    r2 = api.txt2img(prompt="a blue square", seed=-1, steps=2, cfg_scale=5, width=16, height=16, n_iter=2,
                     sampler_name="DPM++ 2M", scheduler="Karras")
    seed = r2.info["seed"]
    assert seed >= 0 and r2.info["all_seeds"] == [seed, seed + 1]
    assert json.loads(json.dumps(r2.info))["sampler_name"] == "DPM++ 2M Karras"


def test_webui_img2img_and_inpainting_masks(service):
    api, image = webui(service.server), picture()
    src = np.asarray(image)
    r = api.img2img(images=[image], prompt="a green circle", seed=5, steps=2, denoising_strength=0.6,
                    width=16, height=16, sampler_name="DDIM")
    assert r.info["mode"] == "img2img" and r.info["seed"] == 5 and r.images[0].size == (16, 16)
    native = native_pixels(service, "/img2img", 5, prompt="a green circle", steps=2, strength=0.6,
                           guidance_scale=7, files={"image": png_of(image)})
    assert np.array_equal(np.asarray(r.images[0].convert("RGB")), native[0])

    # mask, white = repaint: the right half comes back unchanged
    r = api.img2img(images=[image], mask_image=left_half(), prompt="a green circle", seed=5, steps=2,
                    denoising_strength=1.0, width=16, height=16, sampler_name="Euler a")
    out = np.asarray(r.images[0].convert("RGB"))
    assert r.info["mode"] == "inpaint" and np.array_equal(out[:, 8:], src[:, 8:])
    assert not np.array_equal(out[:, :8], src[:, :8])
    # inpainting_mask_invert: black = repaint, so the left half comes back unchanged
    r = api.img2img(images=[image], mask_image=left_half(), inpainting_mask_invert=1, prompt="a green circle",
                    seed=5, steps=2, denoising_strength=1.0, width=16, height=16)
    out = np.asarray(r.images[0].convert("RGB"))
    assert np.array_equal(out[:, :8], src[:, :8]) and not np.array_equal(out[:, 8:], src[:, 8:])


def test_webui_progress_and_interrupt(service):
    api, pipe = webui(service.server), service.pipe
    idle = api.get_progress()
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0
    pipe.hold(1)
    result = {}
    thread = threading.Thread(target=lambda: result.update(r=api.txt2img(
        prompt="x", seed=1, steps=4, width=16, height=16, n_iter=2)))
    thread.start()
    assert pipe.reached.wait(60)
    p = api.get_progress()
    assert p["state"]["job_count"] == 2 and p["state"]["sampling_steps"] == 4 and p["state"]["sampling_step"] >= 1
    assert 0 < p["progress"] < 1
    api.interrupt()
    pipe.release.set()
    thread.join(60)
    r = result["r"]
    assert r.images == [] and r.info["interrupted"] is True and r.info["all_seeds"] == []
    assert api.get_progress()["state"]["job_count"] == 0


def test_webui_errors_name_the_field(service):
    url = f"{service.server.url}/sdapi/v1"

    def bad(path, body, *words):
        r = httpx.post(url + path, json=body)
        assert r.status_code == 422 and all(w in r.json()["detail"] for w in words), r.text

    bad("/txt2img", {"prompt": "x", "cfg_scale": 99}, "cfg_scale must be a number in [0, 50]", "99")
    bad("/txt2img", {"prompt": "x", "steps": 500}, "steps must be an integer in [1, 50]", "500")
    bad("/txt2img", {"prompt": "x", "sampler_name": "PLMS"}, "sampler_name must be one of DDIM", "PLMS")
    bad("/txt2img", {"prompt": "x", "scheduler": "exponential"}, "scheduler must be one of automatic")
    bad("/txt2img", {"prompt": "x", "width": 20}, "width must be a multiple of 8")
    bad("/txt2img", {"prompt": "x", "batch_size": 3, "n_iter": 2}, "batch_size * n_iter must be at most 4")
    bad("/img2img", {"prompt": "x"}, "init_images is required")
    bad("/img2img", {"prompt": "x", "init_images": ["@@not base64@@"]}, "init_images[0] is not base64")
    bad("/img2img", {"prompt": "x", "init_images": [base64.b64encode(png_of(picture())).decode()],
                     "mask": base64.b64encode(png_of(left_half().resize((8, 8)))).decode()}, "mask size 8x8")
    r = httpx.post(url + "/img2img", json={"init_images": [base64.b64encode(b"text").decode()]})
    assert r.status_code == 415 and "init_images[0] is not an image" in r.json()["detail"]


def test_openapi_lists_both_layers_beside_the_native_schemas(service):
    spec = service.get("/openapi.json").json()
    assert {"/v1/images/generations", "/v1/images/edits", "/sdapi/v1/txt2img", "/sdapi/v1/img2img",
            "/sdapi/v1/samplers", "/sdapi/v1/progress", "/sdapi/v1/interrupt"} <= set(spec["paths"])
    schemas = spec["components"]["schemas"]
    assert {"Txt2ImgRequest", "OpenAIImageRequest", "WebUITxt2ImgRequest", "WebUIImg2ImgRequest"} <= set(schemas)
    assert schemas["OpenAIImageRequest"]["properties"]["n"]["description"].startswith("an integer in [1, 4]")


def test_webui_api_key_as_bearer_or_basic_password(keyed):
    api = webui(keyed.server)
    with pytest.raises(RuntimeError) as e:
        api.txt2img(prompt="x", steps=1, width=16, height=16)
    assert e.value.args[0] == 401
    api.set_auth("anyone", "wrong")
    with pytest.raises(RuntimeError):
        api.txt2img(prompt="x", steps=1, width=16, height=16)
    api.set_auth("anyone", KEY)
    assert len(api.txt2img(prompt="x", steps=1, width=16, height=16).images) == 1
    r = keyed.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1, "width": 16, "height": 16})
    assert r.status_code == 200 and len(r.json()["images"]) == 1
