"""afgpt.patch_model: learned activations in GPT-Neo and RoBERTa, saved and loaded with the Auto classes."""
import copy
import json
import logging
import subprocess
import sys

import pytest
import torch
from torch import nn
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoConfig,
    GPTNeoForCausalLM,
    GPTNeoForSequenceClassification,
    GPTNeoModel,
    RobertaConfig,
    RobertaForMaskedLM,
    RobertaForSequenceClassification,
    RobertaModel,
)

import afgpt
import afgpt.training.optimizers
from afgpt.activation_set import AttentionSlot, SlotActivation, find_activation_set
from afgpt.activations import PReLU, Spline
from afgpt.patching import (
    AfGPTNeoConfig,
    AfRobertaConfig,
    HostFeedForward,
    activation_module_names,
    patch_model,
)

VOCAB = 97
PATCH_FIELDS = ("af_type", "af_layer_specific", "af_range", "af_n_anchors", "af_init", "ffn_type", "kan_grid_size",
                "kan_spline_order", "kan_grid_range", "kan_width")


def neo_config(**kwargs) -> GPTNeoConfig:
    layers = kwargs.pop("num_layers", 2)
    fields = dict(vocab_size=VOCAB, hidden_size=32, num_layers=layers, num_heads=2,
                  attention_types=[[["global", "local"], layers // 2]] if layers % 2 == 0 else [[["global"], layers]],
                  max_position_embeddings=64, intermediate_size=64, bos_token_id=0, eos_token_id=0, pad_token_id=1)
    return GPTNeoConfig(**{**fields, **kwargs})


def roberta_config(**kwargs) -> RobertaConfig:
    fields = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                  max_position_embeddings=70, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                  bos_token_id=0, eos_token_id=2, pad_token_id=1)
    return RobertaConfig(**{**fields, **kwargs})


NEO_CLASSES = (GPTNeoModel, GPTNeoForCausalLM, GPTNeoForSequenceClassification)
ROBERTA_CLASSES = (RobertaModel, RobertaForMaskedLM, RobertaForSequenceClassification)
AUTO = {GPTNeoModel: AutoModel, GPTNeoForCausalLM: AutoModelForCausalLM,
        GPTNeoForSequenceClassification: AutoModelForSequenceClassification, RobertaModel: AutoModel,
        RobertaForMaskedLM: AutoModelForMaskedLM, RobertaForSequenceClassification: AutoModelForSequenceClassification}


def build(cls, seed: int = 0, **config_kwargs):
    torch.manual_seed(seed)
    config = neo_config(**config_kwargs) if cls in NEO_CLASSES else roberta_config(**config_kwargs)
    return cls(config).eval()


def token_ids(seed: int = 1, batch: int = 2, length: int = 9) -> torch.Tensor:
    """Ids that are neither padding nor special, so every family reads them the same way."""
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def output(model, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def prefix(model) -> str:
    return model.base_model_prefix if model.base_model is not model else ""


def layers(model):
    base = model.base_model
    return base.h if hasattr(base, "h") else base.encoder.layer


def attention(layer):
    return layer.attn.attention if hasattr(layer, "attn") else layer.attention.self


@torch.no_grad()
def perturb(model, seed: int = 3) -> None:
    """Move every activation parameter and attention slot away from its initial value."""
    generator = torch.Generator().manual_seed(seed)
    for module in [find_activation_set(model), *(m for m in model.modules() if isinstance(m, AttentionSlot))]:
        for p in module.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=generator))


SPECS = ("prelu;att-none", "spline;att-spline", "splinePerDim;att-linear", "gelu;att-none")


# ---------------------------------------------------------------------------- patching every class


