"""One convolution at a time, SD 1.5 UNet shapes (batch 2, fp32 CPU): plain nn.Conv2d (oneDNN reorders the weight
on every call) against a prepacked one (model.speed.TunedConv2d held by Fixed("prepacked"): reordered once).
Prints ms per call (medians) and the ratio; bench/tuning.py shows what the measuring Tuner picks per shape.

    .venv/bin/python bench/conv_prepack.py [--repeats 7]
    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=100000000000 MALLOC_TOP_PAD_=1000000000 \\
        .venv/bin/python bench/conv_prepack.py      # glibc keeping freed memory: the plain reorder stops page-faulting

The second form shows how much of the plain convolution's cost is its per-call weight buffer being page-faulted
afresh (it depends on glibc's adaptive malloc thresholds, hence on what the process freed before).
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from model.speed import TunedConv2d  # noqa: E402
from model.tuning import Fixed, cpu_model  # noqa: E402

# (in channels, out channels, kernel, latent side): the UNet's 3x3 convolutions at 32x32 latents, one 1x1
SHAPES = [(320, 320, 3, 32), (640, 640, 3, 16), (1280, 1280, 3, 8), (1280, 1280, 3, 4), (2560, 1280, 3, 4),
          (320, 320, 3, 64), (1280, 1280, 1, 8)]


def median_ms(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    print(f"{cpu_model()}, torch ISA {torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, batch 2, fp32")
    print("| in -> out, kernel, input | plain ms | prepacked ms | ratio | max abs diff |\n|---|---|---|---|---|")
    torch.manual_seed(0)
    for c_in, c_out, k, side in SHAPES:
        plain = nn.Conv2d(c_in, c_out, k, padding=k // 2)
        packed = TunedConv2d(plain, Fixed("prepacked"))
        x = torch.randn(2, c_in, side, side)
        with torch.inference_mode():
            a, b = median_ms(lambda: plain(x), args.repeats), median_ms(lambda: packed(x), args.repeats)
            diff = (plain(x) - packed(x)).abs().max().item()
        print(f"| {c_in} -> {c_out}, {k}x{k}, {side}x{side} | {a:.1f} | {b:.1f} | {b / a:.3f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
