"""
model/pipeline.py: the whole txt2img of a random-initialised diffusers StableDiffusionPipeline, saved
to disk and loaded here, gives the same PNG within 2/255 for the same seed, steps, guidance and sampler;
img2img at strength 0 returns its input up to the VAE round trip; inpainting leaves every pixel outside
the mask unchanged and, inside it, equals diffusers' StableDiffusionInpaintPipeline (4- and 9-channel UNets,
strength 1 and 0.6); a request's image does not depend on its batch; bad arguments are named.
"""

import io
import math

import diffusers
import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from model import Cancelled, Request, StableDiffusion
from model.pnginfo import png_bytes, read_parameters
from tokenizer_fixtures import make_tokenizer_dir

SIZE = 32  # pixels; the tiny VAE has two levels, so latents are 16x16
SCHEDULERS = {
    "ddim": diffusers.DDIMScheduler,
    "euler": diffusers.EulerDiscreteScheduler,
    "dpmpp_2m": diffusers.DPMSolverMultistepScheduler,
    "euler_a": diffusers.EulerAncestralDiscreteScheduler,
}


def tiny_reference(tmp, unet_in_channels=4):
    """A small StableDiffusionPipeline with diffusers' default random init, saved as diffusers saves it."""
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(make_tokenizer_dir(tmp / "tok")))
    torch.manual_seed(0)
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77))
    vae = diffusers.AutoencoderKL(
        block_out_channels=(32, 64), layers_per_block=1, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    unet = diffusers.UNet2DConditionModel(
        sample_size=SIZE // 2, in_channels=unet_in_channels, out_channels=4, block_out_channels=(32, 64),
        layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64, attention_head_dim=8)
    scheduler = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(tmp / "sd")
    # read back from disk, so both sides see the same scheduler_config.json
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tmp / "sd", local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe, tmp / "sd"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return tiny_reference(tmp_path_factory.mktemp("pipe"))


@pytest.fixture(scope="module")
def pipe(reference):
    return StableDiffusion.from_pretrained(reference[1])


@pytest.fixture(scope="module")
def inpainting(tmp_path_factory):
    """(diffusers' pipeline, ours) with a 9-channel UNet (sd-v1-5-inpainting's layout)."""
    ref, path = tiny_reference(tmp_path_factory.mktemp("inpainting"), unet_in_channels=9)
    return ref, StableDiffusion.from_pretrained(path)


def pipelines(in_channels, reference, pipe, request):
    """(diffusers' pipeline, ours) with a 4-channel UNet or a 9-channel inpainting one."""
    return (reference[0], pipe) if in_channels == 4 else request.getfixturevalue("inpainting")


def pixels(img):
    return np.asarray(img.convert("RGB")).astype(np.int16)


def test_native_size_and_metadata(pipe):
    (img,) = pipe.txt2img("a red circle", steps=2, seed=5)
    assert img.size == (SIZE, SIZE)
    params = img.info["generation"]
    assert params["seed"] == 5 and params["steps"] == 2 and params["sampler"] == "ddim"
    text = read_parameters(png_bytes(img, params))
    assert text.startswith("a red circle\n") and "Seed: 5" in text and "Size: 32x32" in text


@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp_2m"])
@pytest.mark.parametrize("guidance", [1.0, 7.5])
def test_txt2img_equals_diffusers(reference, pipe, sampler, guidance):
    ref, _ = reference
    ref.scheduler = SCHEDULERS[sampler].from_config(ref.scheduler.config)
    expected = ref("a large red circle in the center", negative_prompt="blurry", num_inference_steps=6,
                   guidance_scale=guidance, height=SIZE, width=SIZE, output_type="pil",
                   generator=torch.Generator("cpu").manual_seed(42)).images[0]
    (got,) = pipe.txt2img("a large red circle in the center", negative_prompt="blurry", steps=6,
                          guidance_scale=guidance, sampler=sampler, seed=42, width=SIZE, height=SIZE)
    diff = np.abs(pixels(expected) - pixels(got)).max()
    assert pixels(got).std() > 1  # a real image, not a constant
    assert diff <= 2, f"{sampler} g={guidance}: max pixel difference {diff}/255"


def test_num_images_share_one_draw_like_diffusers(reference, pipe):
    ref, _ = reference
    ref.scheduler = diffusers.DDIMScheduler.from_config(ref.scheduler.config)
    expected = ref("a blue square", num_inference_steps=4, num_images_per_prompt=3, height=SIZE, width=SIZE,
                   generator=torch.Generator("cpu").manual_seed(7)).images
    got = pipe.txt2img("a blue square", steps=4, seed=7, num_images=3)
    assert len(got) == 3
    for e, g in zip(expected, got):
        assert np.abs(pixels(e) - pixels(g)).max() <= 2


def test_batch_invariance(pipe):
    """A request alone and the same request batched with three others give the same image."""
    alone = pipe.generate([Request("a red circle", seed=11, guidance_scale=7.5)], steps=5, sampler="euler_a")[0][0]
    others = [Request("a green square", seed=1, guidance_scale=3.0),
              Request("a white triangle", "red", seed=2, guidance_scale=1.0, num_images=2),
              Request("a black circle", seed=3, guidance_scale=9.0)]
    batched = pipe.generate([others[0], Request("a red circle", seed=11, guidance_scale=7.5), *others[1:]],
                            steps=5, sampler="euler_a")
    assert [len(b) for b in batched] == [1, 1, 2, 1]
    assert np.abs(pixels(alone) - pixels(batched[1][0])).max() <= 1
    assert np.abs(pixels(alone) - pixels(batched[0][0])).max() > 1  # different requests really differ


def test_guidance_one_skips_the_unconditional_pass(pipe):
    calls = []
    hook = pipe.unet.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    try:
        pipe.txt2img("a circle", steps=2, guidance_scale=1.0, num_images=2)
        pipe.txt2img("a circle", steps=2, guidance_scale=7.5, num_images=2)
    finally:
        hook.remove()
    assert calls == [2, 2, 4, 4]


def test_img2img_strength_zero_returns_the_input(pipe):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    (out,) = pipe.img2img(image, "anything", strength=0.0, steps=10)
    roundtrip = pipe.decode_latents(pipe.encode_images(torch.stack([torch.from_numpy(pixels(image)).permute(2, 0, 1)
                                                                   .float() / 127.5 - 1])))
    expected = ((roundtrip[0].permute(1, 2, 0).numpy() + 1) * 127.5).round()
    assert np.abs(pixels(out) - expected).max() <= 1


def test_img2img_equals_diffusers(reference, pipe):
    """The input's latents are a sample of the VAE posterior from the request's generator, drawn before its noise,
    as diffusers' StableDiffusionImg2ImgPipeline draws them: the same image for the same seed."""
    ref, _ = reference
    img2img = diffusers.StableDiffusionImg2ImgPipeline(**ref.components)
    img2img.set_progress_bar_config(disable=True)
    img2img.scheduler = diffusers.DDIMScheduler.from_config(ref.scheduler.config)
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    expected = img2img("a blue square", image=image, strength=0.6, num_inference_steps=10, guidance_scale=5.0,
                       negative_prompt="blurry", num_images_per_prompt=2,
                       generator=torch.Generator("cpu").manual_seed(3)).images
    got = pipe.img2img(image, "a blue square", negative_prompt="blurry", strength=0.6, steps=10, guidance_scale=5.0,
                       seed=3, num_images=2)
    assert max(np.abs(pixels(e) - pixels(g)).max() for e, g in zip(expected, got)) <= 2


def test_img2img_strength_picks_the_start_step(pipe):
    """As in diffusers: strength s of n steps runs the last int(n * s) of them."""
    image = Image.new("RGB", (SIZE, SIZE), (200, 30, 30))
    for strength, expected in [(0.2, 2), (0.55, 5), (1.0, 10)]:
        seen = []
        pipe.img2img(image, "x", strength=strength, steps=10, callback=lambda i, n: seen.append(n))
        assert seen == [expected] * expected


@pytest.mark.parametrize("in_channels", [4, 9])
def test_inpaint_keeps_every_pixel_outside_the_mask(reference, pipe, request, in_channels):
    """With a mask whose edges cut through latent cells (the tiny VAE's are 2x2 pixels; real ones 8x8), every
    masked pixel is repainted (its cell is, as any cell with a masked pixel) and every other pixel is the input's.
    At strength 0 the masked pixels are the input through the VAE, as img2img's at strength 0."""
    _, pipe = pipelines(in_channels, reference, pipe, request)
    assert pipe.is_inpainting_model == (in_channels == 9)
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
    mask[5:13, 17:31] = 255  # odd first rows and columns, even last ones: off the 2-pixel grid on every edge
    (out,) = pipe.inpaint(image, Image.fromarray(mask), "a yellow square", steps=4, seed=3)
    outside = mask == 0
    assert np.array_equal(pixels(out)[outside], pixels(image)[outside])
    assert (pixels(out) != pixels(image)).any(-1)[~outside].all()  # every masked pixel repainted
    (through_vae,) = pipe.inpaint(image, Image.fromarray(mask), "x", strength=0.0, steps=4)
    (img2img,) = pipe.img2img(image, "x", strength=0.0, steps=4)
    assert np.array_equal(pixels(through_vae)[~outside], pixels(img2img)[~outside])
    assert np.array_equal(pixels(through_vae)[outside], pixels(image)[outside])


# A mask whose edges lie on the 8-pixel grid, so on the latent grid of every VAE here (2x2-pixel cells for the
# tiny one, 8x8 for real ones): each latent cell is masked in all of its pixels or in none, where our rule (a cell
# is repainted if any of its pixels is masked) and diffusers' (the cell takes its nearest pixel's value) agree.
GRID_MASK = np.zeros((SIZE, SIZE), dtype=np.uint8)
GRID_MASK[8:24, 16:32] = 255


def inpaint_difference(inpaint_pipeline, ref, pipe, sampler, strength, num_images=2):
    """Inpaint one random image with diffusers' `inpaint_pipeline` (built from ref's components, its scheduler for
    `sampler` from ref's scheduler config, as the txt2img and img2img parity tests build theirs) and with ours,
    same seed and arguments, GRID_MASK as the mask. Outside the mask we paste the input back where diffusers
    returns its VAE's reconstruction: there every pixel of ours must be the input's own; inside the mask the two
    are compared. Returns the max pixel difference inside the mask, over the request's images."""
    theirs = inpaint_pipeline(**ref.components)
    theirs.set_progress_bar_config(disable=True)
    theirs.scheduler = SCHEDULERS[sampler].from_config(ref.scheduler.config)
    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    mask = Image.fromarray(GRID_MASK)
    expected = theirs("a blue square", image=image, mask_image=mask, strength=strength, num_inference_steps=6,
                      guidance_scale=5.0, negative_prompt="blurry", num_images_per_prompt=num_images, height=SIZE,
                      width=SIZE, generator=torch.Generator("cpu").manual_seed(3)).images
    got = pipe.inpaint(image, mask, "a blue square", strength=strength, negative_prompt="blurry", steps=6,
                       guidance_scale=5.0, sampler=sampler, seed=3, num_images=num_images)
    inside = GRID_MASK > 0
    assert len(got) == len(expected) == num_images
    for g in got:
        assert np.array_equal(pixels(g)[~inside], pixels(image)[~inside])
        assert pixels(g)[inside].std() > 1  # repainted: a real image, not a constant
    return max(np.abs(pixels(e) - pixels(g))[inside].max() for e, g in zip(expected, got))


@pytest.mark.parametrize("strength", [1.0, 0.6])
@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp_2m", "euler_a"])
@pytest.mark.parametrize("in_channels", [4, 9])
def test_inpaint_equals_diffusers(reference, pipe, request, in_channels, sampler, strength):
    """As diffusers' StableDiffusionInpaintPipeline: from the request's generator a posterior sample of the image's
    latents (where they are used: a 4-channel UNet, or strength < 1), the initial noise, then a posterior sample of
    the masked image's latents (the 9-channel UNet's input; drawn for a 4-channel UNet too, as euler_a's step
    noise, drawn after it, shows); a 4-channel UNet's known region is put back on the image's latents noised to
    the next step after every step, and on the clean ones after the last. Inside the mask within 2/255 (see
    inpaint_difference; outside it ours is the input itself)."""
    ref, ours = pipelines(in_channels, reference, pipe, request)
    diff = inpaint_difference(diffusers.StableDiffusionInpaintPipeline, ref, ours, sampler, strength)
    print(f"\nSD 1.x inpaint, {in_channels}-channel UNet, {sampler}, strength {strength}: "
          f"max pixel difference inside the mask {diff}/255")
    assert diff <= 2, f"{in_channels}-channel UNet, {sampler}, strength {strength}: {diff}/255"


@pytest.mark.parametrize("in_channels", [4, 9])
def test_inpaint_a_requests_image_does_not_depend_on_its_batch(reference, pipe, request, in_channels):
    """Two requests with different images, masks, prompts and seeds in one batch: each gets the images it gets
    alone (its posterior samples and its noise come from its own generator)."""
    _, pipe = pipelines(in_channels, reference, pipe, request)
    rng = np.random.default_rng(4)
    images = [Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)) for _ in range(2)]
    masks = [np.zeros((SIZE, SIZE), dtype=np.uint8) for _ in range(2)]
    masks[0][:16] = 255
    masks[1][5:29, 3:17] = 255
    requests = [Request("a red circle", "blurry", seed=5, guidance_scale=7.5, image=images[0],
                        mask=Image.fromarray(masks[0])),
                Request("a green square", seed=6, guidance_scale=3.0, num_images=2, image=images[1],
                        mask=Image.fromarray(masks[1]))]
    batch = pipe.generate(requests, mode="inpaint", steps=4, sampler="euler_a", strength=0.6)
    alone = [pipe.generate([r], mode="inpaint", steps=4, sampler="euler_a", strength=0.6)[0] for r in requests]
    assert [len(b) for b in batch] == [1, 2]
    for a, b in zip(alone, batch):
        for x, y in zip(a, b):
            assert np.abs(pixels(x) - pixels(y)).max() <= 1
    assert np.abs(pixels(batch[1][0]) - pixels(images[1])).max() > 1  # repainted


