"""The C++ spline kernel and the PyTorch fallback against a float64 reference, and each other."""
import os
import subprocess
import sys

import pytest
import torch

from afgpt import spline_torch as torch_spline
from afgpt.spline_kernels import cpu_kernel, spline

LO, HI = -2.0, 2.0
needs_kernel = pytest.mark.skipif(not cpu_kernel.load(), reason="spline CPU kernel did not build")


def kernel_spline(x, values, x_min, x_max):
    return torch.ops.afgpt.spline_fwd(x, values, x_min, x_max)


BACKENDS = [pytest.param(kernel_spline, id="kernel", marks=needs_kernel),
            pytest.param(torch_spline.spline, id="fallback")]


def reference(x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Plain float64 bucketize / gather / lerp, constant outside [LO, HI]."""
    x, values = x.double(), values.double()
    k = values.shape[-1]
    anchors = torch.linspace(LO, HI, k, dtype=torch.float64)
    i = (torch.bucketize(x, anchors, right=True) - 1).clamp(0, k - 2)
    frac = ((x - anchors[i]) / (anchors[1] - anchors[0])).clamp(0, 1)
    if values.dim() == 1:
        v0, v1 = values[i], values[i + 1]
    else:
        rows = torch.arange(values.shape[0])
        v0, v1 = values[rows, i], values[rows, i + 1]
    return torch.lerp(v0, v1, frac)


def make_inputs(shape, k, per_channel, dtype, seed=0):
    """x with points outside the range, exactly on anchors and on both ends; smooth-ish values."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * 1.5
    flat = x.view(-1)
    anchors = torch.linspace(LO, HI, k)
    flat[: 3 * k : 3] = anchors  # exactly on every anchor
    flat[1:3] = torch.tensor([LO, HI])
    flat[4:6] = torch.tensor([-50.0, 50.0])
    rows = shape[-1] if per_channel else 1
    grid = torch.linspace(LO, HI, k)
    values = torch.nn.functional.gelu(grid) + 0.3 * torch.randn(rows, k, generator=gen)
    values = values if per_channel else values[0]
    grad = torch.randn(shape, generator=gen)
    return x.to(dtype), values, grad.to(dtype)


def off_knots(x: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of points whose slope is unambiguous (not within a hair of a knot)."""
    t = (x.double() - LO) / (HI - LO) * (k - 1)
    return (t - t.round()).abs() > 1e-3


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.mark.parametrize("fn", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("per_channel", [False, True], ids=["shared", "per_channel"])
@pytest.mark.parametrize("k", [5, 33, 100, 200])
def test_matches_float64_reference(fn, dtype, per_channel, k):
    x, values, grad = make_inputs((3, 7, 200), k, per_channel, dtype)
    values.requires_grad_()
    x.requires_grad_()
    y = fn(x, values, LO, HI)
    gx, gv = torch.autograd.grad(y, [x, values], grad)
    y_ref = reference(x.detach(), values.detach())
    ref_values = values.detach().double().requires_grad_()
    ref_x = x.detach().double().requires_grad_()
    gx_ref, gv_ref = torch.autograd.grad(reference(ref_x, ref_values), [ref_x, ref_values],
                                         grad.double())
    assert y.dtype == x.dtype and gx.dtype == x.dtype and gv.dtype == torch.float32
    out_tol = 1e-5 if dtype == torch.float32 else 2**-8
    # y = c[i] + t*d[i] with c[i] = v[i] - i*d[i]: fp32 rounding grows with the interval index
    y_atol = max(out_tol, 1e-7 * k * values.abs().max().item())
    torch.testing.assert_close(y.double(), y_ref, rtol=out_tol, atol=y_atol)
    mask = off_knots(x.detach(), k)
    torch.testing.assert_close(gx.double()[mask], gx_ref[mask], rtol=out_tol, atol=1e-6)
    assert rel_err(gv, gv_ref) <= (1e-5 if fn is kernel_spline else 1e-4)


@pytest.mark.parametrize("fn", BACKENDS)
def test_grad_x_on_knots_is_a_one_sided_slope(fn):
    k = 9
    values = torch.randn(k)
    anchors = torch.linspace(LO, HI, k)
    x = anchors.clone().requires_grad_()
    (gx,) = torch.autograd.grad(fn(x, values, LO, HI).sum(), [x])
    slopes = (values[1:] - values[:-1]) / (anchors[1] - anchors[0])
    left = torch.cat([torch.zeros(1), slopes])  # constant extrapolation outside
    right = torch.cat([slopes, torch.zeros(1)])
    assert bool(((gx - left).abs().lt(1e-5) | (gx - right).abs().lt(1e-5)).all())


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("per_channel", [False, True], ids=["shared", "per_channel"])
def test_kernel_and_fallback_agree(dtype, per_channel):
    # large enough for several threads and a partial channel block
    x, values, grad = make_inputs((9, 40, 200), 64, per_channel, dtype, seed=1)
    x = x.transpose(0, 1).requires_grad_()  # non-contiguous input
    grad = grad.transpose(0, 1)
    assert_kernel_matches_fallback(x, values.requires_grad_(), grad, dtype)


def assert_kernel_matches_fallback(x, values, grad, dtype) -> None:
    """Output, input gradient and values gradient of the kernel and the pure-torch path agree."""
    outs = []
    for fn in (kernel_spline, torch_spline.spline):
        y = fn(x, values, LO, HI)
        outs.append((y, *torch.autograd.grad(y, [x, values], grad)))
    (y1, gx1, gv1), (y2, gx2, gv2) = outs
    if dtype == torch.float32:
        torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gx1, gx2, rtol=1e-5, atol=1e-6)
    else:  # two fp32 results that differ in the last bits may round to neighbouring bf16 values
        assert_within_one_bf16_ulp(y1, y2, atol=2**-8)
        torch.testing.assert_close(gx1, gx2, rtol=2**-8, atol=1e-6)
    assert rel_err(gv1, gv2) <= 1e-4


def assert_within_one_bf16_ulp(a: torch.Tensor, b: torch.Tensor, atol: float = 0.0) -> None:
    """Every element of a and b differs by at most one bf16 unit in the last place of the larger one (plus atol,
    for values near zero whose fp32 rounding error is absolute)."""
    scale = torch.maximum(a.abs(), b.abs()).double().clamp_min(2.0 ** -126)
    ulp = torch.exp2(torch.floor(torch.log2(scale)) - 7)  # bf16 keeps 7 explicit mantissa bits
    diff = (a.double() - b.double()).abs()
    worst = ((diff - atol).clamp_min(0) / ulp).max().item()
    assert worst <= 1, f"differ by {worst:.2f} bf16 ulps (at most 1 allowed)"


def test_one_ulp_check_allows_one_bf16_step_and_no_more():
    x = torch.tensor([2.4, -0.3, 1e-3], dtype=torch.bfloat16)
    next_up = torch.nextafter(x, torch.full_like(x, 10.0))
    assert_within_one_bf16_ulp(x, next_up)
    with pytest.raises(AssertionError, match="bf16 ulps"):
        assert_within_one_bf16_ulp(x, torch.nextafter(next_up, torch.full_like(x, 10.0)))


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("channels", [37, 301])
def test_kernel_per_channel_tails_and_groups(dtype, channels):
    # channel counts that are not a multiple of the vector width, several channel groups and
    # threads; odd element counts for the shared spline's tail as well
    x, values, grad = make_inputs((3, 211, channels), 40, True, dtype, seed=2)
    shared = values[0].clone()
    for vals in (values, shared):
        assert_kernel_matches_fallback(x.clone().requires_grad_(), vals.clone().requires_grad_(), grad, dtype)


@needs_kernel
def test_kernel_per_channel_values_grad_does_not_depend_on_threads():
    x, values, grad = make_inputs((64, 40, 128), 64, True, torch.float32)
    threads = torch.get_num_threads()
    grads = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            grads.append(torch.ops.afgpt.spline_bwd(grad, x, values, LO, HI, True)[1])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(grads[0], g) for g in grads[1:])


@needs_kernel
def test_kernel_values_grad_is_deterministic():
    x, values, grad = make_inputs((64, 1024), 64, False, torch.float32)
    values.requires_grad_()
    first, second = (torch.autograd.grad(kernel_spline(x, values, LO, HI), [values], grad)[0]
                     for _ in range(2))
    assert torch.equal(first, second)


@pytest.mark.parametrize("per_channel", [False, True], ids=["shared", "per_channel"])
def test_fallback_gradcheck_float64(per_channel):
    k = 7
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(4, 5, generator=gen, dtype=torch.float64) * 5 - 2.5
    t = (x - LO) / (HI - LO) * (k - 1)
    x = torch.where((t - t.round()).abs() < 0.05, x + 0.1 * (HI - LO) / (k - 1), x)  # off knots
    values = torch.randn(5 if per_channel else 1, k, generator=gen, dtype=torch.float64)
    values = values if per_channel else values[0]
    inputs = (x.requires_grad_(), values.requires_grad_(), LO, HI)
    assert torch.autograd.gradcheck(torch_spline.spline, inputs)


@pytest.mark.parametrize("fn", BACKENDS)
def test_frozen_values_get_no_grad(fn):
    x, values, grad = make_inputs((5, 32), 16, True, torch.float32)
    x.requires_grad_()
    y = fn(x, values, LO, HI)
    y.backward(grad)
    ref_x = x.detach().double().requires_grad_()
    reference(ref_x, values).backward(grad.double())
    mask = off_knots(x.detach(), 16)
    assert values.grad is None
    torch.testing.assert_close(x.grad.double()[mask], ref_x.grad[mask], rtol=1e-5, atol=1e-6)


@needs_kernel
def test_kernel_skips_values_grad_when_not_needed():
    x, values, grad = make_inputs((5, 32), 16, False, torch.float32)
    grad_x, grad_v = torch.ops.afgpt.spline_bwd(grad, x, values, LO, HI, False)
    assert grad_x.shape == x.shape and grad_v.numel() == 0


@pytest.mark.parametrize("fn", BACKENDS)
def test_shared_spline_on_1d_input(fn):
    x, values, _ = make_inputs((300,), 12, False, torch.float32)
    x.requires_grad_()
    y = fn(x, values, LO, HI)
    y.sum().backward()
    assert y.shape == x.shape
    torch.testing.assert_close(y.double(), reference(x.detach(), values), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fn", BACKENDS)
@pytest.mark.parametrize("per_channel", [False, True], ids=["shared", "per_channel"])
def test_saves_only_x_and_values(fn, per_channel):
    x, values, _ = make_inputs((4, 8, 16), 10, per_channel, torch.bfloat16)
    x.requires_grad_()
    values.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fn(x, values, LO, HI)
    assert sorted((t.data_ptr(), t.dtype, tuple(t.shape)) for t in saved) == sorted(
        (t.data_ptr(), t.dtype, tuple(t.shape)) for t in (x, values))


class _TwoSplines(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(16, 16)
        self.shared = torch.nn.Parameter(torch.nn.functional.gelu(torch.linspace(LO, HI, 20)))
        self.per_channel = torch.nn.Parameter(torch.randn(16, 12))

    def forward(self, x):
        h = spline(self.proj(x), self.shared, LO, HI)
        return spline(h, self.per_channel, LO, HI)


@pytest.mark.parametrize("backend",
                         ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_torch_compile_fullgraph_matches_eager(backend):
    torch.manual_seed(0)
    model = _TwoSplines()
    x = torch.randn(2, 8, 16) * 2
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    grads = []
    for m in (model, compiled):
        out = m(x)
        grads.append((out, *torch.autograd.grad(out.square().sum(), list(model.parameters()))))
    for eager, traced in zip(*grads):
        torch.testing.assert_close(traced, eager, rtol=1e-5, atol=1e-5)


def test_env_var_forces_fallback():
    code = ("import torch; from afgpt import spline_kernels as sk; "
            "x = torch.randn(8, requires_grad=True); y = sk.spline(x, torch.randn(5), -1.0, 1.0); "
            "print(sk.kernel_enabled(), type(y.grad_fn).__name__)")
    env = dict(os.environ, AFGPT_SPLINE_BACKEND="torch")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["False", "_SplineBackward"]


def test_invalid_backend_name_is_rejected(monkeypatch):
    monkeypatch.setenv("AFGPT_SPLINE_BACKEND", "fast")
    with pytest.raises(ValueError, match="AFGPT_SPLINE_BACKEND"):
        spline(torch.randn(4), torch.randn(5), LO, HI)


PORTABLE_CHECK = """
import torch
from torch.utils import cpp_extension
from afgpt import spline_torch as torch_spline
from afgpt.spline_kernels import cpu_kernel
cpp_extension.load("afgpt_spline_cpu_portable_test", [str(cpu_kernel._SOURCE)],
                   extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"],
                   is_python_module=False)
ops = torch.ops.afgpt_spline_cpu
torch.manual_seed(0)
for k in (5, 64, 200):
    for shape in ((k,), (200, k)):
        x, grad, values = torch.randn(9, 40, 200) * 3, torch.randn(9, 40, 200), torch.randn(shape)
        got = (ops.forward(x, values, -4.0, 4.0), *ops.backward(grad, x, values, -4.0, 4.0, True))
        want = (torch_spline.forward(x, values, -4.0, 4.0),
                *torch_spline.backward(grad, x, values, -4.0, 4.0, True))
        for a, b in zip(got, want):
            assert ((a - b).abs().max() / b.abs().max()).item() < 1e-4
print("ok")
"""


@pytest.mark.slow
@needs_kernel
def test_portable_build_without_avx512_matches_fallback():
    """The plain-loop kernels (CPUs without AVX-512), built in a fresh process."""
    out = subprocess.run([sys.executable, "-c", PORTABLE_CHECK], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip().endswith("ok")
