"""
CLIP's byte-level BPE tokenizer, as Stable Diffusion 1.x uses it (openai/clip-vit-large-patch14).

    text -> split out typed special tokens -> clean up (control chars, whitespace, spaces around
    CJK ideographs, NFC, lower-case) -> pre-tokenise into words with CLIP's regex
    -> each word's UTF-8 bytes as printable symbols, "</w>" on the last -> apply BPE merges
    in rank order -> ids from vocab.json.

The cleanup is what transformers' slow CLIPTokenizer does when ftfy is not installed (BERT's
BasicTokenizer without accent stripping or punctuation splitting), so ids equal
`transformers.CLIPTokenizer(...)(text, padding="max_length", max_length=77, truncation=True)`.
The vocabulary and merges come from vocab.json + merges.txt or from tokenizer.json (the one file today's
transformers saves). `train_bpe` builds a CLIP-style vocabulary + merges from a corpus of captions.
"""

import heapq
import itertools
import json
import os
import re
import sys
import unicodedata
from collections import Counter
from functools import lru_cache

import torch

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
MAX_MERGES = 49152 - 256 - 2  # openai/CLIP (and transformers) read at most this many merges
MAX_VOCAB = 2 * 256 + MAX_MERGES + 2  # 49408, CLIP's vocabulary size

# -----------------------------------------------------------------------------
# bytes <-> printable symbols


