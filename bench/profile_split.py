"""Where the time goes: torch.profiler (CPU) split of one SD 1.5-size UNet step, or of a whole txt2img with
the default small model, into UNet convs, attention, GroupNorm, ..., VAE decode, text encoder, Python overhead.

    .venv/bin/python bench/profile_split.py unet [--size 32] [--impl ours|diffusers] [--convs plain|auto|prepack]
                                                 [--channels-last]
    .venv/bin/python bench/profile_split.py default [--weights weights/] [--steps 20]

Op categories come from the aten ops' self CPU time; "Python / framework overhead" is the wall time the ops do
not account for (Python, module calls, dispatcher, the profiler itself). Numbers are for comparing parts of one
run, not absolute speeds: the profiler adds its own overhead per op.
"""

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from model.speed import CONVS  # noqa: E402
from model.tuning import cpu_model  # noqa: E402

# first match wins: (category, substrings of aten op names)
CATEGORIES = [
    ("convolutions", ("convolution", "conv2d", "mkldnn_conv")),
    ("attention (SDPA kernel)", ("scaled_dot_product", "flash_attention", "_efficient_attention", "softmax", "bmm", "baddbmm")),
    ("linear layers (q/k/v/out, GEGLU, MLP)", ("addmm", "aten::mm", "aten::linear", "matmul")),
    ("GroupNorm", ("group_norm",)),
    ("LayerNorm", ("layer_norm",)),
    ("activations (SiLU, GELU)", ("silu", "gelu", "sigmoid")),
    ("copies / layout (cat, contiguous, permute copies)", ("copy_", "cat", "clone", "contiguous", "to_dense",
                                                          "_to_copy", "empty", "reorder", "upsample", "interpolate")),
    ("elementwise (add, mul, ...)", ("add", "mul", "sub", "div", "clamp", "exp", "cos", "sin", "pow", "rsqrt", "neg")),
]


def category(op_name):
    for cat, keys in CATEGORIES:
        if any(k in op_name for k in keys):
            return cat
    return "other ops"


def split(prof, wall_s):
    """{category: seconds} from the profile's leaf ops (self time), plus the unaccounted wall time."""
    out = {}
    for evt in prof.key_averages():
        if evt.self_cpu_time_total <= 0 or not evt.key.startswith(("aten::", "mkldnn::")):
            continue
        cat = category(evt.key)
        out[cat] = out.get(cat, 0.0) + evt.self_cpu_time_total / 1e6
    # ops run on the 2 intra-op threads but are timed once on the calling thread, so self times add to <= wall
    out["Python / framework overhead (wall - ops)"] = max(0.0, wall_s - sum(out.values()))
    return out


def labelled(prof, labels):
    """{label: seconds} for record_function regions (their total CPU time on the calling thread)."""
    totals = {}
    for evt in prof.key_averages():
        if evt.key in labels:
            totals[evt.key] = evt.cpu_time_total / 1e6
    return totals


def print_table(title, parts, wall_s):
    print(f"\n{title}: wall {wall_s * 1000:.0f} ms")
    for name, s in sorted(parts.items(), key=lambda kv: -kv[1]):
        print(f"  {name:52s} {s * 1000:9.1f} ms  {100 * s / wall_s:5.1f}%")


def wrap(obj, attr, label):
    """Run obj.attr under record_function(label), so the profile can tell the pipeline's parts apart."""
    fn = getattr(obj, attr)

    def wrapped(*args, **kwargs):
        with record_function(label):
            return fn(*args, **kwargs)

    setattr(obj, attr, wrapped)


def profile_unet(args):
    from unet_step import build_pair, inputs

    ref, ours = build_pair(channels_last=args.channels_last, want_ref=args.impl == "diffusers",
                           prepack=CONVS[args.convs])
    x, t, ctx = inputs(args.size, channels_last=args.channels_last and args.impl == "ours")
    step = (lambda: ref(x, t, encoder_hidden_states=ctx).sample) if args.impl == "diffusers" else (lambda: ours(x, t, ctx))
    with torch.inference_mode():
        step()  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            step()
            wall = time.perf_counter() - start
    print_table(f"SD 1.5 UNet, {args.impl}, one step, batch 2, {args.size}x{args.size} latents, fp32 CPU, "
                f"{torch.get_num_threads()} threads{', channels_last' if args.channels_last else ''}"
                f", convs {args.convs}",
                split(prof, wall), wall)


def profile_default(args):
    from model import StableDiffusion
    from service.cli import default_weights

    pipe = StableDiffusion.from_pretrained(args.weights or default_weights()).optimize(prepack=CONVS[args.convs])
    prompt = "a large red circle in the center on a blue background"
    pipe.txt2img(prompt, steps=args.steps)  # warm-up
    pipe._text_cache.clear()                # so the profiled run encodes its prompts, as a first request does
    wrap(pipe.text_encoder, "forward", "text encoder")
    wrap(pipe.unet, "forward", "UNet")
    wrap(pipe.vae, "decode", "VAE decode")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        pipe.txt2img(prompt, steps=args.steps)
        wall = time.perf_counter() - start
    parts = labelled(prof, ("text encoder", "UNet", "VAE decode"))
    parts["rest (sampler, guidance, PNG conversion, Python)"] = max(0.0, wall - sum(parts.values()))
    size = pipe.native_size
    print_table(f"default model txt2img {size}x{size}, {args.steps} ddim steps, guidance 7.5, by component", parts, wall)
    print_table("same run, by op", split(prof, wall), wall)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("target", choices=["unet", "default"])
    ap.add_argument("--size", type=int, default=32, help="latent side for `unet`")
    ap.add_argument("--impl", choices=["ours", "diffusers"], default="ours")
    ap.add_argument("--convs", choices=["plain", "auto", "prepack"], default="plain",
                    help="our networks' convs: plain (the default here, to profile before optimising), auto (as "
                    "served: plain or prepacked per shape, as measured), prepack")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--weights", default=None)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    print(f"{cpu_model()}, torch ISA {torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    (profile_unet if args.target == "unet" else profile_default)(args)


if __name__ == "__main__":
    main()