def test_inpaint_mask_defaults_to_transparent_pixels(pipe):
    rgba = np.full((SIZE, SIZE, 4), 255, dtype=np.uint8)
    rgba[..., :3] = (10, 120, 240)
    rgba[:16, :16, 3] = 0  # top-left quadrant transparent: repaint it
    (out,) = pipe.inpaint(Image.fromarray(rgba, "RGBA"), None, "a red circle", steps=3)
    kept = np.ones((SIZE, SIZE), bool)
    kept[:16, :16] = False
    assert np.all(pixels(out)[kept] == (10, 120, 240))
    with pytest.raises(ValueError, match="mask is required"):
        pipe.inpaint(Image.new("RGB", (SIZE, SIZE)), None, "x", steps=2)


def test_cancel_between_steps(pipe):
    seen = []

    def callback(step, total):
        seen.append((step, total))
        if step == 2:
            raise Cancelled()

    with pytest.raises(Cancelled):
        pipe.txt2img("a circle", steps=5, callback=callback)
    assert seen == [(1, 5), (2, 5)]


def test_repeated_prompts_are_encoded_once(pipe):
    pipe._text_cache.clear()
    calls = []
    hook = pipe.text_encoder.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    try:
        pipe.generate([Request("a", "", seed=1), Request("a", "", seed=2), Request("b", "", seed=3)], steps=1)
        pipe.txt2img("a", steps=1)
    finally:
        hook.remove()
    assert calls == [2, 1]  # "a" and "b" in one call, then "" for the negative; then all cached


