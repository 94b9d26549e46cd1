"""The plain training loop shared by the three scripts, with checkpoints, MLM evaluation and devices.

One function, `train`, runs AdamW with linear warm-up and decay (BERT A.2), gradient clipping,
bf16 autocast where it is fast (CUDA, CPUs with bf16 dot products), and the two pruning calls at visible places:

    pruner.update(step)   before the forward pass (recomputes masks when the schedule says so)
    pruner.apply()        right after optimizer.step() (keeps pruned weights at exactly zero)

Checkpoints are plain dicts written atomically (temporary file, then rename) and read with
`weights_only=True`; they hold everything `resume` needs to continue bit-for-bit: model,
optimizer, masks, step, RNG state, configs (`resume` loads them). Batches are a pure function of
the step, so the data position is the step. Ctrl-C saves a checkpoint and exits; a non-finite loss stops the run
and leaves the last good checkpoint in place.
"""
import errno
import json
import math
import os
import signal
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from .data import NUM_SPECIAL, Blocks, corpus_files, mask_tokens, tokenize_corpus
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
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


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


# ---------------------------------------------------------------------------------- schedule, optimizer

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


# ---------------------------------------------------------------------------------- MLM batches and eval

EVAL_MLM_PROB = 0.15  # held-out MLM is always measured with BERT's masking rate


def mlm_batch(blocks, step, mlm_prob, vocab_size, seed, rank=0, world=1, max_predictions=0):
    """The masked batch of a step; the masking RNG is seeded by (seed, step), so resume needs no state.

    Under torchrun every rank draws the same global batch and masks (cheap), then keeps its own
    interleaved rows: together the ranks see exactly the batch a single process would.
    With `max_predictions` N > 0 the batch also holds `predict`: the flat positions of its masked
    tokens, padded to exactly N with position 0 ([CLS], never a target), so the MLM head has the
    same shape at every step (`static_predictions` sizes N so that a batch almost never has more).
    """
    x, attention_mask = blocks.batch(step)
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    x, labels = mask_tokens(x, attention_mask, mlm_prob, vocab_size, g)
    assert len(x) % world == 0, f"batch size {len(x)} is not divisible by {world} processes"
    batch = {"input_ids": x[rank::world], "attention_mask": attention_mask[rank::world], "labels": labels[rank::world]}
    if max_predictions:
        targets = (batch["labels"] != IGNORE_INDEX).flatten().nonzero().squeeze(1)[:max_predictions]
        batch["predict"] = torch.cat([targets, torch.zeros(max_predictions - len(targets), dtype=torch.long)])
    return batch


def static_predictions(batch_size, seq_len, mlm_prob):
    """A fixed number of MLM predictions per batch: the mean number of masked tokens + 6 standard
    deviations (binomial), so that a batch has more (and loses the excess) about once in 10^9."""
    n = batch_size * seq_len
    return math.ceil(n * mlm_prob + 6 * math.sqrt(n * mlm_prob * (1 - mlm_prob)))


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


def mlm_corpora(data_dir, tokenizer, seq_len, batch_size, max_docs=0, rank=0, world=1):
    """{domain: (training tokens, held-out Blocks, unigram log p)} for "general" and "bio": each
    corpus tokenized once into data_dir/cache (rank 0 builds the caches, the other ranks then read
    them), and the unigram model of its training text, the context-blind floor."""
    if rank != 0:
        barrier(world)
    corpora = {}
    for domain in ("general", "bio"):
        tokens, held_out = tokenize_corpus(domain, corpus_files(data_dir, domain), tokenizer,
                                           os.path.join(data_dir, "cache"), max_docs or None)
        corpora[domain] = (tokens, Blocks(held_out, seq_len, batch_size),
                           unigram_log_probs(tokens, tokenizer.get_vocab_size()))
    if rank == 0:
        barrier(world)
    return corpora


