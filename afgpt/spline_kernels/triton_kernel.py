"""Triton spline kernels (afgpt::spline_triton_fwd/bwd): the CUDA path of afgpt.spline_kernels.spline.

Same maths as afgpt.spline_torch and spline_cpu.cpp: K values on evenly spaced anchors on
[x_min, x_max], constant outside, values [K] (shared) or [C, K] (one spline per channel of x's
last dim), computed in fp32 and returned in x's dtype.

The values gradient is the PyTorch fallback's bottleneck on GPUs (an index_add of every element
into a few bins, i.e. atomics on a handful of addresses). Here each program sums the hat
functions g * max(0, 1 - |t - k|) of its elements into a register histogram and writes it as one
row of a partials buffer; a fixed-order sum over the rows follows. No atomics anywhere, so the
result is bit-identical run to run (also under torch.use_deterministic_algorithms), and frozen
values (values_grad=False) skip the histogram entirely.

triton is optional: without it `available()` is False and the ops must not be called. With
TRITON_INTERPRET=1 set before triton is first imported, the kernels run on CPU tensors in
Triton's interpreter (slow; for tests).
"""
import contextlib

import torch

from .registration import register_spline_ops

try:
    import triton
    import triton.language as tl
except ImportError:  # afgpt works without triton; available() says so
    triton = None

# Tuning (unmeasured on GPUs so far): the histogram costs ~4*K FP32 instructions per element.
_ACC_ELEMENTS = 4096  # register histogram entries per program (bins x rows x channels): 32 a thread
_TILE = 1024  # elements per program or loop step when no histogram is kept
_PROGRAMS_PER_SM = 4


def available() -> bool:
    """Whether triton imported (the kernels still need CUDA tensors, or TRITON_INTERPRET=1)."""
    return triton is not None


