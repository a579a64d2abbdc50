"""`cpt prepare`: every input format, EOS between documents, manifest, held-out split, bad input, atomicity."""

from __future__ import annotations

import gzip
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cpt.config import ConfigError
from cpt.data import prepare as prep_mod
from cpt.data.prepare import PrepareError, prepare
from cpt.data.readers import ReadError, resolve_files
from cpt.data.shard_writer import ShardWriter
from cpt.data.shards import ShardError, TokenShards, dtype_for_vocab, tokenizer_fingerprint
from data_factories import expected_stream, make_docs, tokenizer, write_jsonl  # noqa: F401  (fixture)


def stream_of(path) -> list[int]:
    s = TokenShards.open(path)
    return s.read(0, s.num_tokens).tolist()


def docs_of(path, tokenizer) -> list[list[int]]:
    """The documents of a prepared folder as token lists (EOS stripped)."""
    s = TokenShards.open(path)
    toks = s.read(0, s.num_tokens)
    starts = list(s.document_starts()) + [s.num_tokens]
    return [toks[a : b - 1].tolist() for a, b in zip(starts[:-1], starts[1:])]


def test_jsonl_stream_manifest_and_shards(tmp_path, tokenizer):
    docs = make_docs(300)
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": d, "id": i} for i, d in enumerate(docs)])
    m = prepare([str(src)], tokenizer, tmp_path / "out", shard_tokens=1000)
    want = expected_stream(tokenizer, docs)
    assert stream_of(tmp_path / "out") == want  # every document in order, each followed by EOS
    assert m["num_tokens"] == len(want) and m["num_documents"] == 300
    assert m["dtype"] == "uint16" and m["tokenizer"]["hash"] == tokenizer_fingerprint(tokenizer)
    assert m["tokenizer"]["eos_token_id"] == tokenizer.eos_token_id
    assert len(m["shards"]) == -(-len(want) // 1000) > 1
    assert all(s["num_tokens"] == 1000 for s in m["shards"][:-1])
    assert all(len(s["tokens_checksum"]) == 16 and len(s["docs_checksum"]) == 16 for s in m["shards"])
    starts = TokenShards.open(tmp_path / "out").document_starts()
    lengths = [len(tokenizer(d, add_special_tokens=False)["input_ids"]) + 1 for d in docs]
    assert starts.tolist() == np.concatenate([[0], np.cumsum(lengths)[:-1]]).tolist()
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert on_disk["num_tokens"] == m["num_tokens"] and on_disk["stats"]["documents_kept"] == 300


def test_all_formats_give_the_same_stream(tmp_path, tokenizer):
    docs = make_docs(60, seed=1)
    want = expected_stream(tokenizer, docs)
    recs = [{"text": d} for d in docs]
    paths = {
        "gz": write_jsonl(tmp_path / "a.jsonl.gz", recs, "gz"),
        "zst": write_jsonl(tmp_path / "a.jsonl.zst", recs, "zst"),
        "zstd": write_jsonl(tmp_path / "a.jsonl.zstd", recs, "zst"),  # (read undecompressed: every record "non_utf8")
    }
    pq.write_table(pa.table({"text": docs, "n": list(range(60))}), tmp_path / "a.parquet", row_group_size=17)
    paths["parquet"] = tmp_path / "a.parquet"
    for name, p in paths.items():
        prepare([str(p)], tokenizer, tmp_path / name)
        assert stream_of(tmp_path / name) == want, name
    # a folder of plain text files: one document per file, in sorted path order, hidden files ignored
    folder = tmp_path / "txt"
    (folder / "sub").mkdir(parents=True)
    for i, d in enumerate(docs[:5]):
        (folder / ("sub" if i % 2 else "") / f"{i:02d}.txt").write_text(d)
    (folder / ".hidden.txt").write_text("not me")
    order = sorted(str(folder / ("sub" if i % 2 else "") / f"{i:02d}.txt") for i in range(5))
    prepare([str(folder)], tokenizer, tmp_path / "txt_out")
    assert stream_of(tmp_path / "txt_out") == expected_stream(tokenizer, [open(p).read() for p in order])


def test_datasets_spec_plain_and_streaming(tmp_path, tokenizer):
    docs = make_docs(50, seed=2)
    src = write_jsonl(tmp_path / "a.jsonl", [{"body": d} for d in docs])
    want = expected_stream(tokenizer, docs)
    for streaming in (False, True):
        out = tmp_path / f"hf{streaming}"
        prepare(["json"], tokenizer, out, hf=True, data_files=str(src), text_field="body", streaming=streaming)
        assert stream_of(out) == want
    with pytest.raises(PrepareError, match="no field 'text'"):
        prepare(["json"], tokenizer, tmp_path / "x", hf=True, data_files=str(src))


def test_save_to_disk_folders_and_arrow_files(tmp_path, tokenizer):
    """What `datasets` writes: a save_to_disk folder was read as its state.json/dataset_info.json (malformed jsonl)
    and its .arrow files as plain text (non-UTF-8): 'no valid documents'; with --hf load_dataset refused it."""
    import datasets

    docs = make_docs(40, seed=3)
    want = expected_stream(tokenizer, docs)
    datasets.Dataset.from_dict({"text": docs, "n": list(range(40))}).save_to_disk(str(tmp_path / "saved"), max_shard_size=2000)
    assert len(list((tmp_path / "saved").glob("*.arrow"))) > 1  # several arrow files, read in the dataset's order
    import pyarrow.feather

    pyarrow.feather.write_feather(pa.table({"text": docs}), tmp_path / "file_format.arrow")  # the Arrow IPC file format
    for name, inputs, kw in (("walk", ["saved"], {}), ("hf", ["saved"], {"hf": True}),
                             ("feather", ["file_format.arrow"], {})):
        prepare([str(tmp_path / i) for i in inputs], tokenizer, tmp_path / name, **kw)
        assert stream_of(tmp_path / name) == want, name
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": docs[:30]}),
                          "test": datasets.Dataset.from_dict({"text": docs[30:]})}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(PrepareError, match=r"DatasetDict .*splits \['train', 'test'\].*--hf --split"):
        prepare([str(tmp_path / "dd")], tokenizer, tmp_path / "x")
    prepare([str(tmp_path / "dd" / "test")], tokenizer, tmp_path / "test_split")
    prepare([str(tmp_path / "dd")], tokenizer, tmp_path / "test_hf", hf=True, split="test")
    assert stream_of(tmp_path / "test_split") == stream_of(tmp_path / "test_hf") == expected_stream(tokenizer, docs[30:])
    with pytest.raises(PrepareError, match=r"skipped missing_field: 40\); the records have the fields \['text', 'n'\]"):
        prepare([str(tmp_path / "saved")], tokenizer, tmp_path / "x", text_field="body")
    # an arrow file without the column among other inputs: its rows skipped and counted, as a parquet file's (it
    # stopped the whole job)
    (tmp_path / "mixed").mkdir()
    pyarrow.feather.write_feather(pa.table({"body": docs[:3]}), tmp_path / "mixed" / "other.arrow")
    write_jsonl(tmp_path / "mixed" / "a.jsonl", [{"text": d} for d in docs])
    m = prepare([str(tmp_path / "mixed")], tokenizer, tmp_path / "mixed_out")
    assert stream_of(tmp_path / "mixed_out") == want and m["stats"]["skipped"]["missing_field"] == 3
    arrow = sorted((tmp_path / "saved").glob("*.arrow"))[0]
    (tmp_path / "cut.arrow").write_bytes(arrow.read_bytes()[:-100])
    with pytest.raises(PrepareError, match="cut.arrow: cannot read"):
        prepare([str(tmp_path / "cut.arrow")], tokenizer, tmp_path / "x")


