"""Publishing exports on the Hugging Face Hub (`checkpoint.push_to_hub`, `cpt export --push-to-hub`). No network: the
hub API (huggingface_hub.HfApi) is replaced by one that keeps each upload in a local folder, so the test sees exactly
what would be published: the export's files, the model card, and that no token or local path is in them."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import Echo, tiny_run_config
from cpt.config import load_config

SECRET = "hf_SECRETtoken1234567890"


class FakeHub:
    """HfApi's create_repo / create_branch / upload_folder, into ``root/<repo>/<branch>``."""

    def __init__(self, root: Path, fail: str | None = None):
        self.root, self.fail, self.calls = root, fail, []

    def __call__(self, *args, **kwargs):  # (HfApi() -> this object)
        return self

    def create_repo(self, repo_id, private=None, exist_ok=False, repo_type=None):
        self.calls.append(("create_repo", repo_id, private))
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def create_branch(self, repo_id, branch, exist_ok=False):
        self.calls.append(("create_branch", repo_id, branch))

    def upload_folder(self, repo_id, folder_path, revision=None, commit_message=None):
        self.calls.append(("upload_folder", repo_id, revision))
        if self.fail:
            raise ConnectionError(self.fail)
        shutil.copytree(folder_path, self.root / repo_id / (revision or "main"))
        return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/abc"})()


