"""What a model learns to predict: how the loop turns a batch into a loss and an accuracy, per model family.

Batches are (input_ids, labels) pairs of [batch, seq_length] tensors; labels of -100 are not scored.

    causal, model forward (AfGPT; a model_factory's model): `model(input_ids, shift_labels=labels)`, AfGPT's own
        fused LM head + cross-entropy in training, logits in evaluation. Accuracy: next-token accuracy.
    causal, fused (GPT-Neo): the trunk (`model.base_model`), then afgpt.losses.linear_cross_entropy against the output
        embeddings, a few hundred tokens at a time: the [tokens, vocab] logits are never materialised.
    masked (RoBERTa): DataCollatorForLanguageModeling's masking (15% of the non-special tokens scored; of those 80%
        become <mask>, 10% a random token, 10% stay), drawn from a generator seeded by the batch's position in its
        data stream (so --resume and reruns mask alike) and, for validation, by a fixed seed per batch (the same
        masks at every evaluation and in every run). The trunk runs on every position, the LM head (dense, gelu,
        LayerNorm, decoder) only at the masked ones, where the loss is: the same loss as the full logits give, at
        about 15% of the head's cost. Accuracy: masked-token accuracy.

Both accuracies follow afgpt.losses.token_accuracy (fp32 argmax, first index among ties). An objective that does not
call the model's forward (fused, masked) leaves DistributedDataParallel's gradient hooks idle, so the loop averages
those gradients across processes itself (`calls_forward`).
"""
import numpy as np
import torch
import torch.nn.functional as F
from accelerate.utils import extract_model_from_parallel
from transformers import DataCollatorForLanguageModeling, PreTrainedTokenizerBase

from ..data import TokenBatches
from ..losses import CHUNK_BYTES, linear_cross_entropy, token_accuracy

IGNORE_INDEX = -100
FUSED_CHUNK_ROWS = 512  # tokens per chunk of the fused head (see FusedCausalLM)
MLM_PROBABILITY, MASK_REPLACE_PROB, RANDOM_REPLACE_PROB = 0.15, 0.8, 0.1  # BERT/RoBERTa's 15% and 80/10/10
VAL_MASK_SEED = 20240520  # validation masks: one fixed draw per validation batch, independent of --seed


class Objective:
    """A training objective: `objective(model, input_ids, labels)` -> (mean loss, accuracy), both 0-d tensors."""

    name = "causal"
    accuracy_kind = "next-token"  # named in metrics.jsonl and the accuracy plot
    calls_forward = True  # whether it goes through model.__call__ (DistributedDataParallel syncs gradients there)

    def train_batches(self, batches: TokenBatches):
        """The training stream the loop reads (a checkpointable iterator of (input_ids, labels))."""
        return batches

    def val_batches(self, batches):
        """The validation batches, from data.val_batches' fixed windows."""
        return batches

    def __call__(self, model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class ForwardCausalLM(Objective):
    """The model's own forward with pre-shifted labels: AfGPT's (fused head in training), or a model factory's."""

    def __call__(self, model, input_ids, labels):
        out = model(input_ids=input_ids, shift_labels=labels, use_cache=False)
        return out.loss, token_accuracy(out.logits.detach(), labels) if out.logits is not None else out.accuracy


class FusedCausalLM(Objective):
    """Next-token loss of a transformers causal LM (GPT-Neo): trunk, then the chunked fused LM head + cross-entropy.

    Chunks are at least FUSED_CHUNK_ROWS tokens: every chunk streams the whole head weight three times (logits,
    grad_hidden, grad_weight), 77 MB each for GPT-2's 50k vocabulary at width 384, and linear_cross_entropy's default
    (16 MB of logits: 128 tokens at 50k) pays that 16 times for 2048 tokens. With 512-token chunks the head's
    forward + backward took 1.16 s instead of 1.29 s (full logits: 1.31 s) at width 384 on the 2-core dev machine,
    and the same as the default at width 128; for vocabularies up to 8k the default already is >= 512 tokens.
    """

    calls_forward = False

    def __call__(self, model, input_ids, labels):
        model = extract_model_from_parallel(model)
        hidden = model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state
        head = model.get_output_embeddings()
        if getattr(head, "bias", None) is not None:
            raise ValueError(f"{type(model).__name__}'s LM head has a bias, which the fused cross-entropy does not add")
        flat = labels.reshape(-1)
        chunk = max(FUSED_CHUNK_ROWS, CHUNK_BYTES // (4 * head.weight.shape[0]))
        loss_sum, correct = linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), head.weight, flat, IGNORE_INDEX,
                                                 chunk)
        n_scored = (flat != IGNORE_INDEX).sum().clamp_min(1)
        return loss_sum / n_scored, correct / n_scored


