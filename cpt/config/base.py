"""The base of every config section and the machinery around it: ``Strict`` (unknown keys are errors),
``ConfigError``, one error message naming every bad field, YAML files and ``--set`` overrides."""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator

from cpt.redaction import URL_CREDENTIALS_HINT, url_credentials


class Strict(BaseModel):
    """The base class of every config section: unknown keys are errors, so a typo in a YAML config never passes
    silently. A whole number given for a text field (``run: {name: 2024}``, ``--set run.name=2024``, a numeric
    ``model.revision``) is taken as its text, which YAML read as a number: its decimal digits (``2024`` -> "2024";
    YAML 1.1 reads ``2024_01`` as 202401, ``007`` as 7 and ``010`` as 8 (octal): quote those). A decimal number for
    a text field is an error: its text is not the one written (``1.10`` -> 1.1), so it must be quoted."""

    # (allow_inf_nan: `.inf` or `.nan` for a float setting, e.g. train.z_loss, passed every bound and ruined the run)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, coerce_numbers_to_str=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_decimal_as_text(cls, value: Any, info) -> Any:
        decimals = [v for v in (value if isinstance(value, list) else [value]) if isinstance(v, float)]
        annotation = cls.model_fields[info.field_name].annotation
        if decimals and _text_only(annotation):
            raise ValueError(f"{decimals[0]!r} is a decimal number to YAML, not the text as written "
                             "(1.10 reads as 1.1): quote it")
        if isinstance(value, bool) and _number_not_bool(annotation):  # (pydantic took true as 1: `keep: true` kept 1)
            raise ValueError(f"{str(value).lower()} is not a number: give one")
        return value


def _number_not_bool(annotation: Any) -> bool:
    """Whether a field's type takes a number (``int``, ``float | None``, ``str | int``, constrained) but not a bool."""
    import typing

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        return _number_not_bool(args[0])
    members = [a for a in args if a is not type(None)] if args and origin not in (list, dict, tuple, typing.Literal) \
        else [annotation]
    members = [typing.get_args(a)[0] if typing.get_origin(a) is Annotated else a for a in members]
    return any(a in (int, float) for a in members) and not any(a in (bool, typing.Any) for a in members)


def _text_only(annotation: Any) -> bool:
    """Whether a field's type takes text (``str``, ``str | None``, ``list[str]``) and no number."""
    import typing

    if annotation is str:
        return True
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:  # (PathText)
        return _text_only(args[0])
    if origin is list:
        return _text_only(args[0])
    if args and origin is not dict and origin is not typing.Literal:  # a union
        members = [a for a in args if a is not type(None)]
        return any(_text_only(a) for a in members) and not any(a in (int, float, typing.Any) for a in members)
    return False


_BARE_VAR = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)")


def _path_text(value: str) -> str:
    """A path field (``run.output_dir``, a source's ``path``, ``model.tokenizer``, ...): a leading ``~`` is the home
    folder, as in a shell (it made a folder named ``~`` in the working directory, while W&B, which expands it, wrote
    its files under the home folder); a ``$VAR`` left after :func:`expand_env` (which expands ``${VAR}`` only) is an
    error asking for the braces, not a folder named ``$SCRATCH``."""
    if not value.strip():  # (`--set run.output_dir=${RUN_DIR}` with RUN_DIR empty wrote the run into the working folder)
        raise ValueError("an empty path: give a path (or leave the field out)")
    if (m := _BARE_VAR.search(value)) is not None:
        raise ValueError(f"{value!r}: cpt expands ${{VAR}}, not ${m.group(1)}: write ${{{m.group(1)}}}")
    if (secret := url_credentials(value)) is not None:  # (the value itself is not repeated: it holds the secret)
        raise ValueError(f"a URL with {secret} would be written to config.yaml, checkpoints, W&B and logs; "
                         f"{URL_CREDENTIALS_HINT}")
    return os.path.expanduser(value) if value.startswith("~") else value


# the type of every field naming a file, folder, hub id or URL (see _path_text)
PathText = Annotated[str, AfterValidator(_path_text)]
# a random seed: what numpy, random and torch take (a negative or > 2**32 - 1 seed was a ValueError at start)
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]


class ConfigError(ValueError):
    """A run config that cannot be used. The message names every bad field."""


class ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader, reading numbers like ``1e-5`` and ``5e5`` as floats, as YAML 1.2 does: PyYAML (YAML 1.1)
    wants a dot (``1.0e-5``) and read them as strings, which typed fields converted but free-form ones kept
    (``model.arch: {rms_norm_eps: 1e-5}``, ``config_overrides: {rope_theta: 5e5}`` became strings in the model's
    config, and the model failed to build or run). A key given twice in one mapping is an error naming both lines:
    PyYAML kept the last silently, so a second ``train:`` section dropped every field of the first."""

    def construct_mapping(self, node, deep=False):
        seen: dict[str, int] = {}
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key_node.value!r} (first on line {seen[key_node.value] + 1})",
                        key_node.start_mark)
                seen[key_node.value] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=ConfigLoader)  # noqa: S506 (a SafeLoader)


def _parse_value(item: str, text: str) -> Any:
    """Parse an override value as YAML (so 3e-4, true, [a, b], {x: 1} all work). A value that is not valid YAML (an
    unclosed ``[``, a key given twice in ``{...}``) is an error naming the override: it was kept as text, so
    ``{python: 3, python: 1}`` and ``{python: 3, shakespeare: 1`` reached the field as strings."""
    try:
        return load_yaml(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: the value is not valid YAML ({_one_line(e)}); if it is meant as "
                          f"text, quote it: {item.split('=', 1)[0]}='\"{text}\"'") from None


def unshared(data: Any) -> Any:
    """A copy of a YAML tree in which no two places share a node: a YAML alias (``schedule: *sched`` in two stages)
    loads as one object in both places, and ``copy.deepcopy`` keeps it shared, so ``--set stages.b.schedule.max_lr``
    changed stage ``a`` too."""
    if isinstance(data, dict):
        return {k: unshared(v) for k, v in data.items()}
    if isinstance(data, list):
        return [unshared(v) for v in data]
    return copy.deepcopy(data)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides; list items are addressed by index (``stages.0.steps=10``) or by name. Each
    place of the result is its own (:func:`unshared`): an override changes the place it names only."""
    data = unshared(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. train.global_batch_size=32")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r}: empty field name in {key.strip()!r} (expected e.g. train.global_batch_size=32)")
        node: Any = data
        for j, part in enumerate(parts[:-1]):
            if isinstance(node, list):
                idx = _index(part, node, key)
                node = node[idx]
            else:
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"override {key!r}: {'.'.join(parts[: j + 1])} is not a section")
        last = parts[-1]
        if isinstance(node, list):
            node[_index(last, node, key)] = _parse_value(item, value)
        else:
            node[last] = _parse_value(item, value)
    return data


_ENV_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_OTHER_VAR = re.compile(r"\$\{(?![A-Za-z_][A-Za-z0-9_]*\})[^}]*\}?")  # ${VAR:-x}, ${VAR/a/b}, ${1}, ${VAR (unclosed)


def expand_env(data: Any, where: str = "") -> Any:
    """``${VAR}`` in every string value replaced by the environment variable ``VAR`` (``output_dir:
    ${SCRATCH}/runs/x``); an unset variable is an error naming the field. Nothing else is expanded here (no
    ``$VAR``; a ``${VAR:-default}`` or other shell form is an error); a path field (``PathText``) then expands a
    leading ``~`` and refuses a bare ``$VAR``. Secret-named keys (``hub_token: ${HF_TOKEN}``) stay redacted in every
    written copy."""
    if isinstance(data, dict):
        return {k: expand_env(v, f"{where}.{k}" if where else str(k)) for k, v in data.items()}
    if isinstance(data, list):
        return [expand_env(v, f"{where}.{i}") for i, v in enumerate(data)]
    if not isinstance(data, str) or "${" not in data:
        return data
    if (other := _OTHER_VAR.search(data)) is not None:  # (it was kept as written: a folder named `${SCRATCH:-/tmp}`)
        raise ConfigError(f"{where}: {other.group(0)!r} in {data!r}: cpt expands ${{VAR}} alone (no defaults or other "
                          "shell forms): set the variable, or write the value")

    def value(m: re.Match) -> str:
        if m.group(1) not in os.environ:
            raise ConfigError(f"{where}: environment variable {m.group(1)} is not set (in {data!r})")
        return os.environ[m.group(1)]

    return _ENV_VAR.sub(value, data)


def _index(part: str, node: list, key: str) -> int:
    """A list item by its index (``stages.0``), or by its ``name`` (``data.sources.web``, ``stages.anneal``)."""
    try:
        idx = int(part)
        node[idx]
        return idx
    except (ValueError, IndexError):
        pass
    names = [str(x["name"]) for x in node if isinstance(x, dict) and "name" in x]
    if part in names and len(names) == len(node):
        if names.count(part) > 1:
            raise ConfigError(f"override {key!r}: {names.count(part)} items of the list are named {part!r}: address "
                              f"one by its index ({', '.join(str(i) for i, n in enumerate(names) if n == part)})")
        return names.index(part)
    named = f" or a name ({', '.join(names)})" if names and len(names) == len(node) else ""
    raise ConfigError(f"override {key!r}: {part!r} is not an index into a list of {len(node)}{named}")


def format_validation_error(err: ValidationError, order: tuple[str, ...] = (), model: type[BaseModel] | None = None) -> str:
    """One line per problem; ``order``: the top-level fields in the order their problems are listed (pydantic's own
    order otherwise; problems of other keys last). A value that fits none of a field's types (``str | list[str]``)
    is one line naming the field, not one per type. ``model``: the validated class, whose fields close to an unknown
    key are suggested."""
    rank = {name: i for i, name in enumerate(order)}
    problems: dict[str, str] = {}  # field path -> message, in order
    for e in sorted(err.errors(), key=lambda e: rank.get((e["loc"] or ("",))[0], len(order))):
        path = list(e["loc"])
        if len(path) > 1 and isinstance(path[-1], str) and _UNION_MEMBER.match(path[-1]):
            path = path[:-1]  # pydantic's tag of the union member that was tried
        loc = ".".join(str(p) for p in path)
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            close = _close_fields(model, path) if model is not None else []
            msg = f"unknown field (did you mean {' or '.join(close)}?)" if close else "unknown field (check the spelling)"
        if e.get("input") in ("None", "none") and e["type"] != "extra_forbidden":  # Python's None is text to YAML
            msg += " ('None' is text in YAML: write null for no value)"
        if loc and loc in problems:  # another member of the same union
            msg = problems[loc] + " or " + msg.removeprefix("Input should be ")
        for i, part in enumerate(msg.split("\n")):  # a check that found several problems: one line (and count) each
            problems[(loc if i == 0 else f"{loc}\n{i}") if loc else f"<{len(problems)}>"] = part
    lines = [f"invalid config ({len(problems)} problem{'s' if len(problems) != 1 else ''}):"]
    lines += [f"  - {msg}" if loc.startswith("<") else f"  - {loc.split(chr(10))[0]}: {msg}"  # whole-config checks
              for loc, msg in problems.items()]  # name their fields
    return "\n".join(lines)


def _close_fields(model: type[BaseModel], loc: list) -> list[str]:
    """The fields of the section holding ``loc`` (a config path) whose names are close to its last key."""
    import difflib

    node: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):  # a list item: the list's model is already the node
            continue
        field = node.model_fields.get(part) if _is_model(node) else None
        node = _model_in(field.annotation) if field is not None else None
        if node is None:  # a free-form dict (model.arch, ...)
            return []
    return difflib.get_close_matches(str(loc[-1]), list(node.model_fields), n=2, cutoff=0.6) if _is_model(node) else []


