"""ActivationBank: the learned activations of a model as one object, and their file format.

A bank directory (Hub-repo shaped) holds af_config.json, activations.safetensors (one tensor per
learnable activation, named by slot, e.g. "mlp.0.values"); callers higher up (training) add
activations.png, since plotting sits above this module.
"""
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .activations import parse_af_spec
from .modeling_afgpt import AfGPTActivations

FORMAT = "afgpt-activations"
VERSION = 1


class ActivationBank(nn.Module):
    """All learnable activation parameters of an AfGPT model; `state_dict()` holds exactly those."""

    def __init__(self, activations: AfGPTActivations, config, provenance: dict | None = None):
        super().__init__()
        self.activations = activations
        self.config = config
        self.provenance = provenance or {}

    @classmethod
    def from_model(cls, model: nn.Module, provenance: dict | None = None) -> "ActivationBank":
        return cls(model.base_model.activations, model.config, provenance)

    def state_dict(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        return self.activations.state_dict(*args, **kwargs)

    def is_empty(self) -> bool:
        return not any(True for _ in self.activations.parameters())

    def af_config(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "af_type": str(parse_af_spec(self.config.af_type)),
                "af_layer_specific": self.config.af_layer_specific, "af_range": self.config.af_range,
                "af_n_anchors": self.config.af_n_anchors, "num_hidden_layers": self.config.num_hidden_layers,
                "hidden_size": self.config.hidden_size, "intermediate_size": self.config.intermediate_size,
                "provenance": self.provenance}

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the bank directory atomically: built beside the target, then renamed into place."""
        directory = Path(directory)
        tmp = directory.with_name(f".{directory.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        tensors = {name: t.detach().float().cpu().contiguous() for name, t in self.state_dict().items()}
        save_file(tensors, tmp / "activations.safetensors", metadata={"format": FORMAT})
        (tmp / "af_config.json").write_text(json.dumps(self.af_config(), indent=2))
        old = directory.with_name(f".{directory.name}.old")
        if directory.exists():
            os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
        return directory
