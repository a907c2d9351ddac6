"""
Hostile and broken input over real HTTP: a real uvicorn server on loopback, the in-memory queue, the
in-process worker and the tiny random model. Each row of CASES sends real bytes (damaged PNGs and
JPEGs, decompression bombs built with zlib, out-of-range and non-finite numbers, wrong content types,
malformed JSON) to the native API, the OpenAI layer or the web UI layer, and expects a 4xx JSON error
in that API's shape whose message names the field and what it accepts. Then the whole table is sent
again while a normal job is held in flight: that job still answers its image (byte-equal to the same
request made afterwards) and the service stays ready. Also shown: an upload whose Content-Length is
over the limit is refused before its body is read; fields are checked before an image is opened;
what an empty prompt and an over-long prompt do (empty: allowed; up to 4000 characters: encoded whole, in
75-token chunks; longer: refused).

Rows already proven in test_service_http.py / test_compat.py (plain non-image upload, truncated PNG,
1000x1000 PNG over max_pixels, streamed body over the limit, steps/width/num_images/seed/sampler in
JSON, native and web UI mask of another size) are not repeated here; docs/reliability.md lists both.
"""

import base64
import io
import json
import socket
import struct
import threading
import zlib

import httpx
import numpy as np
import pytest
from PIL import Image

from model.pnginfo import read_parameters
from model.samplers import SAMPLERS
from service.api import create_app
from service.settings import Settings
from test_compat import HoldingPipe
from test_service_http import Server, png, upload, wait_until

MAX_PIXELS, MAX_UPLOAD = 64 * 64, 100_000
pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # the bombs are the point


# -----------------------------------------------------------------------------
# bytes


def picture(size=16, mode="RGB") -> Image.Image:
    data = np.random.default_rng(1).integers(0, 256, (size, size, 4 if mode == "RGBA" else 3), dtype=np.uint8)
    return Image.fromarray(data, mode)


def jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG")
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(width: int, height: int, rows: int) -> bytes:
    """A 1-bit greyscale PNG declaring width x height whose first `rows` rows of zeros are really there,
    zlib-compressed: `rows = height` is a complete, valid image of a few KB that decodes to width*height pixels."""
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    pixels = zlib.compressobj(9)
    data = b"".join(pixels.compress(row) for _ in range(rows)) + pixels.flush()
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")


GOOD_PNG = upload(picture())
GOOD_JPEG = jpeg(picture())
DAMAGED_PNG = GOOD_PNG[:60] + b"\xff" * 40 + GOOD_PNG[100:]           # pixel data overwritten: CRC and zlib fail
TRUNCATED_JPEG = GOOD_JPEG[:-60]                                       # header intact, scan cut short
DAMAGED_JPEG = GOOD_JPEG[:2] + b"\x00" * 40 + GOOD_JPEG[42:]           # its markers overwritten
BOMB_DECLARED = png_bomb(100_000, 100_000, rows=1)                     # 10^10 pixels declared, < 1 KB sent
BOMB_ZLIB = png_bomb(10_000, 10_000, rows=10_000)                     # a real 10^8-pixel image in ~12 KB
SMALL_MASK = upload(Image.new("L", (8, 8), 255))
RGBA = upload(picture(mode="RGBA"))
MULTIPART = "multipart/form-data; boundary=xyz"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def raw_json(text: str) -> dict:
    """A body as typed (NaN and Infinity are not JSON, but Python's parser and many clients accept them)."""
    return {"content": text.encode(), "headers": {"Content-Type": "application/json"}}


def form(image=GOOD_PNG, mask=None, **fields) -> dict:
    files = {"image": ("in.png", image, "image/png")}
    if mask is not None:
        files["mask"] = ("mask.png", mask, "image/png")
    return {"data": {"prompt": "a red circle", **fields}, "files": files}


def body(**fields) -> dict:
    return {"json": {"prompt": "a red circle", **fields}}


