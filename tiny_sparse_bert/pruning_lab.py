"""The pruning lab: other scores and other groupings of weights, plugged into the paper's pruner.

A support module: the paper (magnitude, unstructured, pruning.py) can be followed without it.
`LabPruner` is `pruning.GradualMagnitudePruner` with two choices, each a few lines to read, copy
and change (docs/pruning-lab.md compares them all from one model):

- scores: `magnitude_score` (|w|, the paper's), `random_score` (the baseline any criterion must
  beat), and four that read data, gathered over the steps since the last mask update:
  `movement_score` (Sanh et al. 2020), `taylor_score` (first-order Taylor with momentum),
  `fisher_score` (diagonal Fisher, Optimal Brain Damage) from the gradients, which
  `pruner.accumulate()` reads right after `loss.backward()`; `wanda_score` (Sun et al. 2023) from
  each layer's inputs, which a forward hook reads;
- patterns: unstructured (each weight alone), blocks of R x C weights (a block's score is the sum
  of its weights' scores; whole blocks go), N:M (of every M consecutive weights along the input,
  N stay: what GPUs' sparse tensor cores run, 2:4), and "neurons": a feed-forward neuron is a row
  of the intermediate weight with the matching column of the output weight, an attention
  dimension a row of the query with the same row of the key, or a row of the value with the same
  column of the attention output; whole neurons go (`sparse.convert_to_sparse` then compacts
  them into smaller dense matrices).

Whatever the score, a pruned weight stays pruned: its unit's score is set to -inf before each
update (a random or a data-driven score would otherwise bring zeros back).

One-shot pruning is the schedule with `begin_step == end_step`: every weight goes at that step,
scored on what was gathered in the `prune_every` steps before it (train_general.py
`--prune-begin 0.05 --prune-end 0.05`).
"""
import math

import torch
import torch.distributed as dist

from .pruning import GradualMagnitudePruner

# ---------------------------------------------------------------------------------- scores
# Importance of each weight (a tensor of its shape); the lowest are pruned. `stats` is what the
# pruner gathered for this weight since the last mask update (see GATHER below).

def magnitude_score(weight, stats):
    """|w| (Zhu & Gupta 2017; Sparse*BERT): small weights matter least."""
    return weight.abs()


def random_score(weight, stats):
    """A random order (torch's seeded generator): what any criterion must beat."""
    return torch.rand(weight.shape, device=weight.device)


def movement_score(weight, stats):
    """Sanh et al. 2020, "Movement pruning": -sum_t w dL/dw. High when training pushes a weight away
    from zero, low when it pulls it towards zero, whatever its size now."""
    return stats


def taylor_score(weight, stats):
    """First-order Taylor, |w dL/dw| (Molchanov et al. 2019): the loss change if w went to zero, to
    first order; averaged with momentum, S <- 0.9 S + |w dL/dw| (Intel Neural Compressor's
    "snip_momentum"; SNIP, Lee et al. 2019, is the single-batch case)."""
    return stats


def fisher_score(weight, stats):
    """Diagonal Fisher, Optimal Brain Damage (LeCun et al. 1990; the block-size-1 case of oBERT,
    Kurtic et al. 2022): the loss rises by about w^2 F / 2 when w goes, F = mean of (dL/dw)^2, the
    diagonal of the empirical Fisher. Here the sum over the window: every weight sees the same
    steps, so the ranking is the mean's."""
    return weight.pow(2) * stats


def wanda_score(weight, stats):
    """Wanda (Sun et al. 2023, "A simple and effective pruning approach for LLMs"): |W_ij| ||X_j||_2,
    X_j the j-th input feature over the tokens seen (stats: sum of x_j^2, one per input). A weight
    on an input that is always large matters more than its size says. Wanda compares within each
    output row and prunes once; here it goes through the pruner's grouping like every score (per
    tensor or global, any pattern) and the cubic schedule."""
    return weight.abs() * stats.sqrt()[None, :]


SCORES = {"magnitude": magnitude_score, "random": random_score, "movement": movement_score,
          "taylor": taylor_score, "fisher": fisher_score, "wanda": wanda_score}

# What the data-driven scores gather, after each backward from the weight w and its gradient g
# (in place into s, one tensor per weight), or from the layer's input x (wanda, a forward hook).
GATHER = {"movement": lambda s, w, g: s.sub_(w * g),
          "taylor": lambda s, w, g: s.mul_(0.9).add_((w * g).abs()),
          "fisher": lambda s, w, g: s.add_(g * g)}
KEEPS_ACROSS_UPDATES = ("taylor",)  # a moving average; the others count from one mask update to the next


# ---------------------------------------------------------------------------------- patterns

