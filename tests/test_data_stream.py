"""Packed streams: permutation, epochs, random access; the on-the-fly `datasets` source."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest

from cpt.data.hfstream import HFSourceError, HFTokenStream
from cpt.data.prepare import prepare
from cpt.data.shards import TokenShards
from cpt.data.sources import SourceConfig
from cpt.data.stream import PackedStream, Permutation
from data_factories import expected_stream, make_docs, tokenizer, write_jsonl  # noqa: F401

L = 16


@pytest.fixture
def shards(tmp_path, tokenizer):
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in make_docs(200, seed=21)])
    prepare([str(src)], tokenizer, tmp_path / "s", shard_tokens=900)
    return TokenShards.open(tmp_path / "s")


def test_cached_permutation_blocks_give_the_direct_permutation():
    """sequence_ids computes the permutation a block of positions at a time and caches it: the same ids as applying
    each epoch's permutation directly, for positions inside a block, across blocks and across epochs."""
    from cpt.data import stream as stream_mod
    from cpt.data.stream import _key

    class Sized:  # only num_tokens is needed to number the sequences
        num_tokens = 10_000 * L

    s = PackedStream(Sized(), L, seed=3, name="x")
    n = s.num_sequences
    block = stream_mod._BLOCK
    for positions in ([0, 1, 5], [block - 2, block - 1, block, block + 1], [n - 3, n - 1, n, n + 1, 2 * n + 7],
                      [3 * block + 5, 17, n + block]):
        positions = np.array(positions)
        epochs, offsets = np.divmod(positions, n)
        want = [int(Permutation(n, _key(3, "x", int(e)))(np.array([o]))[0]) for e, o in zip(epochs, offsets)]
        assert s.sequence_ids(positions).tolist() == want
    assert len(s._blocks) <= 8


@pytest.mark.parametrize("n", [1, 2, 3, 17, 1000, 4097])
def test_permutation_is_a_keyed_bijection(n):
    p = Permutation(n, key=42)
    out = p(np.arange(n))
    assert sorted(out.tolist()) == list(range(n))
    assert out.tolist() == Permutation(n, key=42)(np.arange(n)).tolist()  # pure function of the key
    if n >= 17:
        assert out.tolist() != Permutation(n, key=43)(np.arange(n)).tolist()
        assert out.tolist() != list(range(n))
        assert p(np.array([5, 3])).tolist() == [out[5], out[3]]  # random access


def test_each_epoch_is_a_new_order_covering_every_sequence(shards):
    s = PackedStream(shards, L, seed=7, name="a")
    n = s.num_sequences
    assert n == shards.num_tokens // L
    e0 = s.sequence_ids(np.arange(n))
    e1 = s.sequence_ids(np.arange(n, 2 * n))
    assert sorted(e0.tolist()) == sorted(e1.tolist()) == list(range(n))
    assert e0.tolist() != e1.tolist()
    assert e0.tolist() == PackedStream(shards, L, seed=7, name="a").sequence_ids(np.arange(n)).tolist()
    assert e0.tolist() != PackedStream(shards, L, seed=8, name="a").sequence_ids(np.arange(n)).tolist()
    assert e0.tolist() != PackedStream(shards, L, seed=7, name="b").sequence_ids(np.arange(n)).tolist()
    tokens = shards.read(0, shards.num_tokens)
    seqs = s.sequences(np.array([0, 1, n + 2]))
    for row, i in zip(seqs, [e0[0], e0[1], e1[2]]):
        assert row.tolist() == tokens[i * L : (i + 1) * L].tolist()  # packing: consecutive tokens of the stream


def test_too_small_source_is_a_clear_error(tmp_path, tokenizer):
    write_jsonl(tmp_path / "t.jsonl", [{"text": "tiny"}])
    prepare([str(tmp_path / "t.jsonl")], tokenizer, tmp_path / "t")
    with pytest.raises(ValueError, match="fewer than one sequence of 4096"):
        PackedStream(TokenShards.open(tmp_path / "t"), 4096, name="t")


