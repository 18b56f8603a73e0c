"""The activation zoo and the "<mlp>;att-<att>" spec parser.

A spec is parsed once into an `AfSpec`; `build_activation` turns a name into a module. Learnable
activations keep their parameters in fp32 and return the input's dtype, so they behave the same
under bf16 autocast, and expose `initial_state()` (parameter name -> initial tensor) so a model can
re-initialise them without knowing their kind.
"""
import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import XIELUActivation

from .mixtures import LearnableMixture

try:  # the fast kernels, when afgpt is installed
    from afgpt.spline_kernels import spline
except ImportError:  # Hub remote code running without afgpt: the portable path
    from .spline_torch import spline


@dataclass(frozen=True)
class SplineGrid:
    """Where spline anchors sit and how spline values start."""

    af_range: float = 15.0
    n_anchors: int = 64
    init: float = 0.01  # -1 = identity

    def initial_values(self) -> torch.Tensor:
        if self.init == -1:
            return torch.linspace(-self.af_range, self.af_range, self.n_anchors)
        return torch.full((self.n_anchors,), float(self.init))


class Spline(nn.Module):
    """Learnable linear spline with constant extrapolation; one per slot or one per channel.

    A shared spline (channels=None) maps any tensor elementwise. A per-channel spline maps
    [..., channels] inputs, one function per channel of the last dimension.
    """

    def __init__(self, grid: SplineGrid, channels: int | None = None):
        super().__init__()
        self.grid = grid
        self.channels = channels
        self.values = nn.Parameter(self.initial_state()["values"])

    def initial_state(self) -> dict[str, torch.Tensor]:
        values = self.grid.initial_values()
        return {"values": values if self.channels is None else values.repeat(self.channels, 1)}

    @property
    def anchors(self) -> torch.Tensor:
        return torch.linspace(-self.grid.af_range, self.grid.af_range, self.grid.n_anchors)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return spline(x, self.values, -self.grid.af_range, self.grid.af_range)

    def extra_repr(self) -> str:
        kind = "shared" if self.values.dim() == 1 else f"per-channel={self.values.shape[0]}"
        return f"{kind}, anchors={self.grid.n_anchors}, range=±{self.grid.af_range:g}"


