"""BLiMP (Warstadt et al., 2020): causal LMs scored as lm-evaluation-harness's `blimp` task scores them, masked LMs
by pseudo-log-likelihood as minicons scores them.

Causal LMs: every minimal pair is a two-way multiple choice with an empty context: lm-eval scores
`" " + sentence_good` and `" " + sentence_bad` after the model's prefix token
(`afgpt.evaluation.scoring.causal_logprobs`) and takes the argmax, which keeps the first of equal scores: a pair is
correct when score(good) >= score(bad). Masked LMs (RoBERTa, patched RoBERTa): each sentence's score is its
pseudo-log-likelihood summed over tokens (`afgpt.evaluation.pll.masked_logprobs`; "original" PLL or
"within_word_l2r", minicons's names), the BabyLM 2025 convention (2024 averaged per token); same >= rule.
A paradigm's accuracy is the mean over its pairs.

Data: the BLiMP jsonl files (one paradigm per file, `<paradigm>.jsonl` or `<paradigm>.jsonl.gz`), in `data_dir`
or in its `data/` folder; the BabyLM-filtered subset has the same layout.
"""
from __future__ import annotations

import gzip
import json
from collections.abc import Sequence
import time
from dataclasses import dataclass, field as dataclass_field
from pathlib import Path
from statistics import fmean

from ..atomic import write_text_atomically
from .pll import PLL_METHODS, masked_logprobs
from .runs import append_to_run
from .scoring import causal_logprobs, prefix_token_id

__all__ = ["BlimpPair", "BlimpParadigm", "evaluate_blimp", "evaluate_models", "load_blimp", "aggregate",
           "list_paradigms", "is_masked_lm", "markdown_table", "save_pairs"]

SUFFIXES = (".jsonl.gz", ".jsonl")


@dataclass(frozen=True)
class BlimpPair:
    sentence_good: str
    sentence_bad: str
    pair_id: str | None = None


@dataclass
class BlimpParadigm:
    name: str  # the file's name without .jsonl[.gz] (BLiMP's UID)
    field: str  # "syntax", "morphology", "semantics", "syntax_semantics", ...
    phenomenon: str  # BLiMP's linguistics_term, e.g. "island_effects"
    path: Path
    pairs: list[BlimpPair] = dataclass_field(default_factory=list)


def _data_folder(data_dir) -> Path:
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"BLiMP data folder not found: {root}")
    for folder in (root, root / "data"):
        if folder.is_dir() and any(p.name.endswith(SUFFIXES) for p in folder.iterdir()):
            return folder
    raise FileNotFoundError(f"no BLiMP files (*.jsonl or *.jsonl.gz) in {root} or {root / 'data'}")


def list_paradigms(data_dir) -> dict[str, Path]:
    """Paradigm name -> file, sorted by name."""
    folder = _data_folder(data_dir)
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        suffix = next((s for s in SUFFIXES if path.name.endswith(s)), None)
        if suffix is None or not path.is_file():
            continue
        name = path.name[:-len(suffix)]
        if name in found:
            raise ValueError(f"paradigm {name!r} is in two files, {found[name].name} and {path.name}: keep one")
        found[name] = path
    return dict(sorted(found.items()))


