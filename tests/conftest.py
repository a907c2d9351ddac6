"""Shared fixtures: a tiny random Stable Diffusion saved in the native layout (16x16 images), built
once per test session with the project's own code, and the pipeline loaded from it."""

import pytest
import torch

from tokenizer_fixtures import make_tokenizer_dir


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory):
    """A native weights folder: CLIP 64 wide, VAE (32, 64), UNet (32, 64) with sample_size 8 -> 16x16 images."""
    from model.clip import CLIPTextConfig, CLIPTextModel
    from model.tokenizer import CLIPTokenizer
    from model.unet import UNet, UNetConfig
    from model.vae import AutoencoderKL, VAEConfig
    from model.weights import Components, save_native

    root = tmp_path_factory.mktemp("tiny_sd")
    torch.manual_seed(0)
    components = Components(
        tokenizer=CLIPTokenizer.from_dir(make_tokenizer_dir(root / "tokenizer")),
        text_encoder=CLIPTextModel(CLIPTextConfig(vocab_size=1000, hidden_size=64, intermediate_size=128,
                                                  num_hidden_layers=1, num_attention_heads=2)),
        vae=AutoencoderKL(VAEConfig(block_out_channels=(32, 64), layers_per_block=1, sample_size=16)),
        unet=UNet(UNetConfig(block_out_channels=(32, 64), layers_per_block=1, attention_levels=(True, False),
                             cross_attention_dim=64, attention_head_dim=8, sample_size=8)),
        scheduler_config={},
    )
    save_native(components, root / "weights")
    return root / "weights"


@pytest.fixture(scope="session")
def tiny_pipe(tiny_weights):
    from model import StableDiffusion

    return StableDiffusion.from_pretrained(tiny_weights)


@pytest.fixture(scope="session", autouse=True)
def tuning_cache(tmp_path_factory):
    """The tuner's choices (model/tuning.py) go to a file of this test session, not the user's ~/.cache;
    worker processes the tests start inherit it."""
    import os

    path = tmp_path_factory.mktemp("tuning") / "tuning.json"
    old = os.environ.get("SD_TUNE_CACHE")
    os.environ["SD_TUNE_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("SD_TUNE_CACHE", None)
    else:
        os.environ["SD_TUNE_CACHE"] = old
