"""Fine-tuning bookkeeping for finetune.py: recipe grids, seeds, selection on dev, scoring, the table.

A support module: the paper can be followed without it (finetune.py's `finetune_run` is the step).
Sparse*BERT's comparison (Campos et al. 2022, table 2) is fair only when every model gets the same
search: `finetune_models` runs, for each (model, task), every recipe of the grid with its first
seeds, keeps the recipe with the best mean *dev* score (test is never looked at), then runs the
other seeds at that recipe (`search_recipes`). Every finished run goes to runs.json at once (a
stopped run continues); `results_table` and `write_results` give results.md and results.json.
"""
import json
import math
import os
import shutil
import signal
import statistics
from dataclasses import asdict, replace

import numpy as np
import torch

from .bookkeeping import file_sha256, load_checkpoint, lock_dir, save_checkpoint
from .config import check_run_dir, check_writable, dense_counterpart, load_run
from .model import BertConfig, BertForMaskedLM, BertForSequenceClassification, BertForTokenClassification
from .recovery import FLOOR_MARGIN, floor_score
from .tasks import (best_threshold, collate, encode, entity_f1, example_counts, f1_scores, get_task, label_list,
                    length_grouped_batches, load_splits, multilabel_f1)
from .pruning import prunable_parameters
from .runtime import autocast, barrier, to_device


def grid(option, text):
    """`--epochs 2,6` -> [2.0, 6.0]; values must be positive (in [0, 1] for the hardness)."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    ok = (lambda v: 0 <= v <= 1) if option == "distill-hardness" else (lambda v: 0 < v < math.inf)
    if not values or not all(ok(v) for v in values):
        what = "numbers in [0, 1]" if option == "distill-hardness" else "positive, finite numbers"
        raise SystemExit(f"error: --{option} {text!r}: give one or a comma-separated list of {what}")
    twice = sorted({v for v in values if values.count(v) > 1})
    if twice:  # one run would count as two seeds in the table
        raise SystemExit(f"error: --{option} {text!r} gives {twice[0]:g} twice; give each value once")
    return values


def load_task_data(tasks, data_dir, max_train, max_eval, max_test=0):
    """(splits, labels): each task's train/dev/test examples, read and checked once, each split cut
    to a seeded sample of at most max_train / max_eval / max_test examples (0 = all), and its labels."""
    splits, labels = {}, {}
    for task in tasks:
        try:
            splits[task.name] = load_splits(task, data_dir)
        except ValueError as e:  # a malformed line: the reader's message names the file, line and format
            raise SystemExit(f"error: {e}")
        labels[task.name] = label_list(task, splits[task.name])
        for split, limit in (("train", max_train), ("dev", max_eval), ("test", max_test)):
            if limit:  # a seeded sample, not the first lines (files are often sorted by document)
                examples = splits[task.name][split]
                keep = np.random.default_rng(0).permutation(len(examples))[:limit]
                splits[task.name][split] = [examples[i] for i in sorted(keep)]
        print(f"{task.name}: {task.kind}, {len(labels[task.name])} labels, "
              + ", ".join(f"{k} {len(v)}" for k, v in splits[task.name].items()))
    return splits, labels


def load_encoder(directory):
    """(name, BertForMaskedLM, is_sparse, tokenizer) of a finished run's directory."""
    ckpt, tokenizer = load_run(directory, "--models")
    mlm = BertForMaskedLM(BertConfig(**ckpt["model_config"]))
    mlm.load_state_dict(ckpt["model"])
    return os.path.basename(os.path.normpath(directory)), mlm, ckpt.get("pruner") is not None, tokenizer


