"""The feed-forward registry, and AfGPT with KAN and GLU feed-forwards."""
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

import afgpt
from afgpt.bank import read_activations
from afgpt.ffn import FFN_TYPES, GLU, MLP, FFNSettings, activation_width, build_ffn, glu_width
from afgpt.kan import KANFeedForward, KANLinear
from conftest import perturb, tiny_config


def test_registry_builds_each_type_from_explicit_arguments():
    assert FFN_TYPES == ("mlp", "kan", "glu", "moa", "moa_glu")
    activation = torch.nn.GELU()
    mlp = build_ffn(FFNSettings(hidden_size=8, intermediate_size=32), activation)
    assert isinstance(mlp, MLP) and mlp.activation is activation
    x = torch.randn(3, 8)
    with torch.no_grad():
        mlp.proj.weight.normal_()
    torch.testing.assert_close(mlp(x), F.gelu(x @ mlp.fc.weight.T) @ mlp.proj.weight.T)
    kan = build_ffn(FFNSettings(ffn_type="kan", hidden_size=8, intermediate_size=32, kan_grid_size=7,
                                kan_spline_order=2, kan_grid_range=(-3, 3)), activation)
    assert isinstance(kan, KANFeedForward) and kan.fc.base_activation is activation is kan.proj.base_activation
    assert (kan.fc.grid_size, kan.fc.spline_order, kan.fc.grid_range) == (7, 2, (-3.0, 3.0))


@pytest.mark.parametrize("width", ["params", "mlp"])
def test_kan_width_matches_the_mlp_in_parameters_or_in_width(width):
    settings = FFNSettings(ffn_type="kan", hidden_size=64, intermediate_size=256, kan_width=width)
    kan = build_ffn(settings, torch.nn.SiLU())
    mlp_params = 2 * 64 * 256
    kan_params = sum(p.numel() for p in kan.parameters())
    if width == "mlp":
        assert kan.fc.out_features == 256
    else:  # one hidden unit of the KAN holds 2 * 64 * (G + k + 2) parameters
        assert abs(kan_params - mlp_params) <= 64 * (5 + 3 + 2)
    assert f"parameters={kan_params:,}" in repr(kan)


@pytest.mark.parametrize("fields, message", [
    (dict(ffn_type="moe"), "ffn_type='moe' is invalid: allowed values are mlp, kan"),
    (dict(kan_width="huge"), "kan_width='huge' is invalid"),
    (dict(kan_grid_size=0), "kan_grid_size=0 is invalid"),
    (dict(kan_spline_order=0), "kan_spline_order=0 is invalid"),
    (dict(kan_grid_range=(1, -1)), "kan_grid_range=.* is invalid"),
    (dict(ffn_type="kan", af_type="prelu;att-none"), "cannot be per-channel"),
    (dict(ffn_type="kan", af_type="splinePerDim;att-none"), "cannot be per-channel"),
    (dict(ffn_type="kan", af_type="apl;att-none"), "cannot be per-channel"),
])
def test_bad_ffn_settings_name_the_field_and_the_fix(fields, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**fields)


def test_afgpt_with_kan_uses_the_mlp_activation_as_base_and_trains():
    model = afgpt.AfGPTForCausalLM(tiny_config(af_type="spline;att-none", ffn_type="kan", af_layer_specific=0))
    ffn = model.model.layers[1].mlp
    assert isinstance(ffn, KANFeedForward)
    x = torch.randint(0, 97, (2, 9))
    before = model(x).logits
    with torch.no_grad():
        model.model.activations.mlp[0].values.fill_(1.0)  # the base function of every KAN layer
    assert not torch.allclose(model(x).logits, before)
    loss = model(x, labels=x).loss
    loss.backward()
    assert model.model.activations.mlp[0].values.grad is not None and ffn.fc.spline_weight.grad is not None


def test_afgpt_kan_round_trips_and_initialises_on_the_meta_device(tmp_path):
    config = tiny_config(af_type="silu;att-linear", ffn_type="kan", kan_grid_size=4, kan_grid_range=(-2, 2))
    model = perturb(afgpt.AfGPTForCausalLM(config))
    with torch.no_grad():
        model.model.layers[0].mlp.fc.update_grid(torch.randn(64, 32))  # a refitted, non-uniform grid is saved too
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    x = torch.randint(0, 97, (2, 7))
    torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)
    assert torch.equal(loaded.model.layers[0].mlp.fc.grid, model.model.layers[0].mlp.fc.grid)
    fresh = AutoModelForCausalLM.from_config(config)  # built on the meta device, initialised by _init_weights
    for module in fresh.modules():
        if isinstance(module, KANLinear):
            assert all(torch.isfinite(t).all() for t in (*module.parameters(recurse=False), module.grid))
            knots = torch.arange(-3, 4 + 3 + 1) * 1.0 - 2.0  # uniform on (-2, 2), 4 intervals, 3 more each side
            torch.testing.assert_close(module.grid, knots.expand_as(module.grid))
            assert module.base_weight.abs().sum() > 0


