"""``kd sweep``: run a grid of methods × seeds from one YAML file, then summarise it.

A comparison table (methods × seeds, mean ± std) is many ``kd run`` calls and one
``kd summarize``. A sweep file names them once::

    task: wmt
    seeds: [0, 1, 2]
    jobs: 2                 # runs at a time
    threads: 1              # OMP_NUM_THREADS of each run
    set: {trainer.evaluate_teacher: false}
    runs:
      scratch: {plugin: scratch}
      imitation (hard): {plugin: imitation, preset: hard}
      seq-kd: {plugin: seq-kd, set: {method.num_beams: 1}}

Each run is its own ``kd run`` process (its own torch thread pool and memory, and a
crash stays in one run), writing to ``OUT/<label>-s<seed>``; its output goes to
``OUT/logs``. Every entry's config is validated before anything starts, so a typo
costs seconds, not the hours of the runs before it. A sweep is resumable: finished runs
(with metrics.json) are skipped, interrupted ones continue with ``--resume``. The
first run goes alone by default: it builds the task's cached corpus, tokenizer and
teacher with all the sweep's threads, which the other runs then reuse. That is for
speed only: runs started together build each cache entry once anyway (the entry's
lock, kdcore.cache: the others wait for it; tested with two kd runs on an empty cache).

Hand-written rather than a job runner (hydra multirun, GNU parallel): a sweep needs
only a process pool of ``kd run`` calls, and these checks are specific to kd.
"""
from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from kdcore.config import load_yaml_file, validate_model
from kdcore.errors import KDUserError

log = logging.getLogger("kd.sweep")


class SweepEntry(BaseModel):
    """One row of the table: a plugin, optionally a preset and its own ``--set`` values."""

    model_config = ConfigDict(extra="forbid")
    plugin: str = Field(description="registered plugin name (kd list)")
    preset: str | None = Field(None, description="a preset of the task or plugin")
    set: dict[str, Any] = Field(default_factory=dict, description="dotted key -> value, as kd run --set")


class SweepConfig(BaseModel):
    """A sweep file: one task, its seeds, and the runs (label -> entry) of the table."""

    model_config = ConfigDict(extra="forbid")
    task: str = Field(description="registered task name")
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    jobs: int = Field(1, ge=1, description="runs at a time")
    threads: int | None = Field(None, ge=1, description="OMP_NUM_THREADS of each run (null: inherit)")
    first_alone: bool = Field(True, description="run the first job alone, with threads x jobs threads (it builds "
                                                "the task's caches; runs started together would wait for them)")
    score_teacher: Literal["once", "every", "never"] = Field(
        "once", description="which runs score the teacher: the first only (the same cached teacher decodes the "
                            "same way every time), every run, or none (trainer.evaluate_teacher)")
    set: dict[str, Any] = Field(default_factory=dict, description="--set values of every run")
    runs: dict[str, SweepEntry] = Field(min_length=1)
    metrics: list[str] | None = Field(None, description="summary columns (null: every shared student metric)")
    include_teacher: bool = True
    decimals: int = Field(3, ge=0)
    baseline: str | None = Field(None, description="a label of runs: the summary compares every other row with it "
                                                   "(Welch's t over seeds; kd summarize --baseline)")
    bootstrap: bool = Field(False, description="also the paired bootstrap over test items against the baseline "
                                               "(kd summarize --bootstrap)")
    resamples: int | None = Field(None, ge=1, description="the paired bootstrap's resamples (null: 1,000)")

    @model_validator(mode="after")
    def _baseline_is_a_row(self) -> "SweepConfig":
        if self.baseline is not None and self.baseline not in self.runs:
            raise ValueError(f"baseline {self.baseline!r} is not one of the runs' labels ({', '.join(self.runs)})")
        if (self.bootstrap or self.resamples is not None) and self.baseline is None:
            raise ValueError("bootstrap and resamples compare every row with a baseline row; name it with "
                             "baseline: LABEL")
        if self.resamples is not None and not self.bootstrap:
            raise ValueError("resamples sets the paired bootstrap's resamples; add bootstrap: true or remove it")
        return self

    @field_validator("runs")
    @classmethod
    def _distinct_directories(cls, runs: dict[str, SweepEntry]) -> dict[str, SweepEntry]:
        slugs: dict[str, str] = {}
        for label in runs:
            slug = slugify(label)
            if not slug:
                raise ValueError(f"the label {label!r} has no letters or digits to name its run directories")
            if slug in slugs:
                raise ValueError(f"the labels {slugs[slug]!r} and {label!r} would share the directories '{slug}-s*'")
            slugs[slug] = label
        return runs


def slugify(label: str) -> str:
    """Directory-safe form of a row label: ``"imitation (hard)"`` -> ``"imitation-hard"``."""
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")


def set_options(values: dict[str, Any]) -> list[str]:
    """``{"trainer.lr": 0.001}`` -> ``["trainer.lr=0.001"]``; values as JSON, which ``--set`` reads as YAML."""
    return [f"{key}={json.dumps(value)}" for key, value in values.items()]


