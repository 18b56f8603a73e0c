"""SuperGLUE and GLUE task data and official metrics (no fine-tuning here).

Data layout: ``data_dir`` is the staged data root holding ``superglue/<Task>/<split>.jsonl[.gz]`` (official
SuperGLUE jsonl) and ``glue/<Task>/<split>.tsv[.gz]`` (GLUE download-script tsv); a ``data_dir`` that already
is the ``superglue/`` or ``glue/`` folder works too. Splits are named ``train``, ``validation`` (``val`` and
``dev`` are accepted) and ``test``; test splits are unlabeled (``label is None``). The shared data has no
BoolQ train split: use :func:`split_boolq` to cut the validation split into train/dev.

Tasks (``TASKS``; names are case-insensitive, GLUE's RTE is ``glue-rte``):

==========  =============================================================  ==============================
task        ``Example.texts`` (input segments, in order)                    labels / metric keys
==========  =============================================================  ==============================
boolq       (passage, question + "?")                                       False/True; accuracy
cb          (premise, hypothesis)                                           entailment/contradiction/
                                                                            neutral; accuracy, f1_macro
copa        multiple choice, one full text per candidate:                   0/1 = choice1/choice2; accuracy
            premise without its final period + " because " (question
            "cause") or " so " (question "effect") + the choice with its
            first letter lower-cased, e.g. "The man turned on the faucet so
            water flowed from the spout."
multirc     (paragraph, question, answer option), one Example per option;  False/True; f1a, exact_match
            ``group`` = "<passage idx>-<question idx>" (4 official answer
            options are empty strings; they are kept so counts match)
rte         (premise, hypothesis)                                           entailment/not_entailment;
                                                                            accuracy
wic         (sentence1, sentence2), the target word occurrence in each     False/True; accuracy
            wrapped in asterisks via the start/end offsets: "a *class*"
wsc         (text,) with the candidate noun phrase (span1) in brackets     False/True; accuracy
            and the pronoun (span2) in asterisks, both located by their
            whitespace-word index: "[anyone] ... away from *him* ."
cola        (sentence,)                                                     0/1 unacceptable/acceptable; mcc
sst2        (sentence,)                                                     0/1 negative/positive; accuracy
mrpc        (sentence1, sentence2)                                          0/1 paraphrase; accuracy, f1
glue-rte    (sentence1, sentence2)                                          entailment/not_entailment;
                                                                            accuracy
stsb        (sentence1, sentence2)                                          float score 0..5; pearson,
                                                                            spearman
wnli        (sentence1, sentence2)                                          0/1 not_entailment/entailment;
                                                                            accuracy
==========  =============================================================  ==============================

Labels of classification tasks are stored as integer ids into ``TaskSpec.label_names`` (for COPA the index of
the right candidate); STS-B labels are floats. Metrics follow the SuperGLUE/GLUE leaderboards and are computed
with scikit-learn (scipy for the correlations): CB F1 is the macro average over the classes present in
labels or predictions (sklearn's default, as in jiant and HF ``super_glue``; all three on real data), MultiRC
F1a is binary F1 over all answer options and exact match is the fraction of questions whose options are all
predicted right, MRPC F1 is binary F1 of the paraphrase class, CoLA is Matthews correlation.

API: :func:`get_task`, :func:`load_task`, :func:`split_boolq`, :func:`compute_metrics`.
"""
from __future__ import annotations

import gzip
import json
import numbers
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["Example", "TaskSpec", "TASKS", "get_task", "load_task", "split_boolq", "compute_metrics"]

SPLITS = ("train", "validation", "test")
_SPLIT_ALIASES = {"train": "train", "validation": "validation", "val": "validation", "dev": "validation",
                  "test": "test"}


@dataclass(frozen=True)
class Example:
    """One model input. ``texts``: the input segments (for a multiple-choice task: one full text per
    candidate); ``label``: int id into the task's ``label_names`` (float for STS-B, None when unlabeled);
    ``idx``: the record's id in its file (the 0-based row number where a GLUE file has no id column; for
    MultiRC "<passage>-<question>-<answer>"); ``group``: question id for MultiRC (None elsewhere)."""
    texts: tuple[str, ...]
    label: int | float | None
    idx: int | str
    group: str | None = None


@dataclass(frozen=True)
class TaskSpec:
    """A task: its folder under ``benchmark`` ("superglue" or "glue"), the file of each split, how a record
    becomes Examples, the label space (``label_names``; None for regression), whether it is multiple choice,
    and the metric names :func:`compute_metrics` returns."""
    name: str
    benchmark: str
    folder: str
    files: dict[str, str]
    label_names: tuple[str, ...] | None
    metrics: tuple[str, ...]
    multiple_choice: bool = False

    @property
    def num_labels(self) -> int | None:
        return None if self.label_names is None else len(self.label_names)


