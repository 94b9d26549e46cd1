"""The documentation's commands: each `python ...` in README.md and docs/*.md parses with the options
its script accepts (the script's own parser), no two exercises write one folder, and every figure a
page names is one that exists or that plots.py draws."""
import argparse
import contextlib
import glob
import io
import os
import re
import runpy
import shlex
import sys

import pytest

from conftest import ROOT
from test_docs import PAGES

import tiny_sparse_bert.config as config

FENCE = re.compile(r"```[a-z]*\n(.*?)```", re.DOTALL)
INLINE = re.compile(r"`(python [^`]+)`")
POSITIONAL_ONLY = {"tiny_sparse_bert.plots", "tiny_sparse_bert.recovery", "tests/compare_runs.py"}  # folders only


def commands(text):
    """Every `python ...` command of a Markdown text, as a list of arguments after `python`: the lines
    of fenced blocks (with `\\` continuations, `&&` chains, environment prefixes and comments) and
    inline code."""
    pieces = [line for block in FENCE.findall(text) for line in block.replace("\\\n", " ").splitlines()]
    pieces += INLINE.findall(FENCE.sub("", text))
    found = []
    for piece in pieces:
        try:
            words = shlex.split(piece, comments=True)
        except ValueError:  # an unbalanced quote in prose: not a command
            continue
        command = []
        for word in words + [";"]:
            if word in ("&&", ";", "|", "||", "&") or word.startswith((">", "2>")):
                if command:
                    found.append(command)
                command = []
            elif command or word in ("python", "python3"):
                command.append(word)
        if command:
            found.append(command)
    ours = lambda c: c[1].endswith(".py") or c[1:2] == ["-m"] and c[2:3] and c[2].startswith("tiny_sparse_bert")
    return [c[1:] for c in found if len(c) > 1 and ours(c)]  # not pip, venv or pytest


class Parsed(Exception):
    """Raised where a script's options are parsed: what they resolved to."""


def parse(argv):
    """Run the script or module of `python ARGV...` up to its option parser; return the parsed config
    (a dataclass or an argparse namespace); a bad option raises SystemExit with argparse's message."""
    target, args = (argv[1], argv[2:]) if argv[0] == "-m" else (argv[0], argv[1:])
    if target in POSITIONAL_ONLY:
        bad = [a for a in args if a.startswith("-")]
        if bad:
            raise SystemExit(f"{target} takes folders only, not {bad[0]}")
        return None
    real_config, real_parse = config.parse_config, argparse.ArgumentParser.parse_args
    def parse_config(*a, **k):  # the scripts' config: the dataclass with its preset and options
        argparse.ArgumentParser.parse_args = real_parse
        raise Parsed(real_config(*a, **k)[1])
    def parse_args(self, *a, **k):
        raise Parsed(real_parse(self, *a, **k))
    saved_argv, saved_path, err = sys.argv, list(sys.path), io.StringIO()
    config.parse_config, argparse.ArgumentParser.parse_args = parse_config, parse_args
    sys.argv = [target, *args]
    sys.path.insert(0, os.path.dirname(os.path.join(ROOT, target)))  # as `python script.py` does
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            if argv[0] == "-m":
                runpy.run_module(target, run_name="__main__")
            else:
                runpy.run_path(os.path.join(ROOT, target), run_name="__main__")
    except Parsed as p:
        return p.args[0]
    except SystemExit:
        raise SystemExit(err.getvalue().strip().splitlines()[-1]) from None
    finally:
        config.parse_config, argparse.ArgumentParser.parse_args = real_config, real_parse
        sys.argv, sys.path[:] = saved_argv, saved_path
    raise AssertionError(f"{target} never parsed its options")


DOC_COMMANDS = [(os.path.relpath(page, ROOT), command) for page in PAGES
                for command in commands(open(page, encoding="utf-8").read())]


@pytest.mark.parametrize("page, command", DOC_COMMANDS, ids=[f"{p}: {' '.join(c)[:60]}" for p, c in DOC_COMMANDS])
def test_every_documented_command_parses(page, command):
    try:
        parse(command)
    except SystemExit as e:
        pytest.fail(f"{page}: `python {' '.join(command)}` is refused: {e}")


def test_the_command_check_finds_a_misspelled_option():
    text = "run it:\n\n```bash\npython train_general.py --preset lab --prune-stpes 10 && echo done\n```\n"
    (command,) = commands(text)
    assert command == ["train_general.py", "--preset", "lab", "--prune-stpes", "10"]
    with pytest.raises(SystemExit, match="unrecognized arguments: --prune-stpes 10"):
        parse(command)
    assert parse(["train_general.py", "--preset", "lab", "--prune-steps", "10"]).prune_steps == 10
    with pytest.raises(SystemExit, match="invalid choice: 'lba'"):
        parse(["finetune.py", "--preset", "lba"])


def written_folder(command):
    """Where a documented training or fine-tuning command writes (its --out, or its preset's)."""
    parsed = parse(command)
    if command[0] == "train_bio.py" and not parsed.out:
        init = os.path.normpath(parsed.init)
        return os.path.join(os.path.dirname(init), os.path.basename(init).replace("general", "bio"))
    return os.path.normpath(parsed.out)


def test_no_two_exercises_write_one_folder():
    text = open(os.path.join(ROOT, "docs", "exercises.md"), encoding="utf-8").read()
    writers = [c for c in commands(text) if c[0] in ("train_general.py", "train_bio.py", "finetune.py")
               and "--help" not in c]
    folders = [written_folder(c) for c in writers if "--resume" not in c]  # a resume continues its own copy
    lab = {"out-lab", "out-lab/bio-sparse90", "out-lab/bio-dense", "out-lab/finetune"}  # the README's lab line
    twice = sorted({f for f in folders if folders.count(f) > 1} | (set(folders) & lab))
    assert not twice, f"docs/exercises.md: more than one command writes {', '.join(twice)}"


def drawn_figures():
    """The file names plots.py writes (every `savefig` target's literal name)."""
    source = open(os.path.join(ROOT, "tiny_sparse_bert", "plots.py"), encoding="utf-8").read()
    return set(re.findall(r"[\"']([\w\-]+\.png)[\"']", source))


def test_every_figure_a_page_names_exists_or_is_drawn():
    known = drawn_figures() | {os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "docs", "figures", "*"))}
    for page in PAGES:
        named = set(re.findall(r"[\w\-]+\.png", open(page, encoding="utf-8").read()))
        assert named <= known, f"{os.path.relpath(page, ROOT)} names {', '.join(sorted(named - known))}"
