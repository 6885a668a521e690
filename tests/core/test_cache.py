"""Verified cache entries (kdcore.cache): damage of every sort is detected, reported, moved aside and rebuilt (or
refused); two processes build one entry once; ``kd cache list | verify | clear`` see, check and free the cache.

Then every kind of entry kd caches: each test damages one kind's entry on disk and shows the detection (a warning
naming the path), the move aside and the rebuild, with the rebuilt content equal to the first build (tiny data)."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from kdcore.cache import (
    DAMAGED_MARK, MANIFEST, CacheEntryDamaged, ensure_entry, entry_lock, lock_if_free, verify_entry, verify_shard,
    write_shard,
)
from kdcore.cli import main
from kdcore.errors import KDUserError
from kdcore.interfaces import BuildContext
from kdcore.registry import Registry
from kdcore.resolve import resolve_run

DAMAGES = ["flipped bytes", "truncated", "deleted file", "garbled manifest", "no manifest (older kd)"]


def damage(entry: Path, how: str, name: str) -> None:
    """Damage one file ``name`` of a cache entry (or its manifest) the way ``how`` says.

    The damaged bytes go to a new file renamed over the old one: a model loaded from the entry may still map the
    old file into memory, and changing that file in place would crash the test process (SIGBUS), not test kd.
    """
    path = entry / name

    def replace(data: bytes) -> None:
        temporary = path.with_name(path.name + ".damaging")
        temporary.write_bytes(data)
        os.replace(temporary, path)

    if how == "flipped bytes":
        data = bytearray(path.read_bytes())
        middle = len(data) // 2
        data[middle:middle + 16] = bytes(b ^ 0xFF for b in data[middle:middle + 16])
        replace(bytes(data))
    elif how == "truncated":
        replace(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "deleted file":
        path.unlink()
    elif how == "garbled manifest":
        replace((entry / MANIFEST).read_bytes()[:40])
    elif how == "no manifest (older kd)":
        (entry / MANIFEST).unlink()
    else:
        raise AssertionError(how)


def _build_counter(calls: list[int]):  # noqa: ANN202
    def build(staging: Path) -> dict:
        calls.append(1)
        (staging / "weights.bin").write_bytes(bytes(range(256)) * 8)
        (staging / "sub").mkdir()
        (staging / "sub" / "vocab.txt").write_text("a\nb\n")
        return {"note": "built by the test"}
    return build


def _ensure(entry: Path, calls: list[int], **options) -> str:  # noqa: ANN003
    return ensure_entry(entry, "test-kind", {"recipe": "r/1"}, _build_counter(calls), what="the test entry",
                        load=lambda manifest: (entry / "sub" / "vocab.txt").read_text(), **options)


def test_an_entry_is_built_once_with_its_manifest_last_and_then_read(tmp_path: Path) -> None:
    entry, calls = tmp_path / "kind" / "entry", []
    assert _ensure(entry, calls) == "a\nb\n" and _ensure(entry, calls) == "a\nb\n"
    assert calls == [1]
    manifest = json.loads((entry / MANIFEST).read_text())
    assert manifest["kind"] == "test-kind" and manifest["built_from"] == {"recipe": "r/1"}
    assert manifest["info"] == {"note": "built by the test"}
    assert manifest["files"]["weights.bin"]["size"] == 2048 and len(manifest["files"]["sub/vocab.txt"]["sha256"]) == 64
    assert not [p for p in entry.parent.iterdir() if ".building-" in p.name]  # the staging directory became the entry


@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_entry_is_reported_moved_aside_and_rebuilt(tmp_path: Path, how: str,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    entry, calls = tmp_path / "kind" / "entry", []
    _ensure(entry, calls)
    damage(entry, how, "sub/vocab.txt" if how == "deleted file" else "weights.bin")
    with pytest.raises(CacheEntryDamaged):
        verify_entry(entry)
    with caplog.at_level(logging.WARNING, logger="kdcore.cache"):
        assert _ensure(entry, calls) == "a\nb\n"
    assert calls == [1, 1]
    (aside,) = [p for p in entry.parent.iterdir() if DAMAGED_MARK in p.name]
    assert aside.name.startswith("entry.damaged-")
    assert f"The cache entry {entry} is damaged" in caplog.text and "moved aside" in caplog.text
    verify_entry(entry, full=True)


def test_a_damaged_entry_kd_cannot_rebuild_is_refused_naming_it(tmp_path: Path) -> None:
    entry, calls = tmp_path / "kind" / "entry", []
    _ensure(entry, calls)
    damage(entry, "flipped bytes", "weights.bin")
    with pytest.raises(KDUserError, match=f"cache entry '{entry}' is damaged.*weights.bin does not match"):
        _ensure(entry, calls, rebuild=False)
    assert calls == [1] and entry.is_dir()


def test_a_changed_entry_is_found_in_the_same_process_and_hashed_once_otherwise(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    entry, calls = tmp_path / "entry", []
    _ensure(entry, calls)
    hashed: list[Path] = []
    import kdcore.cache as cache

    original = cache.sha256_file
    monkeypatch.setattr(cache, "sha256_file", lambda path: hashed.append(Path(path)) or original(path))
    verify_entry(entry)
    verify_entry(entry)
    assert hashed == []  # hashed while it was written: sizes only afterwards
    damage(entry, "flipped bytes", "weights.bin")  # a new mtime: hashed again
    with pytest.raises(CacheEntryDamaged, match="weights.bin does not match its sha256"):
        verify_entry(entry)


def test_shards_carry_their_size_and_hash_in_their_names(tmp_path: Path) -> None:
    shard = write_shard(tmp_path, "chunk", ".json", b'{"a": 1}')
    verify_shard(shard, full=True)
    shard.write_bytes(b'{"a": 2}')
    with pytest.raises(CacheEntryDamaged, match="does not match the sha256 in its name"):
        verify_shard(shard)
    shard.write_bytes(b'{"a"')
    with pytest.raises(CacheEntryDamaged, match="truncated or changed"):
        verify_shard(shard)
    old = tmp_path / "chunk-123-abc.json"
    old.write_text("{}")
    with pytest.raises(CacheEntryDamaged, match="older kd"):
        verify_shard(old)


_HOLD = """
import sys, time
from pathlib import Path
from kdcore.cache import entry_lock
with entry_lock(Path(sys.argv[1]), "the test entry"):
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def test_the_lock_is_held_across_processes_and_released_when_its_holder_is_killed(tmp_path: Path) -> None:
    entry = tmp_path / "entry"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(entry), "60"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with lock_if_free(entry) as free:
            assert not free
        holder.kill()  # a killed builder never blocks the next one: the OS drops its lock
        holder.wait()
        with lock_if_free(entry) as free:
            assert free
        with entry_lock(entry, "the test entry"):
            pass
    finally:
        holder.kill()


