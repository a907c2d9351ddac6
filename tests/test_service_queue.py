"""
service/queue.py: one contract suite run against both queues — the in-memory one and Redis Streams
on the real local Redis (db 15, a random key prefix, deleted afterwards). A job goes queued -> running
-> done/failed/cancelled; a waiter wakes when the job ends (woken, not polling: it blocks in Redis or on
a future); retries, releases, the queue limits (global and per lane), round-robin taking across lanes,
idempotency keys and the gather window behave the same on both. Redis only: the job of a worker whose
liveness key expired is claimed by another at once and the dead one's late result is dropped; a worker
that keeps alive keeps its job; a claim nobody refreshes falls to the visibility timeout; abandoned jobs
are taken again by their own worker; keys carry TTLs; an unreachable Redis is QueueUnavailable.
"""

import asyncio
import secrets
import threading
import time

import pytest

from service.queue import (IdempotencyConflict, Idempotency, Job, MemoryQueue, QueueFull, QueueUnavailable,
                           RedisQueue, new_job_id)

REDIS = "redis://127.0.0.1:6379/15"


def make_job(mode="txt2img", owner=None, **params):
    p = dict(prompt="a red circle", negative_prompt="", seed=1, guidance_scale=7.5, num_images=1, steps=2,
             sampler="ddim", width=16, height=16, strength=None)
    p.update(params)
    inputs = {"image": b"\x89PNG fake"} if mode != "txt2img" else {}
    return Job(new_job_id(), mode, p, inputs, created=time.time(), owner=owner)


@pytest.fixture(params=["memory", "redis"])
def make_queue(request):
    """A factory of queues of one kind; Redis ones share a fresh prefix, deleted afterwards."""
    prefix = f"test-{secrets.token_hex(4)}"

    def make(**kw):
        kw.setdefault("max_attempts", 2)
        if request.param == "memory":
            return MemoryQueue(**kw)
        return RedisQueue(REDIS, prefix=prefix, **kw)

    yield make
    if request.param == "redis":
        import redis

        r = redis.Redis.from_url(REDIS)
        keys = list(r.scan_iter(match=f"{prefix}:*"))
        if keys:
            r.delete(*keys)
        r.close()


def run(queue, body):
    """Run the async test body in a fresh loop, then close the queue's clients."""
    async def main():
        try:
            return await body()
        finally:
            await queue.aclose()
            queue.close()
    return asyncio.run(main())


def test_job_lifecycle_and_result(make_queue):
    q = make_queue()

    async def body():
        job = make_job("img2img", strength=0.5)
        state = await q.submit(job, limit=10)
        assert state.status == "queued" and await q.depth() == 1
        assert len(job.id) >= 20  # token_urlsafe(16): unguessable

        (taken,) = q.take(4, block=1, gather=0)
        assert (taken.id, taken.mode, taken.params, taken.inputs, taken.attempts) == \
            (job.id, "img2img", job.params, {"image": b"\x89PNG fake"}, 1)
        assert (await q.state(job.id)).status == "running"

        assert q.progress([taken], 1, 2) == set()
        s = await q.state(job.id)
        assert (s.status, s.step, s.total) == ("running", 1, 2)

        q.finish(taken, [b"png0", b"png1"])
        s = await q.wait(job.id, timeout=5)
        assert (s.status, s.images, s.step) == ("done", 2, 2) and s.finished >= s.created
        assert await q.result(job.id, 0) == b"png0" and await q.result(job.id, 1) == b"png1"
        assert await q.result(job.id, 2) is None and await q.state("nope") is None
        assert await q.depth() == 0
        assert (await q.stats())['sd_jobs_total{status="done"}'] == 1
    run(q, body)


def test_waiter_is_woken_when_the_job_ends(make_queue):
    q = make_queue()

    async def body():
        job = make_job()
        await q.submit(job, limit=10)
        (taken,) = q.take(1, block=1, gather=0)
        # nothing happens: the wait gives up after its timeout with the job still running
        assert (await q.wait(job.id, timeout=0.2)).status == "running"
        # a worker thread finishes it while we wait; two waiters both wake
        worker = threading.Timer(0.3, q.finish, args=(taken, [b"png"]))
        worker.start()
        a, b = await asyncio.gather(q.wait(job.id, timeout=30), q.wait(job.id, timeout=30))
        worker.join()
        assert a.status == b.status == "done"
    run(q, body)


