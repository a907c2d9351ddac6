"""The job queue between the API and the workers: Redis Streams, or memory for one process.

A job moves   queued -> running -> done | failed | cancelled   (running -> queued again when
it is retried or its worker lets it go). Both queues have the same two faces:

  the API's (async):   submit, state, wait, result, cancel, depth, workers, stats, ping
  a worker's (sync):   take, progress, finish, fail, cancelled, release, heartbeat, record

RedisQueue keys (prefix "sd" by default; every key but the stream has a TTL):

  sd:jobs                 stream, consumer group "workers"; one entry {id} per run of a job
  sd:job:{id}             hash: status, mode, params (JSON), step, total, error, attempts, times
  sd:input:{id}:{name}    an uploaded image or mask, as sent
  sd:result:{id}:{n}      result PNG n
  sd:done:{id}            list: a token pushed when the job ends; waiters BLPOP it (no polling)
  sd:worker:{name}        a worker's heartbeat
  sd:stats                hash of metric samples the workers add to (service/metrics.py)

A worker XREADGROUPs up to its batch size, XAUTOCLAIMs entries other workers left idle longer
than the visibility timeout, keeps the entries it is running fresh with XCLAIM at every step,
and XACKs + XDELs an entry once the job's end state is stored. State changes are one small Lua
script, so a cancel and a worker never overwrite each other.
"""

from __future__ import annotations

import asyncio
import collections
import json
import secrets
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

GATHER_POLL = 0.002     # seconds between a Redis worker's reads during its gather window
SOCKET_TIMEOUT = 10.0   # seconds a Redis reply may take before the queue counts as unreachable
BLOCK_SLICE = 5.0       # longest blocking Redis read (BLPOP, XREADGROUP), well under SOCKET_TIMEOUT:
                        # longer waits are several reads, so no wait is mistaken for a dead Redis

STATUSES = ("queued", "running", "done", "failed", "cancelled")
ENDED = ("done", "failed", "cancelled")


class QueueFull(Exception):
    """More jobs are waiting than the queue limit allows (answer 429)."""


class QueueUnavailable(Exception):
    """The queue cannot be reached (answer 503)."""


def new_job_id() -> str:
    return secrets.token_urlsafe(16)  # 128 random bits: job ids cannot be guessed


@dataclass
class Job:
    """What a worker runs."""
    id: str
    mode: str                                   # txt2img | img2img | inpaint
    params: dict                                # prompt, negative_prompt, seed, guidance_scale, num_images,
                                                # steps, sampler, width, height, strength
    inputs: dict = field(default_factory=dict)  # "image" / "mask": the uploaded bytes
    attempts: int = 0                           # runs started, this one included
    entry: str = ""                             # the queue's handle of this run (a stream entry id)
    created: float = 0.0
    owner: Optional[str] = None                 # sha256 of the API key that made it (never the key); None: no keys


@dataclass
class JobState:
    """What the API reports about a job."""
    id: str
    mode: str
    status: str
    params: dict
    step: int = 0
    total: int = 0
    error: Optional[str] = None
    error_kind: Optional[str] = None            # "invalid" (the request's fault) or "error"
    attempts: int = 0
    images: int = 0                             # result PNGs stored
    created: float = 0.0
    started: Optional[float] = None
    finished: Optional[float] = None
    owner: Optional[str] = None                 # only this API key's requests see the job (api.py)

    def to_hash(self) -> dict:
        d = asdict(self)
        d["params"] = json.dumps(self.params)
        return {k: ("" if v is None else str(v)) for k, v in d.items()}

    @classmethod
    def from_hash(cls, h: dict) -> "JobState":
        h = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
             for k, v in h.items()}
        opt = lambda k, f: f(h[k]) if h.get(k) else None  # noqa: E731
        return cls(id=h["id"], mode=h["mode"], status=h["status"], params=json.loads(h["params"]),
                   step=int(h.get("step") or 0), total=int(h.get("total") or 0), error=h.get("error") or None,
                   error_kind=h.get("error_kind") or None, attempts=int(h.get("attempts") or 0),
                   images=int(h.get("images") or 0), created=float(h.get("created") or 0),
                   started=opt("started", float), finished=opt("finished", float), owner=h.get("owner") or None)


