"""Baselines: scratch, word-KD, seq-KD (teacher outputs generated once, cached, reused)."""
from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from kdcore.errors import KDUserError
from kd_plugins.text.baselines import (
    ScratchConfig, ScratchMethod, SeqKDConfig, SeqKDMethod, WordKDConfig, WordKDMethod,
)
from kd_plugins.text.generation import beam_search
from kd_plugins.text.imitation import ImitationConfig, ImitationKD


def count_teacher_calls(method: Any) -> list[int]:
    calls: list[int] = []
    # The encoder runs once per teacher call, whichever path decodes (beam search skips the model's forward).
    method.text_teacher.hf_model.get_encoder().register_forward_hook(lambda *args: calls.append(1))
    return calls


def test_seq_kd_targets_are_the_teachers_beam_outputs(tiny: SimpleNamespace, fake_task: Any) -> None:
    teacher, student = tiny.pair()
    method = SeqKDMethod(SeqKDConfig(num_beams=3, max_new_tokens=8, max_length_ratio=None), fake_task, teacher,
                         student, [])
    batch = tiny.batch(5)
    targets, hits = method.teacher_targets(batch)
    expected = beam_search(teacher, batch["input_ids"], batch["attention_mask"], num_beams=3, max_new_tokens=8)
    assert hits == 0
    assert targets.masked_fill(targets == -100, 0)[:, :expected.sequences.shape[1]].tolist() == \
        expected.labels().masked_fill(expected.labels() == -100, 0).tolist()
    assert ((targets != -100).sum(dim=1) == expected.lengths).all()


def test_seq_kd_cache_is_reused_without_calling_the_teacher(tiny: SimpleNamespace, fake_task: Any) -> None:
    teacher, student = tiny.pair()
    config = SeqKDConfig(num_beams=2, max_new_tokens=6)
    first = SeqKDMethod(config, fake_task, teacher, student, [])
    calls = count_teacher_calls(first)
    batch = tiny.batch(6)
    first_targets, hits = first.teacher_targets(batch)
    assert hits == 0 and first.teacher_calls == 1 and calls
    files = sorted(p.name for p in first.cache.directory.iterdir())
    assert "manifest.json" in files and any(name.startswith("chunk-") for name in files)
    assert not any(name.endswith(".tmp") for name in files)

    # A new run (fresh method object, same cache directory and teacher): no teacher call at all.
    second = SeqKDMethod(config, fake_task, teacher, student, [])
    calls.clear()
    second_targets, hits = second.teacher_targets(batch)
    assert hits == 6 and second.teacher_calls == 0 and calls == []
    assert torch.equal(first_targets, second_targets)

    # One changed source under a known id is regenerated; the others still come from the cache.
    changed = {**batch, "input_ids": batch["input_ids"].clone()}
    changed["input_ids"][2, 0] = (changed["input_ids"][2, 0] + 1) % tiny.VOCAB or 2
    _, hits = second.teacher_targets(changed)
    assert hits == 5 and second.teacher_calls == 1


def test_seq_kd_cache_is_keyed_by_teacher_weights(tiny: SimpleNamespace, fake_task: Any) -> None:
    teacher, student = tiny.pair()
    other_teacher, _ = tiny.pair(seed=10)
    config = SeqKDConfig(num_beams=2, max_new_tokens=6)
    SeqKDMethod(config, fake_task, teacher, student, []).teacher_targets(tiny.batch(4))
    other = SeqKDMethod(config, fake_task, other_teacher, student, [])
    _, hits = other.teacher_targets(tiny.batch(4))
    assert hits == 0 and other.teacher_calls == 1
    manifest = json.loads((other.cache.directory / "manifest.json").read_text())
    assert manifest["teacher_sha256"] == other_teacher.fingerprint() != teacher.fingerprint()


def test_seq_kd_needs_example_ids(tiny: SimpleNamespace, fake_task: Any) -> None:
    method = SeqKDMethod(SeqKDConfig(), fake_task, *tiny.pair(), [])
    batch = tiny.batch(2)
    del batch["ids"]
    with pytest.raises(KDUserError, match="'ids'"):
        method.teacher_targets(batch)


