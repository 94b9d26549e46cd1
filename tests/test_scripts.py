"""Smoke tests: the three scripts on their `tiny` preset, on mirror data, in a temporary directory."""
import json
import os
import shutil

import pytest
import torch

from conftest import run_script
from tiny_sparse_bert.pruning import prunable_parameters
from tiny_sparse_bert.model import BertConfig, BertForMaskedLM


@pytest.fixture(scope="module")
def general(mirror_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    log = run_script(["train_general.py", "--preset", "tiny", "--data", mirror_data, "--out", str(out)])
    return out, log


def load_model(directory):
    ckpt = torch.load(os.path.join(directory, "ckpt.pt"), weights_only=True)
    model = BertForMaskedLM(BertConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    return model, ckpt


def test_train_general_tiny(general):
    out, log = general
    for name in ("general-dense", "general-sparse90"):
        assert {"ckpt.pt", "tokenizer.json", "config.json"} <= set(os.listdir(out / name))
    model, ckpt = load_model(out / "general-sparse90")
    weights = prunable_parameters(model).values()
    zeros = sum(int((w == 0).sum()) for w in weights)
    assert zeros == sum(round(0.9 * w.numel()) for w in weights)  # exactly the target, per tensor
    dense, _ = load_model(out / "general-dense")
    assert all((w != 0).all() for w in prunable_parameters(dense).values())
    assert json.loads((out / "general-dense" / "config.json").read_text())["final_sparsity"] == 0.9
    assert "unigram" in log and "next: python train_bio.py --preset tiny --init" in log  # the next step at the same size


def test_train_general_resume_keeps_finished_phases(general, mirror_data):
    out, _ = general
    before, _ = load_model(out / "general-sparse90")
    log = run_script(["train_general.py", "--preset", "tiny", "--data", mirror_data, "--out", str(out), "--resume"])
    assert "resuming" in log
    after, _ = load_model(out / "general-sparse90")
    assert all(torch.equal(a, b) for a, b in zip(before.state_dict().values(), after.state_dict().values()))


@pytest.fixture(scope="module")
def bio(general, mirror_data):
    out, _ = general
    logs = {}
    for name in ("general-sparse90", "general-dense"):
        logs[name] = run_script(["train_bio.py", "--preset", "tiny", "--data", mirror_data, "--init", str(out / name)])
    return out, logs


def test_train_bio_keeps_the_sparsity_pattern(bio):
    out, logs = bio
    start, _ = load_model(out / "general-sparse90")
    end, ckpt = load_model(out / "bio-sparse90")
    for (name, a), b in zip(prunable_parameters(start).items(), prunable_parameters(end).values()):
        assert torch.equal(a != 0, b != 0), name  # the same zeros, to the element
    assert not torch.equal(start.bert.layers[0].query.weight, end.bert.layers[0].query.weight)  # it did train
    assert "sparsity pattern unchanged" in logs["general-sparse90"]
    assert "are done): python finetune.py --preset tiny --models" in logs["general-dense"]  # at the same size
    dense, ckpt = load_model(out / "bio-dense")
    assert ckpt["pruner"] is None and all((w != 0).all() for w in prunable_parameters(dense).values())


def test_finetune_tiny_table(bio, mirror_data):
    out, _ = bio
    models = ",".join(str(out / n) for n in ("general-dense", "general-sparse90", "bio-dense", "bio-sparse90"))
    log = run_script(["finetune.py", "--preset", "tiny", "--data", mirror_data, "--models", models,
                      "--tasks", "ncbi_disease,hoc", "--out", str(out / "finetune")])
    results = json.loads((out / "finetune" / "results.json").read_text())
    assert set(results["scores"]) == {"general-dense", "general-sparse90", "bio-dense", "bio-sparse90", "random-init"}
    assert results["models"]["bio-sparse90"]["mask_unchanged"] and results["models"]["bio-sparse90"]["sparsity"] > 0.89
    # --seeds (2 in the tiny preset) for the --seeded bio pair, --other-seeds (1) for the other rows
    assert {name: len(results["scores"][name]["hoc"]) for name in results["scores"]} == {
        "general-dense": 1, "general-sparse90": 1, "bio-dense": 2, "bio-sparse90": 2, "random-init": 1}
    # the default grid (2 learning rates, no distillation: test_finetune_recipe_search_seeds_and_distillation
    # searches it) is searched with seed 0 only; seed 1 runs the recipe chosen on its dev
    recipe = lambda r: (r["epochs"], r["lr"], r["distill_hardness"])
    for name, tasks in results["runs"].items():
        for task, runs in tasks.items():
            search = [r for r in runs if r["seed"] == 0]
            shared = [r for r in runs if r["seed"] > 0 and not r["selected"]]  # --shared-recipe (on by default)
            assert len(search) == 2 and len(runs) == len(search) + name.startswith("bio-") + len(shared)
            assert all(name == "bio-sparse90" and recipe(r) == tuple(results["recipes"]["bio-dense"][task])
                       for r in shared)
            assert all(r["distill_hardness"] == 0 and not r["teacher"] for r in runs)
            best = max(search, key=lambda r: r["dev"])
            assert tuple(results["recipes"][name][task]) == recipe(best)
            assert all(r["selected"] == (recipe(r) == recipe(best)) for r in runs)
    table = (out / "finetune" / "results.md").read_text()
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in table.splitlines() if line.startswith("| ")}
    assert rows["bio-sparse90"][1] == "90%" and rows["bio-sparse90"][3] == "2" and " ± " in rows["bio-sparse90"][4]
    assert rows["general-sparse90"][3] == "1" and " ± " not in rows["general-sparse90"][4]
    assert "recovery vs dense" in table
    assert "| random-init |" in log


def test_prune_during_finetune_ablation(bio, mirror_data):
    """--prune-during-finetune 0.9: a dense model ends every fine-tuning run with 90% of its encoder's
    prunable weights exactly zero, and the table says it was pruned while fine-tuning."""
    out, _ = bio
    run_script(["finetune.py", "--preset", "tiny", "--data", mirror_data, "--models", str(out / "bio-dense"),
                "--random-baseline", "false", "--tasks", "ncbi_disease", "--prune-during-finetune", "0.9",
                "--out", str(out / "finetune-prune")])
    results = json.loads((out / "finetune-prune" / "results.json").read_text())
    runs = results["runs"]["bio-dense"]["ncbi_disease"]
    assert len(runs) == 3 and all(abs(r["pruned_in_finetune"] - 0.9) < 1e-3 for r in runs)
    assert "| bio-dense | 0% -> 90% while fine-tuning |" in (out / "finetune-prune" / "results.md").read_text()


def test_run_records_and_figures(bio, tmp_path, capsys):
    """Every training directory records its log lines, mask updates and evaluations; the plots
    command draws what exists, skips the rest, and survives a damaged record line."""
    import shutil
    from tiny_sparse_bert import plots
    from tiny_sparse_bert.pruning import cubic_sparsity
    from tiny_sparse_bert.bookkeeping import read_record
    out, _ = bio
    sparse = read_record(out / "general-sparse90" / "record.jsonl")
    logs = [e for e in sparse if "loss" in e]
    assert logs and all({"step", "loss", "lr", "ms_per_step", "sparsity", "target_sparsity"} <= set(e) for e in logs)
    assert any(e.get("mask_update") for e in sparse) and any(e.get("domain") == "bio" for e in sparse)
    dense = read_record(out / "general-dense" / "record.jsonl")
    assert [e for e in dense if e.get("domain") == "general"][-1]["unigram"] > 0
    assert any(e.get("domain") == "bio" and e["step"] == 0 for e in read_record(out / "bio-dense" / "record.jsonl"))

    d = plots.schedule_data(out / "general-sparse90")
    c = d["config"]
    assert d["updates"] and all(t == cubic_sparsity(s, 0.0, c["final_sparsity"], d["begin"], d["end"])
                                for s, t in d["updates"])

    run = tmp_path / "run"
    shutil.copytree(out, run, ignore=shutil.ignore_patterns("finetune*"))
    with open(run / "general-sparse90" / "record.jsonl", "a") as f:
        f.write('{"step": 12, "loss": 3.\n')  # a line cut off by a crash
    written, skipped = plots.main(str(run))
    assert f"{run / 'general-sparse90' / 'record.jsonl'}:{len(sparse) + 1}: not a record line" in capsys.readouterr().out
    assert {os.path.basename(p) for p in written} == {"schedule.png", "loss.png", "layer_sparsity.png",
                                                      "magnitudes.png"}
    assert all(os.path.getsize(p) > 10_000 for p in written)
    assert {line.split(":")[0] for line in skipped} == {"finetune", "sparse_speed"}

    partial = tmp_path / "partial"  # only phase 1 finished
    shutil.copytree(out / "general-dense", partial / "general-dense")
    written, skipped = plots.main(str(partial))
    assert [os.path.basename(p) for p in written] == ["loss.png"] and len(skipped) == 5

    damaged = tmp_path / "damaged"  # a cut-off config and checkpoint, a binary record, a cut-off results.json
    shutil.copytree(out, damaged, ignore=shutil.ignore_patterns("finetune*"))
    (damaged / "bio-dense" / "config.json").write_text('{"steps": 9')
    (damaged / "general-sparse90" / "record.jsonl").write_bytes(bytes(range(256)) * 4)
    ckpt = damaged / "general-sparse90" / "ckpt.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:4000])
    (damaged / "finetune").mkdir()
    (damaged / "finetune" / "results.json").write_text('{"scores": {"bio-dense": ')
    written, skipped = plots.main(str(damaged))  # no traceback: each figure drawn or skipped with a line
    out_text = capsys.readouterr().out
    assert f"warning: {damaged / 'bio-dense' / 'config.json'} is damaged" in out_text
    assert {line.split(":")[0] for line in skipped} >= {"layer_sparsity", "magnitudes", "finetune"}
    assert "schedule.png" in {os.path.basename(p) for p in written}


def test_finetune_recipe_search_seeds_and_distillation(bio, mirror_data):
    """Every model gets the same grid; each keeps its best mean dev recipe; the sparse model learns
    from its dense counterpart, and its zeros are still exactly the pretrained ones."""
    out, _ = bio
    models = ",".join(str(out / n) for n in ("bio-sparse90", "bio-dense"))  # the student first: order must not matter
    args = ["finetune.py", "--preset", "tiny", "--data", mirror_data, "--models", models, "--random-baseline", "false",
            "--tasks", "ncbi_disease,hoc", "--lr", "2e-4,1e-3", "--seeds", "2", "--search-seeds", "2",
            "--distill-hardness", "0,1", "--out", str(out / "finetune-distill")]
    log = run_script(args)
    results = json.loads((out / "finetune-distill" / "results.json").read_text())
    assert results["models"]["bio-sparse90"]["teacher"] == "bio-dense" and results["models"]["bio-sparse90"]["mask_unchanged"]
    for name in ("bio-sparse90", "bio-dense"):
        hardness = (0.0, 1.0) if name == "bio-sparse90" else (0.0,)
        for task, runs in results["runs"][name].items():
            recipes = [(lr, h) for lr in (2e-4, 1e-3) for h in hardness]
            assert sorted((r["lr"], r["distill_hardness"], r["seed"]) for r in runs) == sorted(
                (lr, h, seed) for lr, h in recipes for seed in (0, 1))
            assert all(r["teacher"] == (r["distill_hardness"] > 0) and len(r["dev_curve"]) >= 1 for r in runs)
            mean_dev = {rc: sum(r["dev"] for r in runs if (r["lr"], r["distill_hardness"]) == rc) / 2 for rc in recipes}
            learned = [rc for rc in recipes if not all(r["at_floor"] for r in runs
                                                       if (r["lr"], r["distill_hardness"]) == rc)]
            best = max(learned, key=mean_dev.get) if learned else recipes[0]  # nothing learned: the lowest rate
            assert tuple(results["recipes"][name][task][1:]) == best
            assert results["scores"][name][task] == [r["test"] for r in runs if r["selected"]]
    assert "(hardness 1)" in log and " ± " in log
    from tiny_sparse_bert import plots
    path = plots.plot_finetune(str(out / "finetune-distill"), str(out / "finetune-distill" / "results.json"))
    assert os.path.getsize(path) > 10_000
    shutil.rmtree(out / "finetune-distill" / "teachers")  # the teachers' weights lost: their runs run again
    log = run_script(args)
    assert "is missing: bio-dense / ncbi_disease seed 0 runs again for its weights" in log
    again = json.loads((out / "finetune-distill" / "results.json").read_text())
    assert again["runs"] == results["runs"] and again["intervals"] == results["intervals"]


def test_torchrun_two_processes_and_resume(mirror_data, tmp_path):
    """train_general.py under `torchrun --nproc_per_node 2` (gloo on CPU), then --resume in that mode."""
    args = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train_general.py",
            "--preset", "tiny", "--data", mirror_data, "--out", str(tmp_path), "--dense-steps", "8",
            "--prune-steps", "8", "--prune-every", "2", "--ckpt-every", "4"]
    log = run_script(args)
    assert "2 processes on cpu" in log and log.count("wrote ") == 1  # rank 0 alone prints
    model, ckpt = load_model(tmp_path / "general-sparse90")
    assert ckpt["step"] == 8
    weights = prunable_parameters(model).values()
    assert sum(int((w == 0).sum()) for w in weights) == sum(round(0.9 * w.numel()) for w in weights)
    log = run_script(args + ["--resume"])
    assert "resuming" in log


