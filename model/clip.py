"""
The CLIP text encoder: one transformer, configured for each Stable Diffusion family's text tower(s).

    token embedding (+ textual inversion's added rows) + learned position embedding
    -> N pre-LN transformer blocks (causal self-attention, MLP with quick-GELU or GELU)
    -> final LayerNorm
    [-> pooled: the final-normed state at each sequence's EOS token -> text_projection (no bias)]

    SD 1.x   openai CLIP ViT-L/14, quick-GELU, 12 layers of 768: the last state after the final LayerNorm
    SD 2.x   OpenCLIP ViT-H/14, GELU, 23 layers of 1024 (diffusers drops OpenCLIP's 24th, as SD 2.x skips
             it): the last state after the final LayerNorm
    SDXL     text_encoder: ViT-L as SD 1.x; text_encoder_2: OpenCLIP ViT-bigG/14, GELU, 32 layers of 1280, with
             text_projection 1280 -> 1280. Both: the penultimate state WITHOUT the final LayerNorm
             (skip_last_layers=1, final_norm=False); bigG also gives the pooled, projected text embedding.

Module names follow transformers' CLIPTextModel with the leading "text_model." removed, and
CLIPTextModelWithProjection's "text_projection", so state_dict keys load without renaming.
"""

from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# config

ACTIVATIONS = ("quick_gelu", "gelu")
ARCHITECTURES = ("CLIPTextModel", "CLIPTextModelWithProjection")  # transformers classes whose weights load here
LEGACY_EOS_TOKEN_ID = 2  # configs from before transformers PR #24773 (all SD ones) say 2: pool at the largest id


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
    projection_dim: int | None = None    # text_projection's output width (SDXL's text_encoder_2); None: no projection
    # the pooled output is at the first of these (legacy 2: at the largest id). A fact of the tokenizer, not of the
    # network: the weights do not record it (an original single file cannot tell it), so == leaves it out
    eos_token_id: int = field(default=LEGACY_EOS_TOKEN_ID, compare=False)

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"unsupported CLIP option hidden_act={self.hidden_act!r} (supported: {ACTIVATIONS})")
        if self.projection_dim is not None and self.projection_dim < 1:
            raise ValueError(f"projection_dim={self.projection_dim!r} must be positive (or None: no projection)")
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
        is accepted too: its "text_config" is used (without a projection). A text_projection is built only
        for architectures ["CLIPTextModelWithProjection"]: a plain CLIPTextModel's projection_dim is unused.
        eos_token_id picks the pooled position; other token ids and initialisation settings are ignored.
        """
        d = d.get("text_config", d)
        architectures = d.get("architectures") or []
        for arch in architectures:
            if arch not in ARCHITECTURES:
                raise ValueError(f"unsupported CLIP option architectures={architectures!r} "
                                 f"(supported: {ARCHITECTURES})")
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
            projection_dim=d.get("projection_dim", 512) if "CLIPTextModelWithProjection" in architectures else None,
            eos_token_id=d.get("eos_token_id", 49407),
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
        # textual inversion (model/embeddings.py): vectors [n, hidden] of the ids added_start ... added_start + n - 1
        # that a tokenizer gives its added words; not in the state_dict. None: no added words
        self.register_buffer("added", None, persistent=False)
        self.added_start = config.vocab_size

    def forward(self, input_ids):
        # input_ids: [B, T] -> [B, T, hidden]; positions 0..T-1 (no position_ids buffer, so none in state_dict)
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        if self.added is not None and (input_ids >= self.added_start).any():
            # the table diffusers' resize_token_embeddings leaves: the rows below added_start, then the added ones
            tokens = F.embedding(input_ids, torch.cat([self.token_embedding.weight[:self.added_start], self.added]))
        else:
            tokens = self.token_embedding(input_ids)
        return tokens + self.position_embedding(pos)[None]


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
        # CLIPTextModelWithProjection's; absent (no key) for a plain CLIPTextModel
        self.text_projection = (nn.Linear(config.hidden_size, config.projection_dim, bias=False)
                                if config.projection_dim is not None else None)

    def forward(self, input_ids, skip_last_layers: int = 0, final_norm: bool = True, pooled: bool = False):
        """
        input_ids: LongTensor [B, T], T <= max_position_embeddings -> hidden states [B, T, hidden_size],
        or (hidden states, pooled [B, projection_dim or hidden_size]) when pooled=True.

        skip_last_layers=k takes the output of the layer k before the end: transformers' hidden_states[-1-k].
        final_norm applies the final LayerNorm to it. The defaults (0, True) are transformers'
        last_hidden_state (SD 1.x, SD 2.x). AUTOMATIC1111's "CLIP skip" n is k = n - 1 with the norm (CLIP
        skip 2, common for anime models, is k = 1); SDXL conditions on k = 1 without it (final_norm=False).

        pooled=True also returns the pooled output whatever k is: the final-normed state after the last layer at
        each sequence's first eos_token_id (legacy eos_token_id 2: at the largest id, which is EOS in CLIP's
        vocab), through text_projection when the config has one (transformers' text_embeds, else pooler_output).
        """
        B, T = input_ids.shape
        if T > self.config.max_position_embeddings:
            raise ValueError(f"{T} tokens, the text encoder takes at most {self.config.max_position_embeddings}")
        n = len(self.encoder.layers)
        if not 0 <= skip_last_layers < n:
            raise ValueError(f"skip_last_layers={skip_last_layers} must be in [0, {n - 1}]")
        x = self.embeddings(input_ids)                        # [B, T, C]
        for layer in self.encoder.layers[:n - skip_last_layers]:
            x = layer(x)
        hidden = self.final_layer_norm(x) if final_norm else x  # [B, T, C]
        if not pooled:
            return hidden
        for layer in self.encoder.layers[n - skip_last_layers:]:  # the pooled output comes from the last layer
            x = layer(x)
        last = self.final_layer_norm(x) if skip_last_layers or not final_norm else hidden  # [B, T, C]
        if self.config.eos_token_id == LEGACY_EOS_TOKEN_ID:
            eos = input_ids.argmax(dim=-1)                                      # [B], first largest id
        else:
            eos = (input_ids == self.config.eos_token_id).int().argmax(dim=-1)  # [B], first EOS (0 if none)
        out = last[torch.arange(B, device=last.device), eos]  # [B, C]
        if self.text_projection is not None:
            out = self.text_projection(out)                   # [B, projection_dim]
        return hidden, out
