"""
The CLIP text encoder of Stable Diffusion 1.x (openai/clip-vit-large-patch14's text tower):

    token embedding + learned position embedding
    -> N pre-LN transformer blocks (causal self-attention, MLP with quick-GELU)
    -> final LayerNorm

Its per-token output [B, 77, 768] is the UNet's cross-attention context. There is no pooled
output or projection: Stable Diffusion 1.x does not use them. Module names follow transformers'
CLIPTextModel with the leading "text_model." removed, so state_dict keys load without renaming.
"""

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# config

ACTIVATIONS = ("quick_gelu", "gelu")


@dataclass
class CLIPTextConfig:
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072        # MLP width
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77    # longest token sequence (the tokenizer pads/truncates to this)
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"       # "quick_gelu" (OpenAI CLIP, SD 1.x) or "gelu" (exact, erf; e.g. OpenCLIP)

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"unsupported CLIP option hidden_act={self.hidden_act!r} (supported: {ACTIVATIONS})")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                             f"{self.num_attention_heads}")

    @classmethod
    def sd15(cls):
        """SD 1.x's text encoder, openai/clip-vit-large-patch14's text tower."""
        return cls(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=12, max_position_embeddings=77, layer_norm_eps=1e-5, hidden_act="quick_gelu")

    @classmethod
    def from_diffusers(cls, d):
        """
        From a transformers CLIPTextConfig dict (text_encoder/config.json). A whole CLIPModel config
        is accepted too: its "text_config" is used. Token ids, projection_dim and initialisation
        settings are ignored (nothing here uses them).
        """
        d = d.get("text_config", d)
        for key in ("attention_dropout", "dropout"):
            if d.get(key, 0.0) != 0.0:
                raise ValueError(f"unsupported CLIP option {key}={d[key]!r} (only 0.0 is supported)")
        return cls(
            vocab_size=d.get("vocab_size", 49408),
            hidden_size=d.get("hidden_size", 512),      # transformers' defaults where a key is missing
            intermediate_size=d.get("intermediate_size", 2048),
            num_hidden_layers=d.get("num_hidden_layers", 12),
            num_attention_heads=d.get("num_attention_heads", 8),
            max_position_embeddings=d.get("max_position_embeddings", 77),
            layer_norm_eps=d.get("layer_norm_eps", 1e-5),
            hidden_act=d.get("hidden_act", "quick_gelu"),
        )

    def to_dict(self):
        return asdict(self)

# -----------------------------------------------------------------------------
# building blocks


def quick_gelu(x):
    """OpenAI CLIP's sigmoid approximation of GELU."""
    return x * torch.sigmoid(1.702 * x)


class CLIPAttention(nn.Module):
    """Multi-head causal self-attention: each token sees itself and the tokens before it."""

    def __init__(self, config):
        super().__init__()
        d = config.hidden_size
        self.n_head = config.num_attention_heads
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x):
        B, T, C = x.shape
        # [B, T, C] -> [B, n_head, T, head_dim]
        q, k, v = (proj(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # scale 1/sqrt(head_dim)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.out_proj(y)


class CLIPMLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.act = quick_gelu if config.hidden_act == "quick_gelu" else F.gelu
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-LN transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, config):
        super().__init__()
        self.self_attn = CLIPAttention(config)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        x = x + self.mlp(self.layer_norm2(x))
        return x


class CLIPEmbeddings(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, input_ids):
        # input_ids: [B, T] -> [B, T, hidden]; positions 0..T-1 (no position_ids buffer, so none in state_dict)
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.token_embedding(input_ids) + self.position_embedding(pos)[None]


class CLIPEncoder(nn.Module):
    """Only a container, so that keys read encoder.layers.N...; CLIPTextModel runs the layers."""

    def __init__(self, config):
        super().__init__()
        self.layers = nn.ModuleList([CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers)])

# -----------------------------------------------------------------------------
# the text encoder


class CLIPTextModel(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embeddings = CLIPEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids, skip_last_layers: int = 0):
        """
        input_ids: LongTensor [B, T], T <= max_position_embeddings -> hidden states [B, T, hidden_size].

        skip_last_layers=k stops k layers before the end and applies the final LayerNorm to that
        output: transformers' hidden_states[-1-k] through final_layer_norm. AUTOMATIC1111's
        "CLIP skip" n is k = n - 1 (CLIP skip 2, common for anime models, is k = 1).
        """
        T = input_ids.shape[1]
        if T > self.config.max_position_embeddings:
            raise ValueError(f"{T} tokens, the text encoder takes at most {self.config.max_position_embeddings}")
        n = len(self.encoder.layers)
        if not 0 <= skip_last_layers < n:
            raise ValueError(f"skip_last_layers={skip_last_layers} must be in [0, {n - 1}]")
        x = self.embeddings(input_ids)                        # [B, T, C]
        for layer in self.encoder.layers[:n - skip_last_layers]:
            x = layer(x)
        return self.final_layer_norm(x)                      # [B, T, C]
