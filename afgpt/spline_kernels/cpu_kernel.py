"""Lazy build of the C++ spline kernel and its torch.library custom ops (afgpt::spline_fwd/bwd).

The kernel is compiled on first use by afgpt.native_build (cached in the torch extensions
directory, flags for the CPU's vector unit). The custom ops carry fake
implementations and an autograd formula, so torch.compile(fullgraph=True) traces them.
"""
from pathlib import Path

import torch

from ..native_build import NativeKernel
from .registration import register_spline_ops

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


register_spline_ops(spline_fwd, spline_bwd)
