"""Log-likelihood scoring of whole sentences with a causal LM, by lm-evaluation-harness's rule.

lm-eval scores a continuation with an empty context ("" as BLiMP's `doc_to_text`) as follows: the context is the
model's prefix token (the tokenizer's BOS id if it has one, else its EOS id), the continuation is the text as
lm-eval passes it (`" " + sentence` for a multiple-choice task: its target delimiter) encoded with
`add_special_tokens=False`, and the score is the sum of the log-probabilities of the continuation tokens, each
given the prefix token and the tokens before it. `causal_logprobs` computes exactly that, batched.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["causal_logprobs", "encode_continuations", "prefix_token_id"]


def prefix_token_id(tokenizer) -> int:
    """The token lm-eval puts before a continuation with an empty context: BOS if the tokenizer has one, else EOS."""
    token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if token is None:
        raise ValueError(f"{type(tokenizer).__name__} has neither a BOS nor an EOS token: lm-eval's rule needs one "
                         "of them as the context of a sentence")
    return int(token)


def encode_continuations(tokenizer, texts: Sequence[str], delimiter: str = " ") -> list[list[int]]:
    """`delimiter + text` encoded without special tokens, one list of ids per text (lm-eval's `tok_encode`)."""
    if not texts:
        return []
    encoded = tokenizer([delimiter + t for t in texts], add_special_tokens=False)["input_ids"]
    for text, ids in zip(texts, encoded):
        if not ids:
            raise ValueError(f"{text!r} encodes to no tokens: nothing to score")
    return [list(ids) for ids in encoded]


def _max_length(model) -> int | None:
    config = getattr(model, "config", None)
    for name in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _uses_head_directly(model) -> bool:
    """Whether logits are exactly `get_output_embeddings()(base_model(...).last_hidden_state)`.

    True for AfGPT and GPT-Neo (patched or not). Models that scale or soft-cap their logits, or have no separate
    trunk, are scored through their full forward instead.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    base = getattr(model, "base_model", model)
    config = getattr(model, "config", None)
    transforms = any(getattr(config, name, None) not in (None, 1.0, 0.0, False)
                     for name in ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier"))
    return head is not None and base is not model and not transforms


def _token_logprobs(model, ids: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Summed log-probs of tokens 1..n-1 of every right-padded row [batch, time]: [batch] in fp32."""
    predict = torch.arange(ids.shape[1] - 1, device=ids.device)[None] < (lengths[:, None] - 1)  # positions 0..n-2
    targets = ids[:, 1:][predict]
    if _uses_head_directly(model):
        hidden = model.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        logits = model.get_output_embeddings()(hidden[:, :-1][predict])  # the head only where a token is predicted
    else:
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1][predict]
    logprobs = F.log_softmax(logits.float(), dim=-1).gather(-1, targets[:, None]).squeeze(-1)
    per_position = torch.zeros(predict.shape, dtype=torch.float32, device=ids.device)
    per_position[predict] = logprobs
    return per_position.sum(dim=1)  # a fixed-order sum per row, so a sentence's score does not depend on its batch


def causal_logprobs(model, tokenizer, texts: Sequence[str], batch_size: int = 64, *, delimiter: str = " ",
                    progress=None) -> list[float]:
    """The log-probability of every text under a causal LM, by lm-eval's rule (see the module docstring).

    Texts are sorted by token length (longest first, as lm-eval does), batched `batch_size` at a time, right-padded
    with an attention mask (the model is causal, so padding after a row's last token cannot change its scores),
    and the LM head is applied only at the positions that predict a continuation token; log_softmax runs in fp32.
    The model is put in eval mode for the call (AfGPT in train mode would fuse the loss) and restored after; it
    runs on whatever device its parameters are on. `progress`, if given, is called with the number of texts
    scored after each batch. Returns the scores in the order of `texts`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    texts = list(texts)
    continuations = encode_continuations(tokenizer, texts, delimiter)
    prefix = prefix_token_id(tokenizer)
    limit = _max_length(model)
    for text, cont in zip(texts, continuations):
        if limit is not None and len(cont) > limit:  # lm-eval would cut the context; nothing is left to cut
            raise ValueError(f"{text[:60]!r}... has {len(cont)} tokens, more than the model's {limit} positions")
    order = sorted(range(len(texts)), key=lambda i: -len(continuations[i]))
    device = next(model.parameters()).device
    scores = [0.0] * len(texts)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                rows = order[start:start + batch_size]
                seqs = [[prefix] + continuations[i] for i in rows]
                lengths = torch.tensor([len(s) for s in seqs], device=device)
                width = int(lengths.max())
                ids = torch.full((len(seqs), width), prefix, dtype=torch.long)
                mask = torch.zeros((len(seqs), width), dtype=torch.long)
                for r, seq in enumerate(seqs):
                    ids[r, :len(seq)] = torch.tensor(seq)
                    mask[r, :len(seq)] = 1
                sums = _token_logprobs(model, ids.to(device), mask.to(device), lengths).tolist()
                for i, value in zip(rows, sums):
                    scores[i] = value
                if progress is not None:
                    progress(len(rows))
    finally:
        model.train(was_training)
    return scores
