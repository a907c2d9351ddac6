r"""
model/prompts.py against AUTOMATIC1111's rules, every expected value worked out by hand from the web UI's
modules/prompt_parser.py (parse_prompt_attention), modules/sd_hijack_clip.py (tokenize_line: 75-token
chunks, comma backtracking of 20, BREAK), modules/extra_networks.py + the Lora extension (tags) and
modules/sd_emphasis.py (the mean-restoring weighting). Weights are compared exactly: the grammar merges
neighbours by float equality, so the factors must come out bit for bit as the web UI's (1.0 * 1.1 * 1.1...).

Chunking uses a fake tokenizer (each word "tN" one token N, "," the comma) for exact counts, and the
default model's tokenizer (weights/) for real ids: a plain prompt must give exactly tokenizer([prompt])[0].
"""

import doctest

import pytest
import torch

from model import prompts
from model.prompts import (Chunks, apply_weights, chunk_fragments, extract_lora_tags, is_plain, pad_chunks,
                           parse_attention, tokenize_prompt)
from model.tokenizer import CLIPTokenizer

R = 1.1  # one pair of ()
S = 1 / 1.1  # one pair of []


# -----------------------------------------------------------------------------
# parse_attention

PARSED = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.0 * R), (" word", 1.0)]),
    ("((a)) [b] (c:1.5) ((d:2))",
     [("a", 1.0 * R * R), (" ", 1.0), ("b", 1.0 * S), (" ", 1.0), ("c", 1.0 * 1.5), (" ", 1.0), ("d", 1.0 * 2.0 * R)]),
    ("(a (b:2) c)", [("a ", 1.0 * R), ("b", 1.0 * 2.0 * R), (" c", 1.0 * R)]),
    (r"\(x\)", [("(x)", 1.0)]),
    (r"\[x\] \\ y", [("[x] \\ y", 1.0)]),
    (r"(\(x\))", [("(x)", 1.0 * R)]),
    (r"a\b", [("ab", 1.0)]),  # a backslash before an ordinary character vanishes
    ("[(a)]", [("a", 1.0 * R * S)]),  # = 1.0 exactly in floats
    ("[(a)] b", [("a b", 1.0)]),  # ... so it merges with its neighbour
    ("[[a]]", [("a", 1.0 * S * S)]),
    ("[(a:1.5)]", [("a", 1.0 * 1.5 * S)]),
    ("[(a])", [("a", 1.0 * S * R)]),  # two stacks: "]" closes "[", then ")" closes "("
    ("(unbalanced", [("unbalanced", 1.0 * R)]),
    ("a (b c", [("a ", 1.0), ("b c", 1.0 * R)]),  # a stray ( weighs the rest of the prompt
    ("a ((b) c", [("a ", 1.0), ("b", 1.0 * R * R), (" c", 1.0 * R)]),
    ("a [b c", [("a ", 1.0), ("b c", 1.0 * S)]),
    ("(a [b", [("a ", 1.0 * R), ("b", 1.0 * R * S)]),  # unclosed: all the ( first, then the [
    ("([(b:1.3)", [("b", 1.0 * 1.3 * R * S)]),  # 1.3; in the other order it would be 1.3000000000000003
    ("a) b", [("a) b", 1.0)]),  # nothing open: literal
    ("a] b", [("a] b", 1.0)]),
    ("a:1.5) b", [("a:1.5) b", 1.0)]),  # a weight with no ( open is text too
    ("(a:b)", [("a:b", 1.0 * R)]),  # not a number: ":" is text, the () still counts
    ("(a:1e3)", [("a:1e3", 1.0 * R)]),
    ("( a : 1.5 )", [(" a ", 1.0 * 1.5)]),  # spaces around the number
    ("(a:.5)", [("a", 1.0 * 0.5)]),
    ("(a:-1)", [("a", 1.0 * -1.0)]),
    ("a:b", [("a:b", 1.0)]),
    ("(a)(b)", [("ab", 1.0 * R)]),
    ("(a:0.5) (b:0.5)", [("a", 0.5), (" ", 1.0), ("b", 0.5)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",  # the web UI's own example
     [("a ", 1.0), ("house", 1.0 * 1.3 * R * R), (" ", 1.0 * R), ("on", 1.0 * S * R), (" a ", 1.0 * R),
      ("hill", 1.0 * 0.5 * R), (", sun, ", 1.0 * R), ("sky", 1.0 * R * R * R * R), (".", 1.0 * R)]),
    ("", [("", 1.0)]),
    ("()", [("", 1.0)]),
    ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("BREAK a", [("", 1.0), ("BREAK", -1.0), ("a", 1.0)]),
    ("a BREAK", [("a", 1.0), ("BREAK", -1.0), ("", 1.0)]),
    ("BREAK", [("", 1.0), ("BREAK", -1.0), ("", 1.0)]),
    ("a, BREAK, b", [("a,", 1.0), ("BREAK", -1.0), (", b", 1.0)]),
    ("(a)BREAK(b)", [("a", 1.0 * R), ("", 1.0), ("BREAK", -1.0), ("", 1.0), ("b", 1.0 * R)]),
    ("BREAKfast break a_BREAK", [("BREAKfast break a_BREAK", 1.0)]),
    ("(a BREAK b)", [("a", 1.0 * R), ("BREAK", -1.0 * R), ("b", 1.0 * R)]),  # web UI quirk: no longer a marker
]