def test_finetune_reports_a_malformed_user_file(general, tmp_path):
    import subprocess
    import sys
    from conftest import ROOT
    out, _ = general
    (tmp_path / "train.tsv").write_text("good film\tpos\nthis line has no label\n")
    for split in ("dev.tsv", "test.tsv"):
        (tmp_path / split).write_text("fine\tpos\n")
    r = subprocess.run([sys.executable, "finetune.py", "--preset", "tiny", "--models", str(out / "general-dense"),
                        "--tasks", f"cls:{tmp_path}", "--out", str(tmp_path / "ft")], cwd=ROOT, capture_output=True,
                       text=True)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'train.tsv'}:2: expected 'sentence<TAB>label'"


# ---------------------------------------------------------------------------------- runs that must not lose work

def run_failing(args):
    """Run a script that must stop with a one-line error; return that line."""
    import subprocess
    import sys
    from conftest import ROOT
    r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0, f"{args[0]} should have failed\n{r.stdout[-2000:]}"
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    return r.stderr.strip().splitlines()[-1]


def test_rerun_over_a_run_is_refused_and_overwrite_repeats_it_exactly(general, mirror_data):
    out, _ = general
    args = ["train_general.py", "--preset", "tiny", "--data", mirror_data, "--out", str(out)]
    before = {n: load_model(out / n)[0].state_dict() for n in ("general-dense", "general-sparse90")}
    line = run_failing(args)
    assert line.startswith(f"error: {out / 'general-dense' / 'ckpt.pt'} exists (an earlier run)") and "--resume" in line
    line = run_failing(args + ["--resume", "--dense-steps", "40"])
    assert "is finished, with other settings (--dense-steps 30 -> 40)" in line
    line = run_failing(args + ["--resume", "ture"])
    assert "'ture' is not a boolean" in line
    run_script(args + ["--overwrite"])  # a fresh run with the same seed: the same tokenizer, the same models
    for name, state in before.items():
        after = load_model(out / name)[0].state_dict()
        assert all(torch.equal(state[k], after[k]) for k in state), name


