"""The activation set: every activation of a model (MLP and attention slots) with the settings that describe it.

One `ActivationSet` per model holds each activation module once; layers apply theirs through a `SlotActivation`,
which names a row ("mlp" or "att") and a layer and looks the module up in the set when called. Sharing an
activation across layers is therefore structural (each parameter is stored once, under `activations.<row>.<slot>`)
and the same in AfGPT and in a patched GPT-Neo or RoBERTa. `find_activation_set(model)` is the one way to reach
it; the bank, plots, optimizers, monitors and stage I use nothing else.
"""
from dataclasses import asdict, dataclass, fields

import torch
from torch import nn

from .activations import AfSpec, SplineGrid, build_activation, parse_af_spec
from .ffn import activation_width

ROWS = {"mlp": "MLP", "att": "attention"}
SHARING = {0: "one activation shared by all layers", 1: "one activation per layer",
           2: "first and last layers own theirs, the middle layers share one"}


@dataclass(frozen=True)
class ActivationSettings:
    """What shapes a model's activations: the spec, layer sharing, the spline grid, the depth and the widths.

    `hidden_size` is the width the attention slot sees; the MLP slot sees `mlp_width`, intermediate_size or, with
    ffn_type "glu", the GLU's gate width (per-channel activations need them; shared ones work at any width).
    """

    af_type: str = "gelu;att-linear"
    af_layer_specific: int = 1
    af_range: float = 15.0
    af_n_anchors: int = 64
    af_init: float = 0.01
    num_hidden_layers: int = 4
    hidden_size: int = 256
    intermediate_size: int | None = None  # None: 4 * hidden_size, as in AfGPT and lm-afs
    ffn_type: str = "mlp"

    def __post_init__(self):
        if self.intermediate_size is None:
            object.__setattr__(self, "intermediate_size", 4 * self.hidden_size)
        object.__setattr__(self, "af_type", str(parse_af_spec(self.af_type)))
        object.__setattr__(self, "af_range", float(self.af_range))
        object.__setattr__(self, "af_init", float(self.af_init))
        check_settings(self)

    @classmethod
    def from_config(cls, config) -> "ActivationSettings":
        """The settings a model config records (AfGPTConfig, or a patched GPT-Neo/RoBERTa config)."""
        return cls(**{f.name: getattr(config, f.name) for f in fields(cls)})

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def spec(self) -> AfSpec:
        return parse_af_spec(self.af_type)

    @property
    def mlp_width(self) -> int:
        return activation_width(self.ffn_type, self.intermediate_size)

    @property
    def grid(self) -> SplineGrid:
        return SplineGrid(self.af_range, self.af_n_anchors, self.af_init)

    def slot(self, layer: int) -> int:
        """Index of the activation `layer` uses: 0 shared, 1 per layer, 2 shared middle layers."""
        return activation_slot(layer, self.num_hidden_layers, self.af_layer_specific)

    @property
    def num_slots(self) -> int:
        return self.slot(self.num_hidden_layers - 1) + 1

    def layer_span(self, slot: int) -> str:
        """The layers that use `slot` (contiguous), e.g. "layer 0" or "layers 1–2"."""
        layers = [i for i in range(self.num_hidden_layers) if self.slot(i) == slot]
        return f"layer {layers[0]}" if len(layers) == 1 else f"layers {layers[0]}–{layers[-1]}"


def activation_slot(layer: int, num_layers: int, sharing: int) -> int:
    """Index of the activation a layer uses: 0 shared, 1 per layer, 2 shared middle layers."""
    if sharing == 0:
        return 0
    if sharing == 1:
        return layer
    num_slots = min(num_layers, 3)
    return min(layer, 1) if layer < num_layers - 1 else num_slots - 1


def check_settings(settings) -> None:
    """Fail naming the field, the value and what is allowed (AfGPTConfig and patched configs use this too)."""
    parse_af_spec(settings.af_type)
    if settings.af_layer_specific not in (0, 1, 2):
        raise ValueError(
            f"af_layer_specific={settings.af_layer_specific!r} is invalid: use 0 (shared by all layers), "
            "1 (one per layer) or 2 (middle layers shared)")
    if not isinstance(settings.af_n_anchors, int) or settings.af_n_anchors < 2:
        raise ValueError(f"af_n_anchors={settings.af_n_anchors!r} is invalid: a spline needs at least 2 anchors")
    if not settings.af_range > 0:
        raise ValueError(f"af_range={settings.af_range!r} is invalid: it must be > 0 (anchors span "
                         "[-af_range, af_range])")
    if not (settings.af_init > 0 or settings.af_init == -1):
        raise ValueError(
            f"af_init={settings.af_init!r} is invalid: use a small positive constant (e.g. 0.01) "
            "or -1 to start splines as the identity")
    for name in ("num_hidden_layers", "hidden_size", "intermediate_size"):
        value = getattr(settings, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} is invalid: it must be a positive integer")


