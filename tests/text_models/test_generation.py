"""Batched decoding: KV cache equals no cache, eos handling, top-k determinism, beam search."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from kd_plugins.text.generation import beam_search, decode, generate, measure_speed
from kd_plugins.text.models import TextStudent


@pytest.mark.parametrize("model_type", ["marian", "bart", "t5"])
def test_kv_cache_greedy_equals_no_cache(tiny: SimpleNamespace, model_type: str) -> None:
    model = TextStudent(tiny.hf(model_type, layers=2)).eval()
    batch = tiny.batch(6)
    cached = generate(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=12)
    uncached = generate(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=12, use_cache=False)
    assert torch.equal(cached.sequences, uncached.sequences)
    assert torch.equal(cached.lengths, uncached.lengths)


def test_kv_cache_top_k_sampling_equals_no_cache_for_the_same_generator(tiny: SimpleNamespace) -> None:
    model = TextStudent(tiny.hf("marian", layers=2)).eval()
    batch = tiny.batch(6)

    def sample(seed: int, use_cache: bool) -> torch.Tensor:
        return generate(model, batch["input_ids"], batch["attention_mask"], strategy="top_k", top_k=8,
                        temperature=1.5, max_new_tokens=12, generator=torch.Generator().manual_seed(seed),
                        use_cache=use_cache).sequences

    assert torch.equal(sample(1, True), sample(1, False))
    assert torch.equal(sample(1, True), sample(1, True))
    assert not torch.equal(sample(1, True), sample(2, True))
    greedy = generate(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=12).sequences
    assert not torch.equal(sample(1, True), greedy)


def test_top_k_one_is_greedy(tiny: SimpleNamespace) -> None:
    model = TextStudent(tiny.hf("marian")).eval()
    batch = tiny.batch(4)
    top1 = generate(model, batch["input_ids"], strategy="top_k", top_k=1, max_new_tokens=8,
                    generator=torch.Generator().manual_seed(0))
    greedy = generate(model, batch["input_ids"], max_new_tokens=8)
    assert torch.equal(top1.sequences, greedy.sequences)


def test_eos_ends_each_row_and_the_rest_is_padding(tiny: SimpleNamespace) -> None:
    hf = tiny.hf("marian")
    with torch.no_grad():
        hf.final_logits_bias[0, tiny.EOS] = 3.0  # eos likely but not certain: rows end at different steps
    model = TextStudent(hf).eval()
    batch = tiny.batch(16, seed=3)
    result = generate(model, batch["input_ids"], batch["attention_mask"], strategy="top_k", top_k=4,
                      max_new_tokens=10, generator=torch.Generator().manual_seed(0))
    ended = []
    for row, length in zip(result.sequences.tolist(), result.lengths.tolist()):
        eos_positions = [i for i, token in enumerate(row) if token == tiny.EOS]
        if eos_positions:
            assert length == eos_positions[0] + 1
            assert all(token == tiny.PAD for token in row[length:])
            ended.append(length)
        else:
            assert length == len(row) == 10
        assert tiny.PAD not in row[:length]  # pad is suppressed inside a sequence
    assert ended and len(set(ended)) > 1, "the check needs rows that end at different steps"
    labels = result.labels()
    assert ((labels == -100) == (torch.arange(labels.shape[1])[None, :] >= result.lengths[:, None])).all()


def test_certain_eos_stops_after_one_token(tiny: SimpleNamespace) -> None:
    hf = tiny.hf("marian")
    with torch.no_grad():
        hf.final_logits_bias[0, tiny.EOS] = 1e4
    result = generate(TextStudent(hf).eval(), tiny.batch(3)["input_ids"], max_new_tokens=10)
    assert result.sequences.tolist() == [[tiny.EOS]] * 3 and result.lengths.tolist() == [1, 1, 1]


def test_beam_search_matches_hugging_face_generate(tiny: SimpleNamespace) -> None:
    hf = tiny.hf("marian", layers=2)
    model = TextStudent(hf).eval()
    batch = tiny.batch(4)
    result = beam_search(model, batch["input_ids"], batch["attention_mask"], num_beams=3, max_new_tokens=8)
    reference = hf.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], num_beams=3,
                            max_new_tokens=8, do_sample=False, early_stopping=True)
    for row, (tokens, length) in enumerate(zip(result.sequences, result.lengths.tolist())):
        expected = reference[row, 1:].tolist()
        if tiny.EOS in expected:
            expected = expected[:expected.index(tiny.EOS) + 1]
        assert tokens[:length].tolist() == expected
    assert torch.equal(decode(model, batch["input_ids"], batch["attention_mask"], num_beams=3,
                              max_new_tokens=8).sequences, result.sequences)
    assert torch.equal(decode(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=8).sequences,
                       generate(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=8).sequences)


def test_generation_leaves_train_mode_and_gradients_alone(tiny: SimpleNamespace) -> None:
    model = TextStudent(tiny.hf("marian"))
    model.train()
    result = generate(model, tiny.batch(2)["input_ids"], max_new_tokens=4)
    assert model.training and not result.sequences.requires_grad


def test_speed_measurement_counts_generated_tokens(tiny: SimpleNamespace) -> None:
    model = TextStudent(tiny.hf("marian"))
    batch = tiny.batch(4)
    speed = measure_speed(model, batch["input_ids"], batch["attention_mask"], max_new_tokens=6, repeats=2)
    expected_tokens = 2 * int(generate(model.eval(), batch["input_ids"], batch["attention_mask"],
                                       max_new_tokens=6).lengths.sum())
    assert speed.tokens == expected_tokens
    assert speed.tokens_per_second == pytest.approx(speed.tokens / speed.seconds)


@pytest.mark.parametrize("model_type", ["marian", "bart", "t5"])
def test_beam_search_without_cross_attention_reordering_equals_transformers(tiny: SimpleNamespace,
                                                                              model_type: str) -> None:
    # Random weights and 5 beams over 12 steps: beams are reordered at nearly every step, so an
    # optimisation that skipped a reorder that mattered would change the outputs.
    hf = tiny.hf(model_type, layers=2)
    model = TextStudent(hf).eval()
    batch = tiny.batch(6, seed=1)
    result = beam_search(model, batch["input_ids"], batch["attention_mask"], num_beams=5, max_new_tokens=12)
    reference = hf.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], num_beams=5,
                            max_new_tokens=12, do_sample=False, early_stopping=True,
                            pad_token_id=model.pad_token_id, eos_token_id=model.eos_token_id,
                            decoder_start_token_id=model.decoder_start_token_id)
    for tokens, length, expected in zip(result.sequences, result.lengths.tolist(), reference[:, 1:].tolist()):
        if tiny.EOS in expected:
            expected = expected[:expected.index(tiny.EOS) + 1]
        assert tokens[:length].tolist() == expected[:length] and length == len(expected)


def test_beam_cache_reorders_self_attention_only(tiny: SimpleNamespace) -> None:
    from kd_plugins.text.generation import beam_cache

    model = TextStudent(tiny.hf("marian"))
    cache = beam_cache(model)
    keys = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 1, 2, 2).contiguous()
    cache.self_attention_cache.update(keys.clone(), keys.clone(), 0)
    cache.cross_attention_cache.update(keys.clone(), keys.clone(), 0)
    cache.reorder_cache(torch.tensor([1, 1, 3, 2]))
    assert cache.self_attention_cache.layers[0].keys[:, 0, 0, 0].tolist() == [1.0, 1.0, 3.0, 2.0]
    assert cache.cross_attention_cache.layers[0].keys[:, 0, 0, 0].tolist() == [0.0, 1.0, 2.0, 3.0]


def _transformers_reference(model: TextStudent, batch: dict, **options: object) -> list[list[int]]:
    reference = beam_search(model, batch["input_ids"], batch["attention_mask"], implementation="transformers",
                            **options)
    return [row[:length].tolist() for row, length in zip(reference.sequences, reference.lengths.tolist())]


@pytest.mark.parametrize("model_type", ["marian", "bart", "t5"])
@pytest.mark.parametrize(("num_beams", "length_penalty", "eos_scale"), [(5, 1.0, 0.0), (4, 0.6, 8.0), (2, 2.0, 8.0),
                                                                         (6, 1.0, 8.0)])
def test_lean_beam_search_equals_transformers_generate(tiny: SimpleNamespace, model_type: str, num_beams: int,
                                                      length_penalty: float, eos_scale: float) -> None:
    # A large random eos row in the output layer makes hypotheses end at different steps (T5: 1 to 10
    # tokens in one batch), so the finished-hypothesis bookkeeping, the length penalty and the early-stop
    # heuristic all decide outputs; without it every row runs to the length limit.
    from kd_plugins.text.generation import _beam_generation_config, lean_beam_search_supported

    hf = tiny.hf(model_type, layers=2, seed=3)
    if eos_scale:
        with torch.no_grad():
            weight = hf.get_output_embeddings().weight
            eos_row = torch.randn(weight.shape[1], generator=torch.Generator().manual_seed(0))
            weight[tiny.EOS] = eos_row * weight[2:].std() * eos_scale
    model = TextStudent(hf).eval()
    assert lean_beam_search_supported(_beam_generation_config(model, num_beams, 10, length_penalty))
    batch = tiny.batch(7, seed=2)
    options = {"num_beams": num_beams, "max_new_tokens": 10, "length_penalty": length_penalty}
    lean = beam_search(model, batch["input_ids"], batch["attention_mask"], **options)
    got = [row[:length].tolist() for row, length in zip(lean.sequences, lean.lengths.tolist())]
    expected = _transformers_reference(model, batch, **options)
    assert got == expected
    assert lean.sequences.shape[1] == max(len(row) for row in expected)
    if eos_scale and model_type == "t5":
        assert len({len(row) for row in got}) > 1, "the check needs hypotheses of different lengths"


def test_lean_beam_search_applies_banned_tokens_and_forced_eos(tiny: SimpleNamespace) -> None:
    hf = tiny.hf("marian", layers=2, seed=4)
    with torch.no_grad():
        hf.final_logits_bias[0, 5] = 6.0  # token 5 would win every step unless it is banned
    hf.generation_config.bad_words_ids = [[5], [tiny.PAD]]
    hf.generation_config.forced_eos_token_id = tiny.EOS  # the last step must emit eos
    model = TextStudent(hf).eval()
    batch = tiny.batch(5, seed=1)
    lean = beam_search(model, batch["input_ids"], batch["attention_mask"], num_beams=3, max_new_tokens=6)
    assert 5 not in lean.sequences.tolist()[0] and all(
        row[length - 1] == tiny.EOS for row, length in zip(lean.sequences.tolist(), lean.lengths.tolist()))
    assert [row[:n].tolist() for row, n in zip(lean.sequences, lean.lengths.tolist())] == _transformers_reference(
        model, batch, num_beams=3, max_new_tokens=6)


def test_beam_search_falls_back_to_transformers_for_processors_it_does_not_implement(tiny: SimpleNamespace,
                                                                                    monkeypatch) -> None:
    import kd_plugins.text.generation as generation

    hf = tiny.hf("marian", layers=2)
    hf.generation_config.no_repeat_ngram_size = 2
    model = TextStudent(hf).eval()
    assert not generation.lean_beam_search_supported(generation._beam_generation_config(model, 3, 8, 1.0))
    hf.generation_config.bad_words_ids = [[3, 4]]  # a two-token bad word: also not implemented
    hf.generation_config.no_repeat_ngram_size = 0
    assert not generation.lean_beam_search_supported(generation._beam_generation_config(model, 3, 8, 1.0))
    hf.generation_config.no_repeat_ngram_size = 2

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the lean path must not run for this config")

    with pytest.raises(ValueError, match="'auto' or 'transformers'"):
        beam_search(model, tiny.batch(2)["input_ids"], implementation="lean")
    monkeypatch.setattr(generation, "_lean_beam_search", refuse)
    batch = tiny.batch(4)
    result = beam_search(model, batch["input_ids"], batch["attention_mask"], num_beams=3, max_new_tokens=8)
    for row, length in zip(result.sequences.tolist(), result.lengths.tolist()):
        tokens = row[:length]
        pairs = list(zip(tokens, tokens[1:]))
        assert len(pairs) == len(set(pairs))  # transformers' no-repeat-2-gram processor ran
