"""Several processes, one run: torch.distributed as launched by ``torchrun``.

kd does not have its own launcher: ``torchrun --nproc-per-node N -m kd run ...``
starts N copies of the ordinary ``kd run``; each reads ``RANK``, ``WORLD_SIZE``
and ``LOCAL_RANK`` from its environment (set by torchrun, also under SLURM with
``srun torchrun``) and joins one process group (gloo on CPU, nccl on CUDA).

What is replicated and what is split (docs/distributed.md):

* the teacher is built on every rank, frozen, in eval mode and never wrapped:
  it needs no gradient and no communication;
* the student is wrapped by :class:`DataParallelStudent`: DDP (replicated
  weights, averaged gradients) by default, or FSDP2 ``fully_shard`` (sharded
  weights, gradients and optimizer state) with ``trainer.distributed: fsdp``;
* the data order is the single-process order: every rank draws the same seeded
  global batch and takes its own slice (:func:`rank_slice`), so a run on N
  processes sees exactly the examples one process would see with the same
  ``trainer.batch_size`` (the global batch).

Only rank 0 writes logs, checkpoints, ``best/`` and reports; the others wait at
a barrier. Nothing here is used when ``WORLD_SIZE`` is unset or 1.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kdcore.errors import KDUserError

log = logging.getLogger(__name__)

#: How long a rank waits for the others at a collective (e.g. while rank 0 evaluates or writes a checkpoint).
DEFAULT_TIMEOUT_MINUTES = 60


@dataclass(frozen=True)
class DistributedState:
    """Where this process stands in the run (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_STATE = DistributedState()


def current() -> DistributedState:
    """This process's :class:`DistributedState` (set by :func:`init_from_env`)."""
    return _STATE


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise KDUserError(f"The environment variable {name}={raw!r} is not an integer. kd reads RANK, WORLD_SIZE "
                          f"and LOCAL_RANK as set by torchrun; launch with 'torchrun ... -m kd run ...'.") from None


def init_from_env(requested_device: str) -> tuple[DistributedState, torch.device | None]:
    """Join the process group torchrun describes; return the state and this rank's device.

    The device is None when the run is not distributed (the caller keeps its own
    choice). With CUDA, each rank uses ``cuda:LOCAL_RANK`` and nccl; otherwise CPU
    and gloo.
    """
    global _STATE
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size <= 1:
        _STATE = DistributedState()
        return _STATE, None
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if not 0 <= rank < world_size:
        raise KDUserError(f"RANK={rank} is outside 0..WORLD_SIZE-1 (WORLD_SIZE={world_size}); launch with torchrun.")
    use_cuda = requested_device in ("cuda", "auto") and torch.cuda.is_available()
    if requested_device == "cuda" and not use_cuda:
        raise KDUserError("device 'cuda' was requested, but no CUDA device is available. Use --device cpu or auto.")
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise KDUserError(f"LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} CUDA device(s): "
                              f"start at most that many processes per node (torchrun --nproc-per-node).")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not torch.distributed.is_initialized():
        minutes = _env_int("KD_DIST_TIMEOUT_MINUTES", DEFAULT_TIMEOUT_MINUTES)
        torch.distributed.init_process_group(backend, timeout=datetime.timedelta(minutes=minutes))
    _STATE = DistributedState(rank, world_size, local_rank, backend)
    log.info("Distributed run: rank %d of %d (local rank %d), backend %s, device %s.", rank, world_size, local_rank,
             backend, device)
    return _STATE, device


def shutdown() -> None:
    """Leave the process group (after the last collective)."""
    global _STATE
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    _STATE = DistributedState()


def barrier() -> None:
    if _STATE.enabled:
        torch.distributed.barrier()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. fills the teacher cache), then the others (which then read it)."""
    if not _STATE.is_main:
        barrier()
    try:
        yield
    finally:
        if _STATE.is_main:
            barrier()


def _flag_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if _STATE.backend == "nccl" else torch.device("cpu")


def all_ranks_agree(flag: bool) -> bool:
    """True only when ``flag`` is true on every rank (one tiny all-reduce)."""
    if not _STATE.enabled:
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_flag_device())
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MIN)
    return bool(value.item())


def any_rank_each(*flags: bool) -> tuple[bool, ...]:
    """For each flag, whether it is true on at least one rank (one tiny all-reduce for all of them)."""
    if not _STATE.enabled:
        return tuple(flags)
    values = torch.tensor([1 if flag else 0 for flag in flags], dtype=torch.int32, device=_flag_device())
    torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.MAX)
    return tuple(bool(value) for value in values.tolist())


def broadcast_object(value: Any, src: int = 0) -> Any:
    """``value`` from rank ``src`` on every rank (small, trusted, in-process objects only)."""
    if not _STATE.enabled:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(value: Any) -> list[Any]:
    """Each rank's ``value``, in rank order, on every rank."""
    if not _STATE.enabled:
        return [value]
    found: list[Any] = [None] * _STATE.world_size
    torch.distributed.all_gather_object(found, value)
    return found


def average_logs(logs: dict[str, float], weight: float = 1.0) -> dict[str, float]:
    """Loss parts averaged over ranks, each rank weighted by ``weight`` (its share of the global batch).

    A key that only some ranks report is averaged over those ranks.
    """
    if not _STATE.enabled:
        return dict(logs)
    gathered = gather_objects((weight, logs))
    keys: list[str] = []
    for _, rank_logs in gathered:
        keys.extend(k for k in rank_logs if k not in keys)
    averaged = {}
    for key in keys:
        pairs = [(w, rank_logs[key]) for w, rank_logs in gathered if key in rank_logs]
        total = sum(w for w, _ in pairs)
        averaged[key] = sum(w * v for w, v in pairs) / total if total else sum(v for _, v in pairs) / len(pairs)
    return averaged


