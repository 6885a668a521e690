"""Safe loading, enforced on the source tree so that future code cannot regress.

Every Python file of the repository (kdcore, kd, plugins, tasks, examples,
benchmarks, tests, setup.py) is parsed with :mod:`ast` and checked:

* ``torch.load`` only with ``weights_only=True``;
* ``trust_remote_code`` never passed as a literal ``True`` and never defaulting to ``True``;
* YAML only through safe loaders (``yaml.safe_load``/``safe_load_all``, or ``yaml.load``
  with ``SafeLoader``/``CSafeLoader``/a class of this tree derived from them);
* no ``shell=True``, ``os.system`` or ``os.popen``;
* no pickle: no ``import pickle``/``cPickle``/``dill``/``joblib``/``marshal``/``shelve``,
  no ``allow_pickle=True``, no ``read_pickle``;
* no ``eval``/``exec`` of strings.

Checks on behaviour follow: plugins come only from registry.yaml and entry points
(a ``module:attribute`` given as a name is not imported), and paths given in a
config are checked before use.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from kdcore.errors import KDUserError

REPO = Path(__file__).resolve().parents[2]
SKIP_PARTS = {".venv", "build", "dist", ".git", "__pycache__", "node_modules", ".eggs"}
SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader"}
FORBIDDEN_MODULES = {"pickle", "cPickle", "_pickle", "dill", "joblib", "marshal", "shelve", "cloudpickle"}


def source_files() -> list[Path]:
    return sorted(p for p in REPO.rglob("*.py") if not SKIP_PARTS & set(p.relative_to(REPO).parts))


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _safe_loader_classes(trees: dict[Path, ast.Module]) -> set[str]:
    """Names of classes in the tree that derive (directly or through each other) from a yaml SafeLoader."""
    bases: dict[str, set[str]] = {}
    for tree in trees.values():
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                bases.setdefault(node.name, set()).update(_dotted(b).split(".")[-1] for b in node.bases)
    safe = set(SAFE_YAML_LOADERS)
    changed = True
    while changed:
        changed = False
        for name, parents in bases.items():
            if name not in safe and parents & safe:
                safe.add(name)
                changed = True
    return safe


def violations(tree: ast.Module, safe_loaders: set[str]) -> list[tuple[int, str]]:
    """(line, rule) for every unsafe construct in one parsed file."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, f"imports {a.name}") for a in node.names if a.name.split(".")[0] in FORBIDDEN_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in FORBIDDEN_MODULES:
            found.append((node.lineno, f"imports from {node.module}"))
        elif isinstance(node, ast.ImportFrom) and node.module == "torch" and any(a.name == "load" for a in node.names):
            found.append((node.lineno, "from torch import load (use torch.load(..., weights_only=True))"))
        elif isinstance(node, (ast.AnnAssign, ast.Assign)):
            targets = [node.target] if isinstance(node, ast.AnnAssign) else node.targets
            value = node.value
            if any(_dotted(t).split(".")[-1] == "trust_remote_code" for t in targets) and value is not None:
                default = value.args[0] if isinstance(value, ast.Call) and value.args else _keyword(
                    value, "default") if isinstance(value, ast.Call) else value
                if _is_true(default):
                    found.append((node.lineno, "trust_remote_code defaults to True"))
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            arguments = node.args
            positional = arguments.posonlyargs + arguments.args
            pairs = list(zip(positional[len(positional) - len(arguments.defaults):], arguments.defaults))
            pairs += [(a, d) for a, d in zip(arguments.kwonlyargs, arguments.kw_defaults) if d is not None]
            found += [(node.lineno, "trust_remote_code defaults to True") for a, d in pairs
                      if a.arg == "trust_remote_code" and _is_true(d)]
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            last = name.split(".")[-1]
            if name == "torch.load" and not _is_true(_keyword(node, "weights_only")):
                found.append((node.lineno, "torch.load without weights_only=True"))
            if _is_true(_keyword(node, "trust_remote_code")):
                found.append((node.lineno, "trust_remote_code=True"))
            if _is_true(_keyword(node, "shell")):
                found.append((node.lineno, "shell=True"))
            if name in ("os.system", "os.popen"):
                found.append((node.lineno, name))
            if _is_true(_keyword(node, "allow_pickle")) or last == "read_pickle":
                found.append((node.lineno, "pickle loading"))
            if name in ("eval", "exec"):
                found.append((node.lineno, f"{name}()"))
            if name in ("yaml.unsafe_load", "yaml.full_load", "yaml.unsafe_load_all", "yaml.full_load_all"):
                found.append((node.lineno, name))
            if name in ("yaml.load", "yaml.load_all"):
                loader = _keyword(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
                if loader is None or _dotted(loader).split(".")[-1] not in safe_loaders:
                    found.append((node.lineno, f"{name} without a SafeLoader"))
    return found


def test_the_source_tree_has_no_unsafe_loading() -> None:
    files = source_files()
    assert len(files) > 50 and any(p.parts[-2:] == ("kdcore", "checkpoint.py") for p in files)
    trees = {path: ast.parse(path.read_text(encoding="utf-8"), filename=str(path)) for path in files}
    safe = _safe_loader_classes(trees)
    assert "StrictBoolSafeLoader" in safe  # kdcore.config's loader is recognised as a SafeLoader subclass
    problems = [f"{path.relative_to(REPO)}:{line}: {rule}" for path, tree in trees.items()
                for line, rule in violations(tree, safe)]
    assert problems == [], "unsafe loading or execution:\n" + "\n".join(problems)


BAD = {
    "torch.load without weights_only=True": "import torch\ntorch.load('x.pt')\n",
    "torch.load weights_only=False": "import torch\ntorch.load('x.pt', weights_only=False)\n",
    "trust_remote_code=True": "from transformers import AutoModel\nAutoModel.from_pretrained('x', trust_remote_code=True)\n",
    "trust_remote_code field": "class C:\n    trust_remote_code: bool = Field(True)\n",
    "trust_remote_code parameter": "def f(trust_remote_code=True):\n    pass\n",
    "yaml.load": "import yaml\nyaml.load(text, Loader=yaml.Loader)\n",
    "yaml.load positional": "import yaml\nyaml.load(text, yaml.FullLoader)\n",
    "yaml.full_load": "import yaml\nyaml.full_load(text)\n",
    "shell=True": "import subprocess\nsubprocess.run('ls', shell=True)\n",
    "os.system": "import os\nos.system('ls')\n",
    "import pickle": "import pickle\n",
    "from pickle": "from pickle import loads\n",
    "allow_pickle": "import numpy as np\nnp.load('x.npy', allow_pickle=True)\n",
    "eval": "eval('1 + 1')\n",
    "from torch import load": "from torch import load\n",
}


@pytest.mark.parametrize("label", sorted(BAD))
def test_the_scanner_catches_each_unsafe_construct(label: str) -> None:
    assert violations(ast.parse(BAD[label]), set(SAFE_YAML_LOADERS)), label


def test_the_scanner_accepts_the_safe_forms() -> None:
    good = ("import torch, yaml\ntorch.load('x.pt', weights_only=True)\nyaml.safe_load(t)\n"
            "yaml.load(t, Loader=yaml.SafeLoader)\nf(trust_remote_code=config.trust_remote_code)\n"
            "def g(trust_remote_code: bool = False):\n    pass\nmodel.eval()\n")
    assert violations(ast.parse(good), set(SAFE_YAML_LOADERS)) == []


def test_yaml_tags_that_build_objects_are_refused(tmp_path: Path) -> None:
    from kdcore.config import load_yaml_file

    hostile = tmp_path / "run.yaml"
    hostile.write_text("trainer: !!python/object/apply:os.system ['echo owned']\n", encoding="utf-8")
    with pytest.raises(KDUserError, match="malformed YAML"):
        load_yaml_file(hostile)
    assert issubclass(__import__("kdcore.config", fromlist=["x"]).StrictBoolSafeLoader, yaml.SafeLoader)


def test_a_module_path_is_not_a_plugin_name() -> None:
    """Plugins come from registry.yaml and entry points only: 'os:system' is not imported by name."""
    from kdcore.registry import Registry
    from kdcore.resolve import resolve_run

    registry = Registry.discover(entry_points=False)
    for name in ("os:system", "kd_plugins.vanilla:VanillaKD", "../../etc/passwd"):
        with pytest.raises(KDUserError):
            resolve_run(registry, task="toy", plugin=name)


def test_config_paths_are_checked_before_use(tmp_path: Path, run_kd) -> None:
    missing = run_kd("run", "--task", "toy", "--plugin", "vanilla", "--config", str(tmp_path / "nope.yaml"),
                     cwd=tmp_path)
    assert missing.returncode == 2 and "nope.yaml' does not exist" in missing.stderr
    folder = run_kd("run", "--task", "toy", "--plugin", "vanilla", "--config", str(tmp_path), cwd=tmp_path)
    assert folder.returncode == 2 and "cannot be read" in folder.stderr
    blocker = tmp_path / "a-file"
    blocker.write_text("x", encoding="utf-8")
    cache = run_kd("run", "--task", "toy", "--plugin", "vanilla", "--preset", "tiny", "--set",
                   f"cache_dir={blocker}/cache", "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert cache.returncode == 2 and "cache_dir" in cache.stderr and "a-file" in cache.stderr
    for result in (missing, folder, cache):
        assert "Traceback" not in result.stderr
