r"""
AUTOMATIC1111's prompt syntax: prompt text -> what to encode (token ids per 77-token chunk + a weight per token).

    text --extract_lora_tags--> text, {lora: weight} --parse_attention--> [(fragment, weight), ...]
         --chunk_fragments--> Chunks: rows of 77 ids (bos, 75, eos, pad) + 77 weights
    CLIP(each row) -> hidden [B, 77 * k, D] --apply_weights--> what the UNet cross-attends to

The emphasis grammar (the web UI's modules/prompt_parser.py, parse_prompt_attention):

    syntax             meaning                                          example -> fragments
    (text)             weight x 1.1                                     "a (b)"     -> ("a ", 1.0), ("b", 1.1)
    ((text))           x 1.1 per pair: 1.1 * 1.1 = 1.21...              "((b))"     -> ("b", 1.2100000000000002)
    [text]             weight / 1.1 (x 1/1.1)                           "[b]"       -> ("b", 0.9090909090909091)
    (text:1.3)         weight x 1.3: [+-], digits and dots, spaces      "(b: 1.3 )" -> ("b", 1.3)
                       allowed around it; "1.2.3" is an error
    nesting            the factors multiply                             "((b:2))"   -> ("b", 2.2)
    \( \) \[ \] \\     the character itself                             "\(b\)"     -> ("(b)", 1.0)
    \ before any       nothing: the backslash vanishes                  "a\b"       -> ("ab", 1.0)
    other character
    stray ( or [       never closed: applies to the REST of the prompt  "a (b c"    -> ("a ", 1.0), ("b c", 1.1)
    stray ) or ]       nothing open to close: a literal character       "a) b"      -> ("a) b", 1.0)
    (a:b)              not a number: the ":" is text, () gives 1.1      "(a:b)"     -> ("a:b", 1.1)
    BREAK              uppercase, a whole word: the marker ("BREAK", -1), "a BREAK b" -> ("a", 1.0), ("BREAK", -1),
                       which ends the current chunk; spaces around it     ("b", 1.0)
                       are dropped. "BREAKfast", "break": plain text
    equal neighbours   merged into one fragment                         "(a)(b)"    -> ("ab", 1.1)
    empty prompt       one empty fragment                               ""          -> ("", 1.0)
    <lora:NAME:W>      not emphasis: extract_lora_tags takes it out first (see there)

Round and square brackets are two separate stacks: "[(a])" closes "[" first, then "(" (a: x 1/1.1 x 1.1).
A web UI quirk kept as is: BREAK inside brackets gets multiplied like any fragment ("(a BREAK b)" gives
("BREAK", -1.1)), so it is no longer the marker; the chunker then encodes the word "BREAK" at weight -1.1.

Not handled here (the web UI does them elsewhere): prompt editing [from:to:when] and alternation [a|b]
(its schedule parser runs before this grammar; here "[a:b:0.5]" is just "[...]"), AND (composable
diffusion), comment lines, textual-inversion embeddings inside chunks.
"""

import re
from dataclasses import dataclass

import torch

CHUNK_LENGTH = 75  # prompt tokens per chunk; bos + 75 + eos = 77, CLIP's context
COMMA_BACKTRACK = 20  # the web UI's default comma_padding_backtrack
ROUND = 1.1  # what one pair of () multiplies by; [] divides by it

# one token of the emphasis grammar; the alternatives are tried in this order
_TOKEN = re.compile(r"""
    (?P<escape>\\[()\[\]\\]?)            # \( \) \[ \] \\ -> that character; a lone \ -> nothing
  | (?P<open>[(\[])
  | :\s*(?P<weight>[+-]?[.\d]+)\s*\)     # ":1.3)" closes the innermost open ( with weight 1.3
  | (?P<close>[)\]])
  | (?P<text>[^\\()\[\]:]+|:)            # plain text, or a ":" that is not a weight
""", re.VERBOSE)
_BREAK = re.compile(r"\s*\bBREAK\b\s*")
_TAG = re.compile(r"<(\w+):([^>]+)>")  # the web UI's extra-network tag: <kind:arg:arg...>
BREAK = ("BREAK", -1.0)  # the marker fragment


