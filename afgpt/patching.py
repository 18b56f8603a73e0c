"""Learned activations in Hugging Face GPT-Neo and RoBERTa models: `patch_model` and the patched classes.

`patch_model(model, af_type=...)` changes a GPT-Neo or RoBERTa model in place so that its activations come from an
afgpt activation set, exactly as in AfGPT:

- the set (afgpt.activation_set.ActivationSet) is registered once as `<base model>.activations` (state-dict names
  `transformer.activations.mlp.0.values`, `roberta.activations.mlp.0.values`, ...), and each layer applies its
  activation through a `SlotActivation` that looks the module up in the set when called, so layer sharing is
  structural and survives saving;
- ffn_type "mlp" (default) replaces only the MLP activation (GPT-Neo `h[i].mlp.act`, RoBERTa
  `encoder.layer[i].intermediate.intermediate_act_fn`); ffn_type "glu" or "kan" replaces the whole feed-forward
  with afgpt's (hidden -> hidden; the GLU gates with the MLP activation, the KAN uses it as base function), keeping
  the host's dropout, residual and LayerNorm: GPT-Neo's `h[i].mlp` becomes `HostFeedForward(ffn, the old
  mlp.dropout)` (state-dict names `h.<i>.mlp.ffn.*`), RoBERTa's `intermediate` becomes the feed-forward and
  `output.dense` an `nn.Identity`, so RobertaOutput's dropout + residual + LayerNorm still apply;
- unless the spec says att-none, an `AttentionSlot` x + f(a*x + b) (a = 1, b = 0 at first) is registered as
  `pre_activation` on each self-attention module (GPT-Neo `h[i].attn.attention`, RoBERTa
  `encoder.layer[i].attention.self`) and applied to its `hidden_states` input by a forward pre-hook, so it acts on
  the input of Q, K and V only: the residual keeps the un-activated input, as in AfGPT;
- the config becomes `AfGPTNeoConfig` / `AfRobertaConfig` (model types "afgpt_gpt_neo", "afgpt_roberta"), which
  record the patch, and the model's class the matching patched subclass (e.g. `AfGPTNeoForCausalLM`), whose
  `__init__` builds the vanilla model and applies the same patch from its config. `import afgpt` registers them with
  the Auto classes, so `AutoModelForCausalLM.from_pretrained(saved_folder)` restores the patch and every weight.

PEFT: list the activation modules themselves in `modules_to_save` (`activation_module_names(model)` gives their names,
e.g. "transformer.activations.mlp.0"); the layers look them up in the set at call time, so they use PEFT's trainable
copies. Wrapping the whole set ("activations") would leave the layers on the original modules, so the patched model
refuses to run that way and says what to do instead.
"""
import copy
import logging
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from transformers import (
    GPTNeoConfig,
    GPTNeoForCausalLM,
    GPTNeoForSequenceClassification,
    GPTNeoModel,
    RobertaConfig,
    RobertaForMaskedLM,
    RobertaForSequenceClassification,
    RobertaModel,
)
from transformers import initialization as init

from .activation_set import (
    ActivationSet,
    ActivationSettings,
    AttentionSlot,
    SlotActivation,
    find_activation_set,
    init_activation_module,
)
from .activations import parse_af_spec
from .ffn import FFNSettings, build_ffn, check_ffn_activation, check_ffn_settings, init_ffn_module

logger = logging.getLogger("afgpt")

DEFAULT_AF_TYPE = "prelu;att-none"
PATCH_FIELDS = ("af_type", "af_layer_specific", "af_range", "af_n_anchors", "af_init", "ffn_type", "kan_grid_size",
                "kan_spline_order", "kan_grid_range", "kan_width")


# ---------------------------------------------------------------------------- configs


