"""
The web UI's prompt syntax in generation (model/prompts.py -> model/conditioning.py -> model/pipeline.py), on the
small random pipelines of test_pipeline.py (SD 1.x) and test_families.py (SDXL). diffusers has no reference for
this syntax: the web UI's behaviour, as model/prompts.py documents it, is the reference, computed here by hand.

  - a plain prompt's context is bit for bit the text encoder's on tokenizer([prompt]), as before;
  - (word:1.5) scales that word's states only, then the chunk is rescaled to its old mean;
  - a prompt of 150 tokens is 2 chunks (context [154, D]), and its negative prompt is padded to 2 with empty chunks;
    BREAK starts a chunk; a weighted 2-chunk prompt equals its context computed by hand;
  - a batch mixing 1-, 2- and 3-chunk requests gives each request the image it gets alone;
  - SDXL: both encoders weighted separately, pooled from the first chunk;
  - <lora:NAME:W> in a prompt is loras={NAME: W} exactly, and the text without the tag is what is encoded.
"""

import numpy as np
import pytest
import torch

from model import Request, StableDiffusion
from model.attention import Attention, RaggedContext
from model.prompts import ROUND, tokenize_prompt
from test_families import sdxl_reference
from test_lora import kohya_lora
from test_pipeline import SIZE, pixels, tiny_reference

PROMPT = "a large red circle in the center"
LONG = "red cat " * 75           # 150 tokens of the test vocabulary ("red" and "cat" are one token each), no comma


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prompt_encoding")
    ref, folder = tiny_reference(tmp)
    pipe = StableDiffusion.from_pretrained(folder)
    pipe.load_lora(kohya_lora(tmp / "ink.safetensors", {"lora_unet": ref.unet, "lora_te": ref.text_encoder}))
    return pipe


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    _, folder = sdxl_reference(tmp_path_factory.mktemp("prompt_encoding_sdxl"))
    return StableDiffusion.from_pretrained(folder)


def encoder_on(pipe, ids) -> torch.Tensor:
    """SD 1.x's context of rows of ids [k, 77], each row through the text encoder, as today's plain encode."""
    with torch.inference_mode():
        return pipe.text_encoder(torch.as_tensor(ids))


def by_hand(hidden, weights) -> torch.Tensor:
    """The web UI's emphasis on one chunk: z * w, rescaled to the mean of z (in float32)."""
    weighted = hidden * weights[:, None]
    return weighted * (hidden.mean() / weighted.mean())


def unet_contexts(pipe):
    """A list that records the context of every UNet call (and the hook's handle): its shape, or for a
    RaggedContext, the padded shape and {length: rows}."""
    seen = []

    def record(module, args):
        c = args[2]
        seen.append(tuple(c.shape) if isinstance(c, torch.Tensor) else
                    (tuple(c.padded.shape), {length: rows.tolist() for rows, length in c.groups}))
    return seen, pipe.unet.register_forward_pre_hook(record)


def test_a_plain_prompt_is_encoded_bit_for_bit_as_before(sd1, sdxl):
    for prompt in [PROMPT, "", "a cat, blue", "a:b"]:
        assert sd1.conditioner.is_plain(prompt)
        want = encoder_on(sd1, sd1.tokenizer([prompt]))
        assert torch.equal(sd1.encode_text([prompt]), want), prompt
    # SDXL: both encoders' penultimate states side by side, the pooled output of the second: as before
    with torch.inference_mode():
        (tok1, enc1), (tok2, enc2) = sdxl.conditioner.encoders
        h1 = enc1(tok1([PROMPT]), skip_last_layers=1, final_norm=False)
        h2, pooled = enc2(tok2([PROMPT]), skip_last_layers=1, final_norm=False, pooled=True)
    context, got_pooled = sdxl.encode_prompts([PROMPT])
    assert torch.equal(context, torch.cat([h1, h2], dim=-1)) and torch.equal(got_pooled, pooled)
    # syntax that changes nothing takes the chunk path and gives the same context
    assert not sd1.conditioner.is_plain(PROMPT + " BREAK")
    assert torch.equal(sd1.encode_text([PROMPT + " BREAK"]), sd1.encode_text([PROMPT]))


