"""Shared fixtures: tiny AfGPT configs and the path to the staged real data."""
from pathlib import Path

import pytest
import torch

import afgpt
from afgpt.training import TrainConfig

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def tiny_config(**overrides) -> afgpt.AfGPTConfig:
    """A model small enough that every test runs in well under a second."""
    fields = dict(vocab_size=97, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                  max_position_embeddings=64)
    fields.update(overrides)
    return afgpt.AfGPTConfig(**fields)


def tiny_run(tmp_path, shared_data=None, **overrides) -> TrainConfig:
    """A run that takes a few seconds: tiny model, tiny tokenizer, Shakespeare."""
    fields = dict(output_dir=str(tmp_path / "run"), data=str(shared_data / "tiny_shakespeare" / "input.txt.gz")
                  if shared_data else "builtin:pydoc", vocab_size=384, val_tokens=4096, hidden_size=32,
                  num_hidden_layers=2, num_attention_heads=2, max_steps=30, per_device_train_batch_size=4,
                  seq_length=32, warmup_steps=3, cooldown_steps=10, logging_steps=5, eval_steps=10,
                  eval_batches=2, save_steps=10, learning_rate=3e-3)
    fields.update(overrides)
    return TrainConfig(**fields)


def perturb(model: torch.nn.Module, scale: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Move every parameter off its initial value so zero-initialised parts matter in comparisons."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * scale)
    return model


class RandomTokens(torch.utils.data.Dataset):
    """Fixed random token rows as a transformers.Trainer dataset (labels = inputs, the loss shifts them)."""

    def __init__(self, n: int = 24, seq: int = 16, vocab: int = 97):
        self.data = torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.data[i], "labels": self.data[i]}


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"staged data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def one_thread():
    """Tiny runs on one thread: no contention when the suite runs in parallel on two cores (2 threads on a busy
    machine made them up to 100x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