# -----------------------------------------------------------------------------
# emphasis


def parse_attention(text: str) -> list[tuple[str, float]]:
    r"""Split a prompt into (text, weight) fragments by the grammar at the top of this file, as the web
    UI's parse_prompt_attention does, floats included (factors applied in the same order).

    >>> parse_attention("a (red:1.5) [circle]")
    [('a ', 1.0), ('red', 1.5), (' ', 1.0), ('circle', 0.9090909090909091)]
    >>> parse_attention("(unbalanced")
    [('unbalanced', 1.1)]
    >>> parse_attention("a BREAK b")
    [('a', 1.0), ('BREAK', -1.0), ('b', 1.0)]
    """
    fragments = []  # [text, weight] lists, multiplied in place as brackets close
    round_open, square_open = [], []  # where each open bracket's fragments start

    def multiply(start, factor):
        for fragment in fragments[start:]:
            fragment[1] *= factor

    for m in _TOKEN.finditer(text):
        token = m.group(0)
        if m.group("escape"):
            fragments.append([token[1:], 1.0])
        elif token == "(":
            round_open.append(len(fragments))
        elif token == "[":
            square_open.append(len(fragments))
        elif m.group("weight") is not None and round_open:
            try:
                weight = float(m.group("weight"))
            except ValueError:
                raise ValueError(f"bad weight {m.group('weight')!r} in prompt {text!r}") from None
            multiply(round_open.pop(), weight)
        elif token == ")" and round_open:
            multiply(round_open.pop(), ROUND)
        elif token == "]" and square_open:
            multiply(square_open.pop(), 1 / ROUND)
        else:  # plain text, or a bracket / ":weight)" with nothing open: literal
            for i, part in enumerate(_BREAK.split(token)):
                if i > 0:
                    fragments.append(list(BREAK))
                fragments.append([part, 1.0])
    for start in round_open:  # never closed: to the end of the prompt
        multiply(start, ROUND)
    for start in square_open:
        multiply(start, 1 / ROUND)

    merged = []
    for part, weight in fragments or [["", 1.0]]:
        if merged and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + part, weight)
        else:
            merged.append((part, weight))
    return merged


# -----------------------------------------------------------------------------
# LoRA tags


def extract_lora_tags(text: str) -> tuple[str, dict[str, float]]:
    """Take the web UI's extra-network tags out of a prompt (modules/extra_networks.py, parse_prompt; the
    weights as extensions-builtin/Lora/extra_networks_lora.py reads them). Returns (text, {name: weight}).

    <lora:NAME>               weight 1.0
    <lora:NAME:W>             weight W (text encoder and UNet alike)
    <lora:NAME:W:W>           the web UI's TE_W:UNET_W form; accepted when both are equal
    <lora:NAME:te=W>          named, likewise unet=W (unset, the UNet weight follows the text encoder's)
    <lyco:...>                the same: the web UI registers lyco as another name for lora
    <other:...>               removed from the text and ignored, as the web UI does with kinds it has no
                              network for (here that includes hypernet)
    the same NAME twice       the weights add up: the web UI applies each tag separately, and a LoRA's
                              change to a weight is linear in its multiplier

    Left out, a ValueError: a text-encoder weight that differs from the UNet's, dyn (the 4th field,
    dyn=), a weight that is not a number. Each tag is replaced by nothing: spaces around it stay.

    >>> extract_lora_tags("a cat <lora:ink:0.8>, <lora:paper>")
    ('a cat , ', {'ink': 0.8, 'paper': 1.0})
    """
    loras = {}
    for kind, args in _TAG.findall(text):
        if kind not in ("lora", "lyco"):
            continue
        name, weight = _lora_weight(args.split(":"), f"<{kind}:{args}>")
        loras[name] = loras.get(name, 0.0) + weight
    return _TAG.sub("", text), loras


