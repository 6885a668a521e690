"""A run directory is self-contained (issue 25, item 4): ``provenance.json`` records the fingerprints of the teacher,
tokenizer and data, the text tokenizer is copied into ``<out>/tokenizer/``, and ``kd eval --run`` on a copy of the
directory with an empty cache scores the student exactly as the run did, or exits 2 naming the missing artefact."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from kdcore.cli import main

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "tests" / "text_tasks" / "data" / "ha-en-de-sample.tsv"
# The tiny preset on the committed 400-pair sample of the embedded corpus: offline, no wheel needed.
SAMPLE_DATA = ["--set", "data.corpus=files", "--set", f"data.train.path={SAMPLE}", "--set", "data.valid_size=16",
               "--set", "data.test_size=24"]
HEX64 = re.compile(r"^[0-9a-f]{64}$")


def _copy_of(run: Path, tmp_path: Path) -> Path:
    """The run directory as another machine would get it (no cache comes with it)."""
    copy = tmp_path / "copied-run"
    shutil.copytree(run, copy)
    return copy


def _eval(run: Path, cache: Path, monkeypatch: pytest.MonkeyPatch, *args: str) -> int:
    monkeypatch.setenv("KD_CACHE_DIR", str(cache))
    return main(["eval", "--run", str(run), *args])


def _metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text(encoding="utf-8"))


def _scored(run: Path) -> dict:
    return json.loads((run / "eval.json").read_text(encoding="utf-8"))["student"]


def test_a_toy_run_copied_elsewhere_is_evaluated_with_an_empty_cache(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KD_CACHE_DIR", str(tmp_path / "cache"))
    run = tmp_path / "run"
    assert main(["run", "--task", "toy", "--plugin", "vanilla", "--preset", "tiny", "--set", "data.n_train=256",
                 "--set", "teacher.args.train_steps=20", "--set", "trainer.max_steps=10", "--set",
                 "trainer.eval_every=5", "--out", str(run)]) == 0
    provenance = json.loads((run / "provenance.json").read_text(encoding="utf-8"))
    assert provenance["task"] == "toy" and provenance["teacher"]["name"] == "toy-mlp-teacher"
    assert HEX64.match(provenance["teacher"]["weights_sha256"])
    copy = _copy_of(run, tmp_path)
    empty = tmp_path / "empty-cache"
    assert _eval(copy, empty, monkeypatch) == 0
    assert _scored(copy)["accuracy"] == _metrics(run)["student"]["accuracy"]
    # Scoring the student never trains the teacher: the empty cache holds no teacher afterwards.
    assert not [p for p in empty.rglob("*teacher*")]


@pytest.fixture(scope="module")
def tiny_wmt_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One `kd run --task wmt --plugin imitation --preset tiny` on the committed sample, with its own cache."""
    out = tmp_path_factory.mktemp("wmt-run") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KD_CACHE_DIR", str(tmp_path_factory.mktemp("wmt-cache")))
        assert main(["run", "--task", "wmt", "--plugin", "imitation", "--preset", "tiny", *SAMPLE_DATA,
                     "--set", "data.eval_beams=[1]", "--out", str(out)]) == 0
    return out


def test_a_text_run_records_its_teacher_tokenizer_and_data(tiny_wmt_run: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    from kd_tasks.text.tokenizer import tokenizer_fingerprint

    provenance = json.loads((tiny_wmt_run / "provenance.json").read_text(encoding="utf-8"))
    assert provenance["teacher"]["name"] == "task-trained-seq2seq"
    assert HEX64.match(provenance["teacher"]["weights_sha256"])
    assert set(provenance["fingerprints"]) == {"data", "test", "tokenizer"}
    stored = provenance["task_files"]["tokenizer"]
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(tiny_wmt_run / stored["directory"]))
    assert tokenizer_fingerprint(tokenizer) == stored["fingerprint"] == provenance["fingerprints"]["tokenizer"]


def test_a_wmt_run_copied_elsewhere_scores_the_same_with_an_empty_cache(
        tiny_wmt_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    copy = _copy_of(tiny_wmt_run, tmp_path)
    empty = tmp_path / "empty-cache"
    assert _eval(copy, empty, monkeypatch) == 0
    assert _scored(copy)["bleu"] == _metrics(tiny_wmt_run)["student"]["bleu"]
    assert not (empty / "text" / "teachers").exists()  # no teacher stage for scoring the student
    assert not (empty / "text" / "tokenizers").exists()  # the run's own tokenizer was used


def test_a_missing_tokenizer_is_rebuilt_when_it_is_the_same_or_named_with_its_fingerprint(
        tiny_wmt_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    copy = _copy_of(tiny_wmt_run, tmp_path)
    shutil.rmtree(copy / "tokenizer")
    expected = json.loads((copy / "provenance.json").read_text(encoding="utf-8"))["fingerprints"]["tokenizer"]
    # The same training data train the same tokenizer again: the run is scored as before.
    assert _eval(copy, tmp_path / "empty-1", monkeypatch) == 0
    assert _scored(copy)["bleu"] == _metrics(tiny_wmt_run)["student"]["bleu"]
    # Another tokenizer cannot stand in for it: exit 2, one paragraph naming the artefact and its fingerprint.
    capsys.readouterr()
    assert _eval(copy, tmp_path / "empty-2", monkeypatch, "--set", "data.vocab_size=300") == 2
    error = capsys.readouterr().err
    assert "tokenizer" in error and expected[:16] in error and "Copy the tokenizer/ folder" in error
    assert "Traceback" not in error and error.count("\n") == 1


def test_a_changed_run_tokenizer_is_refused(tiny_wmt_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    copy = _copy_of(tiny_wmt_run, tmp_path)
    tokenizer_json = copy / "tokenizer" / "tokenizer.json"
    data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    vocab = data["model"]["vocab"]
    first, second = sorted(vocab, key=vocab.get)[10:12]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    tokenizer_json.write_text(json.dumps(data), encoding="utf-8")
    assert _eval(copy, tmp_path / "empty", monkeypatch) == 2
    assert "does not have the fingerprint" in capsys.readouterr().err
