"""The mixer and CPTDataLoader: exact shares, stages and ramps, world-size independence, resume, metrics."""

from __future__ import annotations

import logging
import warnings
from fractions import Fraction

import numpy as np
import pytest
import torch

from cpt.data.loader import CPTDataLoader, RepeatedDataWarning, load_heldout
from cpt.data.mixer import Mixer, MixPlan
from cpt.data.prepare import prepare
from cpt.data.shards import ShardError
from cpt.data.sources import HeldoutConfig
from data_factories import data_config, make_docs, make_tokenizer, stage, tokenizer, write_jsonl  # noqa: F401

L = 8


def run_counts(stages, sources, B, steps):
    m = Mixer(MixPlan(stages, sources), B)
    return np.array([m.counts(s) for s in range(steps)])


def test_five_percent_replay_is_exact_over_every_20_steps():
    c = run_counts([stage(1000, {"new": 0.95, "old": 0.05})], ["new", "old"], 64, 1000)
    assert (c.sum(axis=1) == 64).all()
    assert c[:, 1].sum() == 3200 and set(c[:, 1]) == {3, 4}
    windows = np.convolve(c[:, 1], np.ones(20, dtype=int), mode="valid")
    assert (windows == 64).all()  # every 20 consecutive steps: exactly 5% of 1280 rows
    cum = np.cumsum(c[:, 1])
    target = 64 * 0.05 * np.arange(1, 1001)
    assert np.abs(cum - target).max() < 1


def test_three_equal_sources_are_exact():
    c = run_counts([stage(1000, {"a": 1, "b": 1, "c": 1})], ["a", "b", "c"], 64, 1000)
    assert (c.sum(axis=1) == 64).all()
    for j in range(3):
        windows = np.convolve(c[:, j], np.ones(3, dtype=int), mode="valid")
        assert (windows == 64).all()
        cum = np.cumsum(c[:, j]) * 3
        assert np.abs(cum - 64 * np.arange(1, 1001)).max() < 3  # within one row of 64/3 per step
    assert c[:, 0].sum() + c[:, 1].sum() + c[:, 2].sum() == 64000


def test_stages_and_ramps():
    stages = [stage(100, {"new": 0.9, "old": 0.1}), stage(50, {"new": 1, "old": 3}, ramp={"old": (0.1, 0.5)}),
              stage(30, {"other": 1.0})]
    plan = MixPlan(stages, ["new", "old", "other"])
    assert plan.starts == [0, 100, 150] and plan.stage_index(99) == 0 and plan.stage_index(100) == 1
    assert plan.shares(100) == [Fraction(9, 10), Fraction(1, 10), 0]
    assert plan.shares(149) == [Fraction(1, 2), Fraction(1, 2), 0]
    assert plan.shares(200) == [0, 0, 1]  # past the end: the last stage
    c = run_counts(stages, ["new", "old", "other"], 32, 180)
    assert c[:100, 1].sum() == 320 and (c[150:, 2] == 32).all()
    cum_target = np.cumsum([32 * float(plan.shares(s)[1]) for s in range(100, 150)])
    assert np.abs(np.cumsum(c[100:150, 1]) - cum_target).max() < 1  # the ramp is followed exactly
    with pytest.raises(ValueError, match="unknown sources"):
        MixPlan([stage(5, {"x": 1})], ["a"])


