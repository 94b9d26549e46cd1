"""Step 1 of 3: pretrain a small BERT on general English with MLM, then prune it with GMP.

Sparse*BERT (Campos et al. 2022, section 3): a BERT model pruned with gradual magnitude pruning
(Zhu & Gupta 2017) during general-domain masked-language-model pretraining. Here:

    phase 1  dense MLM pretraining from scratch (our stand-in for Google's BERT) -> out/general-dense/
    phase 2  GMP from that model, cubic schedule to --final-sparsity (0.9)      -> out/general-sparse90/

    python train_general.py                  # laptop-CPU default (see README for time and results)
    python train_general.py --preset tiny    # seconds, for tests
    python train_general.py --help           # every knob
    python train_general.py --resume         # continue after Ctrl-C (finished phases are kept)
    python train_general.py --overwrite      # start over, replacing an earlier run in --out

Run it cell by cell (`# %%`) in an editor, or top to bottom.
"""
# %% 1) config
import glob
import os
import time
from dataclasses import asdict, dataclass

import torch

from tiny_sparse_bert.bookkeeping import Checkpoints, Reporting, file_sha256, resume, stop_quietly
from tiny_sparse_bert.config import (PRETRAIN_BOOKKEEPING, PretrainOptions, check_model_and_pruning, check_options,
                                     check_pretrain_options, claim_run_dir, load_run_tokenizer, parse_config,
                                     remove_run_files, save_run_files)
from tiny_sparse_bert.data import Blocks, corpus_files, documents, mlm_batch, static_predictions, train_tokenizer
from tiny_sparse_bert.distillation import Distillation, frozen_copy
from tiny_sparse_bert.evaluation import held_out_line, mlm_corpora
from tiny_sparse_bert.model import BertConfig, BertForMaskedLM, count_parameters
from tiny_sparse_bert.pruning_lab import make_pruner
from tiny_sparse_bert.runtime import Runtime, barrier, start_up, wrap_ddp
from tiny_sparse_bert.train import make_optimizer, train


@dataclass
class Config(PretrainOptions):     # + data, out, seq_len, batch_size, mlm_prob, warmup, ... (config.py)
    out: str = "out"               # writes out/tokenizer.json, out/general-dense/, out/general-sparse90/
    # model: BertConfig (paper names L = n_layer, H = hidden, A = n_head)
    vocab_size: int = 8192         # WordPiece vocabulary, trained on the general corpus
    n_layer: int = 4               # L, encoder layers
    hidden: int = 256              # H, hidden size
    n_head: int = 4                # A, attention heads
    intermediate: int = 1024       # feed-forward size (4 H, as BERT)
    dropout: float = 0.0           # NOTE(deviation): BERT uses 0.1; none in pretraining (Geiping & Goldstein 2022)
    pre_norm: bool = False         # LayerNorm before each block (Xiong et al. 2020) instead of BERT's after
    alibi: bool = True             # NOTE(deviation): attention distance bias (ALiBi, Press et al. 2022; MosaicBERT)
    # phase 1: dense pretraining
    dense_steps: int = 2700        # steps of phase 1
    lr: float = 2e-3               # peak learning rate of phase 1
    # phase 2: gradual magnitude pruning (Zhu & Gupta 2017)
    prune_steps: int = 1300        # steps of phase 2
    prune_lr: float = 1e-3         # peak learning rate of phase 2
    final_sparsity: float = 0.9    # fraction of zeros in every prunable tensor at the end
    prune_begin: float = 0.0       # fraction of phase 2 where pruning starts ...
    prune_end: float = 0.7         # ... and where it reaches final_sparsity (the rest recovers; = begin: one-shot)
    prune_every: int = 50          # steps between mask updates
    global_pruning: bool = False   # one threshold across all layers instead of per tensor
    prune_score: str = "magnitude"  # magnitude (the paper's) | random | movement | taylor | fisher | wanda
    prune_pattern: str = "unstructured"  # unstructured | RxC blocks, e.g. 4x4 | N:M, e.g. 2:4 | neurons (whole neurons)
    distill: float = 0.0           # weight of the KL to the dense model during pruning (0 = off)
    distill_temperature: float = 2.0  # softmax temperature of the distillation loss


# What else may change when resuming a finished phase 1: the settings of phase 2 (an unfinished
# phase may change more, and says so: config.check_resume_config)
PHASE2 = ("prune_steps", "prune_lr", "final_sparsity", "prune_begin", "prune_end", "prune_every", "global_pruning",
          "prune_score", "prune_pattern", "distill", "distill_temperature")

