"""Throughput of the service: 32 txt2img requests from 16 concurrent clients through HTTP + Redis + one
`sd worker` (default model, CPU), once with max batch 1 and once with max batch 8; images/s of each
and the ratio (target >= 2x).

    .venv/bin/python bench/service_throughput.py [--weights weights/] [--requests 32] [--clients 16]
                                                 [--steps 20] [--rounds 3] [--batch-window S]

Starts its own API (`sd serve --redis`, uvicorn on a free loopback port) and worker (`sd worker`) on the
Redis at --redis under a fresh key prefix. Each client is a thread with its own keep-alive connection,
sending its share of the requests one after another. A round is timed from the first request sent to
the last image received; the median round is reported.
"""

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.servers import REDIS, Service  # noqa: E402
from service.cli import default_weights  # noqa: E402

PROMPTS = [f"a {size} {colour} {shape} in the {where} on a {bg} background"
           for size, colour, shape, where, bg in [
               ("large", "red", "circle", "center", "blue"), ("small", "green", "square", "top left", "white"),
               ("medium", "yellow", "triangle", "bottom right", "black"), ("large", "blue", "square", "top right", "yellow"),
               ("small", "red", "triangle", "bottom left", "white"), ("medium", "green", "circle", "center", "black"),
               ("large", "yellow", "circle", "top left", "blue"), ("small", "blue", "triangle", "center", "white")]]


def body(i: int, steps: int) -> dict:
    return {"prompt": PROMPTS[i % len(PROMPTS)], "seed": i, "steps": steps, "guidance_scale": 7.5, "sampler": "ddim"}


def round_trip(service: Service, requests: int, clients: int, steps: int) -> tuple[float, list[float]]:
    """Wall seconds for `requests` requests from `clients` threads, and each request's latency."""
    latencies, errors = [], []
    start = threading.Barrier(clients + 1)

    def client(k):
        start.wait()
        for i in range(k, requests, clients):
            t = time.perf_counter()
            try:
                service.client.txt2img(body(i, steps))
            except Exception as e:  # noqa: BLE001
                errors.append(e)
            latencies.append(time.perf_counter() - t)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return wall, latencies


def measure(args, max_batch: int) -> dict:
    with Service(args.weights, redis_url=args.redis, max_batch=max_batch, batch_window=args.batch_window) as s:
        for i in range(2):  # warm-up: the first calls of a fresh process are slow
            s.client.txt2img(body(i, args.steps))
        before = s.client.metrics()
        rounds = [round_trip(s, args.requests, args.clients, args.steps) for _ in range(args.rounds)]
        after = s.client.metrics()
    calls = after["sd_batch_size_count"] - before["sd_batch_size_count"]
    images = after["sd_batch_size_sum"] - before["sd_batch_size_sum"]
    walls = [w for w, _ in rounds]
    latencies = sorted(x for _, lat in rounds for x in lat)
    wall = statistics.median(walls)
    return {"images_per_s": args.requests / wall, "wall": wall, "walls": walls, "mean_batch": images / calls,
            "p50": statistics.median(latencies), "p95": latencies[int(0.95 * (len(latencies) - 1))]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default=default_weights())
    ap.add_argument("--redis", default=REDIS, help=f"Redis URL (default {REDIS}; keys get a fresh prefix)")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-window", type=float, default=None, help="worker's gather window (default: the service's)")
    args = ap.parse_args()

    import torch

    print(f"{args.requests} requests from {args.clients} clients, {args.steps} ddim steps, guidance 7.5, "
          f"weights {args.weights}, torch {torch.__version__} on CPU ({torch.get_num_threads()} threads), "
          f"median of {args.rounds} rounds")
    results = {}
    for max_batch in (1, 8):
        r = results[max_batch] = measure(args, max_batch)
        print(f"max batch {max_batch}: {r['images_per_s']:6.2f} images/s  ({r['wall']:.2f} s a round; rounds "
              f"{', '.join(f'{w:.2f}' for w in r['walls'])} s)  mean batch {r['mean_batch']:.2f}  "
              f"request latency p50 {r['p50']:.2f} s, p95 {r['p95']:.2f} s", flush=True)
    ratio = results[8]["images_per_s"] / results[1]["images_per_s"]
    print(f"max batch 8 / max batch 1: {ratio:.2f}x  (target >= 2x)")


if __name__ == "__main__":
    main()
