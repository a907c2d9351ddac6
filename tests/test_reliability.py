"""
Faults caused for real, and what the service promises under each (docs/reliability.md, "Faults"):

  at the default settings (liveness TTL 5 s, visibility timeout 300 s):
  - a worker killed with SIGKILL in the middle of a batch: its liveness key expires and the other worker
    claims the batch's jobs within seconds; every waiting client gets its image, the one its request makes
    alone, stored once;
  - a live worker on a step longer than the liveness TTL keeps its job: it runs once, even with a second
    worker looking for work the whole time;
  - Redis run with AOF, SIGKILLed under accepted jobs and restarted: every job ends done with its PNG,
    stored once, the ones in flight run again within seconds, waiting clients get their images;
  - Redis without persistence stopped under load: requests answer 503 with Retry-After (none hangs, none is
    a 500), the worker backs off and stays up, and once Redis is back (empty) new jobs succeed;
  - a job that makes the pipeline raise is retried max_attempts times, then failed with its error; the
    jobs in its batch succeed;
  - queue full: 429 with Retry-After; a client that hangs up while its synchronous request waits: its job is
    cancelled and never runs; a wait that times out: 504 naming the job, which can then be followed to its image.

Every test runs on its own `redis-server` (a free port; AOF where it says so) so it may be stopped and killed,
with the tiny random model (16x16 images), uvicorn on loopback, and real `sd worker` processes where a
process is killed or must run beside another one.
"""

import dataclasses
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import httpx
import pytest
import redis

from service.api import create_app
from service.queue import RedisQueue, make_queue
from service.settings import Settings
from service.worker import Worker
from test_service_http import Server
from test_service_load import free_port, pixels, same_image, wait_until

PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow star"]


# -----------------------------------------------------------------------------
# real processes: redis-server and `sd worker`


class RedisServer:
    """A private redis-server on a free loopback port. Without persistence (the default) stop() and start()
    again on the same port give an empty Redis, as a restarted Redis without AOF/RDB would be; with `aof`
    (appendonly yes, appendfsync always, as docker/compose.yaml runs it) it comes back with what it held."""

    def __init__(self, tmp_path, aof: bool = False):
        self.port, self.dir = free_port(), tmp_path
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = None
        self.persistence = ["--appendonly", "yes", "--appendfsync", "always"] if aof else ["--appendonly", "no"]

    def start(self) -> "RedisServer":
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                                      "--save", "", *self.persistence, "--dir", str(self.dir)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url)

        def up():
            assert self.proc.poll() is None, "redis-server exited"
            try:
                return client.ping()
            except redis.ConnectionError:
                return False
        wait_until(up, timeout=30, what="redis-server")
        client.close()
        return self

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(30)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """The tiny pipeline in this process on one torch thread: beside worker processes on a small machine,
    more threads only spin and wait (60 steps took 12 s on 2 busy cores, 0.7 s on one thread)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path).start()
    yield server
    server.stop(signal.SIGKILL)


class WorkerProcess:
    """`sd worker` on one CPU thread; its log goes to a file (a pipe nobody reads could fill and block it)."""

    def __init__(self, weights, url, prefix, *flags):
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "SD_DEVICE": "cpu", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "service.cli", "worker", "--weights", str(weights),
                                      "--redis", url, "--key-prefix", prefix, *map(str, flags)],
                                     stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.pid = self.proc.pid

    def output(self) -> str:
        with open(self.log.name) as f:
            return f.read()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log.close()
        os.unlink(self.log.name)


class Service:
    """The API (uvicorn in a thread, no worker) on a private Redis; `sd worker` processes added with worker()."""

    def __init__(self, redis_server, weights, **settings):
        self.redis_server, self.weights = redis_server, weights
        self.prefix = f"rel-{secrets.token_hex(4)}"
        self.settings = Settings(weights=str(weights), redis_url=redis_server.url, key_prefix=self.prefix,
                                 **settings)
        self.workers: list[WorkerProcess] = []
        self.threads: list[tuple[threading.Thread, threading.Event, RedisQueue]] = []

    def __enter__(self):
        self.server = Server(create_app(self.settings, worker=False)).__enter__()
        self.url = self.server.url
        self.http = httpx.Client(base_url=self.url, timeout=120)
        self.redis = redis.Redis.from_url(self.redis_server.url)
        return self

    def __exit__(self, *exc):
        for w in self.workers:
            w.stop()
        for _, stop, _ in self.threads:
            stop.set()
        for thread, _, queue in self.threads:
            thread.join(60)
            queue.close()
        self.http.close()
        self.server.__exit__()
        self.redis.close()

    def worker(self, *flags) -> WorkerProcess:
        """Start `sd worker` and wait until it has loaded the model and reported in."""
        w = WorkerProcess(self.weights, self.redis_server.url, self.prefix, *flags)
        self.workers.append(w)

        def ready():
            assert w.alive(), w.output()
            return bool(self.redis.keys(f"{self.prefix}:worker:*-{w.pid}-*"))
        wait_until(ready, timeout=120, what="the worker to load the model")
        return w

    def thread_worker(self, pipe, name: str, **settings) -> tuple[Worker, threading.Thread]:
        """A worker in a thread of this process (the worker code of `sd worker`, on a pipeline the test holds)."""
        settings = dataclasses.replace(self.settings, **settings)
        queue = make_queue(settings)  # the settings' Redis and prefix, as `sd worker` makes it
        worker, stop = Worker(pipe, queue, settings, name=name), threading.Event()
        thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
        thread.start()
        self.threads.append((thread, stop, queue))
        return worker, thread

    def job(self, job_id: str) -> dict:
        """The job's hash in Redis, decoded."""
        return {k.decode(): v.decode() for k, v in self.redis.hgetall(f"{self.prefix}:job:{job_id}").items()}

    def jobs(self) -> dict[str, dict]:
        ids = [k.decode().rsplit(":", 1)[1] for k in self.redis.keys(f"{self.prefix}:job:*")]
        return {i: self.job(i) for i in ids}


