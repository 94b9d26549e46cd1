"""Smoke tests: the three scripts on their `tiny` preset, on mirror data, in a temporary directory."""
import json
import os

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
    assert "unigram" in log and "next: python train_bio.py --init" in log


def test_train_general_resume_keeps_finished_phases(general, mirror_data):
    out, _ = general
    before, _ = load_model(out / "general-sparse90")
    log = run_script(["train_general.py", "--preset", "tiny", "--data", mirror_data, "--out", str(out), "--resume"])
    assert "resuming" in log
    after, _ = load_model(out / "general-sparse90")
    assert all(torch.equal(a, b) for a, b in zip(before.state_dict().values(), after.state_dict().values()))
