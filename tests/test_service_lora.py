"""
LoRAs through the service (service/loras.py): a real uvicorn server on loopback, the real local Redis (db 15, a
random key prefix) and a real worker (a thread of this process, on its own Redis connection), serving a folder
of random kohya LoRAs written for the tiny model. Shown here:

  - a LoRA through each face: the native API's loras field (JSON and multipart) and a <lora:NAME:W> tag,
    OpenAI's prompt, the web UI's prompt; each image equals pipe.txt2img / img2img(..., the same prompt and
    loras) in this process, and its PNG records the LoRA's weight and short hash ("Lora hashes");
  - GET /sdapi/v1/loras (webuiapi's get_loras), POST /sdapi/v1/refresh-loras, GET /sdapi/v1/embeddings;
  - jobs with different LoRAs run as ONE batch, and a job whose LoRA is a pickle that would run code fails
    alone (nothing unpickled: no marker file), its batch-mates done, the worker serving on;
  - an unknown name is a 422 (OpenAI: 400) naming it and the close names, before anything is queued; a LoRA of
    the wrong shape is a 422 from the worker's load error;
  - the worker's cache: loaded on first use, least recently used out past SD_LORA_CACHE_MB, again when the
    file changes.
"""

import base64
import hashlib
import io
import json
import os
import secrets
import threading

import httpx
import numpy as np
import openai
import pytest
import redis
import torch
import webuiapi
from PIL import Image
from safetensors.torch import load_file, save_file

from model import StableDiffusion
from model.pnginfo import read_parameters
from service import loras
from service.api import create_app
from service.queue import RedisQueue
from service.settings import Settings
from service.worker import Worker
from test_service_http import REDIS, Server, wait_until

PROMPT = "a red circle"
FIELDS = {"steps": 3, "seed": 5, "width": 16, "height": 16}   # the native defaults: ddim, guidance 7.5


class RunsCode:
    """Unpickling this would call os.system, which writes the marker file (as in tests/test_weights.py)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def kohya_lora(file, pipe, seed, text_encoder=True, metadata=None):
    """A random kohya LoRA (rank 4, alpha 2) on the tiny model's attention, MLP and resnet layers, named as
    sd-scripts names them (tests/test_lora.py's kohya_lora, for this project's own networks)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    networks = {"lora_unet": pipe.unet, **({"lora_te_text_model": pipe.text_encoder} if text_encoder else {})}
    for prefix, net in networks.items():
        for path, m in net.named_modules():
            if not any(part in path for part in ("attn", "ff.net", "proj_in", "proj_out", "resnets", "mlp")):
                continue
            if hasattr(m, "in_features"):
                down, up = (4, m.in_features), (m.out_features, 4)
            elif hasattr(m, "kernel_size") and hasattr(m, "in_channels"):
                down, up = (4, m.in_channels, *m.kernel_size), (m.out_channels, 4, 1, 1)
            else:
                continue
            name = f"{prefix}_{path.replace('.', '_')}"
            state[f"{name}.lora_down.weight"] = torch.randn(down, generator=g) * 0.3
            state[f"{name}.lora_up.weight"] = torch.randn(up, generator=g) * 0.3
            state[f"{name}.alpha"] = torch.tensor(2.0)
    save_file(state, str(file), metadata=metadata)
    return file


def short_hash(file) -> str:
    return hashlib.sha256(file.read_bytes()).hexdigest()[:12]


class RecordingPipe:
    """The worker's pipeline, recording each generate call's requests (prompt, loras); hold(step) makes the next
    batch wait at that step until release is set."""

    def __init__(self, pipe):
        self.pipe, self.batches, self.hold_at = pipe, [], None
        self.reached, self.release = threading.Event(), threading.Event()

    def __getattr__(self, name):     # native_size, name, load_lora, adapters: the pipeline's
        return getattr(self.pipe, name)

    def hold(self, step):
        self.hold_at = step
        self.reached.clear(), self.release.clear()

    def generate(self, requests, callback=None, **kw):
        self.batches.append([(r.prompt, r.loras) for r in requests])

        def cb(step, total):
            callback(step, total)
            if step == self.hold_at:
                self.hold_at = None
                self.reached.set()
                assert self.release.wait(60)

        return self.pipe.generate(requests, callback=cb, **kw)


