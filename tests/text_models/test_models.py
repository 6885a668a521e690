"""Text teachers/students: signals, the fused-path projection, factories and vocabulary checks."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from pydantic import ValidationError

from kdcore.errors import KDUserError
from kdcore.interfaces import BuildContext
from kdcore.signals import Signal, SignalRequest
from kd_plugins.text.models import (
    CausalLMFactory, Seq2SeqFactory, TextModelConfig, TextStudent, TextTeacher, check_vocab_compatible, marian_config,
)

ALL = SignalRequest(frozenset({Signal.LOGITS, Signal.FINAL_HIDDEN, Signal.HIDDEN_STATES}))


@pytest.mark.parametrize("model_type", ["marian", "bart", "t5"])
def test_final_hidden_times_output_weight_plus_bias_equals_model_logits(tiny: SimpleNamespace, model_type: str) -> None:
    hf = tiny.hf(model_type)
    if hasattr(hf, "final_logits_bias"):
        hf.final_logits_bias.normal_()  # zeros at init; a real bias makes the check meaningful
    if model_type == "t5":
        assert hf.config.scale_decoder_outputs  # tied embeddings: the d_model**-0.5 rescaling is active
    model = TextStudent(hf).eval()
    batch = tiny.batch(3)
    reference = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).logits
    signals = model.forward_signals(batch, ALL)
    rebuilt = signals.final_hidden @ signals.output_weight.T
    if signals.output_bias is not None:
        rebuilt = rebuilt + signals.output_bias
    torch.testing.assert_close(signals.logits, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rebuilt, reference, rtol=1e-5, atol=1e-5)
    assert signals.final_hidden.shape == (*batch["labels"].shape, hf.config.d_model)
    assert signals.output_weight.shape == (tiny.VOCAB, hf.config.d_model)
    assert len(signals.hidden_states) == 2  # embeddings + one decoder layer


def test_t5_without_the_scale_fold_would_be_wrong(tiny: SimpleNamespace) -> None:
    """Guards the fold itself: the raw LM-head weight does not reproduce T5's logits."""
    hf = tiny.hf("t5")
    model = TextStudent(hf).eval()
    batch = tiny.batch(2)
    signals = model.forward_signals(batch, ALL)
    raw = signals.final_hidden @ hf.get_output_embeddings().weight.T
    assert not torch.allclose(raw, signals.logits, atol=1e-4)


def test_final_hidden_alone_does_not_run_the_lm_head(tiny: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    model = TextStudent(tiny.hf("marian"))
    calls = []
    original = TextStudent.logits_from_hidden
    monkeypatch.setattr(TextStudent, "logits_from_hidden", lambda self, hidden: calls.append(1) or original(self, hidden))
    signals = model.forward_signals(tiny.batch(2), SignalRequest(frozenset({Signal.FINAL_HIDDEN})))
    assert calls == [] and signals.logits is None and signals.final_hidden is not None
    model.forward_signals(tiny.batch(2), SignalRequest(frozenset({Signal.LOGITS})))
    assert calls == [1]


def test_decoder_input_ids_override_the_shifted_labels(tiny: SimpleNamespace) -> None:
    model = TextStudent(tiny.hf("marian")).eval()
    batch = tiny.batch(2)
    request = SignalRequest(frozenset({Signal.LOGITS}))
    derived = model.forward_signals(batch, request).logits
    explicit = model.forward_signals({**batch, "decoder_input_ids": model.decoder_inputs_from_labels(batch["labels"])},
                                     request).logits
    other = model.forward_signals({**batch, "decoder_input_ids": torch.full_like(batch["labels"], 5)}, request).logits
    torch.testing.assert_close(derived, explicit)
    assert not torch.allclose(derived, other)


def test_teacher_signals_are_detached_and_frozen(tiny: SimpleNamespace) -> None:
    teacher = TextTeacher(tiny.hf("bart")).freeze()
    signals = teacher.signals(tiny.batch(2), ALL)
    assert not signals.logits.requires_grad and not signals.final_hidden.requires_grad
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.training


def test_causal_lm_logits_and_shifted_labels(tiny: SimpleNamespace) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "gpt2", vocab_size=tiny.VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=32, bos_token_id=2, eos_token_id=tiny.EOS)).eval()
    model = TextStudent(hf)
    input_ids = torch.randint(2, tiny.VOCAB, (2, 6))
    labels = input_ids.clone()
    labels[:, :2] = -100  # the prompt
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
    signals = model.forward_signals(batch, ALL)
    torch.testing.assert_close(signals.logits, hf(input_ids=input_ids).logits)
    torch.testing.assert_close(signals.final_hidden @ signals.output_weight.T, signals.logits, rtol=1e-5, atol=1e-5)
    aligned = model.target_labels(batch)
    assert aligned[:, :-1].tolist() == labels[:, 1:].tolist() and (aligned[:, -1] == -100).all()
    assert not model.is_encoder_decoder


