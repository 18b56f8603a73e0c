"""The Hub: load activation banks from local files or Hub repos, and push training runs (activations, model card,
optionally the model with its code) to the Hub.

Errors from huggingface_hub are re-raised as HubError naming the repo, the endpoint and what to change, because
its own messages (a bare connection error, a 404) do not say which of network, HF_ENDPOINT or the id is wrong.
"""
import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

from huggingface_hub import EvalResult, HfApi, ModelCard, constants, snapshot_download
from huggingface_hub.errors import (
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from transformers import AutoConfig, AutoTokenizer

from .bank import ActivationBank, read_activations
from .modeling_afgpt import AfGPTForCausalLM
from .patching import PATCHED_CLASSES
from .paths import looks_like_path

try:  # huggingface_hub 2.x talks through httpx2, 1.x through httpx
    from httpx2 import TransportError
except ImportError:
    from httpx import TransportError

# What read_activations needs: a bank at the repo root (as push_to_hub writes it) or in a pushed run's activations/.
MODEL_CLASSES = {cls.__name__: cls for cls in (AfGPTForCausalLM, *PATCHED_CLASSES.values())}  # what runs save
BANK_FILES = ["af_config.json", "activations.safetensors", "activations/af_config.json",
              "activations/activations.safetensors"]
FILE_SUFFIXES = (".pt", ".csv", ".safetensors", ".json")  # names with these are files, never repo ids


class HubError(OSError):
    """The Hub could not be reached, or it has no such repo or revision; the message says what to check."""


def load_activations(path_or_repo_id: str | os.PathLike, revision: str | None = None, token: str | bool | None = None,
                     **hints) -> ActivationBank:
    """An activation bank from a local file or directory, or from a Hub repo (downloaded to the HF cache).

    `hints` (e.g. num_hidden_layers, af_type) go to read_activations for lm-afs files that do not carry them.
    """
    path = Path(path_or_repo_id)
    if path.exists():
        if revision is not None:
            raise ValueError(f"revision={revision!r} applies to Hub repos, but {str(path)!r} is a local path: "
                             "drop revision, or rename the local path if you meant the Hub repo")
        return read_activations(path, **hints)
    if not isinstance(path_or_repo_id, str) or looks_like_path(path_or_repo_id, FILE_SUFFIXES):
        raise FileNotFoundError(f"no such file or directory: {str(path_or_repo_id)!r} (and it is not a Hub repo id "
                                "of the form 'owner/name'); check the path")
    with hub_errors("download activations from", path_or_repo_id, revision):
        folder = Path(snapshot_download(path_or_repo_id, revision=revision, token=token, allow_patterns=BANK_FILES))
    if not folder.is_dir() or not any(folder.iterdir()):
        raise HubError(f"Hub repo {path_or_repo_id!r} at {constants.ENDPOINT} holds no activation bank (af_config.json "
                       "and activations.safetensors): it may hold a model only; push the run's activations with "
                       "`afgpt push RUN_DIR REPO_ID`, or load the model with from_pretrained")
    return read_activations(folder, **hints)


def push_run(run_dir: str | os.PathLike, repo_id: str, token: str | bool | None = None, private: bool = False,
             include_model: bool = False, baseline_val_loss: float | None = None) -> str:
    """Push a training run's learned activations (with a model card from their provenance) and, with
    `include_model`, the model with its code and the tokenizer; returns the repo URL.

    `baseline_val_loss` (e.g. the gelu;att-linear run's) goes into the provenance so the card compares against it.
    Local files are only read: a failed push leaves the run directory as it was.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise FileNotFoundError(f"{str(run_dir)!r} is not an afgpt run directory (no config.json): pass the "
                                "output_dir of a finished `afgpt train` run")
    bank = read_run_bank(run_dir, include_model)
    if bank is not None and baseline_val_loss is not None:
        bank.provenance["baseline_val_loss"] = baseline_val_loss
    with hub_errors("push to", repo_id):
        url = HfApi(token=token).create_repo(repo_id, private=private, exist_ok=True)
        if include_model:
            push_model(run_dir, url.repo_id, token, private)
        if bank is not None:  # last, so its card is the repo's README rather than transformers' generic one
            bank.push_to_hub(url.repo_id, token=token, private=private)
        results = evaluation_results(run_dir)
        if results:
            push_card_with_results(url.repo_id, bank, results, token)
    return str(url)


def evaluation_results(run_dir: Path) -> list[EvalResult]:
    """The run's latest BLiMP and SuperGLUE/GLUE results (metrics.jsonl records that `afgpt eval-blimp` and
    `afgpt eval-superglue` append) as model-index entries: BLiMP overall and per field, each task's metrics."""
    from .plotting import read_metrics

    path = run_dir / "metrics.jsonl"
    records = read_metrics(path) if path.is_file() else []
    results = []
    blimp = [r for r in records if r.get("kind") == "blimp"]
    if blimp:
        latest = blimp[-1]
        task = "fill-mask" if "pll" in latest["settings"] else "text-generation"
        name = f"BLiMP ({Path(latest['settings']['data_dir']).name})"
        scores = {"accuracy": latest["overall"], **{f"{field} accuracy": v for field, v in latest["fields"].items()}}
        results += [EvalResult(task_type=task, task_name="BLiMP minimal pairs", dataset_type="nyu-mll/blimp",
                               dataset_name=name, dataset_split="train", metric_type="accuracy", metric_value=value,
                               metric_name=metric) for metric, value in scores.items()]
    superglue = {r["task"]: r for r in records if r.get("kind") == "superglue"}  # the latest run of each task
    for task, record in superglue.items():
        suffix = " (quick preset)" if record.get("preset") == "quick" else ""
        results += [EvalResult(task_type="text-classification", task_name=f"{task}{suffix}",
                               dataset_type=record["dataset"], dataset_name=record["dataset"],
                               dataset_config=record["config"],
                               dataset_split="validation", metric_type=metric, metric_value=value,
                               metric_name=f"{metric}{suffix}") for metric, value in record["metrics"].items()]
    return results