def test_a_weight_scales_its_words_states_then_the_mean_is_restored(sd1):
    prompt = "a (red:1.5) cat"
    chunks = tokenize_prompt(prompt, sd1.tokenizer)
    assert len(chunks) == 1 and chunks.ids == sd1.tokenizer(["a red cat"]).tolist()
    red = [i for i, w in enumerate(chunks.weights[0]) if w != 1.0]
    assert red == [2] and chunks.ids[0][2] == sd1.tokenizer.encode("red")[0] and chunks.weights[0][2] == 1.5

    z = encoder_on(sd1, chunks.ids)[0]                                   # [77, D], = the plain "a red cat"
    w = torch.tensor(chunks.weights[0])
    weighted = z * w[:, None]                                            # before the rescale: only "red" moves
    changed = (weighted != z).any(dim=-1).nonzero().flatten().tolist()
    assert changed == red
    got = sd1.encode_text([prompt])[0]
    torch.testing.assert_close(got, by_hand(z, w), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got.mean(), z.mean(), rtol=1e-5, atol=1e-6)     # the rescale keeps the mean
    ratio = got / weighted                                               # one factor for the whole chunk
    torch.testing.assert_close(ratio, torch.full_like(ratio, (z.mean() / weighted.mean()).item()))
    assert not torch.equal(got, z)


def test_a_long_prompt_is_two_chunks_and_its_negative_is_padded(sd1):
    assert len(sd1.tokenizer.encode(LONG)) == 150 and sd1.conditioner.count_chunks(LONG) == 2
    context = sd1.encode_text([LONG])
    assert context.shape == (1, 154, 64)
    # each chunk as the web UI cuts it (bos, 75 ids, eos: no comma to move the cut to), through the encoder
    assert torch.equal(context[0], encoder_on(sd1, sd1.tokenizer.chunks(LONG)).reshape(154, 64))

    seen, handle = unet_contexts(sd1)
    try:
        sd1.txt2img(LONG, negative_prompt="blurry", steps=2, width=SIZE, height=SIZE)
    finally:
        handle.remove()
    assert seen == [(2, 154, 64)] * 2            # uncond and cond rows, both 2 chunks, in one call per step
    negative, _ = sd1.encode_prompts(["blurry"], negative=True, chunks=[2])
    assert torch.equal(negative[0, :77], sd1.encode_text(["blurry"])[0])        # the negative prompt,
    assert torch.equal(negative[0, 77:], sd1.encode_text([""])[0])              # then one empty chunk
    # a short prompt with a long negative prompt: the prompt is padded
    positive, _ = sd1.encode_prompts([PROMPT], chunks=[2])
    assert positive.shape == (1, 154, 64) and torch.equal(positive[0, :77], sd1.encode_text([PROMPT])[0])


def test_break_starts_a_chunk(sd1):
    context = sd1.encode_text(["a red cat BREAK a blue square"])[0]
    assert context.shape == (154, 64)
    alone = encoder_on(sd1, sd1.tokenizer(["a red cat", "a blue square"])).reshape(154, 64)
    torch.testing.assert_close(context, alone, rtol=0, atol=1e-6)