# -----------------------------------------------------------------------------
# the table: (id, method path, request, status, words the message must hold)
# native errors are {"detail": ...}; OpenAI's {"error": {"message", "type", "param", "code"}}

SAMPLER_LIST = ", ".join(SAMPLERS)
CASES = [
    # damaged and hostile images
    ("png-damaged", "/jobs/img2img", form(DAMAGED_PNG), 415, ["image is a damaged PNG file"]),
    ("jpeg-truncated", "/jobs/img2img", form(TRUNCATED_JPEG), 415, ["image is a damaged JPEG file"]),
    ("jpeg-damaged-header", "/jobs/img2img", form(DAMAGED_JPEG), 415, ["image is not an image this server reads"]),
    ("bomb-declared-1e10-pixels", "/jobs/img2img", form(BOMB_DECLARED), 413,
     ["image declares 10000000000 pixels", "at most 4096"]),
    ("bomb-zlib-1e8-pixels", "/img2img", form(BOMB_ZLIB), 413,
     ["image is 10000x10000 = 100000000 pixels", "at most 4096"]),
    ("mask-bomb", "/jobs/inpaint", form(RGBA, mask=BOMB_DECLARED), 413, ["mask declares 10000000000 pixels"]),
    ("mask-not-an-image", "/jobs/inpaint", form(RGBA, mask=b"GIF89a but not really"), 415, ["mask is not an image"]),
    ("fields-checked-before-the-image", "/jobs/img2img", form(BOMB_ZLIB, steps="500"), 422,
     ["steps must be an integer in [1, 50], got '500'"]),
    # sizes and counts
    ("width-over-4096", "/jobs/img2img", form(width="4104"), 422, ["width must be a multiple of 8 in [8, 4096]"]),
    ("height-not-multiple-of-8", "/jobs/txt2img", body(height=12), 422,
     ["height must be a multiple of 8 in [8, 4096]", "got 12"]),
    ("height-zero", "/jobs/txt2img", body(height=0), 422, ["height must be a multiple of 8 in [8, 4096]"]),
    ("txt2img-width-without-height", "/jobs/txt2img", body(width=4096), 422,  # 4096 x native could pass the limit
     ["width and height must be given together, or neither"]),
    ("pixels-over-limit-form", "/jobs/img2img", form(width="128", height="128"), 422,
     ["width * height must be at most 4096, got 128x128"]),
    ("steps-over-limit-form", "/jobs/inpaint", form(RGBA, steps="51"), 422,
     ["steps must be an integer in [1, 50], got '51'"]),
    ("steps-negative", "/txt2img", body(steps=-3), 422, ["steps must be an integer in [1, 50], got -3"]),
    ("steps-fraction", "/jobs/txt2img", body(steps=2.5), 422, ["steps must be an integer in [1, 50], got 2.5"]),
    ("num-images-zero", "/jobs/txt2img", body(num_images=0), 422, ["num_images must be an integer in [1, 4], got 0"]),
    ("num-images-over-form", "/jobs/img2img", form(num_images="5"), 422,
     ["num_images must be an integer in [1, 4], got '5'"]),
    # numbers that are not finite, out of range
    ("guidance-NaN-json", "/jobs/txt2img", raw_json('{"prompt": "x", "guidance_scale": NaN}'), 422,
     ["guidance_scale must be a number in [0, 50], got nan"]),
    ("guidance-Infinity-json", "/txt2img", raw_json('{"prompt": "x", "guidance_scale": Infinity}'), 422,
     ["guidance_scale must be a number in [0, 50], got inf"]),
    ("guidance-minus-Infinity-json", "/jobs/txt2img", raw_json('{"prompt": "x", "guidance_scale": -Infinity}'), 422,
     ["guidance_scale must be a number in [0, 50], got -inf"]),
    ("guidance-nan-form", "/jobs/img2img", form(guidance_scale="nan"), 422,
     ["guidance_scale must be a number in [0, 50], got 'nan'"]),
    ("guidance-negative-form", "/jobs/img2img", form(guidance_scale="-0.5"), 422,
     ["guidance_scale must be a number in [0, 50], got '-0.5'"]),
    ("strength-negative", "/jobs/img2img", form(strength="-0.1"), 422, ["strength must be a number in [0, 1], got '-0.1'"]),
    ("strength-over-1-inpaint", "/jobs/inpaint", form(RGBA, strength="1.01"), 422,
     ["strength must be a number in [0, 1], got '1.01'"]),
    ("strength-NaN", "/jobs/img2img", form(strength="NaN"), 422, ["strength must be a number in [0, 1], got 'NaN'"]),
    ("strength-Infinity", "/img2img", form(strength="Infinity"), 422, ["strength must be a number in [0, 1]"]),
    ("sampler-unknown-form", "/jobs/img2img", form(sampler="plms"), 422,
     [f"sampler must be one of {SAMPLER_LIST}, got 'plms'"]),
    # the mask: refused unless it has the image's size (native, OpenAI and web UI alike)
    ("mask-of-another-size-sync", "/inpaint", form(RGBA, mask=SMALL_MASK), 422,
     ["mask size 8x8 must equal the image size 16x16"]),
    # text
    ("prompt-10000-characters", "/jobs/txt2img", body(prompt="a" * 10_000), 422,
     ["prompt must be text of at most 4000 characters", "(10000 characters)"]),
    ("prompt-10000-characters-form", "/jobs/img2img", form(prompt="red " * 2500), 422,
     ["prompt must be text of at most 4000 characters", "(10000 characters)"]),
    ("negative-prompt-4001", "/jobs/txt2img", body(negative_prompt="b" * 4001), 422,
     ["negative_prompt must be text of at most 4000 characters"]),
    ("prompt-lone-surrogate", "/jobs/txt2img", raw_json('{"prompt": "\\ud800 circle"}'), 422,
     ["prompt must be valid Unicode text"]),
    ("prompt-not-text", "/jobs/txt2img", body(prompt=["a", "list"]), 422, ["prompt must be text of at most 4000"]),
    # content types and bodies
    ("json-to-multipart-endpoint", "/jobs/img2img", body(), 415,
     ["Content-Type must be multipart/form-data or application/x-www-form-urlencoded, got application/json"]),
    ("multipart-to-json-endpoint", "/jobs/txt2img", form(), 415,
     ["Content-Type must be application/json, got multipart/form-data"]),
    ("text-plain", "/txt2img", {"content": b'{"prompt": "x"}', "headers": {"Content-Type": "text/plain"}}, 415,
     ["Content-Type must be application/json, got text/plain"]),
    ("no-content-type", "/jobs/txt2img", {"content": b'{"prompt": "x"}'}, 415,
     ["Content-Type must be application/json, got none"]),
    ("json-malformed", "/jobs/txt2img", raw_json('{"prompt": "x",'), 422, ["the body is not valid JSON", "character"]),
    ("json-empty-body", "/txt2img", raw_json(""), 422, ["the body is required: a JSON object with the fields prompt"]),
    ("json-not-an-object", "/jobs/txt2img", {"json": ["prompt", "x"]}, 422, ["the body must be a JSON object"]),
    ("multipart-garbage", "/jobs/img2img", {"content": b"garbage", "headers": {"Content-Type": MULTIPART}}, 400,
     ["Invalid multipart data"]),
    ("multipart-no-boundary", "/jobs/inpaint",
     {"content": b"garbage", "headers": {"Content-Type": "multipart/form-data"}}, 400, ["Missing boundary"]),
    # the web UI layer: base64 images in JSON, {"detail"} errors
    ("webui-bomb", "/sdapi/v1/img2img", {"json": {"init_images": [b64(BOMB_DECLARED)]}}, 413,
     ["init_images[0] declares 10000000000 pixels"]),
    ("webui-truncated-jpeg", "/sdapi/v1/img2img", {"json": {"init_images": [b64(TRUNCATED_JPEG)]}}, 415,
     ["init_images[0] is a damaged JPEG file"]),
    ("webui-mask-not-an-image", "/sdapi/v1/img2img",
     {"json": {"init_images": [b64(GOOD_PNG)], "mask": b64(b"text")}}, 415, ["mask is not an image"]),
    ("webui-two-images", "/sdapi/v1/img2img", {"json": {"init_images": [b64(GOOD_PNG)] * 2}}, 422,
     ["init_images must be a list of one base64 image"]),
    ("webui-strength", "/sdapi/v1/img2img", {"json": {"init_images": [b64(GOOD_PNG)], "denoising_strength": 1.5}},
     422, ["denoising_strength must be a number in [0, 1], got 1.5"]),
    ("webui-cfg-NaN", "/sdapi/v1/txt2img", raw_json('{"prompt": "x", "cfg_scale": NaN}'), 422,
     ["cfg_scale must be a number in [0, 50], got nan"]),
    ("webui-malformed-json", "/sdapi/v1/txt2img", raw_json("{"), 422, ["the body is not valid JSON"]),
    ("webui-text-plain", "/sdapi/v1/img2img", {"content": b"{}", "headers": {"Content-Type": "text/plain"}}, 415,
     ["Content-Type must be application/json"]),
    # the OpenAI layer: (status, param, code) in OpenAI's error shape
    ("openai-edit-bomb", "/v1/images/edits", {"data": {"prompt": "x"}, "files": {"image": BOMB_DECLARED}},
     (400, "image", "too_large"), ["image declares 10000000000 pixels"]),
    ("openai-edit-damaged-png", "/v1/images/edits", {"data": {"prompt": "x"}, "files": {"image": DAMAGED_PNG}},
     (400, "image", "invalid_image_format"), ["image is a damaged PNG file"]),
    ("openai-edit-mask-of-another-size", "/v1/images/edits",
     {"data": {"prompt": "x"}, "files": {"image": RGBA, "mask": upload(Image.new("RGBA", (8, 8)))}},
     (400, "mask", "invalid_value"), ["mask size 8x8 must equal the image size 16x16"]),
    ("openai-edit-strength", "/v1/images/edits", {"data": {"prompt": "x", "strength": "2"}, "files": {"image": RGBA}},
     (400, "strength", "invalid_value"), ["strength must be a number in [0, 1]"]),
    ("openai-edit-as-json", "/v1/images/edits", body(), (400, None, "unsupported_content_type"),
     ["Content-Type must be multipart/form-data"]),
    ("openai-guidance-NaN", "/v1/images/generations", raw_json('{"prompt": "x", "guidance_scale": NaN}'),
     (400, "guidance_scale", "invalid_value"), ["guidance_scale must be a number in [0, 50], got nan"]),
    ("openai-prompt-10000", "/v1/images/generations", body(prompt="z" * 10_000), (400, "prompt", "invalid_value"),
     ["prompt must be text of at most 4000 characters"]),
    ("openai-malformed-json", "/v1/images/generations", raw_json('{"prompt": '), (400, None, "invalid_value"),
     ["the body is not valid JSON"]),
    ("openai-text-plain", "/v1/images/generations", {"content": b"{}", "headers": {"Content-Type": "text/plain"}},
     (400, None, "unsupported_content_type"), ["Content-Type must be application/json, got text/plain"]),
]


