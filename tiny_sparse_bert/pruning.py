"""Gradual magnitude pruning (GMP) with the cubic sparsity schedule, and frozen masks.

Zhu & Gupta 2017, "To prune, or not to prune", section 3: every `prune_every` steps between
`begin_step` and `end_step`, the weights of smallest magnitude are set to zero until each
prunable tensor reaches the scheduled sparsity; pruned weights stay zero (the masks only grow).
Sparse*BERT (Campos et al. 2022, section 3) applies this to BERT's encoder during MLM
pretraining, then keeps the mask fixed for domain-adaptive pretraining and fine-tuning.

    pruner = GradualMagnitudePruner(model, final_sparsity=0.9, begin_step=0, end_step=3000)
    for step in range(steps):
        pruner.update(step)     # recompute masks when the schedule says so
        loss.backward(); optimizer.step()
        pruner.apply()          # re-zero pruned weights (Adam moments and weight decay move them)

    frozen = GradualMagnitudePruner.from_sparse_model(model)   # masks = (weight != 0), never updated

Sparsity is always the absolute fraction of zeros in a tensor. The pruning lab (pruning_lab.py)
subclasses this class: it changes `units` (which score, over which groups of weights) and
`masks_of` (a kept unit's weights), and `accumulate` for scores that read gradients; the paper's
path here does not run through it. With `begin_step == end_step` the schedule is one-shot: every
weight goes at that one step.
"""
import math

import torch

# The prunable weights: the six Linear weights of every encoder layer (attention query, key,
# value and output; feed-forward intermediate and output), as in Neural Magic's BERT recipes and
# Sparse*BERT. Embeddings, biases, LayerNorms, the pooler and the task heads stay dense.
PRUNABLE_MODULES = ("query", "key", "value", "attn_out", "inter", "out")


def prunable_parameters(model):
    """{name: weight} of the encoder Linear weights named in PRUNABLE_MODULES, in model order."""
    return {name: p for name, p in model.named_parameters()
            if "layers" in name.split(".") and name.endswith(".weight") and name.split(".")[-2] in PRUNABLE_MODULES}


def cubic_sparsity(step, initial_sparsity, final_sparsity, begin_step, end_step):
    """Zhu & Gupta 2017, eq. 1: the target sparsity at `step`.

        s_t = s_f + (s_i - s_f) * (1 - (t - t_0) / (t_1 - t_0))**3     for t_0 <= t <= t_1

    constant s_i before t_0 and s_f after t_1. The cube prunes fast while there are many
    redundant weights and slowly near the end, when each weight matters more.
    """
    if step >= end_step:
        return final_sparsity
    if step <= begin_step:
        return initial_sparsity
    progress = (step - begin_step) / (end_step - begin_step)
    return final_sparsity + (initial_sparsity - final_sparsity) * (1.0 - progress) ** 3


def smallest_k_mask(scores, k):
    """Boolean mask (True = keep) that drops exactly the k lowest scores.

    Ties are broken deterministically by position (a stable sort), so equal scores, such as
    already-pruned zeros, are always dropped in the same order.
    """
    mask = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        mask[torch.sort(scores.flatten(), stable=True).indices[:k]] = False
    return mask.view_as(scores)


