"""The documentation: every link and image resolves, and the project speaks of itself only."""
import glob
import os
import re
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


def tracked_files():
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        files = out.split()
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: every file but the ignored kinds
        files = [os.path.relpath(os.path.join(d, f), ROOT) for d, _, fs in os.walk(ROOT) for f in fs
                 if not any(part in d for part in (".git", "__pycache__", "out", "cache"))]
    return [f for f in files if os.path.isfile(os.path.join(ROOT, f))]


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
