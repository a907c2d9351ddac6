"""
Original single files of SD 2.x (cond_stage_model.model.*, OpenCLIP with fused in_proj) and SDXL
(conditioner.embedders.0/1.*, label_emb.*). save_original writes one from a random diffusers pipeline; diffusers'
own from_single_file (offline, the pipeline's weight-less folder as its config) and this project's load() read
it, and their networks agree with each other and with the pipeline the weights came from, and so do their
txt2img images. The files carry no head counts: the tiny models follow SD 2.x's and SDXL's convention (one head
per 64 channels), which is what load() assumes.

At full size (meta tensors, no memory): the key sets of the published v2-1_768-ema-pruned and sd_xl_base_1.0 files
(tests/fixtures/original_keys, from public listings of their keys) are exactly what our mapping writes, plus the
keys load() leaves out by name; and what load() infers from those shapes is each family's published config.
"""

import shutil
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from safetensors.torch import load_file, save_file

from model import StableDiffusion
from model.clip import CLIPTextConfig, CLIPTextModel
from model.tokenizer import CLIPTokenizer
from model.unet import UNet, UNetConfig
from model.vae import AutoencoderKL, VAEConfig
from model.weights import Components, WeightsError, load, save_original
from model.weights.original import SD2, SDXL, from_original_state, original_state
from test_clip_families import SD21 as SD21_TEXT, SDXL_1 as SDXL_TEXT, SDXL_2 as SDXL_TEXT_2
from test_families import SIZE, pixels
from test_samplers_families import SD21 as SD21_SCHEDULER, SDXL as SDXL_SCHEDULER
from test_unet_families import SD21 as SD21_UNET, SDXL as SDXL_UNET
from tokenizer_fixtures import make_tokenizer_dir

FIXTURES = Path(__file__).parent / "fixtures" / "original_keys"
TOL = 1e-4  # max abs difference of network outputs, fp32
PROMPT = "a large red circle in the center"


def _vae(scaling_factor, sample_size):
    return diffusers.AutoencoderKL(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4,
                                   down_block_types=("DownEncoderBlock2D",) * 2,
                                   up_block_types=("UpDecoderBlock2D",) * 2, scaling_factor=scaling_factor,
                                   sample_size=sample_size)


def _text(cls, tokenizer, hidden, layers, act, **extra):
    """A random transformers text encoder, LayerNorms randomised too (default init leaves them at identity)."""
    model = cls(transformers.CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=hidden // 64, max_position_embeddings=77, hidden_act=act,
        eos_token_id=tokenizer.eos_token_id, **extra))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def sd2_pipeline(tmp, text_layers=23, unet_in_channels=4):
    """A small SD 2.x pipeline: ViT-H's 23 used layers (narrow), heads per 64 channels, v-prediction DDIM as
    stable-diffusion-2-1 ships it, the UNet's sample size the native 768 px in latents of the tiny VAE (2x).
    Returns (pipeline, its diffusers folder, the folder without weights)."""
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(make_tokenizer_dir(tmp / "tok", pad_token="!")))
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=768 // 2, in_channels=unet_in_channels, out_channels=4, block_out_channels=(64, 128),
        layers_per_block=1, down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2,
        cross_attention_dim=64, attention_head_dim=(1, 2), use_linear_projection=True, upcast_attention=True)
    pipe = diffusers.StableDiffusionPipeline(
        vae=_vae(0.18215, 768), text_encoder=_text(transformers.CLIPTextModel, tokenizer, 64, text_layers, "gelu"),
        tokenizer=tokenizer, unet=unet, scheduler=diffusers.DDIMScheduler.from_config(SD21_SCHEDULER),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return _saved(pipe, tmp / "sd2")


def sdxl_pipeline(tmp):
    """A small SDXL pipeline: ViT-L-like and bigG-like encoders (heads per 64 channels), a first level without
    attention, depth 2 below, text_time, Euler as sd_xl_base_1.0 ships it."""
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(make_tokenizer_dir(tmp / "tok")))
    tokenizer_2 = transformers.CLIPTokenizer.from_pretrained(str(make_tokenizer_dir(tmp / "tok2", pad_token="!")))
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=1024 // 2, in_channels=4, out_channels=4, block_out_channels=(64, 128), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64 + 128, attention_head_dim=(1, 2), transformer_layers_per_block=(1, 2),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=64 + 6 * 8)
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=_vae(0.13025, 1024), tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet,
        text_encoder=_text(transformers.CLIPTextModel, tokenizer, 64, 2, "quick_gelu"),
        text_encoder_2=_text(transformers.CLIPTextModelWithProjection, tokenizer_2, 128, 2, "gelu", projection_dim=64),
        scheduler=diffusers.EulerDiscreteScheduler.from_config(SDXL_SCHEDULER))
    return _saved(pipe, tmp / "sdxl")


