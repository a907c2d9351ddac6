"""Latency of one request through HTTP + Redis + worker against a direct pipeline call with the same
parameters (default model, CPU): the service's overhead in ms (target < 30 ms).

    .venv/bin/python bench/service_latency.py [--weights weights/] [-n 40] [--steps 20] [--batch-window S]

Starts its own API (`sd serve --redis`, uvicorn on a free loopback port) and one worker (`sd worker`) on
the Redis at --redis under a fresh key prefix, and loads the same weights in this process. Requests are
sequential (nothing else in flight), the service and direct calls alternate so drifts in machine load
hit both alike, and the medians are compared. The job's timestamps split the service's time into:
queue (API submit -> a worker starts it: Redis, the worker's gather window), run (pipeline + PNG
encoding + storing the result) and the rest (HTTP, waking the waiting request, fetching the PNG).
The worker's mean step time (from /metrics) against the direct call's shows what writing the progress
to Redis at every step costs.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.servers import REDIS, Service  # noqa: E402
from service.cli import default_weights  # noqa: E402

PROMPT = "a large red circle in the center on a blue background"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default=default_weights())
    ap.add_argument("--redis", default=REDIS, help=f"Redis URL (default {REDIS}; keys get a fresh prefix)")
    ap.add_argument("-n", type=int, default=40, help="requests (and direct calls) timed")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-window", type=float, default=None, help="worker's gather window (default: the service's)")
    args = ap.parse_args()

    import torch

    from model import StableDiffusion
    from model.pnginfo import png_bytes

    pipe = StableDiffusion.from_pretrained(args.weights).optimize()    # as the worker loads it (SD_OPTIMIZE=auto)
    body = {"prompt": PROMPT, "seed": 1, "steps": args.steps, "guidance_scale": 7.5, "sampler": "ddim"}

    step_times = []

    def direct():
        last = [time.perf_counter()]

        def step(i, n):  # the direct call's step times, as the worker measures its own for /metrics
            now = time.perf_counter()
            step_times.append(now - last[0])
            last[0] = now
        return pipe.txt2img(PROMPT, steps=args.steps, guidance_scale=7.5, sampler="ddim", seed=1, callback=step)[0]

    print(f"one request, {args.steps} ddim steps, guidance 7.5, weights {args.weights}, torch {torch.__version__} "
          f"on CPU ({torch.get_num_threads()} threads), median of {args.n}")
    with Service(args.weights, redis_url=args.redis, batch_window=args.batch_window) as s:
        for _ in range(3):  # warm-up, both sides
            s.client.txt2img(body)
            image = direct()
        before = s.client.metrics()
        step_times.clear()
        served, direct_s, queue, run, rest, encode = [], [], [], [], [], []
        for _ in range(args.n):
            t = time.perf_counter()
            headers, _ = s.client.txt2img(body)
            served.append(time.perf_counter() - t)
            job = s.client.get_json(f"/jobs/{headers['x-job-id']}")
            queue.append(job["started_at"] - job["created_at"])
            run.append(job["finished_at"] - job["started_at"])
            rest.append(served[-1] - (job["finished_at"] - job["created_at"]))

            t = time.perf_counter()
            image = direct()
            direct_s.append(time.perf_counter() - t)
        after = s.client.metrics()
        worker_steps = ((after["sd_step_seconds_sum"] - before["sd_step_seconds_sum"]) /
                        (after["sd_step_seconds_count"] - before["sd_step_seconds_count"]))
        for _ in range(args.n):
            t = time.perf_counter()
            png_bytes(image, image.info["generation"])
            encode.append(time.perf_counter() - t)

    ms = lambda xs: 1000 * statistics.median(xs)  # noqa: E731
    overhead = ms(served) - ms(direct_s)
    print(f"direct pipe.txt2img:            {ms(direct_s):7.1f} ms")
    print(f"HTTP + Redis + worker:          {ms(served):7.1f} ms")
    print(f"overhead:                       {overhead:7.1f} ms  (target < 30 ms)")
    print(f"  queue (submit -> started):    {ms(queue):7.1f} ms")
    print(f"  run - direct call:            {ms(run) - ms(direct_s):7.1f} ms  (progress to Redis, PNG, store)")
    print(f"  of which PNG encoding:        {ms(encode):7.1f} ms")
    print(f"  the rest (HTTP, wake, fetch): {ms(rest):7.1f} ms")
    print(f"mean step: worker {1000 * worker_steps:.1f} ms, direct {1000 * statistics.mean(step_times):.1f} ms "
          "(each includes the step's progress callback)")


if __name__ == "__main__":
    main()
