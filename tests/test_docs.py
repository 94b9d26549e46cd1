"""The documentation: every link and image resolves, and the project speaks of itself only."""
import ast
import fnmatch
import glob
import os
import re
import shutil
import subprocess

import pytest

from conftest import ROOT

PAGES = [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")  # [text](target) and ![alt](target)

# Words about how the project was made rather than about the project: development periods of
# work, machines being handed out, numbered work tickets and where they are kept. The project says
# "not yet measured on a GPU", never why. The words are spelled in pieces, so that this file does
# not match its own check (nor the repository's other checks for them).
WORDS = ["se" + "ssions?", "le" + "nt", "le" + "nding", "issue " + "tracker", "iss" + "ues? #?\\d+", "work " + "items?"]
PROCESS_WORDS = re.compile("|".join(rf"\b{w}\b" if not w.startswith("issue ") else w for w in WORDS),
                           re.IGNORECASE)
ALLOWED = ('scope="session"',)  # pytest's fixture scope is a word of pytest's, not of ours


def anchor(heading):
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def broken_links(path):
    text = open(path, encoding="utf-8").read()
    text = re.sub(r"```.*?```", "", text, flags=re.DOTALL)  # code blocks hold commands, not links
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+://", target):
            continue  # the web: not checked offline
        file, _, fragment = target.partition("#")
        resolved = os.path.normpath(os.path.join(os.path.dirname(path), file)) if file else path
        if not os.path.exists(resolved):
            broken.append(target)
        elif fragment and resolved.endswith(".md"):
            headings = re.findall(r"^#+ (.+)$", open(resolved, encoding="utf-8").read(), re.MULTILINE)
            if fragment not in {anchor(h) for h in headings}:
                broken.append(target)
    return broken


def process_words(text):
    """The lines of `text` that speak of the development process, as (line number, line)."""
    return [(i, line) for i, line in enumerate(text.splitlines(), 1)
            if PROCESS_WORDS.search(line) and not any(a in line for a in ALLOWED)]


def ignored(path, is_dir, patterns):
    """Whether a .gitignore line of `patterns` (the forms this repository uses: `name/`, `*.ext`,
    `dir/*/`, `!name`) leaves `path` (relative, with /) out; the last matching line decides."""
    result = False
    for pattern in patterns:
        negated, pattern = pattern.startswith("!"), pattern.lstrip("!")
        if pattern.endswith("/") and not is_dir:
            continue
        pattern = pattern.rstrip("/")
        target = path if "/" in pattern else path.rsplit("/", 1)[-1]  # a slash anchors it at the root
        if fnmatch.fnmatchcase(target, pattern):
            result = not negated
    return result


def project_files(root):
    """What git would track in a copy without git metadata (a release archive, a "Download ZIP"):
    every file the repository's .gitignore keeps, never the data prepare.py writes, run outputs,
    caches or a virtual environment."""
    with open(os.path.join(root, ".gitignore")) as f:
        patterns = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    files = []
    for d, dirs, fs in os.walk(root):
        rel = os.path.relpath(d, root).replace(os.sep, "/")
        rel = "" if rel == "." else rel + "/"
        dirs[:] = sorted(x for x in dirs if x != ".git" and not ignored(rel + x, True, patterns)
                         and not os.path.exists(os.path.join(d, x, "pyvenv.cfg")))
        files += [rel + f for f in sorted(fs) if not ignored(rel + f, False, patterns)]
    return files


def tracked_files(root=ROOT):
    if os.path.isdir(os.path.join(root, ".git")) or os.path.isfile(os.path.join(root, ".git")):
        out = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True, check=True).stdout
        files = out.split()
    else:
        files = project_files(root)
    return [f for f in files if os.path.isfile(os.path.join(root, f))]


@pytest.mark.parametrize("path", PAGES, ids=lambda p: os.path.relpath(p, ROOT))
def test_links_and_images_resolve(path):
    assert broken_links(path) == [], f"{os.path.relpath(path, ROOT)}: links to nothing"


def test_readme_is_a_lesson_not_a_notebook():
    lines = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read().count("\n")
    assert lines <= 250, f"README.md has {lines} lines; move details into docs/ and link them"


def test_the_link_checker_finds_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "there.md").write_text("# A heading, here\n")
    page.write_text("[ok](there.md) [ok](there.md#a-heading-here) [no](missing.md) [no](there.md#nowhere)\n"
                    "![no](figures/none.png) [web](https://example.org)\n```\n[in code](skipped.md)\n```\n")
    assert broken_links(str(page)) == ["missing.md", "there.md#nowhere", "figures/none.png"]


