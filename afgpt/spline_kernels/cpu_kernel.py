"""Lazy build of the C++ spline kernel and its torch.library custom ops (afgpt::spline_fwd/bwd).

The kernel is compiled on first use by afgpt.native_build (cached in the torch extensions
directory, flags for the CPU's vector unit). The custom ops carry fake
implementations and an autograd formula, so torch.compile(fullgraph=True) traces them.
"""
from pathlib import Path

import torch

from ..native_build import NativeKernel

_SOURCE = Path(__file__).with_name("spline_cpu.cpp")
_KERNEL = NativeKernel(_SOURCE, "afgpt_spline_cpu", "spline")


def load() -> bool:
    """Build (once per machine and source version) and load the kernel; False if impossible."""
    return _KERNEL.load()


def load_error() -> Exception | None:
    """Why the last build failed (None if it did not)."""
    return _KERNEL.error()


@torch.library.custom_op("afgpt::spline_fwd", mutates_args=(), device_types="cpu")
def spline_fwd(x: torch.Tensor, values: torch.Tensor, x_min: float, x_max: float) -> torch.Tensor:
    """Spline forward on CPU (x fp32/bf16, values fp32 [K] or [C, K])."""
    _KERNEL.require()
    return torch.ops.afgpt_spline_cpu.forward(x, values, x_min, x_max)


@torch.library.custom_op("afgpt::spline_bwd", mutates_args=(), device_types="cpu")
def spline_bwd(grad: torch.Tensor, x: torch.Tensor, values: torch.Tensor, x_min: float,
               x_max: float, values_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients for x and values; the values gradient is empty when values_grad is False."""
    _KERNEL.require()
    return torch.ops.afgpt_spline_cpu.backward(grad, x, values, x_min, x_max, values_grad)


@spline_fwd.register_fake
def _(x, values, x_min, x_max):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@spline_bwd.register_fake
def _(grad, x, values, x_min, x_max, values_grad):
    grad_v = torch.empty_like(values) if values_grad else values.new_empty(0)
    return torch.empty_like(x, memory_format=torch.contiguous_format), grad_v


def _setup_context(ctx, inputs, output):
    x, values, x_min, x_max = inputs
    ctx.save_for_backward(x, values)
    ctx.x_range = (x_min, x_max)


def _backward(ctx, grad):
    x, values = ctx.saved_tensors
    grad_x, grad_v = spline_bwd(grad, x, values, *ctx.x_range, ctx.needs_input_grad[1])
    return (grad_x if ctx.needs_input_grad[0] else None,
            grad_v if ctx.needs_input_grad[1] else None, None, None)


spline_fwd.register_autograd(_backward, setup_context=_setup_context)
