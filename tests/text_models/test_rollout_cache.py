"""The student's rollouts (ImitKD's generated targets) with the decoder stack called directly give the tokens of the
model-forward loop and of re-reading the whole prefix every step: greedy and top-k sampled, on real sentences (the
committed wmt sample, tokenised with a BPE tokenizer trained on it), with the same end-of-sequence, padding and
length-cap behaviour; and the rollout stays outside the gradient, which comes only from the teacher-forced scoring."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from kd_plugins.text.generation import Generated, generate

SAMPLE = Path(__file__).parents[1] / "text_tasks" / "data" / "ha-en-de-sample.tsv"
ROWS = 24
LONGEST = 20
TRAIN_STEPS = 20


@pytest.fixture(scope="module")
def sentences() -> SimpleNamespace:
    """``ROWS`` English sources of mixed lengths (at most ``LONGEST`` tokens, to keep the test fast) from the sample,
    padded, and their German targets (-100 padded)."""
    from kd_tasks.text.tokenizer import train_bpe_tokenizer
    from kdcore.padding import pad_rows

    pairs = [line.split("\t") for line in SAMPLE.read_text(encoding="utf-8").splitlines()]
    tokenizer = train_bpe_tokenizer([text for pair in pairs for text in pair], 400)
    sources = tokenizer([source for source, _ in pairs])["input_ids"]
    targets = tokenizer(text_target=[target for _, target in pairs])["input_ids"]
    short = [i for i in range(len(pairs)) if max(len(sources[i]), len(targets[i])) <= LONGEST][:ROWS]
    assert len({len(sources[i]) for i in short}) > 5  # really of mixed lengths: padding matters
    return SimpleNamespace(
        input_ids=pad_rows([sources[i] for i in short], tokenizer.pad_token_id),
        attention_mask=pad_rows([[1] * len(sources[i]) for i in short], 0),
        labels=pad_rows([targets[i] for i in short], -100), vocab_size=len(tokenizer), pad=tokenizer.pad_token_id,
        eos=tokenizer.eos_token_id)


@pytest.fixture(scope="module")
def trained() -> dict[str, Any]:
    """Students trained once per module (by :func:`student`), by model type."""
    return {}


def student(sentences: SimpleNamespace, tiny: SimpleNamespace, model_type: str = "marian", *,
            trained: dict[str, Any] | None = None, eos_bias: float = 0.0) -> Any:
    """A tiny seq2seq student over the sample's vocabulary. With ``trained``: fitted for a few steps to the
    sentences, so that it reads its source and its rows end after different numbers of tokens (a random one writes
    the same tokens for every source), which exercises finished rows, padding and the cap; ``eos_bias`` is added to
    the end-of-sequence logit."""
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    from kd_plugins.text.models import TextStudent

    if trained is not None and model_type in trained:
        return trained[model_type]
    values = {**tiny.config(model_type), "vocab_size": sentences.vocab_size, "pad_token_id": sentences.pad,
              "eos_token_id": sentences.eos, "decoder_start_token_id": sentences.pad}
    if model_type == "bart":
        values.update(bos_token_id=2, decoder_start_token_id=sentences.eos)
    name = values.pop("model_type")
    torch.manual_seed(0)
    hf_model = AutoModelForSeq2SeqLM.from_config(AutoConfig.for_model(name, **values))
    if trained is not None:
        optimizer = torch.optim.Adam(hf_model.parameters(), lr=1e-2)
        for _ in range(TRAIN_STEPS):
            hf_model(input_ids=sentences.input_ids, attention_mask=sentences.attention_mask,
                     labels=sentences.labels).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    with torch.no_grad():
        hf_model.final_logits_bias[0, sentences.eos] += eos_bias
    model = TextStudent(hf_model.eval())
    if trained is not None:
        trained[model_type] = model
    return model


def assert_same(result: Generated, reference: Generated) -> None:
    assert torch.equal(result.sequences, reference.sequences)
    assert torch.equal(result.lengths, reference.lengths)


def rollouts(model: Any, sentences: SimpleNamespace, **options: Any) -> dict[str, Generated]:
    """The same rollout by the three loops, each started from the same RNG state (a generator or the global one)."""
    results, rng_after = {}, {}
    seed = options.pop("seed", None)
    for name, settings in {"auto": {}, "model-forward": {"implementation": "model-forward"},
                           "no-cache": {"use_cache": False}}.items():
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        torch.manual_seed(7)
        results[name] = generate(model, sentences.input_ids, sentences.attention_mask, generator=generator,
                                 **options, **settings)
        rng_after[name] = torch.random.get_rng_state()
    # The global RNG moved on by the same draws (the engine's RNG stream after a rollout does not change).
    assert all(torch.equal(state, rng_after["auto"]) for state in rng_after.values())
    return results


@pytest.mark.parametrize("model_type", ["marian", "bart"])
def test_greedy_rollouts_are_the_same_tokens_with_eos_padding_and_the_cap(sentences: SimpleNamespace,
                                                                          tiny: SimpleNamespace,
                                                                          model_type: str,
                                                                          trained: dict[str, Any]) -> None:
    model = student(sentences, tiny, model_type, trained=trained)
    uncapped = generate(model, sentences.input_ids, sentences.attention_mask, max_new_tokens=4 * LONGEST).lengths
    cap = int(uncapped.max()) - 1  # the longest rows reach the cap, the others end before it
    results = rollouts(model, sentences, max_new_tokens=cap)
    reference = results["no-cache"]
    assert_same(results["auto"], reference)
    assert_same(results["model-forward"], reference)
    lengths = reference.lengths.tolist()
    assert min(lengths) < cap and max(lengths) == cap, lengths  # some rows stop, some reach the cap
    for row, length in zip(reference.sequences, lengths):
        assert (row[length:] == sentences.pad).all()  # padding after the end
        assert sentences.pad not in row[:length].tolist()  # the pad token is never generated
        ends = (row[:length] == sentences.eos).nonzero().flatten().tolist()
        assert ends in ([length - 1], []) and (ends or length == cap)  # eos ends a row, else the cap did


@pytest.mark.parametrize("seed", [None, 3])  # the global RNG (what ImitKD uses: seeded, checkpointed) or a generator
def test_sampled_rollouts_are_the_same_tokens_for_the_same_rng_state(sentences: SimpleNamespace, tiny: SimpleNamespace,
                                                                     trained: dict[str, Any], seed: int | None) -> None:
    model = student(sentences, tiny, trained=trained)
    results = rollouts(model, sentences, strategy="top_k", top_k=5, temperature=1.5, max_new_tokens=16, seed=seed)
    assert_same(results["auto"], results["no-cache"])
    assert_same(results["model-forward"], results["no-cache"])
    greedy = generate(model, sentences.input_ids, sentences.attention_mask, max_new_tokens=16)
    assert not torch.equal(results["auto"].sequences, greedy.sequences)  # really sampled


def test_a_rollout_that_ends_everywhere_stops_and_a_cap_of_one_is_one_token(sentences: SimpleNamespace,
                                                                             tiny: SimpleNamespace,
                                                                             trained: dict[str, Any]) -> None:
    always_ends = student(sentences, tiny, eos_bias=1e4)
    for results in (rollouts(always_ends, sentences, max_new_tokens=9),
                    rollouts(student(sentences, tiny, trained=trained), sentences, max_new_tokens=1)):
        assert_same(results["auto"], results["no-cache"])
        assert results["auto"].sequences.shape == (ROWS, 1)


def test_causal_rollouts_continue_real_prompts_with_the_same_tokens(sentences: SimpleNamespace,
                                                                    tiny: SimpleNamespace) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    from kd_plugins.text.models import TextStudent
    from kdcore.padding import pad_rows

    torch.manual_seed(0)
    model = TextStudent(AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "gpt2", vocab_size=sentences.vocab_size, n_embd=32, n_layer=1, n_head=2, n_positions=512,
        bos_token_id=sentences.eos, eos_token_id=sentences.eos, pad_token_id=sentences.pad)).eval())
    prompts = [row[mask.bool()].tolist() for row, mask in zip(sentences.input_ids, sentences.attention_mask)]
    left_padded = SimpleNamespace(input_ids=pad_rows(prompts, sentences.pad, left=True),
                                  attention_mask=pad_rows([[1] * len(p) for p in prompts], 0, left=True))
    for options in ({}, {"strategy": "top_k", "top_k": 4, "seed": 1}):
        results = rollouts(model, left_padded, max_new_tokens=8, **options)
        assert_same(results["auto"], results["no-cache"])
        assert_same(results["model-forward"], results["no-cache"])


def test_rollouts_stay_out_of_the_gradient_which_is_the_teacher_forced_scores(sentences: SimpleNamespace,
                                                                             tiny: SimpleNamespace,
                                                                             fake_task: Any, objectives: Any) -> None:
    from kd_plugins.text.imitation import ImitationConfig, ImitationKD
    from kd_plugins.text.models import TextTeacher

    model = student(sentences, tiny)
    model.train()  # as in training: the rollout switches to eval mode and back
    teacher = TextTeacher(student(sentences, tiny, "bart").hf_model).freeze()
    method = ImitationKD(ImitationConfig(schedule={"kind": "constant", "value": 0.0},
                                         generation={"strategy": "top_k", "max_new_tokens": 10}),
                         fake_task, teacher, model, [tiny.objective("forward_kl", fused=False)])
    method.on_train_start(10)
    batch = {"input_ids": sentences.input_ids, "attention_mask": sentences.attention_mask, "labels": sentences.labels}
    torch.manual_seed(11)
    loss = method.training_step(batch, 0).loss
    loss.backward()
    gradients = {name: parameter.grad.clone() for name, parameter in model.named_parameters()
                 if parameter.grad is not None}
    assert len(gradients) > 10
    model.zero_grad(set_to_none=True)

    torch.manual_seed(11)
    mixed = method.prepare(batch, 0)
    labels = mixed.batch["labels"]
    assert mixed.replaced.all() and model.training
    assert not labels.requires_grad and labels.grad_fn is None
    assert all(parameter.grad is None for parameter in model.parameters())  # the rollout built no graph
    teacher_logits = teacher.hf_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                      labels=labels).logits
    student_logits = model.hf_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                    labels=labels).logits
    expected = objectives.divergence(student_logits, teacher_logits, "forward_kl", labels=labels)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    expected.backward()
    assert {name for name, parameter in model.named_parameters() if parameter.grad is not None} == set(gradients)
    for name, parameter in model.named_parameters():
        if parameter.grad is not None:
            torch.testing.assert_close(parameter.grad, gradients[name], rtol=1e-4, atol=1e-6)
