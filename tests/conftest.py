"""Shared test fixtures: the repository root, the local data mirror, tiny model configs."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# the read-only copy of the public data sets beside the checkout (what CI uses instead of the internet)
MIRROR = os.environ.get("TSB_MIRROR", os.path.join(ROOT, "..", "shared", "data"))


@pytest.fixture(scope="session")
def mirror_data(tmp_path_factory):
    """A data/ folder prepared from the mirror with the corpora the scripts need; skip if absent."""
    if not os.path.isdir(MIRROR):
        pytest.skip(f"no data mirror at {MIRROR} (set TSB_MIRROR)")
    out = tmp_path_factory.mktemp("data")
    names = ["general_wikipedia", "general_gutenberg", "biomed_evidence_inference", "biomed_abstracts_kddti",
             "ner_ncbi_disease", "ner_bc5cdr_chem", "ner_bc5cdr_disease", "re_chemprot", "cls_hoc",
             "cls_nicta_piboso"]
    subprocess.run([sys.executable, os.path.join(ROOT, "data", "prepare.py"), "--mirror", MIRROR,
                    "--out", str(out), *names], check=True, capture_output=True)
    return str(out)


def run_script(args, cwd=ROOT, timeout=600):
    """Run one of the top-level scripts; fail the test with its output if it fails."""
    r = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{args[0]} exited {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout
