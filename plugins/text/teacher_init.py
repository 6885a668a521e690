"""Initialising a text student from its teacher's weights (``student.args.init: teacher``).

The literature's recipe for small seq2seq students is "shrink and fine-tune" (DistilBART, Shleifer & Rush 2020;
DistilBERT before it): the student has the teacher's architecture with fewer layers, and each of its layers starts
as a copy of a chosen teacher layer; embeddings, final norms and the output layer are copied as they are. kd does
this for any transformers model whose parameter names follow the usual layout (one ``nn.ModuleList`` of layers per
stack: the encoder and the decoder of an encoder-decoder model, the decoder of a decoder-only model).

``init_layers`` maps each student layer to the teacher layer it copies, per stack. Left null, a stack of ``n``
student layers copies teacher layers spread evenly from the first to the last, and one student layer copies the
teacher's first. DistilBART's hand-picked ``LAYERS_TO_COPY`` maps agree where they exist for 1 or 3 of 12 layers
and 1 or 3 of 6, not everywhere (12 -> 2 is ``[0, 6]`` there, ``[0, 11]`` here).

A student narrower than its teacher cannot take the teacher's matrices as they are. ``init_width: select`` then
takes evenly spaced rows and columns of every teacher tensor ("weight selection", Xu et al. 2024, *Initializing
Models with Larger Ones*): index ``j`` of a dimension of size ``n`` in the student is index ``floor(j * N / n)`` of
the teacher's size ``N``. The same rule on every tensor keeps the selection consistent: the residual stream keeps
the same coordinates in every matrix, and with equal head counts each student head takes its coordinates from the
same teacher head. ``init_width: match`` (the default) refuses any shape that differs.

Parameters that do not train (Marian's sinusoidal positions) are left as the student built them: transformers
recomputes them when a saved model loads, so a copied value would not survive an export.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from kdcore.errors import KDUserError

log = logging.getLogger(__name__)

#: Config attributes holding attention head counts: weight selection and layer copies need them equal.
_HEAD_COUNTS = ("num_attention_heads", "num_key_value_heads", "encoder_attention_heads", "decoder_attention_heads")


def spread_layers(teacher_layers: int, student_layers: int) -> list[int]:
    """Teacher layer indices for ``student_layers`` layers, spread evenly from the first to the last
    (one student layer: the teacher's first)."""
    if student_layers == 1:
        return [0]
    return [round(index * (teacher_layers - 1) / (student_layers - 1)) for index in range(student_layers)]


def _layer_stacks(hf_model: nn.Module) -> dict[str, tuple[str, nn.ModuleList]]:
    """The model's layer lists by stack name (``encoder``/``decoder``), each with its parameter-name prefix."""
    stacks: dict[str, nn.Module] = {}
    if getattr(hf_model.config, "is_encoder_decoder", False):
        stacks["encoder"] = hf_model.get_encoder()
    stacks["decoder"] = hf_model.get_decoder()
    names = {id(module): name for name, module in hf_model.named_modules()}
    found: dict[str, tuple[str, nn.ModuleList]] = {}
    for stack_name, stack in stacks.items():
        lists = [(name, child) for name, child in stack.named_children() if isinstance(child, nn.ModuleList)]
        if len(lists) != 1:
            raise KDUserError(
                f"student.args.init is 'teacher', but the {type(hf_model).__name__} {stack_name} has "
                f"{len(lists)} layer lists ({', '.join(name for name, _ in lists) or 'none'}) where kd expects one. "
                f"Use init: random for this architecture.")
        child_name, layers = lists[0]
        found[stack_name] = (f"{names[id(stack)]}.{child_name}." if names[id(stack)] else f"{child_name}.", layers)
    return found


def _selected(source: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``source`` cut down to ``shape`` by evenly spaced indices along every dimension that differs."""
    for dim, (teacher_size, student_size) in enumerate(zip(source.shape, shape)):
        if teacher_size != student_size:
            index = torch.div(torch.arange(student_size) * teacher_size, student_size, rounding_mode="floor")
            source = source.index_select(dim, index)
    return source


@dataclass
class InitReport:
    """What :func:`init_from_teacher` did: the layer map and how many tensors were copied or selected."""

    layer_map: dict[str, list[int]]
    copied: int = 0
    selected: int = 0
    kept: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """One log line."""
        layers = "; ".join(f"{stack} layers <- teacher {indices}" for stack, indices in self.layer_map.items())
        counts = [f"{self.copied} tensors copied"] if self.copied else []
        if self.selected:
            counts.append(f"{self.selected} narrowed by weight selection")
        text = f"student initialised from the teacher: {layers}; {', '.join(counts)}"
        if self.kept:
            text += f"; kept as built (not trained): {', '.join(self.kept)}"
        return text


def init_from_teacher(student: nn.Module, teacher: nn.Module, layer_map: dict[str, list[int]] | None,
                      width: Literal["match", "select"], key: str = "student.args") -> InitReport:
    """Copy ``teacher``'s weights into ``student`` (two transformers models of the same ``model_type``).

    ``layer_map`` gives, per stack (``encoder``, ``decoder``), the teacher layer each student layer copies (null or
    a missing stack: :func:`spread_layers`). ``width``: ``match`` refuses any differing shape, ``select`` narrows a
    larger teacher tensor by weight selection (see the module docstring). Raises :class:`KDUserError` naming the
    first problem when the models cannot be matched.
    """
    student_type, teacher_type = student.config.model_type, teacher.config.model_type
    if student_type != teacher_type:
        raise KDUserError(f"{key}.init is 'teacher', but the student is a '{student_type}' model and the teacher a "
                          f"'{teacher_type}' one: copying weights needs the same architecture. Give the student "
                          f"model_type '{teacher_type}', or use init: random.")
    if student.config.vocab_size != teacher.config.vocab_size:
        # Weight selection would pick every other token's embedding: token ids must keep their rows.
        raise KDUserError(f"{key}.init is 'teacher', but the student predicts {student.config.vocab_size} tokens and "
                          f"the teacher {teacher.config.vocab_size}: the embeddings and the output layer are copied "
                          f"row by row, so the vocabularies must be the same. Leave the student's vocab_size to the "
                          f"task's tokenizer, or use init: random.")
    for attribute in _HEAD_COUNTS:
        student_heads, teacher_heads = getattr(student.config, attribute, None), getattr(teacher.config, attribute, None)
        if student_heads != teacher_heads:
            raise KDUserError(f"{key}.init is 'teacher', but the student's {attribute} is {student_heads} and the "
                              f"teacher's {teacher_heads}: copied attention weights would be split into different "
                              f"heads. Give the student {teacher_heads} heads (a narrower student has narrower "
                              f"heads), or use init: random.")
    student_stacks, teacher_stacks = _layer_stacks(student), _layer_stacks(teacher)
    layer_map = dict(layer_map or {})
    unknown = sorted(set(layer_map) - set(student_stacks))
    if unknown:
        raise KDUserError(f"{key}.init_layers names {unknown}, but this model's layer stacks are "
                          f"{sorted(student_stacks)}. Map each of those to teacher layer indices.")
    resolved: dict[str, list[int]] = {}
    for stack, (_, student_layers) in student_stacks.items():
        teacher_count = len(teacher_stacks[stack][1])
        indices = [int(i) for i in layer_map[stack]] if stack in layer_map else \
            spread_layers(teacher_count, len(student_layers))
        if len(indices) != len(student_layers):
            raise KDUserError(f"{key}.init_layers.{stack} lists {len(indices)} teacher layers, but the student's "
                              f"{stack} has {len(student_layers)}: give one teacher layer index per student layer.")
        if any(not 0 <= index < teacher_count for index in indices):
            raise KDUserError(f"{key}.init_layers.{stack} = {indices}, but the teacher's {stack} has layers "
                              f"0..{teacher_count - 1}.")
        resolved[stack] = indices

    def teacher_name(student_name: str) -> str:
        for stack, (prefix, _) in student_stacks.items():
            if student_name.startswith(prefix):
                index, rest = student_name[len(prefix):].split(".", 1)
                return f"{teacher_stacks[stack][0]}{resolved[stack][int(index)]}.{rest}"
        return student_name

    teacher_parameters = dict(teacher.named_parameters())
    report = InitReport(resolved)
    plan: list[tuple[nn.Parameter, torch.Tensor]] = []
    for name, parameter in student.named_parameters():
        if not parameter.requires_grad:
            report.kept.append(name)
            continue
        source = teacher_parameters.get(teacher_name(name))
        if source is None:
            raise KDUserError(f"{key}.init is 'teacher', but the teacher has no parameter {teacher_name(name)!r} "
                              f"for the student's {name!r}: the two configs differ in more than sizes. Build the "
                              f"student from the teacher's config with fewer layers or a smaller width, or use "
                              f"init: random.")
        if source.shape != parameter.shape:
            if width == "match":
                raise KDUserError(
                    f"{key}.init is 'teacher', but the student's {name} has shape {tuple(parameter.shape)} and the "
                    f"teacher's {tuple(source.shape)}. Give the student the teacher's widths (d_model, FFN size), "
                    f"or set {key}.init_width: select to copy evenly spaced rows and columns of the teacher's "
                    f"weights.")
            if any(s > t for s, t in zip(parameter.shape, source.shape)) or parameter.dim() != source.dim():
                raise KDUserError(
                    f"{key}.init_width is 'select', but the student's {name} ({tuple(parameter.shape)}) is larger "
                    f"than the teacher's ({tuple(source.shape)}) in some dimension: weight selection can only "
                    f"narrow. Use a student no wider than its teacher, or init: random.")
            source = _selected(source, parameter.shape)
            report.selected += 1
        else:
            report.copied += 1
        plan.append((parameter, source))
    # Copy only once every tensor is known to fit: a refusal leaves the student as it was built.
    with torch.no_grad():
        for parameter, source in plan:
            parameter.copy_(source.to(dtype=parameter.dtype, device=parameter.device))
    return report


def init_student_from_teacher(student_hf: Any, teacher_wrapper: Any, layer_map: dict[str, list[int]] | None,
                              width: Literal["match", "select"], key: str) -> InitReport:
    """``student.args.init: teacher`` on a built student's transformers model: copy from the teacher wrapper's model
    (:func:`init_from_teacher`) and log what was copied."""
    teacher_hf = getattr(teacher_wrapper, "hf_model", None)
    if teacher_hf is None:
        raise KDUserError(f"{key}.init is 'teacher', but the teacher ({type(teacher_wrapper).__name__}) holds no "
                          f"transformers model whose weights could be copied (e.g. a stored teacher replays "
                          f"recorded outputs only). Use init: random with this teacher.")
    report = init_from_teacher(student_hf, teacher_hf, layer_map, width, key)
    log.info("%s", report.describe())
    return report


__all__ = ["InitReport", "init_from_teacher", "init_student_from_teacher", "spread_layers"]