def pixels(data) -> np.ndarray:
    image = Image.open(io.BytesIO(data)) if isinstance(data, bytes) else data
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def png_of(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_weights):
    """The LoRA folder (ink: UNet + text encoder, paper: UNet only, wide: ink for a model twice as wide, evil: a
    pickle that runs code, notes.txt: not a LoRA file) and an embeddings folder (style: a web UI embedding)."""
    root = tmp_path_factory.mktemp("service_lora")
    shapes = StableDiffusion.from_pretrained(tiny_weights)
    lora_dir, embeddings = root / "loras", root / "embeddings"
    lora_dir.mkdir(), embeddings.mkdir()
    ink = kohya_lora(lora_dir / "ink.safetensors", shapes, 0, metadata={"ss_output_name": "ink", "ss_network_dim": "4"})
    kohya_lora(lora_dir / "paper.safetensors", shapes, 1, text_encoder=False)
    wide = {k: torch.cat([v, v], dim=1) if k.endswith("lora_down.weight") else v for k, v in load_file(ink).items()}
    save_file(wide, str(lora_dir / "wide.safetensors"))
    torch.save({"lora_unet_x.lora_down.weight": RunsCode(root / "PWNED")}, lora_dir / "evil.pt")
    (lora_dir / "notes.txt").write_text("not a LoRA")
    width = shapes.text_encoder.config.hidden_size    # the web UI's .pt: two vectors for the word "style"
    torch.save({"string_to_param": {"*": torch.randn(2, width, generator=torch.Generator().manual_seed(9))},
                "name": "style", "step": 500}, embeddings / "style.pt")
    (embeddings / "readme.md").write_text("not an embedding")
    return lora_dir, embeddings, root / "PWNED"


@pytest.fixture(scope="module")
def ref(tiny_weights, folders):
    """The same model in this process, with ink and paper loaded: what each image must equal."""
    pipe = StableDiffusion.from_pretrained(tiny_weights)
    for name in ("ink", "paper"):
        pipe.load_lora(folders[0] / f"{name}.safetensors")
    return pipe


@pytest.fixture(scope="module")
def service(tiny_weights, folders):
    """API on Redis + one worker thread serving a fresh copy of the tiny model."""
    prefix = f"test-lora-{secrets.token_hex(4)}"
    settings = Settings(weights=str(tiny_weights), redis_url=REDIS, key_prefix=prefix, max_batch=8,
                        batch_window=0.05, lora_dir=str(folders[0]), embeddings_dir=str(folders[1]))
    pipe = RecordingPipe(StableDiffusion.from_pretrained(tiny_weights))
    queue = RedisQueue(REDIS, prefix=prefix)
    worker = Worker(pipe, queue, settings, name="lora-worker")
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    r = redis.Redis.from_url(REDIS)
    with Server(create_app(settings)) as server, httpx.Client(base_url=server.url, timeout=120) as c:
        wait_until(lambda: c.get("/readyz").status_code == 200, what="the worker")
        c.server, c.pipe, c.worker = server, pipe, worker
        c.port = int(server.url.rsplit(":", 1)[1])
        yield c
        stop.set()
        pipe.release.set()
        thread.join(60)
    queue.close()
    keys = list(r.scan_iter(match=f"{prefix}:*"))
    if keys:
        r.delete(*keys)
    r.close()


def alone(ref, prompt, loras=None, **kw) -> np.ndarray:
    args = {**FIELDS, **kw}
    return pixels(ref.txt2img(prompt, loras=loras, sampler="ddim", guidance_scale=7.5, **args)[0])


