"""Linear-spline evaluation in plain PyTorch (the portable reference path).

Kept as a flat module importing only torch so that Hub remote code can carry it.
"""
import torch


def spline(x: torch.Tensor, values: torch.Tensor, x_min: float, x_max: float) -> torch.Tensor:
    """Evaluate linear splines with evenly spaced anchors on [x_min, x_max], constant outside.

    values is [K] (one spline for every element) or [C, K] (one spline per channel of x's last dim).
    Computes in values' dtype (fp32 under autocast) and returns x's dtype.
    """
    k = values.shape[-1]
    h = (x_max - x_min) / (k - 1)
    t = ((x.to(values.dtype) - x_min) / h).clamp(0, k - 1)
    i = t.detach().floor().clamp(max=k - 2).long()
    slope = values[..., 1:] - values[..., :-1]
    intercept = values[..., :-1] - torch.arange(k - 1, device=values.device, dtype=values.dtype) * slope
    if values.dim() == 1:
        y = intercept[i] + t * slope[i]
    else:
        rows = torch.arange(values.shape[0], device=values.device)
        y = intercept[rows, i] + t * slope[rows, i]
    return y.to(x.dtype)
