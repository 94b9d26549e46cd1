"""Check that moving text between README.md and docs/ lost no figure.

Every number in an older README.md (a git revision) must still appear somewhere in today's
README.md or docs/*.md. A "number" is a run of digits with its decimal point, thousands commas,
sign, and a trailing % or x (3.632, 1,300, 97.8%, 1.72x), so a figure retyped with another
rounding counts as lost.

    python tests/check_figures_moved.py 7a61d58     # the revision to compare with
"""
import glob
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUMBER = re.compile(r"(?<![\w.])[-+]?\d[\d,]*(?:\.\d+)?(?:%|x\b)?")


def numbers(text):
    return {n.rstrip(",") for n in NUMBER.findall(text)}


def main(revision):
    old = subprocess.run(["git", "show", f"{revision}:README.md"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    new = "\n".join(open(p, encoding="utf-8").read()
                    for p in [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))])
    lost = sorted(numbers(old) - numbers(new), key=lambda n: old.index(n))
    print(f"{len(numbers(old))} distinct figures in README.md at {revision}; {len(lost)} not found in README.md + docs/")
    for n in lost:
        line = next(l for l in old.splitlines() if n in l)
        print(f"  {n}: {line.strip()[:120]}")
    return 1 if lost else 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__.strip().splitlines()[-1].strip())
    sys.exit(main(sys.argv[1]))