@pytest.mark.parametrize("cls", NEO_CLASSES + ROBERTA_CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("spec", SPECS)
def test_every_supported_class_and_spec_patches(cls, spec):
    model = build(cls)
    old_config = model.config
    assert patch_model(model, spec) is model
    assert type(model).__name__ == f"Af{cls.__name__}" and isinstance(model, cls)
    config = model.config
    assert isinstance(config, AfGPTNeoConfig if cls in NEO_CLASSES else AfRobertaConfig)
    assert config.model_type == ("afgpt_gpt_neo" if cls in NEO_CLASSES else "afgpt_roberta")
    assert config.af_type == spec and config.af_layer_specific == 1 and config.ffn_type == "mlp"
    assert config.hidden_size == old_config.hidden_size and config.vocab_size == old_config.vocab_size
    assert all(getattr(m, "config", config) is config for m in model.modules())  # nobody holds the old config
    if model.base_model is not model:
        base_class = GPTNeoModel if cls in NEO_CLASSES else RobertaModel  # the base model is patched too
        assert type(model.base_model).__name__ == f"Af{base_class.__name__}"
        assert isinstance(model.base_model, base_class)

    activations = find_activation_set(model)
    assert activations is model.base_model.activations
    assert len(activations.mlp) == 2
    for i, layer in enumerate(layers(model)):
        mlp_act = layer.mlp.act if cls in NEO_CLASSES else layer.intermediate.intermediate_act_fn
        assert isinstance(mlp_act, SlotActivation) and (mlp_act.row, mlp_act.layer) == ("mlp", i)
        assert mlp_act.activation_set is activations
        slot = getattr(attention(layer), "pre_activation", None)
        assert (slot is None) == spec.endswith("att-none")
        if slot is not None:
            assert isinstance(slot, AttentionSlot) and slot.activation.activation_set is activations

    names = set(model.state_dict())
    p = f"{prefix(model)}." if prefix(model) else ""
    learnable_mlp = spec.split(";")[0] in ("prelu", "spline", "splinePerDim")
    assert (f"{p}activations.mlp.0.{'slope' if spec.startswith('prelu') else 'values'}" in names) == learnable_mlp
    assert (f"{p}activations.att.0.values" in names) == (spec == "spline;att-spline")

    perturb(model)
    out = output(model, token_ids())
    assert torch.isfinite(out).all()
    out.float().square().mean().backward()
    for param in activations.parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0


@pytest.mark.parametrize("cls", (GPTNeoForCausalLM, RobertaForMaskedLM), ids=lambda c: c.__name__)
def test_the_mlp_activation_is_the_sets(cls):
    model = patch_model(build(cls), "spline;att-none")
    ids = token_ids()
    before = output(model, ids)
    with torch.no_grad():
        model.base_model.activations.mlp[1].values.add_(torch.linspace(-1, 1, 64))
    assert not torch.allclose(output(model, ids), before, atol=1e-4)  # layer 1's spline changes the output


@pytest.mark.parametrize("cls", (GPTNeoForCausalLM, RobertaForMaskedLM), ids=lambda c: c.__name__)
def test_linear_makes_the_mlp_linear_and_prelu_is_applied_per_channel(cls):
    x = torch.randn(2, 5, 32)
    vanilla = build(cls)
    model = patch_model(build(cls), "linear;att-none")
    layer, vanilla_layer = layers(model)[0], layers(vanilla)[0]
    if cls is GPTNeoForCausalLM:
        mlp, fc, proj = layer.mlp, layer.mlp.c_fc, layer.mlp.c_proj
        torch.testing.assert_close(mlp(x), proj(fc(x)), rtol=0, atol=0)
        assert not torch.allclose(vanilla_layer.mlp(x), mlp(x), atol=1e-4)  # gelu_new before patching
    else:
        fc = layer.intermediate.dense
        torch.testing.assert_close(layer.intermediate(x), fc(x), rtol=0, atol=0)
        assert not torch.allclose(vanilla_layer.intermediate(x), fc(x), atol=1e-4)

    model = patch_model(build(cls), "prelu;att-none")
    slope = torch.linspace(-0.5, 0.5, 64)
    with torch.no_grad():
        model.base_model.activations.mlp[0].slope.copy_(slope)
    layer = layers(model)[0]
    if cls is GPTNeoForCausalLM:
        h = layer.mlp.c_fc(x)
        torch.testing.assert_close(layer.mlp(x), layer.mlp.c_proj(torch.where(h >= 0, h, slope * h)))
    else:
        h = layer.intermediate.dense(x)
        torch.testing.assert_close(layer.intermediate(x), torch.where(h >= 0, h, slope * h))


def capture(module, store: dict, key: str, what: str = "input"):
    def hook(mod, args, kwargs, result=None):
        store[key] = (args[0] if args else kwargs["hidden_states"]) if what == "input" else result
    if what == "input":
        return module.register_forward_pre_hook(lambda m, a, k: hook(m, a, k), with_kwargs=True)
    return module.register_forward_hook(lambda m, a, k, r: hook(m, a, k, r), with_kwargs=True)


def expected_slot(slot: AttentionSlot, spline: Spline, x: torch.Tensor) -> torch.Tensor:
    return x + spline(slot.weight * x + slot.bias)


def test_attention_slot_feeds_qkv_and_spares_the_residual_gpt_neo():
    model = patch_model(build(GPTNeoForCausalLM), "gelu;att-spline")
    perturb(model)
    block = layers(model)[0]
    attn = block.attn.attention
    with torch.no_grad():
        attn.pre_activation.weight.fill_(1.5)
        attn.pre_activation.bias.fill_(0.2)
    seen = {}
    handles = [capture(block, seen, "block_in"), capture(block.ln_1, seen, "normed", "output"),
               capture(attn.q_proj, seen, "q_in"), capture(attn.k_proj, seen, "k_in"),
               capture(attn.v_proj, seen, "v_in"),
               capture(block.attn, seen, "attn_out", "output"), capture(block.ln_2, seen, "ln2_in")]
    model(input_ids=token_ids())
    for handle in handles:
        handle.remove()
    expected = expected_slot(attn.pre_activation, model.transformer.activations.att[0], seen["normed"])
    assert not torch.allclose(expected, seen["normed"], atol=1e-3)
    for key in ("q_in", "k_in", "v_in"):
        torch.testing.assert_close(seen[key], expected)
    # the residual is the block's un-activated input
    torch.testing.assert_close(seen["ln2_in"], seen["block_in"] + seen["attn_out"][0])

    x = torch.randn(1, 4, 32)  # keyword hidden_states take the slot too
    seen.clear()
    handle = capture(attn.q_proj, seen, "q_in")
    attn(hidden_states=x)
    handle.remove()
    spline = model.transformer.activations.att[0]
    torch.testing.assert_close(seen["q_in"], expected_slot(attn.pre_activation, spline, x))


def test_attention_slot_feeds_qkv_and_spares_the_residual_roberta():
    model = patch_model(build(RobertaForMaskedLM), "gelu;att-spline", layer_specific=0)
    perturb(model)
    layer = layers(model)[1]
    self_attention = layer.attention.self
    with torch.no_grad():
        self_attention.pre_activation.weight.fill_(0.7)
        self_attention.pre_activation.bias.fill_(-0.3)
    seen = {}
    handles = [capture(layer, seen, "layer_in"), capture(self_attention.query, seen, "q_in"),
               capture(self_attention.key, seen, "k_in"), capture(self_attention.value, seen, "v_in")]
    handles.append(layer.attention.output.register_forward_pre_hook(
        lambda m, args: seen.__setitem__("residual", args[1])))
    model(input_ids=token_ids())
    for handle in handles:
        handle.remove()
    expected = expected_slot(self_attention.pre_activation, model.roberta.activations.att[0], seen["layer_in"])
    assert not torch.allclose(expected, seen["layer_in"], atol=1e-3)
    for key in ("q_in", "k_in", "v_in"):
        torch.testing.assert_close(seen[key], expected)
    torch.testing.assert_close(seen["residual"], seen["layer_in"], rtol=0, atol=0)


@pytest.mark.parametrize("sharing, slots", [(0, 1), (1, 4), (2, 3)])
def test_layer_sharing(sharing, slots):
    model = patch_model(build(GPTNeoForCausalLM, num_layers=4), "spline;att-spline", layer_specific=sharing)
    activations = model.transformer.activations
    assert len(activations.mlp) == len(activations.att) == slots
    per_layer = [layer.mlp.act for layer in layers(model)]
    used = [activations.module("mlp", i) for i in range(4)]
    assert all(m is activations.mlp[activations.settings.slot(i)] for i, m in enumerate(used))
    value_names = [name for name, _ in model.named_parameters() if name.endswith(".values")]
    assert len(value_names) == 2 * slots  # each shared spline is one tensor, stored once
    assert len([k for k in model.state_dict() if k.endswith(".values")]) == 2 * slots
    if sharing == 0:  # every layer's activation is the one tensor, which all layers' gradients reach
        assert all(act.activation_set.module("mlp", act.layer) is activations.mlp[0] for act in per_layer)
        output(model, token_ids()).square().mean().backward()
        assert activations.mlp[0].values.grad.abs().sum() > 0
    if sharing == 2:
        assert activations.module("mlp", 1) is activations.module("mlp", 2)
        assert activations.module("mlp", 0) is not activations.module("mlp", 1)
        assert activations.module("mlp", 3) is not activations.module("mlp", 2)


# ---------------------------------------------------------------------------- saving and loading

LOAD_IN_FRESH_PROCESS = """
import json, sys, torch
import afgpt  # the only afgpt import: it must be what makes the Auto classes know the patched types
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSequenceClassification
jobs = json.loads(sys.argv[1])
for job in jobs:
    auto = {"AutoModel": AutoModel, "AutoModelForCausalLM": AutoModelForCausalLM,
            "AutoModelForMaskedLM": AutoModelForMaskedLM,
            "AutoModelForSequenceClassification": AutoModelForSequenceClassification}[job["auto"]]
    model = auto.from_pretrained(job["folder"]).eval()
    out = model(input_ids=torch.tensor(job["ids"]))
    out = out.logits if hasattr(out, "logits") else out.last_hidden_state
    torch.save({"class": type(model).__name__, "config": {k: getattr(model.config, k) for k in job["fields"]},
                "base": type(model.base_model).__name__, "output": out}, job["result"])
"""


def test_save_pretrained_and_auto_from_pretrained_in_a_fresh_process(tmp_path):
    cases = [(GPTNeoForCausalLM, "spline;att-spline", 1), (GPTNeoModel, "prelu;att-none", 0),
             (GPTNeoForSequenceClassification, "splinePerDim;att-linear", 2),
             (RobertaForMaskedLM, "spline;att-spline", 0), (RobertaModel, "splinePerDim;att-linear", 1),
             (RobertaForSequenceClassification, "prelu;att-spline", 1)]
    ids = token_ids()
    jobs, expected = [], {}
    for n, (cls, spec, sharing) in enumerate(cases):
        model = patch_model(build(cls, seed=n), spec, layer_specific=sharing, af_n_anchors=16, af_range=6.0)
        perturb(model, seed=n)
        folder = tmp_path / f"model{n}"
        model.save_pretrained(folder)
        saved = json.loads((folder / "config.json").read_text())
        assert saved["model_type"] == model.config.model_type and saved["af_type"] == spec
        with torch.no_grad():
            expected[n] = (model, output(model, ids))
        jobs.append(dict(folder=str(folder), auto=AUTO[cls].__name__, ids=ids.tolist(), fields=list(PATCH_FIELDS),
                         result=str(tmp_path / f"result{n}.pt")))
    subprocess.run([sys.executable, "-c", LOAD_IN_FRESH_PROCESS, json.dumps(jobs)], check=True)
    for n, (cls, spec, sharing) in enumerate(cases):
        model, out = expected[n]
        result = torch.load(tmp_path / f"result{n}.pt")
        assert result["class"] == type(model).__name__ == f"Af{cls.__name__}"
        assert result["base"] == type(model.base_model).__name__
        assert result["config"]["af_type"] == spec and result["config"]["af_layer_specific"] == sharing
        assert result["config"]["af_n_anchors"] == 16 and result["config"]["af_range"] == 6.0
        assert tuple(result["config"]["kan_grid_range"]) == (-1.0, 1.0)
        assert {k: v for k, v in result["config"].items() if k != "kan_grid_range"} == \
            {k: getattr(model.config, k) for k in PATCH_FIELDS if k != "kan_grid_range"}
        torch.testing.assert_close(result["output"], out, rtol=0, atol=0)


def test_vanilla_checkpoint_load_patch_save_load(tmp_path):
    build(GPTNeoForCausalLM, seed=5).save_pretrained(tmp_path / "vanilla")
    model = GPTNeoForCausalLM.from_pretrained(tmp_path / "vanilla").eval()
    patch_model(model, "splinePerDim;att-spline", layer_specific=0)
    perturb(model)
    ids = token_ids()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "patched")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "patched").eval()
    assert type(loaded) is afgpt.AfGPTNeoForCausalLM and loaded.config.af_layer_specific == 0
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=0, atol=0)
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def assert_initial(model, af_init: float = 0.01) -> None:
    """Every activation tensor and attention slot is finite and at its documented initial value."""
    activations = find_activation_set(model)
    checked = 0
    for row in activations.rows().values():
        for module in row:
            if isinstance(module, Spline):
                assert torch.equal(module.values, torch.full_like(module.values, af_init))
                checked += 1
            elif isinstance(module, PReLU):
                assert torch.equal(module.slope, torch.full_like(module.slope, 0.25))
                checked += 1
    for module in model.modules():
        if isinstance(module, AttentionSlot):
            assert module.weight.item() == 1.0 and module.bias.item() == 0.0
            checked += 1
    assert checked > 0
    for name, tensor in model.state_dict().items():
        assert torch.isfinite(tensor.float()).all(), name


