"""Where a run starts: fresh, resumed from its newest complete checkpoint (``--resume``), a new stage from another
run's weights (``train.init_from``: an HF export, a cpt checkpoint or a run directory), or an anneal branch of a
checkpoint (``train.init_from`` + ``train.anneal_steps``: the trunk's whole state, then a short decay).

:func:`resolve_start` decides it before anything is loaded or written, the same on every rank (the main process lists
the checkpoints, the ranks share reading and verifying them: :class:`SharedCheck`), and refuses what would silently
go wrong: a fresh start into a directory that holds checkpoints, a ``--resume`` whose config changes the training
trajectory.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from cpt.adapter_checkpoint import STAGE_BASE_DIR
from cpt.checkpoint import (TRAINER_STATE, UNUSABLE_PREFIX, CheckpointError, latest_valid_checkpoint, list_checkpoints,
                            resolve_checkpoint, saved_train_state)
from cpt.checkpoint_dir import LocalCheck, checkpoint_size, interrupted_replaces, remove_partial_saves, verify_checkpoint
from cpt.config import RunConfig, load_config, trajectory_changes
from cpt.distributed import from_every_rank, from_main_process, rank_and_world


@dataclass
class Start:
    resume: Path | None = None  # --resume: continue this checkpoint (weights, optimizer, RNG, every component)
    init: Path | None = None  # train.init_from a cpt checkpoint: its weights (+ optimizer state)
    init_hf: str | None = None  # train.init_from an HF model directory: its weights (a LoRA stage on a full model's
    # checkpoint: the base written from it into the run directory, cpt/stage_base.py)
    branch: bool = False  # train.anneal_steps from ``init``: an anneal branch continues the trunk's whole state
    requeued: bool = False  # --resume with no checkpoint to resume (a requeue before the first one): from scratch, but
    # the same run (its W&B run continues; metrics.jsonl restarts, as a resume drops the lines after its checkpoint)

    @property
    def state_from(self) -> Path | None:
        """The checkpoint whose registered components (step, data position, evaluator, ...) the run continues."""
        return self.resume or (self.init if self.branch else None)

    def metrics_resumed_at(self, step: int) -> int | None:
        """The step up to which the run keeps its metrics (and continues its W&B run): ``step`` (the restored one) when
        resumed, -1 for a requeue before the first checkpoint (none kept, the same W&B run), None for a new run."""
        return step if self.resume is not None else -1 if self.requeued else None


# what an anneal branch may switch on though its trunk ran without it: the loop starts it at the branch point
SWITCHED_ON_IN_A_BRANCH = {"ema": "train.ema_decay (the EMA)", "reptile": "train.reptile (its anchor)",
                           "spikes": "train.skip_spikes (its window)"}


def switched_on_in_branch(start: Start, registered) -> list[str]:
    """The names in ``registered`` (SWITCHED_ON_IN_A_BRANCH's) an anneal branch has and its trunk checkpoint holds no
    state for: a branch is a new run, they start at the branch point (a resume's missing state is refused instead)."""
    if not start.branch:
        return []
    saved = json.loads((start.init / TRAINER_STATE).read_text())
    return [n for n in SWITCHED_ON_IN_A_BRANCH if n in registered and n not in saved]


def resolve_start(cfg: RunConfig, resume: bool, allow_config_change: bool, acc, say=print) -> Start:
    """Where this run starts (collective: every rank calls it). ``resume``: ``--resume`` (or checkpoint.resume)."""
    run_dir = Path(cfg.run.output_dir)
    start = Start(resume=find_resume_checkpoint(run_dir, acc, say) if resume else None)  # or from scratch, saying so
    start.requeued = resume and start.resume is None
    if start.resume is None:
        start.init, start.init_hf = init_weights(cfg, SharedCheck(acc))  # (a checkpoint: the model its own run built, followed back)
        start.branch = start.init is not None and bool(cfg.train.anneal_steps)
    else:
        start.init_hf = base_model_dir(cfg, run_dir)  # the model built as at the first start (a LoRA checkpoint: its base)
        if cfg.train.anneal_steps:
            note = check_resume_is_a_branch(start.resume, cfg)
            if note:
                say(note)
        if not allow_config_change:
            check_resume_config(start.resume, cfg)
        else:
            for line in changed_config_notes(start.resume, cfg):
                say(line)
        check_resume_within_plan(start.resume, cfg)
    if start.resume is None and acc.is_main_process:
        check_fresh_run_dir(run_dir, resume, branch=start.branch)  # (find_resume_checkpoint said when --resume finds nothing to resume)
    acc.wait_for_everyone()
    return start


def anneal_branch_start(cfg: RunConfig, init: Path | None) -> int:
    """The trunk step an anneal branch (``train.anneal_steps``) starts at: the step of its cpt checkpoint ``init``
    (``resolve_init``). Refused in one line when ``train.init_from`` is an HF model (no step, optimizer or data position)
    or the checkpoint is not in a constant or stable phase of the schedule. (The run and ``--dry-run`` check it.)"""
    from cpt.schedules import plan_for_run

    if init is None:
        raise CheckpointError(f"--anneal (train.anneal_steps) branches off a cpt checkpoint of the trunk: give it "
                              f"with --from CKPT (a checkpoint or run directory); {cfg.train.init_from} is an HF model")
    saved = saved_train_state(init)
    step = int(saved["step"])
    if saved.get("anneal_from") is not None:  # its LR is already decaying: a new anneal would start it at the trunk's again
        raise CheckpointError(
            f"--anneal from {cfg.train.init_from} (step {step}): it is an anneal branch's checkpoint (branched off the "
            f"trunk at step {saved['anneal_from']}), whose LR is already decaying: branch from a checkpoint of the trunk, "
            "or continue that branch with --resume in its own directory")
    try:
        plan_for_run(cfg, anneal_from=step)
    except ValueError as e:
        raise CheckpointError(f"--anneal from {cfg.train.init_from} (step {step}): {e}") from None
    return step


def find_resume_checkpoint(run_dir: str | os.PathLike, acc, say=print) -> Path | None:
    """The checkpoint ``--resume`` continues from (collective: every rank calls it), the same on every rank: the main
    process's listing, the reading shared (:class:`SharedCheck`; one warning per broken checkpoint). Broken
    checkpoints newer than it are set aside as ``unusable-step_N`` so that neither pruning nor the fresh-run check
    mistakes them for real ones; with none complete the run starts from scratch and says so."""
    unusable: list[Path] = []
    check = SharedCheck(acc)
    root = Path(run_dir) / "checkpoints"
    if acc.is_main_process and root.is_dir():  # (before the main process lists them for every rank; the run is locked)
        # (cleaned here too: a resume that saves nothing, at its last step, left them for good)
        for restored in remove_partial_saves(root):
            say(f"restored {restored.name}: a save that was replacing it with a new copy of its step was interrupted")
    ckpt = latest_valid_checkpoint(run_dir, unusable, check)
    if acc.is_main_process:
        if ckpt is not None:  # (at scale the check is a read of the whole checkpoint: its time, in the log)
            files, size = checkpoint_size(ckpt)
            by = f", {check.world} processes sharing the reading" if check.world > 1 else ""
            say(f"checkpoint {ckpt.name} verified: {files} files, {size / 1e9:,.2f} GB in {check.took[ckpt]:.1f} s{by}")
        for bad in unusable:
            os.replace(bad, set_aside_name(bad))
        if unusable:
            say(f"set aside {len(unusable)} unusable checkpoint(s) as {UNUSABLE_PREFIX}step_N in {Path(run_dir) / 'checkpoints'}")
        if ckpt is None:
            say(f"--resume: no complete checkpoint in {Path(run_dir) / 'checkpoints'}: starting from scratch")
    acc.wait_for_everyone()  # (set aside before any rank looks at the folder again)
    return ckpt


class SharedCheck(LocalCheck):
    """Finding and checking checkpoints in a multi-process run (collective: every rank makes the same calls): the
    main process lists the checkpoints (every rank then weighs the same ones, even while another run is adding to
    that folder), each rank reads and hashes its share of a checkpoint's files (cpt.checkpoint_dir.reader_share: a
    multi-node job reads a large checkpoint at the nodes' combined bandwidth, not one process's, and never once per
    rank), and every rank gets the same verdict; only the main process warns."""

    def __init__(self, acc):
        self.acc, (self.rank, self.world) = acc, rank_and_world(acc)
        self.warns = self.rank == 0
        self.took: dict[Path, float] = {}  # seconds each verification took (the slowest rank's)

    def listing(self, run_dir: str | os.PathLike) -> list[Path]:
        listed = [str(p) for p in list_checkpoints(run_dir)] if self.rank == 0 else None
        return [Path(p) for p in from_main_process(self.acc, listed)]

    def verify(self, ckpt: Path) -> str | None:
        t0 = time.perf_counter()
        found = from_every_rank(self.acc, verify_checkpoint(ckpt, part=(self.rank, self.world)))
        self.took[ckpt] = time.perf_counter() - t0
        return next((problem for problem in found if problem is not None), None)


def set_aside_name(ckpt: Path) -> Path:
    """A free name for a broken checkpoint set aside: ``unusable-step_N``, or ``unusable-step_N.2``, ``.3``, ... when a
    checkpoint of that step was set aside before (a resumed run saved the step again, and that save broke too: renaming
    onto the earlier one failed, and every later --resume with it)."""
    target, n = ckpt.with_name(UNUSABLE_PREFIX + ckpt.name), 1
    while target.exists():
        n += 1
        target = ckpt.with_name(f"{UNUSABLE_PREFIX}{ckpt.name}.{n}")
    return target


def resolve_init(init_from: str | None, check: LocalCheck = LocalCheck()) -> tuple[Path | None, str | None]:
    """(cpt checkpoint, HF export dir) for train.init_from; exactly one is set when init_from is. ``check``: how a
    checkpoint is found and verified (:class:`SharedCheck` in a run, whose ranks all call this)."""
    if init_from is None:
        return None, None
    from cpt.model import require_safetensors  # an HF directory must hold safetensors weights: one clear line

    p = Path(init_from)
    if (p / "config.json").is_file():
        require_safetensors(p, "train.init_from")
        return None, str(p)
    if (p / TRAINER_STATE).is_file() or (p / "checkpoints").is_dir():
        return resolve_checkpoint(p, check), None
    if (p / "export" / "config.json").is_file():
        require_safetensors(p / "export", "train.init_from")
        return None, str(p / "export")
    if (p / "adapter_config.json").is_file():
        raise CheckpointError(f"train.init_from: {init_from} is a peft adapter, not a model; merge it into its base "
                              f"first (cpt merge {init_from} --out MERGED) and start from MERGED")
    raise CheckpointError(f"train.init_from: {init_from} is neither an HF model directory nor a cpt checkpoint or run directory")


def base_model_dir(cfg: RunConfig, run_dir: str | os.PathLike | None = None, _seen: tuple[str, ...] = ()) -> str | None:
    """The HF model directory a run's model was built from when not ``model.name_or_path`` / ``model.arch``: an HF
    ``train.init_from`` (as :func:`resolve_init` reads it); the base a LoRA run from a full model's cpt checkpoint wrote
    into its run directory ``run_dir`` (``base/``: cpt/stage_base.py); or, from a cpt checkpoint (a new stage, an anneal
    branch), the one that run's model came from (its config.yaml and run directory, followed back). A new stage,
    resume, ``cpt export`` and the dry run build this model again: its config (the checkpoint's weights go on top) and,
    for a LoRA run, the frozen base its checkpoints leave out (cpt/adapter_checkpoint.py). None: the run's own ``model``
    section (also for a chain whose checkpoint is no longer there; a LoRA base's fingerprint check then compares)."""
    if cfg.train.init_from is None:
        return None
    p = Path(cfg.train.init_from)
    if (p / "config.json").is_file():
        return str(p)
    if (cfg.model.lora or cfg.model.vocab) is not None and run_dir is not None and \
            (Path(run_dir) / STAGE_BASE_DIR / "config.json").is_file():
        return str((Path(run_dir) / STAGE_BASE_DIR).absolute())  # (the earlier run's checkpoint may be gone)
    if (p / TRAINER_STATE).is_file() or (p / "checkpoints").is_dir():  # (a checkpoint's or run's config.yaml)
        try:
            earlier = load_config(p / "config.yaml")
        except (OSError, ValueError):
            return None
        seen = (*_seen, str(p.resolve()))
        return None if str(p.resolve()) in _seen else base_model_dir(earlier, run_dir_of(p), seen)
    return str(p / "export") if (p / "export" / "config.json").is_file() else None


def run_dir_of(ckpt: str | os.PathLike) -> Path | None:
    """The run directory of a cpt checkpoint (``RUN/checkpoints/step_N``) or run directory; None for a loose one."""
    p = Path(ckpt)
    if (p / "checkpoints").is_dir():
        return p
    return p.parent.parent if p.parent.name == "checkpoints" else None


def run_dir_around(path: str | os.PathLike) -> Path | None:
    """The cpt run directory ``path`` lies in (RUN, RUN/export, RUN/exports/step_N, RUN/checkpoints/step_N): its
    config.yaml beside metrics.jsonl, at ``path`` itself or up to two folders up; None outside a run."""
    p = Path(path).resolve()
    return next((d for d in (p, p.parent, p.parent.parent)
                 if (d / "config.yaml").is_file() and (d / "metrics.jsonl").is_file()), None)


def init_weights(cfg: RunConfig, check: LocalCheck = LocalCheck()) -> tuple[Path | None, str | None]:
    """(cpt checkpoint, HF model directory) a new run starts from: :func:`resolve_init`, and for a checkpoint the
    model its run was built from (:func:`base_model_dir`), which this run builds before loading the checkpoint."""
    init, init_hf = resolve_init(cfg.train.init_from, check)
    if init is None and init_hf is not None and cfg.train.init_optimizer:  # (ignored: a fresh optimizer, not a word)
        raise CheckpointError(f"train.init_optimizer: {init_hf} is an HF model, which holds no optimizer state: give "
                              "train.init_from a cpt checkpoint or run directory, or set train.init_optimizer: false")
    return init, base_model_dir(cfg) if init is not None else init_hf


def check_fresh_run_dir(run_dir: Path, resume: bool = False, branch: bool = False) -> None:
    """A fresh start must not mix with an earlier run's checkpoints, nor overwrite a finished run's export. Partial
    saves (.tmp-*) do not count: `--resume` with nothing complete to resume from (a first start, or a job killed
    during its first save) starts fresh. ``branch``: an anneal branch, which needs a directory of its own."""
    if list_checkpoints(run_dir) or interrupted_replaces(run_dir / "checkpoints"):
        if branch:  # the trunk's own directory (the config's run.output_dir), or an earlier run's or branch's
            raise CheckpointError(f"{run_dir} already holds checkpoints (another run's or branch's): an anneal branch "
                                  "writes to a run directory of its own: give --output-dir a new directory for the branch "
                                  "(or add --resume to continue a branch that was started there)")
        if resume:
            raise CheckpointError(f"{run_dir / 'checkpoints'} holds checkpoints but none is usable (see the warnings above): "
                                  "move them away to start over, or choose another run.output_dir")
        raise CheckpointError(
            f"{run_dir} already holds checkpoints: pass --resume to continue that run, or choose another run.output_dir"
        )
    export = run_dir / "export"
    if export.is_dir() and any(export.iterdir()):
        # a finished run saved without checkpoints (checkpoint.every: null): starting over would overwrite its export
        raise CheckpointError(
            f"{run_dir} holds a finished run's export ({export}) and no checkpoint to continue from: starting over "
            "would overwrite it; choose another run.output_dir, or move export/ away to train this run again"
        )
    periodic = sorted(p.name for p in (run_dir / "exports").glob("step_*") if p.is_dir())
    # (a run killed without checkpoints, or with export_at_end: false: its exports were overwritten by another; a
    # --resume with nothing to resume from is this run again, from its start, rewriting its own exports)
    if periodic and not resume:
        raise CheckpointError(
            f"{run_dir} holds an earlier run's exports ({run_dir / 'exports'}: {', '.join(periodic[:3])}"
            f"{', ...' if len(periodic) > 3 else ''}) and no checkpoint to continue from: starting over would overwrite "
            "them; choose another run.output_dir, or move exports/ away to train this run again"
        )


def check_resume_is_a_branch(ckpt: Path, cfg: RunConfig) -> str | None:
    """``--resume`` with ``train.anneal_steps`` continues an anneal branch from its own checkpoint, which holds its branch
    point. A trunk's checkpoint holds none: ``--resume --anneal N`` in the trunk's directory (with
    ``--allow-config-change``) annealed the trunk in place from its newest step, whatever ``--from`` said. Returns a
    warning when ``--from`` names another checkpoint than the one the branch was started from (it is not used)."""
    from cpt.data.loader import same_folder

    anneal_from = saved_train_state(ckpt).get("anneal_from")
    if anneal_from is not None:
        started = ((yaml.safe_load((ckpt / "config.yaml").read_text()) or {}).get("train") or {}).get("init_from") \
            if (ckpt / "config.yaml").is_file() else None
        given = cfg.train.init_from
        if given and started and same_folder(given) != same_folder(started):
            return (f"warning: --resume continues the anneal branch in {ckpt.parent.parent}, started with --from "
                    f"{started} (branched at step {anneal_from}); --from {given} is not used. To branch from it instead, "
                    "leave --resume out and give a new --output-dir")
        return None
    raise CheckpointError(
        f"--resume with --anneal (train.anneal_steps): {ckpt} is a trunk checkpoint, not an anneal branch's: "
        f"--resume continues a branch in its own run directory. To branch off the trunk, leave --resume out: "
        f"cpt train CONFIG --from {ckpt} --anneal {cfg.train.anneal_steps} --output-dir NEW_DIR")


def check_resume_config(ckpt: Path, cfg: RunConfig) -> None:
    """``--resume`` must not change the fields that change the training trajectory (``--allow-config-change`` skips this)."""
    if not (ckpt / "config.yaml").is_file():
        return
    changed = trajectory_changes(yaml.safe_load((ckpt / "config.yaml").read_text()) or {}, cfg)
    if changed:
        raise CheckpointError(
            f"--resume: this config differs from the one {ckpt} was trained with in fields that change the "
            f"training trajectory: {_listed(changed)}. Restore them, start a new stage with train.init_from, or "
            "pass --allow-config-change to resume anyway"
        )


def _listed(changed: list[str], most: int = 12) -> str:
    """The changed trajectory fields for one line: the first ``most``, and how many more."""
    return "; ".join(changed[:most]) + (f"; and {len(changed) - most} more" if len(changed) > most else "")


def _plan_end(cfg: RunConfig, anneal_from: int | None) -> int:
    """The step a run with config ``cfg`` ends at (an anneal branch's: its branch point plus ``train.anneal_steps``)."""
    return anneal_from + cfg.train.anneal_steps if cfg.train.anneal_steps and anneal_from is not None else cfg.total_steps


def check_resume_within_plan(ckpt: Path, cfg: RunConfig) -> None:
    """A ``--resume`` (``--allow-config-change``) whose plan ends before the checkpoint's step: refused in one line. It
    used to finish at once at the checkpoint's step, exporting those weights as the run's end, the shorter plan ignored."""
    train_state = saved_train_state(ckpt)
    anneal_from = train_state.get("anneal_from")
    step, end = int(train_state["step"]), _plan_end(cfg, anneal_from)
    if step > end:
        longer = (f"give train.anneal_steps (--anneal) at least {step - anneal_from}" if cfg.train.anneal_steps and
                  anneal_from is not None else f"give the stages at least {step} steps in all")
        raise CheckpointError(
            f"--resume: {ckpt} is at step {step}, past the end of this config's plan ({end} steps): a run cannot be "
            f"shortened behind its checkpoint. To go on, {longer}; or take that checkpoint's weights as they are "
            f"(cpt export {ckpt} --out DIR)")


def changed_config_notes(ckpt: Path, cfg: RunConfig) -> list[str]:
    """What a ``--resume --allow-config-change`` changes, for the log: the trajectory fields that differ from the
    checkpoint's config.yaml, and whether the LR plan differs at a step already taken (a longer cosine stage, a moved
    anneal): the resumed run then jumps from the LR the checkpoint's plan had next to this plan's."""
    if not (ckpt / "config.yaml").is_file():
        return []
    saved = yaml.safe_load((ckpt / "config.yaml").read_text()) or {}
    changed = trajectory_changes(saved, cfg)
    if not changed:
        return []
    train_state = saved_train_state(ckpt)
    step = int(train_state["step"])
    notes = [f"--allow-config-change: resuming {ckpt} (step {step}) with a config that differs in fields that change "
             f"the training trajectory: {_listed(changed)}. The new values apply from step {step} on"]
    jump = _lr_jump(saved, cfg, step, train_state.get("anneal_from"))
    if jump:
        notes.append(jump)
    return notes + _missed_stage_starts(saved, cfg, step)


def _missed_stage_starts(saved: dict, cfg: RunConfig, step: int) -> list[str]:
    """A stage that now starts before the resumed ``step`` at a step where the checkpoint's run did not switch stages:
    what happens at a stage's start (its reset_optimizer, the dense evaluations after it) is not replayed."""
    if cfg.train.anneal_steps:  # (a branch's stages are its trunk's: it switches none)
        return []
    old_steps = [int(st.get("steps") or 0) for st in saved.get("stages") or [] if isinstance(st, dict)]
    switched = {sum(old_steps[:i]) for i in range(len(old_steps))}
    notes, at = [], 0
    for i, st in enumerate(cfg.stages):
        if 0 < at < step and at not in switched:
            reset = f" (stages.{i}.reset_optimizer is not applied)" if st.reset_optimizer else ""
            notes.append(f"warning: stage {i} ({st.name!r}) now starts at step {at}, before step {step} where the run "
                         f"resumes, and the checkpoint's run did not switch stages there: its start is not replayed"
                         f"{reset}; its mix and LR apply from step {step}")
        at += st.steps
    return notes


def _lr_jump(saved: dict, cfg: RunConfig, step: int, anneal_from: int | None) -> str | None:
    """One line when this config's LR plan differs from the checkpoint's at a step before ``step`` (the steps already
    taken followed the old plan, so the LR jumps at ``step``); None when only later steps change."""
    from cpt.config import validate
    from cpt.schedules import plan_for_run

    try:
        old, new = plan_for_run(validate(saved), anneal_from), plan_for_run(cfg, anneal_from)
    except (ValueError, TypeError):  # (a config.yaml this cpt no longer reads: nothing to compare)
        return None
    probes = range(step) if step <= 20_000 else sorted(  # (a long run: each phase's ends and middle in both plans)
        {x for p in old.phases + new.phases for x in (p.start, p.start + p.steps // 2, p.end - 1)} | {step - 1})
    differs = next((s for s in probes if 0 <= s < step and not _same_lr(old.lr(s), new.lr(s))), None)
    if differs is None:
        return None
    return (f"warning: the LR plan changed before step {step}, where the run resumes (from step {differs}: "
            f"{old.lr(differs):.4g} then, {new.lr(differs):.4g} now), so the LR jumps from {old.lr(step):.4g} (the "
            f"checkpoint's plan at step {step}) to {new.lr(step):.4g}" + (
                "" if anneal_from is not None else f". To continue without a jump, keep the stages up to step {step} "
                "as they were and append a stage (e.g. schedule.warmup_from: previous, or continue_trunk)"))


def _same_lr(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-12 * max(abs(a), abs(b), 1e-30)


def run_relative(path: str, run_dir: Path, output_dir: str) -> str:
    """A relative path of a run's config (a held-out set), as the run read it: from the directory the run was started
    in, which is ``run_dir`` less its relative ``output_dir`` (``/jobs/x`` for ``/jobs/x/runs/a`` and ``runs/a``),
    when the path exists there; else ``path`` as written (from the current directory; absolute and remote paths are
    never changed)."""
    rel, out = Path(path), Path(output_dir)
    if "://" in path or rel.is_absolute() or out.is_absolute() or ".." in out.parts or not out.parts:
        return path
    n = len(out.parts)
    if run_dir.parts[-n:] != out.parts:
        return path
    found = Path(*run_dir.parts[:-n]) / rel
    return str(found) if found.exists() else path


def as_the_run_read_it(cfg: RunConfig, run_dir: str | os.PathLike | None) -> RunConfig:
    """``cfg`` (a checkpoint's config.yaml) with its relative local model, tokenizer and ``train.init_from`` paths read
    from the directory the run was started in (:func:`run_relative`), so that `cpt export` / `cpt average` of a
    checkpoint work from any directory, as `cpt eval` does; unchanged outside a run directory."""
    if run_dir is None:
        return cfg
    out = str(cfg.run.output_dir)
    m = {k: run_relative(v, Path(run_dir), out) for k in ("name_or_path", "tokenizer") if (v := getattr(cfg.model, k))}
    init = cfg.train.init_from and run_relative(str(cfg.train.init_from), Path(run_dir), out)
    return cfg.model_copy(update={"model": cfg.model.model_copy(update=m),
                                  "train": cfg.train.model_copy(update={"init_from": init or cfg.train.init_from})})


def world_change(ckpt: Path, acc, global_batch: int | None = None) -> str:
    """What a resume on another number of processes, or with another ``train.micro_batch_size``, changes: the gradient
    accumulation; the global batches and the data stream stay the same unless the global batch itself was changed
    too (``global_batch``, the run's, against the checkpoint's config: with --allow-config-change)."""
    saved = json.loads((ckpt / TRAINER_STATE).read_text())
    world = (saved.get("data") or {}).get("world_size") or len((saved.get("log_window") or {}).get("ranks") or []) or None
    config = ckpt / "config.yaml"
    train = ((yaml.safe_load(config.read_text()) or {}).get("train") or {}) if config.is_file() else {}
    before, micro_before = train.get("global_batch_size"), train.get("micro_batch_size")
    micro = global_batch // (acc.num_processes * acc.gradient_accumulation_steps) if global_batch else None
    changes = [f"written by {world} process{'es' * (world > 1)}, now {acc.num_processes}"] if world not in (None, acc.num_processes) else []
    if micro_before is not None and micro is not None and micro_before != micro:
        changes.append(f"micro-batch {micro} sequences (it was {micro_before})")
    if not changes:
        return ""
    same = ("the global batch and the data stream are the same" if before in (None, global_batch) or global_batch is None
            else f"the global batch is {global_batch} sequences from here (it was {before})")
    return (f"; {', '.join(changes)}: each process accumulates {acc.gradient_accumulation_steps} micro-batch(es) per "
            f"step, {same}")
