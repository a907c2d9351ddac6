"""
service/queue.py: one contract suite run against both queues — the in-memory one and Redis Streams
on the real local Redis (db 15, a random key prefix, deleted afterwards). A job goes queued -> running
-> done/failed/cancelled; a waiter wakes when the job ends (woken, not polling: it blocks in Redis or on
a future); retries, releases, the queue limit and the gather window behave the same on both. Redis only:
an entry whose worker went silent is claimed by another (XAUTOCLAIM), keys carry TTLs, and an
unreachable Redis is QueueUnavailable.
"""

import asyncio
import secrets
import threading
import time

import pytest

from service.queue import Job, MemoryQueue, QueueFull, QueueUnavailable, RedisQueue, new_job_id

REDIS = "redis://127.0.0.1:6379/15"


def make_job(mode="txt2img", **params):
    p = dict(prompt="a red circle", negative_prompt="", seed=1, guidance_scale=7.5, num_images=1, steps=2,
             sampler="ddim", width=16, height=16, strength=None)
    p.update(params)
    inputs = {"image": b"\x89PNG fake"} if mode != "txt2img" else {}
    return Job(new_job_id(), mode, p, inputs, created=time.time())


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


def test_heartbeat_and_stats(make_queue):
    q = make_queue()

    async def body():
        assert await q.workers() == 0
        q.heartbeat("w1", ttl=30)
        q.heartbeat("w2", ttl=30)
        assert await q.workers() == 2
        q.record({"sd_batch_size_count": 1.0, "sd_batch_size_sum": 3.0})
        q.record({"sd_batch_size_count": 1.0, "sd_batch_size_sum": 1.0})
        stats = await q.stats()
        assert stats["sd_batch_size_count"] == 2 and stats["sd_batch_size_sum"] == 4
        await q.ping()
    run(q, body)


# --- Redis only


def test_redis_silent_worker_entry_is_claimed_and_keys_expire():
    import redis

    prefix = f"test-{secrets.token_hex(4)}"
    q = RedisQueue(REDIS, prefix=prefix, visibility_timeout=0.2, result_ttl=100, max_attempts=3)
    r = redis.Redis.from_url(REDIS)

    async def body():
        job = make_job("img2img")
        await q.submit(job, limit=10)
        assert 0 < r.ttl(f"{prefix}:job:{job.id}") <= 100 and 0 < r.ttl(f"{prefix}:input:{job.id}:image") <= 100
        (lost,) = q.take(1, block=1, gather=0, consumer="dies")       # this worker never reports back
        assert q.take(1, block=0.05, gather=0, consumer="other") == []  # not idle long enough yet
        time.sleep(0.3)
        (claimed,) = q.take(1, block=1, gather=0, consumer="other")
        assert claimed.id == job.id and claimed.attempts == 2 and claimed.inputs == job.inputs
        q.finish(claimed, [b"png"])
        assert 0 < r.ttl(f"{prefix}:result:{job.id}:0") <= 100 and 0 < r.ttl(f"{prefix}:job:{job.id}") <= 100
        assert (await q.state(job.id)).status == "done" and r.xlen(f"{prefix}:jobs") == 0
        assert r.xpending(f"{prefix}:jobs", "workers")["pending"] == 0
    try:
        run(q, body)
    finally:
        keys = list(r.scan_iter(match=f"{prefix}:*"))
        if keys:
            r.delete(*keys)
        r.close()


def test_redis_progress_keeps_a_long_job_from_being_claimed():
    prefix = f"test-{secrets.token_hex(4)}"
    q = RedisQueue(REDIS, prefix=prefix, visibility_timeout=0.3)

    async def body():
        job = make_job()
        await q.submit(job, limit=10)
        (mine,) = q.take(1, block=1, gather=0, consumer="busy")
        for step in range(4):  # 0.6 s of steps, each resetting the entry's idle time
            time.sleep(0.15)
            q.progress([mine], step + 1, 4, consumer="busy")
        assert q.take(1, block=0.05, gather=0, consumer="other") == []
        q.finish(mine, [b"png"])
    try:
        run(q, body)
    finally:
        import redis

        r = redis.Redis.from_url(REDIS)
        keys = list(r.scan_iter(match=f"{prefix}:*"))
        if keys:
            r.delete(*keys)
        r.close()


def test_redis_unreachable_is_queue_unavailable():
    q = RedisQueue("redis://127.0.0.1:1/0")

    async def body():
        with pytest.raises(QueueUnavailable):
            await q.submit(make_job(), limit=10)
        with pytest.raises(QueueUnavailable):
            await q.ping()
    run(q, body)
