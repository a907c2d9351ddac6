"""
model/weights.py: loading a diffusers-layout folder (safetensors and .bin) gives the outputs of the
diffusers / transformers reference models it was saved from; native save/load and convert() are lossless;
dtypes are honoured; and broken, foreign or malicious files are refused with a WeightsError that names
the file and the keys. Reference models are tiny, randomly initialised, and saved with save_pretrained.
"""

import json
import os
import pickle
import shutil

import diffusers
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from model.tokenizer import CLIPTokenizer
from model.weights import Components, WeightsError, convert, detect_layout, load, read_state_dict, save_native
from tokenizer_fixtures import make_tokenizer_dir

TOL = 1e-4  # max abs difference, fp32
PROMPT = "a photo of a cat on a red chair"
HIDDEN = 128  # text encoder width = UNet cross-attention dim; heads = HIDDEN / 64, as single files assume


def perturb(model, seed):
    """Default inits leave norms at 1/0 and some layers alike; make every tensor distinct so a mix-up shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def reference_pipeline(tmp, unet_in_channels=4):
    """A tiny StableDiffusionPipeline (random weights, our test tokenizer), as diffusers would save it."""
    tok_dir = make_tokenizer_dir(tmp / "tok")
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(tok_dir))
    torch.manual_seed(0)
    text_encoder = perturb(transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu")), 1)
    vae = perturb(diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=32, sample_size=32), 2)
    unet = perturb(diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=unet_in_channels, out_channels=4, block_out_channels=(32, 64),
        layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=HIDDEN, attention_head_dim=8,
        norm_num_groups=32), 3)
    scheduler = diffusers.PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        skip_prk_steps=True, steps_offset=1)
    return diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def max_err(a, b):
    return (a.float() - b.float()).abs().max().item()


def assert_matches_reference(c, ref):
    """Our loaded components compute what the reference pipeline's models compute."""
    g = torch.Generator().manual_seed(0)
    ids = c.tokenizer([PROMPT])
    assert ids.tolist() == ref.tokenizer([PROMPT], padding="max_length", max_length=77).input_ids
    in_ch = ref.unet.config.in_channels
    x, ctx = torch.randn(2, in_ch, 16, 16, generator=g), torch.randn(2, 77, HIDDEN, generator=g)
    t = torch.tensor([10, 700])
    img, z = torch.randn(1, 3, 32, 32, generator=g), torch.randn(1, 4, 16, 16, generator=g)
    with torch.no_grad():
        errs = {
            "clip": max_err(c.text_encoder(ids), ref.text_encoder(ids).last_hidden_state),
            "unet": max_err(c.unet(x, t, ctx), ref.unet(x, t, encoder_hidden_states=ctx).sample),
            "vae.encode": max_err(c.vae.encode(img).mean, ref.vae.encode(img).latent_dist.mean),
            "vae.decode": max_err(c.vae.decode(z), ref.vae.decode(z).sample),
        }
    print("max abs err", {k: f"{v:.1e}" for k, v in errs.items()})
    assert all(e < TOL for e in errs.values()), errs


def same_tensors(a, b):
    """Two Components hold identical tensors, configs and tokenizer files."""
    for name in ("text_encoder", "vae", "unet"):
        ma, mb = getattr(a, name), getattr(b, name)
        assert ma.config == mb.config
        sa, sb = ma.state_dict(), mb.state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), f"{name}.{k}"
    assert a.tokenizer.vocab == b.tokenizer.vocab and a.tokenizer.merges == b.tokenizer.merges
    assert a.scheduler_config == b.scheduler_config


@pytest.fixture(scope="module")
def ref_dir(tmp_path_factory):
    """(reference pipeline, its diffusers-layout folder with safetensors weights)."""
    tmp = tmp_path_factory.mktemp("ref")
    ref = reference_pipeline(tmp)
    ref.save_pretrained(tmp / "sd")
    return ref, tmp / "sd"


