"""Everything `train` does besides the algorithm: checkpoints, resume, records, Ctrl-C, NaN checks, log lines.

A support module: the paper can be followed without it. The loop in `train.py` talks to one
`Bookkeeper` through three calls:

    with Bookkeeper(model, optimizer, steps, pruner, ckpt, report, runtime) as book:
        for step in book.steps():           # resumes at ckpt.start_step; Ctrl-C ends after a saved step
            ...                             # the algorithm
            book.step_done(step, loss, grad_norm, lr)   # log, evaluate, save, stop
    book.save_final()

Checkpoints are plain dicts written atomically (temporary file, then rename) and read with
`weights_only=True`; they hold everything `resume` needs to continue bit-for-bit: model,
optimizer, masks, step, RNG state, configs. Batches are a pure function of the step, so the data
position is the step. Ctrl-C (or SIGTERM) saves a checkpoint and exits; a non-finite loss stops
the run and leaves the last good checkpoint in place: no checkpoint ever holds a non-finite tensor.
"""
import atexit
import errno
import hashlib
import json
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch
from tqdm import tqdm

from .runtime import check_masks_agree


# ---------------------------------------------------------------------------------- checkpoints

def file_sha256(path):
    """sha256 of a file, read in 1 MiB chunks (data/prepare.py keeps its own copy: it runs on the
    standard library alone, before the package's dependencies are installed)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, but another user's
        return True
    return True


def lock_dir(directory, script):
    """Refuse a second process writing into `directory` at once (a one-line error naming the first):
    a `.lock` file holds the writer's pid while it runs, and is removed at exit; one left behind by
    a process that is gone (killed, crashed) is taken over. Returns the function that releases it."""
    os.makedirs(directory, exist_ok=True)
    lock = os.path.join(directory, ".lock")
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            pid = "" if os.path.islink(lock) else open(lock, errors="replace").read().strip()
            if pid.isdigit() and process_alive(int(pid)):
                raise SystemExit(f"error: another process (pid {pid}) is writing to {directory}; wait for it to end, "
                                 f"or give {script} another --out") from None
            os.remove(lock)  # left behind by a process that is gone (a link is removed, never followed)
    else:
        raise SystemExit(f"error: could not take {lock}; another process keeps creating it")
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    release = lambda: os.path.exists(lock) and open(lock).read().strip() == str(os.getpid()) and os.remove(lock)
    atexit.register(release)
    return release


def stop_quietly(message="stopped: what was saved is kept; the same command with --resume continues"):
    """Ctrl-C (or SIGTERM) outside the training loop, while data load or a phase ends: print
    `message` and exit 130, not a traceback. (Inside `train` the Bookkeeper saves a checkpoint
    first, then puts this handler back.)"""
    def stopped(signum, frame):
        print(message)
        raise SystemExit(130)
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, stopped)


def save_checkpoint(path, **state):
    """torch.save to a temporary file, then rename: a crash never leaves a half-written checkpoint.

    A failed write (a full disk, say) removes the temporary file and stops with a one-line error;
    the previous checkpoint, if any, stays as it was.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"  # one per process: two writers never share a temporary file
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


# ---------------------------------------------------------------------------------- what train() hands over

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