class ActivationSet(nn.Module):
    """The activation modules of a model, each stored once: `mlp[slot]` and, unless att-none, `att[slot]`."""

    def __init__(self, settings: ActivationSettings):
        super().__init__()
        self.settings = settings
        spec, grid, slots = settings.spec, settings.grid, range(settings.num_slots)
        self.mlp = nn.ModuleList(build_activation(spec.mlp, settings.mlp_width, grid) for _ in slots)
        self.att = nn.ModuleList(build_activation(spec.att, settings.hidden_size, grid) for _ in slots) \
            if spec.has_att_slot else None

    def rows(self) -> dict[str, nn.ModuleList]:
        """"mlp" and, with an attention slot, "att" -> their modules by slot."""
        return {row: getattr(self, row) for row in ROWS if getattr(self, row) is not None}

    def module(self, row: str, layer: int) -> nn.Module:
        """The activation `layer` applies in `row`."""
        return getattr(self, row)[self.settings.slot(layer)]

    def per_layer(self, row: str) -> list[nn.Module]:
        """The module of every layer in `row`, a shared one repeated."""
        return [self.module(row, layer) for layer in range(self.settings.num_hidden_layers)]

    def is_empty(self) -> bool:
        return not any(True for _ in self.parameters())

    def extra_repr(self) -> str:
        s = self.settings
        return f"af_type={s.af_type!r}, sharing={s.af_layer_specific} ({SHARING[s.af_layer_specific]})"


class SlotActivation(nn.Module):
    """Where a layer applies its activation: row ("mlp"/"att") and layer, resolved in the model's set at call time.

    The set is referenced, not registered as a submodule, so its parameters appear once in the model (under the
    set) however many layers share them; `share_activation_set` points every slot of a model at another set.
    """

    def __init__(self, activation_set: ActivationSet, row: str, layer: int):
        super().__init__()
        self.row, self.layer = row, layer
        self.bind(activation_set)

    def bind(self, activation_set: ActivationSet) -> None:
        self.__dict__["activation_set"] = activation_set  # a plain attribute: nn.Module would register it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation_set.module(self.row, self.layer)(x)

    def extra_repr(self) -> str:
        return f"{self.row}, layer={self.layer}, slot={self.activation_set.settings.slot(self.layer)}"


class AttentionSlot(nn.Module):
    """The activation before QKV: x + f(a * x + b) with learnable scalars a (init 1) and b (init 0) (lm-afs)."""

    def __init__(self, activation_set: ActivationSet, layer: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(()))
        self.bias = nn.Parameter(torch.zeros(()))
        self.activation = SlotActivation(activation_set, "att", layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.activation(torch.addcmul(self.bias.to(x.dtype), x, self.weight.to(x.dtype)))


def find_activation_set(model: nn.Module) -> ActivationSet:
    """The activation set of an AfGPT model, a patched model, a PEFT wrapper of either, or a bank."""
    if isinstance(model, ActivationSet):
        return model
    if hasattr(model, "get_base_model"):  # PEFT
        model = model.get_base_model()
    for owner in (model, getattr(model, "base_model", None)):
        found = getattr(owner, "activations", None)
        if isinstance(found, ActivationSet):
            return found
    raise ValueError(f"{type(model).__name__} has no afgpt activation set: use an afgpt model, or patch a GPT-Neo "
                     "or RoBERTa model with afgpt.patch_model(model, af_type=...)")


def share_activation_set(model: nn.Module, activation_set: ActivationSet) -> None:
    """Make `model` use `activation_set` (stage I replicas share replica 0's): its set is replaced and
    every layer's slot points at the new one."""
    owner = model.base_model if isinstance(getattr(model.base_model, "activations", None), ActivationSet) else model
    owner.activations = activation_set
    for module in model.modules():
        if isinstance(module, SlotActivation):
            module.bind(activation_set)


@torch.no_grad()
def init_activation_module(module: nn.Module, init) -> bool:
    """Initialise an activation set's module or an attention slot with `init` (transformers.initialization, which
    skips tensors loaded from a checkpoint); True when `module` was one of them. Hosts call this from `_init_weights`."""
    if isinstance(module, AttentionSlot):
        init.ones_(module.weight)
        init.zeros_(module.bias)
        return True
    if hasattr(module, "initial_state"):  # learnable activations
        for name, value in module.initial_state().items():
            init.copy_(getattr(module, name), value)
        return True
    return False


__all__ = ["ActivationSettings", "ActivationSet", "SlotActivation", "AttentionSlot", "find_activation_set",
           "share_activation_set", "init_activation_module", "activation_slot"]
