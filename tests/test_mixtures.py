import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init

from afgpt.activation_set import init_activation_module
from afgpt.ffn import MLP
from afgpt.mixtures import (DICTIONARY, DICTIONARY_NAMES, GateStatistics, LearnableMixture, MoAFeedForward,
                            dictionary_values, effective_rank, gate_statistics, mix)

GELU = DICTIONARY_NAMES.index("gelu")


def test_dictionary_order_and_values():
    assert DICTIONARY_NAMES == ("identity", "relu", "relu2", "leaky_relu", "gelu", "silu", "tanh")
    x = torch.tensor([-2.0, 0.5])
    torch.testing.assert_close(dictionary_values(x), torch.tensor([
        [-2.0, 0.0, 0.0, -0.02, F.gelu(torch.tensor(-2.0)).item(), -2 * torch.sigmoid(torch.tensor(-2.0)).item(),
         math.tanh(-2.0)],
        [0.5, 0.5, 0.25, 0.5, F.gelu(torch.tensor(0.5)).item(), 0.5 * torch.sigmoid(torch.tensor(0.5)).item(),
         math.tanh(0.5)]]))


def test_mix_matches_the_reference_functions_everywhere():
    """mix evaluates silu and tanh through a shared sigmoid: same functions, also in the tails. The reference is
    computed in double; the tolerance admits fp32 F.gelu (the fallback's), itself off by up to 6.3e-7 near |x| = 3."""
    x = torch.cat([torch.linspace(-100, 100, 2001), torch.tensor([0.0, 1e-6, -1e-6])])
    for k, name in enumerate(DICTIONARY_NAMES):
        weights = torch.eye(len(DICTIONARY_NAMES))[k]
        torch.testing.assert_close(mix(x, DICTIONARY_NAMES, weights), DICTIONARY[name](x.double()).float(),
                                   rtol=1e-6, atol=7e-7)