@pytest.mark.parametrize("streaming", [False, True])
def test_datasets_spec_with_a_broken_record_is_one_line(tmp_path, tokenizer, streaming):
    """--hf over a jsonl with a malformed line: streamed, pyarrow's error escaped as a traceback; not streamed, the
    line said only "An error occurred while generating the dataset"."""
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": "hello world"}, '{"text": "broken', {"text": "the river"}])
    with pytest.raises(PrepareError, match=r"failed.*JSON parse error") as e:
        prepare(["json"], tokenizer, tmp_path / "out", hf=True, data_files=[str(src)], streaming=streaming)
    assert "\n" not in str(e.value)


def test_bad_input_is_skipped_and_counted(tmp_path, tokenizer, capsys):
    good = make_docs(5, seed=3)
    records = [
        {"text": good[0]},
        "{not json",                             # malformed JSON
        b'{"text": "caf\xe9 latin-1"}',          # not UTF-8
        {"text": good[1]},
        {"text": ""}, {"text": "   \n\t "},      # empty, whitespace only
        {"body": "no text field"}, {"text": None},  # missing field (absent, null)
        {"text": 42}, {"text": ["a"]},          # not text
        '{"text": "lone \\ud800 surrogate"}',   # decodes to a string that is not valid UTF-8
        "[1, 2]",                               # JSON but not an object
        {"text": good[2]}, {"text": good[3]}, {"text": good[4]},
    ]
    src = write_jsonl(tmp_path / "bad.jsonl", records)
    from cpt.commands.prepare import main

    rc = main([str(src), "--tokenizer", _save(tokenizer, tmp_path), "--out", str(tmp_path / "out"), "--no-progress"])
    assert rc == 0
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["stats"]["skipped"] == {"malformed_json": 2, "non_utf8": 2, "missing_field": 2, "not_text": 2,
                                     "empty": 2, "too_long": 0}
    assert m["stats"]["records_read"] == len(records) and m["stats"]["documents_kept"] == 5
    assert stream_of(tmp_path / "out") == expected_stream(tokenizer, good)
    out = capsys.readouterr().out
    assert "malformed_json 2" in out and "non_utf8 2" in out and "5 documents kept" in out


def test_byte_order_mark_and_json_arrays(tmp_path, tokenizer):
    """A UTF-8 BOM cost the first jsonl record (counted as malformed) and went into a text file's tokens; a .json
    file holding a JSON array lost every record but the last one-per-line (or all of them)."""
    docs = make_docs(4, seed=5)
    lines = [json.dumps({"text": d}).encode() for d in docs]
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a_bom.jsonl").write_bytes(b"\xef\xbb\xbf" + b"\r\n".join(lines) + b"\r\n")
    (folder / "b_array.json").write_text(json.dumps([{"text": d} for d in docs], indent=2))
    (folder / "c_rows.json").write_bytes(b"\xef\xbb\xbf[\n" + b",\n".join(lines) + b"\n]\n")
    (folder / "d_bom.txt").write_bytes(b"\xef\xbb\xbf" + docs[0].encode())
    m = prepare([str(folder)], tokenizer, tmp_path / "out")
    assert m["stats"]["skipped"]["malformed_json"] == 0 and m["num_documents"] == 13
    assert stream_of(tmp_path / "out") == expected_stream(tokenizer, docs * 3 + docs[:1])
    (tmp_path / "broken.json").write_text('[{"text": "a"}, {"text": ')
    with pytest.raises(PrepareError, match="broken.json: starts with '\\[' but is not a valid JSON array"):
        prepare([str(tmp_path / "broken.json")], tokenizer, tmp_path / "out2")


def test_a_huge_plain_text_file_is_warned_about(tmp_path, monkeypatch, caplog):
    """One plain-text file is one document, tokenized in one piece: a corpus dumped into one .txt (measured: about 7 GB of
    memory for a 54 MB document) was an out-of-memory kill without a word."""
    from cpt.data import readers

    monkeypatch.setattr(readers, "LARGE_TEXT_DOCUMENT", 1000)
    (tmp_path / "small.txt").write_text("x" * 1000)
    (tmp_path / "dump.txt").write_text("x" * 2_000_001)
    with caplog.at_level("WARNING", logger="cpt.data"):
        docs = list(readers.iter_documents([str(tmp_path / "small.txt"), str(tmp_path / "dump.txt")], "text",
                                           readers.ReadCounts()))
    assert len(docs) == 2 and caplog.text.count("is one document") == 1 and "dump.txt" in caplog.text
    assert "has 2 MB" in caplog.text


