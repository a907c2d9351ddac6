"""
Text conditioning per family: prompts -> what the UNet is conditioned on.

    SD 1.x, 2.x   one tokenizer + text encoder; context = its last hidden state, final-normed   [77, D]
    SDXL          two: CLIP ViT-L and OpenCLIP bigG; context = both PENULTIMATE hidden states, unnormed,
                  side by side [77, 768 + 1280]; pooled = bigG's final-normed EOS state through its
                  text_projection [1280], for the UNet's added (text_time) conditioning

An SDXL model that says force_zeros_for_empty_prompt (model_index.json; SDXL base does) conditions an empty
negative prompt on zeros, context and pooled alike, not on the encoded empty string; so does diffusers.

Prompt syntax (AUTOMATIC1111's, model/prompts.py): a plain prompt (prompts.is_plain: no syntax, at most 75
tokens) is encoded as above, exactly as diffusers encodes it. Any other is cut into k chunks of 77 tokens
(prompts.tokenize_prompt), each chunk goes through the encoder(s) as one plain 77-token prompt would, each
encoder's states are weighted and rescaled to their mean per chunk (prompts.apply_weights: the web UI runs its
emphasis on each embedder's output, so SDXL's two encoders are rescaled separately), and the chunks are
concatenated along the sequence: context [77 * k, D]. SDXL's pooled comes from the FIRST chunk, unweighted, as the
web UI takes it. A prompt may be padded to more chunks with empty ones (bos, eos, pad...), as the web UI pads the
shorter of a prompt and its negative prompt.
"""

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .clip import CLIPTextModel
from .prompts import CHUNK_LENGTH, apply_weights, is_plain, pad_chunks, tokenize_prompt
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

    def is_plain(self, prompt: str) -> bool:
        """No prompt syntax and at most 75 tokens, for every tokenizer: encoded as diffusers encodes it."""
        return all(is_plain(prompt, tokenizer) for tokenizer, _ in self.encoders)

    def count_chunks(self, prompt: str) -> int:
        """How many 77-token chunks the prompt's context has (1 for a plain prompt; at least 1)."""
        if self.is_plain(prompt):
            return 1
        return max(len(tokenize_prompt(prompt, tokenizer)) for tokenizer, _ in self.encoders)

    @torch.inference_mode()
    def encode(self, prompts: Sequence[str], device, chunks: Optional[Sequence[int]] = None) -> list[Encoded]:
        """Each prompt's conditioning: context [77 * k, D]. chunks[i]: pad prompt i with empty chunks to at least
        this many (default 1: none). A plain prompt at one chunk takes the plain path (_encode_plain), bit for bit
        today's diffusers-equal one; any other the chunked one (_encode_chunks)."""
        chunks = [1] * len(prompts) if chunks is None else list(chunks)
        plain = [i for i, (p, k) in enumerate(zip(prompts, chunks)) if k <= 1 and self.is_plain(p)]
        other = sorted(set(range(len(prompts))) - set(plain))
        out: list[Optional[Encoded]] = [None] * len(prompts)
        if plain:
            for i, e in zip(plain, self._encode_plain([prompts[i] for i in plain], device)):
                out[i] = e
        if other:
            encoded = self._encode_chunks([prompts[i] for i in other], device, [chunks[i] for i in other])
            for i, e in zip(other, encoded):
                out[i] = e
        return out

    def _encode_chunks(self, prompts: Sequence[str], device, chunks: Sequence[int]) -> list[Encoded]:
        """The prompt syntax: every chunk of every prompt through each encoder in one batch ([sum k, 77]), then
        weighted per chunk and encoder, then each prompt's chunks side by side along the sequence."""
        per_encoder = [[tokenize_prompt(p, tokenizer) for p in prompts] for tokenizer, _ in self.encoders]
        # (with SDXL's two tokenizers, one vocabulary in practice: the same chunks, but for the pad id)
        counts = [max(k, *(len(c[i]) for c in per_encoder)) for i, k in enumerate(chunks)]
        states, pooled = [], None
        for (tokenizer, encoder), rows in zip(self.encoders, per_encoder):
            rows = [pad_chunks([c], tokenizer, k)[0] for c, k in zip(rows, counts)]
            ids = torch.tensor([r for c in rows for r in c.ids], device=device)                   # [N, 77]
            weights = torch.tensor([w for c in rows for w in c.weights], device=device)           # [N, 77]
            if self.dual:   # as _encode_plain: penultimate states, unnormed; pooled from the last encoder
                hidden, pooled = encoder(ids, skip_last_layers=1, final_norm=False, pooled=True)  # [N, 77, D_i]
            else:
                hidden = encoder(ids)                                                             # [N, 77, D]
            states.append(apply_weights(hidden, weights))      # one chunk per row: the means per chunk
        context = torch.cat(states, dim=-1)                                                       # [N, 77, D]
        out, start = [], 0
        for k in counts:
            c = context[start:start + k].reshape(k * (CHUNK_LENGTH + 2), context.shape[-1])      # [77 k, D]
            out.append(Encoded(c, None if pooled is None else pooled[start]))                     # the first chunk's
            start += k
        return out

    def _encode_plain(self, prompts: Sequence[str], device) -> list[Encoded]:
        """Prompts without syntax, each one row of 77 tokens, as diffusers encodes them."""
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
