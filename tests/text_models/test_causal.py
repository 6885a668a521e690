"""Decoder-only (causal LM) students: left-padded generation and ImitKD on prompts."""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

from kd_plugins.text.generation import generate
from kd_plugins.text.imitation import ImitationConfig, ImitationKD
from kd_plugins.text.models import TextStudent, TextTeacher


def test_causal_generation_cache_padding_and_hugging_face_agree(tiny: SimpleNamespace) -> None:
    hf = tiny.causal(layers=2)
    model = TextStudent(hf)
    prompts = torch.randint(2, tiny.VOCAB, (3, 5), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(prompts)
    prompts[1, :2], mask[1, :2] = tiny.PAD, 0  # left padding
    cached = generate(model, prompts, mask, max_new_tokens=6)
    uncached = generate(model, prompts, mask, max_new_tokens=6, use_cache=False)
    alone = generate(model, prompts[1:2, 2:], mask[1:2, 2:], max_new_tokens=6)
    reference = hf.generate(input_ids=prompts, attention_mask=mask, max_new_tokens=6, do_sample=False)[:, 5:]
    assert torch.equal(cached.sequences, uncached.sequences)
    assert torch.equal(cached.sequences[1], alone.sequences[0])  # padding does not change a row's output
    # Hugging Face does not suppress the pad token; compare with the same setting.
    unsuppressed = generate(model, prompts, mask, max_new_tokens=6, suppress_pad=False)
    for row, length in enumerate(unsuppressed.lengths.tolist()):
        assert unsuppressed.sequences[row, :length].tolist() == reference[row, :length].tolist()


def causal_method(tiny: SimpleNamespace, task: Any, **options: Any) -> ImitationKD:
    teacher = TextTeacher(tiny.causal(seed=1, layers=2)).freeze()
    student = TextStudent(tiny.causal(seed=0))
    objective = tiny.objective("nll") if options.get("variant") == "hard" else tiny.objective("forward_kl", fused=False)
    method = ImitationKD(ImitationConfig(**options), task, teacher, student, [objective])
    method.on_train_start(10)
    return method


def test_causal_imitation_replaces_targets_by_continuations_of_the_prompt(tiny: SimpleNamespace,
                                                                          fake_task: Any) -> None:
    method = causal_method(tiny, fake_task, variant="hard", schedule={"kind": "constant", "value": 0.5},
                           generation={"max_new_tokens": 5, "max_length_ratio": None})
    method.generator = torch.Generator().manual_seed(3)
    batch = tiny.causal_batch(10)
    mixed = method.prepare(batch, 0)
    assert mixed.replaced.any() and not mixed.replaced.all()
    targets = method.hard_targets(mixed)
    for row in range(10):
        data_tokens = batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()
        data_labels = batch["labels"][row][batch["attention_mask"][row].bool()].tolist()
        prompt_length = next(i for i, label in enumerate(data_labels) if label != -100)
        mask = mixed.batch["attention_mask"][row].bool()
        tokens, labels = mixed.batch["input_ids"][row][mask].tolist(), mixed.batch["labels"][row][mask].tolist()
        if not mixed.replaced[row]:
            assert tokens == data_tokens and labels == data_labels
            continue
        prompt = data_tokens[:prompt_length]
        continuation = generate(method.text_student, torch.tensor([prompt]), max_new_tokens=5).to_lists()[0]
        assert tokens == prompt + continuation
        assert labels == [-100] * prompt_length + continuation
        # Teacher targets: argmax of a direct teacher call, at the positions that predict the continuation.
        with torch.no_grad():
            direct = method.text_teacher.hf_model(input_ids=torch.tensor([tokens])).logits[0].argmax(-1)
        predicting = range(prompt_length - 1, len(tokens) - 1)
        assert [int(targets[row, i]) for i in predicting] == [int(direct[i]) for i in predicting]
        assert all(int(targets[row, i]) == -100 for i in range(len(tokens)) if i not in predicting)


@pytest.mark.parametrize("variant", ["hard", "full"])
def test_causal_imitation_training_step(tiny: SimpleNamespace, fake_task: Any, objectives: Any, variant: str) -> None:
    method = causal_method(tiny, fake_task, variant=variant, schedule={"kind": "constant", "value": 0.3})
    batch = tiny.causal_batch(6)
    comparison = method.compare(batch, 0)
    # The objectives read labels aligned with the logits (shifted), not the model batch's labels.
    model_labels = comparison.batch["input_ids"]  # the rebuilt rows' tokens
    assert comparison.batch["labels"].shape == model_labels.shape
    assert (comparison.batch["labels"][:, -1] == -100).all()
    output = method.training_step(batch, 0)
    output.loss.backward()
    assert torch.isfinite(output.loss)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.student.parameters())
    assert all(p.grad is None for p in method.teacher.parameters())
