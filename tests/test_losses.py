import pytest
import torch
import torch.nn.functional as F

from afgpt import AfGPTForCausalLM
from afgpt.losses import linear_cross_entropy, token_accuracy
from conftest import perturb, tiny_config


def problem(tokens=50, hidden=8, vocab=29, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, hidden, generator=g, dtype=dtype).requires_grad_()
    w = torch.randn(vocab, hidden, generator=g, dtype=dtype).requires_grad_()
    y = torch.randint(0, vocab, (tokens,), generator=g)
    y[::7] = -100
    return h, w, y


@pytest.mark.parametrize("chunk", [16, 50, 128])  # uneven last chunk, exact, one chunk
def test_sum_gradients_and_correct_count_match_the_plain_loss(chunk):
    h, w, y = problem(dtype=torch.float64)
    loss_sum, correct = linear_cross_entropy(h, w, y, chunk=chunk)
    grads = torch.autograd.grad(loss_sum * 0.5, (h, w))
    logits = h @ w.T
    expected = F.cross_entropy(logits, y, reduction="sum")
    expected_grads = torch.autograd.grad(expected * 0.5, (h, w))
    torch.testing.assert_close(loss_sum, expected)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want)
    valid = y != -100
    assert correct.item() == (logits.argmax(-1) == y)[valid].sum().item() > 0
    assert grads[0][~valid].abs().max() == 0  # ignored tokens get no gradient


def test_without_grad_gives_the_same_loss():
    h, w, y = problem()
    with torch.no_grad():
        loss_sum, correct = linear_cross_entropy(h, w, y, chunk=16)
    assert not loss_sum.requires_grad
    torch.testing.assert_close(loss_sum, F.cross_entropy(h @ w.T, y, reduction="sum"))


def test_bf16_autocast_keeps_fp32_gradients_close_to_the_plain_path():
    h, w, y = problem(tokens=64, hidden=16, vocab=40)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused, _ = linear_cross_entropy(h, w, y, chunk=16)
        plain = F.cross_entropy((h @ w.T).float(), y, reduction="sum")
    fused_grads = torch.autograd.grad(fused, (h, w))
    plain_grads = torch.autograd.grad(plain, (h, w))
    torch.testing.assert_close(fused, plain, rtol=1e-2, atol=0)
    for got, want in zip(fused_grads, plain_grads):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=0.05, atol=0.05)


def test_bf16_autocast_runs_the_logits_matmul_in_bf16():
    """The chunk buffers are filled with out= matmuls, which autocast skips; the loss applies
    autocast's dtype itself, so it matches the plain path's bf16 logits, not fp32 ones."""
    h, w, y = problem(tokens=64, hidden=64, vocab=40)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused, _ = linear_cross_entropy(h, w, y, chunk=16)
        plain = F.cross_entropy((h @ w.T).float(), y, reduction="sum")
    full_precision = F.cross_entropy(h @ w.T, y, reduction="sum")
    assert (full_precision - plain).abs() > 1e-4 * plain.abs()  # bf16 logits change the loss
    torch.testing.assert_close(fused, plain, rtol=1e-6, atol=0)


def model_grads(model, **inputs):
    out = model(**inputs)
    grads = torch.autograd.grad(out.loss, list(model.parameters()), allow_unused=True)
    return out, grads


