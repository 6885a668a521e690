"""Registry: lazy built-ins, exact names, duplicates, broken plugins."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kdcore.errors import KDUserError
from kdcore.hookspecs import hookimpl
from kdcore.interfaces import Method
from kdcore.registry import (
    BUILTIN_SOURCE, DEFAULT_REGISTRY_FILE, Registry, RegistryFile, generated_registry_text, import_target,
)
from kdcore.registry import main as registry_main


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


def test_registry_file_is_generated_from_the_classes() -> None:
    """One source for names and descriptions: the classes; registry.yaml is what --write makes of them."""
    assert generated_registry_text() == DEFAULT_REGISTRY_FILE.read_text(encoding="utf-8"), (
        "registry.yaml differs from the classes' name/description: run `python -m kdcore.registry --write`")


def test_write_takes_name_and_description_from_the_class(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    stale = tmp_path / "registry.yaml"
    stale.write_text("plugins:\n  classic:\n    target: kd_plugins.vanilla:VanillaKD\n    description: old text\n"
                     "objectives:\n  new-row: {target: kdcore.objectives.library:TVDObjective}\n")
    assert registry_main(["--check", "--file", str(stale)]) == 1
    assert "-    description: old text" in capsys.readouterr().out
    assert registry_main(["--write", "--file", str(stale)]) == 0
    data = RegistryFile.model_validate(yaml.safe_load(stale.read_text()))
    assert set(data.plugins) == {"vanilla"} and set(data.objectives) == {"tvd"}
    assert data.plugins["vanilla"].description == import_target("kd_plugins.vanilla:VanillaKD").description
    assert data.objectives["tvd"].target == "kdcore.objectives.library:TVDObjective"
    assert registry_main(["--check", "--file", str(stale)]) == 0


def test_write_refuses_a_target_of_the_wrong_kind(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    wrong = tmp_path / "registry.yaml"
    wrong.write_text("tasks:\n  vanilla: {target: kd_plugins.vanilla:VanillaKD}\n")
    before = wrong.read_text()
    assert registry_main(["--write", "--file", str(wrong)]) == 2
    error = capsys.readouterr().err
    assert "tasks.vanilla" in error and "not a Task subclass" in error
    assert wrong.read_text() == before


def test_listing_imports_no_component_module() -> None:
    """kd list reads registry.yaml only: neither torch nor any built-in component is imported."""
    code = ("import sys; from kdcore.registry import Registry; Registry.discover(entry_points=False); "
            "print(sorted(m for m in ('torch', 'kd_plugins', 'kd_tasks') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
