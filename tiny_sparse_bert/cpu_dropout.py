"""Dropout with a quarter of the random-number work on a CPU: the same distribution, less time.

A support module: the paper can be followed without it (model.py would run as well with
nn.Dropout and F.scaled_dot_product_attention's own dropout). tests/bench_model.py measures it.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def dropout(x, p, training=True):
    """Inverted dropout, as F.dropout, with a quarter of its random-number work on a CPU.

    On a CPU, drawing the random numbers is the expensive part of dropout: F.dropout draws one
    32-bit number per element, on one thread, and takes longer than the matmuls around it
    (tests/bench_model.py). Here each 64-bit draw is cut into four 16-bit numbers r, uniform over
    [-2^15, 2^15); an element is dropped when r < p * 2^16 - 2^15, so with probability p rounded
    to 1/65536. (In bf16 the kept elements' scale 1/(1-p) is rounded to bf16 too: 0.2% at p=0.1.)
    A GPU draws random numbers in parallel, so there F.dropout is used as is.
    """
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p)
    n = x.numel()
    words = torch.randint(-2**63, 2**63 - 1, ((n + 3) // 4,))  # int64, uniform over (nearly) all values
    r = words.view(torch.int16)[:n].view(x.shape)
    keep = r >= round(p * 65536) - 32768
    return x * (keep * (1.0 / (1.0 - p))).to(x.dtype)  # one multiply forward, one backward


class Dropout(nn.Module):
    """nn.Dropout with the cheaper random numbers of `dropout`."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        return dropout(x, self.p, self.training)

    def extra_repr(self):
        return f"p={self.p}"


def attend_with_dropout(q, k, v, attn_mask, p):
    """dropout(softmax(q k^T / sqrt(hs) + mask)) v, written out.

    This is what F.scaled_dot_product_attention computes on a CPU when dropout_p > 0 (its fused
    kernel has no dropout), except that the dropout mask comes from the cheaper `dropout`.
    """
    scores = (q / math.sqrt(q.size(-1))) @ k.transpose(-2, -1)  # (B, nh, T, T)
    if attn_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    else:
        scores = scores + attn_mask
    return dropout(scores.softmax(-1), p) @ v  # (B, nh, T, hs)
