"""The token-shard format written by `cpt prepare` and read by the packed streams.

A prepared source is a directory (local or any fsspec URL: s3://, gs://, hf://, http(s)://, memory://)::

    manifest.json          written last, atomically: the directory is valid iff this file exists
    shard_00000.bin        flat token array (little-endian uint16 if the vocabulary fits, else uint32)
    shard_00000.idx        uint64 start offsets (within the shard) of the documents that start in it
    ...

Documents are concatenated in order, each followed by the EOS token, so the shards together form one token stream; a
document may continue from one shard into the next. The manifest records the tokenizer (name and
:func:`tokenizer_fingerprint`), dtype, token and document counts, the per-shard counts and per-file checksums
(xxh3-64), and what `cpt prepare` skipped and why.

Local shards are read through ``np.memmap`` (kept open up to a bound for the whole process:
:data:`cpt.data.openmaps.OPEN_MAPS`); remote shards through fsspec range reads (``cat_ranges``), so only the bytes of
the requested sequences travel (transient failures and short reads retried: :mod:`cpt.data.remote`).

What opening costs: :meth:`TokenShards.open` reads the manifest, compares the tokenizer hash and (by default) checks
every file's size: no shard byte is read, whatever the corpus size. The full checksums are computed by `cpt prepare`
while it writes and checked again only on request: :meth:`TokenShards.verify` (``cpt verify DIR``), or ``open(...,
verify=True)`` (``data.verify_checksums: true`` in a run config).

Remote storage needs the fsspec backend of its protocol: ``pip install "cpt[s3]"`` (s3fs) or ``"cpt[gcs]"`` (gcsfs);
without it :func:`filesystem` raises one :class:`ShardError` line naming the extra.

Writing: :class:`cpt.data.shard_writer.ShardWriter` appends documents to fixed-size shard files (checksums computed
while writing) and describes what it wrote; `cpt prepare` (:mod:`cpt.data.prepare`) stages, verifies and commits them."""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from cpt.data.manifest import ShardError, is_count, manifest_problem  # (ShardError: defined there, used from here)
from cpt.data.openmaps import OPEN_MAPS, check_size, map_tokens
from cpt.data.remote import RangeReadError, listed_mtime_ns, read_ranges, retrying
from cpt.data.tokenizer_identity import (backend_tokenizer, dtype_for_vocab, run_tokenizer_name,  # noqa: F401 (re-exported:
                                         tokenizer_fingerprint, tokenizer_name, vocab_size)  # the manifest records them)

logger = logging.getLogger("cpt.data")

MANIFEST = "manifest.json"
FORMAT_NAME = "cpt-token-shards"
FORMAT_VERSION = 1
CHECKSUM_ALGO = "xxh3_64"
_CHUNK = 16 << 20
_UIDS = itertools.count()


# ---------------------------------------------------------------- checksums and paths


def new_hasher() -> Any:
    import xxhash

    return xxhash.xxh3_64()


def checksum_stream(f: Any) -> str:
    h = new_hasher()
    while chunk := f.read(_CHUNK):
        h.update(chunk)
    return h.hexdigest()


STAT_THREADS = 16  # threads that stat a local source's files at a start when a stat is slow (TokenShards._local_sizes)
FAST_STAT_S = 20e-6  # a local disk's stat (a network file system's takes 0.1-1 ms)


def is_remote(path: str) -> bool:
    """True for fsspec URLs other than plain local paths (file:// counts as remote: read via fsspec)."""
    return "://" in str(path)


def join(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}" if is_remote(base) else os.path.join(base, name)


# protocol -> the pip extra of cpt that installs its fsspec backend
EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}


def filesystem(url: str) -> tuple[Any, str]:
    """``fsspec.core.url_to_fs(url)``; a missing backend package is one :class:`ShardError` line naming what to install."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as e:
        protocol = str(url).split("://", 1)[0]
        if protocol in EXTRAS:
            raise ShardError(f'{url}: reading {protocol}:// needs an extra: pip install "cpt[{EXTRAS[protocol]}]" ({e})') from None
        raise ShardError(f"{url}: reading {protocol}:// needs a package that is not installed: {e}") from None


def shard_names(i: int) -> tuple[str, str]:
    return f"shard_{i:05d}.bin", f"shard_{i:05d}.idx"


def write_json_atomic(path: str, obj: Any) -> None:
    """Write JSON to ``path`` via a temporary file and ``os.replace`` (never a half-written file)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------- reading


