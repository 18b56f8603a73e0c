"""Token-adaptive mixing of activations ("More Expressive Feedforward Layers, Part I"): LA and MoA.

Both mix a fixed dictionary of activation functions f_1..f_K (`DICTIONARY`):
    la   LearnableMixture, an activation y = sum_k a_k f_k(x) with learned a (one set per slot, or per channel)
    moa  MoAFeedForward, a feed-forward W2(sum_k pi_k(h) f_k(h W1)) whose mixing weights pi_k(h) =
         sigmoid(h . u_k + b_k) depend on the token h and are shared by all of its hidden units
Both start as a chosen base activation (GELU by default), so swapping them into a baseline changes nothing at
step 0 (LA up to float rounding, MoA up to sigmoid(-gate_init); see MoAFeedForward). Mixtures are summed term by
term, never as a [K, ..., width] stack: eagerly on CPU by afgpt's fused C++ kernel (afgpt.mixture_kernels, one pass
over memory each way), else by a custom autograd function that keeps only x for the backward, under torch.compile
as plain expressions that inductor fuses (see `mix`). Still, K functions cost more than one: see
bench/bench_mixtures.py.

Like afgpt.activations, learnable tensors are fp32, forward returns the input's dtype, and modules with learned
mixing weights expose `initial_state()`, so hosts re-initialise them through `init_activation_module`.
Imports only torch (and the kernel when afgpt is installed): it sits below afgpt.activations and is copied to the
Hub as remote code.
"""
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

try:  # the fused CPU kernel, when afgpt is installed
    from afgpt.mixture_kernels import kernel_enabled, mixture as kernel_mixture
except ImportError:  # Hub remote code running without afgpt: _Mixture
    kernel_enabled, kernel_mixture = None, None

DICTIONARY: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "identity": lambda x: x,
    "relu": F.relu,
    "relu2": lambda x: F.relu(x).square(),
    "leaky_relu": lambda x: F.leaky_relu(x, 0.01),
    "gelu": F.gelu,
    "silu": F.silu,
    "tanh": torch.tanh,
}
DICTIONARY_NAMES = tuple(DICTIONARY)


def _tanh_from_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """tanh(x) = (s - c) / (s^2 + c^2) with s = sigmoid(x), c = 1 - s (both sides are (1 - e^-2x) / (1 + e^-2x)):
    exact up to ~1e-7 absolute in fp32, and shares silu's exp."""
    s = torch.sigmoid(x)
    c = 1 - s
    return (s - c) / (s * s + c * c)


# DICTIONARY's functions written over common subexpressions, which torch.compile evaluates once per element:
# silu and tanh share one sigmoid (one exp), relu and relu2 one relu.
_SHARED_FORMS = {**DICTIONARY, "silu": lambda x: x * torch.sigmoid(x), "tanh": _tanh_from_sigmoid}


def check_names(names: Sequence[str] | None, base: str) -> tuple[str, ...]:
    """The functions to mix (all by default) as a tuple, failing on unknown or repeated names or a base outside them."""
    names = DICTIONARY_NAMES if names is None else tuple(names)
    unknown = [n for n in names if n not in DICTIONARY]
    if unknown or len(set(names)) != len(names) or not names:
        raise ValueError(f"names={names!r} is invalid: use distinct names from {', '.join(DICTIONARY_NAMES)}")
    if base not in names:
        raise ValueError(f"base={base!r} is not among the mixed functions {', '.join(names)}")
    return names


def dictionary_values(x: torch.Tensor, names: Sequence[str] = DICTIONARY_NAMES) -> torch.Tensor:
    """f_k(x) for every name, stacked on a new last dimension: [..., K]. For analysis; `mix` avoids the stack."""
    return torch.stack([DICTIONARY[n](x) for n in names], dim=-1)


# g * f'(x) for each dictionary function, given x and y = f(x), by ATen's fused backward kernels where there is one.
_GRADIENTS: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "identity": lambda g, x, y: g,
    "relu": lambda g, x, y: torch.ops.aten.threshold_backward(g, x, 0),
    "relu2": lambda g, x, y: 2 * g * F.relu(x),
    "leaky_relu": lambda g, x, y: torch.ops.aten.leaky_relu_backward(g, x, 0.01, False),
    "gelu": lambda g, x, y: torch.ops.aten.gelu_backward(g, x),
    "silu": lambda g, x, y: torch.ops.aten.silu_backward(g, x),
    "tanh": lambda g, x, y: torch.ops.aten.tanh_backward(g, y),
}


