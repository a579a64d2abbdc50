"""Streaming shards from flaky remote storage: transient errors and short reads are retried (bounded, logged,
counted), failures that retrying cannot mend stop at once with one line, and no wrong token is ever returned.

Remote storage is simulated by ``flaky://``: memory:// with faults injected into chosen range reads (no network, no
timing: the retry wait is set to 0 and calls are counted)."""

from __future__ import annotations

import contextlib
import logging

import fsspec
import numpy as np
import pytest
import torch
from fsspec.implementations.memory import MemoryFileSystem

from cpt.config import RemoteConfig
from cpt.data import remote
from cpt.data.prepare import prepare
from cpt.data.shards import ShardError, TokenShards
from data_factories import data_config, make_docs, stage, tokenizer, write_jsonl  # noqa: F401
from test_data_shards import to_memory


class FlakyFS(MemoryFileSystem):
    """memory:// under another protocol; ``faults`` maps the number of a range read (1, 2, ... over the process) to
    what happens to it: an exception to raise, or ``"short"`` (half the bytes)."""

    protocol = "flaky"
    faults: dict = {}
    calls: list = []

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(str(path).replace("flaky://", "memory://", 1))

    def cat_file(self, path, start=None, end=None, **kw):
        FlakyFS.calls.append(str(path))
        fault = FlakyFS.faults.get(len(FlakyFS.calls))
        if isinstance(fault, BaseException):
            raise fault
        data = super().cat_file(path, start, end, **kw)
        return data[: len(data) // 2] if fault == "short" else data


@pytest.fixture
def flaky(tmp_path, tokenizer, monkeypatch):
    fsspec.register_implementation("flaky", FlakyFS, clobber=True)
    monkeypatch.setattr(FlakyFS, "faults", {})
    monkeypatch.setattr(FlakyFS, "calls", [])
    monkeypatch.setattr(remote, "DEFAULT", RemoteConfig(retry_wait_s=0.0))  # (reads given no data.remote)
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in make_docs(150, seed=11)])
    out = tmp_path / "src"
    prepare([str(src)], tokenizer, out, shard_tokens=700)
    url = to_memory(out, "/bucket/flaky").replace("memory://", "flaky://")
    return out, url


def test_transient_errors_and_short_reads_are_retried_logged_and_counted(flaky, tokenizer, caplog):
    """A connection reset, a timeout and a response cut short in the middle of a run: the batches are exactly those
    read from disk, each failed range is asked again (only it), one warning per retry, counted in the metrics."""
    from cpt.data.loader import CPTDataLoader

    out, url = flaky
    stages = [stage(6, {"a": 1.0})]
    local = CPTDataLoader(data_config([{"name": "a", "path": str(out)}], seq_len=8), stages, tokenizer, 8, seed=0)
    remote_cfg = {"read_retries": 5, "retry_wait_s": 0.0}  # (data.remote: the loader's sources read with it)
    loader = CPTDataLoader(data_config([{"name": "a", "path": url}], seq_len=8, remote=remote_cfg), stages, tokenizer, 8,
                           seed=0)
    first = len(FlakyFS.calls)  # (opening reads the manifest with one cat_file)
    # 8 rows a batch (a row across a shard boundary is 2 ranges): faults in the 2nd, 3rd and 5th batch
    FlakyFS.faults = {first + 10: ConnectionResetError("peer reset"), first + 20: TimeoutError("read timed out"),
                      first + 21: TimeoutError("read timed out"), first + 37: "short"}  # (20, 21: one request)
    with caplog.at_level(logging.WARNING, logger="cpt.data"):
        for s in range(6):
            assert torch.equal(local.batch(s)["input_ids"], loader.batch(s)["input_ids"])
    retries = [r.getMessage() for r in caplog.records if "retry" in r.getMessage()]
    assert len(retries) == 3 and loader.metrics()["data/read_retries/a"] == 3.0
    assert "ConnectionResetError: peer reset; 1 of 8 ranges" in retries[0] and "retry 1/5 in 0 s" in retries[0]
    assert "TimeoutError: read timed out; 2 of 8 ranges" in retries[1] and "short read" in retries[2]
    assert "data/read_retries/a" not in local.metrics()