def check(response: httpx.Response, expected, words: list[str]) -> None:
    """The answer is the expected 4xx, JSON in its API's shape, and its message holds every word."""
    status = expected[0] if isinstance(expected, tuple) else expected
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json", response.headers
    if isinstance(expected, tuple):  # OpenAI
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
        assert (error["param"], error["code"]) == expected[1:], error
        message = error["message"]
    else:
        message = response.json()["detail"]
    assert all(w in message for w in words), (message, words)
    assert len(message) < 400  # the input is quoted, not echoed back whole


# -----------------------------------------------------------------------------
# the service




@pytest.fixture(scope="module")
def service(tiny_weights, tiny_pipe):
    pipe = HoldingPipe(tiny_pipe)
    settings = Settings(weights=str(tiny_weights), batch_window=0.01, max_pixels=MAX_PIXELS, max_steps=50,
                        max_images=4, max_upload_bytes=MAX_UPLOAD)
    with Server(create_app(settings, pipe=pipe)) as server, httpx.Client(base_url=server.url, timeout=120) as c:
        wait_until(lambda: c.get("/readyz").status_code == 200, what="the in-process worker")
        c.pipe, c.port = pipe, server.server.config.port
        yield c
        pipe.release.set()


@pytest.mark.parametrize("path, request_kw, expected, words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gets_a_clear_4xx(service, path, request_kw, expected, words):
    check(service.post(path, **request_kw), expected, words)


def test_bombs_are_what_they_claim():
    """The bombs really are bombs: small files whose header declares a huge image (the zlib one decodes)."""
    assert len(BOMB_DECLARED) < 1_000 and len(BOMB_ZLIB) < 20_000
    with Image.open(io.BytesIO(BOMB_ZLIB)) as image:
        assert image.size == (10_000, 10_000)
    with pytest.raises(Image.DecompressionBombError):  # PIL itself refuses to open the 10^10-pixel one
        Image.open(io.BytesIO(BOMB_DECLARED))


def test_defaults_respect_the_limits():
    """A field left out cannot exceed a limit either: the default steps (20) is capped by max_steps."""
    from service.schemas import request_models

    for mode, model in request_models(Settings(weights="unused", max_steps=3)).items():
        assert model(prompt="x").steps == 3, mode
    assert request_models(Settings(weights="unused"))["txt2img"](prompt="x").steps == 20


def test_oversized_upload_is_refused_before_it_is_read(service):
    """A request declaring 1 GB is answered 413 after only its headers and 1 KB of body were sent."""
    with socket.create_connection(("127.0.0.1", service.port), timeout=60) as sock:
        sock.sendall(b"POST /jobs/img2img HTTP/1.1\r\nHost: test\r\nContent-Type: " + MULTIPART.encode() +
                     b"\r\nContent-Length: 1000000000\r\n\r\n" + b"x" * 1024)
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            data = sock.recv(65536)
            if not data:
                break
            answer += data
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), answer
    assert json.loads(payload)["detail"] == f"request body is 1000000000 bytes; at most {MAX_UPLOAD} are accepted"


