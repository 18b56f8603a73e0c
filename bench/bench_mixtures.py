"""Forward+backward time of the LA activation and the MoA feed-forward vs a GELU MLP.

Feed-forwards on [tokens, hidden] inputs of RMS 1 (a block's pre-norm output), each eager and torch.compile'd, timed
side by side by bench_kan's interleaved, noise-aware median (see there).
    mlp       Linear(h, 4h), GELU, Linear(4h, h), no biases (afgpt.ffn.MLP)
    la        the same MLP with LearnableMixture (7 functions, one coefficient set) as its activation
    la-pc     the same with one coefficient set per channel
    moa       MoAFeedForward (7 functions, token gates)
Goals (compiled): la <= 1.05x, moa <= 1.10x the MLP.

    python bench/bench_mixtures.py [--rounds 7] [--device cpu|cuda] [--hidden 128 256] [--tokens 8192]
"""
import argparse

import torch
import torch.nn.functional as F
from torch import nn

from afgpt.ffn import MLP
from afgpt.mixtures import LearnableMixture, MoAFeedForward
from bench_kan import time_interleaved


def build_models(hidden: int) -> dict[str, nn.Module]:
    inter = 4 * hidden
    return {"mlp": MLP(hidden, inter, nn.GELU()),
            "la": MLP(hidden, inter, LearnableMixture()),
            "la-pc": MLP(hidden, inter, LearnableMixture(channels=inter)),
            "moa": MoAFeedForward(hidden, inter)}


def run_case(hidden: int, tokens: int, rounds: int, device: torch.device) -> None:
    torch.manual_seed(0)
    models = {name: model.to(device) for name, model in build_models(hidden).items()}
    x = F.rms_norm(torch.randn(tokens, hidden, device=device), (hidden,)).requires_grad_()
    grad = torch.randn(tokens, hidden, device=device)
    fns = {}
    for name, model in models.items():
        for compiled in (False, True):
            forward = torch.compile(model, dynamic=False) if compiled else model
            inputs = [x, *model.parameters()]
            fns[name + ("+c" if compiled else "")] = (
                lambda forward=forward, inputs=inputs: torch.autograd.grad(forward(x), inputs, grad))
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    times, noisy = time_interleaved(fns, rounds, sync)
    print(f"\nhidden {hidden}, intermediate {4 * hidden}, {tokens} tokens"
          + (f" ({noisy} noisy rounds used)" if noisy else ""))
    print(f"{'feed-forward':<14}{'params':>10}{'eager ms':>10}{'compiled ms':>13}{'x MLP eager':>13}{'x MLP (c)':>11}")
    for name, model in models.items():
        params = sum(p.numel() for p in model.parameters())
        print(f"{name:<14}{params:>10,}{times[name] * 1e3:>10.2f}{times[name + '+c'] * 1e3:>13.2f}"
              f"{times[name] / times['mlp']:>13.2f}{times[name + '+c'] / times['mlp+c']:>11.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--hidden", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--tokens", type=int, default=8192)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device available")
    print(f"torch {torch.__version__}, {device}" + ("" if device.type == "cuda" else
                                                    f", {torch.get_num_threads()} threads"))
    for hidden in args.hidden:
        run_case(hidden, args.tokens, args.rounds, device)


if __name__ == "__main__":
    main()