def test_a_failure_that_does_not_mend_stops_with_one_line_after_bounded_retries(flaky, monkeypatch):
    _, url = flaky
    s = TokenShards.open(url, retry=RemoteConfig(read_retries=3, retry_wait_s=0.0))
    n = len(FlakyFS.calls)
    FlakyFS.faults = {n + k: ConnectionError("no route to host") for k in range(1, 10)}
    with pytest.raises(ShardError) as e:
        s.read(10, 20)
    assert len(FlakyFS.calls) - n == 4 and s.read_retries == 3  # 1 + 3 retries, then stop
    msg = str(e.value)
    assert "\n" not in msg and "shard_00000.bin: range read failed 4 times" in msg and "--resume" in msg
    # a shortened file (e.g. replaced since `cpt prepare`) gives short reads every time: an error, never tokens
    n = len(FlakyFS.calls)
    FlakyFS.faults = {n + k: "short" for k in range(1, 10)}
    with pytest.raises(ShardError, match=r"short read: 20 of 40 bytes"):
        s.read(10, 20)


def test_missing_file_or_denied_access_is_not_retried(flaky):
    _, url = flaky
    s = TokenShards.open(url)
    for err in (FileNotFoundError("shard_00000.bin"), PermissionError("AccessDenied")):
        n = len(FlakyFS.calls)
        FlakyFS.faults = {n + 1: err}
        with pytest.raises(ShardError, match=type(err).__name__):
            s.read_many(np.array([0, 100]), 16)
        assert len(FlakyFS.calls) - n == 2 and s.read_retries == 0  # both ranges asked once, no retry


def test_heldout_sample_reads_remote_documents_in_two_batched_requests(flaky, tokenizer, tmp_path, monkeypatch):
    """A held-out sample of whole documents from a remote set: its .idx files in one batched request and the chosen
    documents in another (concurrent on s3/gcs/http), not one round trip per shard and per document; same tokens as
    from disk."""
    from types import SimpleNamespace

    from cpt.data.loader import sample_heldout

    out, url = flaky
    batched, opened = [], []
    real_cat_ranges, real_open = FlakyFS.cat_ranges, FlakyFS._open
    monkeypatch.setattr(FlakyFS, "cat_ranges", lambda self, paths, *a, **k: (batched.append(len(paths)),
                                                                             real_cat_ranges(self, paths, *a, **k))[1])
    monkeypatch.setattr(FlakyFS, "_open", lambda self, path, *a, **k: (opened.append(path), real_open(self, path, *a, **k))[1])
    got = sample_heldout(SimpleNamespace(name="h", path=url, max_tokens=None), tokenizer, 16, max_tokens=3000, seed=0)
    want = sample_heldout(SimpleNamespace(name="h", path=str(out), max_tokens=None), tokenizer, 16, max_tokens=3000, seed=0)
    assert torch.equal(got.tokens, want.tokens) and got.docs == want.docs > 10
    assert opened == [] and len(batched) == 2 and batched[0] == len(TokenShards.open(str(out)).manifest["shards"])


def test_resume_checksums_remote_shards_replaced_since_the_checkpoint(flaky, tokenizer):
    """A shard re-uploaded (same size, other bytes) after the checkpoint's run opened it: the resume finds it newer in
    the listing (no extra request), checksums it and refuses in one line; untouched files resume as before."""
    from cpt.data.loader import CPTDataLoader

    _, url = flaky
    cfg, stages = data_config([{"name": "a", "path": url}], seq_len=8), [stage(6, {"a": 1.0})]
    loader = CPTDataLoader(cfg, stages, tokenizer, 8, seed=0)
    loader.batch(0)
    state = loader.state_dict()
    assert state["source_data"]["a"]["newest_file_ns"] > 0
    CPTDataLoader(cfg, stages, tokenizer, 8, seed=0).load_state_dict(state)  # unchanged: resumes
    fs, path = fsspec.filesystem("memory"), "/bucket/flaky/shard_00003.bin"
    fs.pipe(path, bytes(reversed(fs.cat_file(path))))
    with pytest.raises(ValueError, match=r"checksum mismatch for shard_00003\.bin") as e:
        CPTDataLoader(cfg, stages, tokenizer, 8, seed=0).load_state_dict(state)
    assert "flaky:///bucket/flaky" in str(e.value)