def _normalise_and_check(config) -> None:
    """Normalise the patch fields of a patched config and fail, naming the field, on anything invalid."""
    if config.ffn_type is None:
        config.ffn_type = "mlp"
    config.af_type = str(parse_af_spec(config.af_type))
    if isinstance(config.af_range, int) and not isinstance(config.af_range, bool):
        config.af_range = float(config.af_range)
    if isinstance(config.af_init, int) and not isinstance(config.af_init, bool):
        config.af_init = float(config.af_init)
    if isinstance(config.kan_grid_range, (list, tuple)) and len(config.kan_grid_range) == 2:
        config.kan_grid_range = tuple(float(v) for v in config.kan_grid_range)
    else:
        raise ValueError(f"kan_grid_range={config.kan_grid_range!r} is invalid: use (low, high) with low < high")
    ActivationSettings.from_config(config)  # runs check_settings, with the model's widths filled in
    check_ffn_settings(FFNSettings.from_config(config))
    check_ffn_activation(config.ffn_type, parse_af_spec(config.af_type))


class AfGPTNeoConfig(GPTNeoConfig):
    """A GPTNeoConfig whose model has afgpt activations (see `afgpt.patch_model`); the patch fields:

        af_type: "<mlp>;att-<att>" spec, e.g. "spline;att-spline"; att-none adds no slot before QKV.
        af_layer_specific: 0 one activation shared by all layers, 1 one per layer, 2 middle layers shared.
        af_range, af_n_anchors, af_init: the spline grid and initial value (-1: identity).
        ffn_type: "mlp" (the host's MLP with the activation swapped), "glu" (afgpt's GLU gated by the activation)
            or "kan" (afgpt's KAN feed-forward), with kan_grid_size, kan_spline_order, kan_grid_range and kan_width
            ("params" or "mlp").
    """

    model_type = "afgpt_gpt_neo"

    af_type: str = DEFAULT_AF_TYPE
    af_layer_specific: int = 1
    af_range: float = 15.0
    af_n_anchors: int = 64
    af_init: float = 0.01
    ffn_type: str = "mlp"
    kan_grid_size: int = 5
    kan_spline_order: int = 3
    kan_grid_range: tuple[float, float] | list[float] = (-1.0, 1.0)
    kan_width: str = "params"

    def __post_init__(self, **kwargs):
        kwargs.pop("model_type", None)  # a host config's dict names the host's type; the class names ours
        super().__post_init__(**kwargs)
        _normalise_and_check(self)


class AfRobertaConfig(RobertaConfig):
    """A RobertaConfig whose model has afgpt activations (see `afgpt.patch_model`); the patch fields are
    AfGPTNeoConfig's."""

    model_type = "afgpt_roberta"

    af_type: str = DEFAULT_AF_TYPE
    af_layer_specific: int = 1
    af_range: float = 15.0
    af_n_anchors: int = 64
    af_init: float = 0.01
    ffn_type: str = "mlp"
    kan_grid_size: int = 5
    kan_spline_order: int = 3
    kan_grid_range: tuple[float, float] | list[float] = (-1.0, 1.0)
    kan_width: str = "params"

    def __post_init__(self, **kwargs):
        kwargs.pop("model_type", None)  # a host config's dict names the host's type; the class names ours
        super().__post_init__(**kwargs)
        _normalise_and_check(self)


# ---------------------------------------------------------------------------- how each host is patched


class HostFeedForward(nn.Module):
    """An afgpt feed-forward in place of a host's MLP module, followed by the host's dropout (GPT-Neo with GLU or
    KAN)."""

    def __init__(self, ffn: nn.Module, dropout: nn.Module):
        super().__init__()
        self.ffn = ffn
        self.dropout = dropout

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.ffn(hidden_states))


def _gpt_neo_set_ffn(layer: nn.Module, ffn: nn.Module) -> None:
    layer.mlp = HostFeedForward(ffn, layer.mlp.dropout)


def _gpt_neo_set_activation(layer: nn.Module, activation: nn.Module) -> None:
    layer.mlp.act = activation


def _roberta_set_ffn(layer: nn.Module, ffn: nn.Module) -> None:
    layer.intermediate = ffn  # hidden -> hidden; RobertaOutput adds dropout, the residual and LayerNorm
    layer.output.dense = nn.Identity()


def _roberta_set_activation(layer: nn.Module, activation: nn.Module) -> None:
    layer.intermediate.intermediate_act_fn = activation


def _gpt_neo_mlp(layer: nn.Module) -> nn.Module:
    return layer.mlp


def _roberta_mlp(layer: nn.Module) -> nn.Module:
    return nn.ModuleList([layer.intermediate, layer.output.dense])