def test_no_tracked_file_speaks_of_the_development_process():
    this_file = os.path.relpath(__file__, ROOT)
    found = []
    for name in tracked_files():
        if name == this_file:
            continue
        try:
            text = open(os.path.join(ROOT, name), encoding="utf-8").read()
        except UnicodeDecodeError:
            continue  # figures and other binary files
        found += [f"{name}:{i}: {line.strip()[:100]}" for i, line in process_words(text)]
    assert found == [], "say it in the project's own words:\n" + "\n".join(found)


@pytest.mark.parametrize("line", [f"no GPU was {'le' + 'nt'} to us", f"as the {'issue ' + 'tracker'} asked",
                                  f"see {'iss' + 'ue'} 14", f"an earlier {'Se' + 'ssion'}'s run",
                                  f"{'iss' + 'ues'} #3 and 4", f"the {'work ' + 'item'} said so",
                                  f"the {'le' + 'nding'} rules"])
def test_the_process_words_check_fails_when_a_word_returns(line):
    assert process_words(f"a clean line\n{line}\n") == [(2, line)]


def test_the_process_words_check_lets_ordinary_words_pass():
    assert process_words('@pytest.fixture(scope="session")\nexcellent, silent, lentils\nan issue\n') == []


def test_without_git_the_project_files_are_those_git_tracks(tmp_path):
    """An archive copy (no .git) with prepared data, run outputs, caches and a virtual environment:
    the fallback lists exactly the files git tracks."""
    if shutil.which("git") is None or not os.path.exists(os.path.join(ROOT, ".git")):
        pytest.skip("the comparison needs git and a git checkout of the project")
    copy = tmp_path / "copy"
    archive = subprocess.run(["git", "archive", "HEAD"], cwd=ROOT, capture_output=True, check=True).stdout
    copy.mkdir()
    subprocess.run(["tar", "x"], cwd=copy, input=archive, check=True)
    expected = subprocess.run(["git", "ls-tree", "-r", "--name-only", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.split()
    for made in ("data/general_wikipedia/train.txt", "data/cache/general.npy", "out-lab/general-dense/ckpt.pt",
                 "run.log", "tiny_sparse_bert/__pycache__/model.cpython.pyc", ".venv/pyvenv.cfg", ".venv/lib/site.py",
                 "env/pyvenv.cfg", ".pytest_cache/README.md"):
        (copy / made).parent.mkdir(parents=True, exist_ok=True)
        (copy / made).write_text("an earlier se" + "ssion\n")
    assert sorted(tracked_files(str(copy))) == sorted(expected)


READING_PATH = ["train_general.py", "train_bio.py", "finetune.py", "tiny_sparse_bert/model.py",
                "tiny_sparse_bert/pruning.py", "tiny_sparse_bert/data.py", "tiny_sparse_bert/train.py"]


def test_the_reading_path_is_read_in_one_sitting():
    """docs/conventions.md: the scripts, model, pruner, data and loop stay under 1,400 lines, in the
    order the README and the package docstring give, and the loop function stays one screen."""
    lines = {path: open(os.path.join(ROOT, path), encoding="utf-8").read().count("\n") for path in READING_PATH}
    assert sum(lines.values()) <= 1400, f"the reading path has {sum(lines.values())} lines: {lines}"
    package_doc = open(os.path.join(ROOT, "tiny_sparse_bert", "__init__.py"), encoding="utf-8").read()
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    for text in (package_doc, readme[readme.index("## What is where"):]):
        positions = [text.index(os.path.basename(path)) for path in READING_PATH]
        assert positions == sorted(positions), "the reading path is named out of order"
    source = open(os.path.join(ROOT, "tiny_sparse_bert", "train.py"), encoding="utf-8").read()
    loop = source[source.index("def train("):]
    assert loop.count("\n") <= 60, f"train() has {loop.count(chr(10))} lines"


def test_support_modules_say_what_they_are_for():
    """Every module off the reading path says so in its docstring's first paragraph."""
    on_path = {os.path.basename(p) for p in READING_PATH} | {"__init__.py"}
    for path in sorted(glob.glob(os.path.join(ROOT, "tiny_sparse_bert", "*.py"))):
        if os.path.basename(path) in on_path:
            continue
        doc = ast.get_docstring(ast.parse(open(path, encoding="utf-8").read())) or ""
        first = doc.split("\n\n")[:2]
        assert any("support module" in p.lower() or "the paper can be followed without" in p for p in first), \
            f"{os.path.relpath(path, ROOT)}: its docstring does not say it is support code"


def test_lines_are_at_most_120_characters():
    long = [f"{os.path.relpath(p, ROOT)}:{i}" for p in [os.path.join(ROOT, f) for f in READING_PATH[:3]]
            + glob.glob(os.path.join(ROOT, "tiny_sparse_bert", "*.py"))
            for i, line in enumerate(open(p, encoding="utf-8"), 1) if len(line.rstrip("\n")) > 120]
    assert long == [], "lines over 120 characters: " + ", ".join(long)
