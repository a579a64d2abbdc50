"""The shard reader: memmap and fsspec range reads, checksums, sizes, tokenizer hash checks."""

from __future__ import annotations

import os
import re
import shutil

import fsspec
import numpy as np
import pytest

from cpt.data.prepare import prepare
from cpt.data.shards import ShardError, TokenShards, tokenizer_fingerprint
from data_factories import expected_stream, make_docs, make_tokenizer, tokenizer, write_jsonl  # noqa: F401


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
    s = TokenShards.open(url, expected_tokenizer_hash=tokenizer_fingerprint(tokenizer), verify=True)  # checksums verified remotely
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
        TokenShards.open(url, verify=True)
    TokenShards.open(url)  # by default sizes only: opens


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
        TokenShards.open(bad, verify=True)
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
    with pytest.raises(ShardError, match="nowhere: no such folder"):  # a typo in a path says so
        TokenShards.open(tmp_path / "nowhere")
    with pytest.raises(ShardError, match=r"memory://nowhere-at-all: not found \(no such folder"):
        TokenShards.open("memory://nowhere-at-all")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShardError, match="no manifest.json"):
        TokenShards.open(tmp_path / "empty")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "manifest.json").write_text("{not json")
    with pytest.raises(ShardError, match="not valid JSON"):
        TokenShards.open(tmp_path / "junk")
    (tmp_path / "junk" / "manifest.json").write_bytes(b"\xff\xfe{}")  # named the file not
    with pytest.raises(ShardError, match=r"junk/manifest.json: not valid JSON \('utf-8' codec can't decode byte 0xff"):
        TokenShards.open(tmp_path / "junk")
    with pytest.raises(ShardError, match=r"shard_00000.bin: a file, not a prepared folder"):  # was a traceback
        TokenShards.open(out / "shard_00000.bin")


@pytest.mark.parametrize("edit, problem", [
    (lambda m: m.pop("tokenizer"), "no tokenizer.hash"),
    (lambda m: m["shards"][0].pop("docs_file"), "shards[0].docs_file None is not a file name"),
    (lambda m: m["shards"][1].update(tokens_file="../a.jsonl"), "shards[1].tokens_file '../a.jsonl' is not a file name"),
    (lambda m: m.update(num_tokens="lots"), "num_tokens 'lots' is not a count"),
    (lambda m: m.update(dtype="float17"), "dtype 'float17' is not uint16 or uint32"),
    (lambda m: m.update(version="one"), "version 'one' is not a number"),
    (lambda m: m.update(num_documents=m["num_documents"] + 1), "num_documents 151 is not the sum of the shards' (150)"),
])
def test_edited_manifest_is_one_error_naming_the_field(prepared, tmp_path, edit, problem, capsys):
    """A hand-edited or damaged manifest was a KeyError/TypeError traceback in `cpt train` and `cpt verify`."""
    import json

    from cpt.commands.verify import main as verify_main

    out, _ = prepared
    bad = tmp_path / "edited"
    shutil.copytree(out, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    edit(manifest)
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match=re.escape(problem)):
        TokenShards.open(bad)
    assert verify_main([str(bad)]) == 1
    assert problem in capsys.readouterr().out


def test_tokenizer_mismatch_names_both_hashes(prepared, tokenizer):
    out, _ = prepared
    other = make_tokenizer(vocab_size=300)
    h_run, h_data = tokenizer_fingerprint(other), tokenizer_fingerprint(tokenizer)
    assert h_run != h_data
    with pytest.raises(ShardError) as e:
        TokenShards.open(out, expected_tokenizer_hash=h_run)
    assert h_run in str(e.value) and h_data in str(e.value)
    assert tokenizer_fingerprint(make_tokenizer()) == h_data  # the fingerprint is stable across instances


