"""The inputs of an experiment: corpora (files, folders, globs, built-ins) resolved to the files `cpt prepare` reads,
the byte-level BPE trained on a sample of them, and their token shards and held-out sets.

In the experiment folder::

    raw/                      built-in corpora written as jsonl.gz
    corpora/<name>.files.txt  the files each corpus was read from
    tokenizer/                byte-level BPE trained on a sample of every corpus (unless spec.tokenizer.path)
    data/<corpus>/            token shards (+ heldout/) from `cpt prepare`
"""

from __future__ import annotations

import fnmatch
import glob as globlib
import gzip
import hashlib
import json
import os
import shutil
import sysconfig
from pathlib import Path
from typing import Callable, Iterator

from cpt.experiment.spec import CorpusSpec, ExperimentError, ExperimentSpec, SequenceSpec

BUILTIN_JSONL = ("shakespeare", "python_stdlib")  # document generators, written to raw/<corpus>-<builtin>.jsonl.gz
BUILTIN_FOLDERS = ("site_packages", "torch_headers", "cuda_headers")  # folders of this machine, filtered by `globs`


def _builtin_folder(kind: str) -> Path:
    if kind == "site_packages":
        return Path(sysconfig.get_paths()["purelib"])
    if kind == "torch_headers":
        import importlib.util

        found = importlib.util.find_spec("torch")
        if found is None or not found.origin:
            return Path("<torch is not installed>")
        return Path(found.origin).parent / "include"
    if kind == "cuda_headers":
        home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
        return Path(home) / "include"
    raise ExperimentError(f"unknown builtin folder {kind!r}")


