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

__all__ = ["causal_logprobs", "encode_continuations", "position_limit", "prefix_token_id"]

# fp32 logits per LM-head call: bounds the memory whatever the vocabulary and batch, and stays under glibc's
# 32 MiB mmap ceiling, so the buffer is reused from the heap instead of being mapped and page-faulted in anew
# each call (that cost a quarter of the CPU time on full BLiMP), while keeping the matmul efficient (~80 rows).
HEAD_BYTES = 2**24


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


def position_limit(model) -> int | None:
    """Tokens the model can take (None if its config does not say). RoBERTa-style embeddings number positions from
    padding_idx + 1, so they take padding_idx + 1 fewer than max_position_embeddings."""
    config = getattr(model, "config", None)
    limit = next((value for name in ("n_positions", "max_position_embeddings", "n_ctx")
                  if isinstance(value := getattr(config, name, None), int) and value > 0), None)
    offset = getattr(getattr(getattr(model, "base_model", None), "embeddings", None), "padding_idx", None)
    if limit is not None and isinstance(offset, int):
        return limit - offset - 1
    return limit


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


class _PrefixTrie:
    """Every distinct token prefix of the sequences, numbered, with the tokens that follow it.

    In a causal LM a position's hidden state, and so its next-token distribution, depends only on the tokens up to
    it; sentences that start alike (the two of a minimal pair, or many that open with "The" or "Who") share
    prefixes, so the LM head and the softmax run once per distinct prefix (`node`) instead of once per position.
    Each (node, next token) `edge` is one distinct log-probability; a sequence's score sums its edges.
    """

    def __init__(self, seqs: Sequence[Sequence[int]]):
        ids: dict[tuple[int, int], int] = {}  # (node, next token) -> edge; edge e leads to node e + 1 (0 is the root)
        self.edge_token: list[int] = []
        self.children: list[list[int]] = [[]]  # node -> its edges
        self.nodes: list[list[int]] = []  # per sequence: the node before each predicted token
        self.edges: list[list[int]] = []  # per sequence: the edge of each predicted token
        for seq in seqs:  # seq[0] is the prefix token, the same for all, so the root stands for it
            node, nodes, edges = 0, [], []
            for token in seq[1:]:
                edge = ids.get((node, token))
                if edge is None:
                    edge = ids[(node, token)] = len(self.edge_token)
                    self.edge_token.append(token)
                    self.children[node].append(edge)
                    self.children.append([])
                nodes.append(node)
                edges.append(edge)
                node = edge + 1
            self.nodes.append(nodes)
            self.edges.append(edges)


def _new_positions(trie: _PrefixTrie, rows: Sequence[int], done: list[bool]) -> tuple[list[int], ...]:
    """(kept rows, row among them, position, node): the rows with a node not scored before, and each such node's
    first position, marking the nodes done. A row whose every prefix was scored in an earlier batch (a repeat, or
    a sentence that starts a longer one) needs no forward at all."""
    kept, batch_rows, positions, nodes = [], [], [], []
    for i in rows:
        for t, node in enumerate(trie.nodes[i]):
            if not done[node]:
                done[node] = True
                if not kept or kept[-1] != i:
                    kept.append(i)
                batch_rows.append(len(kept) - 1)
                positions.append(t)
                nodes.append(node)
    return kept, batch_rows, positions, nodes