def post_all(url: str, path: str, bodies: list[dict], timeout: float = 120) -> tuple[list, list]:
    """Each body POSTed from its own thread and connection, all at once: the threads, and the list their
    answers (or exceptions: a timeout is a hang) fill in."""
    answers = [None] * len(bodies)

    def send(i):
        try:
            with httpx.Client(base_url=url, timeout=timeout) as c:
                answers[i] = c.post(path, json=bodies[i])
        except Exception as e:  # noqa: BLE001
            answers[i] = e

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    return threads, answers


# -----------------------------------------------------------------------------
# at the default settings: a worker killed mid-batch; a live worker on a long step keeps its job


def test_a_worker_killed_mid_batch_its_jobs_run_on_the_other_worker_within_seconds(redis_server, tiny_weights):
    """Default settings (liveness TTL 5 s, visibility timeout 300 s): two workers; the one running a batch of
    three synchronous requests is SIGKILLed; its liveness key expires and the other claims the three jobs at
    its next take. Every client gets its own image (the one its request makes alone), stored once."""
    # 32x32 on the tiny model: the batch lasts seconds, long enough to start the second worker while it runs
    bodies = [{"prompt": PROMPTS[i], "seed": 10 + i, "steps": 150, "width": 32, "height": 32} for i in range(3)]
    with Service(redis_server, tiny_weights) as s:
        assert (s.settings.liveness_ttl, s.settings.visibility_timeout, s.settings.job_timeout) == (5, 300, 300)
        first = s.worker("--max-batch", 4)
        threads, answers = post_all(s.url, "/txt2img", bodies)

        def batch_running():  # some steps into the batch, on the first worker
            jobs = s.jobs()
            return len(jobs) == 3 and all(j["status"] == "running" and int(j["step"]) > 0 for j in jobs.values())
        wait_until(batch_running, what="the batch to run")
        second = s.worker("--max-batch", 4)  # idle, alive: it must not take the running jobs
        assert all(f"-{first.pid}-" in j["worker"] for j in s.jobs().values())
        first.kill()
        killed = time.monotonic()
        jobs = s.jobs()
        assert all(j["status"] == "running" and j["attempts"] == "1" and int(j["step"]) < 150
                   for j in jobs.values()), jobs

        wait_until(lambda: all(f"-{second.pid}-" in j["worker"] for j in s.jobs().values()), timeout=30,
                   what="the other worker to claim the jobs")
        claimed = time.monotonic() - killed
        for t in threads:
            t.join(60)
        answered = time.monotonic() - killed
        assert answered < 60, f"the clients waited {answered:.1f} s after the kill"

        for body, answer in zip(bodies, answers):
            assert isinstance(answer, httpx.Response) and answer.status_code == 200, answer
            job = s.job(answer.headers["x-job-id"])
            # run again on the other worker (a second attempt), and stored once: the answer is the stored image
            assert (job["status"], job["attempts"], job["images"]) == ("done", "2", "1")
            assert f"-{second.pid}-" in job["worker"]
            assert s.redis.llen(f"{s.prefix}:done:{answer.headers['x-job-id']}") == 1  # one end, one token
            assert s.http.get(f"/jobs/{answer.headers['x-job-id']}/image").content == answer.content
            alone = s.http.post("/txt2img", json=body)  # the same request again, alone in its batch
            assert same_image(pixels(answer.content), pixels(alone.content))  # its own image, not a batch-mate's
        assert len({a.content for a in answers}) == 3
        assert not s.redis.keys(f"{s.prefix}:jobs:*")  # nothing left in the stream, or claimed by anyone
        assert second.alive()
        stats = s.redis.hgetall(f"{s.prefix}:stats")
        assert float(stats[b"sd_jobs_reclaimed_total"]) == 3
        print(f"\nkilled -> claimed elsewhere {claimed:.1f} s, -> every client answered {answered:.1f} s")


