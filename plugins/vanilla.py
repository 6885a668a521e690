"""Classic distillation (Hinton et al., 2015): teacher and student see the same batch.

The loss is the weighted sum of the configured objectives (by default a
temperature-scaled forward KL to the teacher plus NLL on the labels). This is
the base Method's ``training_step`` unchanged: the algorithm box is
"teacher signals -> student signals -> weighted objectives".
"""
from __future__ import annotations

from typing import Any, ClassVar

from kdcore.interfaces import Method


class VanillaKD(Method):
    """Teacher and student on the same batch; weighted sum of objectives."""

    name: ClassVar[str] = "vanilla"
    description: ClassVar[str] = ("Classic KD (Hinton et al. 2015): weighted objectives on teacher/student outputs of "
                                  "the same batch")

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        return {"objectives": {"kd": {"name": "forward_kl", "weight": 1.0, "args": {"temperature": 2.0}},
                               "nll": {"name": "nll", "weight": 0.5}}}