def test_from_config_initialises_every_new_tensor():
    config = AfGPTNeoConfig(**{**neo_config().to_dict(), "af_type": "spline;att-spline", "af_init": 0.05})
    assert config.model_type == "afgpt_gpt_neo"
    assert_initial(AutoModelForCausalLM.from_config(config), af_init=0.05)
    config = AfRobertaConfig(**{**roberta_config().to_dict(), "af_type": "prelu;att-spline"})
    model = AutoModelForMaskedLM.from_config(config)
    assert type(model).__name__ == "AfRobertaForMaskedLM"
    assert_initial(model)


@pytest.mark.parametrize("cls", (afgpt.AfGPTNeoForCausalLM, afgpt.AfRobertaForSequenceClassification),
                         ids=lambda c: c.__name__)
def test_from_pretrained_meta_path_initialises_tensors_missing_from_the_checkpoint(tmp_path, cls):
    """A vanilla checkpoint loaded into a patched class: the new tensors are missing keys, created on the meta device
    and must be initialised by the patched _init_weights (torch.empty would leave garbage)."""
    vanilla = GPTNeoForCausalLM if cls is afgpt.AfGPTNeoForCausalLM else RobertaForSequenceClassification
    build(vanilla).save_pretrained(tmp_path)
    model = cls.from_pretrained(tmp_path, af_type="spline;att-spline", af_init=0.02)
    assert model.config.af_type == "spline;att-spline"
    assert_initial(model, af_init=0.02)


