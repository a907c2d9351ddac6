"""
Attention for the UNet: multi-head self/cross attention, the GEGLU feed-forward,
the transformer block, and the spatial transformer that runs them over a feature map.

Module and parameter names follow diffusers (Attention, FeedForward, BasicTransformerBlock,
Transformer2DModel) so that state_dict keys match UNet2DConditionModel's exactly.

upcast (SD 2.x's upcast_attention): the attention scores q k^T / sqrt(d) and their softmax are computed in fp32
when the model runs in fp16/bf16, else they can overflow fp16 (SD 2.1 then makes black images).
F.scaled_dot_product_attention already does exactly that on CUDA and CPU: its flash, memory-efficient and
cuDNN kernels accumulate the scores and the softmax in fp32, and its math fallback upcasts fp16/bf16 inputs
(unless someone opts out with torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(True)). So there the
flag costs nothing; on other devices (MPS, XPU, ...) the attention runs on fp32 q, k, v and casts the result back.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

_HALF = (torch.float16, torch.bfloat16)
_SDPA_FP32_DEVICES = ("cuda", "cpu")   # where SDPA reduces fp16/bf16 scores in fp32 by itself (see above)


@dataclass
class RaggedContext:
    """
    A batch's text contexts of different lengths (the prompt syntax's 77-token chunks: 77, 154, 231, ...), given to
    the UNet in place of a context tensor; the UNet passes it as it is to every cross-attention.

    padded   [B, L_max, D]: each row's context, zeros after its own length
    groups   [(rows, L)]: the row indices (LongTensor) whose context is L tokens long; every row in exactly one

    A cross-attention projects keys and values of the padded batch (one pass, so that LoRA hooks see every row),
    then attends each group to its own first L keys only: a row attends to exactly its own context, as when it
    runs alone, and the rest of the UNet runs once for the whole batch.
    """
    padded: torch.Tensor
    groups: list

    @classmethod
    def of(cls, contexts: list) -> "RaggedContext":
        """From a list of [L_i, D] contexts, one per row."""
        longest = max(c.shape[0] for c in contexts)
        padded = torch.stack([F.pad(c, (0, 0, 0, longest - c.shape[0])) for c in contexts])
        lengths = [c.shape[0] for c in contexts]
        groups = [(torch.tensor([i for i, n in enumerate(lengths) if n == L], device=padded.device), L)
                  for L in dict.fromkeys(lengths)]
        return cls(padded, groups)


class Attention(nn.Module):
    """Multi-head attention. Self-attention when context is None, else cross-attention on context."""

    def __init__(self, query_dim, context_dim=None, heads=8, head_dim=64, dropout=0.0, upcast=False):
        super().__init__()
        inner_dim = heads * head_dim
        context_dim = context_dim if context_dim is not None else query_dim
        self.heads = heads
        self.head_dim = head_dim
        self.upcast = upcast            # scores and softmax in fp32 under fp16/bf16 (no parameters)
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner_dim, query_dim), nn.Dropout(dropout)])

    def forward(self, x, context=None):
        # x: [B, N, query_dim], context: [B, L, context_dim] or a RaggedContext (None: attend to x itself)
        ragged = context if isinstance(context, RaggedContext) else None
        context = x if context is None else context if ragged is None else ragged.padded
        B, N, _ = x.shape
        L = context.shape[1]
        q = self.to_q(x).view(B, N, self.heads, self.head_dim).transpose(1, 2)        # [B, h, N, d]
        k = self.to_k(context).view(B, L, self.heads, self.head_dim).transpose(1, 2)  # [B, h, L, d]
        v = self.to_v(context).view(B, L, self.heads, self.head_dim).transpose(1, 2)  # [B, h, L, d]
        if ragged is None:
            y = self._attend(q, k, v)
        else:  # each group of rows on its own keys: [b, h, N, d] from [b, h, L_g, d]
            y = q.new_empty(q.shape)
            for rows, length in ragged.groups:
                y[rows] = self._attend(q[rows], k[rows, :, :length], v[rows, :, :length])
        y = y.transpose(1, 2).reshape(B, N, self.heads * self.head_dim)               # [B, N, h*d]
        for layer in self.to_out:                                                     # linear, dropout
            y = layer(y)
        return y

    def _attend(self, q, k, v):
        """softmax(q k^T / sqrt(d)) v, in fp32 where `upcast` asks and SDPA would not by itself."""
        if self.upcast and q.dtype in _HALF and q.device.type not in _SDPA_FP32_DEVICES:
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v)


class GEGLU(nn.Module):
    """Gated GELU projection: split proj(x) into value and gate, return value * gelu(gate)."""

    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU -> dropout -> linear, hidden size 4 * dim. Keys: net.0.proj, net.2."""

    def __init__(self, dim, mult=4, dropout=0.0):
        super().__init__()
        inner_dim = dim * mult
        self.net = nn.ModuleList([GEGLU(dim, inner_dim), nn.Dropout(dropout), nn.Linear(inner_dim, dim)])

    def forward(self, x):
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nn.Module):
    """Pre-norm transformer block: self-attention, cross-attention on context, feed-forward."""

    def __init__(self, dim, heads, head_dim, context_dim, dropout=0.0, upcast=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, None, heads, head_dim, dropout, upcast)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, context_dim, heads, head_dim, dropout, upcast)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, dropout=dropout)

    def forward(self, x, context):
        # x: [B, N, dim], context: [B, L, context_dim]
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        x = x + self.ff(self.norm3(x))
        return x


class SpatialTransformer(nn.Module):
    """
    Transformer over the pixels of a feature map (diffusers' Transformer2DModel, continuous input):
    GroupNorm -> proj_in -> transformer blocks on [B, H*W, C] tokens -> proj_out -> + input.
    proj_in/proj_out are 1x1 convs (SD 1.x) or, with linear_projection, Linear layers (SD 2.x, SDXL).
    depth: transformer blocks in a row (1 in SD 1.x/2.x; up to 10 in SDXL, its transformer_layers_per_block).
    """

    def __init__(self, channels, heads, context_dim, num_groups=32, depth=1, dropout=0.0,
                 linear_projection=False, upcast=False):
        super().__init__()
        head_dim = channels // heads
        self.linear_projection = linear_projection
        self.norm = nn.GroupNorm(num_groups, channels, eps=1e-6)
        if linear_projection:
            self.proj_in = nn.Linear(channels, channels)
        else:
            self.proj_in = nn.Conv2d(channels, channels, kernel_size=1)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(channels, heads, head_dim, context_dim, dropout, upcast) for _ in range(depth)])
        if linear_projection:
            self.proj_out = nn.Linear(channels, channels)
        else:
            self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x, context):
        # x: [B, C, H, W], context: [B, L, context_dim]
        B, C, H, W = x.shape
        residual = x
        x = self.norm(x)
        if not self.linear_projection:
            x = self.proj_in(x)
        x = x.permute(0, 2, 3, 1).reshape(B, H * W, C)    # [B, H*W, C] one token per pixel
        if self.linear_projection:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.linear_projection:
            x = self.proj_out(x)
        x = x.reshape(B, H, W, C).permute(0, 3, 1, 2).contiguous()  # [B, C, H, W]
        if not self.linear_projection:
            x = self.proj_out(x)
        return x + residual
