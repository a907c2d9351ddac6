"""
Original single-file SD 1.x checkpoints (model.diffusion_model.* / first_stage_model.* / cond_stage_model.*).

save_original writes one; diffusers' own single-file loader (the independent converter: from_single_file
with a local, weight-less config folder, offline) and this project's load() both read it, and their UNet,
VAE and text encoder outputs agree with each other and with the reference models the weights came from.
At full SD 1.5 size (meta tensors, no memory), the original key set our mapping produces is exactly what
diffusers' conversion functions turn into our native key set, and our config inference gives SD 1.5's configs.
"""

import dataclasses
import shutil

import diffusers
import pytest
import torch
from diffusers.loaders import single_file_utils as sfu
from safetensors.torch import load_file, save_file

from model.clip import CLIPTextConfig, CLIPTextModel
from model.unet import UNet, UNetConfig
from model.vae import AutoencoderKL, VAEConfig
from model.weights import (CLIP_PREFIX, UNET_PREFIX, VAE_PREFIX, WeightsError, clip_key_to_original,
                           infer_clip_config, infer_unet_config, infer_vae_config, load, save_original,
                           unet_key_to_original, vae_key_to_original)
from test_weights import HIDDEN, PROMPT, max_err, reference_pipeline, same_tensors

TOL = 1e-4  # max abs difference, fp32


@pytest.fixture(scope="module", params=[4, 9], ids=["unet4", "unet9"])
def original(request, tmp_path_factory):
    """(reference pipeline, its diffusers folder, a weight-less copy of it, the original single file)."""
    tmp = tmp_path_factory.mktemp(f"single{request.param}")
    ref = reference_pipeline(tmp, unet_in_channels=request.param)
    ref.save_pretrained(tmp / "sd")
    shutil.copytree(tmp / "sd", tmp / "config_only")
    for f in list((tmp / "config_only").rglob("*")):
        if f.suffix in (".safetensors", ".bin"):
            f.unlink()
    save_original(load(tmp / "sd"), tmp / "model.safetensors")
    return ref, tmp / "sd", tmp / "config_only", tmp / "model.safetensors"


def outputs(unet, vae, text_encoder, ids, in_channels, ours):
    """UNet, VAE encode/decode and text encoder outputs on fixed inputs, for our models or diffusers'."""
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, in_channels, 16, 16, generator=g), torch.randn(2, 77, HIDDEN, generator=g)
    t = torch.tensor([3, 999])
    img, z = torch.randn(1, 3, 32, 32, generator=g), torch.randn(1, 4, 16, 16, generator=g)
    with torch.no_grad():
        if ours:
            return dict(unet=unet(x, t, ctx), enc=vae.encode(img).mean, dec=vae.decode(z), clip=text_encoder(ids))
        return dict(unet=unet(x, t, encoder_hidden_states=ctx).sample, enc=vae.encode(img).latent_dist.mean,
                    dec=vae.decode(z).sample, clip=text_encoder(ids).last_hidden_state)


def test_diffusers_and_we_read_the_same_single_file(original):
    ref, sd_dir, config_only, file = original
    keys = load_file(file).keys()
    assert any(k.startswith(UNET_PREFIX) for k in keys) and any(k.startswith(VAE_PREFIX) for k in keys)
    assert CLIP_PREFIX + "text_model.embeddings.position_embedding.weight" in keys  # how diffusers spots SD 1.x CLIP

    theirs = diffusers.StableDiffusionPipeline.from_single_file(
        str(file), config=str(config_only), local_files_only=True, safety_checker=None,
        requires_safety_checker=False)
    ours = load(file, tokenizer=sd_dir / "tokenizer")
    ids = ours.tokenizer([PROMPT])
    in_ch = ref.unet.config.in_channels
    got = outputs(ours.unet, ours.vae, ours.text_encoder, ids, in_ch, ours=True)
    want = outputs(theirs.unet, theirs.vae, theirs.text_encoder, ids, in_ch, ours=False)
    orig = outputs(ref.unet, ref.vae, ref.text_encoder, ids, in_ch, ours=False)
    errs = {k: max_err(got[k], want[k]) for k in got}
    errs_ref = {k: max_err(want[k], orig[k]) for k in want}
    print("ours vs diffusers single-file", {k: f"{v:.1e}" for k, v in errs.items()},
          "diffusers single-file vs reference", {k: f"{v:.1e}" for k, v in errs_ref.items()})
    assert all(e < TOL for e in errs.values()), errs
    assert all(e < TOL for e in errs_ref.values()), errs_ref

    # the configs inferred from tensor shapes are the ones diffusers was given (but for SD 1.x's sample sizes:
    # 512 px, in latents of the tiny VAE)
    native = load(sd_dir)
    latent_side = 512 // ours.vae.config.downsample_factor
    assert ours.unet.config == dataclasses.replace(native.unet.config, sample_size=latent_side)
    assert ours.vae.config == dataclasses.replace(native.vae.config, sample_size=512)
    assert ours.text_encoder.config == native.text_encoder.config
    assert ours.scheduler_config["beta_schedule"] == "scaled_linear"


