"""Costs that grow with the size of a real job (10^4-10^5 shards per source, 10^6 steps, metrics.jsonl of millions of
lines), which small runs never show: counted here (open files, manifest passes, lines parsed), never timed.
docs/benchmarks.md (*Scale costs*) has the measurements behind each test."""

from __future__ import annotations

import os

import numpy as np
import pytest

from cpt.data.prepare import prepare
from cpt.data.shards import TokenShards
from data_factories import data_config, expected_stream, make_docs, stage, tokenizer, write_jsonl  # noqa: F401


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory, tokenizer):
    """A source of 40-odd shards (64 tokens each) and its expected token stream."""
    root = tmp_path_factory.mktemp("scale")
    docs = make_docs(100, seed=5)
    src = write_jsonl(root / "a.jsonl", [{"text": d} for d in docs])
    prepare([str(src)], tokenizer, root / "src", shard_tokens=64)
    return root / "src", np.array(expected_stream(tokenizer, docs))


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts open files through /proc")
def test_reading_every_shard_keeps_a_bounded_number_of_files_open(many_shards, monkeypatch):
    """Each shard memory map holds a file descriptor: keeping every map a run touched open failed past `ulimit -n`
    (1,024 on many clusters) with "Too many open files" once a source had more shards than that. Now at most
    OPEN_MAPS.limit maps stay open for the whole process (both sources together), and the tokens read are the same."""
    from cpt.data import openmaps

    path, want = many_shards
    monkeypatch.setattr(openmaps.OPEN_MAPS, "limit", 5)
    a, b = TokenShards.open(path), TokenShards.open(path)
    assert len(a.manifest["shards"]) >= 30
    before = _open_fds()
    starts = np.random.default_rng(0).permutation(a.num_tokens - 16)[:400]
    for shards in (a, b, a):
        assert shards.read_many(starts, 16).tolist() == [want[s : s + 16].tolist() for s in starts]
    assert len(openmaps.OPEN_MAPS.maps) <= 5
    assert _open_fds() - before <= 5  # (before: one per shard touched, here all 40-odd of each source)


def test_the_data_state_taken_after_every_batch_does_not_rehash_the_manifests(many_shards, tokenizer):
    """The prefetcher takes the loader's state_dict after every batch; it hashed every shard entry of every manifest
    (the fingerprint) and took the newest of every file's modification time each time: O(shards) per step, 0.2 s a step
    for 50 sources of 10^4 shards. Now both are computed once per source; the state is the same."""
    from cpt.data.loader import CPTDataLoader

    class Counted(list):
        passes = 0

        def __iter__(self):
            Counted.passes += 1
            return super().__iter__()

    class CountedTimes(dict):
        passes = 0

        def values(self):
            CountedTimes.passes += 1
            return super().values()

    path, _ = many_shards
    cfg = data_config([{"name": "a", "path": str(path)}, {"name": "b", "path": str(path)}], seq_len=8)
    loader = CPTDataLoader(cfg, [stage(20, {"a": 0.5, "b": 0.5})], tokenizer, 8, seed=0)
    first = loader.state_dict()
    for stream in loader.streams:
        stream.shards.manifest["shards"] = Counted(stream.shards.manifest["shards"])
        stream.shards.mtimes = CountedTimes(stream.shards.mtimes)
    for step in range(5):
        loader.batch(step)
        state = loader.state_dict()
    assert Counted.passes == 0 and CountedTimes.passes == 0
    assert state["source_data"] == first["source_data"] and state["fingerprint"] == first["fingerprint"]
    fresh = TokenShards.open(path)
    assert state["source_data"]["a"]["fingerprint"] == fresh.fingerprint()
    assert state["source_data"]["a"]["newest_file_ns"] == max(fresh.mtimes.values())


def _metrics_cfg():
    from cpt.config import validate

    return validate({"run": {"name": "scale"}, "model": {"arch": {"model_type": "llama"}, "tokenizer": "tok"},
                     "data": {"sources": [{"name": "a", "path": "a"}]}, "stages": [{"name": "s", "steps": 10, "mix": {"a": 1}}],
                     "checkpoint": {"resume": True}})


@pytest.mark.parametrize("tail, at, dropped", [
    (b"", 2995, 5), (b'{"step": 3000, "train/tok', 2995, 6), (b'{"step": 3001, "train/tokens": 1}', 3001, 0),
    (b'{"step": 3001, "train/tokens": 1}', 10, 2991), (b"", -1, 3000)])
