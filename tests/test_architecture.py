"""The module structure (docs/architecture.md): the config layer sits at the bottom and does not import torch,
and cpt's import graph has no cycle.

The graph is built from the source with ``ast``: every ``import``/``from ... import`` of a cpt.* or eval_harness.*
module, at module level and inside functions alike (a function-level import only hides a cycle until the function
runs). ``from pkg import name`` counts as an import of ``pkg.name`` when that is a module. The one dynamic import,
cli.py's ``importlib.import_module(f"cpt.commands.{name}")``, is not in the graph (nothing imports cli).
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cpt", "eval_harness")
# what the config layer may import from cpt: leaf modules that import nothing of cpt themselves
CONFIG_LAYER_DEPS = {"cpt.redaction"}
# the layers of docs/architecture.md, bottom first; a package name covers its submodules (the root package "cpt" only
# itself: see ROOT_PACKAGES). A module imports only from its own layer or those below.
LAYERS = (
    ("config and leaves", ("cpt", "cpt.config", "cpt.redaction", "cpt.fileio", "cpt.console", "cpt.runlock", "cpt.runlog",
                           "cpt.state")),
    ("data, schedules, model", ("cpt.data", "cpt.schedules", "cpt.model", "cpt.model_config", "cpt.adapters", "cpt.adapter_init", "cpt.base_dtype", "cpt.quantized_base", "cpt.vocab",
                                "cpt.distributed", "cpt.rank_failure", "cpt.stop_signals", "cpt.accelerator", "cpt.chunked_loss", "cpt.lm_loss", "cpt.compiling", "cpt.compile_cache", "cpt.fp8", "cpt.export",
                                "cpt.layer_options")),
    ("components", ("cpt.optim", "cpt.ema", "cpt.averaging", "cpt.reptile", "cpt.spikes", "cpt.update_guard", "cpt.evaluate", "cpt.samples",
                    "cpt.metrics", "cpt.throughput", "cpt.profiling", "cpt.checkpoint", "cpt.checkpoint_dir", "cpt.checkpoint_files", "cpt.pickle_scan", "cpt.host_memory", "cpt.adapter_checkpoint", "cpt.adapter_shards", "cpt.sharded_save", "cpt.zero_save", "cpt.resume", "cpt.consolidate", "cpt.checkpoint_export", "cpt.stage_base", "cpt.run_metrics", "cpt.report", "cpt.hub",
                    "eval_harness")),
    ("loop", ("cpt.train", "cpt.run_end", "cpt.dryrun")),
    ("commands", ("cpt.cli", "cpt.commands", "cpt.experiment", "cpt.demo")),
)


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the cpt/eval_harness modules it imports (anywhere in its source)."""
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: from . import x / from ..a import b
                    base = package[: len(package) - (node.level - 1)]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                targets = [module] + [f"{module}.{a.name}" for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in modules:  # cpt.config.RunConfig -> cpt.config
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (iterative depth-first search, deterministic order)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


def test_the_graph_builder_sees_function_level_and_relative_imports():
    graph = import_graph()
    assert "cpt.config" in graph and "cpt.train" in graph and "eval_harness.benchmarks" in graph
    # cpt.train imports its components inside train() (function level)
    assert {"cpt.checkpoint", "cpt.data.loader", "cpt.evaluate"} <= graph["cpt.train"]
    # and the cycle finder finds a planted cycle
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_cpt_import_graph_has_no_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


ROOT_PACKAGES = ("cpt",)  # listed in LAYERS for their own __init__ only: they must not place every module below them


def layer_of(module: str) -> int | None:
    """The index in LAYERS of the longest name that is ``module`` or a package above it (a root package only itself)."""
    best = None
    for i, (_, names) in enumerate(LAYERS):
        for name in names:
            covers = module == name or (name not in ROOT_PACKAGES and module.startswith(name + "."))
            if covers and (best is None or len(name) > best[1]):
                best = (i, len(name))
    return None if best is None else best[0]


def test_every_module_is_in_a_layer_and_imports_only_downwards():
    graph = import_graph()
    unplaced = sorted(m for m in graph if layer_of(m) is None)
    assert not unplaced, f"modules in no layer (add them to LAYERS and docs/architecture.md): {unplaced}"
    upward = [f"{m} ({LAYERS[layer_of(m)][0]}) -> {d} ({LAYERS[layer_of(d)][0]})"
              for m in sorted(graph) for d in sorted(graph[m]) if layer_of(d) > layer_of(m)]
    assert not upward, "imports from a higher layer: " + "; ".join(upward)


def test_a_module_missing_from_the_layers_is_unplaced():
    """The root package "cpt" (layer 0, for cpt/__init__.py) does not place its submodules: cpt.profiling was in no
    layer of LAYERS and passed as layer 0 through it, while docs/architecture.md puts it in the components."""
    assert layer_of("cpt") == 0 and layer_of("cpt.not_in_any_layer") is None
    assert layer_of("cpt.config.base") == 0 and layer_of("cpt.data.loader") == 1 and layer_of("cpt.profiling") == 2
    assert layer_of("eval_harness.benchmarks") == 2 and layer_of("cpt.experiment.runner") == 4


def test_the_layers_are_the_documented_ones():
    """LAYERS is the layer table of docs/architecture.md, module for module (`config/` = cpt.config, `eval_harness/` =
    eval_harness), so the doc and the check cannot drift apart."""
    import re

    rows = re.findall(r"^\| (\d) [^|]+\| ([^|]+) \|", (ROOT / "docs" / "architecture.md").read_text(), re.M)
    assert [int(i) for i, _ in rows] == list(range(len(LAYERS))), rows

    def module(name: str) -> str:
        name = name.removesuffix("/").removesuffix(".py")
        return name if name == "eval_harness" else f"cpt.{name}"

    for (i, cells), (label, names) in zip(rows, LAYERS):
        documented = {module(n) for n in re.findall(r"`([^`]+)`", cells)}
        assert documented == set(names) - set(ROOT_PACKAGES), (label, sorted(documented ^ (set(names) - set(ROOT_PACKAGES))))


def test_model_applies_vocab_and_adapters_never_the_reverse():
    """docs/architecture.md: model.py imports vocab.py and adapters.py (they are applied to the built model), never the
    other way round (the layer check cannot see this: all three are in layer 1)."""
    graph = import_graph()
    assert {"cpt.vocab", "cpt.adapters"} <= graph["cpt.model"]
    assert "cpt.model" not in graph["cpt.vocab"] | graph["cpt.adapters"]


def config_package(graph: dict[str, set[str]]) -> list[str]:
    """cpt.config and its submodules (base, stages, data, model, ...)."""
    return sorted(m for m in graph if m == "cpt.config" or m.startswith("cpt.config."))


def test_config_layer_imports_no_other_cpt_module():
    graph = import_graph()
    package = config_package(graph)
    assert len(package) > 1 and "cpt.config.base" in package, package  # the package, not one module
    for module in package:
        outside = {d for d in graph[module] if d not in package}
        assert outside <= CONFIG_LAYER_DEPS, f"{module} imports {sorted(outside - CONFIG_LAYER_DEPS)}"
    for dep in CONFIG_LAYER_DEPS:
        assert not graph[dep], f"{dep} imports {sorted(graph[dep])}"


def test_reading_a_config_does_not_import_torch():
    """Importing every module of the config layer, validating a config with every component section (schedules,
    vocab, LoRA, freezing, data sources) and laying out its LR plan (what `cpt schedule` does) never imports torch."""
    modules = config_package(import_graph())
    code = textwrap.dedent("""
        import importlib, sys
        for name in MODULES:
            importlib.import_module(name)
        from cpt.config import validate
        from cpt.data.sources import HeldoutConfig
        from cpt.schedules import LRPlan
        import cpt.commands.schedule
        cfg = validate({
            "model": {"arch": {"model_type": "llama"}, "tokenizer": "tok",
                      "vocab": {"add_tokens_file": "new.txt"}, "lora": {"r": 4}, "freeze": {"layers": "0-2"}},
            "data": {"sources": [{"name": "a", "path": "a"}], "heldout": [{"name": "h", "path": "h", "tag": "upstream"}]},
            "stages": [{"steps": 100, "mix": {"a": 1.0}, "schedule": {"type": "wsd", "warmup_steps": 10}}],
            "train": {"init_from": "x", "anneal_steps": 10},
        })
        plan = LRPlan([(s.steps, s.schedule) for s in cfg.stages])
        assert plan.total_steps == 100 and isinstance(cfg.data.heldout[0], HeldoutConfig)
        print("torch" in sys.modules)
    """).replace("MODULES", repr(modules))
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False", "reading a config imported torch"


MAX_MODULE_LINES = 500  # issue 14: a file that grows past this does more than one job; split it along its sections


def test_no_module_is_longer_than_one_job():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in (ROOT / "cpt").rglob("*.py")}
    assert len(sizes) > 40  # the package was found
    too_long = {name: n for name, n in sizes.items() if n > MAX_MODULE_LINES}
    assert not too_long, f"modules over {MAX_MODULE_LINES} lines: {too_long}"


def test_the_training_loop_reads_in_one_sitting():
    """train() stays a nanoGPT-sized function: its statements (no docstring, comments or blank lines) fit in ~120 lines;
    the work is in train_step() and the components."""
    import ast

    source = (ROOT / "cpt" / "train.py").read_text()
    fn = next(n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == "train")
    doc = fn.body[0]
    lines = source.splitlines()[doc.end_lineno:fn.end_lineno]  # after the docstring
    code = [ln for ln in lines if ln.strip() and not ln.strip().startswith("#")]
    assert 40 < len(code) <= 120, len(code)
