"""Shared test setup: no test touches the network.

The variables are set when this file is imported (before test modules import huggingface_hub,
which reads HF_HUB_OFFLINE at import time) and again by an autouse session fixture.
"""

import os

import pytest

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "TOKENIZERS_PARALLELISM": "false",
    # tiny models run faster on one thread, and 2-process tests must not oversubscribe 2 cores
    "OMP_NUM_THREADS": "1",
}
os.environ.update(OFFLINE_ENV)


@pytest.fixture(autouse=True, scope="session")
def _offline_env():
    os.environ.update(OFFLINE_ENV)
    yield


# ---------------------------------------------------------------- shared tiny CPT data (real text)


@pytest.fixture(scope="session")
def tiny_cpt_data(tmp_path_factory):
    """The tiny demo's corpora, tokenizer and token shards (Shakespeare = old, Python stdlib = new), built once."""
    from cpt.data.prepare import prepare
    from cpt.demo import SCALES, python_stdlib_docs, shakespeare_docs, train_tokenizer, write_jsonl

    root = tmp_path_factory.mktemp("tiny_cpt")
    s = SCALES["tiny"]
    shk = write_jsonl(shakespeare_docs(s["shakespeare_mb"] * 1e6), root / "raw" / "shakespeare.jsonl.gz")
    py = write_jsonl(python_stdlib_docs(s["python_mb"] * 1e6), root / "raw" / "python.jsonl.gz")
    tok = train_tokenizer([shk, py], s["vocab"], root / "tokenizer")
    for name, path in (("shakespeare", shk), ("python", py)):
        prepare([str(path)], tok, root / "data" / name, heldout_docs=s["heldout_docs"], echo=lambda *a: None)
    return root


def tiny_run_config(root, out, **changes):
    """A small CPT run dict over `tiny_cpt_data` (python new + shakespeare replay), fp32, every step logged."""
    from cpt.demo import SCALES, cpt_config

    cfg = cpt_config(root, SCALES["tiny"])
    cfg["run"]["output_dir"] = str(out)
    cfg["train"].update({"init_from": None, "log_every": 1, "progress_bar": False})
    cfg["logging"] = {"plot": False}
    for section, value in changes.items():
        cfg[section] = {**cfg.get(section, {}), **value}
    return cfg


@pytest.fixture(scope="session")
def tiny_base(tiny_cpt_data, tmp_path_factory):
    """A tiny base model (the role of `cpt demo`'s runs/demo/base/export): 10 steps from scratch; its HF export."""
    from cpt.config import load_config
    from cpt.train import train

    out = tmp_path_factory.mktemp("tiny_base") / "run"
    cfg = tiny_run_config(tiny_cpt_data, out, eval={"at_start": False}, checkpoint={"every": None})
    cfg["stages"][0]["steps"] = 10
    cfg["data"]["heldout"] = []
    train(load_config(base=cfg), echo=lambda *a, **k: None)
    return out / "export"