def test_shards_with_another_eos_are_refused(prepared, tokenizer):
    """Same vocabulary (same hash), another EOS (a base vs an instruct tokenizer): the shards' document separator is
    not the run's EOS, so document masking would find no document ends; training and held-out sets refuse them."""
    import copy

    from cpt.data.loader import CPTDataLoader, sample_heldout
    from cpt.data.sources import HeldoutConfig
    from data_factories import data_config, stage

    out, _ = prepared
    instruct = copy.deepcopy(tokenizer)
    instruct.eos_token = "<bos>"
    assert tokenizer_fingerprint(instruct) == tokenizer_fingerprint(tokenizer) and instruct.eos_token_id == 1
    with pytest.raises(ShardError, match=r"separated by EOS id 0 .* has EOS id 1"):
        CPTDataLoader(data_config([{"name": "a", "path": str(out)}], seq_len=8), [stage(5, {"a": 1})], instruct, 4, 0)
    with pytest.raises(ShardError, match="held-out set 'h': .*EOS id 1"):
        sample_heldout(HeldoutConfig(name="h", path=str(out), tag="upstream"), instruct, 8)
    assert sample_heldout(HeldoutConfig(name="h", path=str(out), tag="upstream"), tokenizer, 8).num_tokens > 0
    m = prepare([str(out.parent / "a.jsonl")], instruct, out, shard_tokens=700)  # the fix the error names: a new
    assert not m.get("up_to_date") and m["tokenizer"]["eos_token_id"] == 1     # EOS is a new job, not "up to date"
    CPTDataLoader(data_config([{"name": "a", "path": str(out)}], seq_len=8), [stage(5, {"a": 1})], instruct, 4, 0)


def test_fingerprint_tracks_content(prepared, tmp_path, tokenizer):
    out, _ = prepared
    src = write_jsonl(tmp_path / "b.jsonl", [{"text": d} for d in make_docs(150, seed=12)])
    prepare([str(src)], tokenizer, tmp_path / "other", shard_tokens=700)
    assert TokenShards.open(out).fingerprint() == TokenShards.open(out).fingerprint()
    assert TokenShards.open(out).fingerprint() != TokenShards.open(tmp_path / "other").fingerprint()


def test_loader_reads_remote_sources_like_local_ones(prepared, tokenizer):
    import torch

    from cpt.data.loader import CPTDataLoader
    from data_factories import data_config, stage

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


# ---------------------------------------------------------------- full verification on demand (`cpt verify`)


def test_verify_lists_every_problem_and_cpt_verify_reports_them(prepared, tmp_path, capsys):
    from cpt.commands.verify import main as verify_main

    out, _ = prepared
    assert TokenShards.open(out).verify() == []
    assert verify_main([str(out)]) == 0
    assert capsys.readouterr().out.startswith(f"ok     {out}:")
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    for name in ("shard_00001.bin", "shard_00003.idx"):  # two corrupt files: both named
        blob = bytearray((bad / name).read_bytes())
        blob[3] ^= 0xFF
        (bad / name).write_bytes(bytes(blob))
    (bad / "shard_00002.bin").write_bytes((bad / "shard_00002.bin").read_bytes()[:-2])
    problems = TokenShards.open(bad, check_sizes=False).verify()
    assert len(problems) == 3
    assert "checksum mismatch for shard_00001.bin" in problems[0] and "shard_00002.bin has" in problems[1]
    assert "checksum mismatch for shard_00003.idx" in problems[2]
    TokenShards.open(bad, check_sizes=False)  # a start without checks opens it (rank > 0 of a training)
    assert verify_main([str(out), str(bad), str(tmp_path / "nowhere")]) == 1
    got = capsys.readouterr()
    assert got.out.count("FAILED") == 4 and "nowhere: no such folder" in got.out and "2 of 3 folders" in got.err


def test_prepare_reads_back_what_it_wrote(tmp_path, tokenizer, monkeypatch):
    """The one full verification: staged shards are re-read and checked before the manifest points at them."""
    import cpt.data.prepare as prep
    from cpt.data.shard_writer import ShardWriter

    real = ShardWriter._close

    def corrupting_close(self):
        real(self)
        path = os.path.join(self.folder, "shard_00000.bin")
        if os.path.exists(path):
            with open(path, "r+b") as f:
                f.write(b"\xff\xff")

    monkeypatch.setattr(ShardWriter, "_close", corrupting_close)
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in make_docs(40, seed=3)])
    with pytest.raises(prep.PrepareError, match="do not read back correctly.*checksum mismatch for shard_00000.bin"):
        prepare([str(src)], tokenizer, tmp_path / "out", shard_tokens=500)
    assert not (tmp_path / "out" / "manifest.json").exists()


