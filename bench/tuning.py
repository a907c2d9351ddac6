"""What the measured levers choose on this machine, what measuring costs, and what the choice buys against
plain eager, side by side in one run.

    .venv/bin/python bench/tuning.py [--layouts default sd15-half sd15] [--sizes 32] [--repeats 5] [--shapes]
                                     [--prepack]

For each layout: the default model (one 64x64 image in 20 guided ddim steps) and the SD 1.5 UNet at full and half
width (random weights; one guided step, batch 2, on 32x32 latents = 256x256 images by default). Each is built
twice with the same weights, plain (SD_OPTIMIZE=none) and as the service runs it (pipe.optimize(): every conv
plain or prepacked per input shape, measured by a fresh model.tuning.Tuner with no cache file), then timed
interleaved (plain, tuned, plain, tuned, ...). Prints:
- per shape: the candidates' times as the tuner measured them, and its choice (--shapes to list them all);
- the seconds spent measuring (the first call of each new shape), against the budget;
- median times and the ratio tuned / plain (the default must never be slower: target <= 1.05), and the largest
  output difference; with --prepack, the UNets with every k x k conv prepacked too (the default before).
"""

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from model import StableDiffusion, sd15  # noqa: E402
from model.speed import prepack_convs, tune_convs  # noqa: E402
from model.tuning import Tuner, cpu_model  # noqa: E402
from model.unet import UNet, UNetConfig  # noqa: E402


def unet_copies(width: float, prepacked: bool = False):
    """(plain, tuned, tuner, prepacked or None): SD 1.5-layout UNets with the same random weights; width scales
    every level's channels; prepacked (every k x k conv, unmeasured: the old default) only if asked for."""
    config = dict(sd15.UNET, block_out_channels=[int(c * width) for c in sd15.UNET["block_out_channels"]])
    torch.manual_seed(0)
    plain = UNet(UNetConfig.from_diffusers(config)).eval()

    def copy():
        with torch.device("meta"):
            other = UNet(UNetConfig.from_diffusers(config))
        other.load_state_dict({k: v.clone() for k, v in plain.state_dict().items()}, assign=True)
        return other.eval()

    tuner = Tuner(cache=None)
    tuned = tune_convs(copy(), tuner)
    return plain, tuned, tuner, prepack_convs(copy()) if prepacked else None


def interleaved(fns: dict, repeats: int) -> dict:
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def report(label, tuner, first_call_s, times, diff, show_shapes):
    """times: median seconds of "plain", "tuned" and optionally "prepack"."""
    choices = list(tuner.choices.values())
    print(f"\n## {label}\n")
    print(f"shapes measured: {len(tuner.timings)} ({choices.count('prepacked')} prepacked, "
          f"{choices.count('plain')} plain); measuring took {tuner.spent_s:.2f} s of the first call's "
          f"{first_call_s:.2f} s (budget {tuner.budget_s:.0f} s; {len(tuner.unmeasured)} shapes beyond it)")
    if show_shapes:
        print("\n| conv, input | plain ms | prepacked ms | choice |\n|---|---|---|---|")
        for key, t in tuner.timings.items():
            packed = f"{t['prepacked'] * 1e3:.3f}" if "prepacked" in t else "dropped"
            print(f"| {key} | {t['plain'] * 1e3:.3f} | {packed} | {tuner.choices[key]} |")
    ratio = times["tuned"] / times["plain"]
    print(f"\nplain {times['plain'] * 1e3:.1f} ms, tuned {times['tuned'] * 1e3:.1f} ms (medians, interleaved): "
          f"ratio {ratio:.3f} (target <= 1.05: {'met' if ratio <= 1.05 else 'NOT met'}); max output difference "
          f"{diff:.2e}")
    if "prepack" in times:
        print(f"every k x k conv prepacked (unmeasured, the default before): {times['prepack'] * 1e3:.1f} ms; tuned / "
              f"prepacked {times['tuned'] / times['prepack']:.3f}")


def bench_default(args):
    from service.cli import default_weights

    plain = StableDiffusion.from_pretrained(default_weights())
    tuned = StableDiffusion.from_pretrained(default_weights())
    tuned.optimize(tuner=Tuner(cache=None), aot=False)      # the conv levers alone (bench/compiled.py: packages)
    run = lambda pipe: pipe.txt2img("a large red circle in the center on a blue background", steps=20, seed=1)[0]  # noqa: E731
    start = time.perf_counter()
    b = run(tuned)
    first = time.perf_counter() - start
    a = run(plain)
    diff = float(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max()) / 255   # in [0, 1]
    times = interleaved({"plain": lambda: run(plain), "tuned": lambda: run(tuned)}, args.repeats * 2)
    report("default model: one 64x64 image, 20 ddim steps, guidance 7.5 (whole txt2img)", tuned.tuner, first,
           times, diff, args.shapes)


def bench_unet(args, width, label):
    plain, tuned, tuner, packed = unet_copies(width, prepacked=args.prepack)
    for size in args.sizes:
        g = torch.Generator().manual_seed(1)
        x = torch.randn(2, 4, size, size, generator=g)
        ctx = torch.randn(2, 77, 768, generator=g)
        t = torch.tensor([500, 500])
        with torch.inference_mode():
            start = time.perf_counter()
            b = tuned(x, t, ctx)
            first = time.perf_counter() - start
            a = plain(x, t, ctx)
            fns = {"plain": lambda: plain(x, t, ctx), "tuned": lambda: tuned(x, t, ctx)}
            if packed is not None:
                packed(x, t, ctx)
                fns["prepack"] = lambda: packed(x, t, ctx)
            times = interleaved(fns, args.repeats)
        report(f"{label}: one UNet step, batch 2, {size}x{size} latents ({size * 8}x{size * 8} images)", tuner,
               first, times, (a - b).abs().max().item(), args.shapes)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layouts", nargs="+", default=["default", "sd15-half", "sd15"],
                    choices=["default", "sd15-half", "sd15"])
    ap.add_argument("--sizes", nargs="+", type=int, default=[32], help="UNet latent sides")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--shapes", action="store_true", help="list every measured shape and its times")
    ap.add_argument("--prepack", action="store_true", help="UNets: also time every k x k conv prepacked, unmeasured")
    args = ap.parse_args()
    print(f"{cpu_model()} ({platform.machine()}, {os.cpu_count()} cores, torch ISA "
          f"{torch.backends.cpu.get_cpu_capability()}), torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.2f}")
    for layout in args.layouts:
        if layout == "default":
            bench_default(args)
        else:
            bench_unet(args, 0.5 if layout == "sd15-half" else 1.0,
                       "SD 1.5 UNet at half width" if layout == "sd15-half" else "SD 1.5 UNet")
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
