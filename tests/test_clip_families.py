"""
model/clip.py's one text transformer as the text towers of SD 2.x and SDXL, against transformers:

    SD 2.x     OpenCLIP ViT-H (CLIPTextModel, GELU): last_hidden_state
    SDXL       ViT-L (CLIPTextModel, quick-GELU) and OpenCLIP ViT-bigG (CLIPTextModelWithProjection, GELU):
               hidden_states[-2] without the final LayerNorm; bigG also text_embeds (pooled at EOS, projected)

Tiny random references are saved with save_pretrained and loaded here from their config.json and
model.safetensors strictly; the published full-size configs are compared on the meta device (no weights).
transformers is a test-only dependency.
"""

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file

from model.clip import CLIPTextConfig, CLIPTextModel

TOL = 1e-4  # max abs difference, fp32

VOCAB = 1000
MODERN_EOS = 7  # deliberately not the largest id, so pooling by argmax of the ids would pick the wrong token

TINY = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
            max_position_embeddings=77, layer_norm_eps=1e-5, hidden_act="gelu", projection_dim=24,
            bos_token_id=0, pad_token_id=1)

# text_encoder/config.json of stabilityai/stable-diffusion-2-1 (OpenCLIP ViT-H/14, its last layer dropped)
SD21 = dict(
    architectures=["CLIPTextModel"], attention_dropout=0.0, bos_token_id=0, dropout=0.0, eos_token_id=2,
    hidden_act="gelu", hidden_size=1024, initializer_factor=1.0, initializer_range=0.02, intermediate_size=4096,
    layer_norm_eps=1e-05, max_position_embeddings=77, model_type="clip_text_model", num_attention_heads=16,
    num_hidden_layers=23, pad_token_id=1, projection_dim=512, torch_dtype="float32", vocab_size=49408,
)
# stabilityai/stable-diffusion-xl-base-1.0: text_encoder/ (CLIP ViT-L/14) and text_encoder_2/ (OpenCLIP bigG/14)
SDXL_1 = dict(
    architectures=["CLIPTextModel"], attention_dropout=0.0, bos_token_id=0, dropout=0.0, eos_token_id=2,
    hidden_act="quick_gelu", hidden_size=768, initializer_factor=1.0, initializer_range=0.02,
    intermediate_size=3072, layer_norm_eps=1e-05, max_position_embeddings=77, model_type="clip_text_model",
    num_attention_heads=12, num_hidden_layers=12, pad_token_id=1, projection_dim=768, torch_dtype="float16",
    vocab_size=49408,
)
SDXL_2 = dict(
    architectures=["CLIPTextModelWithProjection"], attention_dropout=0.0, bos_token_id=0, dropout=0.0,
    eos_token_id=2, hidden_act="gelu", hidden_size=1280, initializer_factor=1.0, initializer_range=0.02,
    intermediate_size=5120, layer_norm_eps=1e-05, max_position_embeddings=77, model_type="clip_text_model",
    num_attention_heads=20, num_hidden_layers=32, pad_token_id=1, projection_dim=1280, torch_dtype="float16",
    vocab_size=49408,
)


def reference(cls, cfg):
    torch.manual_seed(0)
    ref = cls(transformers.CLIPTextConfig(**cfg)).eval()
    with torch.no_grad():  # default init leaves LayerNorms at identity; randomise them so they are tested too
        for name, p in ref.named_parameters():
            if "layer_norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return ref


def saved_and_loaded(ref, tmp_path):
    """Ours from the reference's save_pretrained folder: config.json through from_diffusers, weights strictly."""
    ref.save_pretrained(tmp_path, safe_serialization=True)
    config = CLIPTextConfig.from_diffusers(json.loads((tmp_path / "config.json").read_text()))
    state = {k.removeprefix("text_model."): v for k, v in load_file(tmp_path / "model.safetensors").items()
             if not k.endswith("position_ids")}
    model = CLIPTextModel(config).eval()
    assert set(model.state_dict()) == set(state)
    model.load_state_dict(state, strict=True)
    return model


def token_ids(eos, pad):
    """[3, 77]: BOS, random words, EOS at rows' own positions, then padding (SD 1.x pads with EOS, SD 2.x with 0).
    A word larger than EOS precedes it in row 0 when EOS is not the largest id."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(MODERN_EOS + 1, VOCAB - 1, (3, 77), generator=g)
    ids[:, 0] = 0
    for row, end in enumerate((5, 40, 76)):
        ids[row, end] = eos
        ids[row, end + 1:] = pad
    if eos != VOCAB - 1:
        ids[0, 3] = VOCAB - 1
    return ids


def max_err(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("act", ["gelu", "quick_gelu"])
def test_clip_text_model(act, tmp_path):
    """SD 2.x (GELU) and SDXL's ViT-L (quick-GELU): last_hidden_state, hidden_states[-2] unnormed, pooler_output."""
    cfg = dict(TINY, hidden_act=act, eos_token_id=2)
    ref = reference(transformers.CLIPTextModel, cfg)
    model = saved_and_loaded(ref, tmp_path)
    assert model.text_projection is None and model.config.projection_dim is None
    ids = token_ids(eos=VOCAB - 1, pad=VOCAB - 1)
    with torch.no_grad():
        want = ref(ids, output_hidden_states=True)
        errs = {
            "last_hidden_state": max_err(model(ids), want.last_hidden_state),
            "hidden_states[-2]": max_err(model(ids, skip_last_layers=1, final_norm=False), want.hidden_states[-2]),
        }
        hidden, pooled = model(ids, skip_last_layers=1, final_norm=False, pooled=True)
        assert pooled.shape == (3, 32)
        errs["pooled: hidden_states[-2]"] = max_err(hidden, want.hidden_states[-2])
        errs["pooler_output"] = max_err(pooled, want.pooler_output)
    print(act, {k: f"{v:.2e}" for k, v in errs.items()})
    assert max(errs.values()) < TOL