def rank_slice(indices: Sequence[int], rank: int | None = None, world_size: int | None = None) -> list[int]:
    """This rank's contiguous share of a global batch (sizes differ by at most one).

    ``np.array_split`` semantics, written out so that every rank computes the same
    split from the same list without numpy conversions.
    """
    rank = _STATE.rank if rank is None else rank
    world_size = _STATE.world_size if world_size is None else world_size
    base, extra = divmod(len(indices), world_size)
    start = rank * base + min(rank, extra)
    return list(indices[start:start + base + (1 if rank < extra else 0)])


class _SignalsForward(nn.Module):
    """Lets DDP see ``Model.forward_signals`` as ``forward`` (DDP only hooks ``__call__``).

    ``trainable`` (the method's trainable modules, usually the student) is the
    registered child, so every trainable parameter is in the DDP bucket even when a
    method uses some of them outside the student's forward.
    """

    def __init__(self, trainable: nn.Module, student: nn.Module) -> None:
        super().__init__()
        self.trainable = trainable
        object.__setattr__(self, "_student", student)  # not a second registration of the same parameters

    def forward(self, batch: Any, request: Any) -> Any:
        return type(self._student).forward_signals(self._student, batch, request)


class DataParallelStudent:
    """The student as the engine trains it: plain, DDP-wrapped, or FSDP2-sharded.

    Methods keep calling ``student.forward_signals``: under DDP that name is
    routed through the DDP wrapper on the instance; under FSDP2 it is registered
    with ``register_fsdp_forward_method`` so the sharded parameters are gathered.
    """

    def __init__(self, student: nn.Module, trainable: nn.Module, mode: str, device: torch.device) -> None:
        self.student = student
        self.trainable = trainable
        self.mode = mode if _STATE.enabled else "none"
        self.ddp: nn.Module | None = None
        if self.mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            if not any(p.requires_grad for p in trainable.parameters()):
                raise KDUserError("trainer.distributed 'ddp': the student has no trainable parameter.")
            device_ids = [device.index] if device.type == "cuda" else None
            # forward_sync_buffers=False: no collective inside forward, so ranks may call the student a
            # different number of times (e.g. generation that stops early); buffers are synced once at init.
            self.ddp = DistributedDataParallel(_SignalsForward(trainable, student), device_ids=device_ids,
                                               forward_sync_buffers=False)
            ddp = self.ddp
            student.__dict__["forward_signals"] = lambda batch, request: ddp(batch, request)
        elif self.mode == "fsdp":
            from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

            if trainable is not student:
                raise KDUserError("trainer.distributed 'fsdp' shards the student; this method trains other modules "
                                  "as well (Method.trainable_modules()). Use trainer.distributed: ddp.")
            # One FSDP unit per repeated block (the layers of a ModuleList), then the rest at the root:
            # the standard per-layer wrapping, so only one block's full weights exist at a time.
            for module in list(student.modules()):
                if isinstance(module, nn.ModuleList):
                    for block in module:
                        if any(p.requires_grad for p in block.parameters()):
                            fully_shard(block)
            fully_shard(student)
            for name in ("forward_signals", "generate"):
                if callable(getattr(type(student), name, None)):
                    register_fsdp_forward_method(student, name)

    @property
    def sharded(self) -> bool:
        return self.mode == "fsdp"

    def evaluates_on_all_ranks(self) -> bool:
        """FSDP needs every rank in each forward (all-gathers); replicated students evaluate on rank 0 alone."""
        return self.sharded

    @contextlib.contextmanager
    def gradient_sync(self, enabled: bool) -> Iterator[None]:
        """Skip the gradient all-reduce for all but the last micro-batch of an accumulated step."""
        if self.ddp is not None and not enabled:
            with self.ddp.no_sync():
                yield
            return
        if self.sharded:
            self.student.set_requires_gradient_sync(enabled)  # type: ignore[attr-defined]
        yield

    @contextlib.contextmanager
    def local_forward(self) -> Iterator[None]:
        """Inside, ``student.forward_signals`` is the plain module's again (evaluation on rank 0 alone)."""
        routed = self.student.__dict__.pop("forward_signals", None)
        try:
            yield
        finally:
            if routed is not None:
                self.student.__dict__["forward_signals"] = routed

    def clip_grad_norm(self, max_norm: float) -> float:
        norm = torch.nn.utils.clip_grad_norm_(self.trainable.parameters(), max_norm)
        if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2
            norm = norm.full_tensor()
        return float(norm)

    # ---------------------------------------------------------------- state (checkpoints)
    def model_state(self) -> dict[str, torch.Tensor]:
        """The full student state dict on rank 0 (a collective under FSDP; empty on other ranks there)."""
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(self.student, options=StateDictOptions(full_state_dict=True,
                                                                               cpu_offload=True))
        return self.student.state_dict()

    def load_model_state(self, state: dict[str, torch.Tensor]) -> None:
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            set_model_state_dict(self.student, state, options=StateDictOptions(full_state_dict=True))
            return
        self.student.load_state_dict(state)

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The optimizer state dict (parameter-name keyed and full on rank 0 under FSDP)."""
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            return get_optimizer_state_dict(self.student, optimizer,
                                            options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return optimizer.state_dict()

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(self.student, optimizer, state, options=StateDictOptions(full_state_dict=True))
            return
        optimizer.load_state_dict(state)

    def close(self) -> None:
        """Give the plain ``forward_signals`` back to the student (final evaluation, reports)."""
        self.student.__dict__.pop("forward_signals", None)
