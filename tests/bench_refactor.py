"""A refactor must not slow the step: train() of an older checkout against this one, in one process.

    python tests/bench_refactor.py ../before          # a checkout of the last commit (git worktree add)

The older checkout's package is copied under another name, so both load side by side; each round
runs `--steps` steps of the default model (L4 H256, batch 16 x 128, MLM, GMP with a mask update
every 5 steps) with each package in turn, the order alternating. Prints the median ms per step
of each and their ratio (pair it with tests/compare_runs.py, which checks the numbers are equal).
"""
import argparse
import contextlib
import importlib
import io
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pruner_class(package):
    pruning = importlib.import_module(f"{package}.pruning")
    return getattr(pruning, "GradualMagnitudePruner", None) or pruning.MagnitudePruner  # its older name


def ms_per_step(package, batch, steps):
    train, model_module = (importlib.import_module(f"{package}.{m}") for m in ("train", "model"))
    torch.manual_seed(0)
    config = model_module.BertConfig(vocab_size=8192, n_layer=4, hidden=256, n_head=4, intermediate=1024, alibi=True)
    model = model_module.BertForMaskedLM(config)
    pruner = pruner_class(package)(model, 0.9, 0, steps, 5)
    optimizer = train.make_optimizer(model, 1e-3, 0.01)
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        start = time.perf_counter()
        train.train(model, optimizer, lambda step: batch, steps, peak_lr=1e-3, warmup_steps=2, pruner=pruner)
    return (time.perf_counter() - start) * 1000 / steps


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", help="a checkout of the code to compare against")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=12)
    args = parser.parse_args()
    source = os.path.join(args.before, "tiny_sparse_bert")
    if not os.path.isdir(source):
        raise SystemExit(f"error: {args.before} holds no tiny_sparse_bert/ (give a checkout of this project)")
    copy = tempfile.mkdtemp()
    shutil.copytree(source, os.path.join(copy, "tsb_before"))
    sys.path[:0] = [copy, ROOT]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 8192, (16, 128), generator=g)
    labels = torch.where(torch.rand(16, 128, generator=g) < 0.4, ids, torch.full_like(ids, -100))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    ms_per_step("tiny_sparse_bert", batch, 4)  # warm-up
    times = {"tsb_before": [], "tiny_sparse_bert": []}
    for i in range(args.rounds):
        for package in (list(times) if i % 2 else list(times)[::-1]):
            times[package].append(ms_per_step(package, batch, args.steps))
    before, now = (statistics.median(t) for t in times.values())
    print(f"median ms/step over {args.rounds} rounds of {args.steps} steps: before {before:.1f}, now {now:.1f}; "
          f"now / before {now / before:.3f} ({torch.get_num_threads()} threads)")
    shutil.rmtree(copy)


if __name__ == "__main__":
    main()
