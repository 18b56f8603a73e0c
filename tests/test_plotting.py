import json

import numpy as np
import pytest
import torch
from matplotlib.image import imread

import afgpt
from afgpt import plotting
from afgpt.bank import ActivationBank

from conftest import perturb, tiny_config

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SPECS = [("spline;att-spline", 1), ("splinePerDim;att-none", 2), ("gelu;att-linear", 0), ("prelu;att-rational", 1)]


def tiny_model(af_type: str, sharing: int = 1) -> afgpt.AfGPTForCausalLM:
    """Perturbed so learnable activations differ per slot and per channel."""
    config = tiny_config(af_type=af_type, af_layer_specific=sharing, af_range=3.0, af_n_anchors=16, af_init=-1)
    return perturb(afgpt.AfGPTForCausalLM(config), scale=0.2)


def lines_labelled(ax, label: str) -> list:
    return [line for line in ax.get_lines() if line.get_label() == label]


def assert_png(path, min_width: int = 400, min_height: int = 300) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000
    height, width, _ = imread(path).shape
    assert width >= min_width and height >= min_height
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind


def train_records(steps: int = 300, replica: int | None = None) -> list[dict]:
    extra = {} if replica is None else {"replica": replica}
    return [{"kind": "train", "step": s, "loss": 10 / (1 + s / 50), "accuracy": s / (s + 100), "lr": 1e-3,
             "tokens_per_second": 1e5, **extra} for s in range(steps)]


def val_records(steps: int = 300, every: int = 50) -> list[dict]:
    return [{"kind": "val", "step": s, "loss": 11 / (1 + s / 50), "accuracy": s / (s + 120)}
            for s in range(0, steps, every)]


def act_records(layers: int = 3, slots=("mlp", "att")) -> list[dict]:
    return [{"kind": "act", "step": s, "layer": layer, "slot": slot, "mean_abs": 1 + layer + s / 100,
             "max_abs": 10 * (1 + layer) + s / 10} for s in range(0, 200, 20) for layer in range(layers)
            for slot in slots]


@pytest.mark.parametrize("af_type,sharing", SPECS)
def test_plot_activations_writes_png(tmp_path, af_type, sharing):
    path = tmp_path / "activations.png"
    plotting.plot_activations(tiny_model(af_type, sharing), path)
    assert_png(path)


@pytest.mark.parametrize("af_type,sharing", SPECS)
def test_activation_figure_has_one_panel_per_slot(af_type, sharing):
    model = tiny_model(af_type, sharing)
    fig = plotting.activation_figure(model)
    slots = model.model.activations.settings.num_slots
    rows = 1 if af_type.endswith("att-none") else 2
    assert len(fig.axes) == rows * slots
    assert af_type in fig.get_suptitle()
    assert fig.axes[0].get_title().startswith("MLP")
    if rows == 2:
        assert fig.axes[slots].get_title().startswith("attention")


def test_slot_titles_name_the_layers_that_share_them():
    titles = [ax.get_title() for ax in plotting.activation_figure(tiny_model("splinePerDim;att-none", 2)).axes]
    assert titles == ["MLP, slot 0: layer 0", "MLP, slot 1: layers 1–2", "MLP, slot 2: layer 3"]
    titles = [ax.get_title() for ax in plotting.activation_figure(tiny_model("gelu;att-linear", 0)).axes]
    assert titles == ["MLP, slot 0: layers 0–3", "attention, slot 0: layers 0–3"]


@pytest.mark.parametrize("af_type", ["spline;att-spline", "splinePerDim;att-none"])
def test_spline_curves_equal_module_outputs_at_anchors(af_type):
    model = tiny_model(af_type)
    activations = model.model.activations
    modules = list(activations.mlp) + list(activations.att or [])
    fig = plotting.activation_figure(model)
    for ax, module in zip(fig.axes, modules):
        anchors = module.anchors
        with torch.no_grad():
            expected = module(anchors if module.channels is None else anchors[:, None].expand(-1, module.channels))
        if module.channels is not None:
            expected = expected.mean(1)
        (dots,) = lines_labelled(ax, "anchors")
        np.testing.assert_allclose(dots.get_xdata(), anchors.numpy())
        np.testing.assert_allclose(dots.get_ydata(), expected.numpy(), rtol=1e-5, atol=1e-6)
        (curve,) = lines_labelled(ax, "f(x)" if module.channels is None else "channel mean")
        x, y = np.asarray(curve.get_xdata()), np.asarray(curve.get_ydata())
        np.testing.assert_allclose(np.interp(anchors.numpy(), x, y), expected.numpy(), rtol=1e-5, atol=1e-6)
        assert x[0] == pytest.approx(-3.3) and x[-1] == pytest.approx(3.3)  # anchor range + 10%
        assert y[0] == pytest.approx(expected[0].item()) and y[-1] == pytest.approx(expected[-1].item())


