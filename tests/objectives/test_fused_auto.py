"""The fused path in a configured run: ``fused: auto`` picks it by itself for a large vocabulary.

The run is built the way ``kd run`` builds it (:func:`kdcore.resolve.resolve_run` and
:func:`kdcore.resolve.build_components`: config layers, the ``causal-lm`` teacher and student factories, the
registered objective, the ``word-kd`` method), with two random Llama models given by ``args.config``; the toy task
only hosts the run. Spies on the objective library's entry points show which path each step really takes.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import kdcore.objectives.library as library
from kdcore.objectives.library import FUSED_AUTO_MIN_VOCAB
from kdcore.registry import Registry
from kdcore.resolve import build_components, resolve_run


def _llama(vocab: int, layers: int) -> dict[str, Any]:
    return {"model_type": "llama", "vocab_size": vocab, "hidden_size": 16, "intermediate_size": 32,
            "num_hidden_layers": layers, "num_attention_heads": 2, "num_key_value_heads": 2,
            "max_position_embeddings": 64, "tie_word_embeddings": True, "pad_token_id": 0}


def _method(tmp_path: Path, vocab: int, kind: str = "jsd", fused: Any = None) -> Any:
    sets = ["teacher=" + json.dumps({"name": "causal-lm", "args": {"config": _llama(vocab, 2)}}),
            "student=" + json.dumps({"name": "causal-lm", "args": {"config": _llama(vocab, 1)}}),
            f"objectives.kd.name={kind}"]
    if fused is not None:
        sets.append(f"objectives.kd.args.fused={json.dumps(fused)}")
    resolved = resolve_run(Registry.discover(entry_points=False), task="toy", plugin="word-kd", sets=sets, seed=3)
    return build_components(resolved, torch.device("cpu"), cache_dir=tmp_path / "cache").method


def _lm_batch(vocab: int) -> dict[str, torch.Tensor]:
    """The lm task's layout: prompt + completion right-padded, labels -100 on the prompt and the padding."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, vocab, (3, 12), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 9:] = 0
    input_ids[1, 9:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :4] = -100  # the prompt
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@pytest.fixture
def spies(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts of calls to the fused and the dense divergence, as the objectives call them."""
    calls = {"fused": 0, "dense": 0}

    def counted(name: str, function: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            calls[name] += 1
            return function(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(library, "fused_linear_divergence", counted("fused", library.fused_linear_divergence))
    monkeypatch.setattr(library, "divergence", counted("dense", library.divergence))
    return calls


@pytest.mark.parametrize("vocab", [32000, FUSED_AUTO_MIN_VOCAB])
def test_auto_takes_the_fused_path_from_the_threshold_on(tmp_path: Path, spies: dict[str, int], vocab: int) -> None:
    method = _method(tmp_path, vocab)
    batch = _lm_batch(vocab)
    comparison = method.compare(batch, 0)
    # The models were asked for their final hidden states only: no (B, T, V) logits exist on either side.
    assert comparison.student.logits is None and comparison.teacher.logits is None
    assert comparison.student.final_hidden is not None and comparison.student.output_weight.shape[0] == vocab
    output = method.training_step(batch, 0)
    output.loss.backward()
    assert spies == {"fused": 1, "dense": 0}
    assert output.parts["kd/fused"] == 1.0
    # the student's prompt and padding positions are not scored
    assert output.parts["kd/positions"] == float((method.text_student.target_labels(batch) != -100).sum())


def test_auto_stays_dense_below_the_threshold(tmp_path: Path, spies: dict[str, int]) -> None:
    vocab = FUSED_AUTO_MIN_VOCAB - 1
    method = _method(tmp_path, vocab)
    output = method.training_step(_lm_batch(vocab), 0)
    assert spies == {"fused": 0, "dense": 1}
    assert output.parts["kd/fused"] == 0.0


def test_fused_false_builds_the_logits_and_gives_the_same_loss(tmp_path: Path, spies: dict[str, int]) -> None:
    vocab = 32000
    batch = _lm_batch(vocab)
    dense = _method(tmp_path, vocab, kind="forward_kl", fused=False)
    comparison = dense.compare(batch, 0)
    assert comparison.student.logits is not None and comparison.student.final_hidden is None
    dense_loss = dense.training_step(batch, 0).loss
    assert spies == {"fused": 0, "dense": 1}
    fused_loss = _method(tmp_path, vocab, kind="forward_kl").training_step(batch, 0).loss
    assert spies == {"fused": 1, "dense": 1}
    # same seed, same models: the two paths compute the same loss
    torch.testing.assert_close(fused_loss, dense_loss, rtol=1e-5, atol=1e-7)
