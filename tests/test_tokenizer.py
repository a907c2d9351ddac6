"""
Parity of model/tokenizer.py with transformers' slow CLIPTokenizer (without ftfy, its cleanup is BERT's
BasicTokenizer): identical ids, padded [B, 77] tensors, truncation, decoding, pad token from config,
for a vocabulary trained by our train_bpe and a hand-written one. Also: the stdlib pre-tokeniser regex
equals CLIP's \\p{L}/\\p{N} one (the `regex` package, a transformers dependency) on every code point.
"""

import json
import random
import sys
import unicodedata

import pytest
import regex
import torch
import transformers

from model.tokenizer import BOS, EOS, CLIPTokenizer, bytes_to_unicode, train_bpe, word_pattern
from tokenizer_fixtures import DEFAULT_VOCAB_SIZE, PROMPTS, make_tokenizer_dir

STRINGS = [
    "a photo of a cat",
    "A Photo Of A CAT sitting on a RED chair",
    "portrait of a woman, highly detailed, digital art, trending on artstation",
    "hello!!! what?? (masterpiece:1.2), [best quality], {{blue}}",
    "8k uhd 4096x2160 3.14159 1,000,000 -42",
    "It's a dog's life, isn't it? They're here, we've, I'm, you'll, he'd",
    "IT'S DON'T THEY'RE",
    "'s 't ''s ' s '",
    "café naïve résumé Ångström",
    "Cre\u0300me Bru\u0302le\u0301e (decomposed accents)",
    "東京タワー 中文字符 한국어 テスト",
    "emoji 🐱🔥 👩\u200d🚀 ❤️ 🇯🇵",
    "   leading and trailing   ",
    "tabs\tand\nnewlines\r\nhere\x0bvt\x0cff",
    "",
    "   \t\n ",
    "xylophone zebra quokka zzyzx",
    "<|startoftext|>a cat<|endoftext|>",
    "a cat <|endoftext|> and a dog <|startoftext|>",
    "<|ENDOFTEXT|> typed in upper case",
    "!<|endoftext|>! !<|ENDOFTEXT|>!",
    "Ελληνικά ΟΔΟΣ Σίσυφος",
    "m² ½ Ⅻ ① ٣ ௰",
    "control\x00chars\x07\u200b\ufeff\ufffd here\x1c\x1f\x85",
    "non\u00a0breaking\u2003spaces\u3000ideographic\u202fnarrow",
    "İstanbul straße ǅ ẞ",
    "ﬁne ﬂowers",
    "snake_case and kebab-case and C++ and e-mail@example.com #tag $5 100%",
    "<|endof\x00text|>",
    "arabic مرحبا hebrew שלום hindi हिन्दी thai ภาษาไทย",
    "\u0345 ᾳ a\u0345b",
    "'ſ test 'ſ",
    "a,b;c:d.e/f\\g|h",
    "line\u2028sep\u2029para",
    "1st 2nd 3rd 10th",
    "((((((very detailed))))))",
    "a very " * 60,
    "ünïcödé " * 30 + "end",
    ("masterpiece, best quality, " * 10).strip(),
]


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory):
    return make_tokenizer_dir(tmp_path_factory.mktemp("tok_trained"))


