"""The KV cache on the current transformers API: `cache=` (old name `past_key_values` still accepted), document
masking and the sliding window kept exact across cached steps, generate() identical with and without a cache."""
import warnings

import pytest
import torch
from transformers import DynamicCache

from afgpt import ACTIVATION_NAMES, AfGPTForCausalLM
from conftest import perturb, tiny_config

SEPARATOR = 3
# every activation once in the MLP and once before QKV, plus the no-slot form
AF_TYPES = [f"{name};att-linear" for name in ACTIVATION_NAMES] + [f"gelu;att-{name}" for name in ACTIVATION_NAMES
                                                                  if name != "linear"] + ["relu;att-none"]
MASKS = {"causal": {}, "documents": {"doc_separator_token_id": SEPARATOR}, "window": {"context_size": 5},
         "documents+window": {"doc_separator_token_id": SEPARATOR, "context_size": 5}}


def model_for(af_type: str = "gelu;att-linear", **config) -> AfGPTForCausalLM:
    return perturb(AfGPTForCausalLM(tiny_config(af_type=af_type, num_hidden_layers=3, **config)), scale=0.1).eval()


def sequence(batch: int = 2, length: int = 14, seed: int = 0) -> torch.Tensor:
    """Random tokens with document separators inside (and one right at the first cached step)."""
    x = torch.randint(4, 97, (batch, length), generator=torch.Generator().manual_seed(seed))
    for row, position in ((0, 4), (0, 9), (1, 4), (1, 6)):
        if row < batch and position < length:
            x[row, position] = SEPARATOR
    return x


def assert_same_logits(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal to fp32 reduction-order rounding, relative to the logits' scale (a masking error moves them by O(1))."""
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5 * expected.abs().max().item())


def feed_in_pieces(model: AfGPTForCausalLM, x: torch.Tensor, pieces: list[int]) -> torch.Tensor:
    """Logits of x fed through the cache piece by piece."""
    cache, logits, start = DynamicCache(config=model.config), [], 0
    for length in pieces:
        out = model(x[:, start:start + length], cache=cache, use_cache=True)
        assert out.cache is cache and cache.get_seq_length() == start + length
        logits.append(out.logits)
        start += length
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize("mask", ["causal", "documents+window"])
@pytest.mark.parametrize("af_type", AF_TYPES)
def test_cached_chunks_equal_one_full_forward(af_type, mask):
    model = model_for(af_type, **MASKS[mask])
    x = sequence()
    with torch.no_grad():
        assert_same_logits(feed_in_pieces(model, x, [3, 1, 5, 2, 3]), model(x, use_cache=False).logits)


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("af_type", ["gelu;att-linear", "spline;att-splinePerDim"])
def test_token_by_token_equals_one_full_forward(af_type, mask):
    model = model_for(af_type, **MASKS[mask])
    x = sequence()
    with torch.no_grad():
        assert_same_logits(feed_in_pieces(model, x, [1] * x.shape[1]), model(x, use_cache=False).logits)


def test_document_masking_holds_after_the_cache_exists():
    """Tokens fed after a separator must not see the earlier document, also through the cache."""
    model = model_for(doc_separator_token_id=SEPARATOR)
    x = sequence(batch=1)
    y = x.clone()
    y[0, :4] = (x[0, :4] % 90) + 5  # change the first document only
    with torch.no_grad():
        a = feed_in_pieces(model, x, [2] * 7)
        b = feed_in_pieces(model, y, [2] * 7)
    torch.testing.assert_close(a[:, 4:], b[:, 4:])
    assert not torch.allclose(a[:, :4], b[:, :4])


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("af_type", ["gelu;att-linear", "spline;att-spline", "splinePerDim;att-rational",
                                     "prelu;att-swish", "relu2;att-none"])
def test_greedy_generation_identical_with_and_without_cache(af_type, mask):
    model = model_for(af_type, **MASKS[mask])
    prompt = sequence(batch=1, length=7)
    with_cache = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=True, pad_token_id=0)
    without = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=False, pad_token_id=0)
    assert with_cache.shape == (1, 19)
    assert torch.equal(with_cache, without)