# ---------------------------------------------------------------- remote storage: extras, memory://, http://


@pytest.fixture
def no_s3fs(monkeypatch):
    """fsspec as on a machine without s3fs/gcsfs (whether or not they are installed here)."""
    import importlib

    registry = importlib.import_module("fsspec.registry")  # (fsspec.registry is also a mapping's name)
    for proto, pkg in (("s3", "s3fs"), ("gs", "gcsfs")):
        monkeypatch.delitem(registry._registry, proto, raising=False)
        monkeypatch.setitem(registry.known_implementations, proto,
                            {"class": f"cpt_test_no_{pkg}.FileSystem", "err": f"Install {pkg} to access it"})


@pytest.mark.parametrize("url,extra", [("s3://bucket/data", "s3"), ("gs://bucket/data", "gcs")])
def test_missing_remote_extra_is_one_line_naming_it(no_s3fs, url, extra, tokenizer, tmp_path, capsys):
    from cpt.commands.prepare import main as prepare_main
    from cpt.data.loader import CPTDataLoader
    from data_factories import data_config, stage

    with pytest.raises(ShardError) as e:
        CPTDataLoader(data_config([{"name": "a", "path": url}]), [stage(1, {"a": 1.0})], tokenizer, 8, seed=0)
    msg = str(e.value)
    assert "\n" not in msg and f'pip install "cpt[{extra}]"' in msg and msg.startswith("data source 'a':")
    tok_dir = tmp_path / "tok"
    tokenizer.save_pretrained(tok_dir)
    assert prepare_main([f"{url}/raw.jsonl", "--tokenizer", str(tok_dir), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("cpt prepare: error:") and f'pip install "cpt[{extra}]"' in err


class _RangeHandler:
    """http.server handler factory: serves a folder, answering Range requests with 206 (or ignoring them),
    counting the bytes it sends."""

    @staticmethod
    def make(folder, ranges: bool, sent: list):
        import http.server
        import io

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *a, **k):
                super().__init__(*a, directory=str(folder), **k)

            def send_head(self):
                rng = self.headers.get("Range")
                if not (ranges and rng):
                    return super().send_head()
                try:
                    f = open(self.translate_path(self.path), "rb")
                except OSError:
                    self.send_error(404)
                    return None
                with f:
                    size = os.fstat(f.fileno()).st_size
                    a, b = rng.removeprefix("bytes=").split("-")
                    a, b = int(a), min(int(b) if b else size - 1, size - 1)
                    f.seek(a)
                    body = f.read(b - a + 1)
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {a}-{b}/{size}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                return io.BytesIO(body)

            def copyfile(self, src, dst):
                data = src.read()
                sent.append((self.path, len(data)))
                dst.write(data)

            def log_message(self, *a):
                pass

        return Handler


@pytest.fixture
def http_server():
    import http.server
    import threading

    servers = []

    def serve(folder, ranges=True):
        sent: list = []
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RangeHandler.make(folder, ranges, sent))
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}", sent

    yield serve
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def test_training_stream_reads_shards_over_http(prepared, tmp_path, tokenizer, http_server):
    """A prepared folder served by a local HTTP server: the loader reads the same batches as from disk, with range
    requests (only the rows' bytes travel), and `cpt verify` checks it remotely."""
    import torch

    from cpt.commands.verify import verify_folder
    from cpt.data.loader import CPTDataLoader
    from data_factories import data_config, stage

    out, _ = prepared
    base, sent = http_server(out.parent)
    url = f"{base}/{out.name}"
    stages = [stage(4, {"a": 1.0})]
    local = CPTDataLoader(data_config([{"name": "a", "path": str(out)}], seq_len=8), stages, tokenizer, 8, seed=0)
    remote = CPTDataLoader(data_config([{"name": "a", "path": url}], seq_len=8), stages, tokenizer, 8, seed=0)
    assert remote.streams[0].shards._fs is not None and local.fingerprint() == remote.fingerprint()
    sent.clear()
    for s in range(4):
        assert torch.equal(local.batch(s)["input_ids"], remote.batch(s)["input_ids"])
    itemsize = remote.streams[0].shards.dtype.itemsize
    assert 0 < sum(n for _, n in sent) == 4 * 8 * 8 * itemsize  # exactly the rows' bytes, not whole shards
    assert all("/shard_" in p and p.endswith(".bin") for p, _ in sent)
    problems, summary = verify_folder(url)
    assert problems == [] and "shards" in summary


