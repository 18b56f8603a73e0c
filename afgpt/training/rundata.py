"""A run's tokens and tokenizer: tokenize a text source into the run directory, or read given .bin shards
with the tokenizer that made them."""
import glob
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from transformers import PreTrainedTokenizerBase

from .. import data as data_lib
from .config import TrainConfig

GPT2_VOCAB, GPT2_SEPARATOR = 50304, 50256  # lm-afs's FineWeb shards: GPT-2 BPE padded to 50304, <|endoftext|>
logger = logging.getLogger("afgpt")


@dataclass
class RunData:
    """Token streams and tokenizer of a run."""

    train: np.ndarray
    val: np.ndarray
    tokenizer: PreTrainedTokenizerBase | None
    vocab_size: int
    doc_separator: int | None


def load_data(cfg: TrainConfig, out: Path, is_main: bool, wait) -> RunData:
    """Token shards for training and validation: read given .bin shards, or tokenize a text source."""
    if cfg.data.endswith(".bin"):
        return load_shards(cfg)
    token_dir = out / "tokens"
    if is_main and not (token_dir / "tokenizer.json").exists():
        if cfg.tokenizer:
            tokenizer = data_lib.load_tokenizer(cfg.tokenizer)
        else:
            masked_lm = cfg.model == "roberta"
            logger.info(f"training a byte-level BPE tokenizer ({cfg.vocab_size} tokens"
                        f"{', with <s> <pad> </s> <unk> <mask>' if masked_lm else ''}) on {cfg.data}")
            tokenizer = data_lib.train_tokenizer(data_lib.iter_texts(cfg.data, cfg.text_field), cfg.vocab_size,
                                                 masked_lm=masked_lm)
        data_lib.prepare(data_lib.iter_texts(cfg.data, cfg.text_field), tokenizer, token_dir,
                         val_tokens=cfg.val_tokens)
    wait()
    tokenizer = data_lib.load_tokenizer(token_dir)
    vocab = padded_vocab(len(tokenizer))
    train = data_lib.load_tokens(sorted(token_dir.glob("*_train_*.bin")), vocab_size=vocab)
    val = data_lib.load_tokens(sorted(token_dir.glob("*_val_*.bin")), vocab_size=vocab)
    return RunData(train, val, tokenizer, vocab, tokenizer.eos_token_id if cfg.doc_masking else None)


def load_shards(cfg: TrainConfig) -> RunData:
    """.bin shards with the tokenizer that made them: the one `afgpt prepare` recorded beside them (or
    --tokenizer, checked against that record); shards without a record are taken to be lm-afs's GPT-2 tokens."""
    record = shard_record(cfg)
    if record is None and not cfg.tokenizer:
        logger.info(f"no {data_lib.TOKENS_FILE} beside the .bin shards (not made by `afgpt prepare`): taking them "
                    f"to be GPT-2 tokens like lm-afs's FineWeb shards (vocabulary {GPT2_VOCAB}, document separator "
                    f"{GPT2_SEPARATOR}); pass --tokenizer if another tokenizer made them")
        tokenizer, vocab, separator, source = None, GPT2_VOCAB, GPT2_SEPARATOR, "GPT-2's, assumed"
    else:
        tokenizer = data_lib.load_tokenizer(cfg.tokenizer or record[0])
        vocab, separator, source = padded_vocab(len(tokenizer)), tokenizer.eos_token_id, f"of {tokenizer.name_or_path}"
        if record is not None:
            check_recorded_tokenizer(tokenizer, *record)
    train, val = (data_lib.load_tokens(pattern) for pattern in (cfg.data, cfg.val_data))
    for pattern, tokens in ((cfg.data, train), (cfg.val_data, val)):
        top = int(tokens.max()) if tokens.size else -1
        if top >= vocab:
            raise ValueError(f"{pattern}: token id {top} >= vocab size {vocab} (the tokenizer's, {source}): another "
                             "tokenizer made these shards; pass that one with --tokenizer")
    return RunData(train, val, tokenizer, vocab, separator if cfg.doc_masking else None)


def shard_record(cfg: TrainConfig) -> tuple[Path, dict] | None:
    """The folder and tokens.json record of the training and validation shards, which must agree; None without one."""
    folders = sorted({Path(p).parent for pattern in (cfg.data, cfg.val_data)
                      for p in glob.glob(os.path.expanduser(pattern))})
    records = {folder: data_lib.read_token_metadata(folder) for folder in folders}
    kinds = {None if r is None else (r["eos_token_id"], r["vocab_size"]) for r in records.values()}
    if len(kinds) > 1:
        found = "; ".join(f"{folder}: " + ("no record" if r is None else f"eos id {r['eos_token_id']}, "
                                                                          f"{r['vocab_size']} tokens")
                          for folder, r in records.items())
        raise ValueError(f"the training and validation shards come from different tokenizers ({found}, from "
                         f"{data_lib.TOKENS_FILE}): make both with one `afgpt prepare` run")
    return next(((folder, r) for folder, r in records.items() if r is not None), None)


def check_recorded_tokenizer(tokenizer: PreTrainedTokenizerBase, folder: Path, record: dict) -> None:
    """--tokenizer must be the one that made the shards: same document separator and vocabulary size."""
    given, recorded = (tokenizer.eos_token_id, len(tokenizer)), (record["eos_token_id"], record["vocab_size"])
    if given != recorded:
        raise ValueError(
            f"--tokenizer {tokenizer.name_or_path} (eos id {given[0]}, {given[1]} tokens) is not the tokenizer that "
            f"made the shards in {folder} (eos id {recorded[0]}, {recorded[1]} tokens, recorded in "
            f"{folder / data_lib.TOKENS_FILE}): drop --tokenizer to use the one saved beside the shards, or "
            "re-run `afgpt prepare` with this tokenizer")


def padded_vocab(n: int) -> int:
    """Round the vocabulary up to a multiple of 64 (lm-afs pads GPT-2's 50257 to 50304) for fast matmuls."""
    return (n + 63) // 64 * 64

