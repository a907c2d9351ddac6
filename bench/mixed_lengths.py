"""
A batch whose prompts have different lengths (model/prompts.py: 77 tokens per chunk), two ways to run its UNet step,
at the SD 1.5 architecture (random weights): request A's prompt is one chunk (77 tokens), request B's three (231);
both guided, so the UNet's rows are [uncond A, uncond B, cond A, cond B].

    ragged          what model/pipeline.py does: one UNet call with a RaggedContext (model/attention.py): each
                    cross-attention projects the zero-padded contexts at once, then attends each group of rows of
                    one length to its own keys only
    sub-batches     one UNet call per context length, each row with its own context (2 rows at 77 tokens, then
                    2 rows at 231)
    padded + mask   every context zero-padded to 231 and the padded keys masked in every cross-attention
                    (F.scaled_dot_product_attention's attn_mask; patched in here, the model has no mask)
    one length      for scale: the 4 rows at 77 tokens in one call, what the batch costs when no prompt is long

Prints the median time of each (timed interleaved), and for each way the max abs difference of its rows to the
same rows computed alone (each request's 2 rows in a call by themselves), which is what batch invariance asks,
beside what batching does today (rows of 77 tokens in a batch of 4 against the same rows alone).

    .venv/bin/python bench/mixed_lengths.py [--sizes 32 64] [--repeats 3] [--device cuda --dtype fp16]
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from model import sd15
from model.attention import Attention, RaggedContext
from model.unet import UNet, UNetConfig

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
KEY_MASK = None   # [B, L] bool, True = a real key: set while "padded + mask" runs


def masked_forward(self, x, context=None):
    """Attention.forward, with KEY_MASK on the cross-attention's keys."""
    if context is None or KEY_MASK is None:
        return original_forward(self, x, context)
    B, N, _ = x.shape
    L = context.shape[1]
    q = self.to_q(x).view(B, N, self.heads, self.head_dim).transpose(1, 2)
    k = self.to_k(context).view(B, L, self.heads, self.head_dim).transpose(1, 2)
    v = self.to_v(context).view(B, L, self.heads, self.head_dim).transpose(1, 2)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=KEY_MASK[:, None, None, :])
    y = y.transpose(1, 2).reshape(B, N, self.heads * self.head_dim)
    for layer in self.to_out:
        y = layer(y)
    return y


original_forward = Attention.forward


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main():
    global KEY_MASK
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[32], help="latent sides (image side / 8)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    args = ap.parse_args()
    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)
    unet = UNet(UNetConfig.from_diffusers(sd15.UNET)).eval().to(args.device, dtype)
    Attention.forward = masked_forward
    g = torch.Generator().manual_seed(1)
    short = torch.randn(2, 77, 768, generator=g).to(args.device, dtype)      # uncond A, cond A
    long = torch.randn(2, 231, 768, generator=g).to(args.device, dtype)      # uncond B, cond B
    padded = torch.cat([torch.cat([short, torch.zeros(2, 154, 768).to(short)], dim=1), long])   # rows A, A, B, B
    mask = torch.ones(4, 231, dtype=torch.bool, device=args.device)
    mask[:2, 77:] = False
    print(f"torch {torch.__version__}, {args.device} {args.dtype}, {torch.get_num_threads()} threads; "
          f"rows here ordered [A, A, B, B] (the pipeline's order does not change the cost)")
    for size in args.sizes:
        x = torch.randn(4, 4, size, size, generator=g).to(args.device, dtype)
        t = torch.tensor(500.0, device=args.device)

        def sub_batches():
            return torch.cat([unet(x[:2], t, short), unet(x[2:], t, long)])

        def padded_mask():
            global KEY_MASK
            KEY_MASK = mask
            try:
                return unet(x, t, padded)
            finally:
                KEY_MASK = None

        ragged = RaggedContext.of([*short, *long])

        def ragged_call():
            return unet(x, t, ragged)

        def one_length():
            return unet(x, t, torch.cat([short, short]))

        ways = {"ragged": ragged_call, "sub-batches": sub_batches, "padded + mask": padded_mask,
                "one length (for scale)": one_length}
        with torch.inference_mode():
            alone = torch.cat([unet(x[:2], t, short), unet(x[2:], t, long)]).float()   # each request by itself
            errors = {name: (fn().float() - alone).abs().max().item() for name, fn in list(ways.items())[:3]}
            # for scale: what batching does today, without long prompts (rows A in a batch of 4 against alone)
            errors["today's batching (for scale)"] = (one_length()[:2].float() - alone[:2]).abs().max().item()
            times = {name: [] for name in ways}
            for _ in range(args.repeats):
                for name, fn in ways.items():
                    sync(args.device)
                    start = time.perf_counter()
                    fn()
                    sync(args.device)
                    times[name].append(time.perf_counter() - start)
        med = {name: statistics.median(v) for name, v in times.items()}
        print(f"latents {size}x{size}, 4 rows: " + ", ".join(f"{n} {med[n] * 1000:.0f} ms" for n in ways) +
              f" (medians of {args.repeats}); / one length: " +
              ", ".join(f"{n} {med[n] / med['one length (for scale)']:.2f}" for n in list(ways)[:3]))
        print("  max abs difference to each request's rows alone: " +
              ", ".join(f"{n} {e:.2e}" for n, e in errors.items()))


if __name__ == "__main__":
    main()