class SlowStep:
    """The tiny pipeline with one step that takes `seconds` (as one step of a big image on a CPU can): the
    worker's own thread is busy in it, as it is in a long UNet call. Test-only; counts its calls."""

    def __init__(self, pipe, seconds: float):
        self.pipe, self.seconds, self.calls = pipe, seconds, 0

    native_size = property(lambda self: self.pipe.native_size)

    def generate(self, requests, callback=None, **kw):
        self.calls += 1

        def slow(step, total):
            if step == 2:
                time.sleep(self.seconds)
            callback(step, total)
        return self.pipe.generate(requests, callback=slow, **kw)


def test_a_live_worker_on_a_step_longer_than_the_liveness_ttl_keeps_its_job(redis_server, tiny_weights, tiny_pipe):
    with Service(redis_server, tiny_weights) as s:
        ttl = s.settings.liveness_ttl  # the default, 5 s
        # two workers (threads of this process, each its own queue client and keep-alive thread, the code of
        # `sd worker`); the one that takes the job spends 1.5 TTLs in one step while the other looks for work
        pipes = [SlowStep(tiny_pipe, 1.5 * ttl) for _ in range(2)]
        for i, pipe in enumerate(pipes):
            s.thread_worker(pipe, f"w{i}")
        r = s.http.post("/txt2img", json={"prompt": PROMPTS[0], "seed": 1, "steps": 4}, timeout=120)
        assert r.status_code == 200
        job = s.job(r.headers["x-job-id"])
        assert job["attempts"] == "1", job      # never claimed from the worker running it ...
        assert sum(p.calls for p in pipes) == 1  # ... and run once in all
        assert len(s.redis.keys(f"{s.prefix}:worker:*")) == 2
        assert b"sd_jobs_reclaimed_total" not in s.redis.hgetall(f"{s.prefix}:stats")


# -----------------------------------------------------------------------------
# Redis stopped under load


