"""Training throughput of `afgpt train --model gpt-neo|roberta` against transformers.Trainer, side by side.

For each family, one model of `--size` (default small: hidden 384, 6 layers, ~10M non-embedding parameters) with the
real 50k tokenizer's vocabulary (GPT-2's for GPT-Neo, roberta-base's for RoBERTa, from ../shared/data/tokenizers or
--tokenizers) is built by afgpt.training.build_model, then copied, so both contenders train the same weights:

  afgpt    the `afgpt train` step: afgpt.training.train_step with the family's objective (GPT-Neo: trunk + chunked
           fused LM head/cross-entropy; RoBERTa: DataCollatorForLanguageModeling's masking, LM head only at the
           masked 15%), AdamW (weight_optimizer) with the run's lr and betas.
  Trainer  transformers.Trainer: the model's own forward with labels (full [tokens, vocab] logits), GPT-Neo with
           default_data_collator (labels = input_ids), RoBERTa with DataCollatorForLanguageModeling (special-token
           masks precomputed, as run_mlm.py does); AdamW with the same lr, betas and no weight decay, constant
           schedule, no clipping (max_grad_norm 0).

Both read the same synthetic token windows (`--batch` x `--seq` tokens per step). Rounds alternate afgpt, Trainer,
afgpt, ...; a round is `--steps` timed steps (for Trainer: the intervals between consecutive on_step_end callbacks
of one train() call, so Trainer's per-call setup is not counted; everything inside its loop is), and each figure is
the median over rounds. A note then measures what GPT-Neo's eager attention costs: the same afgpt step with each
layer's attention core swapped for torch's SDPA (is_causal, scale 1, as GPT-Neo does not scale), in the same rounds.
That is a measurement only; `afgpt train` keeps GPT-Neo's eager attention.

    python bench/bench_families.py [--size small] [--steps 3] [--rounds 6] [--threads N]

Run it on an otherwise idle machine; the load average is printed before and after.
"""
import argparse
import copy
import os
import statistics
import time
from pathlib import Path
from types import MethodType, SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from transformers import (AutoTokenizer, DataCollatorForLanguageModeling, Trainer, TrainerCallback,
                          TrainingArguments, default_data_collator)

from afgpt.data import TokenBatches
from afgpt.ensemble import Replica
from afgpt.activation_set import find_activation_set
from afgpt.training import (RunData, TrainConfig, activation_optimizer, build_model, build_objective, padded_vocab,
                            parameter_counts, train_step, weight_optimizer)

TOKENIZERS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tokenizers"
TOKENIZER_OF = {"gpt-neo": "gpt2", "roberta": "roberta-base"}
GOALS = {"gpt-neo": 1.2, "roberta": 2.0}


class Windows(torch.utils.data.Dataset):
    """The benchmark's token windows as a Trainer dataset."""

    def __init__(self, tokens: np.ndarray, seq: int, family: str, special_ids: torch.Tensor):
        self.rows = torch.from_numpy(tokens[: len(tokens) // seq * seq].astype(np.int64)).view(-1, seq)
        self.family, self.special_ids = family, special_ids

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        ids = self.rows[i]
        if self.family == "gpt-neo":
            return {"input_ids": ids, "labels": ids}
        return {"input_ids": ids, "special_tokens_mask": torch.isin(ids, self.special_ids).long()}


class StepClock(TrainerCallback):
    """Times of Trainer's on_step_end callbacks."""

    def __init__(self):
        self.ends: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())


def sdpa_attention(self, query, key, value, attention_mask=None):
    """GPT-Neo's attention core computed by torch's SDPA: causal, unscaled (GPT-Neo does not divide by sqrt(d))."""
    return F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=1.0), None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=["gpt-neo", "roberta"], choices=list(TOKENIZER_OF))
    parser.add_argument("--size", default="small", choices=["tiny", "small"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--af-type", default="gelu;att-none")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=6, help="timed rounds per contender (interleaved)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per contender first")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's default)")
    parser.add_argument("--tokenizers", default=str(TOKENIZERS), help="folder with gpt2/ and roberta-base/")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    rows = []
    for family in args.families:
        rows.append(bench_family(family, args))
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads; size {args.size}, batch {args.batch} x seq "
          f"{args.seq} tokens/step, af_type {args.af_type}; {args.rounds} interleaved rounds x {args.steps} steps "
          f"(+{args.warmup} warm-up); load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after on "
          f"{os.cpu_count()} cores\n")
    print(f"{'family':<8} {'params':>11} {'non-emb':>10} {'vocab':>6} {'afgpt tok/s':>12} {'Trainer tok/s':>14} "
          f"{'ratio':>6} {'goal':>5}  per-round ratios")
    for r in rows:
        print(f"{r.family:<8} {r.total:>11,} {r.total - r.embedding:>10,} {r.vocab:>6} {r.afgpt:>12,.0f} "
              f"{r.trainer:>14,.0f} {r.ratio:>6.2f} {GOALS[r.family]:>5.1f}  "
              f"{', '.join(f'{x:.2f}' for x in r.round_ratios)}")
    for r in rows:
        if r.sdpa is not None:
            print(f"\nnote, GPT-Neo's eager attention: the afgpt step with SDPA in place of the eager attention core "
                  f"runs {r.sdpa:,.0f} tokens/s vs {r.afgpt:,.0f} eager ({r.sdpa / r.afgpt:.2f}x; eager attention "
                  f"costs {100 * (1 - r.afgpt / r.sdpa):.0f}% of the eager step). afgpt train keeps eager attention "
                  "(transformers has no SDPA for GPT-Neo).")


