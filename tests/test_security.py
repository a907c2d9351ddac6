"""
API keys and job ownership over real HTTP (uvicorn on loopback; the ownership tests run on the real
local Redis, db 15 under a random key prefix, with a worker thread and the tiny random model).

Shown here: with SD_API_KEYS set, every route of the app except health, metrics, docs and the web
page's own files answers 401 without a valid key, whatever the body (routes are enumerated from the
app, so a new one cannot be forgotten, and a path no route serves is closed too); keys are compared with hmac.compare_digest on
equal-length digests, every key every time; job ids carry 128 bits from `secrets`; one key cannot
read, fetch the images of, cancel, follow the progress of or interrupt another key's jobs (404, the
answer for an unknown id, so ids leak nothing); a job stores the sha256 of its key, never the key.
A pickle that would run code is refused when weights load: tests/test_weights.py
(test_pickle_that_runs_code_is_refused).
"""

import base64
import hashlib
import hmac
import re
import secrets
import threading

import httpx
import pytest
import redis
from fastapi.routing import APIRoute
from starlette.routing import Mount, Route

from service.api import OPEN_PATHS, create_app
from service.queue import RedisQueue, new_job_id
from service.settings import Settings
from service.worker import Worker
from test_compat import HoldingPipe
from test_service_http import REDIS, Server, png, wait_until

KEY_A, KEY_B = "key-a-" + secrets.token_hex(8), "key-b-" + secrets.token_hex(8)
OPEN = {"/healthz", "/readyz", "/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc", "/"}


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def basic(password: str) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"user:{password}".encode()).decode()}


def keyed_app(**kw):
    return create_app(Settings(weights="unused", api_keys=(KEY_A, KEY_B), **kw), worker=False)


def routes(app) -> list[tuple[str, str]]:
    """(method, path) of every route the app serves, path parameters filled in: the OpenAPI schema's
    operations, and the app's own routes and mounts outside the schema (docs, the web page)."""
    found = {(m.upper(), p) for p, ops in app.openapi()["paths"].items() for m in ops}
    for route in app.routes:
        if isinstance(route, Mount):
            found.add(("GET", route.path + "/app.js"))
        elif isinstance(route, (APIRoute, Route)):
            found |= {(m, route.path) for m in route.methods - {"HEAD"}}
    fill = lambda p: re.sub(r"\{[^}]+\}", "0", p.replace("{job_id}", "x" * 22))  # noqa: E731
    return sorted((m, fill(p)) for m, p in found)


def is_open(path: str) -> bool:
    return path in OPEN or path.startswith("/ui/")


# -----------------------------------------------------------------------------
# 401 everywhere but health, metrics, docs and the web page


def test_every_route_but_health_and_docs_needs_a_key():
    app = keyed_app()
    protected = [(m, p) for m, p in routes(app) if not is_open(p)]
    # the enumeration found the native, OpenAI and web UI routes (it is not vacuous)
    paths = {p for _, p in protected}
    assert {"/txt2img", "/img2img", "/inpaint", "/jobs/txt2img", "/jobs/" + "x" * 22, "/jobs/" + "x" * 22 + "/image/0",
            "/v1/images/generations", "/v1/images/edits", "/sdapi/v1/img2img", "/sdapi/v1/samplers",
            "/sdapi/v1/progress", "/sdapi/v1/interrupt"} <= paths
    assert set(OPEN_PATHS) == OPEN and {"/healthz", "/readyz", "/metrics"} <= {p for _, p in routes(app)}
    wrong = [{}, bearer("nope"), bearer(KEY_A + "x"), bearer(KEY_A[:-1]), {"X-API-Key": "nope"}, basic("nope"),
             {"Authorization": "Basic !!not base64!!"}, {"Authorization": KEY_A}]  # (no "Bearer ")
    with Server(app) as s, httpx.Client(base_url=s.url, timeout=30) as c:
        for method, path in protected + [("GET", "/no/such/route"), ("POST", "/jobs/txt2img/extra")]:
            for headers in wrong:
                # a body that would be a 422 or 415: the key is checked first, before the body is read
                r = c.request(method, path, headers={**headers, "Content-Type": "application/json"}, content=b"{")
                assert r.status_code == 401, (method, path, headers, r.text)
                assert r.headers["www-authenticate"] == "Bearer"
                if path.startswith("/v1/"):
                    assert r.json()["error"]["code"] == "invalid_api_key", r.text
                else:
                    assert r.json() == {"detail": "missing or invalid API key (send Authorization: Bearer KEY)"}
            # with a valid key (any of the three ways) the same request gets past the key check
            for headers in (bearer(KEY_B), {"X-API-Key": KEY_A}) + ((basic(KEY_B),) if "/sdapi/" in path else ()):
                r = c.request(method, path, headers={**headers, "Content-Type": "application/json"}, content=b"{")
                assert r.status_code != 401, (method, path, r.text)
        # open without a key: liveness, readiness, metrics (counts only: no prompts, ids or keys), the docs
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 503  # no worker here
        metrics = c.get("/metrics")
        assert metrics.status_code == 200 and KEY_A not in metrics.text and "x" * 22 not in metrics.text
        assert 'path="unmatched",status="401"' in metrics.text  # 401s are counted, under no path of the caller's
        assert c.get("/openapi.json").status_code == 200 and c.get("/docs").status_code == 200
        assert c.get("/redoc").status_code == 200
        assert all(c.get(p).status_code != 401 for m, p in routes(app) if is_open(p) and m == "GET")  # the web page


