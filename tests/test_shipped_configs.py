"""Every shipped run config, run the way the README and docs tell users to run it, at `cpt train --dry-run` level:
the file as shipped (relative paths and all), from a working directory laid out as the guide's set-up leaves it.

* configs/{full,lora,freeze}-cpt.yaml and configs/schedules/*.yaml: "run `cpt demo` first" (README), which writes
  runs/demo/{tokenizer,data/<corpus>,base/export}; here the tiny demo data and base model stand in for them.
* configs/real/smollm2-shakespeare.yaml: docs/real_model.md's set-up writes models/smollm2-135m (scripts/get_smollm2.py)
  and data/smol/{shakespeare,python} (`cpt prepare`); a tiny llama with the same layout stands in for SmolLM2.
* configs/gpu/*.yaml (8B on GPUs): their comments' set-up, $CPT_DATA/{new,old}[/heldout] and $CPT_RUNS; the model is
  Llama-3.1-8B's architecture on the meta device (no weights) with a tokenizer of its 128,256 ids, passed as
  `--set model.name_or_path=DIR` (the hub is not reached from tests).

The dry run reads the real shards, tokenizer and model (the init_from/name_or_path export), checks the mix, data,
held-out sets and LR plan, and writes nothing. Accelerate and DeepSpeed configs are launched as shipped in
tests/test_launch_shipped.py; the experiment specs are planned in tests/test_experiment*.py.
"""

from pathlib import Path

import pytest

from cpt.cli import main
from cpt.config import load_config

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIGS = sorted(
    str(p.relative_to(ROOT)) for p in [*(ROOT / "configs").glob("*.yaml"), *(ROOT / "configs" / "schedules").glob("*.yaml")])
REAL_CONFIGS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs" / "real").glob("*.yaml"))
GPU_CONFIGS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs" / "gpu").glob("*.yaml"))
LLAMA_3_1_8B = dict(  # meta-llama/Llama-3.1-8B's config.json (architecture fields)
    model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5,
    tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001,
    rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})


def test_every_shipped_run_config_is_dry_run_here():
    assert len(DEMO_CONFIGS) == 6 and len(REAL_CONFIGS) == 1 and len(GPU_CONFIGS) == 2, (DEMO_CONFIGS, REAL_CONFIGS,
                                                                                          GPU_CONFIGS)


def link(target: Path, link_path: Path) -> None:
    link_path.parent.mkdir(parents=True, exist_ok=True)
    link_path.symlink_to(target, target_is_directory=target.is_dir())


@pytest.fixture(scope="module")
def workdir(tiny_cpt_data, tiny_base, tmp_path_factory) -> Path:
    """A working directory as `cpt demo` and docs/real_model.md's set-up leave it, with configs/ beside them."""
    wd = tmp_path_factory.mktemp("user")
    link(ROOT / "configs", wd / "configs")
    link(tiny_cpt_data / "tokenizer", wd / "runs" / "demo" / "tokenizer")
    link(tiny_base, wd / "runs" / "demo" / "base" / "export")
    link(tiny_base, wd / "models" / "smollm2-135m")
    for corpus in ("python", "shakespeare"):
        link(tiny_cpt_data / "data" / corpus, wd / "runs" / "demo" / "data" / corpus)
        link(tiny_cpt_data / "data" / corpus, wd / "data" / "smol" / corpus)
    return wd


