import pytest
import torch
import torch.nn.functional as F

from afgpt.activations import (
    ACTIVATION_NAMES, LEARNABLE_NAMES, PER_CHANNEL_NAMES, SplineGrid, Spline, build_activation, is_learnable,
    parse_af_spec,
)


def reference_spline(x, values, af_range):
    """lm-afs semantics in float64: bucketize, clamp, lerp; constant outside the range."""
    anchors = torch.linspace(-af_range, af_range, values.shape[-1], dtype=torch.float64)
    x = x.double()
    idx = (torch.bucketize(x, anchors) - 1).clamp(0, len(anchors) - 2)
    step = anchors[1] - anchors[0]
    frac = ((x - (anchors[0] + idx * step)) / step).clamp(0, 1)
    v = values.double()
    if v.dim() == 1:
        lo, hi = v[idx], v[idx + 1]
    else:
        rows = torch.arange(v.shape[0])
        lo, hi = v[rows, idx], v[rows, idx + 1]
    return lo + frac * (hi - lo)


FIXED = {
    "linear": lambda x: x, "relu": F.relu, "relu2": lambda x: F.relu(x) ** 2, "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "silu": F.silu, "tanh": torch.tanh,
    "mish": F.mish, "hardswish": F.hardswish, "hardsigmoid": F.hardsigmoid,
}


@pytest.mark.parametrize("name", list(FIXED))
def test_fixed_activations_compute_their_function(name):
    x = torch.linspace(-6, 6, 101)
    assert not is_learnable(name)
    module = build_activation(name, 8)
    assert not list(module.parameters())
    torch.testing.assert_close(module(x), FIXED[name](x))


def test_every_name_builds_and_keeps_shape_and_dtype():
    x = torch.randn(2, 3, 8)
    for name in ACTIVATION_NAMES:
        y = build_activation(name, 8)(x)
        assert y.shape == x.shape and y.dtype == x.dtype, name


def test_spline_matches_lm_afs_reference_inside_and_outside_range():
    grid = SplineGrid(af_range=3.0, n_anchors=16)
    module = Spline(grid)
    with torch.no_grad():
        module.values.copy_(torch.randn(16))
    x = torch.cat([torch.linspace(-5, 5, 1001), torch.linspace(-3, 3, 16)])  # includes every anchor
    torch.testing.assert_close(module(x).double(), reference_spline(x, module.values, 3.0), atol=1e-5, rtol=1e-5)
    ends = module(torch.tensor([-100.0, -3.0, 3.0, 100.0]))  # constant extrapolation
    torch.testing.assert_close(ends, module.values[[0, 0, -1, -1]].detach())


def test_spline_per_channel_uses_one_function_per_channel():
    module = Spline(SplineGrid(2.0, 8), channels=4)
    with torch.no_grad():
        module.values.copy_(torch.randn(4, 8))
    x = torch.randn(3, 5, 4) * 2
    torch.testing.assert_close(module(x).double(), reference_spline(x, module.values, 2.0), atol=1e-5, rtol=1e-5)


def test_spline_initialisation_constant_and_identity():
    constant = Spline(SplineGrid(15.0, 64, 0.01))
    assert torch.all(constant.values == 0.01)
    identity = Spline(SplineGrid(15.0, 64, -1))
    x = torch.linspace(-14.9, 14.9, 77)
    torch.testing.assert_close(identity(x), x, atol=1e-5, rtol=1e-5)
    per_channel = Spline(SplineGrid(15.0, 64, -1), channels=3)
    torch.testing.assert_close(per_channel(x[:, None].expand(-1, 3)), x[:, None].expand(-1, 3), atol=1e-5, rtol=1e-5)


def test_shared_spline_maps_one_dimensional_inputs():
    module = Spline(SplineGrid(15.0, 64, -1))
    x = torch.linspace(-3, 3, 7)
    assert module(x).shape == (7,)


def test_spline_under_bf16_autocast_keeps_fp32_values_and_returns_input_dtype():
    module = Spline(SplineGrid(4.0, 32))
    x = torch.randn(4, 8).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = module(x)
    assert module.values.dtype == torch.float32 and y.dtype == torch.bfloat16


