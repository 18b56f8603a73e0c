"""SuperGLUE / GLUE task loading, BoolQ split and official metrics (afgpt.evaluation.superglue)."""
import gzip
import json
import math

import pytest

from afgpt.evaluation.superglue import TASKS, Example, compute_metrics, get_task, load_task, split_boolq

LABELED = [(name, split) for name, spec in TASKS.items() for split in ("train", "validation")
           if split in spec.files]


# ---------------------------------------------------------------- staged data

@pytest.mark.parametrize("name,split", LABELED)
def test_every_task_loads_with_labels_in_label_space(shared_data, name, split):
    spec = get_task(name)
    examples = load_task(shared_data, name, split)
    assert len(examples) > 0
    for ex in examples:
        assert isinstance(ex, Example) and ex.texts and all(isinstance(t, str) for t in ex.texts)
        assert all(t.strip() for t in ex.texts[:2])  # only a MultiRC answer option may be empty (official data)
        if spec.label_names is None:
            assert isinstance(ex.label, float) and 0.0 <= ex.label <= 5.0
        else:
            assert ex.label in range(len(spec.label_names))
        if spec.multiple_choice:
            assert len(ex.texts) == 2
    if name == "multirc":
        assert all(ex.group for ex in examples) and len({ex.group for ex in examples}) < len(examples)


@pytest.mark.parametrize("name", list(TASKS))
def test_test_splits_load_unlabeled(shared_data, name):
    examples = load_task(shared_data, name, "test")
    assert len(examples) > 0 and all(ex.label is None for ex in examples)


def test_known_counts_and_text_formats(shared_data):
    assert len(load_task(shared_data, "CB", "val")) == 56
    assert len(load_task(shared_data, "glue-rte", "dev")) == 277
    sst2 = load_task(shared_data, "sst2", "validation")
    assert len(sst2) == 872 and [ex.idx for ex in sst2[:3]] == [0, 1, 2]
    assert len({ex.idx for ex in load_task(shared_data, "cola", "train")}) == 8551
    copa = load_task(shared_data, "copa", "validation")[0]
    assert copa.texts == ("The man turned on the faucet so the toilet filled with water.",
                          "The man turned on the faucet so water flowed from the spout.") and copa.label == 1
    wic = load_task(shared_data, "wic", "validation")[0]
    assert wic.texts[0] == "An emerging professional *class*." and wic.texts[1].endswith("real *class*.")
    wsc = load_task(shared_data, "wsc", "validation")[0].texts[0]
    assert "[anyone] who knew" in wsc and wsc.endswith("away from *him* .")
    cb = load_task(shared_data, "cb", "validation")[0]
    assert cb.texts[1] == "Valence was helping" and get_task("cb").label_names[cb.label] == "contradiction"
    boolq = load_task(shared_data, "boolq", "validation")[0]
    assert boolq.texts[1].endswith("?") and boolq.label in (0, 1)
    mrc = load_task(shared_data, "multirc", "validation")
    assert mrc[0].texts[1].startswith("Would the mass of a baseball") and mrc[0].texts[2] == "No"
    assert mrc[0].group == mrc[1].group and mrc[0].label == 0 and mrc[1].label == 1


def test_data_dir_may_be_the_benchmark_folder(shared_data):
    assert len(load_task(shared_data / "superglue", "cb", "validation")) == 56
    assert len(load_task(shared_data / "glue", "wnli", "dev")) == 71


def test_split_boolq_is_seeded_disjoint_and_complete(shared_data):
    val = load_task(shared_data, "boolq", "validation")
    train, dev = split_boolq(val, dev_fraction=0.2, seed=3)
    again = split_boolq(val, dev_fraction=0.2, seed=3)
    assert (train, dev) == again
    assert len(train) + len(dev) == len(val)
    assert {ex.idx for ex in train}.isdisjoint(ex.idx for ex in dev)
    assert {ex.texts[0] for ex in train}.isdisjoint(ex.texts[0] for ex in dev)  # no passage in both
    assert abs(len(dev) - 0.2 * len(val)) < 10
    assert split_boolq(val, 0.2, seed=4)[1] != dev


