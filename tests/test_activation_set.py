"""The activation set: settings, slots, one way to find it, rebinding for stage I, magnitudes through its slots."""
import copy

import pytest
import torch

import afgpt
from afgpt.activation_set import (ActivationSet, ActivationSettings, SlotActivation, find_activation_set,
                                  share_activation_set)
from afgpt.training.monitors import ActivationMagnitudes
from conftest import tiny_config


def test_settings_come_from_any_config_and_are_checked():
    config = tiny_config(af_type=" spline ; att-prelu", af_layer_specific=2, af_range=3, af_n_anchors=8)
    settings = ActivationSettings.from_config(config)
    assert settings.af_type == "spline;att-prelu" and settings.af_range == 3.0
    assert (settings.hidden_size, settings.intermediate_size, settings.num_slots) == (32, 128, 3)
    assert ActivationSettings(hidden_size=10).intermediate_size == 40  # lm-afs's 4x MLP
    with pytest.raises(ValueError, match="af_layer_specific=5 is invalid"):
        ActivationSettings(af_layer_specific=5)
    with pytest.raises(ValueError, match="unknown MLP activation 'nope'"):
        ActivationSettings(af_type="nope;att-none")
    with pytest.raises(ValueError, match="hidden_size=0 is invalid"):
        ActivationSettings(hidden_size=0)


def test_slot_activation_resolves_in_the_set_at_call_time():
    activations = ActivationSet(ActivationSettings(af_type="spline;att-none", af_layer_specific=0,
                                                   num_hidden_layers=3))
    slot = SlotActivation(activations, "mlp", layer=2)
    assert list(slot.parameters()) == [] and len(list(activations.parameters())) == 1  # stored once, in the set
    x = torch.linspace(-1, 1, 5)
    with torch.no_grad():
        activations.mlp[0].values.fill_(0.5)
    torch.testing.assert_close(slot(x), torch.full_like(x, 0.5))
    other = copy.deepcopy(activations)
    with torch.no_grad():
        other.mlp[0].values.fill_(-2.0)
    slot.bind(other)
    torch.testing.assert_close(slot(x), torch.full_like(x, -2.0))


def test_deepcopy_of_a_model_keeps_its_slots_on_its_own_set():
    model = afgpt.AfGPTForCausalLM(tiny_config(af_type="spline;att-spline"))
    twin = copy.deepcopy(model)
    slots = [m for m in twin.modules() if isinstance(m, SlotActivation)]
    assert slots and all(s.activation_set is twin.model.activations for s in slots)


def test_find_and_share_the_set():
    first = afgpt.AfGPTForCausalLM(tiny_config(af_type="spline;att-spline"))
    second = afgpt.AfGPTForCausalLM(tiny_config(af_type="spline;att-spline"))
    assert find_activation_set(first) is first.model.activations is find_activation_set(first.model)
    share_activation_set(second, first.model.activations)
    assert second.model.activations is first.model.activations
    x = torch.randint(0, 97, (1, 6))
    second(x, labels=x).loss.backward()
    assert first.model.activations.mlp[0].values.grad is not None  # gradients reach the shared set
    with pytest.raises(ValueError, match="has no afgpt activation set.*patch_model"):
        find_activation_set(torch.nn.Linear(2, 2))


def test_magnitudes_average_every_watched_forward():
    model = afgpt.AfGPTForCausalLM(tiny_config(af_type="gelu;att-linear", num_hidden_layers=2)).eval()
    seen = {}

    def record(module, args):
        seen.setdefault((module.layer, module.row), []).append(args[0].detach().abs())

    handles = [m.register_forward_pre_hook(record) for m in model.modules() if isinstance(m, SlotActivation)]
    monitor = ActivationMagnitudes(model)
    with torch.no_grad():
        for seed in range(2):
            model(torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(seed)))
    monitor.close()
    for handle in handles:
        handle.remove()
    records = monitor.records(step=7)
    assert {(r["layer"], r["slot"]) for r in records} == {(0, "mlp"), (0, "att"), (1, "mlp"), (1, "att")}
    for r in records:
        values = torch.cat([v.flatten() for v in seen[(r["layer"], r["slot"])]])
        assert r["mean_abs"] == pytest.approx(values.mean().item(), rel=1e-5)
        assert r["max_abs"] == pytest.approx(values.max().item())
