"""MetricsLogger (JSONL and W&B offline, read back from the run files); throughput, FLOPs, MFU and the compute
account (cpt/throughput.py)."""

import glob
import json
import math
import struct
from pathlib import Path

import pytest

from cpt.config import validate
from cpt.metrics import METRICS_FILE, MetricsLogger, read_metrics
from cpt.throughput import Throughput, mfu, model_flops_per_token, peak_flops_for, peak_memory_gb


def make_cfg(wandb: bool = False, resume: bool = False, **wandb_kw):
    return validate({
        "run": {"name": "metrics-test"},
        "model": {"arch": {"model_type": "llama"}, "tokenizer": "tok"},
        "data": {"sources": [{"name": "new", "path": "new"}, {"name": "old", "path": "old", "replay": True}]},
        "stages": [{"name": "s1", "steps": 10, "mix": {"new": 3, "old": 1}}],
        "checkpoint": {"resume": resume},
        "logging": {"wandb": {"enabled": wandb, "mode": "offline", **wandb_kw}},
    })


class Rank:
    def __init__(self, main):
        self.is_main_process = main


def test_jsonl_always_written_with_step_and_tokens(tmp_path):
    lg = MetricsLogger(tmp_path, make_cfg())
    lg.log({"train/tokens": 0, "eval/a/loss": 4.5}, step=0)
    lg.log({"train/tokens": 128, "train/loss": 4.0, "perf/mfu": None}, step=1)
    with pytest.raises(ValueError, match="train/tokens"):
        lg.log({"train/loss": 3.0}, step=2)
    # flushed: readable before close
    recs = read_metrics(tmp_path)
    assert [(r["step"], r["train/tokens"]) for r in recs] == [(0, 0), (1, 128)]
    assert recs[0]["eval/a/loss"] == 4.5 and recs[1]["train/loss"] == 4.0 and recs[1]["perf/mfu"] is None
    lg.close()
    assert not (tmp_path / "wandb").exists()


def test_only_the_main_process_writes(tmp_path):
    lg = MetricsLogger(tmp_path / "r", make_cfg(wandb=True), accelerator=Rank(False))
    lg.log({"train/tokens": 1}, step=1)
    lg.close()
    assert not (tmp_path / "r").exists()


def test_resume_truncates_later_lines_and_new_run_moves_old_file_aside(tmp_path):
    lg = MetricsLogger(tmp_path, make_cfg())
    for s in range(6):
        lg.log({"train/tokens": 10 * s, "train/loss": 6.0 - s}, step=s)
    lg.close()
    # the run crashed after step 5; the last checkpoint is step 3
    lg = MetricsLogger(tmp_path, make_cfg(resume=True))
    assert lg.truncate_after(3) == 2
    lg.log({"train/tokens": 40, "train/loss": 1.5}, step=4)
    lg.close()
    recs = read_metrics(tmp_path)
    assert [r["step"] for r in recs] == [0, 1, 2, 3, 4]
    assert recs[-1]["train/loss"] == 1.5
    # a fresh run in the same directory does not mix its lines with the old ones
    lg = MetricsLogger(tmp_path, make_cfg(resume=False))
    lg.log({"train/tokens": 0}, step=0)
    lg.close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [0]
    assert len(read_metrics(tmp_path / f"{METRICS_FILE}.1")) == 5


# ---- W&B offline, read back from the binary run file