def test_truncated_zstd_is_an_error_and_frames_are_all_read(tmp_path, tokenizer):
    """A zstd file cut inside a frame (an interrupted download) was read quietly as a shorter corpus; gzip already
    raised. Corrupt zstd and xz data were tracebacks. Several frames (pzstd, concatenated files) are all read.
    --out naming a file was a traceback."""
    import zstandard

    docs = make_docs(400, seed=8)
    blob = "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()
    z = zstandard.ZstdCompressor(level=1)
    frames = z.compress(blob[: len(blob) // 2]) + z.compress(blob[len(blob) // 2 :])
    (tmp_path / "two.jsonl.zst").write_bytes(frames)
    prepare([str(tmp_path / "two.jsonl.zst")], tokenizer, tmp_path / "out")
    assert stream_of(tmp_path / "out") == expected_stream(tokenizer, docs)
    zc = zstandard.ZstdCompressor(level=1).compressobj()  # one frame, flushed block by block: a cut yields some records
    one = b"".join(zc.compress(blob[i : i + 4096]) + zc.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK) for i in range(0, len(blob), 4096))
    one += zc.flush()
    (tmp_path / "cut.jsonl.zst").write_bytes(one[: len(one) * 2 // 3])
    with pytest.raises(PrepareError, match="cut.jsonl.zst: cannot read .*zstd frame"):
        prepare([str(tmp_path / "cut.jsonl.zst")], tokenizer, tmp_path / "out2")
    corrupt = bytearray(one)
    corrupt[len(one) // 2 : len(one) // 2 + 16] = bytes(16)
    (tmp_path / "corrupt.jsonl.zst").write_bytes(bytes(corrupt))
    with pytest.raises(PrepareError, match="corrupt.jsonl.zst: cannot read .*corrupt zstd data"):
        prepare([str(tmp_path / "corrupt.jsonl.zst")], tokenizer, tmp_path / "out2")
    import lzma

    xz = bytearray(lzma.compress(blob))
    xz[len(xz) // 2 : len(xz) // 2 + 16] = bytes(16)
    (tmp_path / "corrupt.jsonl.xz").write_bytes(bytes(xz))  # lzma's own error type escaped as a traceback
    with pytest.raises(PrepareError, match="corrupt.jsonl.xz: cannot read .*LZMAError"):
        prepare([str(tmp_path / "corrupt.jsonl.xz")], tokenizer, tmp_path / "out2")
    gz = bytes.fromhex("1f8b0800000000000003") + b"\x07" + bytes(16)  # a valid header, then a bad deflate block type
    (tmp_path / "corrupt.jsonl.gz").write_bytes(gz)  # zlib's own error type escaped as a traceback
    with pytest.raises(PrepareError, match=r"corrupt.jsonl.gz: cannot read \(error: .*invalid block type"):
        prepare([str(tmp_path / "corrupt.jsonl.gz")], tokenizer, tmp_path / "out2")
    with pytest.raises(PrepareError, match="is a file, not a folder"):
        prepare([str(tmp_path / "two.jsonl.zst")], tokenizer, tmp_path / "two.jsonl.zst")
    with pytest.raises(PrepareError, match=r"cannot create the folder .*two.jsonl.zst/sub: Not a directory"):
        prepare([str(tmp_path / "two.jsonl.zst")], tokenizer, tmp_path / "two.jsonl.zst" / "sub")  # (said "run directory")


def test_non_utf8_text_file_and_parquet_missing_column(tmp_path, tokenizer):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.txt").write_bytes(b"\xff\xfe binary junk \x80")
    (folder / "b.txt").write_text("a fine document")
    (folder / "c.txt").write_text("  \n")
    m = prepare([str(folder)], tokenizer, tmp_path / "out")
    assert m["stats"]["skipped"]["non_utf8"] == 1 and m["stats"]["skipped"]["empty"] == 1 and m["num_documents"] == 1
    pq.write_table(pa.table({"content": ["x", "y"]}), tmp_path / "p.parquet")
    with pytest.raises(PrepareError, match=r"missing_field: 2"):
        prepare([str(tmp_path / "p.parquet")], tokenizer, tmp_path / "out2")
    # a string column holding bytes that are not UTF-8 (pyarrow does not check what other tools wrote): one value
    # skipped and counted (to_pylist raised UnicodeDecodeError: a traceback for the whole file)
    blob, offsets = b"bad \xff\xfe bytesa fine document", np.array([0, 12, 27, 27], dtype=np.int32)
    column = pa.Array.from_buffers(pa.string(), 3, [None, pa.py_buffer(offsets.tobytes()), pa.py_buffer(blob)])
    pq.write_table(pa.table({"text": column}), tmp_path / "bad.parquet")
    with pa.OSFile(str(tmp_path / "bad.arrow"), "wb") as sink, pa.ipc.new_stream(sink, pa.schema([("text", pa.string())])) as w:
        w.write_table(pa.table({"text": column}))
    for name in ("bad.parquet", "bad.arrow"):
        m = prepare([str(tmp_path / name)], tokenizer, tmp_path / name.replace(".", "_"))
        assert m["stats"]["skipped"]["non_utf8"] == 1 and m["stats"]["skipped"]["empty"] == 1
        assert stream_of(tmp_path / name.replace(".", "_")) == expected_stream(tokenizer, ["a fine document"])


def test_long_documents_truncated_or_skipped(tmp_path, tokenizer):
    docs = make_docs(40, seed=4, min_words=1, max_words=80)
    lens = [len(tokenizer(d, add_special_tokens=False)["input_ids"]) for d in docs]
    cap = int(np.median(lens))
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in docs])
    m = prepare([str(src)], tokenizer, tmp_path / "t", max_doc_tokens=cap)
    assert m["stats"]["truncated"] == sum(n > cap for n in lens) > 0
    assert [len(d) for d in docs_of(tmp_path / "t", tokenizer)] == [min(n, cap) for n in lens]
    m = prepare([str(src)], tokenizer, tmp_path / "s", max_doc_tokens=cap, long_docs="skip")
    assert m["stats"]["skipped"]["too_long"] == sum(n > cap for n in lens)
    assert m["num_documents"] == sum(n <= cap for n in lens)
    # without a limit a very long document is kept whole (packing splits it across sequences)
    big = " ".join(["tensor"] * 20000)
    write_jsonl(tmp_path / "big.jsonl", [{"text": big}])
    m = prepare([str(tmp_path / "big.jsonl")], tokenizer, tmp_path / "b", shard_tokens=3000)
    assert m["num_documents"] == 1 and m["num_tokens"] == len(tokenizer(big, add_special_tokens=False)["input_ids"]) + 1
    assert len(m["shards"]) > 1 and sum(s["num_documents"] for s in m["shards"]) == 1


def test_nothing_valid_is_a_clear_error(tmp_path, tokenizer, capsys):
    src = write_jsonl(tmp_path / "bad.jsonl", ["{oops", {"text": " "}, {"other": "x"}])
    with pytest.raises(PrepareError, match=r"no valid documents.*malformed_json: 1, missing_field: 1, empty: 1\); "
                                           r"the records have the fields \['other'\]: name the text one with --text-field"):
        prepare([str(src)], tokenizer, tmp_path / "out")
    pq.write_table(pa.table({"content": ["x"], "id": [1]}), tmp_path / "p.parquet")
    with pytest.raises(PrepareError, match=r"the records have the fields \['content', 'id'\]"):
        prepare([str(tmp_path / "p.parquet")], tokenizer, tmp_path / "out")
    assert not (tmp_path / "out" / "manifest.json").exists()
    from cpt.commands.prepare import main

    tok_dir = _save(tokenizer, tmp_path)
    assert main([str(src), "--tokenizer", tok_dir, "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "cpt prepare: error: no valid documents" in err and "Traceback" not in err
    assert main([str(tmp_path / "missing.jsonl"), "--tokenizer", tok_dir, "--out", str(tmp_path / "o")]) == 1
    assert "input not found" in capsys.readouterr().err
    assert main([str(src), "--tokenizer", str(tmp_path / "no-tokenizer"), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err  # a mistyped path: said so (transformers spoke of hub repo ids)
    assert err == f"cpt prepare: error: tokenizer folder not found: {tmp_path / 'no-tokenizer'} (--tokenizer takes a " \
                  "local folder or a hub id)\n"
    (tmp_path / "empty").mkdir()
    assert main([str(src), "--tokenizer", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err  # transformers' message spans lines: one line here
    assert err.startswith("cpt prepare: error: cannot load tokenizer") and err.count("\n") == 1


def test_heldout_split_by_document_is_deterministic(tmp_path, tokenizer):
    docs = make_docs(200, seed=5)
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in docs])
    all_docs = {tuple(tokenizer(d, add_special_tokens=False)["input_ids"]) for d in docs}
    m = prepare([str(src)], tokenizer, tmp_path / "a", heldout_docs=7, seed=3, shard_tokens=500)
    train = docs_of(tmp_path / "a", tokenizer)
    held = docs_of(tmp_path / "a" / "heldout", tokenizer)
    assert len(held) == 7 and m["heldout"]["num_documents"] == 7 and len(train) == 193
    assert set(map(tuple, train)) | set(map(tuple, held)) == all_docs and not set(map(tuple, train)) & set(map(tuple, held))
    prepare([str(src)], tokenizer, tmp_path / "b", heldout_docs=7, seed=3, shard_tokens=500)
    assert docs_of(tmp_path / "b" / "heldout", tokenizer) == held and docs_of(tmp_path / "b", tokenizer) == train
    prepare([str(src)], tokenizer, tmp_path / "c", heldout_docs=7, seed=4)
    assert docs_of(tmp_path / "c" / "heldout", tokenizer) != held  # the seed picks the documents
    m = prepare([str(src)], tokenizer, tmp_path / "f", heldout_fraction=0.1)
    n = m["heldout"]["num_documents"]
    assert 5 <= n <= 40 and n + m["num_documents"] == 200
    assert TokenShards.open(tmp_path / "f" / "heldout").manifest["split"] == "heldout"


def test_rerun_is_idempotent_and_changes_replace_old_shards(tmp_path, tokenizer):
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in make_docs(100, seed=6)])
    out = tmp_path / "out"
    m1 = prepare([str(src)], tokenizer, out, shard_tokens=400, heldout_docs=3)
    stamp = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()}
    m2 = prepare([str(src)], tokenizer, out, shard_tokens=400, heldout_docs=3)
    assert m2["up_to_date"] and m2["prepare_key"] == m1["prepare_key"]
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()} == stamp
    m3 = prepare([str(src)], tokenizer, out, shard_tokens=100000)  # other options: redone, old shards removed
    assert not m3.get("up_to_date") and len(m3["shards"]) == 1
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "shard_00000.bin", "shard_00000.idx"]
    TokenShards.open(out, verify=True)  # checksums verify


def test_a_second_prepare_into_the_same_folder_refuses_while_the_first_runs(tmp_path, tokenizer, monkeypatch):
    """No lock: two jobs into one --out both committed (each clearing and moving shards), a manifest over mixed shards."""
    import threading

    a = write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in make_docs(40, seed=1)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": d} for d in make_docs(50, seed=2)])
    out = tmp_path / "out"
    committing, go_on = threading.Event(), threading.Event()
    real_commit = prep_mod._commit

    def slow_commit(*args):
        committing.set()
        go_on.wait(30)
        return real_commit(*args)

    monkeypatch.setattr(prep_mod, "_commit", slow_commit)
    first = threading.Thread(target=prepare, args=([str(a)], tokenizer, out), kwargs={"shard_tokens": 200})
    first.start()
    try:
        assert committing.wait(30)
        with pytest.raises(PrepareError, match=r"in use by another `cpt prepare` .*Wait for it or use another --out") as e:
            prepare([str(b)], tokenizer, out, shard_tokens=300)
        assert "\n" not in str(e.value)
    finally:
        go_on.set()
        first.join(30)
    m = json.loads((out / "manifest.json").read_text())
    assert m["inputs"] == [str(a)] and TokenShards.open(out, verify=True).verify() == []
    assert not (out / "prepare.lock").exists()  # released: the next job runs
    assert prepare([str(b)], tokenizer, out, shard_tokens=300)["inputs"] == [str(b)]


def test_a_changed_bos_token_is_prepared_again(tmp_path, tokenizer):
    """The up-to-date check compared EOS but not BOS: --add-bos with another BOS token kept the old BOS in the shards."""
    import copy

    src = write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in make_docs(5, seed=3)])
    out = tmp_path / "out"
    prepare([str(src)], tokenizer, out, add_bos=True)
    other = copy.deepcopy(tokenizer)
    other.bos_token = next(t for t, i in tokenizer.get_vocab().items() if i == 100)  # same vocabulary, another BOS id
    assert tokenizer_fingerprint(other) == tokenizer_fingerprint(tokenizer)
    assert other.bos_token_id not in (None, tokenizer.bos_token_id, tokenizer.eos_token_id)
    m = prepare([str(src)], other, out, add_bos=True)
    assert not m.get("up_to_date") and m["tokenizer"]["bos_token_id"] == other.bos_token_id
    assert stream_of(out)[0] == other.bos_token_id
    assert prepare([str(src)], other, out, add_bos=True)["up_to_date"]