def check_names(model_dirs, tasks, random_baseline, seeded="all"):
    """Tables and results name a model by its folder and a task by its name: refuse two that share
    one; and say so when `--seeded` names none of the models."""
    if not model_dirs:
        raise SystemExit("error: --models is empty: give directories written by train_general.py or train_bio.py")
    if not tasks:
        raise SystemExit("error: --tasks is empty: give task names, ner:DIR or cls:DIR")
    names = [os.path.basename(os.path.normpath(d)) for d in model_dirs] + (["random-init"] if random_baseline else [])
    for kind, listed in (("--models", names), ("--tasks", [t.name for t in tasks])):
        twice = sorted({n for n in listed if listed.count(n) > 1})
        if twice:
            raise SystemExit(f"error: {kind} names {twice[0]} twice (results name each by its folder); copy or "
                             f"link one under another name")
    family = lambda n: dense_counterpart(n) or n
    if seeded != "all" and not {family(n) for n in names} & {family(n) for n in seeded.split(",")}:
        print(f"note: --seeded {seeded} names none of the models: each runs --other-seeds seeds")


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


def training_batches(task, items, batch_size, steps_per_epoch, rng, rank=0, world=1):
    """(batch_fn(step), mean_labelled) of a fine-tuning run. NER: random batches of sentences of similar
    lengths (`length_grouped_batches`, half the padding gone), each weighted by its labelled words in
    `train(mean_labelled)`: a batch of short sentences holds few. Sentence-level tasks keep plain
    random batches: grouped by length, their batches skew the label mix (the dense models' ChemProt
    runs collapsed on 2 of 5 seeds, docs/ladder.md row M). Under torchrun each rank takes its rows."""
    lengths = [len(it["ids"]) for it in items]
    mean_labelled = batch_size * sum(len(it["first"]) for it in items) / len(items) if task.kind == "ner" else None
    epochs = {}

    def batch_fn(step):
        epoch, i = divmod(step, steps_per_epoch)
        if epoch not in epochs:
            epochs[epoch] = (length_grouped_batches(lengths, batch_size, rng) if task.kind == "ner" else
                             np.array_split(rng.permutation(len(lengths))[:steps_per_epoch * batch_size],
                                            steps_per_epoch))
        return collate([items[j] for j in epochs[epoch][i][rank::world]], task.kind)
    return batch_fn, mean_labelled


@torch.no_grad()
def evaluate(model, task, items, names, device, bf16=False, threshold=None, counts=False):
    """The task's metrics on encoded examples (batched by length, so little padding); with `counts`,
    also each example's `tasks.example_counts`, which the bootstrap over test examples resamples.

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
        metrics = entity_f1(gold, pred)
    elif task.kind == "multi":
        gold, probs = np.array([it["y"] for it in items]), torch.stack(preds).numpy()
        threshold = best_threshold(gold, probs) if threshold is None else threshold
        pred = probs > threshold
        metrics = {**multilabel_f1(gold, pred), "threshold": threshold}
    else:
        gold, pred = [it["y"] for it in items], [int(p) for p in preds]
        metrics = f1_scores(gold, pred, len(names))
    return (metrics, example_counts(task, gold, pred, len(names))) if counts else metrics


def run_summary(name, task, run):
    """One log line per finished run: model, task, recipe, seed, dev and test scores."""
    tests = ", ".join(f"test {k} {v:.4f}" for k, v in run["test_metrics"].items())
    if run.get("failed"):
        return (f"{name} / {task.name} / {run['epochs']:g} epochs, lr {run['lr']:g} / seed {run['seed']}: "
                f"FAILED, {run['failed']}")
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
    """The recipe with the best mean dev score over its finished runs (test is never looked at). A
    failed run (non-finite loss) counts for nothing; a recipe whose runs all ended at the floor
    (`at_floor`) is chosen only when no recipe learned, and then the one with the lowest rate (the
    search goes on below it: a model that learns nothing mostly had a rate too high for it). None
    when every run failed."""
    dev = {r: [x["dev"] for x in runs if recipe_of(x) == r and not x.get("failed")] for r in recipes}
    finished = [r for r in recipes if dev[r]]
    learned = [r for r in finished if not all(x.get("at_floor") for x in runs
                                              if recipe_of(x) == r and not x.get("failed"))]
    if not learned:
        return min(finished, key=lambda r: r[1]) if finished else None
    return max(learned, key=lambda r: statistics.mean(dev[r]))


def rates_tried(recipes, recipe):
    """The learning rates tried at `recipe`'s epochs and hardness, lowest first."""
    return sorted({lr for e, lr, h in recipes if (e, h) == (recipe[0], recipe[2])})


