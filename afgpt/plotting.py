"""Figures of a run: training curves, the learned activation functions, pre-activation magnitudes.

Figures are plain `matplotlib.figure.Figure`s on an Agg canvas (no pyplot global state or GUI, so
a training loop can plot at every eval) and PNGs are written atomically: a crash mid-save never
leaves a half-written plot. Each `plot_*` has a `*_figure` twin that returns the figure, for tests
and for callers that want another format.
"""
import copy
import json
import os
from pathlib import Path

import torch
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter
from torch import nn

from .activation_set import ROWS, find_activation_set
from .activations import Spline
from .atomic import write_atomically
from .mixtures import DICTIONARY

DPI = 150
FIXED_X_RANGE = 5.0  # non-spline activations are drawn on [-5, 5]
SPLINE_MARGIN = 0.1  # splines: the anchor range plus 10% each side, to show the constant tails
CURVE_POINTS = 1001
CHANNELS_SHOWN = 8  # per-channel activations: this many evenly spaced channels, plus their mean
SLOT_STYLES = {"mlp": "-", "att": "--"}


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a metrics.jsonl; a truncated last line (a run killed mid-write) is skipped."""
    lines = Path(path).read_bytes().splitlines()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:  # bad JSON or UTF-8 cut mid-character
            if i < len(lines) - 1:
                raise ValueError(f"{path}: line {i + 1} is not valid JSON: {line[:80]!r}") from None
    return records


def save_figure(fig: Figure, path: str | os.PathLike) -> None:
    """Write `fig` as a PNG via a temp file in the same directory and os.replace, so `path` is
    either the old plot or the complete new one, never a partial file."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        with open(tmp, "xb") as f:
            fig.savefig(f, format="png", dpi=DPI)
            f.flush()
            os.fsync(f.fileno())

    write_atomically(path, write)