def test_redis_stopped_under_load_503_then_back_to_work(redis_server, tiny_weights):
    """Redis runs without persistence, as the default deployment does: stopping it loses what it held. The
    promise is that nothing hangs or crashes: a job in flight when Redis stops is lost WITH Redis, its waiting
    client is told so (503 naming the job) and may send it again; after the restart new jobs succeed."""
    with Service(redis_server, tiny_weights, job_timeout=60) as s:
        worker = s.worker("--max-batch", 4)
        phase, stop, answers = ["up"], threading.Event(), []

        def client(k):  # sends requests one after another, noting the phase each was sent in
            with httpx.Client(base_url=s.url, timeout=30) as c:  # 30 s < job_timeout: a hang is a ReadTimeout
                for i in range(1000):
                    if stop.is_set():
                        return
                    sent_in, t = phase[0], time.monotonic()
                    try:
                        r = c.post("/txt2img", json={"prompt": PROMPTS[k], "seed": 1000 * k + i, "steps": 20})
                        answers.append((sent_in, r.status_code, r.headers, time.monotonic() - t))
                    except Exception as e:  # noqa: BLE001
                        answers.append((sent_in, type(e).__name__, {}, time.monotonic() - t))
                    if answers[-1][1] != 200:
                        time.sleep(0.2)  # a client that backs off a little (Retry-After says 5 s)

        threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        wait_until(lambda: sum(a[1] == 200 for a in answers) >= 4, what="some answers before the stop")
        phase[0] = "stopping"
        redis_server.stop()
        phase[0] = "down"
        # down until the worker has tried three times: 0.5 + 1 + 2 s
        wait_until(lambda: worker.output().count("retrying in") >= 3, what="the worker to retry")
        phase[0] = "restarting"
        redis_server.start()  # the same port, empty
        phase[0] = "back"
        wait_until(lambda: sum(a[0] == "back" and a[1] == 200 for a in answers) >= 4, timeout=90,
                   what="jobs to succeed after the restart")
        stop.set()
        for t in threads:
            t.join(60)

        # every request was answered (no hang, no 500): an image, or 503 with Retry-After
        assert all(a[1] in (200, 503) for a in answers), [a[:2] for a in answers if a[1] not in (200, 503)]
        unavailable = [a for a in answers if a[1] == 503]
        assert unavailable and all(a[2].get("retry-after") for a in unavailable)
        assert all(a[1] == 503 for a in answers if a[0] == "down")
        # the requests waiting when Redis stopped were told which job: it was lost with Redis
        lost = [a[2]["x-job-id"] for a in unavailable if a[0] in ("up", "stopping") and "x-job-id" in a[2]]
        assert lost, "no request was waiting when Redis stopped"
        assert all(s.http.get(f"/jobs/{job_id}").status_code == 404 for job_id in lost)
        # after the restart: images again, the last answers all of them
        back = [a[1] for a in answers if a[0] == "back"]
        assert back[-4:] == [200] * 4, back

        # the worker stayed up and waited between tries, longer each time: no crash loop, no tight loop
        assert worker.alive()
        log = worker.output()
        pauses = [float(p) for p in re.findall(r"retrying in ([\d.]+) s", log)]
        assert pauses[:3] == [0.5, 1.0, 2.0] and pauses == sorted(pauses) and max(pauses) <= 8.0, pauses
        assert log.count("worker loop error") == 1, log[-3000:]  # the traceback once an outage, then a line a try
        assert s.http.get("/readyz").status_code == 200
        print(f"\n{len(answers)} answers: {sum(a[1] == 200 for a in answers)} images, {len(unavailable)} 503s "
              f"(slowest {max(a[3] for a in unavailable):.2f} s; {sum(a[0] == 'down' for a in answers)} sent while "
              f"down), {len(lost)} jobs lost with Redis; worker pauses {pauses}")


# -----------------------------------------------------------------------------
# Redis with AOF killed and restarted under accepted jobs


@pytest.fixture
def aof_redis(tmp_path):
    server = RedisServer(tmp_path, aof=True).start()
    yield server
    server.stop(signal.SIGKILL)


