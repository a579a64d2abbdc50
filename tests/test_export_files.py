"""The files of an HF export as another user or tool meets them: permissions, and the folder it is written into.

Loading (logits, tokenizer, dtype, adapters) across backends is tested where the exports are made
(tests/test_launch_shipped.py, tests/test_launch_combos.py, tests/test_train_modes.py).
"""

import os
import stat
from pathlib import Path

import pytest
import torch

from conftest import tiny_llama, tiny_tokenizer
from cpt.checkpoint_export import export_checkpoint
from cpt.export import ExportFolderError, write_hf
from cpt.model import merge_adapter


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield 0o644
    os.umask(old)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer(["def f(x): return x + 1", "to be or not to be"] * 20, 300)


def test_exported_weights_are_readable_as_the_config_is(tmp_path, tok, umask_022):
    """safetensors 0.8 writes through a 0o600 temporary file (safetensors/safetensors#782): the export's weights were
    readable by their owner only, while its config and tokenizer were not (another user of a shared folder
    got PermissionError from from_pretrained). The weights now get what the umask gives any other file."""
    from peft import LoraConfig, get_peft_model

    full = write_hf(tiny_llama(len(tok)), tok, tmp_path / "full")
    assert _mode(full / "model.safetensors") == _mode(full / "config.json") == umask_022

    lora = get_peft_model(tiny_llama(len(tok)), LoraConfig(r=2, target_modules=["q_proj"]))
    lora.peft_config["default"].base_model_name_or_path = str(full)
    adapter = write_hf(lora, tok, tmp_path / "adapter")
    assert _mode(adapter / "adapter_model.safetensors") == _mode(adapter / "adapter_config.json") == umask_022

    merged = merge_adapter(adapter, tmp_path / "merged")  # `cpt merge`
    assert _mode(merged / "model.safetensors") == umask_022


@pytest.fixture(scope="module")
def run(tiny_cpt_data, tmp_path_factory):
    """A 2-step run with one checkpoint (about 5 s)."""
    from conftest import tiny_run_config
    from cpt.config import load_config
    from cpt.train import train

    out = tmp_path_factory.mktemp("export_files") / "run"
    cfg = tiny_run_config(tiny_cpt_data, out, eval={"at_start": False}, checkpoint={"every": 2, "export_at_end": False})
    cfg["stages"][0]["steps"] = 2
    cfg["stages"][0]["schedule"]["warmup_steps"] = 1
    cfg["data"]["heldout"] = []
    train(load_config(base=cfg), echo=lambda *a, **k: None)
    return out


def test_export_refuses_a_folder_that_is_not_an_export(run, tmp_path, capsys):
    """`cpt export CKPT --out DIR` replaces DIR whole (an export never mixes with older files): a DIR holding
    anything else (a user's folder) was deleted without a word; now refused in one line, nothing touched.
    An earlier export's folder is replaced, and says so."""
    from cpt.commands.export import main

    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "notes.txt").write_text("precious")
    assert main([str(run), "--out", str(mine)]) == 1
    assert "not a model export" in capsys.readouterr().err
    assert (mine / "notes.txt").read_text() == "precious" and (mine / "sub").is_dir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportFolderError, match="a file, not a folder"):
        export_checkpoint(run, tmp_path / "file")
    assert main([str(run), "--out", str(tmp_path / "file" / "hf")]) == 1  # a file in its path: was mkdir's traceback
    assert capsys.readouterr().err == f"cpt export: --out {tmp_path / 'file' / 'hf'}: {tmp_path / 'file'} is a file, not a folder\n"

    assert main([str(run), "--out", str(tmp_path / "hf")]) == 0
    assert main([str(run), "--out", str(tmp_path / "hf")]) == 0
    assert "earlier export there replaced whole" in capsys.readouterr().out
    assert (tmp_path / "hf" / "model.safetensors").is_file()