@pytest.mark.parametrize("text, expected", PARSED, ids=[p for p, _ in PARSED])
def test_parse_attention(text, expected):
    assert parse_attention(text) == expected


def test_the_hand_worked_products_are_the_web_uis_floats():
    # a few of the above, written out: these are what the web UI's doctest prints
    assert 1.0 * 1.3 * R * R == 1.5730000000000004
    assert 1.0 * R * R * R * R == 1.4641000000000006
    assert 1.0 * S * R == 1.0 and 1.0 * R * S == 1.0


@pytest.mark.parametrize("text", ["(a:1.2.3)", "(a:.)", "((a:1..2))"])
def test_a_weight_that_is_not_a_float_is_an_error(text):
    with pytest.raises(ValueError, match="bad weight"):
        parse_attention(text)


def test_the_docstring_examples_hold():
    assert doctest.testmod(prompts).failed == 0


# -----------------------------------------------------------------------------
# LoRA tags


@pytest.mark.parametrize("text, expected", [
    ("a cat <lora:ink:0.8>", ("a cat ", {"ink": 0.8})),
    ("<lora:ink:0.8> a <lora:paper:0.5> cat", (" a  cat", {"ink": 0.8, "paper": 0.5})),
    ("a cat, <lora:ink>", ("a cat, ", {"ink": 1.0})),
    ("<lyco:ink:0.3> a", (" a", {"ink": 0.3})),
    ("<lora:ink:0.5> <lora:ink:0.25> a", ("  a", {"ink": 0.75})),  # applied twice: the weights add
    ("<lora:ink:0.5> <lyco:ink:0.25>", (" ", {"ink": 0.75})),
    ("<lora:ink:0.8:0.8>", ("", {"ink": 0.8})),
    ("<lora:ink:te=0.4>", ("", {"ink": 0.4})),  # the UNet weight follows te
    ("<lora:ink:0.4:unet=0.4>", ("", {"ink": 0.4})),
    ("<lora:my ink:-1>", ("", {"my ink": -1.0})),
    ("<hypernet:x:1> a cat", (" a cat", {})),  # other kinds: removed, not returned
    ("a <cat> and (a:1.2) <b", ("a <cat> and (a:1.2) <b", {})),  # not tags
    ("plain text", ("plain text", {})),
])
def test_extract_lora_tags(text, expected):
    assert extract_lora_tags(text) == expected


@pytest.mark.parametrize("text, message", [
    ("<lora:ink:0.8:0.5>", "separate text-encoder"),
    ("<lora:ink:unet=0.5>", "separate text-encoder"),  # te stays 1.0
    ("<lora:ink:abc>", "not a number"),
    ("<lora:ink:1:1:8>", "dyn"),
    ("<lora:ink:dyn=8>", "dyn"),
])
def test_lora_tags_this_cannot_honour_are_errors(text, message):
    with pytest.raises(ValueError, match=message):
        extract_lora_tags(text)


# -----------------------------------------------------------------------------
# chunks, with one token per word

BOS, EOS, COMMA = 1001, 1002, 500


