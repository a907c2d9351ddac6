"""
The SD 2.x and SDXL families through the same StableDiffusion API, each a random-initialised diffusers pipeline
saved to disk and loaded here; txt2img within 2/255 of diffusers for ddim, euler and dpmpp_2m, with a negative
prompt and with an empty one:

  SD 2.x  StableDiffusionPipeline: OpenCLIP-style gelu text encoder, a tokenizer that pads with "!", linear
          projections in the spatial transformers, heads per level, upcast attention, a v-prediction DDIM
          schedule as stabilityai/stable-diffusion-2-1 ships it;
  SDXL    StableDiffusionXLPipeline: two text encoders (the second with a projection, its tokenizer padding
          with "!"), penultimate states side by side, pooled text + size micro-conditioning (text_time), a first
          level without attention, transformer depth per level, Euler "leading" as SDXL base ships it, and
          force_zeros_for_empty_prompt (an empty negative prompt is zeros). Also: its native copy generates the
          same image; img2img and inpaint (4- and 9-channel UNets, strength 1 and 0.6) equal diffusers' SDXL
          img2img and inpaint pipelines.
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



# -----------------------------------------------------------------------------
# SDXL


def sdxl_reference(tmp, unet_in_channels=4):
    """A small StableDiffusionXLPipeline with diffusers' random init, saved as diffusers saves it
    (unet_in_channels=9: an inpainting UNet, latents + mask + masked-image latents in)."""
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(make_tokenizer_dir(tmp / "tok")))
    tokenizer_2 = transformers.CLIPTokenizer.from_pretrained(str(make_tokenizer_dir(tmp / "tok2", pad_token="!")))
    torch.manual_seed(0)
    common = dict(vocab_size=len(tokenizer), max_position_embeddings=77, num_hidden_layers=3, num_attention_heads=4,
                  eos_token_id=2)  # (as SDXL's configs: pooled at the largest id, the end-of-text token)
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        hidden_size=32, intermediate_size=64, hidden_act="quick_gelu", **common))
    text_encoder_2 = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
        hidden_size=48, intermediate_size=96, hidden_act="gelu", projection_dim=40, **common))
    vae = diffusers.AutoencoderKL(
        block_out_channels=(32, 64), layers_per_block=1, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    unet = diffusers.UNet2DConditionModel(
        sample_size=SIZE // 2, in_channels=unet_in_channels, out_channels=4, block_out_channels=(32, 64),
        layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32 + 48, attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=40 + 6 * 8)
    # Euler "leading" as SDXL base's scheduler_config.json, which also says clip_sample and set_alpha_to_one false:
    # another scheduler built from this config (DDIM) reads them, here and in diffusers, instead of DDIM's defaults
    scheduler = diffusers.EulerDiscreteScheduler.from_config(dict(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading",
        clip_sample=False, set_alpha_to_one=False))
    pipe = diffusers.StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                               tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet,
                                               scheduler=scheduler)
    pipe.save_pretrained(tmp / "sdxl")
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(tmp / "sdxl", local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe, tmp / "sdxl"


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    ref, path = sdxl_reference(tmp_path_factory.mktemp("sdxl"))
    return ref, StableDiffusion.from_pretrained(path)


@pytest.fixture(scope="module")
def sdxl_inpainting(tmp_path_factory):
    """(diffusers' pipeline, ours) with a 9-channel UNet (SDXL inpainting 0.1's layout)."""
    ref, path = sdxl_reference(tmp_path_factory.mktemp("sdxl_inpainting"), unet_in_channels=9)
    return ref, StableDiffusion.from_pretrained(path)


def sdxl_expected(ref, sampler, negative, seed=42):
    ref.scheduler = SCHEDULERS[sampler].from_config(ref.scheduler.config)
    return ref("a large red circle in the center", negative_prompt=negative or None, num_inference_steps=6,
               guidance_scale=7.5, height=SIZE, width=SIZE, output_type="pil",
               generator=torch.Generator("cpu").manual_seed(seed)).images[0]


@pytest.mark.parametrize("sampler", ["euler", "ddim", "dpmpp_2m"])
@pytest.mark.parametrize("negative", ["blurry", ""])
def test_sdxl_txt2img_equals_diffusers(sdxl, sampler, negative):
    ref, pipe = sdxl
    assert ref.config.force_zeros_for_empty_prompt and pipe.native_size == SIZE
    expected = sdxl_expected(ref, sampler, negative)
    (got,) = pipe.txt2img("a large red circle in the center", negative_prompt=negative, steps=6, guidance_scale=7.5,
                          sampler=sampler, seed=42)
    diff = np.abs(pixels(expected) - pixels(got)).max()
    assert pixels(got).std() > 1  # a real image, not a constant
    assert diff <= 2, f"{sampler}, negative {negative!r}: max pixel difference {diff}/255"
    print(f"\nSDXL {sampler}, negative {negative!r}: max pixel difference {diff}/255")


def test_sdxl_empty_negative_is_zeros_and_the_native_copy_is_the_same_model(sdxl, tmp_path):
    from model.weights import load, save_native

    ref, pipe = sdxl
    context, pooled = pipe.encode_prompts(["", "a cat"], negative=True)
    assert not context[0].any() and not pooled[0].any() and context[1].any()  # "" as a negative prompt: zeros
    context, pooled = pipe.encode_prompts([""])                               # as a prompt: the encoded text
    assert context.shape == (1, 77, 32 + 48) and pooled.shape == (1, 40) and context.any()

    save_native(load(pipe.source), tmp_path / "native")
    native = StableDiffusion.from_pretrained(tmp_path / "native")
    assert native.conditioner.dual and native.conditioner.zeros_for_empty_negative
    a = pipe.txt2img("a blue square", steps=4, seed=3, sampler="euler")[0]
    b = native.txt2img("a blue square", steps=4, seed=3, sampler="euler")[0]
    assert np.array_equal(pixels(a), pixels(b))



def test_sdxl_a_requests_image_does_not_depend_on_its_batch(sdxl):
    from model import Request

    _, pipe = sdxl
    alone = pipe.generate([Request("a red circle", "", seed=11, guidance_scale=7.5)], steps=4, sampler="euler")[0][0]
    batch = pipe.generate([Request("a green square", "blurry", seed=1, guidance_scale=3.0),
                           Request("a red circle", "", seed=11, guidance_scale=7.5),
                           Request("a white triangle", seed=2, guidance_scale=1.0, num_images=2)],
                          steps=4, sampler="euler")
    assert np.abs(pixels(alone) - pixels(batch[1][0])).max() <= 1
    assert np.abs(pixels(alone) - pixels(batch[0][0])).max() > 1  # different requests really differ


def test_sdxl_img2img_equals_diffusers(sdxl):
    """As diffusers, the input's latents are a sample of the VAE posterior drawn from the request's generator
    before its noise (one sample a request, shared by its images)."""
    from PIL import Image

    ref, pipe = sdxl
    img2img = diffusers.StableDiffusionXLImg2ImgPipeline(**ref.components)
    img2img.set_progress_bar_config(disable=True)
    img2img.scheduler = diffusers.EulerDiscreteScheduler.from_config(ref.scheduler.config)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    for negative, n in (("blurry", 1), ("", 2)):
        expected = img2img("a blue square", image=image, strength=0.6, num_inference_steps=10, guidance_scale=5.0,
                           negative_prompt=negative or None, num_images_per_prompt=n,
                           generator=torch.Generator("cpu").manual_seed(3)).images
        got = pipe.img2img(image, "a blue square", negative_prompt=negative, strength=0.6, steps=10,
                           guidance_scale=5.0, seed=3, sampler="euler", num_images=n)
        diffs = [np.abs(pixels(e) - pixels(g)).max() for e, g in zip(expected, got)]
        assert len(got) == n and max(diffs) <= 2, diffs
        print(f"\nSDXL img2img, negative {negative!r}, {n} image(s): max pixel difference {max(diffs)}/255")


@pytest.mark.parametrize("strength", [1.0, 0.6])
@pytest.mark.parametrize("sampler", ["euler", "ddim", "dpmpp_2m", "euler_a"])
@pytest.mark.parametrize("in_channels", [4, 9])
def test_sdxl_inpaint_equals_diffusers(sdxl, request, in_channels, sampler, strength):
    """As diffusers' StableDiffusionXLInpaintPipeline, which draws and blends as the SD 1.x one (test_pipeline's
    test_inpaint_equals_diffusers): inside the mask within 2/255, outside it the input itself (inpaint_difference
    says how, and why the mask lies on the latent grid)."""
    from test_pipeline import inpaint_difference

    ref, pipe = sdxl if in_channels == 4 else request.getfixturevalue("sdxl_inpainting")
    diff = inpaint_difference(diffusers.StableDiffusionXLInpaintPipeline, ref, pipe, sampler, strength)
    print(f"\nSDXL inpaint, {in_channels}-channel UNet, {sampler}, strength {strength}: "
          f"max pixel difference inside the mask {diff}/255")
    assert diff <= 2, f"{in_channels}-channel UNet, {sampler}, strength {strength}: {diff}/255"


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_fp16_on_the_cpu_runs_and_sdxls_vae_stays_fp32(family, sd2, sdxl):
    """fp16 weights run on the CPU without a dtype error; SDXL's VAE (force_upcast, as its config says) is kept in
    fp32 as diffusers' SDXL pipelines keep it, SD 2.x's follows the model (diffusers' SD pipelines ignore the flag).
    The fp16 image stays close to the fp32 one."""
    _, pipe32 = sd2 if family == "sd2" else sdxl
    pipe = StableDiffusion.from_pretrained(pipe32.source, dtype=torch.float16)
    assert pipe.dtype == torch.float16 and pipe.vae.config.force_upcast
    assert pipe.vae_dtype == (torch.float32 if family == "sdxl" else torch.float16)
    (half,) = pipe.txt2img("a red circle", steps=4, seed=5, sampler="euler")
    (full,) = pipe32.txt2img("a red circle", steps=4, seed=5, sampler="euler")
    diff = np.abs(pixels(half) - pixels(full))
    assert pixels(half).std() > 1 and diff.mean() < 4, (diff.max(), diff.mean())


def test_sdxl_micro_conditioning_equals_diffusers(sdxl):
    """original_size, crops_coords_top_left, target_size and the negative ones reach the UNet as diffusers sends
    them; two requests with different ones share a batch and each gets its own image."""
    from model import Request

    ref, pipe = sdxl
    micro = dict(original_size=(64, 48), crops_coords_top_left=(4, 8), target_size=(40, 24),
                 negative_original_size=(16, 16), negative_crops_coords_top_left=(2, 0), negative_target_size=(32, 32))
    ref.scheduler = diffusers.EulerDiscreteScheduler.from_config(ref.scheduler.config)
    expected = ref("a large red circle", negative_prompt="blurry", num_inference_steps=6, guidance_scale=7.5,
                   height=SIZE, width=SIZE, generator=torch.Generator("cpu").manual_seed(42), **micro).images[0]
    (got,) = pipe.txt2img("a large red circle", negative_prompt="blurry", steps=6, guidance_scale=7.5,
                          sampler="euler", seed=42, **micro)
    default = pipe.txt2img("a large red circle", negative_prompt="blurry", steps=6, guidance_scale=7.5,
                           sampler="euler", seed=42)[0]
    assert np.abs(pixels(expected) - pixels(got)).max() <= 2
    assert np.abs(pixels(default) - pixels(got)).max() > 2  # the numbers matter
    batch = pipe.generate([Request("a large red circle", "blurry", seed=42, **micro),
                           Request("a large red circle", "blurry", seed=42)], steps=6, sampler="euler")
    assert np.abs(pixels(batch[0][0]) - pixels(got)).max() <= 1
    assert np.abs(pixels(batch[1][0]) - pixels(default)).max() <= 1
    with pytest.raises(ValueError, match="original_size must be two integers"):
        pipe.txt2img("x", steps=1, original_size=(0, 64))


def test_sdxl_served_unchanged_with_its_micro_conditioning_fields(sdxl):
    """The service serves SDXL as any model: POST /txt2img at its native size, and the native API's SDXL fields
    (original_size, crops_coords_top_left, target_size, negative_*) give the image the Python API gives, in
    JSON (/txt2img) and as multipart form fields (/img2img: `original_size=64,48`)."""
    import io

    import httpx
    from PIL import Image

    from service.api import create_app
    from service.settings import Settings
    from test_service_http import Server

    _, pipe = sdxl
    micro = dict(original_size=[64, 48], crops_coords_top_left=[4, 8], target_size=[40, 24])
    with Server(create_app(Settings(weights=str(pipe.source)), pipe=pipe)) as server, \
            httpx.Client(base_url=server.url, timeout=120) as c:
        r = c.post("/txt2img", json={"prompt": "a red circle", "seed": 9, "steps": 3, "sampler": "euler", **micro})
        assert r.status_code == 200, r.text
        served = Image.open(io.BytesIO(r.content))
        assert served.size == (pipe.native_size, pipe.native_size)
        (direct,) = pipe.txt2img("a red circle", seed=9, steps=3, sampler="euler",
                                 **{k: tuple(v) for k, v in micro.items()})
        assert np.abs(pixels(served) - pixels(direct)).max() <= 1
        bad = c.post("/txt2img", json={"prompt": "x", "original_size": [0, 64]})
        assert bad.status_code == 422 and "original_size" in bad.json()["detail"]

        init = Image.fromarray(np.random.default_rng(1).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
        buf = io.BytesIO()
        init.save(buf, format="PNG")
        common = {"prompt": "a red circle", "seed": "9", "steps": "3", "sampler": "euler", "strength": "0.6"}
        form = {**common, "original_size": "64,48", "crops_coords_top_left": "[4, 8]", "target_size": "40,24"}
        r = c.post("/img2img", data=form, files={"image": ("in.png", buf.getvalue())})
        assert r.status_code == 200, r.text
        served = Image.open(io.BytesIO(r.content))
        (direct,) = pipe.img2img(init, "a red circle", strength=0.6, seed=9, steps=3, sampler="euler",
                                 **{k: tuple(v) for k, v in micro.items()})
        (plain,) = pipe.img2img(init, "a red circle", strength=0.6, seed=9, steps=3, sampler="euler")
        assert np.abs(pixels(served) - pixels(direct)).max() <= 1
        assert np.abs(pixels(direct) - pixels(plain)).max() > 1  # (the fields reached the model: they change it)
        bad = c.post("/img2img", data={**common, "target_size": "40"}, files={"image": ("in.png", buf.getvalue())})
        assert bad.status_code == 422 and "target_size must be two integers" in bad.json()["detail"]