def _is_model(t: Any) -> bool:
    return isinstance(t, type) and issubclass(t, BaseModel)


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The config class in a field's type: ``X``, ``X | None``, ``list[X]``."""
    import typing

    if _is_model(annotation):
        return annotation
    for arg in typing.get_args(annotation):
        if (found := _model_in(arg)) is not None:
            return found
    return None


# how pydantic names the member of a union a value was tried against: str, list[str], literal['all'], ...
_UNION_MEMBER = re.compile(r"^(str|int|float|bool|bytes|none|constrained-[a-z]+|(list|dict|tuple|set|literal|function-[a-z]+)\[.*\])$")


def _one_line(e: yaml.YAMLError) -> str:
    """``line 30, column 1: duplicate key 'train' (first on line 27)`` rather than PyYAML's lines with a caret."""
    mark = getattr(e, "problem_mark", None)
    problem = " ".join(str(x) for x in (getattr(e, "context", None), getattr(e, "problem", None)) if x)
    if mark is None or not problem:
        return " ".join(str(e).split())
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"


def _unquoted_variable(e: yaml.YAMLError, text: str) -> str:
    """A hint when the line YAML stopped on holds ``${VAR}``: unquoted inside ``{...}`` or ``[...]`` (the flow style
    of the README's examples) its ``{`` starts a mapping."""
    lines = text.splitlines()
    marks = (getattr(e, "problem_mark", None), getattr(e, "context_mark", None))
    if any(m is not None and m.line < len(lines) and "${" in lines[m.line] for m in marks):
        return ('; a ${VAR} value inside { } or [ ] must be quoted, e.g. {output_dir: "${SCRATCH}/runs/x"}')
    return ""


def read_yaml_mapping(path: str | os.PathLike, what: str = "config", sections: str = "run, model, data, ...",
                      error: type[Exception] = ConfigError) -> dict[str, Any]:
    """A YAML file whose top level is a mapping; `error` names the file and what is wrong with it."""
    p = Path(path)
    if p.is_dir():  # (it said "not found" of a folder that is there)
        inside = f": a run directory's resolved config is {p / 'config.yaml'}" if (p / "config.yaml").is_file() else ""
        raise error(f"{p} is a folder, not a {what} file{inside}")
    if not p.is_file():
        raise error(f"{what} file not found: {p}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:  # (a traceback from `cpt train`)
        raise error(f"{p}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}): save it as UTF-8") from None
    try:
        loaded = load_yaml(text) or {}
    except yaml.YAMLError as e:
        raise error(f"{p}: not valid YAML: {_one_line(e)}{_unquoted_variable(e, text)}") from None
    if not isinstance(loaded, dict):
        raise error(f"{p}: the top level must be a mapping ({sections})")
    return loaded