def _saved(pipe, folder):
    pipe.save_pretrained(folder)
    config_only = folder.parent / (folder.name + "_config")
    shutil.copytree(folder, config_only)
    for f in list(config_only.rglob("*")):
        if f.suffix in (".safetensors", ".bin"):
            f.unlink()
    return pipe, folder, config_only


def written(name, tmp):
    """(name, reference pipeline, its diffusers folder, its weight-less copy, the original single file)."""
    ref, folder, config_only = (sd2_pipeline if name == "sd2" else sdxl_pipeline)(tmp)
    save_original(load(folder), tmp / "model.safetensors")
    return name, ref, folder, config_only, tmp / "model.safetensors"


@pytest.fixture(scope="module")
def sd2_file(tmp_path_factory):
    return written("sd2", tmp_path_factory.mktemp("sd2"))


@pytest.fixture(scope="module")
def sdxl_file(tmp_path_factory):
    return written("sdxl", tmp_path_factory.mktemp("sdxl"))


@pytest.fixture(params=["sd2", "sdxl"])
def family(request):
    return request.getfixturevalue(f"{request.param}_file")


def from_single_file(name, file, config_only):
    cls = diffusers.StableDiffusionPipeline if name == "sd2" else diffusers.StableDiffusionXLPipeline
    extra = dict(safety_checker=None, requires_safety_checker=False) if name == "sd2" else {}
    pipe = cls.from_single_file(str(file), config=str(config_only), local_files_only=True, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def networks(pipe, ids, ours):
    """Every network's output on fixed inputs, for a pipeline of ours or of diffusers: UNet (with SDXL's added
    conditioning), VAE encode and decode, each text encoder's last and penultimate states (and pooled)."""
    g = torch.Generator().manual_seed(0)
    unet = pipe.unet
    in_ch, ctx_dim = unet.config.in_channels, unet.config.cross_attention_dim
    x, ctx = torch.randn(2, in_ch, 16, 16, generator=g), torch.randn(2, 77, ctx_dim, generator=g)
    t = torch.tensor([3, 999])
    img, z = torch.randn(1, 3, 32, 32, generator=g), torch.randn(1, 4, 16, 16, generator=g)
    added = {}
    if unet.config.addition_embed_type == "text_time":
        pooled_dim = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        added = dict(text_embeds=torch.randn(2, pooled_dim, generator=g),
                     time_ids=torch.tensor([[32., 32, 0, 0, 32, 32], [64, 48, 8, 0, 32, 32]]))
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if getattr(pipe, "text_encoder_2", None) else [])
    out = {}
    with torch.no_grad():
        if ours:
            out["unet"] = unet(x, t, ctx, **added)
            out["enc"], out["dec"] = pipe.vae.encode(img).mean, pipe.vae.decode(z)
            for i, te in enumerate(encoders):
                out[f"text{i}"] = te(ids)
                out[f"text{i}_penultimate"] = te(ids, skip_last_layers=1, final_norm=False)
                if te.text_projection is not None:
                    out[f"text{i}_pooled"] = te(ids, pooled=True)[1]
        else:
            out["unet"] = unet(x, t, encoder_hidden_states=ctx, added_cond_kwargs=added or None).sample
            out["enc"], out["dec"] = pipe.vae.encode(img).latent_dist.mean, pipe.vae.decode(z).sample
            for i, te in enumerate(encoders):
                o = te(ids, output_hidden_states=True)
                out[f"text{i}"] = o.last_hidden_state
                out[f"text{i}_penultimate"] = o.hidden_states[-2]
                if hasattr(o, "text_embeds"):
                    out[f"text{i}_pooled"] = o.text_embeds
    return out


def max_errors(a, b):
    assert a.keys() == b.keys()
    return {k: (a[k].float() - b[k].float()).abs().max().item() for k in a}


