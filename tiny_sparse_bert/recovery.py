"""Does it match? The floor a score must clear, and recovery with a 95% interval.

A support module of finetune.py: the paper can be followed without it; its numbers are the claim's test.
Sparse*BERT claims an equality (Campos et al. 2022: the sparse model "can match" the dense one), so
a point estimate of recovery is not enough: this module puts an interval on it, and a floor under
every score.

- `floor_score`: what a model that ignores its input scores (the commonest training label; every
  word O for NER), as the unigram loss is the floor of an MLM. A run at its floor learned nothing.
- `bootstrap`: the gap (sparse - dense) and the recovery (sparse / dense), per task and over the
  tasks, with 95% intervals from a paired bootstrap over test examples and seeds (Efron &
  Tibshirani 1993; paired: one resample of the test set for both models). Entity F1 and macro F1
  are not means of per-example scores, so each resample's metric is recomputed from the summed
  per-example counts that finetune.py keeps for every run (`tasks.example_counts`).

    boot = bootstrap(results, tasks, "bio-sparse90", "bio-dense")
    print(intervals_table(("bio-sparse90", "bio-dense"), boot))

Over pretraining runs (the same flow with another --seed in train_general.py and train_bio.py,
each fine-tuned by finetune.py into its own --out): one interval over pretraining runs,
fine-tuning seeds and test examples together, and each run's recovery:

    python -m tiny_sparse_bert.recovery out-lab/finetune out-lab-seed1/finetune out-lab-seed2/finetune
"""
import json
import os
import sys

import numpy as np

from .config import dense_counterpart
from .tasks import f1_scores, get_task, metric_from_counts, multilabel_f1

FLOOR_MARGIN = 0.01  # a score within a point of the floor is "at the floor": nothing learned


def floor_score(task, train_items, items, names):
    """The score of a model that ignores its input and predicts the commonest training label: the
    majority class (classification), every word O (NER: entity F1 0), each label's majority
    (multi-label). A fine-tuned model is worth something only above it, as an MLM is above the
    unigram floor."""
    if task.kind == "ner":
        return 0.0
    if task.kind == "multi":
        majority = np.mean([it["y"] for it in train_items], axis=0) > 0.5
        gold = np.array([it["y"] for it in items])
        return float(multilabel_f1(gold, np.tile(majority, (len(items), 1)))["micro_f1"])
    commonest = np.bincount([it["y"] for it in train_items]).argmax()
    return float(f1_scores([it["y"] for it in items], [commonest] * len(items), len(names))[task.metric])