def held_out_line(model, blocks, unigram_logp, domain, n_batches, bf16=False, record_path=None, step=None):
    """`evaluate_mlm` as the line a script prints; the numbers also go to the run's record (if any)."""
    r = evaluate_mlm(model, blocks, unigram_logp, n_batches, bf16=bf16)
    append_record(record_path, step=step, domain=domain, eval_loss=r["loss"], eval_acc=r["acc"], unigram=r["unigram"])
    return f"{domain} MLM loss {r['loss']:.3f} (unigram {r['unigram']:.3f}) acc {r['acc']:.1%}"


# ---------------------------------------------------------------------------------- checkpoints

def save_checkpoint(path, **state):
    """torch.save to a temporary file, then rename: a crash never leaves a half-written checkpoint.

    A failed write (a full disk, say) removes the temporary file and stops with a one-line error;
    the previous checkpoint, if any, stays as it was.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:  # a file object, so a full disk is an OSError (ENOSPC)
            torch.save(state, f)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        # torch's zip writer meets a full disk as an OSError, then raises a RuntimeError while closing
        error = e if isinstance(e, OSError) else e.__context__
        if not isinstance(error, OSError):
            raise
        if os.path.exists(tmp):
            os.remove(tmp)
        kept = f"; the previous {path} is kept" if os.path.exists(path) else ""
        reason = "the disk is full" if error.errno == errno.ENOSPC else (error.strerror or str(error))
        raise SystemExit(f"error: could not write {path}: {reason}{kept}") from None


def load_checkpoint(path, written_by="train_general.py or train_bio.py"):
    """The dict of a checkpoint file; a missing or damaged file is a one-line error naming its writer."""
    if not os.path.exists(path):
        raise SystemExit(f"error: no checkpoint at {path} (run the previous script first, or check the path)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, random bytes, an empty file: torch raises several kinds
        raise SystemExit(f"error: {path} is damaged or not a checkpoint ({type(e).__name__}); "
                         f"it is written by {written_by}: run that again") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise SystemExit(f"error: {path} is not a checkpoint of this project (it holds no model); "
                         f"it is written by {written_by}")
    return ckpt


def all_finite(tensors):
    """True when every floating-point tensor in the list is free of NaN and infinity (one sync)."""
    floats = [t for t in tensors if torch.is_tensor(t) and t.is_floating_point()]
    return not floats or bool(torch.stack([torch.isfinite(t).all() for t in floats]).all())


def resume(path, model, optimizer, pruner=None, written_by="train_general.py or train_bio.py", tokenizer_sha256=None):
    """Load a checkpoint written by `train` into model, optimizer, pruner and the RNGs; return its step.

    A checkpoint of another model config, or trained with another tokenizer than the one whose
    sha256 is given, is refused with a one-line error.
    """
    ckpt = load_checkpoint(path, written_by)
    if tokenizer_sha256 and ckpt.get("tokenizer_sha256", tokenizer_sha256) != tokenizer_sha256:
        raise SystemExit(f"error: {path} was trained with another tokenizer than the one beside it (sha256 differs); "
                         f"put that run's tokenizer.json back, or start over with --overwrite")
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


# ---------------------------------------------------------------------------------- run records

def append_record(path, **fields):
    """Add one JSON object as a line to a run's record (`record.jsonl`, what the figures are drawn from)."""
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps(fields) + "\n")


def read_record(path):
    """The objects of a record.jsonl; a malformed line is reported with its file and line, and skipped."""
    entries = []
    with open(path, errors="replace") as f:  # a binary or cut-off file: its lines are reported, not a traceback
        for n, line in enumerate(f, 1):
            try:
                entry = json.loads(line)
                assert isinstance(entry, dict) and isinstance(entry.get("step"), int)
            except (json.JSONDecodeError, AssertionError):
                print(f"warning: {path}:{n}: not a record line (truncated or edited?), skipped")
                continue
            entries.append(entry)
    return entries