def test_kan_grid_coverage_counts_inputs_outside_every_layer():
    from afgpt.training.monitors import KANGridCoverage

    model = afgpt.AfGPTForCausalLM(tiny_config(af_type="silu;att-none", ffn_type="kan", num_hidden_layers=2))
    seen = {}
    for name, module in model.named_modules():
        if isinstance(module, KANLinear):
            module.register_forward_pre_hook(lambda m, args, name=name: seen.setdefault(name, []).append(args[0]))
    coverage = KANGridCoverage(model)
    with torch.no_grad():
        model(torch.randint(0, 97, (2, 6)))
        model(torch.randint(0, 97, (3, 4)))
    coverage.close()
    records = {r["module"]: r["outside_fraction"] for r in coverage.records(step=3)}
    assert set(records) == set(seen) == {f"model.layers.{i}.mlp.{p}" for i in range(2) for p in ("fc", "proj")}
    for name, inputs in seen.items():
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in inputs])
        assert records[name] == pytest.approx(((x < -1) | (x > 1)).float().mean().item())  # grid (-1, 1)


def test_afgpt_with_kan_trains_through_the_loop_and_reports_grid_coverage(tmp_path):
    import json

    from afgpt.training import train
    from conftest import tiny_run

    final = train(tiny_run(tmp_path, af_type="spline;att-none", ffn_type="kan", kan_grid_range=(-2.0, 2.0),
                           max_steps=10, eval_steps=10, save_steps=10, cooldown_steps=3))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    grid = [r for r in records if r["kind"] == "kan_grid"]
    assert {r["module"] for r in grid} == {f"model.layers.{i}.mlp.{p}" for i in range(2) for p in ("fc", "proj")}
    assert all(0 <= r["outside_fraction"] < 1 for r in grid)
    log = (tmp_path / "run" / "train.log").read_text()
    assert "KAN inputs outside the grid" in log and "KAN feed-forwards:" in log
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "run")
    assert isinstance(loaded.model.layers[0].mlp, KANFeedForward) and loaded.config.kan_grid_range == [-2.0, 2.0]
    assert final["val_loss"] < 6.0


def test_glu_computes_the_gated_product_by_hand():
    activation = torch.nn.SiLU()
    glu = build_ffn(FFNSettings(ffn_type="glu", hidden_size=8, intermediate_size=12), activation)
    assert isinstance(glu, GLU) and glu.activation is activation and glu.gate.out_features == 8
    assert all(m.bias is None for m in (glu.gate, glu.up, glu.proj)) and glu.proj.zero_init
    with torch.no_grad():
        glu.proj.weight.normal_()
    x = torch.randn(3, 5, 8)
    expected = (F.silu(x @ glu.gate.weight.T) * (x @ glu.up.weight.T)) @ glu.proj.weight.T
    torch.testing.assert_close(glu(x), expected)
    assert "hidden=8, width=8, parameters=192" in repr(glu)


# hidden, intermediate, GLU width: 2/3 of intermediate, a multiple of 8 where that stays within 1%
GLU_WIDTHS = [(32, 128, 85), (64, 256, 171), (128, 512, 344), (256, 1024, 680), (768, 3072, 2048),
              (1024, 4096, 2728)]


@pytest.mark.parametrize("hidden, intermediate, width", GLU_WIDTHS)
def test_glu_matches_the_mlp_parameter_count_within_one_percent(hidden, intermediate, width):
    settings = FFNSettings(ffn_type="glu", hidden_size=hidden, intermediate_size=intermediate)
    assert settings.glu_width == activation_width("glu", intermediate) == width
    assert activation_width("mlp", intermediate) == activation_width("kan", intermediate) == intermediate
    with torch.device("meta"):
        glu = build_ffn(settings, torch.nn.GELU())
        mlp = build_ffn(FFNSettings(hidden_size=hidden, intermediate_size=intermediate), torch.nn.GELU())
    glu_params, mlp_params = (sum(p.numel() for p in m.parameters()) for m in (glu, mlp))
    assert abs(glu_params - mlp_params) <= 0.01 * mlp_params