class _Mixture(torch.autograd.Function):
    """sum_k w_k f_k(x) for eager mode: saves only x and the weights (autograd would keep all K f_k(x)), recomputes
    f_k(x) once per term in the backward and accumulates in place."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, names: tuple[str, ...], *weights: torch.Tensor) -> torch.Tensor:
        ctx.names = names
        ctx.save_for_backward(x, *weights)
        out = weights[0] * DICTIONARY[names[0]](x)
        for name, weight in zip(names[1:], weights[1:]):
            out.addcmul_(weight, DICTIONARY[name](x))
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, g: torch.Tensor):
        x, *weights = ctx.saved_tensors
        grad_x, grad_weights = None, []
        for k, (name, weight) in enumerate(zip(ctx.names, weights)):
            value = DICTIONARY[name](x)
            if ctx.needs_input_grad[0]:
                term = _GRADIENTS[name](g, x, value)
                grad_x = weight * term if grad_x is None else grad_x.addcmul_(weight, term)
            if ctx.needs_input_grad[2 + k]:
                value = g * value if value is x else value.mul_(g)  # identity returns x itself
                grad_weights.append(value.sum_to_size(weight.shape))
            else:
                grad_weights.append(None)
        return grad_x, None, *grad_weights


def _kernel_layout(x: torch.Tensor, weights: torch.Tensor) -> tuple[int, int] | None:
    """The kernel's view of stacked weights [K, *s] (s broadcast against x seen as [R, C]): (1, 1) shared,
    (1, C) per channel, (R, 1) per row (MoA's token gates); None for other layouts."""
    shape = weights.shape[1:]
    if len(shape) > x.dim():
        return None
    shape = (1,) * (x.dim() - len(shape)) + tuple(shape)
    rows, columns = _rows_columns(x)
    if all(n == 1 for n in shape):
        return 1, 1
    if all(n == 1 for n in shape[:-1]) and shape[-1] == columns:
        return 1, columns
    if shape[:-1] == x.shape[:-1] and shape[-1] == 1:
        return rows, 1
    return None


def _rows_columns(x: torch.Tensor) -> tuple[int, int]:
    """x seen as [R, C], C its last dimension."""
    return (x.shape[:-1].numel(), x.shape[-1]) if x.dim() else (1, 1)


def mix(x: torch.Tensor, names: Sequence[str], weights: torch.Tensor) -> torch.Tensor:
    """sum_k weights[k] * f_k(x), weights [K, ...] with each weights[k] broadcast against x, in fp32 or wider
    (seven rounded bf16 terms would add up), returned in x's dtype.

    Eager on CPU: afgpt's fused C++ kernel (one pass over memory each way) when afgpt is installed, the kernel
    builds and AFGPT_MIXTURE_BACKEND allows it, for fp32 and shared, per-channel or per-row weights;
    otherwise _Mixture. Under torch.compile: the plain sum over the shared-subexpression forms, which inductor
    differentiates and fuses with the fewest exps (measured faster than tracing _Mixture)."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    x32, weights = x.to(dtype), weights.to(dtype)
    if not torch.compiler.is_compiling():
        layout = _kernel_layout(x, weights) if _kernel_fits(x32, weights) else None
        if layout is not None and kernel_enabled():
            codes = [DICTIONARY_NAMES.index(name) for name in names]
            out = kernel_mixture(x32.reshape(_rows_columns(x)), weights.reshape(len(names), *layout), codes)
            return out.view(x.shape).to(x.dtype)
        return _Mixture.apply(x32, tuple(names), *weights.unbind(0)).to(x.dtype)
    out = None
    for name, weight in zip(names, weights.unbind(0), strict=True):
        term = weight * _SHARED_FORMS[name](x32)
        out = term if out is None else out + term
    return out.to(x.dtype)


def _kernel_fits(x: torch.Tensor, weights: torch.Tensor) -> bool:
    return (kernel_mixture is not None and x.device.type == "cpu" and weights.device.type == "cpu"
            and x.dtype == weights.dtype == torch.float32)


def one_hot(names: Sequence[str], base: str) -> torch.Tensor:
    """[K] fp32: 1 on `base`, 0 elsewhere."""
    return torch.tensor([float(n == base) for n in names])


class LearnableMixture(nn.Module):
    """The `la` activation: y = sum_k a_k f_k(x), learned a, starting as `base` (to float rounding: the CPU kernel's
    gelu is not bit-identical to F.gelu's oneDNN one; exactly with the PyTorch fallback).

    channels=None: one coefficient per function, [K], any input shape. channels=C: one set per channel of the last
    dimension, [K, C], for [..., C] inputs (the `channels` attribute tells plotting to feed [N, C]).
    """

    def __init__(self, base: str = "gelu", names: Sequence[str] | None = None, channels: int | None = None):
        super().__init__()
        self.base, self.names, self.channels = base, check_names(names, base), channels
        self.coefficients = nn.Parameter(self.initial_state()["coefficients"])

    def initial_state(self) -> dict[str, torch.Tensor]:
        a = one_hot(self.names, self.base)
        return {"coefficients": a if self.channels is None else a[:, None].repeat(1, self.channels)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mix(x, self.names, self.coefficients)

    def extra_repr(self) -> str:
        kind = "shared" if self.channels is None else f"per-channel={self.channels}"
        return f"base={self.base}, names=({', '.join(self.names)}), {kind}"


def effective_rank(matrix: torch.Tensor) -> torch.Tensor:
    """exp(entropy of the singular values normalised to sum 1) (Roy & Vetterli, 2007): 1 for a rank-one matrix,
    K when all K singular values are equal; 0-d fp32 tensor. Uncentred, so constant gates count as rank one."""
    m = matrix.double()
    return rank_from_gram(m.T @ m)


def rank_from_gram(gram: torch.Tensor) -> torch.Tensor:
    """effective_rank from the K x K Gram matrix M^T M: its eigenvalues are the squared singular values of M, so
    the rank of a [tokens, K] matrix seen in pieces needs only the sum of the pieces' Grams (no SVD of M)."""
    s = torch.linalg.eigvalsh(gram.double()).clamp_min(0).sqrt()
    p = s / s.sum().clamp_min(torch.finfo(s.dtype).tiny)
    return torch.exp(-torch.special.xlogy(p, p).sum()).float()


class GateStatistics:
    """Running statistics of [tokens, K] gate matrices seen batch by batch: per-function mean and (biased)
    variance over all tokens, and the effective rank of all of them stacked. A collapse to constant gates (MoA
    turned into a fixed mixture, LA) shows as variance ~0 and effective rank ~1."""

    def __init__(self):
        self.count, self.total, self.squares, self.gram = 0, 0.0, 0.0, 0.0

    @torch.no_grad()
    def update(self, gates: torch.Tensor) -> "GateStatistics":
        g = gates.detach().reshape(-1, gates.shape[-1]).double()
        self.count += g.shape[0]
        self.total = self.total + g.sum(0)
        self.squares = self.squares + (g * g).sum(0)
        self.gram = self.gram + g.T @ g
        return self

    def result(self) -> dict[str, torch.Tensor]:
        mean = self.total / self.count
        return {"mean": mean.float(), "variance": (self.squares / self.count - mean * mean).clamp_min(0).float(),
                "effective_rank": rank_from_gram(self.gram)}


def gate_statistics(gates: torch.Tensor) -> dict[str, torch.Tensor]:
    """GateStatistics of one [tokens, K] gate matrix."""
    return GateStatistics().update(gates).result()


class TokenGates(nn.Module):
    """pi(h) = sigmoid(h u^T + b): one gate per token and function, [..., hidden] -> [..., K].

    Starts with u = 0 and b = +gate_init on `base`, -gate_init elsewhere: every token gets the base function.
    Not an nn.Linear, so hosts initialise it by `initial_state()` instead of their N(0, 0.02) Linear rule.
    """

    def __init__(self, hidden_size: int, names: tuple[str, ...], base: str, gate_init: float):
        super().__init__()
        self.hidden_size, self.names, self.base, self.gate_init = hidden_size, names, base, gate_init
        state = self.initial_state()
        self.weight = nn.Parameter(state["weight"])
        self.bias = nn.Parameter(state["bias"])

    def initial_state(self) -> dict[str, torch.Tensor]:
        return {"weight": torch.zeros(len(self.names), self.hidden_size),
                "bias": (2 * one_hot(self.names, self.base) - 1) * self.gate_init}

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(F.linear(h, self.weight.to(h.dtype), self.bias.to(h.dtype)))

    def extra_repr(self) -> str:
        return f"hidden={self.hidden_size}, K={len(self.names)}, init=±{self.gate_init:g}"


class MoAFeedForward(nn.Module):
    """The `moa` feed-forward: proj(sum_k pi_k(h) f_k(fc(h))), token-dependent gates pi (TokenGates).

    glu=True: proj((sum_k pi_k(h) f_k(fc(h))) * up(h)). Our reading of "the GLU form gates both branches": the
    token gates mix the activations of the gate branch fc, whose result multiplies the linear branch up, so the
    gates reach both. intermediate_size is taken as given (scale it by 2/3 yourself to match an MLP's parameters).
    Like afgpt.ffn.MLP: no biases in fc/up/proj unless bias=True, proj marked zero_init.

    Init: gates sigmoid(+gate_init) on base, sigmoid(-gate_init) elsewhere (u = 0), so the layer starts within
    about e^-gate_init (4.5e-5 for 10) of the base-activation MLP, per unit of |f_k(z)|. Larger gate_init is closer but
    saturates the sigmoids (gate gradients scale by e^-gate_init; Adam rescales them).
    """

    def __init__(self, hidden_size: int, intermediate_size: int, base: str = "gelu",
                 names: Sequence[str] | None = None, glu: bool = False, bias: bool = False,
                 gate_init: float = 10.0):
        super().__init__()
        self.names, self.base, self.glu = check_names(names, base), base, glu
        self.fc = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up = nn.Linear(hidden_size, intermediate_size, bias=bias) if glu else None
        self.gates = TokenGates(hidden_size, self.names, base, gate_init)
        self.proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.proj.zero_init = True

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        gates = self.gates(h)
        z = self.fc(h)
        mixed = mix(z, self.names, gates.movedim(-1, 0).unsqueeze(-1))
        return self.proj(mixed * self.up(h) if self.glu else mixed)

    def extra_repr(self) -> str:
        params = sum(p.numel() for p in self.parameters())
        return f"base={self.base}, names=({', '.join(self.names)}), glu={self.glu}, params={params:,}"
