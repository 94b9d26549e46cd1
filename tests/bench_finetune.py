"""Benchmark: fine-tuning steps with and without the padding computed, random or length-grouped batches.

    python tests/bench_finetune.py [--task ncbi_disease] [--rounds 3] [--steps 20]

The training step of finetune.py (default model size, batch 32, the task's first 2,000 training
examples encoded with out/tokenizer.json) in four variants, measured alternately, round by
round, in one process:
- "random, padding computed": batches cut from a random permutation, the encoder run on every
  position (the reference: how finetune.py worked before BertModel's skip_padding);
- "random": the same batches, the encoder run on the real positions only (finetune.py's way for
  sentence-level tasks);
- "length-grouped, padding computed": tasks.length_grouped_batches, every position;
- "length-grouped": the same, real positions only (finetune.py's way for NER).
Prints ms per step, the share of each batch that is padding, and each variant's speed-up over
the reference.
"""
import argparse
import statistics
import time

import numpy as np
import torch

from conftest import ROOT  # noqa: F401  (puts the repository on sys.path)
from tiny_sparse_bert.data import load_tokenizer
from tiny_sparse_bert.model import BertConfig, BertForSequenceClassification, BertForTokenClassification
from tiny_sparse_bert.tasks import collate, encode, get_task, label_list, length_grouped_batches, load_splits
from tiny_sparse_bert.train import make_optimizer


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="ncbi_disease")
    parser.add_argument("--data", default="data")
    parser.add_argument("--tokenizer", default="out/tokenizer.json")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20, help="steps per variant per round")
    args = parser.parse_args()
    task = get_task(args.task)
    splits = load_splits(task, args.data)
    labels = label_list(task, splits)
    tokenizer = load_tokenizer(args.tokenizer)
    train = encode(task, splits["train"][:2000], tokenizer, labels, 128)
    lengths = np.array([len(it["ids"]) for it in train])
    rng = np.random.default_rng(0)
    random_batches = lambda: rng.permutation(len(train))[:len(train) // 32 * 32].reshape(-1, 32)
    grouped_batches = lambda: length_grouped_batches(lengths, 32, rng)
    variants = {"random, padding computed": (random_batches, False), "random": (random_batches, True),
                "length-grouped, padding computed": (grouped_batches, False), "length-grouped": (grouped_batches, True)}
    config = BertConfig(vocab_size=tokenizer.get_vocab_size())
    torch.manual_seed(0)
    model = (BertForTokenClassification(config, len(labels)) if task.kind == "ner"
             else BertForSequenceClassification(config, len(labels), multi_label=task.kind == "multi"))
    optimizer = make_optimizer(model, 1e-4, 0.01)
    times, padding = {name: [] for name in variants}, {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, (batches, skip_padding) in variants.items():
            model.skip_padding = skip_padding
            epoch = batches()[:args.steps]
            padding[name] += [1 - lengths[b].sum() / (len(b) * lengths[b].max()) for b in epoch]
            t = time.perf_counter()
            for idx in epoch:
                batch = collate([train[i] for i in idx], task.kind)
                _, loss = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], batch["labels"])
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            times[name].append((time.perf_counter() - t) / len(epoch))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {task.name}, batch 32, L4 H256, fp32")
    reference = statistics.median(times["random, padding computed"])
    for name in variants:
        print(f"{name}: {1000 * statistics.median(times[name]):.0f} ms/step, "
              f"{100 * statistics.mean(padding[name]):.0f}% of each batch is padding, "
              f"speed-up {reference / statistics.median(times[name]):.2f}x")


if __name__ == "__main__":
    main()
