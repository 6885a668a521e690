"""Distillation across tokenizers on the text tasks: ``data.teacher_vocab_size`` gives the teacher a tokenizer of its
own, items and batches carry both readings with character offsets, word-kd distils with ``cross_tokenizer``, and
what cannot work across two tokenizers is refused at planning."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from kd_tasks.text.wmt import TranslationDataConfig, TranslationTask

SAMPLE = Path(__file__).parent / "data" / "ha-en-de-sample.tsv"
SAMPLE_DATA = ["--set", "data.corpus=files", "--set", f"data.train.path={SAMPLE}", "--set", "data.valid_size=16",
               "--set", "data.test_size=24"]
TWO_TOKENIZERS = ["--set", "data.vocab_size=400", "--set", "data.teacher_vocab_size=600"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cross-tokenizer-cache")


def _task(cache: Path, **data: Any) -> TranslationTask:
    config = TranslationDataConfig.model_validate({"corpus": "files", "train": {"path": str(SAMPLE)},
                                                   "valid_size": 8, "test_size": 8, **data})
    return TranslationTask(config, cache)


def test_items_carry_both_readings_with_offsets_that_align(cache: Path) -> None:
    from kdcore.objectives.token_alignment import align_offsets

    task = _task(cache, vocab_size=400, teacher_vocab_size=600)
    assert len(task.tokenizer) == 400 and len(task.teacher_tokenizer) == 600
    items = task.build_data(0).train
    eos, teacher_eos = task.tokenizer.eos_token_id, task.teacher_tokenizer.eos_token_id
    whole = 0
    for item in items:
        target = item["target"]
        assert len(item["target_offsets"]) == len(item["target_ids"])
        assert len(item["teacher_target_offsets"]) == len(item["teacher_target_ids"])
        assert item["target_ids"][-1] == eos and item["teacher_target_ids"][-1] == teacher_eos
        assert item["teacher_source_ids"] == task.teacher_tokenizer(item["source"])["input_ids"]
        groups = align_offsets(item["teacher_target_offsets"], item["target_offsets"])
        # Each group covers the same text on both sides, and the groups tile the text from its start.
        assert groups[0].start == 0 and all(a.end == b.start for a, b in zip(groups, groups[1:]))
        if item["target_offsets"][-1] != (0, 0):
            # The whole text was read: the end-of-sequence tokens form the last group, at the end of the text.
            whole += 1
            assert item["target_offsets"][-1] == item["teacher_target_offsets"][-1] == (len(target), len(target))
            assert (groups[-1].start, groups[-1].end) == (len(target), len(target))
            assert groups[-1].teacher == (len(item["teacher_target_ids"]) - 1,)
            assert groups[-2].end == len(target)
    assert whole >= len(items) - 2


def test_truncation_keeps_offsets_with_their_tokens(cache: Path) -> None:
    from kdcore.objectives.token_alignment import align_offsets

    task = _task(cache, vocab_size=400, teacher_vocab_size=600, max_target_tokens=12)
    item = next(i for i in task.build_data(0).train if len(i["target"]) > 120)
    full = task.tokenizer(text_target=item["target"], return_offsets_mapping=True)
    assert len(item["target_ids"]) == len(item["target_offsets"]) == 12
    assert item["target_ids"][:11] == full["input_ids"][:11]
    assert item["target_offsets"][:11] == [tuple(span) for span in full["offset_mapping"][:11]]
    assert item["target_offsets"][-1] == (0, 0)  # the end-of-sequence token ends no text here
    groups = align_offsets(item["teacher_target_offsets"], item["target_offsets"])
    assert groups and groups[-1].end <= min(item["target_offsets"][10][1], item["teacher_target_offsets"][10][1])


def test_over_long_on_either_side_skips_the_example_on_both(cache: Path) -> None:
    both = _task(cache, vocab_size=400, teacher_vocab_size=600, max_target_tokens=20, overlong="skip")
    student_only = _task(cache, vocab_size=400, max_target_tokens=20, overlong="skip")
    teacher_only = _task(cache, vocab_size=600, max_target_tokens=20, overlong="skip")
    ids = {item["id"] for item in both.build_data(0).train}
    assert ids == ({item["id"] for item in student_only.build_data(0).train}
                   & {item["id"] for item in teacher_only.build_data(0).train})


def test_collate_pads_both_readings(cache: Path) -> None:
    task = _task(cache, vocab_size=400, teacher_vocab_size=600)
    items = task.build_data(0).train[:5]
    batch = task.collate(items)
    rows, width = batch["labels"].shape
    assert batch["student_offsets"].shape == (rows, width, 2)
    assert batch["teacher_offsets"].shape == (*batch["teacher_labels"].shape, 2)
    for row, item in enumerate(items):
        length, teacher_length = len(item["target_ids"]), len(item["teacher_target_ids"])
        assert batch["teacher_labels"][row, :teacher_length].tolist() == item["teacher_target_ids"]
        assert bool((batch["teacher_labels"][row, teacher_length:] == -100).all())
        assert batch["student_offsets"][row, :length].tolist() == [list(s) for s in item["target_offsets"]]
        assert bool((batch["student_offsets"][row, length:] == 0).all())
        assert int(batch["teacher_attention_mask"][row].sum()) == len(item["teacher_source_ids"])
    plain = _task(cache, vocab_size=400).collate(_task(cache, vocab_size=400).build_data(0).train[:5])
    assert sorted(plain) == ["attention_mask", "ids", "input_ids", "labels"]


def test_teacher_of_the_teacher_tokenizer_is_the_default_tasks_teacher(cache: Path) -> None:
    """data.vocab_size=400 data.teacher_vocab_size=600 trains (and reuses) exactly the teacher of the 600-token task."""
    from kd_tasks.text.teacher import TaskTeacherConfig, cache_directory, effective_settings

    two = _task(cache, vocab_size=400, teacher_vocab_size=600)
    default = _task(cache, vocab_size=600)
    assert two.teacher_data_fingerprint() == default.data_fingerprint() == default.teacher_data_fingerprint()
    assert two.data_fingerprint() != default.data_fingerprint()
    assert two.teacher_tokenizer.get_vocab() == default.tokenizer.get_vocab()
    assert [(i["source_ids"], i["target_ids"]) for i in two.teacher_items(two.build_data(0).train)] == \
        [(i["source_ids"], i["target_ids"]) for i in default.build_data(0).train]
    settings = effective_settings(TaskTeacherConfig(), two)
    assert cache_directory(two, settings, cache) == cache_directory(default, settings, cache)
    # A teacher tokenizer of the student's size is the student's: nothing of its own.
    same = _task(cache, vocab_size=600, teacher_vocab_size=600)
    assert same.teacher_tokenizer is same.tokenizer and "teacher_source_ids" not in same.build_data(0).train[0]


def test_word_kd_across_tokenizers_end_to_end(cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kd_plugins.text.models import load_tokenizer
    from kdcore.cli import main

    monkeypatch.setenv("KD_CACHE_DIR", str(cache))
    out = tmp_path / "run"
    code = main(["run", "--task", "wmt", "--plugin", "word-kd", "--preset", "tiny", *SAMPLE_DATA, *TWO_TOKENIZERS,
                 "--set", "objectives.kd.name=cross_tokenizer", "--set", "objectives.nll={name: nll}",
                 "--set", "teacher.args.train_steps=10", "--set", "trainer.max_steps=6", "--set",
                 "trainer.eval_every=6", "--set", "data.max_test=8", "--set", "data.eval_beams=[1]",
                 "--out", str(out)])
    assert code == 0
    train = [r for r in map(json.loads, (out / "log.jsonl").read_text(encoding="utf-8").splitlines())
             if r["type"] == "train"]
    assert train and all(math.isfinite(r["loss"]) and math.isfinite(r["kd"]) for r in train)
    assert all(r["kd/aligned_fraction"] > 0.9 and r["kd/groups"] > 0 for r in train)
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["teacher"]["examples"] == metrics["student"]["examples"] == 8
    fingerprints = json.loads((out / "provenance.json").read_text(encoding="utf-8"))["fingerprints"]
    assert fingerprints["teacher_tokenizer"] != fingerprints["tokenizer"]
    assert len(load_tokenizer(str(out / "tokenizer"))) == 400  # the run's tokenizer is the student's
    teachers = [p for p in (cache / "text" / "teachers").iterdir() if (p / "kd-cache.json").is_file()]
    assert [len(load_tokenizer(str(p))) for p in teachers] == [600]


def _plan(tmp_path: Path, *args: str) -> int:
    from kdcore.cli import main

    return main(["run", "--task", "wmt", "--preset", "tiny", *SAMPLE_DATA, *args, "--dry-run",
                 "--out", str(tmp_path / "plan")])


def test_what_cannot_cross_tokenizers_is_refused_at_planning(cache: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("KD_CACHE_DIR", str(cache))
    cases = [
        # a token-level objective across two tokenizers
        (["--plugin", "word-kd", *TWO_TOKENIZERS], "objectives.kd.name=cross_tokenizer"),
        (["--plugin", "word-kd", *TWO_TOKENIZERS, "--set", "objectives.kd.name=cross_tokenizer", "--set",
          "objectives.tvd={name: tvd}"], "'tvd' (tvd) compare teacher and student token by token"),
        # methods that pass tokens between the models
        (["--plugin", "imitation", *TWO_TOKENIZERS], "plugin 'imitation' passes tokens between teacher and student"),
        (["--plugin", "seq-kd", *TWO_TOKENIZERS], "plugin 'seq-kd' passes tokens between teacher and student"),
        # cross_tokenizer with one tokenizer: the batches have no offsets
        (["--plugin", "word-kd", "--set", "objectives.kd.name=cross_tokenizer"], "data.teacher_vocab_size=N"),
        (["--plugin", "word-kd", "--set", "data.teacher_vocab_size=600", "--set", "data.tokenizer=some/dir"],
         "teacher_vocab_size trains the teacher's own tokenizer"),
    ]
    for args, message in cases:
        code = _plan(tmp_path, *args)
        err = capsys.readouterr().err
        assert code == 2 and message in err and "Traceback" not in err, (args, err[-2000:])


def test_a_teacher_with_another_tokenizer_is_refused(cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("KD_CACHE_DIR", str(cache))
    other = _task(cache, vocab_size=500).tokenizer
    other.save_pretrained(str(tmp_path / "other-tokenizer"))
    code = _plan(tmp_path, "--plugin", "word-kd", *TWO_TOKENIZERS, "--set", "objectives.kd.name=cross_tokenizer",
                 "--set", "teacher.name=seq2seq", "--set",
                 "teacher.args={config: {model_type: marian, d_model: 32, encoder_layers: 1, decoder_layers: 1}, "
                 f"tokenizer: {tmp_path / 'other-tokenizer'}}}")
    err = capsys.readouterr().err
    assert code == 2 and "the teacher model has another one" in err, err[-2000:]


def test_reads_teacher_view_and_evaluates_the_teacher_on_it(cache: Path, caplog: pytest.LogCaptureFixture) -> None:
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    from kd_plugins.text.models import TextStudent, TextTeacher, marian_config

    task = _task(cache, vocab_size=400, teacher_vocab_size=600)

    def model(tokenizer: Any, cls: Any) -> Any:
        values = marian_config(len(tokenizer), layers=(1, 1), d_model=16, heads=2, ffn_dim=32,
                               pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                               decoder_start_token_id=tokenizer.pad_token_id)
        values.pop("model_type")
        torch.manual_seed(0)
        return cls(AutoModelForSeq2SeqLM.from_config(AutoConfig.for_model("marian", **values)), tokenizer)

    teacher, student = model(task.teacher_tokenizer, TextTeacher), model(task.tokenizer, TextStudent)
    assert task.reads_teacher_view(teacher) and not task.reads_teacher_view(student)
    test = task.build_data(0).test[:4]
    with caplog.at_level(logging.ERROR):  # an untrained model: only that it decodes its own token ids matters
        scores = task.evaluate(teacher, test, torch.device("cpu"), 4)
    assert scores["examples"] == 4.0


def test_padding_rows_are_accepted_and_reported() -> None:
    from transformers import AutoConfig, AutoModelForSeq2SeqLM, PreTrainedTokenizerFast

    from kd_plugins.text.models import TextStudent, TextTeacher, check_vocab_compatible, marian_config
    from kdcore.errors import KDUserError
    from kdcore.objectives.library import TOKENIZER_VOCAB_SIZE
    from kdcore.signals import Signal, request
    from kd_tasks.text.tokenizer import train_bpe_tokenizer

    texts = [line.split("\t")[1] for line in SAMPLE.read_text(encoding="utf-8").splitlines()[:200]]
    tokenizer: PreTrainedTokenizerFast = train_bpe_tokenizer(texts, 120)

    def hf(rows: int) -> Any:
        values = marian_config(rows, layers=(1, 1), d_model=16, heads=2, ffn_dim=32, pad_token_id=0,
                               eos_token_id=1, decoder_start_token_id=0)
        values.pop("model_type")
        return AutoModelForSeq2SeqLM.from_config(AutoConfig.for_model("marian", **values))

    padded, exact = TextTeacher(hf(128), tokenizer), TextStudent(hf(len(tokenizer)), tokenizer)
    check_vocab_compatible(padded, exact)  # one tokenizer, a head rounded up to 128 rows
    batch = {"input_ids": torch.tensor([[5, 6, 1]]), "attention_mask": torch.ones(1, 3, dtype=torch.long),
             "labels": torch.tensor([[7, 1]])}
    assert padded.forward_signals(batch, request(Signal.LOGITS)).extra[TOKENIZER_VOCAB_SIZE] == len(tokenizer)
    assert TOKENIZER_VOCAB_SIZE not in exact.forward_signals(batch, request(Signal.LOGITS)).extra
    with pytest.raises(KDUserError, match="vocabularies differ"):
        check_vocab_compatible(TextTeacher(hf(128), None), exact)  # no tokenizer to show they share one


def test_causal_models_move_offsets_with_their_labels() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    from kd_plugins.text.models import TextStudent

    hf = AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", vocab_size=16, n_embd=8, n_layer=1, n_head=2))
    model = TextStudent(hf)
    offsets = torch.tensor([[[0, 2], [2, 5], [5, 5]]])
    labels = torch.tensor([[3, 4, 1]])
    assert model.target_labels({"labels": labels}).tolist() == [[4, 1, -100]]
    assert model.align_with_logits(offsets, 0).tolist() == [[[2, 5], [5, 5], [0, 0]]]
