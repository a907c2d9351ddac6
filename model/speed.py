"""
Speed levers: they change how the networks run, never what they compute (the parity tests hold with them on)
nor their state_dict keys (checkpoints load and save the same).

    pipe.optimize()                              # the default levers: prepacked convolutions (on CPU)
    pipe.optimize(channels_last=True)            # StableDiffusion.optimize calls optimize_unet / optimize_vae
    optimize_unet(unet, compile=True)

Which levers are worth it was measured against diffusers (bench/unet_step.py, bench/txt2img_vs_diffusers.py);
docs/performance.md has the numbers.
"""

import ctypes
import functools
import sys

import torch
import torch.nn as nn


class PrepackedConv2d(nn.Module):
    """A k x k (k > 1) nn.Conv2d for CPU inference whose weight is kept in oneDNN's blocked layout.

    Eager nn.Conv2d hands oneDNN a plain OIHW weight, which oneDNN reorders into its blocked layout on every
    call. For SD's 1280-channel 3x3 convolutions (59 MB of weights each) on 8x8 and 4x4 latents that reorder
    costs more than the convolution itself (one call, 2x1280x4x4: 23.5 ms eager, 5.5 ms prepacked). Reordered
    once here, and the plain copy is not kept, so the model takes no more memory.
    1x1 convolutions are left alone: prepacked they ran 17x slower (bench/conv_prepack.py).

    Inference only (the oneDNN op has no backward). state_dict() still holds the plain `weight` under the same
    key and load_state_dict() repacks, so checkpoints load and save as before.
    """

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.in_channels, self.out_channels, self.kernel_size = conv.in_channels, conv.out_channels, conv.kernel_size
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach(), requires_grad=False)
        self._pack(conv.weight.detach())

    @staticmethod
    def applies_to(conv: nn.Module) -> bool:
        w = conv.weight
        return (type(conv) is nn.Conv2d and conv.kernel_size != (1, 1) and conv.padding_mode == "zeros"
                and not isinstance(conv.padding, str) and w.device.type == "cpu" and w.dtype == torch.float32
                and prepacking_works())

    def _pack(self, weight: torch.Tensor) -> None:
        # [out, in/groups, kh, kw] plain -> the same logical shape in oneDNN's opaque blocked layout
        self.packed_weight = torch._C._nn.mkldnn_reorder_conv2d_weight(
            weight.float().contiguous().to_mkldnn(), list(self.padding), list(self.stride), list(self.dilation),
            self.groups)

    @property
    def weight(self) -> torch.Tensor:
        """A plain copy of the weight (for reading: changing it changes nothing)."""
        return self.packed_weight.to_dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, in, H, W] -> [B, out, H', W'], the same convolution as F.conv2d, without the weight reorder
        return torch.ops.mkldnn._convolution_pointwise(
            x, self.packed_weight, self.bias, list(self.padding), list(self.stride), list(self.dilation),
            self.groups, "none", [], "")

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.weight
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "weight"
        if key in state_dict:
            weight = state_dict[key]
            if weight.shape != self.packed_weight.shape:
                error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(weight.shape)}, "
                                  f"the shape in current model is {tuple(self.packed_weight.shape)}.")
            else:
                self._pack(weight.detach().cpu())
        elif strict:
            missing_keys.append(key)
        rest = {k: v for k, v in state_dict.items() if k.startswith(prefix) and k != key}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _apply(self, fn, recurse=True):
        # .to() / .float() / .to(memory_format=...): fine while the weight stays CPU float32; anything else
        # (another device or dtype) must happen before prepacking.
        moved = fn(self.weight)
        if moved.device.type != "cpu" or moved.dtype != torch.float32:
            raise RuntimeError(f"PrepackedConv2d holds a CPU float32 weight in oneDNN's layout; move or cast the "
                               f"model before prepacking (got {moved.device.type} {moved.dtype})")
        self._pack(moved)
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, prepacked")


@functools.cache
def prepacking_works() -> bool:
    """Whether this torch build can prepack and run a convolution and get F.conv2d's answer (oneDNN builds for
    x86 can; a build without oneDNN, or a CPU where the op is missing, cannot, and then nothing is prepacked)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        with torch.random.fork_rng(devices=[]), torch.inference_mode():     # leaves the caller's RNG alone
            conv, x = nn.Conv2d(3, 4, 3, padding=1), torch.randn(1, 3, 5, 5)
            return torch.allclose(PrepackedConv2d(conv)(x), conv(x), atol=1e-5)
    except (RuntimeError, NotImplementedError):
        return False


def prepack_convs(module: nn.Module) -> nn.Module:
    """Replace, in place, every k x k nn.Conv2d of a CPU float32 module by a PrepackedConv2d (same outputs within
    float rounding, same state_dict keys). A no-op on other devices and dtypes, or without oneDNN."""
    # Parents only, never a list holding the convs themselves: each plain weight is freed once it is replaced.
    parents = [m for m in module.modules() if next(m.children(), None) is not None]
    for parent in parents:
        names = [n for n, c in parent.named_children() if isinstance(c, nn.Conv2d) and PrepackedConv2d.applies_to(c)]
        for name in names:
            setattr(parent, name, PrepackedConv2d(getattr(parent, name)))
    _return_freed_memory()
    return module


def _return_freed_memory() -> None:
    # The plain weights just freed are mostly below glibc's mmap threshold, so they went back to malloc's heap,
    # not to the system: without a trim the process keeps about 6% more resident memory (SD 1.5 pipeline:
    # 4773 vs 4484 MiB).
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):   # not glibc (musl, ...): nothing to trim with
            pass


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


def optimize_unet(unet: nn.Module, *, prepack: bool = False, channels_last: bool = False,
                  compile: bool = False) -> nn.Module:
    if channels_last:
        _channels_last(unet)
    if compile:
        _compile(unet)          # on CPU inductor's freezing prepacks the weights itself
    elif prepack:
        prepack_convs(unet)
    return unet


def optimize_vae(vae: nn.Module, *, prepack: bool = False, channels_last: bool = False) -> nn.Module:
    if channels_last:
        _channels_last(vae)
    if prepack:
        prepack_convs(vae)
    return vae
