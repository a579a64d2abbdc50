"""The end of a run and its HF exports, for the loop in cpt/train.py: the periodic exports (``exports/step_N``, and
the one a kill interrupted, written again on resume), the final export (and the EMA weights'), and what the main
process prints and writes once the loop is over (the summary tables, the compute line, the report, the hub push)."""

from __future__ import annotations

from pathlib import Path

from cpt.compile_cache import compile_cache_note
from cpt.config import RunConfig
from cpt.console import preempted_line
from cpt.distributed import any_rank
from cpt.evaluate import format_summary_table
from cpt.export import export_hf
from cpt.metrics import MetricsLogger
from cpt.resume import Start
from cpt.throughput import format_compute


def redo_interrupted_export(cfg: RunConfig, start: Start, step: int, total_steps: int, model, tokenizer, acc) -> None:
    """Write the periodic HF export of the step a run resumes at if it is missing: the run was killed during that
    export, after the step's checkpoint was written (the export follows the checkpoint). The main process's view
    decides for every rank: the export is collective."""
    path = periodic_export_dir(cfg, step, total_steps)
    if start.resume is not None and path is not None and any_rank(acc, acc.is_main_process and not path.is_dir()):
        export_hf(model, tokenizer, path, acc, cfg.checkpoint)


def periodic_export_dir(cfg: RunConfig, step: int, total_steps: int) -> Path | None:
    """``exports/step_N`` when step N gets a periodic HF export (``checkpoint.export_every``; the last step's is
    ``export/``, or with ``checkpoint.export_at_end: false`` a periodic one like the others: the final weights were
    saved nowhere), else None."""
    every = cfg.checkpoint.export_every
    last = total_steps if not cfg.checkpoint.export_at_end else total_steps - 1
    if every and step % every == 0 and 0 < step <= last:
        return Path(cfg.run.output_dir) / "exports" / f"step_{step:08d}"
    return None


def export_final(cfg: RunConfig, model, tokenizer, ema, acc, logger: MetricsLogger) -> Path:
    """The HF export of the final weights (and of the EMA weights, with train.ema_decay)."""
    run_dir = Path(cfg.run.output_dir)
    export_dir = export_hf(model, tokenizer, run_dir / "export", acc, cfg.checkpoint)
    if ema is not None:
        with ema.swapped(acc.unwrap_model(model)):
            export_hf(model, tokenizer, run_dir / "export-ema", acc, cfg.checkpoint, masters=False)
    logger.log_artifact(export_dir, f"{cfg.run.name}-final")
    return export_dir


def end_of_run(cfg: RunConfig, acc, run_dir: Path, stopped, state, total_steps: int, summary, bench, compute, say,
               export_dir: Path | None) -> None:
    """The main process prints the summary tables and writes the plots and report; every rank meets the others a
    last time; then the main process pushes the final export to the hub (``checkpoint.push_to_hub``): after that
    barrier, so that no rank waits out ``train.distributed_timeout_s`` at it while tens of GB upload."""
    if acc.is_main_process:
        _print_summary(cfg, run_dir, stopped, state.step, total_steps, summary, bench, compute, acc.num_processes, say)
    acc.wait_for_everyone()
    if acc.is_main_process and cfg.checkpoint.push_to_hub and export_dir is not None:
        from cpt.hub import push_run_export

        push_run_export(cfg, export_dir, state.step, state.tokens, say)


def _print_summary(cfg: RunConfig, run_dir: Path, stopped, step: int, total_steps: int, summary, bench, compute,
                   num_processes: int, say) -> None:
    if stopped:
        say(preempted_line(step, total_steps, run_dir))
    if summary:
        say(format_summary_table(summary))
    if bench is not None and bench.summary():
        from eval_harness.benchmarks import format_benchmark_table

        say("benchmarks (lm-eval; ± standard error):\n" + format_benchmark_table(bench.summary()))
    say(format_compute(compute, num_processes))
    if cfg.model.compile and (note := compile_cache_note()) is not None:  # (model.compile_cache: a restart reuses it)
        say(note)
    if cfg.logging.plot:
        from cpt.report import write_report  # (matplotlib)

        say(f"report: {write_report([run_dir], run_dir / 'report')}")
    say(f"run directory: {run_dir}")
