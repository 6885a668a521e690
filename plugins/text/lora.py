"""LoRA and frozen-part text students (``student.args.lora``, ``student.args.freeze``).

``lora: {r, alpha, dropout, target_modules}`` injects peft's LoRA layers into the student's transformers model
*in place* (``get_peft_model`` wraps the very model object the :class:`~kd_plugins.text.models.TextStudent` keeps
as ``hf_model``): every call kd makes (``base_model``, ``get_encoder``/``get_decoder``, the LM head, generation)
still reaches the same modules, now with adapters inside, and only the adapter matrices are trainable. The
:class:`peft.PeftModel` is kept beside it (``student.peft_model``, not a second registration of the parameters)
for merging and for writing an adapter directory.

``freeze: [patterns]`` (``fnmatch`` patterns over the transformers model's parameter names, e.g.
``model.encoder.*``) freezes those parameters instead.

Either way the student's state dict (what checkpoints, ``best/student.safetensors``, ``kd eval --run`` and
``kd export`` read and write through ``state_dict``/``load_state_dict``) holds only the trainable parameters plus
:data:`BASE_FINGERPRINT_KEY`, the sha256 of the frozen weights as built. Loading rebuilds the frozen part from the
run's config (the same source, or the same config and seed) and refuses a state whose fingerprint differs, so a
resume, an evaluation or an export can never combine adapters with a different base.
"""
from __future__ import annotations

import copy
import fnmatch
import hashlib
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from kdcore.errors import KDUserError

#: State-dict key (under the student's prefix) of the frozen weights' sha256, as 32 uint8 values.
BASE_FINGERPRINT_KEY = "kd_frozen_base_sha256"


class LoraSettings(BaseModel):
    """``student.args.lora``: peft LoRA adapters on the student; the rest of the model is frozen."""

    model_config = ConfigDict(extra="forbid")

    r: int = Field(8, ge=1, description="rank of each adapter")
    alpha: float = Field(16.0, gt=0, description="scaling numerator: the adapter's output is scaled by alpha / r")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the adapter's input during training")
    target_modules: str | list[str] | None = Field(
        None, description="module names (suffixes) or a regex to adapt; 'all-linear' for every linear layer but "
                          "the LM head; default: peft's choice for the architecture, else 'all-linear'")


def _default_targets(hf_model: Any) -> str | list[str]:
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    targets = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(getattr(hf_model.config, "model_type", ""))
    return list(targets) if targets else "all-linear"


def apply_lora(hf_model: Any, settings: LoraSettings, seed: int, key: str) -> Any:
    """Inject LoRA adapters into ``hf_model`` in place; return the :class:`peft.PeftModel` around it.

    The adapters' random initialisation is seeded with ``seed`` (the same run seed gives the same adapters) and
    does not draw from the global random stream.
    """
    from peft import LoraConfig, TaskType, get_peft_model

    causal = not bool(getattr(hf_model.config, "is_encoder_decoder", False))
    targets = settings.target_modules if settings.target_modules is not None else _default_targets(hf_model)
    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=targets, task_type=TaskType.CAUSAL_LM if causal else TaskType.SEQ_2_SEQ_LM)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            peft_model = get_peft_model(hf_model, config)
        except ValueError as error:
            linear = sorted({name.rsplit(".", 1)[-1] for name, module in hf_model.named_modules()
                             if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"})
            raise KDUserError(
                f"{key}.lora.target_modules = {targets!r} does not fit {type(hf_model).__name__}: {error}. Name "
                f"modules the model has (its linear layers are called {', '.join(linear[:12])}), a regex, or "
                f"'all-linear'.") from None
    if peft_model.base_model.model is not hf_model:  # the wrapper's calls rely on in-place injection
        raise RuntimeError("peft did not inject the adapters into the given model in place")
    return peft_model


def freeze_matching(hf_model: Any, patterns: list[str], key: str) -> int:
    """Freeze the parameters of ``hf_model`` whose names match one of ``patterns``; return how many were frozen."""
    names = [name for name, _ in hf_model.named_parameters()]
    frozen = 0
    for pattern in patterns:
        matched = [name for name in names if fnmatch.fnmatchcase(name, pattern)]
        if not matched:
            raise KDUserError(f"{key}.freeze: the pattern '{pattern}' matches no parameter of "
                              f"{type(hf_model).__name__} (names look like {', '.join(names[:4])}, ...). Use "
                              f"fnmatch patterns over these names, e.g. 'model.encoder.*'.")
    for name, parameter in hf_model.named_parameters():
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns):
            parameter.requires_grad_(False)
            frozen += 1
    if not any(p.requires_grad for p in hf_model.parameters()):
        raise KDUserError(f"{key}.freeze = {patterns} freezes every parameter of the student: nothing would train.")
    return frozen


def _digest(state: dict[str, torch.Tensor]) -> torch.Tensor:
    """sha256 over names, shapes, dtypes and raw bytes of ``state`` (sorted), as a uint8 tensor."""
    digest = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}\0".encode())
        digest.update(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())
    return torch.tensor(list(digest.digest()), dtype=torch.uint8)