class Bookkeeper:
    """The bookkeeping of one `train` call (see the module docstring for its three calls).

    The loss is summed on the device and read only when a line is logged, a checkpoint saved or
    an evaluation run, so a GPU is never made to wait for the CPU each step. A non-finite loss or
    gradient norm is recorded on the device too (`first_bad`) and stops the run at the next of
    those points, before anything is saved. A resumed run first drops what its record holds after
    its step.
    """

    def __init__(self, model, optimizer, steps, pruner, ckpt, report, runtime):
        self.model, self.optimizer, self.steps_total, self.pruner = model, optimizer, steps, pruner
        self.ckpt, self.report, self.is_main = ckpt, report, runtime.is_main
        self.device = runtime.device or next(model.parameters()).device
        self.distributed = runtime.ddp_model is not None
        if self.is_main and ckpt.start_step > 0:
            trim_record(report.record_path, ckpt.start_step)
        # a checkpoint on disk is "good" once this run wrote it, or when the run resumed from it
        self.last_good = ckpt.path if ckpt.path and ckpt.start_step > 0 and os.path.exists(ckpt.path) else None
        self.loss_sum = torch.zeros((), device=self.device)      # sum of the losses since the last log line
        self.first_bad = torch.full((), -1, device=self.device)  # first step with a non-finite loss or grad norm
        self.interrupted = []

    def __enter__(self):
        # Ctrl-C (or SIGTERM, a batch scheduler's stop) sets a flag; the step in flight completes,
        # then a checkpoint is saved (a second Ctrl-C kills)
        def on_stop(signum, frame):
            self.interrupted.append(signum)
            signal.signal(signal.SIGINT, signal.default_int_handler)
        self.previous_handlers = {s: signal.signal(s, on_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        self.bar = tqdm(range(self.ckpt.start_step, self.steps_total), initial=self.ckpt.start_step,
                        total=self.steps_total, disable=not self.is_main, leave=False, dynamic_ncols=True,
                        mininterval=2.0)
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous_handlers.items():
            signal.signal(s, handler)
        self.bar.close()

    def steps(self):
        """The steps still to run, from the resumed step on, with a progress bar."""
        self.t0, self.n_summed = time.time(), 0
        return iter(self.bar)

    def mask_updated(self, step):
        """After a mask update: under torchrun, check the ranks agree; record it; after the last one,
        the held-out loss of the model just pruned (before any recovery)."""
        if self.distributed:
            check_masks_agree(self.pruner.masks)
        if self.is_main:
            append_record(self.report.record_path, step=step, mask_update=True,
                          target_sparsity=self.pruner.current_target)
        if self.is_main and self.report.eval_fn and self.pruner.current_target >= self.pruner.final_sparsity:
            self.bar.write(f"  eval @ {step}, the final mask just applied: " + self.report.eval_fn(step))

    def step_done(self, step, loss, grad_norm, lr):
        """After the optimizer step: sum the loss, note a non-finite one, then log, evaluate, save
        and stop on Ctrl-C when it is time."""
        loss = loss.detach().float()
        self.loss_sum += loss
        self.first_bad = torch.where((self.first_bad < 0) & ~(torch.isfinite(loss) & torch.isfinite(grad_norm)),
                                     step, self.first_bad)
        self.n_summed += 1
        done, steps, report = step + 1, self.steps_total, self.report
        log_now = done % report.log_every == 0 or done == steps
        eval_now = report.eval_fn and report.eval_every and done % report.eval_every == 0 and done != steps
        ckpt_now = (self.ckpt.every and done % self.ckpt.every == 0) or self.interrupted
        if log_now or eval_now or ckpt_now:
            self.check_finite()
        if self.is_main and log_now:
            self.log(done, lr)
        if eval_now and self.is_main:
            self.bar.write(f"  eval @ {done}: " + report.eval_fn(done))
        if ckpt_now:
            self.save(done)
        if self.interrupted:
            if self.is_main:
                self.bar.write(f"interrupted at step {done}" + (f"; saved {self.ckpt.path}, continue with --resume"
                                                                 if self.ckpt.path else ""))
            raise SystemExit(130)

    def log(self, done, lr):
        entry = dict(step=done, loss=self.loss_sum.item() / self.n_summed, lr=lr,
                     ms_per_step=(time.time() - self.t0) * 1000 / self.n_summed)
        line = f"step {done}/{self.steps_total} | loss {entry['loss']:.3f}"
        if self.pruner and not self.pruner.frozen:
            entry.update(sparsity=self.pruner.sparsity(), target_sparsity=self.pruner.current_target)
            line += f" | sparsity {entry['sparsity']:.1%} (target {entry['target_sparsity']:.1%})"
        self.bar.write(line + f" | lr {lr:.1e} | {entry['ms_per_step']:.0f} ms/step")
        append_record(self.report.record_path, **entry)
        self.t0, self.n_summed = time.time(), 0
        self.loss_sum.zero_()

    def save_final(self):
        """After the last step (outside the Ctrl-C handler): the finished checkpoint. A run whose
        pruning schedule has ended, short of its final sparsity, is saved unfinished, and stops with
        a one-line error."""
        self.check_finite()
        pruner = self.pruner
        if (pruner and not pruner.frozen and pruner.end_step < self.steps_total
                and pruner.sparsity() < pruner.final_sparsity - 1e-3):
            self.save(self.steps_total, finished=False)
            raise SystemExit(f"error: the run ended at {pruner.sparsity():.1%} sparsity, short of its final "
                             f"{pruner.final_sparsity:.1%} (its last mask update came too early); saved unfinished"
                             + (f" in {self.ckpt.path}" if self.ckpt.path else ""))
        self.save(self.steps_total)

    def stop(self, what, step):
        where = (f"the last good checkpoint is {self.last_good}: --resume with a lower --lr or more --warmup "
                 f"continues from it (if it fails again at once, that checkpoint has diverged too: start over "
                 f"with --overwrite, and a smaller --ckpt-every keeps earlier ones)" if self.last_good
                 else "no checkpoint was written; start over with a lower --lr or more --warmup" if self.ckpt.path
                 else "nothing was saved; try a lower --lr or more --warmup")
        raise NonFiniteLoss(f"error: {what} at step {step}; stopped, {where}")

    def check_finite(self):
        """One host sync: stop at the first step with a non-finite loss or gradient norm, if any."""
        bad_step = int(self.first_bad)
        if bad_step >= 0:
            self.stop("loss or gradient norm is not finite", bad_step)

    def save(self, step, finished=True):
        """The checkpoint after `step` completed steps (none without a ckpt.path, none from rank > 0);
        marked finished once it holds the last step."""
        if not (self.is_main and self.ckpt.path):
            return
        pruner, device = self.pruner, self.device
        state = dict(model=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
                     finished=finished and step >= self.steps_total, pruner=pruner.state_dict() if pruner else None,
                     step=step, rng=torch.get_rng_state(),
                     cuda_rng=torch.cuda.get_rng_state() if device.type == "cuda" else None, **self.ckpt.extra_state)
        moments = [t for s in state["optimizer"]["state"].values() for t in s.values()]
        if not all_finite(list(state["model"].values()) + moments):
            self.stop("weights or optimizer state are not finite", step)
        save_checkpoint(self.ckpt.path, **state)
        self.last_good = self.ckpt.path
