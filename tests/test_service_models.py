"""
Several models on one service (service/registry.py): the default model `weights` (the project's tiny trained
model in weights/) and a models folder holding `other` (a copy of it with noise added to its UNet, so its images
differ) and `lonely` (another such copy that no worker serves). Real Redis (db 15, a random key prefix), real
uvicorn servers on loopback, real PNG bytes and the real clients (requests, webuiapi, openai). Shown here:

  - routing: one API process (no worker) and two workers in threads, one serving `weights`, one `other`;
    concurrent async jobs alternating the models each run on the worker serving their model (the job's worker
    in Redis, the PNG's `Model:` field, pixels equal to that model run alone in this process, and different
    from the other model's), batched (fewer pipeline calls than jobs); a model no worker serves is a 503 with
    Retry-After, an unknown one a 422 listing the names; /readyz and /metrics count workers per model;
  - Open WebUI's AUTOMATIC1111 call sequence replayed as it makes it (GET options, GET sd-models, POST the whole
    options dict back with the chosen title, POST txt2img with batch_size 2): two PNGs of the chosen model;
  - webuiapi: get_sd_models, util_set_model, get_options, get_loras, txt2img on the model set;
  - the openai SDK: models.list() lists the registry, images.generate(model=...) runs that model, dall-e-* the
    default, an unknown model is a BadRequestError (the face maps 422 to OpenAI's 400);
  - POST /sdapi/v1/png-info of this service's PNG and of a web UI-style PNG;
  - a checkpoint copied into the folder while the server runs is listed (and served) without a restart, also
    when a request listed the folder while the copy was under way; a broken checkpoint fails its own job only.

Images are compared with those of the model run in this process: exactly where the worker's batches are run
again as they were batched, and up to float rounding (close) against a lone run.
"""

import base64
import io
import json
import secrets
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
import redis
import requests
import torch
import webuiapi
from PIL import Image, PngImagePlugin
from safetensors.torch import load_file, save_file

from model import StableDiffusion
from model.pnginfo import parse_infotext, read_parameters
from service.api import create_app
from service.queue import RedisQueue
from service.registry import Registry
from service.settings import DEFAULT_WEIGHTS, Settings
from service.worker import Worker, load_pipeline
from test_service_http import REDIS, Server, wait_until

SIDE, STEPS = 32, 3
NATIVE = {"steps": STEPS, "width": SIDE, "height": SIDE}          # native defaults: ddim, guidance 7.5


def copy_checkpoint(dest, seed: int, scale: float = 0.2):
    """weights/ copied to `dest`, its UNet's weights moved by noise (scale x each tensor's std) so its images
    differ; config, tokenizer, VAE and text encoder as they are."""
    shutil.copytree(DEFAULT_WEIGHTS, dest, ignore=shutil.ignore_patterns("samples.png", "training_log.jsonl"))
    g = torch.Generator().manual_seed(seed)
    state = load_file(str(dest / "unet.safetensors"))
    for k, v in state.items():
        if v.is_floating_point() and v.numel() > 1:
            state[k] = (v + scale * v.float().std() * torch.randn(v.shape, generator=g)).to(v.dtype)
    save_file(state, str(dest / "unet.safetensors"), metadata={"format": "pt"})
    return dest


def pixels(data) -> np.ndarray:
    image = Image.open(io.BytesIO(data)) if isinstance(data, bytes) else data
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def close(a: np.ndarray, b: np.ndarray) -> bool:
    """The same image up to float rounding: a batch's convolutions and matmuls round differently from a lone
    run's (about 1e-6 in the UNet's and the VAE's outputs), which now and then moves a pixel by 1 of 255. Two
    models' images differ by tens."""
    return a.shape == b.shape and int(np.abs(a - b).max()) <= 2


def differ(a: np.ndarray, b: np.ndarray) -> bool:
    return int(np.abs(a - b).max()) > 8


def model_of_png(data: bytes) -> str:
    return parse_infotext(read_parameters(data))["Model"]


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    copy_checkpoint(root / "other", seed=1)
    copy_checkpoint(root / "lonely", seed=2)
    (root / "notes.txt").write_text("not a checkpoint")
    return root


