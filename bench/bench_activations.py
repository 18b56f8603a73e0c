"""Forward+backward speed and saved-for-backward memory of spline activations vs GELU/ReLU.

All candidates run side by side in one process, interleaved round by round, and each figure
is the median over rounds, so machine noise hits every candidate alike; on Linux, rounds during
which other processes used the CPU are measured again. Ratios are to GELU and to an eager
re-implementation of the lm-afs spline formulation (bucketize + gather + lerp). lm-afs itself runs
its shared spline eager (its torch.compile line lacks the @) but compiles the per-channel one, so
that compiled form is timed too ("lm-afs/ch+c"). With --device cuda the splines run the Triton
kernels (afgpt.spline_kernels.triton_kernel); goal there: shared spline <= 1.3x GELU.

    python bench/bench_activations.py [--rounds 7] [--dtype fp32|bf16|both] [--device cpu|cuda]
"""
import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch

from afgpt.spline_kernels import kernel_enabled, spline, triton_kernel

X_MIN, X_MAX = -4.0, 4.0


def lm_afs(x: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
    """The lm-afs formulation, left to autograd: bucketize, gather both ends, lerp."""
    k = vals.shape[-1]
    anchors = torch.linspace(X_MIN, X_MAX, k, device=x.device, dtype=x.dtype)
    step = (X_MAX - X_MIN) / (k - 1)
    idx = (torch.bucketize(x, anchors) - 1).clamp(0, k - 2)
    x0 = anchors[0] + idx * step
    frac = ((x - x0) / step).clamp(0, 1)
    if vals.dim() == 1:
        v0, v1 = vals[idx], vals[idx + 1]
    else:
        dim = torch.arange(vals.shape[0], device=x.device)
        v0, v1 = vals[dim, idx], vals[dim, idx + 1]
    return v0 + frac * (v1 - v0)


def candidates(channels: int, k: int, device: str) -> dict[str, tuple[Callable, torch.Tensor | None]]:
    """name -> (activation f(x, params), learnable params or None)."""
    grid = torch.linspace(X_MIN, X_MAX, k, device=device)
    shared = torch.nn.functional.gelu(grid).requires_grad_()
    per_channel = torch.nn.functional.gelu(grid).repeat(channels, 1).requires_grad_()
    spline_fn = triton_kernel.spline if device == "cuda" else spline
    return {
        "gelu": (lambda x, p: torch.nn.functional.gelu(x), None),
        "relu": (lambda x, p: torch.relu(x), None),
        "spline": (lambda x, p: spline_fn(x, p, X_MIN, X_MAX), shared),
        "spline/ch": (lambda x, p: spline_fn(x, p, X_MIN, X_MAX), per_channel),
        "lm-afs": (lm_afs, shared),
        "lm-afs/ch": (lm_afs, per_channel),
        "lm-afs/ch+c": (torch.compile(lm_afs, dynamic=False), per_channel),
    }


def checked_device(parser: argparse.ArgumentParser, name: str) -> str:
    """--device's value, refused with a clear message when it asks for CUDA where there is none."""
    if name == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device available")
    return name


def device_sync(device: str) -> Callable[[], None]:
    """What time_interleaved calls to wait for the device's queued work."""
    return torch.cuda.synchronize if device == "cuda" else lambda: None


def step(f: Callable, x: torch.Tensor, p: torch.Tensor | None, grad: torch.Tensor) -> None:
    inputs = [x] if p is None else [x, p]
    torch.autograd.grad(f(x, p), inputs, grad)


def saved_bytes_per_element(f: Callable, x: torch.Tensor, p: torch.Tensor | None) -> float:
    """Bytes autograd keeps for the backward (distinct storages), per input element."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        f(x, p)
    return sum(storages.values()) / x.numel()


def busy_cpu_seconds() -> tuple[float, float]:
    """(CPU seconds used by all processes, by this one) so far; all is 0 off Linux."""
    own = sum(os.times()[:2])
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return 0.0, own
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK"), own


def time_interleaved(fns: dict[str, Callable[[], None]], rounds: int,
                     sync: Callable[[], None] = lambda: None) -> dict[str, float]:
    """Median seconds per call; each round runs every candidate for ~0.1 s in turn.

    A round during which other processes kept more than a tenth of a core busy is redone
    (up to 5*rounds attempts), so a shared machine does not skew the ratios. sync waits for
    queued GPU work, so that it is counted.
    """
    calls = {}
    for name, fn in fns.items():  # warm-up, and calls per round for ~0.1 s
        fn()
        sync()
        start = time.perf_counter()
        fn()
        sync()
        calls[name] = max(1, int(0.1 / (time.perf_counter() - start)))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    kept = 0
    for _ in range(5 * rounds):
        all_before, own_before = busy_cpu_seconds()
        wall = time.perf_counter()
        current = {}
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(calls[name]):
                fn()
            sync()
            current[name] = (time.perf_counter() - start) / calls[name]
        all_after, own_after = busy_cpu_seconds()
        others = (all_after - all_before) - (own_after - own_before)
        if others > 0.1 * (time.perf_counter() - wall):
            continue
        for name, seconds in current.items():
            samples[name].append(seconds)
        kept += 1
        if kept == rounds:
            break
    if not kept:
        raise RuntimeError("the machine was never quiet enough to measure")
    return {name: statistics.median(s) for name, s in samples.items()}


def run_case(shape: tuple[int, ...], k: int, dtype: torch.dtype, rounds: int, device: str) -> None:
    x = (torch.randn(shape, device=device) * 1.5).to(dtype).requires_grad_()
    grad = torch.randn(shape, device=device).to(dtype)
    cands = candidates(shape[-1], k, device)
    fns = {name: (lambda f=f, p=p: step(f, x, p, grad)) for name, (f, p) in cands.items()}
    times = time_interleaved(fns, rounds, device_sync(device))
    print(f"\nshape {list(shape)}  K={k}  {str(dtype).removeprefix('torch.')}")
    print(f"{'activation':<11}{'fwd+bwd ms':>11}{'x GELU':>8}{'lm-afs / this':>15}"
          f"{'saved B/elem':>14}")
    for name, (f, p) in cands.items():
        ref = times["lm-afs/ch" if "/ch" in name else "lm-afs"]
        print(f"{name:<11}{times[name] * 1e3:>11.2f}{times[name] / times['gelu']:>8.2f}"
              f"{ref / times[name]:>15.1f}{saved_bytes_per_element(f, x, p):>14.1f}")
    print(f"spline/ch is {times['lm-afs/ch+c'] / times['spline/ch']:.1f}x faster than lm-afs/ch as "
          "lm-afs runs it (compiled)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--dtype", choices=["fp32", "bf16", "both"], default="both")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args()
    checked_device(parser, args.device)
    dtypes = {"fp32": [torch.float32], "bf16": [torch.bfloat16],
              "both": [torch.float32, torch.bfloat16]}[args.dtype]
    if args.device == "cuda":
        backend = f"Triton kernel on {torch.cuda.get_device_name()}"
    else:
        backend = "C++ kernel" if kernel_enabled() else "PyTorch fallback"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, spline backend: {backend}")
    for dtype in dtypes:
        for shape in [(16, 256, 1024), (16, 256, 512)]:
            for k in (64, 128):
                run_case(shape, k, dtype, args.rounds, args.device)


if __name__ == "__main__":
    main()
