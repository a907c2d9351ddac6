"""
Textual inversion: a word written in a prompt stands for n learned vectors in a text encoder's token-embedding
space (an "embedding", trained for one model family).

    file --read_embedding--> vectors per text encoder: [[n, 768]] SD 1.x, [[n, 1024]] SD 2.x,
                             [clip_l [n, 768], clip_g [n, 1280]] SDXL
    load_embedding(file, encoders, name): each tokenizer gets `name` as an added word of n new ids (numbered on
        from its vocabulary: model/tokenizer.py set_added), each text encoder the n vectors as the rows of those
        ids (model/clip.py CLIPEmbeddings.added)
    "a photo of name" -> ids [bos, a, photo, of, id_0 ... id_{n-1}, eos, ...] -> the vectors in the token embedding

This is what diffusers' load_textual_inversion does: it adds the tokens name, name_1, ..., name_{n-1} to the tokenizer
(ids numbered on from len(tokenizer)), grows the token embedding and writes those rows, and its pipelines spell
"name" out as "name name_1 ... name_{n-1}" before tokenizing; the same ids and rows here give the same encodings (and,
where a text encoder pools at the largest id, as SDXL's do, the same pooled position). A prompt without an added word
encodes as before, bit for bit, and the state_dicts do not change: the rows live outside them.

Files (the name defaults to the file's stem, as in the web UI):
    the web UI's .pt            {"string_to_token": {"*": 265}, "string_to_param": {"*": [n, D]}, "name", "step", ...}
    .safetensors (web UI, kohya) {"emb_params": [n, D]}
    SDXL's .safetensors         {"clip_l": [n, 768], "clip_g": [n, 1280]}: clip_l to text_encoder, clip_g to
                                text_encoder_2 (diffusers loads them with one call per tokenizer and encoder)
    diffusers'                  learned_embeds.safetensors / .bin: {token: [D] or [n, D]}; also a bare tensor [n, D]
.pt / .bin files are read with torch.load(weights_only=True) (model/weights/files.py): one that pickles anything but
tensors, dicts, strings and numbers (the original textual_inversion repo's nn.ParameterDict, ...) is refused, as
unpickling it could run code. Embeddings inside PNG images (the web UI's) are not read.
"""

from pathlib import Path

import torch

from .weights.files import WeightsError, read_file

MAX_VECTORS = 75  # one 77-token chunk less bos and eos: a longer embedding could never fit in a prompt
FAMILIES = {768: "SD 1.x, or SDXL's clip_l", 1024: "SD 2.x", 1280: "SDXL's clip_g"}  # by width, for messages


def _family(width: int) -> str:
    return f" ({FAMILIES[width]})" if width in FAMILIES else ""


def _vectors(t, file, what: str) -> torch.Tensor:
    """One tensor of an embedding file as vectors [n, D]: a single vector [D] is [1, D]."""
    if not torch.is_tensor(t) or not t.is_floating_point():
        raise WeightsError(f"{file}: {what} is not a floating-point tensor ({type(t).__name__} "
                           f"{getattr(t, 'dtype', '')})")
    t = t.detach()
    t = t[None] if t.ndim == 1 else t
    if t.ndim != 2 or not 1 <= t.shape[0] <= MAX_VECTORS:
        raise WeightsError(f"{file}: {what} has shape {tuple(t.shape)}; expected [n, width] with 1 <= n <= "
                           f"{MAX_VECTORS} vectors")
    if not torch.isfinite(t).all():
        raise WeightsError(f"{file}: {what} holds NaN or infinite values")
    return t