# ------------------------------------------------------------------ the on-the-fly `datasets` source


def hf_source(path, **kw) -> SourceConfig:
    return SourceConfig(name="web", type="hf", path="json", data_files=str(path), **kw)


def test_hf_stream_packs_like_prepared_shards(tmp_path, tokenizer):
    docs = make_docs(60, seed=22)
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in docs])
    want = np.array(expected_stream(tokenizer, docs))
    s = HFTokenStream(hf_source(path), tokenizer, L, batch_docs=7)
    n = len(want) // L
    got = np.concatenate([s.next_sequences(3) for _ in range(n // 3)]).reshape(-1)
    assert got.tolist() == want[: len(got)].tolist()
    # past the end: the next epoch continues right after the leftover tokens of the first
    more = s.next_sequences(n).reshape(-1)
    assert s.epoch == 1
    assert np.concatenate([got, more]).tolist() == np.concatenate([want, want])[: len(got) + len(more)].tolist()


def test_hf_source_reads_a_save_to_disk_folder_and_a_local_file(tmp_path, tokenizer):
    """A `type: hf` source naming a `datasets` save_to_disk folder (load_dataset refuses it: 'use load_from_disk') or a
    local data file."""
    import datasets

    docs = make_docs(30, seed=24)
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(tmp_path / "dd"))
    s = HFTokenStream(SourceConfig(name="web", type="hf", path=str(tmp_path / "dd")), tokenizer, L)
    assert s.next_sequences(4).reshape(-1).tolist() == expected_stream(tokenizer, docs)[: 4 * L]
    # a local jsonl file as the path: load_dataset said "Couldn't find any data file" of a file that is there
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in docs])
    s = HFTokenStream(SourceConfig(name="web", type="hf", path=str(path)), tokenizer, L)
    assert s.next_sequences(4).reshape(-1).tolist() == expected_stream(tokenizer, docs)[: 4 * L]
    (tmp_path / "a.txt").write_text(docs[0])
    with pytest.raises(HFSourceError, match="a.txt is a plain-text file: `cpt prepare` it"):
        HFTokenStream(SourceConfig(name="web", type="hf", path=str(tmp_path / "a.txt")), tokenizer, L)
    prepare([str(path)], tokenizer, tmp_path / "prepared")  # a `cpt prepare` folder as a `type: hf` source: datasets
    with pytest.raises(HFSourceError, match=r"prepared holds token shards written by `cpt prepare` .* `type: shards`"):
        HFTokenStream(SourceConfig(name="web", type="hf", path=str(tmp_path / "prepared")), tokenizer, L)  # (it read
        # manifest.json as data and failed at the first batch, after the model was built: a CastError)


@pytest.mark.parametrize("streaming", [True, False])
def test_hf_stream_resumes_exactly(tmp_path, tokenizer, streaming):
    docs = make_docs(12, seed=23)
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in docs])
    a = HFTokenStream(hf_source(path, streaming=streaming), tokenizer, L, batch_docs=5)
    states, outs = [], []
    for k in range(30):  # crosses at least one epoch boundary
        states.append(a.state_dict())
        outs.append(a.next_sequences(3))
    assert a.epoch >= 1
    for k in (0, 7, 19, 29):
        b = HFTokenStream(hf_source(path, streaming=streaming), tokenizer, L, batch_docs=5)
        b.load_state_dict(states[k])
        assert np.concatenate([b.next_sequences(3) for _ in range(30 - k)]).tolist() == np.concatenate(outs[k:]).tolist()