def test_redis_killed_and_restarted_from_its_aof_every_accepted_job_ends_done_once(aof_redis, tiny_weights):
    with Service(aof_redis, tiny_weights) as s:
        workers = [s.worker("--max-batch", 4) for _ in range(2)]
        accepted = [s.http.post("/jobs/txt2img", json={"prompt": PROMPTS[i % 4], "seed": 100 + i, "steps": 150})
                    for i in range(8)]
        assert all(r.status_code == 202 for r in accepted)
        ids = [r.json()["id"] for r in accepted]
        waiting = [{"prompt": PROMPTS[i], "seed": 200 + i, "steps": 150} for i in range(2)]
        threads, answers = post_all(s.url, "/txt2img", waiting)  # synchronous clients, waiting through it all
        def accepted_and_running():  # all ten accepted (the waiting ones too), some of them running
            jobs = s.jobs()
            return len(jobs) == 10 and sum(j["status"] == "running" and int(j["step"]) > 0 for j in jobs.values()) >= 2
        wait_until(accepted_and_running, what="every job accepted, some running")
        aof_redis.stop(signal.SIGKILL)  # no shutdown: what it has is what its AOF has
        in_flight = time.time()
        time.sleep(1.0)
        aof_redis.start()
        back = time.time()

        seen = [{}]

        def every_job_done():
            try:
                seen[0] = s.jobs()
            except redis.ConnectionError:
                return False
            return len(seen[0]) == 10 and all(j["status"] == "done" for j in seen[0].values())
        try:
            wait_until(every_job_done, timeout=90, what="every job to end done")
        except AssertionError:
            states = {i: (j["status"], j["attempts"], j.get("worker"), j["step"]) for i, j in seen[0].items()}
            raise AssertionError(f"not every job done: {states}\n{workers[0].output()[-3000:]}\n"
                                 f"{workers[1].output()[-3000:]}")
        for t in threads:
            t.join(60)
        assert all(isinstance(a, httpx.Response) and a.status_code == 200 for a in answers), answers

        jobs = s.jobs()
        assert set(ids) <= set(jobs)
        rerun = [j for j in jobs.values() if int(j["attempts"]) > 1]
        assert rerun, "no job was in flight when Redis was killed"
        # the runs cut off by the kill started again within 15 s of Redis' return
        assert all(float(j["started"]) - back < 15 for j in rerun), [(float(j["started"]) - back) for j in rerun]
        for job_id, job in jobs.items():  # each stored once: one PNG, one end (one token), nothing more
            assert job["images"] == "1" and float(job["finished"]) > in_flight - 60
            results = [s.redis.exists(f"{s.prefix}:result:{job_id}:{n}") for n in (0, 1)]
            assert results == [1, 0]
            assert s.redis.llen(f"{s.prefix}:done:{job_id}") == 1
        for job_id in ids:
            image = s.http.get(f"/jobs/{job_id}/image")
            assert image.status_code == 200 and image.content.startswith(b"\x89PNG")
        assert not s.redis.keys(f"{s.prefix}:jobs:*")
        # the workers carried on
        assert all(w.alive() for w in workers)
        assert s.http.post("/txt2img", json={"prompt": PROMPTS[0], "seed": 9, "steps": 4}).status_code == 200
        restarted = max(float(j["started"]) for j in rerun) - back
        print(f"\n{len(rerun)} runs in flight at the kill started again {restarted:.1f} s after Redis was back; "
              f"all 10 jobs done")


# -----------------------------------------------------------------------------
# a job that makes the pipeline raise


class Poisoned:
    """The tiny pipeline with an injected fault: a call whose batch holds a prompt containing POISON raises.
    Test-only (the worker in a thread of this process is handed it), so the service gains no hook for it.
    It records the prompts of every call."""

    def __init__(self, pipe):
        self.pipe, self.calls = pipe, []

    native_size = property(lambda self: self.pipe.native_size)

    def generate(self, requests, **kw):
        self.calls.append([r.prompt for r in requests])
        if any("POISON" in r.prompt for r in requests):
            raise RuntimeError("injected failure")
        return self.pipe.generate(requests, **kw)


def test_a_job_that_makes_the_pipeline_raise_is_retried_then_failed_and_its_batch_mates_succeed(redis_server,
                                                                                                tiny_weights,
                                                                                                tiny_pipe):
    good = [{"prompt": PROMPTS[i], "seed": 20 + i, "steps": 10} for i in range(3)]
    poison = {"prompt": "POISON " + PROMPTS[3], "seed": 23, "steps": 10}
    with Service(redis_server, tiny_weights, max_attempts=3, batch_window=0.2) as s:
        threads, answers = post_all(s.url, "/txt2img", good + [poison])
        wait_until(lambda: len(s.jobs()) == 4, what="the four jobs to be queued")  # then one worker takes all four
        pipe = Poisoned(tiny_pipe)
        s.thread_worker(pipe, "w")
        for t in threads:
            t.join(120)

        assert sorted(pipe.calls[0]) == sorted(b["prompt"] for b in good + [poison])  # one batch, then ...
        assert pipe.calls.count([poison["prompt"]]) == 3                            # ... the poison alone, 3 runs
        *fine, bad = answers
        assert bad.status_code == 500 and bad.json()["detail"] == "RuntimeError: injected failure"
        job = s.job(bad.headers["x-job-id"])
        assert (job["status"], job["attempts"], job["error"]) == ("failed", "3", "RuntimeError: injected failure")
        assert s.http.get(f"/jobs/{bad.headers['x-job-id']}").json()["error"] == "RuntimeError: injected failure"
        for body, answer in zip(good, fine):
            assert answer.status_code == 200 and s.job(answer.headers["x-job-id"])["attempts"] == "1"
            alone = s.http.post("/txt2img", json=body)  # the same request, alone: the same image
            assert same_image(pixels(answer.content), pixels(alone.content))
        assert not s.redis.keys(f"{s.prefix}:jobs:*")