PRESETS = {
    "default": {},
    "tiny": dict(out="out-tiny", max_docs=300, vocab_size=1000, n_layer=2, hidden=64, n_head=2, intermediate=128,
                 seq_len=64, batch_size=8, dense_steps=30, prune_steps=30, prune_every=5, eval_batches=2,
                 eval_every=0, log_every=10, ckpt_every=10),
    # the whole story within a class (17 minutes with the other lab presets): the default model at a fifth
    # of its tokens; why batch 16 and a long warm-up: docs/flow-time.md
    "lab": dict(out="out-lab", batch_size=16, dense_steps=1200, warmup=0.25, prune_steps=400, prune_every=20,
                eval_every=0, eval_batches=40),
    "gpu": dict(n_layer=6, hidden=512, n_head=8, intermediate=2048, batch_size=128, dense_steps=6000,
                prune_steps=4000, eval_every=1000),
    # the paper's BERT-base (L12 H768 A12 I3072), batch 256 x 128; steps sized from a FLOP estimate
    # (tests/bench_gpu.py: 1.8e13 FLOP per step, ~50 ms at 35% MFU of an H100), not yet measured
    "base": dict(n_layer=12, hidden=768, n_head=12, intermediate=3072, batch_size=256, lr=5e-4, prune_lr=3e-4,
                 dense_steps=12000, prune_steps=6000, eval_every=2000, ckpt_every=1000),
}

preset, cfg = parse_config(Config, PRESETS, __doc__.splitlines()[0])
stop_quietly()  # Ctrl-C outside the training loop: one line, what was saved is kept
check_pretrain_options(cfg)
check_options(cfg, positive=("vocab_size", "n_layer", "hidden", "n_head", "intermediate", "dense_steps",
                             "prune_steps", "lr", "prune_lr", "prune_every", "distill_temperature"),
              fraction=("prune_begin", "prune_end", "distill"), below_one=("final_sparsity", "dropout"))
check_model_and_pruning(cfg)  # heads divide the hidden size, a known score and pattern, begin < end
torch.manual_seed(cfg.seed)
rank, world, device, bf16 = start_up(cfg, preset)  # prints the config; only rank 0 prints from here on
sparse_name = f"general-sparse{round(cfg.final_sparsity * 100)}"
dense_dir, sparse_dir = os.path.join(cfg.out, "general-dense"), os.path.join(cfg.out, sparse_name)
dense_ckpt, sparse_ckpt = os.path.join(dense_dir, "ckpt.pt"), os.path.join(sparse_dir, "ckpt.pt")
dense_record, sparse_record = os.path.join(dense_dir, "record.jsonl"), os.path.join(sparse_dir, "record.jsonl")
t_start = time.time()

# an earlier run in --out is continued (--resume), replaced (--overwrite), or left alone
existing = claim_run_dir(cfg, cfg.out, [(dense_ckpt, PRETRAIN_BOOKKEEPING + PHASE2, "dense_steps"),
                                        (sparse_ckpt, PRETRAIN_BOOKKEEPING, "prune_steps")], "train_general.py")
if cfg.overwrite and rank == 0:  # every file of the old run; a new dense model makes every sparse one stale
    remove_run_files([dense_dir] + glob.glob(os.path.join(cfg.out, "general-sparse*")))
barrier(world)

# %% 2) data: WordPiece tokenizer on the general corpus, then one cached token array per corpus
general_files = corpus_files(cfg.data, "general")
tokenizer_path = os.path.join(cfg.out, "tokenizer.json")
resuming = cfg.resume and existing  # a resumed run keeps the tokenizer its checkpoints were trained with
if rank == 0 and not resuming:
    print(f"training a {cfg.vocab_size}-token WordPiece tokenizer -> {tokenizer_path}")
    train_tokenizer(list(documents(general_files, cfg.max_docs or None)), cfg.vocab_size, tokenizer_path)
barrier(world)  # the other ranks wait for rank 0's tokenizer
tokenizer = load_run_tokenizer(tokenizer_path, cfg.vocab_size, resuming, dense_dir)
tokenizer_sha256 = file_sha256(tokenizer_path)
corpora = mlm_corpora(cfg.data, tokenizer, cfg.seq_len, cfg.batch_size, cfg.max_docs, rank, world)
general_train = corpora["general"][0]
print(f"general corpus: {len(general_train):,} training and {len(corpora['general'][1].tokens):,} held-out tokens")
blocks = Blocks(general_train, cfg.seq_len, cfg.batch_size, seed=cfg.seed)
held_out = {domain: corpora[domain][1:] for domain in ("general", "bio")}  # held-out blocks, context-blind floor


def evaluate(model, domain="general", step=None, record=None):
    """Held-out MLM loss of one domain next to its unigram floor; appended to `record` at `step`."""
    return held_out_line(model, *held_out[domain], domain, cfg.eval_batches, bf16, record if rank == 0 else None, step)


