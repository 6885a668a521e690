"""Baselines: scratch, word-KD, seq-KD (teacher outputs generated once, cached, reused), and how text methods hand
the objectives their signals (the LM head runs only when an objective cannot do without logits)."""
from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from kdcore.errors import KDUserError
from kdcore.interfaces import EmptyConfig
from kdcore.signals import Signal, request
from kd_plugins.text.baselines import ScratchMethod, SeqKDConfig, SeqKDMethod, WordKDMethod
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
                         student, [tiny.objective("nll")])
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
    first = SeqKDMethod(config, fake_task, teacher, student, [tiny.objective("nll")])
    calls = count_teacher_calls(first)
    batch = tiny.batch(6)
    first_targets, hits = first.teacher_targets(batch)
    assert hits == 0 and first.teacher_calls == 1 and calls
    files = sorted(p.name for p in first.cache.directory.iterdir())
    assert "kd-cache.json" in files and any(name.startswith("shard-") for name in files)
    assert not any(name.endswith(".tmp") for name in files)

    # A new run (fresh method object, same cache directory and teacher): no teacher call at all.
    second = SeqKDMethod(config, fake_task, teacher, student, [tiny.objective("nll")])
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
    SeqKDMethod(config, fake_task, teacher, student, [tiny.objective("nll")]).teacher_targets(tiny.batch(4))
    other = SeqKDMethod(config, fake_task, other_teacher, student, [tiny.objective("nll")])
    _, hits = other.teacher_targets(tiny.batch(4))
    assert hits == 0 and other.teacher_calls == 1
    manifest = json.loads((other.cache.directory / "kd-cache.json").read_text())["built_from"]
    assert manifest["teacher_sha256"] == other_teacher.fingerprint() != teacher.fingerprint()
    # one digest for a teacher's weights: provenance.json and a teacher store record the same one
    from kdcore.provenance import weights_sha256
    from kdcore.teacher_store import teacher_fingerprint

    assert other_teacher.fingerprint() == weights_sha256(other_teacher) == teacher_fingerprint(other_teacher)


def test_seq_kd_needs_example_ids(tiny: SimpleNamespace, fake_task: Any) -> None:
    method = SeqKDMethod(SeqKDConfig(), fake_task, *tiny.pair(), [tiny.objective("nll")])
    batch = tiny.batch(2)
    del batch["ids"]
    with pytest.raises(KDUserError, match="'ids'"):
        method.teacher_targets(batch)


def test_seq_kd_training_step(tiny: SimpleNamespace, fake_task: Any, objectives: Any) -> None:
    teacher, student = tiny.pair()
    method = SeqKDMethod(SeqKDConfig(num_beams=2, max_new_tokens=6), fake_task, teacher, student,
                         [tiny.objective("nll")])
    batch = tiny.batch(4)
    output = method.training_step(batch, 0)
    targets, _ = method.teacher_targets(batch)
    logits = student.hf_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=targets).logits
    torch.testing.assert_close(output.loss, objectives.token_nll(logits, targets))
    calls = count_teacher_calls(method)
    assert method.training_step(batch, 1).parts["cache_hit_fraction"] == 1.0
    assert calls == []  # cached targets and an objective that asks nothing of the teacher: no teacher forward


def test_seq_kd_with_a_divergence_compares_both_models_on_the_teacher_outputs(tiny: SimpleNamespace, fake_task: Any,
                                                                             objectives: Any) -> None:
    teacher, student = tiny.pair()
    method = SeqKDMethod(SeqKDConfig(num_beams=2, max_new_tokens=6), fake_task, teacher, student,
                         [tiny.objective("reverse_kl", fused=False)])
    batch = tiny.batch(4)
    output = method.training_step(batch, 0)
    targets, _ = method.teacher_targets(batch)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": targets}
    expected = objectives.divergence(student.hf_model(**inputs).logits, teacher.hf_model(**inputs).logits,
                                     "reverse_kl", labels=targets)
    torch.testing.assert_close(output.loss, expected)
    assert output.parts["kd"] == pytest.approx(float(expected.detach()))