def test_a_changed_remote_or_datasets_input_is_prepared_again(tokenizer, tmp_path):
    """Remote and --hf inputs were known by name alone: re-run after the data changed, cpt prepare said 'up to date'."""
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/inputs/a.jsonl", b'{"text": "the river bank"}\n' * 5)
    m1 = prepare(["memory://inputs/a.jsonl"], tokenizer, tmp_path / "out")
    assert prepare(["memory://inputs/a.jsonl"], tokenizer, tmp_path / "out").get("up_to_date")
    fs.pipe("/inputs/a.jsonl", b'{"text": "the river bank holds water"}\n' * 5)
    m2 = prepare(["memory://inputs/a.jsonl"], tokenizer, tmp_path / "out")
    assert not m2.get("up_to_date") and m2["num_tokens"] > m1["num_tokens"]
    fs.rm("/inputs", recursive=True)
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": "the river bank"}])  # --hf json --data-files a local file
    m1 = prepare(["json"], tokenizer, tmp_path / "hf", hf=True, data_files=[str(src)])
    write_jsonl(src, [{"text": "the river bank holds water"}])
    os.utime(src, ns=(1, 1))  # (a new mtime even on a coarse clock)
    assert prepare(["json"], tokenizer, tmp_path / "hf", hf=True, data_files=[str(src)])["num_tokens"] > m1["num_tokens"]