class GradualMagnitudePruner:
    """Boolean masks (True = kept) for the prunable weights of a model, updated on a cubic schedule:
    the smallest |w| of each tensor go (one threshold across all tensors with `global_`)."""
    score, pattern = "magnitude", "unstructured"  # what the lab's LabPruner makes a choice

    def __init__(self, model, final_sparsity=0.9, begin_step=0, end_step=1000, prune_every=100,
                 initial_sparsity=0.0, global_=False):
        self.params = prunable_parameters(model)
        assert self.params, "model has no prunable encoder Linear weights"
        self.final_sparsity, self.initial_sparsity = final_sparsity, initial_sparsity
        self.begin_step, self.end_step, self.prune_every = begin_step, end_step, prune_every
        self.global_ = global_
        self.frozen = False
        self.current_target = initial_sparsity  # the sparsity of the last mask update
        self.masks = {name: torch.ones_like(p, dtype=torch.bool) for name, p in self.params.items()}

    @classmethod
    def from_sparse_model(cls, model):
        """Frozen masks from a model that is already sparse: keep exactly the non-zero weights (any
        pattern: a block- or neuron-pruned model's zeros are its blocks and neurons)."""
        pruner = cls(model)
        pruner.masks = {name: p.detach() != 0 for name, p in pruner.params.items()}
        pruner.frozen = True
        return pruner

    def target(self, step):
        return cubic_sparsity(step, self.initial_sparsity, self.final_sparsity, self.begin_step, self.end_step)

    def should_update(self, step):
        return (not self.frozen and self.begin_step <= step <= self.end_step
                and ((step - self.begin_step) % self.prune_every == 0 or step == self.end_step))

    def accumulate(self):
        """Called right after loss.backward(), for scores that read the gradients; |w| needs none."""

    @torch.no_grad()
    def units(self):
        """{group: (unit scores, already pruned)}: here each tensor is a group and each weight a unit,
        scored by its magnitude."""
        return {name: (p.abs(), ~self.masks[name]) for name, p in self.params.items()}

    def masks_of(self, group, keep):
        """The weight masks of `group` whose units `keep` (bool) says to keep: here, keep itself."""
        return {group: keep.clone()}

    @torch.no_grad()
    def update(self, step):
        """Recompute the masks from the scores if the schedule prunes at `step`; then apply them."""
        if not self.should_update(step):
            return False
        s = self.current_target = self.target(step)
        units = self.units()
        for unit, pruned in units.values():
            unit[pruned] = -math.inf  # pruned stays pruned, whatever the score (the masks only grow)
        if self.global_:
            flat = torch.cat([unit.flatten() for unit, _ in units.values()])
            keep = smallest_k_mask(flat, round(s * flat.numel())).split([u.numel() for u, _ in units.values()])
            keep = {group: k.view_as(units[group][0]) for group, k in zip(units, keep)}
        else:
            keep = {group: smallest_k_mask(unit, round(s * unit.numel())) for group, (unit, _) in units.items()}
        for group, k in keep.items():
            self.masks.update(self.masks_of(group, k))
        self.apply()
        return True

    @torch.no_grad()
    def apply(self):
        """Zero the pruned weights in place; call right after every optimizer.step()."""
        torch._foreach_mul_(list(self.params.values()), [self.masks[n] for n in self.params])  # one call, all tensors

    def sparsity(self):
        """Fraction of zeros over all prunable weights (measured on the weights, not the masks)."""
        zeros = sum(int((p == 0).sum()) for p in self.params.values())
        return zeros / sum(p.numel() for p in self.params.values())

    def sparsity_report(self, model):
        """A printable table: zeros per layer and module, over prunable weights and all parameters."""
        lines = [f"{'weight':28s} {'shape':>12s} {'sparsity':>9s}"]
        for name, p in self.params.items():
            shape = "x".join(map(str, p.shape))
            lines.append(f"{name:28s} {shape:>12s} {float((p == 0).float().mean()):9.1%}")
        n_prunable = sum(p.numel() for p in self.params.values())
        zeros = sum(int((p == 0).sum()) for p in self.params.values())
        n_total = sum(p.numel() for p in model.parameters())
        lines.append(f"prunable weights: {n_prunable:,} of {n_total:,} parameters; "
                     f"{zeros / n_prunable:.1%} of prunable and {zeros / n_total:.1%} of all parameters are zero; "
                     f"{n_total - zeros:,} non-zero")
        return "\n".join(lines)

    def state_dict(self):
        return {"masks": dict(self.masks), "frozen": self.frozen, "final_sparsity": self.final_sparsity,
                "initial_sparsity": self.initial_sparsity, "begin_step": self.begin_step,
                "end_step": self.end_step, "prune_every": self.prune_every, "global_": self.global_,
                "score": self.score, "pattern": self.pattern, "stats": {}}  # the lab's keys: one format

    def load_state_dict(self, state):
        masks = state["masks"]
        if set(masks) != set(self.params) or any(masks[n].shape != p.shape for n, p in self.params.items()):
            raise ValueError("pruning masks do not match this model's prunable weights (checkpoint of another config?)")
        made_with = (state.get("score", "magnitude"), state.get("pattern", "unstructured"))
        if made_with != (self.score, self.pattern):
            raise ValueError(f"these masks were made with score {made_with[0]}, pattern {made_with[1]}: load them "
                             f"into pruning_lab.LabPruner")
        for key in ("frozen", "final_sparsity", "initial_sparsity", "begin_step", "end_step", "prune_every", "global_"):
            setattr(self, key, state[key])
        self.masks = {n: m.to(device=self.params[n].device, dtype=torch.bool) for n, m in masks.items()}
