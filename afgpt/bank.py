"""ActivationBank: the learned activations of a model as one object, and their file formats.

A bank directory (Hub-repo shaped) holds af_config.json, activations.safetensors (one tensor per
learnable activation, named by slot, e.g. "mlp.0.values"), a model card README.md and activations.png.
`read_activations` also reads lm-afs's ptAf-*.csv and ptAf-*.pt files, so functions learned there
can be reused frozen in afgpt models (stage II); `to_lmafs_csv` and `to_lmafs_pt` write them for lm-afs.
"""
import contextlib
import json
import math
import os
import pickle
import re
import shutil
import sys
import tempfile
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .atomic import replace_directory, restore_interrupted, write_atomically, write_text_atomically
from .activation_set import ROWS, SHARING, ActivationSet, ActivationSettings, activation_slot, find_activation_set
from .activations import Spline, is_learnable, parse_af_spec

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo

FORMAT = "afgpt-activations"
VERSION = 1
CONFIG_KEYS = ("af_type", "af_layer_specific", "af_range", "af_n_anchors", "num_hidden_layers",
               "hidden_size", "intermediate_size")
HINTS = ("num_hidden_layers", "af_type", "af_layer_specific", "hidden_size", "intermediate_size")
ROW_WIDTH = {"mlp": "intermediate_size", "att": "hidden_size"}  # the channels each row's activations see
LMAFS_SPLINES = ("spline", "splinePerDim")  # the only learnable activations lm-afs has
LMAFS_MLP_RATIO = 4  # lm-afs's MLP is always 4x the model width
LMAFS_NAME = re.compile(r"ptAf-(?P<run>.+)-step(?P<steps>\d+)$")
LMAFS_CONFIG_FIELDS = {"afType": "af_type", "afLayerSpecific": "af_layer_specific", "nLayers": "num_hidden_layers",
                       "dimEmb": "hidden_size"}  # lm-afs's Hyperparameters field -> AfGPTConfig field
MISSING = "—"


