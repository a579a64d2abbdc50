"""Publishing an export on the Hugging Face Hub: ``checkpoint.push_to_hub`` (the final export, at the end of training)
and ``cpt export/merge ... --push-to-hub REPO``.

What is pushed is the export folder as written (safetensors shards, config, tokenizer; or a peft adapter), plus a
model card (``README.md``, written into the folder first) that says what the model is: the base it was continually
pre-trained from, the steps and tokens, each data source's share per stage, and the last held-out losses of the run
(from its ``metrics.jsonl``). The card names data sources and local models by name only, never by their paths.

The token is huggingface_hub's own (``HF_TOKEN``, or ``hf auth login``); cpt never reads it into its config, logs,
card or checkpoints. A failed push leaves the export where it is and says how to push it again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from cpt.config.outputs import check_hub_repo

CARD = "README.md"


class HubPushError(RuntimeError):
    """A push to the hub failed (one line: what failed, and the command that pushes the folder again)."""


def _published_name(path: str | None) -> str | None:
    """A model named by a hub id as is; a local path by its last component only (paths are not published)."""
    if not path:
        return None
    if os.path.exists(path) or os.path.isabs(path):
        return f"a local model ({'/'.join(Path(path).parts[-2:])})"
    return path


def _last_heldout_losses(run_dir: Path, step: int | None) -> tuple[int | None, dict[str, float]]:
    """The last ``eval/<set>/loss`` of each held-out set logged at or before ``step`` (None: any step)."""
    losses: dict[str, float] = {}
    at = None
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None, losses
    for line in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # (a line cut by a crash)
        if step is not None and int(rec.get("step", 0)) > step:
            continue
        found = {k[len("eval/"):-len("/loss")]: float(v) for k, v in rec.items()
                 if k.startswith("eval/") and k.endswith("/loss") and k.count("/") == 2 and isinstance(v, (int, float))}
        if found:
            losses.update(found)
            at = int(rec.get("step", 0))
    return at, losses


def model_card(folder: Path, config: dict[str, Any] | None, run_dir: Path | None, step: int | None,
               tokens: int | None, title: str | None = None) -> str:
    """The model card of an export (``title``: its repository's name): YAML metadata the hub reads, then what the
    run did."""
    adapter = (folder / "adapter_config.json").is_file()
    model, train = (config or {}).get("model") or {}, (config or {}).get("train") or {}
    base = _published_name(train.get("init_from")) or _published_name(model.get("name_or_path"))
    meta = ["---", f"library_name: {'peft' if adapter else 'transformers'}", "tags:", "- cpt", "- continual-pretraining"]
    if base and not base.startswith("a local model"):
        meta.append(f"base_model: {base}")
    lines = meta + ["---", "", f"# {title or folder.name}", ""]
    what = "A LoRA adapter" if adapter else "A model"
    done = ", ".join(x for x in (f"{step:,} steps" if step is not None else "",
                                 f"{tokens:,} tokens" if tokens is not None else "") if x)
    lines.append(f"{what} continually pre-trained with cpt from {base or 'a model initialised from its config'}"
                 + (f": {done}" if done else "") + ".")
    seq_len = ((config or {}).get("data") or {}).get("seq_len")
    stages = (config or {}).get("stages") or []
    replay = {src.get("name") for src in ((config or {}).get("data") or {}).get("sources") or [] if src.get("replay")}
    if stages:
        lines += ["", "## Data", "", "| stage | steps | mix |", "|---|---|---|"]
        for i, s in enumerate(stages):
            mix = ", ".join(f"{name}{' (replay)' if name in replay else ''} {float(share):.3g}"
                            for name, share in (s.get("mix") or {}).items())
            lines.append(f"| {s.get('name') or i} | {s.get('steps')} | {mix} |")
        if seq_len:
            lines.append(f"\nSequence length {seq_len}.")
    if run_dir is not None:
        at, losses = _last_heldout_losses(run_dir, step)
        if losses:
            lines += ["", f"## Held-out loss (step {at:,})", "", "| set | loss (nats/token) |", "|---|---|"]
            lines += [f"| {name} | {loss:.4f} |" for name, loss in sorted(losses.items())]
    return "\n".join(lines) + "\n"


def push_folder(folder: str | os.PathLike, repo_id: str, *, private: bool = True, revision: str | None = None,
                card: str | None = None, message: str | None = None) -> str:
    """Create ``repo_id`` if needed (private unless told), write ``card`` as the folder's README.md (an existing
    README.md is kept), and upload the folder as one commit (to ``revision``, a branch created if needed).
    Returns the commit's URL."""
    folder = Path(folder)
    check_hub_repo(repo_id)
    again = f"push it again with `hf upload {repo_id} {folder.resolve()}`"
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        raise HubPushError(f"push to {repo_id}: HF_HUB_OFFLINE is set, so nothing can be uploaded; the export is in "
                           f"{folder}: {again} where the hub is reachable")
    if card is not None and not (folder / CARD).exists():
        (folder / CARD).write_text(card)
    from huggingface_hub import HfApi

    api = HfApi()  # (its token: HF_TOKEN or the stored login; never passed through cpt)
    try:
        repo = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model").repo_id
        if revision:
            api.create_branch(repo, branch=revision, exist_ok=True)
        info = api.upload_folder(repo_id=repo, folder_path=str(folder), revision=revision,
                                 commit_message=message or f"cpt export {folder.name}")
    except Exception as e:  # noqa: BLE001 - network, auth, quota: one line; the export stays on disk
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise HubPushError(f"push of {folder} to {repo_id} failed ({type(e).__name__}: {first}); the export is on "
                           f"disk: {again}") from None
    return getattr(info, "commit_url", None) or f"https://huggingface.co/{repo}"