def _lora_weight(items: list[str], tag: str) -> tuple[str, float]:
    """NAME and its one weight from a tag's items, by the web UI's rules: items with one "=" are named,
    the others positional; te = positional[1] (default 1.0), or te=; unet = positional[2] (default te), or unet=."""
    named = dict(item.split("=") for item in items if item.count("=") == 1)
    positional = [item for item in items if item.count("=") != 1]
    if not positional:
        raise ValueError(f"{tag}: no LoRA name")
    if len(positional) > 3 or "dyn" in named:
        raise ValueError(f"{tag}: dyn (a LoRA's rank limit) is not supported")
    try:
        te = float(positional[1]) if len(positional) > 1 else 1.0
        te = float(named.get("te", te))
        unet = float(positional[2]) if len(positional) > 2 else te
        unet = float(named.get("unet", unet))
    except ValueError:
        raise ValueError(f"{tag}: the weight is not a number") from None
    if te != unet:
        raise ValueError(f"{tag}: separate text-encoder ({te}) and UNet ({unet}) weights are not supported")
    return positional[0], te


# -----------------------------------------------------------------------------
# chunks of 75 tokens


@dataclass
class Chunks:
    """One prompt as k rows of 77: ids (bos, up to 75 prompt ids, eos, pad...) and a weight per id
    (1.0 at bos, eos and pad). Encode each row, then concatenate the hidden states: [77 * k, D]."""
    ids: list[list[int]]
    weights: list[list[float]]

    def __len__(self) -> int:
        return len(self.ids)


def is_plain(text: str, tokenizer) -> bool:
    """True when the prompt uses none of this syntax (no ( ) [ ] \\, no BREAK, no <kind:...> tag) and fits
    in one chunk (at most 75 tokens): the caller may then encode it exactly as today, tokenizer([text]).
    E.g. "a red circle, blue" and "a:b" are plain; "a (red) circle", "a BREAK b", "<lora:ink> a" are not.
    (Not plain only means "take the chunk path", which gives the same ids when the syntax changes nothing.)
    """
    return not (any(c in text for c in "()[]\\") or _BREAK.search(text) or _TAG.search(text)
                or len(tokenizer.encode(text)) > CHUNK_LENGTH)


def chunk_fragments(fragments: list[tuple[str, float]], tokenizer, backtrack: int = COMMA_BACKTRACK) -> Chunks:
    """Tokenize each fragment (tokenizer.encode: text -> ids without bos/eos) and fill chunks of 75 tokens,
    as the web UI's sd_hijack_clip.tokenize_line does:

    - every token of a fragment gets the fragment's weight;
    - when a chunk is full and a token (not a comma) arrives, and the chunk's last comma is among its last
      `backtrack` tokens (index >= 75 - backtrack), the chunk is cut just after that comma and the tokens
      after it move on to the next chunk; a comma that itself starts a chunk is not remembered;
    - the BREAK marker ends the chunk (padded), even an empty one: "BREAK a" is two chunks, the first empty;
      "a BREAK" is one;
    - an empty prompt is one chunk of padding.

    Rows are bos + ids + eos + tokenizer.pad_id: exactly tokenizer([text])[0] for a plain prompt of at most
    75 tokens, whatever the pad (eos for SD 1.x and SDXL's CLIP-L, "!" = 0 for SD 2.x and SDXL's bigG; the
    web UI also pads everything after the first eos with its id_pad).

    E.g. with CLIP's ids, [("a ", 1.0), ("cat", 1.2)] -> ids [[49406, 320, 2368, 49407, 49407, ...]] and
    weights [[1.0, 1.0, 1.2, 1.0, 1.0, ...]], 77 each.
    """
    comma = tokenizer.encode(",")
    comma = comma[0] if len(comma) == 1 and comma[0] != tokenizer.eos_id else None
    done = []  # finished chunks: (ids, weights), at most 75 each
    ids, weights, last_comma = [], [], -1
    for text, weight in fragments:
        if (text, weight) == BREAK:
            done.append((ids, weights))
            ids, weights, last_comma = [], [], -1
            continue
        for token in tokenizer.encode(text):
            if token == comma:
                last_comma = len(ids)
            elif len(ids) == CHUNK_LENGTH and last_comma != -1 and len(ids) - last_comma <= backtrack:
                cut = last_comma + 1
                done.append((ids[:cut], weights[:cut]))
                ids, weights, last_comma = ids[cut:], weights[cut:], -1
            if len(ids) == CHUNK_LENGTH:
                done.append((ids, weights))
                ids, weights, last_comma = [], [], -1
            ids.append(token)
            weights.append(weight)
    if ids or not done:
        done.append((ids, weights))
    return Chunks([_row(tokenizer, i) for i, _ in done], [_weight_row(w) for _, w in done])


