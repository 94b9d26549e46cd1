"""Benchmark: cost of gradual magnitude pruning in the training step.

    python tests/bench_pruning.py [--rounds 4] [--steps 25] [--prune-every 25]

The same MLM training step (forward, backward, AdamW; batch 32 x 128, default model size) with
and without a GradualMagnitudePruner (masks recomputed every --prune-every steps, applied after every
step), measured alternately, round by round, in one process. Target: at most 5% more.
"""
import argparse
import statistics
import time

import numpy as np
import torch

from conftest import ROOT  # noqa: F401  (puts the repository on sys.path)
from tiny_sparse_bert.data import Blocks, NUM_SPECIAL
from tiny_sparse_bert.model import BertConfig, BertForMaskedLM
from tiny_sparse_bert.pruning import GradualMagnitudePruner
from tiny_sparse_bert.data import mlm_batch
from tiny_sparse_bert.train import make_optimizer


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=25, help="steps per variant per round")
    parser.add_argument("--prune-every", type=int, default=25)
    args = parser.parse_args()
    config = BertConfig(vocab_size=8192)
    tokens = np.random.default_rng(0).integers(NUM_SPECIAL, 8192, 2_000_000).astype(np.uint16)
    blocks = Blocks(tokens, 128, 32)
    variants = {}
    for name in ("without pruner", "with pruner"):
        torch.manual_seed(0)
        model = BertForMaskedLM(config)
        total = args.rounds * args.steps
        pruner = GradualMagnitudePruner(model, 0.9, 0, total, args.prune_every) if name == "with pruner" else None
        variants[name] = (model, make_optimizer(model, 1e-4, 0.01), pruner)
    times = {name: [] for name in variants}
    step = 0
    for _ in range(args.rounds):
        for name, (model, optimizer, pruner) in variants.items():
            t = time.perf_counter()
            for s in range(step, step + args.steps):
                if pruner:
                    pruner.update(s)
                _, loss = model(**mlm_batch(blocks, s, 0.15, 8192, 0))
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if pruner:
                    pruner.apply()
            times[name].append((time.perf_counter() - t) / args.steps)
        step += args.steps
    base, pruned = statistics.median(times["without pruner"]), statistics.median(times["with pruner"])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch 32 x 128, L4 H256, "
          f"masks updated every {args.prune_every} steps")
    print(f"without pruner {base * 1000:.0f} ms/step, with pruner {pruned * 1000:.0f} ms/step: "
          f"{100 * (pruned / base - 1):+.1f}%")


if __name__ == "__main__":
    main()
