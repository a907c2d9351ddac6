"""The job queue between the API and the workers: Redis Streams, or memory for one process.

A job moves   queued -> running -> done | failed | cancelled   (running -> queued again when
it is retried or its worker lets it go). Both queues have the same two faces:

  the API's (async):   submit, state, wait, result, cancel, depth, workers, models, stats, ping, watch, preview
  a worker's (sync):   take, progress, finish, fail, cancelled, release, abandon, keep_alive, record, watched,
                       store_preview

Previews: an API that wants a job's live preview calls watch(id) (the job is watched for WATCH_S s) and reads
preview(id); a worker asks watched(jobs) every few steps and makes previews only of those (store_preview):
nobody watching, no preview work.

Fairness and routing: every job belongs to a lane, its model's and its API key's (owner digest; "-" without
keys). A worker reads only the lanes of the models it serves (take's `models`), round-robin across those that
have waiting jobs, one job a lane a turn, so one key's backlog delays another key's job by at most about one
batch; one key may hold at most `lane_limit` jobs over all models (QueueFull).

Idempotency: a submit may carry (key, fingerprint). The same key in the same lane within the result TTL
gives back the job it made first (nothing new is queued); the same key with another fingerprint raises
IdempotencyConflict.

RedisQueue keys (prefix "sd" by default; standalone Redis >= 7.0, not Cluster: scripts name keys
they build from the prefix):

  sd:jobs:{model}/{key}   stream of a lane's jobs (a lane: one model and one API key), consumer group "workers";
                          one entry {id} per run of a job, deleted (XACK + XDEL) when the run ends; the stream
                          is deleted when empty
  sd:lanes                set: the lanes whose stream exists
  sd:models               set: the models that ever had a lane (what a worker serving any model reads)
  sd:ready:{model}        list: the model's lanes that may hold entries no worker has read yet, round-robin order
  sd:bell:{model}, sd:bell  lists: a token per job queued (in its model's and in the any-model bell); an idle
                          worker BLPOPs the bells of its models (woken, not polling)
  sd:job:{id}             hash: status, mode, params (JSON), step, total, error, attempts, worker, times
  sd:input:{id}:{name}    an uploaded image or mask, as sent
  sd:result:{id}:{n}      result PNG n
  sd:done:{id}            list: a token pushed when the job ends; waiters BLPOP it (no polling)
  sd:idem:{lane}:{hash}   "fingerprint job-id" of an Idempotency-Key
  sd:worker:{name}        a worker's liveness key: a few seconds' TTL, refreshed by a thread of its own; its
                          value is JSON, the model the worker serves ({"model", "native_size"}: models())
  sd:stats                hash of metric samples the workers add to (service/metrics.py)
  sd:watch:{id}           "1" while someone wants the job's preview (WATCH_S TTL)
  sd:preview:{id}         the job's latest preview PNG (PREVIEW_TTL)

Liveness: a worker's keep-alive thread (service/worker.py) refreshes its liveness key and the claims
(XCLAIM) of the entries it is running about once a second, however long a step takes. Before it reads
new entries, a worker claims (1) the entries of consumers whose liveness key has expired: dead workers'
jobs run again within seconds; (2) its own pending entries that it is not running: those of a batch it
abandoned when Redis went away (after a Redis restart from its AOF they are still there); (3) entries
idle past the visibility timeout whatever their consumer (a safety net). A job's hash names the worker
running it, and every change a worker makes is fenced by that name: a worker whose job was taken over
stores nothing and acknowledges nothing, so each job is stored once.

Every change of state is one Lua script, so a cancel, a takeover and a worker never overwrite each other.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import secrets
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

GATHER_POLL = 0.002     # seconds between a Redis worker's reads during its gather window
SOCKET_TIMEOUT = 10.0   # seconds a Redis reply may take before the queue counts as unreachable
BLOCK_SLICE = 5.0       # longest blocking Redis read (BLPOP), well under SOCKET_TIMEOUT:
                        # longer waits are several reads, so no wait is mistaken for a dead Redis
WATCH_S = 10            # seconds a preview request keeps a job watched: its worker makes previews that long
PREVIEW_TTL = 120       # seconds a job's latest preview PNG is kept
OUTAGE_PAUSE = (0.25, 2.0)  # seconds between a waiter's tries while Redis is unreachable (doubling)
NO_LANE = "-"           # the lane of jobs made without API keys

STATUSES = ("queued", "running", "done", "failed", "cancelled")
ENDED = ("done", "failed", "cancelled")


class QueueFull(Exception):
    """More jobs are waiting than the queue limit (or the lane's limit: `lane` True) allows (answer 429)."""

    def __init__(self, message: str, *, lane: bool = False):
        super().__init__(message)
        self.lane = lane


class QueueUnavailable(Exception):
    """The queue cannot be reached (answer 503)."""


class IdempotencyConflict(Exception):
    """An idempotency key came again with another request (answer 422)."""

    def __init__(self, job_id: str):
        super().__init__(f"the key was used for job {job_id}, made from another request")
        self.job_id = job_id


def new_job_id() -> str:
    return secrets.token_urlsafe(16)  # 128 random bits: job ids cannot be guessed


def lane_of(owner: Optional[str]) -> str:
    return owner or NO_LANE


def model_lane(model: Optional[str], owner: Optional[str]) -> str:
    """The queue a job waits in: one a (model, API key) pair, "model/key". Workers read the lanes of the models they
    serve; fairness is round-robin across the lanes of those models. (A job naming no model: NO_LANE's model.)"""
    return f"{model or NO_LANE}/{lane_of(owner)}"


def model_of_lane(lane: str) -> str:
    return lane.split("/", 1)[0]


@dataclass(frozen=True)
class Idempotency:
    """An Idempotency-Key and the fingerprint of the request it came with; `part`: which of the jobs of a
    request that makes several (the web UI's batch_size * n_iter)."""
    key: str
    fingerprint: str
    part: int = 0

    def digest(self) -> str:
        return hashlib.sha256(f"{self.part}:{self.key}".encode()).hexdigest()


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
    worker: str = ""                            # the worker (consumer) that started this run

    @property
    def lane(self) -> str:
        """The lane it waits in (model_lane); its API key's own lane, for limits and idempotency: lane_of(owner)."""
        return model_lane(self.params.get("model"), self.owner)


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
    worker: Optional[str] = None                # the worker running it (or that ran it last)

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
                   started=opt("started", float), finished=opt("finished", float), owner=h.get("owner") or None,
                   worker=h.get("worker") or None)


