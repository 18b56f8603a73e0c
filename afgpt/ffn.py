"""Feed-forward layers keyed by `ffn_type`, each built from explicit arguments (no host config).

A feed-forward maps [..., hidden_size] to [..., hidden_size]. Its activation is passed in (in models, a
`SlotActivation` into the model's activation set), so the same layer serves AfGPT and patched models.
    mlp  fc (hidden -> intermediate), activation, proj (intermediate -> hidden); no biases, proj starts at zero.
    glu  proj(activation(gate(x)) * up(x)) (Shazeer, 2020: gelu GeGLU, silu SwiGLU, relu ReGLU), no biases, proj
         starts at zero; its width (`glu_width`) follows the 2/3 rule so it has the MLP's parameter count.
    kan  two B-spline KAN layers (efficient-kan's formulation, afgpt.kan) whose base function is the activation.
    moa  proj(sum_k pi_k(h) f_k(fc(h))): token-adaptive gates over afgpt.mixtures' dictionary (identity, relu,
         relu2, leaky_relu, gelu, silu, tanh), starting as the GELU MLP; moa_glu gates the GLU's activated branch
         (width glu_width). Both take the place of the MLP activation, so af_type's MLP part must be gelu.
"""
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

import torch
from torch import nn

from .activations import PER_CHANNEL_NAMES, AfSpec
from .kan import KAN_WIDTH_CHOICES as KAN_WIDTHS, KANFeedForward, KANLinear, kan_hidden_size
from .mixtures import MoAFeedForward


@dataclass(frozen=True)
class FFNSettings:
    """The feed-forward of every layer: its type, widths and, for KAN, the grid and the hidden-width rule.

    kan_width: "params" picks the KAN hidden width whose parameter count matches the MLP's (a fair comparison),
    "mlp" uses intermediate_size. kan_grid_size (intervals) and kan_spline_order are the KAN's two knobs.
    """

    ffn_type: str = "mlp"
    hidden_size: int = 256
    intermediate_size: int | None = 1024
    kan_grid_size: int = 5
    kan_spline_order: int = 3
    kan_grid_range: tuple[float, float] = (-1.0, 1.0)
    kan_width: str = "params"

    def __post_init__(self):
        if self.intermediate_size is None:  # GPT-Neo leaves it unset: 4 * hidden_size
            object.__setattr__(self, "intermediate_size", 4 * self.hidden_size)
        object.__setattr__(self, "kan_grid_range", tuple(float(v) for v in self.kan_grid_range))
        check_ffn_settings(self)

    @classmethod
    def from_config(cls, config) -> "FFNSettings":
        return cls(**{f.name: getattr(config, f.name) for f in fields(cls)})

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def glu_width(self) -> int:
        return glu_width(self.intermediate_size)

    @property
    def kan_hidden_size(self) -> int:
        return kan_hidden_size(self.hidden_size, self.intermediate_size, self.kan_grid_size, self.kan_spline_order,
                               self.kan_width)


def build_mlp(settings: FFNSettings, activation: nn.Module) -> nn.Module:
    return MLP(settings.hidden_size, settings.intermediate_size, activation)


GLU_MULTIPLE = 8  # a tensor-core-friendly width, used when it keeps the parameter count within 1%


def glu_width(intermediate_size: int) -> int:
    """The GLU width whose 3 matrices hold as many parameters as the MLP's 2 (2/3 of intermediate_size), rounded
    to a multiple of GLU_MULTIPLE when that stays within 1% of the MLP's count. Within 1% for any
    intermediate_size >= 75 (plain rounding is off by at most half a column of 3)."""
    width = round(2 * intermediate_size / 3)
    aligned = max(GLU_MULTIPLE, GLU_MULTIPLE * round(width / GLU_MULTIPLE))
    return aligned if abs(3 * aligned - 2 * intermediate_size) <= 0.01 * 2 * intermediate_size else width


def activation_width(ffn_type: str, intermediate_size: int) -> int:
    """The channels the MLP activation sees (per-channel activations need it): the GLU's gate width for "glu",
    else intermediate_size (a KAN refuses per-channel activations, see check_ffn_activation)."""
    return glu_width(intermediate_size) if ffn_type == "glu" else intermediate_size


def build_glu(settings: FFNSettings, activation: nn.Module) -> nn.Module:
    return GLU(settings.hidden_size, settings.glu_width, activation)


def build_kan(settings: FFNSettings, activation: nn.Module) -> nn.Module:
    return KANFeedForward(settings.hidden_size, settings.kan_hidden_size, grid_size=settings.kan_grid_size,
                          spline_order=settings.kan_spline_order, grid_range=settings.kan_grid_range,
                          base_activation=activation)


def build_moa(settings: FFNSettings, activation: nn.Module) -> nn.Module:
    return MoAFeedForward(settings.hidden_size, settings.intermediate_size)  # its dictionary replaces `activation`


