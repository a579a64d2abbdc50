"""Restart cost does not grow with the corpus: a training start reads the manifests and the bytes it trains and
evaluates on, not the whole corpus (full checksums are `cpt prepare`'s and `cpt verify`'s job, or the opt-in
`data.verify_checksums: true`). Measured with a counting fsspec filesystem (memory:// with every byte read counted)."""

import gzip
import os

import fsspec
import pytest

from conftest import tiny_run_config
from cpt.config import load_config

pytestmark = pytest.mark.slow


@pytest.fixture
def counted(monkeypatch):
    """Bytes read from memory:// per path (range reads and whole-file opens)."""
    from fsspec.implementations.memory import MemoryFileSystem

    reads: list[tuple[str, int]] = []
    real_cat, real_open = MemoryFileSystem.cat_file, MemoryFileSystem._open

    def cat_file(self, path, start=None, end=None, **kw):
        data = real_cat(self, path, start, end, **kw)
        reads.append((str(path), len(data)))
        return data

    def _open(self, path, mode="rb", **kw):
        import io

        if mode != "rb":
            return real_open(self, path, mode, **kw)
        return io.BytesIO(cat_file(self, path))  # whole-file reads (checksums) counted in full

    monkeypatch.setattr(MemoryFileSystem, "cat_file", cat_file)
    monkeypatch.setattr(MemoryFileSystem, "_open", _open)
    return reads


def to_memory(folder, url: str) -> str:
    fs = fsspec.filesystem("memory")
    for dirpath, _, files in os.walk(folder):
        for name in files:
            rel = os.path.relpath(os.path.join(dirpath, name), folder)
            with open(os.path.join(dirpath, name), "rb") as f:
                fs.pipe(f"{url}/{rel}", f.read())
    return f"memory://{url}"


@pytest.fixture(scope="module")
def corpora(tiny_cpt_data, tmp_path_factory):
    """The tiny Python corpus prepared as 1 shard, and 10 copies of it as 10 shards of the same size."""
    from cpt.data.prepare import prepare

    root = tmp_path_factory.mktemp("restart_cost")
    raw = gzip.decompress((tiny_cpt_data / "raw" / "python.jsonl.gz").read_bytes())
    (root / "x10.jsonl").write_bytes(raw * 10)
    tok = tiny_cpt_data / "tokenizer"
    one = prepare([str(tiny_cpt_data / "raw" / "python.jsonl.gz")], tok, root / "one", shard_tokens=10**9)
    ten = prepare([str(root / "x10.jsonl")], tok, root / "ten", shard_tokens=one["num_tokens"])
    assert len(one["shards"]) == 1 and len(ten["shards"]) == 10 and ten["num_tokens"] == 10 * one["num_tokens"]
    return {"one": root / "one", "ten": root / "ten"}


def first_step_reads(tiny_cpt_data, corpora, counted, tmp_path, which: str, verify: bool) -> dict[str, int]:
    """One training step (step-0 evaluation included) with the Python source and held-out set on memory://."""
    from cpt.train import train

    tag = f"/restart/{which}-{verify}-{os.getpid()}"
    src = to_memory(corpora[which], f"{tag}/python")
    held = to_memory(tiny_cpt_data / "data" / "python" / "heldout", f"{tag}/python-heldout")
    cfg = tiny_run_config(tiny_cpt_data, tmp_path / f"{which}-{verify}", eval={"at_start": True},
                          checkpoint={"every": None, "export_at_end": False})
    cfg["stages"][0]["steps"] = 1
    cfg["stages"][0]["schedule"]["warmup_steps"] = 0
    cfg["data"]["sources"][0]["path"] = src
    cfg["data"]["heldout"][1]["path"] = held
    cfg["data"]["verify_checksums"] = verify
    assert cfg["data"]["sources"][0]["name"] == cfg["data"]["heldout"][1]["name"] == "python"
    counted.clear()
    result = train(load_config(base=cfg), echo=lambda *a, **k: None)
    assert result.step == 1
    out = {"shards": 0, "manifests": 0}
    for path, n in counted:
        assert path.startswith(tag[1:]) or path.startswith(tag), path
        out["shards" if "/shard_" in path else "manifests"] += n
    return out


