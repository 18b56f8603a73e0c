"""BLiMP scoring: the batched scorer against a plain per-sentence computation, lm-eval's rules, data, aggregation."""
import gzip
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoTokenizer, GPTNeoConfig, GPTNeoForCausalLM

import afgpt
from afgpt.evaluation import blimp as blimp_module
from afgpt.evaluation.blimp import aggregate, evaluate_blimp, load_blimp
from afgpt.evaluation.scoring import causal_logprobs, prefix_token_id

from conftest import SHARED_DATA, perturb, tiny_config

TOKENIZER = SHARED_DATA / "tokenizers" / "gpt2"
BLIMP = SHARED_DATA / "blimp"

TEXTS = [
    "Who should Derek hug after shocking Richard?",
    "A.",
    "The cat that the dogs that the children who lived next door had adopted last spring chased across the wide "
    "garden this morning was finally sleeping quietly on the warm windowsill of the old house.",
    "Many girls insulted themselves.",
    "x",
    "These patients do not ever hurt themselves.",
    "The woman who the men had seen yesterday was there.",
    "Who should Derek hug Richard after shocking?",
]


@pytest.fixture(scope="module")
def tokenizer():
    if not TOKENIZER.is_dir():
        pytest.skip(f"GPT-2 tokenizer not found at {TOKENIZER}")
    return AutoTokenizer.from_pretrained(str(TOKENIZER))


def tiny_afgpt(tokenizer, **overrides):
    torch.manual_seed(0)
    return perturb(afgpt.AfGPTForCausalLM(tiny_config(vocab_size=len(tokenizer), max_position_embeddings=128,
                                                      num_hidden_layers=2, **overrides)))


def tiny_neo(tokenizer):
    torch.manual_seed(0)
    config = GPTNeoConfig(vocab_size=len(tokenizer), hidden_size=32, num_layers=2, num_heads=2, window_size=8,
                          attention_types=[[["global", "local"], 1]], max_position_embeddings=128)
    return GPTNeoForCausalLM(config)


