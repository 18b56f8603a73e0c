"""Forward+backward time and memory of the KAN feed-forward vs a GELU MLP and vs efficient-kan's formulation.

Feed-forwards on [tokens, hidden] inputs of RMS 1 (a block's pre-norm output), each eager and torch.compile'd, run
side by side in one process, interleaved round by round; each time is the median over rounds, and on Linux rounds
during which other processes used the CPU are measured again (up to a limit), so machine noise hits every candidate
alike.
    mlp      Linear(h, 4h), GELU, Linear(4h, h), no biases
    kan      afgpt.kan.KANFeedForward (KANLinear, parameter-free RMS norm, KANLinear)
    eff-kan  the same two-layer shape and parameters with efficient-kan's KANLinear as written upstream (Cox-de Boor
             recursion over all bases on [N, in, G+2k+1] tensors, left to autograd), re-implemented below
Widths: "params" gives the KANs as many parameters as the MLP, "mlp" makes their hidden width 4h.
Memory: CUDA's peak allocation during forward+backward; on CPU, the bytes autograd saves for the backward (distinct
storages, parameters and input excluded), the part of the peak that grows with the batch.

    python bench/bench_kan.py [--rounds 7] [--device cpu|cuda] [--widths params,mlp] [--hidden 128 256]
"""
import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from afgpt.kan import KANFeedForward, KANLinear, kan_hidden_size
from bench_activations import busy_cpu_seconds, checked_device, device_sync  # bench/ is on sys.path

TOKENS = 16 * 128


def efficient_kan_bases(x: torch.Tensor, grid: torch.Tensor, k: int) -> torch.Tensor:
    """efficient-kan's b_splines: order-0 indicators on every knot interval, then k Cox-de Boor levels."""
    x = x.unsqueeze(-1)
    bases = ((x >= grid[:, :-1]) & (x < grid[:, 1:])).to(x.dtype)
    for j in range(1, k + 1):
        bases = ((x - grid[:, :-(j + 1)]) / (grid[:, j:-1] - grid[:, :-(j + 1)]) * bases[:, :, :-1]
                 + (grid[:, j + 1:] - x) / (grid[:, j + 1:] - grid[:, 1:-j]) * bases[:, :, 1:])
    return bases


def efficient_kan_linear(layer: KANLinear, x: torch.Tensor) -> torch.Tensor:
    """efficient-kan's KANLinear.forward on our layer's parameters."""
    bases = efficient_kan_bases(x, layer.grid, layer.spline_order)
    return (F.linear(layer.base_activation(x), layer.base_weight)
            + F.linear(bases.flatten(1), layer.scaled_spline_weight.flatten(1)))


class EfficientKANFeedForward(nn.Module):
    """KANFeedForward's shape and parameters, each layer evaluated as efficient-kan does."""

    def __init__(self, kan: KANFeedForward):
        super().__init__()
        self.kan = kan

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = efficient_kan_linear(self.kan.fc, x)
        return efficient_kan_linear(self.kan.proj, F.rms_norm(hidden, (hidden.shape[-1],)))