def _rows_per(nbytes: int, vocab: int) -> int:
    """Rows of fp32 logits that fit in `nbytes`."""
    return max(1, nbytes // (4 * vocab))


def _logsumexp(logits: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last dim, a few rows at a time: each block stays in cache between its max and exp-sum
    passes, which on CPU makes it several times faster than one call on a large block."""
    rows = _rows_per(2**20, logits.shape[-1])
    return torch.cat([torch.logsumexp(logits[i:i + rows], dim=-1) for i in range(0, len(logits), rows)])


def _score_edges(logits: torch.Tensor, nodes: Sequence[int], trie: _PrefixTrie, edge_logprob: list[float]) -> None:
    """Log-probs of every edge leaving `nodes` (row k of `logits` is node k's), as logit - logsumexp in fp32."""
    logits = logits.float()
    lse = _logsumexp(logits)
    rows = [k for k, node in enumerate(nodes) for _ in trie.children[node]]
    edges = [e for node in nodes for e in trie.children[node]]
    rows_t = torch.tensor(rows, device=logits.device)
    tokens = torch.tensor([trie.edge_token[e] for e in edges], device=logits.device)
    for edge, value in zip(edges, (logits[rows_t, tokens] - lse[rows_t]).tolist()):
        edge_logprob[edge] = value


def _score_batch(model, ids: torch.Tensor, mask: torch.Tensor, rows: list[int], cols: list[int], nodes: list[int],
                 trie: _PrefixTrie, edge_logprob: list[float]) -> None:
    """Scores the edges of `nodes`, whose hidden states are at (rows, cols) of this right-padded batch [batch, time]:
    the LM head (or, for models scored through their full forward, the log-softmax) runs only there, in chunks."""
    rows_t, cols_t = torch.tensor(rows, device=ids.device), torch.tensor(cols, device=ids.device)
    if _uses_head_directly(model):
        hidden = model.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state[rows_t, cols_t]
        head = model.get_output_embeddings()
        chunk = _rows_per(HEAD_BYTES, head.weight.shape[0])
        for start in range(0, len(nodes), chunk):
            _score_edges(head(hidden[start:start + chunk]), nodes[start:start + chunk], trie, edge_logprob)
    else:
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[rows_t, cols_t]
        chunk = _rows_per(HEAD_BYTES, logits.shape[-1])
        for start in range(0, len(nodes), chunk):
            _score_edges(logits[start:start + chunk], nodes[start:start + chunk], trie, edge_logprob)


def _padded_batch(seqs: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and attention mask [batch, longest]."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, seq in enumerate(seqs):
        ids[r, :len(seq)] = torch.tensor(seq)
        mask[r, :len(seq)] = 1
    return ids.to(device), mask.to(device)


def causal_logprobs(model, tokenizer, texts: Sequence[str], batch_size: int = 64, *, delimiter: str = " ",
                    progress=None) -> list[float]:
    """The log-probability of every text under a causal LM, by lm-eval's rule (see the module docstring).

    Texts are sorted by token length (longest first, as lm-eval does), batched `batch_size` at a time, right-padded
    with an attention mask (the model is causal, so padding after a row's last token cannot change its scores).
    The LM head and the log-softmax (logit - logsumexp, in fp32) run once per distinct token prefix over all the
    texts (see `_PrefixTrie`), at its first position in that order, in chunks that bound the logits' memory; rows
    whose prefixes were all scored before are not run, and no row's last token is fed. A text's score is the sum
    of its tokens' log-probs in token order (in double precision), so it does not depend on the other texts in its
    batch beyond the last bits of the forward's rounding; equal texts get equal scores. The model is put in eval
    mode for the call (AfGPT in train mode would fuse the loss) and restored after; it runs on whatever device its
    parameters are on. `progress`, if given, is called with the number of texts scored after each batch. Returns
    the scores in the order of `texts`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    texts = list(texts)
    continuations = encode_continuations(tokenizer, texts, delimiter)
    prefix = prefix_token_id(tokenizer)
    limit = position_limit(model)
    for text, cont in zip(texts, continuations):
        if limit is not None and len(cont) > limit:  # lm-eval would cut the context; nothing is left to cut
            raise ValueError(f"{text[:60]!r}... has {len(cont)} tokens, more than the model's {limit} positions")
    seqs = [[prefix] + cont for cont in continuations]
    trie = _PrefixTrie(seqs)
    order = sorted(range(len(texts)), key=lambda i: -len(seqs[i]))
    device = next(model.parameters()).device
    edge_logprob = [0.0] * len(trie.edge_token)
    done = [False] * len(trie.children)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                rows = order[start:start + batch_size]
                kept, batch_rows, positions, nodes = _new_positions(trie, rows, done)
                if nodes:  # a sequence's last token is only predicted, never an input: the trunk does not need it
                    ids, mask = _padded_batch([seqs[i][:-1] for i in kept], prefix, device)
                    _score_batch(model, ids, mask, batch_rows, positions, nodes, trie, edge_logprob)
                if progress is not None:
                    progress(len(rows))
    finally:
        model.train(was_training)
    return [sum(edge_logprob[e] for e in edges) for edges in trie.edges]
