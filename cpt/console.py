"""What a training run prints while it runs, for people and for batch-job logs.

On a terminal (stdout is a TTY) with ``train.progress_bar: true`` the loop shows a tqdm bar; everywhere else
(SLURM and other batch jobs, ``| tee``, ``> log``, or ``train.progress_bar: false``) it prints one plain line
every ``train.log_every`` steps (:func:`step_line`). Every evaluation prints one line with each held-out loss
(:func:`eval_line`), bar or not. A run stopped by a preemption signal ends with :func:`preempted_line`.
The same numbers go to metrics.jsonl (and W&B); these lines are for reading a log.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import Any, TextIO

_HELDOUT = re.compile(r"(ema/)?eval/([^/]+)/loss")


LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"  # the loggers' lines in every cpt command's output (and train.log)


def print_line(*args: Any, sep: str = " ", end: str = "\n", file: TextIO | None = None, flush: bool = True) -> None:
    """``print`` in one write: under a launcher every rank shares the job's log, and with ``PYTHONUNBUFFERED`` (set by
    the SLURM script) ``print`` writes its text and its newline separately, so another rank's line could land between
    them (two lines run together, one broken off)."""
    stream = sys.stdout if file is None else file
    stream.write(sep.join(str(a) for a in args) + end)
    if flush:
        stream.flush()


def use_progress_bar(enabled: bool, stream: TextIO | None = None) -> bool:
    """The bar only when asked for and stdout is a terminal (a redirected bar is carriage returns, no lines)."""
    stream = sys.stdout if stream is None else stream
    return bool(enabled) and bool(getattr(stream, "isatty", lambda: False)())


def _count(n: float) -> str:
    for div, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:.0f}"


def step_line(step: int, total: int, record: dict[str, Any]) -> str:
    """``step 20/100 | tokens 164k | loss 3.4567 | lr 1.00e-03 | grad norm 0.84 | 12,345 tok/s | MFU 41.2%``
    from a training log record (MFU only when the device's peak FLOP/s is known)."""
    parts = [f"step {step}/{total}", f"tokens {_count(record['train/tokens'])}", f"loss {record['train/loss']:.4f}",
             f"lr {record['train/lr']:.2e}"]
    if record.get("train/grad_norm") is not None:
        parts.append(f"grad norm {record['train/grad_norm']:.3g}")
    if record.get("perf/tokens_per_s") is not None:
        parts.append(f"{record['perf/tokens_per_s']:,.0f} tok/s")
    if record.get("perf/mfu") is not None:
        parts.append(f"MFU {100 * record['perf/mfu']:.1f}%")
    return " | ".join(parts)


def eval_line(step: int, metrics: dict[str, Any]) -> str | None:
    """``eval step 20: python 2.3456, shakespeare 3.4567 | ema: python 2.3000`` (every held-out loss), or
    ``lm-eval step 20: hellaswag/acc 0.2900`` for lm-eval results; None when ``metrics`` holds neither."""
    losses, ema, lm = [], [], []
    for key, value in metrics.items():
        m = _HELDOUT.fullmatch(key)
        if m and value is not None:
            (ema if m.group(1) else losses).append(f"{m.group(2)} {value:.4f}")
        elif key.startswith("lm_eval/") and value is not None:
            lm.append(f"{key[len('lm_eval/'):]} {value:.4f}")
    if losses or ema:
        return f"eval step {step}: " + ", ".join(losses) + (f" | ema: {', '.join(ema)}" if ema else "")
    if lm:
        took = metrics.get("time/lm_eval_s")
        return f"lm-eval step {step}: " + ", ".join(lm) + (f" ({took:.1f} s)" if isinstance(took, (int, float)) else "")
    return None


def preempted_line(step: int, total: int, run_dir: Any) -> str:
    """The first line of a preempted run's end summary (the held-out table after it shows the last evaluation's step)."""
    return f"PREEMPTED at step {step} of {total}: --resume continues from the latest checkpoint in {run_dir}/checkpoints"


def resume_command(argv: list[str]) -> str:
    """The `cpt train` command line that continues a run: ``argv`` (train's arguments) with ``--resume``; the values
    of secret ``--set`` overrides redacted (the line goes to the job's log), with a note to give them again."""
    import shlex

    from cpt.redaction import redact_argv

    args = [a for a in argv if a != "--resume"]
    shown = redact_argv(args)
    note = " (secret --set values redacted: give them again)" if shown != args else ""
    return shlex.join(["cpt", "train", *shown, "--resume"]) + note


class OncePerMessage(logging.Filter):
    """A handler filter that passes each distinct message of the loggers under ``prefix`` once: lm-eval repeats the
    same warnings at every evaluation in the loop (its task defaults, "`pretrained` model kwarg is not of type
    `str`", ...), a dozen lines per evaluation in a batch job's log. Messages that differ only in their numbers are
    one message (lm-eval's "Combined length of context (113) ... Truncating 82 tokens" came once per prompt longer
    than the context: hundreds of lines per evaluation); the first says that the others are not shown."""

    def __init__(self, prefix: str = "lm_eval"):
        super().__init__()
        self.prefix, self.seen = prefix, set()

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(self.prefix):
            return True
        # (the record as lm-eval logged it: a filter on another handler, the console's before train.log's, may have
        # added the note already; it was added twice, and the next message of that shape passed once more)
        message = getattr(record, "cpt_once_original", None) or record.getMessage()
        shape = re.sub(r"\d+", "#", message)
        key = (record.name, record.levelno, shape)
        if key in self.seen:
            return False
        self.seen.add(key)
        if shape != message and not hasattr(record, "cpt_once_original"):
            record.cpt_once_original = message
            record.msg, record.args = f"{message} (the same with other numbers: not shown again)", None
        return True


def log_lm_eval_once() -> None:
    """lm-eval's warnings through the root logger's handlers, each once (:class:`OncePerMessage`); without a handler
    (the last-resort one) nothing could filter them."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format=LOG_FORMAT)
    for handler in logging.getLogger().handlers:
        handler.addFilter(OncePerMessage("lm_eval"))


class RunOutput:
    """Where the loop's records go: the metrics log (``logger``: metrics.jsonl, W&B) and the console (``say``),
    with a progress bar from :meth:`start_bar` on (when asked for and on a terminal); evaluation lines go above it."""

    def __init__(self, logger: Any, say: Any):
        self.logger, self.say, self.bar = logger, say, None

    def start_bar(self, enabled: bool, step: int, total: int, name: str) -> None:
        if use_progress_bar(enabled):
            from tqdm.auto import tqdm

            # on stdout, the stream found to be a terminal (tqdm's default, stderr, may be a log file: `2> err.log`)
            self.bar = tqdm(total=total, initial=step, desc=name, unit="step", dynamic_ncols=True, file=sys.stdout,
                            disable=False)  # (not TQDM_DISABLE, which cpt sets when stderr is a log file: cpt/cli.py)

    def step(self, record: dict[str, Any], step: int, total: int, tokens_per_s: float) -> None:
        """A training log record: logged; a plain line for batch logs, or the bar's numbers."""
        self.logger.log(record, step=step)
        if self.bar is None:
            self.say(step_line(step, total, record))
        else:
            self.bar.set_postfix(loss=f"{record['train/loss']:.3f}", lr=f"{record['train/lr']:.2e}",
                                 tok_s=f"{tokens_per_s:,.0f}", refresh=False)

    def eval(self, step: int, tokens: int, metrics: dict[str, Any]) -> None:
        """Evaluation results: logged, and their line (:func:`eval_line`) printed; text samples (``metrics["samples"]``,
        eval.samples) to samples.jsonl and W&B, a line each."""
        metrics = dict(metrics)
        samples = metrics.pop("samples", None) or []
        self.logger.log({"train/tokens": tokens, **metrics}, step=step)
        if samples:
            self.logger.log_samples(samples, tokens)
        lines = [eval_line(step, metrics), *sample_lines(samples)]
        for line in filter(None, lines):
            (self.bar.write if self.bar is not None else self.say)(line)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def sample_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The run log's line per row: ``sample step 40: 'prompt' -> 'completion'`` (cut at 200 characters);
    ``sample step 40 (EMA): ...`` for the EMA weights' rows."""
    return [f"sample step {r['step']}{' (EMA)' if r.get('weights') == 'ema' else ''}: {r['prompt']!r} -> "
            f"{_cut(r['completion'])!r}" for r in rows]


def _cut(text: str, most: int = 200) -> str:
    return text if len(text) <= most else text[:most] + "..."
