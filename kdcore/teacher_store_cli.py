"""``kd teacher capture``: run a teacher once over a task's data and write a teacher store (docs/teacher-store.md).

The task and teacher are resolved exactly as ``kd run`` resolves them (defaults < preset < --config < --set), so
the store holds the signals of the teacher a run with the same options would build; the run then reads them with
``--set teacher.name=store --set teacher.args.path=STORE``.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from kdcore.errors import KDUserError

log = logging.getLogger(__name__)


def add_teacher_parser(commands: Any) -> None:
    """The ``kd teacher`` subcommand (action: ``capture``) on the ``kd`` command's subparsers."""
    teacher = commands.add_parser("teacher", help="run a teacher once and store its signals (kd teacher capture)")
    actions = teacher.add_subparsers(dest="action", metavar="ACTION", parser_class=type(teacher))
    capture = actions.add_parser("capture", help="write a teacher store: top-k logits with tail mass per position, "
                                                 "hidden states or output sequences")
    capture.add_argument("--task", help="registered task name (kd list)")
    capture.add_argument("--plugin",
                         help="the plugin you will train with: its task/teacher defaults apply and its objectives "
                              "choose the default --signals (default word-kd)")
    capture.add_argument("--preset", help="a named preset of the task or plugin")
    capture.add_argument("--config", help="YAML file with config values (as for kd run)")
    capture.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                         help="override one config value, e.g. teacher.args.source=DIR (repeatable)")
    capture.add_argument("--teacher", help="teacher name (same as --set teacher=NAME)")
    capture.add_argument("--out", required=True, help="the store directory (new, empty, or an unfinished capture)")
    capture.add_argument("--split", default="train", choices=["train", "valid", "test"], help="default train")
    capture.add_argument("--signals", metavar="LIST",
                         help="comma list of logits, hidden_states, sequences (default: what --plugin's method and "
                              "objectives read from the teacher: logits for word-kd, sequences for seq-kd, "
                              "hidden_states for distilhubert/gendistiller)")
    capture.add_argument("--top-k", type=int, help="logits: kept per position (default 64)")
    capture.add_argument("--dtype", default="float16",
                         help="float16 (default), bfloat16 or float32 logit values and hidden states")
    capture.add_argument("--full-logits", action="store_true", help="logits: store every logit besides the top k")
    capture.add_argument("--temperature", type=float,
                         help="logits: temperature of the stored tail mass, the objectives' temperature (default 1)")
    capture.add_argument("--layers", metavar="LIST",
                         help="hidden_states: comma list of the teacher layers to store (default: all)")
    capture.add_argument("--shard", metavar="I/N", help="capture only shards i, i+n, ... (default: torchrun rank)")
    capture.add_argument("--shard-examples", type=int, default=512, help="examples per shard (default 512)")
    capture.add_argument("--batch-size", type=int, default=32, help="teacher batch size (default 32)")
    capture.add_argument("--no-evaluate", action="store_true",
                         help="do not score the teacher on the test split (runs then need trainer.evaluate_teacher"
                              "=false)")
    capture.add_argument("--seed", type=int, help="random seed (as for kd run)")
    capture.add_argument("--device", choices=["cpu", "cuda", "auto"], help="device")