def test_mix_weights_and_ramps_are_checked_by_the_config():
    from pydantic import ValidationError

    # nan and inf passed, then failed in the mixer with a traceback (now every float setting refuses them)
    for bad, said in ((float("nan"), "finite number"), (float("inf"), "finite number"), (-0.1, "finite and not negative")):
        with pytest.raises(ValidationError, match=said):
            stage(5, {"a": bad, "b": 1})
    for ramp, problem in (({"a": (0.5, 1.5)}, r"in \[0, 1\]"), ({"a": (0.5, 0.5), "b": (0.2, 0.6)}, "end sum to more")):
        with pytest.raises(ValidationError, match=problem):  # (were the mixer's tracebacks, after the model loaded)
            stage(5, {"a": 1, "b": 1}, ramp=ramp)
    # every source ramped (or the others weighing 0): the shares must fill the batch at both ends (the mixer divided
    # them by their sum at each step: a constant 0.2 became 0.40 ... 0.67, not linear, silently)
    for mix in ({"a": 1, "b": 1}, {"a": 1, "b": 1, "c": 0}):
        with pytest.raises(ValidationError, match=r"ramped shares must sum to 1 at the start and at the end \(they "
                                                  r"sum to 0.5 and 0.3\)"):
            stage(5, mix, ramp={"a": (0.2, 0.2), "b": (0.3, 0.1)})
    st = stage(11, {"a": 1, "b": 1}, ramp={"a": (0.2, 0.6), "b": (0.8, 0.4)})  # (filling it: accepted)
    plan = MixPlan([st], ["a", "b"])
    assert [plan.shares(s) for s in (0, 10)] == [[Fraction(1, 5), Fraction(4, 5)], [Fraction(3, 5), Fraction(2, 5)]]
    from cpt.config.stages import format_mixes

    # the start-up line and --dry-run print what the ramp gives (they printed the mix weights: 50%, 50%)
    ramped = stage(5, {"a": 3, "b": 1}, ramp={"b": (0.6, 0.05)})
    assert format_mixes([ramped]) == ["stage 0 stage mix (first -> last step, mix_ramp): a 40.0% -> 95.0%, b 60.0% -> 5.0%"]
    # a 1-step stage trains its first step's shares only (the mixer's t = 0): it printed "-> 95.0%", never trained
    one = stage(1, {"a": 3, "b": 1}, ramp={"b": (0.6, 0.05)})
    assert MixPlan([one], ["a", "b"]).shares(0) == [Fraction(2, 5), Fraction(3, 5)]
    assert format_mixes([one]) == ["stage 0 stage mix: a 40.0%, b 60.0%"]


def test_mixer_state_round_trip():
    stages = [stage(37, {"a": 0.7, "b": 0.3}), stage(40, {"a": 0.2, "b": 0.8}, ramp={"a": (0.2, 0.05)})]
    full = run_counts(stages, ["a", "b"], 48, 77)
    m = Mixer(MixPlan(stages, ["a", "b"]), 48)
    for s in range(23):
        m.counts(s)
    m2 = Mixer(MixPlan(stages, ["a", "b"]), 48)
    m2.load_state_dict(m.state_dict())
    assert np.array([m2.counts(s) for s in range(23, 77)]).tolist() == full[23:].tolist()
    with pytest.raises(ValueError, match="expected step 77"):
        m2.counts(80)


# ------------------------------------------------------------------ the loader over real shards


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    tok = make_tokenizer()
    root = tmp_path_factory.mktemp("sources")
    for name, n, seed in (("new", 300, 31), ("old", 120, 32), ("tiny", 4, 33)):
        write_jsonl(root / f"{name}.jsonl", [{"text": d} for d in make_docs(n, seed=seed)])
        prepare([str(root / f"{name}.jsonl")], tok, root / name, shard_tokens=1500, heldout_docs=3 if n > 10 else None)
    return root


def cfg(root, **kw):
    return data_config([{"name": "new", "path": str(root / "new")}, {"name": "old", "path": str(root / "old"), "replay": True},
                        {"name": "tiny", "path": str(root / "tiny")}], seq_len=L, **kw)


STAGES = [stage(20, {"new": 0.75, "old": 0.25}), stage(30, {"new": 0.5, "old": 0.2, "tiny": 0.3}, ramp={"old": (0.2, 0.4)})]


def batches(loader, start, stop):
    return [loader.batch(s) for s in range(start, stop)]


def global_batches(root, tok, world, start, stop, state=None, B=16):
    """Global batches [start, stop) assembled from `world` ranks (each optionally resumed from `state`)."""
    ranks = []
    for r in range(world):
        ld = CPTDataLoader(cfg(root), STAGES, tok, B, seed=9, rank=r, world_size=world)
        if state is not None:
            ld.load_state_dict(state)
        ranks.append(batches(ld, start, stop))
    return [{k: torch.cat([ranks[r][i][k] for r in range(world)]) for k in ("input_ids", "source")}
            for i in range(stop - start)]


def test_global_batches_do_not_depend_on_world_size(sources, tokenizer):
    one = global_batches(sources, tokenizer, 1, 0, 50)
    for world in (2, 4):
        other = global_batches(sources, tokenizer, world, 0, 50)
        assert len(one) == len(other) == 50
        assert all(torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["source"], b["source"]) for a, b in zip(one, other))
    assert one[0]["input_ids"].shape == (16, L) and one[0]["input_ids"].dtype == torch.long
    assert [int((b["source"] == 1).sum()) for b in one[:20]] == [4] * 20  # 25% of 16
    plan = MixPlan(STAGES, ["new", "old", "tiny"])  # stage 2: old ramps 0.2 -> 0.4, new and tiny share the rest 5:3
    target = sum(16 * plan.shares(s)[2] for s in range(20, 50))
    assert abs(int(torch.cat([b["source"] for b in one[20:]]).eq(2).sum()) - target) < 1


