"""The LLM-distillation methods as ImitKD settings: full-vocabulary student sampling, DistiLLM's adaptive student
fraction and replay buffer, and the presets gkd / distillm / minillm-rkl on decoder-only models and through kd run."""
from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from kdcore.errors import KDUserError
from kd_plugins.text.generation import _next_tokens, generate
from kd_plugins.text.imitation import SUPERVISED_WARMUP, ImitationConfig, ImitationKD
from kd_plugins.text.models import TextStudent, TextTeacher

PRESETS = ("gkd", "distillm", "minillm-rkl")


# --------------------------------------------------------------------------- sampling
def test_sample_draws_from_the_whole_softmax_at_the_temperature() -> None:
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, -3.0, 0.5])
    draws = 40_000
    for temperature in (1.0, 2.0):
        tokens = _next_tokens(logits.expand(draws, -1), "sample", 2, temperature, torch.Generator().manual_seed(0))
        frequencies = torch.bincount(tokens, minlength=logits.numel()).float() / draws
        expected = torch.softmax(logits / temperature, dim=-1)
        # Binomial standard error <= sqrt(0.25 / 40000) = 0.0025: 0.01 is four of them.
        torch.testing.assert_close(frequencies, expected, atol=0.01, rtol=0.0)
        assert frequencies[4] > 0  # the least likely token is drawn too (top_k=2 is not what samples)
    top_k = _next_tokens(logits.expand(draws, -1), "top_k", 2, 1.0, torch.Generator().manual_seed(0))
    assert set(top_k.tolist()) == {0, 1}


def test_sampled_generation_is_reproducible_with_a_seeded_generator(tiny: SimpleNamespace) -> None:
    model = TextStudent(tiny.causal(layers=2))
    prompts = torch.randint(2, tiny.VOCAB, (6, 4), generator=torch.Generator().manual_seed(0))

    def sample(seed: int) -> torch.Tensor:
        return generate(model, prompts, torch.ones_like(prompts), strategy="sample", max_new_tokens=10,
                        generator=torch.Generator().manual_seed(seed)).sequences

    assert torch.equal(sample(1), sample(1))
    assert not torch.equal(sample(1), sample(2))
    assert not torch.equal(sample(1), generate(model, prompts, torch.ones_like(prompts), max_new_tokens=10).sequences)
    with pytest.raises(ValueError, match="unknown decoding strategy"):
        generate(model, prompts, strategy="nucleus")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- helpers
def causal_method(tiny: SimpleNamespace, task: Any, objective: Any = None, **options: Any) -> ImitationKD:
    teacher = TextTeacher(tiny.causal(seed=1, layers=2)).freeze()
    student = TextStudent(tiny.causal(seed=0))
    method = ImitationKD(ImitationConfig(**options), task, teacher, student,
                         [objective or tiny.objective("forward_kl", fused=False)])
    method.on_train_start(10)
    return method


def with_ids(batch: dict[str, Any], prefix: str = "ex") -> dict[str, Any]:
    return {**batch, "ids": [f"{prefix}{row}" for row in range(batch["input_ids"].shape[0])]}


def bleu_task(fake_task: Any) -> SimpleNamespace:
    return SimpleNamespace(**vars(fake_task), metric="bleu", greater_is_better=True)


# --------------------------------------------------------------------------- adaptive schedule
def test_adaptive_fraction_rises_after_a_worse_validation_only(tiny: SimpleNamespace, fake_task: Any) -> None:
    method = causal_method(tiny, bleu_task(fake_task), schedule={"kind": "adaptive", "initial": 0.2, "step": 0.25,
                                                                   "max": 0.6})
    assert method.beta(0) == pytest.approx(0.8)
    fractions = []
    for bleu in (10.0, 12.0, 11.0, 11.5, 9.0, 8.0, 7.0):  # first: the reference; worse: 11, 9, 8, 7
        method.on_validation(1, {"bleu": bleu, "chrf": 0.0})
        fractions.append(round(1 - method.beta(5), 6))
    assert fractions == [0.2, 0.2, 0.45, 0.45, 0.6, 0.6, 0.6]  # capped at max
    assert method.adaptive is not None and method.adaptive.raises == 2