def next_rate(grid_rates, tried, side):
    """The next rate beyond the tried ones on `side` ("below" or "above"): the grid's own ratio at
    that edge (x0.5 and x2 for 1.5e-3,3e-3), x2 for a grid of one rate; three significant digits."""
    if len(grid_rates) == 1:
        ratio = 2.0
    else:
        ratio = grid_rates[1] / grid_rates[0] if side == "below" else grid_rates[-1] / grid_rates[-2]
    return float(f"{(tried[0] / ratio if side == 'below' else tried[-1] * ratio):.3g}")


def search_recipes(run_seed, recipes, n_search, n_seeds, extend=0, shared=None, say=print):
    """The search of one (model, task), the same for every model: every recipe with the first
    `n_search` seeds; the best mean dev score wins (`select_recipe`). While the winner's rate is the
    lowest or the highest tried, the next rate beyond it is tried (`next_rate`), up to `extend` rates
    on each side, so that the best rate ends with a tried neighbour on both sides or at the limit;
    a grid where nothing learns searches downwards. The other seeds run the winner; with `shared`
    (the dense counterpart's recipe) every seed also runs that one, so that recovery can be read at
    one recipe for both models. run_seed(recipe, seed) -> run. Returns (recipe, runs, search): search
    = {"rates": the rates tried at the winner's epochs and hardness, "bracketed": whether the chosen
    rate has a tried one on both sides}."""
    search = range(min(n_search, n_seeds))
    runs = [run_seed(recipe, seed) for recipe in recipes for seed in search]
    recipe, added, grid_recipes = select_recipe(runs, recipes), {"below": 0, "above": 0}, recipes
    while recipe:
        tried = rates_tried(recipes, recipe)
        at_edge = [side for side, edge in (("below", tried[0]), ("above", tried[-1])) if recipe[1] == edge]
        sides = [side for side in at_edge if added[side] < extend]
        if not sides:
            break
        side = sides[0]
        extra = (recipe[0], next_rate(rates_tried(grid_recipes, recipe), tried, side), recipe[2])
        added[side] += 1
        say(f"lr {recipe[1]:g} is the {'lowest' if side == 'below' else 'highest'} rate tried; trying lr {extra[1]:g}")
        runs += [run_seed(extra, seed) for seed in search]
        recipes = recipes + [extra]
        recipe = select_recipe(runs, recipes)
    runs += [run_seed(recipe, seed) for seed in range(len(search), n_seeds)] if recipe else []
    for run in runs:
        run["selected"] = recipe_of(run) == recipe
    if shared and recipe and tuple(shared) != recipe:
        runs += [{**run_seed(tuple(shared), seed), "selected": False} for seed in range(n_seeds)
                 if not any(recipe_of(r) == tuple(shared) and r["seed"] == seed for r in runs)]
    tried = rates_tried(recipes, recipe) if recipe else []
    return recipe, runs, {"rates": tried, "bracketed": bool(recipe) and tried[0] < recipe[1] < tried[-1]}


def check_arguments(cfg):
    """finetune.py's grids, task and model names and directories, checked before any data is read;
    returns (model directories, tasks)."""
    for option in ("epochs", "lr", "distill_hardness"):
        grid(option.replace("_", "-"), getattr(cfg, option))
    model_dirs = [m for m in cfg.models.split(",") if m]
    tasks = [get_task(t) for t in cfg.tasks.split(",") if t]
    check_names(model_dirs, tasks, cfg.random_baseline, cfg.seeded)
    for directory in model_dirs:
        check_run_dir(directory, "--models", "train_general.py or train_bio.py")
    check_writable(cfg.out)
    return model_dirs, tasks