if triton is not None:
    @triton.jit
    def _lookup(x_ptr, v_ptr, r, cols, rows, channels, x_min, inv_h, K: tl.constexpr):
        """For the tile rows r x channels cols of x as [rows, channels]: offsets, mask, spline
        coordinate (raw, clamped to [0, K-1], and within its interval) and the interval's values."""
        mask = (r < rows)[:, None] & (cols < channels)[None, :]
        offs = r.to(tl.int64)[:, None] * channels + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        t_raw = (x - x_min) * inv_h
        t = tl.maximum(t_raw, 0.0, propagate_nan=tl.PropagateNan.ALL)  # NaN stays NaN, as in torch
        t = tl.minimum(t, K - 1.0, propagate_nan=tl.PropagateNan.ALL)
        i = tl.maximum(tl.minimum(t.to(tl.int32), K - 2), 0)  # t >= 0: truncation is floor
        row = v_ptr + cols[None, :] * K + i  # channels == 1 (cols == 0) for a shared spline
        v0 = tl.load(row, mask=mask, other=0.0)
        v1 = tl.load(row + 1, mask=mask, other=0.0)
        return offs, mask, t_raw, t, t - i, v0, v1

    @triton.jit
    def _forward_kernel(x_ptr, v_ptr, y_ptr, rows, channels, x_min, inv_h, K: tl.constexpr,
                        BR: tl.constexpr, BC: tl.constexpr):
        r = tl.program_id(0) * BR + tl.arange(0, BR)
        cols = tl.program_id(1) * BC + tl.arange(0, BC)
        offs, mask, _, _, frac, v0, v1 = _lookup(x_ptr, v_ptr, r, cols, rows, channels, x_min, inv_h,
                                                 K)
        tl.store(y_ptr + offs, (v0 + frac * (v1 - v0)).to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _backward_kernel(x_ptr, g_ptr, v_ptr, gx_ptr, part_ptr, rows, channels, rows_per_program,
                         x_min, inv_h, K: tl.constexpr, KP: tl.constexpr, BR: tl.constexpr,
                         BC: tl.constexpr, VALUES_GRAD: tl.constexpr):
        """Program (r, c) takes rows_per_program rows of BC channels of x as [rows, channels].

        With VALUES_GRAD it also writes its histogram to partials[r, channels, K].
        """
        pid_r = tl.program_id(0)
        cols = tl.program_id(1) * BC + tl.arange(0, BC)
        bins = tl.arange(0, KP)
        knots = bins.to(tl.float32)[:, None, None]
        acc = tl.zeros((KP, BR, BC), tl.float32)  # bins slowest: threads split the elements
        start = pid_r * rows_per_program
        for r0 in range(start, start + rows_per_program, BR):
            r = r0 + tl.arange(0, BR)
            offs, mask, t_raw, t, _, v0, v1 = _lookup(x_ptr, v_ptr, r, cols, rows, channels, x_min,
                                                       inv_h, K)
            g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # 0 where masked
            inside = (t_raw > 0) & (t_raw < K - 1)  # the spline is constant outside the range
            grad_x = tl.where(inside, g * ((v1 - v0) * inv_h), 0.0)
            tl.store(gx_ptr + offs, grad_x.to(gx_ptr.dtype.element_ty), mask=mask)
            if VALUES_GRAD:  # d y / d v[k] is the hat function max(0, 1 - |t - k|)
                hat = 1.0 - tl.abs(t[None, :, :] - knots)
                acc += g[None, :, :] * tl.maximum(hat, 0.0)
        if VALUES_GRAD:
            part = part_ptr + (pid_r * channels + cols[None, :]) * K + bins[:, None]
            tl.store(part, tl.sum(acc, axis=1), mask=(bins < K)[:, None] & (cols < channels)[None, :])


def _device(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device: make it x's."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _inv_h(values: torch.Tensor, x_min: float, x_max: float) -> float:
    return (values.shape[-1] - 1) / (x_max - x_min)


@torch.library.custom_op("afgpt::spline_triton_fwd", mutates_args=())
def spline_fwd(x: torch.Tensor, values: torch.Tensor, x_min: float, x_max: float) -> torch.Tensor:
    """Spline forward (x fp32/bf16, values fp32 [K] or [C, K]); returns a contiguous tensor."""
    x, values = x.contiguous(), values.contiguous()
    y = torch.empty_like(x)
    if x.numel():
        channels = values.shape[0] if values.dim() == 2 else 1
        rows = x.numel() // channels
        bc = min(triton.next_power_of_2(channels), 128)
        br = _TILE // bc
        with _device(x):
            _forward_kernel[(triton.cdiv(rows, br), triton.cdiv(channels, bc))](
                x, values, y, rows, channels, x_min, _inv_h(values, x_min, x_max),
                K=values.shape[-1], BR=br, BC=bc)
    return y


@torch.library.custom_op("afgpt::spline_triton_bwd", mutates_args=())
def spline_bwd(grad: torch.Tensor, x: torch.Tensor, values: torch.Tensor, x_min: float,
               x_max: float, values_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients for x and values; the values gradient is empty when values_grad is False."""
    x, grad, values = x.contiguous(), grad.contiguous(), values.contiguous()
    k = values.shape[-1]
    channels = values.shape[0] if values.dim() == 2 else 1
    grad_x = torch.empty_like(x)
    if not x.numel():
        return grad_x, torch.zeros_like(values) if values_grad else values.new_empty(0)
    rows = x.numel() // channels
    kp = triton.next_power_of_2(k)
    bc = max(1, min(triton.next_power_of_2(channels), 16, _ACC_ELEMENTS // kp))
    br = max(1, _ACC_ELEMENTS // (bc * kp)) if values_grad else max(1, _TILE // bc)
    col_blocks = triton.cdiv(channels, bc)
    # enough programs to fill the GPU, each with many rows to amortise its partials row
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 1
    target = max(1, _PROGRAMS_PER_SM * sms // col_blocks)
    rows_per_program = br * triton.cdiv(triton.cdiv(rows, br), target)
    row_blocks = triton.cdiv(rows, rows_per_program)
    partials = values.new_empty((row_blocks, channels, k) if values_grad else (0,))
    with _device(x):
        _backward_kernel[(row_blocks, col_blocks)](
            x, grad, values, grad_x, partials, rows, channels, rows_per_program, x_min,
            _inv_h(values, x_min, x_max), K=k, KP=kp, BR=br, BC=bc, VALUES_GRAD=values_grad)
    if not values_grad:
        return grad_x, values.new_empty(0)
    return grad_x, partials.sum(0).view_as(values)  # fixed order: deterministic


register_spline_ops(spline_fwd, spline_bwd)


def spline(x: torch.Tensor, values: torch.Tensor, x_min: float, x_max: float) -> torch.Tensor:
    """Autograd-aware Triton spline; same contract as afgpt.spline_kernels.spline."""
    return spline_fwd(x, values, float(x_min), float(x_max))
