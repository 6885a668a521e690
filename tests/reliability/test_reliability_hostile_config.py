"""Hostile configuration: property-based fuzzing (hypothesis) of ``--set`` strings and config files.

Whatever the user types, resolving a run either succeeds or raises
:class:`~kdcore.errors.KDUserError` (the CLI's exit 2 with one paragraph) — never
another exception. A config that is accepted survives the trip through the saved
``config.yaml`` unchanged (what ``--resume`` and ``kd eval`` read back).
"""
from __future__ import annotations

import string
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdcore import cli
from kdcore.config import Layer, LayeredConfig, dump_yaml_atomic, load_yaml_file
from kdcore.errors import KDUserError
from kdcore.registry import Registry
from kdcore.resolve import resolve_run, validate_layers

REGISTRY = Registry.discover(entry_points=False)
FUZZ = settings(max_examples=500, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

REAL_KEYS = ["trainer.lr", "trainer.batch_size", "trainer.max_steps", "trainer.betas", "trainer.schedule",
             "trainer.precision", "trainer.clip_norm", "trainer.min_lr_ratio", "trainer.progress",
             "trainer.distributed", "trainer.eval_batch_size", "trainer.grad_accum", "seed", "device", "task",
             "plugin", "teacher", "teacher.name", "teacher.args", "teacher.args.hidden", "student.args.dropout",
             "student.args.layers", "student.name", "objectives", "objectives.kd", "objectives.kd.weight",
             "objectives.kd.name", "objectives.kd.args.temperature", "objectives.nll", "objectives.new.name",
             "data", "data.n_train", "data.n_classes", "data.label_noise", "method", "method.anything", "trainer"]
TOKENS = ["0", "-1", "1", "3e-4", "1e400", "-1e400", ".nan", ".inf", "-.inf", "nan", "inf", "null", "~", "true",
          "false", "on", "off", "no", "yes", "[]", "{}", "[1, 2]", "[0.9, 0.999, 3]", "{a: 1}", "[", "]", "{", "}",
          "'", '"', "!!python/object/apply:os.system ['true']", "!!binary aGk=", "&a [*a]", "*a", "2**64",
          "18446744073709551616", "-0", "0x10", "1_000", "forward_kl", "ddp", "fsdp", "toy", "vanilla", "cuda",
          "\x00", "\u202e", "é", "a" * 300, "1" * 400, "---", "key: value", "- a\n- b", "%TAG ! x", "@", "`", "|"]
keys = st.one_of(st.sampled_from(REAL_KEYS), st.text(alphabet=string.ascii_letters + "._-= []{}:0", max_size=20))
values = st.one_of(st.sampled_from(TOKENS), st.text(max_size=40),
                   st.builds(lambda a, b: f"{a}{b}", st.sampled_from(TOKENS), st.sampled_from(TOKENS)))
# Values of the right kind for many keys, so that a good share of the fuzzed configs is accepted.
plausible_values = st.one_of(values, st.integers(1, 300).map(str), st.floats(1e-6, 0.99).map(repr),
                             st.sampled_from(["[0.8, 0.99]", "{name: forward_kl}", "{weight: 0.3}", "cosine",
                                              "bf16", "fsdp", "{hidden: 8}", "{}", "null", "toy-mlp", "nll"]))
#: Keys with values of their own kind (edge values included): most such configs are accepted.
VALID: dict[str, st.SearchStrategy[str]] = {
    "trainer.lr": st.floats(1e-9, 10.0).map(repr),
    "trainer.batch_size": st.integers(1, 4096).map(str),
    "trainer.betas": st.tuples(st.floats(0, 0.9999), st.floats(0, 0.9999)).map(lambda b: f"[{b[0]!r}, {b[1]!r}]"),
    "trainer.schedule": st.sampled_from(["linear", "cosine", "constant"]),
    "trainer.min_lr_ratio": st.floats(0.0, 1.0).map(repr),
    "trainer.clip_norm": st.one_of(st.just("null"), st.floats(1e-6, 1e6).map(repr)),
    "seed": st.integers(-(2**62), 2**62).map(str),
    "student.args.hidden": st.integers(1, 4096).map(str),
    "student.args.dropout": st.floats(0.0, 0.999).map(repr),
    "objectives.kd.weight": st.floats(0.0, 1e6).map(repr),
    "objectives.kd.args.temperature": st.floats(0.01, 100.0).map(repr),
    "objectives.nll": st.sampled_from(["null", "{weight: 0.2}", "{name: nll, weight: 1}"]),
    "data.n_train": st.integers(1, 10**6).map(str),
    "data.label_noise": st.floats(0.0, 10.0).map(repr),
    "device": st.sampled_from(["cpu", "auto"]),
    "trainer.distributed": st.sampled_from(["ddp", "fsdp"]),
}
valid_pairs = st.sampled_from(sorted(VALID)).flatmap(lambda key: VALID[key].map(lambda value: f"{key}={value}"))
set_options = st.one_of(st.builds(lambda k, v: f"{k}={v}", keys, values), st.text(max_size=30))


def _resolve_or_user_error(sets: list[str], config_file: Path | None = None) -> object | None:
    try:
        return resolve_run(REGISTRY, task="toy", plugin="vanilla", sets=sets, config_file=config_file)
    except KDUserError as error:
        assert str(error).strip(), "a user error must say what is wrong"
        return None


@FUZZ
@given(st.lists(set_options, min_size=1, max_size=4))
def test_set_strings_resolve_or_give_a_user_error(figures, sets: list[str]) -> None:
    figures.update(hypothesis_inputs=1)
    _resolve_or_user_error(sets)


def _round_trip(resolved: object, directory: Path) -> None:
    """The saved config.yaml validates again to the same resolved config."""
    saved = resolved.to_dict()
    path = directory / "config.yaml"
    dump_yaml_atomic(saved, path)
    layers = LayeredConfig()
    layers.apply(Layer(str(path), load_yaml_file(path)))
    again = validate_layers(REGISTRY, layers).to_dict()
    assert yaml.safe_dump(again) == yaml.safe_dump(saved)


@FUZZ
@given(st.lists(st.one_of(valid_pairs, valid_pairs,
                          st.builds(lambda k, v: f"{k}={v}", st.sampled_from(REAL_KEYS), plausible_values)),
                min_size=1, max_size=3))
def test_accepted_configs_survive_the_saved_config_yaml(tmp_path_factory: pytest.TempPathFactory, figures,
                                                         sets: list[str]) -> None:
    figures.update(hypothesis_inputs=1)
    resolved = _resolve_or_user_error(sets)
    if resolved is not None:
        figures.update(hypothesis_accepted=1)
        _round_trip(resolved, tmp_path_factory.mktemp("round-trip"))


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
              st.text(max_size=12), st.sampled_from(TOKENS)),
    lambda children: st.one_of(st.lists(children, max_size=3),
                               st.dictionaries(st.one_of(st.sampled_from(["trainer", "lr", "data", "n_train", "kd",
                                                                          "args", "weight", "objectives", "student"]),
                                                         st.text(max_size=8)), children, max_size=3)),
    max_leaves=12)