@pytest.mark.parametrize("entry,seconds", [
    ({"LastModified": __import__("datetime").datetime(2026, 1, 2, tzinfo=__import__("datetime").timezone.utc)}, 1767312000),
    ({"updated": "2026-01-02T00:00:00.000Z"}, 1767312000),  # gcsfs
    ({"created": 1767312000.5}, 1767312000.5),  # memory://
    ({"size": 3}, None),  # an HTTP index page: no time
])
def test_listing_times_of_each_store(entry, seconds):
    assert remote.listed_mtime_ns(entry) == (None if seconds is None else int(seconds * 1e9))


@pytest.mark.parametrize("url,what", [
    ("https://user:s3cr3t@host/prepared", "a password"),
    ("https://host/prepared?token=s3cr3t", "'token'"),
    ("https://bucket.s3.amazonaws.com/p?X-Amz-Signature=s3cr3t", "'X-Amz-Signature'"),
    ("https://hf_s3cr3tAbcdefGhij@huggingface.co/datasets/x/resolve/main/p", "a token as the user name"),
    ("https://s3cr3t1a2B3c4D5e6F7g8H9i0J@git.example.com/data/p", "a token as the user name"),
])
def test_credentials_in_a_url_are_refused_never_written(url, what, tokenizer, tmp_path, capsys):
    """A password or token in a source's URL (or a `cpt prepare` input) would reach config.yaml, checkpoints, W&B,
    manifests and logs, which redact secret-named keys only: refused in one line that does not repeat it."""
    from cpt.commands.prepare import main as prepare_main
    from cpt.config import ConfigError, load_config
    from conftest import tiny_run_config

    cfg = tiny_run_config(tmp_path, tmp_path / "run")
    cfg["data"]["heldout"] = [{"name": "h", "path": url, "tag": "upstream"}]
    with pytest.raises(ConfigError) as e:
        load_config(base=cfg)
    assert "data.heldout.0.path: a URL with " in str(e.value) and what in str(e.value) and "s3cr3t" not in str(e.value)
    tok_dir = tmp_path / "tok"
    tokenizer.save_pretrained(tok_dir)
    assert prepare_main([url, "--tokenizer", str(tok_dir), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and what in err and "s3cr3t" not in err and "environment" in err
    for fine in ("https://user@host/prepared?revision=main", "https://jane.doe@host/p", "sftp://svc_account_2024_nightly@host/p"):
        data_config([{"name": "a", "path": fine}])  # a user name, no secret: accepted


def test_http_503_and_cut_short_bodies_are_retried_403_is_not(flaky, tokenizer):
    """The errors aiohttp really raises (through fsspec's http://): a 503 and a body cut short mid-transfer are
    retried and give the right tokens; a 403 stops at once."""
    import http.server
    import threading

    out, _ = flaky
    plan: list = []  # what the next requests get: 503, "cut", 403; then normal answers

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            data = (out / self.path.rsplit("/", 1)[-1]).read_bytes()
            rng = self.headers.get("Range")
            a, b = (int(x) for x in rng.removeprefix("bytes=").split("-")) if rng else (0, len(data) - 1)
            body, fault = data[a : b + 1], plan.pop(0) if plan else None
            if isinstance(fault, int):
                self.send_response(fault)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206 if rng else 200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2] if fault == "cut" else body)
            if fault == "cut":
                self.close_connection = True

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        s = TokenShards.open(f"http://127.0.0.1:{srv.server_address[1]}/src")
        want = TokenShards.open(str(out)).read(100, 50)
        plan[:] = [503, "cut"]
        assert s.read(100, 50).tolist() == want.tolist() and s.read_retries == 2
        plan[:] = [403]
        with pytest.raises(ShardError, match="403"):
            s.read(100, 50)
        assert s.read_retries == 2
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.mark.slow
def test_a_run_whose_store_stays_down_stops_in_one_line_and_resumes_exactly(tiny_cpt_data, tmp_path, monkeypatch):
    """The store stays down past the retries in the middle of a 4-step run (checkpoint every 2 steps): the run stops
    with one ShardError line naming the file and --resume; a --resume once the store is back trains steps 3-4 onto
    the losses of a run that never failed."""
    from conftest import tiny_run_config
    from cpt.config import load_config
    from cpt.metrics import read_metrics
    from cpt.train import train

    fsspec.register_implementation("flaky", FlakyFS, clobber=True)
    monkeypatch.setattr(FlakyFS, "faults", {})
    monkeypatch.setattr(FlakyFS, "calls", [])
    url = to_memory(tiny_cpt_data / "data" / "python", "/bucket/e2e").replace("memory://", "flaky://")

    def run(out, resume=False):
        cfg = tiny_run_config(tiny_cpt_data, out, eval={"at_start": False}, checkpoint={"every": 2, "export_at_end": False})
        cfg["stages"][0]["steps"] = 4
        cfg["data"]["heldout"] = []
        cfg["data"]["sources"][0]["path"] = url
        cfg["data"]["remote"] = {"read_retries": 1, "retry_wait_s": 0}  # (the run's own retry settings)
        train(load_config(base=cfg), resume=resume, echo=lambda *a, **k: None)
        return {r["step"]: r["train/loss"] for r in read_metrics(out / "metrics.jsonl") if "train/loss" in r}

    whole = run(tmp_path / "whole")
    calls = len(FlakyFS.calls)
    FlakyFS.calls.clear()
    # (5 batches of about 6 ranges are read: 4 trained on, 1 read ahead and dropped): fail from the 4th batch on
    FlakyFS.faults = {k: ConnectionError("store down") for k in range(calls - 9, calls + 100)}
    with pytest.raises(ShardError) as e:
        run(tmp_path / "broken")
    msg = str(e.value)
    assert "\n" not in msg and "range read failed 2 times (ConnectionError: store down" in msg and "--resume" in msg
    FlakyFS.faults = {}
    resumed = run(tmp_path / "broken", resume=True)
    assert sorted(resumed) == [1, 2, 3, 4]
    assert [resumed[s] for s in (3, 4)] == pytest.approx([whole[s] for s in (3, 4)], abs=1e-6)