class Words:
    """Each word "tN" is token N, "," is COMMA; bos, eos, pad like SD 1.x (pad = eos) or given."""

    def __init__(self, pad_id=EOS):
        self.bos_id, self.eos_id, self.pad_id = BOS, EOS, pad_id

    def encode(self, text):
        return [COMMA if w == "," else int(w[1:]) for w in text.split()]


def words(start, stop):
    return " ".join(f"t{i}" for i in range(start, stop))


def row(ids, pad=EOS):
    """A chunk as the web UI builds it: bos, ids, eos, then pad to 77."""
    assert len(ids) <= 75
    return [BOS, *ids, EOS] + [pad] * (75 - len(ids))


def ones():
    return [1.0] * 77


def test_a_short_prompt_is_one_chunk():
    c = tokenize_prompt("t5 t6 t7", Words())
    assert c.ids == [row([5, 6, 7])]
    assert c.weights == [ones()]


def test_an_empty_prompt_is_one_chunk_of_padding():
    for text in ("", "()", "BREAK"):
        c = tokenize_prompt(text, Words())
        assert c.ids == [[BOS, EOS] + [EOS] * 75], text
        assert c.weights == [ones()]


def test_75_tokens_are_one_chunk_and_76_are_two():
    assert tokenize_prompt(words(0, 75), Words()).ids == [[BOS, *range(75), EOS]]
    assert tokenize_prompt(words(0, 76), Words()).ids == [[BOS, *range(75), EOS], row([75])]


def test_150_tokens_are_two_full_chunks():
    c = tokenize_prompt(words(0, 150), Words())
    assert c.ids == [[BOS, *range(75), EOS], [BOS, *range(75, 150), EOS]]
    assert c.weights == [ones(), ones()]


def comma_at(index, n):
    """n tokens t0..t(n-1) with a comma in place of t<index>."""
    return " ".join("," if i == index else f"t{i}" for i in range(n))


def test_a_comma_in_the_last_20_tokens_moves_the_rest_to_the_next_chunk():
    # comma at index 60: when t75 arrives the chunk is full and 75 - 60 = 15 <= 20: cut after the comma
    c = tokenize_prompt(comma_at(60, 90), Words())
    assert c.ids == [row([*range(60), COMMA]), row(list(range(61, 90)))]


def test_a_comma_exactly_20_from_the_end_still_backtracks():
    c = tokenize_prompt(comma_at(55, 90), Words())
    assert c.ids == [row([*range(55), COMMA]), row(list(range(56, 90)))]


def test_a_comma_more_than_20_from_the_end_does_not():
    # index 54: 75 - 54 = 21 > 20, a plain cut at 75
    c = tokenize_prompt(comma_at(54, 90), Words())
    assert c.ids == [[BOS, *range(54), COMMA, *range(55, 75), EOS], row(list(range(75, 90)))]


def test_no_backtracking_when_the_prompt_ends_at_75():
    c = tokenize_prompt(comma_at(60, 75), Words())
    assert c.ids == [[BOS, *range(60), COMMA, *range(61, 75), EOS]]


def test_backtracking_off():
    c = chunk_fragments(parse_attention(comma_at(60, 90)), Words(), backtrack=0)
    assert c.ids == [[BOS, *range(60), COMMA, *range(61, 75), EOS], row(list(range(75, 90)))]


def test_a_comma_that_starts_a_chunk_is_not_remembered():
    # the comma is token 75: it opens chunk 2 at index 0, but the web UI forgets it (next_chunk resets
    # last_comma after recording it), so chunk 2 is cut plainly at 150, not after the comma. Only visible
    # with a backtrack of 75 (index 0 is 75 from the end).
    c = chunk_fragments(parse_attention(comma_at(75, 160)), Words(), backtrack=75)
    assert c.ids == [[BOS, *range(75), EOS], [BOS, COMMA, *range(76, 150), EOS], row(list(range(150, 160)))]


def test_the_moved_tokens_keep_their_weights():
    text = words(0, 60) + " , (" + words(61, 80) + ":1.5)"
    c = tokenize_prompt(text, Words())
    assert c.ids == [row([*range(60), COMMA]), row(list(range(61, 80)))]
    assert c.weights == [ones(), [1.0] + [1.5] * 19 + [1.0] * 57]


