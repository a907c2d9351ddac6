"""
Parity of model/clip.py with transformers' CLIPTextModel: same state_dict keys and shapes, same
hidden states for the same weights (quick-GELU and GELU, with and without clip skip), and SD 1.5's
parameter count. transformers is a test-only dependency; reference models are randomly initialised.
"""

import pytest
import torch
import transformers

from model import sd15
from model.clip import CLIPTextConfig, CLIPTextModel

TOL = 1e-4  # max abs difference, fp32

TINY = dict(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
            max_position_embeddings=77, layer_norm_eps=1e-5, hidden_act="quick_gelu", projection_dim=32)

SD15 = sd15.TEXT_ENCODER


def reference(cfg):
    torch.manual_seed(0)
    ref = transformers.CLIPTextModel(transformers.CLIPTextConfig(**cfg)).eval()
    with torch.no_grad():  # default init leaves LayerNorms at identity; randomise them so they are tested too
        for name, p in ref.named_parameters():
            if "layer_norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return ref


def ported(ref, cfg):
    """Our model with the reference's weights; asserts the key sets match and the load is strict."""
    sd = {k.removeprefix("text_model."): v for k, v in ref.state_dict().items() if not k.endswith("position_ids")}
    model = CLIPTextModel(CLIPTextConfig.from_diffusers(cfg)).eval()
    assert set(model.state_dict()) == set(sd)
    model.load_state_dict(sd, strict=True)
    return model


def max_err(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_matches_transformers(act):
    cfg = dict(TINY, hidden_act=act)
    ref = reference(cfg)
    model = ported(ref, cfg)
    ids = torch.randint(0, cfg["vocab_size"], (2, 77), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(ids, output_hidden_states=True)
        got = model(ids)
        err = max_err(got, want.last_hidden_state)
        print(f"{act} last_hidden_state max abs err {err:.2e}")
        assert got.shape == (2, 77, 32)
        assert err < TOL
        # clip skip k: transformers' hidden_states[-1-k] through the final LayerNorm
        for k in (1, 2):
            skipped = ref.text_model.final_layer_norm(want.hidden_states[-1 - k])
            err = max_err(model(ids, skip_last_layers=k), skipped)
            print(f"{act} skip_last_layers={k} max abs err {err:.2e}")
            assert err < TOL
        # shorter sequences use the first positions and stay causal
        err = max_err(model(ids[:, :10]), ref(ids[:, :10]).last_hidden_state)
        assert err < TOL


def test_causal():
    """A token's output depends only on the tokens up to it."""
    model = ported(reference(TINY), TINY)
    ids = torch.randint(0, 1000, (1, 20), generator=torch.Generator().manual_seed(2))
    changed = ids.clone()
    changed[0, 12:] = (changed[0, 12:] + 1) % 1000
    with torch.no_grad():
        a, b = model(ids), model(changed)
    assert torch.equal(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_bad_arguments():
    model = CLIPTextModel(CLIPTextConfig.from_diffusers(TINY))
    with pytest.raises(ValueError):
        model(torch.zeros(1, 78, dtype=torch.long))
    with pytest.raises(ValueError):
        model(torch.zeros(1, 5, dtype=torch.long), skip_last_layers=3)


def test_config():
    cfg = CLIPTextConfig.from_diffusers(SD15)
    assert cfg == CLIPTextConfig.sd15() == CLIPTextConfig()
    assert CLIPTextConfig(**cfg.to_dict()) == cfg
    assert CLIPTextConfig.from_diffusers({"text_config": SD15}) == cfg  # a whole CLIPModel config
    with pytest.raises(ValueError, match="hidden_act"):
        CLIPTextConfig.from_diffusers(dict(SD15, hidden_act="relu"))
    with pytest.raises(ValueError, match="attention_dropout"):
        CLIPTextConfig.from_diffusers(dict(SD15, attention_dropout=0.1))


@pytest.mark.slow
def test_sd15_shapes():
    """Full-size SD 1.5 text encoder on the meta device: same keys, shapes and parameter count as transformers."""
    with torch.device("meta"):
        ref = transformers.CLIPTextModel(transformers.CLIPTextConfig(**SD15))
        model = CLIPTextModel(CLIPTextConfig.sd15())
    want = {k.removeprefix("text_model."): v.shape for k, v in ref.state_dict().items()
            if not k.endswith("position_ids")}
    got = {k: v.shape for k, v in model.state_dict().items()}
    assert got == want
    n = sum(p.numel() for p in model.parameters())
    assert n == sum(p.numel() for p in ref.parameters())
    assert n == 123_060_480
