"""Script configuration: options, range checks, resume and run-directory checks (one-line errors)."""
import ast
import os
import re
import subprocess
import sys
from dataclasses import asdict, dataclass

import pytest

from conftest import ROOT
from tiny_sparse_bert.bookkeeping import save_checkpoint
from tiny_sparse_bert.config import (PretrainOptions, check_options, check_resume_config, check_run_dir, check_writable,
                                     field_help, parse_config)
from tiny_sparse_bert.runtime import pick_device


@dataclass
class Config:
    steps: int = 10
    final_sparsity: float = 0.9
    lr: float = 1e-3
    log_every: int = 50
    resume: bool = False


def test_options_are_checked_at_start_up():
    for argv, message in ((["--final-sparsity", "1.5"], "--final-sparsity 1.5: must be in [0, 1)"),
                          (["--final-sparsity", "-0.1"], "--final-sparsity -0.1: must be in [0, 1)"),
                          (["--final-sparsity", "nan"], "--final-sparsity nan: must be in [0, 1)"),
                          (["--steps", "0"], "--steps 0: must be > 0"), (["--steps", "-4"], "--steps -4: must be > 0")):
        _, cfg = parse_config(Config, {"default": {}}, "", argv)
        with pytest.raises(SystemExit, match=re.escape(message)):
            check_options(cfg, positive=("steps",), below_one=("final_sparsity",))
    for word, value in (("true", True), ("ON", True), ("1", True), ("yes", True), ("no", False), ("off", False),
                        ("0", False), ("False", False)):
        assert parse_config(Config, {"default": {}}, "", ["--resume", word])[1].resume is value
    assert parse_config(Config, {"default": {}}, "", ["--resume"])[1].resume is True
    for typo in ("ture", "y", "2", ""):
        with pytest.raises(SystemExit) as e:
            parse_config(Config, {"default": {}}, "", ["--resume", typo])
        assert e.value.code == 2  # argparse's usage error, nothing started
    for name in ("gpu", "cuda0", "tpu"):
        with pytest.raises(SystemExit, match="use auto, cpu, cuda, cuda:N or mps"):
            pick_device(name)


def test_resume_refuses_changes_to_a_finished_run_and_reports_them_on_an_unfinished_one(tmp_path, capsys):
    path = str(tmp_path / "ckpt.pt")
    stored = Config()
    save_checkpoint(path, model={}, run_config=stored.__dict__, step=10)  # finished: step == steps
    check_resume_config(path, Config(log_every=5, resume=True), ("log_every", "resume"), "steps")  # bookkeeping
    with pytest.raises(SystemExit, match=re.escape("is finished, with other settings (--steps 10 -> 40)")):
        check_resume_config(path, Config(steps=40), ("resume",), "steps")
    save_checkpoint(path, model={}, run_config=stored.__dict__, step=4)  # interrupted at step 4
    check_resume_config(path, Config(lr=1e-4), ("resume",), "steps")
    assert "resuming " + path + " at step 4 with changed settings: --lr 0.001 -> 0.0001" in capsys.readouterr().out


def test_minimum_sizes_and_a_checkpoint_without_its_model_config(tmp_path):
    from tiny_sparse_bert.config import load_run
    from tiny_sparse_bert.data import train_tokenizer

    @dataclass
    class Sizes:
        seq_len: int = 2
    with pytest.raises(SystemExit, match=re.escape("--seq-len 2: must be >= 3")):
        check_options(Sizes(), at_least=(("seq_len", 3),))
    check_options(Sizes(seq_len=3), at_least=(("seq_len", 3),))
    save_checkpoint(str(tmp_path / "ckpt.pt"), model={}, step=5)
    train_tokenizer(["a b c"] * 5, 40, str(tmp_path / "tokenizer.json"))
    with pytest.raises(SystemExit, match="holds no model_config: not a checkpoint of"):
        load_run(str(tmp_path), "--models")


def test_run_directory_and_output_checks(tmp_path):
    (tmp_path / "run").mkdir()
    with pytest.raises(SystemExit, match="no ckpt.pt there; such a directory is written by train_general.py"):
        check_run_dir(str(tmp_path / "run"), "--init", "train_general.py")
    (tmp_path / "run" / "ckpt.pt").write_bytes(b"")
    with pytest.raises(SystemExit, match="is a file; give the directory that holds it"):
        check_run_dir(str(tmp_path / "run" / "ckpt.pt"), "--init", "train_general.py")
    with pytest.raises(SystemExit, match="cannot write to"):
        check_writable(str(tmp_path / "run" / "ckpt.pt" / "out"))
    check_writable(str(tmp_path / "new" / "out"))
    assert (tmp_path / "new" / "out").is_dir()


