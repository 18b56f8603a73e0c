"""Training-step throughput of AfGPT with GELU vs spline activations, eager and torch.compile.

One step is forward with labels, backward and an AdamW step on a batch of random tokens. All
variants run interleaved round by round in one process (rounds disturbed by other processes are
redone) and each figure is the median step. Model FLOPs per step are 6*params*tokens plus
attention, 12*layers*hidden*seq*tokens (params counts the tied embedding once, standing for the
LM-head matmul); "of peak" divides the achieved FLOP/s by that of a 2048^3 fp32 matmul timed in
the same interleaved rounds (so a noisy neighbour slows both alike), the practical peak of this
machine. With --device cuda the spline models run afgpt's Triton kernel (the spline backend that
afgpt.spline_kernels picks for CUDA tensors); goal there: spline;att-spline step <= 1.05x GELU.

    python bench/bench_train_step.py [--rounds 5] [--batch 16] [--seq 256] [--device cpu|cuda]
"""
import argparse
import logging
import time
from collections.abc import Callable

import torch

import afgpt
from bench_activations import checked_device, device_sync, time_interleaved

AF_TYPES = ("gelu;att-linear", "spline;att-spline")


def matmul(n: int = 2048, device: str = "cpu") -> Callable[[], None]:
    """One n x n fp32 matmul (2 n^3 FLOP), timed alongside the steps as the machine's practical peak."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    return lambda: torch.mm(a, b)


def make_step(config: afgpt.AfGPTConfig, batch: int, seq: int, compiled: bool,
              device: str = "cpu") -> Callable[[], None]:
    """A closure running one training step of a fresh model on fixed random tokens."""
    model = afgpt.AfGPTForCausalLM(config).to(device)
    forward = torch.compile(model) if compiled else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, config.vocab_size, (batch, seq), device=device)

    def step() -> None:
        loss = forward(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def step_flops(config: afgpt.AfGPTConfig, batch: int, seq: int) -> float:
    params = sum(p.numel() for p in afgpt.AfGPTForCausalLM(config).parameters())
    tokens = batch * seq
    return 6 * params * tokens + 12 * config.num_hidden_layers * config.hidden_size * seq * tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args()
    checked_device(parser, args.device)
    torch._logging.set_logs(dynamo=logging.ERROR)  # the model's graph breaks are not news here
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    steps, flops = {"peak": matmul(2048, args.device)}, {"peak": 2 * 2048.0**3}
    for hidden in (128, 256):
        for af_type in AF_TYPES:
            config = afgpt.AfGPTConfig(vocab_size=8192, hidden_size=hidden, num_hidden_layers=4,
                                       num_attention_heads=4, max_position_embeddings=args.seq,
                                       af_type=af_type)
            for compiled in (False, True):
                name = (hidden, af_type, "compile" if compiled else "eager")
                start = time.perf_counter()
                steps[name] = make_step(config, args.batch, args.seq, compiled, args.device)
                steps[name]()  # warm-up; compiles
                print(f"  built {name} in {time.perf_counter() - start:.1f} s", flush=True)
                flops[name] = step_flops(config, args.batch, args.seq)
    times = time_interleaved(steps, args.rounds, device_sync(args.device))
    peak = flops["peak"] / times.pop("peak") / 1e9
    print(f"fp32 matmul 2048^3: {peak:.1f} GFLOP/s (median of the same rounds; taken as peak)")
    tokens = args.batch * args.seq
    print(f"\nbatch {args.batch} x seq {args.seq}, 4 layers, 4 heads, vocab 8192")
    print(f"{'hidden':>6} {'activations':<18}{'mode':<8}{'step ms':>9}{'tokens/s':>10}"
          f"{'vs gelu':>9}{'GFLOP/s':>9}{'of peak':>9}")
    for (hidden, af_type, mode), seconds in times.items():
        base = times[(hidden, AF_TYPES[0], mode)]
        achieved = flops[(hidden, af_type, mode)] / seconds / 1e9
        print(f"{hidden:>6} {af_type:<18}{mode:<8}{seconds * 1e3:>9.1f}{tokens / seconds:>10.0f}"
              f"{base / seconds:>9.2f}{achieved:>9.1f}{achieved / peak:>9.1%}")


if __name__ == "__main__":
    main()
