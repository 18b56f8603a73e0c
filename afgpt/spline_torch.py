"""Pure-PyTorch linear splines: the fallback of the C++ kernel, with the same maths.

Used on devices without a kernel, when the kernel cannot be built, or when forced with
AFGPT_SPLINE_BACKEND=torch. Everything is plain tensor ops, so torch.compile can fuse it.
A flat module importing only torch, so Hub remote code (which copies `from .x import` siblings)
carries it along with the model.
"""
import torch


def _grid(x: torch.Tensor, values: torch.Tensor, x_min: float, x_max: float):
    """Spline coordinate of x (raw and clamped to [0, K-1]) and flat table positions.

    Positions index tables of shape [S, K-1] (S = 1 for a shared spline, C per channel);
    NaN coordinates map to interval 0 so that indexing stays in bounds.
    """
    k = values.shape[-1]
    inv_h = (k - 1) / (x_max - x_min)
    t_raw = (x.to(values.dtype) - x_min) * inv_h
    t = t_raw.clamp(0, k - 1)
    i = t.long().clamp(0, k - 2)  # t >= 0, so truncation is floor
    if values.dim() == 2:
        channels = torch.arange(values.shape[0], device=x.device) * (k - 1)
        return t_raw, t, i, i + channels
    return t_raw, t, i, i


def _tables(values: torch.Tensor):
    """Per-interval slope d[k] = v[k+1] - v[k] and intercept c[k] = v[k] - k*d[k]."""
    d = values[..., 1:] - values[..., :-1]
    k = torch.arange(d.shape[-1], device=values.device, dtype=values.dtype)
    return values[..., :-1] - k * d, d


def forward(x: torch.Tensor, values: torch.Tensor, x_min: float, x_max: float) -> torch.Tensor:
    """y = c[i] + t*d[i], computed in values' dtype and returned in x's dtype."""
    _, t, _, pos = _grid(x, values, x_min, x_max)
    c, d = _tables(values)
    return (torch.take(c, pos) + t * torch.take(d, pos)).to(x.dtype)


def backward(grad: torch.Tensor, x: torch.Tensor, values: torch.Tensor, x_min: float,
             x_max: float, values_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gradients for x and (if values_grad) values, recomputing the intervals from x."""
    k = values.shape[-1]
    t_raw, t, i, pos = _grid(x, values, x_min, x_max)
    g = grad.to(values.dtype)
    _, d = _tables(values)
    inside = (t_raw > 0) & (t_raw < k - 1)  # the spline is constant outside the range
    slope = torch.where(inside, torch.take(d * ((k - 1) / (x_max - x_min)), pos), 0.0)
    grad_x = (g * slope).to(x.dtype)
    if not values_grad:
        return grad_x, None
    # A[i] += g and B[i] += g*(t-i) per spline; grad_v[k] = A[k] - B[k] + B[k-1]
    cell = (pos + pos.div(k - 1, rounding_mode="floor")).flatten()  # position in [S, K]
    zeros = torch.zeros(values.numel(), device=values.device, dtype=values.dtype)
    a = zeros.index_add(0, cell, g.flatten()).view_as(values)
    b = zeros.index_add(0, cell, (g * (t - i)).flatten()).view_as(values)
    grad_v = a - b + torch.nn.functional.pad(b[..., :-1], (1, 0))
    return grad_x, grad_v


class _Spline(torch.autograd.Function):
    """Saves only x and values; the backward recomputes everything else."""

    @staticmethod
    def forward(ctx, x, values, x_min, x_max):
        ctx.save_for_backward(x, values)
        ctx.x_range = (x_min, x_max)
        return forward(x, values, x_min, x_max)

    @staticmethod
    def backward(ctx, grad):
        x, values = ctx.saved_tensors
        grad_x, grad_v = backward(grad, x, values, *ctx.x_range, ctx.needs_input_grad[1])
        return grad_x if ctx.needs_input_grad[0] else None, grad_v, None, None


def spline(x: torch.Tensor, values: torch.Tensor, x_min: float, x_max: float) -> torch.Tensor:
    """Autograd-aware pure-PyTorch spline; same contract as afgpt.spline_kernels.spline."""
    return _Spline.apply(x, values, x_min, x_max)
