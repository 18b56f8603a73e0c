"""The fused CPU mixture kernel (afgpt.mixture_kernels) against afgpt.mixtures' PyTorch fallback (_Mixture)."""
import warnings

import pytest
import torch

import afgpt.mixture_kernels as mixture_kernels
from afgpt.mixture_kernels import cpu_kernel
from afgpt.mixtures import DICTIONARY_NAMES, LearnableMixture, MoAFeedForward, _Mixture, mix

needs_kernel = pytest.mark.skipif(not cpu_kernel.load(), reason="mixture CPU kernel did not build")
LAYOUTS = {"shared": (1, 1), "per-channel": (1, 48), "per-row": (300, 1)}


def reference(x: torch.Tensor, names, weights: torch.Tensor, grad: torch.Tensor):
    """Output and gradients (x, weights) of the fallback, in double."""
    x, weights = x.detach().double().requires_grad_(), weights.detach().double().requires_grad_()
    out = _Mixture.apply(x, tuple(names), *weights.unbind(0))
    return out, *torch.autograd.grad(out, (x, weights), grad.double())


def kernel(x: torch.Tensor, names, weights: torch.Tensor, grad: torch.Tensor):
    x, weights = x.detach().requires_grad_(), weights.detach().requires_grad_()
    out = mix(x, names, weights)
    return out, *torch.autograd.grad(out, (x, weights), grad)


def assert_matches(x, names, weights, scale=1e-6):
    """Kernel vs double fallback, each error relative to the largest magnitude of its tensor."""
    grad = torch.randn_like(x)
    for got, want in zip(kernel(x, names, weights, grad), reference(x, names, weights, grad), strict=True):
        assert got.shape == want.shape
        assert (got.double() - want).abs().max() <= scale * want.abs().max()


@needs_kernel
@pytest.mark.parametrize("layout", LAYOUTS)
def test_kernel_matches_the_fallback_for_every_weight_layout(layout):
    torch.manual_seed(0)
    x = torch.randn(300, 48) * 3
    assert_matches(x, DICTIONARY_NAMES, torch.randn(len(DICTIONARY_NAMES), *LAYOUTS[layout]))


@needs_kernel
@pytest.mark.parametrize("names", [("gelu",), ("tanh", "relu"), ("silu", "identity", "leaky_relu", "relu2"),
                                   ("relu2", "tanh", "gelu", "silu", "leaky_relu", "relu", "identity")])
def test_kernel_takes_any_subset_in_any_order(names):
    torch.manual_seed(1)
    x = torch.randn(70, 33) * 3  # rows not a multiple of the vector width: partial vectors
    for shape in LAYOUTS.values():
        shape = tuple(33 if n == 48 else 70 if n == 300 else n for n in shape)
        assert_matches(x, names, torch.randn(len(names), *shape))


@needs_kernel
def test_each_function_alone_and_the_tails():
    """Every dictionary function alone, |x| up to 30, against exact (double) values."""
    x = torch.cat([torch.linspace(-30, 30, 6001), torch.tensor([0.0, 1e-6, -1e-6, 1e-30])])
    for k, name in enumerate(DICTIONARY_NAMES):
        weights = torch.eye(len(DICTIONARY_NAMES))[k]
        assert_matches(x[None], DICTIONARY_NAMES, weights)
        torch.testing.assert_close(mix(x, DICTIONARY_NAMES, weights),
                                   _Mixture.apply(x.double(), (name,), torch.tensor(1.0).double()).float(),
                                   rtol=1e-6, atol=1e-7)


@needs_kernel
def test_weight_gradients_are_accurate_for_many_elements():
    """Summed over 2^22 elements: per-thread double sums keep the relative error near fp32's resolution."""
    torch.manual_seed(2)
    x = torch.randn(4096, 1024)
    assert_matches(x, DICTIONARY_NAMES, torch.randn(len(DICTIONARY_NAMES), 1, 1), scale=2e-6)