def reference_logprob(model, tokenizer, text, prefix):
    """One sentence alone: full logits, log_softmax, gather (no batching, no padding, no mask)."""
    ids = torch.tensor([[prefix] + tokenizer.encode(" " + text, add_special_tokens=False)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1].float()
    return logits.log_softmax(-1).gather(-1, ids[0, 1:, None]).sum().item()


def models(tokenizer):
    neo = tiny_neo(tokenizer)
    patched = afgpt.patch_model(tiny_neo(tokenizer))
    perturb(patched)
    return {"afgpt": tiny_afgpt(tokenizer), "gpt-neo": neo, "patched-gpt-neo": patched,
            "afgpt-doc-separator": tiny_afgpt(tokenizer, doc_separator_token_id=tokenizer.eos_token_id)}


@pytest.mark.parametrize("name", ["afgpt", "gpt-neo", "patched-gpt-neo", "afgpt-doc-separator"])
def test_batched_scores_match_one_sentence_at_a_time(tokenizer, name):
    model = models(tokenizer)[name].eval()
    prefix = tokenizer.bos_token_id
    expected = [reference_logprob(model, tokenizer, t, prefix) for t in TEXTS]
    one = causal_logprobs(model, tokenizer, TEXTS, batch_size=1)
    seven = causal_logprobs(model, tokenizer, TEXTS, batch_size=7)  # long and short sentences share a batch
    assert len({round(x, 3) for x in expected}) == len(TEXTS)  # a real, non-degenerate model
    torch.testing.assert_close(torch.tensor(one), torch.tensor(expected), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(torch.tensor(seven), torch.tensor(one), rtol=1e-6, atol=1e-5)
    assert [a >= b for a, b in zip(seven[::2], seven[1::2])] == [a >= b for a, b in zip(one[::2], one[1::2])]


def test_too_long_and_empty_texts_are_refused(tokenizer):
    model = tiny_afgpt(tokenizer)  # 128 positions
    with pytest.raises(ValueError, match="more than the model's 128 positions"):
        causal_logprobs(model, tokenizer, ["word " * 200])
    with pytest.raises(ValueError, match="batch_size"):
        causal_logprobs(model, tokenizer, TEXTS, batch_size=0)
    assert causal_logprobs(model, tokenizer, []) == []


def test_padding_does_not_leak(tokenizer):
    """A short sentence scores the same alone and next to a much longer one (right padding, causal model)."""
    model = tiny_afgpt(tokenizer)
    alone = causal_logprobs(model, tokenizer, ["A."], batch_size=1)[0]
    with_long = causal_logprobs(model, tokenizer, ["A.", TEXTS[2] * 2], batch_size=2)[0]
    assert abs(alone - with_long) < 1e-5


def test_train_mode_model_is_scored_in_eval_mode_and_restored(tokenizer):
    model = tiny_afgpt(tokenizer).eval()  # AfGPT has no dropout: eval and train forwards agree
    expected = causal_logprobs(model, tokenizer, TEXTS[:3], batch_size=3)
    model.train()
    assert causal_logprobs(model, tokenizer, TEXTS[:3], batch_size=3) == expected
    assert model.training


def test_prefix_token_rule(tokenizer):
    assert prefix_token_id(tokenizer) == tokenizer.bos_token_id == 50256
    both = SimpleNamespace(bos_token_id=3, eos_token_id=5)
    eos_only = SimpleNamespace(bos_token_id=None, eos_token_id=5)
    assert prefix_token_id(both) == 3
    assert prefix_token_id(eos_only) == 5
    with pytest.raises(ValueError, match="neither a BOS nor an EOS"):
        prefix_token_id(SimpleNamespace(bos_token_id=None, eos_token_id=None))


def test_prefix_token_is_bos_else_eos_in_scores(tokenizer):
    """With BOS set to another token the context changes to it; without BOS the EOS token is used."""
    model = tiny_afgpt(tokenizer).eval()
    bos_tok = AutoTokenizer.from_pretrained(str(TOKENIZER))
    bos_tok.bos_token = "!"  # id 0: a BOS distinct from EOS
    got = causal_logprobs(model, bos_tok, TEXTS[:2])
    assert got == pytest.approx([reference_logprob(model, tokenizer, t, 0) for t in TEXTS[:2]], abs=1e-4)
    eos_tok = AutoTokenizer.from_pretrained(str(TOKENIZER))
    eos_tok.bos_token = None
    assert eos_tok.bos_token_id is None
    got = causal_logprobs(model, eos_tok, TEXTS[:2])
    assert got == pytest.approx([reference_logprob(model, tokenizer, t, 50256) for t in TEXTS[:2]], abs=1e-4)
    assert got != pytest.approx(causal_logprobs(model, bos_tok, TEXTS[:2]), abs=1e-3)


def write_paradigm(folder: Path, name, field, term, pairs, gz=False):
    lines = [json.dumps({"sentence_good": g, "sentence_bad": b, "field": field, "linguistics_term": term,
                         "UID": name, "pairID": str(i)}) for i, (g, b) in enumerate(pairs)]
    text = "\n".join(lines) + "\n"
    if gz:
        with gzip.open(folder / f"{name}.jsonl.gz", "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        (folder / f"{name}.jsonl").write_text(text, encoding="utf-8")


@pytest.fixture
def fixture_dir(tmp_path):
    """Three paradigms; sentences are "<score> ..." so a fake scorer knows each one's log-prob."""
    write_paradigm(tmp_path, "p_a", "syntax", "island", [("1 g", "0 b"), ("0 g", "1 b"), ("5 g", "5 b"),
                                                         ("2 g", "1 b")], gz=True)  # 3/4 (the tie counts)
    write_paradigm(tmp_path, "p_b", "syntax", "agreement", [("0 g", "1 b"), ("3 g", "2 b")])  # 1/2
    write_paradigm(tmp_path, "p_c", "morphology", "agreement", [("0 g", "9 b")] * 9 + [("9 g", "0 b")])  # 1/10
    return tmp_path


def fake_scores(model, tokenizer, texts, batch_size=64, progress=None, **kwargs):
    if progress is not None:
        progress(len(texts))
    return [float(t.split()[0]) for t in texts]


def test_aggregation_and_ties_on_a_fixture(fixture_dir, monkeypatch):
    monkeypatch.setattr(blimp_module, "causal_logprobs", fake_scores)
    tok = SimpleNamespace(bos_token_id=1, eos_token_id=2)
    result = evaluate_blimp(None, tok, fixture_dir, progress=False, return_pairs=True)
    assert result["paradigms"] == {"p_a": 0.75, "p_b": 0.5, "p_c": 0.1}
    assert result["overall"] == pytest.approx((0.75 + 0.5 + 0.1) / 3)  # unweighted over paradigms
    assert result["overall_pairs"] == pytest.approx((3 + 1 + 1) / 16)  # pooled
    assert result["fields"] == pytest.approx({"syntax": 0.625, "morphology": 0.1})
    assert result["phenomena"] == pytest.approx({"island": 0.75, "agreement": 0.3})
    assert result["pairs"] == 16
    assert result["settings"]["prefix_token_id"] == 1
    tie = result["pair_scores"]["p_a"][2]
    assert tie == {"pair_id": "2", "sentence_good": "5 g", "sentence_bad": "5 b", "good": 5.0, "bad": 5.0,
                   "correct": True}
    assert "pair_scores" not in evaluate_blimp(None, tok, fixture_dir, progress=False)


def test_progress_bar_runs(fixture_dir, monkeypatch, capsys):
    monkeypatch.setattr(blimp_module, "causal_logprobs", fake_scores)
    evaluate_blimp(None, SimpleNamespace(bos_token_id=1, eos_token_id=2), fixture_dir, progress=True)
    assert "16/16" in capsys.readouterr().err


def test_aggregate_weights_paradigms_equally():
    result = aggregate({"big": {"acc": 1.0, "correct": 99, "pairs": 99, "field": "f", "phenomenon": "x"},
                        "small": {"acc": 0.0, "correct": 0, "pairs": 1, "field": "f", "phenomenon": "x"}})
    assert result["overall"] == result["fields"]["f"] == result["phenomena"]["x"] == 0.5
    assert result["overall_pairs"] == 0.99


def test_loading_plain_gz_limit_and_order(fixture_dir):
    everything = load_blimp(fixture_dir)
    assert [p.name for p in everything] == ["p_a", "p_b", "p_c"]
    assert everything[0].path.name == "p_a.jsonl.gz" and everything[1].path.name == "p_b.jsonl"
    assert (everything[0].field, everything[0].phenomenon) == ("syntax", "island")
    assert everything[0].pairs[0].sentence_good == "1 g" and everything[0].pairs[0].pair_id == "0"
    limited = load_blimp(fixture_dir, paradigms=["p_c", "p_a"], limit=2)
    assert [(p.name, len(p.pairs)) for p in limited] == [("p_c", 2), ("p_a", 2)]
    assert [p.name for p in load_blimp(fixture_dir, paradigms="p_b,p_a")] == ["p_b", "p_a"]
    with pytest.raises(ValueError, match="limit"):
        load_blimp(fixture_dir, limit=0)


def test_loading_errors(fixture_dir, tmp_path):
    with pytest.raises(ValueError, match=r"unknown BLiMP paradigm\(s\) nope.*valid ones: p_a, p_b, p_c"):
        load_blimp(fixture_dir, paradigms=["p_a", "nope"])
    with pytest.raises(FileNotFoundError, match="not found"):
        load_blimp(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no BLiMP files"):
        load_blimp(empty)
    (fixture_dir / "p_d.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="p_d.jsonl: no pairs"):
        load_blimp(fixture_dir, paradigms=["p_d"])
    good = json.dumps({"sentence_good": "a", "sentence_bad": "b"})
    (fixture_dir / "p_e.jsonl").write_text(f"{good}\n{good}\n{{not json\n")
    with pytest.raises(ValueError, match=r"p_e\.jsonl:3: not valid JSON"):
        load_blimp(fixture_dir, paradigms=["p_e"])
    assert len(load_blimp(fixture_dir, paradigms=["p_e"], limit=2)[0].pairs) == 2  # --limit stops before it
    (fixture_dir / "p_f.jsonl").write_text(f'{good}\n{{"sentence_good": "a"}}\n')
    with pytest.raises(ValueError, match=r"p_f\.jsonl:2: 'sentence_bad' is missing"):
        load_blimp(fixture_dir, paradigms=["p_f"])
    write_paradigm(fixture_dir, "p_b", "syntax", "x", [("a", "b")], gz=True)  # p_b.jsonl and p_b.jsonl.gz
    with pytest.raises(ValueError, match="two files"):
        load_blimp(fixture_dir)


@pytest.mark.parametrize("data", ["blimp", "blimp_filtered_babylm"])
def test_real_data_layout(data):
    folder = SHARED_DATA / data
    if not folder.is_dir():
        pytest.skip(f"{folder} not staged")
    paradigms = load_blimp(folder, limit=1)
    assert len(paradigms) == 67
    assert {p.field for p in paradigms} >= {"syntax", "morphology", "semantics"}


def test_real_blimp_end_to_end(tokenizer):
    if not BLIMP.is_dir():
        pytest.skip(f"{BLIMP} not staged")
    model = tiny_afgpt(tokenizer)
    names = ["adjunct_island", "anaphor_gender_agreement"]
    result = evaluate_blimp(model, tokenizer, BLIMP, paradigms=names, limit=20, batch_size=16, progress=False,
                            return_pairs=True)
    assert result["pairs"] == 40 and list(result["paradigms"]) == names
    assert result["fields"].keys() == {"syntax", "morphology"}
    assert result["phenomena"].keys() == {"island_effects", "anaphor_agreement"}
    pairs = result["pair_scores"]["adjunct_island"]
    first = load_blimp(BLIMP, paradigms=["adjunct_island"], limit=1)[0].pairs[0]
    model.eval()
    assert pairs[0]["good"] == pytest.approx(reference_logprob(model, tokenizer, first.sentence_good, 50256), abs=1e-4)
    assert pairs[0]["bad"] == pytest.approx(reference_logprob(model, tokenizer, first.sentence_bad, 50256), abs=1e-4)
    for name, rows in result["pair_scores"].items():
        assert result["paradigms"][name] == sum(r["good"] >= r["bad"] for r in rows) / 20
    assert result["overall"] == pytest.approx(sum(result["paradigms"].values()) / 2)


def test_afgpt_eval_blimp_command_tables_two_models_and_writes_json(tmp_path, capsys):
    import json as json_lib

    from transformers import AutoTokenizer, GPTNeoConfig, GPTNeoForCausalLM

    import afgpt
    from afgpt.cli import main

    blimp_dir = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "blimp"
    tokenizer = AutoTokenizer.from_pretrained(Path(__file__).resolve().parents[1].parent / "shared" / "data" /
                                              "tokenizers" / "gpt2")
    vocab = len(tokenizer)
    models = {
        "afgpt": afgpt.AfGPTForCausalLM(afgpt.AfGPTConfig(vocab_size=vocab, hidden_size=16, num_hidden_layers=1,
                                                          num_attention_heads=2, af_type="spline;att-none")),
        "neo": afgpt.patch_model(GPTNeoForCausalLM(GPTNeoConfig(
            vocab_size=vocab, hidden_size=16, num_layers=1, num_heads=2, attention_types=[[["global"], 1]],
            max_position_embeddings=128)), af_type="prelu;att-none"),
    }
    for name, model in models.items():
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    out = tmp_path / "results.json"
    main(["eval-blimp", str(tmp_path / "afgpt"), str(tmp_path / "neo"), "--data", str(blimp_dir),
          "--paradigms", "adjunct_island,anaphor_gender_agreement", "--limit", "5", "--output", str(out)])
    table = capsys.readouterr().out
    assert f"| paradigm | {tmp_path / 'afgpt'} | {tmp_path / 'neo'} |" in table and "**overall**" in table
    results = json_lib.loads(out.read_text())["models"]
    for name, model in models.items():
        expected = evaluate_blimp(model, tokenizer, blimp_dir, ["adjunct_island", "anaphor_gender_agreement"], 5,
                                  progress=False)
        assert results[str(tmp_path / name)]["paradigms"] == expected["paradigms"]


def test_eval_blimp_on_a_run_directory_appends_to_its_metrics_and_saves_pairs_and_plot(tmp_path, tokenizer, capsys):
    from afgpt.cli import main
    from afgpt.plotting import read_metrics

    run = tmp_path / "run"  # what `afgpt train` leaves: the model, its tokenizer, train_config.json, metrics.jsonl
    model = tiny_afgpt(tokenizer)
    model.save_pretrained(run)
    tokenizer.save_pretrained(run)
    (run / "train_config.json").write_text("{}")
    (run / "metrics.jsonl").write_text(json.dumps({"kind": "val", "step": 4, "loss": 5.0}) + "\n")
    names = ["adjunct_island", "anaphor_gender_agreement"]
    main(["eval-blimp", str(run), "--data", str(BLIMP), "--paradigms", ",".join(names), "--limit", "6",
          "--output", str(tmp_path / "blimp.json"), "--save-pairs", str(tmp_path / "pairs.jsonl")])
    out = capsys.readouterr().out
    assert "| *island_effects* |" in out and "| **syntax** |" in out
    records = read_metrics(run / "metrics.jsonl")
    assert [r["kind"] for r in records] == ["val", "blimp"]
    saved = json.loads((tmp_path / "blimp.json").read_text())["models"][str(run)]
    assert records[1]["overall"] == saved["overall"] and records[1]["phenomena"] == saved["phenomena"]
    assert "pair_scores" not in saved and "pair_scores" not in records[1]
    pairs = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == 12 and {p["paradigm"] for p in pairs} == set(names)
    first = load_blimp(BLIMP, paradigms=names[:1], limit=1)[0].pairs[0]
    assert pairs[0]["sentence_good"] == first.sentence_good
    assert pairs[0]["logprob_good"] == pytest.approx(
        reference_logprob(model.eval(), tokenizer, first.sentence_good, 50256), abs=1e-4)
    for name in names:
        rows = [p for p in pairs if p["paradigm"] == name]
        assert saved["paradigms"][name] == sum(p["logprob_good"] >= p["logprob_bad"] for p in rows) / 6
    assert (tmp_path / "blimp.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_masked_or_causal_is_decided_by_class_then_type():
    from transformers import RobertaConfig

    assert blimp_module.is_masked_lm(RobertaConfig())
    assert blimp_module.is_masked_lm(RobertaConfig(architectures=["RobertaForMaskedLM"]))
    assert not blimp_module.is_masked_lm(RobertaConfig(architectures=["RobertaForCausalLM"]))
    assert not blimp_module.is_masked_lm(GPTNeoConfig())
    assert not blimp_module.is_masked_lm(afgpt.AfGPTConfig())


def test_unknown_pll_method_is_refused(fixture_dir):
    with pytest.raises(ValueError, match="unknown PLL method 'l2r': use one of original, within_word_l2r"):
        evaluate_blimp(None, SimpleNamespace(bos_token_id=1, eos_token_id=2), fixture_dir, pll="l2r")


def test_eval_blimp_scores_masked_lms_by_pseudo_log_likelihood(tmp_path):
    from transformers import RobertaConfig, RobertaForMaskedLM

    from afgpt.cli import main
    from afgpt.evaluation.pll import masked_logprobs

    roberta_tokenizer = SHARED_DATA / "tokenizers" / "roberta-base"
    if not roberta_tokenizer.is_dir():
        pytest.skip(f"RoBERTa tokenizer not found at {roberta_tokenizer}")
    tok = AutoTokenizer.from_pretrained(str(roberta_tokenizer))
    torch.manual_seed(0)
    model = perturb(RobertaForMaskedLM(RobertaConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=32)))
    model.save_pretrained(tmp_path / "roberta")
    tok.save_pretrained(tmp_path / "roberta")
    main(["eval-blimp", str(tmp_path / "roberta"), "--data", str(BLIMP), "--paradigms", "adjunct_island",
          "--limit", "4", "--pll", "within_word_l2r", "--output", str(tmp_path / "out.json"),
          "--save-pairs", str(tmp_path / "pairs.jsonl")])
    result = json.loads((tmp_path / "out.json").read_text())["models"][str(tmp_path / "roberta")]
    assert result["settings"]["pll"] == "within_word_l2r" and "pseudo-log-likelihood" in result["settings"]["scoring"]
    pairs = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    sentences = [s for p in pairs for s in (p["sentence_good"], p["sentence_bad"])]
    expected = masked_logprobs(model, tok, sentences, batch_size=1, pll="within_word_l2r")
    got = [s for p in pairs for s in (p["logprob_good"], p["logprob_bad"])]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-5, atol=1e-4)
    assert got != pytest.approx(masked_logprobs(model, tok, sentences, pll="original"), abs=1e-3)
    assert result["paradigms"]["adjunct_island"] == sum(p["correct"] for p in pairs) / 4