def test_resume_at_any_step_and_across_world_sizes(sources, tokenizer):
    full = global_batches(sources, tokenizer, 1, 0, 50)
    for k, world in ((13, 1), (20, 2), (31, 4)):
        ld = CPTDataLoader(cfg(sources), STAGES, tokenizer, 16, seed=9, rank=0, world_size=2)
        batches(ld, 0, k)  # a 2-rank run saved at step k ...
        resumed = global_batches(sources, tokenizer, world, k, 50, state=ld.state_dict())  # ... resumed on `world` ranks
        assert len(resumed) == len(full) - k == 50 - k, (k, world)
        assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(full[k:], resumed)), (k, world)


def test_ranks_are_disjoint_and_a_full_share_covers_every_sequence(sources, tokenizer):
    from collections import Counter

    from cpt.data.stream import PackedStream

    stages = [stage(100, {"old": 1.0})]
    lds = [CPTDataLoader(cfg(sources), stages, tokenizer, 8, seed=1, rank=r, world_size=2) for r in range(2)]
    shards = lds[0].streams[0].shards
    n = lds[0].streams[0].num_sequences
    steps = -(-n // 8)  # one epoch, rounded up to whole batches
    rows = [torch.cat([ld.batch(s)["input_ids"] for s in range(steps)]) for ld in lds]
    ref = PackedStream(shards, L, seed=1, name="old")
    ids = ref.sequence_ids(np.arange(steps * 8))
    assert sorted(ids[:n].tolist()) == list(range(n))  # the first n positions are every sequence once
    expected = Counter(tuple(shards.read(i * L, L).tolist()) for i in ids)
    got = Counter(tuple(r) for r in torch.cat(rows).tolist())
    assert got == expected  # the two ranks together: exactly those sequences, each as often as its position says
    # and the ranks' rows are disjoint slices of the same global batches
    single = CPTDataLoader(cfg(sources), stages, tokenizer, 8, seed=1)
    for s in range(steps):
        g = single.batch(s)["input_ids"]
        assert torch.equal(g[:4], rows[0][4 * s : 4 * s + 4]) and torch.equal(g[4:], rows[1][4 * s : 4 * s + 4])


def test_metrics_tokens_shares_epochs_and_repeat_warning(sources, tokenizer):
    ld = CPTDataLoader(cfg(sources, max_epochs_warning=1.5), STAGES, tokenizer, 16, seed=9)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches(ld, 0, 50)
    m = ld.metrics()
    assert set(m) == {f"data/{k}/{s}" for k in ("tokens", "share", "realised_share", "epochs") for s in ("new", "old", "tiny")}
    assert m["data/tokens/new"] + m["data/tokens/old"] + m["data/tokens/tiny"] == 50 * 16 * L
    assert m["data/share/old"] == pytest.approx(0.4) and m["data/share/tiny"] == pytest.approx(0.6 * 3 / 8)
    # realised shares: cumulative over all rows served, from the exact row counts (not the last step's target)
    for s in ("new", "old", "tiny"):
        assert m[f"data/realised_share/{s}"] == pytest.approx(m[f"data/tokens/{s}"] / (50 * 16 * L))
    assert m["data/realised_share/tiny"] != pytest.approx(m["data/share/tiny"])  # stage 0 had no tiny rows
    tiny = ld.streams[2]
    assert m["data/epochs/tiny"] == pytest.approx(m["data/tokens/tiny"] / L / tiny.num_sequences) and m["data/epochs/tiny"] > 1.5
    repeated = [w for w in caught if issubclass(w.category, RepeatedDataWarning)]
    assert len(repeated) == 1 and "'tiny'" in str(repeated[0].message)
    state = ld.state_dict()
    ld2 = CPTDataLoader(cfg(sources, max_epochs_warning=1.5), STAGES + [stage(10, {"tiny": 1})], tokenizer, 16, seed=9)
    ld2.load_state_dict(state)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches(ld2, 50, 55)
    assert not [w for w in caught if issubclass(w.category, RepeatedDataWarning)]  # warned once, also after resume
    assert ld2.metrics()["data/tokens/tiny"] == m["data/tokens/tiny"] + 5 * 16 * L


def test_fingerprint_and_tokenizer_mismatch(sources, tokenizer):
    a = CPTDataLoader(cfg(sources), STAGES, tokenizer, 16, seed=9)
    assert a.fingerprint() == CPTDataLoader(cfg(sources), STAGES, tokenizer, 16, seed=9, rank=1, world_size=2).fingerprint()
    shorter = data_config([{"name": n, "path": str(sources / n)} for n in ("new", "old", "tiny")], seq_len=4)
    assert a.fingerprint() != CPTDataLoader(shorter, STAGES, tokenizer, 16, seed=9).fingerprint()
    swapped = data_config([{"name": n, "path": str(sources / p)} for n, p in (("new", "old"), ("old", "new"), ("tiny", "tiny"))], seq_len=L)
    assert a.fingerprint() != CPTDataLoader(swapped, STAGES, tokenizer, 16, seed=9).fingerprint()
    other = make_tokenizer(vocab_size=300)
    other.name_or_path = "/models/other-tokenizer"  # the run's tokenizer is named too, not only its hash
    with pytest.raises(ShardError, match=r"data source 'new'.*vocabulary hash sha256:\w+.*tokenizer "
                                         r"'/models/other-tokenizer' has vocabulary hash sha256:\w+"):
        CPTDataLoader(cfg(sources), STAGES, other, 16, seed=9)
    with pytest.raises(ValueError, match="divisible by world_size"):
        CPTDataLoader(cfg(sources), STAGES, tokenizer, 15, seed=9, world_size=2)


def test_a_source_added_on_resume_starts_at_zero_and_the_others_continue(sources, tokenizer):
    """A long run whose plan grows: stage 2 mixes in a source stage 1 never read (config appended, resumed with
    --allow-config-change). The checkpoint's sources keep their positions (matched by name, wherever they stand in
    data.sources), the new one starts at its beginning; a source whose data changed, data.seq_len or run.seed are
    refused by name (the stream would not continue). The old loader refused any of it as one opaque fingerprint."""
    one = data_config([{"name": "new", "path": str(sources / "new")}, {"name": "old", "path": str(sources / "old")}], seq_len=L)
    first = [stage(6, {"new": 0.75, "old": 0.25})]
    a = CPTDataLoader(one, first, tokenizer, 8, seed=9)
    batches(a, 0, 4)
    state = a.state_dict()
    uninterrupted = batches(a, 4, 6)
    grown = cfg(sources)  # new, old, tiny: "tiny" is new since the checkpoint
    plan = first + [stage(4, {"new": 0.5, "tiny": 0.5})]
    b = CPTDataLoader(grown, plan, tokenizer, 8, seed=9)
    b.load_state_dict(state)
    for x, y in zip(uninterrupted, batches(b, 4, 6)):  # stage 1 goes on exactly
        assert torch.equal(x["input_ids"], y["input_ids"])
    assert b.positions == [a.positions[0], a.positions[1], 0]
    nxt = b.batch(6)  # stage 2: new continues after position 30, tiny from 0
    tiny = b.streams[2].sequences(np.arange(4))
    assert torch.equal(nxt["input_ids"][nxt["source"] == 2], torch.from_numpy(tiny.astype(np.int64)))
    assert b.metrics()["data/tokens/tiny"] == 4 * L and b.metrics()["data/tokens/old"] == a.metrics()["data/tokens/old"]
    assert b.positions == [a.positions[0] + 4, a.positions[1], 4]
    moved = data_config([{"name": "new", "path": str(sources / "tiny")}, {"name": "old", "path": str(sources / "old")}], seq_len=L)
    with pytest.raises(ValueError, match=r"data source 'new' \(.*tiny\) is not the data the checkpoint read: \d+ shards, "
                                         r"[\d,]+ tokens, .* then, 1 shards, [\d,]+ tokens, 4 documents.* now"):
        CPTDataLoader(moved, first, tokenizer, 8, seed=9).load_state_dict(state)
    with pytest.raises(ValueError, match=r"data.seq_len 8 -> 4 .*; run.seed 9 -> 3 "):
        CPTDataLoader(data_config(one.model_dump()["sources"], seq_len=4), first, tokenizer, 8, seed=3).load_state_dict(state)
    with pytest.raises(ValueError, match="data source 'old' of the checkpoint is not in this run's stages "
                                         r"\(its position, 8 sequences read"):
        CPTDataLoader(one, [stage(6, {"new": 1})], tokenizer, 8, seed=9).load_state_dict(state)
    unread = CPTDataLoader(grown, plan, tokenizer, 8, seed=9)  # a source the checkpoint never read may be left out:
    batches(unread, 0, 2)                                      # e.g. an anneal branch given the stages up to its own
    CPTDataLoader(one, first, tokenizer, 8, seed=9).load_state_dict(unread.state_dict())
    # a new stage from that checkpoint (train.init_from) starts every source over: said, since it repeats data
    notes = CPTDataLoader(grown, plan, tokenizer, 8, seed=9).start_over_notes(state)
    assert len(notes) == 2 and f"'new' starts over: the checkpoint's run read {6 * 4} of its" in notes[0]
    assert "reads those 24 sequences first, in the same order (same run.seed)" in notes[0]
    assert "another order" in CPTDataLoader(one, first, tokenizer, 8, seed=1).start_over_notes(state)[1]


def test_a_shard_replaced_by_one_of_the_same_size_is_found_on_resume(sources, tokenizer, tmp_path, caplog):
    """The start-up checks compare file sizes (no shard bytes are read): a shard replaced by hand with one of the
    same size resumed onto other tokens at the saved position. Files modified since the checkpoint's run opened
    them are now checksummed on resume (a few; many, as after a copy, are a warning): no read otherwise."""
    import os
    import shutil

    src = tmp_path / "new"
    shutil.copytree(sources / "new", src)
    dc = data_config([{"name": "new", "path": str(src)}, {"name": "old", "path": str(sources / "old")}], seq_len=L)
    st = [stage(6, {"new": 0.75, "old": 0.25})]
    a = CPTDataLoader(dc, st, tokenizer, 8, seed=9)
    batches(a, 0, 3)
    state = json_round_trip(a.state_dict())
    later = os.stat(src / "shard_00001.bin").st_mtime_ns + 10**9
    os.utime(src / "shard_00001.bin", ns=(later, later))  # touched, same bytes: fine
    CPTDataLoader(dc, st, tokenizer, 8, seed=9).load_state_dict(state)
    (src / "shard_00001.bin").write_bytes((src / "shard_00000.bin").read_bytes())  # same size, other tokens
    os.utime(src / "shard_00001.bin", ns=(later, later))
    with pytest.raises(ValueError, match=r"data source 'new' \(.*\): checksum mismatch for shard_00001.bin"):
        CPTDataLoader(dc, st, tokenizer, 8, seed=9).load_state_dict(state)
    shutil.copyfile(sources / "new" / "shard_00001.bin", src / "shard_00001.bin")
    for f in src.iterdir():  # a copy of the whole folder: listed, not read
        os.utime(f, ns=(later, later))
    CPTDataLoader(dc, st, tokenizer, 8, seed=9).load_state_dict(state)
    assert "files modified since the checkpoint's run started (copied?)" in caplog.text


def json_round_trip(d):
    import json

    return json.loads(json.dumps(d))


def test_hf_source_in_the_loader_is_world_size_independent_and_resumable(sources, tokenizer, tmp_path):
    write_jsonl(tmp_path / "web.jsonl", [{"text": d} for d in make_docs(30, seed=34)])
    dc = data_config([{"name": "new", "path": str(sources / "new")},
                      {"name": "web", "type": "hf", "path": "json", "data_files": str(tmp_path / "web.jsonl")}], seq_len=L)
    st = [stage(40, {"new": 0.5, "web": 0.5})]

    def run(world, start, stop, state=None):
        out = []
        for r in range(world):
            ld = CPTDataLoader(dc, st, tokenizer, 8, seed=2, rank=r, world_size=world)
            if state:
                ld.load_state_dict(state)
            out.append(torch.cat([ld.batch(s)["input_ids"] for s in range(start, stop)]))
        return torch.cat([o.view(stop - start, -1, L) for o in out], dim=1)

    full = run(1, 0, 25)
    assert torch.equal(full, run(2, 0, 25))
    ld = CPTDataLoader(dc, st, tokenizer, 8, seed=2)
    for s in range(11):
        ld.batch(s)
    assert torch.equal(full[11:], run(2, 11, 25, ld.state_dict()))


def test_hf_source_moved_to_another_folder_resumes(sources, tokenizer, tmp_path):
    """A local `type: hf` source was known by its path: a run whose data was copied elsewhere (another cluster's file
    system) was refused on resume ("not the data the checkpoint read"). Now its files are compared by name under their
    folder and size; a checkpoint written with the path-keyed identity still resumes; other files are still refused."""
    import shutil

    (tmp_path / "a").mkdir()
    write_jsonl(tmp_path / "a" / "web.jsonl", [{"text": d} for d in make_docs(30, seed=35)])

    def loader(folder):
        dc = data_config([{"name": "new", "path": str(sources / "new")},
                          {"name": "web", "type": "hf", "path": "json", "data_files": str(folder / "web.jsonl")}], seq_len=L)
        return CPTDataLoader(dc, [stage(40, {"new": 0.5, "web": 0.5})], tokenizer, 8, seed=2)

    ld = loader(tmp_path / "a")
    for s in range(5):
        ld.batch(s)
    state, want = json_round_trip(ld.state_dict()), ld.batch(5)["input_ids"]
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    moved = loader(tmp_path / "b")
    moved.load_state_dict(state)
    assert torch.equal(moved.batch(5)["input_ids"], want)
    old = json_round_trip(state)  # as written before: identity = the path-keyed fingerprint
    old["source_data"]["web"] = {"fingerprint": ld.streams[1].path_fingerprint(), "about": "x"}
    again = loader(tmp_path / "a")
    again.load_state_dict(old)
    assert torch.equal(again.batch(5)["input_ids"], want)
    with open(tmp_path / "b" / "web.jsonl", "a") as f:
        f.write('{"text": "one more document"}\n')
    with pytest.raises(ValueError, match="its files changed since the checkpoint"):
        loader(tmp_path / "b").load_state_dict(state)


def test_load_heldout(sources, tokenizer):
    from cpt.data.shards import TokenShards

    h = HeldoutConfig(name="old", path=str(sources / "old" / "heldout"), tag="upstream")
    shards = TokenShards.open(h.path)
    x = load_heldout(h, tokenizer, L, max_tokens=40)
    assert x.shape == (5, L) and x.dtype == torch.long
    full = load_heldout(h, tokenizer, L, max_tokens=None)
    assert full.shape[0] == shards.num_tokens // L
    assert full.reshape(-1).tolist() == shards.read(0, full.numel()).tolist()  # the whole set: in document order
    assert torch.equal(load_heldout(h, tokenizer, L, max_tokens=10**9), full)
    assert load_heldout(h.model_copy(update={"max_tokens": 16}), tokenizer, L, max_tokens=40).shape == (2, L)
    with pytest.raises(ValueError, match="fewer than one sequence"):
        load_heldout(h, tokenizer, 100000, max_tokens=None)
    # a budget below one sequence: the message named the set's size ("has 900 tokens, fewer than one sequence of 8")
    with pytest.raises(ValueError, match=rf"held-out set 'old': its budget of 5 tokens \(eval.tokens_per_set\) is less "
                                         rf"than one sequence of {L}"):
        load_heldout(h, tokenizer, L, max_tokens=5)
    with pytest.raises(ValueError, match=r"budget of 3 tokens \(max_tokens\)"):
        load_heldout(h.model_copy(update={"max_tokens": 3}), tokenizer, L, max_tokens=1000)
    with pytest.raises(ShardError, match="held-out set 'old'.*vocabulary hash"):
        load_heldout(h, make_tokenizer(vocab_size=300), L, 40)


def test_zero_share_sources_and_unused_sources(sources, tokenizer):
    ld = CPTDataLoader(cfg(sources), [stage(5, {"new": 1.0, "old": 0.0})], tokenizer, 8, seed=0)
    assert ld.source_names == ["new", "old"]  # "tiny" is in no stage: not opened
    assert all((ld.batch(s)["source"] == 0).all() for s in range(5))
    assert ld.metrics()["data/tokens/old"] == 0 and ld.metrics()["data/share/old"] == 0
    with pytest.raises(ValueError, match="unknown sources"):
        CPTDataLoader(cfg(sources), [stage(5, {"nope": 1.0})], tokenizer, 8, seed=0)


def test_heldout_sample_is_whole_documents_across_the_set(tmp_path, tokenizer):
    """A budget smaller than the set: a seeded sample of whole documents from all over the set (not its start),
    the same at every call, concatenated in document order; the coverage is reported."""
    import numpy as np

    from cpt.data.loader import sample_heldout
    from cpt.data.shards import TokenShards

    write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in make_docs(200, seed=5)])
    prepare([str(tmp_path / "d.jsonl")], tokenizer, tmp_path / "p", shard_tokens=700, heldout_docs=60)
    h = HeldoutConfig(name="set", path=str(tmp_path / "p" / "heldout"), tag="upstream")
    shards = TokenShards.open(h.path)
    starts = np.append(shards.document_starts(), shards.num_tokens)
    docs = [shards.read(int(a), int(b - a)).tolist() for a, b in zip(starts[:-1], starts[1:])]
    budget = shards.num_tokens // 3
    s = sample_heldout(h, tokenizer, L, budget)
    assert s.total_docs == 60 and s.total_tokens == shards.num_tokens and not s.whole
    assert s.num_tokens == (budget // L) * L and s.tokens.shape == (budget // L, L)
    assert torch.equal(sample_heldout(h, tokenizer, L, budget).tokens, s.tokens)  # the same sample every time
    flat = s.tokens.reshape(-1).tolist()
    # the flat tokens are documents in document order, each whole or (at most two of them) a prefix
    picked, cut, pos = [], 0, 0
    for i, d in enumerate(docs):
        if pos >= len(flat):
            break
        if flat[pos:pos + len(d)] == d:
            picked.append(i)
            pos += len(d)
            continue
        for m in range(len(d) - 1, 0, -1):  # a prefix of it (the last document drawn, cut at the budget)
            if flat[pos:pos + m] == d[:m] and (pos + m == len(flat) or flat[pos + m:pos + m + 3] in [e[:3] for e in docs[i + 1:]]):
                picked.append(i)
                pos += m
                cut += 1
                break
    assert pos == len(flat) and len(picked) == s.docs and cut <= 2
    assert picked[-1] > 30 and picked != list(range(len(picked)))  # spread over the set, not its first documents
    other = sample_heldout(h, tokenizer, L, budget, seed=1)
    assert not torch.equal(other.tokens, s.tokens)  # another seed, another sample
    whole = sample_heldout(h, tokenizer, L, None)
    assert whole.whole and "the whole set" in whole.describe()
    # documents with an evaluated token: the tail shorter than a row is dropped (a document there was counted)
    evaluated = whole.tokens.numel()
    assert whole.docs == int((starts[:-1] < evaluated).sum()) and (evaluated == shards.num_tokens or
                                                                   "but its last" in whole.describe())
    assert f"of {shards.num_tokens:,} tokens, {s.docs} of 60 documents" in s.describe()


def test_cpt_eval_uses_the_same_sample_and_reports_coverage(sources, tokenizer):
    from cpt.commands.eval import load_heldout_tokens
    from cpt.data.loader import sample_heldout

    path = str(sources / "old" / "heldout")
    toks, covered = load_heldout_tokens("old", path, "upstream", tokenizer, L, 40)
    s = sample_heldout(HeldoutConfig(name="old", path=path, tag="upstream"), tokenizer, L, 40)
    assert torch.equal(toks, s.tokens)  # the sample training's evaluation takes (eval.sample_seed 0)
    assert covered["tokens"] == 40 and covered["docs"] == s.docs and covered["total_docs"] == 3
    assert covered["coverage"] == s.describe()


def test_a_held_out_set_that_is_a_training_source_is_warned_about(sources, tokenizer, caplog):
    """Pointing data.heldout at a source's folder instead of its heldout/ split evaluated on training data, silently."""
    from cpt.data.loader import folder_overlaps

    held = [{"name": "new", "path": str(sources / "new" / "heldout"), "tag": "downstream"},
            {"name": "old-train", "path": str(sources / "old") + "/", "tag": "upstream"}]
    dc = cfg(sources, heldout=held)
    assert len(folder_overlaps(dc)) == 1 and "'old-train' is the folder of training source 'old'" in folder_overlaps(dc)[0]
    with caplog.at_level(logging.WARNING, logger="cpt.data"):
        CPTDataLoader(dc, STAGES, tokenizer, 8, seed=0)
    assert sum("memorisation" in r.getMessage() for r in caplog.records) == 1
    assert folder_overlaps(cfg(sources, heldout=held[:1])) == []


def test_two_sources_reading_one_folder_are_warned_about(sources, tokenizer, caplog):
    dc = data_config([{"name": "new", "path": str(sources / "new")}, {"name": "old", "path": str(sources / "old")},
                      {"name": "again", "path": str(sources / "new") + "/"}], seq_len=L)
    with caplog.at_level(logging.WARNING, logger="cpt.data"):
        CPTDataLoader(dc, [stage(5, {"new": 1, "old": 1, "again": 1})], tokenizer, 8, seed=0)
        CPTDataLoader(dc, [stage(5, {"new": 1, "old": 1})], tokenizer, 8, seed=0)  # 'again' unused: no warning
    assert [r.getMessage()[:51] for r in caplog.records if "same folder" in r.getMessage()] == [
        "data sources 'new' and 'again' read the same folder"]


def test_verify_checksums_is_shared_by_the_ranks(sources, tokenizer, tmp_path):
    """`data.verify_checksums: true` read every byte of every source on rank 0 alone, while the other ranks waited in
    their first collective (a large corpus could outlast train.distributed_timeout_s). Now each rank checksums every
    W-th file (and the sizes of all): a bad file is refused by the rank that reads it (it stops the run:
    cpt/rank_failure.py), and together the ranks read each file once."""
    import shutil

    from cpt.data.shards import TokenShards

    root = tmp_path / "s"
    shutil.copytree(sources / "new", root / "new")
    shutil.copytree(sources / "old", root / "old")
    dc = data_config([{"name": "new", "path": str(root / "new")}, {"name": "old", "path": str(root / "old")}],
                     seq_len=L, verify_checksums=True)
    st = [stage(6, {"new": 0.75, "old": 0.25})]
    files = [name for name, _, _ in TokenShards.open(root / "new").expected_files()]
    assert len(files) >= 4
    bad = root / "new" / files[3]  # the 4th file: rank 1's of 2
    raw = bytearray(bad.read_bytes())
    raw[0] ^= 1
    bad.write_bytes(bytes(raw))
    CPTDataLoader(dc, st, tokenizer, 8, seed=9, rank=0, world_size=2)  # not rank 0's to read
    with pytest.raises(ShardError, match=f"data source 'new'.*checksum mismatch for {files[3]}"):
        CPTDataLoader(dc, st, tokenizer, 8, seed=9, rank=1, world_size=2)
    with pytest.raises(ShardError, match=f"checksum mismatch for {files[3]}"):
        CPTDataLoader(dc, st, tokenizer, 8, seed=9)  # one process reads them all


def test_a_corrupt_sequence_read_by_one_rank_stops_that_rank_naming_the_file(sources, tokenizer, tmp_path):
    """Bytes of a shard corrupted after `cpt prepare` (same size: the start-up size check passes) into ids past the
    vocabulary: the rank that reads them stopped with an embedding IndexError naming nothing (on GPUs a device-side
    assert). Now its batch is refused with a ShardError naming the source, the file and where; the other rank,
    which never reads that sequence, is unaffected (it learns of the failure from the launcher: cpt/rank_failure.py)."""
    src = tmp_path / "new"  # the "new" corpus in one shard file
    write_jsonl(tmp_path / "new.jsonl", [{"text": d} for d in make_docs(300, seed=31)])
    prepare([str(tmp_path / "new.jsonl")], tokenizer, src, shard_tokens=10**6)
    dc = data_config([{"name": "new", "path": str(src)}, {"name": "old", "path": str(sources / "old")}], seq_len=L)
    st = [stage(6, {"new": 0.75, "old": 0.25})]

    def first_batch_reads(rank):  # the "new" sequences a rank reads in its first batch
        ld = CPTDataLoader(dc, st, tokenizer, 8, seed=9, rank=rank, world_size=2)
        read, stream = [], ld.streams[0]
        stream.sequences = lambda pos, out=None, rows=None, f=stream.sequences: read.extend(stream.sequence_ids(pos)) or f(pos, out, rows)
        ld.batch(0)
        return set(map(int, read)), stream

    (mine, stream), (theirs, _) = first_batch_reads(1), first_batch_reads(0)
    seq = min(mine - theirs)
    a = np.memmap(src / "shard_00000.bin", dtype=stream.shards.dtype, mode="r+")
    a[seq * L + 5] = len(tokenizer) + 7
    a.flush()
    del a
    ranks = [CPTDataLoader(dc, st, tokenizer, 8, seed=9, rank=r, world_size=2) for r in range(2)]
    assert ranks[0].batch(0)["input_ids"].max() < len(tokenizer)  # rank 0 reads other sequences
    with pytest.raises(ShardError, match=rf"data source 'new' \({src}\): token id {len(tokenizer) + 7} in shard_00000.bin "
                                         rf"\(tokens {seq * L:,}..\+{L}\) is outside the tokenizer's vocabulary"):
        ranks[1].batch(0)


def test_a_tokenizer_with_gaps_in_its_ids_is_not_taken_for_corrupt_data(tmp_path):
    """A tokenizer whose ids have gaps (an id past its length, as cpt.data.tokenizer_identity.vocab_size allows for) tokenizes
    text into ids >= len(tokenizer): the per-batch id check bounds them by the largest id, not the length (which
    stopped the run calling the freshly prepared shard corrupt)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"[UNK]": 0, "</s>": 1, "a": 2, "b": 3, "far": 70}
    backend = Tokenizer(models.WordLevel(words, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="[UNK]")
    assert len(tok) == 5 and tok("far")["input_ids"] == [70]
    write_jsonl(tmp_path / "d.jsonl", [{"text": " ".join(["a", "far", "b"] * (7 + i))} for i in range(40)])
    prepare([str(tmp_path / "d.jsonl")], tok, tmp_path / "src", shard_tokens=10**6)
    dc = data_config([{"name": "d", "path": str(tmp_path / "src")}], seq_len=L)
    batch = CPTDataLoader(dc, [stage(2, {"d": 1.0})], tok, 4, seed=0).batch(0)["input_ids"]
    assert int(batch.max()) == 70
