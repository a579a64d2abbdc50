"""Which lm-eval tasks a name means: the bundled offline tasks (``eval_harness/tasks``, tag ``cpt_local``), the folders
of ``include_path``, then lm-eval's built-in registry (indexed only when a name is not local: seconds, and running them
needs the network). An unknown name is one line with close matches (:class:`UnknownTaskError`), data that cannot be
loaded one line naming the task (:class:`TaskDataError`); :func:`task_sizes` says what a task, group or tag expands to."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

log = logging.getLogger("cpt.lm_eval")

LOCAL_TASKS_DIR = Path(__file__).resolve().parent / "tasks"


def _include_paths(include_path: str | Path | list | None) -> list[str]:
    paths = [str(LOCAL_TASKS_DIR)]
    if include_path:
        extra = include_path if isinstance(include_path, (list, tuple)) else [include_path]
        paths += [str(Path(p).resolve()) for p in extra if Path(p).resolve() != LOCAL_TASKS_DIR]
    return paths


def make_task_manager(tasks: list[str], include_path: str | Path | list | None = None):
    """A ``TaskManager`` that knows the local tasks (and ``include_path``). lm-eval's built-in tasks are
    indexed only when a requested name is not local (indexing them costs seconds; running them
    needs the network). Built once per task list and folders: an evaluation every N steps reuses the index.
    A name no index knows raises :class:`UnknownTaskError` (one line, with close matches)."""
    return _task_manager(tuple(tasks), tuple(_include_paths(include_path)))


class UnknownTaskError(ValueError):
    """An lm-eval task, group or tag name that neither the bundled tasks, ``include_path`` nor lm-eval knows."""


@functools.lru_cache(maxsize=8)
def _task_manager(tasks: tuple[str, ...], paths: tuple[str, ...]):
    paths = list(paths)
    local = _indexed(tuple(paths), False)
    not_local = _unknown(local, tasks)
    if not not_local:
        return local
    log.info("lm-eval: %s not local, indexing lm-eval's built-in tasks", not_local)
    manager = _indexed(tuple(paths), True)
    missing = _unknown(manager, tasks)
    if missing:  # lm-eval would raise a KeyError deep inside simple_evaluate, after the model has loaded
        import difflib

        known = sorted(_names(manager))
        hints = list(dict.fromkeys(m for t in missing for m in difflib.get_close_matches(t, known, n=3)))  # best first
        raise UnknownTaskError(
            f"unknown lm-eval task{'s' if len(missing) > 1 else ''} {', '.join(missing)}: not a bundled task "
            f"(eval_harness/tasks, tag cpt_local), not in include_path, not one of lm-eval's tasks, groups or tags"
            + (f" (did you mean {', '.join(hints)}?)" if hints else ""))
    return manager


@functools.lru_cache(maxsize=4)
def _indexed(paths: tuple[str, ...], include_defaults: bool):
    """lm-eval's task index over ``paths`` (and its built-in tasks: seconds to build), built once per process."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(paths), include_defaults=include_defaults)


def _names(manager) -> set[str]:
    return set(manager.all_tasks) | set(manager.all_groups) | set(manager.all_tags)


def _unknown(manager, tasks: tuple[str, ...]) -> list[str]:
    """The names in ``tasks`` that ``manager`` does not know (a path to a task YAML file counts as known)."""
    known = _names(manager)
    return [t for t in tasks if t not in known and not Path(t).is_file()]


def task_sizes(names: list[str], include_path: str | Path | list | None = None) -> dict[str, dict[str, int]]:
    """``{name: {leaf task: number of documents}}``: what each requested task, group or tag expands to."""
    manager = make_task_manager(list(names), include_path)
    return {name: {leaf: len(task.eval_docs) for leaf, task in manager.load([name])["tasks"].items()} for name in names}


class TaskDataError(ValueError):
    """A known lm-eval task whose documents cannot be loaded (a moved data file, a hub dataset with no network)."""


def loaded_task_sizes(names: list[str], include_path: str | Path | list | None = None) -> dict[str, dict[str, int]]:
    """:func:`task_sizes`, with data that cannot be loaded a :class:`TaskDataError` naming the task (one line; it
    used to be a traceback at the task's first evaluation, after the model had loaded, or hours into a run)."""
    sizes = {}
    for name in names:
        try:
            sizes.update(task_sizes([name], include_path))
        except UnknownTaskError:
            raise
        except Exception as e:  # (lm-eval and datasets raise many kinds: FileNotFoundError, DatasetNotFoundError...)
            said = " ".join(str(e).split())[:300]
            raise TaskDataError(f"{name}: its data cannot be loaded: {type(e).__name__}: {said}") from None
    return sizes