def read_embedding(file) -> list[torch.Tensor]:
    """
    The vectors of an embedding file, per text encoder: [vectors [n, D]], or SDXL's [clip_l [n, 768],
    clip_g [n, 1280]] (CPU, the file's dtype). WeightsError for anything else, naming the file.
    """
    obj = read_file(file)
    if torch.is_tensor(obj):                                         # torch.save(tensor)
        return [_vectors(obj, file, "the tensor")]
    if not isinstance(obj, dict):
        raise WeightsError(f"{file}: not an embedding: holds a {type(obj).__name__}, not a dict of tensors")
    if "string_to_param" in obj:                                     # the web UI's .pt
        params = obj["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise WeightsError(f"{file}: string_to_param must hold one tensor, found "
                               f"{type(params).__name__} {list(params) if isinstance(params, dict) else ''}")
        (key, t), = params.items()
        return [_vectors(t, file, f"string_to_param[{key!r}]")]
    if "clip_l" in obj or "clip_g" in obj:                           # SDXL: one tensor per text encoder
        for key in ("clip_l", "clip_g"):
            if key not in obj:
                raise WeightsError(f"{file}: an SDXL embedding needs both clip_l and clip_g, {key} is missing")
        return [_vectors(obj[key], file, key) for key in ("clip_l", "clip_g")]
    if "emb_params" in obj:
        return [_vectors(obj["emb_params"], file, "emb_params")]
    if len(obj) == 1:                                                # diffusers: {token: vectors}
        (key, t), = obj.items()
        return [_vectors(t, file, repr(key))]
    raise WeightsError(f"{file}: not an embedding: expected string_to_param (the web UI's .pt), emb_params, "
                       f"clip_l + clip_g (SDXL) or a single {{token: tensor}} (diffusers), found keys {list(obj)[:10]}")


def check_widths(vectors: list[torch.Tensor], widths: list[int], file) -> None:
    """Refuse vectors that do not fit the model: one tensor per text encoder, each as wide as its encoder."""
    found = ", ".join(f"{v.shape[1]} wide{_family(v.shape[1])}" for v in vectors)
    if len(vectors) != len(widths):
        model = " + ".join(str(w) for w in widths)
        what = "SDXL's clip_l + clip_g" if len(vectors) == 2 else "one text encoder"
        raise WeightsError(f"{file}: an embedding for {what} ({found}), but this model has {len(widths)} text "
                           f"encoder(s), {model} wide: an embedding only works with the model family it was made for")
    for k, (v, width) in enumerate(zip(vectors, widths)):
        if v.shape[1] != width:
            encoder = ("text_encoder", "text_encoder_2")[k] if len(widths) == 2 else "text encoder"
            raise WeightsError(f"{file}: a {v.shape[1]}-wide embedding{_family(v.shape[1])}, but this model's "
                               f"{encoder} is {width} wide{_family(width)}: an embedding only works with the model "
                               f"family it was made for")


def _add(tokenizer, encoder, name: str, vectors: torch.Tensor) -> None:
    """Make `name` stand for `vectors` [n, D] in one tokenizer and its text encoder; a name added before is
    replaced in place (it keeps its position among the added words)."""
    emb = encoder.embeddings
    words = {w: emb.added[ids[0] - emb.added_start: ids[-1] + 1 - emb.added_start]
             for w, ids in tokenizer.added.items()}                                        # word -> [n_w, D]
    words[name] = vectors.to(emb.token_embedding.weight)
    tokenizer.set_added({w: len(v) for w, v in words.items()})
    emb.added_start, emb.added = len(tokenizer.vocab), torch.cat(list(words.values()))   # rows of the new ids


def load_embedding(file, encoders, name: str | None = None) -> str:
    """
    Read an embedding file and add it under `name` (default: the file's stem) to each (tokenizer, text encoder)
    of `encoders` (the model's, in order: SDXL's clip_l vectors go to the first, clip_g to the second). Loading a
    name again replaces its vectors (diffusers refuses a token it already has). A name that is already a token
    of a vocabulary ("cat" and most short words, or a special token) is refused, as diffusers refuses it. Nothing
    changes when anything is refused. Returns the name.
    """
    file = Path(file)
    name = file.stem if name is None else name
    if not isinstance(name, str) or not name.strip() or name != name.strip():
        raise ValueError(f"embedding name {name!r} must be a non-empty string without spaces at its ends")
    vectors = read_embedding(file)
    check_widths(vectors, [encoder.config.hidden_size for _, encoder in encoders], file)
    for tokenizer, encoder in encoders:
        if name in tokenizer.vocab:
            raise ValueError(f"embedding name {name!r} is already a token of the vocabulary: writing it in a prompt "
                             f"would also mean that token; load it under another name (token=...)")
        if len(tokenizer.vocab) > encoder.embeddings.token_embedding.num_embeddings:
            raise ValueError(f"the tokenizer's {len(tokenizer.vocab)} tokens do not fit the text encoder's "
                             f"{encoder.embeddings.token_embedding.num_embeddings} rows")
    for (tokenizer, encoder), v in zip(encoders, vectors):
        _add(tokenizer, encoder, name, v)
    return name