def test_cancel_queued_and_running(make_queue):
    q = make_queue()

    async def body():
        queued, running = make_job(seed=1), make_job(seed=2)
        await q.submit(running, limit=10)
        (taken,) = q.take(1, block=1, gather=0)
        await q.submit(queued, limit=10)

        assert (await q.cancel(queued.id)).status == "cancelled"
        assert q.take(4, block=0.2, gather=0) == []        # a cancelled queued job never runs

        assert (await q.cancel(running.id)).status == "cancelled"
        assert q.progress([taken], 1, 5) == {running.id}  # the worker learns at its next step
        q.finish(taken, [b"late"])                         # a result after the cancel does not revive it
        assert (await q.wait(running.id, timeout=5)).status == "cancelled"
        assert await q.depth() == 0
    run(q, body)


def test_retry_then_fail_and_invalid_fails_at_once(make_queue):
    q = make_queue(max_attempts=2)

    async def body():
        job, bad = make_job(), make_job(seed=9)
        await q.submit(job, limit=10)
        (first,) = q.take(1, block=1, gather=0)
        assert q.fail(first, "RuntimeError: flaky", retry=True) == "queued"
        s = await q.state(job.id)
        assert (s.status, s.error) == ("queued", "RuntimeError: flaky")
        (second,) = q.take(1, block=1, gather=0)
        assert second.attempts == 2
        assert q.fail(second, "RuntimeError: still", retry=True) == "failed"  # out of attempts
        s = await q.wait(job.id, timeout=5)
        assert (s.status, s.error, s.error_kind) == ("failed", "RuntimeError: still", "error")

        await q.submit(bad, limit=10)
        (taken,) = q.take(1, block=1, gather=0)
        assert q.fail(taken, "image is not a readable image", retry=False, kind="invalid") == "failed"
        s = await q.state(bad.id)
        assert (s.status, s.error_kind, s.attempts) == ("failed", "invalid", 1)
    run(q, body)


def test_queue_limit_gather_window_and_release(make_queue):
    q = make_queue()

    async def body():
        jobs = [make_job(seed=i) for i in range(3)]
        for job in jobs:
            await q.submit(job, limit=3)
        with pytest.raises(QueueFull):
            await q.submit(make_job(), limit=3)

        first = q.take(2, block=1, gather=0.05)
        assert [j.id for j in first] == [jobs[0].id, jobs[1].id]
        q.release(first)                                   # a stopping worker gives them back ...
        assert [(await q.state(j.id)).status for j in jobs] == ["queued"] * 3
        again = q.take(8, block=1, gather=0.05)            # ... and they run again, first attempt still
        assert sorted(j.id for j in again) == sorted(j.id for j in jobs)
        assert [j.attempts for j in again] == [1, 1, 1]

        # the gather window: a job arriving shortly after the first joins its batch
        late = make_job(seed=7)
        await q.submit(make_job(seed=6), limit=10)
        t = threading.Thread(target=_submit_later, args=(q, late, 0.1))
        t.start()
        batch = q.take(8, block=1, gather=1.0)
        t.join()
        assert late.id in [j.id for j in batch] and len(batch) == 2
    run(q, body)


def _submit_later(q, job, delay):
    """Another client adds a job after `delay` seconds (its own event loop and, for Redis, its own client)."""
    time.sleep(delay)
    other = q if isinstance(q, MemoryQueue) else RedisQueue(q.url, prefix=q.prefix)

    async def go():
        await other.submit(job, limit=10)
        if other is not q:
            await other.aclose()
    asyncio.run(go())


def test_keep_alive_and_stats(make_queue):
    q = make_queue()

    async def body():
        assert await q.workers() == 0
        q.keep_alive("w1", ttl=30)
        q.keep_alive("w2", ttl=30)
        assert await q.workers() == 2
        q.record({"sd_batch_size_count": 1.0, "sd_batch_size_sum": 3.0})
        q.record({"sd_batch_size_count": 1.0, "sd_batch_size_sum": 1.0})
        stats = await q.stats()
        assert stats["sd_batch_size_count"] == 2 and stats["sd_batch_size_sum"] == 4
        await q.ping()
    run(q, body)


def test_keep_alive_announces_the_model_while_the_worker_lives(make_queue):
    """What a worker serves rides on its liveness key (the API's pixel limit follows it: service/models.py)."""
    q = make_queue()

    async def body():
        assert await q.models() == []
        q.keep_alive("xl", ttl=30, model={"model": "sdxl", "native_size": 1024})
        q.keep_alive("quiet", ttl=30)  # a worker that says nothing is counted, and announces nothing
        assert await q.workers() == 2 and await q.models() == [{"model": "sdxl", "native_size": 1024}]
        q.keep_alive("xl", ttl=0.2, model={"model": "sdxl", "native_size": 1024})
        time.sleep(0.4)  # the worker died: its announcement went with its key
        assert await q.models() == []
    run(q, body)