def _full(depth: int, limit: int) -> QueueFull:
    return QueueFull(f"the queue holds {depth} jobs, its limit is {limit}")


def _lane_full(depth: int, limit: int) -> QueueFull:
    return QueueFull(f"this API key has {depth} jobs queued or running, its limit is {limit} "
                     f"(other keys are not affected)", lane=True)


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
        self._lanes: dict[str, collections.deque[str]] = {}  # lane -> its queued job ids, in order
        self._ready: collections.deque[str] = collections.deque()  # lanes with queued jobs, round-robin order
        self._idempotent: dict[tuple[str, str], tuple[str, str, float]] = {}  # (lane, key) -> fingerprint, job, until
        self._waiters: dict[str, list] = collections.defaultdict(list)
        self._workers: dict[str, tuple[float, dict]] = {}  # consumer -> (alive until, the model it serves)
        self._stats: dict[str, float] = collections.defaultdict(float)
        self._runs = 0
        self._watched: dict[str, float] = {}     # job id -> watched until
        self._previews: dict[str, bytes] = {}    # job id -> its latest preview PNG

    # --- the API's side

    async def submit(self, job: Job, limit: int, *, lane_limit: int = 0,
                     idempotency: Optional[Idempotency] = None) -> JobState:
        with self._cond:
            self._expire()
            if idempotency is not None:
                prior = self._idempotent.get((lane_of(job.owner), idempotency.digest()))
                if prior is not None and prior[1] in self._jobs:
                    if prior[0] != idempotency.fingerprint:
                        raise IdempotencyConflict(prior[1])
                    return _copy(self._jobs[prior[1]])
            if (depth := self._depth()) >= limit:
                raise _full(depth, limit)
            if lane_limit and (mine := self._depth(lane_of(job.owner))) >= lane_limit:
                raise _lane_full(mine, lane_limit)
            state = JobState(job.id, job.mode, "queued", job.params, created=job.created or time.time(),
                             owner=job.owner)
            self._jobs[job.id], self._inputs[job.id] = state, dict(job.inputs)
            self._expires[job.id] = time.time() + self.result_ttl
            if idempotency is not None:
                self._idempotent[(lane_of(job.owner), idempotency.digest())] = (idempotency.fingerprint, job.id,
                                                                      self._expires[job.id])
            self._enqueue(job.id)
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
                    lane = model_lane(state.params.get("model"), state.owner)
                    self._lanes[lane].remove(job_id)
                    if not self._lanes[lane]:
                        self._ready.remove(lane)
                self._end(state, "cancelled")
            return _copy(state)

    async def depth(self) -> int:
        with self._cond:
            return self._depth()

    async def workers(self) -> int:
        with self._cond:
            now = time.time()
            return sum(1 for until, _ in self._workers.values() if until > now)

    async def models(self) -> list[dict]:
        """What each live worker said it serves (keep_alive's `model`), one dict a worker."""
        with self._cond:
            now = time.time()
            return [dict(model) for until, model in self._workers.values() if until > now and model]

    async def stats(self) -> dict:
        with self._cond:
            return dict(self._stats)

    async def ping(self) -> None:
        pass

    async def watch(self, job_id: str) -> None:
        with self._cond:
            self._watched[job_id] = time.time() + WATCH_S

    async def preview(self, job_id: str) -> Optional[bytes]:
        with self._cond:
            return self._previews.get(job_id)

    async def aclose(self) -> None:
        pass

    # --- a worker's side

    def take(self, max_jobs: int, block: float, gather: float, consumer: str = "worker",
             models: Optional[list[str]] = None) -> list[Job]:
        """Up to max_jobs queued jobs of `models` (None: any), now running, round-robin across their lanes: wait
        up to `block` seconds for one, then up to `gather` more seconds for others to join it."""
        jobs = []

        def mine() -> list[str]:
            return [lane for lane in self._ready if models is None or model_of_lane(lane) in models]

        with self._cond:
            self._cond.wait_for(mine, timeout=block)
            end = time.monotonic() + gather
            while (ready := mine()) and len(jobs) < max_jobs:
                lane = ready[0]
                self._ready.remove(lane)
                jobs.append(self._start(self._lanes[lane].popleft(), consumer))
                if self._lanes[lane]:
                    self._ready.append(lane)
                if len(jobs) < max_jobs and not mine() and gather > 0:
                    self._cond.wait_for(mine, timeout=max(0.0, end - time.monotonic()))
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
                self._enqueue(job.id)
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
        """Give jobs this worker took but will not run back to the queue, at the front of their lanes."""
        with self._cond:
            for job in reversed(jobs):
                state = self._jobs.get(job.id)
                if state is not None and state.status == "running":
                    state.status, state.attempts, state.started = "queued", state.attempts - 1, None
                    self._enqueue(job.id, front=True)

    def abandon(self, jobs: list[Job]) -> None:
        """The worker stopped these jobs without ending them (the queue failed under it): run them again."""
        self.release(jobs)

    def watched(self, jobs: list[Job]) -> set[str]:
        with self._cond:
            now = time.time()
            return {j.id for j in jobs if self._watched.get(j.id, 0) > now}

    def store_preview(self, job: Job, png: bytes) -> None:
        with self._cond:
            self._previews[job.id] = png

    def keep_alive(self, consumer: str, ttl: float, model: Optional[dict] = None) -> None:
        """The worker is alive for ttl s more (one process: nothing else can take its jobs), serving `model`."""
        with self._cond:
            self._workers[consumer] = (time.time() + ttl, dict(model or {}))

    def record(self, increments: dict) -> None:
        with self._cond:
            self._stats.update(_add(self._stats, increments))

    def close(self) -> None:
        pass

    # --- inside the lock

    def _depth(self, lane: Optional[str] = None) -> int:
        return sum(1 for s in self._jobs.values()
                   if s.status in ("queued", "running") and (lane is None or lane_of(s.owner) == lane))

    def _enqueue(self, job_id: str, front: bool = False) -> None:
        lane = model_lane(self._jobs[job_id].params.get("model"), self._jobs[job_id].owner)
        queued = self._lanes.setdefault(lane, collections.deque())
        queued.appendleft(job_id) if front else queued.append(job_id)
        if lane not in self._ready:
            self._ready.append(lane)
        self._cond.notify_all()

    def _start(self, job_id: str, consumer: str) -> Job:
        state = self._jobs[job_id]
        state.status, state.started, state.step, state.worker = "running", time.time(), 0, consumer
        state.attempts += 1
        self._runs += 1
        return Job(job_id, state.mode, state.params, self._inputs.get(job_id, {}), state.attempts,
                   entry=str(self._runs), created=state.created, owner=state.owner, worker=consumer)

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
            for d in (self._jobs, self._inputs, self._results, self._expires, self._previews, self._watched):
                d.pop(job_id, None)
        for key in [k for k, (_, _, until) in self._idempotent.items() if until < now]:
            del self._idempotent[key]


