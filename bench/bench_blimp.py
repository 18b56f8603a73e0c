"""BLiMP scoring speed: afgpt's prefix-sharing scorer against a plain one-sentence-at-a-time computation (and
lm-evaluation-harness's `hf` model, when `lm_eval` is importable), on one seeded random AfGPT.

The model has the GPT-2 vocabulary padded to a multiple of 64 and `--hidden-size`/`--layers` (the defaults give
about 1M non-embedding parameters); it is saved with its code and tokenizer to a folder, which lm-eval loads with
trust_remote_code=True. lm-eval reads the same BLiMP files through task yamls this script writes (`json` datasets,
the `blimp` task's template otherwise), so it runs offline. Run it with lm-eval in a separate venv that also has
afgpt installed: lm-eval is never an afgpt dependency.
"""
import argparse
import importlib.util
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; no Hub lookups for datasets or models
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

import afgpt  # noqa: E402
from afgpt.evaluation.blimp import evaluate_blimp, load_blimp  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
FULL_BLIMP = 67000  # pairs: 67 paradigms of 1000
DEFAULT_PARADIGMS = ("adjunct_island,anaphor_gender_agreement,determiner_noun_agreement_1,"
                     "irregular_past_participle_adjectives,principle_A_c_command,wh_questions_subject_gap")
TEMPLATE = """\
output_type: multiple_choice
validation_split: train
doc_to_text: ""
doc_to_target: 0
doc_to_choice: "{{[sentence_good, sentence_bad]}}"
num_fewshot: 0
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def build_model(vocab: int, hidden: int, layers: int, heads: int, seed: int) -> afgpt.AfGPTForCausalLM:
    """A seeded random AfGPT, every parameter moved off its init so zero-initialised parts count."""
    torch.manual_seed(seed)
    model = afgpt.AfGPTForCausalLM(afgpt.AfGPTConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                                                     num_attention_heads=heads))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def non_embedding_params(model: torch.nn.Module) -> int:
    embedding = model.get_input_embeddings().weight
    return sum(p.numel() for p in model.parameters() if p is not embedding)


def plain_logprob(model, ids: list[int]) -> float:
    """One sentence alone: full logits, log_softmax, gather, sum (what lm-eval computes per request)."""
    x = torch.tensor([ids])
    logits = model(input_ids=x).logits[0, :-1].float()
    return logits.log_softmax(-1).gather(-1, x[0, 1:, None]).sum().item()


def run_plain(model, tokenizer, pairs) -> tuple[list[tuple[float, float]], float]:
    """(good, bad) scores of `pairs` one sentence at a time, and pairs/s."""
    prefix = tokenizer.bos_token_id
    start = time.perf_counter()
    with torch.inference_mode():
        scores = [tuple(plain_logprob(model, [prefix] + tokenizer.encode(" " + s, add_special_tokens=False))
                        for s in (pair.sentence_good, pair.sentence_bad)) for pair in pairs]
    return scores, len(pairs) / (time.perf_counter() - start)


def write_tasks(folder: Path, paradigms) -> list[str]:
    """lm-eval task yamls for these paradigms' files (`blimp_local_<paradigm>`, grouped as `blimp_local`), and the
    task names."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "_template_yaml").write_text(TEMPLATE)
    names = []
    for p in paradigms:
        names.append(f"blimp_local_{p.name}")
        (folder / f"{p.name}.yaml").write_text(
            f"include: _template_yaml\ntask: {names[-1]}\ndataset_path: json\n"
            f"dataset_kwargs:\n  data_files:\n    train: {p.path.resolve()}\n")
    (folder / "blimp_local.yaml").write_text(  # the group: `--tasks blimp_local`, scored as lm-eval's `blimp`
        "group: blimp_local\ntask:\n" + "".join(f"  - {n}\n" for n in names)
        + "aggregate_metric_list:\n  - metric: acc\n    aggregation: mean\n    weight_by_size: false\n")
    return names