@lru_cache
def bytes_to_unicode() -> dict[int, str]:
    """Map each of the 256 byte values to a printable character (GPT-2/CLIP's table): bytes that are
    printable in Latin-1 map to themselves, the others (controls, space, 0xAD) to chr(256 + n)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return table  # insertion order = CLIP's vocabulary order of the byte symbols


@lru_cache
def _byte_decoder() -> dict[str, int]:
    return {s: b for b, s in bytes_to_unicode().items()}


# -----------------------------------------------------------------------------
# text cleanup and pre-tokenisation


def _is_cjk(cp: int) -> bool:
    """CJK Unified Ideographs (and extensions, compatibility ideographs), as BERT defines them."""
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
            or 0x2A700 <= cp <= 0x2B73F or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF
            or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


def clean_text(text: str) -> str:
    """transformers' CLIP cleanup without ftfy: drop NUL, U+FFFD and every "C*" character except
    \\t \\n \\r; turn those and "Zs" spaces into " "; put spaces around CJK ideographs; NFC; split on
    whitespace (str.split), lower-case each word, join with single spaces. Accents are kept."""
    out = []
    for ch in text:
        cat = unicodedata.category(ch)
        if ch in "\t\n\r " or cat == "Zs":
            out.append(" ")
        elif ch == "\0" or ch == "\ufffd" or cat[0] == "C":
            continue
        elif _is_cjk(ord(ch)):
            out.append(f" {ch} ")
        else:
            out.append(ch)
    text = unicodedata.normalize("NFC", "".join(out))
    return " ".join(word.lower() for word in text.split())


def _letter_and_number_classes() -> tuple[str, str]:
    """The code points of Unicode categories L* (letters) and N* (numbers), each as the inside of a regex
    character class: the stdlib `re` has no \\p{L} / \\p{N}, so we spell their ranges out."""
    found = {"L": [], "N": []}
    for cp in range(sys.maxunicode + 1):
        kind = unicodedata.category(chr(cp))[0]
        if kind in found:
            found[kind].append(cp)
    classes = []
    for cps in found.values():
        ranges = []  # [first, last] runs of consecutive code points
        for cp in cps:
            if ranges and ranges[-1][1] == cp - 1:
                ranges[-1][1] = cp
            else:
                ranges.append([cp, cp])
        classes.append("".join(f"\\U{a:08x}-\\U{b:08x}" for a, b in ranges))
    return classes[0], classes[1]


# what the `regex` package (which transformers uses) calls \s: Unicode White_Space. The stdlib's \s also
# has \x1c-\x1f; cleanup removes those anyway, but this keeps the pattern equal on its own.
_WHITESPACE = r"\t-\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"


@lru_cache
def word_pattern() -> re.Pattern:
    r"""CLIP's pre-tokeniser (transformers compiles it with the `regex` package and IGNORECASE):
    <|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+
    Here \p{L} (letters) and \p{N} (numbers) are spelled out from the unicodedata tables (~0.3 s, once);
    [^\W\d_] would not do, it also matches numbers like "²", "½", "Ⅻ" (categories No, Nl). Only the
    literals are case-insensitive: on the classes IGNORECASE changes nothing but U+0345 (see
    pre_tokenize) and makes the stdlib slower."""
    L, N = _letter_and_number_classes()
    return re.compile(
        rf"(?i:<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d)|[{L}]+|[{N}]|[^{_WHITESPACE}{L}{N}]+"
    )


def pre_tokenize(text: str) -> list[str]:
    """Clean `text` and split it into words, each spelled in byte symbols (see bytes_to_unicode)."""
    # U+0345 (combining ypogegrammeni) case-folds to a letter; `regex` then matches it with no branch
    # of the pattern and skips it, so it separates words (our classes would call it punctuation).
    text = clean_text(text).replace("\u0345", " ")
    table = bytes_to_unicode()
    return ["".join(table[b] for b in w.encode("utf-8")) for w in word_pattern().findall(text)]


# -----------------------------------------------------------------------------
# the tokenizer


class CLIPTokenizer:
    """Byte-level BPE over vocab (token -> id) and merges (ranked symbol pairs).

    `tok(texts)` returns a LongTensor[B, 77]: <|startoftext|> ids <|endoftext|> pad..., prompts longer
    than 75 tokens are TRUNCATED (eos stays last), as SD 1.x does. `tok.chunks(text)` instead splits a
    long prompt into 75-token pieces, each wrapped and padded to 77 (AUTOMATIC1111's long prompts).

    Special tokens (bos, eos, unk = eos, pad) typed in the text map to their ids: the exact spellings
    are split out first, as transformers does (so with SD 2's pad "!" every "!" becomes id 0); other
    casings are lower-cased by the cleanup and usually caught by CLIP's regex. A token missing from
    the vocab maps to unk (= eos). All of this is what transformers does.
    """

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], *, pad_token: str = EOS,
                 model_max_length: int = 77):
        self.vocab = dict(vocab)
        self.merges = [tuple(m) for m in merges]
        self.decoder = {i: t for t, i in self.vocab.items()}
        self.ranks = {pair: i for i, pair in enumerate(self.merges)}  # a repeated pair keeps its last rank
        self.bos_token, self.eos_token, self.unk_token, self.pad_token = BOS, EOS, EOS, pad_token
        self.model_max_length = model_max_length
        self.specials = list(dict.fromkeys([BOS, EOS, EOS, pad_token]))  # bos, eos, unk(=eos), pad
        for t in self.specials:
            if t not in self.vocab:
                raise ValueError(f"special token {t!r} is not in the vocabulary")
        self.bos_id, self.eos_id, self.pad_id = self.vocab[BOS], self.vocab[EOS], self.vocab[pad_token]
        self.unk_id = self.eos_id
        self.special_ids = {self.vocab[t] for t in self.specials}
        self.added: dict[str, list[int]] = {}  # textual inversion's words -> their ids (set_added)
        self._split_re = _alternatives(self.specials)
        self.cache = {BOS: [BOS], EOS: [EOS]}  # word -> BPE symbols; the specials are never split

    # --- files

    @classmethod
    def from_dir(cls, path) -> "CLIPTokenizer":
        """Load vocab.json + merges.txt (an optional "#version" first line, then "a b" per line), or else
        tokenizer.json (the fast-tokenizer file today's transformers writes alone: the same vocabulary and
        merges inside, under "model"); at most CLIP's 48894 merges are used, as openai/CLIP and transformers
        do. When present, tokenizer_config.json / special_tokens_map.json give the pad token and max length."""
        path = str(path)
        if os.path.isfile(os.path.join(path, "vocab.json")) and os.path.isfile(os.path.join(path, "merges.txt")):
            vocab, merges = _read_vocab_and_merges(path)
        elif os.path.isfile(os.path.join(path, "tokenizer.json")):
            vocab, merges = _read_tokenizer_json(os.path.join(path, "tokenizer.json"))
        else:
            raise FileNotFoundError(f"no tokenizer in {path}: neither vocab.json + merges.txt nor tokenizer.json")
        merges = [m for m in merges[:MAX_MERGES] if len(m) == 2]
        config = _read_json(os.path.join(path, "tokenizer_config.json"))
        pad = config.get("pad_token")
        if "added_tokens_decoder" not in config:  # transformers then lets special_tokens_map.json win
            pad = _read_json(os.path.join(path, "special_tokens_map.json")).get("pad_token", pad)
        if isinstance(pad, dict):
            pad = pad["content"]
        max_len = config.get("model_max_length", 77)
        max_len = max_len if isinstance(max_len, int) and max_len < 1_000_000 else 77
        return cls(vocab, merges, pad_token=pad or EOS, model_max_length=max_len)

    def save(self, path) -> None:
        """Write vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json, a layout that
        transformers.CLIPTokenizer.from_pretrained and diffusers pipelines load."""
        path = str(path)
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump(dict(sorted(self.vocab.items(), key=lambda kv: kv[1])), f, ensure_ascii=False, indent=1)
        with open(os.path.join(path, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in self.merges))
        specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": self.pad_token}
        config = {"tokenizer_class": "CLIPTokenizer", **specials, "model_max_length": self.model_max_length,
                  "errors": "replace", "add_prefix_space": False}
        for name, obj in (("tokenizer_config.json", config), ("special_tokens_map.json", specials)):
            with open(os.path.join(path, name), "w", encoding="utf-8") as f:
                json.dump(obj, f, ensure_ascii=False, indent=2)

    # --- encoding

    def bpe(self, word: str) -> list[str]:
        """Split one byte-symbol word into vocabulary symbols: start from single symbols (the last one
        with "</w>") and repeatedly merge every occurrence of the lowest-ranked adjacent pair."""
        if word in self.cache:
            return self.cache[word]
        symbols = [*word[:-1], word[-1] + "</w>"]
        while len(symbols) > 1:
            best = min(zip(symbols, symbols[1:]), key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        if len(self.cache) > 100_000:  # a server sees unbounded text; keep memory bounded
            self.cache = {BOS: [BOS], EOS: [EOS]}
        self.cache[word] = symbols
        return symbols

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without bos/eos and without truncation."""
        ids = []
        for i, part in enumerate(self._split_re.split(text)):
            if i % 2:  # a special token or an added word, as typed
                ids.extend(self.added[part] if part in self.added else [self.vocab[part]])
                continue
            for word in pre_tokenize(part):
                ids.extend(self.vocab.get(s, self.unk_id) for s in self.bpe(word))
        return ids

    def _wrap(self, ids: list[int], length: int) -> list[int]:
        row = [self.bos_id, *ids, self.eos_id]
        return row + [self.pad_id] * (length - len(row))

    def __call__(self, texts, max_length: int | None = None, truncation: bool = True,
                 padding: str | bool = "max_length") -> torch.Tensor:
        """texts: str or list[str] -> LongTensor[B, max_length] (default model_max_length = 77).
        Each row is bos + ids + eos + pad; with truncation (the default) ids are cut to max_length - 2
        so that eos stays last. padding: "max_length", "longest", or False (rows must then agree)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        max_length = max_length or self.model_max_length
        rows = [self.encode(t) for t in texts]
        if truncation:
            rows = [r[: max_length - 2] for r in rows]
        longest = max((len(r) + 2 for r in rows), default=2)
        width = max(longest, max_length) if padding == "max_length" else longest
        if not padding and any(len(r) + 2 != width for r in rows):
            raise ValueError("rows have different lengths; use padding")
        return torch.tensor([self._wrap(r, width) for r in rows], dtype=torch.long).reshape(len(rows), width)

    def chunks(self, text: str) -> torch.Tensor:
        """A long prompt as LongTensor[N, 77]: its ids cut into pieces of 75 (model_max_length - 2), each
        wrapped in bos/eos and padded, as AUTOMATIC1111's webui does (without its comma backtracking).
        An empty prompt gives one chunk. The caller may concatenate the chunks' text embeddings."""
        ids, n = self.encode(text), self.model_max_length - 2
        pieces = [ids[i:i + n] for i in range(0, len(ids), n)] or [[]]
        return torch.tensor([self._wrap(p, self.model_max_length) for p in pieces], dtype=torch.long)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Ids (list or tensor) back to text: bytes reassembled, each "</w>" a space, ends stripped; the ids of
        an added word give its name once."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        names = {word_ids[0]: name for name, word_ids in self.added.items()}
        rest = {i for word_ids in self.added.values() for i in word_ids[1:]}
        kept = [i for i in ids if i not in rest and not (skip_special_tokens and i in self.special_ids)]
        pieces = []
        for is_name, run in itertools.groupby(kept, key=lambda i: i in names):
            if is_name:
                pieces += [names[i] for i in run]
            else:
                data = bytes(_byte_decoder()[c] for c in "".join(self.decoder[i] for i in run))
                pieces.append(data.decode("utf-8", errors="replace").replace("</w>", " ").strip())
        return " ".join(pieces)

    # --- added words (textual inversion: model/embeddings.py)

    def set_added(self, counts: dict[str, int]) -> dict[str, list[int]]:
        """
        Make each word of `counts` stand for counts[word] new ids, numbered on from the vocabulary
        (len(vocab), len(vocab) + 1, ...) in the order given, replacing any added before ({} removes them all).
        Returns word -> its ids. As transformers' added tokens (tokenizer.add_tokens, which diffusers'
        load_textual_inversion uses, a word of n vectors as the tokens word, word_1, ... word_{n-1}), a word is
        split out of the text wherever it is typed exactly (case-sensitive, even inside a longer word), before
        the cleanup, the longest one where several start at the same place. A word of the vocabulary (e.g.
        "cat", a piece of "category") or a special token cannot be added, as diffusers refuses it.
        """
        taken = [w for w in counts if not w or w in self.vocab]
        if taken:
            raise ValueError(f"{taken[0]!r} is already a token of the vocabulary (or empty): choose another word")
        self.added, next_id = {}, len(self.vocab)
        for word, n in counts.items():
            self.added[word] = list(range(next_id, next_id + n))
            next_id += n
        self._split_re = _alternatives([*self.specials, *self.added])
        return dict(self.added)

    def __len__(self) -> int:
        return len(self.vocab)


def _alternatives(words) -> re.Pattern:
    """A pattern whose split() cuts out each of `words` where it occurs, the longest where several start at the
    same place (as transformers' Trie.split)."""
    return re.compile("(" + "|".join(map(re.escape, sorted(words, key=len, reverse=True))) + ")")


def has_tokenizer(path) -> bool:
    """Whether `path` holds the files CLIPTokenizer.from_dir reads."""
    path = str(path)
    return (os.path.isfile(os.path.join(path, "vocab.json")) and os.path.isfile(os.path.join(path, "merges.txt"))
            or os.path.isfile(os.path.join(path, "tokenizer.json")))


def _read_vocab_and_merges(path: str) -> tuple[dict[str, int], list[tuple]]:
    with open(os.path.join(path, "vocab.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    with open(os.path.join(path, "merges.txt"), encoding="utf-8") as f:
        lines = f.read().strip().split("\n")
    if lines and lines[0].startswith("#version"):
        lines = lines[1:]
    return vocab, [tuple(line.split()) for line in lines]


def _read_tokenizer_json(file: str) -> tuple[dict[str, int], list[tuple]]:
    """vocab and merges of a tokenizers-library file: {"model": {"type": "BPE", "vocab": {...}, "merges": [...]}},
    each merge "a b" (tokenizers before 0.20) or ["a", "b"] (since)."""
    model = _read_json(file).get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise ValueError(f"{file}: not a byte-level BPE tokenizer (model type {model.get('type')!r})")
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
    return model["vocab"], merges


def _read_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# -----------------------------------------------------------------------------
# training a vocabulary


def train_bpe(texts: list[str], vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Learn a CLIP-style vocabulary from a corpus. The vocabulary starts with the 256 byte symbols
    and their "</w>" forms (CLIP's order), then greedily adds the most frequent adjacent pair over the
    cleaned, pre-tokenised words (ties: the smallest pair in string order) until vocab_size - 2 tokens,
    then <|startoftext|>, <|endoftext|>. Stops early when no pair is left. Returns (vocab, merges)."""
    if not 2 * 256 + 2 <= vocab_size <= MAX_VOCAB:
        raise ValueError(f"vocab_size must be in [514, {MAX_VOCAB}], got {vocab_size}")
    symbols = list(bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}

    word_counts = Counter()
    for text in texts:
        for i, part in enumerate(re.split(f"({re.escape(BOS)}|{re.escape(EOS)})", text)):
            if i % 2 == 0:
                word_counts.update(w for w in pre_tokenize(part) if w not in (BOS, EOS))
    words = [[*w[:-1], w[-1] + "</w>"] for w in word_counts]  # each word as a list of symbols
    counts = list(word_counts.values())

    pair_counts = Counter()  # (a, b) -> occurrences over the corpus
    where = {}  # (a, b) -> indices of the words that contain it
    for k, w in enumerate(words):
        for pair in zip(w, w[1:]):
            pair_counts[pair] += counts[k]
            where.setdefault(pair, set()).add(k)
    heap = [(-c, pair) for pair, c in pair_counts.items()]  # lazy max-heap; stale entries skipped
    heapq.heapify(heap)

    merges = []
    while len(vocab) < vocab_size - 2 and heap:
        neg, best = heapq.heappop(heap)
        if pair_counts.get(best, 0) != -neg:
            continue  # stale entry
        merges.append(best)
        vocab.setdefault(best[0] + best[1], len(vocab))
        changed = set()
        for k in sorted(where.pop(best)):
            old, w, new, i = words[k], words[k], [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    new.append(w[i] + w[i + 1])
                    i += 2
                else:
                    new.append(w[i])
                    i += 1
            for pair in zip(old, old[1:]):
                pair_counts[pair] -= counts[k]
                changed.add(pair)
            for pair in zip(new, new[1:]):
                pair_counts[pair] += counts[k]
                where.setdefault(pair, set()).add(k)
                changed.add(pair)
            words[k] = new
        for pair in changed:
            if pair_counts[pair] > 0:
                heapq.heappush(heap, (-pair_counts[pair], pair))
            else:
                del pair_counts[pair]
    for t in (BOS, EOS):
        vocab[t] = len(vocab)
    return vocab, merges
