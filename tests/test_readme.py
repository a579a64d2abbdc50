"""README.md, docs/*.md and the command lines in configs/*.yaml comments against the code, so that the commands and
configs they show keep working as written.

Lean (no training, no launch; seconds): every `cpt <command> ...` line of a fenced shell block (and of a config's
comments) is parsed by that command's own argument parser (`cpt.cli.command_parser`); every `cpt <command> --flag`
in the prose names a command and flags it accepts; every launcher line (scripts/launch.sh, launch_deepspeed.sh,
sbatch scripts/slurm_multinode.sbatch) names a shipped strategy; every `--set key=value` and dotted config key
(`train.precision`, `stages.0.steps`) names a field of the pydantic RunConfig (or of a `cpt experiment` spec);
every `configs/`, `scripts/`, `docs/`, `tests/`, `cpt/` or `eval_harness/` path and relative link exists, and every
link's `#anchor` is a heading or `<a id>` of its page; every YAML block that looks like a run config validates (a
fragment merged into the README's own full example); and the Layout block names every module. The commands
themselves were run by hand as the README shows them (branch a-readme's commits say what ran and what differed).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import io
import re
import shlex
import types
import typing
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from cpt.cli import COMMANDS
from cpt.cli import command_parser as _command_parser
from cpt.config import RunConfig, apply_overrides, validate

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))  # their comments' command lines
SECTIONS = tuple(RunConfig.model_fields)
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)
# names of files that look like config keys (`train.log`, `model.safetensors`)
FILE_SUFFIXES = {"py", "log", "safetensors", "yaml", "json", "jsonl", "bin", "md", "png", "html", "pkl", "txt", "gz",
                 "pickle", "csv", "lock"}


command_parser = functools.lru_cache(maxsize=None)(_command_parser)  # parse_args leaves a parser as it was


def rel(doc: Path) -> str:
    return str(doc.relative_to(ROOT))


def fenced(doc: Path) -> list[tuple[str, str, int]]:
    """(language, body, first line number) of every fenced block."""
    text = doc.read_text()
    return [(m.group(1), m.group(2), text.count("\n", 0, m.start()) + 2) for m in FENCE.finditer(text)]


def prose(doc: Path) -> str:
    """The text outside fenced blocks."""
    return FENCE.sub("", doc.read_text())


def shell_lines(doc: Path) -> list[tuple[str, int]]:
    """Commands of the shell blocks (and `$ cmd` lines of output blocks), continuation lines joined, comments dropped;
    of a shipped config (YAML), the commands its comments give (`#   cpt prepare ...`, `#   scripts/launch.sh ...`)."""
    if doc.suffix == ".yaml":
        comments = [re.sub(r"^#\s*", "", line) if line.startswith("#") else "" for line in doc.read_text().splitlines()]
        out = []
        for n, line in enumerate(comments):
            if re.match(r"(?:[A-Z_]+=\S+ )*(?:cpt |scripts/|sbatch |python -m cpt\.cli )", line):
                while line.endswith("\\") and n + 1 < len(comments):
                    n += 1
                    line = line[:-1] + " " + comments[n]
                out.append((line, n + 1))
        return out
    out = []
    for lang, body, first in fenced(doc):
        if lang not in ("bash", "sh", "shell", "console", ""):
            continue
        lines = body.splitlines()
        i = 0
        while i < len(lines):
            start, line = i, lines[i]
            while line.endswith("\\") and i + 1 < len(lines):
                i += 1
                line = line[:-1] + " " + lines[i].strip()
            i += 1
            if lang == "" or lang == "console":
                if not line.startswith("$ "):
                    continue
                line = line[2:]
            out.append((line.strip(), first + start))
    return out


def cpt_invocations(doc: Path) -> list[tuple[list[str], int]]:
    """Every `cpt ...` (or `python -m cpt.cli ...`) command of a shell block as argv after `cpt` (leading environment
    assignments skipped; `make`, `sbatch`, `lm_eval` lines aside)."""
    found = []
    for line, lineno in shell_lines(doc):
        try:
            words = shlex.split(line, comments=True)
        except ValueError as e:  # an unbalanced quote is itself a README bug
            raise AssertionError(f"{rel(doc)}:{lineno}: cannot split {line!r}: {e}") from None
        while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
            words = words[1:]
        if words[:3] == ["python", "-m", "cpt.cli"]:
            words = ["cpt", *words[3:]]
        if words and words[0] == "cpt":
            found.append((words[1:], lineno))
    return found


def parse(command: str, args: list[str]) -> str:
    """argparse's error for `cpt COMMAND ARGS`, or '' when the line parses."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            command_parser(command).parse_args(args)
        except SystemExit as e:
            return err.getvalue().strip().splitlines()[-1] if e.code else ""
    return ""


