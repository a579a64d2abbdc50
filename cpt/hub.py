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
import shutil
import tempfile
from pathlib import Path
from typing import Any

from cpt.config.outputs import HUB_REPO, check_hub_repo

CARD = "README.md"


class HubPushError(RuntimeError):
    """A push to the hub failed (one line: what failed, and the command that pushes the folder again)."""


def _is_hub_id(name: str) -> bool:
    """Whether ``name`` reads as a hub model id (``name`` or ``org/name``) rather than a local path."""
    return (not os.path.exists(name) and not os.path.isabs(name) and not name.startswith((".", "~"))
            and HUB_REPO.match(name) is not None)


def _published_name(path: str | None) -> str | None:
    """A model named by a hub id as is; a local path (also a relative one that does not exist here: ``cpt export`` run
    from another directory) by its last component only: paths (a home directory's user name) are not published."""
    if not path:
        return None
    if _is_hub_id(path):
        return path
    return f"a local model ({_local_name(path)})"


def _local_name(path: str) -> str:
    """A local path as published: its last component alone."""
    return Path(os.path.normpath(path)).name or path


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
            rec_step = int(rec.get("step") or 0)
        except (ValueError, TypeError, AttributeError):
            continue  # (a line cut by a crash, or not a record)
        if step is not None and rec_step > step:
            continue
        found = {k[len("eval/"):-len("/loss")]: float(v) for k, v in rec.items()
                 if k.startswith("eval/") and k.endswith("/loss") and k.count("/") == 2 and isinstance(v, (int, float))}
        if found:
            losses.update(found)
            at = rec_step
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
            lines.append(f"| {s.get('name') or i} | {s.get('steps')} | {_stage_mix(s, frozenset(replay))} |")
        if seq_len:
            lines.append(f"\nSequence length {seq_len}.")
    if run_dir is not None:
        at, losses = _last_heldout_losses(run_dir, step)
        if losses:
            lines += ["", f"## Held-out loss (step {at:,})", "", "| set | loss (nats/token) |", "|---|---|"]
            lines += [f"| {name} | {loss:.4f} |" for name, loss in sorted(losses.items())]
    return "\n".join(lines) + "\n"


def _stage_mix(stage: dict, replay: frozenset[str]) -> str:
    """A saved config's stage mix as trained: normalised shares, a mix_ramp's first -> last step
    (cpt.config.stages.describe_shares); the weights as written if the stage does not validate (an older config)."""
    from pydantic import ValidationError

    from cpt.config.stages import StageConfig, describe_shares

    try:
        return describe_shares(StageConfig.model_validate(stage), replay)
    except ValidationError:  # a card is still written for a config this version cannot read
        return ", ".join(f"{name}{' (replay)' if name in replay else ''} {share}" for name, share in (stage.get("mix") or {}).items())


def push_folder(folder: str | os.PathLike, repo_id: str, *, private: bool = True, revision: str | None = None,
                card: str | None = None, message: str | None = None) -> str:
    """Create ``repo_id`` if needed (private unless told), write ``card`` as the folder's README.md (an existing
    README.md is kept, except peft's generated one in an adapter export), and upload the folder as one commit (to
    ``revision``, a branch created if needed). Returns the commit's URL.

    A peft adapter export names its base as the run did (``base_model_name_or_path`` in ``adapter_config.json`` and
    ``cpt_adapter.json``, ``base_model`` in peft's card): a local base is an absolute path there, which ``cpt merge``
    uses on this machine. What is uploaded is a copy (hard links, but for those files) naming a local base by its
    directory's name only, with cpt's card in place of peft's; the export on disk is left as it is."""
    folder = Path(folder)
    check_hub_repo(repo_id)
    adapter = (folder / ADAPTER_CONFIG).is_file()
    flags = (" --private" if private else "") + (f" --revision {revision}" if revision else "")
    again = f"push it again with `hf upload {repo_id} {folder.resolve()}{flags}`" + (
        f" (first set base_model_name_or_path in {ADAPTER_CONFIG} to the base's hub id: it names a local base by its "
        "path)" if adapter else "")
    try:  # the card first, also offline: the `hf upload` the error suggests then publishes it (a full disk at the
        if card is not None and not adapter and not (folder / CARD).exists():  # end of a run: a failed push, not run)
            (folder / CARD).write_text(card)
    except OSError as e:
        raise HubPushError(f"push to {repo_id}: cannot write the model card into {folder} ({e}); {again}") from None
    if hub_offline():
        raise HubPushError(f"push to {repo_id}: HF_HUB_OFFLINE is set, so nothing can be uploaded; the export is in "
                           f"{folder}: {again} where the hub is reachable")
    try:
        from huggingface_hub import HfApi

        api = HfApi()  # (its token: HF_TOKEN or the stored login; never passed through cpt)
        repo = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model").repo_id
        if revision:
            api.create_branch(repo, branch=revision, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".hub-{folder.name}-", dir=folder.parent) as staging:
            upload = _publishable_adapter(folder, Path(staging) / folder.name, card) if adapter else folder
            info = api.upload_folder(repo_id=repo, folder_path=str(upload), revision=revision,
                                     commit_message=message or f"cpt export {folder.name}")
    except Exception as e:  # noqa: BLE001 - network, auth, quota, disk: one line; the export stays on disk
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise HubPushError(f"push of {folder} to {repo_id} failed ({type(e).__name__}: {first}); the export is on "
                           f"disk: {again}") from None
    return getattr(info, "commit_url", None) or f"https://huggingface.co/{repo}"