def bench_family(family: str, args) -> SimpleNamespace:
    tokenizer = AutoTokenizer.from_pretrained(Path(args.tokenizers) / TOKENIZER_OF[family])
    vocab = padded_vocab(len(tokenizer))
    cfg = TrainConfig(model=family, size=args.size, af_type=args.af_type, per_device_train_batch_size=args.batch,
                      seq_length=args.seq, max_steps=10**6, lr_scheduler_type="warmup", warmup_steps=0)
    torch.manual_seed(0)
    run_data = RunData(np.zeros(0), np.zeros(0), tokenizer, vocab, None)
    model = build_model(cfg, run_data)
    reference = copy.deepcopy(model)  # Trainer trains the same initial weights
    total, embedding = parameter_counts(model)
    objective = build_objective(family, tokenizer)
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, len(tokenizer), size=2_000_000).astype(np.uint16)
    tokens[np.isin(tokens, special.numpy())] = 1000  # plain text has no special tokens but the separators
    tokens[:: 1000] = tokenizer.eos_token_id

    accelerator = Accelerator()
    contenders = {"afgpt": afgpt_contender(model, objective, tokens, cfg, accelerator)}
    if family == "gpt-neo":
        sdpa_model = copy.deepcopy(model)
        for module in sdpa_model.modules():
            if hasattr(module, "_attn"):
                module._attn = MethodType(sdpa_attention, module)
        contenders["sdpa"] = afgpt_contender(sdpa_model, objective, tokens, cfg, accelerator)
    contenders["Trainer"] = trainer_contender(reference, family, tokenizer, tokens, special, cfg, args)

    for contender in contenders.values():
        contender.run(args.warmup)
    speeds = {name: [] for name in contenders}
    tokens_per_step = args.batch * args.seq
    for _ in range(args.rounds):
        for name, contender in contenders.items():
            speeds[name].append(args.steps * tokens_per_step / contender.run(args.steps))
    median = {name: statistics.median(values) for name, values in speeds.items()}
    print(f"{family}: " + ", ".join(f"{name} {median[name]:,.0f} tok/s" for name in median) +
          f"; final losses afgpt {contenders['afgpt'].loss():.3f}, Trainer {contenders['Trainer'].loss():.3f}")
    return SimpleNamespace(family=family, total=total, embedding=embedding, vocab=vocab, afgpt=median["afgpt"],
                           trainer=median["Trainer"], ratio=median["afgpt"] / median["Trainer"],
                           round_ratios=[a / t for a, t in zip(speeds["afgpt"], speeds["Trainer"])],
                           sdpa=median.get("sdpa"))


def afgpt_contender(model, objective, tokens, cfg: TrainConfig, accelerator: Accelerator) -> SimpleNamespace:
    """`afgpt train`'s optimizer step on `model`; run(n) returns the seconds n steps take."""
    optimizer = weight_optimizer(model, cfg)
    af_optimizer = activation_optimizer(find_activation_set(model), cfg)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    batches = objective.train_batches(TokenBatches(tokens, cfg.per_device_train_batch_size, cfg.seq_length, seed=0))
    replica = Replica(0, model, optimizer, batches)
    state = SimpleNamespace(step=0, last=float("nan"))

    def run(n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            state.last = train_step([replica], af_optimizer, state.step, accelerator, cfg, objective)[0][0]
            state.step += 1
        return time.perf_counter() - start

    return SimpleNamespace(run=run, loss=lambda: state.last)


def trainer_contender(model, family: str, tokenizer, tokens, special, cfg: TrainConfig, args) -> SimpleNamespace:
    """transformers.Trainer on `model`; run(n) trains n + 1 steps and returns the time of the last n."""
    dataset = Windows(tokens, args.seq, family, special)
    collator = default_data_collator if family == "gpt-neo" else DataCollatorForLanguageModeling(tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    clock = StepClock()
    losses, calls = [], []

    class LossLog(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    def run(n: int) -> float:
        training_args = TrainingArguments(
            output_dir="/tmp/bench_families_trainer", max_steps=n + 1, per_device_train_batch_size=args.batch,
            learning_rate=cfg.learning_rate, adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2, weight_decay=0.0,
            max_grad_norm=0.0, lr_scheduler_type="constant", logging_steps=n + 1, save_strategy="no", report_to=[],
            use_cpu=True, disable_tqdm=True, dataloader_num_workers=0, seed=len(calls))  # new batches each call
        trainer = Trainer(model=model, args=training_args, train_dataset=dataset, data_collator=collator,
                          optimizers=(optimizer, scheduler), callbacks=[clock, LossLog()])
        clock.ends.clear()
        calls.append(n)
        trainer.train()
        return clock.ends[-1] - clock.ends[0]

    return SimpleNamespace(run=run, loss=lambda: losses[-1] if losses else float("nan"))


if __name__ == "__main__":
    main()
