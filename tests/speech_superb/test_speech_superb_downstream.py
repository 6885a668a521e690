"""SUPERB downstream heads on synthetic features: they learn, the layer sum chooses layers, all is seeded."""
from __future__ import annotations

import pytest
import torch

from kd_tasks.speech.downstream import (
    CTCHeadConfig, CharVocabulary, UtteranceHeadConfig, WeightedLayerSum, classifier_accuracy, extract_features,
    greedy_ctc_decode, train_ctc_head, train_utterance_classifier, transcribe, word_error_rate,
)
from kdcore.interfaces import Model
from kdcore.signals import Signals


def _separable(count: int, classes: int, layers: int, width: int, informative: int, seed: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features where only layer ``informative`` carries the class (a class mean + noise)."""
    generator = torch.Generator().manual_seed(seed)
    means = torch.randn(classes, width, generator=torch.Generator().manual_seed(123)) * 1.5
    labels = torch.randint(0, classes, (count,), generator=generator)
    pooled = torch.randn(count, layers, width, generator=generator)
    pooled[:, informative] = means[labels] + 0.8 * torch.randn(count, width, generator=generator)
    return pooled, labels


def test_weighted_layer_sum_is_a_convex_combination() -> None:
    layer_sum = WeightedLayerSum(3)
    with torch.no_grad():
        layer_sum.logits.copy_(torch.tensor([0.0, 1.0, -1.0]))
    layers = torch.randn(2, 3, 5, 4)
    weights = torch.softmax(torch.tensor([0.0, 1.0, -1.0]), 0)
    expected = sum(weights[i] * layers[:, i] for i in range(3))
    assert torch.allclose(layer_sum(layers), expected, atol=1e-6)
    assert torch.isclose(layer_sum.weights().sum(), torch.tensor(1.0))
    assert torch.allclose(WeightedLayerSum(4)(torch.ones(1, 4, 2)), torch.ones(1, 2))


def test_classifier_learns_and_the_layer_sum_picks_the_informative_layer() -> None:
    train_x, train_y = _separable(600, 10, 4, 32, informative=2, seed=0)
    test_x, test_y = _separable(300, 10, 4, 32, informative=2, seed=1)
    config = UtteranceHeadConfig(hidden=64, steps=300, lr=5e-3, dropout=0.0)
    model = train_utterance_classifier(train_x, train_y, 10, config, seed=0)
    accuracy = classifier_accuracy(model, test_x, test_y)
    assert accuracy > 0.9, accuracy  # chance is 0.1
    weights = model.layer_sum.weights().detach()
    others = torch.cat([weights[:2], weights[3:]])
    assert int(weights.argmax()) == 2 and float(weights[2]) > 1.5 * float(others.max()), weights
    # a linear head learns too
    linear = train_utterance_classifier(train_x, train_y, 10, config.model_copy(update={"hidden": 0}), seed=0)
    assert classifier_accuracy(linear, test_x, test_y) > 0.9


def test_classifier_training_is_deterministic() -> None:
    train_x, train_y = _separable(200, 5, 3, 16, informative=0, seed=0)
    config = UtteranceHeadConfig(hidden=32, steps=50, max_train_items=150)
    first = train_utterance_classifier(train_x, train_y, 5, config, seed=7)
    second = train_utterance_classifier(train_x, train_y, 5, config, seed=7)
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)
    third = train_utterance_classifier(train_x, train_y, 5, config, seed=8)
    assert not torch.equal(first.layer_sum.logits, third.layer_sum.logits) or not all(
        torch.equal(a, b) for a, b in zip(first.state_dict().values(), third.state_dict().values()))


def _toy_asr(count: int, seed: int, layers: int = 2, width: int = 16) -> tuple[list[torch.Tensor], list[str]]:
    """Each character is 3 frames of its embedding (+ noise) in layer 1; layer 0 is noise."""
    alphabet = "abcde "
    embedding = torch.randn(len(alphabet), width, generator=torch.Generator().manual_seed(5)) * 2
    generator = torch.Generator().manual_seed(seed)
    frames, texts = [], []
    for _ in range(count):
        words = ["".join(alphabet[int(i)] for i in torch.randint(0, 5, (int(torch.randint(1, 4, (1,),
                 generator=generator)),), generator=generator)) for _ in range(int(torch.randint(1, 4, (1,),
                                                                                                   generator=generator)))]
        text = " ".join(words)
        ids = torch.tensor([alphabet.index(c) for c in text]).repeat_interleave(3)
        feature = torch.randn(layers, len(ids), width, generator=generator)
        feature[1] = embedding[ids] + 0.3 * torch.randn(len(ids), width, generator=generator)
        frames.append(feature.half())
        texts.append(text)
    return frames, texts


def test_ctc_head_learns_a_toy_transcription_task() -> None:
    train_frames, train_texts = _toy_asr(200, seed=0)
    test_frames, test_texts = _toy_asr(50, seed=1)
    untrained_config = CTCHeadConfig(projection=32, lstm_layers=0, steps=1, dropout=0.0)
    untrained, vocabulary = train_ctc_head(train_frames, train_texts, untrained_config, seed=0)
    before = word_error_rate(test_texts, transcribe(untrained, vocabulary, test_frames))
    config = untrained_config.model_copy(update={"steps": 200, "lr": 1e-2})
    model, vocabulary = train_ctc_head(train_frames, train_texts, config, seed=0)
    hypotheses = transcribe(model, vocabulary, test_frames)
    after = word_error_rate(test_texts, hypotheses)
    assert before > 0.9, before
    assert after < 0.35, (after, list(zip(test_texts, hypotheses))[:5])
    again, _ = train_ctc_head(train_frames, train_texts, config, seed=0)
    assert transcribe(again, vocabulary, test_frames) == hypotheses  # seeded


def test_bilstm_ctc_head_trains_and_is_seeded() -> None:
    frames, texts = _toy_asr(40, seed=0)
    config = CTCHeadConfig(projection=16, lstm_hidden=16, lstm_layers=1, steps=30, lr=1e-2, batch_size=8)
    model, vocabulary = train_ctc_head(frames, texts, config, seed=0)
    assert model.lstm is not None and model.lstm.bidirectional
    padded = torch.zeros(2, 2, 9, 16)
    assert model(padded, torch.tensor([9, 4])).shape == (2, 9, len(vocabulary))
    first = transcribe(model, vocabulary, frames[:10])
    again, _ = train_ctc_head(frames, texts, config, seed=0)
    assert transcribe(again, vocabulary, frames[:10]) == first


def test_char_vocabulary_and_greedy_decoding() -> None:
    vocabulary = CharVocabulary(["Go  Left", "yes"])
    assert vocabulary.decode(vocabulary.encode("go left")) == "go left"
    assert vocabulary.encode("go!") == vocabulary.encode("go")  # unseen characters dropped
    # path: a a blank a b b -> "aab"
    log_probs = torch.full((1, 6, 3), -10.0)
    for t, token in enumerate([1, 1, 0, 1, 2, 2]):
        log_probs[0, t, token] = 0.0
    assert greedy_ctc_decode(log_probs, torch.tensor([6])) == [[1, 1, 2]]
    assert greedy_ctc_decode(log_probs, torch.tensor([2])) == [[1]]
    assert word_error_rate(["a b", "c"], ["a b", ""]) == 1 / 3


class _FixedStates(Model):
    """Returns given hidden states with a frame mask (valid frames = waveform_lengths // 10)."""

    def forward_signals(self, batch, request):  # noqa: ANN001, ANN201
        waveform = batch["waveform"]
        frames = waveform.shape[1] // 10
        base = waveform[:, ::10][:, :frames, None]
        layers = (base.expand(-1, -1, 4), 2 * base.expand(-1, -1, 4) + 1)
        mask = torch.arange(frames)[None] < (batch["waveform_lengths"] // 10)[:, None]
        return Signals(hidden_states=layers, extra={"frame_mask": mask})


def _collate(items):  # noqa: ANN001, ANN202
    lengths = torch.tensor([len(x) for x in items])
    waveform = torch.zeros(len(items), int(lengths.max()))
    for row, item in enumerate(items):
        waveform[row, :len(item)] = item
    return {"waveform": waveform, "waveform_lengths": lengths}


def test_extract_features_pools_valid_frames_only() -> None:
    items = [torch.arange(40, dtype=torch.float32), torch.full((20,), 3.0), torch.arange(60, dtype=torch.float32)]
    features = extract_features(_FixedStates(), items, _collate, torch.device("cpu"), batch_size=2,
                                keep_frames=[False, True, False], normalize=False, length=len)
    assert features.pooled.shape == (3, 2, 4)
    # item 1 (20 samples, padded to 40 when batched with item 0): frames 0..1 valid, all value 3
    assert torch.allclose(features.pooled[1, 0], torch.full((4,), 3.0))
    assert torch.allclose(features.pooled[1, 1], torch.full((4,), 7.0))
    assert torch.allclose(features.pooled[0, 0], torch.full((4,), 15.0))  # mean of 0, 10, 20, 30
    assert set(features.frames) == {1} and features.frames[1].shape == (2, 2, 4)
    normalized = extract_features(_FixedStates(), items, _collate, torch.device("cpu"), batch_size=3, length=len)
    assert normalized.pooled.shape == (3, 2, 4)


def test_error_counts_sum_to_the_corpus_error_rates() -> None:
    from kd_tasks.speech.downstream import character_error_rate, error_counts, word_error_rate

    references = ["turn on the kitchen light", "", "set a timer for ten minutes", "stop"]
    hypotheses = ["turn the kitchen lights", "anything", "set timer for two minutes now", ""]
    for unit, corpus_rate in (("words", word_error_rate), ("characters", character_error_rate)):
        counts = error_counts(references, hypotheses, unit)
        assert [position for position, _ in counts] == [0, 2, 3]  # the empty reference is not scored
        errors = sum(stats[0] for _, stats in counts)
        length = sum(stats[1] for _, stats in counts)
        assert errors / length == pytest.approx(corpus_rate(references, hypotheses), abs=1e-12)
