"""Tests for afgpt.data: sources, tokenizers, llm.c shards, prepare() and batches. CPU only, no network."""

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from afgpt import data
from afgpt.data import (
    EOT_TOKEN,
    TokenBatches,
    iter_texts,
    load_tokenizer,
    load_tokens,
    prepare,
    read_shard,
    train_tokenizer,
    val_batches,
    write_shard,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SHAKESPEARE = SHARED / "tiny_shakespeare" / "input.txt.gz"
TINYSTORIES = SHARED / "tinystories_sample"
GPT2 = SHARED / "tokenizers" / "gpt2"


def shared(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared data {path} is absent (expected next to the repo in shared/data)")
    return path


@pytest.fixture(scope="module")
def small_tokenizer():
    """A 512-token BPE trained on real TinyStories text (fast: ~0.2 MB)."""
    texts = iter_texts(shared(TINYSTORIES / "tinystories_v1_train_head.txt.gz"), separator="\n\n")
    return train_tokenizer(texts, vocab_size=512)


# ----------------------------------------------------------------------------- sources


def test_txt_file_is_one_document(tmp_path):
    text = "First paragraph.\n\nSecond paragraph.\n"
    (tmp_path / "a.txt").write_text(text)
    assert list(iter_texts(tmp_path / "a.txt")) == [text]


def test_txt_separator_splits_and_drops_empty_pieces():
    docs = list(iter_texts(shared(TINYSTORIES / "cs336_tinystories_sample.txt"), separator=EOT_TOKEN))
    assert len(docs) == 5  # 5 separators, the file ends with one
    assert docs[0].startswith("Once upon a time there was a little boy named Ben.")
    assert all(EOT_TOKEN not in d and d == d.strip() for d in docs)


def test_gzipped_txt():
    (doc,) = iter_texts(shared(SHAKESPEARE))
    assert doc.startswith("First Citizen:\nBefore we proceed any further")
    assert len(doc) == 1115394


def test_jsonl_custom_field_gz_and_blank_lines(tmp_path):
    path = tmp_path / "c.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write(json.dumps({"body": "one", "id": 1}) + "\n\n" + json.dumps({"body": "två", "id": 2}) + "\n")
    assert list(iter_texts(path, text_field="body")) == ["one", "två"]
    with pytest.raises(KeyError, match=r"c\.jsonl\.gz:1.*'text'.*\['body', 'id'\]"):
        list(iter_texts(path))


def test_json_list(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"text": "alpha"}, {"text": "  "}, {"text": "beta"}]))
    assert list(iter_texts(path)) == ["alpha", "beta"]  # whitespace-only documents are skipped
    (tmp_path / "bad.json").write_text(json.dumps({"text": "x"}))
    with pytest.raises(ValueError, match="JSON list"):
        list(iter_texts(tmp_path / "bad.json"))


def test_directory_is_recursive_sorted_and_filtered(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "2.txt").write_text("from b/2")
    (tmp_path / "a.txt").write_text("from a")
    (tmp_path / "z.json").write_text(json.dumps([{"text": "from z"}]))
    with gzip.open(tmp_path / "c.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": "from c"}) + "\n")
    (tmp_path / "README.md").write_text("not corpus")
    (tmp_path / "SHA256SUMS").write_text("not corpus")
    assert list(iter_texts(tmp_path)) == ["from a", "from b/2", "from c", "from z"]


def test_shared_directory_reads_only_text_files():
    docs = list(iter_texts(shared(TINYSTORIES)))
    assert len(docs) == 2  # cs336 sample + v1 head; SOURCE.md / SHA256SUMS ignored
    assert docs[1].startswith("One day, a little girl named Lily found a needle")


def test_builtin_pydoc_is_deterministic_english():
    docs = list(iter_texts("builtin:pydoc"))
    assert len(docs) > 50
    assert sum(map(len, docs)) > 300_000
    assert any(d.startswith('The "assert" statement') for d in docs)
    assert docs == list(iter_texts(data.BUILTIN_PYDOC))


