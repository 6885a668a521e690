"""The on-disk teacher hidden-state cache: hits skip the teacher, corrupt shards are recomputed, disk is bounded."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import WavLMConfig, WavLMModel

from kdcore.errors import KDUserError
from kdcore.interfaces import BuildContext
from kdcore.signals import Signal, SignalRequest
from kd_plugins.speech.teacher_shape import find_hf_speech_model, teacher_hidden_size, teacher_num_layers
from kd_plugins.speech.teacher_cache import CachedSpeechTeacher
from kd_plugins.speech.teachers import WavLMTeacherFactory

TINY_CONV = [[16, 10, 5], [16, 3, 2], [16, 2, 2]]
ALL = SignalRequest(frozenset({Signal.HIDDEN_STATES}))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = WavLMConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                         conv_dim=[c for c, _, _ in TINY_CONV], conv_kernel=[k for _, k, _ in TINY_CONV],
                         conv_stride=[s for _, _, s in TINY_CONV], conv_bias=False, feat_extract_norm="group",
                         num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, num_buckets=32,
                         max_bucket_distance=64)
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("tiny-wavlm")
    WavLMModel(config).save_pretrained(directory)
    return directory


def _context(cache: Path) -> BuildContext:
    return BuildContext(task=None, cache_dir=cache, device=torch.device("cpu"), seed=0)  # type: ignore[arg-type]


class CountingTeacher:
    """Wraps a teacher's forward_signals to count the utterances it is run on."""

    def __init__(self, teacher) -> None:  # noqa: ANN001
        self.utterances = 0
        original = teacher.forward_signals

        def counted(batch, request):  # noqa: ANN001, ANN202
            self.utterances += int(batch["waveform"].shape[0])
            return original(batch, request)

        teacher.forward_signals = counted


def _plain_teacher(model_dir: Path, tmp_path: Path):  # noqa: ANN202
    config = WavLMTeacherFactory.Config(source=str(model_dir), cache=False)
    return WavLMTeacherFactory().build(config, _context(tmp_path)).freeze()


def _clips(count: int = 6, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(int(length), generator=generator)
            for length in torch.randint(1500, 3200, (count,), generator=generator)]


def _batch(clips: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    lengths = torch.tensor([len(clip) for clip in clips])
    waveform = torch.zeros(len(clips), int(lengths.max()))
    for row, clip in enumerate(clips):
        waveform[row, :len(clip)] = clip
    return {"waveform": waveform, "waveform_lengths": lengths}


def _per_utterance(signals) -> list[list[torch.Tensor]]:  # noqa: ANN001
    mask = signals.extra["frame_mask"]
    return [[state[row, :int(mask[row].sum())] for state in signals.hidden_states] for row in range(mask.shape[0])]


def test_second_epoch_and_next_run_skip_the_teacher(model_dir: Path, tmp_path: Path) -> None:
    clips = _clips()
    plain = _plain_teacher(model_dir, tmp_path)
    direct = [_per_utterance(plain.signals(_batch([clip]), ALL))[0] for clip in clips]

    inner = _plain_teacher(model_dir, tmp_path)
    counter = CountingTeacher(inner)
    cached = CachedSpeechTeacher(inner, tmp_path / "cache").freeze()
    first = [cached.signals(_batch(clips[start:start + 2]), ALL) for start in (0, 2, 4)]
    assert counter.utterances == 6 and (cached.hits, cached.misses) == (0, 6)
    # The first pass already returns float16-rounded states, within float16 tolerance of the teacher's.
    first_states = [states for signals in first for states in _per_utterance(signals)]
    for ours, theirs in zip(first_states, direct):
        assert len(ours) == len(theirs) == 3 + 1
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, atol=2e-3, rtol=1e-3)

    # Epoch 2, batches composed differently: no teacher call, identical values and frame masks.
    second = cached.signals(_batch([clips[5], clips[0], clips[3]]), ALL)
    second_rest = cached.signals(_batch([clips[1], clips[2], clips[4]]), ALL)
    assert counter.utterances == 6 and cached.hits == 6
    again = dict(zip([5, 0, 3, 1, 2, 4], _per_utterance(second) + _per_utterance(second_rest)))
    for index, states in enumerate(first_states):
        for a, b in zip(states, again[index]):
            assert torch.equal(a, b)

    # A new run (new wrapper, same cache directory) reads the shards from disk.
    inner_next = _plain_teacher(model_dir, tmp_path)
    counter_next = CountingTeacher(inner_next)
    next_run = CachedSpeechTeacher(inner_next, tmp_path / "cache")
    reread = _per_utterance(next_run.signals(_batch(clips), ALL))
    assert counter_next.utterances == 0
    for a_states, b_states in zip(first_states, reread):
        assert all(torch.equal(a, b) for a, b in zip(a_states, b_states))
    # Only the misses of a mixed batch reach the teacher; a clip repeated within a batch is run once.
    new_clip = _clips(1, seed=7)[0]
    next_run.signals(_batch([clips[0], new_clip, new_clip]), ALL)
    assert counter_next.utterances == 1