# ---------------------------------------------------------------------------- banks


def afgpt_bank(af_type: str, hidden_size: int = 16, sharing: int = 0, layers: int = 3, af_range: float = 8.0,
               af_n_anchors: int = 16):
    config = afgpt.AfGPTConfig(vocab_size=VOCAB, hidden_size=hidden_size, num_hidden_layers=layers,
                               num_attention_heads=2, af_type=af_type, af_layer_specific=sharing, af_range=af_range,
                               af_n_anchors=af_n_anchors, max_position_embeddings=64)
    torch.manual_seed(11)
    source = afgpt.AfGPTForCausalLM(config)
    perturb(source, seed=12)
    return afgpt.ActivationBank.from_model(source)


@pytest.mark.parametrize("freeze", (True, False))
def test_a_shared_afgpt_bank_loads_into_gpt_neo_of_another_width(freeze):
    bank = afgpt_bank("spline;att-spline", hidden_size=16, sharing=0)
    model = patch_model(build(GPTNeoForCausalLM), bank=bank, freeze=freeze)  # width 32, 2 layers
    config = model.config
    assert config.af_type == "spline;att-spline" and (config.af_range, config.af_n_anchors) == (8.0, 16)
    activations = model.transformer.activations
    for row in ("mlp", "att"):
        for module in getattr(activations, row):
            assert torch.equal(module.values, getattr(bank.activations, row)[0].values)
            assert module.values.requires_grad is not freeze
    assert torch.isfinite(output(model, token_ids())).all()
    weights, learnable = afgpt.training.optimizers.split_parameters(model)
    assert (len(learnable) == 0) is freeze and len(weights) > 0


