"""Next-token cross-entropy fused with the LM head, computed a chunk of tokens at a time.

A small LM's logits dwarf the rest of its activations: 4096 tokens x 8192 vocabulary is 134 MB of
fp32, written, read back by log-softmax, written again as its gradient, and, being larger than the
allocator's mmap threshold, page-faulted in fresh every step. Here the logits of a few hundred
tokens at a time are made, turned into the loss, the argmax and the gradient while they sit in
cache, and dropped. Gradients are computed in the forward pass (no recomputation), so the backward
only scales them; the matmul FLOPs are those of the plain path. Every chunk reuses the same two
buffers: a fresh 16 MB tensor per chunk is page-faulted in anew, which slowed the logits matmul by
a third.
"""
import torch

CHUNK_BYTES = 16 * 2**20  # fp32 logits per chunk: stays in a desktop CPU's L3 cache


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight.T` against `labels`; also counts correct argmaxes (token_accuracy's)."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index: int, chunk: int):
        grad_h, grad_w = ctx.needs_input_grad[:2]  # PEFT freezes the head; a frozen trunk needs no grad_hidden
        dtype = torch.promote_types(weight.dtype, torch.float32)  # bf16 weights or autocast: fp32 softmax
        device = hidden.device.type  # out= matmuls skip autocast, so apply its dtype here
        mm_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        mm_weight = weight.to(mm_dtype)
        rows = min(chunk, hidden.shape[0])
        logits_buffer = hidden.new_empty((rows, weight.shape[0]), dtype=mm_dtype)
        log_probs_buffer = hidden.new_empty((rows, weight.shape[0]), dtype=dtype)
        loss_sum = hidden.new_zeros((), dtype=dtype)
        correct = torch.zeros((), dtype=torch.long, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if grad_h else None
        grad_weight = torch.zeros_like(weight, dtype=dtype) if grad_w else None
        for start in range(0, hidden.shape[0], chunk):
            y = labels[start:start + chunk]
            valid = (y != ignore_index).unsqueeze(1)
            target = y.unsqueeze(1).masked_fill(~valid, 0)
            h = hidden[start:start + chunk] * valid  # an ignored token contributes no gradient
            logits = torch.mm(h.to(mm_dtype), mm_weight.T, out=logits_buffer[:len(y)])
            # token_accuracy's rule: first maximal index; argmax on bf16 equals argmax on its exact fp32 upcast
            correct += (logits.argmax(-1) == y).logical_and_(valid.squeeze(1)).sum()
            log_probs = torch.log_softmax(logits, -1, dtype=dtype, out=log_probs_buffer[:len(y)])
            loss_sum -= log_probs.gather(1, target).mul_(valid).sum()
            if grad_h or grad_w:  # d loss_sum / d logits = softmax - one_hot(target)
                probs = log_probs.exp_().scatter_add_(1, target, torch.full_like(log_probs[:, :1], -1.0))
            if grad_h:
                grad_hidden[start:start + chunk] = (probs.to(mm_dtype) @ mm_weight).mul_(valid)
            if grad_w:
                grad_weight.addmm_(probs.T, h.to(dtype))
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.mark_non_differentiable(correct)
        return loss_sum, correct

    @staticmethod
    def backward(ctx, grad_loss, grad_correct):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (None if grad_hidden is None else grad_hidden * grad_loss,
                None if grad_weight is None else (grad_weight * grad_loss).to(ctx.weight_dtype), None, None, None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         ignore_index: int = -100, chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token loss and number of correct argmax predictions over the tokens not ignored.

    `hidden` is [tokens, hidden], `weight` the LM head [vocab, hidden], `labels` [tokens] already
    aligned with `hidden` (shifted). Divide the sum by the token count yourself (mean, or a
    gradient-accumulation denominator). A prediction is correct as `token_accuracy` defines it, so
    the fused training accuracy and the validation accuracy on logits are the same measure.
    """
    if chunk is None:
        chunk = max(128, CHUNK_BYTES // (4 * weight.shape[0]))
    return _LinearCrossEntropy.apply(hidden, weight, labels, ignore_index, chunk)


def token_accuracy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Fraction of the positions whose label is not `ignore_index` where argmax(logits) is the label.

    The one definition of accuracy in afgpt (linear_cross_entropy counts the same way): the argmax
    is torch.argmax's, the first index among tied maxima, taken on the fp32 logits (upcasting bf16
    is exact, so bf16 logits give the same answer). 0 when every position is ignored.
    """
    valid = labels != ignore_index
    correct = (logits.float().argmax(-1) == labels).logical_and_(valid)
    return correct.sum() / valid.sum().clamp_min(1)
