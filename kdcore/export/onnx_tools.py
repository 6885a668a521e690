"""ONNX helpers of the exporters: export a module with dynamic axes, run it in onnxruntime, compare.

ONNX export needs the optional packages of ``kd[export]`` (onnx, onnxruntime); a
missing one is a user error naming the pip command. Models are exported with the
TorchScript-based ``torch.onnx.export`` (``dynamo=False``): it needs no further
package and handles the transformers models kd trains with data-dependent shapes.
"""
from __future__ import annotations

import importlib.util
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.backends.mha

from kdcore.errors import KDUserError

#: The largest difference allowed between onnxruntime's and PyTorch's outputs on the same inputs.
ONNX_TOLERANCE = 1e-4
#: ONNX operator set of the exports (onnxruntime 1.17 and later run it).
OPSET = 17


def require_onnx() -> None:
    """Refuse with the install command when onnx or onnxruntime is missing."""
    missing = [name for name in ("onnx", "onnxruntime") if importlib.util.find_spec(name) is None]
    if missing:
        raise KDUserError(f"--format onnx needs the package(s) {', '.join(missing)}, which are not installed. "
                          f"Install them with: pip install 'kd[export]' (or pip install onnx onnxruntime).")


def export_module(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], path: Path, input_names: Sequence[str],
                  output_names: Sequence[str], dynamic_axes: Mapping[str, Mapping[int, str]]) -> None:
    """``module(*inputs)`` as an ONNX graph at ``path`` with the given dynamic axes (batch, lengths)."""
    require_onnx()
    module.eval()
    # Under no_grad in eval mode nn.MultiheadAttention would take its fused inference kernel, which has no ONNX form.
    fast_path = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            # The TorchScript exporter warns that it is deprecated and about Python values it records as constants
            # (shapes kd's models check); the self-test on inputs of other shapes is what catches a wrong constant.
            warnings.simplefilter("ignore")
            _export(module, inputs, path, input_names, output_names, dynamic_axes)
    finally:
        torch.backends.mha.set_fastpath_enabled(fast_path)
    import onnx

    onnx.checker.check_model(str(path))


def _export(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], path: Path, input_names: Sequence[str],
            output_names: Sequence[str], dynamic_axes: Mapping[str, Mapping[int, str]]) -> None:
    torch.onnx.export(module, inputs, str(path), input_names=list(input_names), output_names=list(output_names),
                      dynamic_axes={k: dict(v) for k, v in dynamic_axes.items()}, opset_version=OPSET,
                      do_constant_folding=True, dynamo=False)


def session(path: Path) -> Any:
    """An onnxruntime CPU inference session for ``path``."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run(onnx_session: Any, feeds: Mapping[str, torch.Tensor | np.ndarray]) -> list[np.ndarray]:
    """The session's outputs for ``feeds`` (tensors are converted to numpy)."""
    arrays = {name: value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value
              for name, value in feeds.items()}
    return onnx_session.run(None, arrays)


def max_abs_difference(reference: torch.Tensor, candidate: np.ndarray, valid: torch.Tensor | None = None) -> float:
    """Largest ``|reference - candidate|`` (over ``valid`` positions, a bool mask over the leading axes)."""
    difference = (reference.detach().float().cpu() - torch.from_numpy(np.asarray(candidate)).float()).abs()
    if valid is not None:
        difference = difference[valid.cpu()]
    return float(difference.max()) if difference.numel() else 0.0


def seconds_per_call(function: Callable[[], Any], repeats: int = 3) -> float:
    """Median wall time of ``function()`` over ``repeats`` calls, after one untimed warm-up call."""
    function()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def check_tolerance(what: str, difference: float, tolerance: float = ONNX_TOLERANCE) -> None:
    """Fail the export (nothing is written) when an exported model does not reproduce the kd student."""
    if not difference <= tolerance:
        raise RuntimeError(f"export self-test failed: {what} differs from the kd student by {difference:.3g} "
                           f"(allowed {tolerance:g}); the export was not written")


__all__ = ["ONNX_TOLERANCE", "OPSET", "check_tolerance", "export_module", "max_abs_difference", "require_onnx", "run",
           "seconds_per_call", "session"]
