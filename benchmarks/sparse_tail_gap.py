"""How far the divergences against a top-k teacher are from the full-vocabulary ones.

``python benchmarks/sparse_tail_gap.py`` prints the tables of docs/objectives.md ("Sparse (top-k)
teachers and tail mass"): for each divergence kind and k, the value with the teacher's tail mass
(the (k+1)-atom bucket distributions), the value with the teacher renormalised over its top k (no
tail), and the cosine between each one's gradient wrt the student logits and the full-vocabulary
gradient. The logits are synthetic (seeded): a Zipf-like teacher over V = 32000 tokens and a
noisier student made from it, at temperatures 1 and 2.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kdcore.objectives.divergence import DIVERGENCE_KINDS, divergence
from kdcore.signals import SparseLogits

VOCAB, POSITIONS, KS = 32000, 256, (8, 64, 256)


def logits() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    # logit -1.76 log(rank) of a random ranking, plus noise: a long, Zipf-like tail
    ranks = torch.stack([torch.randperm(VOCAB, generator=generator) for _ in range(POSITIONS)]).float() + 1
    teacher = -1.76 * ranks.log() + 0.5 * torch.randn(POSITIONS, VOCAB, generator=generator)
    student = 0.85 * teacher + torch.randn(POSITIONS, VOCAB, generator=generator)
    return student, teacher


def value_and_gradient(student: torch.Tensor, teacher: torch.Tensor | SparseLogits, kind: str,
                       temperature: float) -> tuple[float, torch.Tensor]:
    weights = student.clone().requires_grad_()
    loss = divergence(weights, teacher, kind, temperature=temperature)
    loss.backward()
    return float(loss.detach()), weights.grad.flatten()


def main() -> None:
    student, teacher = logits()
    for temperature in (1.0, 2.0):
        probabilities = torch.softmax(teacher / temperature, -1)
        entropy = float(-(probabilities * probabilities.clamp_min(1e-30).log()).sum(-1).mean())
        masses = [float((1 - SparseLogits.from_dense(teacher, k, temperature).tail_log_mass.exp()).mean())
                  for k in KS]
        print(f"\nT = {temperature:g}: teacher entropy {entropy:.2f} nats, mean top-1 probability "
              f"{float(probabilities.max(-1).values.mean()):.3f}, mean top-k mass "
              + ", ".join(f"{mass:.3f} (k={k})" for k, mass in zip(KS, masses)))
        print("\n| kind | dense | " + " | ".join(f"k={k}: tail / renormalised" for k in KS) + " |")
        print("|---|---|" + "---|" * len(KS))
        for kind in DIVERGENCE_KINDS:
            dense, dense_gradient = value_and_gradient(student, teacher, kind, temperature)
            cells = []
            for k in KS:
                tailed = SparseLogits.from_dense(teacher, k, temperature)
                tail_value, tail_gradient = value_and_gradient(student, tailed, kind, temperature)
                cell = f"{tail_value:.4f} (cos {float(F.cosine_similarity(tail_gradient, dense_gradient, 0)):.3f})"
                if kind == "reverse_kl":
                    cell += " / refused"
                else:
                    renormalised = SparseLogits(tailed.values, tailed.indices, VOCAB)
                    renorm_value, renorm_gradient = value_and_gradient(student, renormalised, kind, temperature)
                    cell += (f" / {renorm_value:.4f} "
                             f"(cos {float(F.cosine_similarity(renorm_gradient, dense_gradient, 0)):.3f})")
                cells.append(cell)
            print(f"| `{kind}` | {dense:.4f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