def _context(tmp_path: Path, teacher: object = None, seed: int = 0) -> BuildContext:
    return BuildContext(task=SimpleNamespace(tokenizer=None), cache_dir=tmp_path, device=torch.device("cpu"),  # type: ignore[arg-type]
                        seed=seed, teacher=teacher)  # type: ignore[arg-type]


def test_factory_builds_a_seeded_student_from_a_config(tiny: SimpleNamespace, tmp_path: Path) -> None:
    config = TextModelConfig(config=marian_config(tiny.VOCAB, layers=(2, 2), d_model=32, heads=2, pad_token_id=tiny.PAD,
                                                  eos_token_id=tiny.EOS, decoder_start_token_id=tiny.PAD))
    teacher = Seq2SeqFactory().build(config, _context(tmp_path))
    student_a = Seq2SeqFactory().build(config, _context(tmp_path, teacher=teacher, seed=3))
    student_b = Seq2SeqFactory().build(config, _context(tmp_path, teacher=teacher, seed=3))
    student_c = Seq2SeqFactory().build(config, _context(tmp_path, teacher=teacher, seed=4))
    assert isinstance(teacher, TextTeacher) and isinstance(student_a, TextStudent)
    assert student_a.hf_model.config.encoder_layers == 2 and student_a.hf_model.config.d_model == 32
    weight = "hf_model.model.shared.weight"
    assert torch.equal(student_a.state_dict()[weight], student_b.state_dict()[weight])
    assert not torch.equal(student_a.state_dict()[weight], student_c.state_dict()[weight])


def test_factory_loads_a_local_directory_offline(tiny: SimpleNamespace, tmp_path: Path) -> None:
    hf = tiny.hf("bart")
    hf.save_pretrained(tmp_path / "bart")
    model = Seq2SeqFactory().build(TextModelConfig(source=str(tmp_path / "bart")), _context(tmp_path))
    batch = tiny.batch(2)
    request = SignalRequest(frozenset({Signal.LOGITS}))
    torch.testing.assert_close(model.forward_signals(batch, request).logits,
                               TextStudent(hf).eval().forward_signals(batch, request).logits)
    with pytest.raises(KDUserError, match="missing-model"):
        Seq2SeqFactory().build(TextModelConfig(source=str(tmp_path / "missing-model")), _context(tmp_path))


def test_factory_config_errors(tiny: SimpleNamespace, tmp_path: Path) -> None:
    with pytest.raises(ValidationError):
        TextModelConfig(source="x", config={"model_type": "marian"})
    with pytest.raises(ValidationError):
        TextModelConfig(config={"d_model": 8})
    with pytest.raises(ValidationError):
        TextModelConfig(source="x", sauce="y")  # type: ignore[call-arg]
    with pytest.raises(KDUserError, match="vocab_size"):
        Seq2SeqFactory().build(TextModelConfig(config={"model_type": "marian"}), _context(tmp_path))
    with pytest.raises(KDUserError, match="causal-lm"):
        Seq2SeqFactory().build(TextModelConfig(config={"model_type": "gpt2", "vocab_size": tiny.VOCAB, "n_embd": 8,
                                                       "n_layer": 1, "n_head": 2}), _context(tmp_path))
    with pytest.raises(KDUserError, match="seq2seq"):
        CausalLMFactory().build(TextModelConfig(config=tiny.config("marian")), _context(tmp_path))