def run_lm_eval(model_dir: Path, tasks_dir: Path, tasks: list[str], limit: int, batch_size: int) -> tuple[dict, float]:
    """lm-eval's per-task accuracy and per-sentence log-likelihoods {task: (acc, [(good, bad)])}, and its pairs/s
    (the time in its loglikelihood call: loading the model and the data is left out, as for afgpt's scorer)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=str(model_dir), trust_remote_code=True, dtype="float32", batch_size=batch_size, device="cpu")
    seconds = 0.0
    loglikelihood = lm.loglikelihood

    def timed(requests, **kwargs):
        nonlocal seconds
        start = time.perf_counter()
        out = loglikelihood(requests, **kwargs)
        seconds += time.perf_counter() - start
        return out

    lm.loglikelihood = timed
    out = simple_evaluate(model=lm, tasks=tasks, task_manager=TaskManager(include_path=str(tasks_dir)), limit=limit,
                          log_samples=True)
    results = {}
    for task in tasks:
        samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
        results[task] = (out["results"][task]["acc,none"], [tuple(r[0] for r in s["filtered_resps"]) for s in samples])
    return results, sum(len(r[1]) for r in results.values()) / seconds


def compare(rows: list[dict], other: list[tuple[float, float]]) -> tuple[float, bool]:
    """Max |log-prob difference| between afgpt's pair rows and (good, bad) scores, and whether every verdict agrees."""
    diff = max(abs(a - b) for r, t in zip(rows, other) for a, b in zip((r["good"], r["bad"]), t))
    return diff, all(r["correct"] == (t[0] >= t[1]) for r, t in zip(rows, other))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SHARED_DATA / "blimp")
    parser.add_argument("--tokenizer", type=Path, default=SHARED_DATA / "tokenizers" / "gpt2")
    parser.add_argument("--paradigms", default=DEFAULT_PARADIGMS, help="comma-separated, or 'all'")
    parser.add_argument("--limit", type=int, default=100, help="pairs per paradigm (lm-eval's --limit)")
    parser.add_argument("--plain-pairs", type=int, default=60, help="pairs the slow plain scorer times")
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=5)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tasks-dir", type=Path, help="where to write lm-eval's task yamls (default: a temp folder)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    vocab = -(-len(tokenizer) // 64) * 64
    model = build_model(vocab, args.hidden_size, args.layers, args.heads, args.seed)
    paradigms = load_blimp(args.data, None if args.paradigms == "all" else args.paradigms, args.limit)
    n_pairs = sum(len(p.pairs) for p in paradigms)
    print(f"torch {torch.__version__}, {args.threads} threads; AfGPT hidden {args.hidden_size}, {args.layers} layers, "
          f"vocab {vocab}: {non_embedding_params(model):,} non-embedding parameters; {len(paradigms)} paradigms, "
          f"{n_pairs} pairs, batch {args.batch_size}")
    ours = evaluate_blimp(model, tokenizer, args.data, [p.name for p in paradigms], args.limit, args.batch_size,
                          progress=False, return_pairs=True)
    ours_rate = ours["settings"]["pairs_per_second"]
    per = max(1, args.plain_pairs // len(paradigms))  # the same first pairs of every paradigm
    plain, plain_rate = run_plain(model, tokenizer, [pair for p in paradigms for pair in p.pairs[:per]])
    diff, same = compare([r for p in paradigms for r in ours["pair_scores"][p.name][:per]], plain)
    print(f"{'scorer':<10}{'pairs/s':>10}{'full BLiMP min':>16}")
    print(f"{'afgpt':<10}{ours_rate:>10.1f}{FULL_BLIMP / ours_rate / 60:>16.1f}")
    print(f"{'plain':<10}{plain_rate:>10.1f}{FULL_BLIMP / plain_rate / 60:>16.1f}   on {len(plain)} pairs: max |logp "
          f"diff| vs afgpt {diff:.2e}, verdicts {'equal' if same else 'DIFFERENT'}")
    if importlib.util.find_spec("lm_eval") is None:
        print("lm_eval is not importable here: run this with a python that has lm-eval and afgpt to compare")
        return
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        model.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        tasks_dir = args.tasks_dir or Path(tmp) / "tasks"
        tasks = write_tasks(tasks_dir, paradigms)
        theirs, lm_eval_rate = run_lm_eval(model_dir, tasks_dir, tasks, args.limit, args.batch_size)
    print(f"{'lm-eval':<10}{lm_eval_rate:>10.1f}{FULL_BLIMP / lm_eval_rate / 60:>16.1f}")
    for p, task in zip(paradigms, tasks):
        acc, pairs = theirs[task]
        diff, same = compare(ours["pair_scores"][p.name], pairs)
        print(f"  {p.name:<40} afgpt {ours['paradigms'][p.name]:.3f}  lm-eval {acc:.3f}  "
              f"{'equal' if acc == ours['paradigms'][p.name] and same else 'DIFFERENT'}  max |logp diff| {diff:.2e}")


if __name__ == "__main__":
    main()