def _walk(folder: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
        for f in sorted(filenames):
            if not f.startswith("."):
                yield Path(dirpath) / f


def _hash_key(seed: int, text: str) -> str:
    return hashlib.sha256(f"{seed}:{text}".encode()).hexdigest()


def _builtin_docs(kind: str, max_bytes: float | None) -> Iterator[dict]:
    from cpt.demo import python_stdlib_docs, shakespeare_docs

    return (shakespeare_docs if kind == "shakespeare" else python_stdlib_docs)(max_bytes)


def _write_jsonl_atomic(docs: Iterator[dict], path: Path) -> tuple[Path, int]:
    """Write documents to ``path`` (jsonl.gz) once; return it and its text bytes (kept in ``<path>.bytes``)."""
    sidecar = path.with_name(path.name + ".bytes")
    if path.is_file() and sidecar.is_file():
        return path, int(sidecar.read_text())  # written earlier: keep it (its mtime is part of prepare's key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with gzip.open(tmp, "wt", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(d) + "\n")
            n += len(d["text"].encode("utf-8"))
    sidecar.write_text(str(n))
    os.replace(tmp, path)
    return path, n


def resolve_corpus(c: CorpusSpec, raw_dir: Path | None, seed: int, echo: Callable = print) -> tuple[list[str], int]:
    """The files `cpt prepare` reads for corpus ``c`` (built-ins written to ``raw_dir``), and their bytes.

    ``raw_dir=None`` (a dry run) writes nothing: built-in document corpora are measured, not written.
    """
    files: list[Path] = []
    builtin_files: list[Path] = []
    missing = []
    max_bytes = c.max_mb * 1e6 if c.max_mb else None
    dry_bytes = 0  # text bytes of the built-in document corpora
    for inp in c.normalized_inputs():
        if inp.builtin in BUILTIN_JSONL:
            if raw_dir is None:
                dry_bytes += sum(len(d["text"]) for d in _builtin_docs(inp.builtin, max_bytes))
                builtin_files.append(Path(f"<builtin {inp.builtin}>"))
                continue
            suffix = f"-{c.max_mb:g}mb" if c.max_mb else ""
            path = raw_dir / f"{c.name}-{inp.builtin}{suffix}.jsonl.gz"
            written, n = _write_jsonl_atomic(_builtin_docs(inp.builtin, max_bytes), path)
            builtin_files.append(written)
            dry_bytes += n
            continue
        if inp.builtin is not None:
            roots = [_builtin_folder(inp.builtin)]
        elif any(ch in inp.path for ch in "*?["):
            roots = [Path(p) for p in sorted(globlib.glob(os.path.expanduser(inp.path), recursive=True))]
        else:
            roots = [Path(os.path.expanduser(inp.path))]
        label = inp.builtin or inp.path
        found_any = False
        for root in roots:
            if root.is_dir():
                for f in _walk(root):
                    found_any = True
                    if c.globs and not any(fnmatch.fnmatch(f.name, g) for g in c.globs):
                        continue
                    files.append(f)
            elif root.is_file():
                found_any = True
                files.append(root)
        if not found_any:
            missing.append(f"{label} ({roots[0] if roots else 'no match'})")
    if missing and not c.allow_missing:
        raise ExperimentError(f"corpus {c.name}: inputs not found: {missing} (set allow_missing: true to skip them)")
    for m in missing:
        echo(f"corpus {c.name}: skipping missing input {m}")

    # de-duplicate, exclude, size filter, then a seeded sample of whole files under max_mb
    seen, kept = set(), []
    for f in files:
        key = os.path.realpath(f)
        if key in seen or any(fnmatch.fnmatch(str(f), pat) for pat in c.exclude):
            continue
        seen.add(key)
        kept.append(f)
    sizes = {}
    for f in kept:
        try:
            size = f.stat().st_size
        except OSError:
            continue
        if size == 0 or (c.max_file_kb and size > c.max_file_kb * 1e3):
            continue
        sizes[f] = size
    chosen = sorted(sizes)
    if max_bytes is not None:
        budget = max_bytes - dry_bytes
        picked, total = [], 0
        for f in sorted(sizes, key=lambda p: _hash_key(seed, str(p))):
            if total >= budget:
                break
            picked.append(f)
            total += sizes[f]
        chosen = sorted(picked)
    out = [str(p) for p in builtin_files] + [str(p) for p in chosen]
    nbytes = dry_bytes + sum(sizes[p] for p in chosen)
    if not out:
        raise ExperimentError(f"corpus {c.name}: no input files found" + (f" matching {c.globs}" if c.globs else ""))
    return out, nbytes


def _sample_texts(files: list[str], text_field: str, max_bytes: float, seed: int) -> Iterator[str]:
    """Documents from a seeded sample of ``files`` (whole files), about ``max_bytes`` of text."""
    from cpt.data.readers import ReadCounts, iter_documents

    total = 0
    for f in sorted(files, key=lambda p: _hash_key(seed, p)):
        for text in iter_documents([f], text_field, ReadCounts()):
            yield text
            total += len(text)
            if total >= max_bytes:
                return


def build_tokenizer(spec: ExperimentSpec | SequenceSpec, files: dict[str, list[str]], out_dir: Path, echo: Callable = print):
    """Train (once) a byte-level BPE on a sample of both corpora, or load spec.tokenizer.path."""
    from transformers import AutoTokenizer

    if spec.tokenizer.path is not None:
        return AutoTokenizer.from_pretrained(spec.tokenizer.path, trust_remote_code=False), Path(spec.tokenizer.path)
    t = spec.tokenizer.train

    def key_of(name) -> str:
        return json.dumps({"vocab_size": t.vocab_size, "sample_mb": t.sample_mb, "seed": spec.seed,
                           "corpora": {k: _hash_key(0, "\n".join(map(name, v))) for k, v in sorted(files.items())}},
                          sort_keys=True)

    # the corpus files by name, those cpt wrote under the experiment folder (the built-in corpora) relative to it: a
    # folder moved or copied elsewhere keeps its tokenizer (an older folder's key, by absolute names, is accepted)
    root = os.path.abspath(out_dir.parent)
    key = key_of(lambda f: os.path.relpath(f, root) if os.path.abspath(f).startswith(root + os.sep) else f)
    key_file = out_dir / "experiment_tokenizer_key.json"
    if (out_dir / "tokenizer.json").is_file():
        if key_file.is_file() and key_file.read_text() in (key, key_of(str)):
            return AutoTokenizer.from_pretrained(str(out_dir), trust_remote_code=False), out_dir
        raise ExperimentError(
            f"{out_dir} holds a tokenizer trained for a different spec (corpora, vocab_size or sample), or the "
            "experiment folder was moved or copied here (its runs name the paths where it was made): use another "
            "--out, or delete the experiment folder to start over")
    from cpt.demo import train_tokenizer

    sample_dir = out_dir.parent / "tokenizer_sample"
    sample_files = []
    for name, fl in files.items():
        p = sample_dir / f"{name}.jsonl.gz"
        tmp = p.with_name(p.name + ".tmp")
        p.parent.mkdir(parents=True, exist_ok=True)
        with gzip.open(tmp, "wt", encoding="utf-8", compresslevel=1) as f:
            for text in _sample_texts(fl, _text_field(spec, name), t.sample_mb * 1e6, spec.seed):
                f.write(json.dumps({"text": text}) + "\n")
        os.replace(tmp, p)
        sample_files.append(p)
    echo(f"tokenizer: byte-level BPE, {t.vocab_size} tokens, trained on {t.sample_mb:g} MB of each corpus -> {out_dir}")
    staging = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    train_tokenizer(sample_files, t.vocab_size, staging)
    (staging / key_file.name).write_text(key)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(staging, out_dir)
    shutil.rmtree(sample_dir, ignore_errors=True)
    return AutoTokenizer.from_pretrained(str(out_dir), trust_remote_code=False), out_dir


def _text_field(spec: ExperimentSpec | SequenceSpec, corpus: str) -> str:
    return next(c.text_field for c in spec.corpora if c.name == corpus)


def prepare_data(spec: ExperimentSpec | SequenceSpec, out: Path, echo: Callable):
    """Every corpus of the spec resolved (file lists under corpora/), the tokenizer, and each corpus's token shards
    and held-out set under data/; returns the tokenizer, its folder and the training tokens per corpus."""
    from cpt.data.prepare import prepare

    files, nbytes = {}, {}
    for c in spec.corpora:
        files[c.name], nbytes[c.name] = resolve_corpus(c, out / "raw", spec.seed, echo)
        listing = out / "corpora" / f"{c.name}.files.txt"
        listing.parent.mkdir(parents=True, exist_ok=True)
        listing.write_text("\n".join(files[c.name]) + "\n")
        echo(f"corpus {c.name}: {len(files[c.name])} files, {nbytes[c.name] / 1e6:.1f} MB  (list: {listing})")
    tokenizer, tok_dir = build_tokenizer(spec, files, out / "tokenizer", echo)
    tokens = {}
    for c in spec.corpora:
        manifest = prepare(files[c.name], tokenizer, out / "data" / c.name, text_field=c.text_field,
                           heldout_docs=c.heldout_docs, seed=spec.seed, num_proc=spec.num_proc,
                           echo=lambda *a: None)
        tokens[c.name] = int(manifest["num_tokens"]) if "num_tokens" in manifest else _num_tokens(out / "data" / c.name)
        held = _num_tokens(out / "data" / c.name / "heldout")
        evaluated = "all of them" if held <= spec.eval.tokens_per_set else \
            f"each evaluation a seeded sample of whole documents, {spec.eval.tokens_per_set:,} tokens"
        echo(f"data {c.name}: {tokens[c.name]:,} training tokens, {held:,} held-out tokens ({evaluated})")
    return tokenizer, tok_dir, tokens


def _num_tokens(path: Path) -> int:
    from cpt.data.shards import TokenShards

    return TokenShards.open(str(path), verify=False).num_tokens