# -----------------------------------------------------------------------------
# queue full, a client that hangs up, a wait that times out


def test_queue_full_is_429_with_retry_after(redis_server, tiny_weights):
    with Service(redis_server, tiny_weights, queue_limit=2) as s:  # no worker: jobs stay queued
        for seed in (1, 2):
            assert s.http.post("/jobs/txt2img", json={"prompt": "x", "seed": seed}).status_code == 202
        for path in ("/jobs/txt2img", "/txt2img"):
            r = s.http.post(path, json={"prompt": "x", "seed": 3})
            assert r.status_code == 429 and r.headers["retry-after"] == "5" and "queue full" in r.json()["detail"]
        assert len(s.jobs()) == 2  # the refused ones left nothing behind


@pytest.mark.parametrize("path, body", [
    ("/txt2img", b'{"prompt": "a job for nobody", "seed": 5, "steps": 2}'),
    ("/v1/images/generations", b'{"prompt": "a job for nobody", "n": 1, "seed": 5, "steps": 2}'),  # OpenAI layer
    ("/sdapi/v1/txt2img", b'{"prompt": "a job for nobody", "seed": 5, "steps": 2}'),  # AUTOMATIC1111 layer
], ids=["native", "openai", "a1111"])
def test_a_client_that_hangs_up_has_its_queued_job_cancelled_not_run(redis_server, tiny_weights, tiny_pipe,
                                                                     path, body):
    with Service(redis_server, tiny_weights) as s:  # no worker yet: the job waits in the queue
        with socket.create_connection(("127.0.0.1", s.server.server.config.port)) as conn:
            conn.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (path.encode(), len(body), body))
            wait_until(lambda: [j["status"] for j in s.jobs().values()] == ["queued"], what="the job to queue")
        # the client has closed its connection
        (job_id,) = s.jobs()
        wait_until(lambda: s.job(job_id)["status"] == "cancelled", what="the job to be cancelled")

        pipe = Poisoned(tiny_pipe)  # (records what it runs; nothing here says POISON)
        s.thread_worker(pipe, "w")
        r = s.http.post("/txt2img", json={"prompt": "a job for someone", "seed": 6, "steps": 2})
        assert r.status_code == 200
        assert pipe.calls == [["a job for someone"]]  # the worker read past the cancelled job without running it
        job = s.job(job_id)
        assert (job["status"], job["started"], job["attempts"]) == ("cancelled", "", "0")
        assert not s.redis.keys(f"{s.prefix}:jobs:*")


def test_a_wait_that_times_out_is_504_with_the_job_id_and_the_job_can_be_followed(redis_server, tiny_weights,
                                                                                   tiny_pipe):
    with Service(redis_server, tiny_weights, job_timeout=1) as s:  # no worker for now
        r = s.http.post("/txt2img", json={"prompt": PROMPTS[0], "seed": 7, "steps": 2})
        job_id = r.headers["x-job-id"]
        assert r.status_code == 504 and f"/jobs/{job_id}" in r.json()["detail"]
        assert s.http.get(f"/jobs/{job_id}").json()["status"] == "queued"  # not cancelled: the client may poll
        s.thread_worker(tiny_pipe, "w")
        wait_until(lambda: s.http.get(f"/jobs/{job_id}").json()["status"] == "done", what="the job")
        image = s.http.get(f"/jobs/{job_id}/image")
        assert image.status_code == 200 and image.content.startswith(b"\x89PNG") and image.headers["x-seed"] == "7"
