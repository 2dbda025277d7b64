"""The package's rooms: data -> models -> train -> serve/benchmark -> cli, no import circle, and
serving never reaching training code."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import prerank

PACKAGE = Path(prerank.__file__).resolve().parent

# Lowest first; a module may import from its own layer and the layers before it.
LAYERS = [
    ("utilities", ("prerank", "prerank.atomic", "prerank.config", "prerank.latency", "prerank.metrics")),
    ("data", ("prerank.data",)),
    ("models", ("prerank.models",)),
    ("train", ("prerank.train", "prerank.cascade", "prerank.run_config")),
    ("serve/benchmark", ("prerank.serve", "prerank.benchmark")),
    ("cli", ("prerank.cli", "prerank.__main__")),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def layer_of(module: str) -> int:
    # The longest matching prefix decides ("prerank" alone is the utilities layer).
    matches = [(len(prefix), i) for i, (_, prefixes) in enumerate(LAYERS) for prefix in prefixes
               if module == prefix or module.startswith(prefix + ".")]
    assert matches, f"{module}: give it a layer in tests/test_imports.py"
    return max(matches)[1]


def imported_modules(module: str, top_level_only: bool) -> set[str]:
    """The `prerank` modules `module` imports: at module level (what runs on import), or anywhere."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    nodes = ast.walk(tree) if not top_level_only else _module_level(tree.body)
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            # `from prerank.x import y` imports module prerank.x.y when y is one.
            found |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names}
    return {m for m in found if m in MODULES and m != module}


def _module_level(body):
    for node in body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue  # never runs
        if isinstance(node, (ast.If, ast.Try)):
            yield from _module_level([*node.body, *getattr(node, "orelse", []), *getattr(node, "finalbody", []),
                                      *[n for handler in getattr(node, "handlers", []) for n in handler.body]])
        else:
            yield node


# Every import, also those inside functions (they run later, but still tie the modules together).
# An import of one's own parent package is left out: importing a submodule runs its package's
# __init__ first anyway (`models/base.py` imports `prerank.models` to register the models).
GRAPH = {module: {t for t in imported_modules(module, top_level_only=False) if not module.startswith(t + ".")}
         for module in MODULES}
# What runs when a module is imported.
ON_IMPORT = {module: imported_modules(module, top_level_only=True) for module in MODULES}


def reachable(start: str, graph: dict[str, set[str]]) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for target in graph[todo.pop()] - seen:
            seen.add(target)
            todo.append(target)
    return seen


def test_the_walk_sees_the_imports_it_should():
    # Guards the test itself: a parser that found nothing would pass every check below.
    assert "prerank.models.base" in ON_IMPORT["prerank.models.checkpoint"]
    assert "prerank.cli.common" in ON_IMPORT["prerank.cli.train"]
    assert "prerank.train.trainer" in GRAPH["prerank.cli.cold"] and "prerank.train.trainer" not in ON_IMPORT["prerank.cli.cold"]


def test_no_import_circle():
    circles = sorted(m for m in MODULES if m in reachable(m, GRAPH))
    assert not circles, f"modules that import themselves through others: {circles}"


def test_imports_respect_the_layers():
    upward = sorted(f"{source} -> {target}" for source, targets in GRAPH.items() for target in targets
                    if layer_of(target) > layer_of(source))
    assert not upward, "imports from a higher layer (" + " -> ".join(n for n, _ in LAYERS) + "): " + ", ".join(upward)


def test_serving_code_never_imports_training_code():
    serve = [m for m in MODULES if m.startswith("prerank.serve")]
    through = sorted(f"{m} reaches {t}" for m in serve for t in reachable(m, GRAPH) if t.startswith("prerank.train"))
    assert not through, through


def test_importing_serving_and_the_cli_loads_no_training_module():
    code = ("import importlib, pkgutil, sys, prerank.serve, prerank.cli\n"
            "for m in pkgutil.iter_modules(prerank.serve.__path__): importlib.import_module('prerank.serve.' + m.name)\n"
            "bad = sorted(m for m in sys.modules if m.startswith('prerank.train')); assert not bad, bad")
    env = {**os.environ, "PYTHONPATH": str(PACKAGE.parent)}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