@pytest.fixture(scope="module")
def native_dir(ref_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("native") / "model"
    save_native(load(ref_dir[1]), path)
    return path

# -----------------------------------------------------------------------------
# loading what diffusers saved


def test_diffusers_dir_matches_reference(ref_dir):
    ref, path = ref_dir
    assert (path / "model_index.json").is_file() and (path / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert detect_layout(path) == "diffusers"
    c = load(path)
    assert isinstance(c, Components) and isinstance(c.tokenizer, CLIPTokenizer)
    assert not any(m.training for m in (c.text_encoder, c.vae, c.unet))
    assert c.scheduler_config["_class_name"] == "PNDMScheduler" and c.scheduler_config["beta_end"] == 0.012
    assert_matches_reference(c, ref)


@pytest.mark.parametrize("in_channels", [4, 9])
def test_diffusers_dir_bin_matches_reference(tmp_path, in_channels):
    """.bin weights (read with torch.load(weights_only=True)), and the 9-channel inpainting UNet."""
    ref = reference_pipeline(tmp_path, unet_in_channels=in_channels)
    ref.save_pretrained(tmp_path / "sd", safe_serialization=False)
    assert (tmp_path / "sd" / "unet" / "diffusion_pytorch_model.bin").is_file()
    assert (tmp_path / "sd" / "text_encoder" / "pytorch_model.bin").is_file()
    c = load(tmp_path / "sd")
    assert c.unet.config.in_channels == in_channels
    assert_matches_reference(c, ref)


def test_legacy_vae_attention_names(ref_dir, tmp_path):
    """Old diffusers VAEs call the mid-block attention query/key/value/proj_attn."""
    ref, path = ref_dir
    shutil.copytree(path, tmp_path / "sd")
    file = tmp_path / "sd" / "vae" / "diffusion_pytorch_model.safetensors"
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = load_file(file)
    renamed = {}
    for k, v in state.items():
        for new, old in legacy.items():
            k = k.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
        renamed[k] = v
    assert any(".proj_attn." in k for k in renamed)
    save_file(renamed, file)
    same_tensors(load(tmp_path / "sd"), load(path))


def test_diffusers_dir_with_a_fast_tokenizer_only(ref_dir, tmp_path):
    """A folder whose tokenizer/ holds tokenizer.json and no vocab.json / merges.txt, as today's transformers
    saves it, loads with the same tokenizer (it was refused)."""
    import transformers

    ref, path = ref_dir
    shutil.copytree(path, tmp_path / "sd")
    shutil.rmtree(tmp_path / "sd" / "tokenizer")
    fast = transformers.CLIPTokenizerFast.from_pretrained(str(path / "tokenizer"))
    fast.save_pretrained(str(tmp_path / "sd" / "tokenizer"), legacy_format=False)
    assert not (tmp_path / "sd" / "tokenizer" / "vocab.json").exists()
    c, stored = load(tmp_path / "sd"), load(path)
    assert (c.tokenizer.vocab, c.tokenizer.merges, c.tokenizer.pad_token) == \
        (stored.tokenizer.vocab, stored.tokenizer.merges, stored.tokenizer.pad_token)
    assert_matches_reference(c, ref)


def test_tokenizer_argument_replaces_stored_one(ref_dir, tmp_path):
    tok = CLIPTokenizer.from_dir(ref_dir[1] / "tokenizer")
    assert load(ref_dir[1], tokenizer=tok).tokenizer is tok

# -----------------------------------------------------------------------------
# native layout, convert, dtypes


def test_native_round_trip(ref_dir, native_dir, tmp_path):
    assert detect_layout(native_dir) == "native"
    for name in ("config.json", "text_encoder.safetensors", "vae.safetensors", "unet.safetensors",
                 "vocab.json", "merges.txt", "scheduler_config.json"):
        assert (native_dir / name).is_file(), name
    config = json.loads((native_dir / "config.json").read_text())
    assert config["format"] == "sd-from-scratch" and config["format_version"] == 1
    a = load(native_dir)
    same_tensors(a, load(ref_dir[1]))
    save_native(a, tmp_path / "again")
    same_tensors(load(tmp_path / "again"), a)


def test_convert_diffusers_to_native(ref_dir, tmp_path):
    convert(ref_dir[1], tmp_path / "out")
    assert detect_layout(tmp_path / "out") == "native"
    c = load(tmp_path / "out")
    same_tensors(c, load(ref_dir[1]))
    assert_matches_reference(c, ref_dir[0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dtype(native_dir, dtype):
    full = load(native_dir)
    c = load(native_dir, dtype=dtype)
    for name in ("text_encoder", "vae", "unet"):
        got, want = getattr(c, name).state_dict(), getattr(full, name).state_dict()
        for k, v in got.items():
            assert v.dtype == dtype and v.device.type == "cpu", f"{name}.{k}"
            assert torch.equal(v, want[k].to(dtype)), f"{name}.{k}"
    with torch.no_grad():
        h = c.text_encoder(c.tokenizer([PROMPT]))
    assert h.dtype == dtype and torch.isfinite(h).all()

# -----------------------------------------------------------------------------
# refusals


def broken_copy(native_dir, tmp_path, edit):
    """A copy of the native folder whose unet.safetensors went through edit(state) -> state."""
    path = tmp_path / "broken"
    shutil.copytree(native_dir, path)
    file = path / "unet.safetensors"
    save_file(edit(load_file(file)), file)
    return path, file


def refused(path, *expected, **kwargs):
    """load(path) raises a WeightsError whose message contains every expected string."""
    with pytest.raises(WeightsError) as e:
        load(path, **kwargs)
    for s in expected:
        assert s in str(e.value), (s, str(e.value))
    return str(e.value)


def test_truncated_file(native_dir, tmp_path):
    path = tmp_path / "t"
    shutil.copytree(native_dir, path)
    file = path / "unet.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    refused(path, str(file))


def test_missing_key(native_dir, tmp_path):
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    path, file = broken_copy(native_dir, tmp_path, lambda s: {k: v for k, v in s.items() if k != key})
    refused(path, str(file), "missing", key)


def test_extra_key(native_dir, tmp_path):
    path, file = broken_copy(native_dir, tmp_path, lambda s: {**s, "down_blocks.0.extra.weight": torch.zeros(3)})
    refused(path, str(file), "unexpected", "down_blocks.0.extra.weight")


def test_shape_mismatch(native_dir, tmp_path):
    key = "conv_in.weight"
    path, file = broken_copy(native_dir, tmp_path, lambda s: {**s, key: torch.zeros(32, 5, 3, 3)})
    refused(path, str(file), "shape", key, "(32, 5, 3, 3)")


def test_many_missing_keys_are_summarised(native_dir, tmp_path):
    path, file = broken_copy(native_dir, tmp_path, lambda s: dict(list(s.items())[:3]))
    msg = refused(path, str(file), "missing", "more")
    assert len(msg) < 3000


@pytest.mark.parametrize("name", ["random.safetensors", "random.ckpt", "random.bin", "random.weights"])
def test_random_bytes(tmp_path, name):
    file = tmp_path / name
    file.write_bytes(os.urandom(4096))
    refused(file, str(file))


def test_not_a_checkpoint(tmp_path):
    file = tmp_path / "other.safetensors"
    save_file({"linear.weight": torch.zeros(2, 2)}, file)
    refused(file, str(file), "not an SD 1.x, 2.x or SDXL checkpoint", "no text encoder keys")
    ckpt = tmp_path / "list.ckpt"
    torch.save([torch.zeros(2)], ckpt)
    refused(ckpt, str(ckpt), "not a checkpoint")
    refused(tmp_path, str(tmp_path), "not a weights folder")
    refused(tmp_path / "nothing", "no such file")


class RunsCode:
    """Unpickling this would call os.system, which writes the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "PWNED"
    zipped, raw = tmp_path / "evil.ckpt", tmp_path / "evil_raw.pt"
    torch.save({"state_dict": {"model.diffusion_model.conv_in.weight": RunsCode(marker)}}, zipped)
    with open(raw, "wb") as f:
        pickle.dump({"state_dict": RunsCode(marker)}, f, protocol=2)
    for file in (zipped, raw):
        refused(file, str(file), "refused to unpickle")
        with pytest.raises(WeightsError):
            read_state_dict(file)
    assert not marker.exists()


def test_unsupported_diffusers_option(ref_dir, tmp_path):
    shutil.copytree(ref_dir[1], tmp_path / "sd")
    config_file = tmp_path / "sd" / "unet" / "config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "resnet_time_scale_shift": "scale_shift"}))
    refused(tmp_path / "sd", str(config_file), "resnet_time_scale_shift")


def test_missing_tokenizer(ref_dir, tmp_path):
    shutil.copytree(ref_dir[1], tmp_path / "sd")
    shutil.rmtree(tmp_path / "sd" / "tokenizer")
    refused(tmp_path / "sd", "tokenizer=", "vocab.json")
    assert load(tmp_path / "sd", tokenizer=ref_dir[1] / "tokenizer").tokenizer.vocab


def test_safetensors_are_read_into_memory_of_their_own(tmp_path):
    """Every dtype comes back exactly, and the tensors are copies, not a map of the file: rewriting the file
    afterwards (as training does) leaves them alone, and freeing one frees its memory."""
    g = torch.Generator().manual_seed(0)
    tensors = {"f32": torch.randn(3, 5, generator=g), "f16": torch.randn(7, generator=g).half(),
               "bf16": torch.randn(2, 3, generator=g).bfloat16(), "i64": torch.arange(4),
               "mask": torch.tensor([True, False, True]), "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3)}
    file = tmp_path / "w.safetensors"
    save_file(tensors, str(file))
    state = read_state_dict(file)
    assert sorted(state) == sorted(load_file(str(file))) == sorted(tensors)
    for key, want in tensors.items():
        assert state[key].dtype == want.dtype and torch.equal(state[key], want), key
    size = file.stat().st_size
    with open(file, "r+b") as f:                                  # the same file, overwritten in place
        header_len = int.from_bytes(f.read(8), "little")
        f.seek(8 + header_len)
        f.write(b"\xff" * (size - 8 - header_len))
    assert all(torch.equal(state[k], v) for k, v in tensors.items())


def test_truncated_safetensors_data_is_named(tmp_path):
    file = tmp_path / "w.safetensors"
    save_file({"a": torch.ones(1000), "b": torch.ones(10)}, str(file))
    file.write_bytes(file.read_bytes()[:-100])
    with pytest.raises(WeightsError, match="w.safetensors: not a readable .safetensors file"):
        read_state_dict(file)


@pytest.mark.parametrize("key, looks", [
    # families that load: a file without its UNet is refused naming the family it looks like
    ("conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight", "not an SDXL checkpoint: no UNet"),
    ("cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight", "not an SD 2.x checkpoint: no UNet"),
    # families that do not
    ("conditioner.embedders.0.model.transformer.resblocks.0.attn.in_proj_weight", "an SDXL refiner checkpoint"),
    ("model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight", "an SD3 checkpoint"),
    ("double_blocks.0.img_attn.qkv.weight", "a Flux checkpoint"),
    ("model.diffusion_model.double_blocks.0.img_attn.qkv.weight", "a Flux checkpoint"),
], ids=["sdxl", "sd2", "sdxl-refiner", "sd3", "flux", "flux-prefixed"])
def test_a_single_file_of_another_family_is_named(tmp_path, key, looks):
    file = tmp_path / "model.safetensors"
    save_file({key: torch.zeros(2, 2), "first_stage_model.decoder.conv_in.weight": torch.zeros(1)}, str(file))
    refused(file, str(file), looks)


def test_a_diffusers_pipeline_of_another_family_is_named(tmp_path):
    (tmp_path / "sd3" / "transformer").mkdir(parents=True)
    (tmp_path / "sd3" / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    refused(tmp_path / "sd3", "StableDiffusion3Pipeline", "not a family this project runs")