@dataclass(frozen=True)
class Host:
    """What patching needs to know about a host architecture."""

    name: str
    config_class: type
    layers: Callable[[nn.Module], nn.ModuleList]  # base model -> its layers
    attention: Callable[[nn.Module], nn.Module]  # layer -> the self-attention module computing Q, K, V
    set_activation: Callable[[nn.Module, nn.Module], None]
    set_ffn: Callable[[nn.Module, nn.Module], None]
    feed_forward: Callable[[nn.Module], nn.Module]  # layer -> the modules a GLU or KAN replaces (parameter counts)


GPT_NEO = Host("GPT-Neo", AfGPTNeoConfig, lambda base: base.h, lambda layer: layer.attn.attention,
                 _gpt_neo_set_activation, _gpt_neo_set_ffn, _gpt_neo_mlp)
ROBERTA = Host("RoBERTa", AfRobertaConfig, lambda base: base.encoder.layer, lambda layer: layer.attention.self,
                 _roberta_set_activation, _roberta_set_ffn, _roberta_mlp)


def _apply_pre_activation(module: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook of a patched self-attention module: its hidden_states input becomes x + f(a*x + b)."""
    if args:
        return (module.pre_activation(args[0]), *args[1:]), kwargs
    if "hidden_states" in kwargs:
        kwargs["hidden_states"] = module.pre_activation(kwargs["hidden_states"])
        return args, kwargs
    raise TypeError(f"{type(module).__name__} was called without hidden_states; the afgpt attention slot needs them")


def _check_activation_set(module: nn.Module, args: tuple) -> None:
    """Forward pre-hook of a patched base model: its layers look activations up in `activations` per slot, so the
    set and its rows must still be the set and its ModuleLists (PEFT's modules_to_save may wrap them)."""
    found = module._modules.get("activations")
    if isinstance(found, ActivationSet):
        replaced = {f"activations.{name}": row for name, row in found.rows().items()
                    if not isinstance(row, nn.ModuleList)}
    else:
        replaced = {"activations": found}
    if not replaced:
        return
    name, wrapper = next(iter(replaced.items()))
    raise RuntimeError(
        f"`{name}` of this patched model was replaced by a {type(wrapper).__name__}, e.g. by listing it in PEFT's "
        "modules_to_save: the layers look their activation up per slot, so they would ignore the trainable copies. "
        "List the per-slot modules instead: modules_to_save=afgpt.activation_module_names(model), e.g. "
        "['activations.mlp.0', 'activations.mlp.1', ...]")


def _build_patch(model: nn.Module, host: Host, config) -> tuple[ActivationSet, list]:
    """The new modules for every layer (nothing in the model is changed yet)."""
    activations = ActivationSet(ActivationSettings.from_config(config))  # GPT-Neo's None width: 4 * hidden
    layers = host.layers(model.base_model)
    if len(layers) != config.num_hidden_layers:
        raise ValueError(f"the model has {len(layers)} layers but its config says num_hidden_layers="
                         f"{config.num_hidden_layers}")
    settings = FFNSettings.from_config(config)
    per_layer = []
    for i in range(len(layers)):
        activation = SlotActivation(activations, "mlp", i)
        ffn = build_ffn(settings, activation) if config.ffn_type != "mlp" else None
        slot = AttentionSlot(activations, i) if activations.att is not None else None
        per_layer.append((activation, ffn, slot))
    return activations, per_layer


def _install_patch(model: nn.Module, host: Host, activations: ActivationSet, per_layer: list) -> None:
    """Put the built modules into the model (the base model's class becomes the patched one)."""
    base = model.base_model
    for layer, (activation, ffn, slot) in zip(host.layers(base), per_layer):
        if ffn is None:
            host.set_activation(layer, activation)
        else:
            host.set_ffn(layer, ffn)
        if slot is not None:
            attention = host.attention(layer)
            attention.pre_activation = slot
            attention.register_forward_pre_hook(_apply_pre_activation, with_kwargs=True)
    base.activations = activations
    base.register_forward_pre_hook(_check_activation_set)
    if base is not model and type(base) in PATCHED_CLASSES:
        base.__class__ = PATCHED_CLASSES[type(base)]  # so transformers initialises its new modules with our rules


def _log_feed_forward(model: nn.Module, host: Host, before: int | None) -> None:
    config = model.config
    if config.ffn_type == "mlp":
        return
    after = sum(p.numel() for p in host.feed_forward(host.layers(model.base_model)[0]).parameters())
    mlp = f" (the MLP it replaces has {before:,})" if before is not None else ""
    settings = FFNSettings.from_config(config)
    width = settings.kan_hidden_size if config.ffn_type == "kan" else settings.glu_width
    logger.info(f"{host.name} feed-forward: {config.ffn_type.upper()} with {after:,} parameters per layer{mlp}, "
                f"hidden width {width}")


# ---------------------------------------------------------------------------- patched classes


class AfPatchedModel:
    """Mixin of the patched classes: builds the vanilla model, then applies the patch its config records."""

    _afgpt_host: Host

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        activations, per_layer = _build_patch(self, self._afgpt_host, config)
        _install_patch(self, self._afgpt_host, activations, per_layer)
        self.post_init()  # initialises the new modules (the vanilla ones are marked initialised already)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Activation modules and attention slots start at their documented values, KAN layers as KANLinear's
        reset_parameters draws them, unless loaded from a checkpoint; the rest is the host's initialisation."""
        if not (init_activation_module(module, init) or init_ffn_module(module)):
            super()._init_weights(module)

    def load_activations(self, bank: nn.Module, freeze: bool = True) -> nn.Module:
        """Put learned activations (an `afgpt.ActivationBank`) into this model; frozen by default (stage II)."""
        return bank.load_into(self, freeze=freeze)


class AfGPTNeoModel(AfPatchedModel, GPTNeoModel):
    config_class = AfGPTNeoConfig
    _afgpt_host = GPT_NEO


class AfGPTNeoForCausalLM(AfPatchedModel, GPTNeoForCausalLM):
    config_class = AfGPTNeoConfig
    _afgpt_host = GPT_NEO


class AfGPTNeoForSequenceClassification(AfPatchedModel, GPTNeoForSequenceClassification):
    config_class = AfGPTNeoConfig
    _afgpt_host = GPT_NEO


class AfRobertaModel(AfPatchedModel, RobertaModel):
    config_class = AfRobertaConfig
    _afgpt_host = ROBERTA


class AfRobertaForMaskedLM(AfPatchedModel, RobertaForMaskedLM):
    config_class = AfRobertaConfig
    _afgpt_host = ROBERTA


class AfRobertaForSequenceClassification(AfPatchedModel, RobertaForSequenceClassification):
    config_class = AfRobertaConfig
    _afgpt_host = ROBERTA


PATCHED_CLASSES = {
    GPTNeoModel: AfGPTNeoModel,
    GPTNeoForCausalLM: AfGPTNeoForCausalLM,
    GPTNeoForSequenceClassification: AfGPTNeoForSequenceClassification,
    RobertaModel: AfRobertaModel,
    RobertaForMaskedLM: AfRobertaForMaskedLM,
    RobertaForSequenceClassification: AfRobertaForSequenceClassification,
}
SUPPORTED = tuple(cls.__name__ for cls in PATCHED_CLASSES)
PATCHED_CONFIGS = (AfGPTNeoConfig, AfRobertaConfig)


# ---------------------------------------------------------------------------- patch_model


def is_patched(model: nn.Module) -> bool:
    """Whether `model` already carries afgpt activations (patched, or AfGPT)."""
    if isinstance(model, AfPatchedModel) or isinstance(getattr(model, "config", None), PATCHED_CONFIGS):
        return True
    try:
        find_activation_set(model)
    except (ValueError, AttributeError):
        return False
    return True


def patch_model(model: nn.Module, af_type: str | None = None, layer_specific: int = 1,
                bank: nn.Module | None = None, ffn_type: str | None = None, freeze: bool = False, *,
                af_range: float = 15.0, af_n_anchors: int = 64, af_init: float = 0.01, kan_grid_size: int = 5,
                kan_spline_order: int = 3, kan_grid_range: tuple[float, float] = (-1.0, 1.0),
                kan_width: str = "params") -> nn.Module:
    """Give a GPT-Neo or RoBERTa model afgpt's activations, in place, and return it.

    af_type: "<mlp>;att-<att>" (default: the bank's, else "prelu;att-none"); layer_specific: 0 shared by all
    layers, 1 one per layer, 2 middle layers shared. ffn_type None or "mlp" swaps the MLP activation, "glu" replaces
    the feed-forward with afgpt's GLU gated by it, "kan" with afgpt's KAN (kan_* arguments). A bank
    (`afgpt.load_activations(...)`) sets the anchor grid (af_range, af_n_anchors) and is loaded after patching
    (`freeze` stops it training); without a bank, `freeze` freezes the fresh activations. The model's class becomes
    the patched subclass (e.g. AfGPTNeoForCausalLM) and its config the patched config, so save_pretrained /
    Auto*.from_pretrained keep the patch (after `import afgpt`).
    """
    if is_patched(model):
        raise ValueError(f"this {type(model).__name__} already has afgpt activations (it was patched, or is an afgpt "
                         "model): patch a vanilla model once; to change activations, patch a fresh copy")
    patched_class = PATCHED_CLASSES.get(type(model))
    if patched_class is None:
        hint = (" (a PEFT model: patch the base model before wrapping it)" if hasattr(model, "get_base_model")
                else "")
        raise ValueError(f"patch_model does not support {type(model).__name__}{hint}; supported classes: "
                         f"{', '.join(SUPPORTED)}")
    host = patched_class._afgpt_host
    if bank is not None:
        af_type = bank.settings.af_type if af_type is None else af_type
        af_range, af_n_anchors = bank.settings.af_range, bank.settings.af_n_anchors
    fields = dict(af_type=DEFAULT_AF_TYPE if af_type is None else af_type, af_layer_specific=layer_specific,
                  af_range=af_range, af_n_anchors=af_n_anchors, af_init=af_init,
                  ffn_type="mlp" if ffn_type is None else ffn_type, kan_grid_size=kan_grid_size,
                  kan_spline_order=kan_spline_order, kan_grid_range=kan_grid_range, kan_width=kan_width)

    old_config = model.config
    config = copy.deepcopy(old_config)  # the host's config, every field kept, plus the patch fields
    config.__class__ = host.config_class
    for name, value in fields.items():
        setattr(config, name, value)
    _normalise_and_check(config)

    activations, per_layer = _build_patch(model, host, config)
    if bank is not None:
        problems = bank.mismatches(activations)
        if problems:
            raise ValueError("the activation bank does not fit this model:\n- " + "\n- ".join(problems))
    reference = next(model.parameters())
    activations.to(reference.device)  # learnable activations keep fp32 parameters
    for _, ffn, slot in per_layer:
        if ffn is not None:
            ffn.to(reference.device, reference.dtype)
        if slot is not None:
            slot.to(reference.device)
    first_ffn = host.feed_forward(host.layers(model.base_model)[0])
    before = sum(p.numel() for p in first_ffn.parameters())

    for module in model.modules():  # every module holding the old config sees the new one
        if module.__dict__.get("config") is old_config:
            module.config = config
    _install_patch(model, host, activations, per_layer)
    model.__class__ = patched_class
    _log_feed_forward(model, host, before)

    if bank is not None:
        bank.load_into(model, freeze=freeze)
    elif freeze:
        activations.requires_grad_(False)
    return model


def activation_module_names(model: nn.Module, attention_slots: bool = True) -> list[str]:
    """The names of a patched (or AfGPT) model's learnable activation modules, one per slot (e.g.
    "transformer.activations.mlp.0") and, with `attention_slots`, its pre-QKV slots (their a, b scalars): what to
    list in PEFT's `modules_to_save` to train the activations alongside an adapter. A PEFT model gives its base
    model's names."""
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    activation_set = find_activation_set(target)
    learnable = {id(module) for row in activation_set.rows().values() for module in row
                 if any(True for _ in module.parameters())}
    return [name for name, module in target.named_modules()
            if id(module) in learnable or (attention_slots and isinstance(module, AttentionSlot))]


__all__ = ["patch_model", "activation_module_names", "is_patched", "AfGPTNeoConfig", "AfRobertaConfig",
           "AfGPTNeoModel", "AfGPTNeoForCausalLM", "AfGPTNeoForSequenceClassification", "AfRobertaModel",
           "AfRobertaForMaskedLM", "AfRobertaForSequenceClassification", "HostFeedForward"]
