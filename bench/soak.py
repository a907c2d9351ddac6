"""Soak: many txt2img requests from 16 concurrent clients through HTTP + Redis + one `sd worker` (default
model, CPU). Prints the success rate, p50/p95/max latency, and the resident memory (VmRSS) of the API and
the worker after warm-up, half way and at the end, with the growth over each half.

    .venv/bin/python bench/soak.py [--weights weights/] [--requests 500] [--clients 16] [--steps 20]

Starts its own API (`sd serve --redis`) and worker (`sd worker`) on the Redis at --redis under a fresh
key prefix (bench/servers.py). Each client is a thread with its own keep-alive connection, sending its
share of the requests one after another; every request has its own seed and one of eight prompts. A
request succeeds when it answers 200 with a PNG whose X-Seed is the seed it asked for.

Chaos (--chaos): the same requests against the API and TWO workers on a private `redis-server` with an
append-only file (`--appendonly yes --appendfsync always`, its own folder), while one worker is SIGKILLed and
started again every --kill-every s (60; the two in turn) and Redis is SIGKILLed once, when the middle request
is first sent, and started again from its AOF (same port, same folder) --redis-down s (3) later.

    .venv/bin/python bench/soak.py --chaos [--kill-every 60] [--redis-down 3] [--deadline 300] [--threads 1]

Each request carries an Idempotency-Key of its own and is sent again, with the same key, on a 503, a 504 or
a connection error (after the Retry-After pause, at most 2 s), until it gets a 200 or --deadline s have
passed since it was first sent. Latency runs from the first send to the final answer, retries included.
Reported besides: retries, duplicates (a request that saw more than one X-Job-Id; job hashes in Redis
against requests; the workers' sd_jobs_total{status="done"}, sd_jobs_reclaimed_total and
sd_results_dropped_total from the {prefix}:stats hash), the chaos timeline, and the RSS of the API and both
workers (whichever processes hold the two slots at the time). Every process's log is kept in a folder it names.
"""

import argparse
import collections
import http.client
import os
import secrets
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.servers import REDIS, RedisServer, Service  # noqa: E402
from bench.service_throughput import body  # noqa: E402
from model.tuning import cpu_model  # noqa: E402
from service.cli import default_weights  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