def read_wandb_records(run_file: Path):
    """Parse a .wandb file: a ':W&B' header then leveldb-log framed protobuf Records (32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = run_file.read_bytes()
    ident, magic, _version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1
    block, pos, buf, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            break
        payload = data[pos + 7:pos + 7 + length]
        if len(payload) < length:  # the writer is mid-record: what is on disk so far
            break
        pos += 7 + length
        buf = payload if kind in (1, 2) else buf + payload  # FULL/FIRST start a record
        if kind in (1, 4):  # FULL/LAST end it
            rec = pb.Record()
            rec.ParseFromString(buf)
            records.append(rec)
    return records


def finished_wandb_records(pattern: str, timeout: float = 60.0):
    """The records of the one offline run file matching ``pattern``, once its exit record is on disk: wandb's
    service process may still be writing for a moment after ``finish()`` returns on a loaded machine."""
    import time

    from google.protobuf.message import DecodeError

    deadline = time.monotonic() + timeout
    while True:
        files = glob.glob(pattern)
        try:
            records = read_wandb_records(Path(files[0])) if len(files) == 1 else []
        except DecodeError:  # a buffered write cut inside a record; the next read sees it whole
            if time.monotonic() > deadline:
                raise
            records = []
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            assert len(files) == 1, files
            return records
        time.sleep(0.2)


def history_rows(records):
    rows = []
    for r in records:
        if r.WhichOneof("record_type") == "history":
            rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
    return rows


def test_wandb_offline_run_holds_the_metrics_config_and_x_axis(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "local-abcdefghijklmnopqrstuvwxyz0123456789abcd")
    cfg = make_cfg(wandb=True, project="cpt-tests", group="grid", tags=["replay", "cosine"])
    lg = MetricsLogger(tmp_path, cfg)
    for s in range(4):
        lg.log({"train/tokens": 256 * s, "train/loss": 5.0 - s, "forgetting/old": 0.1 * s}, step=s)
    # a window of non-finite steps: null / 1e308 in metrics.jsonl, NaN / inf in W&B (it dropped them: its summary kept
    # the last finite loss of a run that diverged)
    import torch

    lg.log({"train/tokens": 1024, "train/loss": float("nan"), "train/grad_norm": torch.tensor(float("inf"))}, step=4)
    lg.close()
    assert read_metrics(tmp_path)[-1] | {"time": 0} == {"step": 4, "time": 0, "train/tokens": 1024, "train/loss": None,
                                                       "train/grad_norm": 1e308}

    records = finished_wandb_records(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    rows = [r for r in history_rows(records) if "train/loss" in r]
    assert [(r["step"], r["train/tokens"], r["train/loss"]) for r in rows[:4]] == [
        (s, 256 * s, 5.0 - s) for s in range(4)
    ]
    assert rows[4]["step"] == 4 and math.isnan(rows[4]["train/loss"]) and rows[4]["train/grad_norm"] == math.inf
    final = {u.key or "/".join(u.nested_key): json.loads(u.value_json)
             for r in records if r.WhichOneof("record_type") == "summary" for u in r.summary.update}
    assert math.isnan(final["train/loss"]), final  # (the run table's loss)
    assert rows[2]["forgetting/old"] == pytest.approx(0.2)
    metrics = [r.metric for r in records if r.WhichOneof("record_type") == "metric"]
    assert any(m.glob_name == "*" and m.step_metric == "train/tokens" for m in metrics)
    assert any(m.name == "train/tokens" for m in metrics)

    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run.project == "cpt-tests" and run.display_name == "metrics-test"
    assert run.run_group == "grid" and list(run.tags) == ["replay", "cosine"]
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert config["run"]["name"] == "metrics-test"
    assert config["data_mix"] == {"0:s1": {"new": 0.75, "old": 0.25}}
    mix_rows = [r for r in history_rows(records) if "data/mix/_type" in r]
    assert mix_rows and mix_rows[0]["data/mix/nrows"] == 2

    # resume continues the same W&B run id
    first_id = (tmp_path / "wandb_run_id").read_text()
    assert first_id == run.run_id
    lg = MetricsLogger(tmp_path, make_cfg(wandb=True, resume=True))
    assert lg.wandb_run.id == first_id
    lg.close()
    # the API key is never written into the run directory
    for p in tmp_path.rglob("*"):
        if p.is_file():
            assert b"abcdefghijklmnopqrstuvwxyz0123456789abcd" not in p.read_bytes(), p


def test_wandb_online_without_an_api_key_is_one_clear_error(tmp_path, monkeypatch):
    """W&B enabled in a batch job (no terminal) with no API key: wandb.init's UsageError used to end the run with a
    traceback; now one MetricsError line (a `cpt train: error:` line) that says what to do."""
    import wandb
    from wandb.sdk.lib.wbauth import unauthenticate_session

    from cpt.metrics import MetricsError

    for var in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setattr("sys.stdin", open("/dev/null"))
    wandb.teardown()  # wandb keeps the settings (WANDB_MODE=offline) and a key of earlier tests for the process
    unauthenticate_session()
    try:
        with pytest.raises(MetricsError, match=r"W&B could not start a run \(No API key.*WANDB_API_KEY.*mode: offline"):
            MetricsLogger(tmp_path / "run", make_cfg(wandb=True, mode=None))
    finally:
        wandb.teardown()  # the next test's wandb reads its environment afresh


def test_a_run_that_stops_with_an_error_is_failed_in_wandb(tmp_path):
    """The loop closes its logger as a context manager; a run ended by an error was marked finished (exit code 0)."""
    with pytest.raises(RuntimeError), MetricsLogger(tmp_path, make_cfg(wandb=True)) as lg:
        lg.log({"train/tokens": 0, "train/loss": 1.0}, step=0)
        raise RuntimeError("out of memory")
    records = finished_wandb_records(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert [r.exit.exit_code for r in records if r.WhichOneof("record_type") == "exit"] == [1]


def test_artifact_only_when_enabled(tmp_path):
    export = tmp_path / "export"
    export.mkdir()
    (export / "config.json").write_text("{}")
    lg = MetricsLogger(tmp_path / "a", make_cfg())
    assert lg.log_artifact(export, "final") is False
    lg.close()
    lg = MetricsLogger(tmp_path / "b", make_cfg(wandb=True, log_exports_as_artifacts=True))
    assert lg.log_artifact(export, "export step 10") is True
    lg.close()
    records = finished_wandb_records(str(tmp_path / "b" / "wandb" / "offline-run-*" / "run-*.wandb"))
    arts = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"]
    assert any(a.name == "export-step-10" and a.type == "model" for a in arts)


# ---- throughput, FLOPs, MFU


def test_flops_per_token_llm_foundry_convention():
    n, layers, d, L = 124_000_000, 12, 768, 1024
    # llm-foundry: (2*N*L + n_layers*2*2*d*L^2) * 3 FLOPs per sequence of L tokens
    per_seq = (2 * n * L + layers * 2 * 2 * d * L**2) * 3
    assert model_flops_per_token(n, layers, d, L) == pytest.approx(per_seq / L)
    assert model_flops_per_token(n, layers, d, L) == 6 * 124e6 + 12 * 12 * 768 * 1024


def test_flops_of_lora_and_frozen_weights_count_weight_gradients_for_trainable_parameters_only(tiny_cpt_data, tmp_path):
    """4N + 2 x trainable (+ attention): the backward computes the gradient wrt the activations through every
    weight, and wrt the weights only for trainable ones; a LoRA run's logged compute/flops follow it."""
    from conftest import Echo, tiny_run_config

    from cpt.config import load_config
    from cpt.metrics import read_metrics
    from cpt.model import build_model, load_tokenizer, model_shape, prepare_model
    from cpt.train import train

    n, layers, d, L = 1_000_000, 4, 128, 256
    attn = 12 * layers * d * L
    assert model_flops_per_token(n, layers, d, L, n_trainable=n) == model_flops_per_token(n, layers, d, L) == 6 * n + attn
    assert model_flops_per_token(n, layers, d, L, n_trainable=10_000) == 4 * n + 2 * 10_000 + attn
    cfg = tiny_run_config(tiny_cpt_data, tmp_path / "lora", model={"lora": {"r": 4, "alpha": 8}},
                          eval={"at_start": False}, checkpoint={"every": None})
    cfg["stages"][0]["steps"] = 3
    cfg["data"]["heldout"] = []
    run = load_config(base=cfg)
    tok = load_tokenizer(run.model)
    model = prepare_model(run.model, build_model(run.model, tok), tok, log_fn=lambda *a: None)[0]
    shape = model_shape(model)
    assert 0 < shape["n_trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad) < shape["n_params"] / 10
    train(run, echo=Echo())
    last = [r for r in read_metrics(tmp_path / "lora") if "compute/flops" in r][-1]
    fpt = model_flops_per_token(shape["n_params"], shape["n_layers"], shape["hidden"], run.data.seq_len, shape["n_trainable"])
    assert last["compute/flops"] == pytest.approx(3 * run.train.global_batch_size * run.data.seq_len * fpt, rel=1e-9)


def test_mfu_on_known_numbers():
    # 7B-like: 6*7e9 + 12*32*4096*4096 = 4.2e10 + 6.442e9 FLOPs/token; 3000 tok/s/GPU on an H100 SXM
    fpt = model_flops_per_token(7_000_000_000, 32, 4096, 4096)
    assert fpt == pytest.approx(4.8442450944e10)
    assert mfu(3000, fpt, 989e12) == pytest.approx(3000 * 4.8442450944e10 / 989e12)
    assert mfu(3000, fpt, 989e12) == pytest.approx(0.14694, rel=1e-4)
    assert mfu(3000, fpt, None) is None


@pytest.mark.parametrize("name,peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H200", 989e12), ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200 NVL", 835e12),
    ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA A10G", 125e12), ("NVIDIA L4", 121e12),
    ("NVIDIA L40S", 362e12), ("NVIDIA GeForce RTX 4090", 165e12), ("cpu", None), ("Some NPU", None),
])
def test_peak_flops_by_device_name(name, peak):
    assert peak_flops_for(name) == peak


