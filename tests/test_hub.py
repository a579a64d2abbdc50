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
    assert card.splitlines()[7] == "# tiny-cpt" and "shakespeare (replay) 0.25" in card
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
    assert "failed (ConnectionError: Name or service not known)" in capsys.readouterr().out
    hub.fail = None
    import os

    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        assert main(["export", str(out), "--out", str(tmp_path / "e"), "--push-to-hub", "me/x"]) == 1
    finally:
        del os.environ["HF_HUB_OFFLINE"]
    assert "HF_HUB_OFFLINE is set" in capsys.readouterr().out
    assert main(["export", str(out), "--out", str(tmp_path / "e"), "--push-to-hub", "me/x/y"]) == 1
    assert "give a hub repository as NAME or ORG/NAME" in capsys.readouterr().out
    assert not (hub.root / "me/x").exists()


def test_push_to_hub_config_is_checked():
    from cpt.config import ConfigError

    base = {"model": {"arch": {"hidden_size": 8}, "tokenizer": "t"}, "data": {"sources": [{"name": "a", "path": "/x"}]},
            "stages": [{"steps": 1, "mix": {"a": 1}}]}
    with pytest.raises(ConfigError, match=r"checkpoint.push_to_hub: 'a b': give a hub repository"):
        load_config(base={**base, "checkpoint": {"push_to_hub": "a b"}})
    with pytest.raises(ConfigError, match="needs export_at_end: true"):
        load_config(base={**base, "checkpoint": {"push_to_hub": "me/x", "export_at_end": False}})
    assert load_config(base={**base, "checkpoint": {"push_to_hub": "org/name.v2"}}).checkpoint.hub_private


def test_cpt_merge_pushes_the_merged_model(tiny_base, tmp_path, hub):
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from cpt.adapters import apply_lora, save_adapter
    from cpt.cli import main
    from cpt.config import LoraConfig

    model = apply_lora(AutoModelForCausalLM.from_pretrained(tiny_base), LoraConfig(r=4, alpha=8))
    adapter = save_adapter(model, tmp_path / "lora" / "adapter", tokenizer=PreTrainedTokenizerFast.from_pretrained(tiny_base))
    assert main(["merge", str(adapter), "--out", str(tmp_path / "merged"), "--push-to-hub", "me/merged"]) == 0
    pushed = hub.root / "me/merged" / "main"
    assert (pushed / "model.safetensors").read_bytes() == (tmp_path / "merged" / "model.safetensors").read_bytes()
    card = (pushed / "README.md").read_text()
    assert "# merged" in card and "The LoRA adapter lora/adapter merged into its base model" in card
    assert str(tmp_path) not in card and ("create_repo", "me/merged", True) in hub.calls