def test_scratch_is_nll_on_the_data(tiny: SimpleNamespace, fake_task: Any, objectives: Any) -> None:
    teacher, student = tiny.pair()
    method = ScratchMethod(EmptyConfig(), fake_task, teacher, student, [tiny.objective("nll", label="nll")])
    batch = tiny.batch(4)
    calls = count_teacher_calls(SimpleNamespace(text_teacher=teacher))
    output = method.training_step(batch, 0)
    logits = student.hf_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              labels=batch["labels"]).logits
    manual = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["labels"], ignore_index=-100)
    torch.testing.assert_close(output.loss, manual)
    assert calls == [] and set(output.parts) == {"nll", "nll/positions"}


def test_word_kd_is_the_divergence_on_data_prefixes_plus_weighted_nll(tiny: SimpleNamespace, fake_task: Any,
                                                                      objectives: Any) -> None:
    teacher, student = tiny.pair()
    method = WordKDMethod(EmptyConfig(), fake_task, teacher, student,
                          [tiny.objective("reverse_kl", weight=2.0, temperature=2.0, fused=False),
                           tiny.objective("nll", label="nll", weight=0.5)])
    batch = tiny.batch(4)
    output = method.training_step(batch, 0)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": batch["labels"]}
    teacher_logits = teacher.hf_model(**inputs).logits
    student_logits = student.hf_model(**inputs).logits
    expected = 2.0 * objectives.divergence(student_logits, teacher_logits, "reverse_kl", temperature=2.0,
                                           labels=batch["labels"]) \
        + 0.5 * objectives.token_nll(student_logits, batch["labels"])
    torch.testing.assert_close(output.loss, expected)


def test_the_lm_head_runs_only_for_objectives_that_need_logits(tiny: SimpleNamespace, fake_task: Any) -> None:
    logits_only, with_hidden = request(Signal.LOGITS), request(Signal.LOGITS, Signal.FINAL_HIDDEN)
    teacher, student = tiny.pair()
    batch = tiny.batch(4)
    kd_only = WordKDMethod(EmptyConfig(), fake_task, teacher, student, [tiny.objective("forward_kl")])
    merge = kd_only.merge_requests
    assert merge([with_hidden]) == request(Signal.FINAL_HIDDEN)
    assert merge([with_hidden, logits_only]) == with_hidden
    assert merge([logits_only]) == logits_only and merge([]) == request()
    comparison = kd_only.compare(batch, 0)
    # A fused-capable objective alone: no (B, T, V) logits from either model, only final hidden states + heads.
    assert comparison.student.logits is None and comparison.teacher.logits is None
    assert comparison.student.final_hidden is not None and comparison.teacher.output_weight is not None
    with_nll = WordKDMethod(EmptyConfig(), fake_task, teacher, student,
                            [tiny.objective("forward_kl"), tiny.objective("nll", label="nll")])
    comparison = with_nll.compare(batch, 0)
    assert comparison.student.logits is not None and comparison.teacher.logits is None


def test_text_methods_refuse_other_models(tiny: SimpleNamespace, fake_task: Any) -> None:
    teacher, _ = tiny.pair()
    with pytest.raises(KDUserError, match="text teacher and student"):
        WordKDMethod(EmptyConfig(), fake_task, teacher, torch.nn.Linear(2, 2), [tiny.objective("forward_kl")])


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
        lambda fused: WordKDMethod(EmptyConfig(), fake_task, teacher, student,
                                   [tiny.objective(kind, fused=fused), tiny.objective("nll", label="nll", weight=0.3)]),
        lambda fused: ImitationKD(ImitationConfig(schedule={"kind": "constant", "value": 0.5}), fake_task, teacher,
                                  student, [tiny.objective(kind, fused=fused)]),
    ):
        dense_loss, dense_grads = _loss_and_grads(build(False), batch)
        fused_loss, fused_grads = _loss_and_grads(build(True), batch)
        torch.testing.assert_close(fused_loss, dense_loss, rtol=1e-5, atol=1e-6)
        assert len(fused_grads) == len(dense_grads)
        for fused_grad, dense_grad in zip(fused_grads, dense_grads):
            torch.testing.assert_close(fused_grad, dense_grad, rtol=1e-4, atol=1e-6)
