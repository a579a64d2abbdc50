"""The metrics log: metric sinks (JSONL always, W&B optional) and reading the log back.

``MetricsLogger`` writes one JSON object per line to ``<run_dir>/metrics.jsonl`` on the main process,
whether or not W&B is enabled, and mirrors every record to W&B when ``logging.wandb.enabled``.
Every record carries ``step`` (optimizer steps done) and ``train/tokens`` (tokens seen so far);
W&B uses ``train/tokens`` as the x axis of every metric (``define_metric``), so runs with different
batch sizes overlay. On resume, call ``truncate_after(step)`` so the curves stay consistent with
the restored state (the lines written after the checkpoint, before the crash, are dropped), and the
same W&B run is continued (its id is kept in ``<run_dir>/wandb_run_id``) with only the steps it does not
hold yet (W&B cannot drop rows: see ``_new_to_wandb``). :func:`read_metrics` reads a run's records back.

Throughput, MFU and the compute account that fill many of the records are cpt/throughput.py's.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any

from cpt.config import RunConfig, config_to_dict
from cpt.samples import SAMPLES_FILE, append_samples, read_samples, truncate_samples

METRICS_FILE = "metrics.jsonl"
WANDB_ID_FILE = "wandb_run_id"


class MetricsError(RuntimeError):
    """metrics.jsonl could not be written (disk full, permissions): one clear line, no half-written record."""


def json_safe(v: Any) -> Any:
    """``v`` as strict JSON can hold it (what :class:`MetricsLogger` writes, and `cpt eval --out`, `cpt interpolate`):
    NaN as null, ±inf as ±1e308 (``json.dumps`` would write ``NaN``/``Infinity``, which strict parsers refuse)."""
    return _jsonable(v)


def _jsonable(v: Any) -> Any:
    if hasattr(v, "item") and callable(v.item):  # torch / numpy scalars
        try:
            v = v.item()
        except (ValueError, RuntimeError):
            return str(v)
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else (1e308 if v > 0 else -1e308)
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return str(v)


def wandb_numbers(record: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any]:
    """The numbers of a metrics.jsonl ``record`` as W&B gets them: a value that is NaN or ±inf in ``metrics`` (a
    window of non-finite steps) stays NaN or ±inf there (W&B plots and summarises them as such; dropped, its summary
    kept the last finite loss of a run that diverged), where metrics.jsonl writes ``null`` or ±1e308."""
    out = {}
    for k, v in record.items():
        if k == "time":
            continue
        raw = _jsonable_number(metrics.get(k))
        if isinstance(raw, float) and not math.isfinite(raw):
            out[k] = raw
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = v
    return out


def _jsonable_number(v: Any) -> Any:
    if hasattr(v, "item") and callable(v.item):
        try:
            return v.item()
        except (ValueError, RuntimeError):
            return None
    return v


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl file (or of ``<run_dir>/metrics.jsonl``); a torn last line is skipped."""
    return list(iter_metrics(path))


def iter_metrics(path: str | os.PathLike):
    """The records of :func:`read_metrics` one at a time (a long run's log need not fit in memory as dicts)."""
    p = Path(path)
    if p.is_dir():
        p = p / METRICS_FILE
    with open(p) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
            if isinstance(record, dict):  # (not a record: another program's line; report's plots expected a dict)
                yield record


def records_at(path: str | os.PathLike, step: int) -> list[dict[str, Any]]:
    """The records of ``step`` in a metrics.jsonl whose last logged step is ``step`` or later, read from the end back to
    the first line before it (cpt writes the lines in step order): a long run's whole log is not read."""
    found = []
    with open(path, "rb") as f:
        for _, raw in _lines_backwards(f):
            try:
                record = json.loads(raw)
                at = int(record.get("step", 0))
            except (ValueError, AttributeError, TypeError):
                continue  # a torn line, or not a record
            if at < step:
                break
            if at == step:
                found.append(record)
    return found[::-1]