def test_a_weighted_two_chunk_prompt_equals_its_hand_computed_context(sd1):
    prompt = "a (red:1.3) cat, ((green)) cat BREAK [blue] cat"
    tok = sd1.tokenizer
    enc = lambda word: tok.encode(word)  # noqa: E731
    words = [("a", 1.0), ("red", 1.3), ("cat", 1.0), (",", 1.0), ("green", ROUND * ROUND), ("cat", 1.0)]
    first = [(i, w) for word, w in words for i in enc(word)]
    second = [(i, 1 / ROUND) for i in enc("blue")] + [(i, 1.0) for i in enc("cat")]
    ids, weights = [], []
    for chunk in (first, second):
        row = [tok.bos_id] + [i for i, _ in chunk] + [tok.eos_id]
        ids.append(row + [tok.pad_id] * (77 - len(row)))
        weights.append([1.0] + [w for _, w in chunk] + [1.0] * (76 - len(chunk)))
    z = encoder_on(sd1, ids)                                             # [2, 77, D]
    want = torch.cat([by_hand(z[k], torch.tensor(weights[k])) for k in range(2)])
    got = sd1.encode_text([prompt])[0]
    assert got.shape == (154, 64)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_a_batch_mixing_prompt_lengths_gives_each_request_its_image_alone(sd1):
    requests = [Request(PROMPT, "blurry", seed=1),                                     # 77 tokens
                Request("a red cat BREAK a (blue:1.2) square BREAK green", seed=2),   # 3 chunks: 231
                Request(PROMPT, LONG, seed=3, num_images=2),                         # the prompt padded: 154
                Request(LONG, "blurry", seed=4, guidance_scale=1.0)]                 # no guidance: 154, cond only
    seen, handle = unet_contexts(sd1)
    try:
        together = sd1.generate(requests, steps=3, sampler="euler_a", width=SIZE, height=SIZE)
    finally:
        handle.remove()
    # one UNet call a step; rows [uncond 1, 2, 3, 3 (no uncond for 4), cond 1, 2, 3, 3, 4]
    assert seen == [((9, 231, 64), {77: [0, 4], 231: [1, 5], 154: [2, 3, 6, 7, 8]})] * 3
    diffs = []
    for r, images in zip(requests, together):
        alone = sd1.generate([r], steps=3, sampler="euler_a", width=SIZE, height=SIZE)[0]
        diffs += [int(np.abs(pixels(a) - pixels(b)).max()) for a, b in zip(alone, images)]
    print(f"\nmixed prompt lengths: max pixel difference of each image to its request alone {diffs} (/255)")
    assert max(diffs) <= 1, diffs
    assert pixels(together[0][0]).std() > 1


def test_a_ragged_context_attends_each_row_to_its_own_keys():
    torch.manual_seed(0)
    attn = Attention(32, 48, heads=2, head_dim=16).eval()
    x = torch.randn(3, 10, 32)
    contexts = [torch.randn(77, 48), torch.randn(154, 48), torch.randn(77, 48)]
    ragged = RaggedContext.of(contexts)
    assert ragged.padded.shape == (3, 154, 48) and not ragged.padded[0, 77:].any()
    assert [(rows.tolist(), n) for rows, n in ragged.groups] == [([0, 2], 77), ([1], 154)]
    with torch.inference_mode():
        got = attn(x, ragged)
        for i, c in enumerate(contexts):
            torch.testing.assert_close(got[i], attn(x[i:i + 1], c[None])[0], rtol=0, atol=1e-6)
        assert torch.equal(got[[0, 2]], attn(x[[0, 2]], torch.stack([contexts[0], contexts[2]])))


def test_the_compiled_unet_only_runs_plain_contexts(sd1):
    calls = []

    def compiled(x, t, context):
        calls.append(tuple(context.shape))
        return sd1.unet(x, t, context)

    sd1.compiled = compiled
    try:
        sd1.generate([Request(PROMPT, seed=1)], steps=2, width=SIZE, height=SIZE)
        assert calls == [(2, 77, 64)] * 2                       # what the packages are built for
        sd1.generate([Request(PROMPT, seed=1), Request(LONG, seed=2)], steps=2, width=SIZE, height=SIZE)
        sd1.generate([Request(LONG, seed=2)], steps=2, width=SIZE, height=SIZE)
        assert calls == [(2, 77, 64)] * 2                       # mixed lengths, or 154 tokens: eager
    finally:
        sd1.compiled = None


