"""ImitKD: the β-mixture really replaces data targets, and the teacher's targets match a direct call."""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

from kdcore.errors import KDUserError
from kd_plugins.text.generation import generate
from kd_plugins.text.imitation import ImitationConfig, ImitationKD, merge_rows
from kd_plugins.text.models import TextStudent


def make_method(tiny: SimpleNamespace, task: Any, total_steps: int = 100, **options: Any) -> ImitationKD:
    teacher, student = tiny.pair()
    method = ImitationKD(ImitationConfig(**options), task, teacher, student, [])
    method.on_train_start(total_steps)
    return method


def test_beta_follows_the_schedule_with_the_engines_total_steps(tiny: SimpleNamespace, fake_task: Any) -> None:
    method = make_method(tiny, fake_task, total_steps=400)
    assert method.beta(0) == 1.0
    assert method.beta(200) == pytest.approx(200 ** -0.5)
    assert method.beta(400) == pytest.approx(1 / 200)
    unstarted = ImitationKD(ImitationConfig(), fake_task, *tiny.pair(), [])
    with pytest.raises(ValueError, match="total number of training steps"):
        unstarted.beta(1)


@pytest.mark.parametrize("beta", [0.2, 0.7])
def test_student_outputs_replace_data_targets_at_rate_one_minus_beta(tiny: SimpleNamespace, fake_task: Any,
                                                                     beta: float) -> None:
    method = make_method(tiny, fake_task, schedule={"kind": "constant", "value": beta},
                         generation={"max_new_tokens": 7, "max_length_ratio": None})
    method.generator = torch.Generator().manual_seed(0)
    replaced_total, sequences = 0, 0
    for step in range(12):
        batch = tiny.batch(50, seed=step)
        mixed = method.prepare(batch, step)
        labels = mixed.batch["labels"]
        expected_student = generate(method.text_student, batch["input_ids"], batch["attention_mask"],
                                    max_new_tokens=7).labels()
        for row in range(50):
            data_row = batch["labels"][row][batch["labels"][row] != -100].tolist()
            mixed_row = labels[row][labels[row] != -100].tolist()
            student_row = expected_student[row][expected_student[row] != -100].tolist()
            if mixed.replaced[row]:
                assert mixed_row == student_row  # really the student's own greedy output
            else:
                assert mixed_row == data_row
        assert torch.equal(mixed.batch["input_ids"], batch["input_ids"])
        replaced_total += int(mixed.replaced.sum())
        sequences += 50
    rate = replaced_total / sequences
    # Binomial std over 600 draws is at most 0.02: 0.06 is three of them.
    assert abs(rate - (1 - beta)) < 0.06, rate


def test_no_generation_when_beta_is_one(tiny: SimpleNamespace, fake_task: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    method = make_method(tiny, fake_task, schedule={"kind": "constant", "value": 1.0})
    monkeypatch.setattr("kd_plugins.text.imitation.generate", lambda *a, **k: pytest.fail("student generated"))
    batch = tiny.batch(8)
    mixed = method.prepare(batch, 0)
    assert not mixed.replaced.any() and torch.equal(mixed.batch["labels"], batch["labels"])


def test_teacher_targets_on_student_prefixes_match_a_direct_teacher_call(tiny: SimpleNamespace,
                                                                         fake_task: Any) -> None:
    method = make_method(tiny, fake_task, variant="hard", schedule={"kind": "constant", "value": 0.5})
    method.generator = torch.Generator().manual_seed(1)
    batch = tiny.batch(16)
    mixed = method.prepare(batch, 0)
    assert mixed.replaced.any() and not mixed.replaced.all()
    targets = method.hard_targets(mixed)
    labels = mixed.batch["labels"]
    teacher_hf = method.text_teacher.hf_model
    for row in range(16):
        if not mixed.replaced[row]:
            assert torch.equal(targets[row], labels[row])  # authors' default: data rows keep data targets
            continue
        length = int((labels[row] != -100).sum())
        prefix = labels[row, :length]
        decoder_input_ids = torch.cat([torch.tensor([teacher_hf.config.decoder_start_token_id]), prefix[:-1]])
        with torch.no_grad():
            direct = teacher_hf(input_ids=batch["input_ids"][row:row + 1][:, batch["attention_mask"][row].bool()],
                                decoder_input_ids=decoder_input_ids[None]).logits[0]
        assert targets[row, :length].tolist() == direct.argmax(-1).tolist()
        assert (targets[row, length:] == -100).all()


def test_hard_targets_can_come_from_the_teacher_on_data_rows_too(tiny: SimpleNamespace, fake_task: Any) -> None:
    method = make_method(tiny, fake_task, variant="hard", hard_data_targets="teacher",
                         schedule={"kind": "constant", "value": 1.0})
    batch = tiny.batch(6)
    mixed = method.prepare(batch, 0)
    targets = method.hard_targets(mixed)
    direct = method.text_teacher.hf_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                          labels=batch["labels"]).logits.argmax(-1)
    kept = batch["labels"] != -100
    assert torch.equal(targets[kept], direct[kept]) and (targets[~kept] == -100).all()


