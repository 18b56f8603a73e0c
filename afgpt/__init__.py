"""afgpt: research on activation functions in small language models, as a transformers extension."""
from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM,
                          AutoModelForSequenceClassification)

from .activation_set import ActivationSet, ActivationSettings, find_activation_set
from .activations import ACTIVATION_NAMES, AfSpec, build_activation, parse_af_spec
from .configuration_afgpt import AfGPTConfig
from .modeling_afgpt import AfGPTForCausalLM, AfGPTForSequenceClassification, AfGPTModel
from .patching import (
    AfGPTNeoConfig, AfGPTNeoForCausalLM, AfGPTNeoForSequenceClassification, AfGPTNeoModel, AfRobertaConfig,
    AfRobertaForMaskedLM, AfRobertaForSequenceClassification, AfRobertaModel, activation_module_names, patch_model,
)
from .bank import ActivationBank

__version__ = "0.1.0"
_HUB_NAMES = ("HubError", "load_activations", "push_run")  # from .hub, imported on first use (huggingface_hub)

AutoConfig.register("afgpt", AfGPTConfig, exist_ok=True)
AutoModel.register(AfGPTConfig, AfGPTModel, exist_ok=True)
AutoModelForCausalLM.register(AfGPTConfig, AfGPTForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(AfGPTConfig, AfGPTForSequenceClassification, exist_ok=True)

# Patched GPT-Neo / RoBERTa (afgpt.patch_model): saved folders load back patched with the Auto classes.
AutoConfig.register(AfGPTNeoConfig.model_type, AfGPTNeoConfig, exist_ok=True)
AutoModel.register(AfGPTNeoConfig, AfGPTNeoModel, exist_ok=True)
AutoModelForCausalLM.register(AfGPTNeoConfig, AfGPTNeoForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(AfGPTNeoConfig, AfGPTNeoForSequenceClassification, exist_ok=True)
AutoConfig.register(AfRobertaConfig.model_type, AfRobertaConfig, exist_ok=True)
AutoModel.register(AfRobertaConfig, AfRobertaModel, exist_ok=True)
AutoModelForMaskedLM.register(AfRobertaConfig, AfRobertaForMaskedLM, exist_ok=True)
AutoModelForSequenceClassification.register(AfRobertaConfig, AfRobertaForSequenceClassification, exist_ok=True)

# Saved folders carry their code, so they load with trust_remote_code=True where afgpt is not installed.
AfGPTConfig.register_for_auto_class()
AfGPTModel.register_for_auto_class("AutoModel")
AfGPTForCausalLM.register_for_auto_class("AutoModelForCausalLM")
AfGPTForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")

__all__ = [
    "ACTIVATION_NAMES", "ActivationBank", "ActivationSet", "ActivationSettings", "find_activation_set", "AfSpec", "AfGPTConfig", "AfGPTModel", "AfGPTForCausalLM",
    "AfGPTForSequenceClassification", "HubError", "build_activation", "load_activations", "parse_af_spec", "push_run",
]
__all__ += [  # afgpt.patching
    "AfGPTNeoConfig", "AfGPTNeoModel", "AfGPTNeoForCausalLM", "AfGPTNeoForSequenceClassification", "AfRobertaConfig",
    "AfRobertaModel", "AfRobertaForMaskedLM", "AfRobertaForSequenceClassification", "activation_module_names",
    "patch_model",
]


def __getattr__(name: str):
    """The Hub names, imported when first asked for (PEP 562), so `import afgpt` stays light."""
    if name not in _HUB_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from . import hub

    value = globals()[name] = getattr(hub, name)
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HUB_NAMES})