def test_an_earlier_export_is_replaced_whole(tmp_path, tok):
    """Re-exporting into an earlier export's folder leaves none of its files (a stale shard and index of a larger
    model would otherwise make from_pretrained mix two models)."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "hf"
    write_hf(tiny_llama(len(tok), seed=1), tok, out)
    (out / "model-00001-of-00002.safetensors").write_bytes(b"stale")
    (out / "model.safetensors.index.json").write_text("{}")
    model = tiny_llama(len(tok), seed=2, training=False)
    write_hf(model, tok, out)
    assert sorted(p.name for p in out.iterdir() if "safetensors" in p.name) == ["model.safetensors"]
    x = torch.arange(12).reshape(1, 12)
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(out)(x).logits, model(x).logits)


def test_merge_into_an_earlier_sharded_export_leaves_no_stale_index(tmp_path, tok):
    """`cpt merge --out DIR` wrote into DIR: over an earlier sharded export it left that export's
    model.safetensors.index.json beside the new model.safetensors (tools that follow the index, e.g. vLLM's
    loader, then skip the new weights). Now written like every export: DIR replaced whole. Merging onto the
    adapter's own folder, or a folder that is not an export, is refused."""
    from peft import LoraConfig, get_peft_model

    from cpt.commands.merge import main

    base = write_hf(tiny_llama(len(tok)), tok, tmp_path / "base")
    lora = get_peft_model(tiny_llama(len(tok)), LoraConfig(r=2, target_modules=["q_proj"]))
    lora.peft_config["default"].base_model_name_or_path = str(base)
    adapter = write_hf(lora, tok, tmp_path / "adapter")
    old = tmp_path / "merged"
    tiny_llama(len(tok), seed=3).save_pretrained(old, max_shard_size="20KB")
    assert (old / "model.safetensors.index.json").is_file()
    assert main([str(adapter), "--out", str(old)]) == 0
    assert sorted(p.name for p in old.iterdir() if "safetensors" in p.name) == ["model.safetensors"]

    assert main([str(adapter), "--out", str(adapter)]) == 1
    assert main([str(adapter), "--out", str(base)]) == 1  # the base adapter_config.json names
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    assert main([str(adapter), "--out", str(tmp_path / "mine")]) == 1
    assert (adapter / "adapter_model.safetensors").is_file() and (tmp_path / "mine" / "notes.txt").is_file()


def test_average_replaces_an_earlier_export_and_refuses_its_own_inputs(tmp_path, tok):
    """`cpt average OUT A B` wrote into OUT: over an earlier sharded export it left that export's shards and
    index beside the new model.safetensors; and with OUT forgotten (`cpt average A B C`), A was overwritten in
    place by the mean of B and C. Now OUT is replaced whole, and an input as OUT is refused."""
    from cpt.commands.average import main

    a, b = (write_hf(tiny_llama(len(tok), seed=s), tok, tmp_path / f"m{s}") for s in (1, 2))
    old = tmp_path / "avg"
    tiny_llama(len(tok), seed=3).save_pretrained(old, max_shard_size="20KB")
    assert main([str(old), str(a), str(b)]) == 0
    assert sorted(p.name for p in old.iterdir() if "safetensors" in p.name) == ["model.safetensors"]
    before = (a / "model.safetensors").read_bytes()
    assert main([str(a), str(a), str(b)]) == 1
    assert (a / "model.safetensors").read_bytes() == before


def test_export_without_the_runs_base_model_is_one_line(run, tmp_path, capsys):
    """The export rebuilds the run's model from its config.yaml's model section (base weights or architecture,
    tokenizer): a tokenizer or base folder moved away since the run stopped `cpt export` with a traceback."""
    import yaml

    from cpt.commands.export import main

    tokenizer = Path(yaml.safe_load((run / "config.yaml").read_text())["model"]["tokenizer"])
    tokenizer.rename(tokenizer.with_name("moved-away"))
    try:
        assert main([str(run), "--out", str(tmp_path / "hf")]) == 1
    finally:
        tokenizer.with_name("moved-away").rename(tokenizer)
    out = capsys.readouterr().err.strip()
    assert out.count("\n") == 0 and str(tokenizer) in out and "config.yaml" in out
    assert not (tmp_path / "hf").exists()