def option_strings(command: str) -> set[str]:
    return {s for a in command_parser(command)._actions for s in a.option_strings}


# ------------------------------------------------------------------ config keys


def _unwrap(annotation):
    """The annotation without Annotated and Optional; of a union, its config model, else its list or dict."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
            continue
        if origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
            generics = [a for a in args if typing.get_origin(a) in (list, dict)]
            annotation = (models or generics or args)[0]
            continue
        return annotation


# lists whose items cpt's messages name by their `name` (a --resume's `data.sources.web2: added (data/web2)`)
def config_key_problem(key: str, model: type[BaseModel] = RunConfig) -> str:
    """'' when the dotted key names a field of the config (list items by index, `<i>` or `[]`, or by
    name where the items have one; dict keys free)."""
    node = model
    parts = key.split(".")
    for n, part in enumerate(parts):
        where = ".".join(parts[:n]) or "the config"
        annotation = _unwrap(node)
        origin = typing.get_origin(annotation)
        if origin is list:
            item = typing.get_args(annotation)[0]  # (`--set` addresses an item with a `name` by it: data.sources.web.path)
            by_name = (isinstance(item, type) and issubclass(item, BaseModel) and "name" in item.model_fields
                       and part not in item.model_fields)  # (`stages.steps` is a typo of stages.0.steps)
            if not (part.isdigit() or re.fullmatch(r"<\w+>", part) or by_name):
                return f"{where} is a list: {part!r} is not an index"
            node = typing.get_args(annotation)[0]
            continue
        if origin is dict or annotation in (dict, typing.Any):
            return ""  # a free-form mapping (mix, config_overrides, arch): any key
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return f"{where} is a value, not a section: {part!r} cannot follow it"
        name = part[:-2] if part.endswith("[]") else part
        if name not in annotation.model_fields:
            return f"{where} has no field {name!r} (fields: {', '.join(annotation.model_fields)})"
        node = annotation.model_fields[name].annotation
        if part.endswith("[]"):
            node = typing.get_args(_unwrap(node))[0]
    return ""


PLACEHOLDERS = {"section.field", "key", "a.b", "a.b.c"}


def key_problem(key: str) -> str:
    """'' when the key names a field of the run config, or of a `cpt experiment` spec (`--set cpt_tokens=...`,
    `eval.lm_eval_tasks`); else the run config's complaint."""
    from cpt.experiment.spec import ExperimentSpec, SequenceSpec

    if key in PLACEHOLDERS:
        return ""
    problem = config_key_problem(key)
    if problem and any(config_key_problem(key, spec) == "" for spec in (ExperimentSpec, SequenceSpec)):
        return ""
    return problem


def dotted_keys(text: str) -> list[str]:
    """Config keys the text names: `--set key=...` values and inline code spans that start with a section name."""
    keys = [m.group(1) for m in re.finditer(r"--set\s+['\"]?([\w.\[\]<>]+)=", text)]
    for span in re.findall(r"`([^`\n]+)`", text):
        for word in re.split(r"[\s,/]+", span):
            word = word.split("=")[0].split(":")[0].rstrip(".;)")
            if "." not in word or not word.startswith(tuple(s + "." for s in SECTIONS)):
                continue
            if word.rsplit(".", 1)[1] in FILE_SUFFIXES or not re.fullmatch(r"[\w.\[\]<>]+", word):
                continue
            keys.append(word)
    return list(dict.fromkeys(keys))


# ------------------------------------------------------------------ the tests