def script_presets(script):
    """A top-level script's PRESETS dict, read from its source (importing the script would run it)."""
    with open(os.path.join(ROOT, script), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    node = next(n for n in tree.body if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "PRESETS")
    return eval(compile(ast.Expression(node.value), script, "eval"), {"dict": dict})


def script_defaults(script):
    """A top-level script's Config defaults, read from its source as `script_presets` reads PRESETS."""
    with open(os.path.join(ROOT, script), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    config = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Config")
    import tiny_sparse_bert.config as options  # the shared fields' defaults (PretrainOptions, RunOptions)
    shared = {k: v for base in config.bases for k, v in asdict(getattr(options, base.id)()).items()}
    return {**shared, **{n.target.id: ast.literal_eval(n.value) for n in config.body if isinstance(n, ast.AnnAssign)}}


def test_the_lab_presets_chain_into_each_other():
    """`--preset lab` in every script, one after the other, with no other option (README's lab line)."""
    general, bio, finetune = (script_presets(s)["lab"] for s in ("train_general.py", "train_bio.py", "finetune.py"))
    out = general["out"]
    assert out != "out"  # the lab run never overwrites the default run's models
    assert bio["init"] == f"{out}/general-sparse90"  # train_bio.py's default --init, then --init .../general-dense
    runs = [f"{out}/{name}" for name in ("general-dense", "general-sparse90", "bio-dense", "bio-sparse90")]
    assert finetune["models"].split(",") == runs
    assert finetune["out"].startswith(out + "/")
    # the biomedical phase continues at the general phase's batch size, and both score the default's
    # held-out blocks (eval_batches x batch_size sequences), so the lab's losses compare with the default's
    assert bio.get("batch_size") == general.get("batch_size")
    default = script_defaults("train_general.py")
    assert general["eval_batches"] * general["batch_size"] == default["eval_batches"] * default["batch_size"]
    assert bio["eval_batches"] * bio["batch_size"] == general["eval_batches"] * general["batch_size"]


@dataclass
class Described(PretrainOptions):
    steps: int = 10                # steps to run
    grid: str = "1,2"              # a number, or a comma-separated grid
                                   # searched on dev
    seed: int = 5                  # a new default for a shared field keeps the shared help
    bare: int = 0


def test_help_lines_come_from_the_field_comments():
    helps = field_help(Described)
    assert helps["steps"] == "steps to run"
    assert helps["grid"] == "a number, or a comma-separated grid searched on dev"  # continued under its field
    assert helps["seed"] == "a new default for a shared field keeps the shared help"
    assert helps["resume"].startswith("continue the run in --out") and helps["bare"] == ""


@pytest.mark.parametrize("script", ["train_general.py", "train_bio.py", "finetune.py"])
def test_help_describes_every_option(script):
    """`--help`: every option with a one-line description (its field's comment) before its default."""
    out = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "COLUMNS": "1000"}, check=True).stdout
    options = re.findall(r"^  (--[a-z-]+) (?:\[?[A-Z]+\]?)\s+(.*)$", out, re.MULTILINE)
    assert len(options) >= 10
    undescribed = [name for name, text in options if text.startswith(";")]  # "; default X": no comment
    assert undescribed == [], f"{script}: options without a description: {undescribed}"
    if script == "train_general.py":
        assert "magnitude (the paper's) | random | movement" in out  # the choices, where the option is declared


def test_a_checkpoint_edited_or_diverged_is_refused_in_one_line(tmp_path):
    """--init / --models: weights that do not fit their config, an edited config, NaN weights."""
    from tiny_sparse_bert.config import load_run
    from tiny_sparse_bert.data import load_tokenizer, train_tokenizer
    from tiny_sparse_bert.model import BertConfig, BertForMaskedLM
    train_tokenizer(["a b c"] * 5, 40, str(tmp_path / "tokenizer.json"))
    tokenizer_size = load_tokenizer(str(tmp_path / "tokenizer.json")).get_vocab_size()
    config = BertConfig(vocab_size=tokenizer_size, n_layer=1, hidden=16, n_head=2, intermediate=32)
    state = BertForMaskedLM(config).state_dict()
    def saved(model, model_config):
        save_checkpoint(str(tmp_path / "ckpt.pt"), model=model, model_config=model_config, step=1, finished=True)
        return str(tmp_path)
    load_run(saved(state, asdict(config)), "--models")  # as written: accepted
    missing = {k: v for k, v in state.items() if not k.endswith("query.weight")}
    with pytest.raises(SystemExit, match="its weights do not fit its model_config"):
        load_run(saved(missing, asdict(config)), "--models")
    with pytest.raises(SystemExit, match="its weights do not fit its model_config"):
        load_run(saved(state, {**asdict(config), "intermediate": 64}), "--models")
    with pytest.raises(SystemExit, match="its model_config does not describe a model"):
        load_run(saved(state, {**asdict(config), "n_heads": 2}), "--models")
    nan = {**state, "bert.emb.word.weight": state["bert.emb.word.weight"] * float("nan")}
    with pytest.raises(SystemExit, match="holds NaN or infinite weights"):
        load_run(saved(nan, asdict(config)), "--models")