def _copy(state: Optional[JobState]) -> Optional[JobState]:
    return None if state is None else JobState(**{**asdict(state), "params": dict(state.params)})


def _add(stats: dict, increments: dict) -> dict:
    return {k: stats.get(k, 0.0) + v for k, v in increments.items()}


def _count_end(status: str) -> dict:
    from .metrics import count

    return count("sd_jobs_total", status=status)


def _latency(state: JobState) -> dict:
    return _latency_since(state.created) if state.status == "done" else {}


def _latency_since(created: float) -> dict:
    from .metrics import observe

    return observe("sd_job_seconds", max(0.0, time.time() - created))


# -----------------------------------------------------------------------------
# Redis Streams: any number of API processes and workers

# Every script gets the key prefix as ARGV[1] and starts with these helpers.
_LUA_COMMON = """
local P, GROUP = ARGV[1], 'workers'
local function stream_of(lane) return P .. ':jobs:' .. lane end
local function model_of(lane) return string.match(lane, '^[^/]*') end
local function ready_of(model) return P .. ':ready:' .. model end
local function ring(bell)
  redis.call('RPUSH', bell, '1')
  redis.call('LTRIM', bell, -64, -1)
end
-- a new entry for job `id` in its lane ("model/key"); the lane joins its model's round-robin; an idle worker of
-- that model is woken (and one serving any model)
local function enqueue(lane, id)
  local stream, model = stream_of(lane), model_of(lane)
  redis.pcall('XGROUP', 'CREATE', stream, GROUP, '0', 'MKSTREAM')  -- (BUSYGROUP when it exists)
  redis.call('XADD', stream, '*', 'id', id)
  redis.call('SADD', P .. ':lanes', lane)
  redis.call('SADD', P .. ':models', model)
  if not redis.call('LPOS', ready_of(model), lane) then redis.call('RPUSH', ready_of(model), lane) end
  ring(P .. ':bell:' .. model)
  ring(P .. ':bell')
end
-- the run `entry` is over: out of the stream, and an empty lane's stream goes with it
local function ack(lane, entry)
  local stream = stream_of(lane)
  redis.call('XACK', stream, GROUP, entry)
  redis.call('XDEL', stream, entry)
  if redis.call('XLEN', stream) == 0 then
    redis.call('DEL', stream)
    redis.call('SREM', P .. ':lanes', lane)
    redis.call('LREM', ready_of(model_of(lane)), 0, lane)
  end
end
-- the models ARGV[i] names (a comma list; '*': every model with lanes)
local function models_in(list)
  if list == '*' then return redis.call('SMEMBERS', P .. ':models') end
  local out = {}
  for m in string.gmatch(list, '[^,]+') do table.insert(out, m) end
  return out
end
-- add metric samples (a JSON object name -> increment) to the stats hash, in the step they count
local function count(stats)
  for name, value in pairs(cjson.decode(stats)) do redis.call('HINCRBYFLOAT', P .. ':stats', name, value) end
end
-- the job reached an end state: its inputs go, its waiters wake, everything of it expires in ttl s
local function ended(id, ttl)
  local job = P .. ':job:' .. id
  for name in string.gmatch(redis.call('HGET', job, 'inputs') or '', '[^,]+') do
    redis.call('DEL', P .. ':input:' .. id .. ':' .. name)
  end
  redis.call('RPUSH', P .. ':done:' .. id, '1')
  redis.call('EXPIRE', P .. ':done:' .. id, ttl)
  redis.call('EXPIRE', job, ttl)
end
"""