# -----------------------------------------------------------------------------
# in memory: one process, API on the event loop and the worker in a thread


class MemoryQueue:
    """The queue for `sd serve` without Redis. Thread-safe; waiters are asyncio futures the worker
    thread completes through their loop, so nothing polls."""

    def __init__(self, *, result_ttl: float = 3600, max_attempts: int = 3, visibility_timeout: float = 300):
        self.result_ttl, self.max_attempts = result_ttl, max_attempts
        self._cond = threading.Condition()
        self._jobs: dict[str, JobState] = {}
        self._inputs: dict[str, dict] = {}
        self._results: dict[str, list[bytes]] = {}
        self._expires: dict[str, float] = {}
        self._queued: collections.deque[str] = collections.deque()
        self._waiters: dict[str, list] = collections.defaultdict(list)
        self._workers: dict[str, float] = {}
        self._stats: dict[str, float] = collections.defaultdict(float)
        self._runs = 0

    # --- the API's side

    async def submit(self, job: Job, limit: int) -> JobState:
        with self._cond:
            self._expire()
            if self._depth() >= limit:
                raise QueueFull(f"the queue holds {limit} jobs, its limit")
            state = JobState(job.id, job.mode, "queued", job.params, created=job.created or time.time(),
                             owner=job.owner)
            self._jobs[job.id], self._inputs[job.id] = state, dict(job.inputs)
            self._expires[job.id] = time.time() + self.result_ttl
            self._queued.append(job.id)
            self._cond.notify_all()
            return _copy(state)

    async def state(self, job_id: str) -> Optional[JobState]:
        with self._cond:
            self._expire()
            return _copy(self._jobs.get(job_id))

    async def wait(self, job_id: str, timeout: float) -> Optional[JobState]:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._cond:
            state = self._jobs.get(job_id)
            if state is None or state.status in ENDED:
                return _copy(state)
            self._waiters[job_id].append((loop, future))
        try:
            await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            pass
        finally:
            with self._cond:
                if (loop, future) in self._waiters.get(job_id, []):
                    self._waiters[job_id].remove((loop, future))
        return await self.state(job_id)

    async def result(self, job_id: str, n: int) -> Optional[bytes]:
        with self._cond:
            results = self._results.get(job_id, [])
            return results[n] if 0 <= n < len(results) else None

    async def cancel(self, job_id: str) -> Optional[JobState]:
        with self._cond:
            state = self._jobs.get(job_id)
            if state is not None and state.status in ("queued", "running"):
                if state.status == "queued":
                    self._queued.remove(job_id)
                self._end(state, "cancelled")
            return _copy(state)

    async def depth(self) -> int:
        with self._cond:
            return self._depth()

    async def workers(self) -> int:
        with self._cond:
            now = time.time()
            return sum(1 for until in self._workers.values() if until > now)

    async def stats(self) -> dict:
        with self._cond:
            return dict(self._stats)

    async def ping(self) -> None:
        pass

    async def aclose(self) -> None:
        pass

    # --- a worker's side

    def take(self, max_jobs: int, block: float, gather: float, consumer: str = "worker") -> list[Job]:
        """Up to max_jobs queued jobs, now running: wait up to `block` seconds for one, then up to
        `gather` more seconds for others to join it."""
        jobs = []
        with self._cond:
            self._cond.wait_for(lambda: self._queued, timeout=block)
            end = time.monotonic() + gather
            while self._queued and len(jobs) < max_jobs:
                jobs.append(self._start(self._queued.popleft()))
                if len(jobs) < max_jobs and not self._queued and gather > 0:
                    self._cond.wait_for(lambda: self._queued, timeout=max(0.0, end - time.monotonic()))
        return jobs

    def progress(self, jobs: list[Job], step: int, total: int, consumer: str = "worker") -> set[str]:
        """Record progress; answer the ids of those jobs that were cancelled."""
        with self._cond:
            for job in jobs:
                state = self._jobs.get(job.id)
                if state is not None and state.status == "running":
                    state.step, state.total = step, total
            return {j.id for j in jobs if self._jobs.get(j.id) is None or self._jobs[j.id].status == "cancelled"}

    def finish(self, job: Job, pngs: list[bytes]) -> None:
        with self._cond:
            state = self._jobs.get(job.id)
            if state is not None and state.status == "running":
                self._results[job.id] = list(pngs)
                state.images, state.step, state.params = len(pngs), state.total, dict(job.params)
                self._end(state, "done")
                self._record_end(state)

    def fail(self, job: Job, error: str, *, retry: bool, kind: str = "error") -> str:
        """Mark the job failed, or queue it again when `retry` and it has runs left. Returns its status."""
        with self._cond:
            state = self._jobs.get(job.id)
            if state is None or state.status != "running":
                return state.status if state else "expired"
            if retry and job.attempts < self.max_attempts:
                state.status, state.error, state.step = "queued", error, 0
                self._queued.append(job.id)
                self._cond.notify_all()
                return "queued"
            state.error, state.error_kind = error, kind
            self._end(state, "failed")
            self._record_end(state)
            return "failed"

    def cancelled(self, job: Job) -> None:
        """The worker stopped a cancelled job (its state already says so)."""
        with self._cond:
            self._stats.update(_add(self._stats, _count_end("cancelled")))

    def release(self, jobs: list[Job]) -> None:
        """Give jobs this worker took but will not run back to the queue, at its front."""
        with self._cond:
            for job in reversed(jobs):
                state = self._jobs.get(job.id)
                if state is not None and state.status == "running":
                    state.status, state.attempts, state.started = "queued", state.attempts - 1, None
                    self._queued.appendleft(job.id)
            self._cond.notify_all()

    def heartbeat(self, consumer: str, ttl: float) -> None:
        with self._cond:
            self._workers[consumer] = time.time() + ttl

    def record(self, increments: dict) -> None:
        with self._cond:
            self._stats.update(_add(self._stats, increments))

    def close(self) -> None:
        pass

    # --- inside the lock

    def _depth(self) -> int:
        return sum(1 for s in self._jobs.values() if s.status in ("queued", "running"))

    def _start(self, job_id: str) -> Job:
        state = self._jobs[job_id]
        state.status, state.started, state.step = "running", time.time(), 0
        state.attempts += 1
        self._runs += 1
        return Job(job_id, state.mode, state.params, self._inputs.get(job_id, {}), state.attempts,
                   entry=str(self._runs), created=state.created)

    def _end(self, state: JobState, status: str) -> None:
        state.status, state.finished = status, time.time()
        self._inputs.pop(state.id, None)
        for loop, future in self._waiters.pop(state.id, []):
            loop.call_soon_threadsafe(lambda f=future: f.done() or f.set_result(None))

    def _record_end(self, state: JobState) -> None:
        self._stats.update(_add(self._stats, {**_count_end(state.status), **_latency(state)}))

    def _expire(self) -> None:
        now = time.time()
        for job_id in [j for j, t in self._expires.items() if t < now and self._jobs[j].status in ENDED]:
            for d in (self._jobs, self._inputs, self._results, self._expires):
                d.pop(job_id, None)


