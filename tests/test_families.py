"""
The SD 2.x family through the same StableDiffusion API: a random-initialised diffusers StableDiffusionPipeline
with an SD 2.x-style config (OpenCLIP-style gelu text encoder, a tokenizer that pads with "!", linear
projections in the spatial transformers, heads per level, upcast attention, a v-prediction DDIM schedule as
stabilityai/stable-diffusion-2-1 ships it) saved to disk, loaded here: txt2img within 2/255 of diffusers for
ddim, euler and dpmpp_2m, with a negative prompt and with an empty one.
"""

import diffusers
import numpy as np
import pytest
import torch
import transformers

from model import StableDiffusion
from tokenizer_fixtures import make_tokenizer_dir

SIZE = 32  # pixels; the tiny VAE has two levels, so latents are 16x16
SCHEDULERS = {
    "ddim": diffusers.DDIMScheduler,
    "euler": diffusers.EulerDiscreteScheduler,
    "dpmpp_2m": diffusers.DPMSolverMultistepScheduler,
}


def sd2_reference(tmp):
    """A small SD 2.x-style StableDiffusionPipeline with diffusers' random init, saved as diffusers saves it."""
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(make_tokenizer_dir(tmp / "tok", pad_token="!")))
    torch.manual_seed(0)
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu"))
    vae = diffusers.AutoencoderKL(
        block_out_channels=(32, 64), layers_per_block=1, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    unet = diffusers.UNet2DConditionModel(
        sample_size=SIZE // 2, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64,
        attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True)
    scheduler = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                        prediction_type="v_prediction")
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(tmp / "sd2")
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tmp / "sd2", local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe, tmp / "sd2"


@pytest.fixture(scope="module")
def sd2(tmp_path_factory):
    ref, path = sd2_reference(tmp_path_factory.mktemp("sd2"))
    return ref, StableDiffusion.from_pretrained(path)


def pixels(img):
    return np.asarray(img.convert("RGB")).astype(np.int16)


@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp_2m"])
@pytest.mark.parametrize("negative", ["blurry", ""])
def test_sd2_txt2img_equals_diffusers(sd2, sampler, negative):
    ref, pipe = sd2
    ref.scheduler = SCHEDULERS[sampler].from_config(ref.scheduler.config)
    assert ref.scheduler.config.prediction_type == "v_prediction"
    expected = ref("a large red circle in the center", negative_prompt=negative, num_inference_steps=6,
                   guidance_scale=7.5, height=SIZE, width=SIZE, output_type="pil",
                   generator=torch.Generator("cpu").manual_seed(42)).images[0]
    (got,) = pipe.txt2img("a large red circle in the center", negative_prompt=negative, steps=6,
                          guidance_scale=7.5, sampler=sampler, seed=42, width=SIZE, height=SIZE)
    diff = np.abs(pixels(expected) - pixels(got)).max()
    assert pixels(got).std() > 1  # a real image, not a constant
    assert diff <= 2, f"{sampler}, negative {negative!r}: max pixel difference {diff}/255"
    print(f"\nSD 2.x {sampler}, negative {negative!r}: max pixel difference {diff}/255")