class MaskedLM(Objective):
    """RoBERTa's masked-LM loss, with the LM head applied only where tokens are masked."""

    name = "masked"
    accuracy_kind = "masked-token"
    calls_forward = False

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.collator = DataCollatorForLanguageModeling(
            tokenizer, mlm=True, mlm_probability=MLM_PROBABILITY, mask_replace_prob=MASK_REPLACE_PROB,
            random_replace_prob=RANDOM_REPLACE_PROB)
        self.special_ids = torch.tensor(sorted(set(tokenizer.all_special_ids)))

    def mask(self, input_ids: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(masked input_ids, labels): the collator's masking of a token batch, drawn from `seed`; special tokens
        (document separators) are never masked. labels hold the original token where masked, -100 elsewhere."""
        self.collator.generator = torch.Generator().manual_seed(seed)
        special = torch.isin(input_ids, self.special_ids)
        return self.collator.torch_mask_tokens(input_ids.clone(), special_tokens_mask=special)

    def train_batches(self, batches: TokenBatches) -> "MaskedBatches":
        return MaskedBatches(batches, self)

    def val_batches(self, batches):
        for index, (input_ids, _) in enumerate(batches):
            yield self.mask(input_ids, batch_seed(VAL_MASK_SEED, index))

    def __call__(self, model, input_ids, labels):
        model = extract_model_from_parallel(model)
        hidden = model.base_model(input_ids=input_ids).last_hidden_state
        scored = labels != IGNORE_INDEX
        logits = model.lm_head(hidden[scored])  # [masked tokens, vocab]: dense, gelu, LayerNorm, decoder
        targets = labels[scored]
        return F.cross_entropy(logits.float(), targets), token_accuracy(logits.detach(), targets)


class MaskedBatches:
    """A TokenBatches stream whose batches are masked for MLM; batch k of the stream is masked from a seed of the
    stream's (seed, stream, rank) and its position, so a resumed run masks exactly as an uninterrupted one.
    Checkpoints hold the TokenBatches position (state_dict and load_state_dict pass through)."""

    def __init__(self, batches: TokenBatches, objective: MaskedLM):
        self.batches, self.objective = batches, objective

    def __iter__(self) -> "MaskedBatches":
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        b = self.batches
        seed = batch_seed(b.seed, b.stream, b.rank, b.epoch, b.index)  # the position of the batch about to be read
        input_ids, _ = next(b)
        return self.objective.mask(input_ids, seed)

    def state_dict(self) -> dict:
        return self.batches.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.batches.load_state_dict(state)


def batch_seed(*keys: int) -> int:
    """A 63-bit generator seed drawn from non-negative integer keys (numpy's SeedSequence mixing)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def build_objective(model: str, tokenizer: PreTrainedTokenizerBase | None = None) -> Objective:
    """The objective of a model family: afgpt -> ForwardCausalLM, gpt-neo -> FusedCausalLM, roberta -> MaskedLM."""
    if model == "afgpt":
        return ForwardCausalLM()
    if model == "gpt-neo":
        return FusedCausalLM()
    if model == "roberta":
        if tokenizer is None:
            raise ValueError("roberta's masked LM needs the run's tokenizer (for <mask> and the random tokens)")
        return MaskedLM(tokenizer)
    raise ValueError(f"no training objective for model {model!r}")


def accuracy_kind(model: str) -> str:
    """What the accuracy of a family's runs measures: "next-token" or "masked-token"."""
    return MaskedLM.accuracy_kind if model == "roberta" else Objective.accuracy_kind
