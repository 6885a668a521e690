"""ImitKD: the β-mixture really replaces data targets, the teacher's targets match a direct call, and the configured
objectives compare teacher and student on the mixed prefixes."""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

from kdcore.errors import KDUserError
from kd_plugins.text.generation import generate
from kd_plugins.text.imitation import ImitationConfig, ImitationKD
from kd_plugins.text.method import merge_rows
from kd_plugins.text.models import TextStudent


def make_method(tiny: SimpleNamespace, task: Any, total_steps: int = 100, objectives: list[Any] | None = None,
                **options: Any) -> ImitationKD:
    teacher, student = tiny.pair()
    if objectives is None:  # the plugin's defaults: forward KL (full), NLL on the teacher's argmax (preset hard)
        objectives = [tiny.objective("nll") if options.get("variant") == "hard"
                      else tiny.objective("forward_kl", fused=False)]
    method = ImitationKD(ImitationConfig(**options), task, teacher, student, objectives)
    method.on_train_start(total_steps)
    return method


def test_beta_follows_the_schedule_with_the_engines_total_steps(tiny: SimpleNamespace, fake_task: Any) -> None:
    method = make_method(tiny, fake_task, total_steps=400)
    assert method.beta(0) == 1.0
    assert method.beta(200) == pytest.approx(200 ** -0.5)
    assert method.beta(400) == pytest.approx(1 / 200)
    unstarted = ImitationKD(ImitationConfig(), fake_task, *tiny.pair(), [tiny.objective("forward_kl")])
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
    method = make_method(tiny, fake_task, variant=variant, schedule={"kind": "constant", "value": 0.5})
    output = method.training_step(tiny.batch(8), 0)
    assert torch.isfinite(output.loss) and output.loss.requires_grad
    output.loss.backward()
    assert all(p.grad is None for p in method.teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.student.parameters())
    assert {"beta", "replaced_fraction", "generated_length", "kd"} <= set(output.parts)
    assert output.parts["beta"] == 0.5 and output.parts["kd"] == pytest.approx(float(output.loss.detach()))


def test_hard_variant_is_nll_on_the_teachers_argmax(tiny: SimpleNamespace, fake_task: Any, objectives: Any) -> None:
    method = make_method(tiny, fake_task, variant="hard", schedule={"kind": "constant", "value": 0.5})
    batch = tiny.batch(8)
    torch.manual_seed(3)
    comparison = method.compare(batch, 0)
    torch.manual_seed(3)
    mixed = method.prepare(batch, 0)
    targets = method.hard_targets(mixed)
    assert torch.equal(comparison.batch["labels"], targets)
    assert comparison.teacher.logits is None  # nll asks nothing of the teacher: no one-hot teacher is built
    logits = method.text_student.hf_model(**mixed.batch).logits
    loss = method.objectives[0].objective(comparison.student, comparison.teacher, comparison.batch).loss
    torch.testing.assert_close(loss, objectives.token_nll(logits, targets))


def test_hard_variant_gives_divergences_a_one_hot_teacher(tiny: SimpleNamespace, fake_task: Any,
                                                          objectives: Any) -> None:
    # The hard variant with a divergence objective is not the full variant under another name: the teacher the
    # objective sees is its argmax decision, so forward KL to it is the NLL of the argmax tokens.
    options = {"variant": "hard", "schedule": {"kind": "constant", "value": 0.0}}
    batch = tiny.batch(6)
    losses = {}
    for name in ("nll", "forward_kl"):
        method = make_method(tiny, fake_task, objectives=[tiny.objective(name)], **options)
        torch.manual_seed(4)
        losses[name] = method.training_step(batch, 0).loss
    torch.testing.assert_close(losses["forward_kl"], losses["nll"], rtol=1e-5, atol=1e-6)
    full = make_method(tiny, fake_task, objectives=[tiny.objective("forward_kl")], variant="full",
                       schedule=options["schedule"])
    torch.manual_seed(4)
    assert abs(float(full.training_step(batch, 0).loss) - float(losses["nll"])) > 1e-3
    reverse = make_method(tiny, fake_task, objectives=[tiny.objective("reverse_kl")], **options)
    with pytest.raises(KDUserError, match="reverse_kl"):  # KL(p_S || one-hot) is infinite
        reverse.training_step(batch, 0)