def card_for_checkpoint(folder: str | os.PathLike, ckpt: str | os.PathLike, title: str | None = None) -> str:
    """The model card of an export of checkpoint ``ckpt`` (a checkpoint or run directory): its config.yaml, step
    and tokens, and its run's held-out losses up to that step."""
    import yaml

    from cpt.checkpoint import resolve_checkpoint, saved_train_state

    ckpt = resolve_checkpoint(ckpt)
    state = saved_train_state(ckpt)
    config = yaml.safe_load((ckpt / "config.yaml").read_text())
    return model_card(Path(folder), config, ckpt.parent.parent, int(state["step"]), int(state.get("tokens", 0)) or None,
                      title)


def card_for_export(folder: str | os.PathLike, source: str | os.PathLike, title: str | None = None) -> str:
    """The model card of ``folder``, a merge of the adapter ``source``: of a cpt run (RUN/export, RUN/exports/step_N)
    the run's card up to that step; elsewhere a short one."""
    import yaml

    src = Path(source).resolve()
    for run in (src.parent, src.parent.parent):
        if (run / "config.yaml").is_file() and (run / "metrics.jsonl").is_file():
            step = int(src.name.split("_")[-1]) if src.name.startswith("step_") and src.name[5:].isdigit() else None
            config = yaml.safe_load((run / "config.yaml").read_text())
            return model_card(Path(folder), config, run, step, None, title)
    return "\n".join(["---", "library_name: transformers", "tags:", "- cpt", "---", "", f"# {title or Path(folder).name}", "",
                      f"The LoRA adapter {'/'.join(src.parts[-2:])} merged into its base model by cpt merge.", ""])


def add_push_arguments(p) -> None:
    """``--push-to-hub REPO``, ``--public``, ``--hub-revision BRANCH`` for a command that writes an export."""
    p.add_argument("--push-to-hub", metavar="REPO", default=None,
                   help="then upload the folder (with a model card) to this Hugging Face Hub model repository "
                        "(ORG/NAME; created private if missing; token: HF_TOKEN or `hf auth login`)")
    p.add_argument("--public", action="store_true", help="with --push-to-hub: create the repository public")
    p.add_argument("--hub-revision", metavar="BRANCH", default=None, help="with --push-to-hub: push to this branch")


def push_run_export(cfg, export_dir: Path, step: int, tokens: int, say) -> None:
    """``checkpoint.push_to_hub`` at the end of a run (main process): the final export with its model card. A failed
    push is one line (the export stays on disk, the run has succeeded): it does not fail a finished run."""
    from cpt.config import config_to_dict

    c = cfg.checkpoint
    card = model_card(export_dir, config_to_dict(cfg), Path(cfg.run.output_dir), step, tokens, c.push_to_hub.split("/")[-1])
    try:
        say(f"pushed {export_dir} to {push_folder(export_dir, c.push_to_hub, private=c.hub_private, revision=c.hub_revision, card=card)}")
    except HubPushError as e:
        say(f"WARNING: {e}")