def test_vocabulary_mismatch_is_a_user_error(tiny: SimpleNamespace) -> None:
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    values = tiny.config("marian")
    values.pop("model_type")
    values["vocab_size"] = tiny.VOCAB + 8
    bigger = TextStudent(AutoModelForSeq2SeqLM.from_config(AutoConfig.for_model("marian", **values)))
    teacher = TextTeacher(tiny.hf("marian"))
    with pytest.raises(KDUserError, match=f"{tiny.VOCAB} tokens, the student {tiny.VOCAB + 8}"):
        check_vocab_compatible(teacher, bigger, where="plugin 'imitation'")
    check_vocab_compatible(teacher, bigger, cross_tokenizer=True)  # cross-tokenizer objectives align vocabularies
    check_vocab_compatible(teacher, TextStudent(tiny.hf("marian", seed=5)))


def test_student_weights_round_trip_through_the_engines_checkpoint_format(tiny: SimpleNamespace,
                                                                          tmp_path: Path) -> None:
    from kdcore.checkpoint import load_weights, save_weights

    student = TextStudent(tiny.hf("marian"))  # tied embeddings / LM head share storage
    save_weights(student, tmp_path / "student.safetensors")
    restored = TextStudent(tiny.hf("marian", seed=9))
    load_weights(restored, tmp_path / "student.safetensors")
    batch = tiny.batch(2)
    request = SignalRequest(frozenset({Signal.LOGITS}))
    torch.testing.assert_close(restored.eval().forward_signals(batch, request).logits,
                               student.eval().forward_signals(batch, request).logits)
    restored_hf = restored.hf_model
    assert restored_hf.get_output_embeddings().weight.data_ptr() == restored_hf.get_input_embeddings().weight.data_ptr()


def test_encoder_spread_separates_a_reading_encoder_from_a_collapsed_one(tiny: SimpleNamespace) -> None:
    from kd_plugins.text.models import COLLAPSED_ENCODER_SPREAD, encoder_spread

    model = tiny.hf("marian").train()
    input_ids = torch.randint(2, 32, (4, 9))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, 5:] = 0
    assert encoder_spread(model, input_ids, attention_mask) > 0.1
    assert model.training  # restored
    # What the summarization teacher's encoder had become: one output vector whatever the input. A last layer
    # norm with zero gain outputs its bias at every position.
    last_norm = model.get_encoder().layers[-1].final_layer_norm
    with torch.no_grad():
        last_norm.weight.zero_()
        last_norm.bias.normal_()
    assert encoder_spread(model, input_ids, attention_mask) < COLLAPSED_ENCODER_SPREAD


@pytest.mark.parametrize("model_type", ["marian", "bart", "mbart", "t5"])
def test_decoding_starts_the_decoder_as_training_does(tiny: SimpleNamespace, tmp_path: Path, model_type: str) -> None:
    # mBART's label shift starts each row with its eos, whatever decoder_start_token_id says; decoding from
    # pad gave a trained mBART student ROUGE 0.
    model = Seq2SeqFactory().build(TextModelConfig(config=tiny.config(model_type)), _context(tmp_path))
    labels = torch.tensor([[5, 6, tiny.EOS, -100], [7, tiny.EOS, -100, -100]])
    decoder_inputs = model.decoder_inputs_from_labels(labels)
    assert decoder_inputs[:, 0].tolist() == [model.decoder_start_token_id] * 2
    if model_type == "mbart":
        assert model.decoder_start_token_id == tiny.EOS