def test_diffusers_and_we_read_the_same_single_file(family):
    name, ref, folder, config_only, file = family
    keys = load_file(file).keys()
    towers = {"sd2": SD2, "sdxl": SDXL}[name].towers
    assert all(any(k.startswith(t.prefix) for k in keys) for t in towers)
    theirs = from_single_file(name, file, config_only)
    ours = StableDiffusion.from_pretrained(file, tokenizer=folder / "tokenizer")
    ids = ours.tokenizer([PROMPT])
    got, want, orig = networks(ours, ids, ours=True), networks(theirs, ids, False), networks(ref, ids, False)
    errs, errs_ref = max_errors(got, want), max_errors(want, orig)
    print(f"\n{name} ours vs diffusers' from_single_file", {k: f"{v:.1e}" for k, v in errs.items()},
          "\ndiffusers' from_single_file vs the reference", {k: f"{v:.1e}" for k, v in errs_ref.items()})
    assert all(e < TOL for e in errs.values()), errs
    assert all(e < TOL for e in errs_ref.values()), errs_ref

    # the configs inferred from shapes and the family's conventions are the ones the pipeline was made with
    native = load(folder)
    assert ours.unet.config == native.unet.config
    assert ours.vae.config == native.vae.config
    assert ours.text_encoder.config == native.text_encoder.config
    assert (ours.text_encoder_2 and ours.text_encoder_2.config) == (native.text_encoder_2 and
                                                                    native.text_encoder_2.config)
    assert ours.schedule == StableDiffusion(native).schedule
    assert ours.conditioner.zeros_for_empty_negative == (name == "sdxl")
    # the tokenizers pad as the family's do ("!" for OpenCLIP), though only one folder was given
    assert ours.tokenizer([PROMPT]).tolist() == native.tokenizer([PROMPT]).tolist()
    if name == "sdxl":
        assert ours.conditioner.encoders[1][0]([PROMPT]).tolist() == native.tokenizer_2([PROMPT]).tolist()
        assert native.tokenizer_2.pad_token == "!" and ours.tokenizer.pad_token != "!"


@pytest.mark.parametrize("sampler", ["ddim", "euler"])
def test_txt2img_from_the_single_file_equals_diffusers(family, sampler):
    name, _, folder, config_only, file = family
    theirs = from_single_file(name, file, config_only)
    theirs.scheduler = {"ddim": diffusers.DDIMScheduler, "euler": diffusers.EulerDiscreteScheduler}[sampler] \
        .from_config(theirs.scheduler.config)
    ours = StableDiffusion.from_pretrained(file, tokenizer=folder / "tokenizer")
    expected = theirs(PROMPT, negative_prompt="blurry", num_inference_steps=5, guidance_scale=7.5, height=SIZE,
                      width=SIZE, generator=torch.Generator("cpu").manual_seed(7)).images[0]
    (got,) = ours.txt2img(PROMPT, negative_prompt="blurry", steps=5, sampler=sampler, seed=7, width=SIZE,
                          height=SIZE)
    diff = np.abs(pixels(expected) - pixels(got)).max()
    print(f"\n{name} single file, {sampler}: max pixel difference to diffusers {diff}/255")
    assert pixels(got).std() > 1 and diff <= 2
    assert ours.native_size == {"sd2": 768, "sdxl": 1024}[name]


def test_sd2_keeps_23_layers_of_vit_h(tmp_path, sd2_file):
    """SD 2.x conditions on ViT-H's penultimate layer: files store 24 resblocks, the 24th never runs. Ours
    writes it as an identity layer; diffusers and we leave resblocks.23 out. A file with fewer layers loads all."""
    _, _, folder, _, file = sd2_file
    state = load_file(file)
    stored = {int(k.split(".")[4]) for k in state if k.startswith("cond_stage_model.model.transformer.resblocks.")}
    assert stored == set(range(24))
    assert not state["cond_stage_model.model.transformer.resblocks.23.mlp.c_proj.weight"].any()
    assert load(file, tokenizer=folder / "tokenizer").text_encoder.config.num_hidden_layers == 23

    small, small_folder, small_config = sd2_pipeline(tmp_path, text_layers=2)
    save_original(load(small_folder), tmp_path / "small.safetensors")
    ours = load(tmp_path / "small.safetensors", tokenizer=small_folder / "tokenizer")
    theirs = from_single_file("sd2", tmp_path / "small.safetensors", small_config)
    ids = ours.tokenizer([PROMPT])
    assert ours.text_encoder.config.num_hidden_layers == 2
    with torch.no_grad():
        err = (ours.text_encoder(ids) - theirs.text_encoder(ids).last_hidden_state).abs().max().item()
    assert err < TOL


