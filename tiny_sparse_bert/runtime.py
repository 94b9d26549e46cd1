"""Where and how the steps run: devices, torchrun (DDP), bf16 autocast, torch.compile.

A support module: the paper can be followed without it. `train.py`'s loop calls a `Runtime`:
`forward(model)` (the model, or its DDP / torch.compile wrapper), `to_device(batch)`, `with
autocast():`, and `weighted(loss, ...)` (the loss to call .backward() on, the same as `loss`
in one process without `mean_labelled`); `start_up` is what every script does
first (pick the device and precision, join torchrun's processes, print the resolved config).
"""
import os
import sys
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from typing import Optional

import torch
import torch.distributed as dist

from .model import IGNORE_INDEX


# ---------------------------------------------------------------------------------- devices

def pick_device(name="auto"):
    """torch.device of --device: auto (CUDA, then Apple's GPU, then the CPU), cpu, cuda, cuda:N or mps."""
    if name not in ("auto", "cpu", "mps", "cuda") and not (name.startswith("cuda:") and name[5:].isdigit()):
        raise SystemExit(f"error: --device {name!r}: use auto, cpu, cuda, cuda:N or mps")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SystemExit("error: --device cuda but no CUDA GPU is visible; use --device cpu")
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls on Ampere and newer
        torch.backends.cudnn.allow_tf32 = True
    if name == "mps" and not torch.backends.mps.is_available():
        raise SystemExit("error: --device mps but PyTorch sees no Apple GPU (macOS 12.3+ on Apple silicon); "
                         "use --device cpu")
    return torch.device(name)


def setup_distributed(device_name="auto"):
    """(rank, world size, device). Under `torchrun` (RANK and WORLD_SIZE set) this joins the process
    group: nccl on CUDA (one GPU per process, by LOCAL_RANK), gloo on CPU. Otherwise (0, 1, device).
    """
    device = pick_device(device_name)
    if "RANK" not in os.environ:
        return 0, 1, device
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def barrier(world):
    """Wait until every process gets here (a no-op for a single process)."""
    if world > 1:
        dist.barrier()


def wrap_ddp(model, device, world):
    """DistributedDataParallel around `model` when there are several processes, else None."""
    if world == 1:
        return None
    device_ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def check_masks_agree(masks):
    """Masks come from identical weights on every rank; check cheaply (counts, index sums) that they match."""
    fingerprint = torch.tensor([[float(m.sum()), float(m.flatten().nonzero().sum())] for m in masks.values()],
                               dtype=torch.float64)
    low, high = fingerprint.clone(), fingerprint.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    assert torch.equal(low, high), "pruning masks differ between ranks"


def cpu_bf16_support(cpuinfo=None):
    """The CPU's native bf16 dot products, as /proc/cpuinfo reports them: "amx_bf16" (Intel Xeon since
    Sapphire Rapids), "avx512_bf16" (AMD Zen 4, Intel Cooper Lake), "bf16" (ARMv8.6 and later), or
    None (bf16 would be emulated, and slower than fp32)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:  # macOS, Windows: not known, so fp32
            return None
    flags = set(cpuinfo.split())
    return next((flag for flag in ("amx_bf16", "avx512_bf16", "bf16") if flag in flags), None)


def use_bf16(device, precision="auto"):
    """precision 'bf16' or 'fp32', or 'auto': bf16 on CUDA and on CPUs with native bf16 dot products
    (`cpu_bf16_support`: 1.4-1.7x per training step measured on AMX and AVX512-BF16), else fp32
    (Apple's GPU too)."""
    if precision not in ("auto", "bf16", "fp32"):
        raise SystemExit(f"error: --precision {precision!r}: use auto, bf16 or fp32")
    return precision == "bf16" or (precision == "auto" and (device.type == "cuda" or
                                                            device.type == "cpu" and bool(cpu_bf16_support())))


def precision_name(device, bf16):
    """What the start-up line says: "bf16 (avx512_bf16)", "bf16 (cuda)", "fp32"."""
    if not bf16:
        return "fp32"
    return f"bf16 ({cpu_bf16_support() or 'emulated'})" if device.type == "cpu" else f"bf16 ({device.type})"


def autocast(device, bf16):
    """bf16 autocast (matmuls in bf16, reductions and weights in fp32), or plain fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


def to_device(batch, device):
    """Move a dict of tensors; pinned memory and non_blocking let the copy overlap compute on CUDA."""
    if device.type == "cuda":
        return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
    return batch if device.type == "cpu" else {k: v.to(device) for k, v in batch.items()}


def start_up(cfg, preset):
    """What each script does first: the device, torchrun's processes, the precision; only rank 0
    prints (the other ranks' stdout goes nowhere), and the resolved config is printed.
    Returns (rank, world size, device, bf16)."""
    rank, world, device = setup_distributed(cfg.device)  # one process, or one of `torchrun --nproc_per_node N`
    bf16 = use_bf16(device, cfg.precision)
    if rank != 0:
        sys.stdout = open(os.devnull, "w")  # only rank 0 prints, evaluates and writes files
    print(f"config (preset {preset}, {world} process{'es' if world > 1 else ''} on {device}, precision: "
          f"{precision_name(device, bf16)}): {asdict(cfg)}")
    if preset in ("gpu", "base") and device.type == "cpu":
        print(f"note: --preset {preset} is sized for a GPU; on the CPU it takes many times the default's time "
              f"(the default preset is the one sized for a CPU)")
    return rank, world, device, bf16


@dataclass
class Runtime:
    """How `train` runs its steps. `ddp_model` is the DistributedDataParallel wrapper under torchrun
    (only `is_main` prints and saves). `compile` runs forward and backward through torch.compile:
    with dynamic shapes, or with `static_shapes` (batches from `mlm_batch(max_predictions=N)`) one
    fixed graph, replayed as a CUDA graph on a GPU (mode "reduce-overhead")."""
    device: Optional[torch.device] = None
    ddp_model: Optional[torch.nn.Module] = None
    is_main: bool = True
    compile: bool = False
    static_shapes: bool = False
    bf16: bool = False

    def placed(self, model):
        """This runtime, on the model's device unless it names one."""
        return self if self.device else replace(self, device=next(model.parameters()).device)

    def forward(self, model):
        """What the loop calls for the forward pass: the model, its DDP wrapper, or their compiled graph."""
        forward = self.ddp_model or model
        if self.compile:
            mode = "reduce-overhead" if self.static_shapes and self.device.type == "cuda" else None
            forward = torch.compile(forward, dynamic=not self.static_shapes, mode=mode)
        return forward

    def to_device(self, batch):
        return to_device(batch, self.device)

    def autocast(self):
        return autocast(self.device, self.bf16)

    def weighted(self, loss, labels, mean_labelled=None):
        """The loss to call .backward() on (`weighted_loss`, with this run's processes)."""
        return weighted_loss(loss, labels, self.ddp_model is not None, mean_labelled)


def weighted_loss(loss, labels, distributed=False, mean_labelled=None):
    """The loss to call .backward() on: as it is, or the batch's mean loss weighted by its share of
    labelled positions so each position weighs the same: across ranks (DDP's average of the ranks'
    gradients is then the gradient of the mean over the global batch) and, with `mean_labelled`,
    across steps as well."""
    if not (distributed or mean_labelled):
        return loss
    n = (labels != IGNORE_INDEX).sum().float()
    world = dist.get_world_size() if distributed else 1
    if mean_labelled:
        per_batch = torch.tensor(float(mean_labelled), device=n.device)
    else:
        per_batch = n.clone()
        dist.all_reduce(per_batch)
    return loss * n * world / per_batch
