"""The `cpt` command line: help lists every command, unknown commands fail, bad configs give one clear error."""

import os
import subprocess
import sys

import pytest
import yaml

from cpt.cli import COMMANDS, main


def test_help_lists_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("demo", "prepare", "train", "schedule", "eval", "report", "merge"):
        assert name in out and name in COMMANDS
    with pytest.raises(SystemExit) as e:  # `cpt help train` is `cpt train --help` (it printed the list above)
        main(["help", "schedule"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("usage: cpt schedule")
    assert main(["help", "tran"]) == 2 and "unknown command 'tran'" in capsys.readouterr().err  # (it printed the list, 0)


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "cpt.cli", "--help"], capture_output=True, text=True, check=True).stdout
    assert "commands:" in out


def test_output_into_a_closed_pipe_is_no_traceback(tmp_path):
    """`cpt schedule CONFIG | head -1` ended in a BrokenPipeError traceback once head had exited."""
    cfg = tmp_path / "s.yaml"
    cfg.write_text(yaml.safe_dump({"run": {"name": "s", "output_dir": str(tmp_path / "run")}, "model": {"name_or_path": "x"},
                                   "data": {"seq_len": 8, "sources": [{"name": "a", "path": "a"}]},
                                   "stages": [{"name": "s", "steps": 10, "mix": {"a": 1.0}}]}))
    proc = subprocess.Popen([sys.executable, "-m", "cpt.cli", "schedule", str(cfg), "--no-plot"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before anything is written
    err = proc.stderr.read().decode()
    assert proc.wait() == 141 and "Traceback" not in err, err


def test_unknown_command(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err


def test_every_command_module_has_main():
    import importlib

    for name in COMMANDS:
        mod = importlib.import_module(f"cpt.commands.{name}")
        assert callable(mod.main), name


def test_train_bad_config_fails_before_any_work(tmp_path, capsys, monkeypatch):
    cfg = {"model": {"arch": {"hidden_size": 8}}, "data": {"sources": []}, "stages": [], "bogus": 1}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path), "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "invalid config" in err and "bogus" in err and "data.sources" in err and "stages" in err
    assert not (tmp_path / "run").exists()
    # under a launcher the node's other ranks fail alike and quietly: one refusal per node, not one per GPU
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert main(["train", str(path), "--output-dir", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err == ""


def test_train_user_errors_are_one_line_not_a_traceback(tiny_cpt_data, tmp_path, capsys):
    from conftest import tiny_run_config

    cfg = tiny_run_config(tiny_cpt_data, tmp_path / "run")
    cfg["data"]["sources"][0]["path"] = str(tmp_path / "not-prepared")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("cpt train: error: data source 'python'") and "not-prepared: no such folder" in err
    assert "Traceback" not in err

    cfg = tiny_run_config(tiny_cpt_data, tmp_path / "run2")
    cfg["model"]["tokenizer"] = str(tmp_path / "no-such-tokenizer")
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path)]) == 1
    err = capsys.readouterr().err
    assert "cpt train: error: model.tokenizer" in err and "no-such-tokenizer" in err


def test_cli_restores_an_ignored_sigusr1():
    """scripts/slurm_node.sh starts `accelerate launch` with SIGUSR1 ignored (so torchrun's agent survives a SLURM
    warning sent to every process of the step) and the ranks inherit that: `cpt` restores the default action, so a
    warning that comes before the training loop's handler still ends the rank (and the job is requeued)."""
    import signal

    from cpt import cli

    before = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        assert cli.main(["no-such-command"]) == 2
        assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGUSR1, before)


def test_a_rank_whose_launcher_died_before_it_started_stops(tmp_path):
    """A torchrun rank asks for SIGTERM when its launcher dies (PR_SET_PDEATHSIG); a launcher that died before the rank
    got there would never send it, so a rank already re-parented to init stops at once instead of training on alone.
    Here: the rank's parent exits before the rank calls `stop_with_the_launcher` (after `python -m cpt.cli` imported
    cpt.cli, which notes the parent's pid)."""
    import os
    import textwrap

    report = tmp_path / "report"
    rank = textwrap.dedent(f"""
        import os, time
        from cpt.cli import stop_with_the_launcher
        open({str(tmp_path / "imported")!r}, "w")
        time.sleep(1.0)  # the parent has exited by now
        open({str(report)!r}, "w").write(str(os.getppid()) + "\\n")
        stop_with_the_launcher()
        open({str(report)!r}, "a").write("survived\\n")
    """)
    parent = (f"import os, subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {rank!r}], start_new_session=True)\n"
              f"while not os.path.exists({str(tmp_path / 'imported')!r}): time.sleep(0.02)")
    env = {**os.environ, "TORCHELASTIC_RUN_ID": "test"}
    subprocess.run([sys.executable, "-c", parent], env=env, check=True, timeout=60)
    import time

    deadline = time.time() + 60
    while time.time() < deadline and not (report.exists() and report.read_text().count("\n") >= 1):
        time.sleep(0.1)
    time.sleep(3.0)  # time to write "survived" if it did
    lines = report.read_text().split()
    if lines[0] != "1":
        pytest.skip(f"orphans are re-parented to a subreaper here (pid {lines[0]}), not to init")
    assert lines == ["1"], lines