@pytest.mark.parametrize("doc", DOCS + CONFIGS, ids=rel)
def test_every_cpt_command_line_parses(doc):
    """Each `cpt <command> ...` of a shell block is accepted by that command's parser as written (flags, their
    values, choices, positionals); nothing runs."""
    problems = []
    for argv, lineno in cpt_invocations(doc):
        if not argv or argv[0] not in COMMANDS:
            problems.append(f"{rel(doc)}:{lineno}: `cpt {' '.join(argv[:1])}` is no cpt command ({', '.join(COMMANDS)})")
            continue
        if "..." in argv:  # an elided line (`cpt interpolate ... --out DIR`): its flags only
            unknown = sorted({a.split("=")[0] for a in argv if a.startswith("--")} - option_strings(argv[0]))
            error = f"no {', '.join(unknown)}" if unknown else ""
        else:
            error = parse(argv[0], argv[1:])
        if error:
            problems.append(f"{rel(doc)}:{lineno}: `cpt {' '.join(argv)}`: {error}")
    assert not problems, "\n".join(problems)


def launcher_lines(doc: Path) -> list[tuple[list[str], int]]:
    """`scripts/launch.sh ...`, `scripts/launch_deepspeed.sh ...` and `sbatch [opts] scripts/slurm_multinode.sbatch ...`
    lines of the shell blocks, as argv from the script on."""
    found = []
    for line, lineno in shell_lines(doc):
        words = shlex.split(line.replace("[", "# ["), comments=True)  # `[cpt train options, ...]`: prose, not args
        while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
            words = words[1:]
        if words[:1] == ["sbatch"]:  # sbatch's own options, then the script
            words = words[next((i for i, w in enumerate(words) if w.startswith("scripts/")), len(words)):]
        if words and words[0] in ("scripts/launch.sh", "scripts/launch_deepspeed.sh", "scripts/slurm_multinode.sbatch"):
            found.append((words, lineno))
    return found


def launcher_problem(argv: list[str]) -> str:
    """'' when the launch line names a shipped strategy and its trailing `cpt train` options parse."""
    script, config, *rest = argv
    if script == "scripts/launch_deepspeed.sh":
        stage, rest = (rest[0], rest[1:]) if rest else ("2", [])
        offload = rest[:1] == ["offload"]
        strategy, rest = f"zero{stage}{'_offload' if offload else ''}", rest[1:] if offload else rest
        if not (ROOT / "configs" / "deepspeed" / f"{strategy}.json").is_file():
            return f"no configs/deepspeed/{strategy}.json"
    else:
        strategy, rest = (rest[0], rest[1:]) if rest else ("ddp", [])
    if not (ROOT / "configs" / "accelerate" / f"{strategy}.yaml").is_file():
        return f"no configs/accelerate/{strategy}.yaml"
    return parse("train", [config, *rest])


@pytest.mark.parametrize("doc", DOCS + CONFIGS, ids=rel)
def test_launcher_lines_name_shipped_strategies(doc):
    """The launch scripts' lines (launch.sh, launch_deepspeed.sh, the SLURM script under sbatch): each strategy is a
    shipped accelerate (and DeepSpeed) config, and the options after it are `cpt train` options."""
    problems = [f"{rel(doc)}:{n}: `{' '.join(argv)}`: {p}" for argv, n in launcher_lines(doc) if (p := launcher_problem(argv))]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("doc", DOCS, ids=rel)
