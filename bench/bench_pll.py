"""Masked-LM PLL scoring speed: afgpt's masked_logprobs vs one masked copy at a time vs minicons, same scores.

A small randomly initialised RoBERTa (seeded, then every parameter perturbed so no part is trivial) with the
roberta-base tokenizer, saved to a temporary folder, scores BLiMP sentences (the first pairs of every paradigm, good
and bad) with both PLL methods:
    ours      afgpt.evaluation.pll.masked_logprobs (masked copies batched by length, MLM head at the scored
              position only)
    plain     one masked copy per forward, full logits, log_softmax, summed (the definition, written plainly)
    minicons  scorer.MaskedLMScorer(folder).sequence_score(texts, reduction=lambda x: x.sum(0).item(),
              PLL_metric=...), `--minicons-batch` sentences per call (minicons runs every masked copy of a call in
              one forward); only when minicons is importable: run with a venv that has minicons and afgpt
The scores are checked first (max abs difference to ours), then each candidate scores all sentences once per round,
interleaved round by round; the time is the median over rounds, and rounds during which other processes used the
CPU are measured again (bench_kan's `time_interleaved`), so machine noise hits every candidate alike.

    python bench/bench_pll.py [--sentences 200] [--hidden 128 256] [--layers 4] [--rounds 3] [--batch-size 64]
        [--threads N] [--skip-plain]
"""
import argparse
import tempfile
from pathlib import Path

import torch
from transformers import AutoTokenizer, RobertaConfig, RobertaForMaskedLM

from afgpt.evaluation.blimp import list_paradigms, load_blimp
from afgpt.evaluation.pll import PLL_METHODS, masked_logprobs
from bench_kan import time_interleaved  # bench/ is the script's folder, so on sys.path

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def blimp_sentences(data_dir: Path, n: int) -> list[str]:
    """n sentences: the good and bad sentence of the first pairs of every paradigm, paradigm after paradigm."""
    per_paradigm = -(-n // 2 // len(list_paradigms(data_dir)))  # ceil
    paradigms = load_blimp(data_dir, limit=per_paradigm)
    pairs = [p.pairs[rank] for rank in range(per_paradigm) for p in paradigms if rank < len(p.pairs)]
    return [s for pair in pairs for s in (pair.sentence_good, pair.sentence_bad)][:n]


def small_roberta(tokenizer, hidden: int, layers: int) -> RobertaForMaskedLM:
    torch.manual_seed(0)
    config = RobertaConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                           num_attention_heads=max(1, hidden // 64), intermediate_size=4 * hidden,
                           max_position_embeddings=514, pad_token_id=tokenizer.pad_token_id,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = RobertaForMaskedLM(config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    return model.eval()


def plain_pll(model, tokenizer, texts: list[str], pll: str) -> list[float]:
    """One masked copy per forward, unpadded, full logits: minicons's rule without any batching."""
    scores = []
    special = {tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id}
    with torch.inference_mode():
        for text in texts:
            encoded = tokenizer(text)
            ids, words = encoded["input_ids"], encoded.word_ids()
            targets = [i for i, t in enumerate(ids) if t not in special]
            total = 0.0
            for i in targets:
                masked = torch.tensor([ids])
                masked[0, [j for j in targets if j == i or (pll == "within_word_l2r" and j > i
                                                            and words[j] == words[i])]] = tokenizer.mask_token_id
                logits = model(input_ids=masked).logits[0, i].float()
                total += logits.log_softmax(-1)[ids[i]].item()
            scores.append(total)
    return scores


def minicons_scorer(folder: str):
    """minicons's MaskedLMScorer on the saved model, or None when minicons is not importable."""
    try:
        from minicons import scorer
    except ImportError:
        return None
    mlm = scorer.MaskedLMScorer(folder, device="cpu")
    mlm.tokenizer.batch_encode_plus = mlm.tokenizer.__call__  # transformers 5 removed it; minicons 0.3.39 calls it
    return mlm


def minicons_pll(mlm, texts: list[str], pll: str, batch: int) -> list[float]:
    return [s for start in range(0, len(texts), batch)
            for s in mlm.sequence_score(texts[start:start + batch], reduction=lambda x: x.sum(0).item(),
                                        PLL_metric=pll)]


def run_case(tokenizer, texts: list[str], hidden: int, layers: int, args) -> None:
    model = small_roberta(tokenizer, hidden, layers)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        mlm = minicons_scorer(folder)
    n_tokens = sum(len(ids) - 2 for ids in tokenizer(texts)["input_ids"])
    params = sum(p.numel() for p in model.parameters())
    print(f"\nRoBERTa hidden {hidden}, {layers} layers, vocab {len(tokenizer)}, {params / 1e6:.1f}M params; "
          f"{len(texts)} BLiMP sentences, {n_tokens} scored tokens (masked copies)")
    for pll in PLL_METHODS:
        ours = masked_logprobs(model, tokenizer, texts, args.batch_size, pll=pll)
        candidates = {"ours": lambda: masked_logprobs(model, tokenizer, texts, args.batch_size, pll=pll)}
        diffs = {"plain": max(abs(a - b) for a, b in zip(ours, plain_pll(model, tokenizer, texts, pll)))}
        if not args.skip_plain:
            candidates["plain"] = lambda: plain_pll(model, tokenizer, texts, pll)
        if mlm is not None:
            diffs["minicons"] = max(abs(a - b) for a, b in zip(ours, minicons_pll(mlm, texts, pll,
                                                                                 args.minicons_batch)))
            candidates["minicons"] = lambda: minicons_pll(mlm, texts, pll, args.minicons_batch)
        seconds, noisy = time_interleaved(candidates, args.rounds, lambda: None)
        print(f"{pll}: max |ours - x| " + ", ".join(f"{name} {d:.2e}" for name, d in diffs.items())
              + f" over {len(texts)} sentences (limit 1e-4: {'ok' if max(diffs.values()) <= 1e-4 else 'FAILED'})")
        print(f"  {'scorer':<10}{'sentences/s':>13}{'ours x faster':>15}"
              + (f"   ({noisy} noisy rounds used)" if noisy else ""))
        for name, s in seconds.items():
            print(f"  {name:<10}{len(texts) / s:>13.1f}{s / seconds['ours']:>15.2f}"
                  + ("   (goal >= 3)" if name == "minicons" else ""))
    if mlm is None:
        print("minicons not importable here: run this script with a venv that has minicons and afgpt to compare")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=200)
    parser.add_argument("--hidden", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64, help="masked copies per forward (ours)")
    parser.add_argument("--minicons-batch", type=int, default=8, help="sentences per minicons sequence_score call")
    parser.add_argument("--skip-plain", action="store_true", help="check against plain, but do not time it")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's); 1 is steadier on a CPU that "
                        "other processes share, where spinning OpenMP threads can slow a 2-thread run 10x")
    parser.add_argument("--tokenizer", type=Path, default=SHARED_DATA / "tokenizers" / "roberta-base")
    parser.add_argument("--blimp", type=Path, default=SHARED_DATA / "blimp")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(str(args.tokenizer))
    texts = blimp_sentences(args.blimp, args.sentences)
    print(f"torch {torch.__version__}, cpu, {torch.get_num_threads()} threads")
    for hidden in args.hidden:
        run_case(tokenizer, texts, hidden, args.layers, args)


if __name__ == "__main__":
    main()
