"""Lazy build of the C++ spline kernel and its torch.library custom ops (afgpt::spline_fwd/bwd).

The kernel is compiled on first use with torch.utils.cpp_extension (cached in the torch
extensions directory) with flags for the CPU's vector unit. The custom ops carry fake
implementations and an autograd formula, so torch.compile(fullgraph=True) traces them.
"""
import hashlib
import sys
import threading
from pathlib import Path

import torch

_SOURCE = Path(__file__).with_name("spline_cpu.cpp")
_ARCH_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512vl", "-mavx512bw", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
}
_lock = threading.Lock()
_status: dict = {}  # "ok": bool once a build was tried, "error": the exception if it failed


def _build_flags() -> tuple[str, list[str]]:
    """Extension name and compiler flags; the name changes with the source and flags."""
    capability = torch.backends.cpu.get_cpu_capability()
    flags = ["-O3", "-fopenmp", *_ARCH_FLAGS.get(capability, [])]
    digest = hashlib.sha1(_SOURCE.read_bytes() + " ".join(flags).encode()).hexdigest()[:12]
    return f"afgpt_spline_cpu_{capability.lower()}_{digest}", flags


def load() -> bool:
    """Build (once per machine and source version) and load the kernel; False if impossible."""
    with _lock:
        if "ok" not in _status:
            try:
                from torch.utils import cpp_extension  # setuptools and friends: only when the kernel is built

                name, flags = _build_flags()
                build_dir = cpp_extension._get_build_directory(name, verbose=False)
                if not (Path(build_dir) / f"{name}.so").exists():
                    print("afgpt: compiling the spline CPU kernel (once, ~15 s)...",
                          file=sys.stderr)
                cpp_extension.load(name, [str(_SOURCE)], extra_cflags=flags,
                                   extra_ldflags=["-fopenmp"], is_python_module=False,
                                   verbose=False)
                _status["ok"] = True
            except Exception as err:  # no compiler, no ninja, build error: caller falls back
                _status.update(ok=False, error=err)
        return _status["ok"]


def load_error() -> Exception | None:
    """Why the last build failed (None if it did not)."""
    return _status.get("error")


def _require_kernel() -> None:
    if not load():
        raise RuntimeError(f"afgpt spline CPU kernel unavailable: {load_error()}")


@torch.library.custom_op("afgpt::spline_fwd", mutates_args=(), device_types="cpu")
def spline_fwd(x: torch.Tensor, values: torch.Tensor, x_min: float, x_max: float) -> torch.Tensor:
    """Spline forward on CPU (x fp32/bf16, values fp32 [K] or [C, K])."""
    _require_kernel()
    return torch.ops.afgpt_spline_cpu.forward(x, values, x_min, x_max)


@torch.library.custom_op("afgpt::spline_bwd", mutates_args=(), device_types="cpu")
def spline_bwd(grad: torch.Tensor, x: torch.Tensor, values: torch.Tensor, x_min: float,
               x_max: float, values_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients for x and values; the values gradient is empty when values_grad is False."""
    _require_kernel()
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
