"""EMA (cpt/ema.py), checkpoint averaging and base-CPT interpolation (cpt/averaging.py, `cpt average`, `cpt interpolate`)."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from conftest import tiny_llama, tiny_tokenizer
from cpt.averaging import (
    average_checkpoints,
    format_sweep,
    interpolate,
    interpolate_state_dicts,
    interpolation_sweep,
)
from cpt.ema import EMA


def tiny_model(seed, vocab=64):
    return tiny_llama(vocab, seed=seed, training=False)


def save(model, d, tok=True):
    model.save_pretrained(d)
    if tok:
        tiny_tokenizer(["hello world"] * 5, 64, byte_alphabet=False).save_pretrained(d)
    return d


# ----------------------------------------------------------------------------- EMA


def test_ema_math_on_known_values():
    lin = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 2.0]]))
    ema = EMA(lin, decay=0.5)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[3.0, 6.0]]))
    ema.update(lin)  # 0.5 * [1, 2] + 0.5 * [3, 6]
    torch.testing.assert_close(ema.shadow["weight"], torch.tensor([[2.0, 4.0]]))
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.0, 0.0]]))
    ema.update(lin)
    torch.testing.assert_close(ema.shadow["weight"], torch.tensor([[1.0, 2.0]]))
    assert ema.num_updates == 2


def test_ema_warmup_and_trainable_only_and_fp32_shadow():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)).to(torch.bfloat16)
    model[0].requires_grad_(False)
    ema = EMA(model, decay=0.999, warmup=True)
    assert set(ema.shadow) == {"1.weight", "1.bias"}
    assert all(t.dtype == torch.float32 for t in ema.shadow.values())
    assert ema.current_decay() == pytest.approx(0.1)  # (1 + 0) / (10 + 0)
    before = ema.shadow["1.weight"].clone()
    with torch.no_grad():
        model[1].weight.add_(1.0)
    ema.update(model)
    torch.testing.assert_close(ema.shadow["1.weight"], 0.1 * before + 0.9 * model[1].weight.float())


def test_ema_of_zero3_placeholders_is_refused_with_the_settings_that_turn_it_off():
    """configs/full-cpt.yaml keeps an EMA; launched with scripts/launch.sh fsdp|zero3 it is refused (the 2-process
    refusal under FSDP2, in one line: tests/test_train_distributed.py). The line names both settings to turn it off: with train.ema_decay
    alone unset, the config is refused again for eval.ema."""
    from cpt.distributed import LaunchError

    lin = torch.nn.Linear(2, 1, bias=False)
    lin.weight = torch.nn.Parameter(torch.empty(0))
    lin.weight.ds_numel = 2  # what deepspeed.zero.Init leaves in place of a partitioned weight
    with pytest.raises(LaunchError, match=r"ZeRO-3.*--set train\.ema_decay=null --set eval\.ema=false"):
        EMA(lin, decay=0.5)


def test_ema_swapped_loads_then_restores_and_state_roundtrip(tmp_path):
    model = tiny_model(0)
    ema = EMA(model, decay=0.9)
    live = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    live = {n: p.detach().clone() for n, p in model.named_parameters()}
    with ema.swapped(model):
        for n, p in model.named_parameters():
            torch.testing.assert_close(p, ema.shadow[n])
            assert not torch.equal(p, live[n])
    for n, p in model.named_parameters():
        assert torch.equal(p, live[n])
    with pytest.raises(RuntimeError):
        with ema.swapped(model):
            raise RuntimeError("evaluation failed")
    assert all(torch.equal(p, live[n]) for n, p in model.named_parameters())

    ema.save(tmp_path / "ema.safetensors")
    other = EMA(tiny_model(1), decay=0.5)
    other.load(tmp_path / "ema.safetensors")
    assert other.decay == 0.9 and other.num_updates == 1
    assert ema.shadow and other.shadow.keys() == ema.shadow.keys()
    assert all(torch.equal(other.shadow[n], ema.shadow[n]) for n in ema.shadow)
    sd = ema.state_dict()
    assert sd and all(isinstance(v, torch.Tensor) for v in sd.values())  # checkpoint.py stores it with safetensors
    third = EMA(tiny_model(2), decay=0.5)
    third.load_state_dict(sd)
    assert third.shadow.keys() == ema.shadow.keys() and all(torch.equal(third.shadow[n], ema.shadow[n]) for n in ema.shadow)
    with pytest.raises(KeyError):
        EMA(torch.nn.Linear(2, 2), 0.9).load_state_dict(sd)


# ----------------------------------------------------------------------------- averaging


def test_average_of_two_checkpoints_is_the_elementwise_mean(tmp_path):
    a = save(tiny_model(0), tmp_path / "a")
    b = save(tiny_model(1), tmp_path / "b", tok=False)
    from cpt.commands.average import main

    assert main([str(tmp_path / "avg"), str(a), str(b)]) == 0
    sa, sb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    avg = load_file(tmp_path / "avg" / "model.safetensors")
    assert set(avg) == set(sa)
    for k in sa:
        torch.testing.assert_close(avg[k], (sa[k] + sb[k]) / 2)
    assert (tmp_path / "avg" / "config.json").is_file() and (tmp_path / "avg" / "tokenizer.json").is_file()
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "avg")  # loads as a normal HF model
    torch.testing.assert_close(m.lm_head.weight, (sa["lm_head.weight"] + sb["lm_head.weight"]) / 2)
    import shutil  # a finished run directory stands for its final export (it was refused: "no model.safetensors")

    shutil.copytree(b, tmp_path / "run_b" / "export")
    assert main([str(tmp_path / "avg_run"), str(a), str(tmp_path / "run_b")]) == 0
    assert load_file(tmp_path / "avg_run" / "model.safetensors").keys() == avg.keys()
    torch.testing.assert_close(load_file(tmp_path / "avg_run" / "model.safetensors")["lm_head.weight"], avg["lm_head.weight"])

    # weighted, and sharded output with an index
    out = average_checkpoints([a, b], tmp_path / "w", weights=[3, 1], max_shard_bytes=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    m = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(m.model.embed_tokens.weight,
                               0.75 * sa["model.embed_tokens.weight"] + 0.25 * sb["model.embed_tokens.weight"])


def test_average_refuses_mismatched_checkpoints(tmp_path):
    a = save(tiny_model(0), tmp_path / "a")
    c = save(tiny_model(0, vocab=72), tmp_path / "c")
    with pytest.raises(ValueError, match="shape"):
        average_checkpoints([a, c], tmp_path / "x")
    with pytest.raises(ValueError):
        average_checkpoints([a], tmp_path / "x")


# ----------------------------------------------------------------------------- interpolation


def test_interpolation_endpoints_and_midpoint(tmp_path):
    base = save(tiny_model(0), tmp_path / "base")
    cpt = save(tiny_model(1), tmp_path / "cpt")
    sb = load_file(base / "model.safetensors")
    sc = load_file(cpt / "model.safetensors")
    for alpha, expect in ((0.0, sb), (1.0, sc)):
        m = interpolate(base, cpt, alpha)
        sd = m.state_dict()
        for k in sb:
            torch.testing.assert_close(sd[k], expect[k], atol=0, rtol=0)
    m = interpolate(base, cpt, 0.25, out_dir=tmp_path / "mid")
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "mid").state_dict()
    for k in sb:
        torch.testing.assert_close(saved[k], 0.75 * sb[k] + 0.25 * sc[k])
    assert (tmp_path / "mid" / "tokenizer.json").is_file()


def test_interpolation_with_an_extended_vocabulary_keeps_the_new_rows():
    base = {"emb": torch.zeros(4, 2), "w": torch.zeros(2)}
    cpt = {"emb": torch.ones(6, 2), "w": torch.ones(2)}
    out = interpolate_state_dicts(base, cpt, 0.5)
    torch.testing.assert_close(out["emb"][:4], torch.full((4, 2), 0.5))
    torch.testing.assert_close(out["emb"][4:], torch.ones(2, 2))
    with pytest.raises(ValueError):
        interpolate_state_dicts({"w": torch.zeros(3)}, {"w": torch.zeros(2)}, 0.5)


def _mean_token_loss(model, tokens):
    with torch.no_grad():
        return float(model(tokens, labels=tokens).loss)


def test_interpolation_sweep_table():
    base, cpt = tiny_model(0), tiny_model(1)
    g = torch.Generator().manual_seed(0)
    sets = {"old": ("upstream", torch.randint(0, 64, (3, 16), generator=g)),
            "new": ("downstream", torch.randint(0, 64, (3, 16), generator=g))}
    cpt_before = {k: v.clone() for k, v in cpt.state_dict().items()}
    rows = interpolation_sweep(base, cpt, [0, 0.5, 1], sets, loss_fn=_mean_token_loss)
    assert [r["alpha"] for r in rows] == [0.0, 0.5, 1.0]
    for name, (tag, toks) in sets.items():
        assert rows[0][f"loss/{name}"] == pytest.approx(_mean_token_loss(base, toks), rel=1e-6)
        assert rows[2][f"loss/{name}"] == pytest.approx(_mean_token_loss(cpt, toks), rel=1e-6)
        assert rows[0][f"tag/{name}"] == tag
    assert rows[1]["upstream_mean"] == rows[1]["loss/old"] and rows[1]["downstream_mean"] == rows[1]["loss/new"]
    assert rows[1]["loss/old"] not in (rows[0]["loss/old"], rows[2]["loss/old"])
    assert all(torch.equal(v, cpt_before[k]) for k, v in cpt.state_dict().items())  # CPT weights restored
    table = format_sweep(rows).splitlines()
    assert len(table) == 4 and "old (up)" in table[0] and "new (down)" in table[0]
    assert table[0].index("old") < table[0].index("new")  # upstream sets first
    assert table[2].split()[0] == "0.5000"
    with pytest.raises(ValueError):
        interpolation_sweep(base, cpt, [0.5], {"x": ("sideways", sets["old"][1])}, loss_fn=_mean_token_loss)


def test_cli_interpolate_end_to_end(tmp_path, capsys):
    """`cpt interpolate` over real prepared held-out shards, with the real held-out loss."""
    from cpt.commands.interpolate import main
    from cpt.data.prepare import prepare
    from cpt.evaluate import heldout_loss

    base = save(tiny_model(0), tmp_path / "base")
    cpt = save(tiny_model(1), tmp_path / "cpt")
    tok = PreTrainedTokenizerFast.from_pretrained(cpt)
    sets = {}
    for name, text in (("old", "hello world, hello there. "), ("new", "low hell row old wood. ")):
        src = tmp_path / f"{name}.txt"
        src.write_text(text * 200)
        prepare(str(src), tok, str(tmp_path / f"shards_{name}"))
        sets[name] = str(tmp_path / f"shards_{name}")
    rc = main([str(base), str(cpt), "--alphas", "0,0.5,1", "--seq-len", "16", "--max-tokens", "256",
               "--heldout", f"old={sets['old']}:upstream", "--heldout", f"new={sets['new']}:downstream",
               "--save-alpha", "0.5", "--out", str(tmp_path / "half")])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "old (up)" in printed and "new (down)" in printed
    result = json.loads((tmp_path / "half" / "interpolation.json").read_text())
    assert [r["alpha"] for r in result["rows"]] == [0.0, 0.5, 1.0]
    from cpt.data.loader import load_heldout
    from cpt.data.sources import HeldoutConfig

    toks = load_heldout(HeldoutConfig(name="old", path=sets["old"], tag="upstream"), tok, 16, 256)
    base_loss = heldout_loss(AutoModelForCausalLM.from_pretrained(base), toks, 8)
    assert result["rows"][0]["loss/old"] == pytest.approx(base_loss, rel=1e-5)
    half = AutoModelForCausalLM.from_pretrained(tmp_path / "half")
    assert result["rows"][1]["loss/old"] == pytest.approx(heldout_loss(half, toks, 8), rel=1e-4)


def test_cli_interpolate_of_a_run_reproduces_its_logged_heldout_losses(tiny_cpt_data, tiny_base, tmp_path, capsys):
    """`cpt interpolate BASE RUN` with no held-out flags evaluates as the run did in the loop (its seq_len, token
    budget, sample seed and document masking): alpha 0 gives the run's step-0 losses (the base it started from),
    alpha 1 its final ones. The stand-alone defaults (seq 512, no masking, another sample) give other numbers."""
    from conftest import tiny_run_config
    from cpt.commands.interpolate import main
    from cpt.config import load_config
    from cpt.metrics import read_metrics
    from cpt.train import train

    out = tmp_path / "run"
    cfg = tiny_run_config(tiny_cpt_data, out, eval={"tokens_per_set": 384, "sample_seed": 3},
                          checkpoint={"every": None})
    cfg["train"]["init_from"] = str(tiny_base)
    cfg["data"]["document_masking"] = True
    cfg["stages"][0].update(steps=2, schedule={"type": "constant", "max_lr": 3e-3, "warmup_steps": 1})
    train(load_config(base=cfg), echo=lambda *a, **k: None)
    held = [r for r in read_metrics(out / "metrics.jsonl") if "eval/python/loss" in r]
    first, last = held[0], held[-1]
    assert first["step"] == 0 and last["step"] == 2
    sets = [f"--heldout={h['name']}={h['path']}:{h['tag']}" for h in cfg["data"]["heldout"]]
    assert main([str(tiny_base), str(out), "--alphas", "0,1", *sets, "--json", str(tmp_path / "run.json")]) == 0
    printed = capsys.readouterr().out
    assert "as run" in printed and "--document-masking" in printed and "--sample-seed 3" in printed
    result = json.loads((tmp_path / "run.json").read_text())
    rows = result["rows"]
    assert result["heldout_settings"] == {"seq_len": cfg["data"]["seq_len"], "max_tokens": 384, "sample_seed": 3,
                                          "document_masking": True}
    for h in cfg["data"]["heldout"]:
        name = h["name"]
        assert rows[0][f"loss/{name}"] == pytest.approx(first[f"eval/{name}/loss"], rel=1e-5), name
        assert rows[1][f"loss/{name}"] == pytest.approx(last[f"eval/{name}/loss"], rel=1e-5), name
    # outside a run (the export copied elsewhere): the stand-alone defaults, which do not reproduce the run's numbers
    import shutil

    shutil.copytree(out / "export", tmp_path / "elsewhere")
    assert main([str(tiny_base), str(tmp_path / "elsewhere"), "--alphas", "1", *sets,
                 "--json", str(tmp_path / "alone.json")]) == 0
    alone = json.loads((tmp_path / "alone.json").read_text())
    assert alone["heldout_settings"]["document_masking"] is False
    assert abs(alone["rows"][0]["loss/python"] - last["eval/python/loss"]) > 1e-4


def test_eval_and_interpolate_export_a_checkpoint_inside_its_run_not_in_tmp(tiny_cpt_data, tiny_base, tmp_path,
                                                                            monkeypatch, capsys):
    """`cpt eval` and `cpt interpolate` of a cpt checkpoint export it first: into a hidden folder of its run directory
    (the disk that holds the run; /tmp is small and node-local on a cluster), removed afterwards, also when the
    evaluation fails."""
    import tempfile
    from pathlib import Path

    import cpt.checkpoint_export as checkpoint_export
    from conftest import tiny_run_config
    from cpt.checkpoint import list_checkpoints
    from cpt.commands.eval import main as eval_main
    from cpt.commands.interpolate import main as interpolate_main
    from cpt.config import load_config
    from cpt.train import train

    run = tmp_path / "run"
    cfg = tiny_run_config(tiny_cpt_data, run, eval={"at_start": False}, checkpoint={"every": 1})
    cfg["train"]["init_from"] = str(tiny_base)
    cfg["data"]["heldout"] = []
    cfg["stages"][0].update(steps=1, schedule={"type": "constant", "max_lr": 1e-3, "warmup_steps": 0})
    train(load_config(base=cfg), echo=lambda *a, **k: None)
    ckpt = list_checkpoints(run)[-1]
    system_tmp = tmp_path / "system_tmp"
    system_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_tmp))
    exported_into = []
    real_export = checkpoint_export.export_checkpoint

    def export_spy(path, out_dir, *args, **kwargs):
        exported_into.append(Path(out_dir).parent)
        return real_export(path, out_dir, *args, **kwargs)

    monkeypatch.setattr(checkpoint_export, "export_checkpoint", export_spy)
    held = f"python={tiny_cpt_data / 'data' / 'python' / 'heldout'}:downstream"
    assert eval_main([str(ckpt), "--heldout", held, "--seq-len", "32", "--max-tokens", "256"]) == 0
    assert interpolate_main([str(tiny_base), str(ckpt), "--alphas", "1", "--heldout", held, "--seq-len", "32",
                             "--max-tokens", "256", "--json", str(tmp_path / "i.json")]) == 0
    assert eval_main([str(ckpt), "--heldout", f"python={tmp_path / 'missing'}:downstream"]) == 1  # fails after export
    assert [d.parent for d in exported_into] == [run, run, run]
    assert [d.name[:10] for d in exported_into] == [".cpt-eval-", ".cpt-load-", ".cpt-eval-"]
    assert not any(d.exists() for d in exported_into) and not list(system_tmp.iterdir())
    capsys.readouterr()


def test_cli_interpolate_of_a_missing_model_is_one_line(tmp_path, capsys):
    """BASE may be a hub id, so a mistyped local path went to the hub: offline, transformers' OSError traceback."""
    from cpt.commands.interpolate import main

    missing = str(tmp_path / "no-such-model")
    assert main([missing, missing, "--heldout", f"x={tmp_path}:upstream"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith(f"cpt interpolate: error: model '{missing}'")


def test_a_resumed_ema_keeps_the_decay_of_the_run_that_resumes():
    """--resume --allow-config-change with another train.ema_decay: the shadow weights and update count come from the
    checkpoint, the decay from the config (the checkpoint's replaced it: the new value was silently ignored). A saved
    EMA file (EMA.load) still brings its own decay."""
    import torch

    model = tiny_model(0)
    ema = EMA(model, decay=0.99)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    resumed = EMA(tiny_model(1), decay=0.9)
    resumed.load_state_dict(ema.state_dict())
    assert resumed.decay == 0.9 and resumed.num_updates == 1
    assert all(torch.equal(resumed.shadow[n], ema.shadow[n]) for n in ema.shadow)