def _json_task(name, folder, label_names, metrics, splits=SPLITS, **kw) -> TaskSpec:
    stems = {"train": "train", "validation": "val", "test": "test"}
    return TaskSpec(name, "superglue", folder, {s: f"{stems[s]}.jsonl" for s in splits}, label_names, metrics,
                    **kw)


def _tsv_task(name, folder, label_names, metrics) -> TaskSpec:
    return TaskSpec(name, "glue", folder, {"train": "train.tsv", "validation": "dev.tsv", "test": "test.tsv"},
                    label_names, metrics)


_BOOL = ("False", "True")
_NLI2 = ("entailment", "not_entailment")
TASKS: dict[str, TaskSpec] = {t.name: t for t in [
    _json_task("boolq", "BoolQ", _BOOL, ("accuracy",), splits=("validation", "test")),
    _json_task("cb", "CB", ("entailment", "contradiction", "neutral"), ("accuracy", "f1_macro")),
    _json_task("copa", "COPA", ("choice1", "choice2"), ("accuracy",), multiple_choice=True),
    _json_task("multirc", "MultiRC", _BOOL, ("f1a", "exact_match")),
    _json_task("rte", "RTE", _NLI2, ("accuracy",)),
    _json_task("wic", "WiC", _BOOL, ("accuracy",)),
    _json_task("wsc", "WSC", _BOOL, ("accuracy",)),
    _tsv_task("cola", "CoLA", ("unacceptable", "acceptable"), ("mcc",)),
    _tsv_task("sst2", "SST-2", ("negative", "positive"), ("accuracy",)),
    _tsv_task("mrpc", "MRPC", ("not_paraphrase", "paraphrase"), ("accuracy", "f1")),
    _tsv_task("glue-rte", "RTE", _NLI2, ("accuracy",)),
    _tsv_task("stsb", "STS-B", None, ("pearson", "spearman")),
    _tsv_task("wnli", "WNLI", ("not_entailment", "entailment"), ("accuracy",)),
]}


def get_task(name: str) -> TaskSpec:
    """The TaskSpec called ``name`` (case-insensitive); ValueError listing the valid names otherwise."""
    spec = TASKS.get(str(name).lower())
    if spec is None:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}")
    return spec


# ---------------------------------------------------------------- record -> Example

class _Malformed(ValueError):
    pass


def _label_id(spec: TaskSpec, value) -> int | float | None:
    """A raw label or prediction -> int id into ``spec.label_names`` (float for regression; None stays None).
    Accepts ids (Python or numpy ints, integral floats, digit strings), bools and label names."""
    if value is None:
        return None
    if spec.label_names is None:
        return float(value)
    if isinstance(value, (bool, np.bool_)):
        as_int = int(value)
    elif isinstance(value, str):
        if value in spec.label_names:
            return spec.label_names.index(value)
        as_int = int(value.strip()) if value.strip().isdigit() else -1
    elif isinstance(value, numbers.Integral):
        as_int = int(value)
    elif isinstance(value, numbers.Real) and float(value).is_integer():
        as_int = int(value)
    else:
        as_int = -1
    if not 0 <= as_int < len(spec.label_names):
        raise _Malformed(f"label {value!r} not in {spec.label_names}")
    return as_int


def _mark(text: str, start: int, end: int, left: str = "*", right: str = "*") -> str:
    return f"{text[:start]}{left}{text[start:end]}{right}{text[end:]}"


def _mark_words(words: list[str], index: int, span_text: str, left: str, right: str) -> None:
    n = max(1, len(span_text.split()))
    if not 0 <= index < len(words):
        raise _Malformed(f"span index {index} outside the text's {len(words)} words")
    stop = min(index + n, len(words)) - 1
    words[index] = left + words[index]
    words[stop] = words[stop] + right


def _copa_candidate(premise: str, question: str, choice: str) -> str:
    connective = {"cause": "because", "effect": "so"}.get(question)
    if connective is None:
        raise _Malformed(f"COPA question {question!r} is neither 'cause' nor 'effect'")
    premise = premise.strip()
    premise = premise[:-1] if premise.endswith(".") else premise
    choice = choice.strip()
    return f"{premise} {connective} {choice[:1].lower()}{choice[1:]}"