def new_figure(nrows: int, ncols: int, panel_size: tuple[float, float]) -> tuple[Figure, list[list[Axes]]]:
    """A constrained-layout figure on an Agg canvas with a 2-D grid of axes, wide enough for its title."""
    width = max(panel_size[0] * ncols, 4.5)
    fig = Figure(figsize=(width, panel_size[1] * nrows), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes.tolist()


def series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of `key`, sorted by step; a step logged twice (a resumed run) keeps its last value."""
    points = {r["step"]: r[key] for r in records if r.get(key) is not None}
    steps = sorted(points)
    return steps, [points[s] for s in steps]


def ema(values: list[float], beta: float) -> list[float]:
    """Debiased exponential moving average (as TensorBoard), so the start is not pulled towards 0."""
    out, avg = [], 0.0
    for t, v in enumerate(values, 1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta**t))
    return out


def smoothing(n: int) -> float:
    """EMA factor averaging over ~2% of the points: visible trend, short lag, none for short runs."""
    return 1 - 1 / max(1, n // 50)


def by_replica(records: list[dict]) -> dict:
    """Records grouped by their "replica" field (None when absent), in order of first appearance."""
    groups: dict = {}
    for r in records:
        groups.setdefault(r.get("replica"), []).append(r)
    return groups


def add_legend(ax: Axes, **kwargs) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kwargs)


def training_curves_figure(records: list[dict], title: str | None = None) -> Figure:
    """Loss and token accuracy vs step: train (EMA-smoothed over the faint raw curve) and val,
    one colour per replica when records carry a "replica" field."""
    fig, ((loss_ax, acc_ax),) = new_figure(1, 2, (5.0, 3.6))
    train = by_replica([r for r in records if r.get("kind") == "train"])
    val = by_replica([r for r in records if r.get("kind") == "val"])
    replicas = list(dict.fromkeys([*train, *val]))
    for ax, key in ((loss_ax, "loss"), (acc_ax, "accuracy")):
        for i, replica in enumerate(replicas):
            color = f"C{i % 10}"
            prefix = "" if replica is None else f"replica {replica} "
            steps, values = series(train.get(replica, []), key)
            if steps:
                ax.plot(steps, values, color=color, alpha=0.25, lw=0.8)
                ax.plot(steps, ema(values, smoothing(len(values))), color=color, lw=1.6, label=f"{prefix}train")
            steps, values = series(val.get(replica, []), key)
            if steps:
                ax.plot(steps, values, color=color, ls="--", marker="o", ms=3, lw=1.2, label=f"{prefix}val")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    add_legend(loss_ax, fontsize="small")
    loss_ax.set(title="Loss", ylabel="cross-entropy (nats/token)", yscale="log")
    loss_ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))  # "6", not "6 x 10^0": losses
    loss_ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))  # span about one decade
    acc_ax.set(title="Token accuracy", ylabel="next-token accuracy")
    fig.suptitle(title or "Training curves")
    return fig


def plot_training_curves(records: list[dict], path: str | os.PathLike, title: str | None = None) -> None:
    save_figure(training_curves_figure(records, title), path)


def draw_activation(ax: Axes, module: nn.Module) -> None:
    """f(x) of one activation, evaluated on a CPU float32 copy so any device or dtype works.

    Per-channel activations (a `channels` attribute) show a few channels thin and their mean thick;
    splines mark their anchors on the (mean) curve.
    """
    module = copy.deepcopy(module).to("cpu", torch.float32)
    is_spline = isinstance(module, Spline)
    reach = module.grid.af_range * (1 + SPLINE_MARGIN) if is_spline else FIXED_X_RANGE
    x = torch.linspace(-reach, reach, CURVE_POINTS)
    if is_spline:  # include the anchors so the polyline passes exactly through every kink
        x = torch.cat([x, module.anchors]).sort().values
    channels = getattr(module, "channels", None)

    def f(x: torch.Tensor) -> torch.Tensor:
        """[N] -> [N] shared, or [N] -> [N, channels] per channel."""
        return module(x if channels is None else x[:, None].expand(-1, channels))

    with torch.no_grad():
        y = f(x)
        anchor_y = f(module.anchors) if is_spline else None
    ax.axline((0, 0), slope=1, color="0.6", ls="--", lw=0.8, label="y = x")
    if channels is None:
        ax.plot(x, y, color="C0", lw=1.8, label="f(x)")
    else:
        shown = torch.linspace(0, channels - 1, min(CHANNELS_SHOWN, channels)).round().long().unique()
        for j, c in enumerate(shown.tolist()):
            label = f"{len(shown)} of {channels} channels" if j == 0 else None
            ax.plot(x, y[:, c], color=colormaps["viridis"](0.85 * j / max(1, len(shown) - 1)),
                    lw=0.7, alpha=0.7, label=label)
        y = y.mean(1)
        ax.plot(x, y, color="black", lw=2.0, label="channel mean")
        anchor_y = anchor_y.mean(1) if is_spline else None
    if is_spline:
        ax.plot(module.anchors, anchor_y, ls="none", marker="o", ms=2.5, color="C3", label="anchors")
    ax.set_xlim(-reach, reach)
    ax.grid(alpha=0.3)


def activation_figure(source: nn.Module, title: str | None = None) -> Figure:
    """The activation functions of a model (AfGPT or patched), a bank or an activation set: MLP row on top,
    attention row below (unless att-none), one column per slot titled with the layers that use it."""
    activations = find_activation_set(source)
    settings = activations.settings
    rows = [(ROWS[row], modules) for row, modules in activations.rows().items()]
    fig, axes = new_figure(len(rows), len(activations.mlp), (3.0, 2.7))
    for r, (row_name, modules) in enumerate(rows):
        for slot, module in enumerate(modules):
            ax = axes[r][slot]
            draw_activation(ax, module)
            ax.set_title(f"{row_name}, slot {slot}: {settings.layer_span(slot)}", fontsize="medium")
            if r == len(rows) - 1:
                ax.set_xlabel("x")
        axes[r][0].set_ylabel(f"{row_name} f(x)")
        add_legend(axes[r][0], fontsize="x-small")
    fig.suptitle(title or f"Activation functions ({settings.af_type})")
    return fig


def plot_activations(source: nn.Module, path: str | os.PathLike, title: str | None = None) -> None:
    save_figure(activation_figure(source, title), path)


def activation_magnitudes_figure(records: list[dict], af_range: float | None = None) -> Figure:
    """Mean and max |pre-activation| vs step, one line per layer (MLP solid, attention dashed).

    With `af_range`, a line marks where splines turn constant: inputs beyond it get no gradient
    to the spline, so a max |x| above it says the range is too small.
    """
    fig, ((mean_ax, max_ax),) = new_figure(1, 2, (4.6, 3.6))
    acts = [r for r in records if r.get("kind") == "act"]
    layers = sorted({r["layer"] for r in acts})
    for i, layer in enumerate(layers):
        color = colormaps["viridis"](0.85 * i / max(1, len(layers) - 1))
        for slot in ("mlp", "att"):
            group = [r for r in acts if r["layer"] == layer and r["slot"] == slot]
            if not group:
                continue
            label = f"layer {layer} {ROWS[slot]}"
            for ax, key in ((mean_ax, "mean_abs"), (max_ax, "max_abs")):
                ax.plot(*series(group, key), color=color, ls=SLOT_STYLES[slot], lw=1.3, label=label)
    for ax, name in ((mean_ax, "mean"), (max_ax, "max")):
        if af_range is not None:
            ax.axhline(af_range, color="C3", ls=":", lw=1.2, label=f"spline range {af_range:g}")
        ax.set(title=f"{name.capitalize()} |pre-activation|", xlabel="step", ylabel=f"{name} |x|", yscale="log")
        ax.grid(alpha=0.3, which="both")
    if max_ax.get_legend_handles_labels()[0]:
        fig.legend(*max_ax.get_legend_handles_labels(), loc="outside right upper", fontsize="small")
    fig.suptitle("Activation input magnitudes")
    return fig


def plot_activation_magnitudes(records: list[dict], path: str | os.PathLike, af_range: float | None = None) -> None:
    save_figure(activation_magnitudes_figure(records, af_range), path)


def moa_gates_figure(records: list[dict]) -> Figure:
    """MoA's token gates ("moa_gates" records): the effective rank of each layer's gate matrix vs step (1 means
    every token gets the same mixture, i.e. MoA collapsed to LA), each function's mean gate vs step (mean over
    layers), and each layer's mean-gated function x -> sum_k mean(pi_k) f_k(x) at the last step."""
    fig, ((rank_ax, mean_ax, curve_ax),) = new_figure(1, 3, (4.2, 3.6))
    gates = [r for r in records if r.get("kind") == "moa_gates"]
    modules = list(dict.fromkeys(r["module"] for r in gates))
    names = gates[0]["names"] if gates else []
    x = torch.linspace(-FIXED_X_RANGE, FIXED_X_RANGE, CURVE_POINTS)
    for i, module in enumerate(modules):
        color = colormaps["viridis"](0.85 * i / max(1, len(modules) - 1))
        group = [r for r in gates if r["module"] == module]
        rank_ax.plot(*series(group, "effective_rank"), color=color, lw=1.3, label=module)
        last = group[-1]
        curve = sum(g * DICTIONARY[name](x) for g, name in zip(last["mean"], last["names"]))
        curve_ax.plot(x, curve, color=color, lw=1.3)
    for k, name in enumerate(names):
        steps = sorted({r["step"] for r in gates})
        means = [sum(r["mean"][k] for r in gates if r["step"] == s) / len(modules) for s in steps]
        mean_ax.plot(steps, means, color=f"C{k % 10}", lw=1.3, label=name)
    rank_ax.set(title="Gate effective rank", xlabel="step", ylabel="effective rank (1: constant gates)")
    mean_ax.set(title="Mean gate per function", xlabel="step", ylabel="mean over tokens and layers")
    curve_ax.set(title="Mean-gated function (last step)", xlabel="x", ylabel="sum_k mean(pi_k) f_k(x)")
    for ax in (rank_ax, mean_ax, curve_ax):
        ax.grid(alpha=0.3)
    add_legend(mean_ax, fontsize="small")
    fig.suptitle("MoA token gates")
    return fig