def test_empty_and_long_prompts(service):
    """Empty prompt: allowed (the unconditional image, as in diffusers and the web UI). A prompt of up to
    4000 characters is accepted and encoded whole, in 75-token chunks as the web UI does (model/prompts.py): two
    long prompts that share only their first 75 tokens give different images. Unicode, emoji and control
    characters are just text."""
    r = service.post("/txt2img", json={"prompt": "", "steps": 1, "seed": 9})
    assert png(r).size == (16, 16) and read_parameters(r.content).startswith("\nSteps: 1")

    long_a = ("a red circle " * 307)[:4000]
    long_b = "a red circle " * 60 + "a blue square on a green background " * 20
    images = [service.post("/txt2img", json={"prompt": p, "steps": 1, "seed": 9}) for p in (long_a, long_b)]
    assert all(png(i).size == (16, 16) for i in images)
    pixels = [np.asarray(png(i)) for i in images]
    assert not np.array_equal(pixels[0], pixels[1])  # tokens past the first 75 count (not cut, as they once were)
    short = service.post("/txt2img", json={"prompt": "a blue square", "steps": 1, "seed": 9})
    assert not np.array_equal(np.asarray(png(short)), pixels[0])  # (the prompt does change the image)

    r = service.post("/txt2img", json={"prompt": "🟥 красный круг \x00 \u202e ‮ ﷽", "steps": 1, "seed": 9})
    assert png(r).size == (16, 16) and "красный круг" in read_parameters(r.content)


