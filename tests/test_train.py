import os
import signal

import numpy as np
import pytest
import torch

from tiny_sparse_bert.data import Blocks, NUM_SPECIAL
from tiny_sparse_bert.model import BertConfig, BertForMaskedLM
from tiny_sparse_bert.pruning import MagnitudePruner
from tiny_sparse_bert.train import (NonFiniteLoss, linear_warmup_decay, load_checkpoint, make_optimizer, mlm_batch,
                                    train)

CFG = BertConfig(vocab_size=100, n_layer=2, hidden=32, n_head=4, intermediate=64, max_position=32, dropout=0.1)
TOKENS = np.random.default_rng(0).integers(NUM_SPECIAL, 100, 30 * 40).astype(np.uint16)


def setup(seed=0):
    torch.manual_seed(seed)
    model = BertForMaskedLM(CFG)
    optimizer = make_optimizer(model, 1e-3, 0.01)
    pruner = MagnitudePruner(model, 0.8, 2, 8, 2)
    blocks = Blocks(TOKENS, 32, 4, seed=0)
    return model, optimizer, pruner, lambda step: mlm_batch(blocks, step, 0.15, 100, 0)


def run(model, optimizer, pruner, batch_fn, steps, path, start=0, **kw):
    train(model, optimizer, batch_fn, steps, peak_lr=1e-3, warmup_steps=2, ckpt_path=str(path), extra_state={},
          pruner=pruner, start_step=start, log_every=100, ckpt_every=0, **kw)


def test_lr_schedule():
    lrs = [linear_warmup_decay(s, 1.0, 10, 100) for s in range(100)]
    assert lrs[9] == 1.0 and lrs[0] == 0.1 and lrs[-1] == pytest.approx(1 / 90)
    assert max(lrs) == 1.0 and all(a >= b for a, b in zip(lrs[9:], lrs[10:]))


def test_resume_equals_uninterrupted_run(tmp_path):
    model, optimizer, pruner, batch_fn = setup()
    run(model, optimizer, pruner, batch_fn, 10, tmp_path / "full.pt")

    # the same run interrupted by Ctrl-C during step 4 (it completes the step and saves) ...
    m, o, p, fn = setup()

    def interrupting(step):
        if step == 4:
            os.kill(os.getpid(), signal.SIGINT)
        return fn(step)
    with pytest.raises(SystemExit):
        run(m, o, p, interrupting, 10, tmp_path / "part.pt")
    # ... and resumed from its checkpoint in a fresh state
    torch.manual_seed(123)  # disturb the global RNG: resume must restore it
    ckpt = load_checkpoint(tmp_path / "part.pt")
    assert ckpt["step"] == 5
    m, o, p, fn = setup(seed=99)
    m.load_state_dict(ckpt["model"])
    o.load_state_dict(ckpt["optimizer"])
    p.load_state_dict(ckpt["pruner"])
    torch.set_rng_state(ckpt["rng"])
    run(m, o, p, fn, 10, tmp_path / "part.pt", start=5)
    for (k, a), b in zip(model.state_dict().items(), m.state_dict().values()):
        assert torch.equal(a, b), k
    assert all(torch.equal(pruner.masks[n], p.masks[n]) for n in pruner.masks)


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path):
    model, optimizer, pruner, batch_fn = setup()

    def poisoned(step):
        if step == 6:
            with torch.no_grad():
                model.decoder_bias.fill_(float("nan"))
        return batch_fn(step)
    with pytest.raises(NonFiniteLoss, match="at step 6"):
        train(model, optimizer, poisoned, 10, peak_lr=1e-3, warmup_steps=2, ckpt_path=str(tmp_path / "c.pt"),
              extra_state={}, log_every=100, ckpt_every=4)
    ckpt = load_checkpoint(tmp_path / "c.pt")
    assert ckpt["step"] == 4 and torch.isfinite(ckpt["model"]["decoder_bias"]).all()


def test_ctrl_c_saves_and_exits(tmp_path):
    model, optimizer, pruner, batch_fn = setup()

    def interrupting(step):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return batch_fn(step)
    with pytest.raises(SystemExit) as e:
        train(model, optimizer, interrupting, 10, peak_lr=1e-3, warmup_steps=2, ckpt_path=str(tmp_path / "c.pt"),
              extra_state={"note": "kept"}, pruner=pruner, log_every=100, ckpt_every=0)
    assert e.value.code == 130
    ckpt = load_checkpoint(tmp_path / "c.pt")
    assert ckpt["step"] == 4 and ckpt["note"] == "kept"  # the step in flight completed, then it saved
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored


@pytest.mark.filterwarnings("ignore:CUDA is not available")
def test_cuda_arguments_without_a_gpu(monkeypatch):
    """The CUDA-only lines, exercised for argument handling on a machine without a GPU."""
    from tiny_sparse_bert.train import autocast, pick_device, setup_distributed, use_bf16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA GPU"):
        pick_device("cuda")
    assert pick_device("auto").type == "cpu"
    assert isinstance(autocast(torch.device("cuda"), True), torch.autocast)  # bf16 autocast object for CUDA
    assert use_bf16(torch.device("cuda")) and not use_bf16(torch.device("cpu"), "fp32")
    with pytest.raises(SystemExit, match="--precision"):
        use_bf16(torch.device("cpu"), "fp16")
    monkeypatch.delenv("RANK", raising=False)
    assert setup_distributed("cpu") == (0, 1, torch.device("cpu"))
