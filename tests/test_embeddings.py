"""
model/embeddings.py: textual inversion. A random embedding, written in each format people share (the web UI's .pt
with string_to_param, .safetensors with emb_params, diffusers' learned_embeds .safetensors / .bin, multi-vector ones,
SDXL's clip_l + clip_g), loaded with pipe.load_embedding and named in a prompt, gives the txt2img image diffusers'
load_textual_inversion gives, within 2/255, on the small random SD 1.x and SDXL pipelines of test_pipeline.py and
test_families.py. The added words split the text as transformers' added tokens do; a prompt without the name encodes
bit for bit as before and the state_dicts stay as they were; loading a name again replaces it; embeddings of the wrong
width or family, vocabulary words, pickles that would run code and files that are no embedding are refused.
"""

import copy
import os
import random

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import save_file

from model import StableDiffusion
from model.embeddings import load_embedding, read_embedding
from model.tokenizer import CLIPTokenizer
from model.weights import WeightsError
from test_families import sdxl_reference
from test_pipeline import SCHEDULERS, SIZE, pixels, tiny_reference
from test_weights import RunsCode
from tokenizer_fixtures import make_tokenizer_dir

PROMPT, NEGATIVE = "a photo of {} in the center", "blurry"


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    """diffusers' tiny SD 1.x pipeline (text encoder 64 wide) and its folder; each test copies or reloads them."""
    return tiny_reference(tmp_path_factory.mktemp("sd1"))


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """diffusers' tiny SDXL pipeline (text encoders 32 and 48 wide) and its folder."""
    return sdxl_reference(tmp_path_factory.mktemp("sdxl"))


def random_vectors(n, width, seed=0):
    return torch.randn((n, width), generator=torch.Generator().manual_seed(seed))


def write(kind, folder, name, vectors):
    """The embedding `vectors` [n, D] as a file of `kind`, named `name` (+ its extension); returns its path."""
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "webui":            # what the web UI's textual inversion training saves (torch.save)
        path = folder / f"{name}.pt"
        torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors.clone().requires_grad_()},
                    "name": "another name", "step": 1500, "sd_checkpoint": "abcdef12",
                    "sd_checkpoint_name": "v1-5-pruned"}, path)
    elif kind == "emb_params":
        path = folder / f"{name}.safetensors"
        save_file({"emb_params": vectors.contiguous()}, path)
    elif kind == "diffusers":      # learned_embeds.safetensors of diffusers' training script: {token: [D]}
        path = folder / f"{name}.safetensors"
        save_file({"<concept>": vectors[0] if len(vectors) == 1 else vectors}, path)
    elif kind == "diffusers_bin":
        path = folder / f"{name}.bin"
        torch.save({"<concept>": vectors[0] if len(vectors) == 1 else vectors}, path)
    return path


def assert_encodes_as_diffusers(ref, pipe, prompt):
    """Our conditioning of `prompt` (and of the negative prompt) is diffusers' encode_prompt's, which spells
    multi-vector names out (maybe_convert_prompt): a sharper check than the tiny model's images, which barely
    depend on the text (SD 1.x: vectors 5% off still give an image within 1/255)."""
    with torch.no_grad():
        theirs = ref.encode_prompt(prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True,
                                   negative_prompt=NEGATIVE)
    context, pooled = pipe.encode_prompts([prompt])
    negative, negative_pooled = pipe.encode_prompts([NEGATIVE], negative=True)
    ours = (context, negative) + ((pooled, negative_pooled) if pooled is not None else ())
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5, rtol=0), (a - b).abs().max()


def txt2img_both(ref, pipe, prompt, sampler="ddim", seed=42):
    ref.scheduler = SCHEDULERS[sampler].from_config(ref.scheduler.config)
    expected = ref(prompt, negative_prompt=NEGATIVE, num_inference_steps=6, guidance_scale=7.5, height=SIZE,
                   width=SIZE, generator=torch.Generator("cpu").manual_seed(seed)).images[0]
    (got,) = pipe.txt2img(prompt, negative_prompt=NEGATIVE, steps=6, guidance_scale=7.5, sampler=sampler, seed=seed,
                          width=SIZE, height=SIZE)
    return expected, got