def _read_paradigm(name: str, path: Path, limit: int | None) -> BlimpParadigm:
    opener = gzip.open if path.name.endswith(".gz") else open
    paradigm = None
    with opener(path, "rt", encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if limit is not None and paradigm is not None and len(paradigm.pairs) >= limit:
                break
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            for key in ("sentence_good", "sentence_bad"):
                if not isinstance(row.get(key), str):
                    raise ValueError(f"{path}:{number}: {key!r} is missing or not a string")
            if paradigm is None:
                paradigm = BlimpParadigm(name=name, field=str(row.get("field", "unknown")),
                                         phenomenon=str(row.get("linguistics_term", "unknown")), path=path)
            pair_id = row.get("pairID", row.get("pair_id"))
            paradigm.pairs.append(BlimpPair(row["sentence_good"], row["sentence_bad"],
                                            None if pair_id is None else str(pair_id)))
    if paradigm is None:
        raise ValueError(f"{path}: no pairs in this file")
    return paradigm


def load_blimp(data_dir, paradigms=None, limit: int | None = None) -> list[BlimpParadigm]:
    """The BLiMP paradigms in `data_dir` (all, sorted by name, or those named, in the order given).

    `paradigms`: None for all, a list of names, or one comma-separated string. `limit`: the first `limit` pairs of
    each paradigm (as lm-eval's --limit). Raises FileNotFoundError for a missing folder or one without BLiMP files,
    ValueError for an unknown paradigm (naming the valid ones), a malformed line (naming file and line) or an
    empty file.
    """
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    available = list_paradigms(data_dir)
    if paradigms is None:
        names = list(available)
    else:
        if isinstance(paradigms, str):
            paradigms = [p for p in paradigms.split(",")]
        names = list(dict.fromkeys(p.strip() for p in paradigms if p.strip()))
        if not names:
            raise ValueError("no paradigm named: pass None for all of them")
        unknown = [n for n in names if n not in available]
        if unknown:
            raise ValueError(f"unknown BLiMP paradigm(s) {', '.join(unknown)} in {data_dir}; valid ones: "
                             f"{', '.join(available)}")
    return [_read_paradigm(n, available[n], limit) for n in names]


def aggregate(paradigm_results: dict[str, dict]) -> dict:
    """Overall, per-field and per-phenomenon accuracy from {paradigm: {"acc", "field", "phenomenon", "pairs"}}.

    Every level is the unweighted mean of its paradigms' accuracies (each paradigm counts once, whatever its
    number of pairs), which is lm-eval's `blimp` group score (aggregation "mean" with weight_by_size false) and
    BLiMP's paper convention. On full BLiMP every paradigm has 1000 pairs, so weighting would not change it; on
    the BabyLM-filtered files or with --limit it can. "overall_pairs" gives the pooled (size-weighted) accuracy.
    """
    if not paradigm_results:
        raise ValueError("no paradigm results to aggregate")
    fields: dict[str, list[float]] = {}
    phenomena: dict[str, list[float]] = {}
    for result in paradigm_results.values():
        fields.setdefault(result["field"], []).append(result["acc"])
        phenomena.setdefault(result["phenomenon"], []).append(result["acc"])
    n_pairs = sum(r["pairs"] for r in paradigm_results.values())
    return {
        "overall": fmean(r["acc"] for r in paradigm_results.values()),
        "overall_pairs": sum(r["correct"] for r in paradigm_results.values()) / n_pairs,
        "paradigms": {name: r["acc"] for name, r in paradigm_results.items()},
        "fields": {k: fmean(v) for k, v in sorted(fields.items())},
        "phenomena": {k: fmean(v) for k, v in sorted(phenomena.items())},
        "pairs": n_pairs,
    }


MASKED_MODEL_TYPES = ("roberta", "afgpt_roberta", "bert", "xlm-roberta", "camembert", "distilbert", "albert",
                      "electra", "deberta", "deberta-v2", "modernbert")


def is_masked_lm(model_or_config) -> bool:
    """Whether a model (or its config) is a masked LM, scored by pseudo-log-likelihood, rather than a causal one:
    by its class or saved architectures first (a RobertaForCausalLM is causal), else by its model type."""
    config = getattr(model_or_config, "config", model_or_config)
    for name in (type(model_or_config).__name__, *(getattr(config, "architectures", None) or [])):
        if name.endswith("ForMaskedLM"):
            return True
        if name.endswith("ForCausalLM"):
            return False
    return getattr(config, "model_type", None) in MASKED_MODEL_TYPES


def _scorer(model, pll: str):
    """The sentence scorer for `model` and a description of it for the results' settings."""
    if pll not in PLL_METHODS:
        raise ValueError(f"unknown PLL method {pll!r}: use one of {', '.join(PLL_METHODS)}")
    if is_masked_lm(model):
        return (lambda *args, **kwargs: masked_logprobs(*args, pll=pll, **kwargs),
                f"masked LM pseudo-log-likelihood ({pll}), summed over tokens (as minicons)")
    return causal_logprobs, "causal LM log-likelihood after the prefix token (as lm-evaluation-harness)"


def evaluate_blimp(model, tokenizer, data_dir, paradigms=None, limit: int | None = None, batch_size: int = 64,
                   progress: bool = True, return_pairs: bool = False, pll: str = "original") -> dict:
    """BLiMP accuracy of a causal or masked LM (see the module docstring).

    Returns {"overall": mean of the paradigm accuracies, "overall_pairs": accuracy pooled over all pairs,
    "paradigms": {name: acc}, "fields": {field: acc}, "phenomena": {linguistics_term: acc}, "pairs": n,
    "settings": {...}}; fields and phenomena are unweighted means over their paradigms' accuracies (see
    `aggregate`). With `return_pairs`, "pair_scores" holds {paradigm: [{"pair_id", "sentence_good",
    "sentence_bad", "good", "bad", "correct"}]} (good/bad: the sentences' log-probabilities). `pll` chooses the
    pseudo-log-likelihood of a masked LM (ignored for causal LMs). `progress` shows a tqdm bar counting pairs
    (with pairs/s).
    """
    score, scoring_rule = _scorer(model, pll)
    loaded = load_blimp(data_dir, paradigms, limit)
    texts = [s for p in loaded for pair in p.pairs for s in (pair.sentence_good, pair.sentence_bad)]
    n_pairs = len(texts) // 2
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_pairs, desc="BLiMP", unit="pair", dynamic_ncols=True)
    sentences_done = 0

    def advance(n_sentences: int) -> None:  # batches count sentences; the bar counts whole pairs (with pairs/s)
        nonlocal sentences_done
        sentences_done += n_sentences
        bar.update(sentences_done // 2 - bar.n)

    started = time.perf_counter()
    try:
        scores = score(model, tokenizer, texts, batch_size, progress=None if bar is None else advance)
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - started
    per_paradigm, pair_scores, at = {}, {}, 0
    for paradigm in loaded:
        rows = []
        for pair in paradigm.pairs:
            good, bad = scores[at], scores[at + 1]
            at += 2
            rows.append({"pair_id": pair.pair_id, "sentence_good": pair.sentence_good,
                         "sentence_bad": pair.sentence_bad, "good": good, "bad": bad, "correct": good >= bad})
        correct = sum(r["correct"] for r in rows)
        per_paradigm[paradigm.name] = {"acc": correct / len(rows), "correct": correct, "pairs": len(rows),
                                       "field": paradigm.field, "phenomenon": paradigm.phenomenon}
        pair_scores[paradigm.name] = rows
    result = aggregate(per_paradigm)
    result["settings"] = {
        "data_dir": str(data_dir), "paradigms": len(loaded), "limit": limit, "batch_size": batch_size,
        "scoring": scoring_rule, "correct_if": "logp(good) >= logp(bad)",
        "aggregation": "unweighted mean over paradigms", "seconds": seconds,
        "pairs_per_second": n_pairs / seconds if seconds > 0 else None,
    }
    if is_masked_lm(model):
        result["settings"]["pll"] = pll
    else:
        result["settings"].update(prefix_token_id=prefix_token_id(tokenizer), delimiter=" ")
    if return_pairs:
        result["pair_scores"] = pair_scores
    return result


def load_model(name: str):
    """A model folder or Hub id with its tokenizer: AutoModelForMaskedLM for a masked LM, else
    AutoModelForCausalLM (afgpt's __init__ registered AfGPT and the patched models with both)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    config = AutoConfig.from_pretrained(name)
    auto = AutoModelForMaskedLM if is_masked_lm(config) else AutoModelForCausalLM
    return auto.from_pretrained(name), AutoTokenizer.from_pretrained(name)


def evaluate_models(models: Sequence[str], data_dir, paradigms=None, limit: int | None = None, batch_size: int = 64,
                    progress: bool = True, pll: str = "original", return_pairs: bool = False) -> dict[str, dict]:
    """BLiMP results of several models (folders or Hub ids, each with its own tokenizer): {model: result}.

    A model folder that is an `afgpt train` run gets the result appended to its metrics.jsonl as a
    {"kind": "blimp"} record, where the comparison runner and `afgpt push` find it.
    """
    results = {}
    for name in models:
        model, tokenizer = load_model(name)
        result = evaluate_blimp(model, tokenizer, data_dir, paradigms, limit, batch_size, progress, return_pairs,
                                pll)
        append_to_run(name, {"kind": "blimp", **{k: v for k, v in result.items() if k != "pair_scores"}})
        results[name] = result
    return results


def save_pairs(results: dict[str, dict], path) -> Path:
    """Every pair's scores as JSONL (model, paradigm, pair_id, sentences, logprob_good, logprob_bad, correct), for
    analysis; `results` from evaluate_models(..., return_pairs=True). Written atomically."""
    lines = [json.dumps({"model": model, "paradigm": paradigm, "pair_id": row["pair_id"],
                         "sentence_good": row["sentence_good"], "sentence_bad": row["sentence_bad"],
                         "logprob_good": row["good"], "logprob_bad": row["bad"], "correct": row["correct"]})
             for model, result in results.items() for paradigm, rows in result["pair_scores"].items() for row in rows]
    return write_text_atomically(Path(path), "".join(line + "\n" for line in lines))


def markdown_table(results: dict[str, dict]) -> str:
    """One row per paradigm, then per phenomenon (italic), per field (bold) and the overall mean; one column per
    model; accuracies in %."""
    names = list(results)
    first = results[names[0]]

    def row(label: str, values: list[float]) -> str:
        return f"| {label} | " + " | ".join(f"{100 * v:.1f}" for v in values) + " |"

    lines = ["| paradigm | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    lines += [row(p, [results[n]["paradigms"][p] for n in names]) for p in first["paradigms"]]
    lines += [row(f"*{p}*", [results[n]["phenomena"][p] for n in names]) for p in first["phenomena"]]
    lines += [row(f"**{f}**", [results[n]["fields"][f] for n in names]) for f in first["fields"]]
    lines.append(row("**overall**", [results[n]["overall"] for n in names]))
    return "\n".join(lines)