class ActivationBank(nn.Module):
    """All learnable activation parameters of a model (its activation set); `state_dict()` holds exactly those."""

    def __init__(self, activations: ActivationSet, provenance: dict | None = None):
        super().__init__()
        self.activations = activations
        self.settings = activations.settings
        self.provenance = provenance or {}

    @classmethod
    def from_model(cls, model: nn.Module, provenance: dict | None = None) -> "ActivationBank":
        """The bank of an AfGPT or patched model (its activation set, shared, not copied)."""
        return cls(find_activation_set(model), provenance)

    def state_dict(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        return self.activations.state_dict(*args, **kwargs)

    def is_empty(self) -> bool:
        return self.activations.is_empty()

    def learnable_rows(self) -> list[str]:
        """"mlp" and/or "att": the rows whose activations have parameters."""
        spec = parse_af_spec(self.settings.af_type)
        return [row for row in ROWS if is_learnable(getattr(spec, row))]

    def af_config(self) -> dict:
        config = {key: getattr(self.settings, key) for key in (*CONFIG_KEYS, "ffn_type")}
        config["af_type"] = str(parse_af_spec(config["af_type"]))
        return {"format": FORMAT, "version": VERSION, **config, "provenance": self.provenance}

    def title(self) -> str:
        return f"{parse_af_spec(self.settings.af_type)}: {SHARING[self.settings.af_layer_specific]}"

    # ------------------------------------------------------------------ writing

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the bank directory atomically: built beside the target, then renamed into place, so
        `directory` holds either the old bank or the complete new one."""
        directory = Path(directory)
        old = directory.with_name(f".{directory.name}.old")
        restore_interrupted(directory, old)  # a crash between replace_directory's two renames
        tmp = directory.with_name(f".{directory.name}.{uuid.uuid4().hex[:8]}.tmp")
        tmp.mkdir(parents=True)
        try:
            self.write_files(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        replace_directory(tmp, directory, old)
        return directory

    def write_files(self, directory: Path) -> None:
        tensors = {name: t.detach().float().cpu().contiguous() for name, t in self.state_dict().items()}
        save_file(tensors, directory / "activations.safetensors", metadata={"format": FORMAT})
        (directory / "af_config.json").write_text(json.dumps(self.af_config(), indent=2))
        (directory / "README.md").write_text(self.model_card(), encoding="utf-8")
        plot_activations(self, directory / "activations.png", title=self.title())

    def model_card(self) -> str:
        """README.md of the bank's folder or Hub repo: front matter for Hub search, the plot, the numbers."""
        config, spec = self.settings, parse_af_spec(self.settings.af_type)
        kinds = sorted({kind for kind in (spec.mlp, spec.att) if is_learnable(kind)})
        settings = (f"af_type={str(spec)!r}, af_layer_specific={config.af_layer_specific}, "
                    f"af_range={config.af_range!r}, af_n_anchors={config.af_n_anchors}, "
                    f"num_hidden_layers={config.num_hidden_layers}")
        return "\n".join([
            "---", "library_name: afgpt", "tags:",
            *(f"- {tag}" for tag in ["afgpt", "activation-functions", "learned-activations", *kinds]), "---", "",
            f"# Learned activation functions: `{spec}`", "",
            "Activation functions learned with afgpt; load them frozen into a fresh model (stage II):", "",
            "```python", "import afgpt", "",
            'bank = afgpt.load_activations("<this repo id or folder>")',
            f"model = afgpt.AfGPTForCausalLM(afgpt.AfGPTConfig({settings}))",
            "model.load_activations(bank, freeze=True)", "```", "",
            f"- activations: `{spec}` (MLP `{spec.mlp}`, attention `{spec.att}`)",
            f"- sharing: {SHARING[config.af_layer_specific]} (af_layer_specific={config.af_layer_specific})",
            f"- anchor grid: {config.af_n_anchors} anchors evenly spaced on ±{config.af_range:g}",
            f"- layers: {config.num_hidden_layers}", "",
            "![](activations.png)", "",
            "## Provenance", "", "| field | value |", "|---|---|",
            *(f"| {name} | {cell(value)} |" for name, value in self.provenance_rows()), "",
        ])

    def provenance_rows(self) -> list[tuple[str, object]]:
        p = self.provenance
        rows = [("run", p.get("run")), ("af_type", f"`{parse_af_spec(self.settings.af_type)}`"),
                ("sharing", SHARING[self.settings.af_layer_specific]), ("steps", p.get("steps")),
                ("n_models", p.get("n_models")), ("data", p.get("data")), ("seed", p.get("seed")),
                ("final val loss", loss_text(p.get("final_val_loss")))]
        if "baseline_val_loss" in p:
            rows.append(("val loss vs baseline", versus_baseline(p.get("final_val_loss"), p["baseline_val_loss"])))
        return rows

    def lmafs_rows(self) -> list[str]:
        """The learnable rows, checked to be splines: the only learnable activations lm-afs files hold."""
        spec, rows = parse_af_spec(self.settings.af_type), self.learnable_rows()
        if not rows or any(getattr(spec, row) not in LMAFS_SPLINES for row in rows):
            raise ValueError(
                f"af_type={str(spec)!r} cannot be written as an lm-afs file, which holds only splines "
                f"({', '.join(LMAFS_SPLINES)}): save the bank with bank.save(directory) instead")
        return rows

    def per_layer(self, row: str) -> list[nn.Module]:
        """The activation module of each layer in `row` (a shared one repeated), as lm-afs lists them."""
        return self.activations.per_layer(row)

    def to_lmafs_csv(self, path: str | os.PathLike) -> Path:
        """Write lm-afs's ptAf CSV atomically: an anchors line and a values line per spline, the MLP
        activation of every layer, then the attention activation of every layer."""
        lines = [csv_numbers(t) for row in self.lmafs_rows() for spline in self.per_layer(row)
                 for t in (spline.anchors, spline.values)]
        return write_text_atomically(path, "".join(f"{line}\n" for line in lines))

    def to_lmafs_pt(self, path: str | os.PathLike, config: dict | None = None) -> Path:
        """Write lm-afs's ptAf .pt atomically so lm-afs's trainLmAf.py loads it for stage II: per-layer lists
        of Parameters (a shared one repeated) and the config as lm-afs's `__main__.Hyperparameters`, whose
        fields lm-afs reads as attributes. `config` adds or overrides lm-afs fields (e.g. a run's flags)."""
        rows, spec, bank = self.lmafs_rows(), parse_af_spec(self.settings.af_type), self.settings
        params = {id(m): nn.Parameter(m.values.detach().float().cpu().clone())
                  for row in rows for m in getattr(self.activations, row)}
        values = {row: [params[id(m)] for m in self.per_layer(row)] for row in rows}
        hyperparameters = LmAfsHyperparameters()
        vars(hyperparameters).update(
            dict(afType=[spec.mlp, spec.att], afLayerSpecific=bank.af_layer_specific, afRange=bank.af_range,
                 afNAnchors=bank.af_n_anchors, nLayers=bank.num_hidden_layers, dimEmb=bank.hidden_size),
            **(config or {}))
        data = dict(config=hyperparameters, afValsMlp=values.get("mlp", []), afValsAtt=values.get("att", []),
                    afAnchors=self.per_layer(rows[0])[0].anchors.detach().float().cpu().clone())

        def save(tmp: Path) -> None:
            with lmafs_class_in_main():
                torch.save(data, tmp)

        return write_atomically(path, save)

    def push_to_hub(self, repo_id: str, token: str | None = None, private: bool = False,
                    commit_message: str = "Upload learned activation functions") -> "CommitInfo":
        """Save the bank into a temporary folder and upload it as a Hub model repo (created if needed)."""
        from huggingface_hub import create_repo, upload_folder  # here: huggingface_hub loads when the Hub is used

        with tempfile.TemporaryDirectory() as tmp:
            folder = self.save(Path(tmp) / "activations")
            repo = create_repo(repo_id, token=token, private=private, exist_ok=True, repo_type="model")
            return upload_folder(repo_id=repo.repo_id, folder_path=folder, token=token, repo_type="model",
                                 commit_message=commit_message)

    # ------------------------------------------------------------------ loading into a model

    def load_into(self, model: nn.Module, freeze: bool = True) -> nn.Module:
        """Copy the bank into a model's activation set (stage II; AfGPT or patched), after explaining every way
        the two do not fit; `freeze` stops those parameters from training."""
        problems = self.mismatches(model)
        if problems:
            raise ValueError("the activation bank does not fit this model:\n- " + "\n- ".join(problems))
        target = find_activation_set(model)
        sources = bank_slots(self.settings, target.settings)
        for row in self.learnable_rows():
            for slot, module in enumerate(getattr(target, row)):
                (source,) = sources[slot]
                module.load_state_dict(getattr(self.activations, row)[source].state_dict())
                if freeze:
                    module.requires_grad_(False)
        return model

    def width_fix(self, row: str, width: int) -> str:
        """The setting that gives a model the bank's width in `row`: the MLP row of a GLU bank sees the GLU's gate
        width, which the bank's ffn_type and intermediate_size give, not intermediate_size=width."""
        if row == "mlp" and self.settings.ffn_type != "mlp":
            return (f"ffn_type={self.settings.ffn_type!r} and intermediate_size={self.settings.intermediate_size} "
                    "(the bank's)")
        return f"{ROW_WIDTH[row]}={width}"

    def mismatches(self, model: nn.Module) -> list[str]:
        """Every way the bank does not fit `model`, each with its fix. Kinds must agree wherever either
        side learns; a row neither side learns carries no tensors, so its fixed functions may differ."""
        target = find_activation_set(model)
        config = target.settings
        ours, theirs = parse_af_spec(self.settings.af_type), parse_af_spec(config.af_type)
        problems, rows = [], []
        for row, name in ROWS.items():
            kind, model_kind = getattr(ours, row), getattr(theirs, row)
            if kind != model_kind and (is_learnable(kind) or is_learnable(model_kind)):
                problems.append(f"{name} activation: the bank holds {kind!r} but the model uses {model_kind!r}; "
                                f"build the model with af_type={str(ours)!r}")
            elif is_learnable(kind):
                rows.append(row)
        modules = {row: (getattr(self.activations, row)[0], getattr(target, row)[0]) for row in rows}
        for row, (module, model_module) in modules.items():
            width, model_width = getattr(module, "channels", None), getattr(model_module, "channels", None)
            if width != model_width:
                problems.append(f"{ROWS[row]} activation {getattr(ours, row)!r} has {width} channels in the bank but "
                                f"{model_width} in the model; build the model with {self.width_fix(row, width)}")
        grids = [module.grid for module, _ in modules.values() if isinstance(module, Spline)]
        if grids and not grids_match(grids[0], config):
            problems.append(
                f"anchor grid: the bank's splines have {grids[0].n_anchors} anchors on ±{grids[0].af_range:g} but the "
                f"model's have {config.af_n_anchors} on ±{config.af_range:g}; build the model with "
                f"af_range={grids[0].af_range!r}, af_n_anchors={grids[0].n_anchors}")
        if rows:
            problems += structure_mismatches(self.settings, config)
        return problems


# ---------------------------------------------------------------------------- helpers of the bank


def csv_numbers(t: torch.Tensor) -> str:
    """Comma-separated, every value written so it reads back to the same float32."""
    return ",".join(repr(v) for v in t.detach().float().flatten().tolist())


def loss_text(loss) -> str | None:
    return None if loss is None else f"{loss:.4f}"


def versus_baseline(loss, baseline) -> str | None:
    if loss is None or baseline is None:
        return None
    return f"{loss - baseline:+.4f} (baseline {baseline:.4f})"


def cell(value) -> str:
    return MISSING if value is None else str(value).replace("|", "\\|").replace("\n", " ")


def grids_match(grid, config) -> bool:
    return grid.n_anchors == config.af_n_anchors and math.isclose(grid.af_range, config.af_range, rel_tol=1e-6)


def bank_slots(bank, config) -> list[set[int]]:
    """For each of the model's slots, the bank slots of the layers that use it (one, when they fit).
    Call only when depths match or the bank is layer-shared."""
    n, sources = config.num_hidden_layers, []
    for layer in range(n):
        slot = activation_slot(layer, n, config.af_layer_specific)
        if slot == len(sources):
            sources.append(set())
        sources[slot].add(activation_slot(layer, n, bank.af_layer_specific))
    return sources


def structure_mismatches(bank, config) -> list[str]:
    """Depth and sharing: a layer-shared bank fits any depth; others need the model's depth, and the
    model may not share one activation across layers the bank gives different ones."""
    if bank.af_layer_specific != 0 and bank.num_hidden_layers != config.num_hidden_layers:
        return [f"layer count: the bank holds activations for {bank.num_hidden_layers} layers "
                f"(af_layer_specific={bank.af_layer_specific}: {SHARING[bank.af_layer_specific]}) but the model has "
                f"{config.num_hidden_layers}; only a layer-shared bank (af_layer_specific=0) fits any depth, so build "
                f"the model with num_hidden_layers={bank.num_hidden_layers}"]
    problems = []
    for slot, sources in enumerate(bank_slots(bank, config)):
        if len(sources) > 1:
            problems.append(
                f"sharing: the model shares one activation across {config.layer_span(slot)} "
                f"(af_layer_specific={config.af_layer_specific}) but the bank holds {len(sources)} different ones "
                f"for them; build the model with af_layer_specific={bank.af_layer_specific}")
    return problems


# ---------------------------------------------------------------------------- reading


def read_activations(path: str | os.PathLike, **hints) -> ActivationBank:
    """Read learned activations from a bank directory (or a run or model directory with an activations/
    subfolder), or from lm-afs's ptAf-*.csv or ptAf-*.pt.

    Hints (num_hidden_layers, af_type, af_layer_specific, hidden_size, intermediate_size) settle only what
    a file leaves open: a CSV's layout, a .pt without its config. Settings a file records win, so callers
    may pass their model's settings; `load_into` then explains any mismatch with the model.
    """
    unknown = sorted(set(hints) - set(HINTS))
    if unknown:
        raise TypeError(f"unknown hint(s) {', '.join(unknown)}: the hints are {', '.join(HINTS)}")
    path = Path(path)
    if path.is_dir():
        bank = read_bank_directory(bank_directory(path))
    elif not path.exists():
        raise FileNotFoundError(f"{path} does not exist: pass a bank directory, a run or model directory, "
                                "or an lm-afs ptAf-*.csv / ptAf-*.pt file")
    elif path.suffix == ".csv":
        bank = read_lmafs_csv(path, hints)
    elif path.suffix == ".pt":
        bank = read_lmafs_pt(path, hints)
    else:
        raise ValueError(f"{path}: unknown activation file type {path.suffix!r}: pass a bank directory, or an "
                         "lm-afs ptAf-*.csv / ptAf-*.pt file")
    return bank


def plot_activations(source: nn.Module, path: str | os.PathLike, title: str | None = None) -> None:
    """plotting.plot_activations, imported on the first plot: plotting sits above the bank in the import order,
    and matplotlib loads only when a plot is drawn."""
    from .plotting import plot_activations as plot

    plot(source, path, title)


def plot_activation_file(source: str | os.PathLike | ActivationBank, out_path: str | os.PathLike, **hints) -> Path:
    """`afgpt plot PATH`: the functions of a bank or of anything read_activations reads, as a PNG."""
    bank = source if isinstance(source, ActivationBank) else read_activations(source, **hints)
    plot_activations(bank, out_path, title=bank.title())
    return Path(out_path)


def build_bank(fields: dict, state: dict[str, torch.Tensor], provenance: dict, source: Path) -> ActivationBank:
    """A bank shaped like the activation set that `fields` (ActivationSettings) describe, holding `state`."""
    config = ActivationSettings(**fields)
    activations = ActivationSet(config)
    expected = {name: tuple(t.shape) for name, t in activations.state_dict().items()}
    found = {name: tuple(t.shape) for name, t in state.items()}
    if found != expected:
        def shapes(d: dict) -> str:
            return ", ".join(f"{name} {list(shape)}" for name, shape in sorted(d.items())) or "nothing"

        raise ValueError(
            f"{source} holds {shapes(found)}, but af_type={config.af_type!r}, af_layer_specific="
            f"{config.af_layer_specific}, {config.num_hidden_layers} layers, hidden_size={config.hidden_size}, "
            f"intermediate_size={config.intermediate_size} need {shapes(expected)}: the file is damaged or the "
            "settings (from the file or the hints) are wrong")
    activations.load_state_dict({name: t.float() for name, t in state.items()})
    return ActivationBank(activations, provenance)


def bank_directory(path: Path) -> Path:
    for candidate in (path, path / "activations"):
        if (candidate / "af_config.json").is_file():
            return candidate
    raise FileNotFoundError(
        f"{path} holds no activation bank: expected af_config.json and activations.safetensors in it or in its "
        "activations/ subfolder (as training writes); pass lm-afs files by their own path (ptAf-*.csv, ptAf-*.pt)")


def read_bank_directory(directory: Path) -> ActivationBank:
    meta = json.loads((directory / "af_config.json").read_text())
    if (meta.get("format"), meta.get("version")) != (FORMAT, VERSION):
        raise ValueError(f"{directory / 'af_config.json'} has format {meta.get('format')!r} version "
                         f"{meta.get('version')!r}; this afgpt reads {FORMAT!r} version {VERSION}: upgrade afgpt")
    missing = [key for key in CONFIG_KEYS if key not in meta]
    if missing:
        raise ValueError(f"{directory / 'af_config.json'} lacks {', '.join(missing)}: the bank is damaged; "
                         "save it again")
    fields = {key: meta[key] for key in CONFIG_KEYS} | {"ffn_type": meta.get("ffn_type", "mlp")}  # older banks: mlp
    return build_bank(fields, load_file(directory / "activations.safetensors"), meta.get("provenance", {}), directory)


# ---------------------------------------------------------------------------- lm-afs files


def read_lmafs_csv(path: Path, hints: dict) -> ActivationBank:
    """lm-afs's CSV: pairs of lines (anchors, values), the MLP activation of every layer, then the
    attention activation of every layer; only splines are written, a shared one once per layer."""
    anchors, values = parse_csv(path)
    af_range, n_anchors = infer_grid(anchors, path)
    for i, v in enumerate(values):
        if v.numel() % n_anchors:
            raise ValueError(f"{path}: activation {i} has {v.numel()} values for {n_anchors} anchors; a spline has one "
                             "value per anchor (per channel): the file is damaged")
    values = [v if v.numel() == n_anchors else v.view(-1, n_anchors) for v in values]  # splinePerDim: [channels, K]
    af_type, num_layers = csv_layout(values, hints, path)
    spec = parse_af_spec(af_type)
    rows = [row for row in ROWS if is_learnable(getattr(spec, row))]
    per_layer = {row: values[i * num_layers:(i + 1) * num_layers] for i, row in enumerate(rows)}
    for row, row_values in per_layer.items():
        found = {spline_kind(v) for v in row_values}
        if found != {getattr(spec, row)}:
            raise ValueError(f"{path}: the {ROWS[row]} lines hold {' and '.join(sorted(found))} activations but "
                             f"af_type={af_type!r} says {getattr(spec, row)!r}: correct the af_type hint")
    sharing = hints.get("af_layer_specific", infer_sharing(list(per_layer.values()), num_layers))
    fields = dict(af_type=af_type, af_layer_specific=sharing, af_range=af_range, af_n_anchors=n_anchors,
                  num_hidden_layers=num_layers, **widths(per_layer, hints))
    return build_bank(fields, slot_state(per_layer, num_layers, sharing, path), lmafs_provenance(path), path)


def parse_csv(path: Path) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines or len(lines) % 2:
        raise ValueError(f"{path} has {len(lines)} non-empty lines: an lm-afs activation CSV has an anchors line "
                         "then a values line for each activation")
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            rows.append(torch.tensor([float(v) for v in line.split(",")], dtype=torch.float32))
        except ValueError:
            raise ValueError(f"{path}: line {number} is not comma-separated numbers: {line[:80]!r}") from None
    return rows[0::2], rows[1::2]


def infer_grid(anchors: list[torch.Tensor], source: Path) -> tuple[float, int]:
    """(af_range, n_anchors) from anchors, which lm-afs makes as linspace(-range, range, K) in float32."""
    n_anchors = len(anchors[0])
    af_range = float(f"{anchors[0][-1].item():.6g}")  # the float32 anchor rounded back to what was asked for
    expected = torch.linspace(-af_range, af_range, n_anchors)
    for i, a in enumerate(anchors):
        if a.shape != expected.shape or not torch.allclose(a, expected, rtol=1e-5, atol=1e-6 * af_range):
            raise ValueError(f"{source}: the anchors of activation {i} are not {n_anchors} evenly spaced points on "
                             f"±{af_range:g} like the first activation's; afgpt splines need one such grid")
    return af_range, n_anchors


def spline_kind(values: torch.Tensor) -> str:
    return "spline" if values.dim() == 1 else "splinePerDim"


def csv_layout(values: list[torch.Tensor], hints: dict, source: Path) -> tuple[str, int]:
    """(af_type, num_hidden_layers): the CSV says how many functions it holds, not which are MLP or
    attention, so the hints decide where that is open."""
    n = len(values)
    if "af_type" in hints:
        spec = parse_af_spec(hints["af_type"])
        rows = sum(is_learnable(kind) for kind in (spec.mlp, spec.att))
        if rows == 0 or n % rows:
            raise ValueError(f"{source} holds {n} activations, which af_type={hints['af_type']!r} ({rows} learnable "
                             "per layer) cannot split into layers: correct the af_type hint")
        return str(spec), n // rows
    layers = hints.get("num_hidden_layers")
    if layers is None and n % 2 == 0:
        raise ValueError(f"{source} holds {n} activations, which may be {n} layers with a learnable MLP or attention "
                         f"activation, or {n // 2} layers with both: pass num_hidden_layers=... (and af_type=..., e.g. "
                         "'spline;att-linear', if only one of MLP and attention is learnable)")
    if layers in (None, n):
        raise ValueError(f"{source} holds one activation per layer, either MLP or attention: pass af_type=..., "
                         "e.g. 'spline;att-linear' (MLP) or 'gelu;att-spline' (attention)")
    if n == 2 * layers:
        return f"{spline_kind(values[0])};att-{spline_kind(values[layers])}", layers
    raise ValueError(f"{source} holds {n} activations, neither num_hidden_layers={layers} nor twice that: "
                     "correct the num_hidden_layers hint")


def shares(values: list[torch.Tensor], num_layers: int, sharing: int) -> bool:
    """Whether the layers that `sharing` gives one slot hold equal values."""
    first: dict[int, torch.Tensor] = {}
    return all(torch.equal(first.setdefault(activation_slot(layer, num_layers, sharing), v), v)
               for layer, v in enumerate(values))


def infer_sharing(rows: list[list[torch.Tensor]], num_layers: int) -> int:
    """The most sharing the values allow: lm-afs writes a shared function once per layer, and trained
    layer-specific functions never coincide. (Sharing 2 differs from 1 only from 4 layers on.)"""
    candidates = (0, 2, 1) if num_layers >= 4 else (0, 1)
    return next(s for s in candidates if all(shares(values, num_layers, s) for values in rows))


def slot_state(per_layer: dict[str, list[torch.Tensor]], num_layers: int, sharing: int, source: Path) -> dict:
    """Per-layer values -> the bank's tensors ("mlp.0.values", ...), checking that shared layers agree."""
    state = {}
    for row, values in per_layer.items():
        if len(values) != num_layers:
            raise ValueError(f"{source} holds {len(values)} {ROWS[row]} activations for {num_layers} layers: "
                             "the file is incomplete, or af_type/num_hidden_layers are wrong")
        if not shares(values, num_layers, sharing):
            raise ValueError(f"{source}: layers that af_layer_specific={sharing} would share hold different "
                             f"{ROWS[row]} activations: pass af_layer_specific=1")
        for layer, v in enumerate(values):
            state.setdefault(f"{row}.{activation_slot(layer, num_layers, sharing)}.values", v)
    return state


def widths(per_layer: dict[str, list[torch.Tensor]], hints: dict) -> dict:
    """hidden_size and intermediate_size: hints, else per-channel spline widths, else lm-afs's 4x MLP ratio."""
    found = {ROW_WIDTH[row]: values[0].shape[0] for row, values in per_layer.items() if values[0].dim() == 2}
    found.update({key: hints[key] for key in ("hidden_size", "intermediate_size") if key in hints})
    if "hidden_size" not in found and "intermediate_size" in found:
        found["hidden_size"] = max(1, found["intermediate_size"] // LMAFS_MLP_RATIO)
    return found


def lmafs_provenance(path: Path) -> dict:
    match = LMAFS_NAME.match(path.stem)
    provenance = {"source": str(path)}
    if match:
        provenance.update(run=match["run"], steps=int(match["steps"]))
    return provenance


class LmAfsHyperparameters:
    """Stand-in for lm-afs's `__main__.Hyperparameters` dataclass, under its name: unpickling it only records
    its fields, and lm-afs unpickles what afgpt writes as its own class."""

    __module__ = "__main__"
    __qualname__ = "Hyperparameters"


@contextlib.contextmanager
def lmafs_class_in_main():
    """Let pickle find the stand-in where its name says, as __main__.Hyperparameters, while saving."""
    main, missing = sys.modules["__main__"], object()
    previous = getattr(main, "Hyperparameters", missing)
    main.Hyperparameters = LmAfsHyperparameters
    try:
        yield
    finally:
        if previous is missing:
            del main.Hyperparameters
        else:
            main.Hyperparameters = previous


def read_lmafs_pt(path: Path, hints: dict) -> ActivationBank:
    """lm-afs's .pt: {config, afAnchors, afValsMlp, afValsAtt} (per-layer lists), or legacy {config,
    afAnchors, afVals}. The settings come from the pickled config; hints fill what it lacks."""
    data = load_lmafs_pickle(path)
    if not isinstance(data, dict) or "afAnchors" not in data or not {"afValsMlp", "afVals"} & set(data):
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path} is not an lm-afs activation file: expected a dict with afAnchors and afValsMlp/"
                         f"afValsAtt (or afVals), found {keys}")
    config = data.get("config", {})
    lmafs = config if isinstance(config, dict) else vars(config)
    fields = pt_fields(lmafs, hints, path)
    fields["af_range"], fields["af_n_anchors"] = infer_grid([data["afAnchors"].detach().float().flatten()], path)
    per_layer = {row: [v.detach().float() for v in values]
                 for row, values in pt_values(data, parse_af_spec(fields["af_type"]), path).items()}
    provenance = lmafs_provenance(path)
    for theirs, ours in (("runName", "run"), ("nModels", "n_models"), ("seed", "seed"), ("filesTokensTr", "data")):
        if lmafs.get(theirs) not in (None, ""):
            provenance[ours] = lmafs[theirs]
    state = slot_state(per_layer, fields["num_hidden_layers"], fields["af_layer_specific"], path)
    return build_bank(fields, state, provenance, path)


