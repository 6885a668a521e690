"""``kd teacher capture``: run a teacher once over a task's data and write a teacher store (docs/teacher-store.md).

The task and teacher are resolved exactly as ``kd run`` resolves them (defaults < preset < --config < --set), so
the store holds the signals of the teacher a run with the same options would build; the run then reads them with
``--set teacher=store --set teacher.args.path=STORE``.
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
    capture = actions.add_parser("capture", help="write a teacher store: top-k logits with tail mass per position")
    capture.add_argument("--task", help="registered task name (kd list)")
    capture.add_argument("--plugin", default="word-kd",
                         help="the plugin whose task/teacher defaults apply (default word-kd)")
    capture.add_argument("--preset", help="a named preset of the task or plugin")
    capture.add_argument("--config", help="YAML file with config values (as for kd run)")
    capture.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                         help="override one config value, e.g. teacher.args.source=DIR (repeatable)")
    capture.add_argument("--teacher", help="teacher name (same as --set teacher=NAME)")
    capture.add_argument("--out", required=True, help="the store directory (new, empty, or an unfinished capture)")
    capture.add_argument("--split", default="train", choices=["train", "valid", "test"], help="default train")
    capture.add_argument("--top-k", type=int, default=64, help="logits kept per position (default 64)")
    capture.add_argument("--dtype", default="float16", help="float16 (default), bfloat16 or float32 values")
    capture.add_argument("--full-logits", action="store_true", help="store every logit instead of the top k")
    capture.add_argument("--temperature", type=float, default=1.0,
                         help="temperature of the stored tail mass: the objectives' temperature (default 1)")
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
    from kdcore.teacher_store import CaptureSettings, StoredTeacher, capture, capture_worker_shard

    if args.action != "capture":
        raise KDUserError("kd teacher needs an action: capture (e.g. 'kd teacher capture --task wmt --out STORE').")
    sets = list(args.sets) + ([f"teacher={args.teacher}"] if args.teacher else [])
    registry = Registry.discover()
    resolved = resolve_run(registry, task=args.task, plugin=args.plugin, preset=args.preset, config_file=args.config,
                           sets=sets, seed=args.seed, device=args.device)
    settings = CaptureSettings(split=args.split, top_k=args.top_k, values_dtype=args.dtype,
                               full_logits=args.full_logits, temperature=args.temperature,
                               shard_examples=args.shard_examples)
    settings.check()
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
    result = capture(task, teacher, getattr(splits, args.split), Path(args.out).expanduser(), settings,
                     teacher_config=teacher_config, device=device, batch_size=args.batch_size, shard=shard,
                     teacher_metrics=metrics)
    done = "complete" if result.complete else "waiting for the other shards' captures"
    print(f"Teacher store {result.directory}: {result.written_shards} shard(s) written, {result.skipped_shards} "
          f"already there, in {result.seconds:.1f} s; {done}. Train from it with --set teacher=store "
          f"--set teacher.args.path={result.directory}")
    return 0


__all__ = ["add_teacher_parser", "run_teacher_command"]
