"""Every shell command in the example plugins' READMEs and in docs/writing-plugins.md runs, as documented.

The commands are read from the documents' ```bash blocks, so a command added to or changed in a document is
tested as written. Each is run the way a user from the repository root would, with three differences that keep
the test offline, fast and out of the user's environment:

* ``pip install PATH...`` installs into a temporary folder (``--no-deps --no-build-isolation --target``) put on
  PYTHONPATH, so ``kd`` finds the examples through their real ``kd.plugins`` entry points;
* ``kd run`` writes to a temporary ``--out`` (and a test's own KD_CACHE_DIR, from conftest);
* ``kd run --task wmt`` reads the committed 400-pair sample of the embedded corpus instead of downloading the
  67 MB wheel it is built from (the same data source; the tiny preset uses 400 pairs either way).

Any other command fails the test until this file is taught how to run it.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCUMENTS = ["examples/kd-example-objective/README.md", "examples/kd-example-method/README.md",
             "docs/writing-plugins.md"]
WMT_SAMPLE = REPO / "tests" / "text_tasks" / "data" / "ha-en-de-sample.tsv"
WMT_OFFLINE = ["--set", "data.corpus=files", "--set", f"data.train.path={WMT_SAMPLE}", "--set", "data.valid_size=16",
               "--set", "data.test_size=24"]
_FENCE = re.compile(r"^```(bash|sh|shell)\s*\n(.*?)^```", re.MULTILINE | re.DOTALL)


def shell_commands(text: str) -> list[list[str]]:
    """The commands of the ```bash blocks of ``text``, as argument lists (continuations joined, comments dropped)."""
    commands = []
    for match in _FENCE.finditer(text):
        for line in match.group(2).replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(words)
    return commands


def _documented() -> list[tuple[str, list[str]]]:
    """(first document, command) for every distinct command, in the documents' order."""
    seen: dict[str, tuple[str, list[str]]] = {}
    for document in DOCUMENTS:
        for words in shell_commands((REPO / document).read_text(encoding="utf-8")):
            seen.setdefault(shlex.join(words), (document, words))
    return list(seen.values())


COMMANDS = _documented()


def test_documents_have_commands() -> None:
    for document in DOCUMENTS:
        assert shell_commands((REPO / document).read_text(encoding="utf-8")), f"{document} shows no ```bash command"


def test_shell_commands_are_read_as_written() -> None:
    text = "x\n```bash\npip install ./a  # note\nkd run --task toy \\\n    --set 'a.b=[1, 2]'\n# output\n```\n"
    assert shell_commands(text) == [["pip", "install", "./a"], ["kd", "run", "--task", "toy", "--set", "a.b=[1, 2]"]]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, subprocess.CompletedProcess[str]]]:
    """Every documented ``pip install``, run once into one folder; the results by command, for their tests."""
    target = tmp_path_factory.mktemp("documented-site")
    results = {}
    for _, words in COMMANDS:
        if words[:2] == ["pip", "install"]:
            results[shlex.join(words)] = _pip_install(words, target, tmp_path_factory.mktemp("plugin-src"))
    return target, results


def _pip_install(words: list[str], target: Path, scratch: Path) -> subprocess.CompletedProcess[str]:
    paths = words[2:]
    assert paths and all(p.startswith("./") for p in paths), f"only `pip install ./PATH...` is supported: {words}"
    copies = []
    for path in paths:  # build from copies so that build/ and *.egg-info never land in the repository
        copy = scratch / Path(path).name
        shutil.copytree(REPO / path, copy, ignore=shutil.ignore_patterns("build", "*.egg-info"))
        copies.append(str(copy))
    return subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                           "--upgrade", "--target", str(target), *copies], capture_output=True, text=True, timeout=300)


def _check_run(out: Path) -> None:
    """A documented run trained what its config names: every configured objective's loss is in log.jsonl."""
    assert (out / "metrics.json").is_file() and (out / "report.md").is_file()
    objectives = yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8"))["objectives"]
    train = [r for r in map(json.loads, (out / "log.jsonl").read_text(encoding="utf-8").splitlines())
             if r["type"] == "train"]
    assert train and all(label in record for record in train for label in objectives), (objectives, train[-1])


@pytest.mark.parametrize(("document", "words"), COMMANDS, ids=[f"{d}: {shlex.join(w)}" for d, w in COMMANDS])
def test_documented_command_runs(document: str, words: list[str],
                                 site: tuple[Path, dict[str, subprocess.CompletedProcess[str]]], tmp_path: Path) -> None:
    target, installs = site
    if words[:2] == ["pip", "install"]:
        result = installs[shlex.join(words)]
    else:
        assert words[0] == "kd", f"{document}: no rule to run {shlex.join(words)!r}; teach this test"
        args = words[1:]
        if args[:1] == ["run"]:
            assert "--out" not in args, f"{document}: a documented run writes to its default --out"
            args += ["--out", str(tmp_path / "run")]
            if args[args.index("--task") + 1] == "wmt":
                args += WMT_OFFLINE
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), str(REPO)]), "OMP_NUM_THREADS": "1"}
        result = subprocess.run([sys.executable, "-m", "kdcore", *args], cwd=REPO, env=env, capture_output=True,
                                text=True, timeout=600)
        if args[:1] == ["run"] and result.returncode == 0:
            _check_run(tmp_path / "run")
    assert result.returncode == 0, f"{document}: `{shlex.join(words)}` failed:\n{result.stderr[-3000:]}"


def test_code_shown_from_a_file_is_that_file() -> None:
    """A ```python block whose first line is ``# PATH`` shows PATH's code verbatim, so the guide cannot drift."""
    shown = 0
    for document in DOCUMENTS:
        text = (REPO / document).read_text(encoding="utf-8")
        for block in re.findall(r"^```python\n(.*?)^```", text, re.MULTILINE | re.DOTALL):
            first, _, code = block.partition("\n")
            if first.startswith("# ") and (REPO / first[2:]).is_file():
                assert code in (REPO / first[2:]).read_text(encoding="utf-8"), f"{document} misquotes {first[2:]}"
                shown += 1
    assert shown >= 2  # the objective and the method
