"""ActivationBank: its directory format, lm-afs's CSV and .pt files, and loading into models."""
import json
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch

import afgpt
from afgpt import bank as bank_lib
from afgpt import plotting
from afgpt.activations import Spline
from afgpt.bank import ActivationBank, plot_activation_file, read_activations
from afgpt.activation_set import ActivationSet, ActivationSettings

from conftest import perturb, tiny_config

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
GRID = dict(af_range=3.0, af_n_anchors=16)


def tiny_model(af_type: str, sharing: int = 1, seed: int = 0, **overrides) -> afgpt.AfGPTForCausalLM:
    """Perturbed so every slot and channel holds a different function."""
    config = tiny_config(af_type=af_type, af_layer_specific=sharing, af_init=-1, **GRID, **overrides)
    return perturb(afgpt.AfGPTForCausalLM(config), scale=0.2, seed=seed)


def bank_of(af_type: str, sharing: int = 1, **overrides) -> ActivationBank:
    return ActivationBank.from_model(tiny_model(af_type, sharing, **overrides))


def assert_same_tensors(bank: ActivationBank, expected: dict[str, torch.Tensor]) -> None:
    state = bank.state_dict()
    assert state.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name


def per_layer(bank: ActivationBank, row: str) -> list[torch.Tensor]:
    """The values each layer uses, as lm-afs lists them."""
    return [module.values.detach() for module in bank.per_layer(row)]


# ---------------------------------------------------------------------------- bank directories


@pytest.mark.parametrize("af_type,sharing", [("spline;att-spline", 1), ("splinePerDim;att-none", 2),
                                             ("prelu;att-rational", 0)])
def test_save_and_read_round_trip(tmp_path, af_type, sharing):
    bank = bank_of(af_type, sharing)
    bank.provenance = {"run": "runs/a", "steps": 30, "final_val_loss": 4.25}
    directory = bank.save(tmp_path / "bank")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bank"]  # no temp or old directory left
    assert sorted(p.name for p in directory.iterdir()) == [
        "README.md", "activations.png", "activations.safetensors", "af_config.json"]
    assert (directory / "activations.png").read_bytes()[:8] == PNG_MAGIC
    config = json.loads((directory / "af_config.json").read_text())
    assert config == {"format": "afgpt-activations", "version": 1, "af_type": af_type, "af_layer_specific": sharing,
                      "af_range": 3.0, "af_n_anchors": 16, "num_hidden_layers": 4, "hidden_size": 32,
                      "intermediate_size": 128, "ffn_type": "mlp", "provenance": bank.provenance}
    read = read_activations(directory)
    assert_same_tensors(read, bank.state_dict())
    assert read.af_config() == config
    assert isinstance(read.activations, ActivationSet)


def test_read_run_directory_whose_settings_win_over_hints(tmp_path):
    """Callers pass their model's settings as hints; a bank records its own, and load_into compares."""
    bank = bank_of("spline;att-spline", 0)
    bank.save(tmp_path / "run" / "activations")
    read = read_activations(tmp_path / "run", num_hidden_layers=6, af_layer_specific=1)
    assert_same_tensors(read, bank.state_dict())
    assert list(read.state_dict()) == ["mlp.0.values", "att.0.values"]
    assert (read.settings.num_hidden_layers, read.settings.af_layer_specific) == (4, 0)


