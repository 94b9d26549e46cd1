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
"""
import numpy as np

from .config import dense_counterpart
from .tasks import f1_scores, metric_from_counts, multilabel_f1

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
    its floor (`floors`) gets no recovery and stays out of the average."""
    rng = np.random.default_rng(seed)
    def picked(name, task):  # the finished runs of the recipe asked for (none: every run failed)
        recipe = (recipes or {}).get(name, {}).get(task) or results[name][task]["recipe"]
        return [r for r in results[name][task]["runs"] if recipe is not None
                and not r.get("failed") and (r["epochs"], r["lr"], r["distill_hardness"]) == tuple(recipe)]

    per_task, samples = {}, {}
    for task in tasks:
        runs = {name: picked(name, task.name) for name in (dense, sparse)}
        if not all(runs.values()):
            continue
        n = len(runs[dense][0]["test_counts"])
        weights = rng.multinomial(n, np.full(n, 1 / n), size=n_resamples).astype(np.float64)  # (B, n)
        scores, points = {}, {}
        for name, model_runs in runs.items():
            counts = [np.asarray(r["test_counts"], dtype=np.float64) for r in model_runs]
            by_seed = np.stack([metric_from_counts(task, weights @ c) for c in counts])  # (S, B)
            pick = rng.integers(0, len(counts), (n_resamples, len(counts)))  # the seeds, resampled
            scores[name] = by_seed[pick, np.arange(n_resamples)[:, None]].mean(1)  # (B,)
            points[name] = float(np.mean([metric_from_counts(task, c.sum(0)) for c in counts]))
        at_floor = floors is not None and points[dense] <= floors[task.name] + FLOOR_MARGIN
        gap = scores[sparse] - scores[dense]
        per_task[task.name] = {dense: points[dense], sparse: points[sparse], "gap": points[sparse] - points[dense],
                               "gap_ci": percentiles(gap), "dense_at_floor": at_floor,
                               "recovery": None if at_floor else points[sparse] / points[dense],
                               "recovery_ci": None if at_floor else percentiles(scores[sparse] / scores[dense])}
        if not at_floor:
            samples[task.name] = scores
    if not samples:
        return {"tasks": per_task, "average": None}
    mean = lambda name, key: np.mean([samples[t][name] if key == "b" else per_task[t][name] for t in samples], 0)
    average = {dense: float(mean(dense, "p")), sparse: float(mean(sparse, "p")), "tasks": list(samples)}
    average.update(gap=average[sparse] - average[dense], gap_ci=percentiles(mean(sparse, "b") - mean(dense, "b")),
                   recovery=average[sparse] / average[dense],
                   recovery_ci=percentiles(mean(sparse, "b") / mean(dense, "b")))
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


def all_intervals(results, tasks, floors, seeds_of, shared_recipe, seeds):
    """Bootstrap intervals for every sparse model with its dense counterpart in the table: at its own
    recipe and, for the --seeded models with `shared_recipe`, at the dense model's. ({model: {how:
    bootstrap}}, the Markdown of each)."""
    intervals, texts = {}, []
    test_floors = {t: f["test"] for t, f in floors.items()}
    for sparse in [n for n in results if dense_counterpart(n) in results]:
        dense = dense_counterpart(sparse)
        shared = {sparse: {t: r["recipe"] for t, r in results[dense].items()}}
        for how, recipes in (("its own dev-selected recipe", None), ("the dense model's recipe", shared)):
            if recipes and not (shared_recipe and seeds_of(sparse) == seeds):
                continue
            boot = bootstrap(results, tasks, sparse, dense, recipes, floors=test_floors)
            intervals.setdefault(sparse, {})[how] = boot
            texts.append(f"{sparse} at {how}, test scores x100:\n\n{intervals_table((sparse, dense), boot)}")
    return intervals, "\n\n".join(texts)
