"""Linear-spline activations: a C++/OpenMP CPU kernel with a pure-PyTorch fallback.

Backend choice (environment variable AFGPT_SPLINE_BACKEND):
  auto (default) -- the C++ kernel for CPU tensors (x fp32/bf16, values fp32), built on first
                    use; the PyTorch fallback elsewhere or if the build fails (warns once).
  cpp            -- as auto, but a failed build is an error.
  torch          -- always the PyTorch fallback.
"""
import torch

from .. import spline_torch as torch_spline
from ..native_build import requested_backend, use_kernel
from . import cpu_kernel

_warned: list[bool] = []


def backend() -> str:
    """The requested backend, from AFGPT_SPLINE_BACKEND."""
    return requested_backend("AFGPT_SPLINE_BACKEND")


@torch.compiler.assume_constant_result
def kernel_enabled() -> bool:
    """Whether CPU tensors go to the C++ kernel (building it if needed).

    Evaluated once at trace time under torch.compile, so the build never lands in a graph.
    """
    return use_kernel("AFGPT_SPLINE_BACKEND", cpu_kernel, "spline", _warned)


def _kernel_fits(x: torch.Tensor, values: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and values.device.type == "cpu"
            and x.dtype in (torch.float32, torch.bfloat16) and values.dtype == torch.float32)


def spline(x: torch.Tensor, values: torch.Tensor, x_min: float, x_max: float) -> torch.Tensor:
    """Evaluate linear splines with evenly spaced anchors on [x_min, x_max], constant outside.

    values is [K] (one spline for every element) or [C, K] (one spline per channel of x's last dim).
    Computes in fp32 (values' dtype) and returns x's dtype.
    """
    if _kernel_fits(x, values) and kernel_enabled():
        return torch.ops.afgpt.spline_fwd(x, values, float(x_min), float(x_max))
    return torch_spline.spline(x, values, x_min, x_max)