def test_bytes_read_before_step_1_do_not_grow_with_the_corpus(tiny_cpt_data, corpora, counted, tmp_path):
    got = {(w, v): first_step_reads(tiny_cpt_data, corpora, counted, tmp_path, w, v)
           for w in ("one", "ten") for v in (False, True)}
    print({k: v for k, v in got.items()})
    cfg = tiny_run_config(tiny_cpt_data, tmp_path)
    B, L, per_set = cfg["train"]["global_batch_size"], cfg["data"]["seq_len"], cfg["eval"]["tokens_per_set"]
    itemsize = 2  # uint16 tokens
    # default: the same shard bytes for 1 and 10 shards, at most two batches of rows (the one trained on and the
    # next, read ahead by the prefetcher) plus the held-out tokens
    assert got["one", False]["shards"] == got["ten", False]["shards"] <= (2 * B * L + per_set) * itemsize
    assert got["ten", False]["manifests"] < 20_000  # the manifests: a few hundred bytes per shard
    # opt-in full verification: reads every byte of every shard (the cost a default start no longer pays)
    ten_bytes = sum(os.path.getsize(p) for p in corpora["ten"].glob("shard_*"))
    assert got["ten", True]["shards"] >= ten_bytes > 9 * got["one", True]["shards"] / 2


def test_cpt_verify_config_checks_every_source_and_heldout_set(tiny_cpt_data, tmp_path, capsys):
    import shutil

    import yaml

    from cpt.cli import main

    cfg = tiny_run_config(tiny_cpt_data, tmp_path / "run")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["verify", "--config", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 4 and all(line.startswith("ok     ") for line in out)  # 2 sources + 2 held-out sets
    assert "(+ held-out)" in out[0]  # a prepared folder's own heldout/ is checked with it
    bad = tmp_path / "python"
    shutil.copytree(tiny_cpt_data / "data" / "python", bad)
    shard = next(bad.glob("shard_*.bin"))
    blob = bytearray(shard.read_bytes())
    blob[-1] ^= 0xFF
    shard.write_bytes(bytes(blob))
    cfg["data"]["sources"][0]["path"] = str(bad)
    path.write_text(yaml.safe_dump(cfg))
    assert main(["verify", "--config", str(path)]) == 1
    got = capsys.readouterr()
    assert f"FAILED {bad}: checksum mismatch for {shard.name}" in got.out and "1 of 4 folders" in got.err
    # a broken held-out set that the config names too: one FAILED line, its intact source ok (it was reported twice
    # and the source beside it counted as broken: "2 of 4 folders")
    cfg["data"]["sources"][0]["path"] = str(tiny_cpt_data / "data" / "python")
    held = next(h for h in cfg["data"]["heldout"] if h["path"].endswith("python/heldout"))
    shutil.rmtree(bad)
    shutil.copytree(tiny_cpt_data / "data" / "python", bad)
    cfg["data"]["sources"][0]["path"], held["path"] = str(bad), str(bad / "heldout")
    shard = next((bad / "heldout").glob("shard_*.bin"))
    blob = bytearray(shard.read_bytes())
    blob[-1] ^= 0xFF
    shard.write_bytes(bytes(blob))
    path.write_text(yaml.safe_dump(cfg))
    assert main(["verify", "--config", str(path)]) == 1
    got = capsys.readouterr()
    assert got.out.count("FAILED") == 1 and f"FAILED {bad / 'heldout'}: checksum mismatch" in got.out, got.out
    assert f"ok     {bad}: " in got.out and "1 of 4 folders" in got.err, got
    # a config with only `type: hf` sources and no held-out sets: nothing to check (it said "give at least one DIR
    # or --config" after --config was given)
    cfg["data"]["sources"] = [{"name": "python", "type": "hf", "path": "json", "data_files": "x.jsonl"}]
    cfg["data"]["heldout"] = []
    cfg["stages"][0]["mix"] = {"python": 1.0}
    path.write_text(yaml.safe_dump(cfg))
    assert main(["verify", "--config", str(path)]) == 0
    assert "names no prepared folders" in capsys.readouterr().out