def trim_record(path, step):
    """On resume at `step`: drop what was recorded after it (that part of the run is being redone)."""
    if path and os.path.exists(path):
        with open(path) as f:
            lines = f.readlines()
        def before(line):  # malformed lines stay: read_record reports them
            try:
                return json.loads(line).get("step", 0) <= step
            except (json.JSONDecodeError, AttributeError):
                return True
        kept = [line for line in lines if before(line)]
        with open(path, "w") as f:
            f.writelines(kept)


# ---------------------------------------------------------------------------------- the loop

def distillation_loss(logits, teacher_logits, labels, kind, temperature):
    """Soft-target loss of Hinton et al. 2015 at temperature T, scaled by T^2 (so its gradient keeps
    the size of the hard loss's): zero when the student's logits equal the teacher's, positive otherwise.

    kind "mlm": rows are the masked positions (the MLM head returns only those); "cls": one
    softmax per example; both KL(teacher || student). "ner": (B, T, K) logits, only at positions
    with a label (first word pieces; padding and later pieces carry IGNORE_INDEX). "multi": one
    sigmoid per label, the KL between the teacher's and the student's Bernoulli distributions,
    averaged over labels and examples (BCE to the teacher's probabilities minus their entropy).
    """
    student, teacher = logits.float() / temperature, teacher_logits.float() / temperature
    if kind == "ner":
        labelled = labels != IGNORE_INDEX  # (B, T)
        student, teacher = student[labelled], teacher[labelled]  # (N, K)
    if kind == "multi":
        p = torch.sigmoid(teacher)
        kl = (F.binary_cross_entropy_with_logits(student, p) - F.binary_cross_entropy_with_logits(teacher, p))
    else:
        kl = F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1), log_target=True, reduction="batchmean")
    return kl * temperature ** 2


def backward(loss, labels, distributed=False, mean_labelled=None):
    """loss.backward(), with the batch's mean loss weighted by its share of labelled positions so
    each position weighs the same: across ranks (DDP's average of the ranks' gradients is then the
    gradient of the mean over the global batch) and, with `mean_labelled`, across steps as well."""
    if not (distributed or mean_labelled):
        return loss.backward()
    n = (labels != IGNORE_INDEX).sum().float()
    world = dist.get_world_size() if distributed else 1
    if mean_labelled:
        per_batch = torch.tensor(float(mean_labelled), device=n.device)
    else:
        per_batch = n.clone()
        dist.all_reduce(per_batch)
    (loss * n * world / per_batch).backward()


class NonFiniteLoss(SystemExit):
    """Raised when the loss or the gradient norm is NaN or infinite: the script stops with this one-line message."""


@dataclass
class Checkpoints:
    """Where `train` saves (None: nowhere), how often, from which step it resumes, and what else
    each checkpoint holds (configs, tokenizer path, ...)."""
    path: Optional[str] = None
    every: int = 500
    start_step: int = 0
    extra_state: dict = field(default_factory=dict)


@dataclass
class Reporting:
    """A log line every `log_every` steps, `eval_fn(step)` (returns a line) every `eval_every`, and
    every log line and mask update appended to the JSON-lines `record_path` (if given)."""
    log_every: int = 50
    eval_fn: Optional[Callable] = None
    eval_every: int = 0
    record_path: Optional[str] = None


@dataclass
class Distillation:
    """Train on (1 - hardness) x the hard loss + hardness x `distillation_loss` of kind `kind` against
    a frozen `teacher` with the same outputs (Hinton et al. 2015; Sanh et al. 2019; hardness is
    SparseML's name: 1.0 trains on the soft targets alone)."""
    teacher: torch.nn.Module
    hardness: float = 0.5
    temperature: float = 2.0
    kind: str = "mlm"