def test_read_errors_name_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="activations/ subfolder"):
        read_activations(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_activations(tmp_path / "nothing.csv")
    with pytest.raises(TypeError, match="unknown hint.*layers.*the hints are num_hidden_layers"):
        read_activations(tmp_path, layers=4)
    directory = bank_of("spline;att-none").save(tmp_path / "bank")
    config = json.loads((directory / "af_config.json").read_text())
    (directory / "af_config.json").write_text(json.dumps({**config, "version": 2}))
    with pytest.raises(ValueError, match="version 2.*upgrade afgpt"):
        read_activations(directory)
    (directory / "af_config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(ValueError, match="holds mlp.0.values.*need.*damaged"):
        read_activations(directory)


def test_failed_save_leaves_the_old_bank(tmp_path, monkeypatch):
    old = bank_of("spline;att-spline", seed=1)
    directory = old.save(tmp_path / "bank")
    before = {p.name: p.read_bytes() for p in directory.iterdir()}

    def crash(tensors, path, metadata=None):
        Path(path).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(bank_lib, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        bank_of("spline;att-spline", seed=2).save(directory)
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["bank"]
    monkeypatch.undo()
    new = bank_of("spline;att-spline", seed=2)
    new.save(directory)
    assert_same_tensors(read_activations(directory), new.state_dict())
    assert [p.name for p in tmp_path.iterdir()] == ["bank"]


def test_model_card(tmp_path):
    bank = bank_of("splinePerDim;att-spline", 0)
    bank.provenance = {"run": "stage1", "steps": 20000, "n_models": 20, "data": "fineweb|10B", "seed": 3,
                       "final_val_loss": 4.9006, "baseline_val_loss": 4.9334}
    card = (bank.save(tmp_path / "bank") / "README.md").read_text()
    front, body = card.split("---\n")[1:3]
    assert "library_name: afgpt" in front
    assert {"- afgpt", "- activation-functions", "- spline", "- splinePerDim"} <= set(front.splitlines())
    assert "![](activations.png)" in body
    assert "one activation shared by all layers" in body and "16 anchors evenly spaced on ±3" in body
    assert "- layers: 4" in body
    for row in ["| run | stage1 |", "| af_type | `splinePerDim;att-spline` |", "| steps | 20000 |",
                "| n_models | 20 |", "| data | fineweb\\|10B |", "| seed | 3 |", "| final val loss | 4.9006 |",
                "| val loss vs baseline | -0.0328 (baseline 4.9334) |"]:
        assert row in body
    bank.provenance = {"run": "stage1"}
    card = bank.model_card()
    assert "| steps | — |" in card and "vs baseline" not in card


def test_push_to_hub_saves_creates_and_uploads(monkeypatch):
    calls = {}

    def create_repo(repo_id, **kwargs):
        calls["create"] = (repo_id, kwargs)
        return type("RepoUrl", (), {"repo_id": f"user/{repo_id}"})()

    def upload_folder(**kwargs):
        calls["upload"] = kwargs
        calls["files"] = sorted(p.name for p in Path(kwargs["folder_path"]).iterdir())
        return "commit-info"

    monkeypatch.setattr(huggingface_hub, "create_repo", create_repo)  # push_to_hub imports them when called
    monkeypatch.setattr(huggingface_hub, "upload_folder", upload_folder)
    result = bank_of("spline;att-none").push_to_hub("afs", token="t", private=True, commit_message="stage I")
    assert result == "commit-info"
    assert calls["create"] == ("afs", dict(token="t", private=True, exist_ok=True, repo_type="model"))
    upload = calls["upload"]
    assert (upload["repo_id"], upload["token"], upload["repo_type"], upload["commit_message"]) == (
        "user/afs", "t", "model", "stage I")
    assert calls["files"] == ["README.md", "activations.png", "activations.safetensors", "af_config.json"]
    assert not Path(upload["folder_path"]).exists()  # the temporary folder is cleaned up


# ---------------------------------------------------------------------------- lm-afs CSV


def lmafs_csv(path: Path, anchors: torch.Tensor, functions: list[torch.Tensor]) -> Path:
    """lm-afs's own writer's layout and number format: anchors from tolist(), values through numpy float32."""
    with open(path, "w") as f:
        for values in functions:
            f.write(",".join(map(str, anchors.tolist())) + "\n")
            f.write(",".join(map(str, values.float().numpy().reshape(-1))) + "\n")
    return path


CSV_CASES = [("spline;att-spline", 1, {"num_hidden_layers": 4}),
             ("spline;att-spline", 0, {"num_hidden_layers": 4}),
             ("splinePerDim;att-none", 2, {"af_type": "splinePerDim;att-none"}),
             ("gelu;att-spline", 1, {"af_type": "relu;att-spline"})]


@pytest.mark.parametrize("af_type,sharing,hints", CSV_CASES)
def test_csv_round_trip(tmp_path, af_type, sharing, hints):
    model = tiny_model(af_type, sharing)
    bank = ActivationBank.from_model(model)
    path = bank.to_lmafs_csv(tmp_path / "ptAf-stage1-step0300.csv")
    lines = [torch.tensor([float(v) for v in line.split(",")]) for line in path.read_text().splitlines()]
    acts = model.model.activations  # lm-afs: every layer's MLP, then attention
    splines = [m for row in acts.rows() for m in acts.per_layer(row) if isinstance(m, Spline)]
    assert len(lines) == 2 * len(splines) > 0
    for anchors, values, spline in zip(lines[0::2], lines[1::2], splines):
        assert torch.equal(anchors, torch.linspace(-3, 3, 16))
        assert torch.equal(values, spline.values.detach().flatten())
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    read = read_activations(path, **hints)
    assert_same_tensors(read, bank.state_dict())
    assert (read.settings.af_layer_specific, read.settings.num_hidden_layers) == (sharing, 4)
    assert (read.settings.af_range, read.settings.af_n_anchors) == (3.0, 16)
    assert read.provenance == {"source": str(path), "run": "stage1", "steps": 300}
    if "splinePerDim" in af_type:
        assert read.settings.intermediate_size == 128 and read.settings.hidden_size == 32  # lm-afs's 4x MLP


def test_csv_in_lmafs_number_format(tmp_path):
    """lm-afs writes str(np.float32): the shortest text that reads back to the same float32."""
    anchors = torch.linspace(-15, 15, 64)
    functions = [torch.randn(64, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    read = read_activations(lmafs_csv(tmp_path / "ptAf-x-step20000.csv", anchors, functions), num_hidden_layers=3)
    assert (read.settings.af_type, read.settings.af_layer_specific) == ("spline;att-spline", 1)
    assert (read.settings.af_range, read.settings.af_n_anchors) == (15.0, 64)
    assert all(torch.equal(a, b) for a, b in zip(per_layer(read, "mlp") + per_layer(read, "att"), functions))


def test_csv_sharing_follows_the_values_unless_hinted(tmp_path):
    anchors = torch.linspace(-3, 3, 16)
    f, g, h = (torch.randn(16, generator=torch.Generator().manual_seed(i)) for i in range(3))
    middle_shared = lmafs_csv(tmp_path / "a.csv", anchors, [f, g, g, h])
    read = read_activations(middle_shared, af_type="spline;att-linear")
    assert read.settings.af_layer_specific == 2 and len(read.activations.mlp) == 3
    read = read_activations(middle_shared, af_type="spline;att-linear", af_layer_specific=1)
    assert len(read.activations.mlp) == 4
    with pytest.raises(ValueError, match="different MLP activations: pass af_layer_specific=1"):
        read_activations(middle_shared, af_type="spline;att-linear", af_layer_specific=0)


def test_ambiguous_csv_names_the_hint(tmp_path):
    anchors = torch.linspace(-3, 3, 16)
    path = lmafs_csv(tmp_path / "a.csv", anchors, [torch.randn(16) for _ in range(8)])
    with pytest.raises(ValueError, match="8 layers .* or 4 layers with both: pass num_hidden_layers="):
        read_activations(path)
    with pytest.raises(ValueError, match="either MLP or attention: pass af_type="):
        read_activations(path, num_hidden_layers=8)
    with pytest.raises(ValueError, match="neither num_hidden_layers=3 nor twice that"):
        read_activations(path, num_hidden_layers=3)
    with pytest.raises(ValueError, match="MLP lines hold spline activations but af_type=.* says 'splinePerDim'"):
        read_activations(path, af_type="splinePerDim;att-spline")
    odd = lmafs_csv(tmp_path / "b.csv", anchors, [torch.randn(16) for _ in range(3)])
    with pytest.raises(ValueError, match="pass af_type="):
        read_activations(odd)
    assert read_activations(odd, af_type="gelu;att-spline").settings.num_hidden_layers == 3


def test_csv_with_foreign_anchors_is_refused(tmp_path):
    path = tmp_path / "a.csv"
    lmafs_csv(path, torch.linspace(-3, 3, 16), [torch.randn(16)])
    with open(path, "a") as f:
        f.write(",".join(map(str, torch.linspace(-2, 3, 16).tolist())) + "\n" + ",".join(["0.5"] * 16) + "\n")
    with pytest.raises(ValueError, match="anchors of activation 1 are not 16 evenly spaced points on ±3"):
        read_activations(path, num_hidden_layers=1)
    path.write_text("1,2,3\n")
    with pytest.raises(ValueError, match="anchors line then a values line"):
        read_activations(path, num_hidden_layers=1)
    path.write_text("-1,0,1\n0.5,0.5\n")
    with pytest.raises(ValueError, match="2 values for 3 anchors"):
        read_activations(path, num_hidden_layers=1)


def test_lmafs_files_hold_only_splines(tmp_path):
    bank = bank_of("prelu;att-linear")
    with pytest.raises(ValueError, match="'prelu;att-linear' cannot be written .* bank.save"):
        bank.to_lmafs_csv(tmp_path / "a.csv")
    with pytest.raises(ValueError, match="'prelu;att-linear' cannot be written .* bank.save"):
        bank.to_lmafs_pt(tmp_path / "a.pt")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------- lm-afs .pt

LMAFS_SAVER = """
import json
import sys
from dataclasses import dataclass
import torch
from torch import nn

@dataclass
class Hyperparameters:  # as in lm-afs's trainLmAf.py, run as a script
    runName: str = ""
    seed: int = 0
    nLayers: int = 4
    nHeads: int = 4
    dimEmb: int = 256
    nModels: int = 1
    afType: str = "gelu;att-linear"
    afLayerSpecific: int = 1
    afRange: float = 15
    afNAnchors: int = 64
    filesTokensTr: str = "./data-fineweb10B/fineweb_train_*.bin"
    dtype: str = "float32"

def lmafs_file(spec: dict, out: str) -> None:
    config = Hyperparameters(runName="stage1", seed=7, nModels=20, nLayers=spec["nLayers"], dimEmb=spec["dimEmb"],
                             afLayerSpecific=spec["afLayerSpecific"], afRange=spec["afRange"],
                             afNAnchors=len(spec["anchors"]))
    config.afType = spec["afType"].split(";")  # lm-afs keeps the split list
    config.afType[1] = config.afType[1].removeprefix("att-")
    config.dtype = torch.bfloat16
    config.vocabSize = 50304
    shared = {}  # a layer-shared run holds one Parameter that every layer points to
    def param(values):
        return shared.setdefault(values.data_ptr(), nn.Parameter(values.to(torch.bfloat16)))
    mlp, att = [param(v) for v in spec["mlp"]], [param(v) for v in spec["att"]]
    if spec["legacy"]:
        data = dict(config=config, afAnchors=spec["anchors"], afVals=mlp)
    else:
        data = dict(config=config, afAnchors=spec["anchors"], afValsMlp=mlp, afValsAtt=att)
    torch.save(data, out)

def lmafs_stage2_load(path: str) -> dict:  # what lm-afs's stage II reads (it loads with weights_only=False)
    loaded = torch.load(path, weights_only=False, map_location="cpu")
    config, values = loaded["config"], loaded["afValsMlp"] + loaded["afValsAtt"]
    assert isinstance(config, Hyperparameters), type(config)
    return dict(afType=config.afType, afRange=config.afRange, afNAnchors=config.afNAnchors, nLayers=config.nLayers,
                afLayerSpecific=config.afLayerSpecific, runName=config.runName, seed=config.seed,
                parameters=all(isinstance(v, nn.Parameter) for v in values), distinct=len({id(v) for v in values}),
                anchors=loaded["afAnchors"].tolist())

jobs, to_load, summary = sys.argv[1:]
for spec, out in torch.load(jobs):
    lmafs_file(spec, out)
with open(summary, "w") as f:
    json.dump(lmafs_stage2_load(to_load), f)
"""

PT_CASES = {  # name: af_type, af_layer_specific, legacy (single afVals list), attention layers kept
    "shared": ("spline;att-spline", 0, False, None),
    "per-dim": ("splinePerDim;att-none", 1, False, None),
    "middle": ("gelu;att-spline", 2, False, None),
    "legacy": ("spline;att-linear", 1, True, None),
    "short-att": ("spline;att-spline", 1, False, 1),
}


@pytest.fixture(scope="module")
def lmafs_run(tmp_path_factory) -> tuple[dict[str, tuple[ActivationBank, Path]], ActivationBank, dict]:
    """One run of a script whose __main__ defines Hyperparameters, as lm-afs's does: it writes genuine
    lm-afs-style pickles (bank, path) per PT_CASES, and loads a .pt afgpt wrote (a layer-shared bank) the
    way lm-afs's stage II does, returning what lm-afs sees."""
    tmp = tmp_path_factory.mktemp("lmafs")
    shared = bank_of("spline;att-spline", 0)
    shared.to_lmafs_pt(tmp / "ptAf-afgpt-step0030.pt", {"runName": "afgpt", "seed": 5})
    files, jobs = {}, []
    for name, (af_type, sharing, legacy, att_layers) in PT_CASES.items():
        bank = bank_of(af_type, sharing, hidden_size=16, num_hidden_layers=5)
        config, rows = bank.settings, bank.learnable_rows()
        values = {row: per_layer(bank, row) if row in rows else [] for row in ("mlp", "att")}
        spec = dict(nLayers=config.num_hidden_layers, dimEmb=config.hidden_size, afType=config.af_type,
                    afLayerSpecific=sharing, afRange=config.af_range, legacy=legacy, mlp=values["mlp"],
                    att=values["att"][:att_layers], anchors=torch.linspace(-3, 3, config.af_n_anchors))
        (tmp / name).mkdir()
        files[name] = bank, tmp / name / "ptAf-stage1-step20000.pt"
        jobs.append((spec, str(files[name][1])))
    torch.save(jobs, tmp / "jobs.pt")
    (tmp / "trainLmAf.py").write_text(LMAFS_SAVER)
    script = [sys.executable, str(tmp / "trainLmAf.py"), str(tmp / "jobs.pt")]
    subprocess.run([*script, str(tmp / "ptAf-afgpt-step0030.pt"), str(tmp / "seen.json")], check=True)
    return files, shared, json.loads((tmp / "seen.json").read_text())


@pytest.fixture(scope="module")
def lmafs_pt(lmafs_run) -> dict[str, tuple[ActivationBank, Path]]:
    return lmafs_run[0]


def test_lmafs_loads_the_pt_afgpt_writes(lmafs_run):
    _, bank, seen = lmafs_run
    assert seen == {"afType": ["spline", "spline"], "afRange": 3.0, "afNAnchors": 16, "nLayers": 4,
                    "afLayerSpecific": 0, "runName": "afgpt", "seed": 5, "parameters": True,
                    "distinct": 2,  # one shared MLP and one shared attention Parameter, repeated per layer
                    "anchors": torch.linspace(-3, 3, 16).tolist()}


@pytest.mark.parametrize("af_type,sharing", [("spline;att-spline", 0), ("splinePerDim;att-none", 2)])
def test_pt_round_trip(tmp_path, af_type, sharing):
    bank = bank_of(af_type, sharing)
    path = bank.to_lmafs_pt(tmp_path / "ptAf-r-step7.pt", {"nModels": 3, "nLayers": 4})  # a run's flags overlap
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    assert not hasattr(sys.modules["__main__"], "Hyperparameters")  # only bound while saving
    read = read_activations(path)
    assert_same_tensors(read, bank.state_dict())
    assert read.af_config() | {"provenance": {}} == bank.af_config()
    assert read.provenance == {"source": str(path), "run": "r", "steps": 7, "n_models": 3}


def bf16(bank: ActivationBank) -> dict[str, torch.Tensor]:
    """lm-afs run in bfloat16 stores its values so."""
    return {name: t.to(torch.bfloat16).float() for name, t in bank.state_dict().items()}


@pytest.mark.parametrize("case", ["shared", "per-dim", "middle", "legacy"])
def test_read_lmafs_pt(lmafs_pt, case):
    bank, path = lmafs_pt[case]
    assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == ["__main__.Hyperparameters"]
    read = read_activations(path)
    assert_same_tensors(read, bf16(bank))
    af_type, sharing = PT_CASES[case][:2]
    assert (read.settings.af_type, read.settings.af_layer_specific, read.settings.num_hidden_layers) == (af_type, sharing, 5)
    assert (read.settings.af_range, read.settings.af_n_anchors, read.settings.hidden_size) == (3.0, 16, 16)
    assert read.provenance == {"source": str(path), "run": "stage1", "steps": 20000, "n_models": 20, "seed": 7,
                               "data": "./data-fineweb10B/fineweb_train_*.bin"}


def test_lmafs_pt_settings_win_over_hints(lmafs_pt):
    bank, path = lmafs_pt["shared"]
    read = read_activations(path, num_hidden_layers=8, af_layer_specific=1, af_type="spline;att-none")
    assert (read.settings.af_type, read.settings.af_layer_specific, read.settings.num_hidden_layers) == (
        "spline;att-spline", 0, 5)
    assert_same_tensors(read, bf16(bank))


def test_pt_with_fewer_attention_activations_than_layers_is_not_filled_from_mlp(lmafs_pt):
    """lm-afs fills missing attention activations from the MLP ones; here such a file is an error."""
    with pytest.raises(ValueError, match="1 attention activations for 5 layers"):
        read_activations(lmafs_pt["short-att"][1])


class RunsCode:
    """Unpickling this runs a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pt_with_a_forbidden_global_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "ptAf-evil-step1.pt"
    torch.save({"config": RunsCode(marker), "afAnchors": torch.linspace(-3, 3, 16), "afValsMlp": []}, path)
    with pytest.raises(ValueError, match=r"refusing to unpickle posix\.system.*arbitrary code"):
        read_activations(path)
    assert not marker.exists()


def test_pt_without_config_takes_its_settings_from_hints(tmp_path):
    bank = bank_of("spline;att-none", 1)
    path = tmp_path / "ptAf-old-step5.pt"
    torch.save({"afAnchors": torch.linspace(-3, 3, 16), "afValsMlp": per_layer(bank, "mlp"), "afValsAtt": []}, path)
    with pytest.raises(ValueError, match="does not record af_type .*: pass af_type=... as a hint"):
        read_activations(path)
    read = read_activations(path, af_type="spline;att-none", num_hidden_layers=4, af_layer_specific=1)
    assert_same_tensors(read, bank.state_dict())
    assert read.provenance == {"source": str(path), "run": "old", "steps": 5}


def test_pt_that_is_not_an_activation_file(tmp_path):
    torch.save({"weights": torch.zeros(3)}, tmp_path / "model.pt")
    with pytest.raises(ValueError, match="not an lm-afs activation file.*found \\['weights'\\]"):
        read_activations(tmp_path / "model.pt")


# ---------------------------------------------------------------------------- loading into models


def logits(model: afgpt.AfGPTForCausalLM) -> torch.Tensor:
    ids = torch.arange(12)[None] % model.config.vocab_size
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("af_type,sharing", [("spline;att-spline", 1), ("splinePerDim;att-prelu", 2)])
def test_load_into_copies_and_freezes(af_type, sharing):
    source = tiny_model(af_type, sharing, seed=1)
    model = afgpt.AfGPTForCausalLM(source.config)
    model.load_state_dict({k: v for k, v in source.state_dict().items() if ".activations." not in k}, strict=False)
    assert not torch.allclose(logits(model), logits(source))  # differs only by its activations
    assert ActivationBank.from_model(source).load_into(model) is model
    torch.testing.assert_close(logits(model), logits(source), rtol=0, atol=0)
    activations = model.model.activations
    assert not any(p.requires_grad for p in activations.parameters())
    assert all(p.requires_grad for name, p in model.named_parameters() if ".activations." not in name)
    thawed = afgpt.AfGPTForCausalLM(source.config)
    ActivationBank.from_model(source).load_into(thawed, freeze=False)
    assert all(p.requires_grad for p in thawed.parameters())


@pytest.mark.parametrize("sharing,layers", [(1, 6), (0, 2), (2, 5)])
def test_shared_bank_expands_to_any_depth(tmp_path, sharing, layers):
    bank = read_activations(bank_of("splinePerDim;att-spline", 0).save(tmp_path / "bank"))
    model = afgpt.AfGPTForCausalLM(tiny_config(af_type="splinePerDim;att-spline", af_layer_specific=sharing,
                                               num_hidden_layers=layers, **GRID))
    bank.load_into(model)
    assert len(model.model.activations.mlp) == ActivationSettings(num_hidden_layers=layers, af_layer_specific=sharing).num_slots
    for row in ("mlp", "att"):
        for module in getattr(model.model.activations, row):
            assert torch.equal(module.values, getattr(bank.activations, row)[0].values)


MISMATCHES = [
    (dict(num_hidden_layers=6), "layer count: the bank holds activations for 4 layers .* build the model with "
                                "num_hidden_layers=4"),
    (dict(af_type="gelu;att-spline"), "MLP activation: the bank holds 'spline' but the model uses 'gelu'; build the "
                                      "model with af_type='spline;att-spline'"),
    (dict(af_type="spline;att-splinePerDim"), "attention activation: the bank holds 'spline'"),
    (dict(af_range=5.0), "anchor grid: the bank's splines have 16 anchors on ±3 but the model's have 16 on ±5; "
                         "build the model with af_range=3.0, af_n_anchors=16"),
    (dict(af_n_anchors=8), "anchor grid: .* af_n_anchors=16"),
    (dict(af_layer_specific=0), "sharing: the model shares one activation across layers 0–3 .* bank holds 4 "
                                "different ones .* af_layer_specific=1"),
]


@pytest.mark.parametrize("overrides,message", MISMATCHES)
def test_load_into_explains_mismatches(overrides, message):
    model = afgpt.AfGPTForCausalLM(tiny_config(**{"af_type": "spline;att-spline", **GRID, **overrides}))
    with pytest.raises(ValueError, match=f"does not fit this model:\n- {message}"):
        bank_of("spline;att-spline", 1).load_into(model)


def test_load_into_explains_width_and_lists_every_problem():
    bank = bank_of("splinePerDim;att-prelu", 1)
    model = afgpt.AfGPTForCausalLM(tiny_config(af_type="splinePerDim;att-prelu", hidden_size=16, af_range=2.0,
                                               af_n_anchors=16))
    with pytest.raises(ValueError) as error:
        bank.load_into(model)
    problems = str(error.value).splitlines()[1:]
    assert problems == [
        "- MLP activation 'splinePerDim' has 128 channels in the bank but 64 in the model; build the model with "
        "intermediate_size=128",
        "- attention activation 'prelu' has 32 channels in the bank but 16 in the model; build the model with "
        "hidden_size=32",
        "- anchor grid: the bank's splines have 16 anchors on ±3 but the model's have 16 on ±2; build the model with "
        "af_range=3.0, af_n_anchors=16"]


def test_fixed_activations_may_differ_where_nothing_is_learned():
    model = afgpt.AfGPTForCausalLM(tiny_config(af_type="spline;att-none", **GRID))
    bank_of("spline;att-linear").load_into(model)
    assert not model.model.activations.mlp[0].values.requires_grad


# ---------------------------------------------------------------------------- plotting


def test_plot_activation_file(tmp_path):
    bank = bank_of("spline;att-spline", 2)
    path = bank.to_lmafs_csv(tmp_path / "ptAf-a-step1.csv")
    out = plot_activation_file(path, tmp_path / "plot" / "af.png", num_hidden_layers=4)
    assert out == tmp_path / "plot" / "af.png" and out.read_bytes()[:8] == PNG_MAGIC
    fig = plotting.activation_figure(read_activations(path, num_hidden_layers=4), title=bank.title())
    assert [ax.get_title() for ax in fig.axes] == [
        f"{row}, slot {s}: {where}" for row in ("MLP", "attention")
        for s, where in enumerate(["layer 0", "layers 1–2", "layer 3"])]
    assert fig.get_suptitle() == "spline;att-spline: first and last layers own theirs, the middle layers share one"
    anchors = np.asarray(fig.axes[0].get_lines()[-1].get_xdata())
    np.testing.assert_allclose(anchors, np.linspace(-3, 3, 16), rtol=1e-6)


def test_layer_span_is_one_wording_for_plot_titles_and_mismatch_messages():
    config = tiny_config(af_layer_specific=2)  # 4 layers: first and last own theirs, layers 1-2 share slot 1
    settings = ActivationSettings.from_config(config)
    assert [settings.layer_span(slot) for slot in range(3)] == ["layer 0", "layers 1–2", "layer 3"]
    assert ActivationSettings(num_hidden_layers=4, af_layer_specific=0).layer_span(0) == "layers 0–3"
    titles = [ax.get_title() for ax in plotting.activation_figure(afgpt.AfGPTForCausalLM(config)).axes]
    assert titles[:3] == [f"MLP, slot {slot}: {settings.layer_span(slot)}" for slot in range(3)]


def test_afgpt_plot_command(tmp_path, capsys):
    from afgpt.cli import main
    bank = bank_of("spline;att-spline", 0)
    bank.save(tmp_path / "bank")
    (tmp_path / "bank" / "activations.png").unlink()
    main(["plot", str(tmp_path / "bank")])
    assert (tmp_path / "bank" / "activations.png").read_bytes()[:8] == PNG_MAGIC
    csv = bank.to_lmafs_csv(tmp_path / "ptAf-r-step5.csv")
    main(["plot", str(csv), "--num-hidden-layers", "4", "--af-type", "spline;att-spline"])
    assert csv.with_suffix(".png").read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(SystemExit, match="afgpt plot: error: .*does not exist"):
        main(["plot", str(tmp_path / "missing.csv")])
