"""The glue to train AfGPT with transformers.Trainer: AfTrainer (the activations' own learning rate and
betas) and ActivationPlotCallback."""
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from ..activation_set import find_activation_set
from ..plotting import plot_activations
from .optimizers import decay_parameter_names, split_parameters, weight_groups


class AfTrainer(Trainer):
    """transformers.Trainer that gives activation parameters their own learning rate and Adam betas.

    Use it like Trainer, plus `af_lr` (0 freezes the activations) and `af_betas`:
        AfTrainer(model=model, args=TrainingArguments(...), train_dataset=..., af_lr=0.1)
    The optimizer is the one `args.optim` / `optim_args` name; weight decay applies to what
    `get_decay_parameter_names` returns (decay_parameter_names: Trainer's rule, matrices only); the
    activations form their own group (af_lr, af_betas, no decay). The schedule set in
    TrainingArguments scales every group, as lm-afs does. SGD for activations (lm-afs's negative
    afLr) needs the afgpt training loop.
    """

    def __init__(self, *args, af_lr: float = 0.1, af_betas: tuple[float, float] = (0.99, 0.999), **kwargs):
        if af_lr < 0:
            raise ValueError(f"af_lr={af_lr}: AfTrainer uses Adam for activations; use `afgpt train` for SGD")
        self.af_lr, self.af_betas = af_lr, af_betas
        super().__init__(*args, **kwargs)

    def get_decay_parameter_names(self, model: torch.nn.Module) -> list[str]:
        return sorted(decay_parameter_names(model))

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            model = self.model if model is None else model
            if self.af_lr == 0:
                find_activation_set(model).requires_grad_(False)
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
            groups = weight_groups(model, self.args.weight_decay, set(self.get_decay_parameter_names(model)))
            _, activations = split_parameters(model)
            if activations:
                betas = {"betas": self.af_betas} if "betas" in optimizer_kwargs else {}
                groups.append({"params": activations, "lr": self.af_lr, "weight_decay": 0.0, **betas})
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer


class ActivationPlotCallback(TrainerCallback):
    """Plots the model's activation functions into <output_dir>/plots at every save and at the end."""

    def on_save(self, args, state, control, model=None, **kwargs):
        self._plot(args, state, model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._plot(args, state, model)

    @staticmethod
    def _plot(args, state, model) -> None:
        if state.is_world_process_zero and model is not None:
            plots = Path(args.output_dir) / "plots"
            plots.mkdir(parents=True, exist_ok=True)
            plot_activations(model, plots / f"activations-step{state.global_step}.png",
                             title=f"step {state.global_step}")

