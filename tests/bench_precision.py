"""Benchmark: fp32 against bf16 autocast, for a pretraining step and a fine-tuning step.

    python tests/bench_precision.py [--rounds 5] [--steps 4] [--threads N]

Pretraining: the default model of train_general.py (L4 H256, ALiBi, dropout 0) on a batch of
32 x 128 tokens with 40% masked, forward + backward + AdamW. Fine-tuning: the same encoder under a
token-classification head (dropout 0.1, the padding skipped) on batches of 32 sentences of 20-60
word pieces, as finetune.py draws them for NER. Each step is measured in fp32 and in bf16
autocast alternately, round by round, in one process; the table gives the medians and the ratio.
Whether bf16 pays depends on the CPU: AMX (Intel Xeon since Sapphire Rapids) or AVX512-BF16 (AMD
Zen 4, Intel Cooper Lake) do bf16 dot products natively; without them bf16 is emulated and slower.
"""
import argparse
import statistics
import time

import torch

from conftest import ROOT  # noqa: F401  (puts the repository on sys.path)
from tiny_sparse_bert.data import mask_tokens
from tiny_sparse_bert.model import BertConfig, BertForMaskedLM, BertForTokenClassification
from tiny_sparse_bert.runtime import autocast, cpu_bf16_support
from tiny_sparse_bert.train import make_optimizer


def pretraining_step(g):
    model = BertForMaskedLM(BertConfig(vocab_size=8192, alibi=True, dropout=0.0))
    ids = torch.randint(5, 8192, (32, 128), generator=g)
    inputs, labels = mask_tokens(ids, torch.ones_like(ids), 0.4, 8192, g)
    return model, {"input_ids": inputs, "attention_mask": torch.ones_like(ids), "labels": labels}


def finetuning_step(g):
    model = BertForTokenClassification(BertConfig(vocab_size=8192, alibi=True, dropout=0.1), 3)
    lengths = torch.randint(20, 61, (32,), generator=g)
    T = int(lengths.max())
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    labels = torch.randint(0, 3, (32, T), generator=g).masked_fill(mask == 0, -100)
    return model, {"input_ids": torch.randint(5, 8192, (32, T), generator=g) * mask, "attention_mask": mask,
                   "token_type_ids": torch.zeros(32, T, dtype=torch.long), "labels": labels}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4, help="steps per precision per round")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU bf16 support: "
          f"{cpu_bf16_support() or 'none'}")
    device = torch.device("cpu")
    for name, make in (("pretraining step", pretraining_step), ("fine-tuning step", finetuning_step)):
        model, batch = make(torch.Generator().manual_seed(0))
        optimizer = make_optimizer(model, 1e-4, 0.01)
        times = {"fp32": [], "bf16": []}
        for _ in range(args.rounds + 1):  # the first round warms up (allocations, oneDNN kernels) and is dropped
            for precision in times:
                t = time.perf_counter()
                for _ in range(args.steps):
                    with autocast(device, precision == "bf16"):
                        _, loss = model(**batch)
                    loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                times[precision].append((time.perf_counter() - t) * 1000 / args.steps)
        fp32, bf16 = (statistics.median(times[p][1:]) for p in ("fp32", "bf16"))
        print(f"{name}: fp32 {fp32:.0f} ms, bf16 {bf16:.0f} ms, bf16 is {fp32 / bf16:.2f}x "
              f"(rounds fp32 {[round(x) for x in times['fp32'][1:]]}, bf16 {[round(x) for x in times['bf16'][1:]]})")


if __name__ == "__main__":
    main()
