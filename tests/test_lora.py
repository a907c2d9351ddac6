"""
LoRAs against diffusers (load_lora_weights + set_adapters, PEFT underneath) on small random pipelines, with random
LoRAs the tests write the way their tools save them:

  kohya / sd-scripts   lora_unet_* / lora_te_* names (kohya's: the module path with "_" for "."), lora_down,
                       lora_up, alpha; attention and MLP linears and resnet convolutions (LoCon), text encoder too;
                       SDXL with the original UNet's block names and lora_te1_ / lora_te2_
  diffusers / PEFT     peft adapters on diffusers' own networks, saved by save_lora_weights with their metadata
                       (lora_alpha, alpha_pattern)

txt2img within 2/255 of diffusers, alone and two combined with different weights; a mixed batch gives each request
the image it gets alone; a request without LoRAs is the base model's image, bit for bit.
"""

import diffusers
import numpy as np
import pytest
import torch
from peft import LoraConfig
from PIL import Image
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file

from model import StableDiffusion
from model.lora import LoRAError
from model.pipeline import Request
from model.unet import UNetConfig
from model.weights.original import unet_key_to_original
from test_families import sdxl_reference
from test_pipeline import SIZE, pixels, tiny_reference
from test_weights import RunsCode

PROMPT = "a large red circle in the center"


def image(pipe, ours, loras=None, seed=3, sampler="ddim"):
    """One txt2img image, ours (loras as our `loras=` dict) or diffusers' (adapters set beforehand)."""
    if ours:
        return pixels(pipe.txt2img(PROMPT, negative_prompt="blurry", steps=5, seed=seed, width=SIZE, height=SIZE,
                                   sampler=sampler, loras=loras)[0])
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    return pixels(pipe(PROMPT, negative_prompt="blurry", num_inference_steps=5, guidance_scale=7.5, height=SIZE,
                       width=SIZE, generator=torch.Generator("cpu").manual_seed(seed)).images[0])


