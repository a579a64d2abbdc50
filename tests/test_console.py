"""Batch-job console lines (cpt/console.py): per-step lines, evaluation lines, the progress-bar rule, the resume
command, and the end table's last-evaluation step. The end-to-end check (a `cpt train` with stdout captured, SIGTERMed)
is in tests/test_train.py::test_resume_after_sigterm_is_exact."""

import io

from cpt.console import eval_line, resume_command, step_line, use_progress_bar
from cpt.evaluate import format_summary_table


class Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


def test_progress_bar_only_on_a_terminal_when_enabled():
    assert use_progress_bar(True, Stream(tty=True))
    assert not use_progress_bar(True, Stream(tty=False))  # redirected (SLURM, > log, | tee): plain lines
    assert not use_progress_bar(False, Stream(tty=True))  # progress_bar: false: plain lines on a terminal too
    assert not use_progress_bar(True, io.StringIO())


def test_the_bar_is_drawn_on_the_terminal_it_was_checked_on(monkeypatch):
    """`cpt train run.yaml 2> err.log` on a terminal: the bar (and the eval lines written above it) on stdout, the
    terminal; not tqdm's default stderr, which put carriage-return redraws into err.log and left the terminal with
    neither the bar nor the plain step lines."""
    from cpt.console import RunOutput

    out, err = Stream(tty=True), Stream(tty=False)
    monkeypatch.setattr("sys.stdout", out)
    monkeypatch.setattr("sys.stderr", err)
    logged = []
    run = RunOutput(type("Log", (), {"log": lambda self, m, step: logged.append(step)})(), print)
    run.start_bar(True, 0, 4, "r")
    assert run.bar is not None
    run.step({"train/tokens": 8, "train/loss": 2.0, "train/lr": 1e-3}, 1, 4, 100.0)
    run.advance()
    run.eval(1, 8, {"eval/a/loss": 2.5})
    run.close_bar()
    assert err.getvalue() == "" and "eval step 1: a 2.5000" in out.getvalue() and "\r" in out.getvalue()
    assert logged == [1, 1]


def test_step_line_has_tokens_loss_lr_throughput_and_mfu_when_known():
    record = {"train/tokens": 163_840, "train/loss": 3.456789, "train/lr": 1e-3, "train/grad_norm": 0.8412,
              "perf/tokens_per_s": 12345.6}
    line = step_line(20, 100, record)
    assert line == "step 20/100 | tokens 164k | loss 3.4568 | lr 1.00e-03 | grad norm 0.841 | 12,346 tok/s"
    assert step_line(20, 100, {**record, "perf/mfu": 0.4123}).endswith("| MFU 41.2%")
    assert "MFU" not in step_line(20, 100, {**record, "perf/mfu": None})
    assert "tokens 2.5G" in step_line(1, 2, {**record, "train/tokens": 2.5e9})


def test_eval_line_lists_every_heldout_loss():
    m = {"eval/python/loss": 2.34561, "eval/python/ppl": 10.4, "eval/shakespeare/loss": 3.5, "forgetting/shakespeare": 0.1,
         "eval/upstream/mean_loss": 3.5, "ema/eval/python/loss": 2.3}
    assert eval_line(20, m) == "eval step 20: python 2.3456, shakespeare 3.5000 | ema: python 2.3000"
    assert eval_line(5, {"lm_eval/hellaswag/acc": 0.29}) == "lm-eval step 5: hellaswag/acc 0.2900"
    assert eval_line(5, {"train/loss": 1.0}) is None


def test_resume_command_adds_resume_once_and_quotes():
    assert resume_command(["c.yaml", "--set", "run.name=a b"]) == "cpt train c.yaml --set 'run.name=a b' --resume"
    assert resume_command(["c.yaml", "--resume"]) == "cpt train c.yaml --resume"


def test_resume_command_prints_no_secret():
    """The preempted run's last line goes to the job's log: a secret given with --set must not be in it."""
    line = resume_command(["c.yaml", "--set", "model.arch.hub_token=hf_SECRET1", "--set=x.api_key=SECRET2",
                           "--set", "run.name=a"])
    assert "SECRET" not in line and "--set run.name=a --resume" in line and "give them again" in line, line


def test_summary_table_shows_the_step_of_the_last_evaluation():
    rows = [{"name": "python", "tag": "downstream", "step0": 3.0, "final": 3.0, "final_step": 0, "change": 0.0,
             "worst": 3.0, "worst_step": 0}]
    table = format_summary_table(rows).splitlines()
    assert table[0].split() == ["set", "tag", "step", "0", "last", "last", "step", "forgetting/adaptation", "worst", "worst", "step"]
    assert table[2].split()[:5] == ["python", "downstream", "3.0000", "3.0000", "0"]  # a preempted run's early last eval