def test_split_boolq_small_and_bad_fraction():
    exs = [Example((f"passage {i // 2}", f"q{i}?"), i % 2, i) for i in range(10)]
    train, dev = split_boolq(exs, 0.4, seed=0)
    assert len(dev) == 4 and len(train) == 6
    assert [e.idx for e in train] == sorted(e.idx for e in train)  # input order kept
    with pytest.raises(ValueError, match="dev_fraction"):
        split_boolq(exs, 1.0)


# ---------------------------------------------------------------- errors

def test_unknown_task_lists_valid_ones(tmp_path):
    with pytest.raises(ValueError, match="unknown task 'mnli'.*boolq.*wnli"):
        load_task(tmp_path, "mnli", "train")


def test_unknown_and_missing_split(shared_data, tmp_path):
    with pytest.raises(ValueError, match="unknown split 'training'"):
        load_task(shared_data, "cb", "training")
    with pytest.raises(FileNotFoundError, match=r"BoolQ/train\.jsonl.*split_boolq"):
        load_task(shared_data, "boolq", "train")
    with pytest.raises(FileNotFoundError, match=r"CB/val\.jsonl"):
        load_task(tmp_path, "cb", "validation")


def _write_gz(path, text):
    path.parent.mkdir(parents=True)
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.write(text)


def test_malformed_jsonl_names_file_and_line(tmp_path):
    good = json.dumps({"premise": "a", "hypothesis": "b", "label": "neutral", "idx": 0})
    _write_gz(tmp_path / "superglue" / "CB" / "train.jsonl.gz", good + "\n{not json\n")
    with pytest.raises(ValueError, match=r"CB/train\.jsonl\.gz:2: malformed cb"):
        load_task(tmp_path, "cb", "train")
    (tmp_path / "superglue" / "CB" / "val.jsonl").write_text(good + "\n" + good.replace('"hypothesis"', '"h"'))
    with pytest.raises(ValueError, match=r"CB/val\.jsonl:2: .*missing field"):
        load_task(tmp_path, "cb", "val")
    (tmp_path / "superglue" / "CB" / "test.jsonl").write_text(good.replace("neutral", "maybe"))
    with pytest.raises(ValueError, match=r"test\.jsonl:1: .*'maybe'"):
        load_task(tmp_path, "cb", "test")


def test_malformed_tsv_names_file_and_line(tmp_path):
    _write_gz(tmp_path / "glue" / "WNLI" / "dev.tsv.gz",
              "index\tsentence1\tsentence2\tlabel\n0\ta\tb\t1\n1\tonly two\n")
    with pytest.raises(ValueError, match=r"WNLI/dev\.tsv\.gz:3: .*2 tab-separated columns, expected 4"):
        load_task(tmp_path, "wnli", "dev")


# ---------------------------------------------------------------- metrics (hand-checked)

def test_multirc_f1a_and_exact_match_by_hand():
    # question A: 3 options all right; question B: option 0 wrong (false positive), option 1 right.
    groups = ["A", "A", "A", "B", "B"]
    labels = [1, 0, 1, 0, 1]
    preds = [1, 0, 1, 1, 1]
    m = compute_metrics("multirc", preds, labels, groups)
    # TP=3, FP=1, FN=0 -> P=3/4, R=1, F1 = 2*(3/4)/(7/4) = 6/7; EM = 1 of 2 questions.
    assert m == pytest.approx({"f1a": 6 / 7, "exact_match": 0.5})
    assert compute_metrics("multirc", labels, labels, groups) == {"f1a": 1.0, "exact_match": 1.0}


