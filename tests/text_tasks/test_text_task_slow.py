"""A real comparison on the embedded translation corpus (slow: minutes; run with -m slow).

Needs the Home Assistant wheel without downloading it: $KD_HOMEASSISTANT_WHEEL or the
copy in the user's kd cache (~/.cache/kd/downloads/); skipped otherwise.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from kd_tasks.text.translation_data import HA_VERSION, HA_WHEEL_NAME

pytestmark = pytest.mark.slow


def _wheel() -> Path | None:
    downloads = Path.home() / ".cache" / "kd" / "downloads"
    for candidate in (os.environ.get("KD_HOMEASSISTANT_WHEEL"), downloads / f"homeassistant-{HA_VERSION}" /
                      HA_WHEEL_NAME, downloads / HA_WHEEL_NAME):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def test_teacher_beats_scratch_and_imitation_beats_scratch(tmp_path: Path, run_kd) -> None:  # noqa: ANN001
    wheel = _wheel()
    if wheel is None:
        pytest.skip(f"the Home Assistant wheel ({HA_WHEEL_NAME}) is not available locally")
    env = {"KD_HOMEASSISTANT_WHEEL": str(wheel), "OMP_NUM_THREADS": "1"}
    # A smaller, faster version of the default comparison (docs/text.md has the full one).
    common = ["--set", "teacher.args.train_steps=600", "--set", "trainer.max_steps=200", "--set",
              "trainer.eval_every=100", "--set", "data.max_test=300", "--set", "data.max_valid=200",
              "--set", "data.eval_beams=[1]"]
    results = {}
    for plugin in ("scratch", "imitation"):
        out = tmp_path / plugin
        result = run_kd("run", "--task", "wmt", "--plugin", plugin, *common, "--out", str(out), env=env, timeout=3600)
        assert result.returncode == 0, result.stderr[-3000:]
        results[plugin] = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    teacher, scratch = results["scratch"]["teacher"], results["scratch"]["student"]
    imitation = results["imitation"]["student"]
    assert teacher["bleu"] > scratch["bleu"] + 2.0, (teacher["bleu"], scratch["bleu"])
    assert imitation["bleu"] > scratch["bleu"], (imitation["bleu"], scratch["bleu"])
    assert results["imitation"]["student"]["greedy_sentences_per_second"] > \
        results["imitation"]["teacher"]["greedy_sentences_per_second"]
