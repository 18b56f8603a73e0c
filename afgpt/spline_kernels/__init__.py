"""Linear-spline activations: a C++/OpenMP CPU kernel with a pure-PyTorch fallback.

Backend choice (environment variable AFGPT_SPLINE_BACKEND):
  auto (default) -- the C++ kernel for CPU tensors (x fp32/bf16, values fp32), built on first
                    use; the PyTorch fallback elsewhere or if the build fails (warns once).
  cpp            -- as auto, but a failed build is an error.
  torch          -- always the PyTorch fallback.
  triton         -- always the Triton kernel (CUDA tensors; CPU ones with TRITON_INTERPRET=1).
auto also runs CUDA tensors through the Triton kernel when triton imports (else warns once).
"""
import warnings

import torch

from .. import spline_torch as torch_spline
from ..native_build import BACKENDS, requested_backend, use_kernel
from . import cpu_kernel, triton_kernel

_warned: list[bool] = []
_triton_warned: list[bool] = []


def backend() -> str:
    """The requested backend, from AFGPT_SPLINE_BACKEND."""
    return requested_backend("AFGPT_SPLINE_BACKEND", (*BACKENDS, "triton"))


@torch.compiler.assume_constant_result
def kernel_enabled() -> bool:
    """Whether CPU tensors go to the C++ kernel (building it if needed).

    Evaluated once at trace time under torch.compile, so the build never lands in a graph.
    """
    return backend() != "triton" and use_kernel("AFGPT_SPLINE_BACKEND", cpu_kernel, "spline", _warned)


@torch.compiler.assume_constant_result
def triton_enabled(device_type: str) -> bool:
    """Whether tensors on device_type go to the Triton kernel (evaluated once at trace time)."""
    name = backend()
    if name == "triton" and not triton_kernel.available():
        raise RuntimeError("AFGPT_SPLINE_BACKEND=triton but triton is not installed")
    if name != "auto" or device_type != "cuda":
        return name == "triton"
    if not triton_kernel.available() and not _triton_warned:
        _triton_warned.append(True)
        warnings.warn("afgpt: triton is not installed; CUDA splines use the slower PyTorch fallback",
                      RuntimeWarning, stacklevel=3)
    return triton_kernel.available()


def spline(x: torch.Tensor, values: torch.Tensor, x_min: float, x_max: float) -> torch.Tensor:
    """Evaluate linear splines with evenly spaced anchors on [x_min, x_max], constant outside.

    values is [K] (one spline for every element) or [C, K] (one spline per channel of x's last dim).
    Computes in fp32 (values' dtype) and returns x's dtype.
    """
    if x.dtype in (torch.float32, torch.bfloat16) and values.dtype == torch.float32 and x.device == values.device:
        if x.device.type == "cpu" and kernel_enabled():  # the common case first: one backend check per call
            return torch.ops.afgpt.spline_fwd(x, values, float(x_min), float(x_max))
        if triton_enabled(x.device.type):
            return triton_kernel.spline(x, values, x_min, x_max)
    return torch_spline.spline(x, values, x_min, x_max)
