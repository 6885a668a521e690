"""Config layering, --set parsing and the user-facing error messages."""
from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kdcore.config import Layer, LayeredConfig, RunConfig, TrainerConfig, load_yaml_file, parse_set_option, validate_model
from kdcore.errors import KDUserError
from kdcore.registry import Registry
from kdcore.resolve import resolve_run


@pytest.fixture(scope="module")
def registry() -> Registry:
    return Registry.discover(entry_points=False)


def test_set_option_is_typed() -> None:
    assert parse_set_option("trainer.lr=0.5") == {"trainer": {"lr": 0.5}}
    assert parse_set_option("trainer.max_steps=7") == {"trainer": {"max_steps": 7}}
    assert parse_set_option("trainer.betas=[0.8, 0.9]") == {"trainer": {"betas": [0.8, 0.9]}}
    assert parse_set_option("trainer.clip_norm=null") == {"trainer": {"clip_norm": None}}
    assert parse_set_option("student.name=toy-mlp") == {"student": {"name": "toy-mlp"}}


@pytest.mark.parametrize("bad", ["trainer.lr", "=3", "a..b=1", ".a=1"])
def test_set_option_syntax_errors(bad: str) -> None:
    with pytest.raises(KDUserError, match="KEY=VALUE"):
        parse_set_option(bad)


def test_precedence_defaults_preset_config_set(registry: Registry, tmp_path: Path) -> None:
    config_file = tmp_path / "run.yaml"
    config_file.write_text("trainer:\n  max_steps: 11\n  lr: 0.01\n")
    resolved = resolve_run(registry, task="toy", plugin="vanilla", preset="tiny", config_file=config_file,
                           sets=["trainer.lr=0.02"])
    trainer = resolved.config.trainer
    assert trainer.batch_size == 64  # task default
    assert trainer.eval_every == 20  # preset beats task default (100)
    assert trainer.max_steps == 11  # config file beats preset (40)
    assert trainer.lr == 0.02  # --set beats config file
    assert resolved.data_config.n_train == 512  # preset reaches class-specific sections


def test_unknown_key_suggests_close_match(registry: Registry) -> None:
    with pytest.raises(KDUserError) as error:
        resolve_run(registry, task="toy", plugin="vanilla", sets=["trainer.lrr=0.1"])
    message = str(error.value)
    assert "trainer.lrr" in message and "Did you mean 'lr'" in message and "--set trainer.lrr=0.1" in message


def test_wrong_type_names_key_value_and_type(registry: Registry) -> None:
    with pytest.raises(KDUserError) as error:
        resolve_run(registry, task="toy", plugin="vanilla", sets=["trainer.lr=abc"])
    message = str(error.value)
    assert "trainer.lr" in message and "'abc'" in message and "a number (float)" in message


def test_bad_value_in_task_section(registry: Registry) -> None:
    with pytest.raises(KDUserError) as error:
        resolve_run(registry, task="toy", plugin="vanilla", sets=["data.n_classes=1"])
    assert "data.n_classes" in str(error.value) and "greater than or equal to 2" in str(error.value)


def test_unknown_key_in_model_args(registry: Registry) -> None:
    with pytest.raises(KDUserError) as error:
        resolve_run(registry, task="toy", plugin="vanilla", sets=["student.args.hiden=8"])
    assert "student.args.hiden" in str(error.value) and "Did you mean 'hidden'" in str(error.value)


def test_literal_lists_allowed_values(registry: Registry) -> None:
    with pytest.raises(KDUserError) as error:
        resolve_run(registry, task="toy", plugin="vanilla", sets=["trainer.precision=fp8"])
    assert "'fp8'" in str(error.value) and "'bf16'" in str(error.value)


def test_unknown_preset_lists_available(registry: Registry) -> None:
    with pytest.raises(KDUserError, match="Available presets: tiny"):
        resolve_run(registry, task="toy", plugin="vanilla", preset="huge")


def test_malformed_yaml_reports_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("trainer:\n  lr: 0.1\n  max_steps: [1, 2\n")
    with pytest.raises(KDUserError) as error:
        load_yaml_file(path)
    assert f"{path}:" in str(error.value) and "line" in str(error.value)


def test_yaml_must_be_mapping_and_cannot_execute(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(KDUserError, match="mapping"):
        load_yaml_file(path)
    evil = tmp_path / "evil.yaml"
    evil.write_text("a: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(KDUserError, match="malformed YAML"):
        load_yaml_file(evil)


def test_provenance_tracks_last_writer() -> None:
    layers = LayeredConfig()
    layers.apply(Layer("first", {"trainer": {"lr": 1, "max_steps": 2}}))
    layers.apply(Layer("second", {"trainer": {"lr": 3}}))
    assert layers.values == {"trainer": {"lr": 3, "max_steps": 2}}
    assert layers.source_of("trainer.lr") == "second" and layers.source_of("trainer.max_steps") == "first"


@settings(max_examples=60, deadline=None)
@given(key=st.sampled_from(list(TrainerConfig.model_fields)), raw=st.text(max_size=12))
def test_any_set_string_is_accepted_or_explained(key: str, raw: str) -> None:
    """Fuzz: a --set string either validates or raises KDUserError naming the key; nothing else escapes."""
    if "\x00" in raw:
        return
    try:
        override = parse_set_option(f"trainer.{key}={raw}")
    except KDUserError:
        return
    values = {"task": "toy", "plugin": "vanilla", "teacher": {"name": "t"}, "student": {"name": "s"}, **override}
    try:
        validate_model(RunConfig, values, "", None)
    except KDUserError as error:
        assert f"trainer.{key}" in str(error) or "trainer" in str(error)


def test_set_values_use_yaml_1_2_scalars() -> None:
    from kdcore.config import parse_set_option

    # YAML 1.1 would read "off"/"no" as False and "3e-4" as a string.
    assert parse_set_option("trainer.progress=off") == {"trainer": {"progress": "off"}}
    assert parse_set_option("data.lang=no") == {"data": {"lang": "no"}}
    assert parse_set_option("trainer.lr=3e-4") == {"trainer": {"lr": 3e-4}}
    assert parse_set_option("trainer.amp=true") == {"trainer": {"amp": True}}