ADAPTER_CONFIG = "adapter_config.json"
_NAMES_BASE = (ADAPTER_CONFIG, "cpt_adapter.json")  # the files of an adapter export that name its base


def _publishable_adapter(folder: Path, copy: Path, card: str | None) -> Path:
    """``copy``: ``folder`` (an adapter export) linked file by file, its base named without its local path in the files
    that name it, and ``card`` as README.md unless the folder's own is not peft's generated one."""
    copy.mkdir()
    for src in folder.rglob("*"):
        dst = copy / src.relative_to(folder)
        if src.is_dir():
            dst.mkdir(exist_ok=True)
        elif src.name in _NAMES_BASE and src.parent == folder:
            doc = json.loads(src.read_text())
            base = doc.get("base_model_name_or_path")
            if base and not _is_hub_id(base):
                doc["base_model_name_or_path"] = _local_name(base)
            dst.write_text(json.dumps(doc, indent=2))
        elif src.name == CARD and src.parent == folder:
            if not _is_peft_card(src):  # a card of the user's own is kept; peft's template (its base_model: the local
                shutil.copyfile(src, dst)  # path) is replaced by ``card`` below, or left out
        else:
            try:
                os.link(src, dst)
            except OSError:  # (another file system, or no hard links there)
                shutil.copyfile(src, dst)
    if card is not None and not (copy / CARD).exists():
        (copy / CARD).write_text(card)
    return copy


def _is_peft_card(path: Path) -> bool:
    """Whether README.md is the template peft's ``save_pretrained`` writes (placeholders, its local base path)."""
    text = path.read_text(errors="replace")
    return "library_name: peft" in text and "More Information Needed" in text


def hub_offline() -> bool:
    """huggingface_hub's offline mode (``HF_HUB_OFFLINE``): nothing can be uploaded."""
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def check_push_target(repo_id: str) -> str | None:
    """What stops a push to ``repo_id`` before any work is done (a malformed name, offline mode), or None."""
    try:
        check_hub_repo(repo_id)
    except ValueError as e:
        return f"--push-to-hub {e}"
    if hub_offline():
        return ("--push-to-hub: HF_HUB_OFFLINE is set, so nothing can be uploaded: run where the hub is reachable "
                "without it, or leave out --push-to-hub")
    return None


def card_for_checkpoint(folder: str | os.PathLike, ckpt: str | os.PathLike, title: str | None = None) -> str:
    """The model card of an export of checkpoint ``ckpt`` (a checkpoint or run directory): its config.yaml, step
    and tokens, and its run's held-out losses up to that step."""
    import yaml

    from cpt.checkpoint import resolve_checkpoint, saved_train_state
    from cpt.resume import run_dir_of

    ckpt = resolve_checkpoint(ckpt)
    state = saved_train_state(ckpt)
    config = yaml.safe_load((ckpt / "config.yaml").read_text())
    return model_card(Path(folder), config, run_dir_of(ckpt), int(state["step"]), int(state.get("tokens", 0)) or None,
                      title)


def card_for_export(folder: str | os.PathLike, source: str | os.PathLike, title: str | None = None) -> str:
    """The model card of ``folder``, a merge of the adapter ``source``: of a cpt run (RUN/export, RUN/exports/step_N)
    the run's card up to that step; elsewhere a short one."""
    import yaml

    from cpt.resume import run_dir_around

    src = Path(source).resolve()
    run = run_dir_around(src)
    if run is not None:
        step = int(src.name.split("_")[-1]) if src.name.startswith("step_") and src.name[5:].isdigit() else None
        config = yaml.safe_load((run / "config.yaml").read_text())
        return model_card(Path(folder), config, run, step, None, title)
    return "\n".join(["---", "library_name: transformers", "tags:", "- cpt", "---", "", f"# {title or Path(folder).name}", "",
                      f"The LoRA adapter `{src.name}` merged into its base model by cpt merge.", ""])


def add_push_arguments(p) -> None:
    """``--push-to-hub REPO``, ``--public``, ``--hub-revision BRANCH`` for a command that writes an export."""
    p.add_argument("--push-to-hub", metavar="REPO", default=None,
                   help="then upload the folder (with a model card) to this Hugging Face Hub model repository "
                        "(ORG/NAME; created private if missing; token: HF_TOKEN or `hf auth login`)")
    p.add_argument("--public", action="store_true", help="with --push-to-hub: create the repository public")
    p.add_argument("--hub-revision", metavar="BRANCH", default=None, help="with --push-to-hub: push to this branch")


def push_flags_problem(args) -> str | None:
    """``--public`` or ``--hub-revision`` without ``--push-to-hub`` (they did nothing, without a word)."""
    given = [f for f, v in (("--public", args.public), ("--hub-revision", args.hub_revision)) if v]
    if given and not args.push_to_hub:
        return f"{' and '.join(given)} go with --push-to-hub REPO (nothing is pushed without it)"
    return None


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
