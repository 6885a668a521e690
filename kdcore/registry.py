"""Where names come from: registry.yaml for built-ins, entry points for the rest.

Everything is registered through the same pluggy hooks. The built-in entries
are read from ``registry.yaml`` (name -> ``module:attribute`` + description)
and imported only when used; third-party packages are found through the
``kd.plugins`` entry-point group. Names are matched exactly, never by
substring. A name registered twice is an error naming both sources; a plugin
that fails to load is recorded with its error and the others keep working.

One source for names and descriptions: a class's ``name`` and ``description``
class attributes. ``registry.yaml`` is generated from them
(``python -m kdcore.registry --write``) and only written by hand where it says which
class is a built-in of which kind (``target``). The file exists so that ``kd list``
and name lookup stay fast, importing no torch-heavy module; the classes stay the
source because third-party classes carry their own name and description, so one
way of writing a component serves both, and a class imported directly (tests,
notebooks) knows its name. tests/core/test_registry.py fails when the file differs
from what ``--write`` produces.
"""
from __future__ import annotations

import argparse
import difflib
import importlib
import importlib.metadata
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pluggy
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kdcore.errors import KDUserError, did_you_mean
from kdcore.hookspecs import ENTRY_POINT_GROUP, PROJECT_NAME, KDHookSpecs, hookimpl

BUILTIN_SOURCE = "built-in"
DEFAULT_REGISTRY_FILE = Path(__file__).with_name("registry.yaml")


@dataclass(frozen=True)
class Kind:
    """A kind of registered thing: its yaml section, hook and required base class."""

    key: str
    section: str
    hook: str
    base: str  # attribute of kdcore.interfaces

    @property
    def plural(self) -> str:
        return self.section


KINDS: dict[str, Kind] = {
    k.key: k
    for k in (
        Kind("plugin", "plugins", "kd_register_methods", "Method"),
        Kind("task", "tasks", "kd_register_tasks", "Task"),
        Kind("objective", "objectives", "kd_register_objectives", "Objective"),
        Kind("teacher", "teachers", "kd_register_teachers", "ModelFactory"),
        Kind("student", "students", "kd_register_students", "ModelFactory"),
        Kind("tracker", "trackers", "kd_register_trackers", "Tracker"),
    )
}

_TARGET_PATTERN = r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$"


class LazyEntry(BaseModel):
    """A registry.yaml row: imported only when the name is used."""

    model_config = ConfigDict(extra="forbid")
    target: str = Field(pattern=_TARGET_PATTERN, description="module:attribute")
    description: str


class RegistryFile(BaseModel):
    """Schema of registry.yaml."""

    model_config = ConfigDict(extra="forbid")
    plugins: dict[str, LazyEntry] = {}
    tasks: dict[str, LazyEntry] = {}
    objectives: dict[str, LazyEntry] = {}
    teachers: dict[str, LazyEntry] = {}
    students: dict[str, LazyEntry] = {}
    trackers: dict[str, LazyEntry] = {}


def import_target(target: str) -> Any:
    """The object a ``module:attribute`` string names (importing the module)."""
    module_name, _, attribute = target.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in attribute.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass
class Entry:
    """One registered name."""

    kind: str
    name: str
    description: str
    source: str
    target: str | None = None  # lazy built-in
    obj: Any = None  # already-imported class (third-party hooks usually return these)
    _loaded: Any = field(default=None, repr=False)

    def load(self) -> Any:
        """Import (once) and return the registered class, checking its type and name."""
        if self._loaded is not None:
            return self._loaded
        obj = self.obj
        if obj is None:
            try:
                obj = import_target(str(self.target))
            except Exception as error:  # noqa: BLE001 - reported to the user with the entry's name
                raise KDUserError(
                    f"The {self.kind} '{self.name}' ({self.source}) could not be loaded from '{self.target}': "
                    f"{type(error).__name__}: {error}. Other plugins still work; check that the package providing it "
                    f"is installed correctly."
                ) from None
        from kdcore import interfaces

        base = getattr(interfaces, KINDS[self.kind].base)
        if not (isinstance(obj, type) and issubclass(obj, base)):
            raise KDUserError(
                f"The {self.kind} '{self.name}' ({self.source}) resolves to {obj!r}, which is not a subclass of "
                f"kdcore.interfaces.{base.__name__}."
            )
        declared = getattr(obj, "name", None)
        if declared != self.name:
            raise KDUserError(
                f"The {self.kind} '{self.name}' ({self.source}) resolves to {obj.__qualname__}, whose name attribute is "
                f"{declared!r}; the registered name and the class's name must be equal."
            )
        self._loaded = obj
        return obj


@dataclass
class PluginFailure:
    """A plugin (entry point or hook implementation) that could not be loaded."""

    name: str
    source: str
    error: str