# ARGV: prefix, lane, id, limit, lane limit (0: none), ttl, idempotency key ('': none), fingerprint,
# input count, (name, bytes) per input, then the job hash's (field, value) pairs.
# Returns {'ok', id}, {'same' | 'conflict', the key's job id}, {'full' | 'lane_full', depth}.
_SUBMIT = _LUA_COMMON + """
local lane, id, limit, lane_limit, ttl = ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6]
local idem, fingerprint = ARGV[7], ARGV[8]
if idem ~= '' then
  local prior = redis.call('GET', idem)
  if prior then
    local sep = string.find(prior, ' ', 1, true)
    local prior_id = string.sub(prior, sep + 1)
    if redis.call('EXISTS', P .. ':job:' .. prior_id) == 1 then
      return {string.sub(prior, 1, sep - 1) == fingerprint and 'same' or 'conflict', prior_id}
    end
  end
end
local depth = 0
for _, l in ipairs(redis.call('SMEMBERS', P .. ':lanes')) do depth = depth + redis.call('XLEN', stream_of(l)) end
if depth >= limit then return {'full', depth} end
local key, mine = string.match(lane, '/(.*)$'), 0
if lane_limit > 0 then
  for _, l in ipairs(redis.call('SMEMBERS', P .. ':lanes')) do
    if string.match(l, '/(.*)$') == key then mine = mine + redis.call('XLEN', stream_of(l)) end
  end
  if mine >= lane_limit then return {'lane_full', mine} end
end
local job, i, names = P .. ':job:' .. id, 10, {}
for _ = 1, tonumber(ARGV[9]) do
  redis.call('SET', P .. ':input:' .. id .. ':' .. ARGV[i], ARGV[i + 1], 'EX', ttl)
  table.insert(names, ARGV[i])
  i = i + 2
end
redis.call('HSET', job, 'inputs', table.concat(names, ','), unpack(ARGV, i))
redis.call('EXPIRE', job, ttl)
if idem ~= '' then redis.call('SET', idem, fingerprint .. ' ' .. id, 'EX', ttl) end
enqueue(lane, id)
return {'ok', id}
"""

# Up to ARGV[3] new entries for consumer ARGV[2], of the models ARGV[4] (models_in), one from each ready lane of
# each model in turn (round-robin). Returns {lane, entry, job id, lane, entry, job id, ...}.
_TAKE = _LUA_COMMON + """
local me, max, out, n = ARGV[2], tonumber(ARGV[3]), {}, 0
local models = models_in(ARGV[4])
local open = #models
while n < max and open > 0 do
  open = 0
  for _, model in ipairs(models) do
    local ready = ready_of(model)
    local lane = n < max and redis.call('LMOVE', ready, ready, 'LEFT', 'RIGHT')
    while lane do
      local got = redis.pcall('XREADGROUP', 'GROUP', GROUP, me, 'COUNT', 1, 'STREAMS', stream_of(lane), '>')
      if type(got) == 'table' and got[1] then
        local entry = got[1][2][1]
        table.insert(out, lane); table.insert(out, entry[1]); table.insert(out, entry[2][2])
        n = n + 1
        open = open + 1
        break
      end
      redis.call('LREM', ready, 0, lane)  -- nothing new in it (or no stream): out of the round-robin
      lane = redis.call('LMOVE', ready, ready, 'LEFT', 'RIGHT')
    end
  end
end
return out
"""