def bootstrap(results, tasks, sparse, dense, recipes=None, n_resamples=1000, seed=0, floors=None):
    """The gap (sparse - dense) and the recovery (sparse / dense) of one pair, per task and over the
    tasks, each with a 95% interval from a paired bootstrap: every resample draws each task's test
    examples with replacement, the same draw for both models, and each model's seeds with
    replacement; a resample's score is its metric recomputed from the summed `example_counts`
    (entity and macro F1 are not means of per-example scores). `recipes` {model: {task: recipe}}
    picks the runs (default: each model's dev-selected ones). A task where the dense model sits at
    its floor (`floors`) gets no recovery and stays out of the average. `results` may be a list, one
    per pretraining run of the pair (train_general.py and train_bio.py with another --seed): each
    resample then draws the pretraining runs too, with replacement, the same draw for both models,
    and then the seeds of each run drawn ("per_run": each pretraining run's recovery; `recipes`, if
    given, a list too, one per run)."""
    pretrained = results if isinstance(results, list) else [results]
    recipe_sets = recipes if isinstance(recipes, list) else [recipes] * len(pretrained)
    rng = np.random.default_rng(seed)
    def picked(i, name, task):  # the finished runs of the recipe asked for (none: every run failed)
        results, recipes = pretrained[i], recipe_sets[i]
        recipe = (recipes or {}).get(name, {}).get(task) or results[name][task]["recipe"]
        return [r for r in results[name][task]["runs"] if recipe is not None
                and not r.get("failed") and (r["epochs"], r["lr"], r["distill_hardness"]) == tuple(recipe)]

    def seeds_resampled(by_seed):  # (S, B) scores per seed and resample -> (B,) means over drawn seeds
        pick = rng.integers(0, len(by_seed), (n_resamples, len(by_seed)))
        return by_seed[pick, np.arange(n_resamples)[:, None]].mean(1)

    per_task, samples, per_run = {}, {}, []
    for task in tasks:
        runs = {name: [picked(i, name, task.name) for i in range(len(pretrained))] for name in (dense, sparse)}
        if not all(all(groups) for groups in runs.values()):
            continue
        n = len(runs[dense][0][0]["test_counts"])
        weights = rng.multinomial(n, np.full(n, 1 / n), size=n_resamples).astype(np.float64)  # (B, n)
        drawn = (rng.integers(0, len(pretrained), (n_resamples, len(pretrained))) if len(pretrained) > 1
                 else np.zeros((n_resamples, 1), dtype=int))  # the pretraining runs of each resample
        scores, points = {}, {}
        for name, groups in runs.items():
            counts = [[np.asarray(r["test_counts"], dtype=np.float64) for r in g] for g in groups]
            by_run = [np.stack([metric_from_counts(task, weights @ c) for c in cs]) for cs in counts]  # (S, B) each
            scores[name] = np.mean([np.choose(drawn[:, j], [seeds_resampled(b) for b in by_run])
                                    for j in range(drawn.shape[1])], 0)  # (B,)
            points[name] = [float(np.mean([metric_from_counts(task, c.sum(0)) for c in cs])) for cs in counts]
        per_run.append(points)
        points = {name: float(np.mean(p)) for name, p in points.items()}
        at_floor = floors is not None and points[dense] <= floors[task.name] + FLOOR_MARGIN
        gap = scores[sparse] - scores[dense]
        per_task[task.name] = {dense: points[dense], sparse: points[sparse], "gap": points[sparse] - points[dense],
                               "gap_ci": percentiles(gap), "dense_at_floor": at_floor,
                               "recovery": None if at_floor else points[sparse] / points[dense],
                               "recovery_ci": None if at_floor else percentiles(scores[sparse] / scores[dense])}
        if len(pretrained) > 1 and not at_floor:
            per_task[task.name]["per_run"] = [s / d for s, d in zip(per_run[-1][sparse], per_run[-1][dense])]
        if not at_floor:
            samples[task.name] = scores
    if not samples:
        return {"tasks": per_task, "average": None}
    mean = lambda name, key: np.mean([samples[t][name] if key == "b" else per_task[t][name] for t in samples], 0)
    average = {dense: float(mean(dense, "p")), sparse: float(mean(sparse, "p")), "tasks": list(samples)}
    average.update(gap=average[sparse] - average[dense], gap_ci=percentiles(mean(sparse, "b") - mean(dense, "b")),
                   recovery=average[sparse] / average[dense],
                   recovery_ci=percentiles(mean(sparse, "b") / mean(dense, "b")))
    if len(pretrained) > 1:
        kept = [points for t, points in zip(per_task, per_run) if t in samples]
        average["per_run"] = [float(np.mean([p[sparse][i] for p in kept]) / np.mean([p[dense][i] for p in kept]))
                              for i in range(len(pretrained))]
    return {"tasks": per_task, "average": average}


def percentiles(samples):
    """The 95% interval of bootstrap samples: their 2.5th and 97.5th percentiles."""
    return [float(x) for x in np.percentile(samples, [2.5, 97.5])]


def intervals_table(pair, boot):
    """Markdown: one row per task and the average: both models' scores, the gap and the recovery with
    their 95% intervals (x100), and a sentence saying where the gap's interval excludes zero."""
    sparse, dense = pair
    if not boot["tasks"]:
        return f"no interval: on every task, every run of {sparse} or of {dense} failed (see the recipes above)."
    rows = [f"| {sparse} vs {dense} | {dense} | {sparse} | gap [95% interval] | recovery [95% interval] |",
            "| --- | --- | --- | --- | --- |"]
    gap = lambda v, ci: f"{100 * v:+.1f} [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]"
    recovery_text = lambda v, ci: f"{100 * v:.1f}% [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"
    for name, row in list(boot["tasks"].items()) + ([("average", boot["average"])] if boot["average"] else []):
        recovery = ("n/a: the dense model is at its floor" if row.get("dense_at_floor") else
                    recovery_text(row["recovery"], row["recovery_ci"]))
        label = name if name != "average" else f"average over {', '.join(row['tasks'])}"
        rows.append(f"| {label} | {100 * row[dense]:.1f} | {100 * row[sparse]:.1f} | "
                    f"{gap(row['gap'], row['gap_ci'])} | {recovery} |")
    below = [n for n, r in boot["tasks"].items() if r["gap_ci"][1] < 0]
    above = [n for n, r in boot["tasks"].items() if r["gap_ci"][0] > 0]
    level = [n for n in boot["tasks"] if n not in below + above]
    said = ([f"{sparse} is below {dense} on {', '.join(below)} (the gap's interval excludes zero)"] if below
            else []) + ([f"above it on {', '.join(above)}"] if above else []) + \
           ([f"level within noise on {', '.join(level)} (the interval holds zero)"] if level else [])
    return "\n".join(rows) + "\n\n" + "; ".join(said) + "."