def _copy(state: Optional[JobState]) -> Optional[JobState]:
    return None if state is None else JobState(**{**asdict(state), "params": dict(state.params)})


def _add(stats: dict, increments: dict) -> dict:
    return {k: stats.get(k, 0.0) + v for k, v in increments.items()}


def _count_end(status: str) -> dict:
    from .metrics import count

    return count("sd_jobs_total", status=status)


def _latency(state: JobState) -> dict:
    from .metrics import observe

    return observe("sd_job_seconds", max(0.0, time.time() - state.created)) if state.status == "done" else {}


# -----------------------------------------------------------------------------
# Redis Streams: any number of API processes and workers


# Change a job's status only if it is one of ARGV[1] (comma-separated); set the fields ARGV[3..];
# (done: step = total); when the new status is an end state, push the "done" token and let everything expire in ARGV[2] s.
# Returns {1, new status} or {0, current status ("" if the job is gone)}.
_TRANSITION = """
local s = redis.call('HGET', KEYS[1], 'status')
if not s or not string.find(',' .. ARGV[1] .. ',', ',' .. s .. ',', 1, true) then return {0, s or ''} end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
local new = redis.call('HGET', KEYS[1], 'status')
if new == 'done' then redis.call('HSET', KEYS[1], 'step', redis.call('HGET', KEYS[1], 'total') or '0') end
if new == 'done' or new == 'failed' or new == 'cancelled' then
  redis.call('RPUSH', KEYS[2], '1')
  redis.call('EXPIRE', KEYS[2], ARGV[2])
  redis.call('EXPIRE', KEYS[1], ARGV[2])
end
return {1, new}
"""


