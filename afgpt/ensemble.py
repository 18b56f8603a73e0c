"""Stage I of two-stage activation discovery (lm-afs): replicas that share their learnable activations.

Every replica is a full AfGPT model with its own weights, data stream and weight optimizer, but all of
them hold the same activation set (replica 0's, afgpt.activation_set), so one set of activation
parameters learns from all replicas at once. Training many models against one set of activations
keeps the activations from co-adapting to one set of weights, which is what makes them reusable in
stage II. Replicas can start at staggered steps, so at any time the activations see models at
different stages of training.
"""
import copy
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from torch import nn

from .activation_set import find_activation_set, share_activation_set

STAGGERED_MODES = (0, 1, 2)  # 0 all start at step 0; 1 staggered, common schedule; 2 staggered, own schedule


def start_steps(n_models: int, max_steps: int, staggered: int) -> list[int]:
    """First training step of each replica: round(linspace(0, max_steps, n_models + 1))[m] (lm-afs)."""
    if staggered not in STAGGERED_MODES:
        raise ValueError(f"staggered_starts={staggered}: use 0 (off), 1 (common schedule) or 2 (own schedule)")
    if n_models < 1:
        raise ValueError(f"n_models={n_models} must be >= 1")
    if n_models == 1 or staggered == 0:
        return [0] * n_models
    return [int(s) for s in np.round(np.linspace(0, max_steps, n_models + 1))[:-1]]


def schedule_offsets(starts: list[int], staggered: int) -> list[int]:
    """Step at which each replica's learning-rate schedule begins: its own start in mode 2, else 0."""
    return list(starts) if staggered == 2 else [0] * len(starts)


def build_replicas(make_model: Callable[[int], nn.Module], n_models: int, same_init: bool) -> list[nn.Module]:
    """`n_models` models (AfGPT or patched) sharing replica 0's activation set.

    `make_model(m)` builds replica m with freshly drawn weights (the caller seeds it per replica);
    with `same_init` the other replicas start as exact copies of replica 0 instead.
    """
    first = make_model(0)
    replicas = [first]
    for m in range(1, n_models):
        replica = copy.deepcopy(first) if same_init else make_model(m)
        share_activation_set(replica, find_activation_set(first))
        replicas.append(replica)
    return replicas


def average_shared_gradients(params: Iterable[nn.Parameter], n_active: int) -> None:
    """Turn the shared parameters' gradients, summed over `n_active` replicas' backward passes, into their mean."""
    if n_active > 1:
        for p in params:
            if p.grad is not None:
                p.grad.div_(n_active)


@dataclass
class Replica:
    """One model of a run: its weights' optimizer, data stream, first step and schedule offset."""

    index: int
    model: nn.Module
    optimizer: torch.optim.Optimizer
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]]  # TokenBatches; one object when replicas share data
    start: int = 0
    schedule_offset: int = 0

    def is_active(self, step: int) -> bool:
        """Replicas before their staggered start do no forward or backward."""
        return step >= self.start
