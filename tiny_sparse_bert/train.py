"""The training loop of all three scripts: AdamW, a learning-rate schedule, and the pruner's two calls.

One function, `train`, runs AdamW with linear warm-up and decay (BERT A.2) and gradient
clipping, with the two pruning calls at visible places:

    pruner.update(step)   before the forward pass (recomputes masks when the schedule says so)
    pruner.apply()        right after optimizer.step() (keeps pruned weights at exactly zero)

What else a run needs (checkpoints and resume, records, Ctrl-C, NaN checks, log lines) is one
`Bookkeeper` the loop hands each step to (bookkeeping.py); devices, DDP, bf16 and torch.compile
are behind `runtime` (runtime.py); both can be skipped on a first reading.
"""
import torch

from .bookkeeping import Bookkeeper, Checkpoints, Reporting
from .runtime import Runtime


def linear_warmup_decay(step, peak_lr, warmup_steps, total_steps):
    """BERT A.2: lr rises linearly from 0 to peak over warm-up, then falls linearly to 0 at the end."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    return peak_lr * max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def make_optimizer(model, lr, weight_decay, betas=(0.9, 0.98), eps=1e-6):
    """AdamW; weight decay on matrices only, none on 1-D parameters (biases, LayerNorms), as BERT.

    On CUDA the fused kernel: one launch for all parameters instead of several per tensor.
    """
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    fused = next(model.parameters()).is_cuda or None  # None: PyTorch's default (foreach) elsewhere
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=betas, eps=eps, fused=fused)


def train(model, optimizer, batch_fn, steps, *, peak_lr, warmup_steps, pruner=None, clip_norm=1.0,
          mean_labelled=None, distill=None, ckpt=Checkpoints(), report=Reporting(), runtime=Runtime()):
    """Run steps [ckpt.start_step, steps) of AdamW on `batch_fn(step)` batches, with the pruner's calls.

    `distill` (distillation.Distillation) mixes a frozen teacher's soft targets into the loss.
    `mean_labelled` (the mean number of labelled positions per batch) weights each batch's mean
    loss by its labelled positions / that mean: in length-grouped batches a batch of short
    sentences holds few labelled words, and unweighted it would count as much as a batch of long
    ones (measured: 2 F1 points lost on BC5CDR-chem, docs/ladder.md row K).
    """
    runtime = runtime.placed(model)  # the model's device unless runtime names one
    forward = runtime.forward(model)  # the model itself, or its DDP / torch.compile wrapper
    model.train()
    with Bookkeeper(model, optimizer, steps, pruner, ckpt, report, runtime) as book:
        for step in book.steps():
            if pruner and pruner.update(step):  # GMP: new masks when the schedule says so
                book.mask_updated(step)
            lr = linear_warmup_decay(step, peak_lr, warmup_steps, steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = runtime.to_device(batch_fn(step))
            with runtime.autocast():
                logits, loss = forward(**batch)
                if distill:
                    loss = distill.mix(loss, logits, batch)
            runtime.weighted(loss, batch["labels"], mean_labelled).backward()
            if pruner:
                pruner.accumulate()  # scores that read the gradients do it here (the paper's |w| does not)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if pruner:
                pruner.apply()  # pruned weights back to exactly zero (AdamW moved them)
            book.step_done(step, loss, grad_norm, lr)  # log, evaluate, save, stop on Ctrl-C
    book.save_final()
