"""``model.compile_cache``: where torch.compile keeps the code it compiles, so that a later start of a run loads it.

A batch job is preempted and requeued, often on another node whose /tmp (torch's default cache) is empty, and each
start compiles the model again: about a minute for a 1B Llama on an H200 with the whole-model compile
(docs/benchmarks.md). With the cache in the run directory, which every node of the job sees, the next start loads the
compiled graphs and kernels instead. :func:`use_compile_cache` points inductor at it before the first compile;
:func:`compile_cache_note` says at the end of a start how many graphs came from it.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"  # inductor's cache folder (its Triton kernels go under it unless TRITON_CACHE_DIR)
_cache_counts: dict[str, int] | None = None  # the process's compile-cache counters when this run set its cache up
_ours: str | None = None  # the folder use_compile_cache pointed TORCHINDUCTOR_CACHE_DIR at in this process
_was_empty = False  # whether that folder held no compiled code when this run set it up
COUNTERS = ("fxgraph_cache_hit", "fxgraph_cache_miss")  # torch._dynamo's counters of inductor's cache lookups


def use_compile_cache(setting: str | None, output_dir: str, say) -> Path | None:
    """``model.compile_cache``: point inductor's cache (``TORCHINDUCTOR_CACHE_DIR``) at ``<output_dir>/compile_cache``
    (``"run"``) or another folder before the first compile, so that a later start of the run, on this node or another
    that sees the run directory, loads the compiled code (FX graphs, AOTAutograd's joint graphs, Triton kernels)
    instead of compiling again: measured on CPU, a 16-layer tiny Llama's first step 40 s cold, 5.3 s from the cache
    (whole model), 15.8 s and 3.1 s regional (docs/benchmarks.md). torch's keys include the graph, the torch/Triton
    versions and the device, so a shared folder serves mixed nodes and stale entries are not used. ``None`` (or ``TORCHINDUCTOR_CACHE_DIR`` set by
    the user): torch's own choice. A folder whose file locks do not work (inductor locks its entries; e.g. Lustre
    mounted without ``flock``) is not used, with a warning. Returns the folder used, or None."""
    global _cache_counts, _ours, _was_empty
    _cache_counts, _was_empty = _compile_cache_counts(), False
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    env = os.environ.get(CACHE_ENV)
    if env and os.path.abspath(env) not in (os.path.abspath(default_cache_dir()), _ours):  # the user's
        say(f"compile cache: {env} ({CACHE_ENV}; model.compile_cache is not used)")
        return Path(env)
    if env:  # torch's default, or an earlier run's folder in this process (cpt experiment): decided again below
        del os.environ[CACHE_ENV]
    if setting is None:
        return None
    folder = (Path(output_dir) / "compile_cache" if setting == "run" else Path(setting)).absolute()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _check_file_lock(folder)
    except Exception as e:  # noqa: BLE001 - any failure: compile with torch's own cache rather than stop the run
        say(f"warning: model.compile_cache: {folder} cannot hold inductor's cache ({type(e).__name__}: {e}); "
            "compiling with torch's own (per node, not kept across restarts)")
        return None
    _was_empty = not any(p.is_file() for p in folder.rglob("*") if "locks" not in p.relative_to(folder).parts)
    os.environ[CACHE_ENV] = _ours = str(folder)
    say(f"compile cache: {folder} (model.compile_cache: later starts of this run load its compiled code)")
    return folder


def _check_file_lock(folder: Path) -> None:
    """Take and release a file lock in ``folder`` the way inductor locks its cache entries (raises if locks fail)."""
    from torch.utils._filelock import FileLock

    (folder / "locks").mkdir(exist_ok=True)
    probe = folder / "locks" / f"cpt-probe-{os.getpid()}.lock"
    with FileLock(str(probe), timeout=30):
        pass
    probe.unlink(missing_ok=True)


def _compile_cache_counts() -> dict[str, int]:
    from torch._dynamo.utils import counters

    return {k: int(counters["inductor"][k]) for k in COUNTERS}


def compile_cache_note() -> str | None:
    """What this run's compiles took from the cache (once :func:`use_compile_cache` ran): ``compile: N of M graphs
    loaded from the compile cache``; None when nothing was compiled. Into a folder that was empty at the start, a
    graph compiled twice in the start (gradient checkpointing's recompute, say) loads the second time from what the
    start wrote: said as such (it read as a first start that found cached code)."""
    if _cache_counts is None:
        return None
    now = _compile_cache_counts()
    hits, misses = (now[k] - _cache_counts[k] for k in COUNTERS)
    if hits + misses == 0:
        return None
    if _was_empty:
        again = f" ({hits} repeat{'s' if hits != 1 else ''} of them loaded back)" if hits else ""
        return f"compile: {misses} graphs compiled into the empty compile cache{again}"
    return f"compile: {hits} of {hits + misses} graphs loaded from the compile cache, {misses} compiled"
