"""Step 2 of 3: continue MLM pretraining of a general checkpoint on biomedical text.

BioBERT (Lee et al. 2020) continues BERT's pretraining on PubMed with BERT's own vocabulary;
SparseBioBERT (Campos et al. 2022, section 4.2) does the same from Sparse*BERT with its pruning
mask held fixed. Here the tokenizer of the general checkpoint is kept, and

    a sparse checkpoint (it has pruning masks)  -> masks frozen, re-applied after every step
    a dense checkpoint                          -> trained without masks (our BioBERT analogue)

    python train_bio.py --init out/general-sparse90    # -> out/bio-sparse90/
    python train_bio.py --init out/general-dense       # -> out/bio-dense/
    python train_bio.py --preset tiny --init ...       # seconds, for tests
    python train_bio.py --init ... --resume            # continue after Ctrl-C; --overwrite starts over

Run it cell by cell (`# %%`) in an editor, or top to bottom.
"""
# %% 1) config
import os
import time
from dataclasses import asdict, dataclass

import torch

from tiny_sparse_bert.bookkeeping import Checkpoints, Reporting, file_sha256, resume, stop_quietly
from tiny_sparse_bert.config import (PRETRAIN_BOOKKEEPING, PretrainOptions, check_options, check_pretrain_options,
                                     check_run_dir, claim_run_dir, load_run, parse_config, remove_run_files,
                                     save_run_files)
from tiny_sparse_bert.data import Blocks, mlm_batch, static_predictions
from tiny_sparse_bert.evaluation import held_out_line, mlm_corpora
from tiny_sparse_bert.model import BertConfig, BertForMaskedLM
from tiny_sparse_bert.pruning import GradualMagnitudePruner
from tiny_sparse_bert.runtime import Runtime, start_up, wrap_ddp
from tiny_sparse_bert.train import make_optimizer, train


@dataclass
class Config(PretrainOptions):     # + data, seq_len, batch_size, mlm_prob, warmup, ... (config.py)
    init: str = "out/general-sparse90"  # a directory written by train_general.py
    out: str = ""                  # default: the init's name with general -> bio (out/bio-sparse90), else bio-NAME
    steps: int = 900               # steps of continued pretraining on biomedical text
    lr: float = 1e-3               # peak learning rate
    eval_every: int = 300          # steps between held-out evaluations (0 = at the end only)


PRESETS = {
    "default": {},
    "tiny": dict(init="out-tiny/general-sparse90", max_docs=300, seq_len=64, batch_size=8, steps=20, eval_batches=2,
                 eval_every=0, log_every=10, ckpt_every=10),
    # after train_general.py --preset lab, at its batch size (held-out: the same 640 blocks as the default)
    "lab": dict(init="out-lab/general-sparse90", batch_size=16, steps=300, eval_every=0, eval_batches=40),
    "gpu": dict(batch_size=128, steps=3000, eval_every=1000),
    "base": dict(batch_size=256, lr=3e-4, steps=3000, eval_every=1000, ckpt_every=1000),  # as train_general's
}

preset, cfg = parse_config(Config, PRESETS, __doc__.splitlines()[0])
stop_quietly()  # Ctrl-C outside the training loop: one line, what was saved is kept
check_pretrain_options(cfg)
check_options(cfg, positive=("steps", "lr"))
check_run_dir(cfg.init, "--init", "train_general.py")  # arguments first: the corpora take a while
init_name = os.path.basename(os.path.normpath(cfg.init))
out_dir = cfg.out or os.path.join(os.path.dirname(os.path.normpath(cfg.init)),
                                  init_name.replace("general", "bio") if "general" in init_name else "bio-" + init_name)
if os.path.abspath(out_dir) == os.path.abspath(cfg.init):
    raise SystemExit(f"error: --out {out_dir} is the --init directory; choose another --out")
ckpt_path, record_path = os.path.join(out_dir, "ckpt.pt"), os.path.join(out_dir, "record.jsonl")
claim_run_dir(cfg, out_dir, [(ckpt_path, PRETRAIN_BOOKKEEPING, "steps")], "train_bio.py")  # an earlier run?
init, tokenizer = load_run(cfg.init, "--init", "train_general.py")  # finished, with its own tokenizer
torch.manual_seed(cfg.seed)
rank, world, device, bf16 = start_up(cfg, preset)  # prints the config; only rank 0 prints from here on
if cfg.overwrite and rank == 0:  # every file of the run being replaced
    remove_run_files([out_dir])
t_start = time.time()