def test_missing_path_fails_at_call_naming_it(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        iter_texts(missing)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        iter_texts("nope.jsonl")  # relative, looks like a file: never sent to the Hub


def test_hub_name_failure_explains_both_attempts(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(data.datasets, "load_dataset", offline)
    with pytest.raises(FileNotFoundError) as err:
        iter_texts("someone/some-corpus")
    message = str(err.value)
    assert "'someone/some-corpus' is not a local file or directory" in message
    assert "Hugging Face dataset" in message and "no network" in message
    assert "builtin:pydoc" in message


def test_hub_dataset_rows(monkeypatch):
    calls = []

    def fake_load(name, subset, split, streaming):
        calls.append((name, subset, split, streaming))
        return [{"content": "hub doc"}, {"content": ""}]

    monkeypatch.setattr(data.datasets, "load_dataset", fake_load)
    docs = list(iter_texts("org/ds", text_field="content", split="validation", subset="s", streaming=True))
    assert docs == ["hub doc"]
    assert calls == [("org/ds", "s", "validation", True)]


def test_empty_corpus(tmp_path):
    (tmp_path / "empty.txt").write_text(" \n\n")
    with pytest.raises(ValueError, match="no non-empty documents"):
        list(iter_texts(tmp_path / "empty.txt"))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "notes.md").write_text("x")
    with pytest.raises(ValueError, match="contains no .txt/.jsonl/.json"):
        iter_texts(tmp_path / "sub")


# ----------------------------------------------------------------------------- tokenizer


def test_train_tokenizer_vocab_roundtrip_and_reload(small_tokenizer, tmp_path):
    tok = small_tokenizer
    assert len(tok) == 512
    assert tok.eos_token == EOT_TOKEN and tok.convert_ids_to_tokens(tok.eos_token_id) == EOT_TOKEN
    text = "Lily found a needle. Ünïcödé 🙂 and\ttabs\n  spaces"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text  # byte-level: lossless even on characters never seen in training
    assert len(ids) < len(text.encode())  # merges were learned
    assert max(ids) < 512
    tok.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded(text, add_special_tokens=False)["input_ids"] == ids
    assert reloaded.eos_token_id == tok.eos_token_id


def test_train_tokenizer_rejects_bad_vocab_size():
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["abc"], vocab_size=100)
    with pytest.raises(ValueError, match="uint16"):
        train_tokenizer(["abc"], vocab_size=70_000)


def test_load_tokenizer_gpt2_and_missing(tmp_path):
    tok = load_tokenizer(shared(GPT2))
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == 50256
    assert tok("Hello world")["input_ids"] == [15496, 995]
    with pytest.raises(FileNotFoundError, match="no_such_tok"):
        load_tokenizer(tmp_path / "no_such_tok")


# ----------------------------------------------------------------------------- shards


def test_shard_roundtrip_and_header(tmp_path):
    tokens = np.array([0, 1, 50256, 65535, 7], dtype=np.int64)
    path = tmp_path / "x_train_000001.bin"
    write_shard(path, tokens)
    header = np.fromfile(path, dtype=np.int32, count=256)
    assert header[:3].tolist() == [20240520, 1, 5] and not header[3:].any()
    assert path.stat().st_size == 256 * 4 + 5 * 2
    got = read_shard(path)
    assert isinstance(got, np.memmap) and got.dtype == np.uint16
    assert got.tolist() == tokens.tolist()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # temp file was renamed away


def test_read_shard_rejects_corrupt_files(tmp_path):
    path = tmp_path / "s.bin"
    write_shard(path, [1, 2, 3])
    raw = bytearray(path.read_bytes())
    raw[:4] = np.int32(12345).tobytes()
    (tmp_path / "magic.bin").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"magic\.bin: bad magic 12345"):
        read_shard(tmp_path / "magic.bin")
    (tmp_path / "short.bin").write_bytes(path.read_bytes()[:-2])
    with pytest.raises(ValueError, match=r"short\.bin: header says 3 tokens"):
        read_shard(tmp_path / "short.bin")
    (tmp_path / "tiny.bin").write_bytes(b"abc")
    with pytest.raises(ValueError, match="smaller than the 1024-byte shard header"):
        read_shard(tmp_path / "tiny.bin")