@pytest.mark.parametrize("kwargs, match", [
    (dict(width=100), "width must be a positive multiple of 8"),
    (dict(height=0), "height must be a positive multiple of 8"),
    (dict(steps=0), r"steps must be an integer in \[1, 1000\]"),
    (dict(sampler="plms"), "sampler must be one of ddim, ddpm, euler, euler_a, dpmpp_2m"),
    (dict(guidance_scale=math.nan), "guidance_scale must be a finite number >= 0"),
    (dict(guidance_scale=-1.0), "guidance_scale must be a finite number >= 0"),
    (dict(num_images=0), "num_images must be an integer >= 1"),
    (dict(seed=-5), "seed must be an integer in"),
])
def test_bad_arguments_are_named(pipe, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pipe.txt2img("a circle", **{"steps": 2, **kwargs})


def test_bad_image_arguments_are_named(pipe):
    image = Image.new("RGB", (SIZE, SIZE))
    with pytest.raises(ValueError, match=r"strength must be a number in \[0, 1\], got 1.5"):
        pipe.img2img(image, "x", strength=1.5, steps=2)
    with pytest.raises(ValueError, match="mask size 16x16 must equal the image size 32x32"):
        pipe.inpaint(image, Image.new("L", (16, 16)), "x", steps=2)


def test_png_round_trip_bytes_are_a_real_png(pipe):
    (img,) = pipe.txt2img("a circle", steps=1)
    data = png_bytes(img, img.info["generation"])
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert Image.open(io.BytesIO(data)).size == (SIZE, SIZE)