def test_break_starts_a_new_chunk():
    assert tokenize_prompt("t0 t1 BREAK t2", Words()).ids == [row([0, 1]), row([2])]
    assert tokenize_prompt("BREAK t0", Words()).ids == [row([]), row([0])]  # the first chunk is empty
    assert tokenize_prompt("t0 BREAK", Words()).ids == [row([0])]  # nothing after it: no second chunk
    assert tokenize_prompt("t0 BREAK BREAK t1", Words()).ids == [row([0]), row([]), row([1])]


def test_break_after_a_full_chunk_adds_no_empty_chunk():
    c = tokenize_prompt(words(0, 75) + " BREAK t75", Words())
    assert c.ids == [[BOS, *range(75), EOS], row([75])]


def test_break_resets_the_comma():
    # the comma (index 70 of chunk 1) is forgotten at BREAK; chunk 2 fills to 75 and is cut plainly
    c = tokenize_prompt(comma_at(70, 72) + " BREAK " + words(100, 180), Words())
    assert c.ids == [row([*range(70), COMMA, 71]), [BOS, *range(100, 175), EOS], row(list(range(175, 180)))]


def test_break_inside_brackets_is_the_word_at_a_negative_weight():
    class WithBreak(Words):
        def encode(self, text):
            return [7 if w == "BREAK" else Words().encode(w)[0] for w in text.split()]
    c = tokenize_prompt("(t1 BREAK t2)", WithBreak())
    assert c.ids == [row([1, 7, 2])]
    assert c.weights[0][:5] == [1.0, R, -1.0 * R, R, 1.0]


def test_weights_follow_their_fragments():
    c = tokenize_prompt("t0 (t1 t2) [t3] (t4:1.5)", Words())
    assert c.ids == [row([0, 1, 2, 3, 4])]
    assert c.weights == [[1.0, 1.0, R, R, S, 1.5] + [1.0] * 71]


def test_pad_goes_after_eos_only():
    c = tokenize_prompt("t1 t2", Words(pad_id=0))
    assert c.ids == [[BOS, 1, 2, EOS] + [0] * 73]


def test_pad_chunks_gives_the_negative_as_many_chunks_as_the_positive():
    tok = Words()
    positive, negative, third = (tokenize_prompt(t, tok) for t in (words(0, 100), "", "t9"))
    padded = pad_chunks([positive, negative, third], tok)
    assert [len(c) for c in padded] == [2, 2, 2]
    assert padded[0] == positive
    assert padded[1].ids == [row([]), row([])] and padded[1].weights == [ones(), ones()]
    assert padded[2].ids == [row([9]), row([])]
    assert pad_chunks([third], Words(pad_id=0))[0] == third  # nothing to add


def test_chunks_is_plain_data():
    c = Chunks([row([1])], [ones()])
    assert len(c) == 1 and c == tokenize_prompt("t1", Words())


# -----------------------------------------------------------------------------
# chunks, with the default model's tokenizer


@pytest.fixture(scope="module")
def tok():
    return CLIPTokenizer.from_dir("weights")


PLAIN = ["a red circle on a blue background", "a photograph of a cat, highly detailed", "", "a:b", "it's 8k!"]


@pytest.mark.parametrize("prompt", PLAIN)
def test_a_plain_prompt_gives_exactly_todays_ids(tok, prompt):
    c = tokenize_prompt(prompt, tok)
    assert c.ids == [tok([prompt])[0].tolist()]
    assert c.weights == [ones()]
    assert is_plain(prompt, tok)


@pytest.mark.parametrize("prompt", PLAIN)
def test_a_plain_prompt_gives_todays_ids_with_an_sd2_pad(tok, prompt):
    sd2 = CLIPTokenizer(tok.vocab, tok.merges, pad_token="!")  # SD 2.x / SDXL bigG pad with "!" = 0
    assert sd2.pad_id == 0
    assert tokenize_prompt(prompt, sd2).ids == [sd2([prompt])[0].tolist()]


def test_every_token_of_a_word_gets_the_words_weight(tok):
    n = len(tok.encode("photograph"))
    assert n == 8  # the small default vocabulary spells it in pieces
    c = tokenize_prompt("a (photograph:1.3) of a cat", tok)
    assert c.ids == [tok(["a photograph of a cat"])[0].tolist()]
    assert c.weights == [[1.0, 1.0] + [1.3] * 8 + [1.0] * 67]


