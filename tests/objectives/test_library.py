"""Hidden-state losses, ULD, token NLL, the registered objective classes and stored top-k teacher logits."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from kdcore.errors import KDUserError
from kdcore.interfaces import Objective
from kdcore.objectives import divergence, hidden_state_loss, token_nll, uld_loss
from kdcore.objectives import layers, library
from kdcore.signals import Signal, Signals, SparseLogits


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- hidden states
def test_hidden_losses_match_their_definitions_with_mask() -> None:
    student, teacher = randn(2, 5, 8, seed=0), randn(2, 5, 8, seed=1)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    keep = mask.bool()
    s, t = student[keep], teacher[keep]
    cos = F.cosine_similarity(s, t, dim=-1)
    expected = {
        "l1": (s - t).abs().mean(),
        "mse": ((s - t) ** 2).mean(),
        "cosine": (1 - cos).mean(),
        "l1_logsigmoid_cos": ((s - t).abs().mean(-1) - 0.7 * F.logsigmoid(cos)).mean(),
    }
    for kind, want in expected.items():
        got = hidden_state_loss(student, teacher, kind, mask=mask, cos_weight=0.7)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    # the masked positions really are ignored: changing them changes nothing
    changed = teacher.clone()
    changed[0, 3:] += 100
    assert float(hidden_state_loss(student, changed, "mse", mask=mask)) == pytest.approx(float(expected["mse"]))


def test_hidden_loss_gradients_and_errors() -> None:
    student = randn(4, 6, seed=2).requires_grad_()
    hidden_state_loss(student, randn(4, 6, seed=3), "l1_logsigmoid_cos").backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="same shape"):
        hidden_state_loss(student, randn(4, 7, seed=3), "l1")
    with pytest.raises(ValueError, match="unknown hidden-state loss"):
        hidden_state_loss(student, student, "l2")


# --------------------------------------------------------------------------- ULD and NLL
def test_uld_aligns_counted_positions_and_pads_the_smaller_vocabulary() -> None:
    student = randn(2, 4, 6, seed=4)
    teacher = randn(2, 5, 9, seed=5)
    student_labels = torch.tensor([[-100, 1, 2, 3], [1, 2, -100, -100]])
    teacher_labels = torch.tensor([[-100, -100, 4, 5, 6], [7, 8, 9, -100, -100]])
    got = uld_loss(student, teacher, temperature=2.0, student_labels=student_labels, teacher_labels=teacher_labels)
    # naive: explicit pairs (row, student pos, teacher pos), ULD's i-th with i-th, truncated
    pairs = [(0, 1, 2), (0, 2, 3), (0, 3, 4), (1, 0, 0), (1, 1, 1)]
    terms = []
    for row, s_pos, t_pos in pairs:
        p_s = torch.softmax(student[row, s_pos] / 2, -1).sort(descending=True).values
        p_t = torch.softmax(teacher[row, t_pos] / 2, -1).sort(descending=True).values
        terms.append((F.pad(p_s, (0, 3)) - p_t).abs().sum())
    torch.testing.assert_close(got, torch.stack(terms).mean())
    # a sparse top-k teacher gives the same value as its dense -inf-filled version
    top = teacher.topk(3, dim=-1)
    dense = torch.full_like(teacher, float("-inf")).scatter(-1, top.indices, top.values)
    sparse_value = uld_loss(student, SparseLogits(top.values, top.indices, 9), student_labels=student_labels,
                            teacher_labels=teacher_labels)
    torch.testing.assert_close(sparse_value, uld_loss(student, dense, student_labels=student_labels,
                                                      teacher_labels=teacher_labels))


def test_token_nll_ignores_minus_100_and_never_returns_nan() -> None:
    logits, labels = randn(2, 3, 7, seed=6), torch.tensor([[1, -100, 3], [0, 6, -100]])
    keep = labels != -100
    torch.testing.assert_close(token_nll(logits, labels), F.cross_entropy(logits[keep], labels[keep]))
    assert float(token_nll(logits, torch.full((2, 3), -100))) == 0.0


# --------------------------------------------------------------------------- objective classes
NAMES = {
    "ForwardKLObjective": "forward_kl", "ReverseKLObjective": "reverse_kl", "JSDObjective": "jsd",
    "SkewForwardKLObjective": "skew_forward_kl", "SkewReverseKLObjective": "skew_reverse_kl", "TVDObjective": "tvd",
    "TokenNLLObjective": "nll", "HiddenL1Objective": "l1", "HiddenMSEObjective": "mse",
    "HiddenCosineObjective": "cosine", "DistilHubertObjective": "l1_logsigmoid_cos", "ULDObjective": "uld",
}


@pytest.mark.parametrize("class_name", sorted(NAMES))
def test_objective_classes_have_names_descriptions_and_strict_configs(class_name: str) -> None:
    cls = getattr(library, class_name, None) or getattr(layers, class_name)
    assert issubclass(cls, Objective) and cls.name == NAMES[class_name]
    assert cls.description and "\n" not in cls.description
    with pytest.raises(ValidationError):
        cls.Config(no_such_key=1)


def test_registry_yaml_points_at_these_classes() -> None:
    import yaml
    from importlib import resources

    entries = yaml.safe_load(resources.files("kdcore").joinpath("registry.yaml").read_text())["objectives"]
    for class_name, name in NAMES.items():
        module = "library" if hasattr(library, class_name) else "layers"
        assert entries[name]["target"] == f"kdcore.objectives.{module}:{class_name}"


def test_logit_objective_configs_validate_ranges() -> None:
    for beta in (0.0, 1.0):  # the JSD is identically 0 there: refused with the reason
        with pytest.raises(ValidationError, match="identically 0"):
            library.JSDObjective.Config(beta=beta)
    with pytest.raises(ValidationError):
        library.JSDObjective.Config(beta=1.5)
    with pytest.raises(ValidationError, match="identically 0"):
        library.SkewForwardKLObjective.Config(skew=1.0)
    with pytest.raises(ValidationError):
        library.ForwardKLObjective.Config(temperature=0)
    assert library.SkewReverseKLObjective.Config(skew=0.3, fused=False).skew == 0.3
    assert library.SkewForwardKLObjective.Config(skew=0.0).skew == 0.0  # the plain KL, not zero


def test_every_value_the_configs_accept_is_accepted_by_the_math() -> None:
    # One config surface: what validation lets through never fails later in the functions' own argument checks.
    student, teacher = randn(3, 7, seed=21), randn(3, 7, seed=22)
    for objective in (library.JSDObjective(library.JSDObjective.Config(beta=1e-9)),
                      library.JSDObjective(library.JSDObjective.Config(beta=1 - 1e-9)),
                      library.SkewForwardKLObjective(library.SkewForwardKLObjective.Config(skew=0.999999)),
                      library.SkewReverseKLObjective(library.SkewReverseKLObjective.Config(skew=0.0))):
        assert torch.isfinite(objective(Signals(logits=student), Signals(logits=teacher), {}).loss)


def test_fused_true_is_refused_when_the_models_cannot_take_the_fused_path() -> None:
    objective = library.ForwardKLObjective(library.ForwardKLObjective.Config(fused=True))
    logits = Signals(logits=randn(4, 9, seed=23))
    with pytest.raises(KDUserError, match="fused: true"):
        objective(logits, Signals(logits=randn(4, 9, seed=24)), {})
    top = randn(4, 9, seed=25).topk(3, dim=-1)
    sparse = Signals(logits=SparseLogits(top.values, top.indices, 9))
    with pytest.raises(KDUserError, match="student did not hand over"):
        objective(logits, sparse, {})
    # a top-k teacher has no head to project: the student's final hidden state and head are enough
    head = _head_signals(randn(4, 5, seed=26), randn(9, 5, seed=27), torch.zeros(9), with_logits=False)
    assert objective(head, sparse, {}).parts["fused"] == 1.0


def _head_signals(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, with_logits: bool) -> Signals:
    return Signals(logits=F.linear(hidden, weight, bias) if with_logits else None, final_hidden=hidden,
                   output_weight=weight, output_bias=bias)


@pytest.mark.parametrize("fused", [True, False, "auto"])
def test_divergence_objective_fused_and_dense_agree(fused: bool | str) -> None:
    vocab = 9000  # >= 8192, so "auto" takes the fused path
    student_weight = (randn(vocab, 8, seed=7) / 3).requires_grad_()
    student_hidden = randn(2, 3, 8, seed=8).requires_grad_()
    teacher_weight, teacher_hidden = randn(vocab, 8, seed=9) / 3, randn(2, 3, 8, seed=10)
    bias = torch.zeros(vocab)
    labels = torch.tensor([[1, -100, 2], [3, 4, -100]])
    objective = library.JSDObjective(library.JSDObjective.Config(beta=0.3, temperature=2.0, fused=fused))
    wants = objective.student_request()
    assert wants.wants(Signal.LOGITS) and wants.wants(Signal.FINAL_HIDDEN) == (fused is not False)
    student = _head_signals(student_hidden, student_weight, bias, with_logits=True)
    teacher = _head_signals(teacher_hidden, teacher_weight, bias, with_logits=True)
    output = objective(student, teacher, {"labels": labels})
    assert output.parts["fused"] == (0.0 if fused is False else 1.0) and output.parts["positions"] == 4.0
    want = divergence(F.linear(student_hidden, student_weight), F.linear(teacher_hidden, teacher_weight), "jsd",
                      beta=0.3, temperature=2.0, labels=labels)
    torch.testing.assert_close(output.loss, want, rtol=1e-5, atol=1e-8)
    output.loss.backward()
    assert student_weight.grad is not None and student_weight.grad.abs().sum() > 0


def test_auto_stays_dense_for_small_vocabularies_and_logits_can_come_from_final_hidden() -> None:
    weight, hidden = randn(50, 4, seed=11), randn(6, 4, seed=12)
    objective = library.ForwardKLObjective()
    # the model returned only the final hidden state and the head: logits are projected here
    student = _head_signals(hidden, weight, torch.zeros(50), with_logits=False)
    teacher = Signals(logits=randn(6, 50, seed=13))
    output = objective(student, teacher, {})
    assert output.parts["fused"] == 0.0
    torch.testing.assert_close(output.loss, divergence(hidden @ weight.T, teacher.logits, "forward_kl"))
    with pytest.raises(KDUserError, match="neither 'logits' nor"):
        objective(Signals(), teacher, {})
    with pytest.raises(KDUserError, match="labels"):
        objective(Signals(logits=randn(6, 50, seed=1)), teacher, {"labels": torch.zeros(5, dtype=torch.long)})


def test_cached_sparse_teacher_through_objective() -> None:
    student, teacher = randn(4, 30, seed=14), randn(4, 30, seed=15)
    top = teacher.topk(5, dim=-1)
    sparse = Signals(logits=SparseLogits(top.values, top.indices, 30))
    got = library.ForwardKLObjective()(Signals(logits=student), sparse, {}).loss
    dense = torch.full_like(teacher, float("-inf")).scatter(-1, top.indices, top.values)
    torch.testing.assert_close(got, divergence(student, dense, "forward_kl"))
    with pytest.raises(KDUserError, match="reverse_kl"):
        library.ReverseKLObjective()(Signals(logits=student), sparse, {})


def test_nll_objective() -> None:
    logits, labels = randn(3, 5, seed=16), torch.tensor([1, 2, -100])
    output = library.TokenNLLObjective()(Signals(logits=logits), Signals(), {"labels": labels})
    torch.testing.assert_close(output.loss, F.cross_entropy(logits[:2], labels[:2]))
    with pytest.raises(KDUserError, match="labels"):
        library.TokenNLLObjective()(Signals(logits=logits), Signals(), {})


def test_hidden_objectives_pair_layers_and_report_parts() -> None:
    student_states = (randn(2, 3, 4, seed=17), randn(2, 3, 4, seed=18))
    teacher_states = tuple(randn(2, 3, 4, seed=20 + i) for i in range(4))
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    objective = layers.DistilHubertObjective(layers.DistilHubertObjective.Config(teacher_layers=[1, 3],
                                                                                   cos_weight=0.5))
    assert objective.teacher_request().hidden_layers is None
    output = objective(Signals(hidden_states=student_states), Signals(hidden_states=teacher_states),
                       {"attention_mask": mask})
    per_layer = [hidden_state_loss(student_states[0], teacher_states[1], "l1_logsigmoid_cos", mask=mask, cos_weight=0.5),
                 hidden_state_loss(student_states[1], teacher_states[3], "l1_logsigmoid_cos", mask=mask, cos_weight=0.5)]
    torch.testing.assert_close(output.loss, per_layer[0] + per_layer[1])
    assert output.parts["layer1"] == pytest.approx(float(per_layer[1]))
    with pytest.raises(KDUserError, match="teacher_layers"):
        layers.HiddenMSEObjective()(Signals(hidden_states=student_states), Signals(hidden_states=teacher_states), {})
    with pytest.raises(KDUserError, match="valid indices"):
        layers.HiddenL1Objective(layers.HiddenL1Objective.Config(teacher_layers=[0, 9]))(
            Signals(hidden_states=student_states), Signals(hidden_states=teacher_states), {})
    with pytest.raises(KDUserError, match="returned none"):
        layers.HiddenCosineObjective()(Signals(), Signals(hidden_states=teacher_states), {})


def test_uld_objective_reads_teacher_labels_key() -> None:
    student, teacher = randn(1, 3, 5, seed=30), randn(1, 4, 7, seed=31)
    batch = {"labels": torch.tensor([[1, 2, 3]]), "teacher_labels": torch.tensor([[-100, 1, 2, 3]])}
    output = library.ULDObjective()(Signals(logits=student), Signals(logits=teacher), batch)
    torch.testing.assert_close(output.loss, uld_loss(student, teacher, student_labels=batch["labels"],
                                                     teacher_labels=batch["teacher_labels"]))


# --------------------------------------------------------------------------- stored top-k teacher logits
def _logit_store(directory, teacher: str = "teacher-a"):  # noqa: ANN001, ANN202
    from kdcore.teacher_shards import AppendableStore

    return AppendableStore(directory, "test-logits", {"teacher": teacher, "top_k": 4}, what="the test logits",
                           label="test logits shard", examples_label="examples")


def _top_k(logits: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    sparse = SparseLogits.from_dense(logits, k)
    return {"values": sparse.values.half(), "indices": sparse.indices.int(), "tail_log_mass": sparse.tail_log_mass}


def test_stored_top_k_logits_round_trip_compactly_and_atomically(tmp_path) -> None:
    store = _logit_store(tmp_path / "cache")
    logits = randn(3, 20, seed=40)
    shard = store.append(["example/1"], ["digest-1"], [_top_k(logits, 4)])
    assert "example/1" in store and "example/2" not in store
    entry = store.lookup(["example/1"], ["digest-1"])["example/1"]
    assert entry["values"].dtype == torch.float16 and entry["indices"].dtype == torch.int32
    top = logits.topk(4, dim=-1)
    torch.testing.assert_close(entry["values"].float(), top.values, rtol=1e-3, atol=1e-3)
    assert torch.equal(entry["indices"].long(), top.indices)
    assert shard.stat().st_size < 3 * 4 * 6 + 1024  # 6 bytes per kept logit and a header
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.endswith(".tmp")]
    assert store.lookup(["example/1"], ["digest-2"]) == {}  # the example changed: not used
    assert json.loads((tmp_path / "cache" / "kd-cache.json").read_text())["built_from"]["teacher"] == "teacher-a"
    assert "example/1" not in _logit_store(tmp_path / "cache", teacher="teacher-b")  # another teacher: rebuilt


def test_stored_logits_are_read_for_the_missing_only_and_padded(tmp_path) -> None:
    from kdcore.teacher_shards import sparse_logits_batch

    store = _logit_store(tmp_path)
    full = randn(2, 4, 10, seed=41)
    calls: list[list[str]] = []

    def fetch(keys: list[str], lengths: dict[str, int]):  # noqa: ANN202 - the run-time cache pattern
        found = store.lookup(keys, keys)
        missing = [key for key in keys if key not in found]
        if missing:
            calls.append(missing)
            rows = [_top_k(full[keys.index(key), :lengths[key]], 3) for key in missing]
            store.append(missing, missing, rows)
            found.update(zip(missing, rows))
        return sparse_logits_batch([found[key] for key in keys], 4, 10, 1.0)

    first = fetch(["a", "b"], {"a": 4, "b": 2})
    second = fetch(["a", "b"], {"a": 4, "b": 2})
    assert calls == [["a", "b"]]
    assert torch.equal(first.values, second.values) and first.values.shape == (2, 4, 3)
    # padding rows are valid distributions (no all -inf row) and the real rows are the top-k with their tail
    assert torch.isfinite(first.values[1, 2:]).any(-1).all()
    torch.testing.assert_close(first.values[0], full[0].topk(3, dim=-1).values, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(first.tail_log_mass[0], SparseLogits.from_dense(full[0], 3).tail_log_mass)
    # a stored sparse teacher works with the divergence directly
    student = randn(2, 4, 10, seed=42)
    assert torch.isfinite(divergence(student, first, "jsd"))


def test_logits_projected_from_the_final_hidden_state_are_computed_once_per_comparison() -> None:
    from kdcore.objectives.inputs import logits_of

    hidden, weight = torch.randn(2, 3, 4), torch.randn(5, 4)
    signals = Signals(final_hidden=hidden, output_weight=weight)
    first = logits_of(signals, "student", "kd")
    torch.testing.assert_close(first, hidden @ weight.T)
    assert logits_of(signals, "student", "nll") is first