# -----------------------------------------------------------------------------
# against diffusers


@pytest.mark.parametrize("kind, n, name", [
    ("webui", 1, "zqstyle"),                 # the web UI's .pt, one vector
    ("webui", 3, "zqmulti"),                 # ... three vectors
    ("emb_params", 2, "zqparams"),           # .safetensors {"emb_params": [n, D]}
    ("diffusers", 1, "learned_embeds"),      # diffusers' learned_embeds.safetensors {token: [D]}
    ("diffusers_bin", 1, "learned_embeds"),  # ... and its learned_embeds.bin
])
def test_sd1_equals_diffusers_load_textual_inversion(sd1, tmp_path, kind, n, name):
    ref, path = copy.deepcopy(sd1[0]), sd1[1]
    pipe = StableDiffusion.from_pretrained(path)
    file = write(kind, tmp_path, name, random_vectors(n, 64, seed=n))
    assert pipe.load_embedding(file) == name                 # token=None: the file's stem
    ref.load_textual_inversion(str(file), token=name)        # (diffusers would name it by the file's own token)
    assert len(pipe.tokenizer.added[name]) == n

    prompt = PROMPT.format(name)
    without = pipe.encode_text([PROMPT.format("")])
    assert not torch.equal(pipe.encode_text([prompt])[0, :5], without[0, :5])   # the vectors are used
    assert_encodes_as_diffusers(ref, pipe, prompt)
    expected, got = txt2img_both(ref, pipe, prompt)
    diff = np.abs(pixels(expected) - pixels(got)).max()
    assert pixels(got).std() > 1
    assert diff <= 2, f"{kind}, n={n}: max pixel difference {diff}/255"
    print(f"\nSD 1.x textual inversion, {kind} ({file.name}, n={n}): max pixel difference {diff}/255")


def test_sd1_several_embeddings_in_one_prompt(sd1, tmp_path):
    """Two embeddings loaded one after the other get the same ids as in diffusers, and mix in one prompt."""
    ref, path = copy.deepcopy(sd1[0]), sd1[1]
    pipe = StableDiffusion.from_pretrained(path)
    for name, n in (("zqfirst", 2), ("zqsecond", 3)):
        file = write("webui", tmp_path, name, random_vectors(n, 64, seed=10 + n))
        pipe.load_embedding(file)
        ref.load_textual_inversion(str(file), token=name)
    prompt = "zqsecond, a cat by zqfirst and zqsecond"
    spelled = ref.maybe_convert_prompt(prompt, ref.tokenizer)
    assert pipe.tokenizer(prompt)[0].tolist() == ref.tokenizer(spelled, padding="max_length", max_length=77).input_ids
    assert_encodes_as_diffusers(ref, pipe, prompt)
    expected, got = txt2img_both(ref, pipe, prompt, sampler="euler")
    diff = np.abs(pixels(expected) - pixels(got)).max()
    assert diff <= 2, f"max pixel difference {diff}/255"
    print(f"\nSD 1.x two embeddings in one prompt: max pixel difference {diff}/255")


@pytest.mark.parametrize("sampler", ["euler", "ddim"])
def test_sdxl_clip_l_and_clip_g_equal_diffusers(sdxl, tmp_path, sampler):
    """clip_l goes to text_encoder, clip_g to text_encoder_2, as diffusers' two calls (its docs) put them; the
    pooled embedding (bigG pools at the largest id) follows the added ids as in diffusers."""
    ref, path = copy.deepcopy(sdxl[0]), sdxl[1]
    pipe = StableDiffusion.from_pretrained(path)
    state = {"clip_l": random_vectors(2, 32, seed=1), "clip_g": random_vectors(2, 48, seed=2)}
    save_file(state, tmp_path / "zqxl.safetensors")
    assert pipe.load_embedding(tmp_path / "zqxl.safetensors") == "zqxl"
    ref.load_textual_inversion(state["clip_g"], token="zqxl", text_encoder=ref.text_encoder_2,
                               tokenizer=ref.tokenizer_2)
    ref.load_textual_inversion(state["clip_l"], token="zqxl", text_encoder=ref.text_encoder, tokenizer=ref.tokenizer)

    prompt = PROMPT.format("zqxl")
    _, pooled = pipe.encode_prompts([prompt])
    _, pooled_without = pipe.encode_prompts([PROMPT.format("")])
    assert not torch.equal(pooled, pooled_without)
    assert_encodes_as_diffusers(ref, pipe, prompt)              # both contexts side by side, and the pooled one
    expected, got = txt2img_both(ref, pipe, prompt, sampler=sampler)
    diff = np.abs(pixels(expected) - pixels(got)).max()
    assert pixels(got).std() > 1
    assert diff <= 2, f"SDXL {sampler}: max pixel difference {diff}/255"
    print(f"\nSDXL textual inversion (clip_l + clip_g), {sampler}: max pixel difference {diff}/255")


def test_added_words_split_the_text_as_transformers_added_tokens(tmp_path):
    """Case-sensitive, anywhere in the text (even inside a word), the longest where several start at one place,
    before the cleanup; a word of n vectors gives n ids, as diffusers' spelled-out name name_1 ... name_{n-1}."""
    folder = make_tokenizer_dir(tmp_path / "tok")
    ours, theirs = CLIPTokenizer.from_dir(folder), transformers.CLIPTokenizer.from_pretrained(str(folder))
    words = ["zzab", "zzabcd", "zzbc", "MyStyle", "z z"]
    ids = ours.set_added({w: 1 for w in words})
    theirs.add_tokens(words)
    assert ids == {w: [theirs.convert_tokens_to_ids(w)] for w in words}
    pieces = ["zz", "a", "b", "c", "d", "z", " ", ",", "MyStyle", "mystyle", "<|endoftext|>", "red", "é"]
    rng = random.Random(0)
    for _ in range(500):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        assert ours.encode(text) == theirs.encode(text, add_special_tokens=False), text

    ours.set_added({"zzab": 3})                              # replaces them all
    assert ours.encode("a zzab, red") == ours.encode("a") + [1000, 1001, 1002] + ours.encode(", red")
    assert ours.decode(ours.encode("a zzab, red")) == "a zzab , red"
    ours.set_added({})
    assert ours.encode("a zzab") == theirs.encode("a zzab", add_special_tokens=False)[:1] + ours.encode("zzab")


# -----------------------------------------------------------------------------
# what loading does and does not change


def test_a_prompt_without_the_name_is_unchanged(sd1, tmp_path):
    pipe = StableDiffusion.from_pretrained(sd1[1])
    state = {k: v.clone() for k, v in pipe.text_encoder.state_dict().items()}
    vocab = dict(pipe.tokenizer.vocab)
    prompts = ["a red circle", "", "zq style, zqstyl"]                   # near misses are ordinary text
    before = pipe.encode_text(prompts)
    (image_before,) = pipe.txt2img("a red circle", negative_prompt=NEGATIVE, steps=3, seed=1)

    pipe.load_embedding(write("webui", tmp_path, "zqstyle", random_vectors(3, 64)))
    assert torch.equal(pipe.encode_text(prompts), before)              # bit for bit
    (image_after,) = pipe.txt2img("a red circle", negative_prompt=NEGATIVE, steps=3, seed=1)
    assert np.array_equal(pixels(image_before), pixels(image_after))
    after = pipe.text_encoder.state_dict()                              # the added rows live outside it
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())
    assert pipe.tokenizer.vocab == vocab


