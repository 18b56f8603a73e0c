"""B-spline KAN layers: efficient-kan's KANLinear with a basis that is cheap to train, and a KAN feed-forward.

efficient-kan (github.com/Blealtan/efficient-kan) evaluates all G+k B-splines of every input with the Cox-de Boor
recursion on [N, in, G+2k+1] tensors and lets autograd keep every level for the backward. Yet on each knot interval
every B-spline is a polynomial of degree k. So each call first turns the grid into a small table (per feature and
interval, the k+1 coefficients of all G+k B-splines, interpolated at Chebyshev nodes); an input then needs only its
interval (one comparison per knot), that row of the table and Horner's rule: shape-static elementwise work without
[N, in, G+2k+1] intermediates, which torch.compile fuses into a few kernels. The backward evaluates a table of
the splines' derivatives at the saved rows and coordinates (8 bytes an input element). Grids may be non-uniform
(update_grid makes them so); outputs and gradients match efficient-kan's formulation to fp32 rounding, inside and
outside the grid.

Parameter and buffer names and shapes are efficient-kan's, so state dicts map over. One deliberate difference:
update_grid keeps the function on the data (efficient-kan refits spline_weight to the function including
spline_scaler, so the scaler is applied twice afterwards).

Imports only torch: this file is copied to the Hub as remote code next to the modeling file.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn


def _cox_de_boor(x: torch.Tensor, grid: torch.Tensor, k: int) -> torch.Tensor:
    """All order-k B-splines at x [N, in] on per-feature knots grid [in, K]: [N, in, K-1-k] (efficient-kan's way)."""
    x = x.unsqueeze(-1)
    bases = ((x >= grid[:, :-1]) & (x < grid[:, 1:])).to(x.dtype)
    for j in range(1, k + 1):
        left = (x - grid[:, :-(j + 1)]) / (grid[:, j:-1] - grid[:, :-(j + 1)])
        right = (grid[:, j + 1:] - x) / (grid[:, j + 1:] - grid[:, 1:-j])
        bases = left * bases[..., :-1] + right * bases[..., 1:]
    return bases


def _cox_de_boor_slopes(x: torch.Tensor, grid: torch.Tensor, k: int) -> torch.Tensor:
    """d/dx of the order-k B-splines at x [N, in], from the order k-1 ones: [N, in, K-1-k]."""
    lower = _cox_de_boor(x, grid, k - 1)
    return k * (lower[..., :-1] / (grid[:, k:-1] - grid[:, :-k - 1])
                - lower[..., 1:] / (grid[:, k + 1:] - grid[:, 1:-k]))


def _chebyshev_inverse_vandermonde(k: int) -> tuple[tuple[float, ...], tuple[tuple[float, ...], ...]]:
    """The k+1 Chebyshev nodes in [-1, 1] and the matrix that maps a degree-k polynomial's values there to its
    coefficients of v^0..v^k; with these nodes and v centred on the interval, fp32 suffices (~1e-7 errors, k <= 4)."""
    nodes = torch.cos((2 * torch.arange(k, -1, -1, dtype=torch.float64, device="cpu") + 1) * math.pi / (2 * k + 2))
    inverse = torch.linalg.inv(torch.vander(nodes, increasing=True))
    return tuple(nodes.tolist()), tuple(map(tuple, inverse.tolist()))


def _poly_table(grid: torch.Tensor, k: int, vandermonde: tuple, dtype: torch.dtype, slopes: bool = False):
    """The B-splines (or, with slopes, their x-derivatives) as polynomials on each knot interval, in
    v = (x - mid) / half, which runs over [-1, 1] on the interval. Returns the coefficients [k+1, (K+1) * in, G+k]
    (power, row, spline), each row's mid and 1/half [(K+1) * in], and the knots [K, in]. Row i * in + f is feature
    f's interval i-1; rows i = 0 and i = K stand for inputs left and right of the grid (all zero). The pieces are
    interpolated from the splines' values at k+1 nodes per interval, with elementwise ops only: exact up to
    rounding, whatever the autocast or TF32 matmul settings."""
    nodes, inverse = vandermonde
    g = grid.to(dtype)
    features, knots = g.shape
    mid, half = ((g[:, 1:] + g[:, :-1]) / 2).T, ((g[:, 1:] - g[:, :-1]) / 2).T  # [K-1, in]
    points = mid + half * torch.tensor(nodes, dtype=dtype, device=g.device)[:, None, None]  # [k+1, K-1, in]
    values = (_cox_de_boor_slopes if slopes else _cox_de_boor)(points.flatten(0, 1), g, k)
    values = F.pad(values.view(k + 1, knots - 1, features, -1), (0, 0, 0, 0, 1, 1))
    coef = torch.stack([sum(a * value for a, value in zip(weights, values)) for weights in inverse])
    # one small table for the lookups: torch.compile then stores it once and reads the knots contiguously
    small = torch.cat([F.pad(mid, (0, 0, 1, 1)), F.pad(1 / half, (0, 0, 1, 1)), g.T])
    return coef.flatten(1, 2), *small[:2 * knots + 2].view(2, -1), small[2 * knots + 2:]


def _locate(x: torch.Tensor, knots: torch.Tensor, mid: torch.Tensor, inv_half: torch.Tensor):
    """Each input's table row (int32) and its coordinate v on that row's interval."""
    features = x.shape[-1]
    count = torch.zeros_like(x, dtype=torch.int32)
    for knot in knots:  # a comparison per knot: cheaper than a search for so few, and it fuses
        count += x >= knot
    row = count * features + torch.arange(features, device=x.device, dtype=torch.int32)
    return row, (x - mid[row]) * inv_half[row]


def _horner(coef: torch.Tensor, row: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The polynomials of the given table rows at v: [..., G+k]."""
    index, v = row.flatten(), v.reshape(-1, 1)
    out = coef[-1].index_select(0, index)
    for p in range(len(coef) - 2, -1, -1):
        out = torch.addcmul(coef[p].index_select(0, index), out, v)
    return out.view(*row.shape, -1)


def _basis(x: torch.Tensor, grid: torch.Tensor, k: int, vandermonde: tuple, dtype: torch.dtype) -> torch.Tensor:
    """The dense B-spline basis [..., in, G+k] of x [..., in], without autograd, computed in dtype."""
    coef, mid, inv_half, knots = _poly_table(grid, k, vandermonde, dtype)
    return _horner(coef, *_locate(x.to(dtype), knots, mid, inv_half))


class _BSplineBasis(torch.autograd.Function):
    """Dense basis computed in fp32, returned in x's dtype. Saves each input's table row and v (8 bytes an element);
    the backward evaluates the slope table there (no gradient for the grid)."""

    @staticmethod
    def forward(ctx, x, grid, k, vandermonde):
        coef, mid, inv_half, knots = _poly_table(grid, k, vandermonde, torch.float32)
        row, v = _locate(x.float(), knots, mid, inv_half)
        ctx.save_for_backward(row, v, grid)
        ctx.k, ctx.vandermonde, ctx.dtype = k, vandermonde, x.dtype
        return _horner(coef, row, v).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        row, v, grid = ctx.saved_tensors
        slope = _poly_table(grid, ctx.k, ctx.vandermonde, torch.float32, slopes=True)[0]
        return (grad.float() * _horner(slope, row, v)).sum(-1).to(ctx.dtype), None, None, None


class KANLinear(nn.Module):
    """y = base_weight @ base_activation(x) + scaled spline weights @ B-spline basis(x) (efficient-kan's KANLinear).

    Each feature has its own knots `grid` [in, G+2k+1]: grid_range cut into grid_size intervals and extended by
    spline_order (k) intervals on each side. Within grid_range the G+k B-splines sum to one; in the k extension
    intervals they fade out, and beyond them the spline branch is exactly zero, leaving only the base branch.
    `outside_fraction(x)` measures how much input lies outside grid_range (the grid's inner knots after update_grid);
    to collect it during training without a sync, set `track_outside = True` and read the 0-dim tensor
    `last_outside_fraction` that each forward then leaves (unset, forward does no extra work).

    base_activation is applied to x as given (not copied; it may be learnable or shared with other layers). Inputs
    are [..., in]; the basis is computed in fp32 and returned in x's dtype, so bf16 autocast works.
    """

    def __init__(self, in_features: int, out_features: int, grid_size: int = 5, spline_order: int = 3,
                 scale_noise: float = 0.1, scale_base: float = 1.0, scale_spline: float = 1.0,
                 enable_standalone_scale_spline: bool = True, base_activation: nn.Module | None = None,
                 grid_eps: float = 0.02, grid_range: tuple[float, float] = (-1.0, 1.0)):
        super().__init__()
        if grid_size < 1 or spline_order < 1:
            raise ValueError(f"grid_size={grid_size} and spline_order={spline_order} must both be at least 1")
        if not grid_range[0] < grid_range[1]:
            raise ValueError(f"grid_range={grid_range!r} must be (low, high) with low < high")
        self.in_features, self.out_features = in_features, out_features
        self.grid_size, self.spline_order = grid_size, spline_order
        self.scale_noise, self.scale_base, self.scale_spline = scale_noise, scale_base, scale_spline
        self.enable_standalone_scale_spline = enable_standalone_scale_spline
        self.grid_eps = grid_eps
        self.grid_range = (float(grid_range[0]), float(grid_range[1]))
        self.base_activation = nn.SiLU() if base_activation is None else base_activation
        self.register_buffer("grid", torch.empty(in_features, grid_size + 2 * spline_order + 1))
        self.base_weight = nn.Parameter(torch.empty(out_features, in_features))
        self.spline_weight = nn.Parameter(torch.empty(out_features, in_features, grid_size + spline_order))
        if enable_standalone_scale_spline:
            self.spline_scaler = nn.Parameter(torch.empty(out_features, in_features))
        self.track_outside = False
        self.last_outside_fraction: torch.Tensor | None = None
        self._vandermonde = _chebyshev_inverse_vandermonde(spline_order)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """(Re)initialise in place as efficient-kan does, grid included: uniform knots on grid_range extended by
        spline_order on each side; base_weight and spline_scaler kaiming-uniform; spline_weight fitted to small
        noise. Works on any device and after `to_empty()` (transformers builds models on the meta device, so a host
        model's `_init_weights` should call this); `generator` (on the parameters' device) makes it reproducible."""
        k, size = self.spline_order, self.grid_size
        low, high = self.grid_range
        knots = torch.arange(-k, size + k + 1, dtype=torch.float64, device=self.grid.device)
        self.grid.copy_((knots * ((high - low) / size) + low).expand_as(self.grid))
        nn.init.kaiming_uniform_(self.base_weight, a=math.sqrt(5) * self.scale_base, generator=generator)
        noise = (torch.rand(size + 1, self.in_features, self.out_features, generator=generator,
                            device=self.spline_weight.device) - 0.5) * self.scale_noise / size
        scale = 1.0 if self.enable_standalone_scale_spline else self.scale_spline
        self.spline_weight.copy_(scale * self.curve2coeff(self.grid.T[k:-k], noise))
        if self.enable_standalone_scale_spline:
            nn.init.kaiming_uniform_(self.spline_scaler, a=math.sqrt(5) * self.scale_spline, generator=generator)

    def b_splines(self, x: torch.Tensor) -> torch.Tensor:
        """The B-spline basis [..., in, G+k] of x [..., in] (autograd flows to x, not to the grid)."""
        return _BSplineBasis.apply(x, self.grid, self.spline_order, self._vandermonde)

    @torch.no_grad()
    def curve2coeff(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Least-squares (minimum-norm) spline weights [out, in, G+k] whose splines take values y [N, in, out] at
        x [N, in] on the current grid; solved in fp64 on x's device."""
        basis = _basis(x, self.grid, self.spline_order, self._vandermonde, torch.float64)
        rhs = torch.einsum("nfa,nfo->fao", basis, y.double())
        return _solve(torch.einsum("nfa,nfb->fab", basis, basis), rhs).to(self.spline_weight.dtype)

    @property
    def scaled_spline_weight(self) -> torch.Tensor:
        if self.enable_standalone_scale_spline:
            return self.spline_weight * self.spline_scaler.unsqueeze(-1)
        return self.spline_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, self.in_features)
        if self.track_outside:
            self.last_outside_fraction = self._outside(x).detach()
        base = F.linear(self.base_activation(x), self.base_weight)
        spline = F.linear(self.b_splines(x).flatten(1), self.scaled_spline_weight.flatten(1))
        return (base + spline).view(*shape[:-1], self.out_features)

    def _outside(self, x: torch.Tensor) -> torch.Tensor:
        k = self.spline_order
        return ((x < self.grid[:, k]) | (x > self.grid[:, -k - 1])).float().mean()

    @torch.no_grad()
    def outside_fraction(self, x: torch.Tensor) -> float:
        """Share of the elements of x [..., in] outside their feature's [grid[:, k], grid[:, -k-1]] (grid_range until
        update_grid), where the spline fades out. Synchronises (returns a float); see track_outside for training."""
        return self._outside(x.reshape(-1, self.in_features)).item()

    @torch.no_grad()
    def update_grid(self, x: torch.Tensor, margin: float = 0.01) -> None:
        """Refit the grid to the data x [..., in] as efficient-kan does (per-feature quantile knots, mixed with uniform
        ones by grid_eps, extended by spline_order intervals) and re-solve spline_weight by least squares so that
        the spline is unchanged on x, up to what the new knots can represent."""
        x = x.reshape(-1, self.in_features)
        k, size = self.spline_order, self.grid_size
        xs = torch.sort(x.double(), dim=0).values
        adaptive = xs[torch.linspace(0, len(xs) - 1, size + 1, dtype=torch.int64, device=x.device)]
        step = (xs[-1] - xs[0] + 2 * margin) / size
        uniform = torch.arange(size + 1, dtype=xs.dtype, device=x.device)[:, None] * step + xs[0] - margin
        inner = self.grid_eps * uniform + (1 - self.grid_eps) * adaptive
        ext = torch.arange(1, k + 1, dtype=xs.dtype, device=x.device)[:, None] * step
        new_grid = torch.cat([inner[:1] - ext.flip(0), inner, inner[-1:] + ext]).T.to(self.grid.dtype)
        gram = cross = 0
        for chunk in x.split(4096):  # bounded memory for many tokens
            old = _basis(chunk, self.grid, k, self._vandermonde, torch.float64)
            new = _basis(chunk, new_grid, k, self._vandermonde, torch.float64)
            gram = gram + torch.einsum("nfa,nfb->fab", new, new)
            cross = cross + torch.einsum("nfa,nfb->fab", new, old)
        weight = self.spline_weight.double().permute(1, 2, 0)  # [in, G+k, out]
        self.grid.copy_(new_grid)
        self.spline_weight.copy_(_solve(gram, cross @ weight).to(self.spline_weight.dtype))

    def regularization_loss(self, regularize_activation: float = 1.0, regularize_entropy: float = 1.0) -> torch.Tensor:
        """efficient-kan's stand-in for the KAN paper's L1 + entropy regularisation, on the mean |spline_weight|."""
        l1 = self.spline_weight.abs().mean(-1)
        activation = l1.sum()
        p = l1 / activation
        return regularize_activation * activation - regularize_entropy * (p * p.log()).sum()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, grid_size={self.grid_size}, "
                f"spline_order={self.spline_order}, grid_range={self.grid_range}")


def _solve(gram: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Minimum-norm least-squares weights [out, in, G+k] from per-feature normal equations (pinv works on CUDA too)."""
    return (torch.linalg.pinv(gram, hermitian=True) @ rhs).permute(2, 0, 1)


KAN_WIDTH_CHOICES = ("params", "mlp")


def kan_hidden_size(hidden_size: int, intermediate_size: int, grid_size: int, spline_order: int, width: str) -> int:
    """Hidden width of a KANFeedForward: "mlp" is intermediate_size; "params" matches the bias-free MLP's
    2 * hidden_size * intermediate_size parameters as closely as a whole width can (each in-out pair of a KAN layer
    has G+k spline weights, a base weight and a spline scaler)."""
    if width == "mlp":
        return intermediate_size
    if width == "params":
        return max(1, round(intermediate_size / (grid_size + spline_order + 2)))
    raise ValueError(f"width={width!r} is invalid: use one of {', '.join(map(repr, KAN_WIDTH_CHOICES))}")


def _rms(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],))


class KANFeedForward(nn.Module):
    """KANLinear(hidden -> kan_hidden), a parameter-free RMS norm, KANLinear(kan_hidden -> hidden).

    Both layers apply the same base_activation module (default SiLU). Outside its grid a KAN layer's spline branch
    fades out within spline_order intervals and is zero beyond them, so only the base branch acts there. To keep inputs
    inside: the first layer sees the block's pre-norm output and the norm between the layers gives the second one the
    same RMS 1, so one grid_range, set by the user, covers the same share of inputs in both; that share is reported
    (KANLinear.outside_fraction, or track_outside during training). To follow the data instead, call
    update_grid on a few batches of real block inputs once their distribution has settled (e.g. once after warmup);
    it refits both grids (the second on the first's normalised outputs) and keeps the function on those inputs.
    """

    def __init__(self, hidden_size: int, kan_hidden: int, grid_size: int = 5, spline_order: int = 3,
                 grid_range: tuple[float, float] = (-1.0, 1.0), base_activation: nn.Module | None = None):
        super().__init__()
        activation = nn.SiLU() if base_activation is None else base_activation
        options = dict(grid_size=grid_size, spline_order=spline_order, grid_range=grid_range,
                       base_activation=activation)
        self.fc = KANLinear(hidden_size, kan_hidden, **options)
        self.proj = KANLinear(kan_hidden, hidden_size, **options)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(_rms(self.fc(x)))

    @torch.no_grad()
    def update_grid(self, x: torch.Tensor, margin: float = 0.01) -> None:
        """Refit both layers' grids to x [..., hidden] (see KANLinear.update_grid)."""
        x = x.reshape(-1, self.fc.in_features)
        self.fc.update_grid(x, margin)
        self.proj.update_grid(_rms(self.fc(x)), margin)

    def regularization_loss(self, regularize_activation: float = 1.0, regularize_entropy: float = 1.0) -> torch.Tensor:
        return (self.fc.regularization_loss(regularize_activation, regularize_entropy)
                + self.proj.regularization_loss(regularize_activation, regularize_entropy))

    def extra_repr(self) -> str:
        return (f"grid_size={self.fc.grid_size}, spline_order={self.fc.spline_order}, grid_range={self.fc.grid_range}, "
                f"parameters={sum(p.numel() for p in self.parameters()):,}")