config_documents = st.one_of(
    st.dictionaries(st.sampled_from(["trainer", "data", "student", "teacher", "objectives", "method", "seed",
                                     "task", "plugin", "device", "cache_dir_unused"]), json_values, max_size=4)
    .map(lambda d: yaml.safe_dump(d, allow_unicode=True)),
    st.text(max_size=200),
    st.binary(max_size=100).map(lambda b: b.decode("latin-1")))


@FUZZ
@given(config_documents)
def test_config_files_resolve_or_give_a_user_error(tmp_path_factory: pytest.TempPathFactory, figures,
                                                   text: str) -> None:
    figures.update(hypothesis_inputs=1)
    path = tmp_path_factory.mktemp("config") / "run.yaml"
    path.write_bytes(text.encode("utf-8", errors="surrogatepass"))
    _resolve_or_user_error([], config_file=path)


@FUZZ
@given(argv=st.lists(st.sampled_from(["run", "list", "eval", "--task", "toy", "--plugin", "vanilla", "--preset", "tiny",
                                 "nope", "--set", "trainer.lr=-1", "--seed", "x", "--device", "tpu", "--resume",
                                 "--config", "--out", "--run", "--json", "--dry-run", "-v", "=", "", "--file",
                                 "source=", "--source"]), max_size=7))
def test_command_lines_exit_0_or_2_without_traceback(tmp_path_factory: pytest.TempPathFactory, figures,
                                                    argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """Through :func:`kdcore.cli.main` in-process (fast); never a run (a hostile --out is redirected)."""
    figures.update(hypothesis_inputs=1)
    if "run" in argv and "--dry-run" not in argv:
        argv = [*argv, "--dry-run"]  # the fuzzed command lines are checked, not trained
    work = tmp_path_factory.mktemp("cli")
    argv = [arg if arg != "--out" else f"--out={work / 'out'}" for arg in argv]
    try:
        code = cli.main(argv)
    except SystemExit as exit_:  # argparse --help/--version
        code = exit_.code
    assert code in (0, 2), argv
    assert "Traceback" not in capsys.readouterr().err


NON_FINITE = ["trainer.lr=.inf", "trainer.betas=[.nan, 0.9]", "objectives.kd.weight=.inf",
              "objectives.kd.args.temperature=.inf", "data.label_noise=.inf"]


@pytest.mark.parametrize("option", NON_FINITE)
def test_non_finite_numbers_are_refused(option: str) -> None:
    with pytest.raises(KDUserError):
        resolve_run(REGISTRY, task="toy", plugin="vanilla", sets=[option])


def test_empty_training_set_is_a_clear_error_through_the_cli(tmp_path: Path, run_kd) -> None:
    result = run_kd("run", "--task", "toy", "--plugin", "vanilla", "--set", "data.n_train=0", "--out",
                    str(tmp_path / "run"), cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr and "data.n_train" in result.stderr


def test_a_task_with_an_empty_split_is_refused_before_training(tmp_path: Path) -> None:
    from kd_tasks.toy import ToyClassificationTask

    from kdcore import runner
    from kdcore.interfaces import DataSplits

    class EmptyValid(ToyClassificationTask):
        name = "toy-empty-valid"

        def build_data(self, seed: int) -> DataSplits:
            splits = super().build_data(seed)
            return DataSplits(train=splits.train, valid=[], test=splits.test)

    registry = Registry.discover(entry_points=False)
    resolved = resolve_run(registry, task="toy", plugin="vanilla", preset="tiny", sets=["trainer.progress=off"])
    resolved.task_cls = EmptyValid
    with pytest.raises(KDUserError, match="empty valid split"):
        runner.run(resolved, registry, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()
