"""The deviation tables of docs/speech-methods.md and docs/text.md state the settings the code has.

Each table row that names a setting (a dotted config key in backticks) gives its value in the default run
(``kd run --task TASK --plugin X``) and under the table's reference preset (``paper`` for the speech methods,
``imitkd-star`` for ImitKD), each in backticks; both must equal the resolved configuration's value.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pytest

from kdcore.config import parse_set_option
from kdcore.registry import Registry
from kdcore.resolve import resolve_run

DOCS = Path(__file__).resolve().parents[2] / "docs"
# plugin -> (page, heading, task, the reference preset)
TABLES = {"distilhubert": ("speech-methods.md", "### DistilHuBERT: deviations", "superb", "paper"),
          "gendistiller": ("speech-methods.md", "### GenDistiller: deviations", "superb", "paper"),
          "imitation": ("text.md", "## ImitKD: deviations", "wmt", "imitkd-star")}
SETTING = re.compile(r"`([a-z_]+(?:\.[a-z_]+)+)`")
VALUE = re.compile(r"`([^`]*)`")
COLUMNS = ("what", "paper", "setting", "default run", "preset", "why kd differs")


def table_rows(page: str, heading: str, preset: str) -> list[dict[str, str]]:
    """The rows of the first table after ``heading``, as column -> cell (the second column names the reference, the
    fifth is the preset's, headed by its name in backticks)."""
    lines = (DOCS / page).read_text(encoding="utf-8").split(heading, 1)[1].splitlines()
    start = next(index for index, line in enumerate(lines) if line.startswith("| what"))
    header = [cell.strip() for cell in lines[start].strip().strip("|").split("|")]
    expected = [f"`{preset}`" if c == "preset" else c for c in COLUMNS]
    assert [name for index, name in enumerate(header) if index != 1] == [c for i, c in enumerate(expected) if i != 1]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        assert len(cells) == len(header), line
        rows.append(dict(zip(COLUMNS, cells)))
    return rows


def lookup(config: dict[str, Any], key: str) -> Any:
    value: Any = config
    for part in key.split("."):
        value = value[part]
    return value


def same(documented: Any, actual: Any) -> bool:
    if isinstance(documented, list) and isinstance(actual, (list, tuple)):
        return len(documented) == len(actual) and all(same(d, a) for d, a in zip(documented, actual))
    if isinstance(documented, float) or isinstance(actual, float):
        return not isinstance(documented, bool) and not isinstance(actual, bool) and \
            math.isclose(float(documented), float(actual), rel_tol=1e-3)
    return documented == actual


@pytest.fixture(scope="module")
def registry() -> Registry:
    return Registry.discover(entry_points=False)


@pytest.mark.parametrize("plugin", sorted(TABLES))
def test_documented_settings_are_the_configs(registry: Registry, plugin: str) -> None:
    page, heading, task, reference = TABLES[plugin]
    configs = {column: resolve_run(registry, task=task, plugin=plugin, preset=preset).to_dict()
               for column, preset in (("default run", None), ("preset", reference))}
    checked = 0
    for row in table_rows(page, heading, reference):
        setting = SETTING.fullmatch(row["setting"])
        if setting is None:
            assert row["setting"] == "—", row  # a row either names its setting or says it has none
            continue
        for column, config in configs.items():
            cell = VALUE.fullmatch(row[column])
            assert cell is not None, f"{row['what']}: the {column} value must be one value in backticks"
            documented = parse_set_option(f"value={cell.group(1)}")["value"]
            actual = lookup(config, setting.group(1))
            assert same(documented, actual), f"{plugin} {row['what']}: docs say {column} {setting.group(1)} = " \
                                             f"{documented!r}, the config has {actual!r}"
            checked += 1
    assert checked >= 2 * 12, (plugin, checked)  # the tables are still there and still name their settings
