"""Soak: many txt2img requests from 16 concurrent clients through HTTP + Redis + one `sd worker` (default
model, CPU). Prints the success rate, p50/p95/max latency, and the resident memory (VmRSS) of the API and
the worker after warm-up, half way and at the end, with the growth over each half.

    .venv/bin/python bench/soak.py [--weights weights/] [--requests 500] [--clients 16] [--steps 20]

Starts its own API (`sd serve --redis`) and worker (`sd worker`) on the Redis at --redis under a fresh
key prefix (bench/servers.py). Each client is a thread with its own keep-alive connection, sending its
share of the requests one after another; every request has its own seed and one of eight prompts. A
request succeeds when it answers 200 with a PNG whose X-Seed is the seed it asked for.
"""

import argparse
import collections
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.servers import REDIS, Service  # noqa: E402
from bench.service_throughput import body  # noqa: E402
from service.cli import default_weights  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


def rss_mib(pid: int) -> float:
    """Resident memory of a process, from /proc/PID/status (VmRSS, in kB)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def soak(service: Service, requests: int, clients: int, steps: int, on_half) -> tuple[list, collections.Counter]:
    """Every request's latency (successes only) and a count of outcomes ("ok" or what went wrong)."""
    latencies, outcomes, lock = [], collections.Counter(), threading.Lock()
    sent = iter(range(requests))
    half = threading.Event()

    def client():
        for i in sent:  # one shared iterator: each request number is sent once, by whichever client is free
            if i == requests // 2 and not half.is_set():
                half.set()
                on_half()
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

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, outcomes


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default=default_weights())
    ap.add_argument("--redis", default=REDIS, help=f"Redis URL (default {REDIS}; keys get a fresh prefix)")
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=32, help="requests before the first memory reading")
    args = ap.parse_args()

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


if __name__ == "__main__":
    main()
