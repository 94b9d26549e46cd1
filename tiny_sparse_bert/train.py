"""The plain training loop shared by the three scripts, with checkpoints, MLM evaluation and devices.

One function, `train`, runs AdamW with linear warm-up and decay (BERT A.2), gradient clipping,
bf16 autocast where it is fast (CUDA, AMX CPUs), and the two pruning calls at visible places:

    pruner.update(step)   before the forward pass (recomputes masks when the schedule says so)
    pruner.apply()        right after optimizer.step() (keeps pruned weights at exactly zero)

Checkpoints are plain dicts written atomically (temporary file, then rename) and read with
`weights_only=True`; they hold everything `resume` needs to continue bit-for-bit: model,
optimizer, masks, step, RNG state, configs (`resume` loads them). Batches are a pure function of
the step, so the data position is the step. Ctrl-C saves a checkpoint and exits; a non-finite loss stops the run
and leaves the last good checkpoint in place.
"""
import argparse
import json
import os
import signal
import time
from contextlib import nullcontext
from dataclasses import asdict, fields, replace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from .data import NUM_SPECIAL, mask_tokens
from .model import IGNORE_INDEX


# ---------------------------------------------------------------------------------- devices

def pick_device(name="auto"):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("error: --device cuda but no CUDA GPU is visible; use --device cpu")
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls on Ampere and newer
        torch.backends.cudnn.allow_tf32 = True
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
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def check_masks_agree(masks):
    """Masks come from identical weights on every rank; check cheaply (counts, index sums) that they match."""
    fingerprint = torch.tensor([[float(m.sum()), float(m.flatten().nonzero().sum())] for m in masks.values()],
                               dtype=torch.float64)
    low, high = fingerprint.clone(), fingerprint.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    assert torch.equal(low, high), "pruning masks differ between ranks"


def cpu_has_amx():
    """True on x86 CPUs with AMX bf16 units (Intel Xeon since Sapphire Rapids): there bf16 matmuls
    beat fp32 (1.6x per training step measured on this project's machine); on most laptops they lose."""
    try:
        with open("/proc/cpuinfo") as f:
            return "amx_bf16" in f.read()
    except OSError:
        return False


def use_bf16(device, precision="auto"):
    """precision 'bf16' or 'fp32', or 'auto': bf16 on CUDA and on AMX CPUs, else fp32."""
    if precision not in ("auto", "bf16", "fp32"):
        raise SystemExit(f"error: --precision {precision!r}: use auto, bf16 or fp32")
    return precision == "bf16" or (precision == "auto" and (device.type == "cuda" or cpu_has_amx()))