def test_keys_are_compared_in_constant_time(monkeypatch):
    """Every configured key is compared, with hmac.compare_digest, on sha256 digests of one length: no
    early exit on a match or a mismatch, no length leak."""
    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    keys = tuple(f"key-{i}-" + "k" * i for i in range(5))  # keys of different lengths
    app = create_app(Settings(weights="unused", api_keys=keys), worker=False)
    digests = {hashlib.sha256(k.encode()).digest() for k in keys}
    with Server(app) as s, httpx.Client(base_url=s.url) as c:
        for given, status in (("short", 401), ("x" * 500, 401), (keys[0], 200), (keys[-1], 200)):
            calls.clear()
            assert c.get("/sdapi/v1/samplers", headers=bearer(given)).status_code == status
            assert len(calls) == len(keys)                                   # every key, every time
            assert all(len(a) == len(b) == 32 for a, b in calls)             # equal lengths: nothing leaks
            assert {b for _, b in calls} == digests and {a for a, _ in calls} == {hashlib.sha256(given.encode()).digest()}


def test_job_ids_are_unguessable(monkeypatch):
    """128 random bits from `secrets` (22 URL-safe characters); no two alike, every bit fair."""
    sizes = []
    real = secrets.token_urlsafe
    monkeypatch.setattr(secrets, "token_urlsafe", lambda n=None: sizes.append(n) or real(n))
    ids = [new_job_id() for _ in range(2000)]
    assert sizes == [16] * 2000                                  # drawn by secrets, 16 bytes each
    raw = [base64.urlsafe_b64decode(i + "==") for i in ids]
    assert all(len(i) == 22 and re.fullmatch(r"[A-Za-z0-9_-]+", i) for i in ids) and all(len(b) == 16 for b in raw)
    assert len(set(ids)) == len(ids)
    bits = [int.from_bytes(b, "big") for b in raw]
    for k in range(128):  # each bit set in about half the ids (a counter or a clock would fail this)
        assert 0.4 < sum(x >> k & 1 for x in bits) / len(bits) < 0.6, k


# -----------------------------------------------------------------------------
# ownership: one key cannot see another's jobs (Redis, a real worker)




@pytest.fixture
def owned(tiny_weights, tiny_pipe):
    """API on Redis with two keys; start_worker() starts a worker thread on the same queue."""
    prefix = f"test-sec-{secrets.token_hex(4)}"
    settings = Settings(weights=str(tiny_weights), redis_url=REDIS, key_prefix=prefix, api_keys=(KEY_A, KEY_B),
                        batch_window=0.01)
    pipe, stop, threads = HoldingPipe(tiny_pipe), threading.Event(), []

    def start_worker():
        queue = RedisQueue(REDIS, prefix=prefix)
        thread = threading.Thread(target=Worker(pipe, queue, settings, name="sec-worker").run, args=(stop,),
                                  daemon=True)
        thread.start()
        threads.append((thread, queue))

    r = redis.Redis.from_url(REDIS)
    with Server(create_app(settings)) as server:
        a = httpx.Client(base_url=server.url, timeout=120, headers=bearer(KEY_A))
        b = httpx.Client(base_url=server.url, timeout=120, headers=bearer(KEY_B))
        a.start_worker, a.redis, a.prefix, a.pipe = start_worker, r, prefix, pipe
        yield a, b
        stop.set()
        pipe.release.set()
        for thread, queue in threads:
            thread.join(60)
            queue.close()
        a.close(), b.close()
    keys = list(r.scan_iter(match=f"{prefix}:*"))
    if keys:
        r.delete(*keys)
    r.close()