@pytest.fixture(scope="module")
def refs(models_dir):
    """Each model loaded in this process: what the service's images must equal."""
    return {"weights": StableDiffusion.from_pretrained(DEFAULT_WEIGHTS),
            "other": StableDiffusion.from_pretrained(models_dir / "other"),
            "lonely": StableDiffusion.from_pretrained(models_dir / "lonely")}


def alone(refs, model, prompt, seed, negative_prompt="", sampler="ddim", guidance_scale=7.5) -> np.ndarray:
    return pixels(refs[model].txt2img(prompt, negative_prompt=negative_prompt, steps=STEPS, seed=seed, width=SIDE,
                                      height=SIDE, sampler=sampler, guidance_scale=guidance_scale)[0])


def test_the_copies_make_other_images(refs):
    a = alone(refs, "weights", "a red circle", 3)
    b = alone(refs, "other", "a red circle", 3)
    c = alone(refs, "lonely", "a red circle", 3)
    assert differ(a, b) and differ(a, c) and differ(b, c)


# -----------------------------------------------------------------------------
# 1. routing: an API process and a worker per model on Redis


class GatedPipe:
    """A worker's pipeline that records each generate call (its requests and arguments) and holds every call
    until `gate` is set (so the jobs submitted meanwhile wait in the queue, as behind a busy GPU)."""

    def __init__(self, pipe, gate: threading.Event):
        self.pipe, self.gate, self.calls = pipe, gate, []

    def __getattr__(self, name):     # native_size, name, preview_images, load_lora...: the pipeline's
        return getattr(self.pipe, name)

    @property
    def batches(self) -> list[int]:
        return [sum(r.num_images for r in requests) for requests, _ in self.calls]

    def generate(self, requests, **kw):
        self.calls.append((list(requests), {k: v for k, v in kw.items() if k not in ("callback", "on_latents")}))
        assert self.gate.wait(120), "the test never opened the gate"
        return self.pipe.generate(requests, **kw)


def metric(text: str, name: str) -> float:
    return next(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " "))