@pytest.fixture
def hub(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_TOKEN", SECRET)  # (huggingface_hub's own; cpt must not copy it anywhere)
    fake = FakeHub(tmp_path / "hub")
    monkeypatch.setattr(huggingface_hub, "HfApi", fake)
    return fake


def _published(folder: Path) -> str:
    return "\n".join(p.read_bytes().decode("utf-8", "replace") for p in folder.rglob("*") if p.is_file())


def test_a_run_pushes_its_final_export_with_a_model_card(tiny_cpt_data, tmp_path, hub, monkeypatch):
    from accelerate import Accelerator

    from cpt.train import train

    barrier = Accelerator.wait_for_everyone
    monkeypatch.setattr(Accelerator, "wait_for_everyone", lambda self: (hub.calls.append(("barrier",)), barrier(self)))

    out = tmp_path / "run"
    cfg = tiny_run_config(tiny_cpt_data, out, checkpoint={"every": 4, "keep": 10, "push_to_hub": "me/tiny-cpt"})
    echo = Echo()
    result = train(load_config(base=cfg), echo=echo)
    assert ("create_repo", "me/tiny-cpt", True) in hub.calls  # private unless told
    # after the run's last barrier: the other ranks are not held there while tens of GB upload
    assert max(i for i, c in enumerate(hub.calls) if c == ("barrier",)) < hub.calls.index(("upload_folder", "me/tiny-cpt", None))
    pushed = hub.root / "me/tiny-cpt" / "main"
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= {p.name for p in pushed.iterdir()}
    assert (pushed / "model.safetensors").read_bytes() == (result.export_dir / "model.safetensors").read_bytes()
    card = (pushed / "README.md").read_text()
    steps = sum(s["steps"] for s in cfg["stages"])
    assert card.splitlines()[7] == "# tiny-cpt" and "shakespeare (replay) 25.0%" in card
    assert "library_name: transformers" in card and f"{steps} steps" in card and f"{result.tokens:,} tokens" in card
    assert f"## Held-out loss (step {steps})" in card and "| python |" in card and "| shakespeare |" in card
    assert str(tmp_path) not in card and SECRET not in _published(pushed)  # no local path, no token
    assert "pushed " in echo.text and "https://huggingface.co/me/tiny-cpt/commit/abc" in echo.text

    # `cpt export` of an earlier checkpoint to a branch of a public repository: the card is that checkpoint's
    from cpt.cli import main

    ckpt = out / "checkpoints" / "step_00000004"
    rc = main(["export", str(ckpt), "--out", str(tmp_path / "e4"), "--push-to-hub", "me/tiny-cpt", "--public",
               "--hub-revision", "step-4"])
    assert rc == 0
    assert ("create_repo", "me/tiny-cpt", False) in hub.calls and ("create_branch", "me/tiny-cpt", "step-4") in hub.calls
    card = (hub.root / "me/tiny-cpt" / "step-4" / "README.md").read_text()
    assert ": 4 steps" in card and "## Held-out loss (step 4)" in card


def test_an_offline_push_writes_the_card_that_the_suggested_upload_publishes(tiny_cpt_data, tmp_path, hub, monkeypatch):
    """HF_HUB_OFFLINE=1 (the usual compute node): the push is refused before it tries, and the line says to run `hf
    upload` where the hub is reachable; the model card was written only when the push went ahead, so that upload
    published the model without it (a network failure had it)."""
    from cpt.train import train

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = tiny_run_config(tiny_cpt_data, tmp_path / "run", checkpoint={"push_to_hub": "me/x"}, eval={"at_start": False})
    cfg["stages"][0].update(steps=2, schedule={"type": "constant", "max_lr": 1e-3, "warmup_steps": 0})
    echo = Echo()
    result = train(load_config(base=cfg), echo=echo)
    line = next(x for x in echo if "HF_HUB_OFFLINE is set" in x)
    assert f"hf upload me/x {result.export_dir.resolve()}" in line and not hub.calls
    card = (result.export_dir / "README.md").read_text()
    assert card.startswith("---") and "cpt" in card


def test_a_failed_push_keeps_the_export_and_says_how_to_push_again(tiny_cpt_data, tmp_path, hub, capsys):
    from cpt.cli import main
    from cpt.train import train

    hub.fail = "Name or service not known"
    out = tmp_path / "run"
    cfg = tiny_run_config(tiny_cpt_data, out, checkpoint={"every": 2, "push_to_hub": "me/x"}, eval={"at_start": False})
    cfg["stages"][0].update(steps=2, schedule={"type": "constant", "max_lr": 1e-3, "warmup_steps": 0})
    echo = Echo()
    result = train(load_config(base=cfg), echo=echo)  # the run has succeeded: its export is on disk
    assert result.stopped_early is None and (result.export_dir / "model.safetensors").is_file()
    line = next(x for x in echo if "push of" in x)
    assert "Name or service not known" in line and f"hf upload me/x {result.export_dir.resolve()}" in line
    # the command fails (exit 1, one line); offline it says so before trying; a bad name is refused first
    assert main(["export", str(out), "--out", str(tmp_path / "e"), "--push-to-hub", "me/x"]) == 1
    assert "failed (ConnectionError: Name or service not known)" in capsys.readouterr().err
    hub.fail = None
    import os

    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        assert main(["export", str(out), "--out", str(tmp_path / "e2"), "--push-to-hub", "me/x"]) == 1
    finally:
        del os.environ["HF_HUB_OFFLINE"]
    assert "HF_HUB_OFFLINE is set" in capsys.readouterr().err
    assert main(["export", str(out), "--out", str(tmp_path / "e2"), "--push-to-hub", "me/x/y"]) == 1
    assert "give a hub repository as NAME or ORG/NAME" in capsys.readouterr().err
    # a URL with a password or token: refused without repeating it (stderr is a batch job's log file)
    for url in ("https://bob:pw123SECRET@e.com/r", "https://hf_abcdefghijklmnopqrstuvwx@huggingface.co/me/x",
                "bob:pw123SECRET@huggingface.co/me/x", "me/x:hf_abcdefghijklmnopSECRET"):
        assert main(["export", str(out), "--out", str(tmp_path / "e2"), "--push-to-hub", url]) == 1
        err = capsys.readouterr().err
        assert ("a URL with credentials, not a hub repository" in err or "the value (not repeated" in err) and \
            "SECRET" not in err and "hf_abc" not in err, err
    assert not (tmp_path / "e2").exists()  # (all refused before the export's work)
    assert not (hub.root / "me/x").exists()


def test_push_to_hub_config_is_checked():
    from cpt.config import ConfigError

    base = {"model": {"arch": {"hidden_size": 8}, "tokenizer": "t"}, "data": {"sources": [{"name": "a", "path": "/x"}]},
            "stages": [{"steps": 1, "mix": {"a": 1}}]}
    with pytest.raises(ConfigError, match=r"checkpoint.push_to_hub: 'a b': give a hub repository"):
        load_config(base={**base, "checkpoint": {"push_to_hub": "a b"}})
    with pytest.raises(ConfigError, match=r"checkpoint.push_to_hub: a URL with credentials") as e:  # (not repeated)
        load_config(base={**base, "checkpoint": {"push_to_hub": "https://bob:pw123SECRET@e.com/r"}})
    assert "SECRET" not in str(e.value)
    with pytest.raises(ConfigError, match="needs export_at_end: true"):
        load_config(base={**base, "checkpoint": {"push_to_hub": "me/x", "export_at_end": False}})
    assert load_config(base={**base, "checkpoint": {"push_to_hub": "org/name.v2"}}).checkpoint.hub_private


def test_cpt_merge_pushes_the_merged_model(tiny_base, tmp_path, hub):
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from cpt.adapters import apply_lora
    from cpt.export import save_adapter
    from cpt.cli import main
    from cpt.config import LoraConfig

    model = apply_lora(AutoModelForCausalLM.from_pretrained(tiny_base), LoraConfig(r=4, alpha=8))
    adapter = save_adapter(model, tmp_path / "lora" / "adapter", tokenizer=PreTrainedTokenizerFast.from_pretrained(tiny_base))
    assert main(["merge", str(adapter), "--out", str(tmp_path / "merged"), "--push-to-hub", "me/merged"]) == 0
    pushed = hub.root / "me/merged" / "main"
    assert (pushed / "model.safetensors").read_bytes() == (tmp_path / "merged" / "model.safetensors").read_bytes()
    card = (pushed / "README.md").read_text()
    assert "# merged" in card and "The LoRA adapter `adapter` merged into its base model" in card and "lora" not in card
    assert str(tmp_path) not in card and ("create_repo", "me/merged", True) in hub.calls


def test_a_lora_adapter_is_pushed_without_its_local_base_path_and_with_cpts_card(tiny_base, tmp_path, hub):
    """peft names a local base by its absolute path (adapter_config.json, peft's README.md card, cpt_adapter.json):
    the upload names it by its directory's name and carries cpt's card; the export on disk keeps the path (cpt merge)."""
    import json

    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from cpt.adapters import apply_lora
    from cpt.export import save_adapter
    from cpt.config import LoraConfig
    from cpt.hub import model_card, push_folder

    model = apply_lora(AutoModelForCausalLM.from_pretrained(tiny_base), LoraConfig(r=4, alpha=8))
    out = save_adapter(model, tmp_path / "lora" / "export", tokenizer=PreTrainedTokenizerFast.from_pretrained(tiny_base))
    config = {"model": {"name_or_path": str(tiny_base)}, "stages": [{"steps": 3, "mix": {"a": 1.0}}]}
    push_folder(out, "me/lora", card=model_card(out, config, None, 3, None, "lora"))
    pushed = hub.root / "me/lora" / "main"
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md"} <= {p.name for p in pushed.iterdir()}
    assert str(tiny_base.parent) not in _published(pushed)  # no local path anywhere in what is uploaded
    assert json.loads((pushed / "adapter_config.json").read_text())["base_model_name_or_path"] == tiny_base.name
    card = (pushed / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: peft") and "# lora" in card and "3 steps" in card
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_base.resolve())
    assert (pushed / "adapter_model.safetensors").read_bytes() == (out / "adapter_model.safetensors").read_bytes()
    assert not list(tmp_path.glob("lora/.hub-*"))  # (the upload's staging copy is gone)


def test_a_card_gives_each_stages_mix_as_trained(tmp_path):
    """The card's data table printed the mix weights as written (`new 3, old (replay) 1`: weights summing to 4) and
    left a mix_ramp out (a source ramped from 20% to 80% shown at its weight); it gives the normalised shares and the
    ramp's first -> last step now, as the start-up log does; a stage this version cannot read keeps its weights."""
    from cpt.hub import model_card

    sched = {"type": "constant", "max_lr": 1e-3}
    config = {"data": {"sources": [{"name": "old", "replay": True}]}, "stages": [
        {"name": "a", "steps": 3, "mix": {"new": 3, "old": 1, "tiny": 0}, "schedule": sched},
        {"name": "b", "steps": 3, "mix": {"new": 1, "tiny": 9}, "mix_ramp": {"tiny": [0.2, 0.8]}, "schedule": sched},
        {"name": "c", "steps": 2, "mix": {"new": 1}, "schedule": sched, "no_such_field": 1}]}
    card = model_card(tmp_path, config, None, 8, None)
    assert "| a | 3 | new 75.0%, old (replay) 25.0%, tiny 0.0% |" in card, card
    assert "| b | 3 | new 80.0% -> 20.0%, tiny 20.0% -> 80.0% |" in card, card
    assert "| c | 2 | new 1 |" in card, card


def test_a_card_names_a_local_base_without_its_path(tmp_path):
    """A local base by its last path component only (not its parent: a home directory's user name), also a relative
    path that does not exist where the card is made; a hub id as base_model; lines of metrics.jsonl that are no record
    are skipped."""
    from cpt.hub import model_card

    home = tmp_path / "jsmith" / "llama-8b"
    home.mkdir(parents=True)
    (tmp_path / "metrics.jsonl").write_text('[1, 2]\n{"step": null}\n{"step": 2, "eval/web/loss": 2.5}\n')
    for base in (str(home), "./ckpts/jsmith/llama-8b", "jsmith/models/llama-8b"):
        card = model_card(tmp_path / "export", {"model": {"name_or_path": base}}, tmp_path, 2, None)
        assert "jsmith" not in card and "base_model:" not in card and "a local model (llama-8b)" in card, base
        assert "| web | 2.5000 |" in card
    assert "base_model: meta-llama/Llama-3.1-8B\n" in model_card(tmp_path, {"model": {"name_or_path": "meta-llama/Llama-3.1-8B"}},
                                                                 None, None, None)


def test_a_failed_push_says_how_to_push_again_privately_to_its_branch(tmp_path, hub):
    """The command to push again keeps what the push was asked for: a private repository (hf upload creates a public
    one without --private) and the branch (else it goes to main)."""
    from cpt.hub import HubPushError, push_folder

    hub.fail = "503 Service Unavailable"
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with pytest.raises(HubPushError) as e:
        push_folder(folder, "me/x", revision="step-4", card="card\n")
    assert f"`hf upload me/x {folder.resolve()} --private --revision step-4`" in str(e.value)
    with pytest.raises(HubPushError) as e:
        push_folder(folder, "me/x", private=False, card="card\n")
    assert f"`hf upload me/x {folder.resolve()}`" in str(e.value)


def test_a_card_that_cannot_be_written_is_a_failed_push_not_a_failed_run(tmp_path, hub, monkeypatch):
    """A full disk when the card is written (the end of a finished run) is one HubPushError line, like any failed push
    (push_run_export warns; before, the OSError failed the finished run with a --resume hint)."""
    import errno

    from cpt.hub import HubPushError, push_folder

    folder = tmp_path / "export"
    folder.mkdir()
    write_text = Path.write_text

    def full(self, *a, **k):
        if self.name == "README.md":
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_text(self, *a, **k)

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(HubPushError, match="No space left on device"):
        push_folder(folder, "me/x", card="card\n")


def test_push_options_without_a_push_are_refused(tmp_path, capsys):
    """`cpt export --public --hub-revision x` without --push-to-hub, and `checkpoint.hub_revision` without
    `push_to_hub`, were accepted and did nothing; `cpt export --adapter --max-shard-size` ignored the size."""
    from cpt.cli import main
    from cpt.config import ConfigError

    for command in (["export", str(tmp_path), "--out", str(tmp_path / "x")], ["merge", str(tmp_path), "--out", str(tmp_path / "x")]):
        assert main([*command, "--public", "--hub-revision", "dev"]) == 2
        assert "--public and --hub-revision go with --push-to-hub REPO" in capsys.readouterr().err
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "x"), "--adapter", "--max-shard-size", "1GB"]) == 1
    assert "--max-shard-size applies to full models" in capsys.readouterr().err
    cfg = tiny_run_config(tmp_path, tmp_path / "run", checkpoint={"hub_revision": "dev"})
    with pytest.raises(ConfigError, match="hub_revision: set with no push_to_hub"):
        load_config(base=cfg)
    assert not (tmp_path / "x").exists()
