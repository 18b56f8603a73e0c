"""Masked-LM PLL scoring: the batched scorer against one masked copy at a time, the masking rules, bad input."""
import copy

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertForMaskedLM, RobertaConfig, RobertaForMaskedLM

import afgpt
from afgpt.evaluation import pll as pll_module
from afgpt.evaluation.pll import PLL_METHODS, mask_positions, masked_logprobs

from conftest import SHARED_DATA, perturb

TOKENIZER = SHARED_DATA / "tokenizers" / "roberta-base"

SINGLE_TOKEN_WORDS = ["The cat sleeps.", "Who should Derek hug after shocking Richard?", "x"]
MULTI_TOKEN_WORDS = [  # "antidisestablishmentarianism", "quibble", "Pyrrhic" are split into several BPE pieces
    "A antidisestablishmentarianism quibble happened.",
    "The cat that the dogs the children next door had adopted chased was sleeping on the windowsill.",
    "Many girls insulted themselves with a Pyrrhic victory.",
]
TEXTS = SINGLE_TOKEN_WORDS + MULTI_TOKEN_WORDS


@pytest.fixture(scope="module")
def tokenizer():
    if not TOKENIZER.is_dir():
        pytest.skip(f"RoBERTa tokenizer not found at {TOKENIZER}")
    return AutoTokenizer.from_pretrained(str(TOKENIZER))


def tiny_roberta(tokenizer) -> RobertaForMaskedLM:
    torch.manual_seed(0)
    config = RobertaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=66, pad_token_id=tokenizer.pad_token_id,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return perturb(RobertaForMaskedLM(config))


def tiny_model(tokenizer, name: str):
    if name == "roberta":
        return tiny_roberta(tokenizer)
    if name == "patched-roberta":
        return perturb(afgpt.patch_model(tiny_roberta(tokenizer), "spline;att-spline"), seed=1)
    torch.manual_seed(0)  # BERT: no known head, scored through the full forward
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id)
    return perturb(BertForMaskedLM(config))


def reference_pll(model, tokenizer, text: str, pll: str) -> float:
    """minicons's rule written plainly: one masked copy at a time, unpadded, full logits, log_softmax, summed."""
    encoded = tokenizer(text)
    ids, words = encoded["input_ids"], encoded.word_ids()
    special = {tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id}
    targets = [i for i, t in enumerate(ids) if t not in special]
    total = 0.0
    for i in targets:
        masked = list(ids)
        masked[i] = tokenizer.mask_token_id
        if pll == "within_word_l2r":
            for j in targets:
                if j > i and words[j] == words[i]:
                    masked[j] = tokenizer.mask_token_id
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([masked])).logits[0, i].float()
        total += logits.log_softmax(-1)[ids[i]].item()
    return total


@pytest.fixture(scope="module")
def models(tokenizer) -> dict:
    return {name: tiny_model(tokenizer, name).eval() for name in ("roberta", "patched-roberta", "bert")}


@pytest.mark.parametrize("pll", PLL_METHODS)
@pytest.mark.parametrize("name", ["roberta", "patched-roberta", "bert"])
def test_batched_scores_match_one_masked_copy_at_a_time(tokenizer, models, name, pll):
    model = models[name]
    expected = [reference_pll(model, tokenizer, t, pll) for t in TEXTS]
    torch.testing.assert_close(masked_logprobs(model, tokenizer, TEXTS, pll=pll), expected, rtol=0, atol=1e-4)


def test_patched_roberta_is_scored_through_its_lm_head(models):
    model = models["patched-roberta"]
    assert isinstance(model, afgpt.AfRobertaForMaskedLM) and model.config.model_type == "afgpt_roberta"
    assert pll_module._mlm_head(model) is model.lm_head
    assert pll_module._mlm_head(models["bert"]) is None