def push_card_with_results(repo_id: str, bank: ActivationBank | None, results: list[EvalResult],
                           token: str | bool | None) -> None:
    """The repo's README with the evaluation results in its model-index metadata, which the Hub shows as a table."""
    text = bank.model_card() if bank is not None else (
        f"---\nlibrary_name: afgpt\ntags:\n- afgpt\n---\n\n# {repo_id}\n\nA model trained with afgpt.\n")
    card = ModelCard(text)
    card.data.model_name = repo_id.split("/")[-1]
    card.data.eval_results = results
    card.push_to_hub(repo_id, token=token, commit_message="Evaluation results in the model card")


def read_run_bank(run_dir: Path, include_model: bool) -> ActivationBank | None:
    """The run's activations/ bank; None for a run without learnable activations when the model goes anyway."""
    if (run_dir / "activations").is_dir():
        return read_activations(run_dir / "activations")
    if include_model:
        return None
    af_type = json.loads((run_dir / "config.json").read_text()).get("af_type")
    raise FileNotFoundError(f"{run_dir} has no activations/ folder (af_type {af_type!r} has no learnable activation): "
                            "nothing to push as activations. Push the model instead with include_model=True "
                            "(`afgpt push RUN_DIR REPO_ID --include-model`)")


def push_model(run_dir: Path, repo_id: str, token: str | bool | None, private: bool) -> None:
    """The final model (AfGPT's modeling code travels with it, for trust_remote_code=True; a patched GPT-Neo or RoBERTa
    loads with `import afgpt`) and the run's tokenizer."""
    (architecture,) = AutoConfig.from_pretrained(run_dir).architectures
    MODEL_CLASSES[architecture].from_pretrained(run_dir).push_to_hub(repo_id, token=token, private=private)
    if (run_dir / "tokenizer_config.json").is_file():
        AutoTokenizer.from_pretrained(run_dir).push_to_hub(repo_id, token=token, private=private)


@contextlib.contextmanager
def hub_errors(action: str, repo_id: str, revision: str | None = None) -> Iterator[None]:
    """Re-raise huggingface_hub's connection and lookup errors as HubError naming repo, endpoint and fix."""
    where = f"{repo_id!r} at {constants.ENDPOINT}"
    try:
        yield
    except (TransportError, LocalEntryNotFoundError) as err:  # snapshot_download reports no connection as the latter
        reason = err.__cause__ or err
        raise HubError(f"could not {action} {where}: the Hub is unreachable ({type(reason).__name__}: {reason}). "
                       "Check the network connection and HF_ENDPOINT (unset it for huggingface.co, or point it at a "
                       "reachable mirror)") from err
    except RevisionNotFoundError as err:
        raise HubError(f"could not {action} {where}: it has no revision {revision!r}; check the branch, tag or "
                       "commit") from err
    except RepositoryNotFoundError as err:
        raise HubError(f"could not {action} {where}: no such repo, or it is private. Check the id (owner/name), "
                       "HF_ENDPOINT, and that your token (HF_TOKEN or `hf auth login`) can access it") from err
    except HfHubHTTPError as err:
        if err.response is not None and err.response.status_code in (401, 403):
            raise HubError(f"could not {action} {where}: the token was refused ({err.response.status_code}). Log in "
                           "with `hf auth login` or set HF_TOKEN to a token with write access") from err
        raise
