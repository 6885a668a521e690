"""The ``kd`` command: run, list, eval, summarize, sweep, export, --version.

User errors (unknown names, bad config values, malformed YAML, missing files)
print one paragraph and exit with code 2, never a traceback.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from kdcore.errors import EXIT_USER_ERROR, KDUserError
from kdcore.progress import quiet_library_bars

log = logging.getLogger("kd")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own errors: same exit code, no traceback
        self.print_usage(sys.stderr)
        raise KDUserError(message)


def _parser() -> argparse.ArgumentParser:
    from kdcore import __version__

    parser = _Parser(prog="kd", description="Plug-in knowledge distillation for speech and text.")
    parser.add_argument("--version", action="version", version=f"kd {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    run = commands.add_parser("run", help="distil a student (or --dry-run to plan)")
    run.add_argument("--task", help="registered task name (kd list)")
    run.add_argument("--plugin", help="registered plugin (method) name (kd list)")
    run.add_argument("--preset", help="a named preset of the task or plugin")
    run.add_argument("--config", help="YAML file with config values")
    run.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                     help="override one config value, e.g. trainer.lr=3e-4 (repeatable)")
    run.add_argument("--out", help="output directory (default runs/<task>-<plugin>-<time>)")
    run.add_argument("--resume", action="store_true", help="continue the run in --out (or the newest matching run)")
    run.add_argument("--dry-run", action="store_true", help="build teacher, student and data, write plan.json, exit")
    run.add_argument("--seed", type=int, help="random seed (overrides the config)")
    run.add_argument("--device", choices=["cpu", "cuda", "auto"], help="device (overrides the config)")

    listing = commands.add_parser("list", help="show registered plugins, tasks, objectives, teachers, students, trackers")
    listing.add_argument("--json", action="store_true", help="machine-readable output")

    evaluate = commands.add_parser("eval", help="evaluate the saved student of a run again")
    evaluate.add_argument("--run", required=True, help="the run directory (a kd run --out)")
    evaluate.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    evaluate.add_argument("--source", help="your own test set: source text, one sentence per line")
    evaluate.add_argument("--reference", help="your own test set: reference text, one sentence per line")
    evaluate.add_argument("--file", dest="files", action="append", default=[], metavar="ROLE=PATH",
                          help="another evaluation file role the task accepts (repeatable)")

    summary = commands.add_parser("summarize", help="mean ± std of finished runs (one row per group of seeds)")
    summary.add_argument("groups", nargs="+", metavar="[LABEL=]GLOB",
                         help="run directories of one row, e.g. gendistiller='runs/gen-s*' (quote the glob)")
    summary.add_argument("--metric", dest="metrics", action="append", metavar="NAME",
                         help="a student metric column (repeatable; default: every metric the runs share)")
    summary.add_argument("--no-teacher", action="store_true", help="leave out the teacher row(s)")
    summary.add_argument("--skip-unfinished", action="store_true",
                         help="leave out run directories without metrics.json (still running or interrupted)")
    summary.add_argument("--decimals", type=int, default=3, help="decimals in the table (default 3)")
    summary.add_argument("--out", help="also write the Markdown table here, and the raw values to OUT.json")
    summary.add_argument("--baseline", metavar="LABEL",
                         help="also test every other group against this one (Welch's t-test per metric)")
    summary.add_argument("--bootstrap", action="store_true",
                         help="with --baseline: also a paired bootstrap over the test items, from the per-item "
                              "statistics the runs recorded (test_items.json)")
    summary.add_argument("--resamples", type=int, help="--bootstrap resamples (default 1000)")

    export = commands.add_parser("export", help="write a finished run's student as transformers/ONNX/... files "
                                                "with a model card (docs/export.md)")
    export.add_argument("--run", required=True, help="the finished run directory (a kd run --out)")
    export.add_argument("--out", required=True, help="new directory for the export (must not exist or be empty)")
    export.add_argument("--format", dest="export_format",
                        help="hf (transformers), onnx, safetensors (kd loader); default: the student's first format")
    export.add_argument("--checkpoint", help="export this checkpoint (checkpoints/step-N) instead of the best student")
    export.add_argument("--license", default="other", help="license id for the model card header (default: other)")

    sweep = commands.add_parser("sweep", help="run methods × seeds from a sweep file, then summarize them")
    sweep.add_argument("file", help="sweep YAML (task, seeds, jobs, threads, set, runs; docs/architecture.md, \"kd sweep\")")
    sweep.add_argument("--out", help="directory of the sweep's runs (default runs/sweeps/<file name>)")
    sweep.add_argument("--jobs", type=int, help="runs at a time (overrides the file's jobs)")
    sweep.add_argument("--dry-run", action="store_true", help="validate and print the kd run commands, run nothing")

    from kdcore.cache_cli import add_cache_parser

    add_cache_parser(commands)
    from kdcore.teacher_store_cli import add_teacher_parser

    add_teacher_parser(commands)
    return parser


def _latest_run(task: str | None, plugin: str | None) -> Path:
    runs = Path("runs")
    pattern = f"{task or '*'}-{plugin or '*'}-*"
    candidates = sorted((p for p in runs.glob(pattern) if (p / "config.yaml").exists()), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise KDUserError(f"--resume without --out found no run matching runs/{pattern}. Pass --out DIR of the run "
                          f"to continue.")
    return candidates[-1]


def _cmd_run(args: argparse.Namespace) -> int:
    from kdcore import runner
    from kdcore.registry import Registry
    from kdcore.resolve import resolve_run, resolve_saved_run

    registry = Registry.discover()
    _warn_failures(registry)
    if args.resume:
        out_dir = Path(args.out) if args.out else _latest_run(args.task, args.plugin)
        if not (out_dir / "config.yaml").exists():
            raise KDUserError(f"--resume: '{out_dir}' holds no kd run (no config.yaml). Start it without --resume.")
        extra = list(args.sets)
        if args.seed is not None or args.device is not None or args.preset or args.config:
            raise KDUserError("--resume continues a run with its saved config.yaml; only --set may be combined with "
                              "it (e.g. --set trainer.max_steps=2000), not --preset/--config/--seed/--device.")
        resolved = resolve_saved_run(registry, out_dir, extra)
        for flag, saved in (("task", resolved.config.task), ("plugin", resolved.config.plugin)):
            given = getattr(args, flag)
            if given and given != saved:
                raise KDUserError(f"--resume: the run in '{out_dir}' has {flag} '{saved}', not '{given}'.")
    else:
        resolved = resolve_run(registry, task=args.task, plugin=args.plugin, preset=args.preset,
                               config_file=args.config, sets=args.sets, seed=args.seed, device=args.device)
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        out_dir = Path(args.out) if args.out else Path("runs") / f"{resolved.config.task}-{resolved.config.plugin}-{stamp}"
        if not args.dry_run and (out_dir / "checkpoints").exists():
            raise KDUserError(f"'{out_dir}' already holds a run with checkpoints. Pass --resume to continue it, or "
                              f"choose another --out.")
    _ensure_writable(out_dir)
    if args.dry_run:
        summary = runner.plan(resolved, out_dir)
        print(f"Plan for task '{summary['task']}' with plugin '{summary['plugin']}' on {summary['device']}:")
        print(f"  teacher parameters: {summary['params']['teacher']:,}")
        print(f"  student parameters: {summary['params']['student']:,} "
              f"({summary['params']['student'] / max(1, summary['params']['teacher']):.1%} of the teacher)")
        print(f"  data: {summary['data']}")
        print(f"  objectives: {summary['objectives']}")
        print(f"Wrote {out_dir / 'plan.json'} (dry run: nothing trained).")
        return 0
    started = time.monotonic()
    metrics = runner.run(resolved, registry, out_dir, resume=args.resume)
    stopped = metrics.get("stopped_early")
    if stopped:
        print(f"Stopped early at step {stopped['step']} of {stopped['max_steps']}: {stopped['reason']}.")
    # the whole command's time (data, teacher, training, test evaluation), and the training part of it
    print(f"Done in {time.monotonic() - started:.1f} s (training {metrics['train_seconds']:.1f} s). Test "
          f"{metrics['metric']}: student "
          f"{metrics['student'][metrics['metric']]:.4g}"
          + (f", teacher {metrics['teacher'][metrics['metric']]:.4g}" if metrics["teacher"] else "")
          + f". Results: {out_dir / 'metrics.json'}, {out_dir / 'report.md'}")
    return 0


def _ensure_writable(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".kd-write-test-{os.getpid()}"  # ranks under torchrun probe at once
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise KDUserError(f"The output directory '{out_dir}' is not writable ({error.strerror or error}). "
                          f"Choose another --out.") from None


def _warn_failures(registry: "object") -> None:
    for failure in getattr(registry, "failures", []):
        log.warning("Plugin '%s' (%s) failed to load: %s. The other plugins keep working.",
                    failure.name, failure.source, failure.error)


def _cmd_list(args: argparse.Namespace) -> int:
    from kdcore.registry import KINDS, Registry

    registry = Registry.discover()
    if args.json:
        data = {kind.section: [{"name": e.name, "description": e.description, "source": e.source}
                               for e in sorted(registry.entries[key].values(), key=lambda e: e.name)]
                for key, kind in KINDS.items()}
        data["failures"] = [vars(f) for f in registry.failures]
        print(json.dumps(data, indent=2))
        return 0
    for key, kind in KINDS.items():
        entries = sorted(registry.entries[key].values(), key=lambda e: e.name)
        print(f"{kind.section} ({len(entries)}):")
        width = max((len(e.name) for e in entries), default=0)
        for entry in entries:
            print(f"  {entry.name.ljust(width)}  {entry.description}  [{entry.source}]")
        print()
    if registry.failures:
        print("plugins that failed to load:")
        for failure in registry.failures:
            print(f"  {failure.name}  [{failure.source}]  {failure.error}")
    return 0


def _eval_files(args: argparse.Namespace) -> dict[str, Path]:
    from kdcore.errors import KDUserError

    files: dict[str, Path] = {}
    pairs = [("source", args.source), ("reference", args.reference)]
    for option in args.files:
        role, sep, path = option.partition("=")
        if not sep or not role or not path:
            raise KDUserError(f"--file '{option}' is not of the form ROLE=PATH (e.g. --file source=test.en).")
        pairs.append((role, path))
    for role, path in pairs:
        if path is None:
            continue
        if not Path(path).is_file():
            raise KDUserError(f"--{role} '{path}' does not exist or is not a file; pass a readable text file.")
        files[role] = Path(path)
    return files


def _cmd_eval(args: argparse.Namespace) -> int:
    from kdcore import runner
    from kdcore.io import atomic_write_json
    from kdcore.registry import Registry
    from kdcore.resolve import resolve_saved_run

    run_dir = Path(args.run)
    registry = Registry.discover()
    resolved = resolve_saved_run(registry, run_dir, args.sets)
    files = _eval_files(args)
    metrics, metadata = runner.evaluate_saved(resolved, run_dir, files)
    split = {role: str(path) for role, path in files.items()} if files else "test"
    name = "eval-files.json" if files else "eval.json"
    atomic_write_json(run_dir / name, {"split": split, "student": metrics,
                                        "metric_metadata": metadata})
    for name, value in metrics.items():
        print(f"{name}: {value:.6g}")
    return 0


def _summary_table(groups: list[tuple[str, list[Path]]], metric_names: list[str] | None, *, include_teacher: bool,
                   decimals: int, baseline: str | None, bootstrap: bool,
                   resamples: int | None) -> tuple[list, list[str], str, str]:
    """The summary table of ``kd summarize`` and ``kd sweep``: mean ± std per group, then, against ``baseline``,
    Welch's t over seeds and (``bootstrap``) the paired bootstrap over test items. Returns rows, metrics, task and
    the Markdown text."""
    from kdcore.summary import markdown_table, markdown_welch, summarize, welch_tests

    rows, metrics, task = summarize(groups, metric_names, include_teacher=include_teacher)
    table = markdown_table(rows, metrics, decimals)
    single = sorted({row.label for row in rows if row.label != "teacher"
                     and any(len(row.values.get(metric, [])) < 2 for metric in metrics)})
    if baseline and bootstrap and single:
        # one seed per group still has a paired bootstrap over the items; Welch's test over seeds needs two
        table += (f"\nWelch's t-test over seeds: not computed, since {', '.join(single)} "
                  f"{'has' if len(single) == 1 else 'have'} fewer than two runs.\n")
    elif baseline:
        table += "\n" + markdown_welch(welch_tests(rows, metrics, baseline), baseline, decimals)
    if bootstrap and baseline:
        from kdcore.significance import DEFAULT_RESAMPLES, bootstrap_groups, markdown_bootstrap

        results, skipped = bootstrap_groups(dict(groups), baseline, metrics, resamples or DEFAULT_RESAMPLES)
        table += "\n" + markdown_bootstrap(results, baseline, skipped, decimals)
    return rows, metrics, task, table


def _cmd_summarize(args: argparse.Namespace) -> int:
    from kdcore.summary import parse_group

    groups = [parse_group(spec, args.skip_unfinished) for spec in args.groups]
    if args.bootstrap and not args.baseline:
        raise KDUserError("kd summarize --bootstrap compares every group with a baseline group; name it with "
                          "--baseline LABEL.")
    if args.resamples is not None and not args.bootstrap:
        raise KDUserError("kd summarize --resamples sets the paired bootstrap's resamples; add --bootstrap (with "
                          "--baseline LABEL), or leave --resamples out.")
    if args.resamples is not None and args.resamples < 1:
        raise KDUserError(f"kd summarize --resamples {args.resamples}: give a positive number of resamples.")
    rows, metrics, task, table = _summary_table(groups, args.metrics, include_teacher=not args.no_teacher,
                                                decimals=args.decimals, baseline=args.baseline,
                                                bootstrap=args.bootstrap, resamples=args.resamples)
    print(table, end="")
    if args.out:
        out = Path(args.out)
        _ensure_writable(out.parent)
        _write_summary(out, rows, metrics, task, table)
    return 0


def _write_summary(path: Path, rows: list, metrics: list[str], task: str, table: str) -> None:
    """The Markdown table at ``path`` and the raw per-run values next to it (``.json``)."""
    from kdcore.io import atomic_write_json, atomic_write_text
    from kdcore.summary import summary_json

    atomic_write_text(path, f"Task `{task}`: mean ± sample standard deviation over n runs.\n\n{table}")
    atomic_write_json(path.with_suffix(".json"), summary_json(rows, metrics, task))


def _cmd_sweep(args: argparse.Namespace) -> int:
    import shlex

    from kdcore.sweep import load_sweep, plan_jobs, run_sweep, summary_groups, validate_entries

    if args.jobs is not None and args.jobs < 1:
        raise KDUserError(f"--jobs {args.jobs}: expected a positive number of runs at a time.")
    config = load_sweep(args.file)
    validate_entries(config, args.file)
    out = Path(args.out) if args.out else Path("runs") / "sweeps" / Path(args.file).stem
    jobs = plan_jobs(config, out)
    if args.dry_run:
        for job in jobs:
            state = "finished, skipped" if job.finished else "to run"
            print(f"# {job.label}, seed {job.seed} ({state})\nkd {shlex.join(job.arguments)}")
        return 0
    _ensure_writable(out)
    results = run_sweep(config, out, args.jobs)
    failed = [job for job, returncode in results if returncode != 0]
    groups = summary_groups(config, out)
    if groups:
        rows, metrics, task, table = _summary_table(groups, config.metrics, include_teacher=config.include_teacher,
                                                    decimals=config.decimals, baseline=config.baseline,
                                                    bootstrap=config.bootstrap, resamples=config.resamples)
        print(table, end="")
        _write_summary(out / "summary.md", rows, metrics, task, table)
    if failed:
        names = ", ".join(f"{job.label} seed {job.seed} ({out / 'logs' / job.directory.name}.log)" for job in failed)
        print(f"kd sweep: {len(failed)} of {len(results)} runs failed: {names}. Run the same command again to retry "
              f"them; finished runs are skipped.", file=sys.stderr)
        return 1
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from kdcore.export.run import export_run

    summary = export_run(args.run, args.out, args.export_format, args.checkpoint, args.license)
    print(f"Exported the student ({summary.fmt}, {summary.result.library_name}) to {summary.directory}; model card: "
          f"{summary.directory / 'README.md'}, self-test: {summary.directory / 'export.json'}.")
    return 0


def _cmd_cache(args: argparse.Namespace) -> int:
    from kdcore.cache_cli import run_cache_command

    return run_cache_command(args)


def _cmd_teacher(args: argparse.Namespace) -> int:
    from kdcore.teacher_store_cli import run_teacher_command

    return run_teacher_command(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``kd`` console script; returns the exit code."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
        logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                            format="%(levelname)s %(name)s: %(message)s")
        quiet_library_bars()
        if args.command is None:
            parser.print_help()
            return EXIT_USER_ERROR
        handler = {"run": _cmd_run, "list": _cmd_list, "eval": _cmd_eval,
                   "summarize": _cmd_summarize, "sweep": _cmd_sweep, "export": _cmd_export,
                   "cache": _cmd_cache, "teacher": _cmd_teacher}[args.command]
        return handler(args)
    except KDUserError as error:
        print(f"kd: error: {error}", file=sys.stderr)
        return int(getattr(error, "exit_code", EXIT_USER_ERROR))
    except KeyboardInterrupt:  # during the build; the engine handles Ctrl-C while training
        print("kd: interrupted.", file=sys.stderr)
        return 130


def console_main() -> None:
    sys.exit(main())


if __name__ == "__main__":
    console_main()
