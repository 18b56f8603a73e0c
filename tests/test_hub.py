"""The Hub, against a loopback Hub server (tests/hub_server.py): pushes run in this process, downloads in fresh
processes that know the Hub only through HF_ENDPOINT and start with an empty cache."""
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys

import huggingface_hub
import pytest
import torch
import transformers
from safetensors.torch import load_file

import afgpt
from afgpt.bank import ActivationBank
from afgpt.hub import HubError, load_activations, push_run
from afgpt.training import TrainConfig, train
from conftest import perturb, tiny_config
from hub_server import HubServer

TOKEN = "hf_loopback_token"  # explicit, so no real token is looked up or sent


def point_hub_at(monkeypatch, endpoint: str, cache: os.PathLike) -> None:
    """huggingface_hub reads HF_ENDPOINT at import time, into several places; repoint them all."""
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(huggingface_hub.hf_api.api, "endpoint", endpoint)  # behind huggingface_hub.create_repo etc.
    monkeypatch.setattr(transformers.utils.hub, "_hf_api", None)  # transformers' shared HfApi, rebuilt on next use
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))


@pytest.fixture
def hub(monkeypatch, tmp_path):
    with HubServer() as server:
        point_hub_at(monkeypatch, server.url, tmp_path / "hf-cache")
        yield server


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A real (tiny) training run with learnable activations."""
    out = tmp_path_factory.mktemp("hub") / "run"
    train(TrainConfig(output_dir=str(out), data="builtin:pydoc", vocab_size=300, val_tokens=2048, hidden_size=32,
                      num_hidden_layers=2, num_attention_heads=2, af_type="spline;att-spline", max_steps=4,
                      per_device_train_batch_size=2, seq_length=16, warmup_steps=1, cooldown_steps=1,
                      logging_steps=2, eval_steps=4, eval_batches=1, save_steps=4))
    return out


def run_fresh(script: str, hub: HubServer, tmp_path) -> None:
    """Run `script` in a new interpreter whose only Hub is `hub` (via HF_ENDPOINT), with an empty HF cache."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "fresh-hf-home"), HF_HUB_DISABLE_TELEMETRY="1")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


FRESH_PROCESS = """
import json
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("user/run", trust_remote_code=True)
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__  # the pushed code
with torch.no_grad():
    logits = model(torch.tensor({ids})).logits
tokens = torch.tensor(AutoTokenizer.from_pretrained("user/run").encode({text!r}))
save_file({{"logits": logits, "tokens": tokens}}, {out!r} + "/model.safetensors")

import afgpt.hub
for repo in ("user/bank", "user/run"):
    bank = afgpt.hub.load_activations(repo)
    name = repo.split("/")[1]
    save_file({{k: v.contiguous() for k, v in bank.state_dict().items()}}, {out!r} + f"/{{name}}.safetensors")
    open({out!r} + f"/{{name}}.json", "w").write(json.dumps(bank.af_config()))
"""


def assert_same_tensors(loaded: dict, expected: dict) -> None:
    assert loaded.keys() == expected.keys() and loaded
    for name, tensor in expected.items():
        torch.testing.assert_close(loaded[name], tensor.detach().float(), rtol=0, atol=0, msg=name)