def test_adaptive_fraction_follows_the_metrics_direction_and_the_tolerance(tiny: SimpleNamespace,
                                                                            fake_task: Any) -> None:
    schedule = {"kind": "adaptive", "metric": "student_perplexity", "greater_is_better": False, "tolerance": 0.5}
    method = causal_method(tiny, bleu_task(fake_task), schedule=schedule)
    for perplexity in (20.0, 19.0, 19.4, 20.0):  # 19 -> 19.4: within the tolerance; 19.4 -> 20: worse by 0.6
        method.on_validation(1, {"student_perplexity": perplexity, "bleu": 0.0})
    assert 1 - method.beta(0) == pytest.approx(0.1)
    with pytest.raises(KDUserError, match="student_perplexity"):
        method.on_validation(2, {"bleu": 1.0})
    with pytest.raises(KDUserError, match="greater_is_better"):
        causal_method(tiny, bleu_task(fake_task), schedule={"kind": "adaptive", "metric": "chrf"})


# --------------------------------------------------------------------------- replay buffer
def test_replay_reuses_stored_generations_with_probability_reuse(tiny: SimpleNamespace, fake_task: Any,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    options = {"schedule": {"kind": "constant", "value": 0.0}, "generation": {"strategy": "sample",
                                                                              "max_new_tokens": 4}}
    batch = with_ids(tiny.causal_batch(40))
    method = causal_method(tiny, fake_task, replay={"size": 100, "reuse": 0.5}, **options)
    method.generator = torch.Generator().manual_seed(0)
    first = method.prepare(batch, 0)
    assert first.reused is not None and not first.reused.any() and len(method.replay or []) == 40
    stored = {key: list(tokens) for key, tokens in method.replay.entries.items()}  # type: ignore[union-attr]
    reused_total = 0
    for step in range(1, 6):
        mixed = method.prepare(batch, step)
        reused_total += int(mixed.reused.sum())  # type: ignore[union-attr]
        for row in mixed.reused.nonzero().squeeze(1).tolist():  # type: ignore[union-attr]
            labels = mixed.batch["labels"][row]
            assert labels[labels != -100].tolist() == stored[f"ex{row}"]  # the stored continuation, as it was
        stored = {key: list(tokens) for key, tokens in method.replay.entries.items()}  # type: ignore[union-attr]
    # 200 Bernoulli(0.5) draws: standard deviation 0.035; 0.12 is more than three of them.
    assert abs(reused_total / 200 - 0.5) < 0.12, reused_total

    always = causal_method(tiny, fake_task, replay={"size": 100, "reuse": 1.0}, **options)
    always.prepare(batch, 0)
    monkeypatch.setattr("kd_plugins.text.imitation.generate", lambda *a, **k: pytest.fail("student generated"))
    replayed = always.prepare(batch, 1)
    assert replayed.reused is not None and replayed.reused.all()
    output = always.training_step(batch, 2)
    assert output.parts["reused_fraction"] == 1.0 and torch.isfinite(output.loss)


def test_replay_off_never_reuses_and_the_buffer_evicts_the_oldest(tiny: SimpleNamespace, fake_task: Any) -> None:
    options = {"schedule": {"kind": "constant", "value": 0.0}, "generation": {"max_new_tokens": 3}}
    method = causal_method(tiny, fake_task, replay={"size": 5, "reuse": 0.0}, **options)
    batch = with_ids(tiny.causal_batch(8))
    for step in range(2):
        assert not method.prepare(batch, step).reused.any()  # type: ignore[union-attr]
    assert list(method.replay.entries) == ["ex3", "ex4", "ex5", "ex6", "ex7"]  # type: ignore[union-attr]
    plain = causal_method(tiny, fake_task, **options)
    assert plain.replay is None and plain.prepare(batch, 0).reused is None and plain.state_dict() == {}
    with pytest.raises(KDUserError, match="example ids"):
        method.prepare(tiny.causal_batch(4), 2)


def test_replay_on_seq2seq_students(tiny: SimpleNamespace, fake_task: Any) -> None:
    teacher, student = tiny.pair()
    method = ImitationKD(ImitationConfig(schedule={"kind": "constant", "value": 0.0}, replay={"size": 50, "reuse": 1.0},
                                         generation={"max_new_tokens": 5, "max_length_ratio": None}),
                         fake_task, teacher, student, [tiny.objective("forward_kl", fused=False)])
    method.on_train_start(10)
    batch = tiny.batch(6)  # carries ids
    first = method.prepare(batch, 0)
    second = method.prepare(batch, 1)
    assert second.reused is not None and second.reused.all()
    assert torch.equal(first.batch["labels"], second.batch["labels"])


def test_method_state_round_trips_and_is_deterministic(tiny: SimpleNamespace, fake_task: Any) -> None:
    options = {"schedule": {"kind": "adaptive", "initial": 0.5, "step": 0.2},
               "generation": {"strategy": "sample", "max_new_tokens": 4}, "replay": {"size": 30, "reuse": 0.5}}
    task = bleu_task(fake_task)
    batches = [with_ids(tiny.causal_batch(12, seed=step % 2), prefix=f"b{step % 2}-") for step in range(6)]

    def train(method: ImitationKD, steps: range) -> list[tuple]:
        seen = []
        for step in steps:
            mixed = method.prepare(batches[step], step)
            seen.append((mixed.beta, mixed.replaced.tolist(), mixed.reused.tolist(),  # type: ignore[union-attr]
                         mixed.batch["input_ids"].tolist()))
            method.on_validation(step, {"bleu": 10.0 - step})  # always worse: the fraction rises
        return seen

    torch.manual_seed(7)
    straight = causal_method(tiny, task, **options)
    expected = train(straight, range(6))
    torch.manual_seed(7)
    first = causal_method(tiny, task, **options)
    part = train(first, range(3))
    state = json.loads(json.dumps(first.state_dict()))  # as the checkpoint stores it
    rng = torch.get_rng_state()
    resumed = causal_method(tiny, task, **options)
    resumed.load_state_dict(state)
    torch.set_rng_state(rng)
    assert part + train(resumed, range(3, 6)) == expected
    assert resumed.state_dict() == straight.state_dict()
    assert state["adaptive"]["fraction"] == pytest.approx(0.9) and 0 < len(state["replay"]["entries"]) <= 24
    plain = causal_method(tiny, task, schedule={"kind": "adaptive"})
    with pytest.raises(KDUserError, match="replay"):
        plain.load_state_dict(state)


# --------------------------------------------------------------------------- presets
def preset_objective(tiny: SimpleNamespace, preset: dict[str, Any]) -> Any:
    spec = preset["objectives"]["kd"]
    return tiny.objective(spec["name"], fused=False, **spec.get("args", {}))


@pytest.mark.parametrize("name", PRESETS)
def test_each_preset_trains_a_causal_student(tiny: SimpleNamespace, fake_task: Any, name: str) -> None:
    preset = ImitationKD.presets[name]
    method = causal_method(tiny, bleu_task(fake_task), preset_objective(tiny, preset), **preset["method"])
    assert method.config.generation.strategy == "sample"
    optimizer = torch.optim.SGD(method.student.parameters(), lr=0.1)
    batch = with_ids(tiny.causal_batch(8))
    # on_train_start(10): steps 0-4 are the supervised warm-up (t/T < 0.5, data targets only), 5-7 the paper's mix
    assert SUPERVISED_WARMUP == 0.5 and method.beta(4) == 1.0
    for step in range(5, 8):
        output = method.training_step(batch, step)
        output.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        assert torch.isfinite(output.loss) and output.parts["kd"] == pytest.approx(float(output.loss.detach()))
        method.on_validation(step, {"bleu": 1.0})
    expected_beta = {"gkd": 0.5, "distillm": 1.0, "minillm-rkl": 0.0}[name]
    assert output.parts["beta"] == expected_beta
    assert ("reused_fraction" in output.parts) == (name == "distillm")


def test_presets_resolve_to_the_papers_settings() -> None:
    from kdcore.registry import Registry
    from kdcore.resolve import resolve_run

    registry = Registry.discover()
    expected = {"gkd": ("jsd", {"beta": 0.5}), "distillm": ("skew_reverse_kl", {"skew": 0.1}),
                "minillm-rkl": ("reverse_kl", {})}
    for name, (objective, args) in expected.items():
        config = resolve_run(registry, task="wmt", plugin="imitation", preset=name).config
        method = ImitationConfig(**config.method)
        assert {label: spec.name for label, spec in config.objectives.items() if spec is not None} == {
            "sft": "forward_kl", "kd": objective}
        assert config.objectives["kd"].args == args
        # the supervised warm-up, then the paper's objective: adjoining spans
        assert (config.objectives["sft"].active.start, config.objectives["sft"].active.stop) == (0.0, SUPERVISED_WARMUP)
        assert (config.objectives["kd"].active.start, config.objectives["kd"].active.stop) == (SUPERVISED_WARMUP, 1.0)
        assert method.schedule.warmup == (0.0 if name == "distillm" else SUPERVISED_WARMUP)
        assert method.generation.strategy == "sample" and method.generation.temperature == 1.0
    gkd = ImitationConfig(**resolve_run(registry, task="wmt", plugin="imitation", preset="gkd").config.method)
    assert (gkd.schedule.kind, gkd.schedule.value, gkd.replay) == ("constant", 0.5, None)
    rkl = ImitationConfig(**resolve_run(registry, task="wmt", plugin="imitation", preset="minillm-rkl").config.method)
    assert (rkl.schedule.kind, rkl.schedule.value) == ("constant", 0.0)
    distillm = ImitationConfig(**resolve_run(registry, task="wmt", plugin="imitation", preset="distillm").config.method)
    assert distillm.schedule.kind == "adaptive" and distillm.schedule.compare_with == "last_raise"
    assert (distillm.schedule.initial, distillm.schedule.step, distillm.schedule.max) == (0.0, 0.1, 1.0)
    assert distillm.replay is not None and (distillm.replay.size, distillm.replay.reuse) == (1000, 0.5)


# --------------------------------------------------------------------------- through kd run (tiny wmt)
SAMPLE = Path(__file__).parents[1] / "text_tasks" / "data" / "ha-en-de-sample.tsv"
# The tiny preset on the committed sample: 16 training examples (one batch, so every step sees the same examples
# and the replay buffer is reused), a validation after every step, a checkpoint every 2.
TINY_WMT = ["--task", "wmt", "--plugin", "imitation", "--preset", "tiny", "--set", "data.corpus=files",
            "--set", f"data.train.path={SAMPLE}", "--set", "data.max_train=16", "--set", "data.valid_size=8",
            "--set", "data.test_size=8", "--set", "data.eval_beams=[1]", "--set", "trainer.max_steps=4",
            "--set", "trainer.log_every=1", "--set", "trainer.eval_every=1", "--set", "trainer.checkpoint_every=2",
            "--set", "trainer.evaluate_teacher=false", "--set", "method.generation.max_new_tokens=8"]


def preset_file(tmp_path: Path, name: str, **method: Any) -> Path:
    """A preset of the plugin as a --config file (kd run takes one --preset, and the task's tiny one is taken)."""
    import yaml

    preset = json.loads(json.dumps(ImitationKD.presets[name]))
    preset["method"].update(method)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(preset), encoding="utf-8")
    return path