def test_bad_options_stop_before_any_work(mirror_data, tmp_path):
    for extra, message in ((["--final-sparsity", "1.5"], "error: --final-sparsity 1.5: must be in [0, 1)"),
                           (["--batch-size", "0"], "error: --batch-size 0: must be > 0"),
                           (["--device", "gpu"], "error: --device 'gpu': use auto, cpu, cuda, cuda:N or mps")):
        assert run_failing(["train_general.py", "--preset", "tiny", "--data", mirror_data,
                            "--out", str(tmp_path / "out"), *extra]) == message
    assert not (tmp_path / "out").exists()  # nothing written, not even the tokenizer
    (tmp_path / "a_file").write_text("")
    line = run_failing(["train_general.py", "--preset", "tiny", "--data", mirror_data,
                        "--out", str(tmp_path / "a_file" / "out")])
    assert line.startswith(f"error: cannot write to {tmp_path / 'a_file' / 'out'}")


def test_train_bio_checks_its_arguments_first(bio, mirror_data, tmp_path):
    out, _ = bio
    args = ["train_bio.py", "--preset", "tiny", "--data", mirror_data]
    line = run_failing(args + ["--init", str(out / "general-dense" / "ckpt.pt")])
    assert line == (f"error: --init {out / 'general-dense' / 'ckpt.pt'} is a file; give the directory that holds it "
                    f"({out / 'general-dense'}), written by train_general.py")
    assert "no ckpt.pt there" in run_failing(args + ["--init", str(tmp_path)])
    assert "exists (an earlier run)" in run_failing(args + ["--init", str(out / "general-dense")])
    damaged = tmp_path / "my-model"  # no "general" in the name: the output goes to bio-my-model
    damaged.mkdir()
    for name in ("ckpt.pt", "tokenizer.json"):
        (damaged / name).write_bytes((out / "general-dense" / name).read_bytes())
    (damaged / "ckpt.pt").write_bytes((damaged / "ckpt.pt").read_bytes()[:5000])
    line = run_failing(args + ["--init", str(damaged)])
    assert line.startswith(f"error: {damaged / 'ckpt.pt'} is damaged or not a checkpoint") and "train_general.py" in line
    assert (tmp_path / "bio-my-model").is_dir()  # checked writable, nothing trained


