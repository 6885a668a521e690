"""kd: plug-in knowledge distillation for speech and text.

The core defines the roles (:mod:`kdcore.interfaces`), the plugin hooks
(:mod:`kdcore.hookspecs`) and the types lifecycle hooks see (:mod:`kdcore.hooks`),
the registry (:mod:`kdcore.registry`), the typed config (:mod:`kdcore.config`),
the training loop (:mod:`kdcore.trainer`), the objectives library
(:mod:`kdcore.objectives`) and the fused path (:mod:`kdcore.fused`).
docs/architecture.md has the module map.
"""
from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("kd")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"
