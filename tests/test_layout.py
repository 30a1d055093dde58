"""The layers (DESIGN.md §4), checked by parsing every import of every file.

    conventions   tasks/boxes.py          boxes <-> location tokens; pure Python, imports nothing of ours
    tasks         tasks/                  the text side of every task; pure Python, no torch
    data          data_tools/             records on disk, converters, the synthetic world, the corpus
    library       unified_vl/             config, tokenizer, processor, model, generation, engine (torch)
    application   unified_vl/app/         CLI, jobs, predictor, server: composes everything
    facade        unified_vl/__init__.py  the package's public names, over every layer
    scripts       scripts/                thin commands over the application layer

A file belongs to the most specific path that contains it; it may import only the layers listed
for its own layer in `MAY_IMPORT`.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (path prefix, layer); the longest matching prefix wins.
LAYERS = (
    ("tasks/boxes.py", "conventions"),
    ("tasks/", "tasks"),
    ("data_tools/", "data"),
    ("unified_vl/", "library"),
    ("unified_vl/app/", "application"),
    ("unified_vl/__init__.py", "facade"),
    ("scripts/", "scripts"),
)
MAY_IMPORT = {
    "conventions": {"conventions"},
    "tasks": {"conventions", "tasks"},
    "data": {"conventions", "tasks", "data"},
    "library": {"conventions", "library"},
    "application": {"conventions", "tasks", "data", "library", "application"},
    "facade": {"conventions", "tasks", "data", "library", "application"},
    "scripts": {"conventions", "tasks", "data", "library", "application", "scripts"},
}
OURS = ("tasks", "data_tools", "unified_vl")
HEAVY = {"torch", "transformers", "timm", "deepspeed", "datasets"}


def layer_of_path(rel: str) -> str:
    return max(((p, layer) for p, layer in LAYERS if rel.startswith(p)), key=lambda item: len(item[0]))[1]


def _imports(path: Path) -> set[str]:
    """Every absolute module name imported by ``path`` (``from a.b import c`` gives ``a.b`` and ``a.b.c``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def _files():
    for top in ("tasks", "data_tools", "unified_vl", "scripts"):
        for path in sorted((ROOT / top).rglob("*.py")):
            yield path, path.relative_to(ROOT).as_posix()


def _module_layer(name: str) -> str | None:
    """The layer of an imported module of ours, or None for a third-party module or a plain name."""
    if name.split(".")[0] not in OURS:
        return None
    parts = name.split(".")
    while parts:  # `from tasks.boxes import BoxError` names tasks.boxes.BoxError: find the module
        candidate = "/".join(parts)
        if (ROOT / f"{candidate}.py").is_file() or (ROOT / candidate / "__init__.py").is_file():
            return layer_of_path(
                f"{candidate}.py" if (ROOT / f"{candidate}.py").is_file() else f"{candidate}/__init__.py"
            )
        parts.pop()
    return None


def test_every_import_points_to_an_allowed_layer():
    offenders = []
    for path, rel in _files():
        layer = layer_of_path(rel)
        for name in _imports(path):
            target = _module_layer(name)
            if target is not None and target not in MAY_IMPORT[layer]:
                offenders.append(f"{rel} ({layer}) imports {name} ({target})")
    assert not offenders, "\n".join(offenders)


def test_the_layer_table_covers_every_file():
    assert {layer_of_path(rel) for _, rel in _files()} == set(MAY_IMPORT)


def test_pure_python_layers_do_not_import_torch():
    offenders = [
        f"{rel}: {sorted({n.split('.')[0] for n in _imports(path)} & HEAVY)}"
        for path, rel in _files()
        if layer_of_path(rel) in ("conventions", "tasks") and {n.split(".")[0] for n in _imports(path)} & HEAVY
    ]
    assert not offenders, offenders


def test_importing_tasks_loads_no_torch():
    import subprocess
    import sys

    code = "import sys, tasks, tasks.boxes; print(sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_deepspeed_is_imported_only_by_the_engine():
    offenders = [
        rel
        for path, rel in _files()
        if any(n.split(".")[0] == "deepspeed" for n in _imports(path)) and not rel.startswith("unified_vl/engine/")
    ]
    assert not offenders, offenders


def test_installed_top_level_packages_are_ours():
    import data_tools
    import tasks
    import unified_vl

    for module in (unified_vl, tasks, data_tools):
        assert Path(module.__file__).resolve().is_relative_to(ROOT), module.__file__


def test_cli_commands_resolve_to_functions():
    import importlib

    from unified_vl.app.cli import COMMANDS

    for name, (target, _) in COMMANDS.items():
        module_name, func_name = target.split(":")
        assert callable(getattr(importlib.import_module(module_name), func_name)), name


MAX_FUNCTION_LINES = 90  # "fits on a screen or two", docstring included (about 80 lines of code)


def test_library_functions_fit_on_a_screen_or_two():
    long = []
    for path, rel in _files():
        if not rel.startswith("unified_vl/"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{rel}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "split these into named steps:\n" + "\n".join(long)


def test_openmp_wait_policy_is_set_before_torch_loads():
    # OpenMP reads OMP_WAIT_POLICY when torch loads it; the package sets it first (see unified_vl/__init__.py).
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    code = (
        "import sys, builtins, os\n"
        "seen = {}\n"
        "real = builtins.__import__\n"
        "def spy(name, *a, **k):\n"
        "    if name == 'torch' and 'policy' not in seen: seen['policy'] = os.environ.get('OMP_WAIT_POLICY')\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = spy\n"
        "import unified_vl.app.cli\n"
        "print(seen['policy'])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "PASSIVE"