def _superglue_examples(spec: TaskSpec, rec: dict) -> list[Example]:
    name, idx = spec.name, rec.get("idx")
    label = _label_id(spec, rec.get("label"))
    if name == "boolq":
        question = rec["question"].strip()
        return [Example((rec["passage"], question if question.endswith("?") else question + "?"), label, idx)]
    if name in ("cb", "rte"):
        return [Example((rec["premise"], rec["hypothesis"]), label, idx)]
    if name == "copa":
        cands = tuple(_copa_candidate(rec["premise"], rec["question"], rec[c]) for c in ("choice1", "choice2"))
        return [Example(cands, label, idx)]
    if name == "wic":
        return [Example((_mark(rec["sentence1"], rec["start1"], rec["end1"]),
                         _mark(rec["sentence2"], rec["start2"], rec["end2"])), label, idx)]
    if name == "wsc":
        words, target = rec["text"].split(), rec["target"]
        _mark_words(words, target["span1_index"], target["span1_text"], "[", "]")
        _mark_words(words, target["span2_index"], target["span2_text"], "*", "*")
        return [Example((" ".join(words),), label, idx)]
    if name == "multirc":
        passage, out = rec["passage"], []
        for q in passage["questions"]:
            group = f"{idx}-{q['idx']}"
            for a in q["answers"]:
                out.append(Example((passage["text"], q["question"], a["text"]), _label_id(spec, a.get("label")),
                                   f"{group}-{a['idx']}", group))
        return out
    raise AssertionError(name)


def _glue_examples(spec: TaskSpec, row: list[str], split: str, rowno: int) -> Example:
    """GLUE tsv row -> Example. Test files have an index column and no label; CoLA train/dev have no header.
    Rows without an id column (CoLA, SST-2 train/dev) get their 0-based data row number as idx."""
    name, test = spec.name, split == "test"
    if name == "cola":
        return Example((row[1],), None, row[0]) if test else Example((row[3],), _label_id(spec, row[1]), rowno)
    if name == "sst2":
        return Example((row[1],), None, row[0]) if test else Example((row[0],), _label_id(spec, row[1]), rowno)
    if name == "mrpc":
        return Example((row[3], row[4]), None if test else _label_id(spec, row[0]), f"{row[1]}-{row[2]}")
    if name in ("glue-rte", "wnli"):
        return Example((row[1], row[2]), None if test else _label_id(spec, row[3]), row[0])
    if name == "stsb":
        return Example((row[7], row[8]), None if test else _label_id(spec, row[9]), row[0])
    raise AssertionError(name)


_GLUE_COLUMNS = {  # (labeled, test) column counts
    "cola": (4, 2), "sst2": (2, 2), "mrpc": (5, 5), "glue-rte": (4, 3), "stsb": (10, 9), "wnli": (4, 3)}


# ---------------------------------------------------------------- loading

def _task_dir(data_dir: Path, spec: TaskSpec) -> Path:
    for base in (data_dir / spec.benchmark, data_dir):
        if (base / spec.folder).is_dir():
            return base / spec.folder
    return data_dir / spec.benchmark / spec.folder


def _open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


def _split_file(data_dir: Path, spec: TaskSpec, split: str) -> Path:
    folder = _task_dir(data_dir, spec)
    fname = spec.files.get(split)
    if fname is None:
        hint = " (use split_boolq to cut the validation split into train/dev)" if spec.name == "boolq" else ""
        expected = folder / {"train": "train", "validation": "val", "test": "test"}[split]
        raise FileNotFoundError(f"task {spec.name!r} has no {split!r} split in the staged data: "
                                f"{expected}.jsonl(.gz) does not exist{hint}")
    for candidate in (folder / (fname + ".gz"), folder / fname):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"task {spec.name!r} split {split!r}: neither {folder / fname} nor "
                            f"{folder / (fname + '.gz')} exists")


def load_task(data_dir: str | Path, name: str, split: str) -> list[Example]:
    """Examples of task ``name``'s ``split`` ("train", "validation"/"val"/"dev", "test") from ``data_dir``.

    Raises ValueError for an unknown task or split name, FileNotFoundError naming the missing file, and
    ValueError naming file and line number for a record that cannot be parsed or lacks a field."""
    spec = get_task(name)
    canonical = _SPLIT_ALIASES.get(str(split).lower())
    if canonical is None:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(_SPLIT_ALIASES)}")
    path = _split_file(Path(data_dir), spec, canonical)
    examples: list[Example] = []
    with _open_text(path) as fh:
        if spec.benchmark == "superglue":
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    examples.extend(_superglue_examples(spec, json.loads(line)))
                except (json.JSONDecodeError, KeyError, TypeError, AttributeError, _Malformed) as exc:
                    kind = "missing field" if isinstance(exc, KeyError) else type(exc).__name__
                    raise ValueError(f"{path}:{lineno}: malformed {spec.name} record ({kind}: {exc})") from exc
        else:
            want = _GLUE_COLUMNS[spec.name][canonical == "test"]
            has_header = not (spec.name == "cola" and canonical != "test")
            for lineno, line in enumerate(fh, 1):
                if lineno == 1 and has_header:
                    continue
                line = line.rstrip("\r\n")
                if not line:
                    continue
                row = line.split("\t")
                try:
                    if len(row) != want:
                        raise _Malformed(f"{len(row)} tab-separated columns, expected {want}")
                    examples.append(_glue_examples(spec, row, canonical, len(examples)))
                except (_Malformed, ValueError) as exc:
                    raise ValueError(f"{path}:{lineno}: malformed {spec.name} row ({exc})") from exc
    return examples


