"""Fine-tuning bookkeeping: grids, selection on dev, the table, finished runs on disk, names, NER pairing."""
import math
import os

import pytest
import torch

from tiny_sparse_bert.data import train_tokenizer
from tiny_sparse_bert.tasks import Task, encode, entity_f1, read_ner
from tiny_sparse_bert.transfer import (RUNS_FILE, check_names, claim_out_dir, evaluate, grid, recorded_runs,
                                       results_table, run_key, save_runs, search_recipes, select_recipe)


def run(lr, seed, dev, test=None, failed=None, selected=False):
    return {"epochs": 5, "lr": lr, "distill_hardness": 0.0, "seed": seed, "teacher": False, "dev": dev,
            "dev_curve": [], "test": test, "test_metrics": {}, "test_counts": [], "selected": selected,
            **({"failed": failed, "dev": None, "test": None} if failed else {})}


def test_grid_refuses_what_is_not_a_positive_finite_number():
    assert grid("lr", "1.5e-3,3e-3") == [1.5e-3, 3e-3]
    for text in ("inf", "1e-3,inf", "nan", "0", "-1", "", "fast"):
        with pytest.raises(SystemExit, match="positive, finite numbers"):
            grid("lr", text)
    with pytest.raises(SystemExit, match=r"numbers in \[0, 1\]"):
        grid("distill-hardness", "0,2")


def test_a_failed_run_is_never_selected():
    recipes = [(5, 1e-3, 0.0), (5, 1.0, 0.0)]
    runs = [run(1e-3, 0, 0.4), run(1.0, 0, None, failed="loss or gradient norm is not finite at step 3")]
    assert select_recipe(runs, recipes) == (5, 1e-3, 0.0)
    runs = [run(1e-3, 0, 0.4), run(1e-3, 1, 0.2), run(1.0, 0, 0.35), run(1.0, 1, None, failed="not finite")]
    assert select_recipe(runs, recipes) == (5, 1.0, 0.0)  # the mean over the recipe's finished runs
    assert select_recipe([run(1.0, 0, None, failed="not finite")], recipes[1:]) is None


def test_the_table_marks_failures_and_never_divides_by_zero():
    tasks = [Task("a", "cls", "", (), None, "accuracy"), Task("b", "cls", "", (), None, "accuracy")]
    info = {n: {"sparsity": s, "nonzero": 10, "teacher": None} for n, s in (("x-dense", 0.0), ("x-sparse90", 0.9))}
    recipe = (5, 1e-3, 0.0)
    results = {"x-dense": {t.name: {"recipe": recipe, "runs": [run(1e-3, 0, 0.5, 0.0, selected=True)]} for t in tasks},
               "x-sparse90": {"a": {"recipe": recipe, "runs": [run(1e-3, 0, 0.5, 0.4, selected=True)]},
                              "b": {"recipe": None, "runs": [run(1e-3, 0, None, failed="not finite", selected=False)]}}}
    table, chosen = results_table(results, info, tasks, lambda name: 1)
    dense_row, sparse_row = table.splitlines()[2:]
    assert dense_row.endswith("| 0.0 | 0.0 | 0.0 |  |")  # the dense model scored 0: no recovery computed from it
    assert "| 40.0 | failed (non-finite loss) |  | n/a |" in sparse_row
    assert "b every run failed [FAILED 1 run: lr 0.001 seed 0: not finite]" in chosen
    results["x-sparse90"]["b"] = {"recipe": recipe, "runs": [run(1e-3, 0, 0.5, 0.2, selected=True)]}
    results["x-dense"]["a"]["runs"][0]["test"] = 0.6
    table, _ = results_table(results, info, tasks, lambda name: 1)
    assert table.splitlines()[3].endswith("| 30.0 | 100.0% |")  # 0.3 / 0.3


def test_finished_runs_are_kept_and_only_the_same_command_continues(tmp_path):
    out, settings = str(tmp_path / "ft"), {"lr": "1e-3", "tasks": "a"}
    claim_out_dir(out, settings, overwrite=False)
    key = run_key("m", "a", 5, 1e-3, 0.0, 0)
    save_runs(out, settings, {key: run(1e-3, 0, 0.5, 0.4)})
    os.remove(os.path.join(out, ".lock"))  # as the first process's exit does
    claim_out_dir(out, settings, overwrite=False)  # the same command: continues
    assert recorded_runs(out) == (settings, {key: run(1e-3, 0, 0.5, 0.4)})
    os.remove(os.path.join(out, ".lock"))
    with pytest.raises(SystemExit, match=r"holds the runs of another command \(lr: 1e-3 -> 2e-3\)"):
        claim_out_dir(out, {"lr": "2e-3", "tasks": "a"}, overwrite=False)
    claim_out_dir(out, {"lr": "2e-3", "tasks": "a"}, overwrite=True)  # starts over
    assert recorded_runs(out) == (None, {})