def install_partial_state(module: nn.Module, what: str) -> None:
    """Make ``module``'s state dict hold its trainable parameters and the frozen part's fingerprint only.

    Called once the frozen part is final (after LoRA injection or freezing). ``what`` describes the frozen part
    for error messages (e.g. "the LoRA student's base weights").
    """
    trainable = {name for name, parameter in module.named_parameters() if parameter.requires_grad}
    full = module.state_dict()
    frozen_names = set(full) - trainable
    fingerprint = _digest({name: full[name] for name in frozen_names})
    module.partial_state = (trainable, frozen_names, fingerprint)  # type: ignore[assignment]

    def keep_trainable(mod: nn.Module, state: dict[str, Any], prefix: str, _metadata: Any) -> None:
        for name in frozen_names:
            state.pop(prefix + name, None)
        state[prefix + BASE_FINGERPRINT_KEY] = fingerprint.clone()

    prefixes: list[str] = []  # the prefix of the load in progress (set by the pre hook, read by the post hook)

    def check_fingerprint(mod: nn.Module, state: dict[str, Any], prefix: str, *_: Any) -> None:
        prefixes[:] = [prefix]
        saved = state.pop(prefix + BASE_FINGERPRINT_KEY, None)
        if saved is None:
            if any(prefix + name in state for name in frozen_names):
                return  # a full state dict (every weight given): loaded as is, nothing is rebuilt from elsewhere
            raise KDUserError(f"The saved student holds no fingerprint of {what}; it was not saved by this student "
                              f"configuration (was student.args.lora or student.args.freeze added after the run?).")
        if not torch.equal(saved.to(torch.uint8).cpu(), fingerprint):
            raise KDUserError(
                f"The saved student was trained on other frozen weights than {what} rebuilt now (their sha256 "
                f"differs: saved {bytes(saved.tolist()).hex()[:16]}..., rebuilt {bytes(fingerprint.tolist()).hex()[:16]}"
                f"...). Only the trainable part is saved, so the frozen part must be rebuilt from the same "
                f"student.args.source files (or the same config and seed). Restore them, or train again.")

    def allow_missing_frozen(mod: nn.Module, incompatible: Any) -> None:
        prefix = prefixes[0] if prefixes else ""
        incompatible.missing_keys[:] = [key for key in incompatible.missing_keys
                                        if not (key.startswith(prefix) and key[len(prefix):] in frozen_names)]

    module.register_state_dict_post_hook(keep_trainable)
    module.register_load_state_dict_pre_hook(check_fingerprint)
    module.register_load_state_dict_post_hook(allow_missing_frozen)


def has_lora(student: Any) -> bool:
    """Whether ``student`` carries peft LoRA adapters."""
    return getattr(student, "peft_model", None) is not None


def merged_copy(student: Any) -> Any:
    """A plain transformers model with the adapters merged into a copy of the base weights (the student is
    untouched)."""
    return copy.deepcopy(student.peft_model).merge_and_unload()


def base_copy(student: Any) -> Any:
    """A plain transformers model: a copy of the frozen base weights without the adapters."""
    return copy.deepcopy(student.peft_model).unload()


__all__ = ["BASE_FINGERPRINT_KEY", "LoraSettings", "apply_lora", "base_copy", "freeze_matching", "has_lora",
           "install_partial_state", "merged_copy"]


def prepare_student(student: nn.Module, lora: LoraSettings | None, freeze: list[str], seed: int, key: str) -> None:
    """Apply ``lora`` or ``freeze`` (``key``: the config key, e.g. ``student.args``) to a built text student."""
    if lora is None and not freeze:
        return
    if lora is not None and freeze:
        raise KDUserError(f"{key}.freeze and {key}.lora were both given: LoRA already freezes every weight of the "
                          f"base model and trains adapters only. Set one of them.")
    hf_model = student.hf_model  # type: ignore[attr-defined]
    if lora is not None:
        # Kept outside the module tree: registering the PeftModel would list every parameter a second time.
        object.__setattr__(student, "peft_model", apply_lora(hf_model, lora, seed, key))
        install_partial_state(student, "the LoRA student's base weights")
    else:
        freeze_matching(hf_model, freeze, key)
        install_partial_state(student, f"the student's frozen weights ({key}.freeze)")
