import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from afgpt.kan import KANFeedForward, KANLinear, kan_hidden_size


def reference_bases(x, grid, k):
    """efficient-kan's b_splines: order-0 indicators on all knot intervals, then k Cox-de Boor levels."""
    x = x.unsqueeze(-1)
    bases = ((x >= grid[:, :-1]) & (x < grid[:, 1:])).to(x.dtype)
    for j in range(1, k + 1):
        bases = ((x - grid[:, :-(j + 1)]) / (grid[:, j:-1] - grid[:, :-(j + 1)]) * bases[..., :-1]
                 + (grid[:, j + 1:] - x) / (grid[:, j + 1:] - grid[:, 1:-j]) * bases[..., 1:])
    return bases


def reference_forward(layer, x, params=None):
    """efficient-kan's KANLinear.forward in float64, on `params` (name -> tensor) or the layer's own."""
    p = params or {name: value.double() for name, value in layer.named_parameters(recurse=False)}
    spline_weight = p["spline_weight"] * p["spline_scaler"].unsqueeze(-1) if "spline_scaler" in p \
        else p["spline_weight"]
    flat = x.double().reshape(-1, layer.in_features)
    bases = reference_bases(flat, layer.grid.double(), layer.spline_order)
    out = F.linear(layer.base_activation(flat), p["base_weight"]) + F.linear(bases.flatten(1), spline_weight.flatten(1))
    return out.view(*x.shape[:-1], layer.out_features)


def reference_grid(x, grid_size, k, grid_eps=0.02, margin=0.01):
    """efficient-kan's update_grid knots for data x [N, in]: [in, G+2k+1]."""
    xs = torch.sort(x, dim=0)[0]
    adaptive = xs[torch.linspace(0, len(x) - 1, grid_size + 1, dtype=torch.int64)]
    step = (xs[-1] - xs[0] + 2 * margin) / grid_size
    uniform = torch.arange(grid_size + 1, dtype=torch.float32)[:, None] * step + xs[0] - margin
    grid = grid_eps * uniform + (1 - grid_eps) * adaptive
    return torch.cat([grid[:1] - step * torch.arange(k, 0, -1)[:, None], grid,
                      grid[-1:] + step * torch.arange(1, k + 1)[:, None]]).T


def random_layer(in_features=5, out_features=3, grid_size=5, spline_order=3, seed=0, **kwargs):
    """A layer whose parameters are all O(1), so every term of the output matters in comparisons."""
    torch.manual_seed(seed)
    layer = KANLinear(in_features, out_features, grid_size=grid_size, spline_order=spline_order, **kwargs)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
    return layer