# Entries for consumer ARGV[2] to run again, up to ARGV[5], in lanes of the models ARGV[6] (models_in): those of
# consumers whose liveness key is gone (idle at least ARGV[3] ms: so two workers never both claim one), its own
# pending entries but the ones it holds (ARGV[7..]: runs it is still on), and any entry idle longer than ARGV[4]
# ms (the visibility timeout).
# Returns {lane, entry, job id, ...} as _TAKE, and counts them (sd_jobs_reclaimed_total).
_RECLAIM = _LUA_COMMON + """
local me, dead_idle, visibility, max = ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
local held, nheld, out, n, served = {}, 0, {}, 0, {}
for i = 7, #ARGV do held[ARGV[i]] = true; nheld = nheld + 1 end
for _, m in ipairs(models_in(ARGV[6])) do served[m] = true end
local function add(lane, entries)
  for _, e in ipairs(entries) do
    if type(e) == 'table' and type(e[2]) == 'table' and not held[lane .. '/' .. e[1]] then
      table.insert(out, lane); table.insert(out, e[1]); table.insert(out, e[2][2])
      n = n + 1
    end
  end
end
for _, lane in ipairs(redis.call('SMEMBERS', P .. ':lanes')) do
  if n >= max then break end
  local stream = stream_of(lane)
  local summary = served[model_of(lane)] and redis.pcall('XPENDING', stream, GROUP)
  if type(summary) == 'table' and type(summary[1]) == 'number' and summary[1] > 0 then
    for _, c in ipairs(summary[4]) do
      local name = c[1]
      local gone = name ~= me and redis.call('EXISTS', P .. ':worker:' .. name) == 0
      if (gone or name == me) and n < max then
        local idle = gone and dead_idle or '0'
        local ids = {}
        for _, p in ipairs(redis.call('XPENDING', stream, GROUP, 'IDLE', idle, '-', '+', max - n + nheld, name)) do
          if not held[lane .. '/' .. p[1]] and #ids < max - n then table.insert(ids, p[1]) end
        end
        if #ids > 0 then add(lane, redis.call('XCLAIM', stream, GROUP, me, idle, unpack(ids))) end
        if gone and #redis.call('XPENDING', stream, GROUP, '-', '+', 1, name) == 0 then
          redis.call('XGROUP', 'DELCONSUMER', stream, GROUP, name)
        end
      end
    end
    if n < max then
      add(lane, redis.call('XAUTOCLAIM', stream, GROUP, me, visibility, '0-0', 'COUNT', max - n)[2])
    end
  end
end
if n > 0 then redis.call('HINCRBYFLOAT', P .. ':stats', 'sd_jobs_reclaimed_total', n) end
return out
"""

# Consumer ARGV[5] starts running job ARGV[4] (its entry ARGV[3] in lane ARGV[2]) at time ARGV[6].
# Returns {'ok', the job hash}, or {'skip'} (cancelled while queued, or expired: the entry is acknowledged),
# or {'failed'} (out of ARGV[7] attempts, or its inputs expired: failed, counted with ARGV[9], acknowledged).
_START = _LUA_COMMON + """
local lane, entry, id, me, now, ttl = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[8]
local max_attempts = tonumber(ARGV[7])
local job = P .. ':job:' .. id
local status = redis.call('HGET', job, 'status')
if status ~= 'queued' and status ~= 'running' then ack(lane, entry) return {'skip'} end
local function fail(error)
  redis.call('HSET', job, 'status', 'failed', 'error', error, 'error_kind', 'error', 'finished', now)
  ended(id, ttl)
  ack(lane, entry)
  count(ARGV[9])
  return {'failed'}
end
if redis.call('HINCRBY', job, 'attempts', 1) > max_attempts then
  return fail('gave up after ' .. max_attempts .. ' attempts (worker lost)')
end
for name in string.gmatch(redis.call('HGET', job, 'inputs') or '', '[^,]+') do
  if redis.call('EXISTS', P .. ':input:' .. id .. ':' .. name) == 0 then
    return fail("the job's input images expired")
  end
end
redis.call('HSET', job, 'status', 'running', 'started', now, 'step', 0, 'worker', me)
return {'ok', redis.call('HGETALL', job)}
"""

# Consumer ARGV[2] reports step ARGV[3] of ARGV[4] for jobs ARGV[5..]. Returns each job's status: 'running'
# (and recorded), 'cancelled', 'gone' (expired), or 'lost' (another worker runs it now).
_PROGRESS = _LUA_COMMON + """
local out = {}
for i = 5, #ARGV do
  local job = P .. ':job:' .. ARGV[i]
  local status, worker = redis.call('HGET', job, 'status'), redis.call('HGET', job, 'worker')
  if not status then table.insert(out, 'gone')
  elseif worker ~= ARGV[2] then table.insert(out, 'lost')
  else
    if status == 'running' then redis.call('HSET', job, 'step', ARGV[3], 'total', ARGV[4]) end
    table.insert(out, status)
  end
end
return out
"""

