"""A model or tokenizer folder with its own code (``auto_map`` in config.json / tokenizer_config.json and a Python
file next to it) is never run unless the run's config sets ``model.trust_remote_code``: every loading command is
refused in one line, with "y" answered to any question (transformers asks whether to run the code when the caller
leaves ``trust_remote_code`` unset, and ran it after "y": `cpt eval` did)."""

import builtins
import json
import shutil

import pytest
import yaml

from conftest import tiny_run_config
from cpt.cli import main

PAYLOAD = "import os\nopen(os.environ['CPT_TEST_PAYLOAD'], 'w').write('ran')\n"


@pytest.fixture
def evil(tiny_base, tmp_path, monkeypatch):
    """tiny_base's export whose model and tokenizer name code of their own (which writes the file
    $CPT_TEST_PAYLOAD when imported); ``input()`` answers "y"."""
    folder = tmp_path / "evil"
    shutil.copytree(tiny_base, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="evilllama", architectures=["EvilForCausalLM"],
                  auto_map={"AutoConfig": "modeling_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"})
    (folder / "config.json").write_text(json.dumps(config))
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    tok_config.update(auto_map={"AutoTokenizer": [None, "modeling_evil.EvilTokenizer"]}, tokenizer_class="EvilTokenizer")
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config))
    (folder / "modeling_evil.py").write_text(
        PAYLOAD + "from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast\n"
        "class EvilConfig(LlamaConfig):\n    model_type = 'evilllama'\n"
        "class EvilForCausalLM(LlamaForCausalLM):\n    config_class = EvilConfig\n"
        "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n")
    marker = tmp_path / "payload_ran"
    monkeypatch.setenv("CPT_TEST_PAYLOAD", str(marker))
    monkeypatch.setattr(builtins, "input", lambda *a, **k: "y")
    return folder, marker


def test_the_payload_runs_when_trusted(evil):
    """The control: the folder's code is real, and runs when the caller trusts it."""
    from transformers import AutoModelForCausalLM

    folder, marker = evil
    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    assert marker.read_text() == "ran"


def test_every_loading_command_refuses_a_folders_own_code(evil, tiny_cpt_data, tmp_path, capsys):
    folder, marker = evil
    heldout = f"h={tiny_cpt_data / 'data' / 'python' / 'heldout'}:downstream"
    cfg = tiny_run_config(tiny_cpt_data, tmp_path / "run")
    commands = {
        "eval": ["eval", str(folder), "--heldout", heldout, "--max-tokens", "256"],
        "interpolate": ["interpolate", str(folder), str(folder), "--heldout", heldout, "--alphas", "0,1"],
        "prepare": ["prepare", str(tiny_cpt_data / "raw" / "python.jsonl.gz"), "--tokenizer", str(folder),
                    "--out", str(tmp_path / "prepared")],
    }
    for key, value in (("name_or_path", {"model": {"name_or_path": str(folder)}}),
                       ("init_from", {"train": {**cfg["train"], "init_from": str(folder)}})):
        run_cfg = {**cfg, **value, "run": {**cfg["run"], "output_dir": str(tmp_path / f"run_{key}")}}
        path = tmp_path / f"{key}.yaml"
        path.write_text(yaml.safe_dump(run_cfg))
        commands[f"train {key}"] = ["train", str(path)]
    for name, argv in commands.items():
        assert main(argv) != 0, name
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if "error" in line.lower()]
        assert errors and "Traceback" not in err, (name, err[-3000:])
        assert "pass the argument" not in err, (name, err[-3000:])  # (transformers' advice: no cpt command has it)
        assert ("model.trust_remote_code: true" if name != "prepare" else "which cpt prepare does not run") in err, err
        assert not marker.exists(), f"cpt {name} ran the folder's code"
    assert not (tmp_path / "prepared").exists()
