"""Shared helpers for the data tests (no tests here): documents, a tiny trained tokenizer, jsonl files, config
builders. Test files import them with `from data_factories import ...` (the `tokenizer` fixture too)."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pytest

from conftest import tiny_tokenizer

WORDS = ("the river bank holds water while the old king walks home and the quick brown fox jumps over "
         "lazy dogs def class return import numpy tensor shard stream mixer replay token batch").split()


def make_docs(n: int, seed: int = 0, min_words: int = 3, max_words: int = 60) -> list[str]:
    """``n`` distinct documents of varied length (each starts with its index, so all differ)."""
    rng = random.Random(seed)
    return [f"doc{i} " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))) for i in range(n)]


def make_tokenizer(vocab_size: int = 320):
    """The data tests' tokenizer: a byte-level BPE (eos and bos) trained on 400 of these documents."""
    return tiny_tokenizer(make_docs(400, seed=123), vocab_size, specials=("<eos>", "<bos>"), bos_token="<bos>")


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


def write_jsonl(path: Path, records: list, compress: str | None = None) -> Path:
    """Records (dicts, or raw bytes/str lines) as a jsonl file, optionally gzip or zstd compressed."""
    lines = []
    for r in records:
        if isinstance(r, bytes):
            lines.append(r)
        elif isinstance(r, str):
            lines.append(r.encode())
        else:
            lines.append(json.dumps(r).encode())
    data = b"\n".join(lines) + b"\n"
    path = Path(path)
    if compress == "gz":
        data = gzip.compress(data)
    elif compress == "zst":
        import zstandard

        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    return path


def expected_stream(tokenizer, docs: list[str]) -> list[int]:
    """The token stream `cpt prepare` must write: each document's ids followed by EOS."""
    out: list[int] = []
    for d in docs:
        out += tokenizer(d, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return out


def data_config(sources: list[dict], seq_len: int = 16, **kw):
    from cpt.config import DataConfig

    return DataConfig(seq_len=seq_len, sources=sources, **kw)


def stage(steps: int, mix: dict, ramp: dict | None = None, name: str = "stage"):
    from cpt.config import StageConfig

    return StageConfig(name=name, steps=steps, mix=mix, mix_ramp=ramp or {})


def fake_hub_cache(cache: Path, repo: str, commit: str, docs: list[str], mtime: float) -> Path:
    """What `datasets` leaves in ``HF_DATASETS_CACHE`` after loading hub dataset ``repo`` at ``commit`` (its
    ``<namespace>___<name>/default/0.0.0/<commit>`` folder: the arrow file and dataset_info.json), modified at
    ``mtime``; offline, ``load_dataset(repo)`` reads the newest such copy."""
    import os

    import datasets
    from datasets.arrow_writer import ArrowWriter

    name = repo.split("/")[-1]
    folder = cache / repo.replace("/", "___") / "default" / "0.0.0" / commit
    folder.mkdir(parents=True)
    features = datasets.Features({"text": datasets.Value("string")})
    with ArrowWriter(features=features, path=str(folder / f"{name}-train.arrow")) as w:
        for d in docs:
            w.write({"text": d})
        n, nbytes = w.finalize()
    split = datasets.SplitInfo("train", num_bytes=nbytes, num_examples=n, dataset_name=name)
    datasets.DatasetInfo(features=features, config_name="default", dataset_name=name,
                         splits=datasets.SplitDict({"train": split})).write_to_directory(str(folder))
    os.utime(folder, (mtime, mtime))
    return folder
