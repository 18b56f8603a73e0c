"""Data pipeline: text corpora -> tokenizer -> uint16 token shards -> (input_ids, labels) batches.

Shards use the llm.c / lm-afs binary format so they are interchangeable with those projects:
a header of 256 int32 (magic 20240520, version 1, token count, rest zero) followed by the
tokens as uint16. Every document is preceded by the tokenizer's eos token (llm.c convention),
so the model always sees where a document starts.
"""

import glob
import gzip
import itertools
import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import datasets
import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from .atomic import write_atomically, write_text_atomically
from .paths import looks_like_path

BUILTIN_PYDOC = "builtin:pydoc"
EOT_TOKEN = "<|endoftext|>"
MASKED_LM_TOKENS = {"bos_token": "<s>", "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>",
                    "mask_token": "<mask>"}  # RoBERTa's, in roberta-base's id order
DEFAULT_VOCAB_SIZE = 2048  # a 50k vocabulary would dominate the parameters of a ~1M-parameter model
SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
MAX_SHARD_VOCAB = 2**16  # uint16 tokens
TOKENS_FILE = "tokens.json"  # beside shards from prepare(): which tokenizer made them
TOKENS_FORMAT = "afgpt-tokens"
CORPUS_SUFFIXES = (".txt", ".jsonl", ".json")

# ----------------------------------------------------------------------------- sources


def iter_texts(
    source: str | os.PathLike,
    text_field: str = "text",
    split: str = "train",
    separator: str | None = None,
    subset: str | None = None,
    streaming: bool = False,
) -> Iterator[str]:
    """Documents (non-empty strings) from a local corpus, the built-in corpus or a Hub dataset.

    `source` is tried in this order:
      * "builtin:pydoc": Python's own documentation (`pydoc_data.topics`, one topic per document),
        ~0.5 MB of English present on every machine, so a fresh install trains without network.
      * an existing file or directory (directories are walked recursively in sorted order and only
        *.txt / *.jsonl / *.json, optionally .gz, are read). A .txt file is one document unless
        `separator` is given (e.g. "<|endoftext|>" for TinyStoriesV2, "\\n\\n" for blank lines);
        .jsonl is one record per line and .json a list of records, the text read from `text_field`.
      * a Hugging Face dataset name (with `subset`, `split`, `streaming`), for users with network.
    The source is resolved eagerly, so a missing path fails at the call, not at the first document;
    a corpus without any non-empty document raises ValueError when exhausted.
    """
    source = str(source)
    if source == BUILTIN_PYDOC:
        docs = _pydoc_documents()
    elif Path(source).expanduser().exists():
        files = _corpus_files(Path(source).expanduser())
        docs = (doc for file in files for doc in _file_documents(file, text_field, separator))
    elif looks_like_path(source, CORPUS_SUFFIXES):
        raise FileNotFoundError(f"corpus path {source} does not exist")
    else:
        docs = _hub_documents(source, text_field, split, subset, streaming)
    return _non_empty(docs, source)


def _pydoc_documents() -> Iterator[str]:
    from pydoc_data.topics import topics

    return (topics[name] for name in sorted(topics))


def _is_corpus_file(path: Path) -> bool:
    return path.name.removesuffix(".gz").endswith(CORPUS_SUFFIXES)


def _corpus_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and _is_corpus_file(p))
    if not files:
        raise ValueError(f"corpus directory {path} contains no .txt/.jsonl/.json(.gz) files")
    return files


def _open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _file_documents(path: Path, text_field: str, separator: str | None) -> Iterator[str]:
    kind = Path(path.name.removesuffix(".gz")).suffix
    with _open_text(path) as f:
        if kind == ".jsonl":
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    yield _text_of(json.loads(line), text_field, f"{path}:{line_no}")
        elif kind == ".json":
            records = json.load(f)
            if not isinstance(records, list):
                raise ValueError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
            for i, record in enumerate(records):
                yield _text_of(record, text_field, f"{path}[{i}]")
        elif separator is None:
            yield f.read()
        else:
            yield from (doc.strip() for doc in f.read().split(separator))


def _text_of(record: Any, text_field: str, where: str) -> str:
    if not isinstance(record, dict) or text_field not in record:
        fields = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise KeyError(f"{where}: record has no field {text_field!r} (has: {fields}); pass text_field=...")
    return record[text_field]


