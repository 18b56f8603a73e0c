"""Time of the LA activation and the MoA feed-forward vs a GELU MLP: feed-forwards alone, and AfGPT training steps.

Feed-forwards on [tokens, hidden] inputs of RMS 1 (a block's pre-norm output), forward+backward, eager (on CPU by
afgpt's fused mixture kernel, and by the PyTorch fallback: AFGPT_MIXTURE_BACKEND=torch) and torch.compile'd:
    mlp       Linear(h, 4h), GELU, Linear(4h, h), no biases (afgpt.ffn.MLP)
    la        the same MLP with LearnableMixture (7 functions, one coefficient set) as its activation
    la-pc     the same with one coefficient set per channel
    moa       MoAFeedForward (7 functions, token gates)
Training steps (eager, kernel and fallback): a small AfGPT (forward with labels, backward, AdamW step) with
af_type "gelu;att-linear", "la;att-linear", "la_per_channel;att-linear" and ffn_type "moa".
Everything is timed side by side by bench_kan's interleaved, noise-aware median (see there).
Goals: la <= 1.05x, moa <= 1.10x the MLP.

    python bench/bench_mixtures.py [--rounds 7] [--device cpu|cuda] [--hidden 128 256] [--tokens 8192]
                                   [--step-hidden 256] [--batch 8] [--seq 256] [--vocab 8192]
"""
import argparse
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import afgpt
from afgpt.ffn import MLP
from afgpt.mixtures import LearnableMixture, MoAFeedForward
from bench_activations import checked_device, device_sync
from bench_kan import time_interleaved
from bench_train_step import make_step

STEP_VARIANTS = {"mlp": ("gelu;att-linear", "mlp"), "la": ("la;att-linear", "mlp"),
                 "la-pc": ("la_per_channel;att-linear", "mlp"), "moa": ("gelu;att-linear", "moa")}


def on_fallback(fn: Callable[[], object]) -> Callable[[], None]:
    """fn run with AFGPT_MIXTURE_BACKEND=torch (afgpt.mixtures' _Mixture)."""
    def run() -> None:
        previous = os.environ.get("AFGPT_MIXTURE_BACKEND")
        os.environ["AFGPT_MIXTURE_BACKEND"] = "torch"
        try:
            fn()
        finally:
            if previous is None:
                del os.environ["AFGPT_MIXTURE_BACKEND"]
            else:
                os.environ["AFGPT_MIXTURE_BACKEND"] = previous
    return run


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
        inputs = [x, *model.parameters()]
        for suffix, forward in (("", model), ("+c", torch.compile(model, dynamic=False))):
            fns[name + suffix] = lambda forward=forward, inputs=inputs: torch.autograd.grad(forward(x), inputs, grad)
        fns[name + "+t"] = on_fallback(fns[name])
    times, noisy = time_interleaved(fns, rounds, device_sync(device.type))
    print(f"\nhidden {hidden}, intermediate {4 * hidden}, {tokens} tokens"
          + (f" ({noisy} noisy rounds used)" if noisy else ""))
    print(f"{'feed-forward':<14}{'params':>10}{'eager ms':>10}{'fallback ms':>13}{'compiled ms':>13}"
          f"{'x MLP eager':>13}{'x MLP (fb)':>12}{'x MLP (c)':>11}")
    for name, model in models.items():
        params = sum(p.numel() for p in model.parameters())
        print(f"{name:<14}{params:>10,}{times[name] * 1e3:>10.2f}{times[name + '+t'] * 1e3:>13.2f}"
              f"{times[name + '+c'] * 1e3:>13.2f}{times[name] / times['mlp']:>13.2f}"
              f"{times[name + '+t'] / times['mlp+t']:>12.2f}{times[name + '+c'] / times['mlp+c']:>11.2f}")


def run_steps(hidden: int, vocab: int, batch: int, seq: int, rounds: int) -> None:
    """Eager AfGPT training steps, kernel vs fallback, each variant vs the GELU MLP model."""
    torch.manual_seed(0)
    fns = {}
    for name, (af_type, ffn_type) in STEP_VARIANTS.items():
        config = afgpt.AfGPTConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=4, num_attention_heads=4,
                                   max_position_embeddings=seq, af_type=af_type, ffn_type=ffn_type)
        fns[name] = make_step(config, batch, seq, compiled=False)
        fns[name + "+t"] = on_fallback(fns[name])
    times, noisy = time_interleaved(fns, rounds, lambda: None)
    print(f"\nAfGPT training step (eager): hidden {hidden}, 4 layers, vocab {vocab}, batch {batch} x {seq} tokens"
          + (f" ({noisy} noisy rounds used)" if noisy else ""))
    print(f"{'model':<14}{'step ms':>10}{'fallback ms':>13}{'x MLP':>8}{'x MLP (fb)':>12}")
    for name in STEP_VARIANTS:
        print(f"{name:<14}{times[name] * 1e3:>10.1f}{times[name + '+t'] * 1e3:>13.1f}"
              f"{times[name] / times['mlp']:>8.3f}{times[name + '+t'] / times['mlp+t']:>12.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--hidden", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--step-hidden", type=int, default=256, help="training steps: hidden size (0: skip)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=8192)
    args = parser.parse_args()
    device = torch.device(checked_device(parser, args.device))
    print(f"torch {torch.__version__}, {device}" + ("" if device.type == "cuda" else
                                                    f", {torch.get_num_threads()} threads"))
    for hidden in args.hidden:
        run_case(hidden, args.tokens, args.rounds, device)
    if args.step_hidden and device.type == "cpu":
        run_steps(args.step_hidden, args.vocab, args.batch, args.seq, args.rounds)


if __name__ == "__main__":
    main()