def tree_hash(directory) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(directory)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_pushed_bank_and_run_load_in_a_fresh_process(hub, run_dir, tmp_path):
    bank = ActivationBank.from_model(perturb(afgpt.AfGPTForCausalLM(tiny_config(af_type="spline;att-spline"))),
                                     {"run": "test", "steps": 3})
    bank.push_to_hub("user/bank", token=TOKEN)
    assert {"af_config.json", "activations.safetensors", "README.md"} <= set(hub.repos["user/bank"].files("main"))
    before = tree_hash(run_dir)
    url = push_run(run_dir, "user/run", token=TOKEN, include_model=True, baseline_val_loss=5.25)
    assert url == f"{hub.url}/user/run"
    assert tree_hash(run_dir) == before
    files = hub.repos["user/run"].files("main")
    assert {"config.json", "model.safetensors", "modeling_afgpt.py", "tokenizer.json", "af_config.json",
            "activations.safetensors", "README.md"} <= set(files)
    card = files["README.md"].decode()  # the activations card, pushed last, compares with the baseline
    assert "# Learned activation functions: `spline;att-spline`" in card and "(baseline 5.2500)" in card

    ids, text = [[1, 5, 9, 2, 7, 3]], "def f(x):"
    run_fresh(FRESH_PROCESS.format(ids=ids, text=text, out=str(tmp_path)), hub, tmp_path)

    assert_same_tensors(load_file(tmp_path / "bank.safetensors"), bank.state_dict())
    assert json.loads((tmp_path / "bank.json").read_text())["provenance"] == {"run": "test", "steps": 3}
    model = afgpt.AfGPTForCausalLM.from_pretrained(run_dir).eval()
    with torch.no_grad():
        expected = model(torch.tensor(ids)).logits
    pulled = load_file(tmp_path / "model.safetensors")
    torch.testing.assert_close(pulled["logits"], expected)
    assert pulled["tokens"].tolist() == transformers.AutoTokenizer.from_pretrained(run_dir).encode(text)
    assert_same_tensors(load_file(tmp_path / "run.safetensors"), ActivationBank.from_model(model).state_dict())
    provenance = json.loads((tmp_path / "run.json").read_text())["provenance"]
    assert provenance["baseline_val_loss"] == 5.25 and provenance["steps"] == 4


def test_run_without_learnable_activations_needs_include_model(hub, tmp_path):
    run = tmp_path / "gelu-run"
    afgpt.AfGPTForCausalLM(tiny_config()).save_pretrained(run)
    with pytest.raises(FileNotFoundError, match="include_model=True"):
        push_run(run, "user/gelu", token=TOKEN)
    assert "user/gelu" not in hub.repos

    push_run(run, "user/gelu", token=TOKEN, include_model=True)
    assert "model.safetensors" in hub.repos["user/gelu"].files("main")
    with pytest.raises(HubError, match="holds no activation bank"):
        load_activations("user/gelu")


def test_unreachable_hub_names_repo_endpoint_and_fix_and_leaves_files_alone(monkeypatch, run_dir, tmp_path):
    endpoint = f"http://127.0.0.1:{closed_port()}"
    point_hub_at(monkeypatch, endpoint, tmp_path / "hf-cache")
    before = tree_hash(run_dir)
    for call in (lambda: push_run(run_dir, "user/away", token=TOKEN, include_model=True),
                 lambda: load_activations("user/away")):
        with pytest.raises(HubError) as err:
            call()
        assert "'user/away'" in str(err.value) and endpoint in str(err.value) and "HF_ENDPOINT" in str(err.value)
    assert tree_hash(run_dir) == before


def test_missing_repo_revision_and_paths(hub, tmp_path):
    with pytest.raises(HubError, match=r"'user/nothing' at http://127\.0\.0\.1:\d+: no such repo.*Check the id"):
        load_activations("user/nothing")
    huggingface_hub.create_repo("user/empty", token=TOKEN)
    with pytest.raises(HubError, match="'user/empty' at .*: it has no revision 'v2'"):
        load_activations("user/empty", revision="v2")
    hub.requests.clear()
    for path in ("./missing", str(tmp_path / "missing"), "ptAf-spline.pt", "a/b/c", tmp_path / "missing-dir"):
        with pytest.raises(FileNotFoundError, match="no such file"):
            load_activations(path)
    assert hub.requests == []  # a path never goes to the Hub


@pytest.mark.parametrize("name, bank, corpus", [
    ("./missing", True, True), ("/abs/bank", True, True), ("~/bank", True, True), ("a/b/c", True, True),
    ("foo..bar", True, True), ("name.git", True, True), ("x" * 97, True, True), ("builtin:other", True, True),
    ("ptAf-spline.pt", True, False), ("runs/ptAf-r-step5.csv", True, False), ("bank.safetensors", True, False),
    ("records.json", True, True), ("corpus.txt", False, True), ("user/corpus.jsonl.gz", False, True),
    ("user/bank", False, False), ("gpt2", False, False), ("someone/some-corpus", False, False),
])
def test_paths_and_hub_ids_are_told_apart_by_one_rule(name, bank, corpus):
    """A missing name is a missing file, not a Hub lookup, when it is written like a path, names a file type,
    or cannot be a repo id: afgpt.paths decides for both activation banks (hub) and corpora (data)."""
    from afgpt import data, hub, paths
    assert paths.looks_like_path(name, hub.FILE_SUFFIXES) is bank
    assert paths.looks_like_path(name, data.CORPUS_SUFFIXES) is corpus