def rss_mib(pid: int) -> float:
    """Resident memory of a process, from /proc/PID/status (VmRSS, in kB)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def run_clients(requests: int, clients: int, on_half, one) -> None:
    """`clients` threads send requests 0 .. requests-1 (one(i) each) from one shared iterator: each request
    number is sent once, by whichever client is free; on_half() is called when request requests // 2 is sent."""
    sent = iter(range(requests))
    half = threading.Event()

    def client():
        for i in sent:
            if i == requests // 2 and not half.is_set():
                half.set()
                on_half()
            one(i)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def soak(service: Service, requests: int, clients: int, steps: int, on_half) -> tuple[list, collections.Counter]:
    """Every request's latency (successes only) and a count of outcomes ("ok" or what went wrong)."""
    latencies, outcomes, lock = [], collections.Counter(), threading.Lock()

    def one(i: int) -> None:
        b = {**body(i, steps), "seed": 1000 + i}
        t = time.perf_counter()
        try:
            status, headers, data = service.client.request("POST", "/txt2img", b)
            ok = status == 200 and data.startswith(PNG) and headers.get("x-seed") == str(b["seed"])
            outcome = "ok" if ok else f"{status}" if status != 200 else "200 but wrong answer"
        except Exception as e:  # noqa: BLE001
            outcome = type(e).__name__
        elapsed = time.perf_counter() - t
        with lock:
            outcomes[outcome] += 1
            if outcome == "ok":
                latencies.append(elapsed)

    run_clients(requests, clients, on_half, one)
    return latencies, outcomes


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default=default_weights())
    ap.add_argument("--redis", default=REDIS, help=f"Redis URL (default {REDIS}; keys get a fresh prefix)")
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=32, help="requests before the first memory reading")
    ap.add_argument("--chaos", action="store_true", help="two workers on a private Redis with AOF; workers and "
                    "Redis SIGKILLed during the run; requests retried with an Idempotency-Key")
    ap.add_argument("--kill-every", type=float, default=60, help="--chaos: seconds between worker kills")
    ap.add_argument("--redis-down", type=float, default=3, help="--chaos: seconds Redis stays down")
    ap.add_argument("--deadline", type=float, default=300, help="--chaos: seconds a request may take, retries included")
    ap.add_argument("--threads", type=int, default=1, help="--chaos: torch threads per process (two workers share "
                    "the cores)")
    args = ap.parse_args()
    if args.chaos:
        return chaos_main(args)

    import torch

    print(f"soak: {args.requests} requests from {args.clients} clients, {args.steps} ddim steps, weights "
          f"{args.weights}, torch {torch.__version__} on CPU, one worker (max batch 8)", flush=True)
    with Service(args.weights, redis_url=args.redis) as s:
        api, worker = s.procs[0].pid, s.procs[1].pid
        soak(s, args.warmup, args.clients, args.steps, on_half=lambda: None)  # the first calls are slow
        memory = {"start": (rss_mib(api), rss_mib(worker))}
        memory_half = lambda: memory.__setitem__("half", (rss_mib(api), rss_mib(worker)))  # noqa: E731
        t0 = time.perf_counter()
        latencies, outcomes = soak(s, args.requests, args.clients, args.steps, on_half=memory_half)
        wall = time.perf_counter() - t0
        memory["end"] = (rss_mib(api), rss_mib(worker))
        metrics = s.client.metrics()
        depth = s.client.get_json("/readyz")["queue_depth"]

    ok = outcomes["ok"]
    latencies.sort()
    print(f"success: {ok}/{args.requests} = {100 * ok / args.requests:.1f}%  outcomes {dict(outcomes)}")
    if latencies:
        print(f"latency: p50 {statistics.median(latencies):.2f} s, p95 {latencies[int(0.95 * (len(latencies) - 1))]:.2f} s, "
              f"max {latencies[-1]:.2f} s;  {args.requests / wall:.2f} requests/s over {wall:.0f} s")
    print(f"batches: mean {metrics['sd_batch_size_sum'] / metrics['sd_batch_size_count']:.2f} images; "
          f"queue depth at the end {depth}")
    for name, k in (("API", 0), ("worker", 1)):
        start, half, end = (memory[m][k] for m in ("start", "half", "end"))
        print(f"{name:6} RSS MiB: start {start:7.1f}  half {half:7.1f}  end {end:7.1f}  growth {end - start:+6.1f} "
              f"({100 * (end - start) / start:+.1f}%; second half {end - half:+.1f})")


# -----------------------------------------------------------------------------
# --chaos


RETRY_PAUSE_MAX = 2.0   # seconds: the longest pause before a retry, whatever Retry-After says
RETRY_PAUSE_ERROR = 0.5  # seconds before a retry after a connection error (no Retry-After)


def rss_or_none(proc) -> float | None:
    try:
        return rss_mib(proc.pid) if proc.poll() is None else None
    except (OSError, RuntimeError):
        return None


class Chaos:
    """Kills a worker every `kill_every` s (slots 0, 1, 0, ...; each started again at once, in this thread) and
    Redis once on kill_redis() (started again from its AOF `down` s later); keeps a timeline."""

    def __init__(self, service: Service, redis_server: RedisServer, kill_every: float, down: float):
        self.s, self.redis, self.kill_every, self.down = service, redis_server, kill_every, down
        self.t0 = time.monotonic()
        self.events: list[tuple[float, str]] = []
        self.stop = threading.Event()
        self.kills = 0
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._workers, daemon=True)]

    def event(self, what: str, t: float | None = None) -> None:
        with self.lock:
            self.events.append(((t or time.monotonic()) - self.t0, what))

    def start(self) -> "Chaos":
        self.t0 = time.monotonic()
        self.threads[0].start()
        return self

    def _workers(self) -> None:
        while not self.stop.wait(self.kill_every):
            slot = self.kills % 2
            pid = self.s.worker_procs[slot].pid
            t = self.s.kill_worker(slot)
            self.kills += 1
            self.event(f"SIGKILL worker slot {slot} (pid {pid})", t)
            try:
                name = self.s.start_worker(slot)
            except Exception as e:  # noqa: BLE001
                self.event(f"worker slot {slot} did not start again: {e}")
                return
            self.event(f"worker slot {slot} started again: pid {self.s.worker_procs[slot].pid} ({name}) ready")

    def kill_redis(self) -> None:
        def go():
            pid = self.redis.proc.pid
            t = time.monotonic()
            self.redis.kill()
            self.event(f"SIGKILL redis-server (pid {pid})", t)
            time.sleep(self.down)
            try:
                self.redis.start()
            except Exception as e:  # noqa: BLE001
                self.event(f"redis-server did not start again: {e}")
                return
            self.event(f"redis-server started again from its AOF (pid {self.redis.proc.pid}), answering PING")
        thread = threading.Thread(target=go, daemon=True)
        self.threads.append(thread)
        thread.start()

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(600)