def run_teacher_command(args: argparse.Namespace) -> int:
    """Run ``kd teacher capture``; returns the exit code."""
    import torch

    from kdcore.evaluation import evaluate_model
    from kdcore.registry import Registry
    from kdcore.resolve import BuiltRun, build_task_and_teacher, resolve_run, select_device
    from kdcore.runner import check_cache_dir
    from kdcore.seeding import seed_everything
    from kdcore.teacher_store import StoredTeacher, capture, capture_worker_shard

    if args.action != "capture":
        raise KDUserError("kd teacher needs an action: capture (e.g. 'kd teacher capture --task wmt --out STORE').")
    sets = list(args.sets) + ([f"teacher={args.teacher}"] if args.teacher else [])
    registry = Registry.discover()
    try:
        resolved = resolve_run(registry, task=args.task, plugin=args.plugin or "word-kd", preset=args.preset,
                               config_file=args.config, sets=sets, seed=args.seed, device=args.device)
    except KDUserError as error:
        if args.plugin:
            raise
        raise KDUserError(f"{error} (kd teacher capture resolves the task and teacher as 'kd run --plugin word-kd' "
                          f"would, without --plugin: pass the --plugin you will train with, e.g. --plugin "
                          f"distilhubert for a speech task.)") from None
    signals = tuple(part.strip() for part in args.signals.split(",")) if args.signals else default_signals(resolved)
    settings = _settings(args, signals, resolved)
    if args.batch_size < 1:
        raise KDUserError(f"kd teacher capture: --batch-size must be at least 1, got {args.batch_size}.")
    shard = capture_worker_shard(args.shard)
    check_cache_dir(resolved)
    device = select_device(resolved.config.device)
    seed_everything(resolved.config.seed)
    task, teacher, _ = build_task_and_teacher(resolved, device, registry=registry)
    if isinstance(teacher, StoredTeacher):
        raise KDUserError("kd teacher capture runs a teacher model; teacher 'store' is already a capture.")
    splits = task.build_data(resolved.config.seed)
    metrics: dict[str, float] = {}
    if not args.no_evaluate and shard[0] == 0:
        built = BuiltRun(resolved, task, teacher, None, None, device)  # type: ignore[arg-type]
        with torch.no_grad():
            metrics = evaluate_model(built, teacher, splits.test, args.batch_size)
        log.info("Teacher on the test split: %s", ", ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items())))
    teacher_config = {"name": resolved.config.teacher.name,
                      "args": resolved.teacher_config.model_dump(mode="json")}
    decode = None
    if settings.sequences is not None:
        method_cls, method_config = resolved.method_cls, resolved.method_config
        decode = lambda model, batch: method_cls.decode_teacher_sequences(model, method_config, batch)  # noqa: E731
    result = capture(task, teacher, getattr(splits, args.split), Path(args.out).expanduser(), settings,
                     teacher_config=teacher_config, device=device, batch_size=args.batch_size, shard=shard,
                     teacher_metrics=metrics, decode_sequences=decode)
    done = "complete" if result.complete else "waiting for the other shards' captures"
    print(f"Teacher store {result.directory}: {result.written_shards} shard(s) written, {result.skipped_shards} "
          f"already there, in {result.seconds:.1f} s ({', '.join(settings.signals)}); {done}. Train from it with "
          f"--set teacher.name=store --set teacher.args.path={result.directory}")
    return 0


def default_signals(resolved: Any) -> tuple[str, ...]:
    """What a run with these options reads from its teacher: the signals its objectives ask the teacher for
    (logits, hidden states), and the teacher's output sequences where the method learns from them (seq-kd)."""
    from kdcore.signals import OPTIONAL_SIGNALS, Signal

    asked: set[Signal] = set()
    for item in resolved.objectives:
        requested = item.cls(item.config).teacher_request().signals
        asked |= (requested - OPTIONAL_SIGNALS) | ({Signal.LOGITS} if requested & OPTIONAL_SIGNALS else set())
    signals = [signal.value for signal in (Signal.LOGITS, Signal.HIDDEN_STATES) if signal in asked]
    if hasattr(resolved.method_cls, "decode_teacher_sequences"):
        signals.append(Signal.SEQUENCES.value)
    if not signals:
        raise KDUserError(f"kd teacher capture: plugin '{resolved.method_cls.name}' with these objectives reads "
                          f"nothing from its teacher, so there is nothing to capture; pass --signals, or the "
                          f"--plugin you will train with.")
    return tuple(signals)


def _settings(args: argparse.Namespace, signals: tuple[str, ...], resolved: Any) -> Any:
    """The capture settings of the command line, refusing options of signals it does not capture."""
    from kdcore.signals import Signal
    from kdcore.teacher_store import CaptureSettings

    def unused(signal: Signal, options: dict[str, Any]) -> None:
        given = [name for name, value in options.items() if value is not None and value is not False]
        if given and signal.value not in signals:
            raise KDUserError(f"kd teacher capture: {', '.join(given)} set(s) the {signal.value} signal, which "
                              f"--signals {','.join(signals)} does not capture.")

    unused(Signal.LOGITS, {"--top-k": args.top_k, "--full-logits": args.full_logits,
                           "--temperature": args.temperature})
    unused(Signal.HIDDEN_STATES, {"--layers": args.layers})
    layers = None
    if args.layers:
        try:
            layers = tuple(int(part) for part in args.layers.split(","))
        except ValueError:
            raise KDUserError(f"kd teacher capture: --layers must be a comma list of layer numbers (e.g. 4,8,12), "
                              f"got {args.layers!r}.") from None
    sequences = None
    if Signal.SEQUENCES.value in signals:
        method_cls = resolved.method_cls
        if not hasattr(method_cls, "decode_teacher_sequences"):
            raise KDUserError(f"kd teacher capture --signals sequences: plugin '{method_cls.name}' does not make "
                              f"teacher output sequences; pass --plugin seq-kd (its method.* options choose the "
                              f"decoding).")
        sequences = method_cls.decoding_settings(resolved.method_config)
    settings = CaptureSettings(split=args.split, signals=signals,
                               top_k=64 if args.top_k is None else args.top_k, values_dtype=args.dtype,
                               full_logits=args.full_logits,
                               temperature=1.0 if args.temperature is None else args.temperature,
                               shard_examples=args.shard_examples, layers=layers, sequences=sequences)
    settings.check()
    return settings


__all__ = ["add_teacher_parser", "default_signals", "run_teacher_command"]