def test_empty_ranges_are_not_requested(flaky):
    """A shard inside one long document has an empty .idx file: no range request for it (``bytes=0--1`` is not a
    valid Range; stores answer it differently)."""
    _, url = flaky
    fs = fsspec.filesystem("flaky")
    n = len(FlakyFS.calls)
    blobs, retries = remote.read_ranges(fs, [f"{url}/shard_00000.idx", f"{url}/shard_00001.idx"], [0, 8], [0, 16])
    assert blobs[0] == b"" and len(blobs[1]) == 8 and retries == 0
    assert len(FlakyFS.calls) - n == 1 and FlakyFS.calls[-1].endswith("/shard_00001.idx")


def test_manifest_read_at_start_is_retried_then_one_line(flaky, monkeypatch):
    _, url = flaky
    FlakyFS.faults = {len(FlakyFS.calls) + 1: ConnectionResetError("peer reset")}
    assert TokenShards.open(url).num_tokens > 0  # retried once
    monkeypatch.setattr(remote, "DEFAULT", RemoteConfig(read_retries=2, retry_wait_s=0.0))  # (no data.remote given)
    n = len(FlakyFS.calls)
    FlakyFS.faults = {n + k: TimeoutError("timed out") for k in range(1, 10)}
    with pytest.raises(ShardError) as e:
        TokenShards.open(url)
    assert len(FlakyFS.calls) - n == 3 and "\n" not in str(e.value)
    assert "manifest.json: read failed 3 times (TimeoutError: timed out)" in str(e.value)


