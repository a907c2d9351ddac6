"""
Speed levers: they change how the networks run, never what they compute (the parity tests hold with them on)
nor their state_dict keys (checkpoints load and save the same).

    pipe.optimize()                     # the default: each conv plain or prepacked, per input shape, as measured here
    pipe.optimize(prepack=True)         # every k x k conv prepacked, whatever it measures
    pipe.optimize(channels_last=True)   # StableDiffusion.optimize calls optimize_unet / optimize_vae
    optimize_unet(unet, compile=True)

Only the measured choice is on by default (model/tuning.py): a lever that wins on one CPU loses on another.
What each lever did on the machines measured is in docs/performance.md (bench/unet_step.py, bench/tuning.py,
bench/txt2img_vs_diffusers.py).
"""

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from .tuning import Fixed, Tuner, release_freed_memory


# optimize(prepack=...) by name, as the benchmarks' --convs takes it
CONVS = {"auto": "auto", "prepack": True, "plain": False}


class TunedConv2d(nn.Module):
    """An nn.Conv2d for CPU float32 inference that runs each input shape the faster of two ways:

        plain       F.conv2d on the plain OIHW weight (oneDNN reorders it into its blocked layout on every call)
        prepacked   the weight kept in oneDNN's blocked layout, run with the op inductor's frozen graphs call

    Which one, per input shape, its `tuner` says (model/tuning.py): a Tuner measures both on the first call of a
    shape; Fixed("prepacked") always prepacks (the `prepack` lever named by hand). The gap either way is large and
    depends on the CPU: prepacked, SD's 1280-channel 3x3 convs on 4x4 latents ran 4x faster on an Intel Xeon, while
    320-640 channels ran 2-5x slower on an AMD EPYC (bench/conv_prepack.py).

    Only the weight forms that some shape uses are kept (both only where shapes disagree), so the model takes no
    more memory than before. Inference only (the oneDNN op has no backward). state_dict() holds the plain
    `weight` under the same key and load_state_dict() takes one, so checkpoints load and save as before.
    """

    def __init__(self, conv: nn.Conv2d, tuner):
        super().__init__()
        self.in_channels, self.out_channels, self.kernel_size = conv.in_channels, conv.out_channels, conv.kernel_size
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach(), requires_grad=False)
        self.tuner = tuner
        self._plain: torch.Tensor | None = conv.weight.detach()
        self._packed = None
        self._used: dict[tuple, str] = {}          # (input shape, layout) -> the form it runs with
        sides = lambda pair: "x".join(map(str, pair))  # noqa: E731
        self._signature = (f"conv2d {self.in_channels}->{self.out_channels} k{sides(self.kernel_size)} "
                           f"s{sides(self.stride)} p{sides(self.padding)} d{sides(self.dilation)} g{self.groups} "
                           f"bias{int(self.bias is not None)}")
        self._keep({tuner.initial})

    @staticmethod
    def applies_to(conv: nn.Module) -> bool:
        w = conv.weight
        return (type(conv) is nn.Conv2d and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
                and w.device.type == "cpu" and w.dtype == torch.float32 and prepacking_works())

    # --- the two forms of the weight ----------------------------------------

    def _keep(self, forms: set) -> None:
        """Hold the weight in exactly these forms ("plain", "prepacked"), converting (losslessly) as needed."""
        forms = forms or {"plain"}
        if "prepacked" in forms and self._packed is None:
            # [out, in/groups, kh, kw] plain -> the same logical shape in oneDNN's opaque blocked layout
            self._packed = torch._C._nn.mkldnn_reorder_conv2d_weight(
                self._plain.float().contiguous().to_mkldnn(), list(self.padding), list(self.stride),
                list(self.dilation), self.groups)
        if "plain" in forms and self._plain is None:
            self._plain = self._packed.to_dense()
        if "plain" not in forms:
            self._plain = None
        if "prepacked" not in forms:
            self._packed = None

    def _replace_weight(self, plain: torch.Tensor) -> None:
        """A new plain weight, held in the same forms as the old one."""
        forms = self.forms
        self._plain, self._packed = plain, None
        self._keep(forms)

    @property
    def weight(self) -> torch.Tensor:
        """The plain weight (a copy when only the packed form is held: changing it changes nothing)."""
        return self._plain if self._plain is not None else self._packed.to_dense()

    @property
    def forms(self) -> set:
        """The forms the weight is held in now."""
        return {name for name, w in (("plain", self._plain), ("prepacked", self._packed)) if w is not None}

    def _conv(self, form: str, x: torch.Tensor) -> torch.Tensor:
        if form == "plain":
            return F.conv2d(x, self._plain, self.bias, self.stride, self.padding, self.dilation, self.groups)
        return torch.ops.mkldnn._convolution_pointwise(
            x, self._packed, self.bias, list(self.padding), list(self.stride), list(self.dilation), self.groups,
            "none", [], "")

    def _try(self, form: str, x: torch.Tensor) -> torch.Tensor:
        self._keep(self.forms | {form})            # both forms, while a new shape is measured
        return self._conv(form, x)

    # --- forward ------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, in, H, W] (NCHW or channels_last) -> [B, out, H', W'], the convolution F.conv2d computes
        layout = "nhwc" if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(
            memory_format=torch.channels_last) else "nchw"
        shape = (tuple(x.shape), layout)
        form = self._used.get(shape)
        if form is not None:
            return self._conv(form, x)
        key = f"{self._signature} in {'x'.join(map(str, x.shape))} {layout} {str(x.dtype).removeprefix('torch.')}"
        form, out = self.tuner.run(key, {"plain": lambda: self._try("plain", x),
                                         "prepacked": lambda: self._try("prepacked", x)})
        self._used[shape] = form
        self._keep(set(self._used.values()))       # the forms no shape uses are freed
        return out

    # --- checkpoints and moves ----------------------------------------------

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.weight
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "weight"
        if key in state_dict:
            weight = state_dict[key]
            want = (self.out_channels, self.in_channels // self.groups, *self.kernel_size)
            if tuple(weight.shape) != want:
                error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(weight.shape)}, "
                                  f"the shape in current model is {want}.")
            else:
                self._replace_weight(weight.detach().cpu().float().clone())
        elif strict:
            missing_keys.append(key)
        rest = {k: v for k, v in state_dict.items() if k.startswith(prefix) and k != key}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _apply(self, fn, recurse=True):
        # .to() / .float() / .to(memory_format=...): fine while the weight stays CPU float32; anything else
        # (another device or dtype) must happen before optimize().
        moved = fn(self.weight)
        if moved.device.type != "cpu" or moved.dtype != torch.float32:
            raise RuntimeError(f"TunedConv2d holds a CPU float32 weight for oneDNN; move or cast the model "
                               f"before optimize() (got {moved.device.type} {moved.dtype})")
        self._replace_weight(moved)
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, forms={sorted(self.forms)}")