def test_freeze_without_a_bank_freezes_the_fresh_activations():
    model = patch_model(build(RobertaForMaskedLM), "splinePerDim;att-spline", freeze=True)
    assert all(not p.requires_grad for p in model.roberta.activations.parameters())
    assert all(p.requires_grad for n, p in model.named_parameters() if "activations" not in n)


def test_a_per_channel_bank_needs_matching_widths_and_the_model_stays_vanilla():
    bank = afgpt_bank("splinePerDim;att-none", hidden_size=8, sharing=1, layers=2)  # intermediate 32
    model = build(GPTNeoForCausalLM)  # intermediate 64
    with pytest.raises(ValueError, match="32 channels in the bank but 64 in the model") as error:
        patch_model(model, bank=bank)
    assert "intermediate_size=32" in str(error.value)
    assert type(model) is GPTNeoForCausalLM and type(model.config) is GPTNeoConfig  # untouched
    assert not hasattr(model.transformer, "activations")
    patch_model(build(GPTNeoForCausalLM, intermediate_size=32), bank=bank)  # the width it names fits


def test_bank_depth_mismatch_is_explained():
    bank = afgpt_bank("spline;att-none", sharing=1, layers=3)
    with pytest.raises(ValueError, match="layer count: the bank holds activations for 3 layers"):
        patch_model(build(RobertaModel), bank=bank)