def test_sd2_variant_from_the_yaml_beside_the_file(sd2_file, tmp_path):
    """v-prediction at 768 unless the web UI's YAML beside the file says otherwise (v2-inference.yaml, the
    512 epsilon 2.x-base) or the UNet is the 9-channel inpainting one."""
    _, _, folder, _, file = sd2_file
    copy = tmp_path / "sd21-base.safetensors"
    shutil.copy(file, copy)
    tok = folder / "tokenizer"
    assert StableDiffusion.from_pretrained(copy, tokenizer=tok).schedule.prediction_type == "v_prediction"
    copy.with_suffix(".yaml").write_text("model:\n  target: ldm.models.diffusion.ddpm.LatentDiffusion\n"
                                         "  params:\n    linear_start: 0.00085\n")
    base = StableDiffusion.from_pretrained(copy, tokenizer=tok)
    assert base.schedule.prediction_type == "epsilon" and base.native_size == 512
    copy.with_suffix(".yaml").write_text("model:\n  params:\n    parameterization: \"v\"\n")
    v = StableDiffusion.from_pretrained(copy, tokenizer=tok)
    assert v.schedule.prediction_type == "v_prediction" and v.native_size == 768
    copy.with_suffix(".yaml").write_text("model: [unclosed\n")
    with pytest.raises(WeightsError, match="sd21-base.yaml"):
        load(copy, tokenizer=tok)

    inpainting = tmp_path / "inpainting.safetensors"
    (tmp_path / "nine").mkdir()
    _, folder9, _ = sd2_pipeline(tmp_path / "nine", text_layers=2, unet_in_channels=9)
    save_original(load(folder9), inpainting)
    nine = StableDiffusion.from_pretrained(inpainting, tokenizer=tok)
    assert nine.is_inpainting_model and nine.schedule.prediction_type == "epsilon" and nine.native_size == 512


def test_sdxl_tokenizer_2_beside_the_file_and_fp16(sdxl_file, tmp_path):
    _, _, folder, _, file = sdxl_file
    beside = tmp_path / "model.safetensors"
    shutil.copy(file, beside)
    shutil.copytree(folder / "tokenizer", tmp_path / "tokenizer")
    shutil.copytree(folder / "tokenizer_2", tmp_path / "tokenizer_2")
    loaded = load(beside)
    assert loaded.tokenizer_2.vocab == load(folder).tokenizer_2.vocab and loaded.tokenizer_2.pad_token == "!"
    half = StableDiffusion.from_pretrained(beside, dtype=torch.float16)
    assert half.dtype == torch.float16 and half.vae_dtype == torch.float32     # SDXL's VAE: force_upcast
    (img,) = half.txt2img(PROMPT, steps=2, width=SIZE, height=SIZE)
    assert pixels(img).std() > 1


