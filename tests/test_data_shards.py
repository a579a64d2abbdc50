"""The shard reader: memmap and fsspec range reads, checksums, sizes, tokenizer hash checks."""

from __future__ import annotations

import os
import shutil

import fsspec
import numpy as np
import pytest

from cpt.data.prepare import prepare
from cpt.data.shards import ShardError, TokenShards, tokenizer_fingerprint
from test_data_common import expected_stream, make_docs, make_tokenizer, tokenizer, write_jsonl  # noqa: F401


@pytest.fixture
def prepared(tmp_path, tokenizer):
    docs = make_docs(150, seed=11)
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in docs])
    out = tmp_path / "src"
    prepare([str(src)], tokenizer, out, shard_tokens=700)
    return out, expected_stream(tokenizer, docs)


def to_memory(folder, url: str) -> str:
    fs = fsspec.filesystem("memory")
    for name in os.listdir(folder):
        if os.path.isfile(os.path.join(folder, name)):
            fs.pipe(f"{url}/{name}", open(os.path.join(folder, name), "rb").read())
    return f"memory://{url}"


def test_reads_cross_shard_boundaries(prepared):
    out, want = prepared
    s = TokenShards.open(out)
    assert len(s.manifest["shards"]) > 3 and s.num_tokens == len(want)
    want = np.array(want)
    for start, length in [(0, 10), (690, 20), (695, 1500), (s.num_tokens - 5, 5), (0, s.num_tokens)]:
        assert s.read(start, length).tolist() == want[start : start + length].tolist()
    starts = np.array([3, 699, 1400, 2000])
    assert s.read_many(starts, 64).tolist() == [want[a : a + 64].tolist() for a in starts]
    with pytest.raises(IndexError):
        s.read(s.num_tokens - 3, 10)


@pytest.mark.parametrize("kind", ["local", "memory"])
def test_read_many_into_int64_rows(prepared, kind):
    """The loader's path: windows (inside one shard and across boundaries) written into chosen rows of an int64
    batch, converted on the way; other rows untouched; out-of-range windows refused."""
    out, want = prepared
    s = TokenShards.open(out if kind == "local" else to_memory(out, "/bucket/rows"))
    want = np.array(want)
    starts = np.array([3, 695, 1400, s.num_tokens - 64, 650])  # 695 and 650 cross a shard boundary (700 tokens)
    batch = np.full((7, 64), -1, dtype=np.int64)
    rows = np.array([6, 0, 2, 3, 5])
    assert s.read_many(starts, 64, out=batch, rows=rows) is batch
    for r, a in zip(rows, starts):
        assert batch[r].tolist() == want[a : a + 64].tolist()
    assert (batch[[1, 4]] == -1).all()
    with pytest.raises(IndexError):
        s.read_many(np.array([0, s.num_tokens - 10]), 64, out=batch, rows=np.array([0, 1]))
    with pytest.raises(ValueError, match="destination rows"):
        s.read_many(starts, 64, out=batch, rows=rows[:2])


@pytest.mark.parametrize("kind", ["memory", "file"])
def test_remote_reading_through_fsspec(prepared, kind, tokenizer):
    out, want = prepared
    url = to_memory(out, f"/bucket/{kind}") if kind == "memory" else f"file://{out}"
    s = TokenShards.open(url, expected_tokenizer_hash=tokenizer_fingerprint(tokenizer))  # checksums verified remotely
    assert s._fs is not None  # range reads, not memmap
    assert s.read(0, s.num_tokens).tolist() == want
    starts = np.array([5, 690, 1399])
    assert s.read_many(starts, 30).tolist() == [want[a : a + 30] for a in starts]


def test_remote_checksum_mismatch_is_detected(prepared):
    out, _ = prepared
    url = to_memory(out, "/bucket/corrupt")
    fs = fsspec.filesystem("memory")
    blob = bytearray(fs.cat("/bucket/corrupt/shard_00001.bin"))
    blob[10] ^= 0xFF
    fs.pipe("/bucket/corrupt/shard_00001.bin", bytes(blob))
    with pytest.raises(ShardError, match="checksum mismatch for shard_00001.bin"):
        TokenShards.open(url)
    TokenShards.open(url, verify=False)  # switched off: opens


def test_local_corruption_truncation_and_missing_files(prepared, tmp_path):
    out, _ = prepared
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    with open(bad / "shard_00002.bin", "r+b") as f:
        f.seek(7)
        b = f.read(1)
        f.seek(7)
        f.write(bytes([b[0] ^ 1]))
    with pytest.raises(ShardError, match="checksum mismatch for shard_00002.bin"):
        TokenShards.open(bad)
    assert TokenShards.open(bad, verify=False).num_tokens > 0
    with open(bad / "shard_00000.bin", "r+b") as f:
        f.truncate(100)
    with pytest.raises(ShardError, match="shard_00000.bin has 100 bytes"):
        TokenShards.open(bad, verify=False)  # sizes are always checked
    shutil.rmtree(bad)
    shutil.copytree(out, bad)
    os.remove(bad / "shard_00001.idx")
    with pytest.raises(ShardError, match="shard file shard_00001.idx is missing"):
        TokenShards.open(bad, verify=False)
    with pytest.raises(ShardError, match="no manifest.json"):
        TokenShards.open(tmp_path / "nowhere")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "manifest.json").write_text("{not json")
    with pytest.raises(ShardError, match="not valid JSON"):
        TokenShards.open(tmp_path / "junk")


def test_tokenizer_mismatch_names_both_hashes(prepared, tokenizer):
    out, _ = prepared
    other = make_tokenizer(vocab_size=300)
    h_run, h_data = tokenizer_fingerprint(other), tokenizer_fingerprint(tokenizer)
    assert h_run != h_data
    with pytest.raises(ShardError) as e:
        TokenShards.open(out, expected_tokenizer_hash=h_run)
    assert h_run in str(e.value) and h_data in str(e.value)
    assert tokenizer_fingerprint(make_tokenizer()) == h_data  # the fingerprint is stable across instances


def test_fingerprint_tracks_content(prepared, tmp_path, tokenizer):
    out, _ = prepared
    src = write_jsonl(tmp_path / "b.jsonl", [{"text": d} for d in make_docs(150, seed=12)])
    prepare([str(src)], tokenizer, tmp_path / "other", shard_tokens=700)
    assert TokenShards.open(out).fingerprint() == TokenShards.open(out).fingerprint()
    assert TokenShards.open(out).fingerprint() != TokenShards.open(tmp_path / "other").fingerprint()


def test_loader_reads_remote_sources_like_local_ones(prepared, tokenizer):
    import torch

    from cpt.data.loader import CPTDataLoader
    from test_data_common import data_config, stage

    out, _ = prepared
    url = to_memory(out, "/bucket/loader")
    stages = [stage(10, {"a": 0.7, "b": 0.3})]
    local = CPTDataLoader(data_config([{"name": "a", "path": str(out)}, {"name": "b", "path": str(out)}], seq_len=8),
                          stages, tokenizer, 8, seed=0)
    remote = CPTDataLoader(data_config([{"name": "a", "path": url}, {"name": "b", "path": url}], seq_len=8),
                           stages, tokenizer, 8, seed=0)
    assert remote.streams[0].shards._fs is not None
    for s in range(10):
        assert torch.equal(local.batch(s)["input_ids"], remote.batch(s)["input_ids"])
    assert local.fingerprint() == remote.fingerprint()