class BuiltinPlugin:
    """Registers the entries of registry.yaml through the same hooks as any plugin."""

    def __init__(self, registry_file: Path = DEFAULT_REGISTRY_FILE) -> None:
        self.registry_file = Path(registry_file)
        self._data = _read_registry_file(self.registry_file)

    def _entries(self, section: str) -> list[tuple[str, LazyEntry]]:
        return list(getattr(self._data, section).items())

    @hookimpl
    def kd_register_methods(self) -> list[Any]:
        return self._entries("plugins")

    @hookimpl
    def kd_register_tasks(self) -> list[Any]:
        return self._entries("tasks")

    @hookimpl
    def kd_register_objectives(self) -> list[Any]:
        return self._entries("objectives")

    @hookimpl
    def kd_register_teachers(self) -> list[Any]:
        return self._entries("teachers")

    @hookimpl
    def kd_register_students(self) -> list[Any]:
        return self._entries("students")

    @hookimpl
    def kd_register_trackers(self) -> list[Any]:
        return self._entries("trackers")


def _read_registry_file(path: Path) -> RegistryFile:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise KDUserError(f"{path}:{where} is not valid YAML: {getattr(error, 'problem', error)}.") from None
    try:
        return RegistryFile.model_validate(raw)
    except ValidationError as error:
        first = error.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        raise KDUserError(
            f"{path}: key '{key}' is invalid ({first['msg']}). Each section (plugins, tasks, objectives, teachers, "
            f"students, trackers) maps a name to {{target: 'module:attribute', description: '...'}}."
        ) from None


def _distribution_label(entry_point: importlib.metadata.EntryPoint) -> str:
    dist = getattr(entry_point, "dist", None)
    if dist is None:
        return f"entry point '{entry_point.name}'"
    return f"package {dist.metadata['Name']} {dist.version}"


class Registry:
    """All registered names of every kind, plus the plugin manager for lifecycle hooks."""

    def __init__(self, plugin_manager: pluggy.PluginManager, sources: dict[str, str]) -> None:
        self.plugin_manager = plugin_manager
        self._sources = sources  # plugin name in the manager -> human-readable source
        self.entries: dict[str, dict[str, Entry]] = {kind: {} for kind in KINDS}
        self.failures: list[PluginFailure] = []

    @property
    def hook(self) -> Any:
        """The lifecycle hooks (``registry.hook.kd_on_step_end(...)``)."""
        return self.plugin_manager.hook

    @classmethod
    def discover(cls, registry_file: Path = DEFAULT_REGISTRY_FILE, entry_points: bool = True) -> "Registry":
        """Built-ins from ``registry_file`` plus every installed ``kd.plugins`` entry point."""
        manager = pluggy.PluginManager(PROJECT_NAME)
        manager.add_hookspecs(KDHookSpecs)
        sources = {"kd-builtin": BUILTIN_SOURCE}
        manager.register(BuiltinPlugin(registry_file), name="kd-builtin")
        registry = cls(manager, sources)
        if entry_points:
            for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
                source = _distribution_label(entry_point)
                plugin_name = f"{source}:{entry_point.name}"
                try:
                    plugin = entry_point.load()
                    manager.register(plugin, name=plugin_name)
                except Exception as error:  # noqa: BLE001 - one broken plugin must not stop the others
                    registry.failures.append(PluginFailure(entry_point.name, source, f"{type(error).__name__}: {error}"))
                    continue
                sources[plugin_name] = source
        registry._collect()
        return registry

    def register_plugin(self, plugin: Any, name: str, source: str) -> None:
        """Register a plugin object directly (tests, notebooks) and collect its entries."""
        self.plugin_manager.register(plugin, name=name)
        self._sources[name] = source
        self._collect(only=name)

    def _collect(self, only: str | None = None) -> None:
        for kind in KINDS.values():
            caller = getattr(self.plugin_manager.hook, kind.hook)
            for impl in caller.get_hookimpls():
                if only is not None and impl.plugin_name != only:
                    continue
                source = self._sources.get(impl.plugin_name, impl.plugin_name)
                try:
                    items = impl.function() or []
                except Exception as error:  # noqa: BLE001 - reported by name, the others keep working
                    self.failures.append(PluginFailure(impl.plugin_name, source, f"{type(error).__name__}: {error}"))
                    continue
                for item in items:
                    self._add(kind.key, item, source)

    def _add(self, kind: str, item: Any, source: str) -> None:
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], LazyEntry):
            name, lazy = item
            entry = Entry(kind, name, lazy.description, source, target=lazy.target)
        elif isinstance(item, type) and isinstance(getattr(item, "name", None), str):
            description = getattr(item, "description", "") or (item.__doc__ or "").strip().split("\n")[0]
            entry = Entry(kind, item.name, description, source, obj=item)
        else:
            self.failures.append(PluginFailure(
                str(item), source, f"registered {item!r} as a {kind}, but it is neither a class with a 'name' "
                f"attribute nor a registry.yaml entry"))
            return
        existing = self.entries[kind].get(entry.name)
        if existing is not None:
            raise KDUserError(
                f"The {kind} name '{entry.name}' is registered twice: by {existing.source} and by {entry.source}. "
                f"Names must be unique; uninstall one of the packages or rename the {kind} in one of them."
            )
        self.entries[kind][entry.name] = entry

    def names(self, kind: str) -> list[str]:
        return sorted(self.entries[kind])

    def get(self, kind: str, name: str) -> Entry:
        """The entry for an exact name, or a KDUserError listing what exists."""
        table = self.entries[kind]
        if name in table:
            return table[name]
        available = ", ".join(sorted(table)) or "(none)"
        hint = did_you_mean(name, table)
        broken = [f for f in self.failures]
        extra = ""
        if broken:
            extra = " Some plugins failed to load and may have provided it: " + "; ".join(
                f"{f.name} ({f.source}): {f.error}" for f in broken) + "."
        raise KDUserError(
            f"Unknown {kind} '{name}'.{hint} Available {KINDS[kind].plural}: {available}. "
            f"Run 'kd list' to see every registered name and where it comes from.{extra}"
        )

    def load(self, kind: str, name: str) -> Any:
        """The class registered under ``name``."""
        return self.get(kind, name).load()


