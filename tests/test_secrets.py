"""Secrets are never written (issue 13): the redaction rule in both directions, and a real tiny run with W&B offline
whose every file (config.yaml, checkpoints, metrics, W&B's files including the binary .wandb, the HF export) is
grepped for secrets planted in the environment, the YAML, a free-form dict and a `--set` argument."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import tiny_run_config
from cpt.redaction import REDACTED, is_secret_key, key_words, redact, redact_argv, redact_json_file

SECRET_NAMES = ["aws_secret_access_key", "access-token", "hubToken", "HF_TOKEN", "api_key", "apiKey", "WANDB_API_KEY",
                "password", "db-password", "client_secret", "credentials_file", "token", "private_key", "SECRET_KEY",
                "use_auth_token", "authToken", "refresh_token", "Passphrase", "hub.token", "apikey", "x-api-key"]
NOT_SECRETS = ["tokens_per_set", "max_tokens", "tokenizer", "eos_token", "pad_token", "bos_token", "pad_token_id",
               "eos_token_id", "vocab", "num_key_value_heads", "add_tokens_file", "learn_tokens", "keep", "sort_keys",
               "monkey", "key_value", "tokenizer_class", "max_position_embeddings", "embed_tokens", "new_rows_lr_multiplier",
               "tie_word_embeddings", "mask_token", "keystone", "token_budget",
               # fields of transformers model configs that a substring or naive word rule would flag
               "num_experts_per_token", "max_atoms_per_token", "samples_per_token", "return_class_token", "share_att_key"]


@pytest.mark.parametrize("name", SECRET_NAMES)
def test_secret_names(name):
    assert is_secret_key(name)


@pytest.mark.parametrize("name", NOT_SECRETS)
def test_not_secret_names(name):
    assert not is_secret_key(name)


def test_words_and_nested_redaction():
    assert key_words("awsSecret-access_KEY") == ["aws", "secret", "access", "key"]
    assert key_words("HFToken") == ["hf", "token"]
    cfg = {"model": {"arch": {"hidden_size": 8, "num_key_value_heads": 2, "hub_token": "S",
                              "storage": [{"aws_secret_access_key": "S", "region": "eu"}]}},
           "eval": {"tokens_per_set": 5}}
    labels = {"id2label": {"0": "B-secret"}, "label2id": {"B-secret": 0}}
    assert redact(labels) == labels  # class names are data
    assert redact(cfg) == {"model": {"arch": {"hidden_size": 8, "num_key_value_heads": 2, "hub_token": REDACTED,
                                              "storage": [{"aws_secret_access_key": REDACTED, "region": "eu"}]}},
                           "eval": {"tokens_per_set": 5}}


def test_argv_redaction():
    argv = ["cpt", "train", "c.yaml", "--set", "model.arch.access-token=S1", "--set", "eval.tokens_per_set=5",
            "--set=model.arch.hubToken=S2", "--set", "model.arch={password: S3, hidden_size: 8}", "--resume"]
    assert redact_argv(argv) == ["cpt", "train", "c.yaml", "--set", f"model.arch.access-token={REDACTED}", "--set",
                                 "eval.tokens_per_set=5", f"--set=model.arch.hubToken={REDACTED}", "--set",
                                 f"model.arch={REDACTED}", "--resume"]


def test_experiment_spec_redaction():
    from cpt.redaction import redact_spec

    spec = {"name": "e", "run_overrides": ["model.compile=true", "model.arch.hub_token=S1"],
            "variants": [{"name": "v", "overrides": ["train.ema_decay=0.9", "model.arch={api_key: S2}"]}]}
    assert redact_spec(spec) == {"name": "e", "run_overrides": ["model.compile=true", f"model.arch.hub_token={REDACTED}"],
                                 "variants": [{"name": "v", "overrides": ["train.ema_decay=0.9", f"model.arch={REDACTED}"]}]}


def test_json_file_redaction(tmp_path):
    p = tmp_path / "config.json"
    clean = {"eos_token_id": 2, "num_key_value_heads": 4, "vocab_size": 10}
    p.write_text(json.dumps(clean))
    before = p.read_text()
    assert not redact_json_file(p) and p.read_text() == before  # untouched when nothing is secret
    p.write_text(json.dumps({**clean, "hub_token": "S"}))
    assert redact_json_file(p) and json.loads(p.read_text()) == {**clean, "hub_token": REDACTED}


def _files(root: Path):
    return [p for p in root.rglob("*") if p.is_file()]


def test_no_secret_reaches_any_file_of_a_run(tiny_cpt_data, tmp_path):
    """Secrets in the environment (the W&B key, the hub token) reach no file of a run: config.yaml, checkpoints,
    the export, train.log, the W&B offline run (binary file included). Secret-named keys in `model.arch` (the YAML, a
    nested dict, `--set`) are not fields of the model's config: the start refuses them in one line that names the keys,
    not their values, and writes nothing (before model.arch was checked they landed, redacted, in config.yaml and the
    export's config.json)."""
    secrets = {"env_wandb": "SEKRET-wandb-4711", "env_hf": "SEKRET-hf-4712", "yaml": "SEKRET-yaml-4713",
               "nested": "SEKRET-nested-4714", "set": "SEKRET-set-4715", "set_dict": "SEKRET-setdict-4716"}
    out = tmp_path / "run"
    cfg = tiny_run_config(tiny_cpt_data, out, eval={"at_start": False})
    cfg["stages"][0]["steps"] = 3
    cfg["data"]["heldout"] = cfg["data"]["heldout"][:1]
    cfg["checkpoint"] = {"every": 2, "export_at_end": True}
    cfg["logging"] = {"plot": False, "wandb": {"enabled": True, "mode": "offline", "project": "secrets"}}
    env = {**os.environ, "WANDB_API_KEY": secrets["env_wandb"], "HF_TOKEN": secrets["env_hf"], "WANDB_MODE": "offline",
           "CUDA_VISIBLE_DEVICES": ""}

    def train(config: dict, *extra: str) -> subprocess.CompletedProcess:
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump(config))
        return subprocess.run([sys.executable, "-m", "cpt.cli", "train", str(path), *extra], env=env,
                              capture_output=True, text=True, timeout=300)

    planted = copy.deepcopy(cfg)
    planted["model"]["arch"]["hubToken"] = secrets["yaml"]
    planted["model"]["arch"]["storage"] = {"aws_secret_access_key": secrets["nested"], "region": "eu-west-1"}
    proc = train(planted, "--set", f"model.arch.access-token={secrets['set']}",
                 "--set", f"model.arch.extra={{password: {secrets['set_dict']}, unit: 1}}")
    said = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "model.arch: access-token, extra, hubToken, storage: not a field of" in said, said
    assert not any(value in said for value in secrets.values()) and "Traceback" not in said, said
    assert not any(value.encode() in p.read_bytes() for p in _files(tmp_path) if p.name != "c.yaml" for value in secrets.values())
    assert not (out / "config.yaml").exists()

    proc = train(cfg)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    files = _files(out)
    assert any(p.suffix == ".wandb" for p in files) and (out / "export" / "config.json").is_file()
    assert any(p.name == "model.safetensors" for p in files) and (out / "checkpoints" / "step_00000002").is_dir()
    assert (out / "train.log").is_file()
    leaks = [(str(p.relative_to(out)), name) for p in files for name, value in secrets.items()
             if value.encode() in p.read_bytes()]
    assert leaks == []