# -----------------------------------------------------------------------------
# each face


def test_native_loras_field_and_tag(service, ref, folders):
    r = service.post("/txt2img", json={"prompt": PROMPT, "loras": [{"name": "ink", "scale": 0.8}], **FIELDS})
    assert r.status_code == 200, r.text
    assert np.array_equal(pixels(r.content), alone(ref, PROMPT, {"ink": 0.8}))
    assert not np.array_equal(pixels(r.content), alone(ref, PROMPT))          # the LoRA changes the image
    text = read_parameters(r.content)
    ink_hash = short_hash(folders[0] / "ink.safetensors")
    assert text.startswith(f"{PROMPT} <lora:ink:0.8>\n") and f'Lora hashes: "ink: {ink_hash}"' in text

    tagged = f"<lora:ink:0.5> {PROMPT}, <lora:paper:0.7>"
    r = service.post("/txt2img", json={"prompt": tagged, **FIELDS})
    assert r.status_code == 200, r.text
    assert np.array_equal(pixels(r.content), alone(ref, tagged))
    assert np.array_equal(pixels(r.content), alone(ref, f" {PROMPT}, ", {"ink": 0.5, "paper": 0.7}))
    text = read_parameters(r.content)
    assert text.startswith(tagged + "\n") and '"ink: ' in text and ", paper: " in text

    # a tag adds to the field's weight of its name; the job's parameters keep the field
    job = service.post("/jobs/txt2img", json={"prompt": f"<lora:ink:0.3> {PROMPT}", **FIELDS,
                                              "loras": [{"name": "ink", "scale": 0.5}]}).json()
    wait_until(lambda: service.get(f"/jobs/{job['id']}").json()["status"] == "done", what="the job")
    status = service.get(f"/jobs/{job['id']}").json()
    assert status["parameters"]["loras"] == [{"name": "ink", "scale": 0.5}]
    png = service.get(f"/jobs/{job['id']}/image").content
    assert np.array_equal(pixels(png), alone(ref, f" {PROMPT}", {"ink": 0.8}))

    # multipart: the loras field is JSON text
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8), "RGB")
    r = service.post("/img2img", files={"image": ("in.png", png_of(image), "image/png")},
                     data={"prompt": PROMPT, "steps": 3, "seed": 5, "strength": 0.6,
                           "loras": json.dumps([{"name": "paper", "scale": 0.9}])})
    assert r.status_code == 200, r.text
    want = ref.img2img(image, PROMPT, strength=0.6, steps=3, seed=5, sampler="ddim", loras={"paper": 0.9})[0]
    assert np.array_equal(pixels(r.content), pixels(want))


def test_openai_prompt_tag(service, ref):
    client = openai.OpenAI(base_url=f"{service.server.url}/v1", api_key="any", max_retries=0, timeout=120)
    prompt = f"{PROMPT} <lora:paper:0.7>"
    r = client.images.generate(prompt=prompt, size="16x16", extra_body={"seed": 5, "steps": 3})
    assert np.array_equal(pixels(base64.b64decode(r.data[0].b64_json)), alone(ref, prompt))
    # the native loras field as an extension
    r = client.images.generate(prompt=PROMPT, size="16x16",
                               extra_body={"seed": 5, "steps": 3, "loras": [{"name": "paper", "scale": 0.7}]})
    assert np.array_equal(pixels(base64.b64decode(r.data[0].b64_json)), alone(ref, PROMPT, {"paper": 0.7}))