def test_merge_rows_pads_to_the_wider_of_data_and_generation() -> None:
    data = torch.tensor([[5, 1, -100], [6, 7, 1]])
    merged = merge_rows(data, torch.tensor([0]), torch.tensor([[9, 9, 9, 1]]))
    assert merged.tolist() == [[9, 9, 9, 1], [6, 7, 1, -100]]


@pytest.mark.parametrize("variant", ["hard", "full"])
def test_training_step_trains_only_the_student(tiny: SimpleNamespace, fake_task: Any, objectives: Any,
                                               variant: str) -> None:
    method = make_method(tiny, fake_task, variant=variant, schedule={"kind": "constant", "value": 0.5}, fused=False)
    output = method.training_step(tiny.batch(8), 0)
    assert torch.isfinite(output.loss) and output.loss.requires_grad
    output.loss.backward()
    assert all(p.grad is None for p in method.teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.student.parameters())
    assert {"beta", "replaced_fraction", "loss"} <= set(output.parts)
    assert output.parts["beta"] == 0.5


def test_full_variant_loss_is_the_divergence_to_the_teacher_on_mixed_prefixes(tiny: SimpleNamespace, fake_task: Any,
                                                                              objectives: Any) -> None:
    method = make_method(tiny, fake_task, variant="full", divergence="jsd", beta=0.3,
                         schedule={"kind": "constant", "value": 0.0}, fused=False)
    batch = tiny.batch(6)
    torch.manual_seed(5)
    loss = method.training_step(batch, 0).loss
    torch.manual_seed(5)
    mixed = method.prepare(batch, 0)
    assert mixed.replaced.all()
    direct_teacher = method.text_teacher.hf_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                                  labels=mixed.batch["labels"]).logits
    student_logits = method.text_student.hf_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                                  labels=mixed.batch["labels"]).logits
    expected = objectives.divergence(student_logits, direct_teacher, "jsd", beta=0.3, labels=mixed.batch["labels"])
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_config_and_model_errors(tiny: SimpleNamespace, fake_task: Any) -> None:
    from pydantic import ValidationError
    from transformers import AutoConfig, AutoModelForCausalLM

    with pytest.raises(ValidationError):
        ImitationConfig(divergence="kl")  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        ImitationConfig(schedule={"kind": "exponential", "bas": 10})
    teacher, _ = tiny.pair()
    causal = TextStudent(AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "gpt2", vocab_size=tiny.VOCAB, n_embd=8, n_layer=1, n_head=2, bos_token_id=2, eos_token_id=tiny.EOS)))
    with pytest.raises(KDUserError, match="encoder-decoder"):
        ImitationKD(ImitationConfig(), fake_task, teacher, causal, [])


def test_generation_cap_defaults_to_the_tasks_longest_training_target(tiny: SimpleNamespace, fake_task: Any) -> None:
    # No data config: the generic cap. A text task: its data.max_target_tokens (targets are truncated to it).
    assert make_method(tiny, fake_task).config.generation.max_new_tokens == 128
    task = SimpleNamespace(**vars(fake_task), data_config=SimpleNamespace(max_target_tokens=7))
    method = make_method(tiny, task)
    assert method.config.generation.max_new_tokens == 7
    long_targets = torch.full((2, 40), 5)
    assert method.config.generation.limit(long_targets) == 7  # not 2 x 40 + 5
    assert make_method(tiny, task, generation={"max_new_tokens": 30}).config.generation.max_new_tokens == 30