def test_real_commas_backtrack(tok):
    # "a red circle, a blue square, " is 8 tokens, commas at 3 and 7; 20 repeats = 160 tokens, commas at
    # every 4k + 3. Chunk 1 is full when token 75 arrives, but that token is itself a comma: no backtracking
    # (the web UI only backtracks for a non-comma), a plain cut at 75. Chunk 2 starts with that comma
    # (forgotten), its commas at local 4, 8, ..., 72; token 150 (not a comma) finds it full with the last
    # comma at 72 (75 - 72 = 3 <= 20): cut after it, at global 148. Chunk 3: tokens 148..159.
    part = "a red circle, a blue square, "
    comma = tok.encode(",")[0]
    assert tok.encode(part)[3] == tok.encode(part)[7] == comma and len(tok.encode(part)) == 8
    ids = tok.encode(part * 20)
    assert len(ids) == 160
    c = tokenize_prompt(part * 20, tok)
    assert c.ids == [tok._wrap(ids[:75], 77), tok._wrap(ids[75:148], 77), tok._wrap(ids[148:], 77)]
    assert ids[147] == comma and ids[75] == comma


def test_breakfast_is_not_a_break(tok):
    c = tokenize_prompt("a BREAKfast", tok)
    assert c.ids == [tok(["a BREAKfast"])[0].tolist()]
    assert len(tokenize_prompt("a BREAK fast", tok)) == 2


def test_lora_tags_out_then_the_rest_is_todays_ids(tok):
    text, loras = extract_lora_tags("a red circle <lora:ink:0.8>")
    assert loras == {"ink": 0.8}
    assert tokenize_prompt(text, tok).ids == [tok(["a red circle"])[0].tolist()]


def test_is_plain(tok):
    assert is_plain("a red circle", tok) and is_plain("a BREAKfast", tok)
    for text in ("a (red) circle", "a [red]", "a red)", "a BREAK b", "<lora:ink:1> a", "a\\b"):
        assert not is_plain(text, tok), text
    assert is_plain(words(0, 75), Words()) and not is_plain(words(0, 76), Words())


# -----------------------------------------------------------------------------
# apply_weights


def test_weights_of_one_change_nothing():
    hidden = torch.randn(2, 154, 8)
    assert torch.equal(apply_weights(hidden, torch.ones(2, 154)), hidden)


def test_weighted_then_rescaled_to_the_original_mean():
    # all values 1 (mean 1); token 0 at weight 2: its 2 values become 2, the mean 156 / 154; rescaled by 154 / 156
    hidden, weights = torch.ones(1, 77, 2), torch.ones(1, 77)
    weights[0, 0] = 2.0
    out = apply_weights(hidden, weights)
    assert torch.allclose(out[0, 0], torch.full((2,), 2 * 154 / 156))
    assert torch.allclose(out[0, 1:], torch.full((76, 2), 154 / 156))
    assert out.mean().item() == pytest.approx(1.0)


def test_each_sample_and_each_chunk_keeps_its_own_mean():
    torch.manual_seed(0)
    hidden = torch.randn(2, 154, 4) + 0.5
    weights = torch.ones(2, 154)
    weights[0, 3:9] = 1.5  # sample 0, chunk 0 only
    out = apply_weights(hidden, weights)
    assert torch.equal(out[1], hidden[1])  # the batch-mate is untouched
    assert torch.equal(out[0, 77:], hidden[0, 77:])  # so is the other chunk
    assert out[0, :77].mean().item() == pytest.approx(hidden[0, :77].mean().item(), rel=1e-5)
    alone = apply_weights(hidden[:1], weights[:1])
    assert torch.allclose(out[:1], alone, rtol=1e-6, atol=0)
    z = hidden[0, :77] * weights[0, :77, None]  # the web UI's formula on that chunk
    assert torch.allclose(out[0, :77], z * (hidden[0, :77].mean() / z.mean()))


def test_apply_weights_keeps_the_dtype_and_survives_a_zero_mean():
    hidden = torch.randn(1, 77, 4).half()
    assert apply_weights(hidden, torch.ones(1, 77)).dtype == torch.float16
    zeros = torch.zeros(1, 77, 4)
    assert torch.equal(apply_weights(zeros, torch.full((1, 77), 2.0)), zeros)
    with pytest.raises(ValueError):
        apply_weights(torch.zeros(1, 70, 4), torch.ones(1, 70))
