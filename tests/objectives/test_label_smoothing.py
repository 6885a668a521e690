"""Label smoothing of the token NLL (the ImitKD authors' CNN/DailyMail recipe uses ε = 0.1)."""
from __future__ import annotations

import pytest
import torch

from kdcore.objectives.library import TokenNLLObjective
from kdcore.objectives.nll import token_nll
from kdcore.signals import Signals


def _reference(logits: torch.Tensor, labels: torch.Tensor, epsilon: float) -> torch.Tensor:
    log_probs = torch.log_softmax(logits.double(), -1)
    keep = labels != -100
    picked = log_probs[keep].gather(-1, labels[keep].unsqueeze(-1)).squeeze(-1)
    per_position = -(1 - epsilon) * picked - epsilon * log_probs[keep].mean(-1)
    return per_position.mean().float()


@pytest.mark.parametrize("epsilon", [0.0, 0.1, 0.5])
def test_smoothed_nll_is_the_mixture_of_label_and_uniform_targets(epsilon: float) -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=generator) * 3
    labels = torch.randint(0, 11, (3, 5), generator=generator)
    labels[0, 3:] = -100
    torch.testing.assert_close(token_nll(logits, labels, epsilon), _reference(logits, labels, epsilon))


def test_the_objective_reads_label_smoothing_from_its_config() -> None:
    logits = torch.randn(2, 4, 7, generator=torch.Generator().manual_seed(1)).requires_grad_()
    labels = torch.tensor([[1, 2, 3, -100], [0, 6, -100, -100]])
    objective = TokenNLLObjective(TokenNLLObjective.Config(label_smoothing=0.1))
    loss = objective(Signals(logits=logits), Signals(), {"labels": labels}).loss
    torch.testing.assert_close(loss, _reference(logits.detach(), labels, 0.1))
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    with pytest.raises(ValueError):
        TokenNLLObjective.Config(label_smoothing=1.0)