def chaos_soak(service: Service, requests: int, clients: int, steps: int, deadline: float, on_half,
               seed0: int) -> list[dict]:
    """Every request's record: outcome, latency (first send to final answer), retries, the job ids seen,
    the statuses answered."""
    records, lock = [], threading.Lock()
    run = secrets.token_hex(4)

    def one(i: int) -> None:
        b = {**body(i, steps), "seed": seed0 + i}
        key = f"chaos-{run}-{i}"
        t = time.perf_counter()
        end = t + deadline
        rec = {"i": i, "key": key, "retries": 0, "job_ids": [], "statuses": [], "outcome": None}
        while True:
            try:
                status, headers, data = service.client.request("POST", "/txt2img", b, {"Idempotency-Key": key})
            except (OSError, http.client.HTTPException) as e:
                status, headers, data = type(e).__name__, {}, str(e).encode()
                conn = service.client.local.__dict__.pop("conn", None)  # a fresh connection next time
                if conn is not None:
                    conn.close()
            rec["statuses"].append(status)
            job_id = headers.get("x-job-id")
            if job_id and job_id not in rec["job_ids"]:
                rec["job_ids"].append(job_id)
            if status == 200:
                ok = data.startswith(PNG) and headers.get("x-seed") == str(b["seed"])
                rec["outcome"] = "ok" if ok else "200 but wrong answer"
                break
            retryable = status in (503, 504) or isinstance(status, str)
            if not retryable:
                rec["outcome"], rec["detail"] = str(status), data[:300]
                break
            pause = RETRY_PAUSE_ERROR
            if headers.get("retry-after"):
                try:
                    pause = float(headers["retry-after"])
                except ValueError:
                    pass
            pause = min(pause, RETRY_PAUSE_MAX)
            if time.perf_counter() + pause >= end:
                rec["outcome"], rec["detail"] = f"deadline (last {status})", data[:300]
                break
            time.sleep(pause)
            rec["retries"] += 1
        rec["latency"] = time.perf_counter() - t
        with lock:
            records.append(rec)

    run_clients(requests, clients, on_half, one)
    return sorted(records, key=lambda r: r["i"])


def redis_counts(r, prefix: str) -> tuple[dict, dict]:
    """The {prefix}:stats hash, and the job hashes counted by status."""
    stats = {k.decode(): float(v) for k, v in r.hgetall(f"{prefix}:stats").items()}
    statuses = collections.Counter()
    for key in r.scan_iter(match=f"{prefix}:job:*", count=500):
        statuses[(r.hget(key, "status") or b"?").decode()] += 1
    return stats, statuses


