"""How a run gets its trackers: the names of ``trainer.report_to`` are looked up in the registry when the config is
validated, checked to be installed before anything is built (also under ``--dry-run``), and registered as
lifecycle-hook plugins while the run trains and reports. The engine knows no tracker by name; a third-party tracker
(a :class:`~kdcore.tracking.Tracker` subclass returned by a plugin's ``kd_register_trackers`` hook) is used the
same way.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

from kdcore import distributed
from kdcore.errors import KDUserError
from kdcore.registry import Registry
from kdcore.tracking.base import Tracker


def resolve_trackers(registry: Registry, names: Sequence[str]) -> list[type[Tracker]]:
    """The tracker classes ``names`` stands for; an unknown name is refused (exit 2) with the known ones.

    Loading a class imports its kd module only, not the tracker's library.
    """
    classes = []
    for name in names:
        try:
            classes.append(registry.load("tracker", name))
        except KDUserError as error:
            raise KDUserError(f"trainer.report_to: {error}") from None
    return classes


def check_installed(trackers: Sequence[type[Tracker]]) -> None:
    """Refuse (exit 2, naming the pip command) a tracker whose library is not installed."""
    for tracker in trackers:
        tracker.check_installed()


@contextlib.contextmanager
def reporting(registry: Registry, trackers: Sequence[type[Tracker]]) -> Iterator[list[Tracker]]:
    """One instance of each tracker registered as a hook plugin for the block, on rank 0 only: the process that
    reports (the hooks run there anyway; the other ranks need no tracker open)."""
    check_installed(trackers)
    instances = [cls() for cls in trackers] if distributed.current().is_main else []
    manager = registry.plugin_manager
    for tracker in instances:
        manager.register(tracker, name=f"kd-tracker-{tracker.name}")
    try:
        yield instances
    finally:
        for tracker in instances:
            manager.unregister(tracker)
