"""Step 3 of 3: fine-tune checkpoints on biomedical tasks and print the comparison table.

Sparse*BERT's claim (Campos et al. 2022, table 2): fine-tuned with the pruning mask held fixed,
the 90%-sparse model transferred to the biomedical domain matches its dense counterpart. Each
checkpoint is fine-tuned on each task; a randomly initialised model of the same size shows what
pretraining is worth. Comparisons are fair by construction:

- every model gets the same recipe search: `--epochs` and `--lr` take comma-separated grids; each
  (model, task) runs every recipe with its first `--search-seeds` seeds (1) and keeps the one with
  the best mean dev score (never test), then runs its other seeds at that recipe;
- a result is the mean and spread of the test scores of `--seeds` runs at that recipe (3 for the
  `--seeded` comparison, bio-dense vs bio-sparse90; `--other-seeds` 1 for the other rows);
- sparse-transfer distillation (`--distill-hardness`, Neural Magic's sparse-transfer recipes):
  each sparse model learns from its dense counterpart (bio-sparse90 from bio-dense), fine-tuned
  first in the same run, at its own dev-selected recipe, with the same seed. The grid
  `--distill-hardness 0,1` lets dev decide, per task, whether distillation pays; the default 0
  leaves it off (at 5 epochs the sparse models recover as well without it).

The task heads run the encoder on the real positions of a batch only (`model.BertModel`'s
skip_padding: random batches of sentences are 40-50% padding). NER training batches are also
drawn by length (`tasks.length_grouped_batches`: 4% padding left for attention, which still sees
it) and weighted by their labelled words (`train(mean_labelled)`).

    python finetune.py                                   # the README's four models + random init
    python finetune.py --epochs 3,6 --lr 6e-4,1.5e-3 --search-seeds 3 --tasks ncbi_disease
    python finetune.py --distill-hardness 0,1            # sparse models may learn from their dense teachers
    python finetune.py --tasks ner:my_data/,cls:other/   # your own data in our formats
    python finetune.py --prune-during-finetune 0.9       # ablation: GMP during fine-tuning only
    python finetune.py --preset tiny                     # seconds, for tests

Writes results.md and results.json (every run: recipe, seed, dev curve, dev and test scores) to
--out. Run it cell by cell (`# %%`) or top to bottom.
"""
# %% 1) config
import copy
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

from tiny_sparse_bert.config import check_options, check_run_dir, check_writable, dense_counterpart, parse_config
from tiny_sparse_bert.data import load_tokenizer
from tiny_sparse_bert.model import BertConfig, BertForMaskedLM, BertForSequenceClassification, BertForTokenClassification
from tiny_sparse_bert.pruning import MagnitudePruner, prunable_parameters
from tiny_sparse_bert.tasks import (best_threshold, collate, encode, entity_f1, f1_scores, get_task, label_list,
                                   length_grouped_batches, load_splits, multilabel_f1)
from tiny_sparse_bert.train import (autocast, load_checkpoint, make_optimizer, setup_distributed, to_device, train,
                                    use_bf16, wrap_ddp)


@dataclass
class Config:
    models: str = "out/general-dense,out/general-sparse90,out/bio-dense,out/bio-sparse90"  # checkpoint dirs
    random_baseline: bool = True   # also fine-tune a randomly initialised model of the same size
    tasks: str = "ncbi_disease,bc5cdr_chem,chemprot"  # names, ner:DIR or cls:DIR (comma-separated); hoc is
                                   # left out by default: no model learns it in this budget (docs/finetuning.md)
    data: str = "data"
    out: str = "out/finetune"
    seeds: int = 3                 # runs per (model, task, recipe) of the --seeded models: mean ± std
    seeded: str = "bio-dense,bio-sparse90"  # the comparison that gets --seeds runs ("all": every model)
    other_seeds: int = 1           # runs of the other rows (general models, random init): cheaper, noisier
    search_seeds: int = 1          # the grid is searched with this many seeds, then the rest run the winner
    epochs: str = "5"              # a number, or a comma-separated grid searched on dev (e.g. 3,6); 5 rather
                                   # than 3: the sparse models gain more from it (docs/ladder.md, rows R-T)
    lr: str = "1.5e-3,3e-3"        # a number, or a comma-separated grid searched on dev (90%-sparse
                                   # models want a higher rate than dense ones: docs/ladder.md)
    distill_hardness: str = "0"    # sparse models: weight of the soft loss from the dense teacher (1 = soft
                                   # only, 0 = none); a grid (0,1) is searched on dev too. Off by default:
                                   # at 5 epochs it no longer pays (docs/ladder.md, row U), and costs 12 runs
    distill_temperature: float = 2.0
    batch_size: int = 32
    warmup: float = 0.1
    weight_decay: float = 0.01
    dropout: float = 0.1           # BERT's fine-tuning dropout
    max_len: int = 128             # word pieces per example (longer ones are truncated)
    max_train: int = 2000          # training examples per task (0 = all)
    max_eval: int = 1000           # dev and test examples per task (0 = all)
    prune_during_finetune: float = 0.0  # ablation: prune dense models with GMP to this sparsity while fine-tuning
    device: str = "auto"           # auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps
    compile: bool = False         # torch.compile the model (worth it on a GPU)
    precision: str = "auto"        # auto (bf16 on CUDA and AMX CPUs, else fp32) | bf16 | fp32


