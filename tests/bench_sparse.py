"""Benchmark: encoder forward latency, dense (masked) weights vs `convert_to_sparse`.

    python tests/bench_sparse.py [--rounds 5] [--sizes default,base] [--sparsities 0.8,0.9,0.95]
                                 [--patterns unstructured,4x4,16x16,neurons,2:4] [--json PATH]

For each size (our default L4 H256 I1024, and a BERT-base-sized stack H768 I3072 with 4 layers:
the per-layer cost is what matters), pruning pattern and sparsity, the same pruned encoder runs
dense and converted (CSR for unstructured zeros, BSR for blocks, smaller dense feed-forwards and
attentions for whole neurons, nothing for N:M's 50%: what `convert_to_sparse` finds), alternately,
round by round in one process; the table gives the median latency of each, the speedup, and the
largest difference between their outputs. Also prints the compressed size of the
prunable weights. `--json out/bench_sparse.json` also writes the rows for `python -m
tiny_sparse_bert.plots out/`.
"""
import argparse
import copy
import json
import statistics
import time

import torch

from conftest import ROOT  # noqa: F401  (puts the repository on sys.path)
from tiny_sparse_bert.model import BertConfig, BertModel
from tiny_sparse_bert.pruning_lab import LabPruner, n_of_m
from tiny_sparse_bert.sparse import convert_to_sparse, prunable_bytes

SIZES = {"default": dict(n_layer=4, hidden=256, n_head=4, intermediate=1024),
         "base": dict(n_layer=4, hidden=768, n_head=12, intermediate=3072)}


def latency(model, x, rounds):
    with torch.no_grad():
        model(x)
        times = []
        for _ in range(rounds):
            t = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t)
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sizes", default="default,base")
    parser.add_argument("--sparsities", default="0.8,0.9,0.95")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--patterns", default="unstructured", help="pruning patterns (pruning.py), comma-separated")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--json", default="", help="also write the rows to this JSON file")
    args = parser.parse_args()
    rows = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of {args.rounds} rounds, "
          f"dense and sparse alternated; sequence length {args.seq_len}")
    print("| size | pattern | sparsity | batch | dense ms | sparse ms | speedup | max abs diff | converted | "
          "prunable MB dense -> compressed |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    runs = []
    for size in args.sizes.split(","):
        for pattern in args.patterns.split(","):
            if n_of_m(pattern):  # N:M has one sparsity, 1 - N/M
                runs.append((size, pattern, 1 - n_of_m(pattern)[0] / n_of_m(pattern)[1]))
            else:
                runs += [(size, pattern, float(s)) for s in args.sparsities.split(",")]
    for size, pattern, sparsity in runs:
        torch.manual_seed(0)
        dense = BertModel(BertConfig(vocab_size=8192, dropout=0.0, **SIZES[size])).eval()
        pruner = LabPruner(dense, sparsity, 0, 0, 1, pattern=pattern)
        pruner.update(0)
        sparse = copy.deepcopy(dense)
        converted = ", ".join(f"{n} {kind}" for kind, n in convert_to_sparse(sparse).items() if n) or "stays dense"
        d_bytes, c_bytes = prunable_bytes(dense)
        for batch in map(int, args.batches.split(",")):
            x = torch.randint(5, 8192, (batch, args.seq_len))
            with torch.no_grad():
                diff = float((dense(x) - sparse(x)).abs().max())  # the converted model computes the same
            t_dense, t_sparse = [], []
            for _ in range(args.rounds):  # alternate, so drifts in machine load hit both
                t_dense += latency(dense, x, 1)
                t_sparse += latency(sparse, x, 1)
            d, s = statistics.median(t_dense) * 1000, statistics.median(t_sparse) * 1000
            print(f"| {size} | {pattern} | {sparsity:.0%} | {batch} | {d:.1f} | {s:.1f} | {d / s:.2f}x | {diff:.1e} | "
                  f"{converted} | {d_bytes / 1e6:.1f} -> {c_bytes / 1e6:.1f} ({d_bytes / c_bytes:.1f}x) |", flush=True)
            rows.append(dict(size=size, pattern=pattern, sparsity=sparsity, batch=batch, dense_ms=d, sparse_ms=s,
                             max_abs_diff=diff))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
