"""Benchmark: MLM training throughput of our BERT vs transformers.BertForMaskedLM (same config).

    python tests/bench_model.py [--rounds 5] [--steps 5]

One training step = forward + backward + AdamW step on a batch of 32 x 128 tokens with 15% of
positions masked. The two models are measured alternately, round by round, in one process, so
machine noise hits both alike; the table gives the median tokens/s of each and their ratio.
Needs `pip install transformers` (only for this comparison; the project does not depend on it).
"""
import argparse
import statistics
import tempfile
import time

import torch

from conftest import ROOT  # noqa: F401  (puts the repository on sys.path)
from tiny_sparse_bert.data import mask_tokens
from tiny_sparse_bert.hf import save_hf
from tiny_sparse_bert.model import BertConfig, BertForMaskedLM


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5, help="steps per model per round")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    args = parser.parse_args()
    import transformers

    config = BertConfig(vocab_size=8192, n_layer=4, hidden=256, n_head=4, intermediate=1024)
    ours = BertForMaskedLM(config)
    with tempfile.TemporaryDirectory() as d:
        save_hf(ours, d)
        theirs = transformers.BertForMaskedLM.from_pretrained(d, attn_implementation="sdpa")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, config.vocab_size, (args.batch_size, args.seq_len), generator=g)
    attention = torch.ones_like(ids)
    inputs, labels = mask_tokens(ids, attention, 0.15, config.vocab_size, g)

    def step_fn(model, call):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            loss = call(model)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    runs = {"ours": step_fn(ours, lambda m: m(inputs, attention, labels=labels)[1]),
            "transformers": step_fn(theirs, lambda m: m(input_ids=inputs, attention_mask=attention, labels=labels).loss)}
    for step in runs.values():  # warm-up
        step()
    times = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, step in runs.items():
            t = time.perf_counter()
            for _ in range(args.steps):
                step()
            times[name].append((time.perf_counter() - t) / args.steps)
    tokens = args.batch_size * args.seq_len
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads, "
          f"batch {args.batch_size} x {args.seq_len}, L{config.n_layer} H{config.hidden} V{config.vocab_size}")
    for name, ts in times.items():
        print(f"{name:13s} {tokens / statistics.median(ts):9,.0f} tokens/s  ({statistics.median(ts) * 1000:.0f} ms/step)")
    print(f"ratio ours / transformers: {statistics.median(times['transformers']) / statistics.median(times['ours']):.2f}x")


if __name__ == "__main__":
    main()