PRESETS = {
    "default": {},
    "tiny": dict(epochs="1", seeds=2, batch_size=8, max_train=64, max_eval=32, max_len=64),
    "gpu": dict(max_train=0, max_eval=0, epochs="3"),
}

preset, cfg = parse_config(Config, PRESETS, __doc__.splitlines()[0])
check_options(cfg, positive=("seeds", "other_seeds", "search_seeds", "batch_size", "max_len",
                             "distill_temperature"),
              non_negative=("max_train", "max_eval", "weight_decay"), fraction=("warmup",),
              below_one=("dropout", "prune_during_finetune"))


def grid(option, text):
    """`--epochs 2,6` -> [2.0, 6.0]; values must be positive (in [0, 1] for the hardness)."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    ok = (lambda v: 0 <= v <= 1) if option == "distill-hardness" else (lambda v: v > 0)
    if not values or not all(ok(v) for v in values):
        what = "numbers in [0, 1]" if option == "distill-hardness" else "positive numbers"
        raise SystemExit(f"error: --{option} {text!r}: give one or a comma-separated list of {what}")
    return values


recipes = [(epochs, lr) for epochs in grid("epochs", cfg.epochs) for lr in grid("lr", cfg.lr)]
hardness_grid = grid("distill-hardness", cfg.distill_hardness)
distilling = any(h > 0 for h in hardness_grid)
model_dirs = [m for m in cfg.models.split(",") if m]
for directory in model_dirs:  # arguments first, before any data is read
    check_run_dir(directory, "--models", "train_general.py or train_bio.py")
check_writable(cfg.out)
rank, world, device = setup_distributed(cfg.device)  # one process, or one of `torchrun --nproc_per_node N`
bf16 = use_bf16(device, cfg.precision)
if rank != 0:
    sys.stdout = open(os.devnull, "w")  # only rank 0 prints and writes files
print(f"config (preset {preset}, {world} process{'es' if world > 1 else ''} on {device}{', bf16' if bf16 else ''}): {asdict(cfg)}")
tasks = [get_task(t) for t in cfg.tasks.split(",") if t]
t_start = time.time()

# %% 2) data: each task's splits, read and checked once (encoded per tokenizer below)
splits, labels = {}, {}
for task in tasks:
    try:
        splits[task.name] = load_splits(task, cfg.data)
    except ValueError as e:  # a malformed line: the reader's message names the file, line and format
        raise SystemExit(f"error: {e}")
    labels[task.name] = label_list(task, splits[task.name])
    for split, limit in (("train", cfg.max_train), ("dev", cfg.max_eval), ("test", cfg.max_eval)):
        if limit:  # a seeded sample, not the first lines (files are often sorted by document)
            examples = splits[task.name][split]
            keep = np.random.default_rng(0).permutation(len(examples))[:limit]
            splits[task.name][split] = [examples[i] for i in sorted(keep)]
    print(f"{task.name}: {task.kind}, {len(labels[task.name])} labels, "
          + ", ".join(f"{k} {len(v)}" for k, v in splits[task.name].items()))


# %% 3) models: load a pretrained encoder (or a random one) under a task head
def load_encoder(directory):
    """(name, BertForMaskedLM, is_sparse, tokenizer) of a checkpoint directory."""
    ckpt = load_checkpoint(os.path.join(directory, "ckpt.pt"), "train_general.py or train_bio.py")
    mlm = BertForMaskedLM(BertConfig(**ckpt["model_config"]))
    mlm.load_state_dict(ckpt["model"])
    tokenizer = load_tokenizer(os.path.join(directory, "tokenizer.json"))
    return os.path.basename(directory.rstrip("/")), mlm, ckpt.get("pruner") is not None, tokenizer


encoders = [load_encoder(d) for d in model_dirs]
if cfg.random_baseline:
    assert encoders, "--random-baseline needs one checkpoint for its size and tokenizer"
    _, like, _, tokenizer = encoders[0]
    torch.manual_seed(0)
    encoders.append(("random-init", BertForMaskedLM(like.config), False, tokenizer))


def head_model(task, mlm, n_labels):
    config = replace(mlm.config, dropout=cfg.dropout)
    model = (BertForTokenClassification(config, n_labels) if task.kind == "ner"
             else BertForSequenceClassification(config, n_labels, multi_label=task.kind == "multi"))
    model.bert.load_state_dict(mlm.bert.state_dict())  # the encoder; the head starts fresh
    return model.to(device)


@torch.no_grad()
def evaluate(model, task, items, n_labels, threshold=None):
    """The task's metrics on encoded examples (batched by length, so little padding).

    A multi-label task predicts the labels whose probability exceeds `threshold`; None tunes it on
    these items (do that on dev only) and reports it with the metrics.
    """
    model.eval()
    order = sorted(range(len(items)), key=lambda i: len(items[i]["ids"]))
    preds = [None] * len(items)
    for start in range(0, len(order), 64):
        idx = order[start:start + 64]
        batch = to_device(collate([items[i] for i in idx], task.kind), device)
        with autocast(device, bf16):
            logits, _ = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        logits = logits.float().cpu()
        for row, i in enumerate(idx):
            preds[i] = (logits[row].argmax(-1) if task.kind == "ner" else
                        logits[row].sigmoid() if task.kind == "multi" else logits[row].argmax())
    model.train()
    names = labels[task.name]
    if task.kind == "ner":  # one prediction per word, read at its first piece; words cut off by max_len get O
        gold = [[names[l] for l in it["word_labels"]] for it in items]
        pred = [[names[int(p[pos])] for pos in it["first"]] + ["O"] * (len(it["word_labels"]) - len(it["first"]))
                for it, p in zip(items, preds)]
        return entity_f1(gold, pred)
    if task.kind == "multi":
        gold, probs = np.array([it["y"] for it in items]), torch.stack(preds).numpy()
        threshold = best_threshold(gold, probs) if threshold is None else threshold
        return {**multilabel_f1(gold, probs > threshold), "threshold": threshold}
    return f1_scores([it["y"] for it in items], [int(p) for p in preds], n_labels)


# %% 4) fine-tune every model on every task: the same recipe grid and seeds for all, mask frozen for sparse ones
def finetune_run(task, mlm, sparse, encoded, n_labels, epochs, lr, seed, teacher=None, hardness=0.0):
    """Fine-tune one model once; return its dev-selected weights and scores (dev after every epoch)."""
    steps_per_epoch = max(1, len(encoded["train"]) // cfg.batch_size)
    steps = max(1, round(epochs * steps_per_epoch))
    torch.manual_seed(seed)
    model = head_model(task, mlm, n_labels)
    if sparse:
        pruner = MagnitudePruner.from_sparse_model(model)  # the pretrained zeros stay zero
    elif cfg.prune_during_finetune > 0:
        pruner = MagnitudePruner(model, cfg.prune_during_finetune, 0, int(0.7 * steps), max(1, steps // 50))
    else:
        pruner = None
    rng = np.random.default_rng(seed)
    # NER: random batches of sentences of similar lengths (tasks.length_grouped_batches, half the
    # padding gone), each weighted by its labelled words in train(): a batch of short sentences
    # holds few. Sentence-level tasks keep plain random batches: grouped by length, their batches
    # skew the label mix and the dense models' ChemProt runs collapsed (2 of 5 seeds, docs/ladder.md row M)
    lengths = [len(it["ids"]) for it in encoded["train"]]
    mean_labelled = (cfg.batch_size * sum(len(it["first"]) for it in encoded["train"]) / len(encoded["train"])
                     if task.kind == "ner" else None)
    batches = {}

    def batch_fn(step):
        epoch, i = divmod(step, steps_per_epoch)
        if epoch not in batches:
            batches[epoch] = (length_grouped_batches(lengths, cfg.batch_size, rng) if task.kind == "ner" else
                              np.array_split(rng.permutation(len(lengths))[:steps_per_epoch * cfg.batch_size],
                                             steps_per_epoch))
        idx = batches[epoch][i][rank::world]  # this rank's rows
        return collate([encoded["train"][j] for j in idx], task.kind)

    best = {"dev": -1.0, "state": None, "threshold": None, "dev_curve": []}

    def select_on_dev(step=None):  # keep the weights (and multi-label threshold) of the best dev score
        dev = evaluate(model, task, encoded["dev"], n_labels)
        best["dev_curve"].append(round(dev[task.metric], 4))
        if dev[task.metric] > best["dev"]:
            best.update(dev=dev[task.metric], state=copy.deepcopy(model.state_dict()), threshold=dev.get("threshold"))
        return f"dev {task.metric} {dev[task.metric]:.4f}"

    train(model, make_optimizer(model, lr, cfg.weight_decay), batch_fn, steps, peak_lr=lr,
          warmup_steps=int(cfg.warmup * steps), ckpt_path=None, extra_state={}, pruner=pruner,
          teacher=teacher, distill_alpha=hardness, distill_temperature=cfg.distill_temperature,
          distill_kind=task.kind, eval_fn=select_on_dev, eval_every=steps_per_epoch, log_every=max(1, steps // 4),
          device=device, ddp_model=wrap_ddp(model, device, world), is_main=rank == 0, compile=cfg.compile, bf16=bf16,
          mean_labelled=mean_labelled)
    select_on_dev()
    model.load_state_dict(best["state"])
    if sparse:  # exactly the pretrained zeros, no more, no fewer
        assert all(torch.equal(w != 0, pruner.masks[n]) for n, w in pruner.params.items()), "mask changed"
    test = evaluate(model, task, encoded["test"], n_labels, best["threshold"])
    run = {"epochs": epochs, "lr": lr, "distill_hardness": hardness, "seed": seed, "teacher": teacher is not None,
           "distill_temperature": cfg.distill_temperature if teacher is not None else None, "dev": best["dev"],
           "dev_curve": best["dev_curve"], "test": test[task.metric], "test_metrics": test}
    if pruner and not pruner.frozen:
        run["pruned_in_finetune"] = pruner.sparsity()
    return run, best["state"]


def n_seeds(name):
    """--seeds for the --seeded models, --other-seeds for the rest. A sparse model counts as its dense
    counterpart: that model teaches it seed by seed, so both need the same seeds."""
    family = lambda n: dense_counterpart(n) or n
    seeded = cfg.seeded == "all" or family(name) in {family(n) for n in cfg.seeded.split(",")}
    return cfg.seeds if seeded else cfg.other_seeds


def recipe_of(run):
    return run["epochs"], run["lr"], run["distill_hardness"]


def as_teacher(task, mlm, n_labels, state):
    """A frozen copy of a fine-tuned dense model, in eval mode (no dropout in its soft targets)."""
    teacher = head_model(task, mlm, n_labels)
    teacher.load_state_dict(state)
    return teacher.eval().requires_grad_(False)


results = {}   # model name -> task name -> {"recipe": (epochs, lr, hardness), "runs": [every run, every recipe]}
info, kept_states = {}, {}  # kept_states[(dense model, task)] = its fine-tuned weights per seed (the teachers)
encodings = {}  # encoded once per tokenizer and task (the checkpoints of one run share a tokenizer)
names_in_run = [name for name, *_ in encoders]
for name, mlm, sparse, tokenizer in sorted(encoders, key=lambda e: e[2]):  # dense first: they teach
    weights = prunable_parameters(mlm).values()
    nonzero = sum(int((w != 0).sum()) for w in weights)
    info[name] = {"sparse": sparse, "sparsity": 1 - nonzero / sum(w.numel() for w in weights), "nonzero": nonzero}
    results[name] = {}
    is_teacher = distilling and name in map(dense_counterpart, names_in_run)
    teacher_name = dense_counterpart(name) if distilling and sparse else None
    if teacher_name and teacher_name not in names_in_run:
        print(f"note: {name} is fine-tuned without distillation: its teacher {teacher_name} is not in --models")
        teacher_name = None
    info[name]["teacher"] = teacher_name
    model_recipes = [(e, lr, h) for e, lr in recipes for h in (hardness_grid if teacher_name else [0.0])]
    for task in tasks:
        n_labels = len(labels[task.name])
        key = (tokenizer.to_str(), task.name)
        if key not in encodings:
            encodings[key] = {s: encode(task, ex, tokenizer, labels[task.name], cfg.max_len)
                              for s, ex in splits[task.name].items()}
        encoded = encodings[key]
        teacher_states = kept_states[(teacher_name, task.name)] if teacher_name else None
        runs, states = [], {}

        def run_seed(recipe, seed):
            epochs, lr, hardness = recipe
            teacher = as_teacher(task, mlm, n_labels, teacher_states[seed]) if hardness > 0 else None
            run, state = finetune_run(task, mlm, sparse, encoded, n_labels, epochs, lr, seed, teacher, hardness)
            runs.append(run)
            if is_teacher:
                states[(epochs, lr, seed)] = state
            tests = ", ".join(f"test {k} {v:.4f}" for k, v in run["test_metrics"].items())
            print(f"{name} / {task.name} / {epochs:g} epochs, lr {lr:g}"
                  f"{f', distilled (hardness {hardness:g})' if teacher else ''} / seed {seed}: "
                  f"dev {task.metric} {run['dev']:.4f}, {tests}")

        # the grid is searched with the first --search-seeds seeds: the recipe with the best mean dev score
        # wins (test is never looked at), then the remaining seeds run that recipe; its test scores are the result
        search = range(min(cfg.search_seeds, n_seeds(name)))
        for recipe in model_recipes:
            for seed in search:
                run_seed(recipe, seed)
        recipe = max(model_recipes, key=lambda r: statistics.mean(x["dev"] for x in runs if recipe_of(x) == r))
        for seed in range(len(search), n_seeds(name)):
            run_seed(recipe, seed)
        for run in runs:
            run["selected"] = recipe_of(run) == recipe
        results[name][task.name] = {"recipe": recipe, "runs": runs}
        if is_teacher:
            kept_states[(name, task.name)] = [states[(*recipe[:2], seed)] for seed in range(n_seeds(name))]
    if sparse:
        info[name]["mask_unchanged"] = True  # checked after every run
    if cfg.prune_during_finetune > 0 and not sparse:
        info[name]["pruned_in_finetune"] = cfg.prune_during_finetune


# %% 5) the comparison table: one row per model, one column per task, average and recovery
def test_scores(name, task_name):  # the test scores of the dev-selected recipe, one per seed
    return [run["test"] for run in results[name][task_name]["runs"] if run["selected"]]


def mean_std(xs):
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def average(name):  # the mean over tasks of the mean over seeds
    return statistics.mean(mean_std(test_scores(name, t.name))[0] for t in tasks)


header = ["model", "sparsity", "non-zero encoder weights", "seeds"] + [f"{t.name} ({t.metric})" for t in tasks] + \
         ["average", "recovery vs dense"]
rows = []
for name in names_in_run:
    counterpart = dense_counterpart(name)
    recovery = f"{100 * average(name) / average(counterpart):.1f}%" if counterpart in results else ""
    cells = [f"{100 * m:.1f} ± {100 * s:.1f}" if n_seeds(name) > 1 else f"{100 * m:.1f}"
             for m, s in (mean_std(test_scores(name, t.name)) for t in tasks)]
    sparsity = f"{info[name]['sparsity']:.0%}"
    if "pruned_in_finetune" in info[name]:  # the ablation: a dense model pruned by GMP while it fine-tunes
        sparsity += f" -> {info[name]['pruned_in_finetune']:.0%} while fine-tuning"
    rows.append([name, sparsity, f"{info[name]['nonzero']:,}", str(n_seeds(name))] + cells +
                [f"{100 * average(name):.1f}", recovery])
table = "\n".join("| " + " | ".join(r) + " |" for r in [header, ["---"] * len(header)] + rows)
chosen = "\n".join(f"- {name}: " + ", ".join(
    f"{t} {e:g} epochs lr {lr:g}" + (f" distilled from {info[name]['teacher']} (hardness {h:g})" if h else "")
    for t, r in results[name].items() for e, lr, h in [r["recipe"]]) for name in names_in_run)
print(f"\n{table}\n\nrecipes selected on dev (grid: epochs {cfg.epochs}, lr {cfg.lr}, distillation hardness "
      f"{cfg.distill_hardness} for sparse models with their dense counterpart in --models):\n{chosen}")
if rank != 0:
    sys.exit(0)
os.makedirs(cfg.out, exist_ok=True)
with open(os.path.join(cfg.out, "results.md"), "w") as f:
    f.write(f"Test scores (x100), mean ± std over the seeds at each model's dev-selected recipe; "
            f"`python finetune.py` with {asdict(cfg)}\n\n{table}\n\nRecipes selected on dev:\n{chosen}\n")
with open(os.path.join(cfg.out, "results.json"), "w") as f:
    json.dump({"config": asdict(cfg), "models": info,
               "scores": {n: {t: test_scores(n, t) for t in r} for n, r in results.items()},
               "recipes": {n: {t: r["recipe"] for t, r in rs.items()} for n, rs in results.items()},
               "runs": {n: {t: r["runs"] for t, r in rs.items()} for n, rs in results.items()}}, f, indent=1)
print(f"\n{(time.time() - t_start) / 60:.1f} min; wrote {cfg.out}/results.md and results.json")
print(f"figures: python -m tiny_sparse_bert.plots {os.path.dirname(os.path.normpath(cfg.out)) or '.'}")
