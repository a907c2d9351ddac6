"""
What LoRAs cost here (issue 16), two numbers, each measured side by side in one run (interleaved repeats, medians):

  step    one guided UNet step (batch 2) at the SD 1.5 layout (859.5M parameters, random weights), without LoRAs and
          with one rank-16 LoRA on every layer kohya's LoRA trains (the spatial transformers' linears and 1x1
          convs: 192 layers) active for both rows. Target: <= 1.10 x the base step.
  mixed   32 requests from 16 clients over 8 different LoRAs (rank 8, the default model, its native size):
          images/s when the batches take requests as they come, whatever their LoRA (what model/lora.py allows),
          vs one LoRA set per batch (what servers that merge a LoRA into the weights must do). Batches of at most
          --max-batch (8, the worker's default). Target: >= 1.8x. Beside it, the same two batch plans without
          LoRAs: what batching itself gains on this machine, the most the mixed batches can gain.

    .venv/bin/python bench/lora.py [--sizes 32 64] [--repeats 3] [--steps 20] [--skip step|mixed]
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from model import StableDiffusion
from model.lora import Adapters, _layers
from model.pipeline import Request
from model.tuning import cpu_model

ROOT = Path(__file__).resolve().parent.parent
KOHYA_TARGETS = ("attentions",)      # kohya's LoRA (not LoCon): the Transformer2DModel blocks' linear / 1x1 layers


def write_lora(file, unet, rank, seed, targets=KOHYA_TARGETS):
    """A random kohya LoRA of `rank` for every linear / 1x1 conv layer of the UNet below `targets`."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for path, layer in _layers(unet).items():
        if not any(t in path for t in targets):
            continue
        name = "lora_unet_" + path.replace(".", "_")
        if hasattr(layer, "in_features"):
            down, up = (rank, layer.in_features), (layer.out_features, rank)
        elif tuple(layer.kernel_size) == (1, 1):
            down, up = (rank, layer.in_channels, 1, 1), (layer.out_channels, rank, 1, 1)
        else:
            continue
        state[f"{name}.lora_down.weight"] = torch.randn(down, generator=g) * 0.01
        state[f"{name}.lora_up.weight"] = torch.randn(up, generator=g) * 0.01
        state[f"{name}.alpha"] = torch.tensor(float(rank))
    save_file(state, str(file))
    return len(state) // 3


def timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_step(sizes, repeats, tmp):
    sys.path.insert(0, str(ROOT / "bench"))
    from unet_step import build_pair, inputs

    _, unet = build_pair(want_ref=False, prepack="auto")
    adapters = Adapters({"unet": unet})
    layers = write_lora(tmp / "r16.safetensors", unet, rank=16, seed=0)
    adapters.load(tmp / "r16.safetensors", "r16")
    print(f"rank-16 LoRA on {layers} layers of the SD 1.5 UNet")
    for size in sizes:
        x, t, ctx = inputs(size)

        def base():
            with torch.inference_mode():
                unet(x, t, ctx)

        def with_lora():
            with torch.inference_mode(), adapters.active("unet", [{"r16": 1.0}] * 2):
                unet(x, t, ctx)

        base(), with_lora()                                        # warm-up (the tuner measures here)
        a, b = [], []
        for _ in range(repeats):
            a.append(timed(base))
            b.append(timed(with_lora))
        ma, mb = statistics.median(a), statistics.median(b)
        print(f"  latents {size}x{size} ({size * 8} px), batch 2: base {ma:.3f} s, with the LoRA {mb:.3f} s: "
              f"{mb / ma:.3f} x (target <= 1.10)")


def bench_mixed(repeats, steps, max_batch, tmp):
    pipe = StableDiffusion.from_pretrained(ROOT / "weights").optimize()
    names = []
    for i in range(8):
        write_lora(tmp / f"style{i}.safetensors", pipe.unet, rank=8, seed=100 + i, targets=("",))
        names.append(pipe.load_lora(tmp / f"style{i}.safetensors"))
    # 16 clients, two requests each, each client with its own LoRA (8 LoRAs, 4 requests each), arriving in turn
    requests = [Request(f"a red circle, client {c}", seed=1000 * r + c, loras={names[c % 8]: 0.8})
                for r in range(2) for c in range(16)]
    mixed = [requests[i:i + max_batch] for i in range(0, len(requests), max_batch)]
    by_set = {}
    for r in requests:
        by_set.setdefault(tuple(r.loras), []).append(r)
    per_set = [group[i:i + max_batch] for group in by_set.values() for i in range(0, len(group), max_batch)]

    def run(batches, loras=True):
        for batch in batches:
            if not loras:
                batch = [Request(r.prompt, seed=r.seed) for r in batch]
            pipe.generate(batch, steps=steps, sampler="euler")

    pipe.warm_up()
    run(mixed[:1]), run(per_set[:1])                                # the batch shapes measured once
    a, b, c, d = [], [], [], []
    for _ in range(repeats):
        a.append(timed(lambda: run(mixed)))
        b.append(timed(lambda: run(per_set)))
        c.append(timed(lambda: run(mixed, loras=False)))
        d.append(timed(lambda: run(per_set, loras=False)))
    ma, mb, mc, md = (statistics.median(t) for t in (a, b, c, d))
    n = len(requests)
    print(f"32 requests over 8 LoRAs, {steps} euler steps at {pipe.native_size} px, batches of <= {max_batch}:")
    print(f"  mixed batches ({len(mixed)} of {max_batch}): {n / ma:.2f} images/s; one LoRA set per batch "
          f"({len(per_set)} of {len(per_set[0])}): {n / mb:.2f} images/s: {mb / ma:.2f}x (target >= 1.8)")
    print(f"  the same batch plans without LoRAs: {n / mc:.2f} vs {n / md:.2f} images/s: {md / mc:.2f}x "
          f"(what batching gains here); mixed batches keep {(mb / ma) / (md / mc):.0%} of it")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[32])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--skip", choices=["step", "mixed"])
    args = ap.parse_args()
    print(f"machine: {cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        if args.skip != "mixed":
            bench_mixed(args.repeats, args.steps, args.max_batch, Path(tmp))
        if args.skip != "step":
            bench_step(args.sizes, args.repeats, Path(tmp))


if __name__ == "__main__":
    main()
