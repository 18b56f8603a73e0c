"""Training throughput (tokens/s) of AfGPT vs a transformers GPT-Neo of the same shape, same loop.

Both models run `afgpt.training.train_step` (the `afgpt train` optimizer step) on the same random
token data (TokenBatches over a random uint16 array), side by side in one process: after a warm-up,
rounds of `--steps` steps alternate AfGPT, Neo, AfGPT, Neo, ... and each figure is the median over
rounds, so machine noise hits both alike. GPT-Neo has no activation bank, so it gets one plain AdamW
with the same lr/betas, and a thin wrapper that takes `shift_labels` and computes the loss with the
same transformers loss function AfGPT uses. MFU is measured against a large fp32 matmul timed in
the same run.

    python bench/bench_train.py [--hidden 128] [--steps 2] [--rounds 8] [--threads N]

Run it on an otherwise idle machine (the load average is printed before and after): when other
processes compete for the cores, each multi-threaded kernel can stall for a scheduler tick (~4 ms)
waiting for a descheduled thread, so tokens/s then measures the number of kernels rather than the
work, and both models slow down several-fold. `--threads 1` is a contention-robust comparison.
"""
import argparse
import os
import statistics
import time
from types import SimpleNamespace

import numpy as np
import torch
from accelerate import Accelerator
from transformers import GPTNeoConfig, GPTNeoForCausalLM

from afgpt.configuration_afgpt import AfGPTConfig
from afgpt.data import TokenBatches
from afgpt.modeling_afgpt import AfGPTForCausalLM
from afgpt.ensemble import Replica
from afgpt.training import TrainConfig, activation_optimizer, train_step, weight_optimizer


class NeoWithShiftLabels(torch.nn.Module):
    """GPT-Neo called like AfGPT in train_step: forward(input_ids, shift_labels, use_cache)."""

    def __init__(self, neo: GPTNeoForCausalLM):
        super().__init__()
        self.neo = neo

    def forward(self, input_ids, shift_labels, use_cache=False):
        logits = self.neo(input_ids=input_ids, use_cache=use_cache).logits
        loss = self.neo.loss_function(logits=logits, labels=None, vocab_size=self.neo.config.vocab_size,
                                      shift_labels=shift_labels.contiguous())
        return SimpleNamespace(loss=loss, logits=logits)


