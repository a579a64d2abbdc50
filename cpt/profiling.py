"""Profiling a window of training steps (``train.profile``): where the step time goes.

``torch.profiler`` records the CPU operators and (on CUDA) the GPU kernels of optimizer steps
``start_step .. start_step + steps - 1`` (numbered as in metrics.jsonl), on the chosen ranks. Per profiled rank it
writes, under ``<output_dir>/profile/steps_<first>-<last>/``:

    rank<r>.trace.json.gz   the timeline (open in https://ui.perfetto.dev or chrome://tracing)
    rank<r>.ops.txt         the operators and kernels that took the most time (self time on the device, else the CPU)
    rank<r>.memory.pickle   with ``memory`` on CUDA: a memory snapshot of the window (https://pytorch.org/memory_viz)

Recording starts at the top of the first profiled step and stops (after the device has finished the queued work)
at the top of the step after the window, so the window holds everything those steps did: forward, backward,
optimizer, logging, and any evaluation or checkpoint save that fell in them. The profiled steps are slower than
the others (the recording has a cost), which their ``perf/*`` metrics show. A resumed run records the window only
if it starts before it. Off (``train.profile`` unset), this module does nothing at all.
"""

from __future__ import annotations

from pathlib import Path

import torch


class StepProfiler:
    """Starts and stops ``torch.profiler`` around the configured window; :meth:`at` is called at the top of each step
    with the number of steps done. A context manager: on exit (errors included) a running recording is stopped and
    written."""

    def __init__(self, cfg, run_dir: Path, rank: int, device_type: str, say=print):
        self.cfg, self.run_dir, self.rank, self.device_type, self.say = cfg, Path(run_dir), rank, device_type, say
        self.enabled = cfg is not None and (cfg.ranks == "all" or rank in cfg.ranks)
        self.first_seen: int | None = None  # the steps done when the loop first called at()
        self.written: Path | None = None  # the window's folder once written
        self._prof = None
        self._started_at = self._last_done = 0

    @classmethod
    def for_run(cls, cfg, acc, say=print) -> "StepProfiler":
        profile = cfg.train.profile
        if profile is not None and profile.ranks != "all":
            missing = [r for r in profile.ranks if not 0 <= r < acc.num_processes]
            if missing:
                say(f"train.profile.ranks: {missing} not among this run's {acc.num_processes} process(es); they record nothing")
        return cls(profile, Path(cfg.run.output_dir), acc.process_index, acc.device.type, say)

    # -- the loop's calls
    def at(self, done: int) -> None:
        """Called at the top of every step, ``done`` = optimizer steps completed so far."""
        if not self.enabled:
            return
        if self.first_seen is None:
            self.first_seen = done
        self._last_done = done
        if self._prof is None and done == self.cfg.start_step - 1:
            self._start(done)
        elif self._prof is not None and done >= self._started_at + self.cfg.steps:
            self._stop(done)

    def close(self, done: int) -> None:
        """At the end of the loop (``done`` steps): stop and write a recording still running (the run ended inside
        the window); say when none was made."""
        if self._prof is not None:
            self._stop(done)
        elif self.enabled and self.written is None and self.first_seen is not None:
            where = (f"it resumed at step {self.first_seen}, past step {self.cfg.start_step}"
                     if self.first_seen >= self.cfg.start_step else f"it ended before step {self.cfg.start_step}")
            self.say(f"train.profile: nothing was profiled: {where}")

    def __enter__(self) -> "StepProfiler":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._prof is None:
            return
        try:
            self._stop(self._last_done)
        except Exception as e:  # never hide the error that ended the run
            if exc_type is None:
                raise
            self.say(f"train.profile: could not write the recording: {e}")

    # -- recording
    def _activities(self) -> list:
        acts = [torch.profiler.ProfilerActivity.CPU]
        if self.device_type == "cuda":
            acts.append(torch.profiler.ProfilerActivity.CUDA)
        return acts

    def _start(self, done: int) -> None:
        cfg = self.cfg
        if cfg.memory and self.device_type == "cuda":
            torch.cuda.memory._record_memory_history(max_entries=200_000)
        self._prof = torch.profiler.profile(activities=self._activities(), record_shapes=cfg.record_shapes,
                                            profile_memory=cfg.memory, with_stack=cfg.with_stack)
        self._prof.start()
        self._started_at = done

    def _stop(self, done: int) -> None:
        prof, self._prof = self._prof, None
        if self.device_type == "cuda":
            torch.cuda.synchronize()  # the window's queued kernels belong to it
        prof.stop()
        first, last = self._started_at + 1, max(done, self._started_at + 1)
        out = self.run_dir / "profile" / f"steps_{first:08d}-{last:08d}"
        out.mkdir(parents=True, exist_ok=True)
        stem = out / f"rank{self.rank}"
        prof.export_chrome_trace(f"{stem}.trace.json.gz")
        sort_by = "self_device_time_total" if self.device_type == "cuda" else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=sort_by, row_limit=40, max_name_column_width=80)
        Path(f"{stem}.ops.txt").write_text(
            f"# steps {first}..{last}, rank {self.rank}, sorted by {sort_by}\n{table}\n")
        if self.cfg.memory and self.device_type == "cuda":
            torch.cuda.memory._dump_snapshot(f"{stem}.memory.pickle")
            torch.cuda.memory._record_memory_history(enabled=None)
        self.written = out
        self.say(f"profile: steps {first}..{last} written to {out} (trace: open in https://ui.perfetto.dev)")
