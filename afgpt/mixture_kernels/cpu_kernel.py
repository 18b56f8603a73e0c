"""Lazy build of the C++ mixture kernel and its torch.library custom ops (afgpt::mixture_fwd/bwd).

The kernel is compiled on first use by afgpt.native_build (cached in the torch extensions directory, flags for
the CPU's vector unit). The custom ops carry fake implementations and an autograd formula, so they trace.
"""
from pathlib import Path

import torch

from ..native_build import NativeKernel

_SOURCE = Path(__file__).with_name("mixture_cpu.cpp")
_KERNEL = NativeKernel(_SOURCE, "afgpt_mixture_cpu", "mixture", vectorized=True)


def load() -> bool:
    """Build (once per machine and source version) and load the kernel; False if impossible."""
    return _KERNEL.load()


def load_error() -> Exception | None:
    """Why the last build failed (None if it did not)."""
    return _KERNEL.error()


@torch.library.custom_op("afgpt::mixture_fwd", mutates_args=(), device_types="cpu")
def mixture_fwd(x: torch.Tensor, weights: torch.Tensor, codes: list[int]) -> torch.Tensor:
    """sum_k weights[k] * f_codes[k](x) for fp32 x [R, C], weights [K, 1|R, 1|C] (see mixture_cpu.cpp)."""
    _KERNEL.require()
    return torch.ops.afgpt_mixture_cpu.forward(x, weights, codes)


@torch.library.custom_op("afgpt::mixture_bwd", mutates_args=(), device_types="cpu")
def mixture_bwd(grad: torch.Tensor, x: torch.Tensor, weights: torch.Tensor, codes: list[int],
                weights_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients for x and weights; the weights gradient is empty when weights_grad is False."""
    _KERNEL.require()
    return torch.ops.afgpt_mixture_cpu.backward(grad, x, weights, codes, weights_grad)


@mixture_fwd.register_fake
def _(x, weights, codes):
    return torch.empty_like(x)


@mixture_bwd.register_fake
def _(grad, x, weights, codes, weights_grad):
    return torch.empty_like(x), torch.empty_like(weights) if weights_grad else weights.new_empty(0)


def _setup_context(ctx, inputs, output):
    x, weights, codes = inputs
    ctx.save_for_backward(x, weights)
    ctx.codes = codes


def _backward(ctx, grad):
    x, weights = ctx.saved_tensors
    grad_x, grad_w = mixture_bwd(grad.contiguous(), x, weights, ctx.codes, ctx.needs_input_grad[1])
    return (grad_x if ctx.needs_input_grad[0] else None,
            grad_w if ctx.needs_input_grad[1] else None, None)


mixture_fwd.register_autograd(_backward, setup_context=_setup_context)