@needs_kernel
def test_frozen_weights_get_no_gradient_and_x_still_does():
    la = LearnableMixture(channels=16).requires_grad_(False)
    with torch.no_grad():
        la.coefficients.normal_()
    x = torch.randn(8, 16, requires_grad=True)
    la(x).sum().backward()
    assert la.coefficients.grad is None
    expected, = torch.autograd.grad(mix(x.double(), la.names, la.coefficients.double()).sum(), x)
    torch.testing.assert_close(x.grad, expected.float(), rtol=1e-6, atol=1e-7)


@needs_kernel
def test_non_contiguous_empty_and_bf16_inputs():
    torch.manual_seed(3)
    weights = torch.randn(len(DICTIONARY_NAMES), 40)
    x = torch.randn(40, 30).T  # [30, 40], transposed
    assert not x.is_contiguous()
    assert_matches(x, DICTIONARY_NAMES, weights)
    empty = torch.empty(0, 40, requires_grad=True)
    w = weights.clone().requires_grad_()
    out = mix(empty, DICTIONARY_NAMES, w)
    out.sum().backward()
    assert out.shape == (0, 40) and (w.grad == 0).all() and empty.grad.shape == (0, 40)
    xb = x.bfloat16()
    out = mix(xb, DICTIONARY_NAMES, weights)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, mix(xb.float(), DICTIONARY_NAMES, weights).bfloat16())


@needs_kernel
def test_moa_uses_the_kernel_and_matches_the_fallback(monkeypatch):
    torch.manual_seed(4)
    moa = MoAFeedForward(8, 32)
    with torch.no_grad():
        moa.gates.weight.normal_()
    h = torch.randn(2, 5, 8)
    results = []
    for backend in ("cpp", "torch"):
        monkeypatch.setenv("AFGPT_MIXTURE_BACKEND", backend)
        out = moa(h)
        results.append((out, *torch.autograd.grad(out.square().sum(), list(moa.parameters()))))
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-6)


@needs_kernel
def test_the_backend_switch(monkeypatch):
    x = torch.randn(4, 6)
    calls = []
    monkeypatch.setattr(mixture_kernels, "mixture", lambda *args: calls.append(args) or torch.zeros(4, 6))
    monkeypatch.setattr("afgpt.mixtures.kernel_mixture", mixture_kernels.mixture)
    monkeypatch.setenv("AFGPT_MIXTURE_BACKEND", "torch")
    assert not (LearnableMixture()(x) == 0).all() and not calls
    monkeypatch.setenv("AFGPT_MIXTURE_BACKEND", "cpp")
    assert (LearnableMixture()(x) == 0).all() and len(calls) == 1
    monkeypatch.setenv("AFGPT_MIXTURE_BACKEND", "bogus")
    with pytest.raises(ValueError, match="AFGPT_MIXTURE_BACKEND"):
        LearnableMixture()(x)


def test_a_failed_build_warns_once_and_falls_back(monkeypatch):
    monkeypatch.setattr(cpu_kernel, "load", lambda: False)
    monkeypatch.setattr(cpu_kernel, "load_error", lambda: OSError("no compiler"))
    monkeypatch.setattr(mixture_kernels, "_warned", [])
    monkeypatch.setenv("AFGPT_MIXTURE_BACKEND", "auto")
    x = torch.randn(4, 6)
    with pytest.warns(RuntimeWarning, match="no compiler"):
        first = LearnableMixture()(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LearnableMixture()(x)
    torch.testing.assert_close(first, torch.nn.functional.gelu(x))
    monkeypatch.setenv("AFGPT_MIXTURE_BACKEND", "cpp")
    with pytest.raises(RuntimeError, match="failed to build"):
        LearnableMixture()(x)


def test_layouts_the_kernel_does_not_take_use_the_fallback():
    """Per-element weights ([K, R, C]) and double inputs go to _Mixture, with exact autograd."""
    x = torch.randn(3, 4, dtype=torch.double, requires_grad=True)
    weights = torch.randn(len(DICTIONARY_NAMES), 3, 4, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: mix(x, DICTIONARY_NAMES, w), (x, weights))
    assert torch.autograd.gradcheck(lambda x, w: mix(x, DICTIONARY_NAMES, w), (x, weights[:, :1, :1]))