def test_a_second_process_is_refused_and_a_stale_lock_is_taken_over(tmp_path):
    out = tmp_path / "ft"
    out.mkdir()
    (out / ".lock").write_text(str(os.getpid()))  # a live process holds it
    with pytest.raises(SystemExit, match=rf"another process \(pid {os.getpid()}\) is writing to"):
        claim_out_dir(str(out), {}, overwrite=False)
    (out / ".lock").write_text("999999999")  # no such process: left behind by a crash
    claim_out_dir(str(out), {}, overwrite=False)
    assert (out / ".lock").read_text() == str(os.getpid())


def test_earlier_results_without_a_runs_file_are_not_replaced_silently(tmp_path):
    (tmp_path / "results.json").write_text("{}")
    with pytest.raises(SystemExit, match="holds the results of an earlier finetune.py"):
        claim_out_dir(str(tmp_path), {}, overwrite=False)


def test_a_damaged_runs_file_is_a_one_line_error(tmp_path):
    (tmp_path / RUNS_FILE).write_text('{"settings": {}, "runs": {')
    with pytest.raises(SystemExit, match="is damaged; start over with --overwrite"):
        recorded_runs(str(tmp_path))


def test_models_and_tasks_with_one_name_are_refused(tmp_path, capsys):
    ner = lambda folder: Task(f"ner:{os.path.basename(folder)}", "ner", folder, (), None, "f1")
    with pytest.raises(SystemExit, match="--models names general-dense twice"):
        check_names(["A/general-dense", "B/general-dense/"], [ner("x")], random_baseline=False)
    with pytest.raises(SystemExit, match="--models names random-init twice"):
        check_names(["A/random-init"], [ner("x")], random_baseline=True)
    with pytest.raises(SystemExit, match="--tasks names ner:data twice"):
        check_names(["A/general-dense"], [ner("X/data"), ner("Y/data")], random_baseline=False)
    for models, tasks, what in (([], [ner("x")], "--models is empty"), (["A/m"], [], "--tasks is empty")):
        with pytest.raises(SystemExit, match=what):
            check_names(models, tasks, random_baseline=True)
    check_names(["A/general-dense"], [ner("x")], random_baseline=True, seeded="bio-dense,bio-sparse90")
    assert "--seeded bio-dense,bio-sparse90 names none of the models" in capsys.readouterr().out


class Oracle(torch.nn.Module):
    """A 'model' that predicts each encoded sentence's gold labels: perfect predictions."""

    def __init__(self, items, n_labels):
        super().__init__()
        self.gold = {tuple(it["ids"]): it["y"] for it in items}
        self.n_labels = n_labels

    def forward(self, input_ids, attention_mask, token_type_ids):
        logits = torch.zeros(*input_ids.shape, self.n_labels)
        for row, ids in enumerate(input_ids.tolist()):
            n = int(attention_mask[row].sum())
            for pos, y in enumerate(self.gold[tuple(ids[:n])]):
                logits[row, pos, max(y, 0)] = 1.0
        return logits, None


def test_ner_words_without_pieces_keep_gold_and_predictions_paired(tmp_path):
    """A no-break or zero-width space is a word with no word piece: it is read as [UNK], so every later
    word's prediction stays with that word (it used to shift onto the next one: F1 1.0 -> 0.0)."""
    tokenizer = train_tokenizer(["aspirin causes headache in some patients"] * 20, 120, str(tmp_path / "t.json"))
    labels = ["O", "B-Chemical", "I-Chemical"]
    task = Task("ner:user", "ner", str(tmp_path), (), read_ner, "f1")
    sentences = [(["aspirin", "\u00a0", "causes", "\u200b", "headache", "aspirin"],
                  ["B-Chemical", "O", "O", "O", "O", "B-Chemical"])] * 200
    items = encode(task, sentences, tokenizer, labels, 64)
    assert all(len(it["first"]) == len(it["word_labels"]) == 6 for it in items)
    scores = evaluate(Oracle(items, len(labels)), task, items, labels, torch.device("cpu"))
    assert scores["f1"] == 1.0
    assert entity_f1([s for _, s in sentences], [s for _, s in sentences])["f1"] == 1.0


def test_a_lock_that_is_a_link_is_never_followed(tmp_path):
    out, target = tmp_path / "ft", tmp_path / "precious.txt"
    out.mkdir()
    target.write_text("keep me")
    os.symlink(target, out / ".lock")
    claim_out_dir(str(out), {}, overwrite=False)
    assert target.read_text() == "keep me" and not os.path.islink(out / ".lock")