class MLP(nn.Module):
    """The transformer MLP the KAN replaces."""

    def __init__(self, hidden: int):
        super().__init__()
        self.fc = nn.Linear(hidden, 4 * hidden, bias=False)
        self.proj = nn.Linear(4 * hidden, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


def time_interleaved(fns: dict[str, Callable[[], None]], rounds: int,
                     sync: Callable[[], None]) -> tuple[dict[str, float], int]:
    """Median seconds per call, and how many of the rounds used were noisy; each round runs every candidate for
    ~0.2 s in turn. A round during which other processes kept more than a tenth of a core busy is measured again, up
    to 3*rounds attempts; if fewer than `rounds` were quiet by then, all attempts are used."""
    calls = {}
    for name, fn in fns.items():  # warm-up, and calls per round for ~0.2 s
        fn()
        sync()
        start = time.perf_counter()
        fn()
        sync()
        calls[name] = max(1, int(0.2 / (time.perf_counter() - start)))
    attempts: list[tuple[bool, dict[str, float]]] = []
    for _ in range(3 * rounds):
        all_before, own_before = busy_cpu_seconds()
        wall = time.perf_counter()
        seconds = {}
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(calls[name]):
                fn()
            sync()
            seconds[name] = (time.perf_counter() - start) / calls[name]
        all_after, own_after = busy_cpu_seconds()
        others = (all_after - all_before) - (own_after - own_before)
        attempts.append((others > 0.1 * (time.perf_counter() - wall), seconds))
        if sum(not noisy for noisy, _ in attempts) == rounds:
            break
    used = [(noisy, s) for noisy, s in attempts if not noisy]
    if len(used) < rounds:
        used = attempts
    return ({name: statistics.median(s[name] for _, s in used) for name in fns},
            sum(noisy for noisy, _ in used))


def saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd keeps for the backward of model(x): distinct storages, parameters and input excluded."""
    exclude = {p.untyped_storage().data_ptr() for p in model.parameters()} | {x.untyped_storage().data_ptr()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in exclude:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(storages.values())


def peak_bytes(step: Callable[[], None], x: torch.Tensor) -> int:
    """CUDA: peak allocation during a step above what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def run_case(hidden: int, widths: list[str], rounds: int, device: torch.device) -> None:
    torch.manual_seed(0)
    models: dict[str, nn.Module] = {"mlp": MLP(hidden)}
    for width in widths:
        kan = KANFeedForward(hidden, kan_hidden_size(hidden, 4 * hidden, 5, 3, width))
        models[f"kan[{width}]"] = kan
        models[f"eff-kan[{width}]"] = EfficientKANFeedForward(kan)
    models = {name: model.to(device) for name, model in models.items()}
    x = F.rms_norm(torch.randn(TOKENS, hidden, device=device), (hidden,)).requires_grad_()
    grad = torch.randn(TOKENS, hidden, device=device)
    with torch.no_grad():
        for width in widths:  # the two formulations must agree before they are timed
            torch.testing.assert_close(models[f"kan[{width}]"](x), models[f"eff-kan[{width}]"](x), rtol=1e-4, atol=1e-4)
    fns, memory = {}, {}
    for name, model in models.items():
        for compiled in (False, True):
            forward = torch.compile(model, dynamic=False) if compiled else model
            inputs = [x, *model.parameters()]
            key = name + ("+c" if compiled else "")
            fns[key] = lambda forward=forward, inputs=inputs: torch.autograd.grad(forward(x), inputs, grad)
            memory[key] = peak_bytes(fns[key], x) if device.type == "cuda" else saved_bytes(forward, x)
    times, noisy = time_interleaved(fns, rounds, device_sync(device.type))
    params = {name: sum(p.numel() for p in model.parameters()) for name, model in models.items()}
    print(f"\nhidden {hidden}, {TOKENS} tokens, grid 5, order 3" + (f" ({noisy} noisy rounds used)" if noisy else ""))
    print(f"{'feed-forward':<16}{'params':>10}{'eager ms':>10}{'compiled ms':>13}{'MB eager':>10}{'MB compiled':>13}"
          f"{'x MLP (c)':>11}")
    for name in models:
        print(f"{name:<16}{params[name]:>10,}{times[name] * 1e3:>10.2f}{times[name + '+c'] * 1e3:>13.2f}"
              f"{memory[name] / 2**20:>10.1f}{memory[name + '+c'] / 2**20:>13.1f}"
              f"{times[name + '+c'] / times['mlp+c']:>11.2f}")
    for width in widths:
        kan, eff = f"kan[{width}]", f"eff-kan[{width}]"
        print(f"{width} width: efficient-kan / ours = {times[eff] / times[kan]:.2f}x eager, "
              f"{times[eff + '+c'] / times[kan + '+c']:.2f}x compiled (goal >= 2)"
              + (f"; ours / MLP = {times[kan + '+c'] / times['mlp+c']:.2f}x compiled (goal <= 2)"
                 if width == "params" else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--widths", default="params", help="comma-separated KAN widths: params, mlp")
    parser.add_argument("--hidden", type=int, nargs="+", default=[128, 256])
    args = parser.parse_args()
    device = torch.device(checked_device(parser, args.device))
    print(f"torch {torch.__version__}, {device}" + ("" if device.type == "cuda" else
                                                    f", {torch.get_num_threads()} threads"))
    for hidden in args.hidden:
        run_case(hidden, args.widths.split(","), args.rounds, device)


if __name__ == "__main__":
    main()