# Consumer ARGV[5] ends its run (lane ARGV[2], entry ARGV[3]) of job ARGV[4]: action ARGV[6] at time ARGV[8],
# keeping what ends for ARGV[7] s; the metric samples ARGV[9] (JSON) are added when the action takes effect
# (so a crash cannot end a job uncounted). Fenced: a job another worker runs now is left alone ({'lost'}).
#   done     ARGV[10] = n, ARGV[11 .. 10+n] the PNGs, ARGV[11+n] the params (JSON)
#   failed   ARGV[10] = error, ARGV[11] = kind
#   retry    ARGV[10] = error: queued again, in a new entry
#   release  queued again, this attempt not counted
#   ack      just acknowledge (the worker stopped a job that was cancelled: counted then)
# A job no longer running (cancelled, expired) only has its entry acknowledged. Returns {what happened}.
_END = _LUA_COMMON + """
local lane, entry, id, me, action, ttl, now = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8]
local job = P .. ':job:' .. id
local status, worker = redis.call('HGET', job, 'status'), redis.call('HGET', job, 'worker')
if status and worker ~= me then return {'lost'} end
if action == 'ack' or status ~= 'running' then
  ack(lane, entry)
  if action == 'ack' and status == 'cancelled' then count(ARGV[9]) end
  return {status or 'gone'}
end
if action == 'done' then
  local n = tonumber(ARGV[10])
  for k = 0, n - 1 do redis.call('SET', P .. ':result:' .. id .. ':' .. k, ARGV[11 + k], 'EX', ttl) end
  redis.call('HSET', job, 'status', 'done', 'images', n, 'finished', now, 'params', ARGV[11 + n],
             'step', redis.call('HGET', job, 'total') or '0')
  ended(id, ttl)
elseif action == 'failed' then
  redis.call('HSET', job, 'status', 'failed', 'error', ARGV[10], 'error_kind', ARGV[11], 'finished', now)
  ended(id, ttl)
elseif action == 'retry' or action == 'release' then
  if action == 'retry' then
    redis.call('HSET', job, 'status', 'queued', 'error', ARGV[10], 'step', 0)
  else
    redis.call('HSET', job, 'status', 'queued', 'started', '', 'worker', '')
    redis.call('HINCRBY', job, 'attempts', -1)
  end
  ack(lane, entry)
  enqueue(lane, id)
  return {'queued'}
end
ack(lane, entry)
count(ARGV[9])
return {action}
"""

# Consumer ARGV[2] is alive for ARGV[3] ms more (its liveness key, value ARGV[4]: the JSON of the model it
# serves, which the API reads); its runs (lane, entry) ARGV[5..] stay its claims (XCLAIM resets their idle
# time), unless another consumer holds one now.
_KEEP_ALIVE = _LUA_COMMON + """
local me = ARGV[2]
redis.call('SET', P .. ':worker:' .. me, ARGV[4], 'PX', ARGV[3])
for i = 5, #ARGV, 2 do
  local stream, entry = stream_of(ARGV[i]), ARGV[i + 1]
  local p = redis.pcall('XPENDING', stream, GROUP, entry, entry, 1)
  if type(p) == 'table' and type(p[1]) == 'table' and p[1][2] == me then
    redis.call('XCLAIM', stream, GROUP, me, 0, entry, 'JUSTID')
  end
end
return 1
"""

# The API's cancel: job ARGV[2], if queued or running, becomes cancelled (ARGV[3] = ttl, ARGV[4] = now).
_CANCEL = _LUA_COMMON + """
local id = ARGV[2]
local status = redis.call('HGET', P .. ':job:' .. id, 'status')
if status ~= 'queued' and status ~= 'running' then return 0 end
redis.call('HSET', P .. ':job:' .. id, 'status', 'cancelled', 'finished', ARGV[4])
ended(id, ARGV[3])
return 1
"""


def _triples(flat: list) -> list[tuple[str, str, str]]:
    """{lane, entry, job id, ...} as (lane, entry, job id) tuples of str."""
    flat = [x.decode() if isinstance(x, bytes) else x for x in flat]
    return list(zip(flat[0::3], flat[1::3], flat[2::3]))