def test_lanes_are_taken_round_robin_and_limited_one_by_one(make_queue):
    """One lane (API key) with a backlog does not starve another: a take goes round the lanes, one job each
    in turn; a lane over its own limit is refused while the others still get in."""
    q = make_queue()

    async def body():
        a = [make_job(seed=i) for i in range(6)]
        b = make_job(seed=100)
        for job in a:
            job.owner = "a" * 64
            await q.submit(job, limit=20, lane_limit=6)
        b.owner = "b" * 64
        with pytest.raises(QueueFull) as full:
            await q.submit(make_job(owner="a" * 64), limit=20, lane_limit=6)
        assert full.value.lane and "this API key has 6 jobs" in str(full.value)
        await q.submit(b, limit=20, lane_limit=6)               # another key is not affected
        first = q.take(3, block=1, gather=0)
        assert [j.id for j in first] == [a[0].id, b.id, a[1].id]  # b's one job in the first batch
        assert [j.owner for j in first] == ["a" * 64, "b" * 64, "a" * 64]
        rest = q.take(8, block=1, gather=0)
        assert [j.id for j in rest] == [j.id for j in a[2:]]
        with pytest.raises(QueueFull) as full:                  # the global limit counts every lane
            await q.submit(make_job(owner="c" * 64), limit=7)
        assert not full.value.lane and "holds 7 jobs" in str(full.value)
    run(q, body)


def test_an_idempotency_key_gives_back_its_job(make_queue):
    q = make_queue()

    async def body():
        key = Idempotency("retry-1", "f" * 64)
        first = await q.submit(make_job(seed=1), limit=10, idempotency=key)
        again = await q.submit(make_job(seed=2), limit=10, idempotency=key)  # a retry: the first job back
        assert again.id == first.id and again.params["seed"] == 1 and await q.depth() == 1
        with pytest.raises(IdempotencyConflict) as conflict:   # the same key, another request
            await q.submit(make_job(seed=3), limit=10, idempotency=Idempotency("retry-1", "0" * 64))
        assert conflict.value.job_id == first.id and await q.depth() == 1
        other_key = make_job(seed=4, owner="b" * 64)              # another API key's "retry-1" is its own
        assert (await q.submit(other_key, limit=10, idempotency=key)).id == other_key.id
        (taken, _) = q.take(2, block=1, gather=0)
        q.finish(taken, [b"png"])                               # still the same job once it is done
        assert (await q.submit(make_job(seed=5), limit=10, idempotency=key)).status == "done"
        assert await q.depth() == 1
    run(q, body)


# --- Redis only: liveness, takeover, fencing


@pytest.fixture
def prefix():
    """A fresh key prefix on the local Redis (db 15), deleted afterwards."""
    import redis

    prefix = f"test-{secrets.token_hex(4)}"
    yield prefix
    r = redis.Redis.from_url(REDIS)
    keys = list(r.scan_iter(match=f"{prefix}:*"))
    if keys:
        r.delete(*keys)
    r.close()


def test_redis_a_dead_workers_job_is_claimed_once_its_liveness_key_expires(prefix):
    """Two workers (two queues, as two processes have): the one that dies stops refreshing its liveness key;
    as soon as the key has expired the other claims its job, however long the visibility timeout; the dead
    one's late result (had it been only slow) is not stored: the job is stored once, by the one running it."""
    import redis

    r = redis.Redis.from_url(REDIS)
    dies, other = (RedisQueue(REDIS, prefix=prefix, liveness_ttl=1.0, result_ttl=100, max_attempts=3) for _ in "ab")

    async def body():
        job = make_job("img2img")
        await q_submit(other, job)
        assert 0 < r.ttl(f"{prefix}:job:{job.id}") <= 100 and 0 < r.ttl(f"{prefix}:input:{job.id}:image") <= 100
        dies.keep_alive("dies", ttl=1.0)
        (lost,) = dies.take(1, block=1, gather=0, consumer="dies")
        other.keep_alive("other", ttl=30)
        assert other.take(1, block=0.1, gather=0, consumer="other") == []  # its worker is alive
        wait_until(lambda: not r.exists(f"{prefix}:worker:dies"), timeout=5)
        (claimed,) = other.take(1, block=1, gather=0, consumer="other")     # visibility timeout: 300 s
        assert claimed.id == job.id and claimed.attempts == 2 and claimed.inputs == job.inputs
        assert claimed.worker == "other" and (await other.state(job.id)).worker == "other"
        assert dies.progress([lost], 3, 4, consumer="dies") == {job.id}     # the slow one learns to stop ...
        dies.finish(lost, [b"late"])                                        # ... and its result is dropped
        assert (await other.state(job.id)).status == "running"
        other.finish(claimed, [b"png"])
        assert await other.result(job.id, 0) == b"png"
        assert 0 < r.ttl(f"{prefix}:result:{job.id}:0") <= 100 and 0 < r.ttl(f"{prefix}:job:{job.id}") <= 100
        assert (await other.state(job.id)).status == "done" and await other.depth() == 0
        assert not r.exists(other.stream())                                  # an empty lane's stream goes
        stats = await other.stats()
        assert stats["sd_jobs_reclaimed_total"] == 1 and stats["sd_results_dropped_total"] == 1
        assert stats['sd_jobs_total{status="done"}'] == 1
    try:
        run(other, body)
    finally:
        dies.close()
        r.close()