def test_local_bank_directory_loads_without_the_hub(hub, tmp_path):
    bank = ActivationBank.from_model(perturb(afgpt.AfGPTForCausalLM(tiny_config(af_type="spline;att-spline"))))
    bank.save(tmp_path / "bank")
    assert_same_tensors(load_activations(tmp_path / "bank").state_dict(), bank.state_dict())
    assert_same_tensors(load_activations(str(tmp_path / "bank")).state_dict(), bank.state_dict())
    assert hub.requests == []


def test_afgpt_push_command_reports_an_unreachable_hub(monkeypatch, run_dir, tmp_path):
    from afgpt.cli import main
    point_hub_at(monkeypatch, f"http://127.0.0.1:{closed_port()}", tmp_path / "hf-cache")
    with pytest.raises(SystemExit, match="afgpt push: error: could not push to 'user/away'.*unreachable"):
        main(["push", str(run_dir), "user/away", "--token", TOKEN])


def test_patched_gpt_neo_run_pushes_its_model_and_activations(hub, tmp_path):
    from transformers import AutoModelForCausalLM, GPTNeoConfig, GPTNeoForCausalLM

    config = GPTNeoConfig(vocab_size=97, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                          attention_types=[[["global", "local"], 1]], max_position_embeddings=64)
    model = perturb(afgpt.patch_model(GPTNeoForCausalLM(config), af_type="spline;att-spline"))
    run = tmp_path / "neo-run"
    model.save_pretrained(run)
    ActivationBank.from_model(model, {"run": "neo"}).save(run / "activations")
    push_run(run, "user/neo", token=TOKEN, include_model=True)
    files = hub.repos["user/neo"].files("main")
    assert json.loads(files["config.json"])["model_type"] == "afgpt_gpt_neo"
    pulled = tmp_path / "pulled"
    pulled.mkdir()
    for name in ("config.json", "model.safetensors"):
        (pulled / name).write_bytes(files[name])
    ids = torch.arange(10)[None]
    torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(pulled).eval()(ids).logits,
                               model.eval()(ids).logits, rtol=0, atol=0)
    assert_same_tensors(load_activations("user/neo").state_dict(), ActivationBank.from_model(model).state_dict())


def test_push_puts_the_runs_evaluation_results_in_the_model_index(hub, run_dir, tmp_path):
    from huggingface_hub import ModelCard

    from afgpt.evaluation.runs import append_to_run

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    blimp = {"kind": "blimp", "overall": 0.61, "fields": {"morphology": 0.7, "syntax": 0.55}, "phenomena": {},
             "paradigms": {}, "settings": {"data_dir": "/data/blimp_filtered_babylm", "scoring": "causal"}}
    assert append_to_run(run, {**blimp, "overall": 0.1})  # an older evaluation: the latest one counts
    assert append_to_run(run, blimp)
    assert append_to_run(run, {"kind": "superglue", "task": "cb", "dataset": "aps/super_glue", "config": "cb",
                               "preset": "full", "metrics": {"accuracy": 0.5, "f1_macro": 0.4}})
    assert not append_to_run(tmp_path, blimp)  # not a run directory: nothing written
    push_run(run, "user/evaluated", token=TOKEN)
    card = ModelCard(hub.repos["user/evaluated"].files("main")["README.md"].decode())
    assert "# Learned activation functions" in card.text  # the activations card, now with results
    found = {(r.dataset_type, r.dataset_config, r.metric_name): r.metric_value for r in card.data.eval_results}
    assert found == {("nyu-mll/blimp", None, "accuracy"): 0.61, ("nyu-mll/blimp", None, "morphology accuracy"): 0.7,
                     ("nyu-mll/blimp", None, "syntax accuracy"): 0.55, ("aps/super_glue", "cb", "accuracy"): 0.5,
                     ("aps/super_glue", "cb", "f1_macro"): 0.4}
    assert card.data.eval_results[0].dataset_name == "BLiMP (blimp_filtered_babylm)"
    assert card.data.model_name == "evaluated"