def test_cb_accuracy_and_macro_f1_by_hand():
    labels = [0, 0, 1, 1, 2, 2]
    preds = [0, 1, 1, 1, 2, 0]
    # class 0: P=1/2 R=1/2 F1=1/2; class 1: P=2/3 R=1 F1=4/5; class 2: P=1 R=1/2 F1=2/3
    m = compute_metrics("cb", preds, labels)
    assert m == pytest.approx({"accuracy": 4 / 6, "f1_macro": (1 / 2 + 4 / 5 + 2 / 3) / 3})
    names = ["entailment", "entailment", "contradiction", "contradiction", "neutral", "neutral"]
    assert compute_metrics("cb", preds, names) == pytest.approx(m)  # label names are accepted


def test_cola_mcc_by_hand():
    # TP=2 FN=1 TN=1 FP=1 -> (2*1 - 1*1) / sqrt(3*3*2*2) = 1/6
    assert compute_metrics("cola", [1, 1, 0, 0, 1], [1, 1, 1, 0, 0]) == pytest.approx({"mcc": 1 / 6})


def test_mrpc_accuracy_and_f1_by_hand():
    # TP=2 FP=1 FN=1 TN=0 -> F1 = 2/3, accuracy 2/4
    assert compute_metrics("mrpc", [1, 1, 0, 1], [1, 0, 1, 1]) == pytest.approx({"accuracy": 0.5, "f1": 2 / 3})


def test_stsb_correlations_by_hand():
    # deviations (-1,0,1) vs (-1,1,0): cov 1, variances 2 and 2 -> 0.5 for both (ranks equal values here)
    assert compute_metrics("stsb", [1.0, 2.0, 3.0], [1.0, 3.0, 2.0]) == pytest.approx(
        {"pearson": 0.5, "spearman": 0.5})
    m = compute_metrics("stsb", [1, 2, 3, 4], [1, 4, 9, 16])
    assert m["spearman"] == pytest.approx(1.0) and m["pearson"] < 1.0


@pytest.mark.parametrize("task", ["boolq", "copa", "rte", "wic", "wsc", "sst2", "wnli", "glue-rte"])
def test_accuracy_tasks(task):
    assert compute_metrics(task, [0, 1, 1, 0], [0, 1, 0, 0]) == {"accuracy": 0.75}


def test_bools_and_names_as_labels():
    assert compute_metrics("boolq", [True, False], [True, True]) == {"accuracy": 0.5}
    assert compute_metrics("rte", ["entailment", "not_entailment"], [0, 1]) == {"accuracy": 1.0}


def test_numpy_predictions_are_accepted():
    np = pytest.importorskip("numpy")
    labels = np.array([0, 1, 1, 0])
    assert compute_metrics("wic", labels.astype(bool), labels) == {"accuracy": 1.0}
    assert compute_metrics("rte", np.array([0.0, 1.0, 0.0, 0.0]), labels.tolist()) == {"accuracy": 0.75}


def test_metric_input_errors():
    with pytest.raises(ValueError, match="2 predictions but 3 labels"):
        compute_metrics("rte", [0, 1], [0, 1, 1])
    with pytest.raises(ValueError, match="not in the label space"):
        compute_metrics("cb", [3], [0])
    with pytest.raises(ValueError, match="not in the label space"):
        compute_metrics("rte", [0.5], [0])
    with pytest.raises(ValueError, match="needs groups"):
        compute_metrics("multirc", [0], [0])
    with pytest.raises(ValueError, match="unknown task"):
        compute_metrics("record", [0], [0])
    with pytest.raises(ValueError, match="cannot be scored"):
        compute_metrics("rte", [0], [None])
    with pytest.raises(ValueError, match="no predictions"):
        compute_metrics("wic", [], [])


def test_all_metric_keys_match_specs():
    for name, spec in TASKS.items():
        labels = [0.0, 1.0, 2.0, 3.0] if spec.label_names is None else [0, 1, 1, 0]
        groups = ["a", "a", "b", "b"] if name == "multirc" else None
        m = compute_metrics(name, labels, labels, groups)
        assert set(m) == set(spec.metrics) and all(math.isclose(v, 1.0) for v in m.values()), (name, m)