def test_per_channel_activations_show_a_few_channels_and_their_mean():
    model = tiny_model("prelu;att-rational")
    ax = plotting.activation_figure(model).axes[0]
    width = model.config.intermediate_size
    assert len(lines_labelled(ax, f"8 of {width} channels")) == 1
    assert len(ax.get_lines()) == 1 + 8 + 1  # y = x, channels, mean
    (mean,) = lines_labelled(ax, "channel mean")
    x = torch.tensor(mean.get_xdata())
    assert x[0] == -5 and x[-1] == 5
    slope = model.model.activations.mlp[0].slope.detach()
    expected = torch.where(x >= 0, x, x * slope.mean())
    np.testing.assert_allclose(mean.get_ydata(), expected.numpy(), rtol=1e-5, atol=1e-6)


def test_activation_figure_accepts_trunk_and_activations_and_any_dtype():
    model = tiny_model("spline;att-spline").to(torch.bfloat16)
    fig = plotting.activation_figure(model.model, title="bf16 run")
    assert fig.get_suptitle() == "bf16 run" and len(fig.axes) == 8
    fig = plotting.activation_figure(model.model.activations)
    assert [ax.get_title() for ax in fig.axes[:2]] == ["MLP, slot 0: layer 0", "MLP, slot 1: layer 1"]  # the set knows its layers
    assert model.model.activations.mlp[0].values.dtype == torch.bfloat16  # plotted a copy


def test_activation_figure_accepts_an_activation_bank():
    """A bank, like a model's trunk, carries its activations and config: panels are titled by layer."""
    bank = ActivationBank.from_model(tiny_model("spline;att-spline", 2))
    fig = plotting.activation_figure(bank)
    assert [ax.get_title() for ax in fig.axes] == [
        f"{row}, slot {s}: {where}" for row in ("MLP", "attention")
        for s, where in enumerate(["layer 0", "layers 1–2", "layer 3"])]
    assert fig.get_suptitle() == "Activation functions (spline;att-spline)"


@pytest.mark.parametrize("with_val", [False, True])
def test_training_curves(tmp_path, with_val):
    records = train_records() + (val_records() if with_val else [])
    fig = plotting.training_curves_figure(records, title="run-1")
    loss_ax, acc_ax = fig.axes
    assert fig.get_suptitle() == "run-1"
    labels = [text.get_text() for text in loss_ax.get_legend().get_texts()]
    assert labels == (["train", "val"] if with_val else ["train"])
    for ax in (loss_ax, acc_ax):
        assert len(ax.get_lines()) == 2 + with_val  # raw, smoothed, val
    path = tmp_path / "curves.png"
    plotting.plot_training_curves(records, path)
    assert_png(path)


def test_training_curves_smooth_train_and_keep_val_raw():
    loss_ax = plotting.training_curves_figure(train_records() + val_records()).axes[0]
    raw, smoothed, val = loss_ax.get_lines()
    np.testing.assert_allclose(raw.get_ydata(), [r["loss"] for r in train_records()])
    assert smoothed.get_ydata()[0] == pytest.approx(raw.get_ydata()[0])  # debiased: no pull towards 0
    assert smoothed.get_ydata()[-1] > raw.get_ydata()[-1]  # lags a falling loss
    np.testing.assert_allclose(val.get_ydata(), [r["loss"] for r in val_records()])


def test_training_curves_one_curve_per_replica():
    records = train_records(replica=0) + train_records(replica=1) + [{"kind": "act", "step": 0}]
    loss_ax = plotting.training_curves_figure(records).axes[0]
    labels = [text.get_text() for text in loss_ax.get_legend().get_texts()]
    assert labels == ["replica 0 train", "replica 1 train"]
    colors = {line.get_color() for line in loss_ax.get_lines()}
    assert len(colors) == 2