def test_webui_prompt_tag_and_listings(service, ref, folders):
    api = webuiapi.WebUIApi(host="127.0.0.1", port=service.port)
    listed = {entry["name"]: entry for entry in api.get_loras()}
    assert set(listed) == {"evil", "ink", "paper", "wide"}                   # (notes.txt is not a LoRA file)
    assert listed["ink"] == {"name": "ink", "alias": "ink", "path": str(folders[0] / "ink.safetensors"),
                             "metadata": {"ss_output_name": "ink", "ss_network_dim": "4"}}
    assert listed["evil"]["metadata"] == {}
    assert api.get_embeddings() == {"loaded": {"style": {"step": None, "sd_checkpoint": None,
                                                         "sd_checkpoint_name": None, "shape": None,
                                                         "vectors": None}}, "skipped": {}}

    prompt = f"<lora:ink:1> {PROMPT}"
    r = api.txt2img(prompt=prompt, seed=5, steps=3, cfg_scale=7.5, width=16, height=16, sampler_name="DDIM")
    assert np.array_equal(pixels(r.image), alone(ref, prompt))
    assert r.info["prompt"] == prompt


def test_refresh_loras_picks_up_a_new_file(service, ref, folders):
    api = webuiapi.WebUIApi(host="127.0.0.1", port=service.port)
    fresh = folders[0] / "fresh.safetensors"
    fresh.write_bytes((folders[0] / "paper.safetensors").read_bytes())
    try:
        assert service.post("/sdapi/v1/refresh-loras").json() is None
        assert "fresh" in {entry["name"] for entry in api.get_loras()}
        r = service.post("/txt2img", json={"prompt": f"<lora:fresh:0.7> {PROMPT}", **FIELDS})
        assert r.status_code == 200, r.text
        assert np.array_equal(pixels(r.content), alone(ref, f" {PROMPT}", {"paper": 0.7}))   # (the same file)
    finally:
        fresh.unlink()
        service.post("/sdapi/v1/refresh-loras")
    assert "fresh" not in {entry["name"] for entry in api.get_loras()}


# -----------------------------------------------------------------------------
# batching, and a bad LoRA failing alone


def test_different_loras_share_a_batch_and_a_bad_one_fails_alone(service, ref, folders):
    pipe, marker = service.pipe, folders[2]
    pipe.hold(1)
    blocker = service.post("/jobs/txt2img", json={"prompt": "hold", **FIELDS}).json()
    assert pipe.reached.wait(60)
    bodies = [{"prompt": PROMPT, "loras": [{"name": "ink", "scale": 0.8}], **FIELDS, "seed": 11},
              {"prompt": "<lora:paper:0.6> a blue square", **FIELDS, "seed": 12},
              {"prompt": f"<lora:evil:1> {PROMPT}", **FIELDS, "seed": 13},
              {"prompt": "a yellow triangle", **FIELDS, "seed": 14}]
    ids = [service.post("/jobs/txt2img", json=b).json()["id"] for b in bodies]   # queued behind the blocker
    pipe.release.set()

    def ended():
        return all(service.get(f"/jobs/{i}").json()["status"] in ("done", "failed") for i in ids + [blocker["id"]])
    wait_until(ended, what="the jobs")
    states = [service.get(f"/jobs/{i}").json() for i in ids]
    assert [s["status"] for s in states] == ["done", "done", "failed", "done"], states
    assert "evil" in states[2]["error"] and "refused to unpickle" in states[2]["error"], states[2]["error"]
    assert states[2]["attempts"] == 1 and not marker.exists()
    # one pipeline call ran the three good jobs, each with its own LoRAs (the tag is left to the pipeline)
    assert pipe.batches[-1] == [(PROMPT, {"ink": 0.8}), ("<lora:paper:0.6> a blue square", None),
                                ("a yellow triangle", None)]
    for i, job_loras in ((0, {"ink": 0.8}), (1, None), (3, None)):
        prompt = bodies[i]["prompt"]
        got = pixels(service.get(f"/jobs/{ids[i]}/image").content)
        want = alone(ref, prompt, job_loras, seed=bodies[i]["seed"])
        assert np.abs(got - want).max() <= 1, i                                # (test_lora.py's mixed-batch bound)
    # and the sync endpoint answers the refusal as the request's fault; the worker serves on
    r = service.post("/txt2img", json={"prompt": f"<lora:evil:1> {PROMPT}", **FIELDS})
    assert r.status_code == 422 and "refused to unpickle" in r.json()["detail"] and not marker.exists()
    assert service.post("/txt2img", json={"prompt": PROMPT, **FIELDS}).status_code == 200