def _du(path: Path) -> int:
    return int(subprocess.run(["du", "-s", "--block-size=1", str(path)], capture_output=True, text=True,
                              check=True).stdout.split()[0])


def _kd_cache(capsys: pytest.CaptureFixture[str], root: Path, *args: str) -> tuple[int, str]:
    code = main(["cache", "--cache-dir", str(root), *args])
    return code, capsys.readouterr().out


def test_kd_cache_list_verify_and_clear(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root, calls = tmp_path / "cache", []
    _ensure(root / "kind" / "one", calls)
    ensure_entry(root / "other" / "two", "other-kind", {"source": "x"}, _build_counter(calls), what="two",
                 load=lambda manifest: None)
    (root / "text" / "teachers" / "wmt-0123.partial").mkdir(parents=True)
    (root / "text" / "teachers" / "wmt-0123.partial" / "log.jsonl").write_text("{}\n" * 1000)

    code, out = _kd_cache(capsys, root, "list")
    assert code == 0
    listed = int(out.splitlines()[0].split("(")[1].split(" bytes")[0].replace(",", ""))
    assert listed == _du(root)
    assert "test-kind" in out and "other-kind" in out and "partial" in out and "from recipe=r/1" in out
    code, out = _kd_cache(capsys, root, "list", "--json")
    rows = json.loads(out)["entries"]
    assert {row["kind"] for row in rows} == {"test-kind", "other-kind", "partial"}
    assert sum(row["bytes"] for row in rows) <= _du(root)

    code, out = _kd_cache(capsys, root, "verify")
    assert code == 0 and "all 2 entries match" in out
    damage(root / "kind" / "one", "truncated", "weights.bin")
    code, out = _kd_cache(capsys, root, "verify")
    assert code == 1 and "DAMAGED  kind/one" in out and "truncated or changed" in out
    _ensure(root / "kind" / "one", calls)  # the next use moves it aside and rebuilds it
    code, out = _kd_cache(capsys, root, "list", "--json")
    assert [row["kind"] for row in json.loads(out)["entries"] if DAMAGED_MARK in row["path"]] == ["damaged"]
    code, out = _kd_cache(capsys, root, "clear", "damaged")
    assert "removed 1 path," in out and not list((root / "kind").glob(f"*{DAMAGED_MARK}*"))

    with pytest.raises(KDUserError, match="nothing of kind 'nope'"):
        main_args = ["cache", "--cache-dir", str(root), "clear", "nope"]
        from kdcore.cache_cli import run_cache_command
        from kdcore.cli import _parser

        run_cache_command(_parser().parse_args(main_args))
    assert main(["cache", "--cache-dir", str(root), "clear", "--older-than", "soon"]) == 2
    capsys.readouterr()
    code, out = _kd_cache(capsys, root, "clear", "--older-than", "1d")  # everything was used just now
    assert "removed 0 paths" in out and (root / "kind" / "one").is_dir()

    with entry_lock(root / "other" / "two", "two"):  # a running process holds it: kept
        code, out = _kd_cache(capsys, root, "clear")
    assert "kept other/two: a running process holds it" in out and "removed 2 paths" in out
    assert (root / "other" / "two").is_dir() and not (root / "kind" / "one").exists()
    code, out = _kd_cache(capsys, root, "clear", "other-kind")
    assert "removed 1 path," in out and not (root / "other" / "two").exists()
    assert _du(root) <= 5 * 4096  # five directories and empty lock files are all that is left
    _ensure(root / "kind" / "one", calls)  # the next use rebuilds it
    assert len(calls) == 4


_TOY_RUN = ["run", "--task", "toy", "--plugin", "vanilla", "--preset", "tiny", "--set", "teacher.args.train_steps=30",
            "--set", "trainer.max_steps=6", "--set", "trainer.eval_every=6", "--set", "trainer.checkpoint_every=6"]


def test_two_runs_started_together_on_an_empty_cache_train_the_teacher_once(tmp_path: Path) -> None:
    env = {**os.environ, "KD_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", "KD_PROGRESS": "off"}
    runs = [subprocess.Popen([sys.executable, "-m", "kdcore", *_TOY_RUN, "--out", str(tmp_path / f"run-{i}")],
                             env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i in range(2)]
    outputs = [run.communicate(timeout=600) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [err[-2000:] for _, err in outputs]
    logs = [err for _, err in outputs]
    # One trained the teacher; the other waited for it (or, started later, found it cached) and read it.
    assert sum("Teacher stage: the toy teacher is not cached" in log for log in logs) == 1, logs
    (entry,) = [p for p in (tmp_path / "cache" / "toy").iterdir() if p.is_dir()]
    assert json.loads((entry / MANIFEST).read_text())["kind"] == "toy-teacher"
    metrics = [json.loads((tmp_path / f"run-{i}" / "metrics.json").read_text()) for i in range(2)]
    assert metrics[0]["student"] == metrics[1]["student"] and metrics[0]["teacher"] == metrics[1]["teacher"]


# ------------------------------------------------------------------------------------------ every kind


def _moved_aside(entry: Path) -> list[Path]:
    return [p for p in entry.parent.iterdir() if p.name.startswith(entry.name + DAMAGED_MARK)]


def _assert_reported(caplog: pytest.LogCaptureFixture, entry: Path) -> None:
    assert f"The cache entry {entry} is damaged" in caplog.text and "moved aside" in caplog.text
    assert len(_moved_aside(entry)) == 1


def _teacher(cache: Path, task: str, sets: list[str]) -> torch.nn.Module:
    registry = Registry.discover(entry_points=False)
    resolved = resolve_run(registry, task=task, plugin="vanilla" if task == "toy" else "imitation", preset="tiny",
                           sets=sets)
    context = BuildContext(task=resolved.task_cls(resolved.data_config, cache), cache_dir=cache,
                           device=torch.device("cpu"), seed=0)
    return resolved.teacher_factory().build(resolved.teacher_config, context)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_toy_teacher(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    sets = ["teacher.args.train_steps=20"]
    first = _teacher(tmp_path, "toy", sets)
    (entry,) = [p for p in (tmp_path / "toy").iterdir() if p.is_dir()]
    damage(entry, "flipped bytes", "teacher.safetensors")
    with caplog.at_level(logging.INFO):
        again = _teacher(tmp_path, "toy", sets)
    _assert_reported(caplog, entry)
    assert "Teacher stage: the toy teacher is not cached" in caplog.text  # trained again, not read
    assert _same_weights(first, again)


SAMPLE = Path(__file__).parents[1] / "text_tasks" / "data" / "ha-en-de-sample.tsv"
TEXT_SETS = ["data.corpus=files", f"data.train.path={SAMPLE}", "data.valid_size=8", "data.test_size=8",
             "teacher.args.train_steps=3", "teacher.args.log_every=1", "teacher.args.checkpoint_every=3"]


def test_text_teacher_and_tokenizer(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    first = _teacher(tmp_path, "wmt", TEXT_SETS)
    (teacher,) = [p for p in (tmp_path / "text" / "teachers").iterdir() if p.is_dir()]
    (tokenizer,) = [p for p in (tmp_path / "text" / "tokenizers").iterdir() if p.is_dir()]
    assert json.loads((teacher / MANIFEST).read_text())["kind"] == "text-teacher"
    damage(teacher, "truncated", "model.safetensors")
    damage(tokenizer, "deleted file", "tokenizer.json")
    with caplog.at_level(logging.INFO):
        again = _teacher(tmp_path, "wmt", TEXT_SETS)
    _assert_reported(caplog, teacher)
    _assert_reported(caplog, tokenizer)
    assert "Teacher stage: the wmt teacher is not cached" in caplog.text
    assert _same_weights(first, again)


def test_corpus(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from kd_tasks.text.manifest import cached_corpus

    builds: list[int] = []

    def build() -> tuple[dict, dict]:
        builds.append(1)
        return {"train": [{"id": "1", "source": "a", "target": "b"}] * 50, "test": []}, {"counts": {"kept": 50}}

    entry = tmp_path / "data" / "translation" / "x"
    splits, manifest = cached_corpus(entry, {"builder": "b/1"}, build, what="the test corpus")
    damage(entry, "flipped bytes", "train.jsonl")
    with caplog.at_level(logging.WARNING):
        again, manifest_again = cached_corpus(entry, {"builder": "b/1"}, build, what="the test corpus")
    _assert_reported(caplog, entry)
    assert builds == [1, 1] and again == splits and manifest_again["content_sha256"] == manifest["content_sha256"]
    assert manifest_again["counts"] == {"kept": 50} and manifest_again["splits"] == {"train": 50, "test": 0}
    with caplog.at_level(logging.INFO):  # other inputs (a new builder version): rebuilt, not reported as damage
        cached_corpus(entry, {"builder": "b/2"}, build, what="the test corpus")
    assert builds == [1, 1, 1] and "built from other inputs (builder changed)" in caplog.text


def test_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from kd_tasks.text import translation_data

    wheel = b"PK fake wheel bytes " * 100
    downloads: list[int] = []

    def fake_pip(command: list[str], **_: object) -> SimpleNamespace:
        downloads.append(1)
        (Path(command[command.index("-d") + 1]) / translation_data.HA_WHEEL_NAME).write_bytes(wheel)
        return SimpleNamespace(returncode=0, stdout="", stderr="")

    monkeypatch.setattr(subprocess, "run", fake_pip)
    monkeypatch.delenv(translation_data.WHEEL_ENV, raising=False)
    sha = hashlib.sha256(wheel).hexdigest()
    path = translation_data.fetch_wheel(tmp_path, expected_sha256=sha)
    assert path.read_bytes() == wheel and translation_data.fetch_wheel(tmp_path, expected_sha256=sha) == path
    damage(path.parent, "truncated", path.name)
    with caplog.at_level(logging.WARNING):
        assert translation_data.fetch_wheel(tmp_path, expected_sha256=sha).read_bytes() == wheel
    _assert_reported(caplog, path.parent)
    assert downloads == [1, 1]


def test_converted_whisper(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    from kd_plugins.speech import ct2_whisper

    source = tmp_path / "ct2"
    source.mkdir()
    (source / "model.bin").write_bytes(b"not read: the conversion is replaced below")
    conversions: list[int] = []

    def tiny_conversion(directory: Path) -> WhisperForConditionalGeneration:
        conversions.append(1)
        torch.manual_seed(0)
        config = WhisperConfig(d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                               decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, vocab_size=64,
                               num_mel_bins=8, max_source_positions=16, max_target_positions=16, pad_token_id=0,
                               bos_token_id=1, eos_token_id=1, decoder_start_token_id=1)
        return WhisperForConditionalGeneration(config).eval()

    monkeypatch.setattr(ct2_whisper, "convert_ctranslate2_whisper", tiny_conversion)
    first = ct2_whisper.load_ctranslate2_whisper(source, cache_dir=tmp_path / "cache")
    (entry,) = [p for p in (tmp_path / "cache" / "whisper-ct2").iterdir() if p.is_dir()]
    damage(entry, "garbled manifest", MANIFEST)
    with caplog.at_level(logging.WARNING):
        again = ct2_whisper.load_ctranslate2_whisper(source, cache_dir=tmp_path / "cache")
    _assert_reported(caplog, entry)
    assert conversions == [1, 1] and _same_weights(first, again)


def test_speech_teacher_states(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from transformers import WavLMConfig, WavLMModel

    from kd_plugins.speech.teacher_cache import CachedSpeechTeacher
    from kd_plugins.speech.teachers import WavLMTeacherFactory
    from kdcore.signals import Signal, SignalRequest

    conv = [[16, 10, 5], [16, 3, 2], [16, 2, 2]]
    config = WavLMConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                         conv_dim=[c for c, _, _ in conv], conv_kernel=[k for _, k, _ in conv],
                         conv_stride=[s for _, _, s in conv], conv_bias=False, feat_extract_norm="group",
                         num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, num_buckets=32,
                         max_bucket_distance=64)
    torch.manual_seed(0)
    WavLMModel(config).save_pretrained(tmp_path / "wavlm")
    context = BuildContext(task=None, cache_dir=tmp_path, device=torch.device("cpu"), seed=0)  # type: ignore[arg-type]
    inner = WavLMTeacherFactory().build(WavLMTeacherFactory.Config(source=str(tmp_path / "wavlm"), cache=False),
                                        context).freeze()
    batch = {"waveform": torch.randn(2, 2000, generator=torch.Generator().manual_seed(0)),
             "waveform_lengths": torch.tensor([2000, 1800])}
    request = SignalRequest(frozenset({Signal.HIDDEN_STATES}))
    first = CachedSpeechTeacher(inner, tmp_path / "cache").signals(batch, request)
    (entry,) = [p for p in (tmp_path / "cache" / "speech-teacher-states").iterdir() if p.is_dir()]
    assert json.loads((entry / MANIFEST).read_text())["shards"] == "shard-*.safetensors"
    (shard,) = entry.glob("shard-*.safetensors")
    damage(entry, "garbled manifest", MANIFEST)
    with caplog.at_level(logging.WARNING):
        again = CachedSpeechTeacher(inner, tmp_path / "cache").signals(batch, request)
    _assert_reported(caplog, entry)
    assert not shard.exists() and len(list(entry.glob("shard-*.safetensors"))) == 1  # recomputed into a new entry
    assert all(torch.equal(a, b) for a, b in zip(first.hidden_states, again.hidden_states))
    damage(entry, "flipped bytes", next(entry.glob("shard-*.safetensors")).name)
    with caplog.at_level(logging.WARNING):
        CachedSpeechTeacher(inner, tmp_path / "cache").signals(batch, request)
    assert "speech teacher-state shard" in caplog.text and "does not match the sha256 in its name" in caplog.text


def test_seq_kd_outputs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from kd_plugins.text.baselines import SeqKDCache

    built_from = {"teacher_sha256": "t" * 64, "settings": {"num_beams": 2}}
    cache = SeqKDCache(tmp_path / "seq-kd", "key", built_from)
    cache.store({"a": {"source": "h1", "tokens": [1, 2, 3]}})
    cache.store({"b": {"source": "h2", "tokens": [4, 5]}})
    chunks = sorted(cache.directory.glob("shard-*.safetensors"))
    assert SeqKDCache(tmp_path / "seq-kd", "key", built_from).lookup("a", "h1") == [1, 2, 3]
    damage(cache.directory, "flipped bytes", chunks[0].name)
    with caplog.at_level(logging.WARNING):
        reread = SeqKDCache(tmp_path / "seq-kd", "key", built_from)
    assert f"The seq-kd cache file {chunks[0]} is damaged" in caplog.text
    assert reread.lookup("a", "h1") is None and reread.lookup("b", "h2") == [4, 5]  # only the damaged one regenerates
    damage(cache.directory, "no manifest (older kd)", MANIFEST)
    with caplog.at_level(logging.WARNING):
        fresh = SeqKDCache(tmp_path / "seq-kd", "key", built_from)
    _assert_reported(caplog, cache.directory)
    assert fresh.lookup("b", "h2") is None


def test_synthetic_speech_corpus(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from kd_tasks.speech.synth import SynthConfig, synthetic_speech_corpus

    config = SynthConfig(clips_per_keyword=1, unknown_clips=2, silence_clips=2, asr_utterances=3, voices=["en-US"],
                         variants=["m3"], noise_probability=0.5, reverb_probability=0.5)
    splits, manifest = synthetic_speech_corpus(config, tmp_path)
    (entry,) = [p for p in (tmp_path / "speech-synth").iterdir() if p.is_dir()]
    damage(entry, "truncated", "train.safetensors")
    with caplog.at_level(logging.WARNING):
        again, manifest_again = synthetic_speech_corpus(config, tmp_path)
    _assert_reported(caplog, entry)
    assert manifest_again["content_sha256"] == manifest["content_sha256"]
    assert all(torch.equal(a.waveform, b.waveform) for a, b in zip(splits["train"], again["train"]))