def at_dense_recipe(results, sparse, dense):
    """`bootstrap`'s `recipes` that read the sparse model at its dense counterpart's chosen recipes."""
    return {sparse: {t: r["recipe"] for t, r in results[dense].items()}}


def all_intervals(results, tasks, floors, seeds_of, shared_recipe, seeds):
    """Bootstrap intervals for every sparse model with its dense counterpart in the table: at its own
    recipe and, for the --seeded models with `shared_recipe`, at the dense model's. ({model: {how:
    bootstrap}}, the Markdown of each)."""
    intervals, texts = {}, []
    test_floors = {t: f["test"] for t, f in floors.items()}
    for sparse in [n for n in results if dense_counterpart(n) in results]:
        dense = dense_counterpart(sparse)
        for how, recipes in (("its own dev-selected recipe", None),
                             ("the dense model's recipe", at_dense_recipe(results, sparse, dense))):
            if recipes and not (shared_recipe and seeds_of(sparse) == seeds):
                continue
            boot = bootstrap(results, tasks, sparse, dense, recipes, floors=test_floors)
            intervals.setdefault(sparse, {})[how] = boot
            texts.append(f"{sparse} at {how}, test scores x100:\n\n{intervals_table((sparse, dense), boot)}")
    return intervals, "\n\n".join(texts)


def main(dirs):
    """Recovery of every sparse model with its dense counterpart over finetune.py's outputs in
    `dirs`, one per pretraining run: one interval over all of them, and each run's recovery."""
    if not dirs:
        raise SystemExit("usage: python -m tiny_sparse_bert.recovery FINETUNE_OUT [FINETUNE_OUT ...]")
    loaded = []
    for directory in dirs:
        path = os.path.join(directory, "results.json")
        try:
            with open(path) as f:
                loaded.append(json.load(f))
        except (OSError, ValueError) as e:
            raise SystemExit(f"error: cannot read {path} ({e}): run finetune.py with --out {directory} first")
    if len({json.dumps(r["config"]["tasks"]) for r in loaded}) > 1:
        raise SystemExit("error: these fine-tunings ran different --tasks; give runs of one command")
    tasks = [get_task(t) for t in loaded[0]["config"]["tasks"].split(",") if t]
    results = [{n: {t: {"recipe": r["recipes"][n][t], "runs": runs} for t, runs in by_task.items()}
                for n, by_task in r["runs"].items()} for r in loaded]
    floors = {t: f["test"] for t, f in loaded[0]["floors"].items()}
    pairs = [(n, dense_counterpart(n)) for n in results[0] if all(dense_counterpart(n) in r for r in results)]
    if not pairs:
        raise SystemExit("error: no sparse model has its dense counterpart in every one of these runs")
    for sparse, dense in pairs:
        shared = [at_dense_recipe(r, sparse, dense) for r in results]
        for how, recipes in (("its own dev-selected recipe", None), ("the dense model's recipe", shared)):
            boot = bootstrap(results, tasks, sparse, dense, recipes, floors=floors)
            print(f"{sparse} at {how}, over {len(dirs)} pretraining run{'s' * (len(dirs) > 1)} ({', '.join(dirs)}), "
                  f"test scores x100:\n\n{intervals_table((sparse, dense), boot)}")
            if boot["average"] and "per_run" in boot["average"]:
                per_run = ", ".join(f"{100 * x:.1f}%" for x in boot["average"]["per_run"])
                print(f"recovery per pretraining run: {per_run}")
            print()


if __name__ == "__main__":
    main(sys.argv[1:])