def test_a_resume_reads_the_tail_of_metrics_jsonl_not_all_of_it(tmp_path, monkeypatch, tail, at, dropped):
    """truncate_after parsed and rewrote every line of metrics.jsonl at every resume (38 s and 6.8 GB of memory for a
    million lines); it now walks back from the end to the checkpoint's step and cuts the file there. Same lines kept
    as before: a torn last line dropped, a last line whose newline was cut off kept and ended."""
    import json

    import cpt.metrics as metrics

    lines = [json.dumps({"step": s, "time": 0.5, "train/tokens": 8 * s, "train/loss": 1.0 / s}).encode() for s in range(1, 3001)]
    body = b"".join(line + b"\n" for line in lines) + tail
    (tmp_path / "metrics.jsonl").write_bytes(body)
    want = [line for line in lines if json.loads(line)["step"] <= at]
    if tail.endswith(b"}") and 3001 <= at:
        want.append(tail)

    parsed = []

    class CountingJson:
        dumps = staticmethod(json.dumps)

        @staticmethod
        def loads(s, **kw):
            parsed.append(s)
            return json.loads(s, **kw)

    logger = metrics.MetricsLogger(tmp_path, _metrics_cfg(), resume=True)
    monkeypatch.setattr(metrics, "json", CountingJson)
    assert logger.truncate_after(at) == dropped
    logger.close()
    assert (tmp_path / "metrics.jsonl").read_bytes() == b"".join(line + b"\n" for line in want)
    assert len(parsed) <= dropped + 3  # (the dropped lines, the first kept one, a torn one)


def test_a_long_metrics_log_is_held_as_columns_and_drawn_as_an_envelope(tmp_path):
    """cpt report held every record of metrics.jsonl as a dict (1.55 GB for 100,000 lines, about 15 GB for a
    million) and drew every point (seconds of matplotlib per plot); now the log is held as columns (less memory than
    the file's size here, where the dicts took several times it) with the same curves, and a long curve is drawn as
    its per-bucket minima and maxima: a spike stays, the points are bounded."""
    import json
    import tracemalloc

    from cpt.report import envelope, load_run

    keys = [f"data/share/src{i}" for i in range(12)]
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for s in range(1, 20001):
            f.write(json.dumps({"step": s, "time": 1.5e9 + s, "train/tokens": 64 * s, "train/loss": 9.0 if s == 12345
                                else 2.0 + (s % 7) / 10, "stage": s // 10000, **{k: 0.1 for k in keys}}) + "\n")
    tracemalloc.start()
    run = load_run(tmp_path)
    held, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert held < (tmp_path / "metrics.jsonl").stat().st_size  # (the dicts: 5 times it)
    toks, loss, steps = run.series("train/loss")
    assert steps == list(range(1, 20001)) and toks[0] == 64.0 and loss[12344] == 9.0 and run.last["step"] == 20000
    x, y = envelope(toks, loss)
    assert len(y) <= 4002 and max(y) == 9.0 and min(y) == 2.0 and x == sorted(x) and (x[0], x[-1]) == (toks[0], toks[-1])
    assert envelope(toks[:100], loss[:100]) == (toks[:100], loss[:100])


def test_experiment_tables_read_each_run_log_once_for_its_keys(tmp_path, monkeypatch):
    """`cpt experiment`'s results asked each run's log for four keys, and every ask parsed all of metrics.jsonl again;
    consecutive asks on an unchanged log now read it once (a changed log is read again)."""
    import json

    import cpt.metrics as metrics
    from cpt.experiment import results

    with open(tmp_path / "metrics.jsonl", "w") as f:
        for s in range(50):
            f.write(json.dumps({"step": s, "train/tokens": 8 * s, "eval/a/loss": 2.0, "eval/b/loss": 3.0}) + "\n")
    parsed = []
    real = json.loads
    monkeypatch.setattr(metrics.json, "loads", lambda s, **kw: parsed.append(1) or real(s, **kw))
    for key in ("eval/a/loss", "eval/b/loss", "train/tokens", "compute/device_hours"):
        results._series(tmp_path, key)
    assert len(parsed) == 50
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 50, "train/tokens": 400, "eval/a/loss": 1.0}) + "\n")
    assert results._series(tmp_path, "eval/a/loss")[1][-1] == 1.0 and len(parsed) == 101