# ---------------------------------------------------------------------------- PEFT


def lora_train(peft_model, steps: int = 4) -> None:
    peft_model.train()
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=0.05)
    ids = token_ids(seed=7, batch=4, length=12)
    for _ in range(steps):
        loss = output(peft_model, ids).float().square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    peft_model.eval()


def test_peft_lora_trains_per_slot_activation_copies_and_reloads(tmp_path):
    peft = pytest.importorskip("peft")
    base = patch_model(build(GPTNeoForCausalLM, seed=4), "spline;att-spline")
    perturb(base)
    names = activation_module_names(base)
    assert sorted(names) == sorted(
        ["transformer.h.0.attn.attention.pre_activation", "transformer.h.1.attn.attention.pre_activation",
         "transformer.activations.mlp.0", "transformer.activations.mlp.1", "transformer.activations.att.0",
         "transformer.activations.att.1"])
    original = {n: p.detach().clone() for n, p in base.transformer.activations.named_parameters()}
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_fc", "c_proj"], modules_to_save=names)
    model = peft.get_peft_model(base, config)
    wrapped = model.base_model.model.transformer.activations.mlp[0]
    assert isinstance(wrapped, peft.utils.other.ModulesToSaveWrapper)
    lora_train(model)
    trained_values = wrapped.modules_to_save["default"].values.detach().clone()
    assert not torch.equal(trained_values, original["mlp.0.values"])  # the layers used (and trained) the copy
    assert torch.equal(wrapped.original_module.values, original["mlp.0.values"])
    ids = token_ids()
    with torch.no_grad():
        trained = output(model, ids)
        with model.disable_adapter():
            assert not torch.allclose(output(model, ids), trained, atol=1e-4)
    model.save_pretrained(tmp_path)

    fresh = patch_model(build(GPTNeoForCausalLM, seed=4), "spline;att-spline")
    perturb(fresh)
    reloaded = peft.PeftModel.from_pretrained(fresh, tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(output(reloaded, ids), trained, rtol=0, atol=0)

    # merging puts the trained copies into the set, where banks and plots find them
    merged = model.merge_and_unload().eval()
    with torch.no_grad():
        torch.testing.assert_close(output(merged, ids), trained)
    bank = afgpt.ActivationBank.from_model(merged)
    assert set(bank.state_dict()) == {"mlp.0.values", "mlp.1.values", "att.0.values", "att.1.values"}
    assert torch.equal(bank.state_dict()["mlp.0.values"], trained_values)


def test_peft_lora_with_frozen_bank_activations_reloads(tmp_path):
    peft = pytest.importorskip("peft")
    bank = afgpt_bank("spline;att-spline", sharing=0)

    def fresh():
        return patch_model(build(RobertaForSequenceClassification, seed=6), bank=bank, freeze=True)

    model = peft.get_peft_model(fresh(), peft.LoraConfig(r=4, target_modules=["query", "value"]))
    lora_train(model)
    activations = model.get_base_model().roberta.activations
    assert torch.equal(activations.mlp[0].values, bank.activations.mlp[0].values)  # frozen stayed put
    ids = token_ids()
    with torch.no_grad():
        trained = output(model, ids)
    model.save_pretrained(tmp_path)
    reloaded = peft.PeftModel.from_pretrained(fresh(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(output(reloaded, ids), trained, rtol=0, atol=0)


def test_peft_wrapping_the_whole_set_is_refused_clearly():
    peft = pytest.importorskip("peft")
    base = patch_model(build(GPTNeoForCausalLM), "spline;att-none")
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["c_fc"], modules_to_save=["activations"]))
    with pytest.raises(RuntimeError, match="activation_module_names"):
        output(model, token_ids())


# ---------------------------------------------------------------------------- the rest of afgpt on patched models


def test_training_utilities_bank_files_and_plots_work_on_patched_models(tmp_path):
    model = patch_model(build(RobertaForMaskedLM), "spline;att-spline", layer_specific=2, af_n_anchors=8)
    perturb(model)
    weights, learnable = afgpt.training.optimizers.split_parameters(model)
    set_ids = {id(p) for p in model.roberta.activations.parameters()}
    assert {id(p) for p in learnable} == set_ids and not set_ids & {id(p) for p in weights}
    assert len(weights) + len(learnable) == len(list(model.parameters()))

    bank = afgpt.ActivationBank.from_model(model)
    bank.save(tmp_path / "bank")
    loaded = afgpt.load_activations(tmp_path / "bank")
    assert loaded.settings.af_type == "spline;att-spline" and loaded.settings.af_n_anchors == 8
    assert loaded.state_dict().keys() == bank.state_dict().keys()
    for key, value in bank.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value)
    other = patch_model(build(RobertaForMaskedLM), bank=loaded, layer_specific=2)
    torch.testing.assert_close(other.roberta.activations.state_dict(), model.roberta.activations.state_dict())

    from afgpt.plotting import activation_figure

    figure = activation_figure(model)
    assert len(figure.axes) >= 2
    import matplotlib.pyplot as plt

    plt.close(figure)