def test_a_changed_local_dataset_is_refused_on_resume(tmp_path, tokenizer, caplog):
    """A `type: hf` source's fingerprint is by path: after the file changed, a resume read other data at the saved
    position, silently. Now its files (size, mtime) are saved with the position: other sizes or files are refused,
    other mtimes only (a copy) are a warning."""
    import json as _json

    path = write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in make_docs(20, seed=25)])
    a = HFTokenStream(hf_source(path, streaming=True), tokenizer, L, batch_docs=5)
    a.next_sequences(3)
    state = _json.loads(_json.dumps(a.state_dict()))  # as a checkpoint saves it
    want = a.next_sequences(2)
    os.utime(path, ns=(1, 1))  # same bytes, another mtime: resumes, with a warning
    b = HFTokenStream(hf_source(path, streaming=True), tokenizer, L, batch_docs=5)
    with caplog.at_level(logging.WARNING, logger="cpt.data"):
        b.load_state_dict(state)
    assert b.next_sequences(2).tolist() == want.tolist() and "other modification times" in caplog.text
    with open(path, "a") as f:  # other data: refused in one line
        f.write(_json.dumps({"text": "one more document"}) + "\n")
    c = HFTokenStream(hf_source(path, streaming=True), tokenizer, L, batch_docs=5)
    with pytest.raises(ValueError, match=r"source 'web': its files changed since the checkpoint .*a.jsonl"):
        c.load_state_dict(state)
    c.load_state_dict({k: v for k, v in state.items() if k != "files"})  # a checkpoint from before: as before


def test_a_hub_dataset_at_another_commit_is_refused_on_resume(tmp_path, tokenizer, monkeypatch, caplog):
    """A hub dataset was known by its name only: after the hub (or, offline, the local cache) moved to another commit,
    a resume read other data at the saved position, silently. The commit `datasets` resolves is saved with the
    position (offline: the cached copy's, here a fake cache of two commits); another is refused in one line, a pinned
    `revision` that the load cannot honour is refused at start (offline, a branch or tag, which cannot be resolved, is
    a warning naming the commit read; one it cannot resolve at all, a warning), and `cpt prepare --hf` redoes a moved
    dataset."""
    import datasets

    from cpt.data.prepare_key import hf_identity
    from data_factories import fake_hub_cache

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    first, second = "1" * 40, "2" * 40
    fake_hub_cache(tmp_path / "cache", "someone/tiny", first, make_docs(20, seed=26), mtime=1_000_000)
    src = SourceConfig(name="hub", type="hf", path="someone/tiny")
    a = HFTokenStream(src, tokenizer, L, batch_docs=5)
    a.next_sequences(3)
    state = a.state_dict()
    assert a.revision == state["revision"] == first and hf_identity(["someone/tiny"], None)[1] == f"revision={first}"
    want = a.next_sequences(2)
    b = HFTokenStream(src, tokenizer, L, batch_docs=5)
    b.load_state_dict(state)  # the same commit: resumes exactly
    assert b.next_sequences(2).tolist() == want.tolist()

    fake_hub_cache(tmp_path / "cache", "someone/tiny", second, make_docs(20, seed=27), mtime=2_000_000)
    c = HFTokenStream(src, tokenizer, L, batch_docs=5)
    assert c.revision == second and hf_identity(["someone/tiny"], None)[1] == f"revision={second}"
    with pytest.raises(ValueError, match=rf"source 'hub': the hub dataset 'someone/tiny' resolves to commit {second} "
                                         rf"and the checkpoint was trained on commit {first}: .*add `revision: {first}`"):
        c.load_state_dict(state)
    with pytest.raises(HFSourceError, match=rf"revision {first} .* resolves to commit {second}"):
        HFTokenStream(SourceConfig(name="hub", type="hf", path="someone/tiny", revision=first), tokenizer, L)
    c.load_state_dict({k: v for k, v in state.items() if k != "revision"})  # a checkpoint from before: as before
    with caplog.at_level(logging.WARNING, logger="cpt.data"):  # offline, a branch or tag reads the newest copy
        d = HFTokenStream(SourceConfig(name="hub", type="hf", path="someone/tiny", revision="v1"), tokenizer, L)
    assert d.revision == second and f"revision 'v1' of 'someone/tiny' cannot be resolved offline" in caplog.text
    monkeypatch.setattr(datasets, "load_dataset_builder", lambda *a, **k: 1 / 0)  # its commit cannot be resolved
    with caplog.at_level(logging.WARNING, logger="cpt.data"):
        e = HFTokenStream(src, tokenizer, L, batch_docs=5)
    assert e.revision is None and "the commit of the hub dataset 'someone/tiny' cannot be resolved" in caplog.text


