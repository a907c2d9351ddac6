"""Takeover: seconds from SIGKILL of a worker in the middle of a job to that job running on the other worker,
and to its end there, at the default settings (liveness TTL 5 s, visibility timeout 300 s).

    .venv/bin/python bench/takeover.py [--weights weights/] [--repeats 5] [--steps 150] [--num-images 4]

Starts a private `redis-server` (free port, no persistence), the API (`sd serve --redis`) and two `sd worker`
processes (bench/servers.py). One undisturbed job first (it warms both up and times a run). Then, each
repeat: queue one txt2img job (POST /jobs/txt2img), wait until it is running at step --kill-at-step (50), find
its worker from the job hash ({prefix}:job:{id}, field `worker`: the consumer name, which holds `-{pid}-`),
SIGKILL that process, and read the job hash every --poll s (20 ms) until `worker` names the other worker
with `status` running (kill -> claimed) and then until `status` is done (kill -> done: the takeover plus a
whole run, since a run taken over starts again from step 0). The killed worker is restarted (and ready)
before the next repeat, so each repeat starts with two idle workers.

What to expect: the dead worker's liveness key ({prefix}:worker:{name}, 5 s TTL, refreshed every second by
its keep-alive thread) expires 4-5 s after the kill; the idle worker looks for dead workers' jobs at every
take, that is at least once a second (a take blocks 1 s when the queue is empty).
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.servers import RedisServer, Service  # noqa: E402
from model.tuning import cpu_model  # noqa: E402
from service.cli import default_weights  # noqa: E402


def pid_of(worker_name: str) -> int:
    """The pid in a worker's name, `{hostname}-{pid}-{hex}` (service/worker.py)."""
    return int(worker_name.rsplit("-", 2)[1])


def job_hash(r, prefix: str, job_id: str) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in r.hgetall(f"{prefix}:job:{job_id}").items()}


def submit(s: Service, body: dict) -> str:
    status, _, data = s.client.request("POST", "/jobs/txt2img", body)
    if status != 202:
        raise RuntimeError(f"/jobs/txt2img answered {status}: {data[:300]!r}")
    return json.loads(data)["id"]


def poll(r, prefix: str, job_id: str, until, timeout: float, every: float) -> tuple[float, dict]:
    """Read the job hash every `every` s until until(hash); the time.monotonic() of that read and the hash."""
    deadline = time.monotonic() + timeout
    while True:
        h = job_hash(r, prefix, job_id)
        now = time.monotonic()
        if until(h):
            return now, h
        if h.get("status") in ("failed", "cancelled") or not h:
            raise RuntimeError(f"job {job_id} ended {h.get('status', 'gone')}: {h.get('error')}")
        if now > deadline:
            raise RuntimeError(f"job {job_id}: no change in {timeout:g} s: {h}")
        time.sleep(every)


def summary(name: str, xs: list[float]) -> str:
    return f"{name}: min {min(xs):.2f} s, median {statistics.median(xs):.2f} s, max {max(xs):.2f} s"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default=default_weights())
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=150, help="steps of the job (the service allows at most 150)")
    ap.add_argument("--num-images", type=int, default=4, help="images of the job (the service allows at most 4)")
    ap.add_argument("--kill-at-step", type=int, default=50, help="kill once the job has reported this step")
    ap.add_argument("--poll", type=float, default=0.02, help="seconds between reads of the job hash")
    ap.add_argument("--timeout", type=float, default=300, help="seconds to wait for any one change")
    args = ap.parse_args()

    import redis
    import torch

    print(f"takeover: {cpu_model()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}; "
          f"torch {torch.__version__} on CPU; weights {args.weights}; job: txt2img {args.steps} ddim steps x "
          f"{args.num_images} images; two workers, default liveness TTL (5 s) and visibility timeout (300 s)",
          flush=True)
    body = {"prompt": "a red circle in the center on a blue background", "steps": args.steps,
            "num_images": args.num_images, "guidance_scale": 7.5, "sampler": "ddim"}
    claimed, done = [], []
    with RedisServer() as rs, Service(args.weights, redis_url=rs.url, workers=2) as s:
        r = redis.Redis.from_url(rs.url)
        t0 = time.monotonic()
        job_id = submit(s, {**body, "seed": 1})
        t1, _ = poll(r, s.prefix, job_id, lambda h: h.get("status") == "done", args.timeout, args.poll)
        print(f"undisturbed run (warm-up, queue to done): {t1 - t0:.2f} s", flush=True)
        for k in range(args.repeats):
            job_id = submit(s, {**body, "seed": 100 + k})
            _, h = poll(r, s.prefix, job_id, lambda h: h.get("status") == "running" and
                        int(h.get("step") or 0) >= args.kill_at_step,
                        args.timeout, args.poll)
            victim_name = h["worker"]
            pids = [p.pid for p in s.worker_procs]
            slot = pids.index(pid_of(victim_name))
            t_kill = s.kill_worker(slot)
            killed_at_step = int(job_hash(r, s.prefix, job_id).get("step") or 0)
            t_claim, h = poll(r, s.prefix, job_id, lambda h: h.get("worker") != victim_name and h.get("status") in
                              ("running", "done"), args.timeout, args.poll)
            survivor = h["worker"]
            if pid_of(survivor) != pids[1 - slot]:
                raise RuntimeError(f"job {job_id} taken by {survivor}, not by the other worker (pid {pids[1 - slot]})")
            t_done, h = poll(r, s.prefix, job_id, lambda h: h.get("status") == "done", args.timeout, args.poll)
            claimed.append(t_claim - t_kill)
            done.append(t_done - t_kill)
            print(f"repeat {k + 1}: killed worker pid {pids[slot]} at step {killed_at_step}/{args.steps}; "
                  f"kill -> claimed {claimed[-1]:.2f} s, kill -> done {done[-1]:.2f} s "
                  f"(attempts {h.get('attempts')}, done by pid {pid_of(h['worker'])}; load average "
                  f"{os.getloadavg()[0]:.2f})", flush=True)
            s.start_worker(slot)
        stats = {k.decode(): float(v) for k, v in r.hgetall(f"{s.prefix}:stats").items()}
        r.close()
    print(summary("kill -> claimed", claimed))
    print(summary("kill -> done   ", done))
    done_key = 'sd_jobs_total{status="done"}'
    print(f"sd_jobs_reclaimed_total {stats.get('sd_jobs_reclaimed_total', 0):g}, "
          f"sd_results_dropped_total {stats.get('sd_results_dropped_total', 0):g}, "
          f"{done_key} {stats.get(done_key, 0):g} ({args.repeats + 1} jobs)")


if __name__ == "__main__":
    main()
