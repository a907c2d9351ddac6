"""
Speed levers: they change how the networks run, never what they compute (the parity tests hold with them on)
nor their state_dict keys (checkpoints load and save the same).

    pipe.optimize(channels_last=True)            # StableDiffusion.optimize calls optimize_unet / optimize_vae
    optimize_unet(unet, compile=True)

Which levers are worth it was measured against diffusers (bench/unet_step.py, bench/txt2img_vs_diffusers.py);
docs/performance.md has the numbers.
"""

import torch
import torch.nn as nn


def _channels_last(module: nn.Module) -> nn.Module:
    # 4-d weights (convs) in NHWC order: oneDNN (CPU) and cuDNN (tensor cores) convolve NHWC without reordering
    # every activation; a channels_last input then stays channels_last through the network.
    return module.to(memory_format=torch.channels_last)


def _compile(module: nn.Module) -> nn.Module:
    # nn.Module.compile compiles in place: module.state_dict() keeps its keys (torch.compile(module) would
    # prefix them with "_orig_mod."). The first call of each new input shape pays for compilation.
    device = next(module.parameters()).device
    if device.type == "cpu":
        import torch._inductor.config as inductor_config

        # weights become constants of the compiled graph, so inductor can prepack them for oneDNN once
        # instead of reordering them on every call. Only valid while the weights do not change: inference.
        inductor_config.freezing = True
    module.compile()
    return module


def optimize_unet(unet: nn.Module, *, channels_last: bool = False, compile: bool = False) -> nn.Module:
    if channels_last:
        _channels_last(unet)
    if compile:
        _compile(unet)
    return unet


def optimize_vae(vae: nn.Module, *, channels_last: bool = False) -> nn.Module:
    if channels_last:
        _channels_last(vae)
    return vae
