"""Fine-tuning bookkeeping for finetune.py: recipe grids, seeds, selection on dev, scoring, the table.

Sparse*BERT's comparison (Campos et al. 2022, table 2) is fair only when every model gets the same
search. finetune.py runs, for each (model, task), every recipe of the grid with its first seeds,
keeps the recipe with the best mean *dev* score (test is never looked at), then runs the other
seeds at that recipe. This module holds what that needs besides the training loop: the grids,
checkpoints under task heads, the metrics of a model's predictions, the choice on dev, and the
results table (results.md) with every run (results.json).

    recipe = select_recipe(runs, recipes)                  # the best mean dev score wins
    table, chosen = results_table(results, info, tasks, seeds_of)
"""
import json
import os
import statistics
from dataclasses import replace

import numpy as np
import torch

from .config import dense_counterpart
from .data import load_tokenizer
from .pruning import prunable_parameters
from .model import BertConfig, BertForMaskedLM, BertForSequenceClassification, BertForTokenClassification
from .tasks import best_threshold, collate, entity_f1, f1_scores, label_list, load_splits, multilabel_f1
from .train import autocast, load_checkpoint, to_device


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


def load_task_data(tasks, data_dir, max_train, max_eval):
    """(splits, labels): each task's train/dev/test examples, read and checked once, each split cut
    to a seeded sample of at most max_train / max_eval examples (0 = all), and its label names."""
    splits, labels = {}, {}
    for task in tasks:
        try:
            splits[task.name] = load_splits(task, data_dir)
        except ValueError as e:  # a malformed line: the reader's message names the file, line and format
            raise SystemExit(f"error: {e}")
        labels[task.name] = label_list(task, splits[task.name])
        for split, limit in (("train", max_train), ("dev", max_eval), ("test", max_eval)):
            if limit:  # a seeded sample, not the first lines (files are often sorted by document)
                examples = splits[task.name][split]
                keep = np.random.default_rng(0).permutation(len(examples))[:limit]
                splits[task.name][split] = [examples[i] for i in sorted(keep)]
        print(f"{task.name}: {task.kind}, {len(labels[task.name])} labels, "
              + ", ".join(f"{k} {len(v)}" for k, v in splits[task.name].items()))
    return splits, labels


def load_encoder(directory):
    """(name, BertForMaskedLM, is_sparse, tokenizer) of a checkpoint directory."""
    ckpt = load_checkpoint(os.path.join(directory, "ckpt.pt"), "train_general.py or train_bio.py")
    mlm = BertForMaskedLM(BertConfig(**ckpt["model_config"]))
    mlm.load_state_dict(ckpt["model"])
    tokenizer = load_tokenizer(os.path.join(directory, "tokenizer.json"))
    return os.path.basename(directory.rstrip("/")), mlm, ckpt.get("pruner") is not None, tokenizer


def encoder_info(mlm, sparse):
    """What the table says of a model: its encoder's sparsity and non-zero prunable weights."""
    weights = prunable_parameters(mlm).values()
    nonzero = sum(int((w != 0).sum()) for w in weights)
    return {"sparse": sparse, "sparsity": 1 - nonzero / sum(w.numel() for w in weights), "nonzero": nonzero}


def head_model(task, mlm, n_labels, dropout, state=None):
    """The pretrained encoder of `mlm` under a fresh head for `task` (or the fine-tuned `state`)."""
    config = replace(mlm.config, dropout=dropout)
    model = (BertForTokenClassification(config, n_labels) if task.kind == "ner"
             else BertForSequenceClassification(config, n_labels, multi_label=task.kind == "multi"))
    model.bert.load_state_dict(mlm.bert.state_dict())
    if state is not None:
        model.load_state_dict(state)
    return model


@torch.no_grad()
def evaluate(model, task, items, names, device, bf16=False, threshold=None):
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
    if task.kind == "ner":  # one prediction per word, read at its first piece; words cut off by max_len get O
        gold = [[names[l] for l in it["word_labels"]] for it in items]
        pred = [[names[int(p[pos])] for pos in it["first"]] + ["O"] * (len(it["word_labels"]) - len(it["first"]))
                for it, p in zip(items, preds)]
        return entity_f1(gold, pred)
    if task.kind == "multi":
        gold, probs = np.array([it["y"] for it in items]), torch.stack(preds).numpy()
        threshold = best_threshold(gold, probs) if threshold is None else threshold
        return {**multilabel_f1(gold, probs > threshold), "threshold": threshold}
    return f1_scores([it["y"] for it in items], [int(p) for p in preds], len(names))