class RedisQueue:
    """Jobs on a Redis stream with a consumer group. The API uses the asyncio client, workers the
    blocking one; each is made on first use."""

    GROUP = "workers"

    def __init__(self, url: str, *, prefix: str = "sd", result_ttl: int = 3600, max_attempts: int = 3,
                 visibility_timeout: float = 300):
        self.url, self.prefix = url, prefix
        self.result_ttl, self.max_attempts = int(result_ttl), max_attempts
        self.visibility_ms = int(visibility_timeout * 1000)
        self.stream = f"{prefix}:jobs"
        self._sync = None
        self._async = None
        self._group_ready = False

    # keys
    def _job(self, job_id):
        return f"{self.prefix}:job:{job_id}"

    def _done(self, job_id):
        return f"{self.prefix}:done:{job_id}"

    def _input(self, job_id, name):
        return f"{self.prefix}:input:{job_id}:{name}"

    def _result(self, job_id, n):
        return f"{self.prefix}:result:{job_id}:{n}"

    # --- the API's side

    def _client(self):
        import redis.asyncio

        if self._async is None:
            self._async = redis.asyncio.Redis.from_url(self.url, socket_connect_timeout=2,
                                                      socket_timeout=SOCKET_TIMEOUT)
            self._async_transition = self._async.register_script(_TRANSITION)
        return self._async

    async def _call(self, coroutine_fn):
        """Run an async Redis operation; connection trouble becomes QueueUnavailable."""
        import redis

        try:
            return await coroutine_fn(self._client())
        except (redis.ConnectionError, redis.TimeoutError, OSError) as e:
            raise QueueUnavailable(f"Redis is unreachable: {e}") from e

    async def submit(self, job: Job, limit: int) -> JobState:
        import redis

        state = JobState(job.id, job.mode, "queued", job.params, created=job.created or time.time(), owner=job.owner)

        async def go(r):
            if not self._group_ready:
                try:
                    await r.xgroup_create(self.stream, self.GROUP, id="0", mkstream=True)
                except redis.ResponseError as e:
                    if "BUSYGROUP" not in str(e):
                        raise
                self._group_ready = True
            if await r.xlen(self.stream) >= limit:
                raise QueueFull(f"the queue holds {limit} jobs, its limit")
            async with r.pipeline(transaction=True) as p:
                p.hset(self._job(job.id), mapping=state.to_hash())
                p.expire(self._job(job.id), self.result_ttl)
                for name, data in job.inputs.items():
                    p.set(self._input(job.id, name), data, ex=self.result_ttl)
                p.hset(self._job(job.id), "inputs", ",".join(job.inputs))
                p.xadd(self.stream, {"id": job.id})
                await p.execute()
            return state

        return await self._call(go)

    async def state(self, job_id: str) -> Optional[JobState]:
        h = await self._call(lambda r: r.hgetall(self._job(job_id)))
        return JobState.from_hash(h) if h else None

    async def wait(self, job_id: str, timeout: float) -> Optional[JobState]:
        deadline = time.monotonic() + timeout
        state = await self.state(job_id)
        while state is not None and state.status not in ENDED:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            # blocks in Redis until the worker pushes the token; put it back for any other waiter
            block = max(0.01, min(remaining, BLOCK_SLICE))
            got = await self._call(lambda r: r.blpop([self._done(job_id)], timeout=block))
            if got:
                await self._call(lambda r: r.rpush(self._done(job_id), b"1"))
            state = await self.state(job_id)
        return state

    async def result(self, job_id: str, n: int) -> Optional[bytes]:
        return await self._call(lambda r: r.get(self._result(job_id, n)))

    async def cancel(self, job_id: str) -> Optional[JobState]:
        await self._call(lambda r: self._async_transition(
            keys=[self._job(job_id), self._done(job_id)], client=r,
            args=["queued,running", self.result_ttl, "status", "cancelled", "finished", time.time()]))
        return await self.state(job_id)

    async def depth(self) -> int:
        return await self._call(lambda r: r.xlen(self.stream))

    async def workers(self) -> int:
        async def go(r):
            return len([k async for k in r.scan_iter(match=f"{self.prefix}:worker:*", count=100)])
        return await self._call(go)

    async def stats(self) -> dict:
        h = await self._call(lambda r: r.hgetall(f"{self.prefix}:stats"))
        return {k.decode(): float(v) for k, v in h.items()}

    async def ping(self) -> None:
        await self._call(lambda r: r.ping())

    async def aclose(self) -> None:
        if self._async is not None:
            await self._async.aclose()
            self._async = None

    # --- a worker's side

    def _redis(self):
        import redis

        if self._sync is None:
            self._sync = redis.Redis.from_url(self.url, socket_connect_timeout=5, socket_timeout=SOCKET_TIMEOUT)
            self._transition = self._sync.register_script(_TRANSITION)
            self._create_group(self._sync)
        return self._sync

    def _create_group(self, r) -> None:
        import redis

        try:
            r.xgroup_create(self.stream, self.GROUP, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    def _set(self, job_id: str, allowed: str, client=None, **fields):
        args = [allowed, self.result_ttl] + [x for kv in fields.items() for x in (kv[0], "" if kv[1] is None else kv[1])]
        return self._transition(keys=[self._job(job_id), self._done(job_id)], args=args, client=client)

    def _ack(self, p, entry: str) -> None:
        p.xack(self.stream, self.GROUP, entry)
        p.xdel(self.stream, entry)

    def take(self, max_jobs: int, block: float, gather: float, consumer: str = "worker") -> list[Job]:
        """Up to max_jobs jobs, now running: first entries other workers left idle past the visibility
        timeout, then new ones (blocking up to `block` s for the first, `gather` s for more)."""
        import redis

        r = self._redis()
        try:
            _, claimed, _ = r.xautoclaim(self.stream, self.GROUP, consumer, min_idle_time=self.visibility_ms,
                                         start_id="0-0", count=max_jobs)
        except redis.ResponseError as e:
            if "NOGROUP" not in str(e):
                raise
            # Redis restarted empty (no persistence) or the stream was deleted: make the group again, from
            # the stream's start, so jobs the API added since are read, not skipped
            self._create_group(r)
            return []
        entries = [(e, f) for e, f in claimed if f]
        if len(entries) < max_jobs:
            entries += self._read(r, consumer, max_jobs - len(entries), None if entries else block)
        # The first job is in: give others `gather` s to join it. Redis ends a blocking read that times out
        # only at its next tick (every 100 ms at its default hz of 10), far too late for a window of a few
        # ms, so the window is kept here: short sleeps, each followed by a read that does not block.
        end = time.monotonic() + gather
        while entries and len(entries) < max_jobs and (left := end - time.monotonic()) > 0:
            time.sleep(min(left, GATHER_POLL))
            entries += self._read(r, consumer, max_jobs - len(entries), None)
        jobs = []
        for entry, fields in entries:
            job = self._start(r, entry.decode(), fields[b"id"].decode(), consumer)
            if job is not None:
                jobs.append(job)
        return jobs

    def _read(self, r, consumer: str, count: int, block: Optional[float]) -> list:
        """Up to `count` new stream entries for `consumer`, waiting up to `block` s for the first (Redis
        answers as soon as one is added); block None: answer at once."""
        block_ms = None if not block or block <= 0 else max(1, int(min(block, BLOCK_SLICE) * 1000))  # 0: forever
        got = r.xreadgroup(self.GROUP, consumer, {self.stream: ">"}, count=count, block=block_ms)
        return [item for _, items in got or [] for item in items]

    def _start(self, r, entry: str, job_id: str, consumer: str) -> Optional[Job]:
        ok, status = self._set(job_id, "queued,running", status="running", started=time.time(), step=0,
                               worker=consumer)
        if not ok:  # cancelled while queued, or expired: nothing to run
            with r.pipeline() as p:
                self._ack(p, entry)
                p.execute()
            return None
        attempts = r.hincrby(self._job(job_id), "attempts", 1)
        state = JobState.from_hash(r.hgetall(self._job(job_id)))
        if attempts > self.max_attempts:  # its workers kept dying: stop trying
            job = Job(job_id, state.mode, state.params, attempts=attempts, entry=entry)
            self._end_failed(job, f"gave up after {self.max_attempts} attempts (worker lost)", "error")
            return None
        names = [n for n in (r.hget(self._job(job_id), "inputs") or b"").decode().split(",") if n]
        inputs = {n: r.get(self._input(job_id, n)) for n in names}
        if any(v is None for v in inputs.values()):
            job = Job(job_id, state.mode, state.params, attempts=attempts, entry=entry)
            self._end_failed(job, "the job's input images expired", "error")
            return None
        return Job(job_id, state.mode, state.params, inputs, attempts, entry, created=state.created)

    def progress(self, jobs: list[Job], step: int, total: int, consumer: str = "worker") -> set[str]:
        r = self._redis()
        with r.pipeline(transaction=False) as p:
            for job in jobs:
                p.hset(self._job(job.id), mapping={"step": step, "total": total})
                p.hget(self._job(job.id), "status")
            # claiming our own entries resets their idle time: no one else takes a job that is progressing
            p.xclaim(self.stream, self.GROUP, consumer, 0, [j.entry for j in jobs], justid=True)
            out = p.execute()
        statuses = out[1:-1:2]
        return {j.id for j, s in zip(jobs, statuses) if s in (None, b"cancelled")}

    def finish(self, job: Job, pngs: list[bytes]) -> None:
        r = self._redis()
        with r.pipeline(transaction=True) as p:
            for n, data in enumerate(pngs):
                p.set(self._result(job.id, n), data, ex=self.result_ttl)
            self._set(job.id, "running", client=p, status="done", images=len(pngs), finished=time.time(),
                      params=json.dumps(job.params))
            for name in job.inputs:
                p.delete(self._input(job.id, name))
            self._ack(p, job.entry)
            p.execute()
        state = JobState.from_hash(r.hgetall(self._job(job.id)) or {"id": job.id, "mode": job.mode,
                                                                     "status": "gone", "params": "{}"})
        if state.status == "done":
            self.record({**_count_end("done"), **_latency(state)})

    def fail(self, job: Job, error: str, *, retry: bool, kind: str = "error") -> str:
        if retry and job.attempts < self.max_attempts:
            r = self._redis()
            ok, status = self._set(job.id, "running", status="queued", error=error, step=0)
            with r.pipeline(transaction=True) as p:
                if ok:
                    p.xadd(self.stream, {"id": job.id})
                self._ack(p, job.entry)
                p.execute()
            return "queued" if ok else status.decode()
        return self._end_failed(job, error, kind)

    def _end_failed(self, job: Job, error: str, kind: str) -> str:
        r = self._redis()
        ok, status = self._set(job.id, "queued,running", status="failed", error=error, error_kind=kind,
                               finished=time.time())
        with r.pipeline() as p:
            self._ack(p, job.entry)
            p.execute()
        if ok:
            self.record(_count_end("failed"))
        return status.decode()

    def cancelled(self, job: Job) -> None:
        r = self._redis()
        with r.pipeline() as p:
            self._ack(p, job.entry)
            p.execute()
        self.record(_count_end("cancelled"))

    def release(self, jobs: list[Job]) -> None:
        r = self._redis()
        for job in jobs:
            ok, _ = self._set(job.id, "running", status="queued", started="")
            with r.pipeline(transaction=True) as p:
                if ok:
                    p.hincrby(self._job(job.id), "attempts", -1)
                    p.xadd(self.stream, {"id": job.id})
                self._ack(p, job.entry)
                p.execute()

    def heartbeat(self, consumer: str, ttl: float) -> None:
        self._redis().set(f"{self.prefix}:worker:{consumer}", time.time(), ex=max(1, int(ttl)))

    def record(self, increments: dict) -> None:
        with self._redis().pipeline(transaction=False) as p:
            for k, v in increments.items():
                p.hincrbyfloat(f"{self.prefix}:stats", k, v)
            p.execute()

    def close(self) -> None:
        if self._sync is not None:
            self._sync.close()
            self._sync = None


def make_queue(settings) -> "MemoryQueue | RedisQueue":
    common = dict(result_ttl=settings.result_ttl, max_attempts=settings.max_attempts,
                  visibility_timeout=settings.visibility_timeout)
    if settings.redis_url:
        return RedisQueue(settings.redis_url, prefix=settings.key_prefix, **common)
    return MemoryQueue(**common)