def matmul_peak_gflops(n: int = 2048, repeats: int = 5) -> float:
    """Best-of-`repeats` fp32 GFLOP/s of an n x n matmul."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def unique_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def flops_per_token(total: int, embedding: int, vocab: int, hidden: int, layers: int, seq: int) -> float:
    """6 * non-embedding params + 6 * lm_head matmul + 12 * layers * seq * hidden (attention)."""
    return 6 * (total - embedding) + 6 * vocab * hidden + 12 * layers * seq * hidden


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--af-type", default="gelu;att-linear")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per timed round")
    parser.add_argument("--rounds", type=int, default=8, help="timed rounds per model (interleaved)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per model first")
    parser.add_argument("--profile", action="store_true", help="also print a torch.profiler table per model")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's default)")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]

    torch.manual_seed(0)
    h, L, seq, V = args.hidden, args.layers, args.seq, args.vocab
    total_steps = args.warmup + args.steps * args.rounds + 10
    cfg = TrainConfig(hidden_size=h, num_hidden_layers=L, num_attention_heads=args.heads, af_type=args.af_type,
                      per_device_train_batch_size=args.batch, seq_length=seq, max_steps=total_steps,
                      warmup_steps=1, cooldown_steps=1, vocab_size=V)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision)
    tokens = np.random.default_rng(0).integers(0, V, size=2_000_000, dtype=np.uint16)

    afgpt = AfGPTForCausalLM(AfGPTConfig(
        vocab_size=V, hidden_size=h, num_hidden_layers=L, num_attention_heads=args.heads,
        max_position_embeddings=seq, af_type=cfg.af_type, af_layer_specific=cfg.af_layer_specific,
        af_range=cfg.af_range, af_n_anchors=cfg.af_n_anchors, af_init=cfg.af_init))
    neo_model = GPTNeoForCausalLM(GPTNeoConfig(
        vocab_size=V, hidden_size=h, num_layers=L, num_heads=args.heads, attention_types=[[["global"], L]],
        max_position_embeddings=seq, intermediate_size=4 * h, bos_token_id=None, eos_token_id=None))
    neo = NeoWithShiftLabels(neo_model)

    runs = {}
    for name, model, optimizer, af_optimizer in (
            ("AfGPT", afgpt, weight_optimizer(afgpt, cfg), activation_optimizer(afgpt.model.activations, cfg)),
            ("GPT-Neo", neo, torch.optim.AdamW(neo.parameters(), lr=cfg.learning_rate,
                                               betas=(cfg.adam_beta1, cfg.adam_beta2),
                                               weight_decay=cfg.weight_decay), None)):
        model, optimizer = accelerator.prepare(model, optimizer)
        model.train()
        batches = TokenBatches(tokens, cfg.per_device_train_batch_size, seq, seed=0)
        runs[name] = SimpleNamespace(replica=Replica(0, model, optimizer, batches), af_optimizer=af_optimizer,
                                     step=0, speeds=[], loss=None)

    emb_afgpt = afgpt.model.embed_tokens.weight.numel()
    emb_neo = neo_model.transformer.wte.weight.numel() + neo_model.transformer.wpe.weight.numel()
    runs["AfGPT"].params, runs["AfGPT"].emb = unique_params(afgpt), emb_afgpt
    runs["GPT-Neo"].params, runs["GPT-Neo"].emb = unique_params(neo_model), emb_neo
    for run in runs.values():
        run.flops = flops_per_token(run.params, run.emb, V, h, L, seq)

    def steps(run, n):
        for _ in range(n):
            run.loss, _ = train_step([run.replica], run.af_optimizer, run.step, accelerator, cfg)[0]
            run.step += 1

    for run in runs.values():
        steps(run, args.warmup)
    peaks = [matmul_peak_gflops()]
    tokens_per_step = args.batch * seq
    for r in range(args.rounds):
        for run in runs.values():
            t = time.perf_counter()
            steps(run, args.steps)
            run.speeds.append(args.steps * tokens_per_step / (time.perf_counter() - t))
        if r == args.rounds // 2:
            peaks.append(matmul_peak_gflops())
    peaks.append(matmul_peak_gflops())
    peak = max(peaks)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; hidden {h}, layers {L}, heads {args.heads}, "
          f"seq {seq}, batch {args.batch}, vocab {V}; {args.rounds} interleaved rounds x {args.steps} steps "
          f"(+{args.warmup} warm-up); load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after "
          f"on {os.cpu_count()} cores")
    print(f"fp32 matmul peak (2048^3, best of {len(peaks)} probes): {peak:,.1f} GFLOP/s  "
          f"(probes: {', '.join(f'{p:.1f}' for p in peaks)})")
    print()
    print(f"{'model':<8} {'params':>10} {'non-emb':>9} {'MFLOP/tok':>10} {'tok/s med':>10} {'min':>8} {'max':>8} "
          f"{'GFLOP/s':>8} {'% peak':>7} {'loss':>7}")
    for name, run in runs.items():
        med = statistics.median(run.speeds)
        gflops = med * run.flops / 1e9
        print(f"{name:<8} {run.params:>10,} {run.params - run.emb:>9,} {run.flops / 1e6:>10.2f} {med:>10,.0f} "
              f"{min(run.speeds):>8,.0f} {max(run.speeds):>8,.0f} {gflops:>8.1f} {100 * gflops / peak:>6.1f}% "
              f"{run.loss:>7.3f}")
    ratios = [a / n for a, n in zip(runs["AfGPT"].speeds, runs["GPT-Neo"].speeds)]
    print()
    overall = statistics.median(runs["AfGPT"].speeds) / statistics.median(runs["GPT-Neo"].speeds)
    print(f"AfGPT / GPT-Neo tokens/s: ratio of medians {overall:.3f}; per-round ratios "
          f"{', '.join(f'{x:.2f}' for x in ratios)} (median {statistics.median(ratios):.3f}); "
          f"ratio of best rounds {max(runs['AfGPT'].speeds) / max(runs['GPT-Neo'].speeds):.3f} (goal >= 1.3)")

    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        for name, run in runs.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                steps(run, 3)
            print(f"\n--- {name}: top ops by self CPU time over 3 steps ---")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