def test_a_remote_folder_is_read_as_a_local_one(tokenizer, tmp_path, caplog):
    """An fsspec folder holding raw files next to a folder `cpt prepare` wrote (a bucket's usual layout): the prepared
    folder's manifest and shards were read as text (garbage documents trained on, the rest skipped as malformed); a
    prepared folder named itself was "prepared"; a pattern was "input not found". As for local paths: the prepared
    folder left out with a warning, refused when named, patterns expanded."""
    import fsspec

    docs = make_docs(30, seed=3)
    raw = write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in docs])
    prepare([str(raw)], tokenizer, tmp_path / "local")
    fs = fsspec.filesystem("memory")
    fs.pipe("/bucket/raw/a.jsonl", raw.read_bytes())
    for f in (tmp_path / "local").iterdir():  # (a prepared folder beside the raw data)
        if f.is_file():
            fs.pipe(f"/bucket/raw/prepared/{f.name}", f.read_bytes())
    try:
        with caplog.at_level(logging.WARNING, logger="cpt.data"):
            m = prepare(["memory://bucket/raw"], tokenizer, tmp_path / "remote")
        assert "not reading memory:///bucket/raw/prepared: token shards" in caplog.text
        assert stream_of(tmp_path / "remote") == stream_of(tmp_path / "local")
        assert m["stats"]["documents_kept"] == 30 and not any(m["stats"]["skipped"].values())
        with pytest.raises(PrepareError, match="holds token shards written by `cpt prepare`"):
            prepare(["memory://bucket/raw/prepared"], tokenizer, tmp_path / "again")
        prepare(["memory://bucket/raw/*.jsonl"], tokenizer, tmp_path / "pattern")
        assert stream_of(tmp_path / "pattern") == stream_of(tmp_path / "local")
        caplog.clear()  # a recursive pattern leaves the prepared folder out too, here and on local disk
        with caplog.at_level(logging.WARNING, logger="cpt.data"):
            m = prepare(["memory://bucket/raw/**"], tokenizer, tmp_path / "recursive")
        assert stream_of(tmp_path / "recursive") == stream_of(tmp_path / "local") and not any(m["stats"]["skipped"].values())
        assert "not reading /bucket/raw/prepared: token shards" in caplog.text
        (tmp_path / "tree").mkdir()
        shutil.copy(raw, tmp_path / "tree" / "a.jsonl")
        shutil.copytree(tmp_path / "local", tmp_path / "tree" / "sub" / "prepared")
        m = prepare([str(tmp_path / "tree" / "**")], tokenizer, tmp_path / "local_recursive")
        assert stream_of(tmp_path / "local_recursive") == stream_of(tmp_path / "local") and not any(m["stats"]["skipped"].values())
        with pytest.raises(PrepareError, match="input pattern matched no files: memory://bucket/raw/\\*.parquet"):
            prepare(["memory://bucket/raw/*.parquet"], tokenizer, tmp_path / "none")
    finally:
        fs.rm("/bucket", recursive=True)


def test_interrupted_run_never_leaves_a_manifest_over_partial_shards(tmp_path, tokenizer, monkeypatch):
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in make_docs(300, seed=7)])
    out = tmp_path / "out"
    old = prepare([str(src)], tokenizer, out, shard_tokens=300)
    calls = {"n": 0}
    real_add = ShardWriter.add

    def crash_midway(self, flat, lengths):
        calls["n"] += 1
        if calls["n"] > 1:
            raise KeyboardInterrupt
        return real_add(self, flat, lengths)

    monkeypatch.setattr(ShardWriter, "add", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        prepare([str(src)], tokenizer, out, shard_tokens=250, batch_docs=16)
    monkeypatch.undo()
    assert TokenShards.open(out).manifest["prepare_key"] == old["prepare_key"]  # old data intact, verified
    assert not [p for p in out.iterdir() if p.name.startswith(".staging")]
    # staging folders of killed runs on this host go; another host's (a run on a shared filesystem) stays
    import socket
    import subprocess

    dead = subprocess.Popen(["true"])  # a PID that is not running any more
    dead.wait()
    for name in (f".staging-{dead.pid}-0123abcd-{socket.gethostname()}", f".staging-{dead.pid}-0123abcd",
                 f".staging-{dead.pid}-0123abcd-other-host.cluster"):
        (out / name).mkdir()
    prepare([str(src)], tokenizer, out, shard_tokens=300, force=True)
    assert [p.name for p in out.iterdir() if p.name.startswith(".staging")] == [f".staging-{dead.pid}-0123abcd-other-host.cluster"]
    shutil.rmtree(out / f".staging-{dead.pid}-0123abcd-other-host.cluster")

    def crash_while_moving(src_dir, dst_dir):
        raise KeyboardInterrupt

    monkeypatch.setattr(prep_mod, "_move_shards", crash_while_moving)
    with pytest.raises(KeyboardInterrupt):
        prepare([str(src)], tokenizer, out, shard_tokens=250)
    with pytest.raises(ShardError, match="no manifest.json"):
        TokenShards.open(out)  # the old manifest went first: nothing points at replaced shards
    monkeypatch.undo()
    m = prepare([str(src)], tokenizer, out, shard_tokens=250)
    assert not m.get("up_to_date") and TokenShards.open(out).num_tokens == old["num_tokens"]


def test_num_proc_gives_identical_shards(tmp_path, tokenizer):
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in make_docs(500, seed=8)])
    a = prepare([str(src)], tokenizer, tmp_path / "a", shard_tokens=2000, heldout_docs=5, batch_docs=50)
    b = prepare([str(src)], tokenizer, tmp_path / "b", shard_tokens=2000, heldout_docs=5, batch_docs=50, num_proc=2)
    assert [s["tokens_checksum"] for s in a["shards"]] == [s["tokens_checksum"] for s in b["shards"]]
    assert stream_of(tmp_path / "a" / "heldout") == stream_of(tmp_path / "b" / "heldout")