def test_generation_grows_one_cache_and_matches_recomputed_logits():
    """The 5.24 regression: every decode step started a fresh cache (lengths 8, 1, 1, ...)."""
    model = model_for(doc_separator_token_id=SEPARATOR)
    prompt = sequence(batch=1, length=8)
    lengths = []
    hook = model.register_forward_hook(lambda m, a, out: lengths.append(out.cache.get_seq_length()))
    out = model.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0, output_logits=True,
                         return_dict_in_generate=True)
    hook.remove()
    assert lengths == [8, 9, 10, 11, 12]
    with torch.no_grad():
        recomputed = model(out.sequences[:, :-1], use_cache=False).logits[:, 7:]
    assert_same_logits(torch.stack(out.logits, dim=1), recomputed)


def test_separator_generated_mid_sequence_starts_a_new_document():
    """A separator that the model itself generates cuts attention in the following cached steps."""
    model = model_for(doc_separator_token_id=SEPARATOR)
    prompt = sequence(batch=1, length=6)

    def force_separator(input_ids, scores):  # the third generated token is a separator
        if input_ids.shape[1] == 8:
            scores = torch.full_like(scores, -1e9)
            scores[:, SEPARATOR] = 0
        return scores

    from transformers import LogitsProcessorList
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0,
                  logits_processor=LogitsProcessorList([force_separator]))
    with_cache = model.generate(prompt, use_cache=True, **kwargs)
    assert with_cache[0, 8] == SEPARATOR
    assert torch.equal(with_cache, model.generate(prompt, use_cache=False, **kwargs))


def test_beam_search_reorders_the_document_indices_with_the_cache():
    model = model_for(doc_separator_token_id=SEPARATOR)
    prompt = sequence(batch=1, length=6)
    kwargs = dict(max_new_tokens=8, do_sample=False, num_beams=3, pad_token_id=0)
    assert torch.equal(model.generate(prompt, use_cache=True, **kwargs),
                       model.generate(prompt, use_cache=False, **kwargs))


def test_the_old_past_key_values_name_still_works_with_a_deprecation_warning():
    model = model_for()
    x = sequence(batch=1)
    with torch.no_grad():
        first = model(x[:, :6], use_cache=True)
        with pytest.warns(FutureWarning, match="past_key_values"):
            old = model(x[:, 6:], past_key_values=first.cache, use_cache=True).logits
        full = model(x, use_cache=False).logits
    assert_same_logits(old, full[:, 6:])


def test_no_deprecation_warning_from_afgpt_on_this_transformers():
    model = model_for(doc_separator_token_id=SEPARATOR, context_size=5)
    x = sequence()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        model.train()
        model(x, labels=x).loss.backward()
        model.eval()
        model.generate(x[:1], max_new_tokens=4, do_sample=False, pad_token_id=0)
        model(x, use_cache=True)


def test_a_cache_built_elsewhere_is_refused_with_document_masking():
    model = model_for(doc_separator_token_id=SEPARATOR)
    plain = model_for()
    x = sequence(batch=1)
    cache = plain(x[:, :5], use_cache=True).cache  # filled by a model that kept no document indices
    with pytest.raises(ValueError, match="did not see with doc_separator_token_id"):
        model(x[:, 5:], cache=cache, use_cache=True)


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("cache_implementation", ["dynamic", "static"])
def test_generation_logits_with_each_cache_equal_recomputation(cache_implementation, mask):
    """Logits, not just tokens: generate() precomputes 4D masks for a static cache, which must keep the
    document and window masks."""
    model = model_for(**MASKS[mask])
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    prompt = sequence(batch=1, length=7)
    cached = model.generate(prompt, cache_implementation=cache_implementation, **kwargs)
    recomputed = model.generate(prompt, use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, recomputed.sequences)
    assert_same_logits(torch.stack(cached.logits, dim=1), torch.stack(recomputed.logits, dim=1))