def _lines_backwards(f: Any, block: int = 1 << 20):
    """(offset, bytes) of every line of the binary file ``f`` (without its newline), last line first."""
    end = pos = f.seek(0, os.SEEK_END)
    head = b""
    while pos > 0:
        n = min(block, pos)
        pos -= n
        f.seek(pos)
        lines = (f.read(n) + head).split(b"\n")
        head, offset, found = lines[0], pos + len(lines[0]) + 1, []
        for line in lines[1:]:
            found.append((offset, line))
            offset += len(line) + 1
        yield from reversed([(o, line) for o, line in found if o < end])  # (not the nothing after the final newline)
    if head:
        yield 0, head


def mix_summary(cfg: RunConfig) -> dict[str, dict[str, float]]:
    """Normalised data mix per stage: ``{"<i>:<stage name>": {source: share}}``."""
    out = {}
    for i, st in enumerate(cfg.stages):
        total = sum(st.mix.values())
        out[f"{i}:{st.name}"] = {k: v / total for k, v in st.mix.items()}
    return out


class MetricsLogger:
    """JSONL (always) and W&B (when enabled) sink. Only the main process writes; other ranks no-op.

    ``resume``: keep the existing metrics.jsonl and continue the W&B run whose id is stored in the run
    directory (default: ``cfg.checkpoint.resume``). Without resume an existing metrics.jsonl is moved
    aside to ``metrics.jsonl.<n>`` rather than mixed with the new run's lines.
    """

    def __init__(self, run_dir: str | os.PathLike, cfg: RunConfig, accelerator=None, resume: bool | None = None):
        self.run_dir = Path(run_dir)
        self.cfg = cfg
        self.is_main = accelerator is None or accelerator.is_main_process
        self.resume = cfg.checkpoint.resume if resume is None else resume
        self.path = self.run_dir / METRICS_FILE
        self.wandb_run = None
        self._wandb_continues = False  # a resumed run continuing the W&B run of an earlier segment
        self._wandb_has: tuple[int, set[frozenset[str]]] | None = None  # (its last step, the key sets logged at it)
        self._wandb_last_step: int | None = None  # that step as the W&B server reports it (online)
        self._file = None
        if not self.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if not self.resume and self.path.exists() and self.path.stat().st_size > 0:
            n = 1
            while self.path.with_name(f"{METRICS_FILE}.{n}").exists():
                n += 1
            self.path.rename(self.path.with_name(f"{METRICS_FILE}.{n}"))
            samples = self.run_dir / SAMPLES_FILE  # (eval.samples: moved aside with the metrics they go with)
            if samples.exists():
                samples.rename(samples.with_name(f"{SAMPLES_FILE}.{n}"))
        self._file = open(self.path, "a")
        if cfg.logging.wandb.enabled:
            try:
                self._init_wandb()
            except Exception:
                self._file.close()
                raise

    # -- W&B
    def _init_wandb(self) -> None:
        import wandb

        w = self.cfg.logging.wandb
        id_file = self.run_dir / WANDB_ID_FILE
        run_id = None
        if self.resume and id_file.exists():
            run_id = id_file.read_text().strip() or None
        self._wandb_continues = run_id is not None
        if run_id is None:
            from wandb.sdk.lib.runid import generate_id

            run_id = generate_id()
        config = config_to_dict(self.cfg)  # secrets redacted
        config["data_mix"] = mix_summary(self.cfg)
        from cpt.redaction import redacted_argv

        try:
            with redacted_argv():  # W&B records sys.argv: `--set` secrets must not reach the run's metadata
                self.wandb_run = wandb.init(
                    project=w.project,
                    entity=w.entity,
                    group=w.group,
                    tags=list(w.tags) or None,
                    name=self.cfg.run.name,
                    dir=str(self.run_dir),
                    config=config,
                    mode=w.mode,
                    id=run_id,
                    resume="allow",
                )
        except wandb.errors.Error as e:  # no API key in a batch job, no connection to the server, ...
            raise MetricsError(
                f"W&B could not start a run ({str(e).strip()}): set WANDB_API_KEY or run `wandb login`, or log "
                "offline with logging.wandb.mode: offline (or WANDB_MODE=offline) and upload later with `wandb sync`"
            ) from None
        id_file.write_text(self.wandb_run.id)
        run = self.wandb_run
        # online, a resumed run's summary is the server's: its "step" is the last step W&B holds
        step = run.summary.get("step") if self._wandb_continues else None
        self._wandb_last_step = step if isinstance(step, int) and not isinstance(step, bool) else None
        run.define_metric("train/tokens")
        run.define_metric("*", step_metric="train/tokens")
        if not self._wandb_continues:  # (at 0 tokens: a resumed run's W&B history has it already)
            self._log_mix_table()

    def _log_mix_table(self) -> None:
        import wandb

        rows = []
        for i, st in enumerate(self.cfg.stages):
            total = sum(st.mix.values())
            replay = {s.name for s in self.cfg.data.sources if s.replay}
            for src, share in st.mix.items():
                ramp = st.mix_ramp.get(src)
                rows.append([i, st.name, st.steps, src, share / total, src in replay, str(list(ramp)) if ramp else ""])
        table = wandb.Table(columns=["stage", "stage_name", "steps", "source", "share", "replay", "ramp"], data=rows)
        self.wandb_run.log({"data/mix": table, "train/tokens": 0})

    # -- records
    def log(self, metrics: dict[str, Any], step: int) -> None:
        """Write one record. ``metrics`` must hold ``train/tokens`` (the x axis of every curve)."""
        if "train/tokens" not in metrics:
            raise ValueError("every metrics record needs 'train/tokens' (the x axis); got keys " + ", ".join(sorted(metrics)))
        if not self.is_main:
            return
        record = {"step": int(step), "time": time.time()}
        record.update({k: _jsonable(v) for k, v in metrics.items()})
        self._append_line(json.dumps(record) + "\n")
        if self.wandb_run is not None and self._new_to_wandb(record):
            self.wandb_run.log(wandb_numbers(record, metrics))

    def log_samples(self, rows: list[dict[str, Any]], tokens: int) -> None:
        """Text samples of one evaluation (cpt/samples.py): appended to samples.jsonl; W&B gets the table ``samples``
        of every row so far (a W&B table cannot be appended to)."""
        if not self.is_main or not rows:
            return
        append_samples(self.run_dir, rows)
        # a resume re-doing an evaluation the earlier segment sent: not sent again (the next table holds every row)
        if self.wandb_run is not None and (self._wandb_has is None or rows[0]["step"] > self._wandb_has[0]):
            import wandb

            table = wandb.Table(columns=["step", "weights", "prompt", "completion"],
                                data=[[r["step"], r.get("weights", "live"), r["prompt"], r["completion"]]
                                      for r in read_samples(self.run_dir)])
            self.wandb_run.log({"samples": table, "train/tokens": tokens})

    def _new_to_wandb(self, record: dict[str, Any]) -> bool:
        """Whether W&B lacks this record. A run resumed after a kill re-logs the steps between its checkpoint and
        the kill, which the earlier segment already sent to W&B: W&B cannot take rows back (an offline run cannot
        be rewound), so they are not sent again; re-sent, they would be duplicates that run backwards on the tokens
        axis. Sent: every step after the last one W&B holds, and the records of that step it had not logged yet
        (killed between a step's training and evaluation records). That last step is the server's when W&B is
        online; offline it is metrics.jsonl's last line: rows the killed process had not yet handed to W&B's
        writer (its last seconds) are then missing from W&B, not duplicated."""
        if self._wandb_has is None:
            return True
        last, logged = self._wandb_has
        keys = frozenset(record) - {"time"}
        if record["step"] > last:
            self._wandb_has = None
            return True
        if record["step"] == last and keys not in logged:
            logged.add(keys)
            return True
        return False

    def _append_line(self, line: str) -> None:
        """Append one whole line or nothing: a failed write is cut back off and raised as MetricsError."""
        from cpt.fileio import describe_io_error

        self._file.flush()
        fd = self._file.fileno()
        before = os.fstat(fd).st_size
        data = line.encode()
        try:
            done = 0
            while done < len(data):
                done += os.write(fd, data[done:])
        except OSError as e:
            try:
                os.ftruncate(fd, before)
            except OSError:
                pass
            raise MetricsError(f"cannot write metrics to {self.path}: {describe_io_error(e, self.path)}") from None

    def truncate_after(self, step: int) -> int:
        """Drop the lines with ``step`` > ``step`` (written after the checkpoint being resumed). Returns how many.

        cpt writes the lines in step order (a resume cuts the file at its step before it appends), so only the tail is
        read, from the end back to the first line at or before ``step`` (and before the last step logged, which W&B's
        resume needs): a resume costs the lines after the checkpoint, not the whole file (a full read and rewrite took
        38 s and 6.8 GB for a million lines). The file is cut there in place; a torn line is dropped."""
        if not self.is_main:
            return 0
        truncate_samples(self.run_dir, step)  # (eval.samples: the rows past the checkpoint, as below)
        if not self.path.exists():
            return 0
        self._file.close()
        dropped, logged, last, cut, moved, unended = 0, [], None, None, [], False
        with open(self.path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            for offset, raw in _lines_backwards(f):
                try:
                    rec = json.loads(raw)
                    at = int(rec.get("step", 0))
                except (ValueError, AttributeError, TypeError):
                    dropped, cut = dropped + 1, offset  # a torn last line
                    continue
                if last is None:  # the last line's step, the largest (online: the W&B server's, if lower)
                    last = at if self._wandb_last_step is None else min(at, self._wandb_last_step)
                if at <= step and at < last:
                    break  # this line and all before it are kept, and none is at the last step W&B holds
                logged.append((at, frozenset(rec) - {"time"}))
                if at > step:
                    dropped, cut = dropped + 1, offset
                elif cut is not None:  # kept, after a dropped line: moved down (not in a file cpt wrote)
                    moved.append(raw)
                elif offset + len(raw) == size:
                    unended = True  # the last line, kept, whose newline a kill cut off
        with open(self.path, "r+b") as f:
            if cut is not None:
                f.truncate(cut)
                f.seek(cut)
                f.write(b"".join(line + b"\n" for line in reversed(moved)))
            elif unended:
                f.seek(0, os.SEEK_END)
                f.write(b"\n")
        self._file = open(self.path, "a")
        if self._wandb_continues and logged:  # what the earlier segment sent to W&B
            # online: the server's last step; offline: the last line (what W&B had not written at the kill is lost)
            last = self._wandb_last_step if self._wandb_last_step is not None else max(s for s, _ in logged)
            self._wandb_has = (last, {keys for s, keys in logged if s == last})
        return dropped

    def log_artifact(self, path: str | os.PathLike, name: str, type: str = "model") -> bool:
        """Upload a file or directory (e.g. an HF export) as a W&B artifact, when W&B is enabled and
        ``logging.wandb.log_exports_as_artifacts`` is set. Returns whether it was logged."""
        if not self.is_main or self.wandb_run is None or not self.cfg.logging.wandb.log_exports_as_artifacts:
            return False
        import wandb

        safe = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "export"
        art = wandb.Artifact(safe, type=type)
        p = Path(path)
        if p.is_dir():
            art.add_dir(str(p))
        else:
            art.add_file(str(p))
        self.wandb_run.log_artifact(art)
        return True

    def close(self, exit_code: int | None = None) -> None:
        """Close metrics.jsonl and finish the W&B run (``exit_code`` 1: W&B shows it failed)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.wandb_run is not None:
            self.wandb_run.finish(exit_code=exit_code)
            self.wandb_run = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(exit_code=1 if exc_type is not None else None)  # a run that stopped with an error: failed in W&B