def test_hf_stream_skips_bad_records_and_errors_when_nothing_is_usable(tmp_path, tokenizer, caplog):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "hello world"}, {"text": " "}, {"text": None}, {"text": 5},
                                              {"text": "the river bank"}])
    with caplog.at_level(logging.WARNING, logger="cpt.data"):
        s = HFTokenStream(hf_source(path), tokenizer, 4)
        s.next_sequences(2)
    assert s.skipped["empty"] >= 1 and s.skipped["missing_field"] >= 1 and s.skipped["not_text"] >= 1
    # each reason is logged once (they were counted in the state only: silent to the user)
    logged = [r.getMessage() for r in caplog.records if "skipping records" in r.getMessage()]
    assert len(logged) == 3 and any("non-string text in field 'text'" in m for m in logged)
    path = write_jsonl(tmp_path / "b.jsonl", [{"text": " "}, {"text": ""}])
    with pytest.raises(HFSourceError, match="no usable text"):
        HFTokenStream(hf_source(path), tokenizer, 4).next_sequences(1)
    with pytest.raises(HFSourceError, match="load_dataset"):
        HFTokenStream(hf_source(tmp_path / "missing.jsonl"), tokenizer, 4)
    # a misspelt text_field: given up after the first 1,000 records (it read the whole dataset first: hours for a hub
    # corpus), naming the fields the records have
    from cpt.data import hfstream

    path = write_jsonl(tmp_path / "c.jsonl", [{"content": f"doc {i}", "id": i} for i in range(1500)])
    s = HFTokenStream(hf_source(path), tokenizer, 4)
    with pytest.raises(HFSourceError, match=r"no usable text in field 'text' \(the first 1,000 records have no field "
                                            r"'text'\); its records have the fields content, id: set the source's text_field"):
        s.next_sequences(1)
    assert s.skipped["missing_field"] == hfstream._NO_FIELD_AFTER


def test_hf_stream_broken_record_is_one_error_not_a_traceback(tmp_path, tokenizer):
    """datasets' json reader cannot skip a malformed line: the pyarrow error escaped the trainer as a traceback."""
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "hello world"}, '{"text": "broken', {"text": "the river"}])
    with pytest.raises(HFSourceError, match=r"source 'web': reading 'json' .* failed: .*JSON.*`cpt prepare` it"):
        HFTokenStream(hf_source(path), tokenizer, 4).next_sequences(1)


def test_resume_with_a_shuffle_buffer_is_warned_about(tmp_path, tokenizer, caplog):
    """datasets does not save a shuffle buffer: a resume with one continues in another order, which was silent."""
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in make_docs(12, seed=24)])
    for buffer, warned in ((0, False), (4, True)):
        a = HFTokenStream(hf_source(path, shuffle_buffer=buffer), tokenizer, L, batch_docs=5)
        a.next_sequences(3)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="cpt.data"):
            HFTokenStream(hf_source(path, shuffle_buffer=buffer), tokenizer, L, batch_docs=5).load_state_dict(a.state_dict())
        assert ("resuming with shuffle_buffer 4" in caplog.text) == warned


# ------------------------------------------------------------------ BOS before each document, as the tokenizer does


def bos_tokenizer():
    """The data tests' tokenizer made to start every encoding with <bos>, as Llama 3's tokenizer.json does (its
    TemplateProcessing post-processor puts <|begin_of_text|> first)."""
    from tokenizers import processors

    from data_factories import make_tokenizer

    tok = make_tokenizer()
    bos = tok.convert_tokens_to_ids("<bos>")
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", bos)])
    assert tok("doc")["input_ids"][0] == bos
    return tok


