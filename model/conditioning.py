"""
Text conditioning per family: prompts -> what the UNet is conditioned on.

    SD 1.x, 2.x   one tokenizer + text encoder; context = its last hidden state, final-normed   [77, D]
    SDXL          two: CLIP ViT-L and OpenCLIP bigG; context = both PENULTIMATE hidden states, unnormed,
                  side by side [77, 768 + 1280]; pooled = bigG's final-normed EOS state through its
                  text_projection [1280], for the UNet's added (text_time) conditioning

An SDXL model that says force_zeros_for_empty_prompt (model_index.json; SDXL base does) conditions an empty
negative prompt on zeros, context and pooled alike, not on the encoded empty string; so does diffusers.
"""

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .clip import CLIPTextModel
from .tokenizer import CLIPTokenizer


@dataclass
class Encoded:
    """One prompt's conditioning."""
    context: torch.Tensor                 # [L, D] hidden states the UNet cross-attends to
    pooled: Optional[torch.Tensor]        # [P] pooled text embedding (SDXL), else None


class TextConditioner:
    """The tokenizer(s) and text encoder(s) of a model, and how their outputs become conditioning."""

    def __init__(self, tokenizer: CLIPTokenizer, text_encoder: CLIPTextModel,
                 tokenizer_2: Optional[CLIPTokenizer] = None, text_encoder_2: Optional[CLIPTextModel] = None,
                 zeros_for_empty_negative: bool = False):
        self.encoders = [(tokenizer, text_encoder)] + ([(tokenizer_2, text_encoder_2)] if text_encoder_2 else [])
        self.zeros_for_empty_negative = zeros_for_empty_negative

    @property
    def dual(self) -> bool:
        """SDXL's two encoders: penultimate states side by side, and a pooled output."""
        return len(self.encoders) == 2

    @torch.inference_mode()
    def encode(self, prompts: Sequence[str], device) -> list[Encoded]:
        """Each prompt's conditioning."""
        if not self.dual:
            tokenizer, encoder = self.encoders[0]
            context = encoder(tokenizer(list(prompts)).to(device))          # [B, 77, D]
            return [Encoded(c, None) for c in context]
        states, pooled = [], None
        for tokenizer, encoder in self.encoders:
            hidden, pooled = encoder(tokenizer(list(prompts)).to(device), skip_last_layers=1, final_norm=False,
                                     pooled=True)                            # [B, 77, D_i], [B, P]
            states.append(hidden)
        context = torch.cat(states, dim=-1)                                  # [B, 77, D_1 + D_2]
        return [Encoded(c, p) for c, p in zip(context, pooled)]              # pooled: the last encoder's

    def zeros(self, like: Encoded) -> Encoded:
        return Encoded(torch.zeros_like(like.context), None if like.pooled is None else torch.zeros_like(like.pooled))