def test_redis_keep_alive_keeps_a_long_job_and_a_stuck_claim_falls_to_the_visibility_timeout(prefix):
    import redis

    r = redis.Redis.from_url(REDIS)
    busy, other = (RedisQueue(REDIS, prefix=prefix, liveness_ttl=0.5, visibility_timeout=1.0) for _ in "ab")

    async def body():
        job = make_job()
        await q_submit(other, job)
        busy.keep_alive("busy", ttl=0.5)
        (mine,) = busy.take(1, block=1, gather=0, consumer="busy")
        other.keep_alive("other", ttl=30)
        for _ in range(15):  # 1.5 s: three liveness TTLs, past the visibility timeout, kept alive all along
            time.sleep(0.1)
            busy.keep_alive("busy", 0.5)
            assert other.take(1, block=0, gather=0, consumer="other") == []
        busy.finish(mine, [b"png"])
        assert (await other.state(job.id)).attempts == 1

        # a worker that stays "alive" (its key refreshed) but no longer refreshes its claim: after the
        # visibility timeout the job is claimed anyway (the safety net)
        stuck = make_job(seed=2)
        await q_submit(other, stuck)
        (held,) = busy.take(1, block=1, gather=0, consumer="busy")
        r.set(f"{prefix}:worker:busy", 1, px=5000)  # "alive" for 5 s, but its claim is not refreshed
        time.sleep(0.6)
        assert other.take(1, block=0, gather=0, consumer="other") == []
        time.sleep(0.6)
        (claimed,) = other.take(1, block=0, gather=0, consumer="other")
        assert claimed.id == stuck.id and claimed.attempts == 2
        other.finish(claimed, [b"png"])
    try:
        run(other, body)
    finally:
        busy.close()
        r.close()


def test_redis_abandoned_jobs_are_taken_again_by_their_own_worker(prefix):
    """A worker that lost Redis mid-batch abandons its jobs; its entries stay pending under its name (its
    liveness key is fresh again soon), so its own next take claims them and runs them again."""
    q = RedisQueue(REDIS, prefix=prefix)

    async def body():
        jobs = [make_job(seed=i) for i in range(2)]
        for job in jobs:
            await q_submit(q, job)
        q.keep_alive("w", ttl=30)
        taken = q.take(2, block=1, gather=0, consumer="w")
        assert q.take(2, block=0, gather=0, consumer="w") == []  # runs it holds are not taken again ...
        q.abandon(taken)
        again = q.take(8, block=0, gather=0, consumer="w")        # ... abandoned ones are
        assert [j.id for j in again] == [j.id for j in jobs] and [j.attempts for j in again] == [2, 2]
        for job in again:
            q.finish(job, [b"png"])
        assert await q.depth() == 0 and (await q.state(jobs[0].id)).status == "done"
    run(q, body)


async def q_submit(q, job):
    return await q.submit(job, limit=100)


def wait_until(check, timeout: float, step: float = 0.05) -> None:
    end = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < end, "timed out"
        time.sleep(step)


def test_redis_unreachable_is_queue_unavailable():
    q = RedisQueue("redis://127.0.0.1:1/0")

    async def body():
        with pytest.raises(QueueUnavailable):
            await q.submit(make_job(), limit=10)
        with pytest.raises(QueueUnavailable):
            await q.ping()
    run(q, body)