@pytest.mark.parametrize("eos", [2, MODERN_EOS], ids=["legacy_eos_2", "modern_eos"])
def test_clip_text_model_with_projection(eos, tmp_path):
    """SDXL's bigG: hidden_states[-2] unnormed and text_embeds, pooled by argmax of the ids (legacy configs, EOS
    the largest id) or at the first eos_token_id."""
    cfg = dict(TINY, eos_token_id=eos)
    ref = reference(transformers.CLIPTextModelWithProjection, cfg)
    model = saved_and_loaded(ref, tmp_path)
    assert model.config.projection_dim == 24 and model.config.eos_token_id == eos
    ids = token_ids(eos=VOCAB - 1, pad=VOCAB - 1) if eos == 2 else token_ids(eos=MODERN_EOS, pad=0)
    with torch.no_grad():
        want = ref(ids, output_hidden_states=True)
        hidden, text_embeds = model(ids, skip_last_layers=1, final_norm=False, pooled=True)
        assert hidden.shape == (3, 77, 32) and text_embeds.shape == (3, 24)
        errs = {"hidden_states[-2]": max_err(hidden, want.hidden_states[-2]),
                "text_embeds": max_err(text_embeds, want.text_embeds),
                "last_hidden_state": max_err(model(ids), want.last_hidden_state)}
        _, text_embeds = model(ids, pooled=True)  # the pooled output does not depend on which state is returned
        errs["text_embeds (default state)"] = max_err(text_embeds, want.text_embeds)
    print(f"eos_token_id={eos}", {k: f"{v:.2e}" for k, v in errs.items()})
    assert max(errs.values()) < TOL
    if eos != 2:  # the test is able to tell the two pooling rules apart
        legacy = CLIPTextModel(CLIPTextConfig(**dict(model.config.to_dict(), eos_token_id=2)))
        legacy.load_state_dict(model.state_dict())
        with torch.no_grad():
            assert max_err(legacy(ids, pooled=True)[1], want.text_embeds) > 1e-2


@pytest.mark.parametrize("cfg, cls, params", [
    (SD21, transformers.CLIPTextModel, 340_387_840),
    (SDXL_1, transformers.CLIPTextModel, 123_060_480),
    (SDXL_2, transformers.CLIPTextModelWithProjection, 694_659_840),
], ids=["sd21_text_encoder", "sdxl_text_encoder", "sdxl_text_encoder_2"])
def test_published_sizes(cfg, cls, params):
    """Full-size text encoders on the meta device: same keys, shapes and parameter count as transformers."""
    with torch.device("meta"):
        ref = cls(transformers.CLIPTextConfig(**cfg))
        model = CLIPTextModel(CLIPTextConfig.from_diffusers(cfg))
    want = {k.removeprefix("text_model."): v.shape for k, v in ref.state_dict().items()
            if not k.endswith("position_ids")}
    got = {k: v.shape for k, v in model.state_dict().items()}
    assert got == want
    n = sum(p.numel() for p in model.parameters())
    print(f"{cls.__name__} {cfg['hidden_size']}x{cfg['num_hidden_layers']}: {n:,} parameters")
    assert n == sum(p.numel() for p in ref.parameters()) == params


def test_config():
    sd21, sdxl_1, sdxl_2 = (CLIPTextConfig.from_diffusers(c) for c in (SD21, SDXL_1, SDXL_2))
    assert (sd21.hidden_act, sd21.projection_dim, sd21.eos_token_id) == ("gelu", None, 2)
    assert sdxl_1 == CLIPTextConfig.sd15()
    assert (sdxl_2.hidden_act, sdxl_2.projection_dim) == ("gelu", 1280)
    assert CLIPTextConfig(**sdxl_2.to_dict()) == sdxl_2  # native config.json round trip
    assert CLIPTextConfig(**dict(sdxl_2.to_dict(), eos_token_id=7)).eos_token_id == 7
    assert CLIPTextConfig.from_diffusers({"hidden_size": 32}).eos_token_id == 49407  # transformers' default
    # the EOS id is the tokenizer's, not the network's: an original single file cannot record it, so configs
    # inferred from one compare equal to the diffusers config of the same network
    assert CLIPTextConfig.from_diffusers(dict(SDXL_1, eos_token_id=49407)) == sdxl_1
    # native configs saved before these fields existed load as before: no projection, legacy pooling
    old = {k: v for k, v in sd21.to_dict().items() if k not in ("projection_dim", "eos_token_id")}
    assert CLIPTextConfig(**old) == sd21


def test_refused():
    with pytest.raises(ValueError, match="hidden_act='gelu_new'"):
        CLIPTextConfig.from_diffusers(dict(SDXL_2, hidden_act="gelu_new"))
    with pytest.raises(ValueError, match="architectures=.*CLIPVisionModelWithProjection"):
        CLIPTextConfig.from_diffusers(dict(SDXL_2, architectures=["CLIPVisionModelWithProjection"]))
    with pytest.raises(ValueError, match="dropout=0.1"):
        CLIPTextConfig.from_diffusers(dict(SD21, dropout=0.1))
    with pytest.raises(ValueError, match="projection_dim"):
        CLIPTextConfig(projection_dim=0)
    model = CLIPTextModel(CLIPTextConfig.from_diffusers(dict(TINY, architectures=["CLIPTextModelWithProjection"])))
    with pytest.raises(ValueError, match="skip_last_layers"):
        model(torch.zeros(1, 5, dtype=torch.long), skip_last_layers=3, final_norm=False, pooled=True)
