"""One UNet step at the SD 1.5 architecture (859.5M parameters, random weights, the same in both), batch 2 (the
unconditional and conditional halves of one guided image), here vs diffusers' UNet2DConditionModel with its
default attention processor. The two are timed interleaved (A, B, A, B, ...) so that load on the machine hits
both alike; prints the median of each, the ratio (target: here <= 0.85 x diffusers) and the max abs difference
of their outputs in the same run.

    .venv/bin/python bench/unet_step.py [--sizes 32 64] [--repeats 3] [--convs auto|prepack|plain] [--channels-last]
                                        [--compile]
    .venv/bin/python bench/unet_step.py --device cuda --dtype fp16 --sizes 64     # on a GPU

Our UNet runs as pipe.optimize() leaves it (each conv plain or prepacked per shape, as a Tuner measures here;
--convs plain or prepack to force one); --channels-last and --compile add model.speed's others. Diffusers runs
as it comes.
"""

import argparse
import os
import statistics
import sys
import time

import torch

from model import sd15
from model.speed import CONVS
from model.tuning import cpu_model

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def build_pair(device="cpu", dtype=torch.float32, channels_last=False, compile=False, want_ref=True, prepack=False):
    """(diffusers UNet or None, our UNet) with identical random weights (diffusers' default init, seed 0)."""
    from diffusers import UNet2DConditionModel

    from model.speed import optimize_unet
    from model.unet import UNet, UNetConfig

    torch.manual_seed(0)
    ref = UNet2DConditionModel(**sd15.UNET).eval()
    with torch.device("meta"):                       # no second random init: the weights come from ref
        ours = UNet(UNetConfig.from_diffusers(dict(ref.config)))
    ours.load_state_dict({k: v.clone() for k, v in ref.state_dict().items()}, strict=True, assign=True)
    ours = optimize_unet(ours.eval().to(device, dtype), prepack=prepack, channels_last=channels_last,
                         compile=compile)
    if not want_ref:
        return None, ours
    return ref.to(device, dtype), ours


def inputs(size, batch=2, device="cpu", dtype=torch.float32, channels_last=False):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, size, size, generator=g).to(device, dtype)
    ctx = torch.randn(batch, 77, 768, generator=g).to(device, dtype)
    t = torch.full((batch,), 500, device=device)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    return x, t, ctx


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved(fns, repeats, device):
    """{name: [seconds]}: every round runs each fn once, in turn."""
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 64], help="latent sides (image side / 8)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    ap.add_argument("--convs", choices=["auto", "prepack", "plain"], default="auto",
                    help="our UNet's convs: auto (plain or prepacked per shape, as measured; as served), "
                    "prepack, plain")
    ap.add_argument("--channels-last", action="store_true", help="our UNet in channels_last memory format")
    ap.add_argument("--compile", action="store_true", help="our UNet through torch.compile (inductor)")
    ap.add_argument("--plain", action="store_true",
                    help="also time our UNet without the levers (a third model in memory), to measure the levers alone")
    args = ap.parse_args()
    dtype = DTYPES[args.dtype]
    load = os.getloadavg()
    print(f"{cpu_model()}, torch ISA {torch.backends.cpu.get_cpu_capability()}, "
          f"torch {torch.__version__}, {args.device} {args.dtype}, {torch.get_num_threads()} threads, "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, levers: convs={args.convs} "
          f"channels_last={args.channels_last} compile={args.compile}")
    start = time.perf_counter()
    ref, ours = build_pair(args.device, dtype, args.channels_last, args.compile, prepack=CONVS[args.convs])
    plain = build_pair(args.device, dtype, want_ref=False)[1] if args.plain else None
    print(f"built both UNets ({sum(p.numel() for p in ref.parameters()) / 1e6:.1f}M parameters each) "
          f"in {time.perf_counter() - start:.0f} s")

    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for size in args.sizes:
        x, t, ctx = inputs(size, args.batch, args.device, dtype)
        x_ours = x.to(memory_format=torch.channels_last) if args.channels_last else x
        fns = {"diffusers": lambda: ref(x, t, encoder_hidden_states=ctx).sample,
               "ours": lambda: ours(x_ours, t, ctx)}
        if plain is not None:
            fns["ours without levers"] = lambda: plain(x, t, ctx)
        with torch.inference_mode():
            start = time.perf_counter()
            want = fns["diffusers"]()               # warm-up, and the outputs to compare
            got = fns["ours"]()
            if plain is not None:
                fns["ours without levers"]()
            warm = time.perf_counter() - start
            err = (got.float() - want.float()).abs().max().item()
            times = interleaved(fns, args.repeats, args.device)
        med = {name: statistics.median(v) for name, v in times.items()}
        ratio = med["ours"] / med["diffusers"]
        print(f"latents {size}x{size} batch {args.batch} (warm-up {warm:.1f} s): "
              f"diffusers {med['diffusers'] * 1000:.0f} ms, ours {med['ours'] * 1000:.0f} ms a step (medians of "
              f"{args.repeats}); ratio ours/diffusers {ratio:.3f} (target <= 0.85: "
              f"{'met' if ratio <= 0.85 else 'NOT met'}); max abs output difference {err:.2e} "
              f"({'ok' if err <= tol else 'TOO LARGE'}, tolerance {tol:g})")
        if plain is not None:
            print(f"  levers alone: ours {med['ours'] * 1000:.0f} ms vs ours without levers "
                  f"{med['ours without levers'] * 1000:.0f} ms: ratio {med['ours'] / med['ours without levers']:.3f}")
        print("  all times (s): " + "; ".join(f"{n} " + " ".join(f"{s:.2f}" for s in v) for n, v in times.items()))
        sys.stdout.flush()
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