def test_mask_positions():
    ids, words = [0, 10, 11, 12, 13, 14, 2, 1], [None, 0, 1, 1, 1, 2, None, None]
    assert mask_positions(ids, None, {0, 1, 2}, "original") == [(1, [1]), (2, [2]), (3, [3]), (4, [4]), (5, [5])]
    assert mask_positions(ids, words, {0, 1, 2}, "within_word_l2r") == [
        (1, [1]), (2, [2, 3, 4]), (3, [3, 4]), (4, [4]), (5, [5])]


def test_within_word_l2r_differs_exactly_for_multi_token_words(tokenizer, models):
    encoded = tokenizer(TEXTS)
    multi = [len(set(w for w in encoded.word_ids(k) if w is not None)) < len(encoded["input_ids"][k]) - 2
             for k in range(len(TEXTS))]
    assert multi == [t in MULTI_TOKEN_WORDS for t in TEXTS]
    model = models["roberta"]
    original = masked_logprobs(model, tokenizer, TEXTS, pll="original")
    l2r = masked_logprobs(model, tokenizer, TEXTS, pll="within_word_l2r")
    for text, a, b, is_multi in zip(TEXTS, original, l2r, multi):
        assert (a != b) == is_multi, text


@pytest.mark.parametrize("pll", PLL_METHODS)
def test_scores_do_not_depend_on_batch_size_or_padding(tokenizer, models, pll):
    model = models["roberta"]
    scores = masked_logprobs(model, tokenizer, TEXTS, batch_size=64, pll=pll)
    torch.testing.assert_close(masked_logprobs(model, tokenizer, TEXTS, batch_size=1, pll=pll), scores,
                               rtol=0, atol=1e-5)
    torch.testing.assert_close(masked_logprobs(model, tokenizer, TEXTS, batch_size=7, pll=pll), scores,
                               rtol=0, atol=1e-5)
    # every copy of the short sentences padded to the longest one in a single batch (RoBERTa is bidirectional)
    padded = masked_logprobs(model, tokenizer, TEXTS, batch_size=10_000, pll=pll)
    alone = [masked_logprobs(model, tokenizer, [t], pll=pll)[0] for t in TEXTS]
    torch.testing.assert_close(padded, alone, rtol=0, atol=1e-5)


def test_progress_counts_every_text_and_mode_is_restored(tokenizer):
    model = tiny_roberta(tokenizer).train()
    seen = []
    masked_logprobs(model, tokenizer, TEXTS, batch_size=5, progress=seen.append)
    assert sum(seen) == len(TEXTS) and model.training and all(m.training for m in model.modules())

    def fail(n):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        masked_logprobs(model, tokenizer, TEXTS, progress=fail)
    assert model.training
    model.eval()
    masked_logprobs(model, tokenizer, TEXTS[:1])
    assert not model.training
    assert masked_logprobs(model, tokenizer, []) == []


def test_bad_input_is_refused_clearly(tokenizer, models):
    model = models["roberta"]
    with pytest.raises(ValueError, match="unknown PLL method 'l2r'; valid ones: original, within_word_l2r"):
        masked_logprobs(model, tokenizer, TEXTS, pll="l2r")
    no_mask = copy.deepcopy(tokenizer)
    no_mask.mask_token = None
    with pytest.raises(ValueError, match="no mask token"):
        masked_logprobs(model, tokenizer=no_mask, texts=TEXTS)
    with pytest.raises(ValueError, match="no token to score"):
        masked_logprobs(model, tokenizer, ["Fine.", ""])
    with pytest.raises(ValueError, match="more than the model's 64 positions"):
        masked_logprobs(model, tokenizer, [" ".join(["word"] * 63)])
    masked_logprobs(model, tokenizer, [" ".join(["word"] * 62)])  # 62 words + <s> and </s>: exactly the 64 positions
    with pytest.raises(ValueError, match="batch_size"):
        masked_logprobs(model, tokenizer, TEXTS, batch_size=0)