def split_boolq(examples: Sequence[Example], dev_fraction: float = 0.2, seed: int = 0
                ) -> tuple[list[Example], list[Example]]:
    """Cut BoolQ validation examples into (train, dev), since the staged data has no BoolQ train split.

    The split is by passage, so no passage (several questions share one) is in both parts: the distinct
    passages, in order of first appearance, are shuffled with ``random.Random(seed)`` and passages are moved to
    dev until it holds at least ``round(dev_fraction * len(examples))`` examples. Both parts keep the input
    order. Same examples + seed -> same split. Report BoolQ results on this dev part, not the official dev."""
    if not 0.0 < dev_fraction < 1.0:
        raise ValueError(f"dev_fraction must be in (0, 1), got {dev_fraction}")
    passages = list(dict.fromkeys(ex.texts[0] for ex in examples))
    if len(passages) < 2:
        raise ValueError("split_boolq needs examples with at least two distinct passages")
    random.Random(seed).shuffle(passages)
    sizes: dict[str, int] = {}
    for ex in examples:
        sizes[ex.texts[0]] = sizes.get(ex.texts[0], 0) + 1
    target, dev_passages, count = round(dev_fraction * len(examples)), set(), 0
    for p in passages[:-1]:  # keep at least one passage for train
        if count >= max(target, 1):
            break
        dev_passages.add(p)
        count += sizes[p]
    train = [ex for ex in examples if ex.texts[0] not in dev_passages]
    dev = [ex for ex in examples if ex.texts[0] in dev_passages]
    return train, dev


# ---------------------------------------------------------------- metrics

def _as_ids(spec: TaskSpec, values, what: str) -> np.ndarray:
    out = []
    for v in values:
        try:
            out.append(_label_id(spec, v))
        except _Malformed:
            raise ValueError(f"{spec.name} {what}: {v!r} is not in the label space {spec.label_names}") from None
        if out[-1] is None:
            raise ValueError(f"{spec.name} {what}: None (unlabeled test data cannot be scored)")
    return np.asarray(out)


def compute_metrics(task: str, predictions: Sequence, labels: Sequence, groups: Sequence | None = None
                    ) -> dict[str, float]:
    """Official metrics of ``task`` for ``predictions`` against ``labels`` (label ids, bools or label names;
    floats for STS-B). MultiRC needs ``groups`` (the question id of each answer option, ``Example.group``).

    Keys: accuracy; f1_macro (CB); f1 (MRPC, paraphrase class); mcc (CoLA); f1a and exact_match (MultiRC);
    pearson and spearman (STS-B). Values are plain floats in [0, 1] ([-1, 1] for correlations)."""
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    spec = get_task(task)
    predictions, labels = list(predictions), list(labels)
    if len(predictions) != len(labels):
        raise ValueError(f"{spec.name}: {len(predictions)} predictions but {len(labels)} labels")
    if not labels:
        raise ValueError(f"{spec.name}: no predictions to score")
    if spec.label_names is None:
        from scipy.stats import pearsonr, spearmanr
        p, y = np.asarray(predictions, dtype=float), np.asarray(labels, dtype=float)
        if len(y) < 2:
            raise ValueError(f"{spec.name}: correlations need at least two examples")
        return {"pearson": float(pearsonr(p, y)[0]), "spearman": float(spearmanr(p, y)[0])}
    p, y = _as_ids(spec, predictions, "prediction"), _as_ids(spec, labels, "label")
    out: dict[str, float] = {}
    if spec.name == "multirc":
        if groups is None:
            raise ValueError("multirc: compute_metrics needs groups (the question id of each answer option)")
        groups = list(groups)
        if len(groups) != len(labels):
            raise ValueError(f"multirc: {len(groups)} groups but {len(labels)} labels")
        out["f1a"] = float(f1_score(y, p, pos_label=1, average="binary", zero_division=0))
        by_question: dict = {}
        for g, right in zip(groups, p == y):
            by_question[g] = by_question.get(g, True) and bool(right)
        out["exact_match"] = float(np.mean(list(by_question.values())))
        return out
    if "accuracy" in spec.metrics:
        out["accuracy"] = float(accuracy_score(y, p))
    if "f1_macro" in spec.metrics:
        out["f1_macro"] = float(f1_score(y, p, average="macro", zero_division=0))
    if "f1" in spec.metrics:
        out["f1"] = float(f1_score(y, p, pos_label=1, average="binary", zero_division=0))
    if "mcc" in spec.metrics:
        out["mcc"] = float(matthews_corrcoef(y, p))
    return out