def test_cpt_commands_and_flags_in_the_prose_exist(doc):
    """`cpt <command> ... --flag` in the running text: the command exists and accepts every flag named with it."""
    problems = []
    for span in re.findall(r"`(cpt [^`\n]+)`", prose(doc)):
        words = span.split()
        command = words[1]
        if not re.fullmatch(r"[a-z]+", command):
            continue  # `cpt <command>`, `cpt/...`
        if command not in COMMANDS:
            problems.append(f"{rel(doc)}: `{span}`: no command {command!r}")
            continue
        flags = {re.match(r"--[\w-]+", w.strip("[]|")).group(0) for w in words if w.strip("[]|").startswith("--")}
        unknown = sorted(flags - option_strings(command))
        if unknown:
            problems.append(f"{rel(doc)}: `{span}`: cpt {command} has no {', '.join(unknown)}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("doc", DOCS + CONFIGS, ids=rel)
def test_config_keys_named_are_fields_of_the_run_config(doc):
    problems = sorted({f"{rel(doc)}: {key}: {p}" for key in dotted_keys(doc.read_text())
                       if (p := key_problem(key))})
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("doc", DOCS, ids=rel)
def test_paths_named_exist(doc):
    """configs/, scripts/, docs/, tests/, cpt/ and eval_harness/ paths (in code spans, blocks and links) exist."""
    text = doc.read_text()
    problems = []
    for m in re.finditer(r"(?<![\w/.$-])((?:configs|scripts|docs|tests|cpt|eval_harness)/[\w./*-]*)", text):
        path = m.group(1).split("#")[0].rstrip(".,;:")
        if not path or "<" in text[m.end():m.end() + 1] or path[path.index("/") + 1:][:1].isupper():
            continue  # `configs/schedules/<x>.yaml`, "the cpt/Trainer ratio"
        base = ROOT if doc.name == "README.md" or not path.startswith("img/") else doc.parent
        if not (list(base.glob(path)) if "*" in path else (base / path).exists()):
            problems.append(f"{rel(doc)}: {path}")
    # relative markdown links ([text](docs/x.md), ![img](img/x.png)) resolve from the document's folder
    for target in re.findall(r"\]\(([^)\s:]+)\)", text):
        target = target.split("#")[0]
        if target and not (doc.parent / target).exists():
            problems.append(f"{rel(doc)}: link {target}")
    assert not problems, "\n".join(sorted(set(problems)))


def anchors(doc: Path) -> set[str]:
    """The fragments GitHub gives a page: each heading outside fenced blocks (lowercased, punctuation but `-` and `_`
    dropped, spaces to hyphens; a repeated one gets -1, -2, ...) and every `<a id="...">`."""
    found, seen = set(), {}
    for title in re.findall(r"^#{1,6}\s+(.+?)\s*#*$", FENCE.sub("", doc.read_text()), re.M):
        slug = re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
        found.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return found | set(re.findall(r'<a id="([^"]+)"', doc.read_text()))


@pytest.mark.parametrize("doc", DOCS, ids=rel)
def test_link_anchors_resolve(doc):
    """Every `[text](page.md#anchor)` and `[text](#anchor)` names a heading or `<a id>` of that page (text moved
    between the README and the guides leaves no dead anchor)."""
    problems = []
    for target, fragment in re.findall(r"\]\(([^)\s:#]*\.md|)#([^)\s]+)\)", FENCE.sub("", doc.read_text())):
        page = (doc.parent / target).resolve() if target else doc
        if page.exists() and fragment not in anchors(page):
            problems.append(f"{rel(doc)}: {target}#{fragment}")
    assert not problems, "\n".join(problems)


def _yaml_blocks(doc: Path) -> list[tuple[dict, int]]:
    blocks = []
    for lang, body, first in fenced(doc):
        if lang != "yaml":
            continue
        data = yaml.safe_load(re.sub(r",\s*\.\.\.\s*}", "}", body))  # `{seq_len: 32768, ...}`: the rest as before
        assert isinstance(data, dict), f"{rel(doc)}:{first}: a YAML block that is not a mapping"
        blocks.append((data, first))
    return blocks


def _merge(base: dict, fragment: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in fragment.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def test_readme_run_configs_validate():
    """The README's full run config validates as written; every other YAML block made of run-config sections
    validates merged into it (a fragment changes the sections it names); an experiment-spec fragment (`variants:`)
    validates merged into configs/experiments/tiny_cpu.yaml, its overrides applied to a run config."""
    from cpt.experiment.spec import load_spec

    blocks = [(d, f"{rel(doc)}:{n}") for doc in DOCS for d, n in _yaml_blocks(doc)]
    full = [d for d, _ in blocks if {"run", "model", "data", "stages"} <= set(d)]
    assert full, "README.md shows no complete run config"
    base = full[0]
    try:
        validate(base)
    except ValueError as e:
        raise AssertionError(f"the README's run config: {e}") from None
    checked = 0
    for data, where in blocks:
        if set(data) <= set(SECTIONS):
            try:
                validate(_merge(base, data))
            except ValueError as e:
                raise AssertionError(f"YAML block at {where}: {e}") from None
            checked += 1
        elif "variants" in data:
            spec = _merge(yaml.safe_load((ROOT / "configs/experiments/tiny_cpu.yaml").read_text()), data)
            for variant in load_spec(spec).variants:
                validate(apply_overrides(copy.deepcopy(base), variant.overrides))
            checked += 1
    assert checked >= 4, checked
    # `cpt train|schedule run.yaml --set ...`: run.yaml is the README's config; the overrides apply to it as written
    for argv, lineno in cpt_invocations(DOCS[0]):
        if argv[:1] in (["train"], ["schedule"]) and argv[1:2] == ["run.yaml"]:
            sets = [v for flag, v in zip(argv, argv[1:]) if flag == "--set"]
            try:
                validate(apply_overrides(copy.deepcopy(base), sets))
            except ValueError as e:
                raise AssertionError(f"README.md:{lineno}: `cpt {' '.join(argv)}` on the README's run config: {e}") from None


def test_the_checks_catch_typos():
    """Each check fails on a typo of the kind it is there for (a guard against a check that accepts everything)."""
    assert parse("train", ["run.yaml", "--dryrun"]) and not parse("train", ["run.yaml", "--dry-run"])
    assert parse("schedule", ["a.yaml", "--anneal-from", "x"])  # a value of the wrong type
    assert "--anneal" in option_strings("train") and "--anneal" not in option_strings("schedule")
    assert config_key_problem("train.precision") == "" and config_key_problem("stages.0.schedule.max_lr") == ""
    assert config_key_problem("data.heldout[].path") == "" and config_key_problem("stages.<i>.reset_optimizer") == ""
    assert config_key_problem("model.config_overrides.rope_theta") == ""  # a free-form mapping
    assert "no field 'precison'" in config_key_problem("train.precison")
    assert "not an index" in config_key_problem("stages.steps")
    assert config_key_problem("data.sources.web2") == "" and config_key_problem("data.sources.web2.path") == ""
    assert key_problem("cpt_tokens") == "" and key_problem("eval.lm_eval_tasks") == ""  # `cpt experiment` spec fields
    assert key_problem("cpt_token")
    assert dotted_keys("`--set train.global_batchsize=8`, `eval.lm_eval.taks`, `train.log`") == [
        "train.global_batchsize", "eval.lm_eval.taks"]
    assert isinstance(command_parser("demo"), argparse.ArgumentParser)
    assert launcher_problem(["scripts/launch.sh", "run.yaml", "zero3"]) == ""
    assert launcher_problem(["scripts/launch_deepspeed.sh", "run.yaml", "3", "offload", "--resume"]) == ""
    assert "no configs/accelerate/fsdp2.yaml" in launcher_problem(["scripts/slurm_multinode.sbatch", "run.yaml", "fsdp2"])
    assert "no configs/deepspeed/zero1.json" in launcher_problem(["scripts/launch_deepspeed.sh", "run.yaml", "1"])
    assert launcher_problem(["scripts/launch.sh", "run.yaml", "ddp", "--resum"])


def test_layout_names_every_module_script_and_page():
    """README's Layout block names every module of cpt/ (and of cpt/data, cpt/experiment), the docs pages and the
    launch scripts; a module added without a line there fails here."""
    text = (ROOT / "README.md").read_text()
    layout = next(body for lang, body, _ in fenced(ROOT / "README.md") if body.startswith("cpt/ "))
    assert text.index(layout) > text.index("## Layout")
    words = set(re.findall(r"[\w.]+", layout))
    missing = [f"cpt/{p.relative_to(ROOT / 'cpt')}" for folder in ("", "data", "experiment")
               for p in sorted((ROOT / "cpt" / folder).glob("*.py"))
               if p.stem != "__init__" and p.stem not in words and p.name not in words]
    missing += [f"docs/{p.name}" for p in sorted((ROOT / "docs").glob("*.md")) if p.name not in words]
    missing += [f"scripts/{p.name}" for p in sorted((ROOT / "scripts").glob("*.s*")) if p.name not in words]
    assert not missing, f"README.md's Layout does not name: {', '.join(missing)}"