def test_http_server_without_range_support_is_an_error_not_wrong_data(prepared, tokenizer, http_server):
    out, _ = prepared
    base, _ = http_server(out.parent, ranges=False)
    s = TokenShards.open(f"{base}/{out.name}")
    with pytest.raises(ShardError, match="does not serve byte ranges"):
        s.read(700, 10)


def test_prepare_from_http_says_not_found_or_cannot_reach(tmp_path, tokenizer, http_server):
    """A missing file on a server is "not found"; a server that cannot be reached said "not found" too (fsspec's http
    exists() is False for both): it says so, with the connection's error."""
    import socket

    from cpt.data.readers import ReadError, resolve_files

    write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in make_docs(5, seed=3)])
    base, _ = http_server(tmp_path)
    assert resolve_files([f"{base}/a.jsonl"]) == [f"{base}/a.jsonl"]
    with pytest.raises(ReadError, match=r"^input not found: http://127.0.0.1:\d+/b.jsonl$"):
        resolve_files([f"{base}/b.jsonl"])
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(ReadError, match=rf"^cannot reach http://127.0.0.1:{port}/a.jsonl: ClientConnectorError"):
        resolve_files([f"http://127.0.0.1:{port}/a.jsonl"])


def test_remote_size_checks_use_one_listing(prepared, monkeypatch):
    """Opening a remote source checks every file's size from one directory listing, not one request per file."""
    from fsspec.implementations.memory import MemoryFileSystem

    out, _ = prepared
    url = to_memory(out, "/bucket/listing")
    calls = {"ls": 0, "size": 0}
    real_ls, real_size = MemoryFileSystem.ls, MemoryFileSystem.size

    def ls(self, *a, **k):
        calls["ls"] += 1
        return real_ls(self, *a, **k)

    def size(self, *a, **k):
        calls["size"] += 1
        return real_size(self, *a, **k)

    monkeypatch.setattr(MemoryFileSystem, "ls", ls)
    monkeypatch.setattr(MemoryFileSystem, "size", size)
    s = TokenShards.open(url)
    assert calls == {"ls": 1, "size": 0} and len(s.manifest["shards"]) > 3
    fsspec.filesystem("memory").rm("/bucket/listing/shard_00002.idx")
    with pytest.raises(ShardError, match="shard file shard_00002.idx is missing"):
        TokenShards.open(url)


def test_slow_stats_of_a_large_local_source_run_on_threads_with_the_same_results(tmp_path, tokenizer, monkeypatch):
    """A local source on a network file system (a stat is a round trip): when the first stats are slow the rest run on
    STAT_THREADS threads; the sizes, times and the first problem (in manifest order) are those of one-by-one stats."""
    import threading

    from cpt.data import shards as shards_mod

    src = write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in make_docs(150, seed=11)])
    out = tmp_path / "src"
    prepare([str(src)], tokenizer, out, shard_tokens=60)
    serial = TokenShards.open(out)
    assert len(serial.mtimes) > 200  # (files enough for the threads: the first 64 are stat'ed alone)
    seen: set[str] = set()
    real_stat = os.stat

    def counted(path, *a, **k):
        seen.add(threading.current_thread().name.split("_")[0])
        return real_stat(path, *a, **k)

    monkeypatch.setattr(shards_mod.os, "stat", counted)
    monkeypatch.setattr(shards_mod, "FAST_STAT_S", 0.0)  # (every stat counts as slow)
    threaded = TokenShards.open(out)
    assert "cpt-stat" in seen and threaded.mtimes == serial.mtimes
    names = [n for n, _, _ in serial.expected_files()]
    os.remove(out / names[200])
    with open(out / names[150], "r+b") as f:
        f.truncate(4)
    with pytest.raises(ShardError, match=f"{names[150]} has 4 bytes"):  # (the first in manifest order)
        TokenShards.open(out)
    os.remove(out / names[150])
    with pytest.raises(ShardError, match=f"shard file {names[150]} is missing"):
        TokenShards.open(out)
    seen.clear()
    monkeypatch.setattr(shards_mod, "FAST_STAT_S", 1.0)  # a local disk: one by one, no threads
    with pytest.raises(ShardError, match=f"shard file {names[150]} is missing"):
        TokenShards.open(out)
    assert seen == {"MainThread"}