@pytest.mark.parametrize("name", LEARNABLE_NAMES)
def test_learnable_activations_pass_gradcheck_in_float64(name):
    torch.manual_seed(0)
    module = build_activation(name, 4, SplineGrid(2.0, 9)).double()
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))
    # stay off spline knots, where the function has kinks
    x = (torch.rand(3, 4, dtype=torch.float64) * 3.6 - 1.8 + 0.01).requires_grad_()
    names = [name for name, _ in module.named_parameters()]
    assert names, "a learnable activation must have parameters"

    def f(x, *params):
        return torch.func.functional_call(module, dict(zip(names, params)), (x,))

    inputs = (x, *[p.detach().clone().requires_grad_() for p in module.parameters()])
    assert torch.autograd.gradcheck(f, inputs)


def test_prelu_and_swish_start_where_the_literature_does():
    prelu = build_activation("prelu", 5)
    assert torch.all(prelu.slope == 0.25) and prelu.slope.shape == (5,)
    x = torch.tensor([-2.0, 3.0])
    torch.testing.assert_close(build_activation("swish", 1)(x), F.silu(x))


@pytest.mark.parametrize("name, target, tol", [("rational", lambda x: F.leaky_relu(x, 0.01), 0.08),
                                               ("rational_gelu", F.gelu, 0.02)])
def test_rational_starts_close_to_its_named_function(name, target, tol):
    x = torch.linspace(-3, 3, 601)
    module = build_activation(name, 1)
    assert (module(x) - target(x)).abs().max() < tol
    assert len(module.numerator) == 6 and len(module.denominator) == 4


def test_rational_denominator_never_vanishes():
    module = build_activation("rational", 1)
    with torch.no_grad():
        module.denominator.copy_(torch.tensor([-1.0, 0.0, 0.0, 0.0]))  # 1 - x would vanish at x = 1
    assert torch.isfinite(module(torch.linspace(-2, 2, 401))).all()


@pytest.mark.parametrize("spec, mlp, att", [("gelu;att-linear", "gelu", "linear"),
                                            ("spline;att-spline", "spline", "spline"),
                                            ("relu2;att-none", "relu2", "none")])
def test_parse_af_spec(spec, mlp, att):
    parsed = parse_af_spec(spec)
    assert (parsed.mlp, parsed.att) == (mlp, att)
    assert parsed.has_att_slot == (att != "none")


def test_none_is_only_valid_for_attention():
    with pytest.raises(ValueError, match="unknown MLP activation 'none'"):
        parse_af_spec("none;att-linear")


NEW_LEARNABLE = ["gelu_learn", "apl", "xielu"]


def test_new_activations_are_registered_with_their_kind():
    assert {"gelu_learn", "apl", "xielu", "hardsigmoid"} <= set(ACTIVATION_NAMES)
    assert set(NEW_LEARNABLE) <= set(LEARNABLE_NAMES) and not is_learnable("hardsigmoid")
    assert "apl" in PER_CHANNEL_NAMES and not {"gelu_learn", "xielu"} & set(PER_CHANNEL_NAMES)
    for name in (*NEW_LEARNABLE, "hardsigmoid"):
        assert (parse_af_spec(f"{name};att-none").mlp, parse_af_spec(f"gelu;att-{name}").att) == (name, name)


@pytest.mark.parametrize("spec, message", [("gelu_learnt;att-none", "unknown MLP activation 'gelu_learnt'"),
                                           ("gelu;att-apl2", "unknown attention activation 'apl2'")])
def test_bad_names_list_the_valid_ones_including_the_new(spec, message):
    with pytest.raises(ValueError, match=message) as error:
        parse_af_spec(spec)
    assert all(name in str(error.value) for name in ("gelu_learn", "apl", "xielu", "hardsigmoid"))


def test_learnable_gelu_starts_as_gelu():
    module = build_activation("gelu_learn", 8)
    x = torch.linspace(-6, 6, 201)
    assert module.scale.item() == 1.0
    torch.testing.assert_close(module(x), F.gelu(x))
    with torch.no_grad():
        module.scale.fill_(1.702)
    torch.testing.assert_close(module(x), x * torch.distributions.Normal(0, 1).cdf(1.702 * x))