def test_la_starts_as_the_base():
    """To float rounding: the CPU kernel's erf is ATen's vectorised one, F.gelu's on fp32 CPU oneDNN's."""
    x = torch.randn(64, 48) * 4
    torch.testing.assert_close(LearnableMixture()(x), F.gelu(x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(LearnableMixture(channels=48)(x), F.gelu(x), rtol=1e-6, atol=1e-6)
    assert torch.equal(LearnableMixture(base="relu", names=["relu", "gelu"])(x), F.relu(x))


def test_la_hand_computed_mixture():
    la = LearnableMixture(names=["identity", "relu2", "gelu", "tanh"])
    with torch.no_grad():
        la.coefficients.copy_(torch.tensor([0.5, 2.0, -1.0, 3.0]))
    x = torch.tensor([-1.5, 0.0, 2.0])
    expected = 0.5 * x + 2 * F.relu(x) ** 2 - F.gelu(x) + 3 * torch.tanh(x)
    torch.testing.assert_close(la(x), expected)


def test_la_per_channel_shapes_and_broadcast():
    la = LearnableMixture(channels=5)
    assert la.coefficients.shape == (7, 5)
    with torch.no_grad():
        la.coefficients.zero_()
        la.coefficients[0] = torch.arange(5.0)  # channel c: c * x
    x = torch.randn(2, 3, 5)
    torch.testing.assert_close(la(x), x * torch.arange(5.0))
    assert LearnableMixture().coefficients.shape == (7,)


def test_la_gradients_reach_the_coefficients():
    for la in (LearnableMixture(), LearnableMixture(channels=6)):
        la(torch.randn(10, 6)).square().sum().backward()
        assert la.coefficients.grad.shape == la.coefficients.shape
        assert (la.coefficients.grad != 0).all()


def test_la_bf16_keeps_dtype_and_fp32_parameters():
    la = LearnableMixture()
    x = torch.randn(8, 16, dtype=torch.bfloat16)
    y = la(x)
    assert y.dtype == torch.bfloat16 and la.coefficients.dtype == torch.float32
    torch.testing.assert_close(y, F.gelu(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert la(x).dtype == torch.bfloat16


def test_la_validates_names_and_shows_them():
    with pytest.raises(ValueError, match="names"):
        LearnableMixture(names=["gelu", "swish"])
    with pytest.raises(ValueError, match="base='gelu'"):
        LearnableMixture(names=["relu", "tanh"])
    assert "base=gelu, names=(identity, relu" in repr(LearnableMixture())
    assert "per-channel=4" in repr(LearnableMixture(channels=4))


def test_la_plots(tmp_path):
    from afgpt.plotting import draw_activation, new_figure
    for la in (LearnableMixture(), LearnableMixture(channels=6)):
        fig, axes = new_figure(1, 1, (3, 3))
        draw_activation(axes[0][0], la)


def test_initial_state_restores_via_the_host_init():
    la, moa = LearnableMixture(channels=3), MoAFeedForward(8, 16)
    with torch.no_grad():
        la.coefficients.fill_(0.3)
        moa.gates.weight.fill_(0.3)
        moa.gates.bias.fill_(0.3)
    assert init_activation_module(la, init) and init_activation_module(moa.gates, init)
    torch.testing.assert_close(la.coefficients, la.initial_state()["coefficients"])
    assert (moa.gates.weight == 0).all() and moa.gates.bias[GELU] == 10 and (moa.gates.bias.sum() == 10 - 60)


def test_moa_starts_close_to_the_gelu_mlp():
    """Tolerance: gates are sigmoid(+-10), so the activations are off by ~4.5e-5 * sum_k |f_k(z)|."""
    torch.manual_seed(0)
    moa, mlp = MoAFeedForward(32, 128), MLP(32, 128, nn.GELU())
    mlp.load_state_dict({"fc.weight": moa.fc.weight, "proj.weight": moa.proj.weight})
    h = F.rms_norm(torch.randn(4, 16, 32), (32,))
    out, expected = moa(h), mlp(h)
    assert out.shape == h.shape
    torch.testing.assert_close(out, expected, rtol=1e-3, atol=1e-4)
    assert (out - expected).abs().max() > 0  # not exact: the other gates are e^-10, not 0


def test_moa_hand_computation_with_given_gates():
    torch.manual_seed(0)
    moa = MoAFeedForward(6, 10, names=["relu", "gelu", "tanh"])
    with torch.no_grad():
        moa.gates.weight.copy_(torch.randn(3, 6))
        moa.gates.bias.copy_(torch.randn(3))
    h = torch.randn(5, 6)
    pi = torch.sigmoid(h @ moa.gates.weight.T + moa.gates.bias)
    z = h @ moa.fc.weight.T
    mixed = pi[:, :1] * F.relu(z) + pi[:, 1:2] * F.gelu(z) + pi[:, 2:] * torch.tanh(z)
    torch.testing.assert_close(moa(h), mixed @ moa.proj.weight.T)


def test_moa_glu_form():
    torch.manual_seed(0)
    moa = MoAFeedForward(6, 10, glu=True)
    h = torch.randn(2, 3, 6)
    pi = moa.gates(h)
    z = moa.fc(h)
    mixed = sum(pi[..., k, None] * DICTIONARY[name](z) for k, name in enumerate(DICTIONARY_NAMES))
    torch.testing.assert_close(moa(h), moa.proj(mixed * moa.up(h)))
    assert sum(p.numel() for p in moa.parameters()) == 3 * 6 * 10 + 7 * 6 + 7
    assert sum(p.numel() for p in MoAFeedForward(6, 10).parameters()) == 2 * 6 * 10 + 7 * 6 + 7
    assert "glu=True, params=229" in repr(moa)
    assert sum(p.numel() for p in MoAFeedForward(6, 10, bias=True).parameters()) == 2 * 6 * 10 + 10 + 6 + 7 * 6 + 7


def test_moa_bf16_autocast():
    moa = MoAFeedForward(8, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = moa(torch.randn(3, 8))
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert moa.gates.weight.grad.dtype == torch.float32


def test_effective_rank():
    assert effective_rank(torch.ones(50, 7) * 0.3).item() == pytest.approx(1.0, abs=1e-4)
    assert effective_rank(torch.eye(4)).item() == pytest.approx(4.0, abs=1e-5)
    diagonal = torch.diag(torch.tensor([3.0, 1.0]))  # p = (3/4, 1/4)
    assert effective_rank(diagonal).item() == pytest.approx(math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))))


def test_gate_statistics_constant_and_random():
    constant = gate_statistics(torch.full((100, 7), 0.25))
    torch.testing.assert_close(constant["mean"], torch.full((7,), 0.25))
    assert (constant["variance"] == 0).all()
    assert constant["effective_rank"].item() == pytest.approx(1.0, abs=1e-4)
    random = gate_statistics(torch.rand(100, 7, generator=torch.Generator().manual_seed(0)))
    assert (random["variance"] > 0.05).all()
    assert random["effective_rank"].item() > 2


def test_gate_statistics_accumulate_over_batches_and_change_in_training():
    torch.manual_seed(0)
    moa = MoAFeedForward(8, 32)
    x = torch.randn(256, 8)
    before = gate_statistics(moa.gates(x))
    assert before["variance"].max() < 1e-12 and before["effective_rank"].item() == pytest.approx(1.0, abs=1e-3)
    target = torch.sin(3 * x)  # a toy regression
    optimizer = torch.optim.Adam(moa.parameters(), lr=3e-2)
    for _ in range(30):
        optimizer.zero_grad()
        F.mse_loss(moa(x), target).backward()
        optimizer.step()
    gates = moa.gates(x)
    after = gate_statistics(gates)
    assert after["variance"].max() > 1e-6
    assert not torch.allclose(after["mean"], before["mean"], atol=1e-4)
    assert not after["mean"].requires_grad
    pieces = GateStatistics().update(gates[:100]).update(gates[100:]).result()  # as the monitor sees batches
    for name in ("mean", "variance", "effective_rank"):
        torch.testing.assert_close(pieces[name], after[name], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("shape", [(), (4,), (5, 1)])  # shared, per-channel, per-token (MoA) weights
def test_eager_backward_matches_autograd(shape):
    x = torch.randn(5, 4, dtype=torch.double, requires_grad=True)
    weights = torch.randn(len(DICTIONARY_NAMES), *shape, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: mix(x, DICTIONARY_NAMES, w), (x, weights))


@pytest.mark.slow
def test_compiled_forward_and_backward_match_eager():
    """Under torch.compile, mix switches to the shared-subexpression forms and autograd: same values and grads."""
    torch.manual_seed(0)
    moa = MoAFeedForward(8, 32)
    with torch.no_grad():
        moa.gates.weight.normal_()
        moa.gates.bias.zero_()
    layers = [moa, nn.Sequential(nn.Linear(8, 32), LearnableMixture(channels=32))]
    with torch.no_grad():
        layers[1][1].coefficients.normal_()
    x = torch.randn(16, 8)
    for layer in layers:
        results = []
        for forward in (layer, torch.compile(layer, fullgraph=True, dynamic=False)):
            out = forward(x)
            results.append((out, *torch.autograd.grad(out.square().sum(), list(layer.parameters()))))
        torch.testing.assert_close(results[1], results[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("af_type", ["la;att-la", "la_per_channel;att-linear"])
def test_la_in_afgpt_starts_as_gelu_trains_and_round_trips_through_a_bank(tmp_path, af_type):
    import afgpt
    from afgpt.bank import ActivationBank, read_activations

    from conftest import tiny_config

    torch.manual_seed(0)
    model = afgpt.AfGPTForCausalLM(tiny_config(af_type=af_type))
    la = model.model.activations.mlp[0]
    x = torch.linspace(-4, 4, 64)
    x = x if la.channels is None else x[:, None].expand(64, la.channels)
    torch.testing.assert_close(la(x), torch.nn.functional.gelu(x), rtol=1e-6, atol=1e-6)
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        model.model.layers[0].mlp.proj.weight.normal_(0, 0.02)  # AfGPT starts proj at zero: no gradient reaches the mixture
    model(input_ids=ids, labels=ids).loss.backward()
    assert la.coefficients.grad is not None and la.coefficients.grad.abs().sum() > 0
    with torch.no_grad():
        la.coefficients.add_(0.1)
    ActivationBank.from_model(model).save(tmp_path / "bank")
    fresh = afgpt.AfGPTForCausalLM(tiny_config(af_type=af_type))
    fresh.load_activations(read_activations(tmp_path / "bank"), freeze=True)
    assert torch.equal(fresh.model.activations.mlp[0].coefficients, la.coefficients.detach())


@pytest.mark.parametrize("ffn_type", ["moa", "moa_glu"])
def test_moa_feed_forward_in_afgpt_starts_as_gelu_and_reloads(tmp_path, ffn_type):
    import afgpt
    from afgpt.mixtures import MoAFeedForward

    from conftest import tiny_config

    torch.manual_seed(0)
    model = afgpt.AfGPTForCausalLM(tiny_config(af_type="gelu;att-linear", ffn_type=ffn_type))
    ffn = model.model.layers[1].mlp
    assert isinstance(ffn, MoAFeedForward) and ffn.glu == (ffn_type == "moa_glu")
    assert torch.equal(ffn.gates.weight, torch.zeros_like(ffn.gates.weight))  # the host's Linear init left them alone
    assert ffn.gates.bias[list(ffn.names).index("gelu")] == 10 and ffn.gates.bias.min() == -10
    assert torch.equal(ffn.proj.weight, torch.zeros_like(ffn.proj.weight))  # zero_init, as the MLP's proj
    ids = torch.randint(0, 97, (2, 9))
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.save_pretrained(tmp_path / "moa")
    loaded = afgpt.AfGPTForCausalLM.from_pretrained(tmp_path / "moa")
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_moa_refuses_an_mlp_activation_it_would_not_use():
    import afgpt

    with pytest.raises(ValueError, match="ffn_type='moa' mixes its own dictionary .* use af_type 'gelu;att-linear'"):
        afgpt.AfGPTConfig(af_type="spline;att-linear", ffn_type="moa")


def test_moa_through_the_gpt_neo_patcher():
    import afgpt
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    from afgpt.mixtures import MoAFeedForward

    torch.manual_seed(0)
    model = GPTNeoForCausalLM(GPTNeoConfig(vocab_size=50, hidden_size=16, num_layers=2, num_heads=2,
                                           attention_types=[[["global"], 2]], max_position_embeddings=32))
    afgpt.patch_model(model, "gelu;att-none", ffn_type="moa")
    assert any(isinstance(m, MoAFeedForward) for m in model.modules())
    ids = torch.randint(0, 50, (2, 7))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)


def test_a_moa_run_logs_and_plots_its_gate_statistics_and_they_change(tmp_path, shared_data, one_thread):
    import json

    from afgpt.training import train

    from conftest import tiny_run

    cfg = tiny_run(tmp_path, shared_data, af_type="gelu;att-linear", ffn_type="moa", learning_rate=3e-2)
    train(cfg)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    gates = [r for r in records if r["kind"] == "moa_gates"]
    modules = sorted({r["module"] for r in gates})
    assert modules == [f"model.layers.{i}.mlp" for i in range(cfg.num_hidden_layers)]
    steps = sorted({r["step"] for r in gates})
    assert steps == sorted({r["step"] for r in records if r["kind"] == "val"}) and len(steps) >= 2
    first, last = ([r for r in gates if r["step"] == s and r["module"] == modules[0]][0] for s in (steps[0], steps[-1]))
    assert first["names"] == list(DICTIONARY_NAMES) and 1 <= last["effective_rank"] <= len(DICTIONARY_NAMES)
    assert max(abs(a - b) for a, b in zip(first["mean"], last["mean"])) > 1e-4  # the gates learn
    assert (tmp_path / "run" / "plots" / "moa_gates.png").read_bytes()[:4] == b"\x89PNG"