def tokenize_prompt(text: str, tokenizer) -> Chunks:
    """parse_attention, then chunk_fragments (LoRA tags should be taken out first: extract_lora_tags)."""
    return chunk_fragments(parse_attention(text), tokenizer)


def pad_chunks(batch: list[Chunks], tokenizer, length: int = 0) -> list[Chunks]:
    """Give every prompt of a batch as many chunks as the longest (or `length`, if more), appending empty chunks
    (bos, eos, pad...), as the web UI does to a negative prompt shorter than its positive one (sd_hijack_clip
    forward, empty_chunk)."""
    k = max(length, *(len(c) for c in batch))
    empty_ids, empty_weights = _row(tokenizer, []), _weight_row([])
    return [Chunks(c.ids + [list(empty_ids) for _ in range(k - len(c))],
                   c.weights + [list(empty_weights) for _ in range(k - len(c))]) for c in batch]


def _row(tokenizer, ids: list[int]) -> list[int]:
    return [tokenizer.bos_id, *ids, tokenizer.eos_id] + [tokenizer.pad_id] * (CHUNK_LENGTH - len(ids))


def _weight_row(weights: list[float]) -> list[float]:
    return [1.0, *weights, 1.0] + [1.0] * (CHUNK_LENGTH - len(weights))


# -----------------------------------------------------------------------------
# weights on the encoder's output


def apply_weights(hidden: torch.Tensor, weights: torch.Tensor, chunk: int = CHUNK_LENGTH + 2) -> torch.Tensor:
    """The web UI's default emphasis ("Original", modules/sd_emphasis.py): multiply each token's hidden state
    by its weight, then rescale so that the mean of all values equals the mean before weighting:
    z' = z * w;  z'' = z' * (mean(z) / mean(z')).

    hidden [B, 77 * k, D], weights [B, 77 * k] -> [B, 77 * k, D] in hidden's dtype. The means are taken per
    77-token chunk, as the web UI does (it runs this on each chunk's encoder output), and per sample: the
    web UI takes them over its batch, which is one prompt but for prompt editing; here batch-mates never
    influence each other. Computed in float32 (the web UI's weights tensor is float32, so its product is
    too). All weights 1.0 give `hidden` back unchanged. Where the weighted mean is exactly 0 the rescale is
    skipped (the web UI would divide by zero).
    """
    B, L, D = hidden.shape
    if L % chunk:
        raise ValueError(f"hidden has {L} tokens, not a multiple of {chunk}")
    z = hidden.float().reshape(B, L // chunk, chunk, D)
    before = z.mean(dim=(2, 3), keepdim=True)
    z = z * weights.float().reshape(B, L // chunk, chunk, 1)
    after = z.mean(dim=(2, 3), keepdim=True)
    z = z * torch.where(after == 0, torch.ones_like(after), before / after)
    return z.reshape(B, L, D).to(hidden.dtype)