def parse_pattern(text):
    """--prune-pattern: "unstructured", "neurons", "RxC" (blocks, e.g. 4x4) or "N:M" (e.g. 2:4)."""
    if text in ("unstructured", "neurons"):
        return text
    n, colon, m = text.partition(":")
    if colon and n.isdigit() and m.isdigit() and 0 < int(n) < int(m):
        return text
    rows, _, cols = text.partition("x")
    if not (rows.isdigit() and cols.isdigit() and int(rows) > 0 and int(cols) > 0):
        raise SystemExit(f"error: --prune-pattern {text!r}: use unstructured, neurons, a block shape such as 4x4 "
                         f"or N of every M weights such as 2:4")
    return text


def n_of_m(pattern):
    """(N, M) of an "N:M" pattern, else None."""
    return tuple(map(int, pattern.split(":"))) if ":" in pattern else None


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
    """GMP with another `score` (one of SCORES) and `pattern` ("unstructured", "RxC" blocks, "N:M"
    or "neurons"); `global_` puts one threshold across all weights instead of one per tensor (per
    pair of tensors for neurons)."""

    def __init__(self, model, final_sparsity=0.9, begin_step=0, end_step=1000, prune_every=100,
                 initial_sparsity=0.0, global_=False, score="magnitude", pattern="unstructured"):
        super().__init__(model, final_sparsity, begin_step, end_step, prune_every, initial_sparsity, global_)
        self.modules = {name: model.get_submodule(name.rsplit(".", 1)[0]) for name in self.params}  # their Linears
        self.hooks = []
        self.choose(score, pattern)

    def choose(self, score, pattern):
        """Set the score and the pattern; start gathering what the score reads."""
        assert score in SCORES, f"score {score!r}: one of {', '.join(SCORES)}"
        self.score, self.pattern = score, parse_pattern(pattern)
        if n_of_m(self.pattern):
            n, m = n_of_m(self.pattern)
            assert abs(self.final_sparsity - (1 - n / m)) < 1e-9, f"{pattern} is {1 - n / m:.0%} sparse exactly"
        gathers = score in GATHER or score == "wanda"
        self.stats = {name: torch.zeros(p.shape[1] if score == "wanda" else p.shape, device=p.device)
                      for name, p in self.params.items()} if gathers else {}
        for hook in self.hooks:
            hook.remove()
        self.hooks = [self.modules[name].register_forward_hook(self.input_norms(name))
                      for name in self.params] if score == "wanda" else []

    def input_norms(self, name):
        """A forward hook for Wanda: add each input feature's sum of squares over the tokens of a
        training batch (evaluation in eval mode and a frozen pruner gather nothing)."""
        def hook(module, inputs, output):
            if module.training and not self.frozen:
                with torch.no_grad():
                    self.stats[name] += inputs[0].detach().float().pow(2).flatten(0, -2).sum(0)
        return hook

    @torch.no_grad()
    def accumulate(self):
        """After loss.backward(): the gradient-based scores add this step's term (GATHER)."""
        if self.score in GATHER:
            for name, s in self.stats.items():
                if self.params[name].grad is not None:
                    GATHER[self.score](s, self.params[name], self.params[name].grad)

    @torch.no_grad()
    def units(self):
        """{group: (unit scores, already pruned)}: the units the pattern prunes whole, each group a
        tensor (unstructured, blocks, N:M) or a tuple of (tensor, axis) pairs (neurons)."""
        if self.score == "wanda" and dist.is_available() and dist.is_initialized():
            for s in self.stats.values():  # each rank saw its own tokens; the masks must agree
                dist.all_reduce(s)
        scores = {n: SCORES[self.score](p, self.stats.get(n)) for n, p in self.params.items()}
        units = {}
        if self.pattern == "neurons":
            for group in neuron_groups(self.params):
                unit = sum(scores[name].sum(1 - axis) for name, axis in group)  # a row or a column each
                name, axis = group[0]
                units[tuple(group)] = (unit, ~self.masks[name].any(1 - axis))
        elif n_of_m(self.pattern):  # only the M - N lowest of each group of M along a row may go
            n, m = n_of_m(self.pattern)
            for name, s in scores.items():
                pruned = ~self.masks[name]
                groups = s.masked_fill(pruned, -math.inf).view(s.shape[0], -1, m)
                lowest = groups.argsort(dim=-1, stable=True).argsort(dim=-1) < m - n  # pruned ones rank lowest
                units[name] = (groups.masked_fill(~lowest, math.inf).view_as(s), pruned)
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
        if updated and self.score not in KEEPS_ACROSS_UPDATES:
            for s in self.stats.values():
                s.zero_()  # counted from one mask update to the next
        return updated

    def state_dict(self):
        return {**super().state_dict(), "stats": dict(self.stats)}

    def load_state_dict(self, state):
        self.score, self.pattern = state.get("score", "magnitude"), state.get("pattern", "unstructured")
        super().load_state_dict(state)
        self.choose(self.score, self.pattern)
        stats = state.get("stats", state.get("movement", {}))  # "movement": checkpoints from before the other scores
        self.stats = {n: s.to(self.params[n].device) for n, s in stats.items()}
