"""Compile-ahead packages (`sd compile`, model/compiled.py) against the eager pipeline as served, on the default
model: load time, first-request latency, steady time per image and memory, each side in its own process.

    .venv/bin/sd compile weights/ --batch 1,8          # first: the packages, for this machine
    .venv/bin/python bench/compiled.py [--weights weights/] [--rounds 3] [--repeats 10]

Each round starts a child with the packages (pipe.optimize(), which loads them) and one without
(pipe.optimize(aot=False)), alternating; each child loads the weights, times its first txt2img (one 64x64 image,
20 steps: what the first request pays) and then the median of --repeats more at batch 1 and batch 8, and reads
its RSS and peak RSS (VmRSS, VmHWM) from the kernel. Prints medians over rounds and the ratios.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a large red circle in the center on a blue background"


def status_mb(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(args):
    start = time.perf_counter()
    from model import Request, StableDiffusion

    pipe = StableDiffusion.from_pretrained(args.weights).optimize(aot=args.side == "compiled")
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    pipe.txt2img(PROMPT, steps=20)
    first_s = time.perf_counter() - start
    packages = 0 if pipe.compiled is None else len(pipe.compiled.runners)
    result = {"load_s": load_s, "first_s": first_s, "packages": packages}
    for batch in (1, 8):
        requests = [Request(PROMPT, seed=i) for i in range(batch)]
        pipe.generate(requests, steps=20)
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            pipe.generate(requests, steps=20)
            times.append(time.perf_counter() - t0)
        result[f"batch{batch}_s"] = statistics.median(times)
    result.update(rss_mb=status_mb("VmRSS"), peak_mb=status_mb("VmHWM"))
    print(json.dumps(result))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    from service.cli import default_weights

    ap.add_argument("--weights", default=default_weights())
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--child", choices=["eager", "compiled"], dest="side", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        return child(args)
    from model.tuning import cpu_model

    print(f"{cpu_model()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}; weights {args.weights}")
    results = {"eager": [], "compiled": []}
    for _ in range(args.rounds):
        for side in results:
            out = subprocess.run([sys.executable, __file__, "--child", side, "--weights", args.weights,
                                  "--repeats", str(args.repeats)], check=True, capture_output=True, text=True, cwd=ROOT)
            results[side].append(json.loads(out.stdout.strip().splitlines()[-1]))
    if results["compiled"][0]["packages"] == 0:
        print("no packages for this machine were loaded: run `sd compile` first")
    med = {side: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for side, rs in results.items()}
    print(f"packages used: {med['compiled']['packages']:.0f}")
    print("| | eager (as served) | compiled ahead | ratio |\n|---|---|---|---|")
    rows = [("load + optimize", "load_s", 1e3, "ms"), ("first request (1 image, 20 steps)", "first_s", 1e3, "ms"),
            ("batch 1, steady", "batch1_s", 1e3, "ms"), ("batch 8, steady", "batch8_s", 1e3, "ms"),
            ("RSS after", "rss_mb", 1, "MiB"), ("peak RSS", "peak_mb", 1, "MiB")]
    for label, key, scale, unit in rows:
        a, b = med["eager"][key] * scale, med["compiled"][key] * scale
        print(f"| {label} | {a:.1f} {unit} | {b:.1f} {unit} | {b / a:.3f} |")
    gain = 8 * med["compiled"]["batch1_s"] / med["compiled"]["batch8_s"]
    print(f"images/s at batch 8 / batch 1, compiled: {gain:.2f}x")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