# ---------------------------------------------------------------------------- errors


def test_unsupported_models_are_refused_listing_the_supported_ones():
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=16))
    with pytest.raises(ValueError, match="GPT2LMHeadModel") as error:
        patch_model(model, "spline;att-none")
    for name in ("GPTNeoModel", "GPTNeoForCausalLM", "GPTNeoForSequenceClassification", "RobertaModel",
                 "RobertaForMaskedLM", "RobertaForSequenceClassification"):
        assert name in str(error.value)


def test_patching_twice_is_refused():
    model = patch_model(build(GPTNeoForCausalLM), "spline;att-none")
    with pytest.raises(ValueError, match="already has afgpt activations"):
        patch_model(model, "prelu;att-none")
    afgpt_model = afgpt.AfGPTForCausalLM(afgpt.AfGPTConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1,
                                                            num_attention_heads=2))
    with pytest.raises(ValueError, match="already has afgpt activations"):
        patch_model(afgpt_model)


def test_bad_arguments_name_what_is_allowed_and_leave_the_model_vanilla():
    model = build(RobertaForMaskedLM)
    with pytest.raises(ValueError, match="ffn_type='moe'.*mlp, kan"):
        patch_model(model, "spline;att-none", ffn_type="moe")
    with pytest.raises(ValueError, match="per-channel"):
        patch_model(model, "prelu;att-none", ffn_type="kan")
    with pytest.raises(ValueError, match="per-channel"):
        patch_model(model, "splinePerDim;att-none", ffn_type="kan")
    with pytest.raises(ValueError, match="af_layer_specific=5"):
        patch_model(model, "spline;att-none", layer_specific=5)
    with pytest.raises(ValueError, match="unknown MLP activation"):
        patch_model(model, "nope;att-none")
    assert type(model) is RobertaForMaskedLM and not hasattr(model.roberta, "activations")
    with pytest.raises(ValueError, match="af_n_anchors=1"):
        AfGPTNeoConfig(**{**neo_config().to_dict(), "af_n_anchors": 1})
    with pytest.raises(ValueError, match="kan_width='wide'"):
        AfRobertaConfig(**{**roberta_config().to_dict(), "kan_width": "wide"})


def test_default_af_type_and_the_documented_helpers():
    model = patch_model(build(GPTNeoModel, intermediate_size=None))
    assert model.config.af_type == "prelu;att-none"
    assert model.activations.mlp[0].slope.shape == (128,)  # GPT-Neo's default MLP width, 4 * hidden_size
    assert activation_module_names(model) == ["activations.mlp.0", "activations.mlp.1"]
    assert model.load_activations(afgpt.ActivationBank.from_model(model), freeze=True) is model
    assert not any(p.requires_grad for p in model.activations.parameters())
    gelu = patch_model(build(GPTNeoModel), "gelu;att-none")
    assert activation_module_names(gelu) == []  # nothing learnable to save


def test_a_deep_copy_is_patched_on_its_own():
    model = patch_model(build(GPTNeoForCausalLM), "spline;att-spline")
    perturb(model)
    clone = copy.deepcopy(model)
    ids = token_ids()
    with torch.no_grad():
        torch.testing.assert_close(output(clone, ids), output(model, ids), rtol=0, atol=0)
        clone.transformer.activations.att[0].values.add_(1.0)  # through the clone's own slot hook and set
        assert not torch.allclose(output(clone, ids), output(model, ids), atol=1e-4)
    assert layers(clone)[0].mlp.act.activation_set is clone.transformer.activations


# ---------------------------------------------------------------------------- KAN feed-forward


