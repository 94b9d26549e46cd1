"""Step 3 of 3: fine-tune checkpoints on biomedical tasks and print the comparison table.

Sparse*BERT's claim (Campos et al. 2022, table 2): fine-tuned with the pruning mask held fixed,
the 90%-sparse model transferred to the biomedical domain matches its dense counterpart. Every
checkpoint, and a random initialisation of the same size, is fine-tuned on every task with the
same search: each recipe of the grids (`--epochs`, `--lr`, `--distill-hardness`) with the first
`--search-seeds` seeds, the best mean *dev* score kept (never test), a rate beyond the grid tried
while the best is at its edge (`--lr-extend`), the other seeds at the recipe kept. Grids, scoring
and the table are in tiny_sparse_bert/transfer.py.

    python finetune.py                                   # the README's four models + random init
    python finetune.py --epochs 3,6 --lr 6e-4,1.5e-3 --search-seeds 3 --tasks ncbi_disease
    python finetune.py --distill-hardness 0,1            # sparse models may learn from their dense teachers
    python finetune.py --tasks ner:my_data/,cls:other/   # your own data in our formats
    python finetune.py --prune-during-finetune 0.9       # ablation: GMP during fine-tuning only
    python finetune.py --preset tiny                     # seconds, for tests

Writes results.md and results.json (every run: recipe, seed, dev curve, scores) to --out.
"""
# %% 1) config
import copy
import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from tiny_sparse_bert.bookkeeping import NonFiniteLoss, Reporting, stop_quietly
from tiny_sparse_bert.config import RunOptions, check_options, parse_config
from tiny_sparse_bert.distillation import Distillation
from tiny_sparse_bert.model import BertForMaskedLM
from tiny_sparse_bert.pruning import GradualMagnitudePruner
from tiny_sparse_bert.recovery import FLOOR_MARGIN, all_intervals
from tiny_sparse_bert.runtime import Runtime, start_up, wrap_ddp
from tiny_sparse_bert.train import make_optimizer, train
from tiny_sparse_bert.transfer import (check_arguments, claim_runs, evaluate, failed_run, finetune_models, head_model,
                                       load_encoder, load_task_data, results_table, seeds_for, training_batches,
                                       write_results)


@dataclass
class Config(RunOptions):     # + data, device, compile, precision, overwrite (config.py)
    models: str = "out/general-dense,out/general-sparse90,out/bio-dense,out/bio-sparse90"  # checkpoint dirs
    random_baseline: bool = True   # also fine-tune a randomly initialised model of the same size
    tasks: str = "ncbi_disease,bc5cdr_chem,chemprot"  # names, ner:DIR or cls:DIR (comma-separated); hoc is
                                   # left out by default: no model learns it in this budget (docs/finetuning.md)
    out: str = "out/finetune"      # writes results.md, results.json and runs.json (every finished run)
    seeds: int = 3                 # runs per (model, task, recipe) of the --seeded models: mean ± std
    seeded: str = "bio-dense,bio-sparse90"  # the comparison that gets --seeds runs ("all": every model)
    other_seeds: int = 1           # runs of the other rows (general models, random init): cheaper, noisier
    search_seeds: int = 1          # the grid is searched with this many seeds, then the rest run the winner
    epochs: str = "5"              # a number, or a comma-separated grid searched on dev (e.g. 3,6); 5 rather
                                   # than 3: the sparse models gain more from it (docs/ladder.md, rows R-T)
    lr: str = "1.5e-3,3e-3"        # a number, or a comma-separated grid searched on dev (90%-sparse
                                   # models want a higher rate than dense ones: docs/ladder.md)
    lr_extend: int = 2             # where a model's dev-best rate is the lowest or highest tried, the next
                                   # one beyond (the grid's ratio) is tried, up to this many on each side
    shared_recipe: bool = True     # the --seeded sparse models also run every seed at their dense
                                   # counterpart's recipe: recovery without a recipe of their own
    distill_hardness: str = "0"    # sparse models: weight of the soft loss from the dense teacher (1 = soft
                                   # only, 0 = none); a grid (0,1) is searched on dev too. Off by default:
                                   # at 5 epochs it no longer pays (docs/ladder.md, row U), and costs 12 runs
    distill_temperature: float = 2.0  # softmax temperature of the distillation loss
    batch_size: int = 32           # examples per step
    warmup: float = 0.1            # fraction of a run's steps spent warming up the learning rate
    weight_decay: float = 0.01     # AdamW's, on matrices only (BERT)
    dropout: float = 0.1           # BERT's fine-tuning dropout
    max_len: int = 128             # word pieces per example (longer ones are truncated)
    max_train: int = 2000          # training examples per task (0 = all)
    max_eval: int = 1000           # dev examples per task (0 = all): dev is scored after every epoch
    max_test: int = 0              # test examples per task (0 = all: the narrowest interval on recovery)
    prune_during_finetune: float = 0.0  # ablation: prune dense models with GMP to this sparsity while fine-tuning