class ReLU2(nn.Module):
    """Squared ReLU (So et al., 2021, Primer)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x).square()


class PReLU(nn.Module):
    """Leaky ReLU with a learnable negative slope per channel (He et al., 2015)."""

    def __init__(self, channels: int, init: float = 0.25):
        super().__init__()
        self.channels, self.init = channels, init
        self.slope = nn.Parameter(self.initial_state()["slope"])

    def initial_state(self) -> dict[str, torch.Tensor]:
        return {"slope": torch.full((self.channels,), self.init)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(x >= 0, x, self.slope.to(x.dtype) * x)


class Swish(nn.Module):
    """x * sigmoid(beta * x) with a learnable scalar beta (Ramachandran et al., 2017)."""

    def __init__(self, init: float = 1.0):
        super().__init__()
        self.init = init
        self.beta = nn.Parameter(self.initial_state()["beta"])

    def initial_state(self) -> dict[str, torch.Tensor]:
        return {"beta": torch.tensor(self.init)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.beta.to(x.dtype) * x)


class LearnableGELU(nn.Module):
    """x * Phi(scale * x) with a learnable scalar scale, starting at 1 (plain GELU): Swish's idea applied to GELU."""

    def __init__(self, init: float = 1.0):
        super().__init__()
        self.init = init
        self.scale = nn.Parameter(self.initial_state()["scale"])

    def initial_state(self) -> dict[str, torch.Tensor]:
        return {"scale": torch.tensor(self.init)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x * (1 + torch.erf(self.scale.to(x.dtype) * x / math.sqrt(2)))


class APL(nn.Module):
    """Adaptive piecewise linear unit (Agostinelli et al., 2014), one function per channel:
    max(0, x) + sum_s a_s * max(0, b_s - x). Slopes a start at 0, so it starts as ReLU exactly;
    hinges b start evenly spread over [-1, 1] so each can learn a different kink."""

    def __init__(self, channels: int, hinges: int = 2):
        super().__init__()
        self.channels, self.hinges = channels, hinges
        state = self.initial_state()
        self.slopes = nn.Parameter(state["slopes"])
        self.hinge_points = nn.Parameter(state["hinge_points"])

    def initial_state(self) -> dict[str, torch.Tensor]:
        points = torch.linspace(-1, 1, self.hinges) if self.hinges > 1 else torch.zeros(1)
        return {"slopes": torch.zeros(self.channels, self.hinges),
                "hinge_points": points.repeat(self.channels, 1)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        slopes, points = self.slopes.to(x.dtype), self.hinge_points.to(x.dtype)
        return F.relu(x) + (slopes * F.relu(points - x[..., None])).sum(-1)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, hinges={self.hinges}"


class XIELU(XIELUActivation):
    """transformers' xIELU (Huang et al., 2024) with fp32 parameters, returning the input's dtype like the other
    learnable activations (transformers defaults to bf16 parameters)."""

    def __init__(self):
        super().__init__(dtype=torch.float32)

    def initial_state(self) -> dict[str, torch.Tensor]:
        """The constructor's values (its defaults: alpha_p 0.8, alpha_n 0.8, beta 0.5, eps -1e-6), stored as
        softplus-inverses like transformers does; on the CPU, since models may be built on the meta device."""
        def softplus_inverse(v: float) -> torch.Tensor:
            return torch.tensor([v], dtype=torch.float32, device="cpu").expm1().log()

        return {"alpha_p": softplus_inverse(0.8), "alpha_n": softplus_inverse(0.8 - 0.5),
                "beta": torch.tensor(0.5, device="cpu"), "eps": torch.tensor(-1e-6, device="cpu")}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.to(self.alpha_p.dtype)).to(x.dtype)


RATIONAL_TARGETS = {
    "leaky_relu": lambda x: F.leaky_relu(x, 0.01),
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
    "tanh": torch.tanh,
}


def _rational(x: torch.Tensor, numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """P(x) / (1 + |sum_j b_j x^j|): the 'safe' Pade activation unit, never dividing by ~0."""
    p = torch.zeros_like(x)
    for a in numerator.flip(0):  # Horner, highest degree first
        p = p * x + a
    q = torch.zeros_like(x)
    for b in denominator.flip(0):
        q = (q + b) * x
    return p / (1 + q.abs())


@lru_cache(maxsize=None)
def rational_fit(target: str, degrees: tuple[int, int] = (5, 4)) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Coefficients of a safe rational function approximating `target` on [-5, 5].

    A linear least-squares fit of P(x) = f(x) Q(x) gives the start; a short LBFGS run on the
    safe form (with |.| in the denominator) refines it. Cached: every layer reuses the result.
    """
    if target not in RATIONAL_TARGETS:
        raise ValueError(f"unknown rational init {target!r}: choose one of {', '.join(RATIONAL_TARGETS)}")
    n, m = degrees
    cpu = dict(device="cpu", dtype=torch.float64)  # explicit: models may be built under a meta device
    x = torch.linspace(-5, 5, 2001, **cpu)
    y = RATIONAL_TARGETS[target](x)
    design = torch.cat([x[:, None] ** torch.arange(n + 1, **cpu), -y[:, None] * x[:, None] ** torch.arange(1, m + 1, **cpu)], 1)
    coef = torch.linalg.lstsq(design, y[:, None]).solution[:, 0]
    numerator, denominator = coef[: n + 1].clone().requires_grad_(), coef[n + 1:].clone().requires_grad_()
    optimizer = torch.optim.LBFGS([numerator, denominator], max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = (_rational(x, numerator, denominator) - y).square().mean()
        loss.backward()
        return loss

    optimizer.step(closure)
    return tuple(numerator.tolist()), tuple(denominator.tolist())


class Rational(nn.Module):
    """Pade activation unit (Molina et al., 2020), degrees (5, 4), initialised to mimic a named function."""

    def __init__(self, init: str = "leaky_relu"):
        super().__init__()
        self.init = init
        state = self.initial_state()
        self.numerator = nn.Parameter(state["numerator"])
        self.denominator = nn.Parameter(state["denominator"])

    def initial_state(self) -> dict[str, torch.Tensor]:
        numerator, denominator = rational_fit(self.init)
        return {"numerator": torch.tensor(numerator, dtype=torch.float32),
                "denominator": torch.tensor(denominator, dtype=torch.float32)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _rational(x.to(self.numerator.dtype), self.numerator, self.denominator).to(x.dtype)

    def extra_repr(self) -> str:
        return f"init={self.init}"


# name -> builder(width, grid). Width is the number of channels the activation sees.
_BUILDERS = {
    "linear": lambda width, grid: nn.Identity(),
    "relu": lambda width, grid: nn.ReLU(),
    "relu2": lambda width, grid: ReLU2(),
    "gelu": lambda width, grid: nn.GELU(),
    "gelu_tanh": lambda width, grid: nn.GELU(approximate="tanh"),
    "silu": lambda width, grid: nn.SiLU(),
    "tanh": lambda width, grid: nn.Tanh(),
    "mish": lambda width, grid: nn.Mish(),
    "hardswish": lambda width, grid: nn.Hardswish(),
    "hardsigmoid": lambda width, grid: nn.Hardsigmoid(),
    "prelu": lambda width, grid: PReLU(width),
    "swish": lambda width, grid: Swish(),
    "gelu_learn": lambda width, grid: LearnableGELU(),
    "apl": lambda width, grid: APL(width),
    "xielu": lambda width, grid: XIELU(),
    "la": lambda width, grid: LearnableMixture(),
    "la_per_channel": lambda width, grid: LearnableMixture(channels=width),
    "rational": lambda width, grid: Rational("leaky_relu"),
    "rational_gelu": lambda width, grid: Rational("gelu"),
    "spline": lambda width, grid: Spline(grid),
    "splinePerDim": lambda width, grid: Spline(grid, channels=width),
}
ACTIVATION_NAMES = tuple(_BUILDERS)
LEARNABLE_NAMES = ("prelu", "swish", "gelu_learn", "apl", "xielu", "la", "la_per_channel", "rational",
                   "rational_gelu", "spline", "splinePerDim")
PER_CHANNEL_NAMES = ("prelu", "apl", "la_per_channel", "splinePerDim")  # one function per channel: they need the slot's width
NO_ATTENTION_SLOT = "none"


@dataclass(frozen=True)
class AfSpec:
    """A parsed "<mlp>;att-<att>" activation spec (lm-afs syntax)."""

    mlp: str
    att: str

    @property
    def has_att_slot(self) -> bool:
        return self.att != NO_ATTENTION_SLOT

    def __str__(self) -> str:
        return f"{self.mlp};att-{self.att}"


def parse_af_spec(spec: str) -> AfSpec:
    """Parse "gelu;att-linear"-style specs, naming the problem and the valid choices on error."""
    if not isinstance(spec, str) or spec.count(";") != 1:
        raise ValueError(
            f"af_type={spec!r} is malformed: expected '<mlp>;att-<att>', e.g. 'gelu;att-linear' "
            "(baseline), 'spline;att-spline' or 'relu;att-none'")
    mlp, att = (part.strip() for part in spec.split(";"))
    if not att.startswith("att-"):
        raise ValueError(f"af_type={spec!r} is malformed: the part after ';' must start with 'att-', e.g. 'att-linear'")
    att = att.removeprefix("att-")
    valid = ", ".join(ACTIVATION_NAMES)
    if mlp not in _BUILDERS:
        raise ValueError(f"af_type={spec!r}: unknown MLP activation {mlp!r}; valid names: {valid}")
    if att not in _BUILDERS and att != NO_ATTENTION_SLOT:
        raise ValueError(f"af_type={spec!r}: unknown attention activation {att!r}; valid names: {valid}, none")
    return AfSpec(mlp, att)


def build_activation(name: str, width: int, grid: SplineGrid = SplineGrid()) -> nn.Module:
    """A fresh activation module for a slot that sees `width` channels."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown activation {name!r}; valid names: {', '.join(ACTIVATION_NAMES)}")
    return _BUILDERS[name](width, grid)


def is_learnable(name: str) -> bool:
    return name in LEARNABLE_NAMES