def test_checksum_pass_over_remote_files_rereads_a_file_after_a_transient_error(flaky, monkeypatch):
    """`cpt verify URL` / data.verify_checksums: a connection reset while a file streams reads that file again (a
    traceback before); the checksums come out right."""
    _, url = flaky
    real_open = FlakyFS._open
    failed: list = []

    def _open(self, path, *a, **k):
        if path.endswith("shard_00002.bin") and not failed:
            failed.append(path)
            raise ConnectionResetError("peer reset")
        return real_open(self, path, *a, **k)

    monkeypatch.setattr(FlakyFS, "_open", _open)
    assert TokenShards.open(url, check_sizes=False).verify() == [] and len(failed) == 1


def test_a_shard_replaced_on_the_store_during_a_run_stops_it(flaky, tokenizer, monkeypatch):
    """Rank 0 lists each remote source's folder again every data.remote.recheck_s (0 here: at every batch, one LIST): a
    shard re-uploaded with other bytes stops the run in one line before more of it is trained on; one re-uploaded
    with the same bytes (checksummed) does not."""
    from fsspec.implementations.memory import MemoryFileSystem

    from cpt.data.loader import CPTDataLoader

    _, url = flaky
    cfg, stages = data_config([{"name": "a", "path": url}], seq_len=8, remote={"recheck_s": 0}), [stage(6, {"a": 1.0})]
    loader = CPTDataLoader(cfg, stages, tokenizer, 8, seed=0)
    listed: list = []
    real_ls = MemoryFileSystem.ls
    monkeypatch.setattr(MemoryFileSystem, "ls", lambda self, *a, **k: (listed.append(1), real_ls(self, *a, **k))[1])
    loader.batch(0)
    assert len(listed) == 1  # one LIST per source per check, no request per shard
    fs, path = fsspec.filesystem("memory"), "/bucket/flaky/shard_00003.bin"
    fs.pipe(path, fs.cat_file(path))  # the same bytes again (e.g. a sync that re-uploads): checksummed, fine
    loader.batch(1)
    fs.pipe(path, bytes(reversed(fs.cat_file(path))))
    with pytest.raises(ShardError) as e:
        loader.batch(2)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("data source 'a'") and "checksum mismatch for shard_00003.bin" in msg
    assert "replaced during the run" in msg


def test_a_store_whose_listing_gives_no_times_is_rechecked_by_size(flaky, tokenizer, monkeypatch):
    """A store whose listing gives no modification times (http(s)://: fsspec's HTTP listing has none) was never listed
    again during a run: a shard that changed size there was trained on without a word. Its sizes are rechecked."""
    from cpt.data.loader import CPTDataLoader

    _, url = flaky
    monkeypatch.setattr(TokenShards, "newest_mtime", lambda self: None)  # (as an http listing: no times)
    cfg, stages = data_config([{"name": "a", "path": url}], seq_len=8, remote={"recheck_s": 0}), [stage(6, {"a": 1.0})]
    loader = CPTDataLoader(cfg, stages, tokenizer, 8, seed=0)
    loader.batch(0)
    fs, path = fsspec.filesystem("memory"), "/bucket/flaky/shard_00003.bin"
    fs.pipe(path, fs.cat_file(path) + b"\0" * 64)
    with pytest.raises(ShardError, match=r"^data source 'a' .*shard_00003.bin has \d+ bytes on the store now, the "
                                         r"manifest expects \d+ \(replaced during the run\)"):
        loader.batch(1)


@pytest.mark.parametrize("command", ["eval", "interpolate"])
def test_a_credential_in_a_heldout_url_on_the_command_line_is_refused(command, tmp_path, capsys):
    """`cpt eval --heldout NAME=URL:TAG` (and `cpt interpolate`'s) took a URL with a password or token as given, and
    --out's JSON and the log name the path: refused in one line that does not repeat it, as in a config."""
    from cpt.cli import main

    url = "h=https://host/heldout?X-Amz-Signature=s3cr3t:upstream"
    argv = ([command, str(tmp_path), "--heldout", url] if command == "eval"
            else [command, str(tmp_path), str(tmp_path), "--heldout", url])
    with pytest.raises(SystemExit) if command == "interpolate" else contextlib.nullcontext():
        assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "'X-Amz-Signature'" in err and "s3cr3t" not in err and "environment" in err