def test_wrong_shape_is_a_422_from_the_worker(service):
    r = service.post("/txt2img", json={"prompt": PROMPT, "loras": [{"name": "wide"}], **FIELDS})
    assert r.status_code == 422, r.text
    assert "LoRA 'wide'" in r.json()["detail"] and "shapes that do not fit" in r.json()["detail"]
    assert "wide" not in service.worker.lora_cache.loaded
    r = service.post("/sdapi/v1/txt2img", json={"prompt": f"<lora:wide:0.5> {PROMPT}", "steps": 3, "width": 16,
                                                "height": 16})
    assert r.status_code == 422 and "shapes that do not fit" in r.json()["detail"]


# -----------------------------------------------------------------------------
# unknown names: 422 at the API


def test_unknown_names_are_422_naming_them_and_close_names(service):
    before = len(service.pipe.batches)
    r = service.post("/txt2img", json={"prompt": PROMPT, "loras": [{"name": "inc", "scale": 1}], **FIELDS})
    assert r.status_code == 422 and r.json()["detail"] == "loras: unknown LoRA 'inc' (close names: ink)"
    r = service.post("/jobs/txt2img", json={"prompt": f"<lora:papr:1> {PROMPT}", **FIELDS})
    assert r.status_code == 422 and r.json()["detail"] == "prompt: unknown LoRA 'papr' (close names: paper)"
    r = service.post("/sdapi/v1/txt2img", json={"prompt": "<lora:zzzzzz:1> x", "steps": 3})
    assert r.status_code == 422
    assert r.json()["detail"] == "prompt: unknown LoRA 'zzzzzz' (4 LoRAs served, none close; GET /sdapi/v1/loras " \
                                 "lists them)"
    client = openai.OpenAI(base_url=f"{service.server.url}/v1", api_key="any", max_retries=0, timeout=120)
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(prompt="<lora:Ink:1> x", size="16x16")
    assert e.value.body["param"] == "prompt" and "unknown LoRA 'Ink' (close names: ink)" in e.value.body["message"]
    # a weight out of range, a tag the pipeline refuses
    r = service.post("/txt2img", json={"prompt": PROMPT, "loras": [{"name": "ink", "scale": 11}], **FIELDS})
    assert r.status_code == 422 and r.json()["detail"].startswith("loras must be a list of at most 16 {name, scale}")
    r = service.post("/txt2img", json={"prompt": f"<lora:ink:8> {PROMPT}", "loras": [{"name": "ink", "scale": 3}],
                                       **FIELDS})
    assert r.status_code == 422 and "weight of LoRA 'ink' must be a number in [-10, 10]" in r.json()["detail"]
    r = service.post("/txt2img", json={"prompt": f"<lora:ink:1:0.5> {PROMPT}", **FIELDS})
    assert r.status_code == 422 and "separate text-encoder" in r.json()["detail"]
    # prompt syntax the pipeline would refuse, in either prompt
    r = service.post("/txt2img", json={"prompt": "a (red:1.2.3) circle", **FIELDS})
    assert r.status_code == 422 and r.json()["detail"].startswith("prompt: bad weight '1.2.3'")
    r = service.post("/sdapi/v1/txt2img", json={"prompt": "x", "negative_prompt": "(dull:1..5)", "steps": 3})
    assert r.status_code == 422 and r.json()["detail"].startswith("negative_prompt: bad weight")
    # the negative prompt's tags are text (the pipeline's rule), not checked
    r = service.post("/txt2img", json={"prompt": PROMPT, "negative_prompt": "<lora:nope:1>", **FIELDS})
    assert r.status_code == 200
    assert len(service.pipe.batches) == before + 1          # nothing else reached the worker


