"""What a run watches besides its loss: validation, activation magnitudes, throughput, plots, and a
warning when bf16 would be emulated."""
import contextlib
import logging
import time
from pathlib import Path

import torch

from ..activation_set import SlotActivation, find_activation_set
from ..kan import KANLinear
from ..mixtures import GateStatistics, MoAFeedForward
from ..plotting import (plot_activation_magnitudes, plot_activations, plot_moa_gates, save_figure,
                        training_curves_figure)
from .config import TrainConfig
from .objectives import ForwardCausalLM, Objective, accuracy_kind

logger = logging.getLogger("afgpt")


SMALL_OUTPUT = 1e-3  # |f(x)| below this counts as (nearly) inactive in the sparsity monitor


class ActivationMagnitudes:
    """Mean and max |input| of every layer's MLP and attention activation (AfGPT or patched), and how sparse its
    output is (the share of exact zeros, and of |f(x)| < SMALL_OUTPUT), over all the forwards it watches, via
    hooks on the layers' activation slots. It watches validation only, so training pays nothing for it."""

    def __init__(self, model: torch.nn.Module):
        # (layer, row) -> [sum |x|, count, max |x|, zero outputs, small outputs, output count]
        self.sums: dict[tuple[int, str], list[float]] = {}
        self.handles = [module.register_forward_hook(self.hook) for module in model.modules()
                        if isinstance(module, SlotActivation)]

    def hook(self, module: SlotActivation, inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
        x = inputs[0].detach().abs().float()
        y = output.detach().abs()
        sums = self.sums.setdefault((module.layer, module.row), [0.0, 0, 0.0, 0, 0, 0])
        sums[0] += x.sum().item()
        sums[1] += x.numel()
        sums[2] = max(sums[2], x.max().item())
        sums[3] += (y == 0).sum().item()
        sums[4] += (y < SMALL_OUTPUT).sum().item()
        sums[5] += y.numel()

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()

    def records(self, step: int) -> list[dict]:
        return [{"kind": "act", "step": step, "layer": layer, "slot": row, "mean_abs": total / count,
                 "max_abs": peak, "zero_frac": zeros / outputs, "small_frac": small / outputs}
                for (layer, row), (total, count, peak, zeros, small, outputs) in sorted(self.sums.items())]


class KANGridCoverage:
    """The share of each KAN layer's inputs outside its grid range (where its spline fades out, to zero beyond
    spline_order more intervals, leaving the base branch), over all the forwards it watches; named by module, e.g.
    "model.layers.0.mlp.fc"."""

    def __init__(self, model: torch.nn.Module):
        self.counts: dict[str, list[float]] = {}  # name -> [inputs outside, inputs]
        self.handles = [module.register_forward_pre_hook(self.hook_for(name)) for name, module in model.named_modules()
                        if isinstance(module, KANLinear)]

    def hook_for(self, name: str):
        def hook(module: KANLinear, inputs: tuple[torch.Tensor]) -> None:
            x = inputs[0].detach()
            counts = self.counts.setdefault(name, [0.0, 0])
            counts[0] += module.outside_fraction(x) * x.numel()
            counts[1] += x.numel()

        return hook

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()

    def records(self, step: int) -> list[dict]:
        return [{"kind": "kan_grid", "step": step, "module": name, "outside_fraction": outside / total}
                for name, (outside, total) in self.counts.items()]

    def report(self, step: int) -> None:
        """One log line: the mean and the worst share outside; a warning when a layer has more than 10% outside."""
        records = self.records(step)
        if not records:
            return
        worst = max(records, key=lambda r: r["outside_fraction"])
        mean = sum(r["outside_fraction"] for r in records) / len(records)
        text = (f"Step {step}   KAN inputs outside the grid: {100 * mean:.1f}% on average, "
                f"{100 * worst['outside_fraction']:.1f}% in {worst['module']}")
        if worst["outside_fraction"] > 0.1:
            logger.warning(text + ": widen --kan-grid-range or refit with update_grid (see the README's KAN section)")
        else:
            logger.info(text)


class MoAGates:
    """Statistics of every MoA feed-forward's token gates over the forwards it watches (validation), named by
    module: per-function mean and variance over tokens and the gate matrix's effective rank, so a collapse to
    constant gates (MoA turned LA) shows in metrics.jsonl ("moa_gates") and plots/moa_gates.png."""

    def __init__(self, model: torch.nn.Module):
        self.stats: dict[str, tuple[tuple[str, ...], GateStatistics]] = {}
        self.handles = [module.gates.register_forward_hook(self.hook_for(name, module.names))
                        for name, module in model.named_modules() if isinstance(module, MoAFeedForward)]

    def hook_for(self, name: str, names: tuple[str, ...]):
        def hook(module: torch.nn.Module, inputs: tuple[torch.Tensor], gates: torch.Tensor) -> None:
            self.stats.setdefault(name, (names, GateStatistics()))[1].update(gates)

        return hook

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()

    def records(self, step: int) -> list[dict]:
        records = []
        for name, (names, stats) in self.stats.items():
            result = stats.result()
            records.append({"kind": "moa_gates", "step": step, "module": name, "names": list(names),
                            "mean": result["mean"].tolist(), "variance": result["variance"].tolist(),
                            "effective_rank": result["effective_rank"].item()})
        return records


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches, max_batches: int,
             objective: Objective | None = None) -> tuple[float, float]:
    """Mean validation loss and accuracy over up to `max_batches` fixed batches, in eval mode, by `objective`
    (default: the model's forward with shift_labels, next-token accuracy)."""
    objective = objective or ForwardCausalLM()
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    losses, accuracies = [], []
    for i, (input_ids, labels) in enumerate(batches):
        if i == max_batches:
            break
        loss, accuracy = objective(model, input_ids.to(device), labels.to(device))
        losses.append(loss.item())
        accuracies.append(accuracy.item())
    model.train(was_training)
    return sum(losses) / len(losses), sum(accuracies) / len(accuracies)