def autocast(device, bf16):
    """bf16 autocast (matmuls in bf16, reductions and weights in fp32), or plain fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


def to_device(batch, device):
    """Move a dict of tensors; pinned memory and non_blocking let the copy overlap compute on CUDA."""
    if device.type == "cuda":
        return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
    return batch


# ---------------------------------------------------------------------------------- schedule, optimizer

def linear_warmup_decay(step, peak_lr, warmup_steps, total_steps):
    """BERT A.2: lr rises linearly from 0 to peak over warm-up, then falls linearly to 0 at the end."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    return peak_lr * max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def make_optimizer(model, lr, weight_decay, betas=(0.9, 0.98), eps=1e-6):
    """AdamW; weight decay on matrices only, none on 1-D parameters (biases, LayerNorms), as BERT."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=betas, eps=eps)


# ---------------------------------------------------------------------------------- MLM batches and eval

EVAL_MLM_PROB = 0.15  # held-out MLM is always measured with BERT's masking rate


def mlm_batch(blocks, step, mlm_prob, vocab_size, seed, rank=0, world=1):
    """The masked batch of a step; the masking RNG is seeded by (seed, step), so resume needs no state.

    Under torchrun every rank draws the same global batch and masks (cheap), then keeps its own
    interleaved rows: together the ranks see exactly the batch a single process would.
    """
    x, attention_mask = blocks.batch(step)
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    x, labels = mask_tokens(x, attention_mask, mlm_prob, vocab_size, g)
    assert len(x) % world == 0, f"batch size {len(x)} is not divisible by {world} processes"
    return {"input_ids": x[rank::world], "attention_mask": attention_mask[rank::world], "labels": labels[rank::world]}


def unigram_log_probs(train_tokens, vocab_size):
    """log p(token) of a context-blind model fitted on the training tokens (add-one smoothing)."""
    counts = np.bincount(np.asarray(train_tokens, dtype=np.int64), minlength=vocab_size).astype(np.float64)
    counts[:NUM_SPECIAL] = 0
    counts[NUM_SPECIAL:] += 1
    with np.errstate(divide="ignore"):  # special tokens get log 0 = -inf: never a target
        return torch.from_numpy(np.log(counts / counts.sum())).float()


@torch.no_grad()
def evaluate_mlm(model, blocks, unigram_logp, n_batches=20, mlm_prob=EVAL_MLM_PROB, seed=1234, device=None,
                 bf16=False):
    """Held-out MLM loss and accuracy on fixed blocks and fixed masks, next to the unigram loss.

    Always BERT's 15% masking, whatever rate training uses, so that losses stay comparable.
    `unigram` is the loss of the best context-blind model on the same masked tokens: a model
    has learned something about language only once its loss is below it.
    """
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    g = torch.Generator().manual_seed(seed)
    total_loss = total_correct = total_unigram = n = 0
    for x, attention_mask in blocks.fixed_batches(n_batches):
        x, labels = mask_tokens(x, attention_mask, mlm_prob, model.config.vocab_size, g)
        batch = to_device({"input_ids": x, "attention_mask": attention_mask, "labels": labels}, device)
        with autocast(device, bf16):
            logits, _ = model(**batch)
        target = labels[labels != IGNORE_INDEX]
        logits = logits.float().cpu()
        total_loss += F.cross_entropy(logits, target, reduction="sum").item()
        total_correct += (logits.argmax(-1) == target).sum().item()
        total_unigram += -unigram_logp[target].sum().item()
        n += target.numel()
    model.train(was_training)
    return {"loss": total_loss / n, "acc": total_correct / n, "unigram": total_unigram / n}


# ---------------------------------------------------------------------------------- checkpoints

def save_checkpoint(path, **state):
    """torch.save to a temporary file, then rename: a crash never leaves a half-written checkpoint."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path):
    if not os.path.exists(path):
        raise SystemExit(f"error: no checkpoint at {path} (run the previous script first, or check the path)")
    return torch.load(path, map_location="cpu", weights_only=True)


def resume(path, model, optimizer, pruner=None):
    """Load a checkpoint written by `train` into model, optimizer, pruner and the RNGs; return its step.

    A checkpoint of another model config is refused with a one-line error.
    """
    ckpt = load_checkpoint(path)
    ours = asdict(model.config)
    if ckpt["model_config"] != ours:
        diff = {k: (ckpt["model_config"].get(k), v) for k, v in ours.items() if ckpt["model_config"].get(k) != v}
        raise SystemExit(f"error: {path} was written with another model config (checkpoint vs now: {diff})")
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if pruner is not None:
        pruner.load_state_dict(ckpt["pruner"])
    torch.set_rng_state(ckpt["rng"])
    if ckpt.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(ckpt["cuda_rng"])
    print(f"resuming {path} at step {ckpt['step']}")
    return ckpt["step"]


# ---------------------------------------------------------------------------------- the loop

class NonFiniteLoss(SystemExit):
    """Raised when the loss is NaN or infinite: the script stops with this one-line message."""