@dataclass
class SweepJob:
    """One ``kd run`` of the sweep."""

    label: str
    seed: int
    directory: Path
    arguments: list[str]

    @property
    def finished(self) -> bool:
        return (self.directory / "metrics.json").is_file()


def load_sweep(path: str | Path) -> SweepConfig:
    """Read and validate a sweep file; errors name the file and key."""
    config = validate_model(SweepConfig, load_yaml_file(path), "", None, what=f"sweep file '{path}'")
    assert isinstance(config, SweepConfig)
    return config


def plan_jobs(config: SweepConfig, out: Path) -> list[SweepJob]:
    """The sweep's ``kd run`` argument lists, seed-major (every method of seed 0 first)."""
    jobs = []
    grid = [(seed, label, entry) for seed in config.seeds for label, entry in config.runs.items()]
    for index, (seed, label, entry) in enumerate(grid):
        scores_teacher = config.score_teacher == "every" or (config.score_teacher == "once" and index == 0)
        directory = out / f"{slugify(label)}-s{seed}"
        if (directory / "checkpoints").exists() and not (directory / "metrics.json").is_file():
            arguments = ["run", "--resume", "--out", str(directory)]  # interrupted: continue it
        else:
            arguments = ["run", "--task", config.task, "--plugin", entry.plugin, "--seed", str(seed),
                         "--out", str(directory)]
            arguments += ["--preset", entry.preset] if entry.preset else []
            teacher = {} if scores_teacher else {"trainer.evaluate_teacher": False}
            for option in set_options({**teacher, **config.set, **entry.set}):
                arguments += ["--set", option]
        jobs.append(SweepJob(label, seed, directory, arguments))
    return jobs


def validate_entries(config: SweepConfig, path: str | Path) -> None:
    """Resolve every entry's run config now, so a bad plugin name or key fails before any run starts."""
    from kdcore.registry import Registry
    from kdcore.resolve import resolve_run

    registry = Registry.discover()
    for label, entry in config.runs.items():
        try:
            resolve_run(registry, task=config.task, plugin=entry.plugin, preset=entry.preset,
                        sets=set_options({**config.set, **entry.set}), seed=config.seeds[0])
        except KDUserError as error:
            raise KDUserError(f"Sweep file '{path}', run '{label}': {error}") from None


def _execute(job: SweepJob, logs: Path, threads: int | None) -> tuple[SweepJob, int, float]:
    environment = dict(os.environ)
    if threads is not None:
        environment["OMP_NUM_THREADS"] = environment["MKL_NUM_THREADS"] = str(threads)
    log_path = logs / f"{job.directory.name}.log"
    started = time.monotonic()
    log.info("start %s seed %d -> %s (log %s)", job.label, job.seed, job.directory, log_path)
    with open(log_path, "ab") as stream:
        returncode = subprocess.run([sys.executable, "-m", "kdcore", *job.arguments], stdout=stream,
                                    stderr=subprocess.STDOUT, env=environment, check=False).returncode
    seconds = time.monotonic() - started
    log.info("%s %s seed %d in %.0f s%s", "done" if returncode == 0 else "FAILED", job.label, job.seed, seconds,
             "" if returncode == 0 else f" (exit code {returncode}; see {log_path})")
    return job, returncode, seconds


def run_sweep(config: SweepConfig, out: Path, jobs: int | None = None) -> list[tuple[SweepJob, int]]:
    """Run the unfinished jobs (``jobs`` at a time); returns each executed job with its exit code."""
    pending = [job for job in plan_jobs(config, out) if not job.finished]
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    workers = jobs or config.jobs
    results: list[tuple[SweepJob, int]] = []
    if pending and config.first_alone and workers > 1:
        # The first run builds the task's caches (corpus, tokenizer, teacher) with all the sweep's threads; started
        # together, the other runs would only wait for it on the locks of those cache entries.
        first_threads = config.threads * workers if config.threads is not None else None
        job, returncode, _ = _execute(pending.pop(0), logs, first_threads)
        results.append((job, returncode))
    # On Ctrl-C the running kd runs get it too (same process group) and stop cleanly, and Executor.map cancels
    # the runs not yet started (tested); the same command later continues the interrupted ones with --resume.
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for job, returncode, _ in pool.map(lambda job: _execute(job, logs, config.threads), pending):
            results.append((job, returncode))
    return results


def summary_groups(config: SweepConfig, out: Path) -> list[tuple[str, list[Path]]]:
    """(label, finished run directories) per entry with at least one finished run."""
    groups = []
    for label in config.runs:
        directories = sorted(d for d in out.glob(f"{slugify(label)}-s*") if (d / "metrics.json").is_file()
                             and re.fullmatch(rf"{re.escape(slugify(label))}-s\d+", d.name))
        if directories:
            groups.append((label, directories))
    return groups


__all__ = ["SweepConfig", "SweepEntry", "SweepJob", "load_sweep", "plan_jobs", "run_sweep", "set_options", "slugify",
           "summary_groups", "validate_entries"]
