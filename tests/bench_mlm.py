"""Benchmark: held-out MLM loss against training steps for one pretraining setup (time to quality).

    python tests/bench_mlm.py --dropout 0 --lr 2e-3 --warmup 0.1 --steps 1000 --mlm-prob 0.4

Trains a fresh BertForMaskedLM on the general corpus (data/, tokenizer from train_general.py)
with the package's own data, masking and schedule, and prints the held-out MLM loss (15% masked,
fixed blocks and masks) every --eval-every steps next to the unigram loss of the same tokens.
The time-to-quality table (docs/time-to-quality.md) was made with it.
"""
import argparse
import time

import numpy as np
import torch

from conftest import ROOT  # noqa: F401  (puts the repository on sys.path)
from tiny_sparse_bert.data import Blocks, NUM_SPECIAL, corpus_files, load_tokenizer, tokenize_corpus
from tiny_sparse_bert.model import BertConfig, BertForMaskedLM
from tiny_sparse_bert.data import mlm_batch
from tiny_sparse_bert.evaluation import evaluate_mlm, unigram_log_probs
from tiny_sparse_bert.runtime import autocast
from tiny_sparse_bert.train import linear_warmup_decay, make_optimizer


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data")
    p.add_argument("--tokenizer", default="out/tokenizer.json")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=1024)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--pre-norm", action="store_true")
    p.add_argument("--alibi", action="store_true", help="ALiBi distance bias on attention")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=float, default=0.06, help="fraction of the steps")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--mlm-prob", type=float, default=0.15)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast on the CPU")
    p.add_argument("--bigram", action="store_true", help="only print what the previous token alone is worth")
    args = p.parse_args()

    torch.manual_seed(0)
    tokenizer = load_tokenizer(args.tokenizer)
    V = tokenizer.get_vocab_size()
    train_tokens, val_tokens = tokenize_corpus("general", corpus_files(args.data, "general"), tokenizer,
                                               f"{args.data}/cache")
    if args.bigram:
        return print_bigram_loss(train_tokens, val_tokens, V)
    config = BertConfig(vocab_size=V, n_layer=args.layers, hidden=args.hidden, n_head=args.heads,
                        intermediate=args.intermediate, dropout=args.dropout, pre_norm=args.pre_norm,
                        alibi=args.alibi)
    model = BertForMaskedLM(config)
    optimizer = make_optimizer(model, args.lr, 0.01)
    blocks, val = Blocks(train_tokens, args.seq_len, args.batch_size), Blocks(val_tokens, 128, 32)
    unigram = unigram_log_probs(train_tokens, V)
    device, t0 = torch.device("cpu"), time.time()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = linear_warmup_decay(step, args.lr, int(args.warmup * args.steps), args.steps)
        with autocast(device, args.bf16):
            _, loss = model(**mlm_batch(blocks, step, args.mlm_prob, V, 0))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            r = evaluate_mlm(model, val, unigram, n_batches=10)
            print(f"step {step + 1} | {(time.time() - t0) / 60:.1f} min | held-out loss {r['loss']:.3f} "
                  f"(unigram {r['unigram']:.3f}) acc {r['acc']:.1%}", flush=True)


def print_bigram_loss(train_tokens, val_tokens, V, weight=0.9):
    """Held-out cross-entropy of a count-based bigram model p(w | previous token), interpolated with
    the unigram: what local context alone is worth, next to the unigram floor (no network involved)."""
    train = np.asarray(train_tokens, dtype=np.int64)
    val = np.asarray(val_tokens, dtype=np.int64)
    unigram = unigram_log_probs(train, V).exp().numpy()  # the floor evaluate_mlm reports
    pairs = np.bincount(train[:-1] * V + train[1:], minlength=V * V).reshape(V, V)  # (previous, next)
    prev, nxt = val[:-1], val[1:]
    prev, nxt = prev[nxt >= NUM_SPECIAL], nxt[nxt >= NUM_SPECIAL]  # special tokens are never MLM targets
    seen = pairs.sum(1)  # how often each token is someone's previous token
    p = weight * pairs[prev, nxt] / np.maximum(seen[prev], 1) + (1 - weight) * unigram[nxt]
    print(f"held-out tokens {len(nxt):,}: unigram {-np.log(unigram[nxt]).mean():.3f} nats, "
          f"bigram (previous token, weight {weight}) {-np.log(p).mean():.3f} nats")


if __name__ == "__main__":
    main()