def test_a_tokenizer_worker_killed_by_the_system_is_one_error_not_a_hang(tmp_path, tokenizer):
    """--num-proc: a worker killed by the system (out of memory on a huge document) left multiprocessing.Pool's imap
    waiting forever for its batch."""
    import multiprocessing
    import signal
    import threading

    src = write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in make_docs(2000, seed=8)])
    real_read, seen = prep_mod.read_file, []

    def read_and_kill_a_worker(*args):
        for i, doc in enumerate(real_read(*args)):
            if i == 1000:
                os.kill(multiprocessing.active_children()[0].pid, signal.SIGKILL)
            yield doc

    def run():
        try:
            prepare([str(src)], tokenizer, tmp_path / "out", batch_docs=50, num_proc=2)
        except Exception as e:  # noqa: BLE001 - the test looks at it
            seen.append(e)

    prep_mod.read_file = read_and_kill_a_worker
    try:
        t = threading.Thread(target=run, daemon=True)
        t.start()
        t.join(timeout=120)
    finally:
        prep_mod.read_file = real_read
    assert not t.is_alive(), "cpt prepare hangs after a worker was killed"
    assert len(seen) == 1 and isinstance(seen[0], PrepareError) and "worker process died" in str(seen[0])
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_special_token_text_in_documents_is_counted_or_encoded_as_text(tmp_path, tokenizer, capsys):
    """'<eos>' written inside a document (code about tokenizers, scraped chat logs) became a real EOS mid-document,
    silently: it is counted in the summary, and --special-tokens-as-text encodes it as text."""
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": "the river <eos> bank"}, {"text": "plain water"}])
    m = prepare([str(src)], tokenizer, tmp_path / "parsed", echo=print)
    assert m["stats"]["special_token_text"] == 1 and "special_tokens_as_text" not in m["options"]  # (earlier keys hold)
    assert "1 documents hold the text of a special token" in capsys.readouterr().out
    assert stream_of(tmp_path / "parsed")[:8].count(tokenizer.eos_token_id) == 1  # an EOS inside the first document
    m = prepare([str(src)], tokenizer, tmp_path / "parsed", special_tokens_as_text=True)  # another job: redone
    assert not m.get("up_to_date") and m["stats"]["special_token_text"] == 0 and m["options"]["special_tokens_as_text"]
    as_text = tokenizer("the river <eos> bank", add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert tokenizer.eos_token_id not in as_text
    assert stream_of(tmp_path / "parsed") == as_text + [tokenizer.eos_token_id] + expected_stream(tokenizer, ["plain water"])
    assert tokenizer("<eos>", add_special_tokens=False)["input_ids"] == [tokenizer.eos_token_id]  # (the tokenizer: untouched)


def test_bos_option_and_dtype_choice(tmp_path, tokenizer):
    docs = make_docs(3, seed=9)
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in docs])
    m = prepare([str(src)], tokenizer, tmp_path / "o", add_bos=True)
    want = []
    for d in docs:
        want += [tokenizer.bos_token_id] + tokenizer(d, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert stream_of(tmp_path / "o") == want and m["bos_before_each_document"]
    import copy

    gpt2_like = copy.deepcopy(tokenizer)
    gpt2_like.bos_token = gpt2_like.eos_token  # one token for both (GPT-2, Pythia): --add-bos doubled every boundary
    with pytest.raises(PrepareError, match="one token for BOS and EOS"):
        prepare([str(src)], gpt2_like, tmp_path / "z", add_bos=True)
    assert dtype_for_vocab(65536) == np.uint16 and dtype_for_vocab(65537) == np.uint32
    with pytest.raises(PrepareError, match="either heldout_docs or heldout_fraction"):
        prepare([str(src)], tokenizer, tmp_path / "x", heldout_docs=1, heldout_fraction=0.1)
    # holding out every document is said as such (it read "no valid documents ... skipped no records found")
    with pytest.raises(PrepareError, match=r"--heldout-docs 5 took all 3 documents .* leaving none to train on"):
        prepare([str(src)], tokenizer, tmp_path / "y", heldout_docs=5)
    assert not (tmp_path / "y" / "manifest.json").exists()


def _save(tokenizer, tmp_path) -> str:
    d = tmp_path / "tok"
    if not d.exists():
        tokenizer.save_pretrained(d)
    return str(d)


def test_a_tokenizer_with_gaps_in_its_ids_gets_uint32_shards(tmp_path):
    """len(tokenizer) is 4, but one id is 70,000: the dtype came from the length (uint16: OverflowError traceback)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"<eos>": 0, "<unk>": 1, "a": 2, "b": 70000}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>")
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": "a b a"}, {"text": "b zzz"}])
    m = prepare([str(src)], tok, tmp_path / "out")
    assert m["dtype"] == "uint32" and m["tokenizer"]["vocab_size"] == 70001
    assert stream_of(tmp_path / "out") == [2, 70000, 2, 0, 70000, 1, 0]
    assert m["stats"]["special_token_text"] == 0  # an unknown word's <unk> is no special token's text


def test_saved_tokenizer_has_the_same_fingerprint(tmp_path, tokenizer):
    from transformers import AutoTokenizer

    assert tokenizer_fingerprint(AutoTokenizer.from_pretrained(_save(tokenizer, tmp_path))) == tokenizer_fingerprint(tokenizer)
    assert os.path.exists(os.path.join(_save(tokenizer, tmp_path), "tokenizer.json"))


def test_folder_walk_keeps_underscore_files_and_globs(tmp_path):
    (tmp_path / "pkg" / "_impl").mkdir(parents=True)
    (tmp_path / "pkg" / "__pycache__").mkdir()
    (tmp_path / ".git").mkdir()
    for p in ("pkg/__init__.py", "pkg/_impl/core.py", "pkg/a.h", "pkg/__pycache__/x.py", ".git/h.py"):
        (tmp_path / p).write_text("x = 1\n")
    got = [os.path.relpath(p, tmp_path) for p in resolve_files([str(tmp_path)], glob="*.py")]
    assert got == ["pkg/__init__.py", "pkg/_impl/core.py"]
    assert [os.path.relpath(p, tmp_path) for p in resolve_files([str(tmp_path)], glob="**/*.py")] == got
    assert [os.path.relpath(p, tmp_path) for p in resolve_files([str(tmp_path / "**" / "*.h")])] == ["pkg/a.h"]
    with pytest.raises(ReadError, match="matched no files"):
        resolve_files([str(tmp_path / "**" / "*.zzz")])


def test_symlinked_folders_are_read_and_each_file_once(tmp_path, caplog):
    """A symlinked folder inside an input folder was skipped silently, a file named twice (or linked into a folder also
    given) was read twice, and a broken link was a FileNotFoundError traceback."""
    (tmp_path / "corpus" / "a").mkdir(parents=True)
    (tmp_path / "corpus" / "b").mkdir()
    (tmp_path / "elsewhere").mkdir()
    for p in ("corpus/a/d.jsonl", "corpus/b/d.jsonl", "elsewhere/e.jsonl"):  # same file name in two folders: both read
        (tmp_path / p).write_text('{"text": "x"}\n')
    os.symlink(tmp_path / "elsewhere", tmp_path / "corpus" / "linked")
    os.symlink(tmp_path / "corpus", tmp_path / "corpus" / "a" / "loop")  # a cycle is walked once
    with caplog.at_level("WARNING", logger="cpt.data"):
        got = [os.path.relpath(p, tmp_path) for p in resolve_files([str(tmp_path / "corpus"), str(tmp_path / "corpus/b/d.jsonl")])]
    assert got == ["corpus/a/d.jsonl", "corpus/b/d.jsonl", "corpus/linked/e.jsonl"]
    assert "1 input file(s) named more than once are read once" in caplog.text
    caplog.clear()
    os.symlink(tmp_path / "corpus" / "b", tmp_path / "corpus" / "b_again")  # a folder reached twice: read once, said
    with caplog.at_level("WARNING", logger="cpt.data"):
        got = [os.path.relpath(p, tmp_path) for p in resolve_files([str(tmp_path / "corpus")])]
    assert got == ["corpus/a/d.jsonl", "corpus/b/d.jsonl", "corpus/linked/e.jsonl"]
    assert "2 folder(s) reached a second time through symbolic links are read once" in caplog.text  # (and the loop)
    assert f"corpus/b_again (= {tmp_path}/corpus/b)" in caplog.text
    os.unlink(tmp_path / "corpus" / "b_again")
    os.symlink(tmp_path / "gone.jsonl", tmp_path / "corpus" / "broken.jsonl")
    with pytest.raises(ReadError, match="corpus/broken.jsonl is a broken symbolic link"):
        resolve_files([str(tmp_path / "corpus")])


def test_an_output_folder_inside_the_input_folder_is_not_read(tmp_path, tokenizer):
    """`cpt prepare corpus/ --out corpus/tokens`: a re-run read its own shards and manifests as input (bogus skipped
    records) and, their mtimes having changed, re-tokenized every time instead of finding the output up to date."""
    docs = make_docs(20, seed=9)
    (tmp_path / "corpus").mkdir()
    write_jsonl(tmp_path / "corpus" / "a.jsonl", [{"text": d} for d in docs])
    out = tmp_path / "corpus" / "tokens"
    first = prepare([str(tmp_path / "corpus")], tokenizer, out, heldout_docs=2)
    again = prepare([str(tmp_path / "corpus")], tokenizer, out, heldout_docs=2)
    assert again.get("up_to_date") and again["prepare_key"] == first["prepare_key"]
    forced = prepare([str(tmp_path / "corpus")], tokenizer, out, heldout_docs=2, force=True)
    assert forced["stats"]["records_read"] == 20 and sum(forced["stats"]["skipped"].values()) == 0
    with pytest.raises(PrepareError, match="holds token shards written by `cpt prepare`"):
        prepare([str(out)], tokenizer, out)


def test_prepared_folders_inside_an_input_folder_are_not_read(tmp_path, tokenizer, caplog):
    """README workflow 1 writes data/prepared/new next to the raw data in data/new; `cpt prepare data/ --out
    data/tokens` then read the other prepared folders' manifests as jsonl (malformed records) and their shards as
    plain-text documents (binary token ids: non-UTF-8 skips, or garbage text where the bytes happen to decode)."""
    docs = make_docs(20, seed=9)
    (tmp_path / "data" / "new").mkdir(parents=True)
    write_jsonl(tmp_path / "data" / "new" / "a.jsonl", [{"text": d} for d in docs])
    prepare([str(tmp_path / "data" / "new")], tokenizer, tmp_path / "data" / "prepared" / "new", heldout_docs=2)
    with caplog.at_level(logging.WARNING, logger="cpt.data"):
        result = prepare([str(tmp_path / "data")], tokenizer, tmp_path / "data" / "tokens")
    assert result["stats"]["records_read"] == 20 and sum(result["stats"]["skipped"].values()) == 0
    assert "data/prepared/new: token shards written by `cpt prepare`" in caplog.text
    assert stream_of(tmp_path / "data" / "tokens") == expected_stream(tokenizer, docs)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cpt.data"):  # a re-run: its own output is not warned about
        assert prepare([str(tmp_path / "data")], tokenizer, tmp_path / "data" / "tokens").get("up_to_date")
    assert "data/prepared/new: token shards" in caplog.text and "data/tokens" not in caplog.text
    with pytest.raises(PrepareError, match="prepared/new/heldout holds token shards written by `cpt prepare`"):
        prepare([str(tmp_path / "data" / "prepared" / "new" / "heldout")], tokenizer, tmp_path / "x")


def test_plain_text_files_beside_jsonl_are_warned_about(tmp_path, tokenizer, caplog):
    """A downloaded dataset folder's README.md and LICENSE were trained on as documents without a word."""
    (tmp_path / "ds").mkdir()
    write_jsonl(tmp_path / "ds" / "train.jsonl", [{"text": d} for d in make_docs(5, seed=4)])
    (tmp_path / "ds" / "README.md").write_text("# My dataset card")
    with caplog.at_level("WARNING", logger="cpt.data"):
        m = prepare([str(tmp_path / "ds")], tokenizer, tmp_path / "out")
    assert m["num_documents"] == 6 and "1 plain-text file(s) among the jsonl/parquet inputs" in caplog.text
    assert "README.md" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="cpt.data"):
        assert prepare([str(tmp_path / "ds")], tokenizer, tmp_path / "out2", glob="*.jsonl")["num_documents"] == 5
    assert "plain-text" not in caplog.text


