"""Held-out MLM loss beside its floor: the unigram model, the best a model can do without context.

A support module of the training scripts: `mlm_corpora` tokenizes both corpora (general and
biomedical) and fits their unigram models; `held_out_line` is the line a script prints, and
records, after each phase. A model has learned something about language only once its loss is
below the unigram loss on the same masked tokens.
"""
import os

import numpy as np
import torch
import torch.nn.functional as F

from .bookkeeping import append_record
from .data import NUM_SPECIAL, Blocks, corpus_files, mask_tokens, tokenize_corpus
from .model import IGNORE_INDEX
from .runtime import autocast, barrier, to_device

EVAL_MLM_PROB = 0.15  # held-out MLM is always measured with BERT's masking rate


def unigram_log_probs(train_tokens, vocab_size):
    """log p(token) of a context-blind model fitted on the training tokens (add-one smoothing)."""
    counts = np.bincount(np.asarray(train_tokens, dtype=np.int64), minlength=vocab_size).astype(np.float64)
    counts[:NUM_SPECIAL] = 0
    counts[NUM_SPECIAL:] += 1
    with np.errstate(divide="ignore"):  # special tokens get log 0 = -inf: never a target
        return torch.from_numpy(np.log(counts / counts.sum())).float()


@torch.no_grad()
def evaluate_mlm(model, blocks, unigram_logp, n_batches=20, mlm_prob=EVAL_MLM_PROB, seed=1234, device=None,
                 bf16=False):
    """Held-out MLM loss and accuracy on fixed blocks and fixed masks, next to the unigram loss.

    Always BERT's 15% masking, whatever rate training uses, so that losses stay comparable.
    `unigram` is the loss of the best context-blind model on the same masked tokens: a model
    has learned something about language only once its loss is below it.
    """
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    g = torch.Generator().manual_seed(seed)
    total_loss = total_correct = total_unigram = n = 0
    for x, attention_mask in blocks.fixed_batches(n_batches):
        x, labels = mask_tokens(x, attention_mask, mlm_prob, model.config.vocab_size, g)
        batch = to_device({"input_ids": x, "attention_mask": attention_mask, "labels": labels}, device)
        with autocast(device, bf16):
            logits, _ = model(**batch)
        target = labels[labels != IGNORE_INDEX]
        logits = logits.float().cpu()
        total_loss += F.cross_entropy(logits, target, reduction="sum").item()
        total_correct += (logits.argmax(-1) == target).sum().item()
        total_unigram += -unigram_logp[target].sum().item()
        n += target.numel()
    model.train(was_training)
    return {"loss": total_loss / n, "acc": total_correct / n, "unigram": total_unigram / n}


def mlm_corpora(data_dir, tokenizer, seq_len, batch_size, max_docs=0, rank=0, world=1):
    """{domain: (training tokens, held-out Blocks, unigram log p)} for "general" and "bio": each
    corpus tokenized once into data_dir/cache (rank 0 builds the caches, the other ranks then read
    them), and the unigram model of its training text, the context-blind floor."""
    if rank != 0:
        barrier(world)
    corpora = {}
    for domain in ("general", "bio"):
        tokens, held_out = tokenize_corpus(domain, corpus_files(data_dir, domain), tokenizer,
                                           os.path.join(data_dir, "cache"), max_docs or None)
        corpora[domain] = (tokens, Blocks(held_out, seq_len, batch_size),
                           unigram_log_probs(tokens, tokenizer.get_vocab_size()))
    if rank == 0:
        barrier(world)
    return corpora


def held_out_line(model, blocks, unigram_logp, domain, n_batches, bf16=False, record_path=None, step=None):
    """`evaluate_mlm` as the line a script prints; the numbers also go to the run's record (if any)."""
    r = evaluate_mlm(model, blocks, unigram_logp, n_batches, bf16=bf16)
    append_record(record_path, step=step, domain=domain, eval_loss=r["loss"], eval_acc=r["acc"], unigram=r["unigram"])
    return f"{domain} MLM loss {r['loss']:.3f} (unigram {r['unigram']:.3f}) acc {r['acc']:.1%}"