def test_a_shard_removed_or_cut_short_during_a_run_is_one_error_naming_it(prepared, tmp_path):
    """Local shards are memory-mapped and the maps kept open: a file cut short under an open map made the next read
    past its new end a SIGBUS (the run died with no message, its in-flight checkpoint lost); a shard not yet opened
    and removed or cut short gave FileNotFoundError / "mmap length is greater than file size" tracebacks without the
    source. Each is now one ShardError naming the file."""
    out, expected = prepared
    src = tmp_path / "copy"
    shutil.copytree(out, src)
    shards = TokenShards.open(src)
    n = shards.num_tokens
    assert np.array_equal(shards.read(0, n), expected)  # every shard mapped and kept open
    with open(src / "shard_00001.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(ShardError, match=r"shard_00001.bin: 10 bytes, but the manifest's [\d,]+ tokens need [\d,]+: the "
                                         r"file was cut short during the run"):
        shards.read_many(np.arange(0, n - 8, 8), 8)  # (it was a SIGBUS: the whole test process gone)
    shutil.rmtree(src)
    shutil.copytree(out, src)
    shards = TokenShards.open(src)  # nothing mapped yet
    os.remove(src / "shard_00002.bin")
    with pytest.raises(ShardError, match=r"shard_00002.bin: No such file or directory: removed or moved during the run"):
        shards.read(0, n)
    shutil.copy(out / "shard_00002.bin", src / "shard_00002.bin")
    with open(src / "shard_00003.bin", "r+b") as f:
        f.truncate(4)
    with pytest.raises(ShardError, match=r"shard_00003.bin: 4 bytes, but the manifest's"):
        shards.read(0, n)


def test_a_damaged_heldout_set_is_one_error_naming_the_set(prepared, tokenizer, tmp_path):
    """A held-out set's token ids past the vocabulary (a corrupt file) stopped the step-0 evaluation with an embedding
    IndexError (a CUDA device assert on a GPU) naming no file, and a damaged .idx with "tokens [0, N) out of range"
    naming neither set nor file: each is one ShardError naming the set now (training sources already were)."""
    from cpt.data.loader import sample_heldout
    from cpt.data.sources import HeldoutConfig

    out, _ = prepared
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    h = HeldoutConfig(name="h", path=str(bad), tag="upstream")
    tokens = np.fromfile(bad / "shard_00001.bin", dtype=np.uint16)
    tokens[3] = 40000  # (the tokenizer has far fewer ids; same size, so only checksums would see it)
    tokens.tofile(bad / "shard_00001.bin")
    for limit in (None, TokenShards.open(bad).num_tokens - 1):  # (a sample of nearly every document)
        with pytest.raises(ShardError, match=r"held-out set 'h' \(.*bad\): token id 40000 is outside the tokenizer's "
                                             r"vocabulary \([\d,]+ ids\): a file is corrupt; `cpt verify .*bad` names it"):
            sample_heldout(h, tokenizer, 8, max_tokens=limit)  # (the whole set, a sample of documents)
    shutil.copy(out / "shard_00001.bin", bad / "shard_00001.bin")
    starts = np.fromfile(bad / "shard_00001.idx", dtype="<u8")
    starts[1] = 99999999
    starts.tofile(bad / "shard_00001.idx")
    for limit in (None, 64):
        with pytest.raises(ShardError, match=r"held-out set 'h': .*bad/shard_00001.idx is corrupt: document 1 starts at "
                                             r"token [\d,]+, outside the set's"):
            sample_heldout(h, tokenizer, 8, max_tokens=limit)
    shutil.copy(out / "shard_00001.idx", bad / "shard_00001.idx")
    assert sample_heldout(h, tokenizer, 8, max_tokens=64).num_tokens > 0
