"""Replacing a text method's default objective on the command line changes what is trained (real tiny wmt runs
through the CLI), and an objective asking for signals the method cannot hand over is refused at planning."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

SAMPLE = Path(__file__).parents[1] / "text_tasks" / "data" / "ha-en-de-sample.tsv"
# The tiny preset on the committed 400-pair sample, cut to two logged steps and one greedy evaluation.
TINY_WMT = ["--task", "wmt", "--preset", "tiny", "--set", "data.corpus=files", "--set", f"data.train.path={SAMPLE}",
            "--set", "data.valid_size=16", "--set", "data.test_size=24", "--set", "data.eval_beams=[1]",
            "--set", "trainer.max_steps=2", "--set", "trainer.log_every=1", "--set", "trainer.eval_every=2",
            "--set", "trainer.checkpoint_every=2", "--set", "trainer.evaluate_teacher=false"]


def train_log(tmp_path: Path, name: str, plugin: str, *sets: str) -> list[dict]:
    from kdcore.cli import main

    out = tmp_path / name
    assert main(["run", "--plugin", plugin, *TINY_WMT, *sets, "--out", str(out)]) == 0
    records = [json.loads(line) for line in (out / "log.jsonl").read_text(encoding="utf-8").splitlines()]
    return [record for record in records if record["type"] == "train"]


@pytest.mark.parametrize(("plugin", "default_label", "swap", "label"), [
    ("imitation", "kd", "{name: jsd, args: {beta: 0.5}}", "jsd"),
    ("word-kd", "kd", "{name: skew_forward_kl}", "skew_forward_kl"),
    ("seq-kd", "kd", "{name: reverse_kl}", "reverse_kl"),
])
def test_a_swapped_objective_is_what_trains(tmp_path: Path, plugin: str, default_label: str, swap: str,
                                            label: str) -> None:
    default = train_log(tmp_path, "default", plugin)
    swapped = train_log(tmp_path, "swapped", plugin, "--set", f"objectives.{default_label}=null",
                        "--set", f"objectives.{label}={swap}")
    assert [r["step"] for r in swapped] == [r["step"] for r in default] == [1, 2]
    for record in swapped:
        assert label in record and default_label not in record
        assert record["loss"] == pytest.approx(record[label])  # the only objective, weight 1
    assert all(default_label in record and label not in record for record in default)
    assert swapped[0]["loss"] != pytest.approx(default[0]["loss"], rel=1e-3)


def test_the_hard_preset_and_an_added_nll_are_objectives_too(tmp_path: Path) -> None:
    word = train_log(tmp_path, "word-nll", "word-kd", "--set", "objectives.nll={name: nll, weight: 0.5}")
    assert all(r["loss"] == pytest.approx(r["kd"] + 0.5 * r["nll"], rel=1e-5) for r in word)
    hard = train_log(tmp_path, "hard", "imitation", "--set", "method.variant=hard", "--set", "objectives.kd.name=nll")
    assert all("beta" in r and "kd/positions" in r and "kd/fused" not in r for r in hard)  # nll: no fused part


@pytest.mark.parametrize("dry_run", [True, False])
def test_a_hidden_state_objective_is_refused_at_planning(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                         dry_run: bool) -> None:
    from kdcore.cli import main

    out = tmp_path / "refused"
    code = main(["run", "--plugin", "word-kd", *TINY_WMT, "--set", "objectives.kd.name=mse",
                 *(["--dry-run"] if dry_run else []), "--out", str(out)])
    message = capsys.readouterr().err
    assert code == 2 and "Traceback" not in message
    for part in ("word-kd", "'kd' (mse)", "hidden_states", "offers the student's final_hidden, logits"):
        assert part in message, part
    assert not (out / "log.jsonl").exists()


def test_objectives_that_all_weigh_zero_are_refused_at_planning(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    from kdcore.cli import main

    code = main(["run", "--plugin", "word-kd", *TINY_WMT, "--set", "objectives.kd.weight=0", "--dry-run",
                 "--out", str(tmp_path / "plan")])
    message = capsys.readouterr().err
    assert code == 2 and "objectives.kd.weight" in message and "always zero" in message


def test_objectives_with_adjoining_spans_take_turns_in_a_run(tmp_path: Path) -> None:
    # word-kd's forward KL for the first half of the run, an NLL objective for the second (objectives.*.active)
    train = train_log(tmp_path, "turns", "word-kd", "--set", "objectives.kd.active.stop=0.5",
                      "--set", "objectives.nll.name=nll", "--set", "objectives.nll.active.start=0.5")
    assert [sorted(key for key in ("kd", "nll") if key in r) for r in train] == [["kd"], ["nll"]]
    assert train[1]["loss"] == pytest.approx(train[1]["nll"])
    start = json.loads((tmp_path / "turns" / "log.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert start["objectives"]["nll"]["active"] == {"start": 0.5, "stop": 1.0}


@pytest.mark.parametrize(("sets", "expected"), [
    (["objectives.kd.active.start=0.2"], ["[0, 0.2)", "objectives.<label>.active", "kd [0.2, 1)"]),
    (["objectives.kd.active.stop=0.6", "objectives.nll.name=nll", "objectives.nll.active.start=0.7"],
     ["[0.6, 0.7)", "nll [0.7, 1)"]),
    (["objectives.kd.active.start=0.5", "objectives.kd.active.stop=0.5"], ["objectives.kd.active", "below stop"]),
])
def test_objective_spans_that_leave_steps_without_a_loss_are_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], sets: list[str], expected: list[str]) -> None:
    from kdcore.cli import main

    options = [part for item in sets for part in ("--set", item)]
    code = main(["run", "--plugin", "word-kd", *TINY_WMT, *options, "--dry-run", "--out", str(tmp_path / "plan")])
    message = capsys.readouterr().err
    assert code == 2 and "Traceback" not in message
    for part in expected:
        assert part in message, (part, message)