def test_glu_width_is_within_one_percent_from_75_channels_up():
    for intermediate in range(75, 5000):
        assert abs(3 * glu_width(intermediate) - 2 * intermediate) <= 0.01 * 2 * intermediate, intermediate


@pytest.mark.parametrize("af_type", ["gelu;att-linear", "spline;att-spline", "prelu;att-none", "apl;att-apl",
                                     "xielu;att-gelu_learn"])
def test_afgpt_with_glu_trains_and_round_trips(af_type, tmp_path):
    config = tiny_config(af_type=af_type, ffn_type="glu", num_hidden_layers=2)
    model = afgpt.AfGPTForCausalLM(config)
    ffn = model.model.layers[0].mlp
    assert isinstance(ffn, GLU) and ffn.gate.out_features == glu_width(4 * 32)
    assert torch.all(ffn.proj.weight == 0) and ffn.gate.weight.std() > 0  # initialised like the MLP
    x = torch.randint(0, 97, (2, 9))
    perturb(model)
    loss = model(x, labels=x).loss
    loss.backward()
    assert torch.isfinite(loss)
    missing = [name for name, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.ffn_type == "glu"
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["prelu", "apl", "splinePerDim"])
def test_per_channel_activations_get_the_glu_width(name, tmp_path):
    model = afgpt.AfGPTForCausalLM(tiny_config(af_type=f"{name};att-none", ffn_type="glu", num_hidden_layers=2))
    width = glu_width(4 * 32)
    assert all(module.channels == width for module in model.model.activations.mlp)
    bank = afgpt.ActivationBank.from_model(perturb(model))
    bank.save(tmp_path / "bank")
    read = read_activations(tmp_path / "bank")
    assert read.settings.ffn_type == "glu" and read.settings.mlp_width == width
    fresh = afgpt.AfGPTForCausalLM(tiny_config(af_type=f"{name};att-none", ffn_type="glu", num_hidden_layers=2))
    read.load_into(fresh)
    x = torch.randint(0, 97, (2, 5))
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh(x).logits, model(x).logits, rtol=0, atol=0)
    mlp_model = afgpt.AfGPTForCausalLM(tiny_config(af_type=f"{name};att-none", num_hidden_layers=2))
    assert (f"has {width} channels in the bank but {4 * 32} in the model; build the model with ffn_type='glu' and "
            f"intermediate_size={4 * 32} (the bank's)") in "\n".join(read.mismatches(mlp_model))


@pytest.mark.parametrize("family", ["gpt_neo", "roberta"])
@pytest.mark.parametrize("af_type", ["gelu;att-none", "prelu;att-spline"])
def test_patched_models_take_a_glu_feed_forward(family, af_type, tmp_path):
    from transformers import GPTNeoConfig, GPTNeoForCausalLM, RobertaConfig, RobertaForMaskedLM

    torch.manual_seed(0)
    if family == "gpt_neo":
        model = GPTNeoForCausalLM(GPTNeoConfig(vocab_size=97, hidden_size=32, num_layers=2, num_heads=2,
                                               attention_types=[[["global", "local"], 1]], max_position_embeddings=64,
                                               intermediate_size=128))
    else:
        model = RobertaForMaskedLM(RobertaConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2,
                                                 num_attention_heads=2, intermediate_size=128,
                                                 max_position_embeddings=70, pad_token_id=1))
    afgpt.patch_model(model, af_type, ffn_type="glu")
    glus = [m for m in model.modules() if isinstance(m, GLU)]
    assert len(glus) == 2 and all(glu.gate.out_features == glu_width(128) == 85 for glu in glus)
    assert all(sum(p.numel() for p in glu.parameters()) == 3 * 32 * 85 for glu in glus)  # MLP weights: 2 * 32 * 128
    assert getattr(model.base_model.activations.mlp[0], "channels", 85) == 85
    x = torch.randint(3, 97, (2, 9))
    model.train()
    loss = model(x, labels=x).loss
    loss.backward()
    assert torch.isfinite(loss) and all(glu.gate.weight.grad is not None for glu in glus)
    model.eval()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path) if family == "roberta" else \
        AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.ffn_type == "glu" and sum(isinstance(m, GLU) for m in loaded.eval().modules()) == 2
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)