def test_throughput_window_and_metrics():
    t = Throughput(num_devices=4, window=2)
    t.update(1000, 1.0)
    t.update(3000, 1.0)
    assert t.tokens_per_s == 2000 and t.tokens_per_s_per_device == 500
    t.update(5000, 2.0)  # the first update leaves the window
    assert t.tokens_per_s == pytest.approx(8000 / 3)
    m = t.metrics(flops_per_token=1e9, peak_flops=1e12)
    assert m["perf/mfu"] == pytest.approx((8000 / 3 / 4) * 1e9 / 1e12)
    assert m["perf/tflops_per_device"] == pytest.approx((8000 / 3 / 4) * 1e9 / 1e12)
    assert "perf/mfu" not in Throughput().metrics(flops_per_token=1e9)
    assert 0 < peak_memory_gb() < 1000


def test_compute_account_carries_totals_across_resumes():
    """Wall and device hours accumulate segment by segment (a resumed run may have another device count)."""
    from cpt.throughput import ComputeAccount, format_compute

    now = [100.0]
    clock = lambda: now[0]  # noqa: E731
    first = ComputeAccount(num_devices=8, clock=clock)
    now[0] += 1800  # half an hour on 8 devices
    m = first.metrics(tokens=1000, flops_per_token=2e9)
    assert m == {"compute/wall_hours": 0.5, "compute/device_hours": 4.0, "compute/flops": 2e12}
    state = first.state_dict()
    second = ComputeAccount(num_devices=2, clock=clock)  # resumed on 2 devices
    second.load_state_dict(state)
    now[0] += 3600
    m = second.metrics(tokens=3000, flops_per_token=2e9)
    assert m["compute/wall_hours"] == pytest.approx(1.5) and m["compute/device_hours"] == pytest.approx(6.0)
    assert m["compute/flops"] == 6e12
    assert "compute/flops" not in ComputeAccount(clock=clock).metrics(10)
    fresh = ComputeAccount(clock=clock)
    fresh.load_state_dict({})  # a checkpoint written before compute accounting existed
    assert fresh.metrics(0)["compute/device_hours"] == 0.0
    one_segment = {"compute/wall_hours": 0.5, "compute/device_hours": 4.0, "compute/flops": 2e12}
    assert format_compute(one_segment, 8) == "compute: 2e+12 training FLOPs, 4 device-hours (0.5 h wall on 8 devices)"
    # 1.5 h on 2 devices would be 3 device-hours: the line does not say the whole run was on 2
    assert format_compute(m, 2) == "compute: 6e+12 training FLOPs, 6 device-hours (1.5 h wall on 2 devices in this " \
        "segment, other numbers before)"
    with pytest.raises(ValueError):
        ComputeAccount(num_devices=0)