def kd_run(out: Path, *args: str) -> list[dict[str, Any]]:
    from kdcore.cli import main

    assert main(["run", *args, "--out", str(out)]) == 0
    return [json.loads(line) for line in (out / "log.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("name", PRESETS)
def test_each_preset_runs_through_kd_run(tmp_path: Path, name: str) -> None:
    records = kd_run(tmp_path / "run", *TINY_WMT, "--config", str(preset_file(tmp_path, name)))
    train = [r for r in records if r["type"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert records[0]["objectives"]["kd"]["name"] == ImitationKD.presets[name]["objectives"]["kd"]["name"]
    # 4 steps: t/T = 0 and 0.25 are the supervised warm-up (forward KL on data targets), 0.5 and 0.75 the paper's part
    assert [("sft" in r, "kd" in r) for r in train] == [(True, False)] * 2 + [(False, True)] * 2
    if name == "gkd":
        assert [r["beta"] for r in train] == [1.0, 1.0, 0.5, 0.5]
    if name == "minillm-rkl":
        assert [r["beta"] for r in train] == [1.0, 1.0, 0.0, 0.0]
        assert [r["replaced_fraction"] for r in train] == [0.0, 0.0, 1.0, 1.0]
    if name == "distillm":
        assert train[0]["beta"] == 1.0 and all("reused_fraction" in r for r in train)
    assert all(math.isfinite(r["loss"]) for r in train)


@pytest.mark.slow
def test_distillm_resumes_its_schedule_and_buffer_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kdcore import trainer
    from kdcore.cli import main
    from kd_plugins.text import imitation

    # A validation value that falls at every validation ("countdown", greater is better: each one after the first
    # is worse), so the student fraction rises 0.5 -> 0.7 -> 0.9 -> 1.0; the buffer fills from the first step.
    current = {"step": 0}
    evaluate, validate = trainer.evaluate_model, trainer.Trainer._evaluate_in_loop

    def tracking(self: trainer.Trainer, step: int) -> None:
        current["step"] = step
        validate(self, step)

    monkeypatch.setattr(trainer.Trainer, "_evaluate_in_loop", tracking)
    monkeypatch.setattr(trainer, "evaluate_model",
                        lambda *args, **kwargs: {**evaluate(*args, **kwargs), "countdown": 10.0 - current["step"]})
    config = preset_file(tmp_path, "distillm", schedule={"kind": "adaptive", "initial": 0.5, "step": 0.2,
                                                         "metric": "countdown", "greater_is_better": True})
    straight = kd_run(tmp_path / "straight", *TINY_WMT, "--config", str(config))

    original = imitation.ImitationKD.training_step

    def crash_at_step_three(self: imitation.ImitationKD, batch: Any, step: int) -> Any:
        if step == 2:  # 0-based: the third step, after the checkpoint of step 2
            raise RuntimeError("simulated crash")
        return original(self, batch, step)

    monkeypatch.setattr(imitation.ImitationKD, "training_step", crash_at_step_three)
    out = tmp_path / "crashed"
    try:
        code = main(["run", *TINY_WMT, "--config", str(config), "--out", str(out)])
    except RuntimeError:
        code = None
    assert code != 0 and not (out / "metrics.json").exists()
    saved = json.loads((out / "checkpoints" / "step-00000002" / "trainer_state.json").read_text(encoding="utf-8"))
    assert saved["method_state"][0]["adaptive"]["fraction"] == pytest.approx(0.7)
    assert len(saved["method_state"][0]["replay"]["entries"]) > 0
    monkeypatch.setattr(imitation.ImitationKD, "training_step", original)
    resumed = kd_run(out, "--resume")

    def trained(records: list[dict[str, Any]]) -> list[tuple]:
        return [(r["step"], r["beta"], r["replaced_fraction"], r["reused_fraction"], r["generated_length"],
                 round(r["loss"], 5)) for r in records if r["type"] == "train"]

    assert trained(resumed) == trained(straight)
    assert [r["beta"] for r in straight if r["type"] == "train"] == pytest.approx([0.5, 0.5, 0.3, 0.1])
    assert any(r["reused_fraction"] > 0 for r in straight if r["type"] == "train")
    metrics = [json.loads((tmp_path / run / "metrics.json").read_text(encoding="utf-8"))["student"]
               for run in ("straight", "crashed")]
    assert metrics[0]["bleu"] == metrics[1]["bleu"] and metrics[0]["chrf"] == metrics[1]["chrf"]