def test_full_variant_loss_is_the_divergence_to_the_teacher_on_mixed_prefixes(tiny: SimpleNamespace, fake_task: Any,
                                                                              objectives: Any) -> None:
    method = make_method(tiny, fake_task, objectives=[tiny.objective("jsd", beta=0.3, fused=False)], variant="full",
                         schedule={"kind": "constant", "value": 0.0})
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

    with pytest.raises(ValidationError):  # the divergence is an objective now (objectives.kd.name)
        ImitationConfig(divergence="jsd")  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="variant"):
        ImitationConfig(variant="full", hard_data_targets="teacher")
    with pytest.raises(ValidationError):
        ImitationConfig(schedule={"kind": "exponential", "bas": 10})
    teacher, _ = tiny.pair()
    causal = TextStudent(AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "gpt2", vocab_size=tiny.VOCAB, n_embd=8, n_layer=1, n_head=2, bos_token_id=2, eos_token_id=tiny.EOS)))
    with pytest.raises(KDUserError, match="encoder-decoder"):
        ImitationKD(ImitationConfig(), fake_task, teacher, causal, [tiny.objective("forward_kl")])


def test_generation_cap_defaults_to_the_tasks_longest_training_target(tiny: SimpleNamespace, fake_task: Any) -> None:
    # No data config: the generic cap. A text task: its data.max_target_tokens (targets are truncated to it).
    assert make_method(tiny, fake_task).config.generation.max_new_tokens == 128
    task = SimpleNamespace(**vars(fake_task), data_config=SimpleNamespace(max_target_tokens=7))
    method = make_method(tiny, task)
    assert method.config.generation.max_new_tokens == 7
    long_targets = torch.full((2, 40), 5)
    assert method.config.generation.limit(long_targets) == 7  # not 2 x 40 + 5
    assert make_method(tiny, task, generation={"max_new_tokens": 30}).config.generation.max_new_tokens == 30


def test_imitkd_star_mixes_the_teachers_beam_outputs_not_the_data(tiny: SimpleNamespace, fake_task: Any,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from kd_plugins.text.baselines import SeqKDMethod
    from kd_plugins.text.imitation import ImitationKD as Plugin

    decoding = {"num_beams": 3, "max_new_tokens": 6, "max_length_ratio": None}
    method = make_method(tiny, fake_task, targets_from="teacher_outputs", teacher_outputs=decoding,
                         schedule={"kind": "constant", "value": 1.0})
    batch = tiny.batch(6)
    expected = SeqKDMethod.decode_teacher_sequences(method.text_teacher, method.config.teacher_outputs, batch)
    mixed = method.prepare(batch, 0)
    kept = [row[row != -100].tolist() for row in mixed.batch["labels"]]
    assert kept == expected and kept != [row[row != -100].tolist() for row in batch["labels"]]
    assert method.teacher_sequences is not None and method.teacher_sequences.teacher_calls == 1
    method.prepare(batch, 1)  # the second epoch reads them from the seq-kd cache
    assert method.teacher_sequences.teacher_calls == 1
    # The preset is the authors' ImitKD*: hard variant, beta base 2, beam 5 with fixed 100-token caps.
    preset = Plugin.presets["imitkd-star"]["method"]
    assert preset["schedule"]["base"] == 2.0 and preset["teacher_outputs"]["num_beams"] == 5
    assert preset["generation"] == {"max_new_tokens": 100, "max_length_ratio": None}
    with pytest.raises(ValueError, match="targets_from is 'data'"):
        ImitationConfig(teacher_outputs={"num_beams": 2})


def test_the_summarization_hard_preset_is_the_authors_cnndm_config() -> None:
    from kdcore.registry import Registry
    from kdcore.resolve import resolve_run

    config = resolve_run(Registry.discover(), task="summarization", plugin="imitation",
                         preset="summarization-hard").config
    method = ImitationConfig(**config.method)
    assert (method.variant, method.schedule.kind, method.schedule.base) == ("hard", "exponential", 10.0)
    assert (method.generation.strategy, method.generation.max_new_tokens, method.generation.max_length_ratio) == (
        "greedy", 99, None)
    assert config.objectives["kd"].name == "nll" and config.objectives["kd"].args == {"label_smoothing": 0.1}