BOOKKEEPING = ("out", "device", "compile", "precision", "overwrite")  # what may change when a run continues


PRESETS = {
    "default": {},
    "tiny": dict(models="out-tiny/general-dense,out-tiny/general-sparse90,out-tiny/bio-dense,out-tiny/bio-sparse90",
                 out="out-tiny/finetune", epochs="1", seeds=2, batch_size=8, max_train=64, max_eval=32, max_test=32,
                 max_len=64, lr_extend=0),  # tiny models learn little: the grid only, so tests know the runs
    # after the other scripts' lab presets: one task, 1,000 training sentences, 3 epochs
    "lab": dict(models="out-lab/general-dense,out-lab/general-sparse90,out-lab/bio-dense,out-lab/bio-sparse90",
                out="out-lab/finetune", tasks="ncbi_disease", epochs="3", max_train=1000, max_eval=500),
    "gpu": dict(max_train=0, max_eval=0, epochs="3"),
}

preset, cfg = parse_config(Config, PRESETS, __doc__.splitlines()[0])


stop_quietly("stopped before the first run: nothing to keep")  # Ctrl-C while data and models load
check_options(cfg, positive=("seeds", "other_seeds", "search_seeds", "batch_size", "max_len",
                             "distill_temperature"),
              non_negative=("max_train", "max_eval", "max_test", "weight_decay", "lr_extend"), fraction=("warmup",),
              below_one=("dropout", "prune_during_finetune"), at_least=(("max_len", 3),))


model_dirs, tasks = check_arguments(cfg)  # grids, names, directories: before any data is read
rank, world, device, bf16 = start_up(cfg, preset)  # prints the config; only rank 0 prints from here on
seeds_of = lambda name: seeds_for(name, cfg.seeded, cfg.seeds, cfg.other_seeds)
settings, finished = claim_runs(cfg, BOOKKEEPING, model_dirs, rank, world)  # runs already in --out
t_start = time.time()

# %% 2) data: each task's splits, read and checked once (encoded per tokenizer in 5)
splits, labels = load_task_data(tasks, cfg.data, cfg.max_train, cfg.max_eval, cfg.max_test)

# %% 3) models: the pretrained checkpoints, and a random initialisation of the same size
encoders = [load_encoder(d) for d in model_dirs]  # (name, BertForMaskedLM, is_sparse, tokenizer)
if cfg.random_baseline:
    assert encoders, "--random-baseline needs one checkpoint for its size and tokenizer"
    _, like, _, tokenizer = encoders[0]
    torch.manual_seed(0)
    encoders.append(("random-init", BertForMaskedLM(like.config), False, tokenizer))


