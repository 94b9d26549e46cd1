"""DistributedDataParallel on CPU (gloo): 2 processes equal 1 process with the same global batch."""
import os
import socket

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tiny_sparse_bert.data import Blocks, NUM_SPECIAL
from tiny_sparse_bert.model import BertConfig, BertForMaskedLM
from tiny_sparse_bert.pruning import GradualMagnitudePruner
from tiny_sparse_bert.bookkeeping import Reporting
from tiny_sparse_bert.data import mlm_batch
from tiny_sparse_bert.runtime import Runtime, wrap_ddp
from tiny_sparse_bert.train import make_optimizer, train

CFG = BertConfig(vocab_size=100, n_layer=2, hidden=32, n_head=4, intermediate=64, max_position=32, dropout=0.0)
TOKENS = np.random.default_rng(0).integers(NUM_SPECIAL, 100, 30 * 64).astype(np.uint16)
STEPS = 6


def run(rank, world, out):
    torch.manual_seed(0)
    model = BertForMaskedLM(CFG)
    ddp_model = wrap_ddp(model, torch.device("cpu"), world)
    pruner = GradualMagnitudePruner(model, 0.5, 0, 4, 2)
    blocks = Blocks(TOKENS, 32, 8, seed=0)
    train(model, make_optimizer(model, 1e-3, 0.01), lambda s: mlm_batch(blocks, s, 0.3, 100, 0, rank, world), STEPS,
          peak_lr=1e-3, warmup_steps=1, pruner=pruner, report=Reporting(log_every=100),
          runtime=Runtime(ddp_model=ddp_model, is_main=rank == 0))
    torch.save({"model": model.state_dict(), "masks": pruner.masks}, os.path.join(out, f"rank{rank}.pt"))


def worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        run(rank, world, out)
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
    mp.spawn(worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    run(0, 1, str(tmp_path / ".."))  # the single-process reference, same global batch of 8
    single = torch.load(tmp_path / ".." / "rank0.pt", weights_only=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for name in single["masks"]:  # identical masks on both ranks after the pruning updates
        assert torch.equal(ranks[0]["masks"][name], ranks[1]["masks"][name]), name
    for name, w in single["model"].items():
        assert torch.equal(ranks[0]["model"][name], ranks[1]["model"][name]), name  # replicas agree exactly
        # the same arithmetic summed in another order: equal up to float rounding
        assert (ranks[0]["model"][name] - w).abs().max() < 1e-6, name
