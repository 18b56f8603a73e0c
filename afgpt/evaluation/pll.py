"""Pseudo-log-likelihood (PLL) of whole sentences under a masked LM, by minicons's rule (BabyLM's BLiMP scorer).

minicons 0.3.39 (`scorer.MaskedLMScorer(...).sequence_score(texts, reduction=lambda x: x.sum(0).item(),
PLL_metric=...)`) encodes each sentence with the tokenizer's special tokens (RoBERTa: `<s> ... </s>`) and scores
every token whose id is not the CLS, SEP or PAD id: one copy of the sentence per such token, with that token
replaced by the mask token, and the token's log-probability (log_softmax over the vocabulary) at its position. The
score is the sum over the scored tokens.

    "original"         Salazar et al. (2020): only the scored token is masked.
    "within_word_l2r"  Kauf & Ivanova (2023): the later tokens of the same word are masked too, so a word's first
                       piece is not predicted from its own later pieces. A word is what the fast tokenizer's
                       `word_ids()` says: for RoBERTa's byte-level BPE, a pre-tokenizer piece (" cats", "'t", "-"),
                       so clitics, hyphens and punctuation are words of their own.

`masked_logprobs` computes the same numbers in batches of masked copies of similar length, and applies the MLM head
only at the one position whose log-probability each copy needs.
"""
from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from itertools import accumulate

import torch
import torch.nn.functional as F

from .scoring import position_limit

__all__ = ["PLL_METHODS", "mask_positions", "masked_logprobs"]

PLL_METHODS = ("original", "within_word_l2r")


def mask_positions(input_ids: Sequence[int], word_ids: Sequence[int | None] | None, skip_ids: set[int],
                   pll: str) -> list[tuple[int, list[int]]]:
    """(scored position, positions to mask) for every scored token of one encoded sentence, as minicons builds them.

    Scored: every position whose id is not in `skip_ids` (the CLS, SEP and PAD ids). `word_ids` (the fast
    tokenizer's, None for special tokens) is needed for "within_word_l2r" only.
    """
    targets = [i for i, token in enumerate(input_ids) if token not in skip_ids]
    if pll == "original" or not targets:
        return [(i, [i]) for i in targets]
    last = targets[-1]
    return [(i, [i] if word_ids[i] is None else [i] + [j for j in range(i + 1, last + 1) if word_ids[j] == word_ids[i]])
            for i in targets]


def _mlm_head(model):
    """The head that maps the trunk's hidden states to MLM logits (RoBERTa's and afgpt's patched RoBERTa's
    `lm_head`), or None for a model whose logits are taken from its full forward."""
    from transformers import RobertaForMaskedLM, XLMRobertaForMaskedLM

    return model.lm_head if isinstance(model, (RobertaForMaskedLM, XLMRobertaForMaskedLM)) else None


