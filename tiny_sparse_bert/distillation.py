"""Knowledge distillation, an option of `train`: a frozen teacher's soft targets mixed into the loss.

A support module: the paper (Sparse*BERT) can be followed without it. Hinton et al. 2015; Sanh
et al. 2019 (DistilBERT); Kurtic et al. 2022 distil the pruned BERT from its dense self.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .model import IGNORE_INDEX


def distillation_loss(logits, teacher_logits, labels, kind, temperature):
    """Soft-target loss of Hinton et al. 2015 at temperature T, scaled by T^2 (so its gradient keeps
    the size of the hard loss's): zero when the student's logits equal the teacher's, positive otherwise.

    kind "mlm": rows are the masked positions (the MLM head returns only those); "cls": one
    softmax per example; both KL(teacher || student). "ner": (B, T, K) logits, only at positions
    with a label (first word pieces; padding and later pieces carry IGNORE_INDEX). "multi": one
    sigmoid per label, the KL between the teacher's and the student's Bernoulli distributions,
    averaged over labels and examples (BCE to the teacher's probabilities minus their entropy).
    """
    student, teacher = logits.float() / temperature, teacher_logits.float() / temperature
    if kind == "ner":
        labelled = labels != IGNORE_INDEX  # (B, T)
        student, teacher = student[labelled], teacher[labelled]  # (N, K)
    if kind == "multi":
        p = torch.sigmoid(teacher)
        kl = (F.binary_cross_entropy_with_logits(student, p) - F.binary_cross_entropy_with_logits(teacher, p))
    else:
        kl = F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1), log_target=True, reduction="batchmean")
    return kl * temperature ** 2


@dataclass
class Distillation:
    """Train on (1 - hardness) x the hard loss + hardness x `distillation_loss` of kind `kind` against
    a frozen `teacher` with the same outputs (Hinton et al. 2015; Sanh et al. 2019; hardness is
    SparseML's name: 1.0 trains on the soft targets alone)."""
    teacher: torch.nn.Module
    hardness: float = 0.5
    temperature: float = 2.0
    kind: str = "mlm"

    def mix(self, loss, logits, batch):
        """The training loss: the hard `loss` mixed with the soft loss against the teacher's logits."""
        with torch.no_grad():
            teacher_logits, _ = self.teacher(**batch)
        soft = distillation_loss(logits, teacher_logits, batch["labels"], self.kind, self.temperature)
        return (1 - self.hardness) * loss + self.hardness * soft


def frozen_copy(model):
    """A teacher: a copy of `model` (a new model of its config, so the RNG moves as for any new
    model, then its weights), in eval mode, with no gradients."""
    teacher = type(model)(model.config).to(next(model.parameters()).device).eval()
    teacher.load_state_dict(model.state_dict())
    return teacher.requires_grad_(False)