def test_seq_kd_training_step(tiny: SimpleNamespace, fake_task: Any, objectives: Any) -> None:
    teacher, student = tiny.pair()
    method = SeqKDMethod(SeqKDConfig(num_beams=2, max_new_tokens=6), fake_task, teacher, student, [])
    batch = tiny.batch(4)
    output = method.training_step(batch, 0)
    targets, _ = method.teacher_targets(batch)
    logits = student.hf_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=targets).logits
    torch.testing.assert_close(output.loss, objectives.token_nll(logits, targets))
    assert method.training_step(batch, 1).parts["cache_hit_fraction"] == 1.0


def test_scratch_is_nll_on_the_data(tiny: SimpleNamespace, fake_task: Any, objectives: Any) -> None:
    teacher, student = tiny.pair()
    method = ScratchMethod(ScratchConfig(), fake_task, teacher, student, [])
    batch = tiny.batch(4)
    calls = count_teacher_calls(SimpleNamespace(text_teacher=teacher))
    output = method.training_step(batch, 0)
    logits = student.hf_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              labels=batch["labels"]).logits
    manual = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["labels"], ignore_index=-100)
    torch.testing.assert_close(output.loss, manual)
    assert calls == []


def test_word_kd_is_the_divergence_on_data_prefixes_plus_weighted_nll(tiny: SimpleNamespace, fake_task: Any,
                                                                      objectives: Any) -> None:
    teacher, student = tiny.pair()
    method = WordKDMethod(WordKDConfig(divergence="reverse_kl", nll_weight=0.5, kd_weight=2.0, temperature=2.0,
                                       fused=False), fake_task, teacher, student, [])
    batch = tiny.batch(4)
    output = method.training_step(batch, 0)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": batch["labels"]}
    teacher_logits = teacher.hf_model(**inputs).logits
    student_logits = student.hf_model(**inputs).logits
    expected = 2.0 * objectives.divergence(student_logits, teacher_logits, "reverse_kl", temperature=2.0,
                                           labels=batch["labels"]) \
        + 0.5 * objectives.token_nll(student_logits, batch["labels"])
    torch.testing.assert_close(output.loss, expected)
    with pytest.raises(KDUserError, match="both 0"):
        WordKDMethod(WordKDConfig(kd_weight=0.0), fake_task, teacher, student, [])


def _loss_and_grads(method: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    method.student.zero_grad()
    torch.manual_seed(7)
    loss = method.training_step(batch, 0).loss
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in method.student.parameters() if p.grad is not None]


@pytest.mark.parametrize("kind", ["forward_kl", "jsd"])
def test_fused_path_equals_dense_path(tiny: SimpleNamespace, fake_task: Any, objectives: Any, kind: str) -> None:
    pytest.importorskip("kdcore.fused")
    teacher, student = tiny.pair()
    with torch.no_grad():
        student.hf_model.final_logits_bias.normal_()  # exercise the bias on the fused path
    batch = tiny.batch(6)
    for build in (
        lambda fused: WordKDMethod(WordKDConfig(divergence=kind, fused=fused, nll_weight=0.3), fake_task, teacher,
                                   student, []),
        lambda fused: ImitationKD(ImitationConfig(divergence=kind, fused=fused, schedule={"kind": "constant",
                                                                                          "value": 0.5}),
                                  fake_task, teacher, student, []),
    ):
        dense_loss, dense_grads = _loss_and_grads(build(False), batch)
        fused_loss, fused_grads = _loss_and_grads(build(True), batch)
        torch.testing.assert_close(fused_loss, dense_loss, rtol=1e-5, atol=1e-6)
        assert len(fused_grads) == len(dense_grads)
        for fused_grad, dense_grad in zip(fused_grads, dense_grads):
            torch.testing.assert_close(fused_grad, dense_grad, rtol=1e-4, atol=1e-6)