def test_a_grid_names_each_value_once():
    assert grid("lr", "1.5e-3,3e-3") == [1.5e-3, 3e-3]
    with pytest.raises(SystemExit, match="gives 0.0015 twice"):  # one run would count as two seeds
        grid("lr", "1.5e-3,1.5e-3")
    with pytest.raises(SystemExit, match="positive, finite"):
        grid("lr", "1e-3,inf")


def searched(dev_at, grid=(1.5e-3, 3e-3), extend=2, n_seeds=1, at_floor=lambda lr: False):
    """search_recipes over a made-up dev score per rate; (recipe, the rates run in order, search)."""
    order = []
    def run_seed(recipe, seed):
        order.append(recipe[1])
        return {"epochs": recipe[0], "lr": recipe[1], "distill_hardness": recipe[2], "seed": seed,
                "dev": dev_at(recipe[1]), "at_floor": at_floor(recipe[1])}
    recipe, runs, search = search_recipes(run_seed, [(5, lr, 0.0) for lr in grid], 1, n_seeds, extend, say=str)
    return recipe, order, search


def test_a_best_rate_at_the_lower_edge_extends_the_search_below_only():
    peak = lambda best: (lambda lr: -abs(math.log(lr / best)))  # dev peaks at `best`
    recipe, order, search = searched(peak(7.5e-4))
    assert order == [1.5e-3, 3e-3, 7.5e-4, 3.75e-4] and recipe[1] == 7.5e-4  # x0.5, the grid's own ratio
    assert search == {"rates": [3.75e-4, 7.5e-4, 1.5e-3, 3e-3], "bracketed": True}
    recipe, order, search = searched(peak(6e-3))  # the upper edge: x2, above only
    assert order == [1.5e-3, 3e-3, 6e-3, 1.2e-2] and recipe[1] == 6e-3 and search["bracketed"]
    recipe, order, search = searched(peak(2e-3))  # inside the grid's neighbours already: one step
    assert order == [1.5e-3, 3e-3, 7.5e-4] and recipe[1] == 1.5e-3 and search["bracketed"]


def test_a_search_that_reaches_its_limit_says_so_and_a_one_rate_grid_looks_both_ways():
    recipe, order, search = searched(lambda lr: -lr)  # lower is always better: stops after two steps
    assert order == [1.5e-3, 3e-3, 7.5e-4, 3.75e-4] and recipe[1] == 3.75e-4 and not search["bracketed"]
    assert searched(lambda lr: -lr, extend=3)[0][1] == 1.88e-4  # three significant digits
    assert searched(lambda lr: -lr, extend=0)[1:] == ([1.5e-3, 3e-3], {"rates": [1.5e-3, 3e-3], "bracketed": False})
    recipe, order, search = searched(lambda lr: -abs(lr - 1e-3), grid=(1e-3,))
    assert order == [1e-3, 5e-4, 2e-3] and recipe[1] == 1e-3 and search["bracketed"]


def test_a_grid_where_nothing_learns_searches_downwards_and_runs_each_rate_once():
    floor = lambda lr: lr > 1e-3  # the rates of the grid end at the floor; lower ones learn, best at 7.5e-4
    recipe, order, search = searched(lambda lr: 0.1 + lr if floor(lr) else 0.5 - abs(lr - 7.5e-4), n_seeds=2,
                                     at_floor=floor)
    assert order == [1.5e-3, 3e-3, 7.5e-4, 3.75e-4, 7.5e-4]  # the winner's second seed last
    assert recipe[1] == 7.5e-4 and search["bracketed"]


def test_a_damaged_run_in_runs_json_is_named_and_a_full_disk_keeps_the_file(tmp_path, monkeypatch):
    import errno
    import json
    import tiny_sparse_bert.transfer as transfer
    out, settings = str(tmp_path / "ft"), {"lr": "1e-3"}
    os.makedirs(out)
    good = run(1e-3, 0, 0.5, 0.4)
    for damage in ({"test": float("nan")}, {"dev": "0.5"}, {"test_counts": None}):
        save_runs(out, settings, {"a": good, "b": {**good, **damage}})
        with pytest.raises(SystemExit, match="the run 'b' is damaged"):
            recorded_runs(out)
    save_runs(out, settings, {"a": good})
    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(transfer.json, "dump", full_disk)
    with pytest.raises(SystemExit, match="could not write .*No space left on device; the runs finished before"):
        save_runs(out, settings, {"a": good, "c": good})
    monkeypatch.undo()
    assert recorded_runs(out) == (settings, {"a": good}) and sorted(os.listdir(out)) == ["runs.json"]
