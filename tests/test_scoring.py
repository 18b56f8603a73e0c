"""The prefix-deduplicating scorer: exact against one sentence at a time, whatever the batching and sharing."""
import pytest
import torch
from transformers import AutoTokenizer

from afgpt.evaluation import scoring
from afgpt.evaluation.scoring import causal_logprobs

from test_blimp import TEXTS, TOKENIZER, models, reference_logprob, tiny_afgpt

SHARED = [  # minimal pairs, a sentence that is a prefix of another, a repeat, one-token and shared-start sentences
    "Who should Derek hug after shocking Richard?",
    "Who should Derek hug Richard after shocking?",
    "The dog barks.",
    "The dog barks",
    "The dog barks.",
    "The dogs bark.",
    "A dog barks.",
    "The",
    "The cat that the dog chased was sleeping.",
    "The cat that the dog chased were sleeping.",
]


@pytest.fixture(scope="module")
def tokenizer():
    if not TOKENIZER.is_dir():
        pytest.skip(f"GPT-2 tokenizer not found at {TOKENIZER}")
    return AutoTokenizer.from_pretrained(str(TOKENIZER))


def distinct_prefixes(tokenizer, texts) -> int:
    """Distinct (prefix token +) token prefixes that predict a continuation token: the head's rows with dedup."""
    prefixes = set()
    for text in texts:
        ids = tokenizer.encode(" " + text, add_special_tokens=False)
        prefixes.update(tuple(ids[:t]) for t in range(len(ids)))
    return len(prefixes)


def assert_matches_reference(model, tokenizer, texts, scores):
    expected = [reference_logprob(model, tokenizer, t, tokenizer.bos_token_id) for t in texts]
    torch.testing.assert_close(torch.tensor(scores, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64),
                               rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_shared_prefixes_score_as_one_sentence_at_a_time(tokenizer, batch_size):
    model = tiny_afgpt(tokenizer).eval()
    scores = causal_logprobs(model, tokenizer, SHARED + TEXTS, batch_size=batch_size)
    assert_matches_reference(model, tokenizer, SHARED + TEXTS, scores)
    assert scores[2] == scores[4]  # the same sentence twice: the same edges, summed in the same order


def test_same_token_after_different_prefixes_is_not_shared(tokenizer):
    """" dog barks" follows " The" in one sentence and " A" in the other: same tokens at the same positions, but
    different prefixes, so different hidden states. Sharing by (position, token) would give both the same score
    for " dog" and " barks"; the scorer must not."""
    model = tiny_afgpt(tokenizer).eval()
    texts = ["The dog barks.", "A dog barks."]
    ids = [tokenizer.encode(" " + t, add_special_tokens=False) for t in texts]
    assert ids[0][1:] == ids[1][1:] and ids[0][0] != ids[1][0]
    tails = [reference_logprob(model, tokenizer, t, tokenizer.bos_token_id)
             - reference_logprob(model, tokenizer, t.split()[0], tokenizer.bos_token_id) for t in texts]
    assert abs(tails[0] - tails[1]) > 1e-3  # the tails' log-probs really depend on the first word
    for batch_size in (1, 2):
        assert_matches_reference(model, tokenizer, texts, causal_logprobs(model, tokenizer, texts, batch_size))


def test_trie_numbers_distinct_prefixes():
    trie = scoring._PrefixTrie([[0, 5, 6, 7], [0, 5, 6, 8], [0, 9, 6, 7], [0, 5, 6]])
    assert trie.nodes == [[0, 1, 2], [0, 1, 2], [0, 5, 6], [0, 1]]  # [0, 9, 6] is not [0, 5, 6]
    assert trie.edges == [[0, 1, 2], [0, 1, 3], [4, 5, 6], [0, 1]]
    assert trie.edge_token == [5, 6, 7, 8, 9, 6, 7]
    assert trie.children[2] == [2, 3]  # 7 and 8 after [0, 5, 6]: one head row, two log-probs


@pytest.mark.parametrize("name", ["afgpt", "gpt-neo", "patched-gpt-neo"])
def test_head_runs_once_per_distinct_prefix(tokenizer, name, monkeypatch):
    model = models(tokenizer)[name]
    assert scoring._uses_head_directly(model)
    rows = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, i, o: rows.append(o.shape))
    try:
        scores = causal_logprobs(model, tokenizer, SHARED, batch_size=4)
    finally:
        handle.remove()
    assert sum(shape[0] for shape in rows) == distinct_prefixes(tokenizer, SHARED)
    assert sum(shape[0] for shape in rows) < sum(len(tokenizer.encode(" " + t)) for t in SHARED)
    monkeypatch.setattr(scoring, "_uses_head_directly", lambda model: False)  # full forward, log-softmax deduplicated
    full = causal_logprobs(model, tokenizer, SHARED, batch_size=4)
    torch.testing.assert_close(torch.tensor(full), torch.tensor(scores), rtol=1e-6, atol=1e-5)
    assert_matches_reference(model.eval(), tokenizer, SHARED, full)


def test_memory_chunks_do_not_change_scores(tokenizer, monkeypatch):
    model = tiny_afgpt(tokenizer).eval()
    whole = causal_logprobs(model, tokenizer, SHARED, batch_size=64)
    monkeypatch.setattr(scoring, "HEAD_BYTES", 3 * 4 * len(tokenizer))  # three rows per head call
    chunked = causal_logprobs(model, tokenizer, SHARED, batch_size=64)
    torch.testing.assert_close(torch.tensor(chunked), torch.tensor(whole), rtol=1e-6, atol=1e-5)
    logits = torch.randn(11, 50257) * 5
    torch.testing.assert_close(scoring._logsumexp(logits), torch.logsumexp(logits, dim=-1))


def test_scores_do_not_depend_on_order_or_company(tokenizer):
    model = tiny_afgpt(tokenizer).eval()
    forward = causal_logprobs(model, tokenizer, SHARED, batch_size=5)
    backward = causal_logprobs(model, tokenizer, SHARED[::-1], batch_size=2)[::-1]
    alone = [causal_logprobs(model, tokenizer, [t])[0] for t in SHARED]
    torch.testing.assert_close(torch.tensor(backward), torch.tensor(forward), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(torch.tensor(alone), torch.tensor(forward), rtol=1e-6, atol=1e-5)