def claim_runs(cfg, bookkeeping, model_dirs, rank=0, world=1):
    """The runs already in --out: continued when this is the command that made them (the same
    settings, apart from `bookkeeping`, and the same checkpoint files), else refused; returns
    (settings, {"model | task | recipe | seed": run})."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in bookkeeping}
    settings["checkpoints"] = {d: file_sha256(os.path.join(d, "ckpt.pt")) for d in model_dirs}  # the exact models
    if rank == 0:
        claim_out_dir(cfg.out, settings, cfg.overwrite)
    barrier(world)
    finished = recorded_runs(cfg.out)[1]
    if finished:
        print(f"{len(finished)} runs already finished in {cfg.out}/{RUNS_FILE}: not run again")
    return settings, finished


def finetune_models(encoders, tasks, splits, labels, finetune_run, cfg, finished, settings, device, rank=0):
    """finetune.py's step 3 for every model on every task: the same recipe grid and seeds for all
    (`search_recipes`), dense models first (with --distill-hardness they teach their sparse
    counterparts). `finetune_run(task, mlm, sparse, encoded, epochs, lr, seed, teacher, hardness,
    dev_floor)` is one run; each finished run goes to cfg.out/runs.json at once (`save_runs`), and
    a run already in `finished` is not run again. Returns (results, info, floors): results[name][task]
    = {"recipe", "runs"}, info[name] about each encoder, floors[task] = {"dev", "test"} (the
    commonest training label's scores)."""
    recipes = [(epochs, lr) for epochs in grid("epochs", cfg.epochs) for lr in grid("lr", cfg.lr)]
    hardness_grid = grid("distill-hardness", cfg.distill_hardness)
    distilling = any(h > 0 for h in hardness_grid)
    names_in_run = [name for name, *_ in encoders]
    results = {name: {} for name in names_in_run}  # name -> task -> {"recipe": (epochs, lr, hardness), "runs": [...]}
    info, teachers = {}, {}  # teachers[(dense model, task)] = its fine-tuned weights (or their file) per seed
    floors, encodings = {}, {}  # encoded once per tokenizer and task (the checkpoints of one run share one)

    def finetune_model(name, mlm, sparse, tokenizer):  # every task, with the same search
        n_seeds = seeds_for(name, cfg.seeded, cfg.seeds, cfg.other_seeds)
        info[name] = encoder_info(mlm, sparse)
        is_teacher = distilling and name in map(dense_counterpart, names_in_run)
        teacher_name = dense_counterpart(name) if distilling and sparse else None
        if teacher_name and teacher_name not in names_in_run:
            print(f"note: {name} is fine-tuned without distillation: its teacher {teacher_name} is not in --models")
            teacher_name = None
        info[name]["teacher"] = teacher_name
        model_recipes = [(e, lr, h) for e, lr in recipes for h in (hardness_grid if teacher_name else [0.0])]
        for task in tasks:
            key = (tokenizer.to_str(), task.name)
            if key not in encodings:
                encodings[key] = {s: encode(task, ex, tokenizer, labels[task.name], cfg.max_len)
                                  for s, ex in splits[task.name].items()}
                floors.setdefault(task.name, {s: floor_score(task, encodings[key]["train"], encodings[key][s],
                                                             labels[task.name]) for s in ("dev", "test")})
            states = {}

            def run_seed(recipe, seed):
                epochs, lr, hardness = recipe
                state_file = os.path.join(cfg.out, "teachers", name, task.name, f"{epochs:g}-{lr:g}-{seed}.pt")
                run_id = run_key(name, task.name, *recipe, seed)
                lost = (is_teacher and run_id in finished and not finished[run_id].get("failed")
                        and not os.path.exists(state_file))  # a teacher's weights deleted since: run it again
                if lost:
                    print(f"note: {state_file} is missing: {name} / {task.name} seed {seed} runs again for its weights")
                if run_id in finished and not lost:  # an earlier process finished it (a teacher's weights saved)
                    run, state = finished[run_id], state_file
                else:
                    teacher = None
                    if hardness > 0:  # the dense counterpart fine-tuned with this seed, frozen, in eval mode
                        weights = teachers.get((teacher_name, task.name), [None] * (seed + 1))[seed]
                        weights = load_checkpoint(weights)["model"] if isinstance(weights, str) else weights
                        teacher = weights and head_model(task, mlm, len(labels[task.name]), cfg.dropout, weights)
                        teacher = teacher and teacher.to(device).eval().requires_grad_(False)
                    if hardness > 0 and teacher is None:
                        run, state = failed_run(*recipe, seed, "its teacher's run failed"), None
                    else:
                        run, state = finetune_run(task, mlm, sparse, encodings[key], epochs, lr, seed, teacher,
                                                  hardness, floors[task.name]["dev"])
                    if rank == 0 and is_teacher and state is not None:
                        save_checkpoint(state_file, model=state)
                    finished[run_id] = run
                    if rank == 0:
                        save_runs(cfg.out, settings, finished)
                    print(run_summary(name, task, run))
                if is_teacher:
                    states[(epochs, lr, seed)] = state
                return run

            dense_recipe = results.get(dense_counterpart(name), {}).get(task.name, {}).get("recipe")
            shared = dense_recipe if cfg.shared_recipe and sparse and n_seeds == cfg.seeds else None
            recipe, runs, search = search_recipes(run_seed, model_recipes, cfg.search_seeds, n_seeds, cfg.lr_extend,
                                                  shared, say=lambda text: print(f"note: {name} / {task.name}: {text}"))
            results[name][task.name] = {"recipe": recipe, "runs": runs, "search": search}
            if is_teacher and recipe:
                teachers[(name, task.name)] = [states[(*recipe[:2], seed)] for seed in range(n_seeds)]
        if sparse:
            info[name]["mask_unchanged"] = True  # checked after every run
        if cfg.prune_during_finetune > 0 and not sparse:
            info[name]["pruned_in_finetune"] = cfg.prune_during_finetune

    signal.signal(signal.SIGINT, signal.default_int_handler)  # from here on, a stop keeps the finished runs
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a batch scheduler's stop: as Ctrl-C
    try:
        for name, mlm, sparse, tokenizer in sorted(encoders, key=lambda e: e[2]):  # dense models first: they teach
            finetune_model(name, mlm, sparse, tokenizer)
    except (KeyboardInterrupt, SystemExit) as e:  # train() exits with 130 after Ctrl-C
        if isinstance(e, SystemExit) and e.code != 130:
            raise
        print(f"stopped: {len(finished)} finished runs are kept in {cfg.out}/{RUNS_FILE}; run the same command "
              f"again to continue (--overwrite starts over)")
        raise SystemExit(130) from None
    return results, info, floors


def failed_run(epochs, lr, hardness, seed, why, dev_curve=()):
    """The record of a run that did not finish: never selected, scored nowhere."""
    return {"epochs": epochs, "lr": lr, "distill_hardness": hardness, "seed": seed, "teacher": False, "failed": why,
            "dev": None, "dev_curve": list(dev_curve), "test": None, "test_metrics": {}}


def test_scores(runs):
    """The test scores of the dev-selected recipe, one per finished seed."""
    return [run["test"] for run in runs if run["selected"] and not run.get("failed")]


def mean_std(xs):
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def results_table(results, info, tasks, seeds_of, floors=None):
    """(Markdown table, chosen recipes): a row per model, a column per task (mean ± std over seeds),
    the average over tasks and, for a sparse model, its recovery: its average / its dense counterpart's.
    A cell whose runs failed (non-finite loss) says so; a row with one has no average. With `floors`
    ({task: {"test": score}}) a last row gives each task's floor, a cell at it is marked, and a
    recovery whose dense model sits at a floor is not computed."""
    def average(name):  # the mean over tasks of the mean over seeds; None if a task has no score
        means = [mean_std(s)[0] if s else None for s in (test_scores(results[name][t.name]["runs"]) for t in tasks)]
        return None if None in means else statistics.mean(means)

    def cell(name, task):
        runs = results[name][task.name]["runs"]
        scores, selected = test_scores(runs), [r for r in runs if r["selected"]]
        if not scores:
            return "failed (non-finite loss)"
        m, s = mean_std(scores)
        text = f"{100 * m:.1f} ± {100 * s:.1f}" if seeds_of(name) > 1 else f"{100 * m:.1f}"
        if at_floor(name, task):
            text += " (at the floor)"
        if not results[name][task.name].get("search", {}).get("bracketed", True):
            text += " †"
        return text + (f" ({len(selected) - len(scores)} of {len(selected)} seeds failed)"
                       if len(scores) < len(selected) else "")

    def at_floor(name, task):
        scores = test_scores(results[name][task.name]["runs"])
        return bool(floors and scores and mean_std(scores)[0] <= floors[task.name]["test"] + FLOOR_MARGIN)

    header = ["model", "sparsity", "non-zero encoder weights", "seeds"] + \
             [f"{t.name} ({t.metric})" for t in tasks] + ["average", "recovery vs dense"]
    rows = []
    for name in results:
        counterpart, mine = dense_counterpart(name), average(name)
        recovery = ""
        if counterpart in results:
            dense = average(counterpart)
            recovery = f"{100 * mine / dense:.1f}%" if mine is not None and dense else "n/a"
            stuck = [t.name for t in tasks if at_floor(counterpart, t)]
            recovery = f"n/a: {counterpart} at the floor on {', '.join(stuck)}" if stuck else recovery
        sparsity = f"{info[name]['sparsity']:.0%}"
        if "pruned_in_finetune" in info[name]:  # the ablation: a dense model pruned by GMP while it fine-tunes
            sparsity += f" -> {info[name]['pruned_in_finetune']:.0%} while fine-tuning"
        rows.append([name, sparsity, f"{info[name]['nonzero']:,}", str(seeds_of(name))] +
                    [cell(name, t) for t in tasks] + ["" if mine is None else f"{100 * mine:.1f}", recovery])
    if floors:  # what a model that ignores its input scores: the commonest label (all O for NER)
        rows.append(["floor (commonest label)", "", "", ""] + [f"{100 * floors[t.name]['test']:.1f}" for t in tasks]
                    + ["", ""])
    table = "\n".join("| " + " | ".join(r) + " |" for r in [header, ["---"] * len(header)] + rows)
    if "†" in table:
        table += ("\n\n† the dev-selected rate is the lowest or highest rate tried (--lr-extend reached its limit): "
                  "a better one may lie beyond it")

    def recipe_text(name, recipe):
        if recipe is None:
            return "every run failed"
        e, lr, h = recipe
        return f"{e:g} epochs lr {lr:g}" + (f" distilled from {info[name]['teacher']} (hardness {h:g})" if h else "")
    def failures(runs):
        failed = [f"lr {x['lr']:g} seed {x['seed']}: {x['failed']}" for x in runs if x.get("failed")]
        return f" [FAILED {len(failed)} run{'s' * (len(failed) > 1)}: {'; '.join(failed)}]" if failed else ""
    def search_text(search):
        if not search or not search["rates"]:
            return ""
        return (f" (rates tried: {', '.join(f'{lr:g}' for lr in search['rates'])}"
                f"{'' if search['bracketed'] else '; at the edge'})")
    chosen = "\n".join(f"- {name}: " + ", ".join(f"{t} {recipe_text(name, r['recipe'])}{search_text(r.get('search'))}"
                                                  f"{failures(r['runs'])}" for t, r in results[name].items())
                        for name in results)
    return table, chosen


def write_results(out, config, table, chosen, info, results, floors=None, intervals=None, intervals_text=""):
    """results.md (the tables) and results.json (every run: recipe, seed, dev curve, dev and test, the
    floors, the bootstrap intervals), each written to a temporary file and renamed."""
    os.makedirs(out, exist_ok=True)
    md = (f"Test scores (x100), mean ± std over the seeds at each model's dev-selected recipe; "
          f"`python finetune.py` with {config}\n\n{table}\n\nRecipes selected on dev:\n{chosen}\n"
          + (f"\n{intervals_text}\n" if intervals_text else ""))
    js = json.dumps({"config": config, "models": info, "floors": floors, "intervals": intervals,
                     "scores": {n: {t: test_scores(r["runs"]) for t, r in rs.items()} for n, rs in results.items()},
                     "recipes": {n: {t: r["recipe"] for t, r in rs.items()} for n, rs in results.items()},
                     "searches": {n: {t: r.get("search") for t, r in rs.items()} for n, rs in results.items()},
                     "runs": {n: {t: r["runs"] for t, r in rs.items()} for n, rs in results.items()}}, indent=1)
    for name, text in (("results.md", md), ("results.json", js)):
        with open(os.path.join(out, name + ".tmp"), "w") as f:
            f.write(text)
        os.replace(os.path.join(out, name + ".tmp"), os.path.join(out, name))


# ---------------------------------------------------------------------------------- finished runs on disk
# Every finished run is written to --out at once (runs.json, atomically), so a stop loses at most
# the run in flight, and the same command run again continues: it skips what runs.json holds.

RUNS_FILE = "runs.json"


def run_key(model, task, epochs, lr, hardness, seed):
    return f"{model} | {task} | {epochs:g} epochs | lr {lr:g} | hardness {hardness:g} | seed {seed}"


def claim_out_dir(out, settings, overwrite):
    """Check, before any run, that the runs already finished in `out` were made with these `settings`
    (everything that changes a run's result), or remove them (`overwrite`); one-line errors
    otherwise. A lock file keeps a second finetune.py from writing into the same folder at once."""
    release = lock_dir(out, "finetune.py")
    try:
        check_out_dir(out, settings, overwrite)
    except SystemExit:
        release()
        raise


def check_out_dir(out, settings, overwrite):
    if overwrite:
        for name in (RUNS_FILE, "results.json", "results.md"):
            if os.path.exists(os.path.join(out, name)):
                os.remove(os.path.join(out, name))
        shutil.rmtree(os.path.join(out, "teachers"), ignore_errors=True)
    before, _ = recorded_runs(out)
    if before is None and os.path.exists(os.path.join(out, "results.json")):
        raise SystemExit(f"error: {out} holds the results of an earlier finetune.py; start over with --overwrite, "
                         f"or choose another --out")
    changed = {k: (before.get(k), v) for k, v in settings.items() if before.get(k) != v} if before else {}
    if changed:
        what = ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in changed.items())[:300]
        raise SystemExit(f"error: {out}/{RUNS_FILE} holds the runs of another command ({what}); run that command "
                         f"again to continue it, start over with --overwrite, or choose another --out")