def test_finetune_refuses_empty_splits_and_bad_labels(general, tmp_path):
    out, _ = general
    args = ["finetune.py", "--preset", "tiny", "--models", str(out / "general-dense"), "--out", str(tmp_path / "ft")]
    for split in ("train.tsv", "dev.tsv", "test.tsv"):
        user = tmp_path / split.split(".")[0]
        user.mkdir()
        for name in ("train.tsv", "dev.tsv", "test.tsv"):
            (user / name).write_text("" if name == split else "good film\tpos\nbad film\tneg\n")
        line = run_failing(args + ["--tasks", f"cls:{user}"])
        assert line == f"error: cls:{user.name}: {split.split('.')[0]} split {user / split} has no examples"
    chemprot = tmp_path / "data" / "re_chemprot"
    chemprot.mkdir(parents=True)
    for name in ("train.jsonl", "dev.jsonl", "test.jsonl"):
        (chemprot / name).write_text('{"text": "a << b >> c", "label": "CPR:3"}\n{"text": "x", "label": 3}\n')
    line = run_failing(args + ["--tasks", "chemprot", "--data", str(tmp_path / "data")])
    assert line == (f"error: {chemprot / 'train.jsonl'}:2: expected a JSON object with 'text' and 'label' strings "
                    f"(3 is not a string)")