def test_run_output_logs_every_record_and_prints_above_the_bar():
    """RunOutput: each record to the metrics log; plain lines without a bar; with one, evaluation lines go above it
    (bar.write) and step records become its numbers; after close_bar, lines are plain again."""
    from types import SimpleNamespace

    from cpt.console import RunOutput

    logged, printed, bar_calls = [], [], []
    out = RunOutput(SimpleNamespace(log=lambda rec, step: logged.append((step, rec))), printed.append)
    out.start_bar(False, 0, 10, "run")  # not asked for: no bar
    record = {"train/tokens": 1000, "train/loss": 2.5, "train/lr": 1e-3}
    out.step(record, 2, 10, 500.0)
    out.eval(2, 1000, {"eval/python/loss": 2.25})
    out.advance()
    assert printed == [step_line(2, 10, record), "eval step 2: python 2.2500"]
    assert logged == [(2, record), (2, {"train/tokens": 1000, "eval/python/loss": 2.25})]
    out.bar = SimpleNamespace(write=lambda line: bar_calls.append(("write", line)), update=lambda n: bar_calls.append(("update", n)),
                              set_postfix=lambda **k: bar_calls.append(("postfix", k["loss"])), close=lambda: bar_calls.append(("close",)))
    out.step(record, 3, 10, 500.0)
    out.eval(3, 1500, {"eval/python/loss": 2.0})
    out.advance()
    out.close_bar()
    out.eval(4, 2000, {"eval/python/loss": 1.5})
    assert bar_calls == [("postfix", "2.500"), ("write", "eval step 3: python 2.0000"), ("update", 1), ("close",)]
    assert printed[-1] == "eval step 4: python 1.5000" and len(logged) == 5


def test_a_command_logging_to_a_file_turns_tqdm_bars_off(monkeypatch):
    """Bars drawn with tqdm's defaults (lm-eval builds its requests under one per task, every evaluation) follow
    TQDM_DISABLE, which every `cpt` command sets when its stderr is not a terminal; a value the user set wins."""
    import os

    from cpt.cli import no_library_bars_in_log_files

    for var in ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr("sys.stderr", Stream(tty=True))
    no_library_bars_in_log_files()
    assert "TQDM_DISABLE" not in os.environ
    monkeypatch.setattr("sys.stderr", Stream(tty=False))
    no_library_bars_in_log_files()
    assert os.environ["TQDM_DISABLE"] == "1"


def test_lm_evals_warnings_once_per_run():
    """`cpt train`'s log handler passes each lm-eval warning once: lm-eval repeated a dozen at every evaluation."""
    import logging

    from cpt.console import OncePerMessage

    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append((record.name, record.getMessage()))
    handler.addFilter(OncePerMessage("lm_eval"))
    for name in ("lm_eval.api.task", "lm_eval.models.huggingface", "cpt.train"):
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        try:
            for _ in range(3):
                logger.warning("the same words")
            logger.warning("other words")
            for n in (113, 109):  # one warning per prompt longer than the context, numbers apart the same
                logger.warning("Combined length of context (%d) exceeds model's maximum length (64)", n)
        finally:
            logger.removeHandler(handler)
    once = "Combined length of context (113) exceeds model's maximum length (64) (the same with other numbers: not shown again)"
    assert seen == [("lm_eval.api.task", "the same words"), ("lm_eval.api.task", "other words"), ("lm_eval.api.task", once),
                    ("lm_eval.models.huggingface", "the same words"), ("lm_eval.models.huggingface", "other words"),
                    ("lm_eval.models.huggingface", once)] + [("cpt.train", "the same words")] * 3 + \
        [("cpt.train", "other words")] + [("cpt.train", "Combined length of context (%d) exceeds model's maximum length "
                                            "(64)" % n) for n in (113, 109)]


def test_lm_evals_warnings_once_in_the_console_and_in_train_log():
    """`cpt train` filters both the console's handler and train.log's: the first filter's note was added again by the
    second (`... not shown again) (the same ... not shown again)` in train.log), and the next message of that shape
    passed the second as new, so train.log had it twice."""
    import logging

    from cpt.console import OncePerMessage

    seen = {"console": [], "train.log": []}
    logger = logging.getLogger("lm_eval.evaluator")
    handlers = []
    for name in seen:
        handler = logging.Handler()
        handler.emit = lambda record, name=name: seen[name].append(record.getMessage())
        handler.addFilter(OncePerMessage("lm_eval"))
        logger.addHandler(handler)
        handlers.append(handler)
    try:
        for n in (113, 109, 97):
            logger.warning("Truncating %d tokens", n)
    finally:
        for handler in handlers:
            logger.removeHandler(handler)
    once = ["Truncating 113 tokens (the same with other numbers: not shown again)"]
    assert seen == {"console": once, "train.log": once}


def test_cpt_train_takes_no_abbreviated_flags():
    """`--se KEY=VALUE` (argparse's abbreviation of --set) would carry a secret past the redaction of the printed
    resume command: abbreviations are refused."""
    import pytest

    from cpt.commands.train import build_parser as parser

    with pytest.raises(SystemExit):
        parser().parse_args(["c.yaml", "--se", "x.api_key=SECRET"])
    assert parser().parse_args(["c.yaml", "--set", "x.api_key=S"]).overrides == ["x.api_key=S"]


def test_print_line_writes_each_line_in_one_write():
    """Ranks share a job's log, and with PYTHONUNBUFFERED (the SLURM script sets it) print() writes its text and its
    newline separately: another rank's line landed between them (seen in CI: two error lines run together)."""
    from cpt.console import print_line

    class Writes:
        def __init__(self):
            self.calls, self.flushes = [], 0

        def write(self, text):
            self.calls.append(text)

        def flush(self):
            self.flushes += 1

    out = Writes()
    print_line("cpt train: error:", "disk full", file=out)
    print_line("a", 2, sep="|", end="", file=out, flush=False)
    assert out.calls == ["cpt train: error: disk full\n", "a|2"] and out.flushes == 1
    unbuffered = Writes()
    print("cpt train: error: disk full", file=unbuffered)  # what the old code did: two writes
    assert len(unbuffered.calls) == 2
