"""The Triton spline kernels against a float64 reference and the CPU kernel.

On CUDA machines they run on the GPU. Elsewhere this module reruns itself in a subprocess with
TRITON_INTERPRET=1, which runs the kernels on CPU tensors in Triton's interpreter: the variable
must be set before triton is imported, and would change triton for every other test module of
this process. The interpreter rounds fp32 -> bf16 by truncation (CUDA rounds to nearest even),
hence the one-ulp bf16 tolerances.
"""
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

from afgpt.spline_kernels import spline as cpu_spline  # noqa: E402
from afgpt.spline_kernels import triton_kernel as tk  # noqa: E402
from test_spline_kernels import (HI, LO, assert_within_one_bf16_ulp, make_inputs,  # noqa: E402
                                 off_knots, reference, rel_err)

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICES = ["cpu"] if INTERPRETED else ["cuda"] if torch.cuda.is_available() else []
BF16_TOL = 2**-7  # one bf16 ulp: the interpreter truncates


def on_devices(test):
    """Parametrize over this process's devices; with none, the interpreter subprocess runs it."""
    skip = pytest.mark.skipif(not DEVICES, reason="run by test_under_the_interpreter's subprocess")
    return skip(pytest.mark.parametrize("device", DEVICES or ["cpu"])(test))


@pytest.mark.skipif(bool(DEVICES), reason="the kernels run in this process")
def test_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", __file__], env=env,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-8000:] + run.stderr[-2000:]


def inputs_on(device, shape, k, per_channel, dtype, seed=0):
    x, values, grad = make_inputs(shape, k, per_channel, dtype, seed)
    return x.to(device), values.to(device), grad.to(device)


@on_devices
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("per_channel", [False, True], ids=["shared", "per_channel"])
@pytest.mark.parametrize("k", [5, 64, 200])
def test_matches_float64_reference(device, dtype, per_channel, k):
    x, values, grad = inputs_on(device, (3, 5, 40), k, per_channel, dtype)
    x.requires_grad_()
    values.requires_grad_()
    y = tk.spline(x, values, LO, HI)
    gx, gv = torch.autograd.grad(y, [x, values], grad)
    ref_x = x.detach().cpu().double().requires_grad_()
    ref_values = values.detach().cpu().double().requires_grad_()
    y_ref = reference(ref_x, ref_values)
    gx_ref, gv_ref = torch.autograd.grad(y_ref, [ref_x, ref_values], grad.cpu().double())
    assert y.dtype == x.dtype and gx.dtype == x.dtype and gv.dtype == torch.float32
    tol = 1e-5 if dtype == torch.float32 else BF16_TOL
    # fp32 spline coordinates t = (x - x_min) / h carry an absolute error growing with k
    y_atol = max(tol, 1e-7 * k * values.abs().max().item())
    torch.testing.assert_close(y.cpu().double(), y_ref.detach(), rtol=tol, atol=y_atol)
    mask = off_knots(x.detach().cpu(), k)
    torch.testing.assert_close(gx.cpu().double()[mask], gx_ref[mask], rtol=tol, atol=1e-6)
    assert rel_err(gv.cpu(), gv_ref) <= 1e-5


@on_devices
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("per_channel", [False, True], ids=["shared", "per_channel"])
def test_matches_cpu_kernel_on_non_contiguous_input(device, dtype, per_channel):
    x, values, grad = inputs_on(device, (6, 9, 37), 24, per_channel, dtype, seed=1)
    x = x.transpose(0, 1).requires_grad_()  # non-contiguous; on anchors, ends and far outside
    grad = grad.transpose(0, 1)
    values.requires_grad_()
    y = tk.spline(x, values, LO, HI)
    gx, gv = torch.autograd.grad(y, [x, values], grad)
    x_cpu = x.detach().cpu().requires_grad_()
    values_cpu = values.detach().cpu().requires_grad_()
    y_cpu = cpu_spline(x_cpu, values_cpu, LO, HI)
    gx_cpu, gv_cpu = torch.autograd.grad(y_cpu, [x_cpu, values_cpu], grad.cpu())
    assert y.shape == x.shape
    if dtype == torch.float32:
        torch.testing.assert_close(y.cpu(), y_cpu, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gx.cpu(), gx_cpu, rtol=1e-5, atol=1e-6)  # knots included
    else:
        assert_within_one_bf16_ulp(y.cpu(), y_cpu, atol=2**-8)
        assert_within_one_bf16_ulp(gx.cpu(), gx_cpu, atol=1e-6)
    assert rel_err(gv.cpu(), gv_cpu) <= 1e-5


@on_devices
@pytest.mark.parametrize("per_channel", [False, True], ids=["shared", "per_channel"])
def test_frozen_values_skip_the_values_gradient(device, per_channel):
    x, values, grad = inputs_on(device, (5, 32), 16, per_channel, torch.float32)
    grad_x, grad_v = tk.spline_bwd(grad, x, values, LO, HI, False)
    assert grad_x.shape == x.shape and grad_v.numel() == 0
    x.requires_grad_()
    tk.spline(x, values, LO, HI).backward(grad)
    assert values.grad is None
    torch.testing.assert_close(x.grad, grad_x)


@on_devices
@pytest.mark.parametrize("per_channel", [False, True], ids=["shared", "per_channel"])
def test_empty_input(device, per_channel):
    values = torch.randn((8, 6) if per_channel else (6,), device=device, requires_grad=True)
    x = torch.empty(0, 8, device=device, requires_grad=True)
    y = tk.spline(x, values, LO, HI)
    gx, gv = torch.autograd.grad(y.sum(), [x, values])
    assert y.shape == x.shape and gx.shape == x.shape
    assert torch.equal(gv, torch.zeros_like(values))


@on_devices
@pytest.mark.parametrize("per_channel", [False, True], ids=["shared", "per_channel"])
def test_deterministic_mode_is_bit_identical(device, per_channel):
    x, values, grad = inputs_on(device, (64, 48), 32, per_channel, torch.float32)
    values.requires_grad_()
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first, second = (torch.autograd.grad(tk.spline(x, values, LO, HI), [values], grad)[0]
                         for _ in range(2))
    finally:
        torch.use_deterministic_algorithms(was)
    assert torch.equal(first, second)


@on_devices
def test_torch_compile_fullgraph_traces_the_op(device):
    torch.manual_seed(0)
    shared = torch.nn.functional.gelu(torch.linspace(LO, HI, 20)).to(device).requires_grad_()
    per_channel = torch.randn(16, 12, device=device, requires_grad=True)
    x = torch.randn(2, 8, 16, device=device) * 2

    def two_splines(x, shared, per_channel):
        return tk.spline(tk.spline(x, shared, LO, HI), per_channel, LO, HI)

    compiled = torch.compile(two_splines, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (two_splines, compiled):
        out = fn(x, shared, per_channel)
        results.append((out, *torch.autograd.grad(out.square().sum(), [shared, per_channel])))
    for eager, traced in zip(*results):
        torch.testing.assert_close(traced, eager)