@pytest.mark.parametrize("config", DEMO_CONFIGS + REAL_CONFIGS)
def test_shipped_config_dry_runs_as_the_docs_say(config, workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    rc = main(["train", config, "--dry-run"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    out = captured.out
    assert "Traceback" not in captured.err
    # the plan of the real data: every stage, both sources' epochs, the held-out sets checked against the tokenizer
    assert "stage 0 " in out and "source python: " in out and "source shakespeare: " in out, out
    assert "held-out sets (tokenizer checked): " in out and out.rstrip().splitlines()[-1].startswith("total: "), out
    assert not (workdir / load_config(workdir / config).run.output_dir).exists()  # nothing written


@pytest.fixture(scope="module")
def gpu_setup(tmp_path_factory) -> dict:
    """$CPT_DATA as the GPU configs' `cpt prepare` lines leave it (random tokens of a 128,256-id tokenizer), and a
    folder with Llama-3.1-8B's config.json (no weights: the dry run builds the model on the meta device)."""
    import importlib.util

    from transformers import AutoTokenizer, LlamaConfig

    spec = importlib.util.spec_from_file_location("bench_throughput", ROOT / "scripts" / "bench_throughput.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    root = tmp_path_factory.mktemp("gpu")
    model = root / "Llama-3.1-8B"
    bench.write_tokenizer(model, LLAMA_3_1_8B["vocab_size"])
    LlamaConfig(**LLAMA_3_1_8B).save_pretrained(model)
    tok = AutoTokenizer.from_pretrained(model)
    for i, corpus in enumerate(("new", "old")):
        bench.write_random_shards(root / "data" / corpus, tok, 300_000, seed=i)
        bench.write_random_shards(root / "data" / corpus / "heldout", tok, 40_000, seed=10 + i)
    return {"model": str(model), "data": str(root / "data"), "runs": str(root / "runs")}


@pytest.mark.parametrize("config", GPU_CONFIGS)
def test_gpu_config_dry_runs_with_its_models_architecture(config, gpu_setup, monkeypatch, capsys):
    """The 8B configs as their comments run them (absolute data and run paths from the environment): valid, the
    8B model's LoRA targets and tokenizer checked, every step of the plan walked, nothing written."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("CPT_DATA", gpu_setup["data"])
    monkeypatch.setenv("CPT_RUNS", gpu_setup["runs"])
    rc = main(["train", config, "--dry-run", "--tokens-per-s", "200000", "--set", f"model.name_or_path={gpu_setup['model']}"])
    captured = capsys.readouterr()
    assert rc == 0 and "Traceback" not in captured.err, captured.err
    out = captured.out
    assert "source new: " in out and "source old: " in out and "held-out sets (tokenizer checked): " in out, out
    # the 8B model; LoRA adds 335.8 M trainable parameters (rank 128 on every linear layer, the norms), and the FLOPs
    # per token count weight gradients for those only (4N + 2 x trainable + attention, cpt.throughput)
    model = ("model: 8366.1M parameters (7840.7M non-embedding, 335.8M trainable), 32 layers, hidden 4096, vocab "
             "128,256; 4.06e+10 training FLOPs/token" if "lora" in config else
             "model: 8030.3M parameters (7504.9M non-embedding), 32 layers, hidden 4096, vocab 128,256; 6.11e+10 training")
    assert out.startswith(model), out
    assert out.rstrip().splitlines()[-1].startswith("at 200,000 tokens/s: "), out
    assert not Path(gpu_setup["runs"]).exists()  # nothing written


def test_schedule_config_anneal_branch_after_the_demo(tiny_cpt_data, tiny_base, tmp_path, monkeypatch, capsys):
    """README: after `cpt demo`, `cpt train configs/schedules/<x>.yaml`, then an anneal branch off a trunk checkpoint
    with `--from CKPT --anneal N`. The branch (like --resume) builds the model from the config's model section and
    loads the checkpoint into it, so that section must be the demo's base model: the shipped configs named a
    2-layer hidden-64 `model.arch` beside `train.init_from: runs/demo/base/export` (the demo's base has 4 layers,
    hidden 192), so the trunk trained the demo model and the branch could not load its checkpoint. Here the base
    export has one layer more than that arch; the trunk is shortened to 10 steps (checkpoints every 4)."""
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM

    from cpt.metrics import read_metrics

    config = AutoConfig.from_pretrained(tiny_base)
    config.num_hidden_layers += 1
    base = tmp_path / "runs" / "demo" / "base" / "export"
    AutoModelForCausalLM.from_config(config).save_pretrained(base)
    for f in tiny_base.iterdir():
        if f.name.startswith("tokenizer"):
            shutil.copy(f, base / f.name)
    link(ROOT / "configs", tmp_path / "configs")
    link(tiny_cpt_data / "tokenizer", tmp_path / "runs" / "demo" / "tokenizer")
    for corpus in ("python", "shakespeare"):
        link(tiny_cpt_data / "data" / corpus, tmp_path / "runs" / "demo" / "data" / corpus)
    monkeypatch.chdir(tmp_path)
    short = ["--set", "stages.0.steps=10", "--set", "stages.0.schedule.warmup_steps=1", "--set", "checkpoint.every=4",
             "--set", "train.global_batch_size=8", "--set", "train.micro_batch_size=8", "--set", "train.progress_bar=false",
             "--set", "eval.tokens_per_set=1024"]
    assert main(["train", "configs/schedules/wsd.yaml", *short]) == 0, capsys.readouterr().err
    capsys.readouterr()
    rc = main(["train", "configs/schedules/wsd.yaml", *short, "--from", "runs/schedules/wsd/checkpoints/step_00000004",
               "--anneal", "2", "--output-dir", "runs/schedules/wsd-anneal4"])
    assert rc == 0, capsys.readouterr().err
    records = list(read_metrics(tmp_path / "runs" / "schedules" / "wsd-anneal4"))
    assert max(r["step"] for r in records) == 6  # 2 anneal steps after the trunk's step 4

    # the old configs' mistake (a model section that is not the checkpoint's model) is one line, not a traceback
    capsys.readouterr()
    old_model = ["--set", "model.name_or_path=null", "--set", "model.tokenizer=runs/demo/tokenizer", "--set",
                 "model.arch={model_type: llama, hidden_size: 64, intermediate_size: 160, num_hidden_layers: 2, "
                 "num_attention_heads: 4, num_key_value_heads: 4, tie_word_embeddings: true}"]
    rc = main(["train", "configs/schedules/wsd.yaml", *short, *old_model, "--from",
               "runs/schedules/wsd/checkpoints/step_00000004", "--anneal", "2", "--output-dir", "runs/schedules/wsd-b"])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err, err
    assert "its weights do not fit the model this run builds (9 unexpected key(s), e.g. model.layers.2." in err, err