def test_finetune_stop_keeps_finished_runs_and_the_same_command_continues(bio, mirror_data, tmp_path):
    """SIGTERM (a scheduler's stop; Ctrl-C is the same path) in the middle of finetune.py keeps every
    finished run; the same command again runs only the rest and ends with the uninterrupted result."""
    import signal
    import subprocess
    import sys
    import time
    from conftest import ROOT
    out, _ = bio
    args = ["finetune.py", "--preset", "tiny", "--data", mirror_data, "--models", str(out / "bio-dense"),
            "--random-baseline", "false", "--tasks", "ncbi_disease,bc5cdr_chem", "--max-train", "400", "--epochs", "2"]
    run_script(args + ["--out", str(tmp_path / "whole")])
    stopped = tmp_path / "stopped"
    p = subprocess.Popen([sys.executable, *args, "--out", str(stopped)], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not (stopped / "runs.json").exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    log = p.communicate(timeout=120)[0]
    assert p.returncode == 130, log[-2000:]
    kept = len(json.loads((stopped / "runs.json").read_text())["runs"])
    assert 1 <= kept < 8 and f"stopped: {kept} finished runs are kept in" in log
    assert not (stopped / "results.json").exists()
    log = run_script(args + ["--out", str(stopped)])
    assert f"{kept} runs already finished in {stopped / 'runs.json'}: not run again" in log
    whole, resumed = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("whole", "stopped"))
    assert resumed["runs"] == whole["runs"] and resumed["scores"] == whole["scores"]
    line = run_failing(args + ["--out", str(stopped), "--lr", "1e-3"])  # another command into the same folder
    assert line.startswith(f"error: {stopped}/runs.json holds the runs of another command (lr: 1.5e-3,3e-3 -> 1e-3)")