def test_evaluation_split_files_among_the_inputs_are_warned_about(tmp_path, tokenizer, caplog):
    """A downloaded dataset folder (data/train-*.parquet, data/test-*.parquet): its test split was trained on, silently."""
    (tmp_path / "ds" / "data").mkdir(parents=True)
    for name in ("train-00000-of-00001.jsonl", "test-00000-of-00001.jsonl", "validation.jsonl", "latest.jsonl"):
        write_jsonl(tmp_path / "ds" / "data" / name, [{"text": d} for d in make_docs(3, seed=len(name))])
    (tmp_path / "ds" / "test_code.py").write_text("def test_x(): pass\n")  # code, not a split: not named
    with caplog.at_level(logging.WARNING, logger="cpt.data"):
        prepare([str(tmp_path / "ds")], tokenizer, tmp_path / "out")
        prepare([str(tmp_path / "ds" / "data" / "validation.jsonl")], tokenizer, tmp_path / "val")  # only it: meant
    warned = [r.getMessage() for r in caplog.records if "evaluation split" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("2 input file(s)") and "test-00000" in warned[0]
    assert "validation.jsonl" in warned[0] and "latest" not in warned[0]


def test_a_csv_file_is_warned_about_and_read_by_row_with_hf(tmp_path, tokenizer, caplog):
    """A .csv named as input became one document holding every row and column, silently; with --hf it was refused
    ("Couldn't find any data file")."""
    (tmp_path / "t.csv").write_text('id,text\n1,"the river bank, with a comma"\n2,plain water\n')
    with caplog.at_level(logging.WARNING, logger="cpt.data"):
        assert prepare([str(tmp_path / "t.csv")], tokenizer, tmp_path / "whole")["num_documents"] == 1
    assert any("t.csv is read as plain text, one document" in r.getMessage() for r in caplog.records)
    prepare([str(tmp_path / "t.csv")], tokenizer, tmp_path / "rows", hf=True)
    assert stream_of(tmp_path / "rows") == expected_stream(tokenizer, ["the river bank, with a comma", "plain water"])


def test_options_object_and_keyword_arguments_are_the_same_job(tmp_path, tokenizer):
    from cpt.data.prepare import IDENTITY_OPTIONS, PrepareOptions

    src = write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in make_docs(40, seed=12)])
    opts = PrepareOptions(shard_tokens=300, heldout_docs=4, seed=2)
    a = prepare([str(src)], tokenizer, tmp_path / "a", opts)
    b = prepare([str(src)], tokenizer, tmp_path / "b", shard_tokens=300, heldout_docs=4, seed=2)
    c = prepare([str(src)], tokenizer, tmp_path / "c", opts, seed=3)  # keywords override fields of the object
    assert a["prepare_key"] == b["prepare_key"] != c["prepare_key"] and a["shards"] == b["shards"]
    assert list(a["options"]) == [o for o in IDENTITY_OPTIONS if o != "special_tokens_as_text"]  # (only when set)
    assert (a["options"]["seed"], c["options"]["seed"]) == (2, 3)
    assert stream_of(tmp_path / "a" / "heldout") == stream_of(tmp_path / "b" / "heldout")
    assert opts.num_proc == 1 and "num_proc" not in a["options"]  # how the job runs is not part of its identity
    with pytest.raises(TypeError):
        prepare([str(src)], tokenizer, tmp_path / "d", shard_token=300)  # a misspelt option is an error
    with pytest.raises(PrepareError, match="num_proc must be >= 1"):
        prepare([str(src)], tokenizer, tmp_path / "d", opts, num_proc=0)


