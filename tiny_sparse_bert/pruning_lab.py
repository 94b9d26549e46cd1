"""The pruning lab: other scores and other groupings of weights, plugged into the paper's pruner.

A support module: the paper (magnitude, unstructured, pruning.py) can be followed without it.
`LabPruner` is `pruning.GradualMagnitudePruner` with two choices, each a few lines to read, copy
and change (docs/pruning-lab.md compares them all from one model):

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
import torch

from .pruning import GradualMagnitudePruner

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


def make_pruner(model, final_sparsity, begin_step, end_step, prune_every, global_=False, score="magnitude",
                pattern="unstructured"):
    """The paper's GradualMagnitudePruner, or a LabPruner when the score or the pattern is another."""
    if score == "magnitude" and pattern == "unstructured":
        return GradualMagnitudePruner(model, final_sparsity, begin_step, end_step, prune_every, global_=global_)
    return LabPruner(model, final_sparsity, begin_step, end_step, prune_every, global_=global_, score=score,
                     pattern=pattern)


class LabPruner(GradualMagnitudePruner):
    """GMP with another `score` ("magnitude", "random" or "movement") and `pattern`
    ("unstructured", "RxC" blocks or "neurons"); `global_` puts one threshold across all weights
    instead of one per tensor (per pair of tensors for neurons)."""

    def __init__(self, model, final_sparsity=0.9, begin_step=0, end_step=1000, prune_every=100,
                 initial_sparsity=0.0, global_=False, score="magnitude", pattern="unstructured"):
        super().__init__(model, final_sparsity, begin_step, end_step, prune_every, initial_sparsity, global_)
        assert score in SCORES, f"score {score!r}: one of {', '.join(SCORES)}"
        self.score, self.pattern = score, parse_pattern(pattern)
        self.movement = {name: torch.zeros_like(p) for name, p in self.params.items()} if score == "movement" else {}

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

    def update(self, step):
        updated = super().update(step)
        if updated:
            for m in self.movement.values():
                m.zero_()  # movement counts from one update to the next
        return updated

    def state_dict(self):
        return {**super().state_dict(), "movement": dict(self.movement)}

    def load_state_dict(self, state):
        self.score, self.pattern = state.get("score", "magnitude"), parse_pattern(state.get("pattern", "unstructured"))
        super().load_state_dict(state)
        self.movement = {n: m.to(self.params[n].device) for n, m in state.get("movement", {}).items()}
