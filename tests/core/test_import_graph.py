"""kdcore's module-level imports form no circle, kdcore imports nothing of the plugins or tasks, hook types stay small."""
from __future__ import annotations

import ast
from pathlib import Path

import kdcore

PACKAGE = Path(kdcore.__file__).parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_package(name: str) -> bool:
    return (PACKAGE.parent / Path(*name.split(".")) / "__init__.py").exists()


def _imported(tree: ast.Module, module: str, is_package: bool) -> set[str]:
    """Every module a module-level statement imports (also under ``if TYPE_CHECKING``, never inside functions)."""
    package = module if is_package else module.rpartition(".")[0]
    names: set[str] = set()

    def visit(statements: list[ast.stmt]) -> None:
        for node in statements:
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, *([base] if base else [])])
                names.add(base)
                # ``from kdcore import distributed`` imports the submodule kdcore.distributed
                names.update(f"{base}.{alias.name}" for alias in node.names)
            elif isinstance(node, (ast.If, ast.Try)):
                visit(node.body)
                visit(node.orelse)
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)
                visit(getattr(node, "finalbody", []))

    visit(tree.body)
    return names


def _graph() -> dict[str, set[str]]:
    """kdcore module -> the kdcore modules it imports at module level (importing a.b.c runs a and a.b too)."""
    files = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        edges: set[str] = set()
        for name in _imported(ast.parse(path.read_text(encoding="utf-8")), module, path.name == "__init__.py"):
            parts = name.split(".")
            for end in range(1, len(parts) + 1):
                target = ".".join(parts[:end])
                # A module inside a package does not re-enter that package's __init__ (it is already running).
                if target in files and target != module and not module.startswith(target + "."):
                    edges.add(target)
        graph[module] = edges
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    done: set[str] = set()
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        if module in path:
            return path[path.index(module):] + [module]
        if module in done:
            return None
        path.append(module)
        for target in sorted(graph[module]):
            found = visit(target)
            if found:
                return found
        path.pop()
        done.add(module)
        return None

    for module in sorted(graph):
        found = visit(module)
        if found:
            return found
    return None


def test_no_import_circle_inside_kdcore() -> None:
    graph = _graph()
    assert {"kdcore.trainer", "kdcore.hooks", "kdcore.hookspecs", "kdcore.registry", "kdcore.resolve"} <= set(graph)
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_the_circle_finder_finds_circles() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_a_type_checking_import_counts(tmp_path: Path) -> None:
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from kdcore.trainer import Trainer\n"
                     "def later():\n    import kdcore.cli\n")
    assert "kdcore.trainer" in _imported(tree, "kdcore.x", False) and "kdcore.cli" not in _imported(tree, "kdcore.x", False)


def test_kdcore_imports_nothing_from_plugins_or_tasks() -> None:
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):  # also imports inside functions
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.relative_to(PACKAGE.parent)}:{node.lineno} imports {name}" for name in names
                          if name.split(".")[0] in ("kd_plugins", "kd_tasks")]
    assert not offenders, offenders


def test_public_hook_types_import_no_implementation_module() -> None:
    graph = _graph()
    assert graph["kdcore.hooks"] == set()
    assert graph["kdcore.hookspecs"] == {"kdcore.hooks"}