@dataclass
class Runtime:
    """How the steps run. `ddp_model` is the DistributedDataParallel wrapper under torchrun (only
    `is_main` prints and saves). `compile` runs forward and backward through torch.compile: with
    dynamic shapes, or with `static_shapes` (batches from `mlm_batch(max_predictions=N)`) one
    fixed graph, replayed as a CUDA graph on a GPU (mode "reduce-overhead")."""
    device: Optional[torch.device] = None
    ddp_model: Optional[torch.nn.Module] = None
    is_main: bool = True
    compile: bool = False
    static_shapes: bool = False
    bf16: bool = False


def train(model, optimizer, batch_fn, steps, *, peak_lr, warmup_steps, pruner=None, clip_norm=1.0,
          mean_labelled=None, distill=None, ckpt=Checkpoints(), report=Reporting(), runtime=Runtime()):
    """Run steps [ckpt.start_step, steps) of AdamW on `batch_fn(step)` batches, with the pruner's
    two calls; the other options come in the groups above (Checkpoints, Reporting, Distillation,
    Runtime), so the body reads as the algorithm first.

    `mean_labelled` (the mean number of labelled positions per batch) weights each batch's mean loss
    by its labelled positions / that mean: in length-grouped batches (`tasks.length_grouped_batches`)
    a batch of short sentences holds few labelled words, and unweighted it would count as much as a
    batch of long ones (measured: 2 F1 points lost on BC5CDR-chem, docs/ladder.md row K); the logged
    loss stays the plain mean. A resumed run first drops what its record holds after its step.

    The loss is summed on the device and read only when a line is logged, a checkpoint saved or an
    evaluation run, so a GPU is never made to wait for the CPU each step. A non-finite loss or
    gradient norm is recorded on the device too (`first_bad`) and stops the run at the next of
    those points, before anything is saved: no checkpoint ever holds a non-finite tensor.
    """
    device = runtime.device or next(model.parameters()).device
    ddp_model, is_main = runtime.ddp_model, runtime.is_main
    ckpt_path, start_step, record_path = ckpt.path, ckpt.start_step, report.record_path
    teacher = distill.teacher if distill else None
    forward = ddp_model or model
    if runtime.compile:
        mode = "reduce-overhead" if runtime.static_shapes and device.type == "cuda" else None
        forward = torch.compile(forward, dynamic=not runtime.static_shapes, mode=mode)
    model.train()
    if is_main and start_step > 0:
        trim_record(record_path, start_step)
    # a checkpoint on disk is "good" once this run wrote it, or when the run resumed from it
    last_good = ckpt_path if ckpt_path and start_step > 0 and os.path.exists(ckpt_path) else None

    def stop(what, step):
        where = (f"the last good checkpoint is {last_good}: --resume with a lower --lr or more --warmup continues "
                 f"from it (if it fails again at once, that checkpoint has diverged too: start over with "
                 f"--overwrite, and a smaller --ckpt-every keeps earlier ones)" if last_good
                 else "no checkpoint was written; start over with a lower --lr or more --warmup" if ckpt_path
                 else "nothing was saved; try a lower --lr or more --warmup")
        raise NonFiniteLoss(f"error: {what} at step {step}; stopped, {where}")

    def check_finite():  # one host sync: the first step with a non-finite loss or gradient norm, if any
        bad_step = int(first_bad)
        if bad_step >= 0:
            stop("loss or gradient norm is not finite", bad_step)

    def checkpoint(step):  # `step` = the number of completed steps; ckpt_path None = no checkpoints
        nonlocal last_good
        if is_main and ckpt_path:
            state = dict(model=model.state_dict(), optimizer=optimizer.state_dict(), finished=step >= steps,
                         pruner=pruner.state_dict() if pruner else None, step=step, rng=torch.get_rng_state(),
                         cuda_rng=torch.cuda.get_rng_state() if device.type == "cuda" else None, **ckpt.extra_state)
            moments = [t for s in state["optimizer"]["state"].values() for t in s.values()]
            if not all_finite(list(state["model"].values()) + moments):
                stop("weights or optimizer state are not finite", step)
            save_checkpoint(ckpt_path, **state)
            last_good = ckpt_path

    # Ctrl-C (or SIGTERM, a batch scheduler's stop) sets a flag; the step in flight completes, then a
    # checkpoint is saved (a second Ctrl-C kills)
    interrupted = []
    def on_stop(signum, frame):
        interrupted.append(signum)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    previous_handlers = {s: signal.signal(s, on_stop) for s in (signal.SIGINT, signal.SIGTERM)}

    bar = tqdm(range(start_step, steps), initial=start_step, total=steps, disable=not is_main,
               leave=False, dynamic_ncols=True, mininterval=2.0)
    loss_sum = torch.zeros((), device=device)          # sum of the losses since the last log line
    first_bad = torch.full((), -1, device=device)      # first step with a non-finite loss or gradient norm
    t0, n_summed = time.time(), 0
    try:
        for step in bar:  # pruner.update, forward, backward, optimizer.step, pruner.apply; then bookkeeping
            if pruner:
                updated = pruner.update(step)
                if updated and ddp_model is not None:
                    check_masks_agree(pruner.masks)
                if updated and is_main:
                    append_record(record_path, step=step, mask_update=True, target_sparsity=pruner.current_target)
            lr = linear_warmup_decay(step, peak_lr, warmup_steps, steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = to_device(batch_fn(step), device)
            with autocast(device, runtime.bf16):
                logits, loss = forward(**batch)
                if teacher is not None:
                    with torch.no_grad():
                        teacher_logits, _ = teacher(**batch)
                    soft = distillation_loss(logits, teacher_logits, batch["labels"], distill.kind, distill.temperature)
                    loss = (1 - distill.hardness) * loss + distill.hardness * soft
            backward(loss, batch["labels"], ddp_model is not None, mean_labelled)
            if pruner:
                pruner.accumulate()  # movement scores read the gradients here (a no-op for the others)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if pruner:
                pruner.apply()
            loss = loss.detach().float()
            loss_sum += loss
            first_bad = torch.where((first_bad < 0) & ~(torch.isfinite(loss) & torch.isfinite(grad_norm)),
                                    step, first_bad)
            n_summed += 1
            done = step + 1
            log_now = done % report.log_every == 0 or done == steps
            eval_now = report.eval_fn and report.eval_every and done % report.eval_every == 0 and done != steps
            ckpt_now = (ckpt.every and done % ckpt.every == 0) or interrupted
            if log_now or eval_now or ckpt_now:
                check_finite()
            if is_main and log_now:
                entry = dict(step=done, loss=loss_sum.item() / n_summed, lr=lr,
                             ms_per_step=(time.time() - t0) * 1000 / n_summed)
                line = f"step {done}/{steps} | loss {entry['loss']:.3f}"
                if pruner and not pruner.frozen:
                    entry.update(sparsity=pruner.sparsity(), target_sparsity=pruner.current_target)
                    line += f" | sparsity {entry['sparsity']:.1%} (target {entry['target_sparsity']:.1%})"
                bar.write(line + f" | lr {lr:.1e} | {entry['ms_per_step']:.0f} ms/step")
                append_record(record_path, **entry)
                t0, n_summed = time.time(), 0
                loss_sum.zero_()
            if eval_now and is_main:
                bar.write(f"  eval @ {done}: " + report.eval_fn(done))
            if ckpt_now:
                checkpoint(done)
            if interrupted:
                if is_main:
                    bar.write(f"interrupted at step {done}" + (f"; saved {ckpt_path}, continue with --resume"
                                                                if ckpt_path else ""))
                raise SystemExit(130)
    finally:
        for s, handler in previous_handlers.items():
            signal.signal(s, handler)
        bar.close()
    check_finite()
    checkpoint(steps)