@pytest.mark.parametrize("num_items", [None, 25])
def test_training_forward_fuses_the_loss_and_matches_the_logits_path(num_items):
    model = perturb(AfGPTForCausalLM(tiny_config(af_type="spline;att-spline"))).train()
    x = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))
    labels = x.clone()
    labels[0, :5] = -100
    extra = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    fused, fused_grads = model_grads(model, input_ids=x, labels=labels, **extra)
    plain, plain_grads = model_grads(model, input_ids=x, labels=labels, skip_logits=False, **extra)
    assert fused.logits is None and plain.logits is not None
    torch.testing.assert_close(fused.loss, plain.loss)
    for got, want in zip(fused_grads, plain_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    targets = labels[:, 1:]
    valid = targets != -100
    accuracy = (plain.logits[:, :-1].argmax(-1) == targets)[valid].float().mean()
    torch.testing.assert_close(fused.accuracy, accuracy)


def test_eval_mode_and_wrapped_heads_keep_the_logits():
    model = perturb(AfGPTForCausalLM(tiny_config()))
    x = torch.randint(0, 97, (2, 16))
    assert model.eval()(x, labels=x).logits is not None

    class WrappedHead(torch.nn.Linear):  # stands for a PEFT layer: its own forward must run
        def forward(self, hidden):
            return super().forward(hidden) * 2

    head = WrappedHead(32, 97, bias=False)
    head.weight = model.lm_head.weight
    model.lm_head = head
    out = model.train()(x, labels=x)
    assert out.logits is not None
    torch.testing.assert_close(out.logits, 2 * (model.model(x).last_hidden_state @ head.weight.T))
    with pytest.raises(ValueError, match="skip_logits"):
        model(x, labels=x, skip_logits=True)


def test_skip_logits_without_labels_is_refused():
    with pytest.raises(ValueError, match="needs labels"):
        AfGPTForCausalLM(tiny_config())(torch.randint(0, 97, (1, 8)), skip_logits=True)


def test_fused_training_loss_compiles_with_fullgraph():
    model = perturb(AfGPTForCausalLM(tiny_config(af_type="spline;att-spline"))).train()
    x = torch.randint(0, 97, (2, 16))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    eager, eager_grads = model_grads(model, input_ids=x, labels=x)
    traced, traced_grads = model_grads(compiled, input_ids=x, labels=x)
    assert traced.logits is None
    torch.testing.assert_close(traced.loss, eager.loss)
    for got, want in zip(traced_grads, eager_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("frozen", ["weight", "hidden"])
def test_a_frozen_input_gets_no_gradient_computed_and_the_other_is_unchanged(frozen):
    h, w, y = problem(dtype=torch.float64)
    expected = torch.autograd.grad(linear_cross_entropy(h, w, y, chunk=16)[0], (h, w))
    (w if frozen == "weight" else h).requires_grad_(False)
    trainable, index = (h, 0) if frozen == "weight" else (w, 1)
    loss_sum, _ = linear_cross_entropy(h, w, y, chunk=16)
    saved_hidden_grad, saved_weight_grad = loss_sum.grad_fn.saved_tensors
    assert (saved_weight_grad if frozen == "weight" else saved_hidden_grad) is None  # never computed
    loss_sum.backward()
    assert (w if frozen == "weight" else h).grad is None
    torch.testing.assert_close(trainable.grad, expected[index])


def tied_problem(dtype=torch.float32):
    """Logits with exact ties: vocab rows 3 and 5 of the head are equal, so are their logits on every token."""
    h, w, y = problem(tokens=40, hidden=8, vocab=12)
    with torch.no_grad():
        w[5] = w[3]
        h[:, :] = h.abs()  # the tied pair is the argmax on some tokens
        w[3] = w[3].abs() + 0.5
        w[5] = w[3]
    logits = (h @ w.T).detach()
    top = logits.argmax(-1)
    assert (top == 3).sum() > 5  # ties resolved to the first index on many tokens
    y = torch.where(torch.arange(len(y)) % 2 == 0, torch.full_like(y, 5), torch.full_like(y, 3))  # half the tied label
    y[::7] = -100
    return h.detach().to(dtype), w.detach().to(dtype), y


def test_token_accuracy_counts_non_ignored_positions_and_the_first_tied_index():
    logits = torch.tensor([[1.0, 3.0, 3.0], [2.0, 0.0, 0.0], [0.0, 0.0, 5.0], [9.0, 0.0, 0.0]])
    labels = torch.tensor([1, 0, 1, -100])  # tie: 1 is the first maximum; 2 would not count
    assert token_accuracy(logits, labels).item() == pytest.approx(2 / 3)  # the ignored row is not in the denominator
    assert token_accuracy(logits, torch.tensor([2, 0, 2, -100])).item() == pytest.approx(2 / 3)
    assert token_accuracy(logits, torch.full((4,), -100)).item() == 0.0
    assert token_accuracy(logits, torch.tensor([1, 0, 1, 7]), ignore_index=7).item() == pytest.approx(2 / 3)


def test_token_accuracy_of_bf16_logits_is_that_of_their_fp32_values():
    logits = torch.randn(64, 30, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    logits[:, 7] = logits[:, 3]  # ties that stay ties in bf16
    labels = logits.float().argmax(-1)
    labels[::3] = 7
    assert token_accuracy(logits, labels) == token_accuracy(logits.float(), labels)
    assert token_accuracy(logits, labels).dtype == torch.float32


@pytest.mark.parametrize("autocast", [False, True])
def test_fused_correct_count_is_token_accuracy_of_the_plain_logits(autocast):
    h, w, y = tied_problem()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        _, correct = linear_cross_entropy(h, w, y, chunk=16)
        logits = h @ w.T  # bf16 under autocast, as the plain path's lm_head makes them
    valid = (y != -100).sum()
    assert correct.item() == round(token_accuracy(logits, y).item() * valid.item())
    at_a_maximum = logits.float() >= logits.float().amax(-1, keepdim=True)
    tie_counts = (at_a_maximum.gather(1, y.clamp_min(0)[:, None])[:, 0] & (y != -100)).sum()
    assert correct.item() < tie_counts  # counting every tied maximum as correct would give more