class RedisQueue:
    """Jobs on Redis streams with a consumer group. The API uses the asyncio client, workers the
    blocking one; each is made on first use. (The consumer group, "workers", is named in the scripts.)"""

    def __init__(self, url: str, *, prefix: str = "sd", result_ttl: int = 3600, max_attempts: int = 3,
                 visibility_timeout: float = 300, liveness_ttl: float = 5.0):
        self.url, self.prefix = url, prefix
        self.result_ttl, self.max_attempts = int(result_ttl), max_attempts
        self.visibility_ms = int(visibility_timeout * 1000)
        self.liveness_ms = max(1, int(liveness_ttl * 1000))
        self._sync = None
        self._async = None
        self._held: dict[tuple[str, str], Job] = {}  # (lane, entry) -> the job this process is running under it
        self._held_lock = threading.Lock()  # guards _held, and the making of the blocking client

    # keys
    def stream(self, lane: str = f"{NO_LANE}/{NO_LANE}") -> str:
        """A lane's stream (default: that of jobs naming no model, made without API keys)."""
        return f"{self.prefix}:jobs:{lane}"

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
            self._async_scripts = {name: self._async.register_script(s)
                                   for name, s in (("submit", _SUBMIT), ("cancel", _CANCEL))}
        return self._async

    async def _call(self, coroutine_fn):
        """Run an async Redis operation; connection trouble becomes QueueUnavailable."""
        import redis

        try:
            return await coroutine_fn(self._client())
        except (redis.ConnectionError, redis.TimeoutError, OSError) as e:
            raise QueueUnavailable(f"Redis is unreachable: {e}") from e

    async def submit(self, job: Job, limit: int, *, lane_limit: int = 0,
                     idempotency: Optional[Idempotency] = None) -> JobState:
        state = JobState(job.id, job.mode, "queued", job.params, created=job.created or time.time(), owner=job.owner)
        idem = f"{self.prefix}:idem:{lane_of(job.owner)}:{idempotency.digest()}" if idempotency else ""
        args = [self.prefix, job.lane, job.id, limit, lane_limit, self.result_ttl, idem,
                idempotency.fingerprint if idempotency else "", len(job.inputs)]
        args += [x for name, data in job.inputs.items() for x in (name, data)]
        args += [x for kv in state.to_hash().items() for x in kv]
        what, value = await self._call(lambda r: self._async_scripts["submit"](args=args, client=r))
        what = what.decode()
        if what == "full":
            raise _full(value, limit)
        if what == "lane_full":
            raise _lane_full(value, lane_limit)
        if what == "conflict":
            raise IdempotencyConflict(value.decode())
        if what == "same":
            return await self.state(value.decode())
        return state

    async def state(self, job_id: str) -> Optional[JobState]:
        h = await self._call(lambda r: r.hgetall(self._job(job_id)))
        return JobState.from_hash(h) if h else None

    async def wait(self, job_id: str, timeout: float) -> Optional[JobState]:
        """The job's state once it has ended, or when `timeout` s have passed. While Redis is unreachable the
        wait goes on (a Redis restarted from its AOF still has the job); QueueUnavailable only if Redis is still
        away at the deadline. None: the job is gone (Redis came back without it)."""
        deadline = time.monotonic() + timeout
        pause = OUTAGE_PAUSE[0]
        while True:
            try:
                return await self._wait(job_id, deadline)
            except QueueUnavailable:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise
                await asyncio.sleep(min(pause, left))
                pause = min(2 * pause, OUTAGE_PAUSE[1])

    async def _wait(self, job_id: str, deadline: float) -> Optional[JobState]:
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
        await self._call(lambda r: self._async_scripts["cancel"](
            args=[self.prefix, job_id, self.result_ttl, time.time()], client=r))
        return await self.state(job_id)

    async def depth(self) -> int:
        async def go(r):
            lanes = await r.smembers(f"{self.prefix}:lanes")
            async with r.pipeline(transaction=False) as p:
                for lane in lanes:
                    p.xlen(self.stream(lane.decode()))
                return sum(await p.execute())
        return await self._call(go)

    async def workers(self) -> int:
        async def go(r):
            return len([k async for k in r.scan_iter(match=f"{self.prefix}:worker:*", count=100)])
        return await self._call(go)

    async def models(self) -> list[dict]:
        """What each live worker said it serves: the JSON of its liveness key (keep_alive's `model`). A key
        holding anything else (a worker of an older version wrote a timestamp there) says nothing."""
        async def go(r):
            keys = [k async for k in r.scan_iter(match=f"{self.prefix}:worker:*", count=100)]
            return await r.mget(keys) if keys else []
        models = []
        for value in await self._call(go):
            try:
                model = json.loads(value) if value is not None else None
            except ValueError:
                continue
            if isinstance(model, dict) and model:
                models.append(model)
        return models

    async def stats(self) -> dict:
        h = await self._call(lambda r: r.hgetall(f"{self.prefix}:stats"))
        return {k.decode(): float(v) for k, v in h.items()}

    async def ping(self) -> None:
        await self._call(lambda r: r.ping())

    async def watch(self, job_id: str) -> None:
        await self._call(lambda r: r.set(f"{self.prefix}:watch:{job_id}", b"1", ex=WATCH_S))

    async def preview(self, job_id: str) -> Optional[bytes]:
        return await self._call(lambda r: r.get(f"{self.prefix}:preview:{job_id}"))

    async def aclose(self) -> None:
        if self._async is not None:
            await self._async.aclose()
            self._async = None

    # --- a worker's side

    def _redis(self):
        import redis

        with self._held_lock:  # (the worker's loop and its keep-alive thread may both come first)
            if self._sync is None:
                client = redis.Redis.from_url(self.url, socket_connect_timeout=5, socket_timeout=SOCKET_TIMEOUT)
                self._scripts = {name: client.register_script(s) for name, s in (
                    ("take", _TAKE), ("reclaim", _RECLAIM), ("start", _START), ("progress", _PROGRESS),
                    ("end", _END), ("keep_alive", _KEEP_ALIVE))}
                self._sync = client
            return self._sync

    def _script(self, name: str, *args):
        self._redis()
        return self._scripts[name](args=[self.prefix, *args])

    def take(self, max_jobs: int, block: float, gather: float, consumer: str = "worker",
             models: Optional[list[str]] = None) -> list[Job]:
        """Up to max_jobs jobs of `models` (None: any model), now running: first those to run again (a dead
        worker's, our own abandoned ones, any idle past the visibility timeout), then new ones, round-robin
        across lanes (waiting up to `block` s for the first, then `gather` s for more to join it). A worker
        never reads another model's entries, so it never has to give one back."""
        r = self._redis()
        which = "*" if models is None else ",".join(models)
        bells = [f"{self.prefix}:bell"] if models is None else [f"{self.prefix}:bell:{m}" for m in models]
        with self._held_lock:
            held = [f"{lane}/{entry}" for lane, entry in self._held]
        entries = _triples(self._script("reclaim", consumer, self.liveness_ms // 2, self.visibility_ms, max_jobs,
                                        which, *held))
        if len(entries) < max_jobs:
            entries += self._read(consumer, max_jobs - len(entries), which)
        deadline = time.monotonic() + block
        while not entries and (left := deadline - time.monotonic()) > 0:
            # a token is pushed for every job queued, in its model's bell: sleep in Redis until one is, then read
            r.blpop(bells, timeout=max(0.01, min(left, BLOCK_SLICE)))
            entries = self._read(consumer, max_jobs, which)
        # The first job is in: give others `gather` s to join it, in short sleeps, each followed by a read
        end = time.monotonic() + gather
        while entries and len(entries) < max_jobs and (left := end - time.monotonic()) > 0:
            time.sleep(min(left, GATHER_POLL))
            entries += self._read(consumer, max_jobs - len(entries), which)
        jobs = [job for lane, entry, job_id in entries if (job := self._start(lane, entry, job_id, consumer))]
        return jobs

    def _read(self, consumer: str, count: int, models: str = "*") -> list[tuple[str, str, str]]:
        return _triples(self._script("take", consumer, count, models))

    def _start(self, lane: str, entry: str, job_id: str, consumer: str) -> Optional[Job]:
        started = self._script("start", lane, entry, job_id, consumer, time.time(), self.max_attempts,
                               self.result_ttl, json.dumps(_count_end("failed")))
        if started[0] != b"ok":
            return None
        h = dict(zip(started[1][0::2], started[1][1::2]))
        state = JobState.from_hash(h)
        names = [n for n in h.get(b"inputs", b"").decode().split(",") if n]
        inputs = dict(zip(names, self._sync.mget([self._input(job_id, n) for n in names]))) if names else {}
        job = Job(job_id, state.mode, state.params, inputs, state.attempts, entry, created=state.created,
                  owner=state.owner, worker=consumer)
        with self._held_lock:
            self._held[(lane, entry)] = job
        return job

    def progress(self, jobs: list[Job], step: int, total: int, consumer: str = "worker") -> set[str]:
        """Record progress; answer the ids of the jobs to stop: cancelled, expired, or now run by another worker."""
        statuses = self._script("progress", consumer, step, total, *[j.id for j in jobs])
        return {j.id for j, s in zip(jobs, statuses) if s != b"running"}

    def _end(self, job: Job, action: str, stats: dict, *args) -> str:
        """Run the _END script for the worker that started this run of the job (job.worker)."""
        try:
            got = self._script("end", job.lane, job.entry, job.id, job.worker, action, self.result_ttl, time.time(),
                               json.dumps(stats), *args)
        finally:
            with self._held_lock:
                self._held.pop((job.lane, job.entry), None)
        what = got[0].decode()
        if what == "lost":
            from .metrics import count

            self.record(count("sd_results_dropped_total"))
        return what

    def finish(self, job: Job, pngs: list[bytes]) -> None:
        stats = {**_count_end("done"), **_latency_since(job.created)}
        self._end(job, "done", stats, len(pngs), *pngs, json.dumps(job.params))

    def fail(self, job: Job, error: str, *, retry: bool, kind: str = "error") -> str:
        """Mark the job failed, or queue it again when `retry` and it has runs left. Returns its status."""
        if retry and job.attempts < self.max_attempts:
            return self._end(job, "retry", {}, error)
        return self._end(job, "failed", _count_end("failed"), error, kind)

    def cancelled(self, job: Job) -> None:
        """The worker stopped a cancelled job (its state already says so)."""
        self._end(job, "ack", _count_end("cancelled"))

    def release(self, jobs: list[Job]) -> None:
        """Give jobs this worker took but will not run back to the queue (at the end of their lanes)."""
        for job in jobs:
            self._end(job, "release", {})

    def abandon(self, jobs: list[Job]) -> None:
        """The worker stopped these jobs without ending them (Redis failed under it). Nothing is sent (Redis may
        be away): their entries stay pending under the worker's name, and its next take claims them again."""
        with self._held_lock:
            for job in jobs:
                self._held.pop((job.lane, job.entry), None)

    def watched(self, jobs: list[Job]) -> set[str]:
        """The ids of the jobs someone wants previews of now (one Redis round trip)."""
        flags = self._redis().mget([f"{self.prefix}:watch:{j.id}" for j in jobs]) if jobs else []
        return {j.id for j, flag in zip(jobs, flags) if flag}

    def store_preview(self, job: Job, png: bytes) -> None:
        self._redis().set(f"{self.prefix}:preview:{job.id}", png, ex=PREVIEW_TTL)

    def keep_alive(self, consumer: str, ttl: float, model: Optional[dict] = None) -> None:
        """Refresh the worker's liveness key (ttl s), which says what `model` it serves, and its claims on the
        runs it holds."""
        with self._held_lock:
            held = [x for lane, entry in self._held for x in (lane, entry)]
        self._script("keep_alive", consumer, max(1, int(ttl * 1000)), json.dumps(model or {}), *held)

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
        return RedisQueue(settings.redis_url, prefix=settings.key_prefix, liveness_ttl=settings.liveness_ttl, **common)
    return MemoryQueue(**common)