def probe_inputs(layer, n=200, leading=(2,)):
    """Inputs inside the grid, in its extension intervals, beyond it, and exactly on every knot."""
    far = torch.tensor([[10.0], [-10.0]]).expand(2, layer.in_features)
    x = torch.cat([torch.randn(n, layer.in_features) * 1.5, layer.grid.T, far])
    return x[: len(x) // 2 * 2].reshape(*leading, -1, layer.in_features)


def assert_close_to(actual, expected, rel=1e-5, name="output"):
    """Equal up to fp32 rounding, relative to the largest value."""
    torch.testing.assert_close(actual.double(), expected.double(), rtol=0, atol=rel * expected.abs().max().item(),
                               msg=lambda message: f"{name}: {message}")


def make_polynomial(layer, low, high, seed=0):
    """Spline weights that make every spline a random cubic on [low, high] (inside the grid), with spline_scaler
    in [0.5, 1.5]: a function any grid covering the data can represent exactly."""
    torch.manual_seed(seed)
    points = torch.linspace(low, high, 60)[:, None].expand(60, layer.in_features)
    coef = torch.randn(4, layer.in_features, layer.out_features)
    y = sum(c * points.unsqueeze(-1) ** p for p, c in enumerate(coef))
    with torch.no_grad():
        layer.spline_scaler.uniform_(0.5, 1.5)
        layer.spline_weight.copy_(layer.curve2coeff(points, y) / layer.spline_scaler.unsqueeze(-1))


class Swish(nn.Module):
    """A learnable elementwise activation."""

    def __init__(self):
        super().__init__()
        self.beta = nn.Parameter(torch.tensor(1.3))

    def forward(self, x):
        return x * torch.sigmoid(self.beta * x)


def test_layer_has_efficient_kans_parameter_names_and_shapes():
    layer = KANLinear(4, 3, grid_size=6, spline_order=2)
    shapes = {name: tuple(t.shape) for name, t in layer.state_dict().items()}
    assert shapes == {"grid": (4, 11), "base_weight": (3, 4), "spline_weight": (3, 4, 8), "spline_scaler": (3, 4)}
    assert "spline_scaler" not in KANLinear(4, 3, enable_standalone_scale_spline=False).state_dict()


@pytest.mark.parametrize("spline_order", [1, 2, 3, 4])
@pytest.mark.parametrize("grid_size", [3, 5, 8])
def test_forward_matches_efficient_kan(spline_order, grid_size):
    layer = random_layer(grid_size=grid_size, spline_order=spline_order)
    x = probe_inputs(layer)
    assert_close_to(layer(x), reference_forward(layer, x))


def test_forward_without_standalone_scaler_matches_efficient_kan():
    layer = random_layer(enable_standalone_scale_spline=False)
    x = probe_inputs(layer)
    assert_close_to(layer(x), reference_forward(layer, x))


def check_gradients(layer, x):
    """Gradients for x and every parameter equal those of efficient-kan's formulation (autograd through it)."""
    grad = torch.randn(*x.shape[:-1], layer.out_features)
    x = x.clone().requires_grad_()
    names = [name for name, _ in layer.named_parameters()]
    ours = torch.autograd.grad(layer(x), [x, *layer.parameters()], grad)
    params = {name: p.detach().double().requires_grad_() for name, p in layer.named_parameters()}
    x64 = x.detach().double().requires_grad_()
    theirs = torch.autograd.grad(reference_forward(layer, x64, params), [x64, *params.values()], grad.double())
    for name, a, b in zip(["x", *names], ours, theirs):
        assert_close_to(a, b, name=name)


@pytest.mark.parametrize("spline_order", [1, 2, 3, 4])
def test_gradients_match_efficient_kan(spline_order):
    layer = random_layer(grid_size=4, spline_order=spline_order)
    check_gradients(layer, probe_inputs(layer))


def test_update_grid_refits_knots_as_efficient_kan_does():
    layer = random_layer(in_features=3, grid_size=6, spline_order=2)
    x = torch.randn(300, 3) ** 3  # skewed: quantile knots are far from uniform
    layer.update_grid(x)
    torch.testing.assert_close(layer.grid, reference_grid(x, 6, 2))
    widths = layer.grid.diff(dim=1)
    assert (widths.std(dim=1) / widths.mean(dim=1) > 0.2).all()


def test_forward_and_gradients_match_efficient_kan_on_a_refitted_grid():
    layer = random_layer(in_features=4, grid_size=5, spline_order=3)
    layer.update_grid(torch.randn(500, 4) ** 3)
    x = probe_inputs(layer)
    assert_close_to(layer(x), reference_forward(layer, x))
    check_gradients(layer, x)


def test_update_grid_keeps_the_function_on_its_data():
    layer = random_layer(in_features=4, grid_size=5, spline_order=3)
    make_polynomial(layer, -1.0, 1.0)
    x = torch.rand(400, 4) ** 2 * 1.8 - 0.9
    before = layer(x)
    layer.update_grid(x)
    assert_close_to(layer(x), before, rel=1e-4)


def test_feed_forward_is_kan_norm_kan_with_one_shared_activation():
    activation = Swish()
    ffn = KANFeedForward(6, 4, grid_size=4, spline_order=2, grid_range=(-2.0, 2.0), base_activation=activation)
    assert ffn.fc.base_activation is activation and ffn.proj.base_activation is activation
    assert isinstance(KANFeedForward(6, 4).fc.base_activation, nn.SiLU)
    for layer in (ffn.fc, ffn.proj):
        with torch.no_grad():
            layer.spline_weight.normal_()
    x = torch.randn(2, 30, 6)
    out = ffn(x)
    expected = reference_forward(ffn.proj, F.rms_norm(reference_forward(ffn.fc, x), (4,)))
    assert_close_to(out, expected)
    assert_close_to(torch.autograd.grad(out.sum(), activation.beta)[0],
                    torch.autograd.grad(expected.sum(), activation.beta)[0], name="activation parameter")


def test_feed_forward_update_grid_refits_both_layers_and_keeps_the_function():
    ffn = KANFeedForward(4, 3, grid_size=5, spline_order=3, grid_range=(-4.0, 4.0))
    make_polynomial(ffn.fc, -4.0, 4.0, seed=1)
    make_polynomial(ffn.proj, -4.0, 4.0, seed=2)
    x = torch.rand(500, 4) ** 2 * 6 - 3  # skewed, inside grid_range
    before = ffn(x)
    ffn.update_grid(x)
    torch.testing.assert_close(ffn.fc.grid, reference_grid(x, 5, 3))
    torch.testing.assert_close(ffn.proj.grid, reference_grid(F.rms_norm(ffn.fc(x), (3,)), 5, 3))
    assert_close_to(ffn(x), before, rel=1e-4)


def test_outside_fraction_counts_inputs_outside_each_features_inner_knots():
    layer = KANLinear(2, 1, grid_range=(-1.0, 1.0))
    x = torch.tensor([[-1.5, 0.0], [0.5, 1.0], [1.01, -1.0], [0.0, 3.0]])  # the range's ends count as inside
    assert layer.outside_fraction(x) == pytest.approx(3 / 8)
    layer.update_grid(torch.stack([torch.linspace(0, 1, 50), torch.linspace(-5, 5, 50)], dim=1))
    assert layer.outside_fraction(torch.tensor([[0.5, 4.0], [2.0, 0.0]])) == pytest.approx(1 / 4)


def test_track_outside_leaves_the_fraction_of_each_forward():
    layer = KANLinear(2, 1)
    x = torch.tensor([[[-1.5, 0.0], [0.5, 2.0]]])
    layer(x)
    assert layer.last_outside_fraction is None
    layer.track_outside = True
    layer(x)
    assert layer.last_outside_fraction.item() == pytest.approx(0.5)


def test_regularization_loss_is_efficient_kans():
    ffn = KANFeedForward(5, 3)

    def expected(layer):
        l1 = layer.spline_weight.abs().mean(-1)
        p = l1 / l1.sum()
        return 2.0 * l1.sum() - 3.0 * (p * p.log()).sum()

    torch.testing.assert_close(ffn.fc.regularization_loss(2.0, 3.0), expected(ffn.fc))
    torch.testing.assert_close(ffn.regularization_loss(2.0, 3.0), expected(ffn.fc) + expected(ffn.proj))


@pytest.mark.parametrize("hidden, intermediate, grid_size, spline_order",
                         [(128, 512, 5, 3), (64, 256, 3, 1), (96, 384, 8, 4), (256, 1024, 5, 3), (32, 40, 5, 3)])
def test_kan_hidden_size_matches_the_mlps_parameters(hidden, intermediate, grid_size, spline_order):
    width = kan_hidden_size(hidden, intermediate, grid_size, spline_order, "params")
    with torch.device("meta"):
        ffn = KANFeedForward(hidden, width, grid_size=grid_size, spline_order=spline_order)
    per_unit = 2 * hidden * (grid_size + spline_order + 2)  # parameters one more hidden unit adds
    assert abs(sum(p.numel() for p in ffn.parameters()) - 2 * hidden * intermediate) <= per_unit / 2
    assert kan_hidden_size(hidden, intermediate, grid_size, spline_order, "mlp") == intermediate


def test_kan_hidden_size_names_the_choices():
    with pytest.raises(ValueError, match="'params', 'mlp'"):
        kan_hidden_size(128, 512, 5, 3, "flops")


def test_reset_parameters_after_to_empty_gives_efficient_kans_initialisation():
    with torch.device("meta"):
        ffn = KANFeedForward(6, 4, grid_size=4, spline_order=2, grid_range=(-2.0, 3.0))
    ffn.to_empty(device="cpu")
    layer = ffn.fc
    layer.reset_parameters(torch.Generator().manual_seed(1))
    knots = torch.arange(-2, 4 + 2 + 1) * 1.25 - 2.0  # grid_range in 4 intervals, extended by 2 on each side
    torch.testing.assert_close(layer.grid, knots.expand(6, -1))
    generator = torch.Generator().manual_seed(1)
    base = nn.init.kaiming_uniform_(torch.empty(4, 6), a=math.sqrt(5), generator=generator)
    noise = (torch.rand(5, 6, 4, generator=generator) - 0.5) * 0.1 / 4
    scaler = nn.init.kaiming_uniform_(torch.empty(4, 6), a=math.sqrt(5), generator=generator)
    bases = reference_bases(layer.grid.T[2:-2].double(), layer.grid.double(), 2)  # efficient-kan's curve2coeff
    spline = torch.linalg.lstsq(bases.transpose(0, 1), noise.double().transpose(0, 1)).solution.permute(2, 0, 1)
    torch.testing.assert_close(layer.base_weight, base)
    torch.testing.assert_close(layer.spline_scaler, scaler)
    torch.testing.assert_close(layer.spline_weight, spline.float())
    ffn.proj.reset_parameters()
    assert all(torch.isfinite(p).all() for p in ffn.parameters())


def test_bf16_autocast_returns_bf16_close_to_fp32():
    torch.manual_seed(0)
    ffn = KANFeedForward(16, 8)
    x = F.rms_norm(torch.randn(3, 10, 16), (16,)).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ffn(x)
    assert out.dtype == torch.bfloat16
    assert_close_to(out, ffn(x), rel=2e-2)
    out.float().sum().backward()
    assert x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the basis itself stays fp32
        basis = ffn.fc.b_splines(x)
    assert_close_to(basis, ffn.fc.b_splines(x), rel=1e-6)


@pytest.mark.slow
def test_compiled_forward_and_backward_match_eager():
    torch.manual_seed(0)
    ffn = KANFeedForward(16, 8, grid_range=(-1.5, 1.5))
    ffn.update_grid(torch.randn(200, 16))
    x = torch.randn(4, 25, 16) * 1.5
    grad = torch.randn(4, 25, 16)
    compiled = torch.compile(ffn, fullgraph=True, dynamic=False)
    results = []
    for forward in (ffn, compiled):
        xi = x.clone().requires_grad_()
        out = forward(xi)
        results.append((out, *torch.autograd.grad(out, [xi, *ffn.parameters()], grad)))
    for ours, eager in zip(*results):
        assert_close_to(ours, eager)