def hand_vocab():
    """A tiny hand-written vocabulary: the byte symbols, a few merges, and one merge ("hello</w>") whose
    result is missing from the vocab, so it maps to the unknown token."""
    symbols = list(bytes_to_unicode().values())
    merges = [("h", "e"), ("l", "l"), ("he", "ll"), ("o", "</w>"), ("hell", "o</w>"), ("c", "a"), ("ca", "t</w>"),
              ("'", "s</w>"), ("a", "r"), ("ar", "t</w>")]
    tokens = symbols + [s + "</w>" for s in symbols] + ["he", "ll", "hell", "o</w>", "ca", "cat</w>", "'s</w>",
                                                      "ar", "art</w>", BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


@pytest.fixture(scope="module")
def hand_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok_hand")
    CLIPTokenizer(*hand_vocab()).save(path)
    return path


def load_both(path):
    return CLIPTokenizer.from_dir(path), transformers.CLIPTokenizer.from_pretrained(str(path))


def reference_tensor(hf, texts, max_length=77):
    return hf(texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt").input_ids


def test_ftfy_not_installed():
    # with ftfy transformers would use ftfy.fix_text instead of the BasicTokenizer cleanup we reproduce
    with pytest.raises(ImportError):
        import ftfy  # noqa: F401


@pytest.mark.parametrize("which", ["trained", "hand"])
def test_ids_match_transformers(which, trained_dir, hand_dir):
    tok, hf = load_both(trained_dir if which == "trained" else hand_dir)
    assert hf.fix_text is None  # the BasicTokenizer path
    for s in STRINGS:
        assert tok.encode(s) == hf(s, add_special_tokens=False).input_ids, repr(s)
    ours, ref = tok(STRINGS), reference_tensor(hf, STRINGS)
    assert ours.dtype == torch.long and ours.shape == (len(STRINGS), 77)
    assert torch.equal(ours, ref)
    assert torch.equal(tok(STRINGS[0]), reference_tensor(hf, STRINGS[0]))  # a single str -> [1, 77]


def test_random_strings_match_transformers(trained_dir):
    tok, hf = load_both(trained_dir)
    pool = ("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789" + "     \t\n"
            + ".,;:!?'\"()[]{}-_/\\@#$%^&*+=<>|~`" + "éèêëàâäôöûüçñÅØßſİıΣσς²½Ⅻ①٣" + "中文字日本語한국어ひらがなカタカナ"
            + "🐱🔥❤\ufe0f\u200d\u0301\u0345\x00\x07\u200b\ufffd\u00a0\u3000")
    rng = random.Random(0)
    texts = ["".join(rng.choice(pool) for _ in range(rng.randint(0, 40))) for _ in range(300)]
    texts += ["".join(rng.choice(["<|endoftext|>", "<|startoftext|>", "'s", "'T", "'ll", "a", " ", "!"])
                      for _ in range(rng.randint(1, 8))) for _ in range(100)]
    for s in texts:
        assert tok.encode(s) == hf(s, add_special_tokens=False).input_ids, repr(s)


def test_truncation_keeps_eos_last(trained_dir):
    tok, hf = load_both(trained_dir)
    long = "a photo of a cat " * 40
    ids = tok(long)
    assert ids.shape == (1, 77) and ids[0, 0] == tok.bos_id and ids[0, -1] == tok.eos_id
    assert ids[0, 1:-1].tolist() == tok.encode(long)[:75]
    assert torch.equal(ids, reference_tensor(hf, long))
    # other lengths, "longest" padding and no truncation, same as transformers
    assert torch.equal(tok(STRINGS, max_length=16), reference_tensor(hf, STRINGS, max_length=16))
    short = ["a cat", "a photo of a dog"]
    ref = hf(short, padding="longest", return_tensors="pt").input_ids
    assert torch.equal(tok(short, padding="longest"), ref)
    assert tok(long, truncation=False).shape == (1, len(tok.encode(long)) + 2)


def test_chunks(trained_dir):
    tok = CLIPTokenizer.from_dir(trained_dir)
    text = ", ".join(PROMPTS[:8])
    ids = tok.encode(text)
    assert 150 < len(ids) <= 225
    chunks = tok.chunks(text)
    assert chunks.dtype == torch.long and chunks.shape == (3, 77)
    assert (chunks[:, 0] == tok.bos_id).all()
    content = []
    for row in chunks.tolist():
        n = min(75, len(ids) - len(content))
        assert row[n + 1] == tok.eos_id and all(t == tok.pad_id for t in row[n + 2:])
        content += row[1:n + 1]
    assert content == ids
    assert torch.equal(tok.chunks("a photo of a cat"), tok("a photo of a cat"))  # short prompt: one chunk
    assert torch.equal(tok.chunks(""), tok(""))
    exact = tok.encode("cat " * 75)
    assert len(exact) == 75 and tok.chunks("cat " * 75).shape == (1, 77)  # no empty trailing chunk
    assert tok.chunks("cat " * 76).shape == (2, 77)


def test_decode(trained_dir):
    tok, hf = load_both(trained_dir)
    for s in ["a photo of a cat", "portrait of a woman highly detailed", "xylophone zebra quokka"]:
        assert tok.decode(tok.encode(s)) == s
        assert tok.decode(tok(s)[0]) == s  # specials and padding skipped
    for s in STRINGS:  # ASCII round trip at the id level: punctuation comes back space-separated
        if s.isascii() and "<|" not in s:
            ids = tok.encode(s)
            assert tok.encode(tok.decode(ids)) == ids, repr(s)
    for s in STRINGS:
        row = tok(s)[0].tolist()
        assert tok.decode(row) == hf.decode(row, skip_special_tokens=True)
        assert tok.decode(row, skip_special_tokens=False) == hf.decode(row), repr(s)


def test_pad_token_from_config(tmp_path):
    # SD 2's tokenizer pads with "!"; transformers then also splits "!" out of the text as a special token
    sd2 = make_tokenizer_dir(tmp_path / "sd2", pad_token="!")
    tok, hf = load_both(sd2)
    assert tok.pad_token == "!" and tok.pad_id == tok.vocab["!"] == hf.pad_token_id
    assert torch.equal(tok(STRINGS), reference_tensor(hf, STRINGS))
    assert tok("a cat")[0, -1] == tok.vocab["!"]
    # special_tokens_map.json wins over tokenizer_config.json (transformers' legacy rule)
    cfg = json.loads((sd2 / "tokenizer_config.json").read_text())
    cfg["pad_token"] = EOS
    (sd2 / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok, hf = load_both(sd2)
    assert tok.pad_token == hf.pad_token == "!"
    # no config files at all: CLIP's default pad, and a merges file without "#version"
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "vocab.json").write_text((sd2 / "vocab.json").read_text())
    (bare / "merges.txt").write_text("\n".join((sd2 / "merges.txt").read_text().splitlines()[1:]))
    plain = CLIPTokenizer.from_dir(bare)
    assert plain.pad_token == EOS and plain.model_max_length == 77
    assert plain.merges == CLIPTokenizer.from_dir(sd2).merges


def test_save_round_trip(tmp_path, trained_dir):
    tok = CLIPTokenizer.from_dir(trained_dir)
    tok.save(tmp_path / "copy")
    again = CLIPTokenizer.from_dir(tmp_path / "copy")
    assert again.vocab == tok.vocab and again.merges == tok.merges and again.pad_token == tok.pad_token
    assert torch.equal(again(STRINGS), tok(STRINGS))


def test_train_bpe_layout_and_determinism():
    corpus = PROMPTS[:40]
    vocab, merges = train_bpe(corpus, 700)
    assert (vocab, merges) == train_bpe(list(reversed(corpus)), 700)  # order-free, ties broken by pair order
    assert len(vocab) == 700 and sorted(vocab.values()) == list(range(700))
    symbols = list(bytes_to_unicode().values())
    by_id = sorted(vocab, key=vocab.get)
    assert by_id[:256] == symbols and by_id[256:512] == [s + "</w>" for s in symbols]
    assert by_id[-2:] == [BOS, EOS]
    assert all(a + b in vocab for a, b in merges)
    assert len(merges) == 700 - 514  # this corpus yields no repeated merge result
    # most frequent pair first; a longer vocabulary extends a shorter one
    small_vocab, small_merges = train_bpe(corpus, 600)
    assert merges[:len(small_merges)] == small_merges
    assert train_bpe(["aaa aaa b"], 10_000)[1] == [("a", "a"), ("aa", "a</w>")]  # stops when no pair is left
    with pytest.raises(ValueError):
        train_bpe(corpus, 100)


def test_fixture_vocabulary(trained_dir):
    tok = CLIPTokenizer.from_dir(trained_dir)
    assert len(tok) == DEFAULT_VOCAB_SIZE
    n = DEFAULT_VOCAB_SIZE
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (n - 2, n - 1, n - 1)
    # common prompt words are single tokens
    for word in ["photo", "portrait", "detailed", "painting", "cat", "woman", "light", "art"]:
        assert len(tok.encode(word)) == 1, word


def test_stdlib_regex_equals_clip_regex():
    """The stdlib pattern classifies every assigned, non-control code point like CLIP's \\p{L}/\\p{N}
    pattern, alone and after a letter or punctuation (and the first 3000 after an apostrophe). Control
    and unassigned ("C*") characters are removed by the cleanup before the pattern runs; U+0345 is
    handled in pre_tokenize."""
    clip = regex.compile(  # transformers' CLIPTokenizer.pat
        r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
        regex.IGNORECASE,
    )
    ours = word_pattern()
    chars = [chr(c) for c in range(sys.maxunicode + 1)
             if unicodedata.category(chr(c))[0] != "C" and c != 0x345]
    for prefix, chars in [("", chars), ("x", chars), ("!", chars), ("'", chars[:3000])]:
        text = " ".join(prefix + ch for ch in chars)
        assert ours.findall(text) == clip.findall(text), prefix
    for s in STRINGS:
        s = s.lower().replace("\u0345", " ")  # as pre_tokenize does
        assert ours.findall(s) == clip.findall(s)


def test_tokenizer_json_alone_as_the_fast_tokenizer_saves_it(tmp_path):
    """A folder with tokenizer.json only (what today's transformers writes; here CLIPTokenizerFast with
    legacy_format=False) loads the same vocabulary, merges and pad token as vocab.json + merges.txt, so the
    same ids; and the fast tokenizer's own ids on the 80 fixture prompts. (The fast tokenizer's normalizer
    is not the slow one's: on edge text - CJK spacing, control characters, final sigma - it differs from
    transformers' slow CLIPTokenizer, which ours follows; see test_ids_match_transformers.)"""
    from tokenizer_fixtures import PROMPTS

    for pad in (EOS, "!"):  # SD 1.x's tokenizer, and SD 2.x / SDXL's second one that pads with "!"
        legacy = make_tokenizer_dir(tmp_path / f"legacy-{len(pad)}", pad_token=pad)
        fast = transformers.CLIPTokenizerFast.from_pretrained(str(legacy))
        fast.save_pretrained(str(tmp_path / f"fast-{len(pad)}"), legacy_format=False)
        folder = tmp_path / f"fast-{len(pad)}"
        assert not (folder / "vocab.json").exists() and (folder / "tokenizer.json").exists()
        tok, ref = CLIPTokenizer.from_dir(folder), CLIPTokenizer.from_dir(legacy)
        assert (tok.vocab, tok.merges, tok.pad_token) == (ref.vocab, ref.merges, pad)
        assert torch.equal(tok(STRINGS), ref(STRINGS))
        assert torch.equal(tok(PROMPTS), reference_tensor(fast, PROMPTS))

    # merges as "a b" strings (tokenizers before 0.20) read the same as ["a", "b"] pairs
    data = json.loads((folder / "tokenizer.json").read_text())
    data["model"]["merges"] = [" ".join(m) for m in data["model"]["merges"]]
    (folder / "tokenizer.json").write_text(json.dumps(data))
    assert CLIPTokenizer.from_dir(folder).merges == ref.merges
    # not a BPE tokenizer, or no tokenizer at all: a clear error
    data["model"]["type"] = "WordPiece"
    (folder / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="not a byte-level BPE tokenizer"):
        CLIPTokenizer.from_dir(folder)
    with pytest.raises(FileNotFoundError, match="neither vocab.json"):
        CLIPTokenizer.from_dir(tmp_path)
