"""Shared test setup: no test touches the network.

The variables are set when this file is imported (before test modules import huggingface_hub,
which reads HF_HUB_OFFLINE at import time) and again by an autouse session fixture.
"""

import os
import sys

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
# The venv's bin first on PATH, for this process and every one it starts, as in an activated venv (and as
# tests/launching.py gives the launched ranks): DeepSpeed builds its CPU shared-memory op (deepspeed_shm_comm) at the
# first DeepSpeed start with whichever `ninja` is first on PATH, and the pip ninja in the venv (1.13) and a system one
# (1.11) each discard the other's build log, so the op was rebuilt whenever the other kind of process came next: 3
# builds of ~50 s on 2 cores in one CI run (`.ninja_log` of .venv/torch_extensions), one now.
_VENV_BIN = os.path.dirname(sys.executable)
if os.environ.get("PATH", "").split(os.pathsep)[0] != _VENV_BIN:
    os.environ["PATH"] = _VENV_BIN + os.pathsep + os.environ.get("PATH", "")


@pytest.fixture(autouse=True, scope="session")
def _offline_env():
    os.environ.update(OFFLINE_ENV)
    yield


class _CurrentStderr:
    """Writes to whatever ``sys.stderr`` is now (pytest swaps it per test and closes the old one)."""

    def write(self, text):
        return sys.stderr.write(text)

    def flush(self):
        sys.stderr.flush()


@pytest.fixture(autouse=True, scope="session")
def _library_log_handlers_follow_stderr():
    """`datasets` gives its logger a StreamHandler bound to the sys.stderr of its first use; in a test session that
    is one test's capture stream, closed afterwards, and every later datasets log line became a '--- Logging error
    ---' traceback in another test's stderr. Bind it to the current stderr instead (a command runs once per process
    outside tests, so cpt itself is not concerned)."""
    import logging

    try:
        from datasets.utils import logging as datasets_logging
    except ImportError:  # the GPU machine's image has no `datasets`; tests/test_gpu.py does not need it
        yield
        return

    datasets_logging.get_logger()  # configures the library's handler if nothing did yet
    for handler in logging.getLogger("datasets").handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setStream(_CurrentStderr())
    yield


# ---------------------------------------------------------------- tiny models and tokenizers (from a config, offline)
# One factory each; a test file names its sizes once (e.g. `model = partial(tiny_llama, 97, hidden=64)`). Scripts
# started in subprocesses import them too (`from conftest import tiny_llama`: tests/ is on their PYTHONPATH).


def tiny_llama(vocab: int = 64, *, hidden: int = 32, intermediate: int = 64, layers: int = 2, heads: int = 4,
               kv_heads: int | None = None, tied: bool = False, bias: bool = False, seed: int = 0,
               training: bool = True, **config):
    """A randomly initialised LlamaForCausalLM, its weights drawn right after ``torch.manual_seed(seed)``.

    ``kv_heads`` defaults to ``heads`` (no grouped-query attention); ``config`` takes further LlamaConfig fields
    (max_position_embeddings, attn_implementation, eos_token_id, ...); ``training=False`` returns it in eval mode.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads or heads, tie_word_embeddings=tied,
                      attention_bias=bias, **config)
    return LlamaForCausalLM(cfg).train(training)


def tiny_tokenizer(texts, vocab_size: int, *, specials=("<eos>",), byte_alphabet: bool = True, **tokens):
    """A byte-level BPE trained on ``texts`` with `tokenizers` (well under a second), as a transformers fast tokenizer.

    ``specials`` take the first ids, in order; ``byte_alphabet`` seeds the trainer with all 256 byte symbols (any text
    encodes); ``tokens``: PreTrainedTokenizerFast arguments (eos_token defaults to the first special; bos_token,
    pad_token, ...). For the tokenizer `cpt demo` trains (eos = bos = pad), tests use `cpt.demo.byte_level_bpe`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet() if byte_alphabet else []
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials),
                                                       initial_alphabet=alphabet, show_progress=False))
    tokens.setdefault("eos_token", specials[0])
    return PreTrainedTokenizerFast(tokenizer_object=tok, **tokens)


# ---------------------------------------------------------------- shared tiny CPT data (real text)


@pytest.fixture(scope="session")
def tiny_cpt_data(tmp_path_factory):
    """The tiny demo's corpora, tokenizer and token shards (Shakespeare = old, Python stdlib = new), built once."""
    from cpt.demo import demo_data

    return demo_data(tmp_path_factory.mktemp("tiny_cpt"), "tiny")


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


# ================================================================ `cpt experiment` specs (tests/test_experiment*.py)
# A self-contained section: the tiny spec both kinds of experiment test build on, and an echo that records lines.


class Echo(list):
    """An ``echo=`` callable that records every line it is given; ``.text`` is all of them."""

    def __call__(self, *args, **kwargs):
        self.append(" ".join(str(a) for a in args))

    @property
    def text(self) -> str:
        return "\n".join(self)


def tiny_experiment_spec(corpora: list[dict], *, sequence: bool = True, **fields) -> dict:
    """A `cpt experiment` spec dict that trains in seconds on CPU: a 1-layer llama (hidden 32), a 300-token BPE,
    4 x 32 tokens a step in fp32; 20 steps of base pre-training (stage 0), then 10 steps of CPT (every later stage).
    ``sequence``: a dataset sequence through ``corpora``; else the pair grid on ``corpora`` = [A, B].
    ``fields`` replace top-level fields."""
    spec = {
        "tokenizer": {"train": {"vocab_size": 300, "sample_mb": 0.1}},
        "model": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                  "num_attention_heads": 2, "num_key_value_heads": 2, "tie_word_embeddings": True},
        "seq_len": 32, "global_batch_size": 4, "micro_batch_size": 4, "precision": "fp32",
        "base_tokens": 2560,  # 20 steps
        "base_lr": {"max_lr": 3e-3, "min_lr": 3e-4, "warmup_fraction": 0.1},
        "cpt_lr": {"max_lr": 3e-3, "min_lr": 3e-4, "warmup_fraction": 0.1, "constant_lr": 1.5e-3,
                   "cooldown_fraction": 0.3, "anneal_fraction": 0.2},
        "eval": {"evals_per_run": 4, "dense_fraction": 0.3, "dense_evals": 2, "tokens_per_set": 1024, "batch_size": 16},
        "log_every": 5, "progress_bar": False, "torch_threads": 1,
    }
    if sequence:
        spec.update(name="tiny_seq", corpora=corpora, stage_tokens=1280)  # 10 steps per later stage
    else:
        spec.update(name="tiny_pair", corpus_a=corpora[0], corpus_b=corpora[1], cpt_tokens=1280)
    spec.update(fields)
    return spec


@pytest.fixture
def trained():
    """(Accelerator, model, optimizer): a tiny Llama (tied embeddings) and an AdamW that has taken one step, prepared
    on CPU (tests of checkpoint writing and loading)."""
    import torch
    from accelerate import Accelerator

    model = tiny_llama(64, hidden=16, intermediate=32, layers=1, heads=2, tied=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    acc = Accelerator(cpu=True)
    model, opt = acc.prepare(model, opt)
    ids = torch.randint(0, 64, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()
    return acc, model, opt