def test_data_remote_reaches_the_runs_held_out_sets(tiny_cpt_data, tmp_path, monkeypatch):
    """The held-out sets of a run read remote shards with the run's data.remote (cpt.evaluate.heldout_sets passes it):
    with read_retries 0 one reset connection stops the sample in one line, with 1 it is retried."""
    from types import SimpleNamespace

    from conftest import tiny_run_config
    from cpt.config import load_config
    from cpt.evaluate import heldout_sets
    from cpt.model import load_tokenizer

    fsspec.register_implementation("flaky", FlakyFS, clobber=True)
    monkeypatch.setattr(FlakyFS, "faults", {})
    monkeypatch.setattr(FlakyFS, "calls", [])
    url = to_memory(tiny_cpt_data / "data" / "python" / "heldout", "/bucket/h").replace("memory://", "flaky://")
    cfg = tiny_run_config(tiny_cpt_data, tmp_path / "run")
    cfg["data"]["heldout"] = [{"name": "python", "path": url, "tag": "downstream"}]
    acc = SimpleNamespace(is_main_process=True)
    for retries in (0, 1):
        run = load_config(base={**cfg, "data": {**cfg["data"], "remote": {"read_retries": retries, "retry_wait_s": 0}}})
        FlakyFS.faults = {len(FlakyFS.calls) + 3: ConnectionResetError("peer reset")}  # (after the manifest, listing)
        if retries == 0:
            with pytest.raises(ShardError, match="failed 1 times"):
                heldout_sets(run, load_tokenizer(run.model), acc, say=lambda *a: None)
        else:
            [h] = heldout_sets(run, load_tokenizer(run.model), acc, say=lambda *a: None)
            assert h.name == "python" and len(h.tokens) > 0


def test_remote_retries_longer_than_the_collective_timeout_are_one_config_error(tiny_cpt_data, tmp_path):
    """Retries that can outlast train.distributed_timeout_s would let the other ranks time out in a collective while
    one rank still retries: refused in one line naming both fields, for remote sources only; changing data.remote on
    a --resume is not a change of the training trajectory."""
    from conftest import tiny_run_config
    from cpt.config import ConfigError, load_config, trajectory_changes

    assert RemoteConfig().worst_wait_s() == 1 + 2 + 4 + 8 + 16 + 32 + 60 + 60  # (the documented "about 3 minutes")
    assert RemoteConfig(read_retries=3, retry_wait_s=10, retry_max_wait_s=15).worst_wait_s() == 40
    cfg = tiny_run_config(tiny_cpt_data, tmp_path / "run")
    long = {"read_retries": 40, "retry_max_wait_s": 60}  # 40 min of waits against the default 30 min timeout
    load_config(base={**cfg, "data": {**cfg["data"], "remote": long}})  # local shards: no remote reads, accepted
    remote_cfg = {**cfg, "data": {**cfg["data"], "remote": long}}
    remote_cfg["data"]["sources"] = [{**remote_cfg["data"]["sources"][0], "path": "s3://bucket/python"},
                                     *remote_cfg["data"]["sources"][1:]]
    with pytest.raises(ConfigError) as e:
        load_config(base=remote_cfg)
    msg = str(e.value)
    assert "data.remote" in msg and "train.distributed_timeout_s (1800 s)" in msg and "2103 s" in msg  # (1+2+...+32, then 34 waits of 60)
    load_config(base={**remote_cfg, "train": {**cfg["train"], "distributed_timeout_s": 3600}})  # raised: accepted
    saved = load_config(base=cfg)
    assert trajectory_changes(yaml_of(saved), load_config(base={**cfg, "data": {**cfg["data"], "remote": long}})) == []


def yaml_of(cfg) -> dict:
    from cpt.config import config_to_dict

    return config_to_dict(cfg)
