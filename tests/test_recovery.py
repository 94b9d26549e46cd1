"""Does it match: the floors, per-example counts that resample exactly, and the bootstrap intervals."""
import numpy as np
import pytest

from test_transfer import run
from tiny_sparse_bert.recovery import bootstrap, floor_score, intervals_table
from tiny_sparse_bert.tasks import Task, entity_f1, example_counts, f1_scores, metric_from_counts, multilabel_f1


def random_predictions(task, n, accuracy, rng):
    """gold and predictions of a task of `n` examples, each prediction right with prob. `accuracy`."""
    if task.kind == "ner":
        tags = ["O", "B-X", "I-X", "B-Y"]
        gold = [list(rng.choice(tags, size=rng.integers(1, 12))) for _ in range(n)]
        pred = [[g if rng.random() < accuracy else rng.choice(tags) for g in s] for s in gold]
        return gold, pred
    if task.kind == "multi":
        gold = rng.random((n, 5)) < 0.3
        return gold, np.where(rng.random((n, 5)) < accuracy, gold, ~gold)
    gold = rng.integers(0, 4, n)
    return gold, np.where(rng.random(n) < accuracy, gold, rng.integers(0, 4, n))


@pytest.mark.parametrize("kind, metric", [("ner", "f1"), ("cls", "micro_f1"), ("cls", "accuracy"),
                                          ("cls", "macro_f1"), ("multi", "micro_f1")])
def test_a_metric_from_resampled_counts_equals_the_metric_of_the_resample(kind, metric):
    task = Task("t", kind, "", (), None, metric)
    rng = np.random.default_rng(0)
    gold, pred = random_predictions(task, 300, 0.7, rng)
    counts = example_counts(task, gold, pred, 4)
    direct = lambda g, p: (entity_f1(g, p)["f1"] if kind == "ner" else multilabel_f1(g, p)["micro_f1"]
                           if kind == "multi" else f1_scores(g, p, 4)[metric])
    assert metric_from_counts(task, counts.sum(0)) == pytest.approx(direct(gold, pred))
    for _ in range(5):
        idx = rng.integers(0, 300, 300)
        resample = lambda xs: [xs[i] for i in idx] if isinstance(xs, list) else xs[idx]
        assert metric_from_counts(task, counts[idx].sum(0)) == pytest.approx(direct(resample(gold), resample(pred)))


def synthetic_results(task, n, accuracies, seeds=3, seed=0):
    """results as finetune.py builds them, for models named by `accuracies` (their chance of being right)."""
    results = {}
    for name, accuracy in accuracies.items():
        runs = []
        for s in range(seeds):
            gold, pred = random_predictions(task, n, accuracy, np.random.default_rng([seed, s, len(name)]))
            counts = example_counts(task, gold, pred, 4)
            runs.append({**run(1e-3, s, 0.5, float(metric_from_counts(task, counts.sum(0))), selected=True),
                         "test_counts": counts.tolist()})
        results[name] = {task.name: {"recipe": (5, 1e-3, 0.0), "runs": runs}}
    return results


def test_the_bootstrap_interval_holds_the_estimate_and_shrinks_with_more_examples():
    task = Task("t", "cls", "", (), None, "accuracy")
    widths = []
    for n in (200, 3200):
        results = synthetic_results(task, n, {"m-dense": 0.8, "m-sparse90": 0.75})
        boot = bootstrap(results, [task], "m-sparse90", "m-dense")
        row = boot["tasks"]["t"]
        assert row["gap_ci"][0] <= row["gap"] <= row["gap_ci"][1]
        assert row["recovery_ci"][0] <= row["recovery"] <= row["recovery_ci"][1]
        assert boot["average"]["recovery"] == pytest.approx(row["recovery"])
        widths.append(row["gap_ci"][1] - row["gap_ci"][0])
    assert widths[1] < widths[0] / 2  # 16x the examples: about a quarter of the width


@pytest.mark.parametrize("kind, metric", [("ner", "f1"), ("cls", "macro_f1")])
def test_a_model_compared_with_itself_has_a_gap_interval_around_zero(kind, metric):
    task = Task("t", kind, "", (), None, metric)
    results = synthetic_results(task, 400, {"m-dense": 0.8})
    results["m-sparse90"] = results["m-dense"]
    boot = bootstrap(results, [task], "m-sparse90", "m-dense")
    row = boot["tasks"]["t"]
    assert row["gap"] == 0 and row["gap_ci"][0] <= 0 <= row["gap_ci"][1] and row["recovery"] == 1
    assert "level within noise on t" in intervals_table(("m-sparse90", "m-dense"), boot)