def _hub_documents(name: str, text_field: str, split: str, subset: str | None, streaming: bool) -> Iterator[str]:
    try:
        dataset = datasets.load_dataset(name, subset, split=split, streaming=streaming)
    except Exception as e:
        raise FileNotFoundError(
            f"corpus {name!r} is not a local file or directory, and loading it as a Hugging Face dataset "
            f"failed ({type(e).__name__}: {e}). Pass an existing .txt/.jsonl/.json(.gz) file or directory, "
            f"{BUILTIN_PYDOC!r} for the built-in offline corpus, or a Hub dataset name when online."
        ) from e
    return (_text_of(row, text_field, f"{name}[{i}]") for i, row in enumerate(dataset))


def _non_empty(docs: Iterable[str], source: str) -> Iterator[str]:
    count = 0
    for doc in docs:
        if doc.strip():
            count += 1
            yield doc
    if count == 0:
        raise ValueError(f"corpus {source!r} contains no non-empty documents")


# ----------------------------------------------------------------------------- tokenizer


def load_tokenizer(name_or_path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """A tokenizer via AutoTokenizer (local folder or Hub name); its eos token separates documents."""
    name_or_path = str(name_or_path)
    if not Path(name_or_path).expanduser().exists() and looks_like_path(name_or_path, CORPUS_SUFFIXES):
        raise FileNotFoundError(f"tokenizer path {name_or_path} does not exist")
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {name_or_path} has no eos token, which is needed to separate documents")
    return tokenizer


def train_tokenizer(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE,
                    masked_lm: bool = False) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE (GPT-2 style, lossless on any text) with EOT_TOKEN as eos/bos.

    With `masked_lm`, the special tokens are RoBERTa's instead (MASKED_LM_TOKENS: <s> bos, <pad>, </s> eos and
    document separator, <unk>, <mask>, ids 0-4), as a masked LM needs. Returned as a transformers tokenizer so
    it is saved with save_pretrained next to every model and reloaded with AutoTokenizer. The vocabulary may
    stay below `vocab_size` on a tiny corpus.
    """
    specials = list(MASKED_LM_TOKENS.values()) if masked_lm else [EOT_TOKEN]
    if not 256 + len(specials) <= vocab_size <= MAX_SHARD_VOCAB:
        raise ValueError(f"vocab_size must be in [{256 + len(specials)}, {MAX_SHARD_VOCAB}] (256 bytes + "
                         f"{' '.join(specials)}; uint16 shards), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    if masked_lm:
        return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **MASKED_LM_TOKENS)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOT_TOKEN, bos_token=EOT_TOKEN)


# ----------------------------------------------------------------------------- shards


def write_shard(path: str | os.PathLike, tokens: Sequence[int] | np.ndarray) -> None:
    """Write tokens as an llm.c shard; atomic (temp file + os.replace), so readers never see half a file."""
    path = Path(path)
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"{path}: tokens must be 1-D, got shape {tokens.shape}")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= MAX_SHARD_VOCAB):
        bad = tokens.max() if tokens.max() >= MAX_SHARD_VOCAB else tokens.min()
        raise ValueError(f"{path}: token id {bad} does not fit: uint16 shards hold ids in [0, {MAX_SHARD_VOCAB}); "
                         f"use a smaller vocabulary")
    if tokens.size >= 2**31:
        raise ValueError(f"{path}: {tokens.size} tokens overflow the int32 header; use a smaller shard_size")
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[:3] = SHARD_MAGIC, SHARD_VERSION, tokens.size

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(header.tobytes())
            f.write(tokens.astype(np.uint16).tobytes())

    write_atomically(path, write)


def read_shard(path: str | os.PathLike) -> np.memmap:
    """The tokens of an llm.c shard as a read-only uint16 memmap (validated header)."""
    path = Path(path)
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise ValueError(f"{path}: {size} bytes is smaller than the {HEADER_BYTES}-byte shard header")
    header = np.fromfile(path, dtype=np.int32, count=HEADER_INTS)
    if header[0] != SHARD_MAGIC:
        raise ValueError(f"{path}: bad magic {header[0]} (expected {SHARD_MAGIC}); not an llm.c token shard")
    if header[1] != SHARD_VERSION:
        raise ValueError(f"{path}: unsupported shard version {header[1]} (expected {SHARD_VERSION})")
    count = int(header[2])
    if size != HEADER_BYTES + 2 * count:
        raise ValueError(f"{path}: header says {count} tokens ({HEADER_BYTES + 2 * count} bytes) "
                         f"but the file has {size} bytes; truncated or corrupt")
    return np.memmap(path, dtype=np.uint16, mode="r", offset=HEADER_BYTES, shape=(count,))


def load_tokens(shards: str | os.PathLike | Sequence[str | os.PathLike], vocab_size: int | None = None) -> np.ndarray:
    """One token stream from a glob pattern or a list of shard paths (in sorted / given order).

    A single shard stays a lazy memmap; several are concatenated in memory (uint16, so 2 bytes/token).
    With `vocab_size`, every id is checked so shards from another tokenizer fail loudly.
    """
    if isinstance(shards, (str, os.PathLike)):
        paths = sorted(glob.glob(os.path.expanduser(str(shards))))
        if not paths:
            raise FileNotFoundError(f"no token shards match {str(shards)!r}")
    else:
        paths = list(shards)
        if not paths:
            raise ValueError("no token shards given")
    parts = [read_shard(p) for p in paths]
    if vocab_size is not None:
        for path, part in zip(paths, parts):
            top = int(part.max()) if part.size else -1
            if top >= vocab_size:
                raise ValueError(f"{path}: token id {top} >= vocab size {vocab_size}: "
                                 f"the shards were made with another tokenizer")
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def prepare(
    texts: str | Iterable[str],
    tokenizer: PreTrainedTokenizerBase,
    out_dir: str | os.PathLike,
    val_tokens: int = 32_768,
    shard_size: int = 100_000_000,
    prefix: str = "corpus",
    batch_size: int = 256,
) -> list[Path]:
    """Tokenize a corpus into `{prefix}_val_000000.bin` + `{prefix}_train_000001.bin`, ... in out_dir.

    `texts` is a source for iter_texts (with default options) or an iterable of documents.
    The first `val_tokens` tokens of the stream are the validation shard (shard 0, as in llm.c /
    lm-afs, whose boundary may cut a document); the rest goes into train shards of at most
    `shard_size` tokens. The tokenizer is saved in out_dir so the shards are never separated from it,
    and TOKENS_FILE records its document separator and vocabulary size, so training on the shards
    masks documents with the right id instead of assuming GPT-2's. Returns the shard paths, validation first.
    """
    if len(tokenizer) > MAX_SHARD_VOCAB:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens but uint16 shards hold ids < {MAX_SHARD_VOCAB}; "
                         f"use a smaller vocabulary")
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has no eos token, which is needed to separate documents")
    if val_tokens < 1 or shard_size < 1:
        raise ValueError(f"val_tokens and shard_size must be positive, got {val_tokens} and {shard_size}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    write_text_atomically(out_dir / TOKENS_FILE, json.dumps(
        {"format": TOKENS_FORMAT, "version": 1, "tokenizer": tokenizer.name_or_path or None,
         "eos_token_id": tokenizer.eos_token_id, "vocab_size": len(tokenizer)}, indent=2))
    docs = iter_texts(texts) if isinstance(texts, (str, os.PathLike)) else texts
    paths: list[Path] = []
    pending: list[np.ndarray] = []
    n_pending = 0
    with tqdm(desc=f"tokenizing into {out_dir}", unit="tok", unit_scale=True) as bar:
        for ids in _tokenize_documents(docs, tokenizer, batch_size):
            pending.append(ids)
            n_pending += len(ids)
            bar.update(len(ids))
            limit = val_tokens if not paths else shard_size
            while n_pending >= limit:
                stream = np.concatenate(pending)
                paths.append(_write_numbered_shard(out_dir, prefix, len(paths), stream[:limit]))
                pending, n_pending, limit = [stream[limit:]], n_pending - limit, shard_size
    if n_pending:
        paths.append(_write_numbered_shard(out_dir, prefix, len(paths), np.concatenate(pending)))
    if len(paths) < 2:
        raise ValueError(f"corpus has only {bar.n} tokens, all used for validation "
                         f"(val_tokens={val_tokens}); lower val_tokens or use more data")
    return paths


def read_token_metadata(folder: str | os.PathLike) -> dict | None:
    """What prepare() recorded about the tokenizer of the shards in `folder`; None for shards made elsewhere."""
    path = Path(folder) / TOKENS_FILE
    if not path.is_file():
        return None
    meta = json.loads(path.read_text(encoding="utf-8"))
    if meta.get("format") != TOKENS_FORMAT or not {"eos_token_id", "vocab_size"} <= meta.keys():
        raise ValueError(f"{path} is not afgpt token metadata (expected format {TOKENS_FORMAT!r} with eos_token_id "
                         "and vocab_size): delete it, or re-run `afgpt prepare` to rewrite it")
    return meta


def _tokenize_documents(
    docs: Iterable[str], tokenizer: PreTrainedTokenizerBase, batch_size: int
) -> Iterator[np.ndarray]:
    """Token ids of each document with the eos token in front, tokenized in batches (the fast path)."""
    eos = tokenizer.eos_token_id
    docs = iter(docs)
    while batch := list(itertools.islice(docs, batch_size)):
        # verbose=False: documents are legitimately longer than the model's context length.
        for ids in tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]:
            yield np.array([eos, *ids], dtype=np.uint16)


def _write_numbered_shard(out_dir: Path, prefix: str, index: int, tokens: np.ndarray) -> Path:
    path = out_dir / f"{prefix}_{'val' if index == 0 else 'train'}_{index:06d}.bin"
    write_shard(path, tokens)
    return path


# ----------------------------------------------------------------------------- batches


def _num_windows(n_tokens: int, seq_len: int) -> int:
    """Number of windows of seq_len+1 tokens starting every seq_len tokens (inputs never overlap)."""
    if n_tokens < seq_len + 1:
        raise ValueError(f"corpus has {n_tokens} tokens, fewer than seq_len+1 = {seq_len + 1}; "
                         f"use a shorter --seq-length or more data")
    return (n_tokens - 1) // seq_len


def _windows_to_batch(tokens: np.ndarray, window_ids: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.from_numpy(tokens[window_ids[:, None] * seq_len + np.arange(seq_len + 1)].astype(np.int64))
    return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


class TokenBatches:
    """Endless (input_ids, labels) LongTensor batches of shape [batch_size, seq_len] from a 1-D token array.

    Each epoch visits every window once in an order drawn from (seed, stream, epoch): the same
    arguments give the same data on any machine, and a different `stream` (e.g. an independent
    replica of the run) gives a different order. All ranks draw the same permutation and rank r
    takes every world_size-th window from r, so ranks see disjoint data in lockstep (the few windows
    that do not divide evenly are skipped that epoch). Batches continue across epoch boundaries.
    state_dict() records the position so a resumed run continues with exactly the next batch.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int = 0, stream: int = 0,
                 rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.tokens, self.batch_size, self.seq_len = tokens, batch_size, seq_len
        self.seed, self.stream, self.rank, self.world_size = seed, stream, rank, world_size
        self.n_windows = _num_windows(len(tokens), seq_len)
        self.windows_per_rank = self.n_windows // world_size
        if self.windows_per_rank == 0:
            raise ValueError(f"corpus has {self.n_windows} windows of {seq_len + 1} tokens, "
                             f"fewer than world_size = {world_size}; use a shorter --seq-length or more data")
        self.epoch, self.index = 0, 0  # position: next window is self._order()[self.index] of self.epoch
        self._cached: tuple[int, np.ndarray] | None = None

    def _order(self) -> np.ndarray:
        """This rank's window ids for the current epoch (cached, since a batch rarely spans epochs)."""
        if self._cached is None or self._cached[0] != self.epoch:
            rng = np.random.default_rng([self.seed, self.stream, self.epoch])
            perm = rng.permutation(self.n_windows)[: self.windows_per_rank * self.world_size]
            self._cached = (self.epoch, perm[self.rank :: self.world_size])
        return self._cached[1]

    def __iter__(self) -> "TokenBatches":
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        window_ids = []
        while len(window_ids) < self.batch_size:
            take = self._order()[self.index : self.index + self.batch_size - len(window_ids)]
            window_ids.extend(take)
            self.index += len(take)
            if self.index == self.windows_per_rank:
                self.epoch, self.index = self.epoch + 1, 0
        return _windows_to_batch(self.tokens, np.array(window_ids), self.seq_len)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "stream": self.stream,
                "seq_len": self.seq_len, "n_windows": self.n_windows, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume the position; refuses a state from a different corpus, seed or layout (it would not resume)."""
        mismatched = {k: (state[k], v) for k, v in self.state_dict().items()
                      if k not in ("epoch", "index") and state[k] != v}
        if mismatched:
            raise ValueError(
                f"the checkpoint's data position does not fit these batches (saved, current): {mismatched}: the "
                "run was started with other data, seed, --seq-length or number of processes; resume with the "
                "settings it was started with, or start a new run (another --output-dir, or --overwrite)")
        self.epoch, self.index = state["epoch"], state["index"]


def val_batches(tokens: np.ndarray, batch_size: int, seq_len: int,
                max_tokens: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The first `max_tokens` tokens (all by default) as fixed, in-order windows: the same validation set every time.

    The last batch may be smaller than batch_size.
    """
    n_windows = _num_windows(len(tokens) if max_tokens is None else min(len(tokens), max_tokens), seq_len)
    return (_windows_to_batch(tokens, np.arange(start, min(start + batch_size, n_windows)), seq_len)
            for start in range(0, n_windows, batch_size))