def test_a_rank_whose_launcher_is_pid_1_trains(tmp_path):
    """In a container the launcher is often the first process (pid 1): its ranks' parent is pid 1 from their start,
    which the orphan check took for a launcher already gone: every rank stopped at once. (Here a stand-in rank whose
    parent reads as pid 1 from its start.)"""
    code = ("import os, signal\nos.getppid = lambda: 1\nfrom cpt.cli import stop_with_the_launcher\n"
            "stop_with_the_launcher()\nprint('trained on')\n")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "TORCHELASTIC_RUN_ID": "test"},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "trained on" and "already exited" not in out.stderr, out


def test_run_log_writes_a_start_that_fails_right_after_config_yaml(tmp_path):
    """A start that wrote config.yaml and then failed before saying another line (an exception out of the loop's first
    step) left no train.log: its start-up lines stayed pending. They are written when the log closes; a start that
    failed before config.yaml writes nothing."""
    from cpt.runlog import RunLog

    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(RuntimeError), RunLog(run, lambda *a: None, enabled=True) as log:
        log.say("model: 0.2M parameters")
        (run / "config.yaml").write_text("run: {}\n")
        raise RuntimeError("the first step failed")
    assert [line[21:] for line in (run / "train.log").read_text().splitlines()] == ["model: 0.2M parameters"]
    other = tmp_path / "refused"
    other.mkdir()
    with RunLog(other, lambda *a: None, enabled=True) as log:
        log.say("refused before config.yaml")
    assert not (other / "train.log").exists()


def test_train_keeps_its_log_in_the_run_directory(tiny_cpt_data, tmp_path, capsys):
    """<output_dir>/train.log: the lines `cpt train` prints (start-up lines included, though said before the run
    directory was written) and the loggers' warnings, time-stamped; appended by a resume; nothing from a start that
    fails or is refused before the run has begun. They were on the terminal (or the batch log) only."""
    import re

    from conftest import tiny_run_config

    cfg = tiny_run_config(tiny_cpt_data, tmp_path / "run", checkpoint={"every": 2, "export_at_end": False},
                          eval={"at_start": False})
    cfg["stages"][0]["steps"] = 4
    cfg["data"]["heldout"] = []
    cfg["data"]["max_epochs_warning"] = 0.001  # a logger warning at the first step
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    import warnings

    with warnings.catch_warnings(record=True) as caught:  # (its Python warning said the logged line a second time)
        warnings.simplefilter("always")
        assert main(["train", str(path)]) == 0
    assert not [w for w in caught if "is now in epoch" in str(w.message)], [str(w.message) for w in caught]
    lines = (tmp_path / "run" / "train.log").read_text().splitlines()
    assert all(re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ ", line) for line in lines), lines
    text = [line[21:] for line in lines]
    assert text[0].startswith("stage 0 ") and "step 4/4 | tokens" in "\n".join(text)
    assert any(t.startswith("WARNING cpt.data: data source 'python' is now in epoch") for t in text), text
    assert text[-1] == f"run directory: {tmp_path / 'run'}"
    out = capsys.readouterr().out
    assert "step 4/4 | tokens" in out  # the terminal gets them as before
    assert main(["train", str(path), "--resume"]) == 0
    more = (tmp_path / "run" / "train.log").read_text().splitlines()
    assert more[:len(lines)] == lines and any("resumed " in x and "at step 4" in x for x in more[len(lines):])
    assert main(["train", str(path), "--resume", "--set", "run.seed=7"]) == 1  # refused: nothing written
    assert (tmp_path / "run" / "train.log").read_text().splitlines() == more

    cfg["run"]["output_dir"] = str(tmp_path / "failed")
    cfg["data"]["sources"][0]["path"] = str(tmp_path / "not-prepared")
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path)]) == 1
    assert not (tmp_path / "failed").exists()  # nothing written, the log included