def test_apl_starts_as_relu_with_spread_hinges():
    module = build_activation("apl", 5)
    assert module.slopes.shape == module.hinge_points.shape == (5, 2) and torch.all(module.slopes == 0)
    torch.testing.assert_close(module.hinge_points, torch.tensor([[-1.0, 1.0]]).expand(5, 2))
    x = torch.randn(3, 7, 5) * 3
    assert torch.equal(module(x), F.relu(x))


def test_apl_computes_its_hinges_per_channel():
    module = build_activation("apl", 3)
    with torch.no_grad():
        module.slopes.normal_()
        module.hinge_points.normal_()
    x = torch.randn(4, 3)
    expected = torch.stack([F.relu(x[:, c]) + sum(module.slopes[c, s] * F.relu(module.hinge_points[c, s] - x[:, c])
                                                  for s in range(2)) for c in range(3)], 1)
    torch.testing.assert_close(module(x), expected)


def test_xielu_is_transformers_with_fp32_parameters():
    from transformers.activations import XIELUActivation

    module = build_activation("xielu", 8)
    reference = XIELUActivation(dtype=torch.float32)
    x = torch.linspace(-6, 6, 201)
    torch.testing.assert_close(module(x), reference(x))
    assert all(t.dtype == torch.float32 for t in module.state_dict().values())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert module(x.bfloat16()).dtype == torch.bfloat16


@pytest.mark.parametrize("name", NEW_LEARNABLE)
def test_new_learnable_activations_start_at_their_initial_state_and_get_gradients(name):
    module = build_activation(name, 4)
    start = {k: v.clone() for k, v in module.state_dict().items()}
    for key, value in module.initial_state().items():
        torch.testing.assert_close(start[key], value, rtol=0, atol=0)
    with torch.no_grad():  # APL's slopes start at 0, so the hinge points need a slope to get a gradient
        for p in module.parameters():
            p.add_(0.1)
    module(torch.randn(16, 4) * 2).square().sum().backward()
    for param_name, p in module.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, param_name


@pytest.mark.parametrize("af_type", ["gelu_learn;att-apl", "apl;att-xielu", "xielu;att-none"])
def test_bank_round_trips_the_new_learnable_activations(af_type, tmp_path):
    import afgpt
    from afgpt.bank import ActivationBank, read_activations
    from conftest import perturb, tiny_config

    model = perturb(afgpt.AfGPTForCausalLM(tiny_config(af_type=af_type, num_hidden_layers=2)))
    bank = ActivationBank.from_model(model)
    bank.save(tmp_path / "bank")
    read = read_activations(tmp_path / "bank")
    assert read.settings.af_type == af_type
    assert read.state_dict().keys() == bank.state_dict().keys()
    for key, value in bank.state_dict().items():
        torch.testing.assert_close(read.state_dict()[key], value, rtol=0, atol=0)
    fresh = afgpt.AfGPTForCausalLM(tiny_config(af_type=af_type, num_hidden_layers=2))
    read.load_into(fresh)
    for key, value in model.model.activations.state_dict().items():
        torch.testing.assert_close(fresh.model.activations.state_dict()[key], value, rtol=0, atol=0)


def test_a_model_built_on_the_meta_device_starts_the_new_activations_at_their_initial_values():
    import afgpt
    from transformers import AutoModelForCausalLM
    from conftest import tiny_config

    model = AutoModelForCausalLM.from_config(tiny_config(af_type="xielu;att-gelu_learn", num_hidden_layers=2))
    model_apl = AutoModelForCausalLM.from_config(tiny_config(af_type="apl;att-none", num_hidden_layers=2))
    modules = [*model.model.activations.mlp, *model.model.activations.att, *model_apl.model.activations.mlp]
    for module in modules:
        for key, value in module.initial_state().items():
            torch.testing.assert_close(module.state_dict()[key], value, rtol=0, atol=0)
    assert isinstance(model, afgpt.AfGPTForCausalLM)


@pytest.mark.parametrize("name", [*NEW_LEARNABLE, "hardsigmoid"])
def test_new_activations_plot(name):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from afgpt.plotting import draw_activation

    fig, ax = plt.subplots()
    draw_activation(ax, build_activation(name, 6).to(torch.bfloat16))
    labels = [line.get_label() for line in ax.get_lines()]
    assert ("6 of 6 channels" in labels) == (name in PER_CHANNEL_NAMES)
    plt.close(fig)