def pt_fields(lmafs: dict, hints: dict, source: Path) -> dict:
    """AfGPTConfig fields from lm-afs's config fields, the hints filling what it lacks."""
    fields = {**hints, **{ours: lmafs[theirs] for theirs, ours in LMAFS_CONFIG_FIELDS.items() if theirs in lmafs}}
    for name in ("af_type", "num_hidden_layers", "af_layer_specific"):
        if name not in fields:
            raise ValueError(f"{source} does not record {name} (its config lacks it): pass {name}=... as a hint")
    if isinstance(fields["af_type"], (list, tuple)):  # lm-afs splits its afType into [mlp, att]
        fields["af_type"] = "{};att-{}".format(*fields["af_type"])
    if "dimEmb" in lmafs and "intermediate_size" not in fields:
        fields["intermediate_size"] = LMAFS_MLP_RATIO * lmafs["dimEmb"]
    fields.update(af_type=str(parse_af_spec(fields["af_type"])), num_hidden_layers=int(fields["num_hidden_layers"]),
                  af_layer_specific=int(fields["af_layer_specific"]))
    return fields


def pt_values(data: dict, spec, source: Path) -> dict[str, list[torch.Tensor]]:
    """Per-layer values of each learnable row; a row that is not learnable must hold none."""
    rows = [row for row in ROWS if is_learnable(getattr(spec, row))]
    if "afVals" in data:  # legacy: one list, for the one learnable row
        if len(rows) != 1:
            raise ValueError(f"{source} is a legacy file with a single afVals list, but af_type={str(spec)!r} has "
                             f"{len(rows)} learnable rows: it cannot say which they belong to; re-export it")
        return {rows[0]: list(data["afVals"])}
    found = {"mlp": list(data.get("afValsMlp") or []), "att": list(data.get("afValsAtt") or [])}
    for row, values in found.items():
        if values and row not in rows:
            raise ValueError(f"{source} holds {ROWS[row]} activation values but its af_type={str(spec)!r} has no "
                             f"learnable {ROWS[row]} activation: correct the af_type hint")
    return {row: found[row] for row in rows}


def load_lmafs_pickle(path: Path):
    """torch.load restricted to tensors, plain containers and lm-afs's config class: a pickle can run
    any code, and an activation file has no reason to."""
    with torch.serialization.safe_globals([LmAfsHyperparameters]):
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except ValueError:  # not torch.save's zip format: weights_only below still refuses, less clearly
            unsafe = []
        if unsafe:
            raise ValueError(
                f"{path}: refusing to unpickle {', '.join(sorted(unsafe))}: an lm-afs activation file holds only "
                "tensors, lists, dicts and __main__.Hyperparameters, and loading this could run arbitrary code. "
                "Read the ptAf-*.csv lm-afs wrote beside it, or re-save the values as plain tensors")
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            reason = next((line for line in str(error).splitlines() if "GLOBAL" in line), str(error).splitlines()[0])
            raise ValueError(f"{path}: refusing to unpickle it: {reason} Read the ptAf-*.csv lm-afs wrote beside it "
                             "instead") from None