def train(model, optimizer, batch_fn, steps, *, peak_lr, warmup_steps, ckpt_path, extra_state,
          pruner=None, teacher=None, distill_temperature=2.0, distill_alpha=0.5, clip_norm=1.0,
          eval_fn=None, eval_every=0, log_every=50, ckpt_every=500, start_step=0, device=None,
          ddp_model=None, is_main=True, compile=False, bf16=False):
    """Run steps [start_step, steps) of AdamW on `batch_fn(step)` batches; save to `ckpt_path`.

    `extra_state` (configs, tokenizer path, ...) is stored in every checkpoint. With `teacher`
    (a dense model of the same vocabulary) the loss mixes the hard MLM loss with a soft-target KL
    at the masked positions (Hinton et al. 2015; Sanh et al. 2019). `ddp_model` is the
    DistributedDataParallel wrapper of `model` when running under torchrun. `compile` runs the
    forward and backward through torch.compile (dynamic shapes: the number of masked positions varies).
    """
    device = device or next(model.parameters()).device
    forward = ddp_model or model
    if compile:
        forward = torch.compile(forward, dynamic=True)
    model.train()

    def checkpoint(step):  # `step` = the number of completed steps; ckpt_path None = no checkpoints
        if is_main and ckpt_path:
            save_checkpoint(ckpt_path, model=model.state_dict(), optimizer=optimizer.state_dict(),
                            pruner=pruner.state_dict() if pruner else None, step=step,
                            rng=torch.get_rng_state(),
                            cuda_rng=torch.cuda.get_rng_state() if device.type == "cuda" else None,
                            **extra_state)

    # Ctrl-C sets a flag; the step in flight completes, then a checkpoint is saved (a second Ctrl-C kills)
    interrupted = []
    def on_sigint(signum, frame):
        interrupted.append(signum)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    previous_handler = signal.signal(signal.SIGINT, on_sigint)

    bar = tqdm(range(start_step, steps), initial=start_step, total=steps, disable=not is_main,
               leave=False, dynamic_ncols=True, mininterval=2.0)
    t0, history = time.time(), []
    try:
        for step in bar:
            if pruner:
                updated = pruner.update(step)
                if updated and ddp_model is not None:
                    check_masks_agree(pruner.masks)
            lr = linear_warmup_decay(step, peak_lr, warmup_steps, steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = to_device(batch_fn(step), device)
            with autocast(device, bf16):
                logits, loss = forward(**batch)
                if teacher is not None:
                    with torch.no_grad():
                        teacher_logits, _ = teacher(**batch)
                    T = distill_temperature
                    kl = F.kl_div(F.log_softmax(logits.float() / T, -1), F.log_softmax(teacher_logits.float() / T, -1),
                                  log_target=True, reduction="batchmean") * T * T
                    loss = (1 - distill_alpha) * loss + distill_alpha * kl
            if not torch.isfinite(loss):
                raise NonFiniteLoss(f"error: loss is {loss.item()} at step {step}; stopped, the last good checkpoint "
                                    f"is {ckpt_path} (try a lower --lr or more --warmup)")
            if ddp_model is not None:
                # weight each rank by its share of the labelled positions: DDP's average of the ranks'
                # gradients is then the gradient of the mean over the whole global batch
                n = (batch["labels"] != IGNORE_INDEX).sum().float()
                total = n.clone()
                dist.all_reduce(total)
                (loss * n * dist.get_world_size() / total).backward()
            else:
                loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if pruner:
                pruner.apply()
            history.append(loss.item())
            done = step + 1
            if is_main and (done % log_every == 0 or done == steps):
                ms = (time.time() - t0) * 1000 / len(history)
                line = f"step {done}/{steps} | loss {sum(history) / len(history):.3f}"
                if pruner and not pruner.frozen:
                    line += f" | sparsity {pruner.sparsity():.1%} (target {pruner.current_target:.1%})"
                bar.write(line + f" | lr {lr:.1e} | {ms:.0f} ms/step")
                t0, history = time.time(), []
            if eval_fn and eval_every and done % eval_every == 0 and done != steps and is_main:
                bar.write(f"  eval @ {done}: " + eval_fn())
            if (ckpt_every and done % ckpt_every == 0) or interrupted:
                checkpoint(done)
            if interrupted:
                if is_main:
                    bar.write(f"interrupted at step {done}" + (f"; saved {ckpt_path}, continue with --resume"
                                                                if ckpt_path else ""))
                raise SystemExit(130)
    finally:
        signal.signal(signal.SIGINT, previous_handler)
        bar.close()
    checkpoint(steps)


# ---------------------------------------------------------------------------------- script config

def parse_config(config_cls, presets, description, argv=None):
    """A script's config: the dataclass defaults, then a named preset, then command-line overrides.

    Every dataclass field becomes `--field-name`; `--help` lists them with their defaults.
    """
    defaults = config_cls()
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--preset", choices=list(presets), default="default",
                        help="named sizes: " + "; ".join(f"{k}: {v}" for k, v in presets.items() if v))
    for f in fields(config_cls):
        kind = type(getattr(defaults, f.name))
        parse = (lambda s: s.lower() in ("1", "true", "yes", "on")) if kind is bool else kind
        extra = dict(nargs="?", const=True) if kind is bool else {}  # `--resume` alone means true
        parser.add_argument("--" + f.name.replace("_", "-"), type=parse, default=None, metavar=kind.__name__.upper(),
                            help=f"default {getattr(defaults, f.name)!r}", **extra)
    args = parser.parse_args(argv)
    config = replace(defaults, **presets[args.preset])
    overrides = {f.name: getattr(args, f.name) for f in fields(config_cls) if getattr(args, f.name) is not None}
    config = replace(config, **overrides)
    return args.preset, config


def save_run_files(directory, tokenizer, config):
    """Next to ckpt.pt: the tokenizer and the resolved run config, so a directory is self-contained."""
    os.makedirs(directory, exist_ok=True)
    tokenizer.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(asdict(config), f, indent=2)
