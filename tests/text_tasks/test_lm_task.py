"""Task ``lm`` (decoder-only prompt -> completion): its batches, its teacher stage, its data files and refusals, and a
tiny end-to-end run through the real ``kd`` command."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from kd_tasks.text.lm import INSTRUCTIONS, LMDataConfig, LMTask, interleave
from kdcore.errors import KDUserError
from kdcore.signals import IGNORE_INDEX

SAMPLE = Path(__file__).parent / "data" / "ha-en-de-sample.tsv"


def _pairs(count: int | None = None) -> list[tuple[str, str]]:
    lines = SAMPLE.read_text(encoding="utf-8").splitlines()[:count]
    return [(line.split("\t")[0], line.split("\t")[1]) for line in lines]


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def _prompt_file(tmp_path: Path, count: int | None = None) -> Path:
    return _jsonl(tmp_path / "train.jsonl", [{"prompt": INSTRUCTIONS["translate"] + source, "completion": target}
                                             for source, target in _pairs(count)])


def _task(tmp_path: Path, **data: Any) -> LMTask:
    values = {"corpus": "files", "train": {"path": str(_prompt_file(tmp_path))}, "valid_size": 8, "test_size": 8,
              "vocab_size": 600, **data}
    return LMTask(LMDataConfig.model_validate(values), tmp_path / "cache")


def test_rows_are_prompt_then_completion_and_only_the_completion_is_learnt(tmp_path: Path) -> None:
    task = _task(tmp_path)
    items = task.build_data(0).train[:6]
    batch = task.collate(items)
    eos = task.tokenizer.eos_token_id
    for row, item in enumerate(items):
        prompt, completion = item["source_ids"], item["target_ids"]
        length = len(prompt) + len(completion)
        assert completion[-1] == eos  # the model learns to stop
        assert batch["input_ids"][row, :length].tolist() == prompt + completion
        assert batch["attention_mask"][row].tolist() == [1] * length + [0] * (batch["input_ids"].shape[1] - length)
        labels = batch["labels"][row].tolist()
        assert labels[:len(prompt)] == [IGNORE_INDEX] * len(prompt)
        assert labels[len(prompt):length] == completion
        assert all(label == IGNORE_INDEX for label in labels[length:])
        assert task.tokenizer.decode(completion, skip_special_tokens=True).strip() == item["target"]


def test_interleave_mixes_instructions_in_turn() -> None:
    assert interleave([1, 2, 3], ["a"], [True, False]) == [1, "a", True, 2, False, 3]  # type: ignore[list-item]


def test_empty_completions_are_skipped_and_counted_and_long_prompts_truncated_or_skipped(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rows = [{"prompt": f"{INSTRUCTIONS['translate']}{source}", "completion": target} for source, target in _pairs(60)]
    rows[3]["completion"] = "   "
    rows[5]["prompt"] = "Translate to German: " + " ".join(["word"] * 200)
    path = _jsonl(tmp_path / "rows.jsonl", rows)
    base = {"corpus": "files", "train": {"path": str(path)}, "valid_size": 4, "test_size": 4, "vocab_size": 300,
            "max_source_tokens": 40}
    truncating = LMTask(LMDataConfig.model_validate(base), tmp_path / "a")
    with caplog.at_level("WARNING"):
        splits = truncating.build_data(0)
    total = sum(len(getattr(splits, name)) for name in ("train", "valid", "test"))
    assert total == 59  # the empty completion is gone
    assert "skipped 1 of 60 rows (empty source or target)" in caplog.text
    assert all(len(item["source_ids"]) <= 40 for item in splits.train)
    assert sum(info["truncated"] for info in truncating.corpus_info.values() if isinstance(info, dict)
               and "truncated" in info) >= 1
    skipping = LMTask(LMDataConfig.model_validate({**base, "overlong": "skip"}), tmp_path / "b")
    assert len(skipping.build_data(0).train) < len(splits.train) or skipping.corpus_info["train"]["skipped_overlong"]


def test_chat_records_are_rendered_with_the_configured_template_and_refused_without_one(tmp_path: Path) -> None:
    rows = [{"messages": [{"role": "system", "content": "You translate."},
                          {"role": "user", "content": source}, {"role": "assistant", "content": target}]}
            for source, target in _pairs(40)]
    path = _jsonl(tmp_path / "chat.jsonl", rows)
    base = {"corpus": "files", "train": {"path": str(path)}, "valid_size": 4, "test_size": 4, "vocab_size": 300}
    without = LMTask(LMDataConfig.model_validate(base), tmp_path / "a")
    with pytest.raises(KDUserError, match="data.chat_template"):
        without.records()
    template = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
                "{% if add_generation_prompt %}<assistant>{% endif %}")
    (tmp_path / "template.jinja").write_text(template, encoding="utf-8")
    task = LMTask(LMDataConfig.model_validate({**base, "chat_template": str(tmp_path / "template.jinja")}),
                  tmp_path / "b")
    records = task.records()
    first = records["train"][0]
    source, target = next((s, t) for s, t in _pairs(40) if t == first["target"])
    assert first["source"] == f"<system>You translate.\n<user>{source}\n<assistant>"
    plain = LMTask(LMDataConfig.model_validate({"corpus": "files", "train": {"path": str(_prompt_file(tmp_path))},
                                                "valid_size": 4, "test_size": 4, "prompt_format": "chat"}),
                   tmp_path / "c")
    with pytest.raises(KDUserError, match="data.chat_template"):
        plain.records()


def test_beam_search_is_refused_for_decoder_only_models() -> None:
    with pytest.raises(ValueError, match=r"greedy completions only"):
        LMDataConfig.model_validate({"eval_beams": [1, 4]})


def test_the_causal_teacher_stage_learns_to_copy_its_prompt(tmp_path: Path) -> None:
    """A copy task can only be learnt when the prompt is read (mask, positions, label alignment) and the completion
    is generated after it (left-padded prompts, KV cache): greedy completions of unseen prompts must copy them."""
    from kd_tasks.text.teacher import CausalTaskTeacherConfig, CausalTaskTrainedTeacherFactory, effective_settings
    from kd_tasks.text.teacher import train_teacher

    words = ["light", "door", "fan", "lamp", "heater", "window", "garage", "alarm", "switch", "sensor", "camera",
             "lock"]
    generator = torch.Generator().manual_seed(0)
    rows = []
    for index in range(1500):
        picked = [words[int(i)] for i in torch.randint(len(words), (3,), generator=generator)]
        rows.append({"id": index, "prompt": "copy: " + " ".join(picked), "completion": " ".join(picked)})
    path = _jsonl(tmp_path / "copy.jsonl", rows)
    task = LMTask(LMDataConfig.model_validate({"corpus": "files", "train": {"path": str(path)}, "valid_size": 20,
                                               "test_size": 40, "vocab_size": 60}), tmp_path / "cache")
    task.teacher_defaults = {"layers": 2, "d_model": 64, "heads": 2, "ffn_dim": 128, "dropout": 0.0,
                             "train_steps": 300, "batch_size": 32, "lr": 3e-3, "warmup_steps": 20}
    config = CausalTaskTeacherConfig(log_every=100)
    settings = effective_settings(config, task)
    model, stats = train_teacher(task, settings, tmp_path / "teacher", torch.device("cpu"), config,
                                 factory=CausalTaskTrainedTeacherFactory)
    assert "encoder_spread" not in stats
    from kd_plugins.text.models import TextTeacher

    teacher = TextTeacher(model.eval(), task.tokenizer)
    metrics = task.evaluate(teacher, task.build_data(0).test, torch.device("cpu"), 16)
    assert metrics["rougeL"] > 90, metrics
    assert metrics["perplexity"] < 1.5, metrics


@pytest.fixture(scope="module")
def tiny_lm_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One ``kd run --task lm --plugin imitation --preset tiny`` on prompt/completion files, GKD's settings."""
    import os
    import subprocess
    import sys

    folder = tmp_path_factory.mktemp("lm-run")
    data = _prompt_file(folder)
    out = folder / "run"
    env = {**os.environ, "KD_CACHE_DIR": str(folder / "cache"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "kdcore", "run", "--task", "lm", "--plugin", "imitation",
                             "--preset", "tiny", "--set", "data.corpus=files", "--set", f"data.train.path={data}",
                             "--set", "data.valid_size=16", "--set", "data.test_size=24",
                             "--set", "objectives.kd.name=jsd", "--set", "method.schedule.kind=constant",
                             "--set", "method.schedule.value=0.5", "--out", str(out)],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_tiny_lm_run_reports_completion_metrics_and_teacher_agreement(tiny_lm_run: Path) -> None:
    metrics = json.loads((tiny_lm_run / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["task"] == "lm" and metrics["metric"] == "rougeL"
    for role in ("teacher", "student"):
        for key in ("rougeL", "chrf", "perplexity", "reference_nll", "greedy_tokens_per_second", "distinct_outputs"):
            assert key in metrics[role], (role, key)
        assert metrics[role]["examples"] == 24
    assert 0.0 <= metrics["student"]["teacher_token_agreement"] <= 1.0
    assert metrics["params"]["student"] < metrics["params"]["teacher"]
    config = (tiny_lm_run / "config.yaml").read_text(encoding="utf-8")
    assert "task-trained-causal-lm" in config and "model_type: llama" in config
    records = [json.loads(line) for line in (tiny_lm_run / "log.jsonl").read_text(encoding="utf-8").splitlines()]
    train = [r for r in records if r["type"] == "train"]
    assert train and all(r["beta"] == 0.5 for r in train)


def test_a_teacher_of_another_vocabulary_with_a_token_level_objective_exits_2_naming_cross_tokenizer(
        tmp_path: Path, run_kd) -> None:  # noqa: ANN001
    data = _prompt_file(tmp_path)
    result = run_kd("run", "--task", "lm", "--plugin", "word-kd", "--preset", "tiny", "--set", "data.corpus=files",
                    "--set", f"data.train.path={data}", "--set", "data.valid_size=16", "--set", "data.test_size=24",
                    "--set", "data.teacher_vocab_size=500", "--dry-run", "--out", str(tmp_path / "out"),
                    env={"KD_CACHE_DIR": str(tmp_path / "cache")}, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "cross_tokenizer" in result.stderr and "Traceback" not in result.stderr


def test_a_chat_prompt_format_without_a_template_exits_2_naming_the_option(tmp_path: Path, run_kd) -> None:  # noqa: ANN001
    data = _prompt_file(tmp_path)
    result = run_kd("run", "--task", "lm", "--plugin", "scratch", "--preset", "tiny", "--set", "data.corpus=files",
                    "--set", f"data.train.path={data}", "--set", "data.prompt_format=chat", "--dry-run",
                    "--out", str(tmp_path / "out"), env={"KD_CACHE_DIR": str(tmp_path / "cache")}, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "data.chat_template" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_a_local_transformers_causal_lm_is_the_teacher_with_its_own_tokenizer(tmp_path: Path, run_kd) -> None:  # noqa: ANN001
    """``teacher.name=causal-lm`` + ``teacher.args.source=DIR`` (a directory written by save_pretrained) and the
    task tokenising with that directory's tokenizer: the student shares it and learns from the local model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from kd_tasks.text.presets import llama_config

    task = _task(tmp_path)
    tokenizer = task.tokenizer
    values = llama_config(len(tokenizer), layers=1, d_model=32, heads=2, ffn_dim=64,
                          pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(values.pop("model_type"), **values))
    local = tmp_path / "local-teacher"
    model.save_pretrained(local)
    tokenizer.save_pretrained(local)
    data = _prompt_file(tmp_path)
    out = tmp_path / "out"
    result = run_kd("run", "--task", "lm", "--plugin", "word-kd", "--preset", "tiny", "--set", "data.corpus=files",
                    "--set", f"data.train.path={data}", "--set", "data.valid_size=16", "--set", "data.test_size=24",
                    "--set", "teacher.name=causal-lm", "--set", f"teacher.args.source={local}",
                    "--set", f"data.tokenizer={local}", "--out", str(out),
                    env={"KD_CACHE_DIR": str(tmp_path / "cache")}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["params"]["teacher"] == sum(p.numel() for p in model.parameters())
    assert "teacher_token_agreement" in metrics["student"] and "perplexity" in metrics["teacher"]


def test_end_with_eos_keeps_ids_and_offsets_aligned() -> None:
    from kd_tasks.text.lm import end_with_eos

    text = "Guten Tag"
    # a tokenizer that appends no end-of-sequence token (GPT-2's): eos marks the end of the text
    assert end_with_eos([5, 6], [(0, 5), (6, 9)], 2, text, 40) == ([5, 6, 2], [(0, 5), (6, 9), (9, 9)])
    # cut to the limit: the kept tokens do not reach the end, so eos covers no text
    assert end_with_eos([5, 6, 7], [(0, 3), (3, 5), (6, 9)], 2, text, 3) == ([5, 6, 2], [(0, 3), (3, 5), (0, 0)])
    assert end_with_eos([5, 2], [(0, 9), (9, 9)], 2, text, 40) == ([5, 2], [(0, 9), (9, 9)])  # already ends with it
    assert end_with_eos([], [], 2, "", 40) == ([2], [(0, 0)])  # an empty completion still teaches to stop
    assert end_with_eos([5, 6], None, 2, text, 40) == ([5, 6, 2], None)
    assert end_with_eos([5, 6], [(0, 5), (6, 9)], None, text, 40) == ([5, 6], [(0, 5), (6, 9)])


def test_a_separate_teacher_tokenizer_reads_completions_that_end_with_its_eos(tmp_path: Path) -> None:
    task = _task(tmp_path, teacher_vocab_size=500, max_target_tokens=12)
    items = task.build_data(0).train[:24]
    for item in items:
        for ids_key, offsets_key, tokenizer in (("target_ids", "target_offsets", task.tokenizer),
                                                ("teacher_target_ids", "teacher_target_offsets",
                                                 task.teacher_tokenizer)):
            assert item[ids_key][-1] == tokenizer.eos_token_id and len(item[ids_key]) <= 12
            assert len(item[offsets_key]) == len(item[ids_key])
    batch = task.collate(items)
    assert batch["student_offsets"].shape[:2] == batch["labels"].shape
    assert batch["teacher_offsets"].shape[:2] == batch["teacher_labels"].shape


def test_a_finished_run_records_its_test_items_for_the_paired_bootstrap(tiny_lm_run: Path, tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    from kdcore.cli import main
    from kdcore.significance import read_items

    metrics = json.loads((tiny_lm_run / "metrics.json").read_text(encoding="utf-8"))["student"]
    recorded = json.loads((tiny_lm_run / "test_items.json").read_text(encoding="utf-8"))
    items = recorded["decodings"]["greedy"]["items"]
    assert len(items) == 24 and all(set(item) >= {"id", "hypothesis", "reference", "stats"} for item in items)
    for metric in ("rougeL", "chrf"):  # the recorded statistics give the scores of metrics.json
        statistics = read_items(tiny_lm_run, metric)
        assert statistics is not None and statistics.score()[0] == pytest.approx(metrics[metric], abs=1e-6)
    # the same run as two groups: no difference, p = 1; a group without items is named
    twin = tmp_path / "twin"
    shutil.copytree(tiny_lm_run, twin, ignore=shutil.ignore_patterns("checkpoints", "best"))
    bare = tmp_path / "bare"
    shutil.copytree(twin, bare)
    (bare / "test_items.json").unlink()
    assert main(["summarize", f"a={tiny_lm_run}", f"b={twin}", "--baseline", "a", "--bootstrap", "--resamples",
                 "200", "--metric", "rougeL", "--metric", "chrf"]) == 0
    table = capsys.readouterr().out
    assert "| b | rougeL | +0.000 | [+0.000, +0.000] | 1.000 | 24 | 200 |" in table
    assert main(["summarize", f"a={tiny_lm_run}", f"c={bare}", "--baseline", "a", "--bootstrap",
                 "--metric", "rougeL"]) == 0
    assert "Not tested: rougeL (no per-item statistics in runs of c)" in capsys.readouterr().out
    assert main(["summarize", f"a={tiny_lm_run}", "--bootstrap"]) == 2


def test_a_causal_lm_student_exports_to_transformers_and_decodes_as_kd_does(
        tiny_lm_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoModelForCausalLM

    from kdcore.cli import main

    monkeypatch.setenv("KD_CACHE_DIR", str(tiny_lm_run.parent / "cache"))
    out = tmp_path / "exp"
    assert main(["export", "--run", str(tiny_lm_run), "--out", str(out)]) == 0
    report = json.loads((out / "export.json").read_text(encoding="utf-8"))["self_test"]
    # the export's self-test: transformers' greedy continuation of each test prompt equals kd's, token for token
    compared = int(report["greedy_outputs_equal_kd"].split("/")[1])
    assert compared > 0 and report["greedy_outputs_equal_kd"] == f"{compared}/{compared}"
    assert report["tokenizer_ids_equal_kd"] is True
    assert type(AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True)).__name__ == "LlamaForCausalLM"