# %% 2) data: the general checkpoint's tokenizer on the biomedical corpus
corpora = mlm_corpora(cfg.data, tokenizer, cfg.seq_len, cfg.batch_size, cfg.max_docs, rank, world)
bio_train = corpora["bio"][0]
print(f"biomedical corpus: {len(bio_train):,} training and {len(corpora['bio'][1].tokens):,} held-out tokens")
blocks = Blocks(bio_train, cfg.seq_len, cfg.batch_size, seed=cfg.seed)
vocab_size = tokenizer.get_vocab_size()
held_out = {domain: corpora[domain][1:] for domain in ("bio", "general")}  # held-out blocks, context-blind floor


def evaluate(model, domain, step):
    """Held-out MLM loss of one domain next to its unigram floor; appended to the run's record."""
    return held_out_line(model, *held_out[domain], domain, cfg.eval_batches, bf16, record_path if rank == 0 else None,
                         step)


# %% 3) model: the general checkpoint; a sparse one gets frozen masks (weight != 0)
model_config = BertConfig(**init["model_config"])
model = BertForMaskedLM(model_config).to(device)
model.load_state_dict(init["model"])
sparse = init.get("pruner") is not None
pruner = GradualMagnitudePruner.from_sparse_model(model) if sparse else None
start_masks = {n: m.clone() for n, m in pruner.masks.items()} if sparse else None
print(f"init {cfg.init}: " + (f"sparse, {pruner.sparsity():.1%} of encoder weights zero, mask frozen" if sparse
                             else "dense, trained without masks"))
before = {d: evaluate(model, d, 0) for d in held_out}

# %% 4) train: continued MLM pretraining on biomedical text
optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay)
resuming = cfg.resume and os.path.exists(ckpt_path)
tokenizer_sha256 = file_sha256(os.path.join(cfg.init, "tokenizer.json"))
start = (resume(ckpt_path, model, optimizer, written_by="train_bio.py", tokenizer_sha256=tokenizer_sha256)
         if resuming else 0)
print(f"\ncontinued MLM pretraining: {cfg.steps} steps of {cfg.batch_size} x {cfg.seq_len} tokens, lr {cfg.lr}")
t_train = time.time()
max_predictions = static_predictions(cfg.batch_size // world, cfg.seq_len, cfg.mlm_prob) if cfg.static_mlm else 0
train(model, optimizer, lambda step: mlm_batch(blocks, step, cfg.mlm_prob, vocab_size, cfg.seed, rank, world,
                                               max_predictions), cfg.steps,
      peak_lr=cfg.lr, warmup_steps=int(cfg.warmup * cfg.steps), pruner=pruner,
      ckpt=Checkpoints(ckpt_path, cfg.ckpt_every, start, dict(model_config=asdict(model_config),
                       run_config=asdict(cfg), phase="bio", init=cfg.init, tokenizer="tokenizer.json",
                       tokenizer_sha256=tokenizer_sha256)),
      report=Reporting(cfg.log_every, lambda step: evaluate(model, "bio", step), cfg.eval_every, record_path),
      runtime=Runtime(device, wrap_ddp(model, device, world), rank == 0, cfg.compile, cfg.static_mlm, bf16))
if rank == 0:
    save_run_files(out_dir, tokenizer, cfg)

# %% 5) evaluate and check: held-out MLM before/after, and the zeros are exactly the ones we started with
after = {d: evaluate(model, d, cfg.steps) for d in held_out}
print(f"\nheld-out MLM ({cfg.eval_batches} batches of {cfg.batch_size} x {cfg.seq_len}):")
for d in held_out:
    print(f"  before  {before[d]}\n  after   {after[d]}")
if sparse:
    final = GradualMagnitudePruner.from_sparse_model(model).masks
    assert all(torch.equal(final[n], start_masks[n]) for n in final), "the sparsity pattern changed"
    print(f"sparsity pattern unchanged: {pruner.sparsity():.2%} of encoder weights zero, the same ones as at the start")
print(f"\ntraining {(time.time() - t_train) / 60:.1f} min, total {(time.time() - t_start) / 60:.1f} min")
print(f"wrote {out_dir}/ (ckpt.pt, tokenizer.json, config.json)")
same = "" if preset == "default" else f"--preset {preset} "  # the next step at the same size
run_dir = os.path.dirname(os.path.normpath(out_dir)) or "."  # where train_general.py wrote the general models
models = ",".join(os.path.join(run_dir, n) for n in ("general-dense", "general-sparse90", "bio-dense", "bio-sparse90"))
print(f"next (once both train_bio.py runs are done): python finetune.py {same}--models {models} "
      f"--out {os.path.join(run_dir, 'finetune')}")
print(f"figures: python -m tiny_sparse_bert.plots {os.path.dirname(out_dir) or '.'}")