def test_finetune_records_a_non_finite_run_as_failed_and_goes_on(bio, mirror_data, tmp_path):
    out, _ = bio
    run_script(["finetune.py", "--preset", "tiny", "--data", mirror_data, "--models", str(out / "bio-dense"),
                "--random-baseline", "false", "--tasks", "ncbi_disease", "--lr", "1e-3,1e30", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "results.json").read_text())
    runs = results["runs"]["bio-dense"]["ncbi_disease"]
    failed = [r for r in runs if r.get("failed")]
    assert [r["lr"] for r in failed] == [1e30] and not failed[0]["selected"]
    assert results["recipes"]["bio-dense"]["ncbi_disease"][1] == 1e-3 and len(results["scores"]["bio-dense"]["ncbi_disease"]) == 2
    assert "[FAILED 1 run: lr 1e+30 seed 0: loss or gradient norm is not finite" in (tmp_path / "results.md").read_text()


def test_an_unfinished_run_or_a_foreign_tokenizer_is_refused(bio, mirror_data, tmp_path):
    """A phase stopped half-way (here: a checkpoint marked unfinished at step 12 of 30) is not a model to
    build on; nor is a checkpoint next to another run's tokenizer."""
    from tiny_sparse_bert.data import train_tokenizer
    out, _ = bio
    half = tmp_path / "general-sparse90"
    shutil.copytree(out / "general-sparse90", half)
    ckpt = torch.load(half / "ckpt.pt", weights_only=True)
    torch.save({**ckpt, "step": 12, "finished": False}, half / "ckpt.pt")
    expected = (f"error: --init {half} is an unfinished run (step 12 of 30): finish it with --resume (the same "
                f"command that started it), or train it again")
    assert run_failing(["train_bio.py", "--preset", "tiny", "--data", mirror_data, "--init", str(half),
                        "--out", str(tmp_path / "bio")]) == expected
    assert "is an unfinished run (step 12 of 30)" in run_failing(
        ["finetune.py", "--preset", "tiny", "--data", mirror_data, "--models", str(half), "--out", str(tmp_path / "ft")])
    foreign = tmp_path / "foreign" / "bio-dense"
    shutil.copytree(out / "bio-dense", foreign)
    train_tokenizer(["another corpus, another tokenizer"] * 50, 800, str(foreign / "tokenizer.json"))
    line = run_failing(["finetune.py", "--preset", "tiny", "--data", mirror_data, "--models", str(foreign),
                        "--out", str(tmp_path / "ft2")])
    assert line == (f"error: {foreign / 'tokenizer.json'} is not the tokenizer {foreign / 'ckpt.pt'} was trained "
                    f"with (sha256 differs); copy that run's tokenizer.json back, or train again")
    (foreign / "tokenizer.json").write_text((out / "bio-dense" / "tokenizer.json").read_text()[:300])  # truncated
    assert "tokenizer.json is not the tokenizer" in run_failing(
        ["finetune.py", "--preset", "tiny", "--data", mirror_data, "--models", str(foreign), "--out", str(tmp_path / "ft3")])