def plot_moa_gates(records: list[dict], path: str | os.PathLike) -> None:
    save_figure(moa_gates_figure(records), path)


def blimp_figure(results: dict[str, dict], title: str | None = None) -> Figure:
    """BLiMP accuracy per linguistic phenomenon and overall, one bar per model in each group, with the 50% chance
    line: the figure a paper shows next to the table. `results`: {model: evaluate_blimp result}."""
    models = list(results)
    labels = [*next(iter(results.values()))["phenomena"], "overall"]
    fig, ((ax,),) = new_figure(1, 1, (max(6.0, 0.45 * len(labels) * max(1, len(models)) ** 0.5 + 2), 4.2))
    width = 0.8 / len(models)
    for i, model in enumerate(models):
        values = [100 * results[model]["phenomena"].get(label, float("nan")) for label in labels[:-1]]
        values.append(100 * results[model]["overall"])
        label = model if len(model) <= 40 else "..." + model[-37:]  # run folders can have long paths
        ax.bar([x - 0.4 + width * (i + 0.5) for x in range(len(labels))], values, width, label=label,
               color=f"C{i % 10}")
    ax.axhline(50, color="0.4", ls="--", lw=0.8, label="chance")
    ax.set_xticks(range(len(labels)), [label.replace("_", " ") for label in labels], rotation=40, ha="right",
                  fontsize="small")
    ax.set(ylabel="accuracy (%)", ylim=(0, 100), title=title or "BLiMP accuracy by phenomenon")
    ax.grid(axis="y", alpha=0.3)
    add_legend(ax, fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, never on them
    return fig


def plot_blimp(results: dict[str, dict], path: str | os.PathLike, title: str | None = None) -> None:
    save_figure(blimp_figure(results, title), path)