def kan_module():
    return pytest.importorskip("afgpt.kan", reason="afgpt.kan (the KAN feed-forward) is not in this checkout yet")


def uniform_knots(grid_size: int, spline_order: int, grid_range) -> torch.Tensor:
    low, high = grid_range
    step = (high - low) / grid_size
    return torch.arange(-spline_order, grid_size + spline_order + 1, dtype=torch.float32) * step + low


def kan_layers(model):
    kan = sys.modules["afgpt.kan"]
    return [m for m in model.modules() if isinstance(m, kan.KANLinear)]


@pytest.mark.parametrize("cls", (GPTNeoForCausalLM, RobertaForMaskedLM), ids=lambda c: c.__name__)
def test_kan_feed_forward(tmp_path, caplog, cls):
    kan = kan_module()
    vanilla_ffn = sum(p.numel() for p in (layers(build(cls))[0].mlp.parameters() if cls is GPTNeoForCausalLM else
                                          [*layers(build(cls))[0].intermediate.parameters(),
                                           *layers(build(cls))[0].output.dense.parameters()]))
    model = build(cls)
    dropout = layers(model)[0].mlp.dropout if cls is GPTNeoForCausalLM else None
    with caplog.at_level(logging.INFO, logger="afgpt"):
        patch_model(model, "spline;att-spline", ffn_type="kan", kan_grid_size=4, kan_grid_range=(-2.0, 2.0))
    config = model.config
    assert (config.ffn_type, config.kan_grid_size, config.kan_grid_range) == ("kan", 4, (-2.0, 2.0))
    layer = layers(model)[0]
    if cls is GPTNeoForCausalLM:
        assert isinstance(layer.mlp, HostFeedForward) and isinstance(layer.mlp.ffn, kan.KANFeedForward)
        assert layer.mlp.dropout is dropout  # the host's dropout stays
        ffn = layer.mlp.ffn
    else:
        assert isinstance(layer.intermediate, kan.KANFeedForward) and isinstance(layer.output.dense, nn.Identity)
        assert isinstance(layer.output.LayerNorm, nn.LayerNorm)  # RobertaOutput keeps dropout, residual, LayerNorm
        ffn = layer.intermediate
    kan_params = sum(p.numel() for p in ffn.parameters())
    assert f"parameters={kan_params:,}" in repr(model)  # KANFeedForward's repr reports its size
    assert f"KAN with {kan_params:,} parameters per layer (the MLP it replaces has {vanilla_ffn:,})" in caplog.text
    assert 0 < kan_params and abs(kan_params - vanilla_ffn) / vanilla_ffn < 0.5  # kan_width="params": close to the MLP
    linears = kan_layers(model)
    assert len(linears) == 4
    for linear in linears:
        torch.testing.assert_close(linear.grid, uniform_knots(4, 3, (-2.0, 2.0)).expand_as(linear.grid))

    perturb(model)
    ids = token_ids()
    out = output(model, ids)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    assert all(p.grad is not None for p in ffn.parameters())
    assert model.base_model.activations.mlp[0].values.grad.abs().sum() > 0  # the KAN's base function is the set's

    model.save_pretrained(tmp_path)
    loaded = AUTO[cls].from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model) and loaded.config.ffn_type == "kan"
    with torch.no_grad():
        torch.testing.assert_close(output(loaded, ids), output(model, ids), rtol=0, atol=0)


def test_kan_from_config_and_vanilla_checkpoint_initialise_kan_layers(tmp_path):
    kan_module()
    config = AfGPTNeoConfig(**{**neo_config().to_dict(), "af_type": "silu;att-spline", "ffn_type": "kan"})
    model = AutoModelForCausalLM.from_config(config)
    for linear in kan_layers(model):
        torch.testing.assert_close(linear.grid, uniform_knots(5, 3, (-1.0, 1.0)).expand_as(linear.grid))
    assert_initial(model)

    build(RobertaForMaskedLM).save_pretrained(tmp_path)  # no KAN tensors in it: all initialised on load
    loaded = afgpt.AfRobertaForMaskedLM.from_pretrained(tmp_path, af_type="spline;att-none", ffn_type="kan")
    linears = kan_layers(loaded)
    assert len(linears) == 4
    for linear in linears:
        torch.testing.assert_close(linear.grid, uniform_knots(5, 3, (-1.0, 1.0)).expand_as(linear.grid))
    assert_initial(loaded)
    assert torch.isfinite(output(loaded.eval(), token_ids())).all()