max_predictions = static_predictions(cfg.batch_size // world, cfg.seq_len, cfg.mlm_prob) if cfg.static_mlm else 0


def batch_fn(step):
    return mlm_batch(blocks, step, cfg.mlm_prob, cfg.vocab_size, cfg.seed, rank, world, max_predictions)


# %% 3) model
model_config = BertConfig(vocab_size=cfg.vocab_size, n_layer=cfg.n_layer, hidden=cfg.hidden, n_head=cfg.n_head,
                          intermediate=cfg.intermediate, max_position=max(512, cfg.seq_len),
                          dropout=cfg.dropout, pre_norm=cfg.pre_norm, alibi=cfg.alibi)
model = BertForMaskedLM(model_config).to(device)
runtime = Runtime(device, wrap_ddp(model, device, world), rank == 0, cfg.compile, cfg.static_mlm, bf16)
print(f"model: {count_parameters(model):,} parameters; {model_config}")
state = dict(model_config=asdict(model_config), run_config=asdict(cfg), tokenizer="tokenizer.json",
             tokenizer_sha256=tokenizer_sha256)  # the tokenizer is tied to the checkpoint (config.load_run)


# %% 4) phase 1: dense MLM pretraining from scratch
print(f"\nphase 1: dense MLM, {cfg.dense_steps} steps of {cfg.batch_size} x {cfg.seq_len} tokens, lr {cfg.lr}")
optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay)
start = (resume(dense_ckpt, model, optimizer, tokenizer_sha256=tokenizer_sha256)
         if resuming and os.path.exists(dense_ckpt) else 0)
t_phase = time.time()
train(model, optimizer, batch_fn, cfg.dense_steps, peak_lr=cfg.lr, warmup_steps=int(cfg.warmup * cfg.dense_steps),
      ckpt=Checkpoints(dense_ckpt, cfg.ckpt_every, start, dict(state, phase="dense")),
      report=Reporting(cfg.log_every, lambda step: evaluate(model, "general", step, dense_record), cfg.eval_every,
                       dense_record), runtime=runtime)
dense_minutes = (time.time() - t_phase) / 60
if rank == 0:
    save_run_files(dense_dir, tokenizer, cfg)
dense_eval = {d: evaluate(model, d, cfg.dense_steps, dense_record) for d in held_out}
print(f"dense model after {dense_minutes:.1f} min: {dense_eval['general']}")

# %% 5) phase 2: gradual magnitude pruning to final_sparsity, starting from the dense model
teacher = frozen_copy(model) if cfg.distill > 0 else None  # the dense model, as a teacher for soft targets
begin, end = int(cfg.prune_begin * cfg.prune_steps), int(cfg.prune_end * cfg.prune_steps)
pruner = make_pruner(model, cfg.final_sparsity, begin, end, cfg.prune_every, global_=cfg.global_pruning,
                     score=cfg.prune_score, pattern=cfg.prune_pattern)  # pruning.GradualMagnitudePruner by default
print(f"\nphase 2: GMP to {cfg.final_sparsity:.0%} sparsity, cubic schedule over steps {begin}-{end} of "
      f"{cfg.prune_steps}, masks updated every {cfg.prune_every} steps, lr {cfg.prune_lr}; score {cfg.prune_score}, "
      f"pattern {cfg.prune_pattern}, {'one global threshold' if cfg.global_pruning else 'a threshold per tensor'}"
      + (f", distillation weight {cfg.distill}" if teacher else ""))
optimizer = make_optimizer(model, cfg.prune_lr, cfg.weight_decay)
start = (resume(sparse_ckpt, model, optimizer, pruner, tokenizer_sha256=tokenizer_sha256)
         if resuming and os.path.exists(sparse_ckpt) else 0)
t_phase = time.time()
train(model, optimizer, batch_fn, cfg.prune_steps, peak_lr=cfg.prune_lr,
      warmup_steps=int(cfg.warmup * cfg.prune_steps), pruner=pruner,
      distill=Distillation(teacher, cfg.distill, cfg.distill_temperature) if teacher else None,
      ckpt=Checkpoints(sparse_ckpt, cfg.ckpt_every, start, dict(state, phase="sparse")),
      report=Reporting(cfg.log_every, lambda step: evaluate(model, "general", step, sparse_record), cfg.eval_every,
                       sparse_record), runtime=runtime)
sparse_minutes = (time.time() - t_phase) / 60
if rank == 0:
    save_run_files(sparse_dir, tokenizer, cfg)
# every tensor at final_sparsity, to the unit (a block or a neuron rounds it: 90.2% for neurons at --preset tiny)
assert abs(pruner.sparsity() - cfg.final_sparsity) < 0.01, f"sparsity {pruner.sparsity():.4f} != target"

# %% 6) report: held-out MLM on general and biomedical text, sparsity per layer, parameter counts
sparse_eval = {d: evaluate(model, d, cfg.prune_steps, sparse_record) for d in held_out}
print("\n" + pruner.sparsity_report(model))
print(f"\nheld-out MLM ({cfg.eval_batches} batches of {cfg.batch_size} x {cfg.seq_len}, 15% masked):")
for name, ev, minutes in (("general-dense", dense_eval, dense_minutes), (sparse_name, sparse_eval, sparse_minutes)):
    print(f"  {name:18s} ({minutes:5.1f} min)  {ev['general']}\n  {'':18s}              {ev['bio']}")
print(f"\ntotal wall time {(time.time() - t_start) / 60:.1f} min")
print(f"wrote {dense_dir}/ and {sparse_dir}/ (ckpt.pt, tokenizer.json, config.json)")
same = "" if preset == "default" else f"--preset {preset} "  # the next step at the same size
print(f"next: python train_bio.py {same}--init {sparse_dir}   and   python train_bio.py {same}--init {dense_dir}")
print(f"figures: python -m tiny_sparse_bert.plots {cfg.out}")
