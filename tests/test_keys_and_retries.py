"""
Retries without duplicates, and no API key starving another (docs/reliability.md, "Keys and retries"):

  - an Idempotency-Key on every POST that makes jobs (native sync and job endpoints, OpenAI, AUTOMATIC1111):
    the same key from the same API key gives back the job it made (run once), also to a request sent while
    the first still waits; the same key with another body is refused (422 naming the header); another API
    key's same key is its own;
  - fair taking: key A queues 40 jobs, then key B one; B's job ends before A's tenth;
  - a per-key limit (queue_limit_per_key): 429 with Retry-After for that key alone;
  - a synchronous client with an Idempotency-Key that hangs up keeps its job, and its retry gets the image.

A private redis-server, uvicorn on loopback, the tiny random model in a worker thread of this process.
"""

import io
import socket
import threading
import time

import httpx
import pytest
from PIL import Image

from test_reliability import Poisoned, RedisServer, Service
from test_service_load import wait_until

KEYS = ("key-a", "key-b")


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()


def png(size=16, color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def auth(key: str, idempotency: str | None = None) -> dict:
    headers = {"Authorization": f"Bearer {key}"}
    if idempotency is not None:
        headers["Idempotency-Key"] = idempotency
    return headers


def job_ids(path: str, answer: httpx.Response) -> list[str]:
    """The job ids an answer names, in each API's own way."""
    if path.startswith("/sdapi/"):
        import json

        return json.loads(answer.json()["info"])["job_ids"]
    if path.startswith("/v1/"):
        return [answer.json()["job_id"]]
    if path.startswith("/jobs/"):
        return [answer.json()["id"]]
    return [answer.headers["x-job-id"]]


def send(client: httpx.Client, path: str, prompt: str, headers: dict) -> httpx.Response:
    """One request of `path`'s kind asking for `prompt`."""
    if path in ("/img2img", "/jobs/img2img"):
        return client.post(path, data={"prompt": prompt, "seed": "3", "steps": "2", "strength": "0.5"},
                           files={"image": ("in.png", png(), "image/png")}, headers=headers)
    body = {"prompt": prompt, "seed": 3, "steps": 2}
    if path.startswith("/sdapi/"):
        body["batch_size"] = 2
    return client.post(path, json=body, headers=headers)


@pytest.mark.parametrize("path", ["/txt2img", "/jobs/txt2img", "/img2img", "/jobs/img2img", "/v1/images/generations",
                                  "/sdapi/v1/txt2img"])
def test_the_same_idempotency_key_gives_the_same_job_and_another_body_is_refused(redis_server, tiny_weights,
                                                                                  tiny_pipe, path):
    prompt = f"a red circle for {path}"
    with Service(redis_server, tiny_weights, api_keys=KEYS) as s:
        pipe = Poisoned(tiny_pipe)  # (records the prompts it runs; nothing here says POISON)
        s.thread_worker(pipe, "w")
        with httpx.Client(base_url=s.url, timeout=60) as c:
            # two sends of one request, the second while the first may still wait (a client's retry)
            answers = [None, None]
            threads = [threading.Thread(target=lambda i=i: answers.__setitem__(
                i, send(c, path, prompt, auth(KEYS[0], "order-17")))) for i in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            assert [a.status_code for a in answers] in ([200, 200], [202, 202]), [a.text for a in answers]
            ids = job_ids(path, answers[0])
            assert job_ids(path, answers[1]) == ids
            if answers[0].status_code == 202:
                for job_id in ids:
                    wait_until(lambda: c.get(f"/jobs/{job_id}", headers=auth(KEYS[0])).json()["status"] == "done",
                               what="the job")
            else:
                assert answers[0].content == answers[1].content  # the same image(s)
            # ... made once and run once
            assert len(s.jobs()) == len(ids) == (2 if path.startswith("/sdapi/") else 1)
            assert sum(call.count(prompt) for call in pipe.calls) == len(ids)

            later = send(c, path, prompt, auth(KEYS[0], "order-17"))  # a retry after it is done: the same job
            assert later.status_code == answers[0].status_code and job_ids(path, later) == ids

            conflict = send(c, path, prompt + " and more", auth(KEYS[0], "order-17"))
            assert conflict.status_code == 422, conflict.text
            detail = conflict.json().get("detail") or conflict.json()["error"]["message"]
            assert "Idempotency-Key" in detail and "different request" in detail

            other_key = send(c, path, prompt, auth(KEYS[1], "order-17"))  # another API key's own "order-17"
            assert other_key.status_code in (200, 202) and set(job_ids(path, other_key)).isdisjoint(ids)
            assert len(s.jobs()) == 2 * len(ids)

            bad = send(c, path, prompt, auth(KEYS[0], "x" * 256))
            assert bad.status_code == (400 if path.startswith("/v1/") else 422) and "Idempotency-Key" in bad.text


def test_key_a_with_40_jobs_does_not_hold_up_key_b(redis_server, tiny_weights, tiny_pipe):
    with Service(redis_server, tiny_weights, api_keys=KEYS, queue_limit_per_key=40) as s:
        with httpx.Client(base_url=s.url, timeout=60) as c:
            a = [c.post("/jobs/txt2img", json={"prompt": "a red circle", "seed": i, "steps": 4},
                        headers=auth(KEYS[0])) for i in range(40)]
            assert all(r.status_code == 202 for r in a)
            b = c.post("/jobs/txt2img", json={"prompt": "a blue square", "seed": 1, "steps": 4},
                       headers=auth(KEYS[1]))
            assert b.status_code == 202
            s.thread_worker(tiny_pipe, "w")  # max_batch 8
            wait_until(lambda: all(j["status"] == "done" for j in s.jobs().values()), what="every job")
            finished = {job_id: float(j["finished"]) for job_id, j in s.jobs().items()}
            a_order = sorted(finished[r.json()["id"]] for r in a)
            b_done = finished[b.json()["id"]]
            assert b_done < a_order[9], f"B ended after {sum(t < b_done for t in a_order)} of A's jobs"
            print(f"\nB's job ended after {sum(t < b_done for t in a_order)} of A's 40")


def test_the_per_key_limit_refuses_that_key_alone(redis_server, tiny_weights):
    with Service(redis_server, tiny_weights, api_keys=KEYS, queue_limit=10, queue_limit_per_key=3) as s:
        with httpx.Client(base_url=s.url, timeout=60) as c:  # no worker: the jobs stay queued
            for seed in range(3):
                assert c.post("/jobs/txt2img", json={"prompt": "x", "seed": seed},
                              headers=auth(KEYS[0])).status_code == 202
            for path in ("/jobs/txt2img", "/txt2img", "/v1/images/generations", "/sdapi/v1/txt2img"):
                r = c.post(path, json={"prompt": "x", "seed": 9}, headers=auth(KEYS[0]))
                assert r.status_code == 429 and r.headers["retry-after"] == "5", (path, r.text)
                assert "this API key has 3 jobs" in r.text
            assert c.post("/jobs/txt2img", json={"prompt": "x", "seed": 1},
                          headers=auth(KEYS[1])).status_code == 202  # key B is not affected
            assert len(s.jobs()) == 4


def test_a_client_with_an_idempotency_key_that_hangs_up_can_come_back_for_its_image(redis_server, tiny_weights,
                                                                                    tiny_pipe):
    """Without a key a hung-up client's job is cancelled (test_reliability); with one, the client declared it
    will retry: the job stays, and the retry waits for it and gets its image."""
    with Service(redis_server, tiny_weights) as s:  # no worker yet: the job waits in the queue
        body = b'{"prompt": "a job to come back for", "seed": 5, "steps": 2}'
        with socket.create_connection(("127.0.0.1", s.server.server.config.port)) as conn:
            conn.sendall(b"POST /txt2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Idempotency-Key: come-back-1\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            wait_until(lambda: [j["status"] for j in s.jobs().values()] == ["queued"], what="the job to queue")
        (job_id,) = s.jobs()
        time.sleep(1.5)  # three of the API's 0.5 s connection checks
        assert s.job(job_id)["status"] == "queued"  # not cancelled
        s.thread_worker(tiny_pipe, "w")
        r = s.http.post("/txt2img", content=body, headers={"Content-Type": "application/json",
                                                           "Idempotency-Key": "come-back-1"})
        assert r.status_code == 200 and r.headers["x-job-id"] == job_id and r.content.startswith(b"\x89PNG")
        assert len(s.jobs()) == 1