# %% 4) one fine-tuning run: a task head on the encoder, the pretrained zeros kept, the best dev epoch kept
def finetune_run(task, mlm, sparse, encoded, epochs, lr, seed, teacher=None, hardness=0.0, dev_floor=0.0):
    """Fine-tune one model once; return its dev-selected weights and scores (dev after every epoch)."""
    names = labels[task.name]
    steps_per_epoch = max(1, len(encoded["train"]) // cfg.batch_size)
    steps = max(1, round(epochs * steps_per_epoch))
    torch.manual_seed(seed)
    model = head_model(task, mlm, len(names), cfg.dropout).to(device)
    if sparse:
        pruner = GradualMagnitudePruner.from_sparse_model(model)  # the pretrained zeros stay zero
    elif cfg.prune_during_finetune > 0:
        pruner = GradualMagnitudePruner(model, cfg.prune_during_finetune, 0, int(0.7 * steps), max(1, steps // 50))
    else:
        pruner = None
    batch_fn, mean_labelled = training_batches(task, encoded["train"], cfg.batch_size, steps_per_epoch,
                                               np.random.default_rng(seed), rank, world)
    best = {"dev": -1.0, "state": None, "threshold": None, "dev_curve": []}

    def select_on_dev(step=None):  # keep the weights (and multi-label threshold) of the best dev score
        dev = evaluate(model, task, encoded["dev"], names, device, bf16)
        best["dev_curve"].append(round(dev[task.metric], 4))
        if dev[task.metric] > best["dev"]:
            best.update(dev=dev[task.metric], state=copy.deepcopy(model.state_dict()), threshold=dev.get("threshold"))
        return f"dev {task.metric} {dev[task.metric]:.4f}"

    distill = Distillation(teacher, hardness, cfg.distill_temperature, task.kind) if teacher else None
    run = {"epochs": epochs, "lr": lr, "distill_hardness": hardness, "seed": seed, "teacher": teacher is not None,
           "distill_temperature": cfg.distill_temperature if teacher is not None else None}
    try:
        train(model, make_optimizer(model, lr, cfg.weight_decay), batch_fn, steps, peak_lr=lr,
              warmup_steps=int(cfg.warmup * steps), pruner=pruner, mean_labelled=mean_labelled, distill=distill,
              report=Reporting(log_every=max(1, steps // 4), eval_fn=select_on_dev, eval_every=steps_per_epoch),
              runtime=Runtime(device, wrap_ddp(model, device, world), rank == 0, cfg.compile, bf16=bf16))
    except NonFiniteLoss as e:  # recorded as failed, never selected on dev; the other runs go on
        return failed_run(epochs, lr, hardness, seed, str(e).split(";")[0].removeprefix("error: "),
                          best["dev_curve"]), None
    select_on_dev()
    model.load_state_dict(best["state"])
    if sparse:  # exactly the pretrained zeros, no more, no fewer
        assert all(torch.equal(w != 0, pruner.masks[n]) for n, w in pruner.params.items()), "mask changed"
    test, counts = evaluate(model, task, encoded["test"], names, device, bf16, best["threshold"], counts=True)
    run.update(dev=best["dev"], dev_curve=best["dev_curve"], test=test[task.metric], test_metrics=test,
               at_floor=best["dev"] <= dev_floor + FLOOR_MARGIN,  # learned nothing on dev
               test_counts=counts.tolist())  # per test example: what the bootstrap resamples
    if pruner and not pruner.frozen:
        run["pruned_in_finetune"] = pruner.sparsity()
    return run, best["state"]


# %% 5) every model on every task: the same recipe grid and seeds for all (transfer.finetune_models);
# each finished run goes to --out/runs.json at once, and the same command run again skips what it holds
results, info, floors = finetune_models(encoders, tasks, splits, labels, finetune_run, cfg, finished, settings,
                                        device, rank)  # Ctrl-C keeps the finished runs
stop_quietly("stopped before the tables were written: every run is kept in runs.json; the same command writes them")

# %% 6) the comparison table, and recovery with a 95% interval (bootstrap over test examples and seeds)
table, chosen = results_table(results, info, tasks, seeds_of, floors)
intervals, intervals_text = all_intervals(results, tasks, floors, seeds_of, cfg.shared_recipe, cfg.seeds)
print(f"\n{table}\n\nrecipes selected on dev (grid: epochs {cfg.epochs}, lr {cfg.lr}, distillation hardness "
      f"{cfg.distill_hardness} for sparse models with their dense counterpart in --models):\n{chosen}")
print("\n" + intervals_text)
if rank == 0:
    write_results(cfg.out, asdict(cfg), table, chosen, info, results, floors, intervals, intervals_text)
    print(f"\n{(time.time() - t_start) / 60:.1f} min; wrote {cfg.out}/results.md and results.json")
    print(f"figures: python -m tiny_sparse_bert.plots {os.path.dirname(os.path.normpath(cfg.out)) or '.'}")