def test_wandb_resume_after_a_kill_sends_no_step_twice_and_nothing_back_in_tokens(tmp_path):
    """A run killed at step 5 (its step-5 evaluation not yet logged) resumes from its step-3 checkpoint and re-logs
    steps 4-5. The resumed segment continues the same W&B run and sends only what W&B lacks: the step-5 evaluation
    and the steps after 5, not the re-done rows (duplicates that ran backwards on the tokens axis), nor the start
    records (mix table at 0 tokens, parameter counts at the checkpoint's step). Together the two segments' W&B rows
    are metrics.jsonl's records, each once, in token order."""
    import time

    def train_rec(s):
        return {"train/tokens": 10 * s, "train/loss": 5.0 - 0.1 * s}

    def eval_rec(s):
        return {"train/tokens": 10 * s, "eval/old/loss": 4.0 + 0.01 * s}

    lg = MetricsLogger(tmp_path, make_cfg(wandb=True))
    lg.log({"train/tokens": 0, "params/trainable": 100}, step=0)
    lg.log(eval_rec(0), step=0)
    for s in range(1, 6):
        lg.log(train_rec(s), step=s)
        if s in (2, 4):
            lg.log(eval_rec(s), step=s)
            lg.log_samples([{"step": s, "prompt": "p", "completion": f"c{s}"}], 10 * s)
    lg.close()  # (killed after step 5's training record, before its evaluation)
    time.sleep(1.1)  # wandb names offline runs by the second they start

    lg = MetricsLogger(tmp_path, make_cfg(wandb=True, resume=True))
    assert lg.truncate_after(3) == 3
    lg.log({"train/tokens": 30, "params/trainable": 100}, step=3)
    for s in range(4, 8):
        lg.log(train_rec(s), step=s)
        if s in (4, 5, 6):
            lg.log(eval_rec(s), step=s)
            lg.log_samples([{"step": s, "prompt": "p", "completion": f"c{s}"}], 10 * s)
    lg.close()

    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and len({r.name.rsplit("-", 1)[1] for r in runs}) == 1  # one W&B run id
    first, second = (history_rows(finished_wandb_records(str(r / "run-*.wandb"))) for r in runs)
    assert not any("data/mix/_type" in row for row in second)
    # the samples table: step 4's re-done evaluation not sent again (it was, after a kill, before the resume); 6's is
    assert [(row["train/tokens"], row["samples/nrows"]) for row in first + second if "samples/_type" in row] == [
        (20, 1), (40, 2), (60, 4)]
    rows = [row for row in first + second if "data/mix/_type" not in row and "samples/_type" not in row]
    keyed = [(row["step"], tuple(sorted(k for k in row if not k.startswith("_")))) for row in rows]
    assert len(keyed) == len(set(keyed)), keyed  # no step logged twice
    tokens = [row["train/tokens"] for row in rows]
    assert tokens == sorted(tokens)
    jsonl = [{k: v for k, v in r.items() if k != "time"} for r in read_metrics(tmp_path)]
    jsonl = [r for r in jsonl if not (r["step"] == 3 and "params/trainable" in r)]  # (the resume's start record)
    assert sorted((r["step"], tuple(sorted(r))) for r in jsonl) == sorted(keyed)
    assert all(any(row.items() >= r.items() for row in rows) for r in jsonl)  # the same values