def build_moa_glu(settings: FFNSettings, activation: nn.Module) -> nn.Module:
    return MoAFeedForward(settings.hidden_size, settings.glu_width, glu=True)


FFN_BUILDERS: dict[str, Callable[[FFNSettings, nn.Module], nn.Module]] = {
    "mlp": build_mlp, "kan": build_kan, "glu": build_glu, "moa": build_moa, "moa_glu": build_moa_glu}
FFN_TYPES = tuple(FFN_BUILDERS)


def build_ffn(settings: FFNSettings, activation: nn.Module) -> nn.Module:
    """A fresh feed-forward of `settings.ffn_type` applying `activation`."""
    return FFN_BUILDERS[settings.ffn_type](settings, activation)


def check_ffn_settings(settings) -> None:
    """Fail naming the field, the value and what is allowed (AfGPTConfig and patched configs use this too)."""
    if settings.ffn_type not in FFN_BUILDERS:
        raise ValueError(f"ffn_type={settings.ffn_type!r} is invalid: allowed values are {', '.join(FFN_TYPES)}")
    if not isinstance(settings.kan_grid_size, int) or settings.kan_grid_size < 1:
        raise ValueError(f"kan_grid_size={settings.kan_grid_size!r} is invalid: use a positive number of grid intervals")
    if not isinstance(settings.kan_spline_order, int) or settings.kan_spline_order < 1:
        raise ValueError(f"kan_spline_order={settings.kan_spline_order!r} is invalid: use a positive B-spline order "
                         "(3: cubic)")
    low, high = settings.kan_grid_range
    if not low < high:
        raise ValueError(f"kan_grid_range={settings.kan_grid_range!r} is invalid: use (low, high) with low < high")
    if settings.kan_width not in KAN_WIDTHS:
        raise ValueError(f"kan_width={settings.kan_width!r} is invalid: use {' or '.join(map(repr, KAN_WIDTHS))}")


def check_ffn_activation(ffn_type: str, spec: AfSpec) -> None:
    """A KAN applies its base function on two widths, so it needs an elementwise (not per-channel) activation; MoA
    replaces the MLP activation by its gated dictionary, which starts as GELU."""
    if ffn_type in ("moa", "moa_glu") and spec.mlp != "gelu":
        raise ValueError(
            f"ffn_type={ffn_type!r} mixes its own dictionary of functions with token gates and starts as the GELU "
            f"MLP, so the MLP activation {spec.mlp!r} would go unused: use af_type 'gelu;att-{spec.att}'")
    if ffn_type == "kan" and spec.mlp in PER_CHANNEL_NAMES:
        raise ValueError(
            f"ffn_type='kan' uses the MLP activation {spec.mlp!r} as the base function of both KAN layers, which have "
            f"different widths, so it cannot be per-channel ({', '.join(PER_CHANNEL_NAMES)}): use an elementwise one, "
            "e.g. 'silu' (efficient-kan's default) or 'spline'")


class MLP(nn.Module):
    """fc -> activation -> proj, no biases; proj starts at zero (lm-afs)."""

    def __init__(self, hidden_size: int, intermediate_size: int, activation: nn.Module):
        super().__init__()
        self.fc = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.activation = activation
        self.proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.proj.zero_init = True

    def forward(self, x):
        return self.proj(self.activation(self.fc(x)))


class GLU(nn.Module):
    """proj(activation(gate(x)) * up(x)) (Shazeer, 2020), no biases and proj starting at zero like the MLP, so
    swapping "mlp" for "glu" changes only the gating."""

    def __init__(self, hidden_size: int, width: int, activation: nn.Module):
        super().__init__()
        self.gate = nn.Linear(hidden_size, width, bias=False)
        self.up = nn.Linear(hidden_size, width, bias=False)
        self.activation = activation
        self.proj = nn.Linear(width, hidden_size, bias=False)
        self.proj.zero_init = True

    def forward(self, x):
        return self.proj(self.activation(self.gate(x)) * self.up(x))

    def extra_repr(self) -> str:
        hidden, width = self.gate.in_features, self.gate.out_features
        return (f"hidden={hidden}, width={width}, parameters={3 * hidden * width:,}: "
                "proj(activation(gate(x)) * up(x))")


@torch.no_grad()
def init_ffn_module(module: nn.Module) -> bool:
    """Initialise a KAN layer the way it draws itself (reset_parameters), keeping any tensor transformers loaded
    from a checkpoint (marked `_is_hf_initialized`); True when `module` was one. Hosts call this from `_init_weights`
    (transformers 5 builds models on the meta device and initialises them there)."""
    if not isinstance(module, KANLinear):
        return False
    tensors = {**dict(module.named_parameters(recurse=False)), **dict(module.named_buffers(recurse=False))}
    loaded = {name: t.detach().clone() for name, t in tensors.items() if getattr(t, "_is_hf_initialized", False)}
    if len(loaded) < len(tensors):
        module.reset_parameters()
        for name, value in loaded.items():
            getattr(module, name).copy_(value)
    return True