def test_routing_by_model_over_redis(models_dir, refs):
    prefix = f"test-models-{secrets.token_hex(4)}"
    base = dict(weights=str(DEFAULT_WEIGHTS), models_dir=str(models_dir), redis_url=REDIS, key_prefix=prefix,
                optimize="none", max_batch=8, batch_window=0.05)
    gate, stop = threading.Event(), threading.Event()
    workers, threads, queues = {}, [], []
    for model in ("weights", "other"):
        settings = Settings(**base, worker_models=model)
        registry = Registry.from_settings(settings)
        pipe = GatedPipe(load_pipeline(settings, registry.find(model).path), gate)
        queue = RedisQueue(REDIS, prefix=prefix)
        queues.append(queue)
        workers[model] = Worker(pipe, queue, settings, name=f"worker-{model}", registry=registry)
        threads.append(threading.Thread(target=workers[model].run, args=(stop,), daemon=True))
    for t in threads:
        t.start()
    r = redis.Redis.from_url(REDIS)
    try:
        with Server(create_app(Settings(**base), worker=False)) as server, \
                httpx.Client(base_url=server.url, timeout=120) as c:
            def both_live():
                ready = c.get("/readyz")
                models = ready.json().get("models", {})
                return ready.status_code == 200 and all(models.get(m, {}).get("workers") == 1
                                                        for m in ("weights", "other"))
            wait_until(both_live, what="both workers")

            # 8 jobs, alternating the models, 4 prompt/seed pairs each sent to both models, all at once
            asked = [(("weights", "other")[i % 2], f"a red circle {i // 2}", 100 + i // 2) for i in range(8)]

            def send(job):
                model, prompt, seed = job
                answer = c.post("/jobs/txt2img", json={"prompt": prompt, "seed": seed, "model": model, **NATIVE})
                assert answer.status_code == 202, answer.text
                return answer.json()["id"]

            with ThreadPoolExecutor(8) as pool:
                ids = list(pool.map(send, asked))
            gate.set()
            wait_until(lambda: all(c.get(f"/jobs/{i}").json()["status"] == "done" for i in ids), timeout=120,
                       what="the jobs")

            # each worker's batches run again here on its model, as they were batched: the images to expect
            made = {}
            for model, w in workers.items():
                for requests_, kw in w.pipe.calls:
                    for request, out in zip(requests_, refs[model].generate(requests_, **kw)):
                        made[(model, request.prompt, request.seed)] = pixels(out[0])
            images = {}
            for job_id, (model, prompt, seed) in zip(ids, asked):
                status = c.get(f"/jobs/{job_id}").json()
                assert status["parameters"]["model"] == model
                assert r.hget(f"{prefix}:job:{job_id}", "worker").decode() == f"worker-{model}"
                png = c.get(f"/jobs/{job_id}/image").content
                assert model_of_png(png) == model
                assert np.array_equal(pixels(png), made[(model, prompt, seed)]), (model, prompt)
                assert close(pixels(png), alone(refs, model, prompt, seed)), (model, prompt)
                images[(model, prompt)] = pixels(png)
            for i in range(4):   # the same request on the two models: two different images
                prompt = f"a red circle {i}"
                assert differ(images[("weights", prompt)], images[("other", prompt)])

            # each worker took its model's 4 jobs only, and batched them (the first call held at the gate, the
            # jobs queued behind it ran together)
            for model, w in workers.items():
                done = [i for i, (m, _, _) in zip(ids, asked) if m == model]
                print(f"\nrouting: worker-{model} ran {len(done)} jobs in {w.calls} pipeline calls, "
                      f"batch sizes {w.pipe.batches}; loaded {list(w.loaded)}")
                assert sum(w.pipe.batches) == len(done) == 4
                assert list(w.loaded) == [model]
            assert min(w.calls for w in workers.values()) < 4
            text = c.get("/metrics").text
            count, total = metric(text, "sd_batch_size_count"), metric(text, "sd_batch_size_sum")
            print(f"routing: /metrics sd_batch_size_count {count:g} sd_batch_size_sum {total:g} "
                  f"(mean batch {total / count:.2f})")
            assert total == 8 and count == sum(w.calls for w in workers.values()) < 8

            # a model of the folder no worker serves: 503 with Retry-After, for the async and the sync endpoint
            for path in ("/jobs/txt2img", "/txt2img"):
                answer = c.post(path, json={"prompt": "x", "model": "lonely", **NATIVE})
                assert answer.status_code == 503, answer.text
                assert answer.headers.get("Retry-After") and "lonely" in answer.json()["detail"]
            # an unknown model: 422 naming the models there are
            answer = c.post("/jobs/txt2img", json={"prompt": "x", "model": "nope", **NATIVE})
            assert answer.status_code == 422, answer.text
            detail = answer.json()["detail"]
            assert "nope" in detail and all(name in detail for name in ("weights", "other", "lonely"))
            assert "notes" not in detail
            # a model by its title, file name or hash is the same model
            title = c.get("/sdapi/v1/sd-models").json()
            other = next(m for m in title if m["model_name"] == "other")
            for name in (other["title"], other["hash"]):
                answer = c.post("/jobs/txt2img", json={"prompt": "by title", "seed": 1, "model": name, **NATIVE})
                assert answer.status_code == 202, answer.text
                job_id = answer.json()["id"]
                wait_until(lambda: c.get(f"/jobs/{job_id}").json()["status"] == "done", what="the job")
                assert c.get(f"/jobs/{job_id}").json()["parameters"]["model"] == "other"
                assert model_of_png(c.get(f"/jobs/{job_id}/image").content) == "other"

            # the web UI face on Redis: the server-wide option (kept in Redis) routes its jobs to other's worker
            assert c.post("/sdapi/v1/options", json={"sd_model_checkpoint": other["title"]}).status_code == 200
            assert c.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == other["title"]
            assert json.loads(r.hget(f"{prefix}:options", "sd_model_checkpoint")) == "other"
            calls = workers["other"].calls
            answer = c.post("/sdapi/v1/txt2img", json={"prompt": "a red circle 0", "seed": 100, "steps": STEPS,
                                                       "width": SIDE, "height": SIDE, "sampler_name": "DDIM",
                                                       "cfg_scale": 7.5})
            assert answer.status_code == 200, answer.text
            png = base64.b64decode(answer.json()["images"][0])
            assert model_of_png(png) == "other" and workers["other"].calls == calls + 1
            assert close(pixels(png), images[("other", "a red circle 0")])

            ready = c.get("/readyz").json()
            print(f"routing: /readyz models {ready['models']}")
            assert ready["models"] == {"weights": {"workers": 1, "loaded": 1}, "other": {"workers": 1, "loaded": 1},
                                       "lonely": {"workers": 0, "loaded": 0}}
            text = c.get("/metrics").text
            for line in ('sd_model_workers{model="other",state="workers"} 1',
                         'sd_model_workers{model="weights",state="loaded"} 1',
                         'sd_model_workers{model="lonely",state="workers"} 0'):
                assert line in text.splitlines(), line
    finally:
        gate.set()
        stop.set()
        for t in threads:
            t.join(60)
        for q in queues:
            q.close()
        keys = list(r.scan_iter(match=f"{prefix}:*"))
        if keys:
            r.delete(*keys)
        r.close()


# -----------------------------------------------------------------------------
# 2-6. the web UI and OpenAI faces on one server (in-memory queue, its own worker serving any model)


@pytest.fixture(scope="module")
def memory(models_dir, tmp_path_factory):
    loras = tmp_path_factory.mktemp("no_loras")
    settings = Settings(models_dir=str(models_dir), optimize="none", max_loaded_models=2, lora_dir=str(loras))
    with Server(create_app(settings)) as server, httpx.Client(base_url=server.url, timeout=120) as c:
        wait_until(lambda: c.get("/readyz").status_code == 200, what="the in-process worker")
        c.url, c.port = server.url, int(server.url.rsplit(":", 1)[1])
        yield c


def test_open_webui_automatic1111_sequence(memory, refs):
    """As open_webui/routers/images.py calls AUTOMATIC1111 (with `requests`): get_default_model, get_models,
    set_model_handler (GET options, and if the model differs, POST the whole dict back), then txt2img."""
    base = f"{memory.url}/sdapi/v1"
    options = requests.get(f"{base}/options").json()
    assert options["sd_model_checkpoint"].startswith("weights [")              # nothing chosen yet: the default
    models = [{"id": m["title"], "name": m["model_name"]} for m in requests.get(f"{base}/sd-models").json()]
    assert {m["name"] for m in models} >= {"weights", "other", "lonely"}
    chosen = next(m["id"] for m in models if m["name"] == "other")

    options = requests.get(f"{base}/options").json()
    if chosen != options["sd_model_checkpoint"]:
        options["sd_model_checkpoint"] = chosen
        r = requests.post(f"{base}/options", json=options)
        assert r.status_code == 200, r.text
    assert requests.get(f"{base}/options").json()["sd_model_checkpoint"] == chosen

    data = {"prompt": "a lighthouse at dusk", "batch_size": 2, "width": SIDE, "height": SIDE, "steps": STEPS,
            "negative_prompt": "blurry", "cfg_scale": 7, "sampler_name": "Euler a", "scheduler": "Automatic"}
    r = requests.post(f"{base}/txt2img", json=data)
    assert r.status_code == 200, r.text
    res = r.json()
    info = json.loads(res["info"])
    assert len(res["images"]) == 2 and info["all_seeds"] == [info["seed"], info["seed"] + 1]
    for image, seed in zip(res["images"], info["all_seeds"]):
        png = base64.b64decode(image)
        assert png.startswith(b"\x89PNG") and model_of_png(png) == "other"
        want = alone(refs, "other", data["prompt"], seed, "blurry", sampler="euler_a", guidance_scale=7)
        assert close(pixels(png), want)
        assert differ(pixels(png), alone(refs, "weights", data["prompt"], seed, "blurry",
                                                     sampler="euler_a", guidance_scale=7))
    # override_settings picks the model of one request, leaving the server-wide option as it is
    r = requests.post(f"{base}/txt2img", json={**data, "batch_size": 1, "seed": 4,
                                               "override_settings": {"sd_model_checkpoint": "weights"}})
    assert r.status_code == 200, r.text
    assert model_of_png(base64.b64decode(r.json()["images"][0])) == "weights"
    assert requests.get(f"{base}/options").json()["sd_model_checkpoint"] == chosen
    # a title the server does not have: 422 naming the models
    r = requests.post(f"{base}/options", json={"sd_model_checkpoint": "v1-5-pruned-emaonly.safetensors [6ce0161689]"})
    assert r.status_code == 422 and "other" in r.json()["detail"]


def test_webuiapi_models(memory, refs):
    api = webuiapi.WebUIApi(host="127.0.0.1", port=memory.port)
    listed = {m["model_name"]: m for m in api.get_sd_models()}
    assert set(listed) >= {"weights", "other", "lonely"}
    for name, m in listed.items():
        assert m["title"] == f"{name} [{m['hash']}]" and len(m["hash"]) == 10 and m["sha256"].startswith(m["hash"])
    assert len({m["hash"] for m in listed.values()}) == len(listed)      # the noise made other weights
    api.util_set_model("lonely")
    assert api.get_options()["sd_model_checkpoint"] == listed["lonely"]["title"]
    assert api.util_get_current_model() == listed["lonely"]["title"]
    assert api.get_loras() == []
    r = api.txt2img(prompt="a green square", seed=9, steps=STEPS, cfg_scale=7.5, width=SIDE, height=SIDE,
                    sampler_name="DDIM")
    assert close(pixels(r.image), alone(refs, "lonely", "a green square", 9))
    assert r.image.info["parameters"].endswith("Model: lonely")
    api.util_set_model("weights")
    assert api.get_options()["sd_model_checkpoint"] == listed["weights"]["title"]


def test_openai_models(memory, refs):
    client = openai.OpenAI(base_url=f"{memory.url}/v1", api_key="any", max_retries=0, timeout=120)
    ids = [m.id for m in client.models.list()]
    assert ids[0] == "weights" and set(ids) >= {"weights", "other", "lonely"}
    r = client.images.generate(model="other", prompt="a blue moon", size=f"{SIDE}x{SIDE}",
                               extra_body={"seed": 11, "steps": STEPS})
    png = base64.b64decode(r.data[0].b64_json)
    assert model_of_png(png) == "other"
    assert close(pixels(png), alone(refs, "other", "a blue moon", 11))
    r = client.images.generate(model="dall-e-3", prompt="a blue moon", size=f"{SIDE}x{SIDE}",
                               extra_body={"seed": 11, "steps": STEPS})
    png = base64.b64decode(r.data[0].b64_json)
    assert model_of_png(png) == "weights"         # OpenAI's own names: the default model
    assert close(pixels(png), alone(refs, "weights", "a blue moon", 11))
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(model="nope", prompt="a blue moon", size=f"{SIDE}x{SIDE}")
    assert e.value.status_code == 400
    message = e.value.body["message"]
    assert "nope" in message and "other" in message and "lonely" in message


def test_png_info(memory):
    r = memory.post("/txt2img", json={"prompt": "a tiny house", "negative_prompt": "fog", "seed": 21,
                                      "model": "other", **NATIVE})
    assert r.status_code == 200, r.text
    encoded = base64.b64encode(r.content).decode()
    for image in (encoded, "data:image/png;base64," + encoded):
        info = memory.post("/sdapi/v1/png-info", json={"image": image})
        assert info.status_code == 200, info.text
        p = info.json()["parameters"]
        assert p["Prompt"] == "a tiny house" and p["Negative prompt"] == "fog"
        assert (p["Steps"], p["Seed"], p["Model"], p["Size"], p["Sampler"]) == ("3", "21", "other", "32x32", "ddim")
        assert info.json()["info"] == read_parameters(r.content)

    text = ("a cat\nNegative prompt: ugly\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 42, Size: 512x512, "
            "Model hash: abc123, Model: v1-5")
    meta = PngImagePlugin.PngInfo()
    meta.add_text("parameters", text)
    meta.add_text("Software", "stable-diffusion-webui")
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "white").save(buf, format="PNG", pnginfo=meta)
    info = memory.post("/sdapi/v1/png-info", json={"image": base64.b64encode(buf.getvalue()).decode()})
    assert info.status_code == 200, info.text
    assert info.json() == {"info": text, "items": {"Software": "stable-diffusion-webui"},
                           "parameters": {"Prompt": "a cat", "Negative prompt": "ugly", "Steps": "20",
                                          "Sampler": "Euler a", "CFG scale": "7", "Seed": "42", "Size": "512x512",
                                          "Model hash": "abc123", "Model": "v1-5"}}
    # a PNG with no parameters chunk, and something that is not an image
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    info = memory.post("/sdapi/v1/png-info", json={"image": base64.b64encode(buf.getvalue()).decode()})
    assert info.status_code == 200 and info.json() == {"info": "", "items": {}, "parameters": {}}
    assert memory.post("/sdapi/v1/png-info", json={"image": base64.b64encode(b"no png").decode()}).status_code == 415


def test_a_checkpoint_copied_in_is_listed_and_served(memory, models_dir, refs):
    def names():
        return ({m["model_name"] for m in memory.get("/sdapi/v1/sd-models").json()},
                {m["id"] for m in memory.get("/v1/models").json()["data"]})

    assert all("fresh" not in n for n in names())
    fresh = models_dir / "fresh"
    shutil.copytree(models_dir / "other", fresh)        # the folder's mtime changes: listed without a refresh
    try:
        assert all("fresh" in n for n in names())
        r = memory.post("/sdapi/v1/txt2img", json={"prompt": "a fresh start", "seed": 2, "steps": STEPS,
                                                   "width": SIDE, "height": SIDE, "sampler_name": "DDIM",
                                                   "cfg_scale": 7.5,
                                                   "override_settings": {"sd_model_checkpoint": "fresh"}})
        assert r.status_code == 200, r.text
        png = base64.b64decode(r.json()["images"][0])
        assert model_of_png(png) == "fresh"
        assert close(pixels(png), alone(refs, "other", "a fresh start", 2))   # (a copy of other)

        # POST refresh-checkpoints lists the folder again (webuiapi's refresh_checkpoints)
        later = models_dir / "later.safetensors"
        shutil.copy(models_dir / "other" / "unet.safetensors", later)
        assert memory.post("/sdapi/v1/refresh-checkpoints").status_code == 200
        listed = {m["model_name"]: m for m in memory.get("/sdapi/v1/sd-models").json()}
        assert "later" in listed and listed["later"]["filename"] == str(later)
        assert "later" in {m["id"] for m in memory.get("/v1/models").json()["data"]}
    finally:
        shutil.rmtree(fresh)
        (models_dir / "later.safetensors").unlink(missing_ok=True)
    assert all("fresh" not in n and "later" not in n for n in names())


def test_a_folder_checkpoint_listed_while_it_was_being_copied_is_listed_once_complete(memory, models_dir):
    """`cp -r other copied` (shutil.copytree, a download) makes the folder first, then fills it: a request that
    lists the models folder in between (any job submission does: registry.find) sees a folder that is not a
    checkpoint yet. Once the copy is complete, the checkpoint must be listed without POST refresh-checkpoints,
    as the registry promises for "a checkpoint copied in"."""
    copied = models_dir / "copied"
    copied.mkdir()                                       # the copy has begun: the folder is there, empty
    try:
        assert "copied" not in {m["model_name"] for m in memory.get("/sdapi/v1/sd-models").json()}
        for file in (models_dir / "other").iterdir():    # ... and ends (the models folder's mtime is unchanged)
            shutil.copy(file, copied / file.name)
        assert "copied" in {m["model_name"] for m in memory.get("/sdapi/v1/sd-models").json()}, \
            "a folder checkpoint filled after a listing stays unlisted until POST /sdapi/v1/refresh-checkpoints"
    finally:
        shutil.rmtree(copied)


def test_a_broken_checkpoint_fails_its_job_and_the_worker_serves_on(memory, models_dir, refs):
    broken = models_dir / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file at all")
    try:
        r = memory.post("/txt2img", json={"prompt": "x", "seed": 1, "model": "broken", **NATIVE})
        assert r.status_code == 500, r.text
        assert "broken" in r.json()["detail"] and "failed to load" in r.json()["detail"]
        r = memory.post("/txt2img", json={"prompt": "after", "seed": 3, "model": "other", **NATIVE})
        assert r.status_code == 200, r.text
        assert model_of_png(r.content) == "other" and close(pixels(r.content), alone(refs, "other", "after", 3))
        assert memory.get("/readyz").status_code == 200
    finally:
        broken.unlink()