def kohya_lora(file, networks, rank=4, alpha=2.0, seed=0, original_names=None):
    """A random kohya LoRA for every linear and conv layer of the attention, MLP and resnet blocks of the given
    diffusers / transformers networks ({kohya prefix: network}), named as sd-scripts names them. original_names:
    {diffusers module path: original UNet path} to name the UNet's layers as SDXL LoRAs do."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for prefix, net in networks.items():
        for path, module in net.named_modules():
            wanted = any(part in path for part in ("attn", "ff.net", "proj_in", "proj_out", "resnets", "mlp"))
            if not wanted or not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                continue
            if prefix == "lora_unet" and original_names:
                path = original_names[path]
            name = f"{prefix}_{path.replace('.', '_')}"
            if isinstance(module, torch.nn.Linear):
                down, up = (rank, module.in_features), (module.out_features, rank)
            else:
                down, up = (rank, module.in_channels, *module.kernel_size), (module.out_channels, rank, 1, 1)
            state[f"{name}.lora_down.weight"] = torch.randn(down, generator=g) * 0.3
            state[f"{name}.lora_up.weight"] = torch.randn(up, generator=g) * 0.3
            state[f"{name}.alpha"] = torch.tensor(alpha)
    save_file(state, str(file))
    return file


def peft_lora(file, folder, seed=1):
    """A random PEFT LoRA on a fresh copy of the diffusers pipeline at folder, saved by save_lora_weights with
    its adapter metadata (rank 4, lora_alpha 8, alpha 2 on to_v: the metadata's alpha_pattern)."""
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    torch.manual_seed(seed)
    unet_config = LoraConfig(r=4, lora_alpha=8, alpha_pattern={"to_v": 2}, init_lora_weights=False,
                             target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1"])
    text_config = LoraConfig(r=2, lora_alpha=2, init_lora_weights=False, target_modules=["q_proj", "fc1"])
    pipe.unet.add_adapter(unet_config)
    pipe.text_encoder.add_adapter(text_config)
    with torch.no_grad():
        for name, p in list(pipe.unet.named_parameters()) + list(pipe.text_encoder.named_parameters()):
            if "lora_B" in name:
                p.normal_(0, 0.3)
    diffusers.StableDiffusionPipeline.save_lora_weights(
        file.parent, weight_name=file.name, unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
        unet_lora_adapter_metadata=unet_config.to_dict(), text_encoder_lora_adapter_metadata=text_config.to_dict())
    return file


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    """(diffusers' pipeline, ours, its folder, {name: LoRA file}) for the small SD 1.x pipeline."""
    tmp = tmp_path_factory.mktemp("lora")
    ref, folder = tiny_reference(tmp)
    files = {"ink": kohya_lora(tmp / "ink.safetensors", {"lora_unet": ref.unet, "lora_te": ref.text_encoder}),
             "pencil": peft_lora(tmp / "pencil.safetensors", folder)}
    return ref, StableDiffusion.from_pretrained(folder), folder, files


def test_kohya_and_peft_loras_equal_diffusers_alone_and_combined(sd1):
    ref, pipe, _, files = sd1
    base = image(pipe, True)
    for name, file in files.items():
        assert pipe.load_lora(file) == name
        ref.load_lora_weights(str(file), adapter_name=name)
    assert np.array_equal(image(pipe, True), base)     # loaded, not asked for: the base model exactly
    cases = [({"ink": 0.8}, ["ink"], [0.8]), ({"pencil": 1.0}, ["pencil"], [1.0]),
             ({"ink": 0.8, "pencil": -0.5}, ["ink", "pencil"], [0.8, -0.5])]
    try:
        for loras, names, weights in cases:
            ref.set_adapters(names, weights)
            want, got = image(ref, False), image(pipe, True, loras)
            diff = np.abs(want - got).max()
            print(f"\nSD 1.x LoRA {loras}: max pixel difference to diffusers {diff}/255, "
                  f"{np.abs(got - base).mean():.1f} mean from the base image")
            assert diff <= 2, (loras, diff)
            assert np.abs(got - base).mean() > 1            # the LoRA did change the image
    finally:
        ref.unload_lora_weights()


def test_a_mixed_batch_gives_each_request_its_image_alone(sd1):
    _, pipe, _, files = sd1
    for file in files.values():
        pipe.load_lora(file)
    requests = [Request(PROMPT, "blurry", seed=5, loras={"ink": 0.8}),
                Request("a blue square", seed=6, loras={"pencil": 0.7, "ink": 0.3}, num_images=2),
                Request(PROMPT, seed=7), Request(PROMPT, seed=8, guidance_scale=1.0, loras={"ink": 1.0})]
    together = pipe.generate(requests, steps=4, sampler="euler_a", width=SIZE, height=SIZE)
    for r, images in zip(requests, together):
        alone = pipe.generate([r], steps=4, sampler="euler_a", width=SIZE, height=SIZE)[0]
        for a, b in zip(alone, images):
            assert np.abs(pixels(a) - pixels(b)).max() <= 1, r
    # the PNG records each LoRA's weight (as a prompt tag) and short hash, as the web UI's "Lora hashes" does
    text = together[0][0].info["parameters"]
    assert text.startswith(PROMPT + " <lora:ink:0.8>") and "Lora hashes: \"ink: " in text


def test_unknown_or_unfitting_loras_are_refused(sd1, tmp_path):
    _, pipe, _, files = sd1
    with pytest.raises(ValueError, match="unknown LoRA 'nope'"):
        pipe.txt2img(PROMPT, steps=1, loras={"nope": 1.0})
    pipe.load_lora(files["ink"])
    with pytest.raises(ValueError, match="weight of 'ink'"):
        pipe.txt2img(PROMPT, steps=1, loras={"ink": "strong"})

    # a LoRA made for a model of other widths names the first layers that do not fit
    wide = {k: torch.cat([v, v], dim=1) if k.endswith("lora_down.weight") else v
            for k, v in load_file(files["ink"]).items()}
    save_file(wide, str(tmp_path / "wide.safetensors"))
    with pytest.raises(LoRAError, match="shapes that do not fit.*lora_down.weight"):
        pipe.load_lora(tmp_path / "wide.safetensors")
    save_file({"lora_unet_no_such_layer.lora_down.weight": torch.zeros(4, 8),
               "lora_unet_no_such_layer.lora_up.weight": torch.zeros(8, 4)}, str(tmp_path / "alien.safetensors"))
    with pytest.raises(LoRAError, match="alien.*layers this model does not have: lora_unet_no_such_layer"):
        pipe.load_lora(tmp_path / "alien.safetensors")
    save_file({"model.diffusion_model.x": torch.zeros(1)}, str(tmp_path / "checkpoint.safetensors"))
    with pytest.raises(LoRAError, match="not a LoRA"):
        pipe.load_lora(tmp_path / "checkpoint.safetensors")
    marker = tmp_path / "PWNED"
    torch.save({"lora_unet_x.lora_down.weight": RunsCode(marker)}, tmp_path / "evil.pt")
    with pytest.raises(LoRAError, match="refused to unpickle"):
        pipe.load_lora(tmp_path / "evil.pt")
    assert not marker.exists()
    assert "wide" not in pipe.adapters.loras and "alien" not in pipe.adapters.loras


def test_an_sdxl_kohya_lora_equals_diffusers(tmp_path):
    """SDXL LoRAs name the UNet's layers as the original UNet does (input_blocks_4_1_...) and the text encoders
    lora_te1_ / lora_te2_."""
    ref, folder = sdxl_reference(tmp_path)
    config = UNetConfig.from_diffusers(dict(ref.unet.config))
    original = {p: unet_key_to_original(p + ".weight", config).removesuffix(".weight")
                for p, m in ref.unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    file = kohya_lora(tmp_path / "xl.safetensors", {"lora_unet": ref.unet, "lora_te1": ref.text_encoder,
                                                    "lora_te2": ref.text_encoder_2}, original_names=original)
    pipe = StableDiffusion.from_pretrained(folder)
    base = image(pipe, True, sampler="euler")
    pipe.load_lora(file)
    ref.load_lora_weights(str(file), adapter_name="xl")
    ref.set_adapters(["xl"], [0.7])
    ref.scheduler = diffusers.EulerDiscreteScheduler.from_config(ref.scheduler.config)
    want = pixels(ref(PROMPT, negative_prompt="blurry", num_inference_steps=5, guidance_scale=7.5, height=SIZE,
                      width=SIZE, generator=torch.Generator("cpu").manual_seed(3)).images[0])
    got = image(pipe, True, {"xl": 0.7}, sampler="euler")
    diff = np.abs(want - got).max()
    print(f"\nSDXL kohya LoRA: max pixel difference to diffusers {diff}/255, "
          f"{np.abs(got - base).mean():.1f} mean from the base image")
    assert diff <= 2 and np.abs(got - base).mean() > 1


def test_the_cli_takes_loras_and_embeddings(sd1, tmp_path):
    """`sd generate --lora FILE:W --embedding FILE` (a subprocess): the image pipe.txt2img gives with
    loras={stem: W} after load_embedding."""
    from test_cli import sd

    _, _, folder, files = sd1
    torch.save({"string_to_param": {"*": torch.randn(2, 64) * 0.5}, "name": "zqstyle", "step": 100},
               tmp_path / "zqstyle.pt")
    prompt = "a large red circle, zqstyle"
    out = sd("generate", "--prompt", prompt, "--steps", 3, "--seed", 4, "--lora", f"{files['ink']}:0.6",
             "--embedding", tmp_path / "zqstyle.pt", "--weights", folder, "--out", tmp_path / "l.png", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    pipe = StableDiffusion.from_pretrained(folder)
    pipe.load_lora(files["ink"])
    pipe.load_embedding(tmp_path / "zqstyle.pt")
    (want,) = pipe.txt2img(prompt, steps=3, seed=4, sampler="ddim", loras={"ink": 0.6})
    diff = np.abs(pixels(Image.open(tmp_path / "l.png")) - pixels(want)).max()
    assert diff <= 1, f"{diff}/255"   # (the CLI turns on the speed levers: within round-off)
    out = sd("generate", "--prompt", "x", "--lora", tmp_path / "missing.safetensors", "--weights", folder,
             cwd=tmp_path)
    assert out.returncode == 2 and "missing.safetensors" in out.stderr