def test_overwrite_removes_every_file_of_the_run_it_replaces(mirror_data, tmp_path):
    args = ["train_general.py", "--preset", "tiny", "--data", mirror_data, "--out", str(tmp_path),
            "--dense-steps", "6", "--prune-steps", "6", "--prune-every", "2"]
    run_script(args)
    stale = tmp_path / "general-sparse80"  # pruned from the old dense model by an earlier command
    shutil.copytree(tmp_path / "general-sparse90", stale)
    run_script(args + ["--overwrite", "--seed", "1"])
    assert os.listdir(stale) == []  # no checkpoint, tokenizer or config of a model pruned from the old one
    ckpt = torch.load(tmp_path / "general-sparse90" / "ckpt.pt", weights_only=True)
    assert ckpt["finished"] and ckpt["run_config"]["seed"] == 1


def test_one_line_errors_for_sizes_that_cannot_work(mirror_data, tmp_path):
    args = ["train_general.py", "--preset", "tiny", "--data", mirror_data, "--out", str(tmp_path / "out")]
    assert run_failing(args + ["--seq-len", "2"]) == "error: --seq-len 2: must be >= 3"
    assert run_failing(args + ["--n-head", "3"]).startswith("error: --hidden 64 is not divisible by --n-head 3")
    assert run_failing(args + ["--batch-size", "100000"]).startswith("error: a corpus of ")
    line = run_failing(args + ["--vocab-size", "3", "--overwrite"])
    assert "--vocab-size asks for 3" in line and "delete" not in line
    line = run_failing(["finetune.py", "--preset", "tiny", "--models", "", "--out", str(tmp_path / "ft")])
    assert line.startswith("error: --models is empty")


def test_finetune_floors_a_search_that_brackets_and_intervals(bio, mirror_data, tmp_path):
    """Every score stands next to its floor; where the dev-best rate is at an edge of the grid, the next
    rate beyond it is tried, for every model alike (below where nothing learns); recovery comes with a
    95% bootstrap interval."""
    out, _ = bio
    models = ",".join(str(out / n) for n in ("bio-dense", "bio-sparse90"))
    log = run_script(["finetune.py", "--preset", "tiny", "--data", mirror_data, "--models", models,
                      "--random-baseline", "false", "--tasks", "ncbi_disease,chemprot", "--lr-extend", "1",
                      "--out", str(tmp_path)])
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["floors"]["ncbi_disease"] == {"dev": 0.0, "test": 0.0} and 0 < results["floors"]["chemprot"]["test"] < 1
    flagged = []
    for name, tasks in results["runs"].items():
        for task, runs in tasks.items():
            grid_runs = [r for r in runs if r["lr"] in (1.5e-3, 3e-3) and r["seed"] == 0]
            learned = [r for r in grid_runs if not r["at_floor"]]
            best = max(learned, key=lambda r: r["dev"])["lr"] if learned else 1.5e-3  # nothing learned: go lower
            beyond = best / 2 if best == 1.5e-3 else best * 2
            search = results["searches"][name][task]
            assert search["rates"] == sorted([1.5e-3, 3e-3, beyond]), (name, task)
            edge = "lowest" if best == 1.5e-3 else "highest"
            assert f"note: {name} / {task}: lr {best:g} is the {edge} rate tried; trying lr {beyond:g}" in log
            chosen = results["recipes"][name][task][1]
            assert search["bracketed"] == (chosen == best)
            flagged += [] if search["bracketed"] else [name]
            assert all(r["at_floor"] == (r["dev"] <= results["floors"][task]["dev"] + 0.01) for r in runs)
            assert all(len(r["test_counts"]) == 32 for r in runs)  # --max-test 32 in the tiny preset
    table = (tmp_path / "results.md").read_text()
    assert ("† the dev-selected rate is the lowest or highest rate tried" in table) == bool(flagged)
    boot = results["intervals"]["bio-sparse90"]["its own dev-selected recipe"]
    for task, row in boot["tasks"].items():
        assert row["gap_ci"][0] <= row["gap"] <= row["gap_ci"][1]
    assert "| floor (commonest label) |  |  |  | 0.0 |" in (tmp_path / "results.md").read_text()
    assert "bio-sparse90 at its own dev-selected recipe, test scores x100:" in log