def test_loading_clears_the_prompt_cache_and_a_name_loaded_again_is_replaced(sd1, tmp_path):
    pipe = StableDiffusion.from_pretrained(sd1[1])
    plain = pipe.encode_text(["a zqstyle cat"])          # before loading: "zqstyle" is ordinary text (and cached)
    pipe.load_embedding(write("webui", tmp_path / "a", "zqstyle", random_vectors(2, 64, seed=1)))
    pipe.load_embedding(write("emb_params", tmp_path, "zqother", random_vectors(1, 64, seed=2)))
    first = pipe.encode_text(["a zqstyle cat"])
    assert not torch.equal(first, plain)

    pipe.load_embedding(write("emb_params", tmp_path / "b", "zqstyle", random_vectors(3, 64, seed=3)))  # again
    assert list(pipe.tokenizer.added) == ["zqstyle", "zqother"] and len(pipe.tokenizer.added["zqstyle"]) == 3
    fresh = StableDiffusion.from_pretrained(sd1[1])      # the same two files loaded once each, in the same order
    fresh.load_embedding(tmp_path / "b" / "zqstyle.safetensors")
    fresh.load_embedding(tmp_path / "zqother.safetensors")
    for prompt in ("a zqstyle cat", "zqother and zqstyle"):
        assert torch.equal(pipe.encode_text([prompt]), fresh.encode_text([prompt])), prompt
    assert not torch.equal(pipe.encode_text(["a zqstyle cat"]), first)


def test_token_overrides_the_name_and_the_file_is_read_as_is(sd1, tmp_path):
    pipe = StableDiffusion.from_pretrained(sd1[1])
    vectors = random_vectors(2, 64).half()
    file = write("webui", tmp_path, "downloaded-v2", vectors)
    (got,) = read_embedding(file)
    assert got.dtype == torch.float16 and torch.equal(got, vectors) and not got.requires_grad
    assert pipe.load_embedding(file, token="zqmine") == "zqmine"
    assert list(pipe.tokenizer.added) == ["zqmine"]
    assert torch.equal(pipe.text_encoder.embeddings.added, vectors.float())


# -----------------------------------------------------------------------------
# refused


def refused(pipe, file, *expected, token=None, error=WeightsError):
    """load_embedding raises `error` naming every expected string, and the model is left as it was."""
    before = [dict(t.added) for t, _ in pipe.conditioner.encoders]
    with pytest.raises(error) as e:
        pipe.load_embedding(file, token=token)
    for s in expected:
        assert s in str(e.value), (s, str(e.value))
    assert [dict(t.added) for t, _ in pipe.conditioner.encoders] == before
    return str(e.value)


def test_wrong_width_or_family_is_refused(sd1, sdxl, tmp_path):
    sd = StableDiffusion.from_pretrained(sd1[1])
    xl = StableDiffusion.from_pretrained(sdxl[1])
    wide = write("webui", tmp_path, "zqwide", random_vectors(1, 768))              # an SD 1.x embedding
    refused(sd, wide, str(wide), "768-wide", "SD 1.x", "64 wide")
    save_file({"clip_l": random_vectors(1, 32), "clip_g": random_vectors(1, 48)}, tmp_path / "zqxl.safetensors")
    refused(sd, tmp_path / "zqxl.safetensors", "zqxl.safetensors", "clip_l + clip_g", "1 text encoder")
    refused(xl, write("emb_params", tmp_path, "zqone", random_vectors(1, 32)), "one text encoder", "2 text encoder")
    save_file({"clip_l": random_vectors(1, 32), "clip_g": random_vectors(1, 32)}, tmp_path / "zqbad.safetensors")
    refused(xl, tmp_path / "zqbad.safetensors", "32-wide", "text_encoder_2 is 48 wide")
    save_file({"clip_l": random_vectors(1, 32)}, tmp_path / "zqhalf.safetensors")
    refused(xl, tmp_path / "zqhalf.safetensors", "clip_g is missing")


