"""Mixtures of the activation dictionary (afgpt.mixtures): a fused C++/OpenMP CPU kernel.

Backend choice (environment variable AFGPT_MIXTURE_BACKEND):
  auto (default) -- the C++ kernel for eager fp32 CPU tensors, built on first use; afgpt.mixtures' PyTorch
                    fallback elsewhere or if the build fails (warns once).
  cpp            -- as auto, but a failed build is an error.
  torch          -- always the PyTorch fallback.
"""
import torch

from ..native_build import requested_backend, use_kernel
from . import cpu_kernel

_warned: list[bool] = []


def backend() -> str:
    """The requested backend, from AFGPT_MIXTURE_BACKEND."""
    return requested_backend("AFGPT_MIXTURE_BACKEND")


def kernel_enabled() -> bool:
    """Whether CPU tensors go to the C++ kernel (building it if needed)."""
    return use_kernel("AFGPT_MIXTURE_BACKEND", cpu_kernel, "mixture", _warned)


def mixture(x: torch.Tensor, weights: torch.Tensor, codes: list[int]) -> torch.Tensor:
    """sum_k weights[k] * f_codes[k](x) by the kernel: x fp32 [R, C] (made contiguous), weights fp32
    [K, 1|R, 1|C]; differentiable in both."""
    return torch.ops.afgpt.mixture_fwd(x.contiguous(), weights.contiguous(), codes)
