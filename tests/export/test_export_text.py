"""``kd export`` of a text student: the transformers directory decodes as kd does in a Python without kd, the ONNX
graphs decode greedily in onnxruntime, the model card holds metrics.json's numbers, and bad input is refused
cleanly (exit 2, nothing written)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kdcore.cli import main
from kdcore.export.card import parse_card_header

SAMPLE = Path(__file__).resolve().parents[1] / "text_tasks" / "data" / "ha-en-de-sample.tsv"
# The tiny preset on the committed sample (offline). kd caps each batch at ratio x longest source + offset tokens;
# a large ratio leaves only data.max_new_tokens, the cap the exported generation config carries, so kd's greedy
# outputs and transformers' must be equal token for token even for sentences the 12-step student never ends.
TINY_WMT = ["run", "--task", "wmt", "--plugin", "imitation", "--preset", "tiny", "--set", "data.corpus=files",
            "--set", f"data.train.path={SAMPLE}", "--set", "data.valid_size=16", "--set", "data.test_size=24",
            "--set", "data.max_new_tokens=20", "--set", "data.max_length_ratio=50", "--set", "trainer.progress=off"]


@pytest.fixture(scope="module")
def wmt_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny `kd run --task wmt --plugin imitation` shared by the tests of this module (its cache stays set)."""
    out = tmp_path_factory.mktemp("export-wmt") / "run"
    cache = tmp_path_factory.mktemp("export-wmt-cache")
    previous = os.environ.get("KD_CACHE_DIR")
    os.environ["KD_CACHE_DIR"] = str(cache)
    try:
        assert main([*TINY_WMT, "--out", str(out)]) == 0
    finally:
        if previous is None:
            os.environ.pop("KD_CACHE_DIR", None)
        else:
            os.environ["KD_CACHE_DIR"] = previous
    (out / "cache-dir").write_text(str(cache), encoding="utf-8")
    return out