def _exists(fs: Any, root: str) -> bool:
    try:
        return bool(fs.exists(root))
    except Exception:  # noqa: BLE001 - a store that cannot say: the manifest message stands
        return True


@dataclass
class _Shard:
    tokens_file: str
    docs_file: str
    num_tokens: int
    num_documents: int
    start: int  # global token offset of this shard's first token


class TokenShards:
    """Random access to the token stream of one prepared source.

    ``read(start, length)`` returns tokens ``[start, start + length)`` of the concatenated stream
    (crossing shard boundaries as needed); ``read_many(starts, length)`` returns a 2-D array of
    several such windows with one batched range request on remote storage.
    """

    def __init__(self, path: str, manifest: dict, fs: Any = None, root: str | None = None):
        self.path = path
        self.manifest = manifest
        self._fs = fs  # None: local memmaps
        self._root = root if root is not None else path
        self.dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
        self.num_tokens = int(manifest["num_tokens"])
        self.num_documents = int(manifest["num_documents"])
        self.tokenizer_hash = manifest["tokenizer"]["hash"]
        self.eos_token_id = manifest["tokenizer"].get("eos_token_id")
        self._shards: list[_Shard] = []
        start = 0
        for s in manifest["shards"]:
            self._shards.append(_Shard(s["tokens_file"], s["docs_file"], int(s["num_tokens"]), int(s["num_documents"]), start))
            start += int(s["num_tokens"])
        if start != self.num_tokens:
            raise ShardError(f"{path}: manifest shards hold {start} tokens but num_tokens says {self.num_tokens}")
        self._starts = np.array([s.start for s in self._shards] + [start], dtype=np.int64)
        self._uid = next(_UIDS)  # (this object's part of the keys of OPEN_MAPS)
        self.mtimes: dict[str, int] = {}  # files' modification times (ns), from the size check (verify: stat or listing)
        self._fingerprint: str | None = None
        self._newest: int | None = None
        self.read_retries = 0  # remote range reads retried (transient errors, short reads): see _cat_ranges
        self.retry: Any = None  # remote reads: the run's data.remote (None: cpt.data.remote.DEFAULT); set by open

    # ------------------------------------------------------------ opening

    @classmethod
    def open(cls, path: str | os.PathLike, expected_tokenizer_hash: str | None = None, verify: bool = False,
             check_sizes: bool = True, expected_tokenizer_name: str | None = None,
             expected_eos_id: int | None = None, verify_part: tuple[int, int] = (0, 1), retry: Any = None) -> "TokenShards":
        """Open a prepared source (local directory or fsspec URL): reads the manifest, no shard bytes.

        Raises :class:`ShardError` when the manifest is missing or unreadable, the manifest's tokenizer
        hash differs from ``expected_tokenizer_hash`` (the message names both tokenizers and hashes; the run's
        by ``expected_tokenizer_name``), the documents are separated by another EOS id than ``expected_eos_id`` (the
        vocabulary hash does not cover which token is EOS: a base and an instruct tokenizer share one vocabulary but
        not their EOS, and document masking would find no document ends), a shard file is missing or
        has the wrong size (``check_sizes``: one stat per file), or a checksum differs (``verify=True``:
        reads every byte of every file, so its cost grows with the corpus; see :meth:`verify`). ``verify_part``
        ``(i, n)``: only every n-th file from the i-th is checksummed (the ranks of a run share the reading).
        ``retry``: remote reads' retry settings (a :class:`cpt.config.RemoteConfig`; None: the defaults).
        """
        path = str(path)
        fs, root = None, path
        if is_remote(path):
            fs, root = filesystem(path)
        manifest = cls._load_manifest(path, fs, root, retry)
        got = manifest["tokenizer"]["hash"]
        if expected_tokenizer_hash is not None and got != expected_tokenizer_hash:
            raise ShardError(
                f"{path}: prepared with tokenizer {manifest['tokenizer'].get('name')!r} (vocabulary hash {got}), "
                f"but this run's tokenizer{f' {expected_tokenizer_name!r}' if expected_tokenizer_name else ''} has "
                f"vocabulary hash {expected_tokenizer_hash}; "
                "re-run `cpt prepare` with the run's tokenizer (for a run with model.vocab: `cpt prepare INPUT "
                "--extend-vocab RUN.yaml` builds its extended tokenizer)"
            )
        eos = manifest["tokenizer"].get("eos_token_id")
        if expected_eos_id is not None and eos is not None and eos != expected_eos_id:
            raise ShardError(
                f"{path}: its documents are separated by EOS id {eos} (the EOS of tokenizer "
                f"{manifest['tokenizer'].get('name')!r}), but this run's tokenizer"
                f"{f' {expected_tokenizer_name!r}' if expected_tokenizer_name else ''} has EOS id {expected_eos_id} (same "
                "vocabulary, another EOS: e.g. a base and an instruct tokenizer); re-run `cpt prepare` with the run's "
                "tokenizer, or use the tokenizer the shards were made with (model.tokenizer)"
            )
        shards = cls(path, manifest, fs, root)
        shards.retry = retry
        if verify or check_sizes:
            problems = shards.verify(checksums=verify, first_only=True, part=verify_part)
            if problems:
                raise ShardError(f"{path}: {problems[0]}")
        return shards

    @staticmethod
    def _load_manifest(path: str, fs: Any, root: str, retry: Any = None) -> dict:
        mpath = f"{root.rstrip('/')}/{MANIFEST}" if fs is not None else os.path.join(path, MANIFEST)
        try:
            if fs is not None:
                raw = retrying(lambda: fs.cat_file(mpath), mpath, retry)  # one plain GET (transient failures retried)
            else:
                with open(mpath, "rb") as f:
                    raw = f.read()
        except FileNotFoundError:
            if fs is None and not os.path.exists(path):  # most often a typo in the path
                raise ShardError(f"{path}: no such folder") from None
            if fs is not None and not _exists(fs, root):  # (an HTTP server may not answer for folders: hedged)
                raise ShardError(f"{path}: not found (no such folder, or no {MANIFEST} in it)") from None
            raise ShardError(f"{path}: no {MANIFEST} (not a prepared source; run `cpt prepare`, or it was interrupted)") from None
        except NotADirectoryError:  # the path names a file (the manifest itself, a shard): a traceback before
            raise ShardError(f"{path}: a file, not a prepared folder: name the folder that holds {MANIFEST} "
                             f"(the `--out` of `cpt prepare`, or its heldout/)") from None
        try:
            manifest = json.loads(raw.decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:  # (a decode error did not name the file)
            raise ShardError(f"{path}/{MANIFEST}: not valid JSON ({e})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
            raise ShardError(f"{path}/{MANIFEST}: not a {FORMAT_NAME} manifest")
        if not is_count(manifest.get("version", 0)):
            raise ShardError(f"{path}/{MANIFEST}: version {manifest.get('version')!r} is not a number")
        if manifest.get("version", 0) > FORMAT_VERSION:
            raise ShardError(f"{path}: format version {manifest['version']} is newer than this cpt reads ({FORMAT_VERSION})")
        problem = manifest_problem(manifest)
        if problem:
            raise ShardError(f"{path}/{MANIFEST}: {problem} (edited or damaged; re-run `cpt prepare`)")
        return manifest

    def _file(self, name: str) -> str:
        return f"{self._root.rstrip('/')}/{name}" if self._fs is not None else os.path.join(self.path, name)

    def verify(self, checksums: bool = True, first_only: bool = False, part: tuple[int, int] = (0, 1)) -> list[str]:
        """Problems with the files (one string each; empty: all good): missing files and wrong sizes, and with
        ``checksums`` every file's xxh3-64 against the manifest (reads the whole source); ``part`` ``(i, n)``: the
        checksums of every n-th file from the i-th only (sizes of all)."""
        problems: list[str] = []
        listed = self._listed_sizes() if self._fs is not None else self._local_sizes()
        i, n = part
        for k, (name, expected, checksum) in enumerate(self.expected_files()):
            mine = checksums and k % n == i
            problem = self._check_file(name, expected, checksum if mine else None, listed.get(name))
            if problem:
                problems.append(problem)
                if first_only:
                    return problems
        return problems

    def expected_files(self):
        """Every shard file as (name, size in bytes, checksum) from the manifest (its keys checked on open)."""
        itemsize = self.dtype.itemsize
        for meta, sh in zip(self.manifest["shards"], self._shards):
            yield sh.tokens_file, sh.num_tokens * itemsize, meta["tokens_checksum"]
            yield sh.docs_file, sh.num_documents * 8, meta["docs_checksum"]

    def _listed_sizes(self) -> dict[str, int]:
        """Remote storage: every file's size from one listing (one LIST, not one HEAD per file; {} when it fails or gives
        no sizes, e.g. an HTTP index page); its modification times go to ``mtimes`` as local stats do."""
        try:
            entries = self._fs.ls(self._root, detail=True) if self._fs is not None else []
        except Exception:  # noqa: BLE001 - a store that cannot list: sizes are asked file by file
            return {}
        files = {str(e["name"]).rstrip("/").rsplit("/", 1)[-1]: e for e in entries if e.get("type") == "file"}
        self.mtimes.update({n: t for n, e in files.items() if (t := listed_mtime_ns(e)) is not None})
        self._newest = None  # (the newest time is computed again)
        return {n: int(e["size"]) for n, e in files.items() if e.get("size") is not None}

    def _local_sizes(self) -> dict[str, int]:
        """A local folder: every shard file's size (times to ``mtimes``; a file that cannot be stat'ed is left out: its
        check names it). Slow stats (a network file system's metadata round trips: more than FAST_STAT_S each for the
        first 64) run on STAT_THREADS threads (a stat releases the GIL); a local disk's one by one (docs/benchmarks.md)."""
        names, root = [name for name, _, _ in self.expected_files()], os.path.join(self.path, "")

        def stat(chunk: list[str]) -> list[tuple[str, os.stat_result]]:
            out = []
            for name in chunk:
                try:
                    out.append((name, os.stat(root + name)))
                except OSError:
                    pass
            return out

        t0 = time.perf_counter()
        found = stat(names[:64])
        rest = names[64:]
        if len(rest) > 4 * STAT_THREADS and (time.perf_counter() - t0) / 64 > FAST_STAT_S:
            with ThreadPoolExecutor(STAT_THREADS, thread_name_prefix="cpt-stat") as pool:
                found += [kv for part in pool.map(stat, [rest[i::STAT_THREADS] for i in range(STAT_THREADS)]) for kv in part]
        else:
            found += stat(rest)
        self.mtimes.update({n: st.st_mtime_ns for n, st in found})
        self._newest = None
        return {n: st.st_size for n, st in found}

    def _check_file(self, name: str, size: int, checksum: str | None, listed_size: int | None = None) -> str | None:
        p = self._file(name) if listed_size is None or checksum is not None else name  # (the path when it is used)
        try:
            if listed_size is not None:
                got = listed_size
            elif self._fs is not None:
                got = int(retrying(lambda: self._fs.size(p), p, self.retry))
            else:
                st = os.stat(p)
                got, self.mtimes[name], self._newest = st.st_size, st.st_mtime_ns, None
        except FileNotFoundError:
            return f"shard file {name} is missing"
        if got != size:
            return f"{name} has {got} bytes, the manifest expects {size} (truncated or replaced)"
        if checksum is not None:  # (remote: a transient failure reads the file again)
            got_sum = retrying(lambda: self._checksum(name), p, self.retry) if self._fs is not None else self._checksum(name)
            if got_sum != checksum:
                return (f"checksum mismatch for {name} ({CHECKSUM_ALGO} {got_sum}, manifest {checksum}); "
                        "the file is corrupt or was changed after `cpt prepare`")
        return None

    def size_changes_on_store(self) -> list[tuple[str, int, int]]:
        """Remote storage: the folder listed again (one LIST; modification times refreshed in ``mtimes``): (file, its
        listed size, the manifest's size) for every file whose size no longer matches; files the listing does not size
        are not in it."""
        listed = self._listed_sizes()
        return [(n, listed[n], size) for n, size, _ in self.expected_files() if n in listed and listed[n] != size]

    def changed_since(self, ns: int, limit: int = 8) -> tuple[list[str], list[str]]:
        """(files modified after ``ns``, their checksum problems): files whose size check (verify) saw a newer time (a
        stat, a remote listing). Up to ``limit`` are checksummed (a shard replaced by one of the same size passes the
        size check); more (a copied folder, an upload) are only listed."""
        changed = sorted(n for n, t in self.mtimes.items() if t > ns)
        if not changed or len(changed) > limit:
            return changed, []
        expected = {name: (size, checksum) for name, size, checksum in self.expected_files()}
        return changed, [p for p in (self._check_file(n, *expected[n]) for n in changed) if p]

    @property
    def num_bytes(self) -> int:
        """Bytes of all shard files (tokens and document index)."""
        return sum(s.num_tokens * self.dtype.itemsize + s.num_documents * 8 for s in self._shards)

    def _checksum(self, name: str) -> str:
        with self._open_file(name) as f:
            return checksum_stream(f)

    def _open_file(self, name: str) -> Any:
        return self._fs.open(self._file(name), "rb") if self._fs is not None else open(self._file(name), "rb")

    # ------------------------------------------------------------ reading

    def _read_local(self, starts: np.ndarray, length: int, out: np.ndarray, dest: np.ndarray) -> None:
        """Memory-mapped reads: each window inside one shard (nearly all) is one slice copied (and converted to
        ``out``'s dtype) straight into its output row; windows across a shard boundary go piece by piece."""
        if len(starts) and (starts.min() < 0 or length < 0 or starts.max() + length > self.num_tokens):
            bad = starts[(starts < 0) | (starts + length > self.num_tokens)]
            start = int(bad[0]) if len(bad) else int(starts[0])
            raise IndexError(f"tokens [{start}, {start + length}) out of range [0, {self.num_tokens})")
        shard = np.searchsorted(self._starts, starts, side="right") - 1
        offsets = starts - self._starts[shard]
        inside = offsets + length <= self._starts[shard + 1] - self._starts[shard]
        shard_ids = shard.tolist()
        arrays = {i: self._array(i) for i in set(shard_ids)}  # (one cache look-up per shard, not per row)
        for i in arrays:  # a file cut short under an open map: reading past its new end is a SIGBUS (no message)
            self._check_size(i)
        for row, i, off, whole in zip(dest.tolist(), shard_ids, offsets.tolist(), inside.tolist()):
            if whole:
                out[row] = arrays[i][off : off + length]
            else:
                for j, o, n, at in self._pieces(self._starts[i] + off, length):
                    self._check_size(j)
                    out[row, at : at + n] = self._array(j)[o : o + n]

    def _array(self, i: int) -> np.ndarray:
        """Shard ``i``'s memory map (:func:`map_tokens`) from the process's bounded cache of open maps."""
        return OPEN_MAPS.get((self._uid, i), lambda: self._map(i))

    def _map(self, i: int) -> np.ndarray:
        sh = self._shards[i]
        return map_tokens(self._file(sh.tokens_file), self.dtype, sh.num_tokens)

    def _check_size(self, i: int) -> None:
        check_size(self._file(self._shards[i].tokens_file), self._shards[i].num_tokens, self.dtype.itemsize)

    def _pieces(self, start: int, length: int) -> list[tuple[int, int, int, int]]:
        """(shard, offset in shard, count, offset in output) for the window [start, start+length)."""
        if start < 0 or length < 0 or start + length > self.num_tokens:
            raise IndexError(f"tokens [{start}, {start + length}) out of range [0, {self.num_tokens})")
        out, pos, done = [], start, 0
        i = int(np.searchsorted(self._starts, start, side="right")) - 1
        while done < length:
            sh = self._shards[i]
            off = pos - sh.start
            n = min(sh.num_tokens - off, length - done)
            if n > 0:
                out.append((i, off, n, done))
                done += n
                pos += n
            i += 1
        return out

    def locate(self, start: int) -> tuple[str, int]:
        """The tokens file holding stream position ``start``, and the position's offset in it."""
        i, off, _, _ = self._pieces(start, 1)[0]
        return self._shards[i].tokens_file, off

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens ``[start, start + length)`` of the stream, as a new array of the shard dtype."""
        return self.read_many(np.array([start], dtype=np.int64), length)[0]

    def read_many(self, starts: np.ndarray, length: int, out: np.ndarray | None = None,
                  rows: np.ndarray | None = None) -> np.ndarray:
        """Windows of ``length`` tokens at each start: an array ``[len(starts), length]`` of the shard dtype, or
        written into ``out`` (any integer dtype: converted while copied) at rows ``rows`` (default ``0..n-1``)."""
        starts = np.asarray(starts, dtype=np.int64)
        if out is None:
            out = np.empty((len(starts), length), dtype=self.dtype)
        dest = np.arange(len(starts)) if rows is None else np.asarray(rows)
        if len(dest) != len(starts):
            raise ValueError(f"read_many: {len(starts)} starts but {len(dest)} destination rows")
        if self._fs is None:
            self._read_local(starts, length, out, dest)
            return out
        self._read_remote([(row, s, length) for row, s in zip(dest.tolist(), starts.tolist())], out)
        return out

    def read_spans(self, starts: Any, lengths: Any) -> list[np.ndarray]:
        """Windows of varying lengths, one array each (remote: one batched, concurrent request, not one per window)."""
        if self._fs is None:
            return [self.read(int(s), int(n)) for s, n in zip(starts, lengths)]
        outs = [np.empty((1, int(n)), dtype=self.dtype) for n in lengths]
        self._read_remote([(k, int(s), int(n)) for k, (s, n) in enumerate(zip(starts, lengths))], outs)
        return [o[0] for o in outs]

    def _read_remote(self, windows: list[tuple[int, int, int]], out: Any) -> None:
        """(row, start, length) windows into ``out[row]`` (row 0 of ``out[row]`` for a list) with one cat_ranges."""
        pieces = [(row, p) for row, s, length in windows for p in self._pieces(s, length)]
        itemsize = self.dtype.itemsize
        paths = [self._file(self._shards[i].tokens_file) for _, (i, _, _, _) in pieces]
        begins = [off * itemsize for _, (_, off, _, _) in pieces]
        ends = [(off + n) * itemsize for _, (_, off, n, _) in pieces]
        for (row, (_, _, n, at)), blob in zip(pieces, self._cat_ranges(paths, begins, ends)):
            dst = out[row] if isinstance(out, np.ndarray) else out[row][0]
            dst[at : at + n] = np.frombuffer(blob, dtype=self.dtype, count=n)

    def _cat_ranges(self, paths: list[str], begins: list[int], ends: list[int]) -> list[bytes]:
        """Byte ranges from remote storage, each exactly as long as asked (transient failures retried: read_ranges)."""
        try:
            blobs, retries = read_ranges(self._fs, paths, begins, ends, self.retry)
        except RangeReadError as e:
            self.read_retries += e.retries
            raise ShardError(str(e)) from None
        self.read_retries += retries
        return blobs

    def document_starts(self) -> np.ndarray:
        """Global token offsets of every document start (reads the .idx files; for tests and tools)."""
        files, sizes = [self._file(sh.docs_file) for sh in self._shards], [sh.num_documents * 8 for sh in self._shards]
        blobs = (self._cat_ranges(files, [0] * len(files), sizes) if self._fs is not None  # (one batched request)
                 else [np.fromfile(f, dtype=np.uint8) for f in files])
        parts = [np.frombuffer(b, dtype="<u8").astype(np.int64) + sh.start for b, sh in zip(blobs, self._shards)]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def fingerprint(self) -> str:
        """Identity of the data: tokenizer hash plus every file checksum. Computed once (O(shards); the manifest of an
        open source does not change): a loader's state_dict, taken after every batch, asks for it."""
        if self._fingerprint is None:
            h = hashlib.sha256(self.tokenizer_hash.encode())
            for s in self.manifest["shards"]:
                h.update(f"{s['tokens_checksum']}:{s['docs_checksum']}:{s['num_tokens']}".encode())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def newest_mtime(self) -> int | None:
        """The newest modification time (ns) the size checks saw (``mtimes``; None: none seen), kept until they stat again."""
        if self._newest is None and self.mtimes:
            self._newest = max(self.mtimes.values())
        return self._newest

    def __repr__(self) -> str:
        return f"TokenShards({self.path!r}, tokens={self.num_tokens:,}, documents={self.num_documents:,}, shards={len(self._shards)})"