def encoded(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def unusual_images() -> dict[str, bytes]:
    """Valid images in the modes and formats a client may send: each must work, not fail in the worker."""
    rgb = picture()
    frames = [picture(), Image.new("RGB", (16, 16), (255, 0, 0))]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:])
    palette = rgb.convert("P")
    palette.info["transparency"] = 0
    return {
        "png-16-bit-grey": encoded(Image.fromarray(np.arange(256, dtype=np.uint16).reshape(16, 16) * 257), "PNG"),
        "png-1-bit": encoded(rgb.convert("1"), "PNG"),
        "png-palette-transparent": encoded(palette, "PNG"),
        "png-grey-alpha": encoded(rgb.convert("LA"), "PNG"),
        "jpeg-cmyk": encoded(rgb.convert("CMYK"), "JPEG"),
        "jpeg-grey": encoded(rgb.convert("L"), "JPEG"),
        "gif-animated": gif.getvalue(),
        "webp": encoded(rgb, "WEBP"),
        "bmp": encoded(rgb, "BMP"),
        "png-17x23": encoded(picture(24).crop((0, 0, 17, 23)), "PNG"),  # not multiples of 8: rounded down
    }


@pytest.mark.parametrize("name", list(unusual_images()))
def test_unusual_valid_images_work(service, name):
    data = unusual_images()[name]
    r = service.post("/img2img", data={"prompt": "x", "steps": "1", "seed": "1"}, files={"image": ("in", data)})
    assert png(r).size == (16, 16), r.text  # (17x23 is rounded down to 16x16)
    mask = encoded(Image.open(io.BytesIO(data)).convert("1"), "PNG")  # any mode works as a mask
    r = service.post("/inpaint", data={"prompt": "x", "steps": "1", "seed": "1"},
                     files={"image": ("in", data), "mask": ("mask", mask)})
    assert png(r).size[0] == 16, r.text