def test_a_second_process_into_one_out_is_refused(general, bio, mirror_data, tmp_path):
    """Two training runs into one --out at once: the second stops with a one-line error, nothing written."""
    out, _ = bio
    (tmp_path / ".lock").write_text(str(os.getpid()))  # a live process writing there
    line = run_failing(["train_general.py", "--preset", "tiny", "--data", mirror_data, "--out", str(tmp_path)])
    assert line.startswith(f"error: another process (pid {os.getpid()}) is writing to {tmp_path}")
    assert sorted(os.listdir(tmp_path)) == [".lock"]
    bio_out = tmp_path / "bio"
    bio_out.mkdir()
    (bio_out / ".lock").write_text(str(os.getpid()))
    line = run_failing(["train_bio.py", "--preset", "tiny", "--data", mirror_data, "--init",
                        str(out / "general-sparse90"), "--out", str(bio_out)])
    assert line.startswith(f"error: another process (pid {os.getpid()}) is writing to {bio_out}")


def test_a_resumed_phase_cannot_end_short_of_its_target(general, mirror_data, tmp_path):
    """Phase 2 stopped at step 11 of 30: resumed with fewer steps than it ran, or with a schedule whose
    last mask update has passed, it is refused before anything is written."""
    out, _ = general
    shutil.copytree(out, tmp_path / "run", ignore=shutil.ignore_patterns("bio-*", "finetune*"))
    path = tmp_path / "run" / "general-sparse90" / "ckpt.pt"
    ckpt = torch.load(path, weights_only=True)
    ckpt.update(step=11, finished=False)
    ckpt["pruner"]["masks"] = {n: torch.ones_like(m) for n, m in ckpt["pruner"]["masks"].items()}  # not pruned yet
    torch.save(ckpt, path)
    before = path.read_bytes()
    args = ["train_general.py", "--preset", "tiny", "--data", mirror_data, "--out", str(tmp_path / "run"), "--resume"]
    line = run_failing(args + ["--prune-steps", "10"])
    assert "has run 11 steps; --prune-steps 10 would end the phase before that" in line
    line = run_failing(args + ["--prune-steps", "15"])  # prune_end 0.7: the last update at step 10 < 11
    assert "the last mask update would be step 10, so it would end below --final-sparsity 0.9" in line
    assert path.read_bytes() == before


def test_options_that_would_fail_later_are_refused_at_start_up(mirror_data, tmp_path):
    args = ["train_general.py", "--preset", "tiny", "--data", mirror_data, "--out", str(tmp_path / "out")]
    assert run_failing(args + ["--lr", "inf"]) == "error: --lr inf: must be a finite number > 0"
    line = run_failing(args + ["--prune-pattern", "3x5"])  # 64 and 128 wide at the tiny size
    assert line.startswith("error: --prune-pattern 3x5: the prunable weights (64 and 128 wide) are not made of")
    line = run_failing(args + ["--prune-pattern", "2:4"])  # 2:4 is 50% sparse, the preset asks 90%
    assert line == "error: --prune-pattern 2:4 keeps 2 of every 4 weights: give --final-sparsity 0.5"
    assert run_failing(args + ["--prune-pattern", "2:3", "--final-sparsity", "0.333333333333"]).startswith(
        "error: --prune-pattern 2:3: the weights' inputs (64 and 128 wide) do not split into groups of 3")
    assert run_failing(args + ["--prune-score", "obs"]).startswith("error: --prune-score 'obs': use magnitude")
    line = run_failing(args + ["--prune-begin", "0.5", "--prune-end", "0.4"])
    assert line.endswith("(equal: one-shot, every weight goes at that step)")
    assert not (tmp_path / "out").exists()
