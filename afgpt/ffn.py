"""Feed-forward layers keyed by `ffn_type`, each built from explicit arguments (no host config).

A feed-forward maps [..., hidden_size] to [..., hidden_size]. Its activation is passed in (in models, a
`SlotActivation` into the model's activation set), so the same layer serves AfGPT and patched models.
    mlp  fc (hidden -> intermediate), activation, proj (intermediate -> hidden); no biases, proj starts at zero.
    kan  two B-spline KAN layers (efficient-kan's formulation, afgpt.kan) whose base function is the activation.
"""
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

import torch
from torch import nn

from .activations import PER_CHANNEL_NAMES, AfSpec
from .kan import KAN_WIDTH_CHOICES as KAN_WIDTHS, KANFeedForward, KANLinear, kan_hidden_size


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
    def kan_hidden_size(self) -> int:
        return kan_hidden_size(self.hidden_size, self.intermediate_size, self.kan_grid_size, self.kan_spline_order,
                               self.kan_width)


def build_mlp(settings: FFNSettings, activation: nn.Module) -> nn.Module:
    return MLP(settings.hidden_size, settings.intermediate_size, activation)


def build_kan(settings: FFNSettings, activation: nn.Module) -> nn.Module:
    return KANFeedForward(settings.hidden_size, settings.kan_hidden_size, grid_size=settings.kan_grid_size,
                          spline_order=settings.kan_spline_order, grid_range=settings.kan_grid_range,
                          base_activation=activation)


FFN_BUILDERS: dict[str, Callable[[FFNSettings, nn.Module], nn.Module]] = {"mlp": build_mlp, "kan": build_kan}
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
    """A KAN applies its base function on two widths, so it needs an elementwise (not per-channel) activation."""
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