def test_other_teacher_weights_do_not_read_these_states(model_dir: Path, tmp_path: Path) -> None:
    clips = _clips(2)
    CachedSpeechTeacher(_plain_teacher(model_dir, tmp_path), tmp_path / "cache").signals(_batch(clips), ALL)
    changed = _plain_teacher(model_dir, tmp_path)
    with torch.no_grad():
        changed.model.encoder.layers[0].feed_forward.output_dense.bias.add_(1.0)
    counter = CountingTeacher(changed)
    CachedSpeechTeacher(changed, tmp_path / "cache").signals(_batch(clips), ALL)
    assert counter.utterances == 2
    assert len([p for p in (tmp_path / "cache" / "speech-teacher-states").iterdir() if p.is_dir()]) == 2


@pytest.mark.parametrize("damage", ["flip_data", "truncate"])
def test_a_corrupt_shard_is_detected_and_recomputed(model_dir: Path, tmp_path: Path, damage: str) -> None:
    clips = _clips(4)
    cached = CachedSpeechTeacher(_plain_teacher(model_dir, tmp_path), tmp_path / "cache")
    reference = _per_utterance(cached.signals(_batch(clips[:2]), ALL))
    cached.signals(_batch(clips[2:]), ALL)
    shards = sorted(cached.directory.glob("shard-*.safetensors"))
    assert len(shards) == 2
    data = bytearray(shards[0].read_bytes())
    if damage == "flip_data":
        data[-50] ^= 0xFF  # inside the tensor bytes: the header still parses, the checksum does not match
    else:
        data = data[: len(data) // 2]
    shards[0].write_bytes(bytes(data))

    inner = _plain_teacher(model_dir, tmp_path)
    counter = CountingTeacher(inner)
    fresh = CachedSpeechTeacher(inner, tmp_path / "cache")
    recomputed = _per_utterance(fresh.signals(_batch(clips), ALL))
    assert counter.utterances == 2  # only the damaged shard's utterances
    for a_states, b_states in zip(reference, recomputed[:2]):
        assert all(torch.equal(a, b) for a, b in zip(a_states, b_states))
    assert shards[0] not in set(fresh.directory.glob("shard-*.safetensors"))


def test_disk_use_is_bounded(model_dir: Path, tmp_path: Path) -> None:
    clips = _clips(8)
    one_batch = CachedSpeechTeacher(_plain_teacher(model_dir, tmp_path), tmp_path / "probe")
    one_batch.signals(_batch(clips[:2]), ALL)
    shard_bytes = next(one_batch.directory.glob("shard-*.safetensors")).stat().st_size
    bound = int(2.5 * shard_bytes)
    cached = CachedSpeechTeacher(_plain_teacher(model_dir, tmp_path), tmp_path / "cache", max_bytes=bound)
    for start in range(0, 8, 2):
        cached.signals(_batch(clips[start:start + 2]), ALL)
        total = sum(path.stat().st_size for path in cached.directory.glob("shard-*.safetensors"))
        assert total <= bound
    assert len(list(cached.directory.glob("shard-*.safetensors"))) == 2  # the oldest ones were evicted
    counter = CountingTeacher(cached.inner)
    cached.signals(_batch(clips[6:]), ALL)
    assert counter.utterances == 0  # the newest batch is still cached
    cached.signals(_batch(clips[:2]), ALL)
    assert counter.utterances == 2  # the evicted one is recomputed


def test_a_layer_subset_serves_exactly_the_requested_layers(model_dir: Path, tmp_path: Path) -> None:
    clips = _clips(2)
    full = _per_utterance(_plain_teacher(model_dir, tmp_path).signals(_batch(clips), ALL))
    cached = CachedSpeechTeacher(_plain_teacher(model_dir, tmp_path), tmp_path / "cache", layers=[1, 3])
    request = SignalRequest(frozenset({Signal.HIDDEN_STATES}), (1, 3))
    for _ in range(2):  # miss, then hit
        signals = cached.signals(_batch(clips), request)
        assert len(signals.hidden_states) == 2
        for row, states in enumerate(_per_utterance(signals)):
            torch.testing.assert_close(states[0], full[row][1], atol=2e-3, rtol=1e-3)
            torch.testing.assert_close(states[1], full[row][3], atol=2e-3, rtol=1e-3)
    assert cached.hits == 2 and cached.directory.name.endswith("-l1-3")
    with pytest.raises(KDUserError, match="stores only layers"):
        cached.signals(_batch(clips), ALL)
    with pytest.raises(KDUserError, match=r"add \[2\]"):
        cached.signals(_batch(clips), SignalRequest(frozenset({Signal.HIDDEN_STATES}), (1, 2)))


def test_factories_cache_by_default_and_students_still_see_the_model(model_dir: Path, tmp_path: Path) -> None:
    teacher = WavLMTeacherFactory().build(WavLMTeacherFactory.Config(source=str(model_dir)), _context(tmp_path))
    assert isinstance(teacher, CachedSpeechTeacher)
    assert teacher.cache_root == tmp_path / "speech-teacher-states"
    assert find_hf_speech_model(teacher) is teacher.inner.model  # DistilHuBERT/GenDistiller init from it
    assert teacher_hidden_size(teacher) == 32 and teacher_num_layers(teacher) == 3
    signals = teacher.freeze().signals(_batch(_clips(2)), ALL)
    assert len(signals.hidden_states) == 4 and signals.extra["frame_mask"].dtype == torch.bool