def test_export_of_a_run_that_prunes_the_checkpoint_being_read(run, tmp_path, monkeypatch, capsys):
    """A run still writing saves step N+1 and prunes step N (checkpoint.keep) while `cpt export RUN` reads step N:
    the export failed with "not a cpt resume checkpoint (no model.safetensors ...)"; now it reads step N+1."""
    import shutil

    import cpt.consolidate as consolidate
    from cpt.checkpoint import discard
    from cpt.commands.export import main

    live = tmp_path / "run"
    shutil.copytree(run, live)
    read = consolidate.read_model_state
    seen = []

    def pruned_while_reading(ckpt):
        seen.append(Path(ckpt).name)
        if len(seen) == 1:  # the run saves the next checkpoint and prunes this one
            shutil.copytree(ckpt, Path(ckpt).with_name("step_00000003"))
            discard(Path(ckpt))
        return read(ckpt)

    monkeypatch.setattr(consolidate, "read_model_state", pruned_while_reading)
    assert main([str(live), "--out", str(tmp_path / "hf")]) == 0
    assert seen == ["step_00000002", "step_00000003"]
    assert "removed while being read" in capsys.readouterr().out
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    # a checkpoint named explicitly that goes away: one line, nothing written
    monkeypatch.setattr(consolidate, "read_model_state", lambda ckpt: (discard(Path(ckpt)), read(ckpt))[1])
    assert main([str(live / "checkpoints" / "step_00000003"), "--out", str(tmp_path / "hf2")]) == 1
    assert "removed while being read" in capsys.readouterr().err and not (tmp_path / "hf2").exists()


def test_an_adapter_export_as_a_starting_model_says_merge_it_first(tmp_path, tok):
    """A LoRA run's export (a peft adapter) named as `model.name_or_path` or `train.init_from` of a new run: the
    errors said transformers wants a `model_type` / "neither an HF model directory nor a cpt checkpoint"; now
    they say it is an adapter and how to merge it."""
    from peft import LoraConfig, get_peft_model

    from cpt.checkpoint import CheckpointError
    from cpt.config.model import ModelConfig
    from cpt.model import ModelLoadError, build_model
    from cpt.resume import resolve_init

    base = write_hf(tiny_llama(len(tok)), tok, tmp_path / "base")
    lora = get_peft_model(tiny_llama(len(tok)), LoraConfig(r=2, target_modules=["q_proj"]))
    lora.peft_config["default"].base_model_name_or_path = str(base)
    adapter = write_hf(lora, tok, tmp_path / "adapter")
    with pytest.raises(ModelLoadError, match="a peft adapter, not a model; merge it"):
        build_model(ModelConfig(name_or_path=str(adapter)), tok)
    with pytest.raises(CheckpointError, match="a peft adapter, not a model; merge it"):
        resolve_init(str(adapter))


def test_a_model_built_from_arch_trains_its_eos_embedding(tok, tmp_path):
    """`model.arch` models took the tokenizer's pad id, which is eos when the tokenizer has none (load_tokenizer) or
    by design (cpt demo's tokenizer): transformers then made eos the embedding's padding_idx, a zero row that never
    gets a gradient, so an untied model's document separator stayed a zero vector (and its exports kept it so)."""
    from cpt.config.model import ModelConfig
    from cpt.model import build_model, load_tokenizer

    tok.save_pretrained(tmp_path / "tok")
    cfg = ModelConfig(tokenizer=str(tmp_path / "tok"), arch={"hidden_size": 32, "intermediate_size": 64,
                      "num_hidden_layers": 1, "num_attention_heads": 2, "tie_word_embeddings": False})
    loaded = load_tokenizer(cfg)
    assert loaded.pad_token_id == loaded.eos_token_id  # as every run gets it
    model = build_model(cfg, loaded)
    assert model.config.pad_token_id is None and model.config.eos_token_id == loaded.eos_token_id
    eos = loaded.eos_token_id
    x = torch.tensor([[eos, 5, 7, eos, 9]])
    model(x, labels=x).loss.backward()
    emb = model.get_input_embeddings().weight
    assert emb[eos].norm() > 0 and emb.grad[eos].norm() > 0


def test_a_pretrained_base_whose_pad_is_eos_trains_its_eos_embedding(tok, tmp_path):
    """A base whose config says pad_token_id = eos_token_id (Phi-3, many fine-tunes): transformers builds its input
    embedding with eos as padding_idx, and CPT (eos between every packed document) never updated that row."""
    from cpt.config.model import ModelConfig
    from cpt.model import build_model, load_tokenizer, prepare_model

    eos = tok.eos_token_id
    base = write_hf(tiny_llama(len(tok), pad_token_id=eos, eos_token_id=eos), tok, tmp_path / "base")
    cfg = ModelConfig(name_or_path=str(base))
    tokenizer = load_tokenizer(cfg)
    model, _, _ = prepare_model(cfg, build_model(cfg, tokenizer), tokenizer, log_fn=lambda *a: None)
    x = torch.tensor([[eos, 5, 7, eos, 9]])
    model(x, labels=x).loss.backward()
    assert model.get_input_embeddings().weight.grad[eos].norm() > 0
    assert model.config.pad_token_id == eos  # what the export writes is the base's


