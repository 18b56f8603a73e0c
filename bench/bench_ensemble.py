"""Stage I throughput: tokens/s of an ensemble (summed over its active replicas) vs one model, same loop.

Both run `afgpt.training.train_step` on "spline;att-spline" AfGPT models over random tokens: the
single model alone, and `--replicas` replicas sharing their activations (all active, so every step
does every replica's forward and backward, averages the shared gradients and steps every optimizer).
Rounds alternate single, ensemble, single, ... and figures are medians, so machine noise hits both
alike. An ensemble's tokens/s counts every active replica's tokens, so 1.0 means sharing the
activations costs nothing beyond the replicas' own work. Goal: >= 0.95x the single model's tokens/s.

    python bench/bench_ensemble.py [--replicas 4] [--hidden 128] [--rounds 6]
"""
import argparse
import statistics
import time

import numpy as np
import torch
from accelerate import Accelerator

from afgpt.configuration_afgpt import AfGPTConfig
from afgpt.data import TokenBatches
from afgpt.ensemble import Replica, build_replicas
from afgpt.modeling_afgpt import AfGPTForCausalLM
from afgpt.training import TrainConfig, activation_optimizer, train_step, weight_optimizer


def make_run(n_models: int, cfg: TrainConfig, tokens: np.ndarray, accelerator: Accelerator):
    """(replicas, activation optimizer) for `n_models` models sharing their activations."""
    def make(m: int) -> AfGPTForCausalLM:
        torch.manual_seed(m)
        return AfGPTForCausalLM(AfGPTConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
            num_attention_heads=cfg.num_attention_heads, max_position_embeddings=cfg.seq_length,
            af_type=cfg.af_type))

    models = build_replicas(make, n_models, same_init=False)
    af_optimizer = activation_optimizer(models[0].model.activations, cfg)
    replicas = []
    for m, model in enumerate(models):
        model, optimizer = accelerator.prepare(model, weight_optimizer(model, cfg))
        model.train()
        batches = TokenBatches(tokens, cfg.per_device_train_batch_size, cfg.seq_length, seed=0, stream=m)
        replicas.append(Replica(m, model, optimizer, batches))
    return replicas, af_optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per timed round")
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()

    cfg = TrainConfig(hidden_size=args.hidden, num_hidden_layers=args.layers, af_type="spline;att-spline",
                      per_device_train_batch_size=args.batch, seq_length=args.seq, vocab_size=args.vocab,
                      max_steps=10_000, warmup_steps=1, cooldown_steps=1)
    accelerator = Accelerator(mixed_precision="no")
    tokens = np.random.default_rng(0).integers(0, args.vocab, size=2_000_000, dtype=np.uint16)
    runs = {"single": make_run(1, cfg, tokens, accelerator),
            f"{args.replicas} replicas": make_run(args.replicas, cfg, tokens, accelerator)}
    speeds = {name: [] for name in runs}
    step = {name: 0 for name in runs}

    def steps(name: str, n: int) -> float:
        replicas, af_optimizer = runs[name]
        t = time.perf_counter()
        for _ in range(n):
            results = train_step(replicas, af_optimizer, step[name], accelerator, cfg)
            step[name] += 1
        return n * len(results) * args.batch * args.seq / (time.perf_counter() - t)

    for name in runs:
        steps(name, 1)  # warm-up
    for _ in range(args.rounds):
        for name in runs:
            speeds[name].append(steps(name, args.steps))

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; AfGPT spline;att-spline hidden "
          f"{args.hidden}, {args.layers} layers, seq {args.seq}, batch {args.batch}; {args.rounds} interleaved "
          f"rounds x {args.steps} steps")
    print(f"{'run':<12} {'tok/s, all replicas (median)':>29} {'min':>8} {'max':>8}")
    for name, values in speeds.items():
        print(f"{name:<12} {statistics.median(values):>29,.0f} {min(values):>8,.0f} {max(values):>8,.0f}")
    single, ensemble = speeds.values()
    ratios = [e / s for e, s in zip(ensemble, single)]
    print(f"\nensemble / single tokens/s: ratio of medians {statistics.median(ensemble) / statistics.median(single):.3f}"
          f"; per-round ratios {', '.join(f'{r:.2f}' for r in ratios)} (goal >= 0.95)")


if __name__ == "__main__":
    main()
