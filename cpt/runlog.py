"""The run's own log file, ``<output_dir>/train.log``: what `cpt train` prints on the main process (start-up lines,
step and evaluation lines of batch jobs, the end summary, the resume command, an error line) and every warning or
error the loggers report (a failed checkpoint save, skipped updates, a lock taken over, ...), each line stamped with
its UTC time and appended across resumes and requeues, so a run directory holds its history without W&B and
wherever its terminal or batch log went.

Nothing is written before this start has written the run's ``config.yaml`` (once the model and data have loaded):
a start that fails or is refused earlier (a changed trajectory on ``--resume``, a fresh start over a finished run)
writes nothing, as elsewhere in cpt; otherwise its earlier lines are written then, with the times they were said.
Only the main process (``RANK`` 0) writes. With a progress bar (on a terminal) the step and evaluation lines go to
the bar and metrics.jsonl, not here. A log that cannot be written (disk full) is given up silently: it never stops
training.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

from cpt.console import LOG_FORMAT

LOG_FILE = "train.log"


class RunLog:
    """``with RunLog(output_dir, echo) as log: train(..., echo=log.say)``; ``log.write(line)`` for lines printed
    outside the loop."""

    def __init__(self, run_dir: str | os.PathLike, echo: Callable[..., Any], level: int = logging.INFO,
                 enabled: bool | None = None):
        self.path = Path(run_dir) / LOG_FILE
        self.echo = echo
        self.enabled = int(os.environ.get("RANK", "0")) == 0 if enabled is None else enabled
        self.pending: list[str] = []
        self.config_before = _identity(self.path.parent / "config.yaml")  # an earlier start's (None: there is none)
        self.started = False
        self.handler = _ToRunLog(self)
        self.handler.setLevel(level)
        self.handler.setFormatter(logging.Formatter(LOG_FORMAT))  # as `cpt train` prints them

    def say(self, *args: Any, **kwargs: Any) -> None:
        """``echo`` (print's signature), and the same line into the file."""
        self.echo(*args, **kwargs)
        self.write(" ".join(str(a) for a in args))

    def write(self, text: str) -> None:
        if not self.enabled:
            return
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.pending += [f"{stamp} {line}" for line in (text.splitlines() or [""])]
        self._flush()

    def _flush(self) -> None:
        if not self.enabled or not self.pending:
            return
        if not self.started:  # until this start has written config.yaml (atomically replaced: a new inode)
            now = _identity(self.path.parent / "config.yaml")
            self.started = now is not None and now != self.config_before
            if not self.started:
                return
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write("\n".join(self.pending) + "\n")
        except OSError:
            self.enabled = False
        self.pending.clear()

    def __enter__(self) -> "RunLog":
        logging.getLogger().addHandler(self.handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        logging.getLogger().removeHandler(self.handler)
        self._flush()  # (a start that failed right after writing config.yaml, before another line: its lines)


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


class _ToRunLog(logging.Handler):
    def __init__(self, log: RunLog):
        super().__init__()
        self.log = log

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.log.write(self.format(record))
        except Exception:  # noqa: BLE001 - logging must never raise into the loop
            self.handleError(record)
