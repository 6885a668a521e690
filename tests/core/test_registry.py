"""Registry: lazy built-ins, exact names, duplicates, broken plugins."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from kdcore.errors import KDUserError
from kdcore.hookspecs import hookimpl
from kdcore.interfaces import Method
from kdcore.registry import BUILTIN_SOURCE, Registry


def test_builtins_are_listed_without_importing_them() -> None:
    sys.modules.pop("kd_plugins.vanilla", None)
    registry = Registry.discover(entry_points=False)
    entry = registry.get("plugin", "vanilla")
    assert entry.source == BUILTIN_SOURCE and "Hinton" in entry.description
    assert "kd_plugins.vanilla" not in sys.modules  # lazy: listing does not import
    assert registry.load("plugin", "vanilla").name == "vanilla"
    assert "kd_plugins.vanilla" in sys.modules


def test_every_builtin_entry_loads_and_matches_its_name() -> None:
    registry = Registry.discover(entry_points=False)
    for kind, table in registry.entries.items():
        for name in table:
            assert registry.load(kind, name).name == name


def test_names_are_exact_not_substrings() -> None:
    registry = Registry.discover(entry_points=False)
    with pytest.raises(KDUserError) as error:
        registry.get("plugin", "vanil")
    assert "Did you mean 'vanilla'" in str(error.value) and "Available plugins: " in str(error.value)


class _Duplicate(Method):
    name = "vanilla"
    description = "a second method called vanilla"


class _DuplicatePlugin:
    @hookimpl
    def kd_register_methods(self) -> list:
        return [_Duplicate]


def test_duplicate_name_names_both_sources() -> None:
    registry = Registry.discover(entry_points=False)
    with pytest.raises(KDUserError) as error:
        registry.register_plugin(_DuplicatePlugin(), name="dup", source="package dup-kd 1.0")
    assert "built-in" in str(error.value) and "package dup-kd 1.0" in str(error.value)


class _BrokenPlugin:
    @hookimpl
    def kd_register_objectives(self) -> list:
        raise ImportError("no module named 'missing_dependency'")


def test_broken_plugin_is_reported_and_others_keep_working() -> None:
    registry = Registry.discover(entry_points=False)
    registry.register_plugin(_BrokenPlugin(), name="broken", source="package broken-kd 0.1")
    assert [f.source for f in registry.failures] == ["package broken-kd 0.1"]
    assert "missing_dependency" in registry.failures[0].error
    assert registry.load("plugin", "vanilla").name == "vanilla"


def test_malformed_registry_file_is_explained(tmp_path: Path) -> None:
    bad = tmp_path / "registry.yaml"
    bad.write_text("plugins:\n  x:\n    target: not a target\n    description: d\n")
    with pytest.raises(KDUserError, match="plugins.x.target"):
        Registry.discover(registry_file=bad, entry_points=False)


def test_entry_whose_class_name_differs_is_rejected(tmp_path: Path) -> None:
    bad = tmp_path / "registry.yaml"
    bad.write_text("plugins:\n  classic:\n    target: kd_plugins.vanilla:VanillaKD\n    description: d\n")
    registry = Registry.discover(registry_file=bad, entry_points=False)
    with pytest.raises(KDUserError, match="must be equal"):
        registry.load("plugin", "classic")