# --- registry.yaml, generated from the classes ------------------------------------------------------------------

_REGISTRY_HEADER = """\
# Built-in kd entries: name -> {target: "module:attribute", description}.
# GENERATED from each class's `name` and `description` by `python -m kdcore.registry --write`:
# change those on the class, then rerun it (tests/core/test_registry.py fails on any difference).
# Written by hand here: only which class is a built-in of which section (`target`); to add one,
# put `<its name>: {target: "module:Class"}` under the section and run --write.
# Read with yaml.safe_load; a target is imported only when its name is used.
# Third-party packages add entries through the `kd.plugins` entry-point group
# (docs/writing-plugins.md); a name may be registered only once.
"""


def generated_registry_text(registry_file: Path = DEFAULT_REGISTRY_FILE) -> str:
    """``registry_file`` as ``--write`` makes it: each row's section and target kept, name and description the class's.

    Imports every target (the one place that does); a target that is not a proper class of its section, or a
    description that is empty or longer than one line, is a :class:`KDUserError`.
    """
    from kdcore import interfaces

    try:
        raw = yaml.safe_load(Path(registry_file).read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise KDUserError(f"{registry_file} is not valid YAML: {error}") from None
    unknown = sorted(set(raw) - {kind.section for kind in KINDS.values()})
    if unknown:
        raise KDUserError(f"{registry_file}: unknown section(s) {unknown}; the sections are "
                          f"{[kind.section for kind in KINDS.values()]}.")
    lines = [_REGISTRY_HEADER]
    for kind in KINDS.values():
        base = getattr(interfaces, kind.base)
        rows: dict[str, tuple[str, str]] = {}
        for key, row in (raw.get(kind.section) or {}).items():
            target = row.get("target") if isinstance(row, dict) else None
            where = f"{registry_file}: {kind.section}.{key}"
            if not isinstance(target, str):
                raise KDUserError(f"{where} has no 'target: module:Class'.")
            try:
                cls = import_target(target)
            except Exception as error:  # noqa: BLE001 - a developer tool: name the row and the error
                raise KDUserError(f"{where}: target '{target}' could not be imported: "
                                  f"{type(error).__name__}: {error}") from None
            name = getattr(cls, "name", None) if isinstance(cls, type) and issubclass(cls, base) else None
            if not isinstance(name, str) or not name:
                raise KDUserError(f"{where}: '{target}' is not a {base.__name__} subclass with a 'name' attribute.")
            description = getattr(cls, "description", "")
            if not description or "\n" in description:
                raise KDUserError(f"{where}: {cls.__qualname__}.description must be one non-empty line "
                                  f"(what kd list shows), got {description!r}.")
            if name in rows:
                raise KDUserError(f"{where}: the name '{name}' is already taken by {rows[name][0]} in this section.")
            rows[name] = (target, description)
        lines.append(f"{kind.section}:" + ("" if rows else " {}"))
        for name, (target, description) in rows.items():
            # A JSON string is a YAML double-quoted scalar: any description round-trips.
            lines += [f"  {name}:", f"    target: {target}",
                      f"    description: {json.dumps(description, ensure_ascii=False)}"]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m kdcore.registry --write | --check``: regenerate registry.yaml, or report how it is stale."""
    parser = argparse.ArgumentParser(
        prog="python -m kdcore.registry",
        description="Regenerate registry.yaml from the built-in classes' name and description attributes.")
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--write", action="store_true", help="rewrite the file")
    action.add_argument("--check", action="store_true", help="exit 1 and show the diff when the file is stale")
    parser.add_argument("--file", type=Path, default=DEFAULT_REGISTRY_FILE.resolve(), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        wanted = generated_registry_text(args.file)
    except KDUserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    current = args.file.read_text(encoding="utf-8")
    if wanted == current:
        print(f"{args.file} is up to date.")
        return 0
    if args.check:
        sys.stdout.writelines(difflib.unified_diff(current.splitlines(True), wanted.splitlines(True),
                                                   str(args.file), "generated from the classes"))
        print(f"\n{args.file} is stale: run `python -m kdcore.registry --write`.")
        return 1
    args.file.write_text(wanted, encoding="utf-8")
    print(f"Wrote {args.file}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