@functools.cache
def prepacking_works() -> bool:
    """Whether this torch build can prepack and run a convolution and get F.conv2d's answer (oneDNN builds for
    x86 can; a build without oneDNN, or a CPU where the op is missing, cannot, and then convs stay nn.Conv2d)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        with torch.random.fork_rng(devices=[]), torch.inference_mode():     # leaves the caller's RNG alone
            conv, x = nn.Conv2d(3, 4, 3, padding=1), torch.randn(1, 3, 5, 5)
            return torch.allclose(TunedConv2d(conv, Fixed("prepacked"))(x), conv(x), atol=1e-5)
    except (RuntimeError, NotImplementedError):
        return False


def tune_convs(module: nn.Module, tuner=None) -> nn.Module:
    """Replace, in place, the nn.Conv2d layers of a CPU float32 module by TunedConv2d layers sharing one tuner
    (default: a new measuring Tuner; Fixed("prepacked") prepacks every k x k conv and leaves 1x1 convs alone, as
    prepacked they ran 17-42x slower on both CPUs measured). Same outputs within float round-off, same
    state_dict keys. A no-op on other devices and dtypes, or without oneDNN."""
    tuner = Tuner() if tuner is None else tuner
    fixed = isinstance(tuner, Fixed)
    # Parents only, never a list holding the convs themselves: a weight is freed once no form of it is needed.
    parents = [m for m in module.modules() if next(m.children(), None) is not None]
    for parent in parents:
        names = [n for n, c in parent.named_children() if isinstance(c, nn.Conv2d) and TunedConv2d.applies_to(c)
                 and not (fixed and c.kernel_size == (1, 1))]
        for name in names:
            setattr(parent, name, TunedConv2d(getattr(parent, name), tuner))
    release_freed_memory()     # the plain weights of prepacked convs went back to malloc's heap, not the system
    return module


def prepack_convs(module: nn.Module) -> nn.Module:
    """Every k x k conv prepacked, whatever it measures (the lever named by hand: `--optimize prepack`)."""
    return tune_convs(module, Fixed("prepacked"))


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


def _convs(module: nn.Module, prepack, tuner) -> None:
    if prepack == "auto":
        tune_convs(module, tuner)
    elif prepack:
        prepack_convs(module)


def optimize_unet(unet: nn.Module, *, prepack: bool | str = False, channels_last: bool = False,
                  compile: bool = False, tuner: Tuner | None = None) -> nn.Module:
    """prepack: "auto" (plain or prepacked per conv and input shape, as `tuner` measures), True (every k x k conv
    prepacked) or False (plain nn.Conv2d)."""
    if channels_last:
        _channels_last(unet)
    if compile:
        _compile(unet)          # on CPU inductor's freezing prepacks the weights itself
    else:
        _convs(unet, prepack, tuner)
    return unet


def optimize_vae(vae: nn.Module, *, prepack: bool | str = False, channels_last: bool = False,
                 tuner: Tuner | None = None) -> nn.Module:
    if channels_last:
        _channels_last(vae)
    _convs(vae, prepack, tuner)
    return vae
