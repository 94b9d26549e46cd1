"""Step 3 of 3: fine-tune checkpoints on biomedical tasks and print the comparison table.

Sparse*BERT's claim (Campos et al. 2022, table 2): fine-tuned with the pruning mask held fixed,
the 90%-sparse model transferred to the biomedical domain matches its dense counterpart. Each
checkpoint is fine-tuned on each task (model selection on dev, final numbers on test); a randomly
initialised model of the same size shows what pretraining is worth.

    python finetune.py                                   # the README's four models + random init
    python finetune.py --models out/bio-sparse90 --tasks ncbi_disease,hoc --seeds 3
    python finetune.py --tasks ner:my_data/,cls:other/   # your own data in our formats
    python finetune.py --prune-during-finetune 0.9       # ablation: GMP during fine-tuning only
    python finetune.py --preset tiny                     # seconds, for tests

Writes results.md and results.json to --out. Run it cell by cell (`# %%`) or top to bottom.
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

from tiny_sparse_bert.data import load_tokenizer
from tiny_sparse_bert.model import BertConfig, BertForMaskedLM, BertForSequenceClassification, BertForTokenClassification
from tiny_sparse_bert.pruning import MagnitudePruner, prunable_parameters
from tiny_sparse_bert.tasks import (best_threshold, collate, encode, entity_f1, f1_scores, get_task, label_list,
                                   load_splits, multilabel_f1)
from tiny_sparse_bert.train import (autocast, check_options, check_run_dir, check_writable, load_checkpoint,
                                    make_optimizer, parse_config, setup_distributed, to_device, train, use_bf16,
                                    wrap_ddp)


@dataclass
class Config:
    models: str = "out/general-dense,out/general-sparse90,out/bio-dense,out/bio-sparse90"  # checkpoint dirs
    random_baseline: bool = True   # also fine-tune a randomly initialised model of the same size
    tasks: str = "ncbi_disease,bc5cdr_chem,chemprot,hoc"  # names, ner:DIR or cls:DIR (comma-separated)
    data: str = "data"
    out: str = "out/finetune"
    seeds: int = 1                 # runs per (model, task); the table shows mean and std
    epochs: float = 2.0
    batch_size: int = 32
    lr: float = 2e-4
    warmup: float = 0.1
    weight_decay: float = 0.01
    dropout: float = 0.1           # BERT's fine-tuning dropout
    max_len: int = 128             # word pieces per example (longer ones are truncated)
    max_train: int = 4000          # training examples per task (0 = all)
    max_eval: int = 2000           # dev and test examples per task (0 = all)
    prune_during_finetune: float = 0.0  # ablation: prune dense models with GMP to this sparsity while fine-tuning
    device: str = "auto"           # auto | cpu | cuda
    compile: bool = False         # torch.compile the model (worth it on a GPU)
    precision: str = "auto"        # auto (bf16 on CUDA and AMX CPUs, else fp32) | bf16 | fp32


PRESETS = {
    "default": {},
    "tiny": dict(epochs=1.0, batch_size=8, max_train=64, max_eval=32, max_len=64),
    "gpu": dict(max_train=0, max_eval=0, epochs=3.0),
}

preset, cfg = parse_config(Config, PRESETS, __doc__.splitlines()[0])
check_options(cfg, positive=("seeds", "epochs", "batch_size", "lr", "max_len"),
              non_negative=("max_train", "max_eval", "weight_decay"), fraction=("warmup",),
              below_one=("dropout", "prune_during_finetune"))
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


# %% 4) fine-tune every model on every task (mask frozen for sparse models)
results = {}  # model name -> task name -> list of test scores (one per seed)
info = {}
for name, mlm, sparse, tokenizer in encoders:
    weights = prunable_parameters(mlm).values()
    nonzero = sum(int((w != 0).sum()) for w in weights)
    info[name] = {"sparse": sparse, "sparsity": 1 - nonzero / sum(w.numel() for w in weights), "nonzero": nonzero}
    results[name] = {}
    for task in tasks:
        n_labels = len(labels[task.name])
        encoded = {s: encode(task, ex, tokenizer, labels[task.name], cfg.max_len) for s, ex in splits[task.name].items()}
        steps_per_epoch = max(1, len(encoded["train"]) // cfg.batch_size)
        steps = max(1, round(cfg.epochs * steps_per_epoch))
        scores = []
        for seed in range(cfg.seeds):
            torch.manual_seed(seed)
            model = head_model(task, mlm, n_labels)
            if sparse:
                pruner = MagnitudePruner.from_sparse_model(model)  # the pretrained zeros stay zero
            elif cfg.prune_during_finetune > 0:
                pruner = MagnitudePruner(model, cfg.prune_during_finetune, 0, int(0.7 * steps), max(1, steps // 50))
            else:
                pruner = None
            rng = np.random.default_rng(seed)
            orders = {}

            def batch_fn(step):
                epoch, i = divmod(step, steps_per_epoch)
                if epoch not in orders:
                    orders[epoch] = rng.permutation(len(encoded["train"]))
                idx = orders[epoch][i * cfg.batch_size:(i + 1) * cfg.batch_size][rank::world]  # this rank's rows
                return collate([encoded["train"][j] for j in idx], task.kind)

            best = {"score": -1.0, "state": None, "threshold": None}

            def select_on_dev():  # keep the weights (and multi-label threshold) of the best dev score
                dev = evaluate(model, task, encoded["dev"], n_labels)
                if dev[task.metric] > best["score"]:
                    best.update(score=dev[task.metric], state=copy.deepcopy(model.state_dict()),
                                threshold=dev.get("threshold"))
                return f"dev {task.metric} {dev[task.metric]:.4f}"

            train(model, make_optimizer(model, cfg.lr, cfg.weight_decay), batch_fn, steps, peak_lr=cfg.lr,
                  warmup_steps=int(cfg.warmup * steps), ckpt_path=None, extra_state={}, pruner=pruner,
                  eval_fn=select_on_dev, eval_every=steps_per_epoch, log_every=max(1, steps // 4), device=device,
                  ddp_model=wrap_ddp(model, device, world), is_main=rank == 0, compile=cfg.compile, bf16=bf16)
            select_on_dev()
            model.load_state_dict(best["state"])
            if sparse:  # exactly the pretrained zeros, no more, no fewer
                assert all(torch.equal(w != 0, pruner.masks[n]) for n, w in pruner.params.items()), "mask changed"
                info[name]["mask_unchanged"] = True
            if pruner and not pruner.frozen:
                info[name].update(pruned_in_finetune=pruner.sparsity())
            test = evaluate(model, task, encoded["test"], n_labels, best["threshold"])
            scores.append(test[task.metric])
            print(f"{name} / {task.name} / seed {seed}: dev {task.metric} {best['score']:.4f}, "
                  f"test {', '.join(f'{k} {v:.4f}' for k, v in test.items())}")
        results[name][task.name] = scores

# %% 5) the comparison table: one row per model, one column per task, average and recovery
def mean_std(xs):
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def dense_counterpart(name):  # bio-sparse90 -> bio-dense, general-sparse90 -> general-dense
    base = name.split("-sparse")[0]
    return f"{base}-dense" if "-sparse" in name and f"{base}-dense" in results else None


header = ["model", "sparsity", "non-zero encoder weights"] + [f"{t.name} ({t.metric})" for t in tasks] + \
         ["average", "recovery vs dense"]
rows = []
for name in results:
    averages = {t: mean_std(s)[0] for t, s in results[name].items()}
    avg = statistics.mean(averages.values())
    counterpart = dense_counterpart(name)
    recovery = (f"{100 * avg / statistics.mean(mean_std(s)[0] for s in results[counterpart].values()):.1f}%"
                if counterpart else "")
    cells = [f"{100 * m:.1f} ± {100 * s:.1f}" if cfg.seeds > 1 else f"{100 * m:.1f}"
             for m, s in (mean_std(results[name][t.name]) for t in tasks)]
    rows.append([name, f"{info[name]['sparsity']:.0%}", f"{info[name]['nonzero']:,}"] + cells +
                [f"{100 * avg:.1f}", recovery])
table = "\n".join("| " + " | ".join(r) + " |" for r in [header, ["---"] * len(header)] + rows)
print("\n" + table)
if rank != 0:
    sys.exit(0)
os.makedirs(cfg.out, exist_ok=True)
with open(os.path.join(cfg.out, "results.md"), "w") as f:
    f.write(f"Test scores (x100), {cfg.seeds} seed(s); `python finetune.py` with {asdict(cfg)}\n\n{table}\n")
with open(os.path.join(cfg.out, "results.json"), "w") as f:
    json.dump({"config": asdict(cfg), "models": info, "scores": results}, f, indent=2)
print(f"\n{(time.time() - t_start) / 60:.1f} min; wrote {cfg.out}/results.md and results.json")