def test_training_curves_keep_the_last_value_of_a_repeated_step():
    """A resumed run appends steps it already logged; the newer values win."""
    records = train_records(10) + [{"kind": "train", "step": 5, "loss": 99.0, "accuracy": 0.0}]
    raw = plotting.training_curves_figure(records).axes[0].get_lines()[0]
    assert list(raw.get_xdata()) == list(range(10))
    assert raw.get_ydata()[5] == 99.0


def test_training_curves_without_records_still_plot(tmp_path):
    path = tmp_path / "empty.png"
    plotting.plot_training_curves([], path)
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_activation_magnitudes(tmp_path):
    records = act_records() + train_records(5)
    fig = plotting.activation_magnitudes_figure(records, af_range=15.0)
    for ax in fig.axes:
        lines = ax.get_lines()
        assert len(lines) == 3 * 2 + 1
        assert {line.get_linestyle() for line in lines if "MLP" in line.get_label()} == {"-"}
        assert {line.get_linestyle() for line in lines if "attention" in line.get_label()} == {"--"}
        (limit,) = lines_labelled(ax, "spline range 15")
        assert list(limit.get_ydata()) == [15.0, 15.0]
    mean_ax, max_ax = fig.axes
    (line,) = lines_labelled(max_ax, "layer 2 MLP")
    np.testing.assert_allclose(line.get_ydata(), [r["max_abs"] for r in act_records()
                                                  if r["layer"] == 2 and r["slot"] == "mlp"])
    path = tmp_path / "magnitudes.png"
    plotting.plot_activation_magnitudes(records, path, af_range=15.0)
    assert_png(path)


def test_activation_magnitudes_without_range_or_attention():
    fig = plotting.activation_magnitudes_figure(act_records(layers=2, slots=("mlp",)))
    for ax in fig.axes:
        assert [line.get_label() for line in ax.get_lines()] == ["layer 0 MLP", "layer 1 MLP"]


def test_read_metrics_skips_a_truncated_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = train_records(3) + val_records(3)
    text = "".join(json.dumps(r) + "\n" for r in records) + "\n"
    path.write_text(text + '{"kind": "train", "step": 3, "lo')
    assert plotting.read_metrics(path) == records
    path.write_bytes(text.encode() + '{"kind": "val", "note": "é'.encode()[:-1])  # cut mid-character
    assert plotting.read_metrics(path) == records
    path.write_text(text)
    assert plotting.read_metrics(path) == records


def test_read_metrics_rejects_a_corrupt_middle_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind": "train", "step": 0}\n{"kind": \n{"kind": "train", "step": 1}\n')
    with pytest.raises(ValueError, match="line 2"):
        plotting.read_metrics(path)


def test_failed_save_leaves_no_partial_file(tmp_path, monkeypatch):
    fig = plotting.training_curves_figure(train_records(10))

    def crash(f, **kwargs):
        f.write(PNG_MAGIC + b"half a plot")
        raise RuntimeError("disk full")

    monkeypatch.setattr(fig, "savefig", crash)
    path = tmp_path / "curves.png"
    with pytest.raises(RuntimeError, match="disk full"):
        plotting.save_figure(fig, path)
    assert list(tmp_path.iterdir()) == []
    path.write_bytes(b"old plot")
    with pytest.raises(RuntimeError, match="disk full"):
        plotting.save_figure(fig, path)
    assert path.read_bytes() == b"old plot"
    assert list(tmp_path.iterdir()) == [path]


def test_save_figure_creates_the_directory(tmp_path):
    path = tmp_path / "plots" / "run" / "curves.png"
    plotting.save_figure(plotting.training_curves_figure(train_records(10)), path)
    assert_png(path)


def test_blimp_bar_plot_has_a_bar_per_model_and_phenomenon(tmp_path):
    result = {"phenomena": {"island_effects": 0.6, "anaphor_agreement": 0.9}, "overall": 0.75}
    results = {"runs/gelu": result, "runs/" + "x" * 60: {**result, "overall": 0.5}}
    ax = plotting.blimp_figure(results).axes[0]
    heights = [patch.get_height() for patch in ax.patches]
    assert heights == pytest.approx([60, 90, 75, 60, 90, 50])  # model by model: phenomena, then overall
    assert [t.get_text() for t in ax.get_xticklabels()] == ["island effects", "anaphor agreement", "overall"]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["chance", "runs/gelu", "..." + "x" * 37]
    plotting.plot_blimp(results, tmp_path / "blimp.png")
    assert_png(tmp_path / "blimp.png")
