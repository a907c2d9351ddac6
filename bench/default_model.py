"""Speed of the default model on this machine: one 64x64 image in 20 guided steps, and images/s at
batch 1 and 8.

    .venv/bin/python bench/default_model.py [--weights weights/] [--repeats 10] [--convs auto|prepack|plain]
                                            [--compile] [--no-aot]
"""

import argparse
import statistics
import time

import torch

from model import Request, StableDiffusion
from model.speed import CONVS
from model.tuning import cpu_model
from service.cli import default_weights


def timed(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default=default_weights())
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--convs", choices=["auto", "prepack", "plain"], default="auto",
                    help="auto: plain or prepacked per conv shape, as measured (the default, as served)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the UNet (model/speed.py)")
    ap.add_argument("--no-aot", action="store_true", help="without the packages of `sd compile` (used if built here)")
    args = ap.parse_args()
    pipe = StableDiffusion.from_pretrained(args.weights).optimize(prepack=CONVS[args.convs], compile=args.compile,
                                                                  aot=not args.no_aot)
    print(f"{cpu_model()}, torch ISA {torch.backends.cpu.get_cpu_capability()}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {pipe.native_size}x{pipe.native_size}, "
          f"{args.steps} ddim steps, guidance 7.5, "
          f"levers: convs={args.convs} compile={args.compile} "
          f"compiled-ahead shapes={0 if pipe.compiled is None else len(pipe.compiled.runners)}")

    one = timed(lambda: pipe.txt2img("a large red circle in the center on a blue background", steps=args.steps), args.repeats)
    print(f"one image:            {one * 1000:7.1f} ms  (target < 500 ms)")
    for batch in (1, 8):
        requests = [Request("a small green square in the top left on a white background", seed=i) for i in range(batch)]
        t = timed(lambda: pipe.generate(requests, steps=args.steps), max(3, args.repeats // batch))
        print(f"batch {batch}:              {batch / t:7.2f} images/s  ({t * 1000:.0f} ms a batch)")


if __name__ == "__main__":
    main()