def test_sdxl_long_prompt_runs_and_pools_the_first_chunk(sdxl):
    tok1, tok2 = (t for t, _ in sdxl.conditioner.encoders)
    prompt = "red cat " * 70 + "(green:1.4)"      # 141 tokens: 2 chunks
    assert sdxl.conditioner.count_chunks(prompt) == 2
    context, pooled = sdxl.encode_prompts([prompt])
    assert context.shape == (1, 154, 80)
    with torch.inference_mode():   # by hand: each encoder's chunks, weighted each by itself, then side by side
        states = []
        for tok, enc in sdxl.conditioner.encoders:
            chunks = tokenize_prompt(prompt, tok)
            hidden, pooled_here = enc(torch.tensor(chunks.ids), skip_last_layers=1, final_norm=False, pooled=True)
            states.append(torch.cat([by_hand(hidden[k], torch.tensor(chunks.weights[k])) for k in range(2)]))
            first_chunk_pooled = pooled_here[0]
        _, plain_pooled = sdxl.conditioner.encoders[1][1](tok2(["red cat " * 37 + "red"]), skip_last_layers=1,
                                                          final_norm=False, pooled=True)
    torch.testing.assert_close(context[0], torch.cat(states, dim=-1), rtol=1e-6, atol=1e-6)
    assert torch.equal(pooled[0], first_chunk_pooled)
    torch.testing.assert_close(pooled[0], plain_pooled[0], rtol=1e-5, atol=1e-6)  # = the first 75 tokens' pooled
    # the empty negative prompt is zeros (force_zeros_for_empty_prompt), at the padded length
    negative, negative_pooled = sdxl.encode_prompts([""], negative=True, chunks=[2])
    assert negative.shape == (1, 154, 80) and not negative.any() and not negative_pooled.any()
    (image,) = sdxl.txt2img(prompt, steps=2, width=SIZE, height=SIZE, sampler="euler")
    assert pixels(image).std() > 1
    together = sdxl.generate([Request(PROMPT, seed=0), Request(prompt, "blurry", seed=0)], steps=2, sampler="euler",
                             width=SIZE, height=SIZE)
    alone = sdxl.generate([Request(prompt, "blurry", seed=0)], steps=2, sampler="euler", width=SIZE, height=SIZE)
    assert np.abs(pixels(together[1][0]) - pixels(alone[0][0])).max() <= 1


def test_a_lora_tag_is_the_loras_entry(sd1):
    encoded = []
    encode = sd1.conditioner.encode

    def spy(prompts, device, chunks=None):
        encoded.extend(prompts)
        return encode(prompts, device, chunks)

    sd1._text_cache.clear()
    sd1.conditioner.encode = spy
    try:
        def run(prompt, **kw):
            (img,) = sd1.txt2img(prompt, negative_prompt="blurry", steps=3, seed=4, width=SIZE, height=SIZE, **kw)
            return img
        tagged = run(f"<lora:ink:0.8> {PROMPT}")
        assert encoded == [f" {PROMPT}", "blurry"]          # the text without its tag, as the loras= run encodes
        explicit = run(PROMPT, loras={"ink": 0.8})
        base = run(PROMPT)
    finally:
        del sd1.conditioner.encode
    assert np.array_equal(pixels(tagged), pixels(explicit)) and np.abs(pixels(tagged) - pixels(base)).mean() > 1
    # the PNG keeps the prompt as written, with its tag once, and the LoRA's hash
    text = tagged.info["parameters"]
    assert text.startswith(f"<lora:ink:0.8> {PROMPT}\n") and text.count("<lora:") == 1 and 'Lora hashes: "ink: ' in text
    assert tagged.info["generation"]["loras"]["ink"][0] == 0.8

    # a tag adds to a loras= entry of the same name; the PNG writes the rest as a tag, so its text says 0.75 in all
    added = run(f"{PROMPT} <lora:ink:0.25>", loras={"ink": 0.5})
    assert np.array_equal(pixels(added), pixels(run(PROMPT, loras={"ink": 0.75})))
    assert added.info["parameters"].startswith(f"{PROMPT} <lora:ink:0.25> <lora:ink:0.5>\n")
    # an unknown name: the error of an unknown loras= name; a bad tag names the prompt
    with pytest.raises(ValueError, match="unknown LoRA 'nope'"):
        run(f"<lora:nope:1> {PROMPT}")
    with pytest.raises(ValueError, match="prompt: <lora:ink:strong>: the weight is not a number"):
        run(f"<lora:ink:strong> {PROMPT}")
    # the negative prompt keeps its tags as text (the web UI parses them out of prompts only)
    (img,) = sd1.txt2img(PROMPT, negative_prompt="<lora:nope:1> blurry", steps=1, width=SIZE, height=SIZE)
    assert "nope" not in img.info["generation"]["loras"]