def test_no_recovery_where_the_dense_model_sits_at_its_floor():
    task = Task("t", "cls", "", (), None, "accuracy")
    results = synthetic_results(task, 300, {"m-dense": 0.0, "m-sparse90": 0.6})  # dense: chance, 25%
    boot = bootstrap(results, [task], "m-sparse90", "m-dense", floors={"t": 0.3})
    assert boot["tasks"]["t"]["recovery"] is None and boot["average"] is None
    assert "n/a: the dense model is at its floor" in intervals_table(("m-sparse90", "m-dense"), boot)


def test_the_floor_is_the_commonest_training_label():
    cls = Task("t", "cls", "", (), None, "accuracy")
    train = [{"y": y} for y in (0, 1, 1, 1, 2)]
    test = [{"y": y} for y in (1, 1, 0, 2)]
    assert floor_score(cls, train, test, ["a", "b", "c"]) == 0.5
    assert floor_score(Task("n", "ner", "", (), None, "f1"), train, test, ["O"]) == 0.0


def test_a_model_whose_every_run_failed_gets_no_interval_and_no_error():
    """`--lr 1e30`: every run diverges, no recipe is selected; the table still gets written."""
    task = Task("t", "cls", "", (), None, "accuracy")
    results = synthetic_results(task, 100, {"m-dense": 0.8, "m-sparse90": 0.7})
    results["m-sparse90"]["t"] = {"recipe": None, "runs": [{**r, "failed": "loss is not finite"}
                                                          for r in results["m-sparse90"]["t"]["runs"]]}
    boot = bootstrap(results, [task], "m-sparse90", "m-dense")
    assert boot == {"tasks": {}, "average": None}
    assert intervals_table(("m-sparse90", "m-dense"), boot).startswith("no interval: on every task, every run")


def test_over_pretraining_runs_each_run_has_its_recovery_and_their_spread_widens_the_interval(tmp_path, capsys):
    """Three pretraining runs of one pair: one interval over runs, seeds and test examples; runs that
    disagree widen it beyond what one run's seeds and examples give."""
    import json
    from tiny_sparse_bert.recovery import main
    task = Task("ncbi_disease", "ner", "", (), None, "f1")  # as get_task("ncbi_disease") scores it
    pretrained = [synthetic_results(task, 800, {"bio-dense": 0.8, "bio-sparse90": a}, seed=i)
                  for i, a in enumerate((0.70, 0.78, 0.86))]
    one = bootstrap(pretrained[1], [task], "bio-sparse90", "bio-dense")["average"]
    over = bootstrap(pretrained, [task], "bio-sparse90", "bio-dense")["average"]
    for i, results in enumerate(pretrained):
        alone = bootstrap(results, [task], "bio-sparse90", "bio-dense")["average"]["recovery"]
        assert over["per_run"][i] == pytest.approx(alone)
    assert over["per_run"][0] < over["per_run"][1] < over["per_run"][2]
    assert over["recovery"] == pytest.approx(over["bio-sparse90"] / over["bio-dense"])
    width = lambda ci: ci[1] - ci[0]
    assert width(over["recovery_ci"]) > 1.5 * width(one["recovery_ci"])
    assert bootstrap([pretrained[1]], [task], "bio-sparse90", "bio-dense")["average"] == one  # a list of one

    dirs = []
    for i, results in enumerate(pretrained):  # as finetune.py writes them
        (tmp_path / str(i)).mkdir()
        (tmp_path / str(i) / "results.json").write_text(json.dumps({
            "config": {"tasks": "ncbi_disease"}, "floors": {"ncbi_disease": {"dev": 0.0, "test": 0.0}},
            "recipes": {n: {t: r["recipe"] for t, r in rs.items()} for n, rs in results.items()},
            "runs": {n: {t: r["runs"] for t, r in rs.items()} for n, rs in results.items()}}))
        dirs.append(str(tmp_path / str(i)))
    main(dirs)
    printed = capsys.readouterr().out
    assert "bio-sparse90 at its own dev-selected recipe, over 3 pretraining runs" in printed
    assert "recovery per pretraining run: " + ", ".join(f"{100 * x:.1f}%" for x in over["per_run"]) in printed
    with pytest.raises(SystemExit, match="cannot read .*results.json"):
        main([str(tmp_path / "missing")])