def test_a_vocabulary_word_is_refused_as_diffusers_refuses_it(sd1, tmp_path):
    pipe = StableDiffusion.from_pretrained(sd1[1])
    file = write("webui", tmp_path, "zqstyle", random_vectors(1, 64))
    for word in ("water", "<|endoftext|>"):
        assert word in pipe.tokenizer.vocab
        refused(pipe, file, repr(word), "already a token", token=word, error=ValueError)
        with pytest.raises(ValueError, match="already in tokenizer vocabulary"):
            copy.deepcopy(sd1[0]).load_textual_inversion(str(file), token=word)
    for word in ("", " zq", "zq\n"):
        refused(pipe, file, "non-empty", token=word, error=ValueError)


def test_a_pickle_that_would_run_code_is_refused(sd1, tmp_path):
    pipe = StableDiffusion.from_pretrained(sd1[1])
    marker = tmp_path / "PWNED"
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": RunsCode(marker)}, "name": "x"},
               tmp_path / "evil.pt")
    # the original textual_inversion repo's format: an nn.ParameterDict, a module, which unpickling must build
    torch.save({"string_to_token": {"*": torch.tensor(265)},
                "string_to_param": torch.nn.ParameterDict({"*": torch.nn.Parameter(random_vectors(1, 64))})},
               tmp_path / "old.pt")
    for name in ("evil.pt", "old.pt"):
        refused(pipe, tmp_path / name, name, "refused to unpickle", "could run code")
    assert not marker.exists()
    assert not os.path.exists("PWNED")


def test_files_that_are_no_embedding_are_refused(sd1, tmp_path):
    pipe = StableDiffusion.from_pretrained(sd1[1])
    cases = {
        "two.safetensors": {"a": random_vectors(1, 64), "b": random_vectors(1, 64)},
        "many.pt": {"string_to_param": {"*": random_vectors(1, 64), "x": random_vectors(1, 64)}},
        "ints.safetensors": {"emb_params": torch.ones(1, 64, dtype=torch.int64)},
        "cube.safetensors": {"emb_params": torch.zeros(1, 2, 64)},
        "long.safetensors": {"emb_params": torch.zeros(76, 64)},
        "nan.safetensors": {"emb_params": torch.full((1, 64), float("nan"))},
        "list.pt": [random_vectors(1, 64)],
    }
    expected = {"two": "not an embedding", "many": "one tensor", "ints": "floating-point", "cube": "shape (1, 2, 64)",
                "long": "75 vectors", "nan": "NaN", "list": "not an embedding"}
    for name, content in cases.items():
        file = tmp_path / name
        save_file(content, file) if name.endswith(".safetensors") else torch.save(content, file)
        refused(pipe, file, name, expected[file.stem])
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    refused(pipe, tmp_path / "junk.safetensors", "not a readable")
    refused(pipe, tmp_path / "missing.pt", "no such file")


def test_load_embedding_on_bare_components(tmp_path):
    """model/embeddings.py works on any (tokenizer, CLIPTextModel) pairs, without a pipeline."""
    from model.clip import CLIPTextConfig, CLIPTextModel

    tokenizer = CLIPTokenizer.from_dir(make_tokenizer_dir(tmp_path / "tok"))
    encoder = CLIPTextModel(CLIPTextConfig(vocab_size=1200, hidden_size=16, intermediate_size=32,
                                           num_hidden_layers=1, num_attention_heads=2)).eval()
    vectors = random_vectors(2, 16)
    load_embedding(write("emb_params", tmp_path, "zqbare", vectors), [(tokenizer, encoder)])
    ids = tokenizer(["zqbare"])                       # ids 1000, 1001: numbered on from the tokenizer's 1000 tokens,
    assert ids[0, 1:3].tolist() == [1000, 1001]       # so they take the place of the table's rows 1000 and 1001
    x = encoder.embeddings(ids)
    pos = encoder.embeddings.position_embedding.weight[1:3]
    assert torch.equal(x[0, 1:3], vectors + pos)