def test_without_a_lora_folder_every_lora_is_422():
    settings = Settings(weights="unused", job_timeout=1)
    with Server(create_app(settings, worker=False)) as server, httpx.Client(base_url=server.url) as c:
        r = c.post("/txt2img", json={"prompt": "<lora:ink:1> x"})
        assert r.status_code == 422
        assert r.json()["detail"] == "prompt: unknown LoRA 'ink': this server serves no LoRAs (SD_LORA_DIR is not set)"
        assert c.get("/sdapi/v1/loras").json() == []
        assert c.get("/sdapi/v1/embeddings").json() == {"loaded": {}, "skipped": {}}


# -----------------------------------------------------------------------------
# the worker's cache


def test_cache_loads_on_first_use_keeps_the_budget_and_reloads_changed_files(tiny_weights, folders, tmp_path):
    for name in ("ink", "paper"):
        (tmp_path / f"{name}.safetensors").write_bytes((folders[0] / f"{name}.safetensors").read_bytes())
    pipe = StableDiffusion.from_pretrained(tiny_weights)
    folder = loras.Folder(tmp_path, loras.LORA_SUFFIXES)
    probe = loras.Cache(pipe, folder, 1 << 40)
    probe.ensure({"ink", "paper"})
    ink, paper = (probe.loaded[n][1] for n in ("ink", "paper"))
    assert ink > paper > 0                            # (ink also adapts the text encoder)
    for name in ("ink", "paper"):
        pipe.adapters.loras.pop(name)

    cache = loras.Cache(pipe, folder, ink + paper - 1)   # room for one of them, not both
    cache.ensure({"ink"})
    cache.ensure({"ink"})
    assert cache.loads == 1 and set(pipe.adapters.loras) == {"ink"}
    cache.ensure({"paper"})                           # ink, least recently used, goes
    assert cache.loads == 2 and set(pipe.adapters.loras) == {"paper"} and cache.used == paper
    cache.ensure({"ink"}, keep={"paper"})             # a batch using both keeps both, over the budget
    assert set(pipe.adapters.loras) == {"ink", "paper"}
    cache.ensure({"paper"})                           # back within it: ink goes
    assert set(pipe.adapters.loras) == {"paper"} and cache.loads == 3

    before = pipe.adapters.loras["paper"].sha256
    kohya_lora(tmp_path / "paper.safetensors", pipe, 7, text_encoder=False)     # the file changes
    st = (tmp_path / "paper.safetensors").stat()
    os.utime(tmp_path / "paper.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    cache.ensure({"paper"})
    assert cache.loads == 4 and pipe.adapters.loras["paper"].sha256 != before
    with pytest.raises(loras.LoraError, match="unknown LoRA 'pape' .close names: paper"):
        cache.ensure({"pape"})


def test_an_embedding_of_the_folder_in_a_prompt(service, tiny_weights, folders):
    """The worker loads the embeddings folder: its names stand for their vectors in any face's prompt."""
    want = StableDiffusion.from_pretrained(tiny_weights)
    want.load_embedding(folders[1] / "style.pt")
    prompt = f"{PROMPT}, style"
    r = service.post("/txt2img", json={"prompt": prompt, **FIELDS})
    assert r.status_code == 200, r.text
    assert np.array_equal(pixels(r.content), alone(want, prompt))
    plain = StableDiffusion.from_pretrained(tiny_weights)                   # without it, "style" is a word
    assert not np.array_equal(pixels(r.content), alone(plain, prompt))
    api = webuiapi.WebUIApi(host="127.0.0.1", port=service.port)
    r = api.txt2img(prompt=prompt, seed=5, steps=3, cfg_scale=7.5, width=16, height=16, sampler_name="DDIM")
    assert np.array_equal(pixels(r.image), alone(want, prompt))