def recorded_runs(out):
    """(settings, {run_key: run}) of the runs finished in `out`; (None, {}) when there are none."""
    path = os.path.join(out, RUNS_FILE)
    if not os.path.exists(path):
        return None, {}
    try:
        with open(path) as f:
            stored = json.load(f)
        settings, runs = stored["settings"], dict(stored["runs"])
    except (ValueError, KeyError, TypeError):
        raise SystemExit(f"error: {path} is damaged; start over with --overwrite") from None
    for key, run in runs.items():  # a finished run's scores are finite numbers, its counts a list
        finite = lambda v: isinstance(v, (int, float)) and math.isfinite(v)
        if not (isinstance(run, dict) and (run.get("failed") or finite(run.get("dev")) and finite(run.get("test"))
                                           and isinstance(run.get("test_counts"), list))):
            raise SystemExit(f"error: {path}: the run '{key}' is damaged (its dev, test or test_counts); remove it "
                             f"from the file to run it again, or start over with --overwrite")
    return settings, runs


def save_runs(out, settings, runs):
    """runs.json with every finished run, written to a temporary file and renamed: never half-written."""
    path = os.path.join(out, RUNS_FILE)
    tmp = f"{path}.{os.getpid()}.tmp"  # one per process: two writers never share a temporary file
    try:
        with open(tmp, "w") as f:
            json.dump({"settings": settings, "runs": runs}, f, indent=1)
        os.replace(tmp, path)
    except OSError as e:  # a full disk, say: the runs.json of the runs before this one stays as it was
        if os.path.exists(tmp):
            os.remove(tmp)
        raise SystemExit(f"error: could not write {path}: {e.strerror or e}; the runs finished before are kept "
                         f"there: make room, then run the same command again") from None