def test_bos_follows_the_tokenizers_convention(tokenizer):
    from cpt.data.encode import bos_by_convention

    tok = bos_tokenizer()
    assert bos_by_convention(tok) == tok.bos_token_id
    assert bos_by_convention(tokenizer) is None  # has a BOS token, never adds it itself
    gpt2_like = bos_tokenizer()
    gpt2_like.bos_token = gpt2_like.eos_token  # one token for both: no BOS of its own
    assert bos_by_convention(gpt2_like) is None


def test_prepare_puts_bos_before_each_document_where_the_tokenizer_does(tmp_path, tokenizer, caplog):
    """Llama 3, Gemma and Mistral were pre-trained with BOS before every document, which `cpt prepare` left out
    unless told (--add-bos). By default it now follows the tokenizer: BOS + text + EOS where the tokenizer starts its
    own encodings with BOS (said in the log and the summary), text + EOS otherwise; --no-add-bos leaves it out; a
    folder prepared before with a tokenizer that adds none stays up to date."""
    from cpt.data.prepare_console import format_summary

    docs = make_docs(30, seed=31)
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in docs])
    tok = bos_tokenizer()
    bos, eos = tok.bos_token_id, tok.eos_token_id
    with caplog.at_level(logging.INFO, logger="cpt.data"):
        m = prepare([str(src)], tok, tmp_path / "b")
    assert "before each document, as the tokenizer starts every encoding with it" in caplog.text
    flat = TokenShards.open(tmp_path / "b").read(0, m["num_tokens"]).tolist()
    want = [t for d in docs for t in [bos, *tok(d, add_special_tokens=False)["input_ids"], eos]]
    assert flat == want
    assert f"BOS (id {bos}) + text + EOS (id {eos})" in format_summary(m, "b")
    m = prepare([str(src)], tok, tmp_path / "n", add_bos=False)
    assert TokenShards.open(tmp_path / "n").read(0, m["num_tokens"]).tolist() == expected_stream(tok, docs)
    # a tokenizer that adds no BOS: text + EOS, and a folder prepared with add_bos=False (the old default) is current
    prepare([str(src)], tokenizer, tmp_path / "p", add_bos=False)
    assert prepare([str(src)], tokenizer, tmp_path / "p")["up_to_date"]


def test_hf_stream_puts_bos_as_prepare_does_and_resumes_old_positions_without(tmp_path):
    docs = make_docs(20, seed=32)
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in docs])
    tok = bos_tokenizer()
    bos, eos = tok.bos_token_id, tok.eos_token_id
    want = [t for d in docs for t in [bos, *tok(d, add_special_tokens=False)["input_ids"], eos]]
    s = HFTokenStream(hf_source(path), tok, L, batch_docs=5)
    assert s.next_sequences(4).reshape(-1).tolist() == want[: 4 * L]
    no_bos = HFTokenStream(hf_source(path, add_bos=False), tok, L, batch_docs=5)
    assert no_bos.next_sequences(4).reshape(-1).tolist() == expected_stream(tok, docs)[: 4 * L]
    # a checkpoint from before BOS was recorded streamed without it: the resumed run goes on so, at the same tokens
    state = no_bos.state_dict()
    old = {k: v for k, v in state.items() if k != "bos_token_id"}
    resumed = HFTokenStream(hf_source(path), tok, L, batch_docs=5)
    resumed.load_state_dict(old)
    assert resumed.next_sequences(2).reshape(-1).tolist() == expected_stream(tok, docs)[4 * L: 6 * L]
    with pytest.raises(ValueError, match=r"streamed its documents without BOS .*\.add_bos: false"):
        HFTokenStream(hf_source(path, add_bos=True), tok, L, batch_docs=5).load_state_dict(state)