def test_too_large_ids_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="token id 65536 does not fit.*smaller vocabulary"):
        write_shard(tmp_path / "big.bin", [1, 65536])
    assert not list(tmp_path.iterdir())

    class HugeTokenizer:
        def __len__(self):
            return 100_000

    with pytest.raises(ValueError, match="uint16 shards hold ids < 65536; use a smaller vocabulary"):
        prepare(["text"], HugeTokenizer(), tmp_path / "out")


def test_load_tokens_glob_order_and_vocab_check(tmp_path):
    write_shard(tmp_path / "c_train_000002.bin", [5, 6])
    write_shard(tmp_path / "c_train_000001.bin", [1, 2, 3])
    write_shard(tmp_path / "c_val_000000.bin", [9])
    stream = load_tokens(str(tmp_path / "*_train_*.bin"), vocab_size=7)
    assert stream.tolist() == [1, 2, 3, 5, 6]
    assert load_tokens([tmp_path / "c_val_000000.bin"]).tolist() == [9]
    with pytest.raises(ValueError, match="token id 6 >= vocab size 6: the shards were made with another tokenizer"):
        load_tokens(str(tmp_path / "*_train_*.bin"), vocab_size=6)
    with pytest.raises(FileNotFoundError, match="no token shards match"):
        load_tokens(str(tmp_path / "*_nothing_*.bin"))


# ----------------------------------------------------------------------------- prepare


def test_prepare_end_to_end(small_tokenizer, tmp_path):
    tok = small_tokenizer
    docs = [f"Story {i}: Lily and Ben played in the park with a red ball." * (i % 3 + 1) for i in range(40)]
    paths = prepare(docs, tok, tmp_path, val_tokens=100, shard_size=300, prefix="ts")
    assert paths[0].name == "ts_val_000000.bin"
    assert [p.name for p in paths[1:]] == [f"ts_train_{i:06d}.bin" for i in range(1, len(paths))]
    assert len(paths) >= 4
    sizes = [len(read_shard(p)) for p in paths]
    assert sizes[0] == 100 and all(s == 300 for s in sizes[1:-1]) and 0 < sizes[-1] <= 300
    expected = [t for d in docs for t in [tok.eos_token_id, *tok(d, add_special_tokens=False)["input_ids"]]]
    assert np.concatenate([read_shard(p) for p in paths]).tolist() == expected
    assert load_tokens(str(tmp_path / "*_train_*.bin"), vocab_size=len(tok)).tolist() == expected[100:]
    assert load_tokenizer(tmp_path).get_vocab() == tok.get_vocab()  # tokenizer saved with the shards


def test_prepare_records_the_tokenizer_beside_the_shards(small_tokenizer, tmp_path):
    prepare(["Lily and Ben played in the park. " * 20] * 10, small_tokenizer, tmp_path, val_tokens=100)
    meta = data.read_token_metadata(tmp_path)
    assert (meta["eos_token_id"], meta["vocab_size"]) == (small_tokenizer.eos_token_id, len(small_tokenizer))
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically
    assert data.read_token_metadata(tmp_path / "elsewhere") is None  # shards made by another tool
    (tmp_path / data.TOKENS_FILE).write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="is not afgpt token metadata.*re-run `afgpt prepare`"):
        data.read_token_metadata(tmp_path)


def test_prepare_from_path_with_gpt2(tmp_path):
    tok = load_tokenizer(shared(GPT2))
    paths = prepare(str(shared(TINYSTORIES / "cs336_tinystories_sample.txt")), tok, tmp_path, val_tokens=50)
    val, train = (read_shard(p) for p in paths)
    assert len(paths) == 2 and len(val) == 50
    assert val[0] == 50256  # every document starts with <|endoftext|>
    # The file's own literal separators become eos tokens too: 1 prepended + 5 in the text.
    assert int((val == 50256).sum() + (train == 50256).sum()) == 6
    assert tok.decode(val[1:8]) == "\nOnce upon a time there was"  # the file starts with a newline


def test_prepare_fails_when_everything_is_validation(small_tokenizer, tmp_path):
    with pytest.raises(ValueError, match="all used for validation.*lower val_tokens"):
        prepare(["tiny"], small_tokenizer, tmp_path, val_tokens=1000)


# ----------------------------------------------------------------------------- batches


def arange_tokens(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.uint16)  # token value == position, so windows are easy to check


def window_starts(x: torch.Tensor) -> list[int]:
    return x[:, 0].tolist()