def test_wandb_resume_online_starts_after_the_last_step_the_server_holds(tmp_path, monkeypatch):
    """Online, W&B's own record of the earlier segment decides: a kill loses the rows W&B had not sent yet, and the
    resumed run's summary (the server's) names the last step it holds. Here metrics.jsonl reached step 5 but the
    server only step 4 (stood in for by the resumed run's summary): the resumed segment sends step 5 again, not 4."""
    import time

    import wandb

    lg = MetricsLogger(tmp_path, make_cfg(wandb=True))
    for s in range(6):
        lg.log({"train/tokens": 10 * s, "train/loss": 5.0 - s}, step=s)
    lg.close()
    time.sleep(1.1)  # wandb names offline runs by the second they start
    real_init = wandb.init

    def resumed_online(*args, **kwargs):
        run = real_init(*args, **kwargs)
        run.summary.update({"step": 4, "train/tokens": 40})  # what wandb.init(resume=...) reads from the server
        return run

    monkeypatch.setattr(wandb, "init", resumed_online)
    lg = MetricsLogger(tmp_path, make_cfg(wandb=True, resume=True))
    lg.truncate_after(2)
    for s in range(3, 8):
        lg.log({"train/tokens": 10 * s, "train/loss": 5.0 - s}, step=s)
    lg.close()
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    second = history_rows(finished_wandb_records(str(runs[-1] / "run-*.wandb")))
    assert [row["step"] for row in second if "train/loss" in row] == [5, 6, 7]