def test_ctrl_c_is_one_line_not_a_traceback(tiny_cpt_data, tmp_path):
    """Ctrl-C (SIGINT) during `cpt train` printed a KeyboardInterrupt traceback from wherever it landed (a torch
    forward); now one line saying how to continue, exit status 130 (as a shell reports a process ended by SIGINT)."""
    import signal
    import time

    from conftest import tiny_run_config

    cfg = tiny_run_config(tiny_cpt_data, tmp_path / "run", checkpoint={"every": None, "export_at_end": False},
                          eval={"at_start": False})
    cfg["stages"][0]["steps"] = 100_000
    cfg["data"]["heldout"] = []
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen([sys.executable, "-m", "cpt.cli", "train", str(path)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE,  # (pytest-xdist's workers ignore SIGINT, and children inherit that)
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    metrics, deadline = tmp_path / "run" / "metrics.jsonl", time.time() + 120
    while proc.poll() is None and time.time() < deadline and '"step": 2,' not in (metrics.read_text() if metrics.exists() else ""):
        time.sleep(0.1)  # (in the training loop: the second step was logged)
    proc.send_signal(signal.SIGINT)
    try:
        err = proc.communicate(timeout=60)[1].decode()
    finally:
        proc.kill()
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("cpt train: interrupted; continue from its last checkpoint"), err


def test_anneal_of_zero_steps_is_refused_not_dropped(tmp_path, capsys):
    """`cpt train CFG --from CKPT --anneal 0` (a script's computed N) was dropped silently: a plain run from CKPT
    instead of the anneal branch asked for. Now the field's own check refuses it, before anything loads."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"run": {"name": "s", "output_dir": str(tmp_path / "run")}, "model": {"name_or_path": "x"},
                                   "data": {"seq_len": 8, "sources": [{"name": "a", "path": "a"}]},
                                   "stages": [{"name": "s", "steps": 10, "mix": {"a": 1.0}}]}))
    assert main(["train", str(cfg), "--from", str(tmp_path), "--anneal", "0", "--dry-run"]) == 2
    assert "train.anneal_steps: Input should be greater than 0" in capsys.readouterr().err


def test_stdout_is_line_buffered_into_a_log_file(tmp_path):
    """A batch job's log holds stdout and stderr (`> log 2>&1`): without PYTHONUNBUFFERED Python buffered stdout until
    exit, so `cpt verify`'s error summary (stderr) stood above the FAILED line it counts, and `tail -f` saw nothing."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    log = tmp_path / "job.log"
    with open(log, "w") as f:
        rc = subprocess.run([sys.executable, "-m", "cpt.cli", "verify", str(tmp_path / "gone")], stdout=f,
                            stderr=subprocess.STDOUT, env=env).returncode
    lines = log.read_text().splitlines()
    assert rc == 1 and lines[0].startswith("FAILED ") and lines[-1].startswith("cpt verify: 1 of 1 folders"), lines


def test_path_flags_are_taken_as_written(tmp_path, monkeypatch):
    """`--output-dir` and `--from` were handed on as `--set` values, read as YAML: `runs/a #2` lost ` #2` (a comment),
    so the run silently wrote into runs/a."""
    import cpt.commands.train as train_command
    from cpt.config import ConfigError

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"name_or_path": "x"}, "data": {"seq_len": 8, "sources": [{"name": "a", "path": "a"}]},
                                   "stages": [{"name": "s", "steps": 10, "mix": {"a": 1.0}}]}))
    seen, load = [], train_command.load_config

    def spy(path, overrides):
        seen.append(load(path, overrides))
        raise ConfigError("stop here")

    monkeypatch.setattr(train_command, "load_config", spy)
    assert main(["train", str(cfg), "--output-dir", "runs/a #2", "--from", "ckpt: v1"]) == 2
    assert seen[0].run.output_dir == "runs/a #2" and seen[0].train.init_from == "ckpt: v1"


def test_cpt_verify_of_a_run_directory_without_checkpoints(tmp_path, capsys):
    """A finished run that never saved a checkpoint (checkpoint.every unset, `cpt demo`'s runs) was taken for a
    prepared folder: "FAILED ...: no manifest.json (not a prepared source; run cpt prepare ...)", exit 1."""
    from cpt.cli import main

    run = tmp_path / "run"
    (run / "export").mkdir(parents=True)
    (run / "config.yaml").write_text("run: {name: x}\n")
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    assert main(["verify", str(run)]) == 0
    out = capsys.readouterr().out
    assert out.strip() == f"ok     {run}: a run directory with no checkpoint (none saved yet, or checkpoint.every unset)", out
    assert main(["verify", str(tmp_path / "empty_dir_is_no_run")]) == 1  # (missing: a prepared folder's message stays)