def test_checkpoint_variants_load_the_same(original, tmp_path):
    """.ckpt with a state_dict, CLIP keys without the text_model. level, training extras, fp16 weights."""
    _, sd_dir, _, file = original
    tok = sd_dir / "tokenizer"
    want = load(file, tokenizer=tok)
    state = load_file(file)

    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": state, "global_step": 470000}, ckpt)
    same_tensors(load(ckpt, tokenizer=tok), want)

    old_clip = {k.replace(CLIP_PREFIX + "text_model.", CLIP_PREFIX): v for k, v in state.items()}
    extras = {"alphas_cumprod": torch.rand(1000), "betas": torch.rand(1000), "model_ema.decay": torch.tensor(0.9999),
              "model_ema.diffusion_modelconv_inweight": torch.zeros(1)}
    save_file({**old_clip, **extras}, tmp_path / "old.safetensors")
    same_tensors(load(tmp_path / "old.safetensors", tokenizer=tok), want)

    save_file({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, tmp_path / "half.safetensors")
    half = load(tmp_path / "half.safetensors", tokenizer=tok)
    assert half.unet.conv_in.weight.dtype == torch.float32
    assert torch.equal(half.unet.conv_in.weight, want.unet.conv_in.weight.half().float())


def test_tokenizer_beside_the_file(original, tmp_path):
    _, sd_dir, _, file = original
    lonely = tmp_path / "alone" / "model.safetensors"
    lonely.parent.mkdir()
    shutil.copy(file, lonely)
    with pytest.raises(WeightsError, match="tokenizer="):
        load(lonely)
    shutil.copytree(sd_dir / "tokenizer", lonely.parent / "tokenizer")        # a tokenizer/ folder beside it
    assert load(lonely).tokenizer([PROMPT]).tolist() == load(sd_dir).tokenizer([PROMPT]).tolist()
    flat = tmp_path / "flat" / "model.safetensors"                            # or vocab.json + merges.txt
    shutil.copytree(sd_dir / "tokenizer", flat.parent)
    shutil.copy(file, flat)
    assert load(flat).tokenizer.vocab == load(sd_dir).tokenizer.vocab


def refused(file, tmp_path, edit, *expected):
    """A copy of the single file edited by edit(state) -> state is refused, naming the file and keys."""
    bad = tmp_path / "bad.safetensors"
    save_file(edit(load_file(file)), bad)
    with pytest.raises(WeightsError) as e:
        load(bad, tokenizer=file.parent / "sd" / "tokenizer")
    for s in (str(bad), *expected):
        assert s in str(e.value), (s, str(e.value))


def test_bad_single_files(original, tmp_path):
    file = original[3]
    unet_key = UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    vae_key = VAE_PREFIX + "decoder.mid.attn_1.q.weight"
    refused(file, tmp_path, lambda s: {k: v for k, v in s.items() if k != vae_key}, "missing", vae_key)
    refused(file, tmp_path, lambda s: {**s, UNET_PREFIX + "input_blocks.1.2.weight": torch.zeros(1)},
            "unexpected", UNET_PREFIX + "input_blocks.1.2.weight")
    refused(file, tmp_path, lambda s: {**s, "some_lora.alpha": torch.zeros(1)}, "unexpected", "some_lora.alpha")
    refused(file, tmp_path, lambda s: {**s, unet_key: torch.zeros(32, 7)}, "wrong shapes", unet_key, "(32, 7)")
    refused(file, tmp_path, lambda s: {k: v for k, v in s.items() if not k.startswith(CLIP_PREFIX)},
            "no text encoder keys")
    refused(file, tmp_path, lambda s: {**s, "cond_stage_model.model.token_embedding.weight": torch.zeros(1)},
            "SD 2.x")
    out = UNET_PREFIX + "out.2.weight"                                       # needed to infer the UNet's config
    refused(file, tmp_path, lambda s: {k: v for k, v in s.items() if k != out}, "cannot infer", out)

# -----------------------------------------------------------------------------
# full SD 1.5 size: key names and config inference (meta tensors: shapes only, no memory)


def original_state(cls, config, prefix, to_original):
    """The original checkpoint's tensors for cls(config), as meta tensors; VAE attention as 1x1 convs."""
    with torch.device("meta"):
        native = cls(config).state_dict()
    state = {}
    for k, v in native.items():
        name = to_original(k, config)
        if cls is AutoencoderKL and name.startswith(("encoder.mid.attn_1", "decoder.mid.attn_1")) and v.ndim == 2:
            v = v[:, :, None, None]
        state[prefix + name] = v
    assert len(state) == len(native)  # the mapping is one-to-one
    return native, state


# a few key names and shapes of the real v1-5-pruned-emaonly.safetensors, written out by hand: diffusers'
# converter accepts some alternatives (an upsampler at output_blocks.N.1 or .2), these pin the actual names
SD15_ORIGINAL = {
    "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
    "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
    "model.diffusion_model.input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
    "model.diffusion_model.input_blocks.11.0.out_layers.3.weight": (1280, 1280, 3, 3),
    "model.diffusion_model.middle_block.1.proj_in.weight": (1280, 1280, 1, 1),
    "model.diffusion_model.middle_block.2.emb_layers.1.weight": (1280, 1280),
    "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
    "model.diffusion_model.output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
    "model.diffusion_model.output_blocks.8.2.conv.weight": (640, 640, 3, 3),
    "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.ff.net.0.proj.weight": (2560, 320),
    "model.diffusion_model.time_embed.2.weight": (1280, 1280),
    "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
    "first_stage_model.encoder.down.0.downsample.conv.weight": (128, 128, 3, 3),
    "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
    "first_stage_model.encoder.mid.attn_1.proj_out.weight": (512, 512, 1, 1),
    "first_stage_model.encoder.norm_out.weight": (512,),
    "first_stage_model.quant_conv.weight": (8, 8, 1, 1),
    "first_stage_model.decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
    "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
    "first_stage_model.decoder.mid.block_2.conv1.weight": (512, 512, 3, 3),
    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
    "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc1.weight": (3072, 768),
    "cond_stage_model.transformer.text_model.final_layer_norm.weight": (768,),
}


@pytest.mark.slow
def test_sd15_key_names_match_diffusers_conversion():
    import transformers

    everything = {}
    # UNet, and the 9-channel inpainting UNet
    for config in (dataclasses.replace(UNetConfig.sd15(), in_channels=9), UNetConfig.sd15()):
        native, state = original_state(UNet, config, UNET_PREFIX, unet_key_to_original)
        assert set(sfu.convert_ldm_unet_checkpoint(state, {"layers_per_block": 2})) == set(native)
        assert infer_unet_config({k[len(UNET_PREFIX):]: v for k, v in state.items()}) == config
    everything.update(state)
    assert sfu.CHECKPOINT_KEY_NAMES["v1"] in state                            # how diffusers recognises SD 1.x

    native, state = original_state(AutoencoderKL, VAEConfig.sd15(), VAE_PREFIX, vae_key_to_original)
    converted = sfu.convert_ldm_vae_checkpoint(state, {"down_block_types": ["DownEncoderBlock2D"] * 4,
                                                       "up_block_types": ["UpDecoderBlock2D"] * 4})
    assert set(converted) == set(native)
    assert all(converted[k].shape == native[k].shape for k in native)         # 1x1 convs became linears
    assert infer_vae_config({k[len(VAE_PREFIX):]: v for k, v in state.items()}) == VAEConfig.sd15()
    everything.update(state)

    native, state = original_state(CLIPTextModel, CLIPTextConfig.sd15(), CLIP_PREFIX,
                                   lambda k, c: clip_key_to_original(k))
    with torch.device("meta"):
        hf = transformers.CLIPTextModel(transformers.CLIPTextConfig(  # SD 1.5's text encoder
            hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)).state_dict()
    assert set(sfu.convert_ldm_clip_checkpoint(state)) == set(hf) == {"text_model." + k for k in native}
    assert sfu.CHECKPOINT_KEY_NAMES["clip"] in state
    prefix = CLIP_PREFIX + "text_model."
    assert infer_clip_config({k[len(prefix):]: v for k, v in state.items()}) == CLIPTextConfig.sd15()
    everything.update(state)

    assert len(everything) == 686 + 248 + 196
    for key, shape in SD15_ORIGINAL.items():
        assert key in everything and tuple(everything[key].shape) == shape, key
    assert "first_stage_model.decoder.up.0.upsample.conv.weight" not in everything
