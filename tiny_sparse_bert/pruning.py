"""Gradual magnitude pruning (GMP) with the cubic sparsity schedule, and frozen masks.

Zhu & Gupta 2017, "To prune, or not to prune", section 3: every `prune_every` steps between
`begin_step` and `end_step`, the weights of smallest magnitude are set to zero until each
prunable tensor reaches the scheduled sparsity; pruned weights stay zero (the masks only grow).
Sparse*BERT (Campos et al. 2022, section 3) applies this to BERT's encoder during MLM
pretraining, then keeps the mask fixed for domain-adaptive pretraining and fine-tuning.

    pruner = MagnitudePruner(model, final_sparsity=0.9, begin_step=0, end_step=3000)
    for step in range(steps):
        pruner.update(step)     # recompute masks when the schedule says so
        loss.backward(); optimizer.step()
        pruner.apply()          # re-zero pruned weights (Adam moments and weight decay move them)

    frozen = MagnitudePruner.from_sparse_model(model)   # masks = (weight != 0), never updated

Sparsity is always the absolute fraction of zeros in a tensor. The pruning lab: what is pruned is
chosen by a *score* and a *pattern*, each a few lines below to read, copy and change.

- scores: `magnitude_score` (|w|, the paper's), `random_score` (the baseline any criterion must
  beat), `movement_score` (Sanh et al. 2020: -w x dL/dw summed over the steps since the last mask
  update; `pruner.accumulate()` reads the gradients right after `loss.backward()`);
- patterns: unstructured (each weight alone), blocks of R x C weights (a block's score is the sum
  of its weights' scores; whole blocks go), and "neurons": a feed-forward neuron is a row of the
  intermediate weight with the matching column of the output weight, an attention dimension a
  row of the query with the same row of the key, or a row of the value with the same column of
  the attention output; whole neurons go (`sparse.convert_to_sparse` then compacts the
  feed-forward into smaller dense matrices).

Whatever the score, a pruned weight stays pruned: its unit's score is set to -inf before each
update (a random or a movement score would otherwise bring zeros back).
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


# ---------------------------------------------------------------------------------- scores
# Importance of each weight (a tensor of its shape); the lowest are pruned. `movement` is what
# `accumulate` summed since the last mask update.

def magnitude_score(weight, movement):
    """|w| (Zhu & Gupta 2017; Sparse*BERT): small weights matter least."""
    return weight.abs()


def random_score(weight, movement):
    """A random order (torch's seeded generator): what any criterion must beat."""
    return torch.rand(weight.shape, device=weight.device)


def movement_score(weight, movement):
    """Sanh et al. 2020: -sum_t w dL/dw. High when training pushes a weight away from zero, low when
    it pulls it towards zero, whatever its size now."""
    return movement


SCORES = {"magnitude": magnitude_score, "random": random_score, "movement": movement_score}


# ---------------------------------------------------------------------------------- patterns

def parse_pattern(text):
    """--prune-pattern: "unstructured", "RxC" (blocks, e.g. 4x4) or "neurons"."""
    if text in ("unstructured", "neurons"):
        return text
    rows, _, cols = text.partition("x")
    if not (rows.isdigit() and cols.isdigit() and int(rows) > 0 and int(cols) > 0):
        raise SystemExit(f"error: --prune-pattern {text!r}: use unstructured, neurons or a block shape such as 4x4")
    return text


def neuron_groups(names):
    """Weights whose units are pruned together, per layer: [(name, axis of its units), ...]."""
    layers = sorted({n.rsplit(".", 2)[0] for n in names}, key=lambda l: int(l.rsplit(".", 1)[1]))
    pairs = (("query", 0, "key", 0), ("value", 0, "attn_out", 1), ("inter", 0, "out", 1))
    return [[(f"{layer}.{a}.weight", da), (f"{layer}.{b}.weight", db)] for layer in layers for a, da, b, db in pairs]


def block_view(x, block):
    """(R, C) -> (R/r, r, C/c, c): a weight matrix cut into r x c blocks."""
    r, c = block
    assert x.shape[0] % r == 0 and x.shape[1] % c == 0, f"a {tuple(x.shape)} weight is not made of {r}x{c} blocks"
    return x.reshape(x.shape[0] // r, r, x.shape[1] // c, c)


def smallest_k_mask(scores, k):
    """Boolean mask (True = keep) that drops exactly the k lowest scores.

    Ties are broken deterministically by position (a stable sort), so equal scores, such as
    already-pruned zeros, are always dropped in the same order.
    """
    mask = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        mask[torch.sort(scores.flatten(), stable=True).indices[:k]] = False
    return mask.view_as(scores)


class MagnitudePruner:
    """Boolean masks (True = kept) for the prunable weights of a model, updated on a cubic schedule.

    `score` is "magnitude" (the default), "random" or "movement"; `pattern` "unstructured" (the
    default), "RxC" blocks or "neurons"; `global_` puts one threshold across all weights instead of
    one per tensor (per pair of tensors for neurons).
    """

    def __init__(self, model, final_sparsity=0.9, begin_step=0, end_step=1000, prune_every=100,
                 initial_sparsity=0.0, global_=False, score="magnitude", pattern="unstructured"):
        self.params = prunable_parameters(model)
        assert self.params, "model has no prunable encoder Linear weights"
        assert score in SCORES, f"score {score!r}: one of {', '.join(SCORES)}"
        self.final_sparsity, self.initial_sparsity = final_sparsity, initial_sparsity
        self.begin_step, self.end_step, self.prune_every = begin_step, end_step, prune_every
        self.global_, self.score, self.pattern = global_, score, parse_pattern(pattern)
        self.frozen = False
        self.current_target = initial_sparsity  # the sparsity of the last mask update
        self.masks = {name: torch.ones_like(p, dtype=torch.bool) for name, p in self.params.items()}
        self.movement = {name: torch.zeros_like(p) for name, p in self.params.items()} if score == "movement" else {}

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

    @torch.no_grad()
    def accumulate(self):
        """After loss.backward(): add -w * dL/dw to the movement scores (a no-op for the other scores)."""
        for name, m in self.movement.items():
            if self.params[name].grad is not None:
                m -= self.params[name] * self.params[name].grad

    @torch.no_grad()
    def units(self):
        """{group: (unit scores, already pruned)}: the units the pattern prunes whole, each group a
        tensor (unstructured, blocks) or a tuple of (tensor, axis) pairs (neurons)."""
        scores = {n: SCORES[self.score](p, self.movement.get(n)) for n, p in self.params.items()}
        units = {}
        if self.pattern == "neurons":
            for group in neuron_groups(self.params):
                unit = sum(scores[name].sum(1 - axis) for name, axis in group)  # a row or a column each
                name, axis = group[0]
                units[tuple(group)] = (unit, ~self.masks[name].any(1 - axis))
        else:
            block = (1, 1) if self.pattern == "unstructured" else tuple(map(int, self.pattern.split("x")))
            for name, s in scores.items():
                units[name] = (block_view(s, block).sum((1, 3)), ~block_view(self.masks[name], block).any(3).any(1))
        return units

    def masks_of(self, group, keep):
        """The weight masks of `group` whose units `keep` (bool) says to keep."""
        if isinstance(group, tuple):  # neurons: a unit is a row (axis 0) or a column (axis 1) of each weight
            return {name: (keep[:, None] if axis == 0 else keep[None, :]).expand_as(self.params[name]).clone()
                    for name, axis in group}
        r, c = self.params[group].shape[0] // keep.shape[0], self.params[group].shape[1] // keep.shape[1]
        return {group: keep.repeat_interleave(r, 0).repeat_interleave(c, 1)}

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
        for m in self.movement.values():
            m.zero_()  # movement counts from one update to the next
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
                "score": self.score, "pattern": self.pattern, "movement": dict(self.movement)}

    def load_state_dict(self, state):
        masks = state["masks"]
        if set(masks) != set(self.params) or any(masks[n].shape != p.shape for n, p in self.params.items()):
            raise ValueError("pruning masks do not match this model's prunable weights (checkpoint of another config?)")
        for key in ("frozen", "final_sparsity", "initial_sparsity", "begin_step", "end_step", "prune_every", "global_"):
            setattr(self, key, state[key])
        self.score, self.pattern = state.get("score", "magnitude"), state.get("pattern", "unstructured")
        self.masks = {n: m.to(device=self.params[n].device, dtype=torch.bool) for n, m in masks.items()}
        self.movement = {n: m.to(self.params[n].device) for n, m in state.get("movement", {}).items()}