def run_summary(name, task, run):
    """One log line per finished run: model, task, recipe, seed, dev and test scores."""
    tests = ", ".join(f"test {k} {v:.4f}" for k, v in run["test_metrics"].items())
    distilled = f", distilled (hardness {run['distill_hardness']:g})" if run["teacher"] else ""
    return (f"{name} / {task.name} / {run['epochs']:g} epochs, lr {run['lr']:g}{distilled} / seed {run['seed']}: "
            f"dev {task.metric} {run['dev']:.4f}, {tests}")


def seeds_for(name, seeded, seeds, other_seeds):
    """`seeds` for the models named in `seeded` ("all": every model), `other_seeds` for the rest. A
    sparse model counts as its dense counterpart: that model teaches it seed by seed, so both need
    the same seeds."""
    family = lambda n: dense_counterpart(n) or n
    chosen = seeded == "all" or family(name) in {family(n) for n in seeded.split(",")}
    return seeds if chosen else other_seeds


def recipe_of(run):
    return run["epochs"], run["lr"], run["distill_hardness"]


def select_recipe(runs, recipes):
    """The recipe with the best mean dev score over its runs (test is never looked at)."""
    return max(recipes, key=lambda r: statistics.mean(x["dev"] for x in runs if recipe_of(x) == r))


def test_scores(runs):
    """The test scores of the dev-selected recipe, one per seed."""
    return [run["test"] for run in runs if run["selected"]]


def mean_std(xs):
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def results_table(results, info, tasks, seeds_of):
    """(Markdown table, chosen recipes): a row per model, a column per task (mean ± std over seeds),
    the average over tasks and, for a sparse model, its recovery: its average / its dense counterpart's."""
    def average(name):  # the mean over tasks of the mean over seeds
        return statistics.mean(mean_std(test_scores(results[name][t.name]["runs"]))[0] for t in tasks)

    header = ["model", "sparsity", "non-zero encoder weights", "seeds"] + \
             [f"{t.name} ({t.metric})" for t in tasks] + ["average", "recovery vs dense"]
    rows = []
    for name in results:
        counterpart = dense_counterpart(name)
        recovery = f"{100 * average(name) / average(counterpart):.1f}%" if counterpart in results else ""
        cells = [f"{100 * m:.1f} ± {100 * s:.1f}" if seeds_of(name) > 1 else f"{100 * m:.1f}"
                 for m, s in (mean_std(test_scores(results[name][t.name]["runs"])) for t in tasks)]
        sparsity = f"{info[name]['sparsity']:.0%}"
        if "pruned_in_finetune" in info[name]:  # the ablation: a dense model pruned by GMP while it fine-tunes
            sparsity += f" -> {info[name]['pruned_in_finetune']:.0%} while fine-tuning"
        rows.append([name, sparsity, f"{info[name]['nonzero']:,}", str(seeds_of(name))] + cells +
                    [f"{100 * average(name):.1f}", recovery])
    table = "\n".join("| " + " | ".join(r) + " |" for r in [header, ["---"] * len(header)] + rows)
    chosen = "\n".join(f"- {name}: " + ", ".join(
        f"{t} {e:g} epochs lr {lr:g}" + (f" distilled from {info[name]['teacher']} (hardness {h:g})" if h else "")
        for t, r in results[name].items() for e, lr, h in [r["recipe"]]) for name in results)
    return table, chosen


def write_results(out, config, table, chosen, info, results):
    """results.md (the table) and results.json (every run: recipe, seed, dev curve, dev and test)."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(f"Test scores (x100), mean ± std over the seeds at each model's dev-selected recipe; "
                f"`python finetune.py` with {config}\n\n{table}\n\nRecipes selected on dev:\n{chosen}\n")
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"config": config, "models": info,
                   "scores": {n: {t: test_scores(r["runs"]) for t, r in rs.items()} for n, rs in results.items()},
                   "recipes": {n: {t: r["recipe"] for t, r in rs.items()} for n, rs in results.items()},
                   "runs": {n: {t: r["runs"] for t, r in rs.items()} for n, rs in results.items()}}, f, indent=1)
