"""student.args.init: teacher (shrink and fine-tune; weight selection for narrower students)."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from pydantic import ValidationError

from kdcore.errors import KDUserError
from kdcore.interfaces import BuildContext
from kd_plugins.text.models import Seq2SeqFactory, CausalLMFactory, TextModelConfig
from kd_plugins.text.teacher_init import init_from_teacher, spread_layers


def _context(tmp_path: Path, teacher: object = None, seed: int = 0) -> BuildContext:
    return BuildContext(task=SimpleNamespace(tokenizer=None), cache_dir=tmp_path, device=torch.device("cpu"),  # type: ignore[arg-type]
                        seed=seed, teacher=teacher)  # type: ignore[arg-type]


def _marian(tiny: SimpleNamespace, layers: tuple[int, int], d_model: int = 32, ffn: int | None = None,
            heads: int = 2) -> dict[str, Any]:
    config = tiny.config("marian", d_model=d_model)
    config.update(encoder_layers=layers[0], decoder_layers=layers[1], encoder_attention_heads=heads,
                  decoder_attention_heads=heads, encoder_ffn_dim=ffn or 2 * d_model, decoder_ffn_dim=ffn or 2 * d_model)
    return config


def _build(tmp_path: Path, config: dict[str, Any], teacher: Any = None, **init: Any) -> Any:
    # Teachers and students get different seeds, so a student left random differs from its teacher.
    seed = 7 if teacher is not None else 3
    return Seq2SeqFactory().build(TextModelConfig(config=config, **init), _context(tmp_path, teacher=teacher, seed=seed))


def test_spread_keeps_the_first_and_last_teacher_layers() -> None:
    assert spread_layers(3, 1) == [0]
    assert spread_layers(3, 2) == [0, 2]
    assert spread_layers(12, 3) == [0, 6, 11]  # DistilBART's 12 -> 3 map
    assert spread_layers(6, 3) == [0, 2, 5]  # DistilBART's 6 -> 3 map
    assert spread_layers(6, 6) == list(range(6))


def test_a_same_shape_student_from_the_teacher_is_the_teacher(tiny: SimpleNamespace, tmp_path: Path) -> None:
    teacher = _build(tmp_path, _marian(tiny, (2, 2)))
    student = _build(tmp_path, _marian(tiny, (2, 2)), teacher, init="teacher")
    random_student = _build(tmp_path, _marian(tiny, (2, 2)), teacher)
    batch = tiny.batch(4)
    teacher_logits = teacher.hf_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                      labels=batch["labels"]).logits
    student.hf_model.eval()
    student_logits = student.hf_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                      labels=batch["labels"]).logits
    random_logits = random_student.hf_model.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                                   labels=batch["labels"]).logits
    torch.testing.assert_close(student_logits, teacher_logits)
    assert (random_logits - teacher_logits).abs().max() > 0.1


def test_a_shallow_student_copies_the_mapped_layers(tiny: SimpleNamespace, tmp_path: Path) -> None:
    teacher = _build(tmp_path, _marian(tiny, (3, 3)))
    student = _build(tmp_path, _marian(tiny, (2, 1)), teacher, init="teacher",
                     init_layers={"encoder": [2, 1], "decoder": [2]})
    teacher_weights, student_weights = dict(teacher.hf_model.named_parameters()), dict(student.hf_model.named_parameters())
    for student_name, teacher_name in [("model.encoder.layers.0.fc1.weight", "model.encoder.layers.2.fc1.weight"),
                                       ("model.encoder.layers.1.self_attn.q_proj.bias",
                                        "model.encoder.layers.1.self_attn.q_proj.bias"),
                                       ("model.decoder.layers.0.encoder_attn.v_proj.weight",
                                        "model.decoder.layers.2.encoder_attn.v_proj.weight"),
                                       ("model.shared.weight", "model.shared.weight")]:
        assert torch.equal(student_weights[student_name], teacher_weights[teacher_name]), student_name
    # The default map spreads the layers: encoder [0, 2], decoder [0].
    spread = _build(tmp_path, _marian(tiny, (2, 1)), teacher, init="teacher")
    assert torch.equal(dict(spread.hf_model.named_parameters())["model.encoder.layers.1.fc2.weight"],
                       teacher_weights["model.encoder.layers.2.fc2.weight"])
    assert torch.equal(dict(spread.hf_model.named_parameters())["model.decoder.layers.0.fc2.weight"],
                       teacher_weights["model.decoder.layers.0.fc2.weight"])


def test_weight_selection_takes_evenly_spaced_coordinates(tiny: SimpleNamespace, tmp_path: Path) -> None:
    teacher = _build(tmp_path, _marian(tiny, (2, 2), d_model=32, ffn=64))
    student = _build(tmp_path, _marian(tiny, (1, 1), d_model=16, ffn=48), teacher, init="teacher",
                     init_width="select")
    teacher_weights, student_weights = dict(teacher.hf_model.named_parameters()), dict(student.hf_model.named_parameters())
    rows = torch.arange(48) * 64 // 48  # FFN 64 -> 48: not a whole ratio
    columns = torch.arange(16) * 2      # d_model 32 -> 16
    torch.testing.assert_close(student_weights["model.encoder.layers.0.fc1.weight"],
                               teacher_weights["model.encoder.layers.0.fc1.weight"][rows][:, columns])
    # Token rows are never selected: the vocabulary dimension has the same size.
    torch.testing.assert_close(student_weights["model.shared.weight"], teacher_weights["model.shared.weight"][:, columns])
    # Each student head takes its coordinates from the same teacher head (2 heads of 16 -> 2 heads of 8).
    query = student_weights["model.decoder.layers.0.self_attn.q_proj.weight"]
    torch.testing.assert_close(query[8:], teacher_weights["model.decoder.layers.0.self_attn.q_proj.weight"][16:32:2][:, columns])
    # The frozen sinusoidal positions stay the student's own (transformers recomputes them on load).
    assert student_weights["model.encoder.embed_positions.weight"].shape == (64, 16)


def test_refusals_name_the_setting_and_the_fix(tiny: SimpleNamespace, tmp_path: Path) -> None:
    teacher = _build(tmp_path, _marian(tiny, (2, 2)))
    with pytest.raises(KDUserError, match="init_width: select"):
        _build(tmp_path, _marian(tiny, (1, 1), d_model=16), teacher, init="teacher")
    with pytest.raises(KDUserError, match="attention_heads is 4 and the teacher.s 2"):
        _build(tmp_path, _marian(tiny, (1, 1), heads=4), teacher, init="teacher")
    with pytest.raises(KDUserError, match=r"layers 0\.\.1"):
        _build(tmp_path, _marian(tiny, (1, 1)), teacher, init="teacher", init_layers={"decoder": [2]})
    with pytest.raises(KDUserError, match="one teacher layer index per student layer"):
        _build(tmp_path, _marian(tiny, (1, 1)), teacher, init="teacher", init_layers={"encoder": [0, 1]})
    with pytest.raises(KDUserError, match="layer stacks are"):
        _build(tmp_path, _marian(tiny, (1, 1)), teacher, init="teacher", init_layers={"layers": [0]})
    with pytest.raises(KDUserError, match="can only narrow"):
        _build(tmp_path, _marian(tiny, (1, 1), d_model=64), teacher, init="teacher", init_width="select")
    with pytest.raises(KDUserError, match="'bart' model"):
        _build(tmp_path, {**tiny.config("bart"), "encoder_layers": 1, "decoder_layers": 1}, teacher, init="teacher")
    wider_vocabulary = {**_marian(tiny, (1, 1)), "vocab_size": tiny.VOCAB + 8}
    with pytest.raises(KDUserError, match="vocabularies must be the same"):
        init_from_teacher(_build(tmp_path, wider_vocabulary).hf_model, teacher.hf_model, None, "select")
    with pytest.raises(ValidationError, match="need init: teacher or auto"):
        TextModelConfig(config=_marian(tiny, (1, 1)), init_layers={"encoder": [0]})
    with pytest.raises(ValidationError, match="need init: teacher or auto"):
        TextModelConfig(config=_marian(tiny, (1, 1)), init_width="select")
    for init in ("teacher", "auto"):
        with pytest.raises(ValidationError, match="Give one of the two"):
            TextModelConfig(source="somewhere", init=init)
    with pytest.raises(KDUserError, match="teacher.args.init"):
        Seq2SeqFactory().build(TextModelConfig(config=_marian(tiny, (1, 1)), init="teacher"), _context(tmp_path))


def test_auto_copies_where_the_teacher_allows_and_otherwise_keeps_random_weights_and_says_why(
        tiny: SimpleNamespace, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    teacher = _build(tmp_path, _marian(tiny, (2, 2)))
    copied = _build(tmp_path, _marian(tiny, (1, 1), d_model=16), teacher, init="auto", init_width="select")
    selected = _build(tmp_path, _marian(tiny, (1, 1), d_model=16), teacher, init="teacher", init_width="select")
    assert all(torch.equal(a, b) for a, b in zip(copied.hf_model.state_dict().values(),
                                                 selected.hf_model.state_dict().values()))
    # Other head counts: init: teacher refuses; auto builds the student as init: random would (same seed).
    with caplog.at_level(logging.INFO):
        fallback = _build(tmp_path, _marian(tiny, (1, 1), heads=4), teacher, init="auto", init_width="select")
    assert "starts from random weights" in caplog.text and "attention_heads is 4" in caplog.text
    random_student = _build(tmp_path, _marian(tiny, (1, 1), heads=4), teacher)
    assert all(torch.equal(a, b) for a, b in zip(fallback.hf_model.state_dict().values(),
                                                 random_student.hf_model.state_dict().values()))
    # A teacher without a transformers model in memory (a stored teacher): random weights, said in the log.
    caplog.clear()
    with caplog.at_level(logging.INFO):
        _build(tmp_path, _marian(tiny, (1, 1)), SimpleNamespace(vocab_size=tiny.VOCAB), init="auto")
    assert "holds no transformers model" in caplog.text


def test_a_refused_selection_leaves_the_student_as_built(tiny: SimpleNamespace, tmp_path: Path) -> None:
    teacher = _build(tmp_path, _marian(tiny, (2, 2)))
    student = _build(tmp_path, _marian(tiny, (1, 1)), teacher)
    before = {name: value.clone() for name, value in student.hf_model.state_dict().items()}
    teacher_hf = _build(tmp_path, {**_marian(tiny, (2, 2)), "encoder_ffn_dim": 16}).hf_model  # narrower FFN
    with pytest.raises(KDUserError, match="can only narrow"):
        init_from_teacher(student.hf_model, teacher_hf, None, "select")
    assert all(torch.equal(before[name], value) for name, value in student.hf_model.state_dict().items())


def test_a_decoder_only_student_copies_its_teachers_layers(tmp_path: Path) -> None:
    from kd_tasks.text.presets import llama_config

    teacher_config = llama_config(32, layers=3, d_model=32, heads=2, ffn_dim=64)
    teacher = CausalLMFactory().build(TextModelConfig(config=teacher_config), _context(tmp_path))
    student = CausalLMFactory().build(
        TextModelConfig(config=llama_config(32, layers=1, d_model=16, heads=2, ffn_dim=32), init="teacher",
                        init_layers={"decoder": [2]}, init_width="select"),
        _context(tmp_path, teacher=teacher))
    teacher_weights, student_weights = dict(teacher.hf_model.named_parameters()), dict(student.hf_model.named_parameters())
    torch.testing.assert_close(student_weights["model.layers.0.mlp.down_proj.weight"],
                               teacher_weights["model.layers.2.mlp.down_proj.weight"][::2, ::2])
    torch.testing.assert_close(student_weights["model.norm.weight"], teacher_weights["model.norm.weight"][::2])