def test_batches_shape_shift_and_alignment():
    x, y = next(TokenBatches(arange_tokens(1001), batch_size=4, seq_len=10))
    assert x.shape == y.shape == (4, 10) and x.dtype == y.dtype == torch.long
    assert torch.equal(y, x + 1)  # labels are inputs shifted by one
    assert all(s % 10 == 0 for s in window_starts(x))
    assert torch.equal(x - x[:, :1], torch.arange(10).expand(4, 10))  # contiguous windows


def test_one_epoch_visits_every_window_once_then_reshuffles():
    batches = TokenBatches(arange_tokens(101), batch_size=5, seq_len=10, seed=3)
    first = [s for _ in range(2) for s in window_starts(next(batches)[0])]
    second = [s for _ in range(2) for s in window_starts(next(batches)[0])]
    assert sorted(first) == sorted(second) == list(range(0, 100, 10))
    assert first != second  # epoch 1 has its own permutation
    assert batches.epoch == 2 and batches.index == 0


def test_batches_deterministic_per_seed_and_stream():
    def starts(**kw):
        b = TokenBatches(arange_tokens(5001), batch_size=8, seq_len=10, **kw)
        return [window_starts(next(b)[0]) for _ in range(3)]

    assert starts(seed=1) == starts(seed=1)
    assert starts(seed=1) != starts(seed=2)
    assert starts(seed=1, stream=1) == starts(seed=1, stream=1)
    assert starts(seed=1, stream=1) != starts(seed=1, stream=0)


def test_ranks_see_disjoint_windows():
    # 50 windows over 3 ranks: 16 each per epoch, 2 skipped.
    seen = []
    for rank in range(3):
        b = TokenBatches(arange_tokens(501), batch_size=4, seq_len=10, seed=0, rank=rank, world_size=3)
        seen.append({s for _ in range(4) for s in window_starts(next(b)[0])})
        assert b.epoch == 1 and b.index == 0
    assert [len(s) for s in seen] == [16, 16, 16]
    assert len(seen[0] | seen[1] | seen[2]) == 48


def test_state_dict_resume_gives_identical_batches():
    tokens = arange_tokens(331)  # 33 windows: batches of 4 cross epoch boundaries
    a = TokenBatches(tokens, batch_size=4, seq_len=10, seed=7, stream=2)
    for _ in range(7):
        next(a)
    state = a.state_dict()
    expected = [next(a) for _ in range(12)]
    b = TokenBatches(tokens, batch_size=4, seq_len=10, seed=7, stream=2)
    b.load_state_dict(state)
    for (xe, ye), (xg, yg) in zip(expected, (next(b) for _ in range(12))):
        assert torch.equal(xe, xg) and torch.equal(ye, yg)
    other = TokenBatches(tokens, batch_size=4, seq_len=11, seed=7, stream=2)
    with pytest.raises(ValueError, match="seq_len") as error:
        other.load_state_dict(state)
    assert "resume with the settings it was started with, or start a new run" in str(error.value)  # says the fix


def test_too_short_corpus():
    message = "corpus has 10 tokens, fewer than seq_len[+]1 = 11; use a shorter --seq-length or more data"
    with pytest.raises(ValueError, match=message):
        TokenBatches(arange_tokens(10), batch_size=2, seq_len=10)
    with pytest.raises(ValueError, match=message):
        val_batches(arange_tokens(10), batch_size=2, seq_len=10)
    with pytest.raises(ValueError, match="fewer than world_size = 4"):
        TokenBatches(arange_tokens(31), batch_size=2, seq_len=10, rank=0, world_size=4)


def test_val_batches_are_fixed_and_in_order():
    tokens = arange_tokens(1000)
    batches = list(val_batches(tokens, batch_size=4, seq_len=10, max_tokens=101))
    assert [x.shape[0] for x, _ in batches] == [4, 4, 2]
    assert [s for x, _ in batches for s in window_starts(x)] == list(range(0, 100, 10))
    assert all(torch.equal(y, x + 1) for x, y in batches)
    again = list(val_batches(tokens, batch_size=4, seq_len=10, max_tokens=101))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))
    assert len(list(val_batches(tokens, batch_size=4, seq_len=10))) == 25  # all 99 windows