@pytest.fixture
def run_cache(wmt_run: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The run's cache (its task-trained teacher and tokenizer), so exporting it builds nothing again."""
    monkeypatch.setenv("KD_CACHE_DIR", (wmt_run / "cache-dir").read_text(encoding="utf-8"))
    return wmt_run


def _kd_greedy(run_dir: Path) -> tuple[list[str], list[str]]:
    """The test sources and kd's own greedy hypotheses for them: the decoding pass of `kd eval`."""
    import torch

    from kdcore import runner
    from kdcore.checkpoint import load_weights
    from kdcore.registry import Registry
    from kdcore.resolve import resolve_saved_run
    from kd_tasks.text.decoding import decode_items

    registry = Registry.discover()
    resolved = resolve_saved_run(registry, run_dir)
    built, splits = runner.build(resolved, torch.device("cpu"), registry=registry)
    load_weights(built.student, run_dir / "best" / "student.safetensors")
    built.student.eval()
    task = built.task
    hypotheses, _ = decode_items(built.student, splits.test, task.collate, task.tokenizer, task.data_config,
                                 torch.device("cpu"), resolved.config.trainer.eval_batch_size, num_beams=1)
    return [item["source"] for item in splits.test], hypotheses


#: Runs in a fresh interpreter: loads the export with transformers alone and translates the sources greedily.
CLEAN_PYTHON = """
import json, sys
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
from transformers.pipelines import SUPPORTED_TASKS
directory, sources = sys.argv[1], json.loads(sys.stdin.read())
if "translation" in SUPPORTED_TASKS:  # transformers 4.x
    from transformers import pipeline
    translate = pipeline("translation", model=directory)
    outputs = [row["translation_text"] for row in translate(sources, batch_size=len(sources))]
else:  # transformers 5 removed the translation pipeline: what it did, by hand
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForSeq2SeqLM.from_pretrained(directory).eval()
    # One padded batch, as kd eval decodes the tiny test split (eval_batch_size 24).
    generated = model.generate(**tokenizer(sources, return_tensors="pt", padding=True))
    outputs = tokenizer.batch_decode(generated, skip_special_tokens=True)
kd_modules = sorted(name for name in sys.modules if name.split(".")[0] in ("kdcore", "kd_plugins", "kd_tasks", "kd"))
print(json.dumps({"outputs": [text.strip() for text in outputs], "kd_modules": kd_modules}))
"""


def test_hf_export_decodes_like_kd_eval_in_a_python_without_kd(run_cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "exp"
    assert main(["export", "--run", str(run_cache), "--out", str(out)]) == 0
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "README.md",
                 "export.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "export.json").read_text())["self_test"]["greedy_outputs_equal_kd"] == "16/16"
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["max_new_tokens"] == 20 and generation.get("num_beams", 1) == 1
    assert generation.get("forced_eos_token_id") is None and generation["bad_words_ids"] == [[0]]
    sources, kd_outputs = _kd_greedy(run_cache)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-I", "-c", CLEAN_PYTHON, str(out)], input=json.dumps(sources),
                            capture_output=True, text=True, timeout=900, cwd=tmp_path,
                            env={**env, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer["kd_modules"] == []
    assert answer["outputs"] == kd_outputs


def test_model_card_header_holds_the_run_metrics(run_cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "exp"
    assert main(["export", "--run", str(run_cache), "--out", str(out), "--license", "apache-2.0"]) == 0
    card = (out / "README.md").read_text(encoding="utf-8")
    header = parse_card_header(card)
    metrics = json.loads((run_cache / "metrics.json").read_text(encoding="utf-8"))
    assert header["library_name"] == "transformers" and header["license"] == "apache-2.0"
    assert header["tags"][:3] == ["knowledge-distillation", "kd", "imitation"]
    assert header["pipeline_tag"] == "translation" and header["datasets"]
    assert "task-trained-seq2seq" in header["teacher"]
    reported = {entry["type"]: entry["value"] for entry in header["model-index"][0]["results"][0]["metrics"]}
    assert reported == {name: value for name, value in metrics["student"].items()}
    assert set(header["metrics"]) == set(metrics["student"])
    # The body: teacher and student side by side, the sacrebleu signature, the seed, the resolved config.
    bleu_row = next(line for line in card.splitlines() if line.startswith("| **bleu**"))
    assert f"{metrics['teacher']['bleu']:.4g}" in bleu_row and f"{metrics['student']['bleu']:.4g}" in bleu_row
    assert metrics["metric_metadata"]["bleu_signature"] in card
    assert f"seed: {metrics['seed']}" in card and "kd run --config config.yaml" in card
    assert "ImitKD (Lin et al. 2020)" in card and "Known limitations" in card


def test_onnx_export_decodes_greedily_in_onnxruntime(run_cache: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    import numpy as np
    import onnxruntime

    from kd_plugins.text.export import onnx_greedy_decode

    out = tmp_path / "exp"
    assert main(["export", "--run", str(run_cache), "--out", str(out), "--format", "onnx"]) == 0
    for name in ("encoder_model.onnx", "decoder_model.onnx", "decoder_with_past_model.onnx", "tokenizer.json"):
        assert (out / name).is_file(), name
    report = json.loads((out / "export.json").read_text(encoding="utf-8"))
    assert report["self_test"]["max_abs_difference"] <= 1e-4
    assert set(report["self_test"]["max_abs_difference_by_output"]) == {"encoder", "decoder logits",
                                                                        "decoder logits with past"}
    assert report["self_test"]["greedy_outputs_equal_kd"] == "16/16"
    assert report["self_test"]["greedy_outputs_equal_kd_without_cache"] == "16/16"
    for who in ("student", "teacher"):
        assert report["speed"][f"onnxruntime greedy seconds, {who}"] > 0
        assert report["speed"][f"onnxruntime greedy seconds without the key/value cache, {who}"] > 0
    card = (out / "README.md").read_text(encoding="utf-8")
    assert parse_card_header(card)["library_name"] == "onnx"
    assert "key/value cache speed-up, student" in card and "decoder_with_past" in card
    # Other shapes than the traced batch: three sentences, decoded by the numpy loop alone, with and without the cache.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(out))
    sources, kd_outputs = _kd_greedy(run_cache)
    inputs = tokenizer(sources[:3], return_tensors="np", padding=True)
    encoder = onnxruntime.InferenceSession(str(out / "encoder_model.onnx"))
    decoder = onnxruntime.InferenceSession(str(out / "decoder_model.onnx"))
    decoder_with_past = onnxruntime.InferenceSession(str(out / "decoder_with_past_model.onnx"))
    generation = json.loads((out / "generation_config.json").read_text(encoding="utf-8"))
    for cache in (decoder_with_past, None):
        tokens = onnx_greedy_decode(encoder, decoder, inputs["input_ids"], inputs["attention_mask"],
                                    decoder_with_past=cache, decoder_start_token_id=generation["decoder_start_token_id"],
                                    eos_token_id=generation["eos_token_id"], pad_token_id=generation["pad_token_id"],
                                    max_new_tokens=generation["max_new_tokens"])
        assert isinstance(tokens, np.ndarray)
        texts = [text.strip() for text in tokenizer.batch_decode(tokens, skip_special_tokens=True)]
        assert texts == kd_outputs[:3]
    # The plain onnxruntime + numpy loop of docs/export.md, as written there, translates the same way.
    docs = (Path(__file__).resolve().parents[2] / "docs" / "export.md").read_text(encoding="utf-8")
    block = docs.split(DOCS_MARKER, 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert 'directory = "exports/wmt-onnx"' in block
    # Run as its own script in a fresh interpreter (a user's copy-paste, and no exec() in kd's tree).
    script = out.parent / "docs_example.py"
    script.write_text(block.replace('"exports/wmt-onnx"', repr(str(out)))
                      + "\nimport json, sys\nprint(json.dumps(translate(json.loads(sys.argv[1]))))\n", encoding="utf-8")
    result = subprocess.run([sys.executable, str(script), json.dumps(sources[:3])], capture_output=True, text=True,
                            timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    translated = json.loads(result.stdout.strip().splitlines()[-1])
    assert [text.strip() for text in translated] == kd_outputs[:3]


#: The comment in docs/export.md right before the cached-decoding example this module runs.
DOCS_MARKER = "<!-- tests/export/test_export_text.py runs the next block -->"


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.endswith(".partial"))


def test_bad_input_is_refused_with_exit_2_and_nothing_written(run_cache: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    # Not a finished run: a dry run has config.yaml but no metrics.json.
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(run_cache / "config.yaml", unfinished / "config.yaml")
    assert main(["export", "--run", str(unfinished), "--out", str(tmp_path / "a")]) == 2
    assert "not finished" in capsys.readouterr().err
    # A best student whose bytes no longer match the checkpoint manifest of its step.
    damaged = tmp_path / "damaged"
    shutil.copytree(run_cache, damaged)
    weights = damaged / "best" / "student.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert main(["export", "--run", str(damaged), "--out", str(tmp_path / "b")]) == 2
    assert "checksum" in capsys.readouterr().err
    # A damaged checkpoint named with --checkpoint.
    step = sorted((damaged / "checkpoints").iterdir())[-1]
    (step / "trainer_state.json").write_text("{}", encoding="utf-8")
    assert main(["export", "--run", str(damaged), "--out", str(tmp_path / "c"), "--checkpoint", step.name]) == 2
    assert "fails its checksum test" in capsys.readouterr().err
    # A format the text student cannot take, and an --out that already holds files.
    assert main(["export", "--run", str(run_cache), "--out", str(tmp_path / "d"), "--format", "safetensors"]) == 2
    error = capsys.readouterr().err
    assert "does not fit" in error and "hf:" in error and "Traceback" not in error
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine", encoding="utf-8")
    assert main(["export", "--run", str(run_cache), "--out", str(occupied)]) == 2
    assert (occupied / "keep.txt").read_text(encoding="utf-8") == "mine"
    for name in "abcd":
        assert not (tmp_path / name).exists()
    assert _leftovers(tmp_path) == []