def test_samples_go_to_samples_jsonl_and_a_wandb_table_and_a_resume_drops_the_later_ones(tmp_path, monkeypatch):
    """eval.samples' rows (cpt/samples.py): appended to samples.jsonl; W&B gets the table "samples" of every row so far
    at each evaluation; a resume's truncate_after drops the rows past its checkpoint; a fresh run moves them aside
    with metrics.jsonl."""
    from cpt.samples import SAMPLES_FILE, read_samples

    monkeypatch.setenv("WANDB_API_KEY", "local-abcdefghijklmnopqrstuvwxyz0123456789abcd")
    lg = MetricsLogger(tmp_path, make_cfg(wandb=True))
    for s in (0, 5, 10):
        lg.log({"train/tokens": 100 * s, "eval/a/loss": 1.0}, step=s)
        lg.log_samples([{"step": s, "prompt": p, "completion": f"{p} at {s} é", "new_tokens": 3} for p in ("x", "y")], 100 * s)
    lg.close()
    rows = read_samples(tmp_path)
    assert [(r["step"], r["prompt"]) for r in rows] == [(s, p) for s in (0, 5, 10) for p in ("x", "y")]
    assert rows[-1]["completion"] == "y at 10 é"
    tables = [r for r in history_rows(finished_wandb_records(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb")))
              if "samples/_type" in r]
    assert [t["samples/nrows"] for t in tables] == [2, 4, 6]  # every row so far, at each evaluation
    lg = MetricsLogger(tmp_path, make_cfg(resume=True))
    lg.truncate_after(5)
    lg.close()
    assert [r["step"] for r in read_samples(tmp_path)] == [0, 0, 5, 5]
    MetricsLogger(tmp_path, make_cfg()).close()  # a fresh run in the same directory
    assert not (tmp_path / SAMPLES_FILE).exists() and (tmp_path / f"{SAMPLES_FILE}.1").exists()


def test_records_at_reads_the_last_steps_records_from_the_end(tmp_path):
    """metrics.records_at: the records of the log's last step, in file order, read back from the end only (a resume at
    a run's last step looks its final scores up there; it read the whole file); torn and non-record lines skipped."""
    from cpt.metrics import records_at

    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "train/tokens": s, "k": i}) for i, s in enumerate([1, 2, 2, 3])]
    path.write_text("\n".join([lines[0], "[1, 2]", lines[1], lines[2], lines[3], '{"step": 3, "lm_eval/a": 0.5}',
                               '{"step": 3, "tor']) + "\n")
    assert records_at(path, 3) == [{"step": 3, "train/tokens": 3, "k": 3}, {"step": 3, "lm_eval/a": 0.5}]
    path.write_text("\n".join(lines[:3]) + "\n")
    assert [r["k"] for r in records_at(path, 2)] == [1, 2] and records_at(path, 5) == []
