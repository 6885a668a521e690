"""The objectives library: one implementation of each distillation loss.

Functions (use these rather than re-deriving the math):

* :func:`divergence` -- forward/reverse KL, generalized JSD, skew KLs, TVD on logits
  (dense or sparse top-k teacher logits);
* :func:`hidden_state_loss` -- L1, MSE, cosine and DistilHuBERT's L1 - log sigmoid(cos);
  :func:`multi_layer_hidden_loss` -- the same over several layers in one autograd node;
* :func:`uld_loss` -- Universal Logit Distillation across tokenizers;
* :func:`token_nll` -- cross-entropy on labels (-100 ignored).

The registered :class:`~kdcore.interfaces.Objective` classes live in
:mod:`kdcore.objectives.library`; stored top-k teachers in :mod:`kdcore.teacher_store`; the memory-saving
fused projection + divergence in
:mod:`kdcore.fused`. Formulas and config keys: docs/objectives.md.
"""
from kdcore.objectives.divergence import DIVERGENCE_KINDS, IGNORE_INDEX, divergence, divergence_chunk
from kdcore.objectives.hidden import HIDDEN_KINDS, hidden_state_loss, multi_layer_hidden_loss
from kdcore.objectives.nll import token_nll
from kdcore.objectives.uld import uld_loss

__all__ = ["DIVERGENCE_KINDS", "HIDDEN_KINDS", "IGNORE_INDEX", "divergence", "divergence_chunk", "hidden_state_loss",
           "multi_layer_hidden_loss", "token_nll", "uld_loss"]
