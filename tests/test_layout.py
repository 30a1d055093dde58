"""Dependency direction (DESIGN.md §4), checked by parsing imports."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The application layer composes library, tasks and data: the CLI, jobs and the inference API.
APPLICATION = ("unified_vl/cli.py", "unified_vl/jobs/", "unified_vl/inference/")


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def _py_files(package: str):
    return sorted((ROOT / package).rglob("*.py"))


def test_library_core_never_imports_tasks_or_data_tools():
    offenders = []
    for path in _py_files("unified_vl"):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith(APPLICATION):
            continue
        bad = _imports(path) & {"tasks", "data_tools"}
        if bad:
            offenders.append(f"{rel}: {sorted(bad)}")
    assert not offenders, offenders


def test_tasks_do_not_import_torch():
    offenders = [
        f"{p.relative_to(ROOT)}: {sorted(_imports(p) & {'torch', 'transformers', 'timm', 'deepspeed'})}"
        for p in _py_files("tasks")
        if _imports(p) & {"torch", "transformers", "timm", "deepspeed"}
    ]
    assert not offenders, offenders


def test_deepspeed_is_imported_only_by_the_engine():
    offenders = [
        str(p.relative_to(ROOT))
        for pkg in ("unified_vl", "tasks", "data_tools", "scripts")
        for p in _py_files(pkg)
        if "deepspeed" in _imports(p) and not p.relative_to(ROOT).as_posix().startswith("unified_vl/engine/")
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

    from unified_vl.cli import COMMANDS

    for name, (target, _) in COMMANDS.items():
        module_name, func_name = target.split(":")
        assert callable(getattr(importlib.import_module(module_name), func_name)), name