def test_vocab_learning_and_eval_held_out_files_read_text_as_prepare_does(tmp_path, tokenizer, caplog, capsys):
    """One reader (cpt.data.readers) for `cpt prepare`, model.vocab.learn_from and `cpt eval --heldout FILE`:
    the same documents from the same file, bad records skipped and counted rather than a traceback."""
    from cpt.commands.eval import text_heldout_tokens
    from cpt.data.readers import ReadCounts, iter_documents
    from cpt.vocab import read_texts

    docs = make_docs(30, seed=11)
    records = [{"text": d} for d in docs[:10]] + ["{bad", b'{"text": "caf\xe9"}', {"other": 1}] + [{"text": d} for d in docs[10:]]
    src = write_jsonl(tmp_path / "a.jsonl.gz", records, "gz")
    counts = ReadCounts()
    assert list(iter_documents([str(src)], "text", counts)) == docs
    assert counts.records == 33 and counts.describe_skips() == "malformed_json 1, non_utf8 1, missing_field 1"
    m = prepare([str(src)], tokenizer, tmp_path / "out")
    assert stream_of(tmp_path / "out") == expected_stream(tokenizer, docs)
    assert {k: v for k, v in m["stats"]["skipped"].items() if v} == dict(counts.skipped)
    with caplog.at_level("WARNING"):
        assert list(read_texts(src)) == docs
        assert "".join(read_texts(src, max_chars=100)) == "".join(docs)[:100]  # the character budget
    assert "skipped malformed_json 1, non_utf8 1, missing_field 1" in caplog.text
    want = expected_stream(tokenizer, docs)
    toks = text_heldout_tokens(src, tokenizer, 8, None)
    assert toks.flatten().tolist() == want[: len(want) // 8 * 8]
    assert "skipped malformed_json 1, non_utf8 1, missing_field 1" in capsys.readouterr().err
    broken = tmp_path / "broken.jsonl.gz"
    broken.write_bytes(gzip.compress(b'{"text": "x"}\n' * 100)[:40])  # a truncated gzip stream
    with pytest.raises(ReadError, match="broken.jsonl.gz: cannot read"):
        text_heldout_tokens(broken, tokenizer, 8, None)
    with pytest.raises(ReadError, match="broken.jsonl.gz: cannot read"):
        list(read_texts(broken))
    with pytest.raises(PrepareError, match="broken.jsonl.gz: cannot read"):  # prepare's one error type
        prepare([str(broken)], tokenizer, tmp_path / "b")
    with pytest.raises(ConfigError, match="^model.vocab.learn_from: nothing to read at"):
        list(read_texts(tmp_path / "missing"))


def test_progress_lines_in_a_batch_jobs_log(tmp_path, tokenizer, capsys):
    """Where stderr is a file (a batch job), the bar is off (carriage returns), and there was nothing in its place: a
    `tail -f` of the job's log saw no sign of life until the summary, however long the corpus took. Now a plain line
    every --progress-every seconds (0 here: every encoded batch)."""
    from cpt.commands.prepare import main

    src = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in make_docs(6, seed=1)])
    args = [str(src), "--tokenizer", _save(tokenizer, tmp_path), "--out", str(tmp_path / "out")]
    assert main([*args, "--progress-every", "0", "--force"]) == 0  # (capsys: stderr is no terminal)
    lines = capsys.readouterr().err.splitlines()
    assert any(line.startswith("cpt prepare: 6 documents, ") and line.endswith(" min") for line in lines), lines
    assert main([*args, "--progress-every", "0", "--force", "--no-progress"]) == 0
    assert "cpt prepare: " not in capsys.readouterr().err


def test_tokenizer_workers_end_with_cpt_prepare(tmp_path):
    """`cpt prepare --num-proc N` killed with kill -9 (the OOM killer, a scheduler): its worker processes stayed,
    re-parented and blocked on their queue, forever. They now end with it. (A stand-in `cpt prepare`: the encoding
    pool over documents that stop coming after the first batch, so that the workers are up and idle.)"""
    import signal
    import subprocess
    import sys
    import threading
    import time

    code = ("import time\nfrom data_factories import make_tokenizer\nfrom cpt.data.encode import Encoder, encode_documents\n"
            "import numpy as np\n"
            "tok = make_tokenizer()\n"
            "enc = Encoder(tok.backend_tokenizer, tok.eos_token_id, None, np.uint16, None, 'keep')\n"
            "def docs():\n    yield from ['the river bank'] * 64\n    time.sleep(600)\n"
            "with encode_documents(docs(), enc, num_proc=2, batch_docs=4) as batches:\n"
            "    next(batches)\n    print('encoding', flush=True)\n    time.sleep(600)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    try:
        timer = threading.Timer(120, proc.kill)  # (a stand-in that never gets there fails the test, not CI's clock)
        timer.start()
        assert proc.stdout.readline().strip() == "encoding"
        timer.cancel()
        workers = [int(p) for t in Path(f"/proc/{proc.pid}/task").iterdir()
                   for p in (t / "children").read_text().split()]
        assert len(workers) >= 2, workers  # (the two workers, and the resource tracker)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    deadline = time.time() + 30
    while time.time() < deadline and any(Path(f"/proc/{w}").exists() and "zombie" not in
                                         _proc_state(w) for w in workers):
        time.sleep(0.1)
    left = [w for w in workers if Path(f"/proc/{w}").exists() and "zombie" not in _proc_state(w)]
    for w in left:
        os.kill(w, signal.SIGKILL)
    assert not left, f"{len(left)} worker(s) still running after their cpt prepare was killed"


def _proc_state(pid: int) -> str:
    try:
        return next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("State:"))
    except (OSError, StopIteration):
        return "zombie"