def chaos_main(args) -> None:
    import redis
    import torch

    print(f"chaos soak: {args.requests} requests from {args.clients} clients, {args.steps} ddim steps, weights "
          f"{args.weights}, torch {torch.__version__} on CPU ({cpu_model()}, {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.2f}); API + two workers ({args.threads} torch thread(s) each, max batch 8) on a "
          f"private redis-server with AOF (appendfsync always); a worker SIGKILLed and restarted every "
          f"{args.kill_every:g} s, Redis SIGKILLed once at the middle request and restarted from its AOF "
          f"{args.redis_down:g} s later; per-request deadline {args.deadline:g} s", flush=True)
    logs = Path(tempfile.mkdtemp(prefix="chaos-soak-logs-"))
    done_key, failed_key = 'sd_jobs_total{status="done"}', 'sd_jobs_total{status="failed"}'
    with RedisServer(aof=True) as rs, Service(args.weights, redis_url=rs.url, workers=2, threads=args.threads) as s:
        r = redis.Redis.from_url(rs.url, socket_timeout=10)
        api = s.procs[0]
        # the first calls are slow (and a 1-thread worker measures its layers once): not measured, no chaos
        warm = chaos_soak(s, args.warmup, args.clients, args.steps, args.deadline, lambda: None, seed0=10**6)
        warm_ok = sum(rec["outcome"] == "ok" for rec in warm)
        stats0, _ = redis_counts(r, s.prefix)
        read = lambda: (rss_or_none(api), *[rss_or_none(p) for p in s.worker_procs])  # noqa: E731
        pids = lambda: [p.pid for p in s.worker_procs]  # noqa: E731
        memory = {"start": (read(), pids())}
        chaos = Chaos(s, rs, args.kill_every, args.redis_down)

        def on_half():
            memory["half"] = (read(), pids())
            chaos.event(f"request {args.requests // 2} sent")
            chaos.kill_redis()

        t0 = time.perf_counter()
        chaos.start()
        records = chaos_soak(s, args.requests, args.clients, args.steps, args.deadline, on_half, seed0=1000)
        wall = time.perf_counter() - t0
        chaos.event("last answer")
        chaos.finish()
        memory["end"] = (read(), pids())
        stats1, statuses = redis_counts(r, s.prefix)
        depth = s.client.get_json("/readyz")["queue_depth"]
        r.close()
        for name, proc in [("api", api), *[(f"worker-{n}-pid{p.pid}", p) for n, p in enumerate(s.worker_procs)],
                           *[(f"killed-worker-pid{p.pid}", p) for p in s.killed]]:
            (logs / f"{name}.log").write_text(s.log(proc, 10**9))
        (logs / "redis.log").write_text(rs.log())

    outcomes = collections.Counter(rec["outcome"] for rec in records)
    ok = outcomes["ok"]
    latencies = sorted(rec["latency"] for rec in records if rec["outcome"] == "ok")
    retries = [rec["retries"] for rec in records]
    dups = [rec for rec in records if len(rec["job_ids"]) > 1]
    no_id = sum(1 for rec in records if not rec["job_ids"])
    answered = collections.Counter(str(st) for rec in records for st in rec["statuses"])
    delta = lambda k: stats1.get(k, 0.0) - stats0.get(k, 0.0)  # noqa: E731
    print(f"warm-up: {warm_ok}/{args.warmup} ok (not counted below)")
    print("timeline (s from the start of the measured run):")
    for t, what in sorted(chaos.events):
        print(f"  {t:7.1f}  {what}")
    print(f"success: {ok}/{args.requests} = {100 * ok / args.requests:.1f}%  outcomes {dict(outcomes)}")
    if latencies:
        print(f"latency (first send to final answer): p50 {statistics.median(latencies):.2f} s, "
              f"p95 {latencies[int(0.95 * (len(latencies) - 1))]:.2f} s, max {latencies[-1]:.2f} s;  "
              f"{args.requests / wall:.2f} requests/s over {wall:.0f} s")
    print(f"retries: {sum(retries)} in all, {sum(1 for x in retries if x)} requests retried, at most {max(retries)} "
          f"for one request; answers seen {dict(answered)}")
    print(f"duplicates: {len(dups)} requests saw more than one X-Job-Id ({no_id} saw none); job hashes in Redis "
          f"{sum(statuses.values())} for {args.warmup + args.requests} requests (warm-up included), by status "
          f"{dict(statuses)}")
    print(f"worker stats (this run): {done_key} {delta(done_key):g} for {args.requests} requests; "
          f"sd_jobs_reclaimed_total {delta('sd_jobs_reclaimed_total'):g}; sd_results_dropped_total "
          f"{delta('sd_results_dropped_total'):g}; {failed_key} {delta(failed_key):g}; queue depth at the end {depth}")
    print(f"worker kills: {chaos.kills}; Redis kills: 1" + ("" if chaos.kills else
          f"  (NO worker was killed: the run took {wall:.0f} s, less than --kill-every {args.kill_every:g} s)"))
    for name, k in (("API", 0), ("worker 0", 1), ("worker 1", 2)):
        row = []
        for m in ("start", "half", "end"):
            rss, ps = memory[m]
            who = "" if k == 0 else f" (pid {ps[k - 1]})"
            row.append(f"{m} {'-' if rss[k] is None else format(rss[k], '.1f')}{who}")
        print(f"{name:8} RSS MiB: " + ",  ".join(row))
    for rec in records:
        if rec["outcome"] != "ok" or len(rec["job_ids"]) > 1:
            print(f"  request {rec['i']} ({rec['key']}): {rec['outcome']} after {rec['latency']:.1f} s, "
                  f"{rec['retries']} retries, job ids {rec['job_ids']}, answers {rec['statuses']}, "
                  f"{rec.get('detail', b'')[:200]!r}")
    print(f"logs: {logs}")


if __name__ == "__main__":
    main()