def test_bad_family_files(family, tmp_path):
    name, _, folder, _, file = family
    state = load_file(file)
    tower = {"sd2": SD2, "sdxl": SDXL}[name].towers[-1].prefix
    fused = tower + "transformer.resblocks.1.attn.in_proj_weight"
    cases = [
        ({k: v for k, v in state.items() if k != fused}, ["missing", fused]),
        ({**state, tower + "transformer.resblocks.0.attn.extra": torch.zeros(1)}, ["unexpected", "attn.extra"]),
        ({**state, fused: state[fused][:-1]}, ["wrong shapes", fused]),
        ({**state, "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.zeros(1)},
         ["several families", "SD 1.x"]),
    ]
    if name == "sdxl":
        label = "model.diffusion_model.label_emb.0.0.weight"
        cases.append(({**state, label: state[label][:, :-1].contiguous()}, ["cannot infer", "6 time ids"]))
    for i, (bad, expected) in enumerate(cases):
        path = tmp_path / f"bad{i}.safetensors"
        save_file(bad, str(path))
        with pytest.raises(WeightsError) as e:
            load(path, tokenizer=folder / "tokenizer")
        for s in [str(path), *expected]:
            assert s in str(e.value), (s, str(e.value))

# -----------------------------------------------------------------------------
# full size: the published files' key sets (meta tensors)


def published_keys(name):
    lines = (FIXTURES / name).read_text().splitlines()
    assert lines[0].startswith("# source: ")
    return {line for line in lines[1:] if line}


def meta_components(unet, vae, texts):
    with torch.device("meta"):
        encoders = [CLIPTextModel(CLIPTextConfig.from_diffusers(t)) for t in texts]
        return Components(tokenizer=None, text_encoder=encoders[0], vae=AutoencoderKL(vae),
                          unet=UNet(UNetConfig.from_diffusers(unet)), scheduler_config={},
                          text_encoder_2=encoders[1] if len(encoders) == 2 else None)


# what load() reads but leaves out, by name: schedule buffers, EMA bookkeeping, CLIP's position_ids, OpenCLIP's
# logit_scale, and SD 2.x's 24th ViT-H layer and its unused text_projection
LEFT_OUT = {
    "v2-1_768-ema-pruned.txt": lambda k: "." not in k or k.startswith("model_ema.") or k.endswith("logit_scale")
    or k.startswith("cond_stage_model.model.transformer.resblocks.23.") or k.endswith("model.text_projection"),
    "sd_xl_base_1.0.txt": lambda k: k.endswith(("logit_scale", "position_ids")),
}


@pytest.mark.slow
@pytest.mark.parametrize("fixture, unet, vae, texts", [
    ("v2-1_768-ema-pruned.txt", SD21_UNET, VAEConfig(sample_size=768), [SD21_TEXT]),
    ("sd_xl_base_1.0.txt", SDXL_UNET, VAEConfig(scaling_factor=0.13025, sample_size=1024),
     [SDXL_TEXT, SDXL_TEXT_2]),
], ids=["sd21", "sdxl"])
def test_published_key_sets_map_with_nothing_missing_or_unexpected(fixture, unet, vae, texts):
    published = published_keys(fixture)
    components = meta_components(unet, vae, texts)
    ours = original_state(components)
    kept = {k for k in published if not LEFT_OUT[fixture](k)}
    assert set(ours) - published == set(), "written but not in the published file"
    assert kept - set(ours) == set(), "in the published file but not mapped"

    # the published keys with these shapes (the ones left out need none) load strictly, to the published configs
    state = {k: ours.get(k, torch.empty(0, device="meta")) for k in published}
    tok = CLIPTokenizer.from_dir(Path(__file__).parent.parent / "weights")
    loaded = from_original_state(state, Path("/published") / fixture.replace(".txt", ".safetensors"), device="meta",
                                 tokenizer=tok)
    assert loaded.unet.config == components.unet.config
    assert loaded.vae.config == components.vae.config
    assert loaded.text_encoder.config == components.text_encoder.config
    if len(texts) == 2:
        assert loaded.text_encoder_2.config == components.text_encoder_2.config
    # the VAE's parameter count equals diffusers' AutoencoderKL's (the UNet's and text encoders': test_*_families)
    with torch.device("meta"):
        theirs = diffusers.AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                                         down_block_types=("DownEncoderBlock2D",) * 4,
                                         up_block_types=("UpDecoderBlock2D",) * 4)
    assert sum(p.numel() for p in theirs.parameters()) == sum(p.numel() for p in loaded.vae.parameters()) == 83653863


def test_sd_convert_then_generate_from_the_native_copy(family, tmp_path):
    """`sd convert FILE DST --tokenizer T` (a subprocess, as a user runs it), then `sd generate` from DST: the same
    image as from the single file itself."""
    from test_cli import sd

    name, _, folder, _, file = family
    out = sd("convert", file, tmp_path / "native", "--tokenizer", folder / "tokenizer", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    out = sd("generate", "--prompt", PROMPT, "--steps", 2, "--seed", 3, "--width", SIZE, "--height", SIZE, "--weights",
             tmp_path / "native", "--out", tmp_path / "n.png", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    (direct,) = StableDiffusion.from_pretrained(file, tokenizer=folder / "tokenizer").txt2img(
        PROMPT, steps=2, seed=3, width=SIZE, height=SIZE)
    diff = np.abs(pixels(Image.open(tmp_path / "n.png")) - pixels(direct)).max()
    assert diff <= 1, f"{diff}/255"  # (the CLI turns on the speed levers: within round-off)
    assert (load(tmp_path / "native").text_encoder_2 is not None) == (name == "sdxl")
