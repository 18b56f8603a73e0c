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
import torch.distributed as dist
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
    """One model of a run: its weights' optimizer, data stream, first step and schedule offset, and whether this
    process trains it (see ReplicaPlacement)."""

    index: int
    model: nn.Module
    optimizer: torch.optim.Optimizer
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]]  # TokenBatches; one object when replicas share data
    start: int = 0
    schedule_offset: int = 0
    owned: bool = True

    def is_active(self, step: int) -> bool:
        """Replicas before their staggered start do no forward or backward."""
        return step >= self.start


@dataclass(frozen=True)
class ReplicaPlacement:
    """Stage I on several processes (`accelerate launch`): replica m is trained by rank m % world_size.

    Every process holds every replica and reads every replica's data stream, so its state (and a checkpoint) is the
    one-process state, but it computes only its own replicas. The collectives below make the result the same as in
    one process up to the order of float sums: the shared activations' gradient is the mean over all active
    replicas, the losses of all replicas reach every rank, and `sync` brings every replica's weights and optimizer
    state from its owner to all ranks (before a checkpoint). Replicas are never wrapped in DistributedDataParallel,
    which would average their own weights. With one process every method is a no-op or plain arithmetic.
    """

    rank: int = 0
    world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def owner(self, m: int) -> int:
        return m % self.world_size

    def owns(self, m: int) -> bool:
        return self.owner(m) == self.rank

    def gather_results(self, results: dict[int, tuple[float, float]], n_models: int,
                       device: torch.device) -> dict[int, tuple[float, float]]:
        """{replica: (loss, accuracy)} of every rank's active replicas, on every rank (a NaN stays a NaN)."""
        if not self.distributed:
            return results
        table = torch.zeros(n_models, 3, dtype=torch.float64, device=device)
        for m, (loss, accuracy) in results.items():
            table[m] = torch.tensor([loss, accuracy, 1.0], dtype=torch.float64)
        dist.all_reduce(table)
        return {m: (loss, accuracy) for m, (loss, accuracy, present) in enumerate(table.tolist()) if present}

    def reduce_shared_gradients(self, params: list[nn.Parameter], n_active: int) -> None:
        """The shared parameters' gradients, summed over this rank's active replicas, become the mean over all
        `n_active` replicas of all ranks; a parameter no replica gave a gradient keeps none (as in one process)."""
        if self.distributed and params:
            device = params[0].device
            present = torch.tensor([float(p.grad is not None) for p in params], device=device)
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
            dist.all_reduce(present)
            dist.all_reduce(flat)
            for p, has_grad, grad in zip(params, present.tolist(), flat.split([p.numel() for p in params])):
                p.grad = grad.view_as(p).clone() if has_grad else None
        average_shared_gradients(params, n_active)

    def total_norm(self, own: list[torch.Tensor], shared: list[torch.Tensor], device: torch.device) -> torch.Tensor:
        """The gradient norm over all replicas' own gradients (`own`: this rank's, possibly none) and the shared
        ones (already the same on every rank), for clipping as one process clips the union of all parameters;
        computed on `device`, the one the processes' collectives use."""
        squared = torch.zeros((), dtype=torch.float64, device=device)
        if own:
            squared += torch.nn.utils.get_total_norm(own).double().to(device) ** 2
        if self.distributed:
            dist.all_reduce(squared)
        if shared:
            squared += torch.nn.utils.get_total_norm(shared).double().to(device) ** 2
        return squared.sqrt().float()

    def sync(self, replicas: list["Replica"]) -> None:
        """Every replica's weights, buffers and optimizer state broadcast from its owner to all ranks."""
        if not self.distributed:
            return
        for replica in replicas:
            src = self.owner(replica.index)
            for tensor in replica.model.state_dict().values():
                dist.broadcast(tensor, src)
            state = [replica.optimizer.state_dict() if self.owns(replica.index) else None]
            dist.broadcast_object_list(state, src)
            if not self.owns(replica.index):
                replica.optimizer.load_state_dict(state[0])