def test_an_export_in_a_batch_log_has_no_library_progress_bars(run, tmp_path):
    """`cpt export` with stderr going to a file (a batch job's log): transformers drew its "Writing model shards"
    tqdm bar there on every export (carriage-return redraws, not lines). A log file gets none now."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    log = tmp_path / "job.log"
    with open(log, "w") as f:
        done = subprocess.run([sys.executable, "-m", "cpt.cli", "export", str(run), "--out", str(tmp_path / "hf")],
                              stdout=f, stderr=subprocess.STDOUT, env=env, timeout=300)
    text = log.read_text()
    assert done.returncode == 0, text
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    assert "Writing model shards" not in text and "\r" not in text, text


def test_interpolate_save_alpha_replaces_an_earlier_export_and_refuses_other_folders(tmp_path, tok, capsys):
    """`cpt interpolate --save-alpha A --out DIR` wrote into DIR: over an earlier sharded export it left that
    export's shards and index beside the new model.safetensors. Now DIR is replaced whole (the table
    interpolation.json beside the model); a folder that is not an export, or one of the two models, is refused."""
    from cpt.commands.interpolate import main
    from cpt.data.prepare import prepare

    base = write_hf(tiny_llama(len(tok)), tok, tmp_path / "base")
    cpt = write_hf(tiny_llama(len(tok), seed=1), tok, tmp_path / "cpt")
    src = tmp_path / "old.txt"
    src.write_text("to be or not to be, that is the question. " * 100)
    prepare(str(src), tok, str(tmp_path / "shards"))
    args = [str(base), str(cpt), "--alphas", "0,1", "--seq-len", "16", "--max-tokens", "256",
            "--heldout", f"old={tmp_path / 'shards'}:upstream", "--save-alpha", "0.5"]
    old = tmp_path / "half"
    tiny_llama(len(tok), seed=3).save_pretrained(old, max_shard_size="20KB")
    assert (old / "model.safetensors.index.json").is_file()
    assert main([*args, "--out", str(old)]) == 0
    assert sorted(p.name for p in old.iterdir() if "safetensors" in p.name) == ["model.safetensors"]
    assert (old / "interpolation.json").is_file() and (old / "tokenizer.json").is_file()
    from safetensors.torch import load_file

    got, a, b = (load_file(d / "model.safetensors") for d in (old, base, cpt))
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.allclose(got[name], (a[name] + b[name]) / 2, atol=1e-6)

    capsys.readouterr()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    assert main([*args, "--out", str(tmp_path / "mine")]) == 1
    assert main([*args, "--out", str(cpt)]) == 1
    assert "one of the two models" in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").is_file() and (cpt / "model.safetensors").is_file()


def test_a_tokenizer_with_gaps_in_its_ids_is_checked_by_its_largest_id(tmp_path):
    """The embedding-size check compared rows with len(tokenizer): a 4-token tokenizer whose ids reach 40 passed a
    4-row model, which then failed with an index error at the first batch; a `model.arch` model got 4 rows too."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from cpt.config.model import ModelConfig
    from cpt.model import ModelLoadError, build_model, load_tokenizer

    backend = Tokenizer(models.WordLevel({"<eos>": 0, "<unk>": 1, "a": 2, "b": 40}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    gappy = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>")
    gappy.save_pretrained(tmp_path / "tok")
    assert len(gappy) == 4
    base = write_hf(tiny_llama(len(gappy)), gappy, tmp_path / "base")
    cfg = ModelConfig(name_or_path=str(base))
    with pytest.raises(ModelLoadError, match=r"has 4 tokens with ids up to 40 but the model's embedding has 4 rows"):
        build_model(cfg, load_tokenizer(cfg))
    cfg = ModelConfig(tokenizer=str(tmp_path / "tok"), arch={"hidden_size": 32, "intermediate_size": 64,
                      "num_hidden_layers": 1, "num_attention_heads": 2})
    model = build_model(cfg, load_tokenizer(cfg))  # sized to the largest id: every id has a row
    assert model.get_input_embeddings().weight.shape[0] == 41
    x = torch.tensor([gappy("a b a", add_special_tokens=False)["input_ids"]])
    assert x.max() == 40 and torch.isfinite(model(x, labels=x).loss)


# ------------------------------------------------------------------------------------------ dtype, shards, metadata


def _tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_cpt_export_writes_bf16_shards_that_serving_loaders_read(run, tmp_path):
    """`cpt export` always wrote one fp32 model.safetensors (config.json "dtype": "float32"): an 8B model was one
    32 GB file, twice the bf16 size users serve, and no option said otherwise. `--dtype bf16` writes bf16 tensors
    and says so in config.json (`from_pretrained` with transformers 5's default dtype="auto" gets bf16), and
    `--max-shard-size` splits the weights into model-0000k-of-0000n.safetensors + model.safetensors.index.json,
    which transformers (no missing or unexpected keys) reads. The tied head is written once."""
    import json

    from transformers import AutoModelForCausalLM

    from cpt.commands.export import main

    fp32, bf16 = tmp_path / "fp32", tmp_path / "bf16"
    assert main([str(run), "--out", str(fp32)]) == 0
    assert main([str(run), "--out", str(bf16), "--dtype", "bf16", "--max-shard-size", "100KB"]) == 0
    assert main([str(run), "--out", str(tmp_path / "a"), "--adapter", "--dtype", "bf16"]) == 1  # (peft's own: fp32)
    assert not (tmp_path / "a").exists()
    index = json.loads((bf16 / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in bf16.glob("*.safetensors"))
    assert len(shards) > 2 and sorted(set(index["weight_map"].values())) == shards
    assert json.loads((bf16 / "config.json").read_text())["dtype"] == "bfloat16"
    full, half = _tensors(fp32), _tensors(bf16)
    assert "lm_head.weight" not in half and half.keys() == full.keys()  # (tied: the embedding alone, as fp32's)
    assert all(half[k].dtype == torch.bfloat16 and torch.equal(half[k], full[k].to(torch.bfloat16)) for k in full)
    model, info = AutoModelForCausalLM.from_pretrained(bf16, output_loading_info=True)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert torch.equal(model.lm_head.weight, full["model.embed_tokens.weight"].to(torch.bfloat16))
    # binary units, as the docs offer them (huggingface_hub parses KB/MB/GB only: `2GiB` ended every export, a run's
    # final one included, in a ValueError traceback): 100KiB = 102,400 bytes, shards a little larger than 100KB's
    kib = tmp_path / "kib"
    assert main([str(run), "--out", str(kib), "--dtype", "bf16", "--max-shard-size", "100KiB"]) == 0
    assert 1 < len(list(kib.glob("*.safetensors"))) <= len(shards)
    from cpt.config.outputs import shard_size_bytes

    assert [shard_size_bytes(s) for s in ("5GB", "2GiB", "500MiB", "100KB", 123)] == [5 * 10 ** 9, 2 * 2 ** 30,
                                                                                   500 * 2 ** 20, 100_000, 123]


def test_run_exports_follow_checkpoint_export_dtype_and_max_shard_size(tiny_cpt_data, tmp_path):
    """`checkpoint.export_dtype` and `checkpoint.max_shard_size` reach the periodic and the final export of a run
    (they were fp32 and one file whatever the base or the precision), whose tensors are the trained weights cast
    once; a size transformers cannot read is refused at config load, naming the field. A checkpoint read by
    `cpt eval`/`interpolate`/`average` goes through an fp32 export whatever export_dtype says."""
    import json

    from safetensors.torch import load_file

    from conftest import tiny_run_config
    from cpt.config import ConfigError, load_config
    from cpt.train import train

    out = tmp_path / "run"
    cfg = tiny_run_config(tiny_cpt_data, out, eval={"at_start": False},
                          checkpoint={"every": 2, "export_every": 1, "export_dtype": "bf16", "max_shard_size": "100KB"})
    cfg["stages"][0]["steps"] = 2
    cfg["stages"][0]["schedule"]["warmup_steps"] = 1
    cfg["data"]["heldout"] = []
    with pytest.raises(ConfigError, match="max_shard_size"):
        load_config(base=cfg, overrides=["checkpoint.max_shard_size=5TB"])
    train(load_config(base=cfg), echo=lambda *a, **k: None)
    trained = load_file(str(out / "checkpoints" / "step_00000002" / "model.safetensors"))
    for export in (out / "exports" / "step_00000001", out / "export"):
        assert (export / "model.safetensors.index.json").is_file(), export
        assert json.loads((export / "config.json").read_text())["dtype"] == "bfloat16"
        assert {t.dtype for t in _tensors(export).values()} == {torch.bfloat16}
    final = _tensors(out / "export")
    assert all(torch.equal(final[k], trained[k].to(torch.bfloat16)) for k in final)
    from cpt.checkpoint_export import model_dir_of

    with model_dir_of(out / "checkpoints" / "step_00000002") as read:  # (cpt eval/interpolate/average of a checkpoint)
        assert all(torch.equal(t, trained[k]) for k, t in _tensors(read).items())  # fp32, whatever export_dtype says


def test_export_metadata_is_the_models_not_how_cpt_loaded_it(tmp_path, tok):
    """transformers 5 records how a tokenizer was loaded in the tokenizer_config.json it saves ("is_local": true,
    and "local_files_only": true when offline, as on a cluster's compute nodes): every export told whoever
    downloaded it that the tokenizer was a local, offline one. Exports (and merges) leave both out; a LoRA merge
    written with --max-shard-size is sharded too."""
    import json

    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    from cpt.commands.merge import main

    tok.save_pretrained(tmp_path / "tok")
    loaded = AutoTokenizer.from_pretrained(tmp_path / "tok", local_files_only=True)
    base = write_hf(tiny_llama(len(tok)), loaded, tmp_path / "base")
    lora = get_peft_model(tiny_llama(len(tok)), LoraConfig(r=2, target_modules=["q_proj"]))
    lora.peft_config["default"].base_model_name_or_path = str(base)
    adapter = write_hf(lora, loaded, tmp_path / "adapter")
    assert main([str(adapter), "--out", str(tmp_path / "merged"), "--max-shard-size", "20KB"]) == 0
    assert (tmp_path / "merged" / "model.safetensors.index.json").is_file()
    for d in (base, adapter, tmp_path / "merged"):
        saved = json.loads((d / "tokenizer_config.json").read_text())
        assert not {"is_local", "local_files_only"} & saved.keys(), d


def test_an_export_from_a_gathered_state_holds_a_tied_head_once(tmp_path, tok):
    """ZeRO-1/2 hand the export a cloned state dict (accelerate's get_state_dict), whose tied `lm_head.weight` no longer
    shares the embedding's storage, so save_pretrained kept both names: a ZeRO-2 run's export held 21 tensors against
    a 1-process run's 20, and `cpt average` of the two (README section 6) refused with "has different tensors"."""
    from safetensors import safe_open

    from cpt.commands.average import main

    model = tiny_llama(len(tok), tied=True, seed=1)
    plain = write_hf(model, tok, tmp_path / "plain")
    gathered = write_hf(model, tok, tmp_path / "gathered", {k: v.clone() for k, v in model.state_dict().items()})
    keys = {d.name: set(safe_open(d / "model.safetensors", "pt").keys()) for d in (plain, gathered)}
    assert keys["gathered"] == keys["plain"] and "lm_head.weight" not in keys["gathered"]
    assert main([str(tmp_path / "avg"), str(plain), str(gathered)]) == 0


def _model_cfg(**model):
    from cpt.config import load_config

    return load_config(base={"model": model, "data": {"sources": [{"name": "a", "path": "x"}]},
                             "stages": [{"steps": 1, "mix": {"a": 1}}]}).model


def test_the_exported_tokenizer_has_no_pad_token_cpt_gave_it(tmp_path, tok):
    """A base tokenizer without a pad token (Llama 3, Mistral, OLMo bases) was given pad = eos for cpt's evaluation
    batches, and every export (full model, adapter, merge) carried it: downstream, a collator that masks pad labels
    masked every eos. The export's tokenizer is now the base's; a pad token the tokenizer had is kept."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    from cpt.model import load_tokenizer

    tok.save_pretrained(tmp_path / "tok")
    loaded = load_tokenizer(_model_cfg(tokenizer=str(tmp_path / "tok"), arch={}))
    assert loaded.pad_token == loaded.eos_token  # (cpt still pads with eos)
    full = write_hf(tiny_llama(len(tok)), loaded, tmp_path / "full")
    lora = get_peft_model(tiny_llama(len(tok)), LoraConfig(r=2, target_modules=["q_proj"]))
    lora.peft_config["default"].base_model_name_or_path = str(full)
    adapter = write_hf(lora, loaded, tmp_path / "adapter")
    merged = merge_adapter(adapter, tmp_path / "merged")
    for d in (full, adapter, merged):
        again = AutoTokenizer.from_pretrained(d)
        assert again.pad_token is None and again.eos_token == tok.eos_token, d
    padded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    padded.pad_token = "<pad>"
    padded.save_pretrained(tmp_path / "tok-pad")
    kept = write_hf(tiny_llama(len(padded)), load_tokenizer(_model_cfg(tokenizer=str(tmp_path / "tok-pad"), arch={})),
                    tmp_path / "kept")
    assert AutoTokenizer.from_pretrained(kept).pad_token == "<pad>"


def test_a_base_without_sdpa_attention_trains_and_exports_with_eager(tmp_path, tok):
    """Gemma 2 has no sdpa attention in transformers 5: with model.attn_implementation left at its default (sdpa) a
    Gemma 2 base did not load (`transformers cannot load this folder`); it now loads with eager, saying so, and
    its export reloads with the same logits."""
    from transformers import AutoModelForCausalLM, Gemma2Config, Gemma2ForCausalLM

    from cpt.model import build_model, load_tokenizer

    torch.manual_seed(0)
    base = Gemma2ForCausalLM(Gemma2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=16))
    base.to(torch.bfloat16).save_pretrained(tmp_path / "gemma2")
    tok.save_pretrained(tmp_path / "gemma2")
    cfg = _model_cfg(name_or_path=str(tmp_path / "gemma2"))
    assert cfg.attn_implementation == "sdpa"
    model = build_model(cfg, load_tokenizer(cfg)).eval()
    assert model.config._attn_implementation == "eager"
    out = write_hf(model, tok, tmp_path / "export")
    again = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.arange(24)[None] % len(tok)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)


def test_an_fp32_export_of_a_16_bit_base_says_so_once(tmp_path, tok, monkeypatch):
    """The exports' default fp32 (the trained weights exactly) turned a bf16 base into an export twice its size
    without a word in the run's log or `cpt export`'s output; now one line says so and names the setting."""
    from cpt.export import dtype_note
    from cpt.model import build_model, load_tokenizer

    monkeypatch.setattr("cpt.export._SAID", set())
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        tiny_llama(len(tok)).to(dtype).save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    cfg = _model_cfg(name_or_path=str(tmp_path / "bf16"))
    model = build_model(cfg, load_tokenizer(cfg))
    assert model.dtype == torch.float32 and dtype_note(model, "bf16") is None
    note = dtype_note(model, "fp32")
    assert "float32" in note and "bfloat16 base" in note and "export_dtype: bf16" in note
    assert dtype_note(model, None) is None  # once per process (a run writes several exports)
    cfg = _model_cfg(name_or_path=str(tmp_path / "fp32"))
    assert dtype_note(build_model(cfg, load_tokenizer(cfg)), "fp32") is None


def test_the_last_step_gets_its_periodic_export_when_there_is_no_final_one(tiny_cpt_data, tmp_path):
    """`checkpoint.export_at_end: false` with `export_every` dividing the run: the last step's weights were exported
    nowhere (its periodic export was left to `export/`, which the setting turns off)."""
    from conftest import tiny_run_config
    from cpt.config import load_config
    from cpt.run_end import periodic_export_dir

    cfg = tiny_run_config(tiny_cpt_data, tmp_path / "run", checkpoint={"export_every": 3})
    on = load_config(base=cfg)
    off = load_config(base=cfg, overrides=["checkpoint.export_at_end=false"])
    assert [s for s in range(1, 7) if periodic_export_dir(on, s, 6)] == [3]
    assert [s for s in range(1, 7) if periodic_export_dir(off, s, 6)] == [3, 6]
    assert periodic_export_dir(off, 6, 6).name == "step_00000006"