class Throughput:
    """Training time and tokens since the last log line. Validation, plots and checkpoints run with the
    clock paused, so tokens/s and the elapsed time count training alone, whatever the cadences."""

    def __init__(self):
        self.seconds, self.tokens = 0.0, 0
        self.started = time.perf_counter()

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    @contextlib.contextmanager
    def paused(self):
        self.seconds += time.perf_counter() - self.started
        try:
            yield
        finally:
            self.started = time.perf_counter()

    def take(self) -> tuple[float, int]:
        """(seconds, tokens) of the window so far; the next window starts now."""
        now = time.perf_counter()
        window = self.seconds + now - self.started, self.tokens
        self.seconds, self.tokens, self.started = 0.0, 0, now
        return window


def save_plots(model: torch.nn.Module, history: list, plots: Path, cfg: TrainConfig) -> None:
    """The run's figures, as many as `plotting_level` asks for."""
    if cfg.plotting_level == 0:
        return
    plots.mkdir(exist_ok=True)
    title = cfg.run_name or (cfg.af_type if cfg.model == "afgpt" else f"{cfg.model}: {cfg.af_type}")
    plot_training_curves([r for r in history if r["kind"] in ("train", "val")], plots / "training_curves.png",
                         title=title, accuracy=accuracy_kind(cfg.model))
    plot_activations(model, plots / "activations.png", title=title)
    gates = [r for r in history if r["kind"] == "moa_gates"]
    if gates:
        plot_moa_gates(gates, plots / "moa_gates.png")
    magnitudes = [r for r in history if r["kind"] == "act"]
    if magnitudes and cfg.plotting_level >= 2:
        plot_activation_magnitudes(magnitudes, plots / "activation_magnitudes.png",  # a stage II bank's grid,
                                   af_range=find_activation_set(model).settings.af_range)  # not --af-range


def plot_training_curves(records: list[dict], path: Path, title: str, accuracy: str) -> None:
    """afgpt.plotting's loss and accuracy curves, the accuracy panel naming what it measures ("next-token",
    "masked-token")."""
    figure = training_curves_figure(records, title=title)
    accuracy_axis = figure.axes[1]  # the panels: loss, accuracy
    accuracy_axis.set(title=f"{accuracy.capitalize()} accuracy", ylabel=f"{accuracy} accuracy")
    save_figure(figure, path)


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bf16 matmuls natively on this CPU (AVX-512 or AMX); True if unknown."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return True


def warn_if_bf16_is_emulated(mixed_precision: str, device: torch.device) -> None:
    """bf16 autocast on an AVX2-only CPU emulates its matmuls: an AfGPT step ran 18x slower than fp32."""
    if mixed_precision == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        logger.warning("mixed_precision='bf16' on a CPU without native bf16 matmuls (no AVX-512/AMX): "
                       "training will be many times slower than in fp32; use mixed_precision='no' here")