def _check(model, tokenizer, pll: str, batch_size: int) -> None:
    if pll not in PLL_METHODS:
        raise ValueError(f"unknown PLL method {pll!r}; valid ones: {', '.join(PLL_METHODS)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if tokenizer.mask_token_id is None:
        raise ValueError(f"{type(tokenizer).__name__} has no mask token: PLL scoring masks each token in turn")
    if pll == "within_word_l2r" and not getattr(tokenizer, "is_fast", False):
        raise ValueError("PLL method 'within_word_l2r' needs a fast tokenizer: word boundaries come from its "
                         "word_ids()")


def _encode(model, tokenizer, texts: list[str], pll: str) -> list[tuple[list[int], list[tuple[int, list[int]]]]]:
    """(input ids with special tokens, mask sets) per text; raises ValueError for a text with no token to score or
    more tokens than the model has positions."""
    encoded = tokenizer(texts)
    skip = {t for t in (tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id) if t is not None}
    limit = position_limit(model)
    sentences = []
    for k, text in enumerate(texts):
        ids = list(encoded["input_ids"][k])
        if limit is not None and len(ids) > limit:
            raise ValueError(f"{text[:60]!r}... has {len(ids)} tokens, more than the model's {limit} positions")
        masks = mask_positions(ids, encoded.word_ids(k) if pll == "within_word_l2r" else None, skip, pll)
        if not masks:
            raise ValueError(f"{text!r} has no token to score (only special tokens)")
        sentences.append((ids, masks))
    return sentences


def _copy_logprobs(model, head, ids: torch.Tensor, attention: torch.Tensor, positions: torch.Tensor,
                   targets: torch.Tensor) -> torch.Tensor:
    """log p(target | masked copy) for every row of a right-padded batch of masked copies: [rows] in fp32."""
    rows = torch.arange(ids.shape[0], device=ids.device)
    if head is not None:
        hidden = model.base_model(input_ids=ids, attention_mask=attention).last_hidden_state
        logits = head(hidden[rows, positions])  # the head only at the one position each copy scores
    else:
        logits = model(input_ids=ids, attention_mask=attention).logits[rows, positions]
    return F.log_softmax(logits.float(), dim=-1).gather(-1, targets[:, None]).squeeze(-1)


def _batch(copies: list[tuple[int, int, list[int]]], sentences: list, mask_id: int, pad_id: int,
           device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded masked copies (ids, attention mask), and each copy's scored position and target id."""
    width = max(len(sentences[s][0]) for s, _, _ in copies)
    ids = torch.full((len(copies), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(copies), width), dtype=torch.long)
    positions, targets = [], []
    for row, (s, position, masked) in enumerate(copies):
        tokens = sentences[s][0]
        ids[row, :len(tokens)] = torch.tensor(tokens)
        attention[row, :len(tokens)] = 1
        ids[row, masked] = mask_id
        positions.append(position)
        targets.append(tokens[position])
    return (ids.to(device), attention.to(device), torch.tensor(positions, device=device),
            torch.tensor(targets, device=device))


def masked_logprobs(model, tokenizer, texts: Sequence[str], batch_size: int = 64, *, pll: str = "original",
                    progress=None) -> list[float]:
    """The pseudo-log-likelihood of every text under a masked LM, by minicons's rule (see the module docstring).

    `batch_size` counts masked copies per forward (a sentence of n scored tokens makes n copies), so memory does
    not depend on sentence length. Copies are ordered by sentence length (longest first) and right-padded with an
    attention mask (the model is bidirectional: the mask keeps padding out of every real token's attention); the MLM
    head runs only at each copy's scored position (RoBERTa-like models; others through their full forward), and
    log_softmax in fp32. A sentence's token log-probs are summed in token order after all batches, so the sum does
    not depend on how its copies were batched. The model is put in eval mode for the call and restored after; it runs on
    the device of its parameters. `progress`, if given, is called with the number of texts finished after each
    batch. Returns the scores in the order of `texts`.
    """
    _check(model, tokenizer, pll, batch_size)
    texts = list(texts)
    if not texts:
        return []
    sentences = _encode(model, tokenizer, texts, pll)
    order = sorted(range(len(texts)), key=lambda k: -len(sentences[k][0]))
    copies = [(k, position, masked) for k in order for position, masked in sentences[k][1]]
    ends = list(accumulate(len(sentences[k][1]) for k in order))  # copies done when each sentence is finished
    mask_id = tokenizer.mask_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else mask_id
    device = next(model.parameters()).device
    head = _mlm_head(model)
    logprobs = torch.empty(len(copies), dtype=torch.float32)
    finished = 0
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(copies), batch_size):
                batch = _batch(copies[start:start + batch_size], sentences, mask_id, pad_id, device)
                logprobs[start:start + batch_size] = _copy_logprobs(model, head, *batch).cpu()
                done = bisect_right(ends, start + batch_size)
                if progress is not None and done > finished:
                    progress(done - finished)
                finished = done
    finally:
        model.train(was_training)
    scores = [0.0] * len(texts)
    for k, per_token in zip(order, logprobs.split([len(sentences[k][1]) for k in order])):
        scores[k] = per_token.sum().item()
    return scores
