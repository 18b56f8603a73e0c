"""The optimizers of a run: AdamW for the weights (decay on the matrices), the activations' own Adam or SGD."""
import torch
from transformers import Trainer

from ..activation_set import find_activation_set
from .config import TrainConfig


def split_parameters(model: torch.nn.Module) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """(weights, activation parameters) of an AfGPT or patched model; frozen parameters are left out."""
    activation_set = find_activation_set(model)
    activation_ids = {id(p) for p in activation_set.parameters()}
    weights = [p for p in model.parameters() if p.requires_grad and id(p) not in activation_ids]
    activations = [p for p in activation_set.parameters() if p.requires_grad]
    return weights, activations


def decay_parameter_names(model: torch.nn.Module) -> set[str]:
    """The parameters weight decay applies to: the matrices among those transformers.Trainer decays.

    Trainer spares norms and biases (by layer type and name); AfGPT's vectors and scalars (skip weights,
    mixing lambdas, pre-activation scales) are gains too, so they are spared as well. One rule for
    the afgpt loop and AfTrainer.
    """
    trainer_rule = Trainer.get_decay_parameter_names(None, model)  # reads no Trainer state
    return {name for name in trainer_rule if model.get_parameter(name).dim() >= 2}


def weight_groups(model: torch.nn.Module, weight_decay: float, decay: set[str]) -> list[dict]:
    """The trainable parameters except the activations, as optimizer groups: the `decay` names, the rest undecayed."""
    weights, _ = split_parameters(model)
    names = {id(p): name for name, p in model.named_parameters()}
    groups = [{"params": [p for p in weights if names[id(p)] in decay], "weight_decay": weight_decay},
              {"params": [p for p in weights if names[id(p)] not in decay], "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def weight_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (decoupled weight decay, on the matrices) over every trainable parameter except the activations."""
    return torch.optim.AdamW(weight_groups(model, cfg.weight_decay, decay_parameter_names(model)),
                             lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2))


def activation_optimizer(activations: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer | None:
    """The activations' own optimizer: Adam (af_lr > 0), SGD with |af_lr| (af_lr < 0), or none (frozen)."""
    if cfg.af_lr == 0:
        activations.requires_grad_(False)
    params = [p for p in activations.parameters() if p.requires_grad]
    if not params:
        return None
    if cfg.af_lr > 0:
        return torch.optim.Adam(params, lr=cfg.af_lr, betas=(cfg.af_adam_beta1, cfg.af_adam_beta2))
    return torch.optim.SGD(params, lr=abs(cfg.af_lr))


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr

