"""Tasks do not depend on methods: no module of ``kd_tasks`` imports a method module, directly or through another
module (a method module is one that holds a ``plugins:`` target of registry.yaml).

Data flow one way (task -> batches -> method); a task that imported a method's internals would break when the method
changes and could not be used with a third-party method. Model factories, models and the decoding of a model
(``kd_plugins.text.models``, ``kd_plugins.text.generation``) are not methods and stay importable.
"""
from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
FIRST_PARTY = ("kd_tasks", "kd_plugins", "kdcore")


def method_modules() -> set[str]:
    entries = yaml.safe_load((ROOT / "registry.yaml").read_text())["plugins"]
    return {entry["target"].split(":")[0] for entry in entries.values()}


def imported_modules(source: str, module: str, is_package: bool) -> set[str]:
    """Every module ``source`` (the text of ``module``) imports, at any depth of its code; ``from a import b`` also
    counts ``a.b`` (b may be a submodule)."""
    package = module if is_package else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            names.add(target)
            names.update(f"{target}.{alias.name}" for alias in node.names)
    return names


def _source_of(module: str) -> tuple[str, bool] | None:
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
        return None
    return Path(spec.origin).read_text(encoding="utf-8"), spec.submodule_search_locations is not None


def task_import_chains() -> dict[str, list[str]]:
    """Every first-party module reachable from ``kd_tasks``, with the import chain that reaches it."""
    chains: dict[str, list[str]] = {}
    pending = [(f"kd_tasks.{path.relative_to(ROOT / 'tasks').with_suffix('').as_posix().replace('/', '.')}"
                .removesuffix(".__init__"), []) for path in sorted((ROOT / "tasks").rglob("*.py"))]
    while pending:
        module, chain = pending.pop()
        if module in chains:
            continue
        found = _source_of(module)
        if found is None:
            continue
        chains[module] = chain + [module]
        source, is_package = found
        pending.extend((name, chains[module]) for name in imported_modules(source, module, is_package)
                       if name.split(".")[0] in FIRST_PARTY and name not in chains)
    return chains


def test_no_task_imports_a_method_module() -> None:
    methods = method_modules()
    assert "kd_plugins.text.imitation" in methods  # the registry is read as intended
    reached = task_import_chains()
    assert "kd_tasks.text.base" in reached and "kd_plugins.text.models" in reached
    offending = {module: " -> ".join(chain) for module, chain in reached.items() if module in methods}
    assert not offending, f"tasks import method modules: {offending}"


def test_the_import_scan_sees_imports_inside_functions_and_relative_ones() -> None:
    source = ("from .files import read_text\n"
              "def f():\n    from kd_plugins.text.imitation import ImitationKD\n"
              "import kd_plugins.vanilla\n")
    names = imported_modules(source, "kd_tasks.text.base", is_package=False)
    assert {"kd_tasks.text.files", "kd_plugins.text.imitation", "kd_plugins.vanilla"} <= names
    assert imported_modules("from . import wmt\n", "kd_tasks.text", is_package=True) >= {"kd_tasks.text.wmt"}