def test_one_key_cannot_read_fetch_or_cancel_another_keys_jobs(owned):
    a, b = owned
    job = a.post("/jobs/txt2img", json={"prompt": "a red circle", "steps": 2, "seed": 1}).json()
    job_id = job["id"]
    unknown = "y" * 22

    def not_found(r, some_id):  # exactly the answer for an id that does not exist
        assert r.status_code == 404 and r.json() == {"detail": f"no job {some_id} (unknown, or expired)"}, r.text

    # queued (no worker yet): B cannot see or cancel it; an unknown id looks the same
    for path in (f"/jobs/{job_id}", f"/jobs/{job_id}/image", f"/jobs/{job_id}/image/0"):
        not_found(b.get(path), job_id)
        not_found(b.get(path.replace(job_id, unknown)), unknown)
    not_found(b.delete(f"/jobs/{job_id}"), job_id)
    assert a.get(f"/jobs/{job_id}").json()["status"] == "queued"          # B's cancel did nothing

    # the job stores a digest of A's key, and no value under the job's keys holds the key itself
    stored = a.redis.hgetall(f"{a.prefix}:job:{job_id}")
    assert stored[b"owner"].decode() == hashlib.sha256(KEY_A.encode()).hexdigest()
    for k in a.redis.scan_iter(match=f"{a.prefix}:*"):
        kind = a.redis.type(k)
        values = a.redis.hvals(k) if kind == b"hash" else [a.redis.get(k)] if kind == b"string" else []
        assert all(KEY_A.encode() not in v and KEY_B.encode() not in v for v in values if v)

    a.start_worker()
    wait_until(lambda: a.get(f"/jobs/{job_id}").json()["status"] == "done", what="the job")
    assert png(a.get(f"/jobs/{job_id}/image")).size == (16, 16)
    for path in (f"/jobs/{job_id}", f"/jobs/{job_id}/image", f"/jobs/{job_id}/image/0"):
        not_found(b.get(path), job_id)
    not_found(b.delete(f"/jobs/{job_id}"), job_id)

    # OpenAI's response_format="url" links are the owner's only
    r = a.post("/v1/images/generations", json={"prompt": "x", "response_format": "url", "steps": 1})
    url = r.json()["data"][0]["url"]
    assert png(a.get(url)).size == (16, 16)
    not_found(b.get(url), r.json()["job_id"])
    # a job B made is B's: A cannot see it either
    mine = b.post("/jobs/txt2img", json={"prompt": "x", "steps": 1}).json()["id"]
    not_found(a.get(f"/jobs/{mine}"), mine)
    wait_until(lambda: b.get(f"/jobs/{mine}").json()["status"] == "done", what="B's job")


def test_one_key_cannot_follow_or_interrupt_another_keys_webui_request(owned):
    a, b = owned
    a.start_worker()
    a.pipe.hold(1)
    result = {}
    thread = threading.Thread(target=lambda: result.update(r=a.post(
        "/sdapi/v1/txt2img", json={"prompt": "x", "seed": 3, "steps": 3, "width": 16, "height": 16})))
    thread.start()
    assert a.pipe.reached.wait(120)
    assert a.get("/sdapi/v1/progress").json()["state"]["job_count"] == 1     # A sees its request ...
    assert b.get("/sdapi/v1/progress").json()["state"]["job_count"] == 0     # ... B does not
    assert b.post("/sdapi/v1/interrupt").status_code == 200                  # and B's interrupt stops nothing
    a.pipe.release.set()
    thread.join(120)
    r = result["r"]
    assert r.status_code == 200 and len(r.json()["images"]) == 1
    assert r.json()["info"].count('"interrupted": false') == 1