def test_formats_outside_the_list_are_refused(service):
    """PIL reads dozens of formats (EPS would run Ghostscript); uploads may be PNG, JPEG, WebP, BMP, GIF only."""
    for fmt in ("TIFF", "ICO", "PPM", "TGA"):
        r = service.post("/jobs/img2img", data={"prompt": "x"}, files={"image": ("in", encoded(picture(), fmt))})
        check(r, 415, ["image is not an image this server reads (PNG, JPEG, WebP, BMP, GIF)"])


def test_service_survives_the_table_and_a_job_in_flight_is_unaffected(service):
    """A normal job is held mid-run while every bad request of the table is sent again; each still gets its
    4xx, then the job finishes with the same image it makes when run alone, and the service is still ready."""
    request = {"prompt": "a red circle", "steps": 4, "seed": 123, "sampler": "euler"}
    result = {}
    service.pipe.hold(2)
    normal = threading.Thread(target=lambda: result.update(r=service.post("/txt2img", json=request)))
    normal.start()
    assert service.pipe.reached.wait(120), "the normal job did not start"
    for name, path, request_kw, expected, words in CASES:
        check(service.post(path, **request_kw), expected, words)
    status = service.get("/readyz").json()
    assert status["status"] == "ready" and status["queue_depth"] == 1  # only the held job: nothing bad was queued
    service.pipe.release.set()
    normal.join(120)
    assert png(result["r"]).size == (16, 16)
    again = service.post("/txt2img", json=request)
    assert again.content == result["r"].content
    assert service.get("/healthz").json() == {"status": "ok"} and service.get("/readyz").status_code == 200
