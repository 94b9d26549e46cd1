"""Script options and start-up checks: the options the scripts share, options in, one-line errors out.

A support module: the paper can be followed without it. `RunOptions` (every script) and
`PretrainOptions` (both training scripts) are the shared fields a script's `Config` extends with
the knobs of its own step; `parse_config` turns a config dataclass (plus named presets) into
command-line options, each with the comment written beside its field as its `--help` line.
`check_options` refuses out-of-range values; `check_resume_config`, `check_run_dir` and
`check_writable` look at the run directories a script reads and writes. Each error is one line
that says what to do, so an hour of training never ends in a traceback about an argument.

    preset, cfg = parse_config(Config, PRESETS, "what the script does")
    check_options(cfg, positive=("steps", "lr"), below_one=("final_sparsity",))
"""
import argparse
import inspect
import json
import math
import os
import re
import tempfile
from dataclasses import asdict, dataclass, fields, is_dataclass, replace

import torch

from .bookkeeping import all_finite, file_sha256, load_checkpoint, lock_dir
from .data import load_tokenizer
from .model import BertConfig, BertForMaskedLM
from .pruning_lab import SCORES, n_of_m, parse_pattern


def dense_counterpart(name):
    """The dense model a sparse run directory's name pairs with: bio-sparse90 -> bio-dense; None if dense."""
    return f"{name.split('-sparse')[0]}-dense" if "-sparse" in name else None


@dataclass
class RunOptions:
    """The options of every script; a script's Config adds the knobs of its step."""
    data: str = "data"             # the prepared data sets (python data/prepare.py)
    out: str = "out"               # where the run writes
    device: str = "auto"           # auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps
    compile: bool = False          # torch.compile the model (worth it on a GPU)
    precision: str = "auto"        # auto (bf16 on CUDA and CPUs with bf16 dot products, else fp32) | bf16 | fp32
    overwrite: bool = False        # start over, replacing what an earlier run wrote in --out


@dataclass
class PretrainOptions(RunOptions):
    """The options train_general.py and train_bio.py share: MLM data, bookkeeping, resume."""
    max_docs: int = 0              # use only the first N documents of each corpus (0 = all)
    seq_len: int = 128             # tokens per MLM block
    batch_size: int = 32           # blocks per step
    mlm_prob: float = 0.4          # fraction of tokens masked; NOTE(deviation): BERT 3.1 masks 15%, 40% learns faster
                                   # (Wettig et al. 2022)
    warmup: float = 0.06           # fraction of a phase's steps spent warming up the learning rate
    weight_decay: float = 0.01     # AdamW's, on matrices only (BERT)
    eval_batches: int = 20         # held-out batches per evaluation
    eval_every: int = 650          # steps between held-out evaluations (0 = at the end only)
    log_every: int = 50            # steps between log lines
    ckpt_every: int = 250          # steps between checkpoints (0 = at the end only)
    seed: int = 0                  # the data order, the masks and the initialisation
    static_mlm: bool = False       # a fixed number of MLM predictions per batch: static shapes for --compile
    resume: bool = False           # continue the run in --out (after Ctrl-C, a crash, a NaN)


# what may change when a finished training phase is resumed (check_resume_config)
PRETRAIN_BOOKKEEPING = ("out", "eval_batches", "eval_every", "log_every", "ckpt_every", "device", "compile",
                        "static_mlm", "precision", "resume", "overwrite")


def check_pretrain_options(cfg):
    """The ranges of PretrainOptions' fields (check_options); a script checks its own fields too."""
    check_options(cfg, positive=("seq_len", "batch_size", "eval_batches", "log_every", "mlm_prob"),
                  non_negative=("max_docs", "weight_decay", "eval_every", "ckpt_every"), fraction=("warmup",),
                  below_one=("mlm_prob",), at_least=(("seq_len", 3),))


FIELD = re.compile(r"^(\s+)(\w+): [^=]+=[^#]*?(?:#\s*(.*))?$")  # `    name: type = default  # comment`


def field_help(config_cls):
    """{field: its --help line}: the comment beside the field in the dataclass's source (with the
    comment lines under it), the most derived class's where a subclass declares a field again."""
    helps = {}
    for klass in reversed(config_cls.__mro__):
        if not is_dataclass(klass):
            continue
        try:
            lines = inspect.getsource(klass).splitlines()
        except (OSError, TypeError):  # no source (typed into an interpreter): no help lines
            continue
        name = indent = None
        for line in lines:
            match = FIELD.match(line)
            if match:
                indent, name, comment = len(match.group(1)), match.group(2), match.group(3)
                if comment or name not in helps:
                    helps[name] = comment or ""
            elif name and line.strip().startswith("#") and len(line) - len(line.lstrip()) > indent:
                helps[name] += " " + line.strip()[1:].strip()  # a comment continued under its field
            else:
                name = None
    return helps


def parse_bool(text):
    """A boolean option: true/false, yes/no, on/off, 1/0. Anything else is refused: a typo such as
    `--resume ture` must not quietly mean false (and restart over the run it meant to continue)."""
    value = text.lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not a boolean: use true/false, yes/no, on/off or 1/0")


def parse_config(config_cls, presets, description, argv=None):
    """A script's config: the dataclass defaults, then a named preset, then command-line overrides.

    Every dataclass field becomes `--field-name`; `--help` gives each its comment and its default.
    """
    defaults, helps = config_cls(), field_help(config_cls)
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--preset", choices=list(presets), default="default",
                        help="named sizes: " + "; ".join(f"{k}: {v}" for k, v in presets.items() if v))
    own = config_cls.__dict__.get("__annotations__", {})  # the script's own knobs first, then the shared ones
    for f in sorted(fields(config_cls), key=lambda f: f.name not in own):
        default = getattr(defaults, f.name)
        kind = type(default)
        extra = dict(nargs="?", const=True) if kind is bool else {}  # `--resume` alone means true
        help_line = (helps.get(f.name, "") + (" (true/false)" if kind is bool else "")).strip()
        parser.add_argument("--" + f.name.replace("_", "-"), type=parse_bool if kind is bool else kind, default=None,
                            metavar=kind.__name__.upper(), help=f"{help_line}; default {default!r}".replace("%", "%%"),
                            **extra)
    args = parser.parse_args(argv)
    config = replace(defaults, **presets[args.preset])
    overrides = {f.name: getattr(args, f.name) for f in fields(config_cls) if getattr(args, f.name) is not None}
    config = replace(config, **overrides)
    return args.preset, config


def check_options(config, positive=(), non_negative=(), fraction=(), below_one=(), at_least=()):
    """One-line errors for options out of range, checked at start-up, before any work is done.

    positive: > 0 (sizes, steps, learning rates); non_negative: >= 0; fraction: in [0, 1];
    below_one: in [0, 1) (sparsities, dropout: 1 would remove everything); at_least: (name, minimum)
    pairs (a sequence needs room for [CLS], one word piece and [SEP]).
    """
    rules = [(positive, lambda v: 0 < v < math.inf, "> 0"), (non_negative, lambda v: 0 <= v < math.inf, ">= 0"),
             (fraction, lambda v: 0 <= v <= 1, "in [0, 1]"), (below_one, lambda v: 0 <= v < 1, "in [0, 1)")]
    for names, ok, what in rules:
        for name in names:
            value = getattr(config, name)
            if not ok(value):  # written as `not ok`, so that NaN is refused too
                finite = "a finite number " if math.isinf(value) else ""
                raise SystemExit(f"error: --{name.replace('_', '-')} {value}: must be {finite}{what}")
    for name, minimum in at_least:
        if not getattr(config, name) >= minimum:
            raise SystemExit(f"error: --{name.replace('_', '-')} {getattr(config, name)}: must be >= {minimum}")


def save_run_files(directory, tokenizer, config):
    """Next to ckpt.pt: the tokenizer and the resolved run config, so a directory is self-contained."""
    os.makedirs(directory, exist_ok=True)
    tokenizer.save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(asdict(config), f, indent=2)


def check_resume_config(path, config, ignore, steps_field):
    """Compare the settings stored in checkpoint `path` with `config` before resuming it.

    Bookkeeping (`ignore`) may change freely. A finished phase must not change at all: the models
    built on it (the next phase, the biomedical runs) would be stale, and the checkpoint's config
    would describe a model it does not hold; that is refused. An unfinished phase may go on with
    new settings (a lower --lr after a NaN, say): the changes are printed, and saved from then on.
    """
    ckpt = load_checkpoint(path)
    stored = {**asdict(type(config)()), **ckpt.get("run_config", {})}  # an option added since: its default
    changed = {k: (stored.get(k), v) for k, v in asdict(config).items() if k not in ignore and stored.get(k) != v}
    if not changed:
        return
    what = ", ".join(f"--{k.replace('_', '-')} {a} -> {b}" for k, (a, b) in changed.items())
    if ckpt["step"] >= stored.get(steps_field, 0):
        raise SystemExit(f"error: {path} is finished, with other settings ({what}); resume with the stored "
                         f"settings, or start over with --overwrite")
    check_resumed_schedule(path, ckpt, config, steps_field)
    print(f"note: resuming {path} at step {ckpt['step']} with changed settings: {what}")


def check_resumed_schedule(path, ckpt, config, steps_field):
    """An unfinished phase resumed with new settings must still be able to reach its end: not fewer
    steps than it has run, and (pruning) a schedule that still has a mask update to come if the
    masks are short of the final sparsity. Refused before anything is written."""
    steps, step = getattr(config, steps_field), ckpt["step"]
    option = "--" + steps_field.replace("_", "-")
    if steps < step:
        raise SystemExit(f"error: {path} has run {step} steps; {option} {steps} would end the phase before that: "
                         f"resume with {option} {step} or more, or start over with --overwrite")
    pruner = ckpt.get("pruner")
    if pruner and not pruner["frozen"] and steps_field == "prune_steps":
        masks = pruner["masks"].values()
        sparsity = 1 - sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks)
        end = int(config.prune_end * config.prune_steps)
        if step > end and sparsity < config.final_sparsity - 1e-3:
            raise SystemExit(f"error: {path} is at step {step} with {sparsity:.1%} sparsity; with --prune-end "
                             f"{config.prune_end} of --prune-steps {steps} the last mask update would be step {end}, "
                             f"so it would end below --final-sparsity {config.final_sparsity}: resume with a later "
                             f"--prune-end or more --prune-steps")


def claim_run_dir(config, out_dir, checkpoints, script):
    """Decide, before any work, what happens to an earlier run in --out: continued (--resume, with
    the settings that made each saved checkpoint unchanged), replaced (--overwrite, the caller
    removes its files), or refused. `checkpoints` is [(path, options that may change, steps option)].
    A second process writing into the same --out at once is refused (`lock_dir`; under torchrun
    rank 0 holds the lock for all). Returns the checkpoints that exist."""
    existing = [path for path, *_ in checkpoints if os.path.exists(path)]
    if config.resume and config.overwrite:
        raise SystemExit("error: --resume continues the run in --out, --overwrite replaces it: choose one")
    check_writable(out_dir)
    if int(os.environ.get("RANK", "0")) == 0:
        lock_dir(out_dir, script)
    if existing and not (config.resume or config.overwrite):
        raise SystemExit(f"error: {existing[0]} exists (an earlier run); continue it with --resume, or start over "
                         f"with --overwrite (or choose another --out)")
    if config.resume:
        for path, ignore, steps_field in checkpoints:
            if os.path.exists(path):
                check_resume_config(path, config, ignore, steps_field)
    return existing


def check_run_dir(directory, option, written_by):
    """A directory written by a training script (ckpt.pt and tokenizer.json), or a one-line error."""
    if os.path.isfile(directory):
        raise SystemExit(f"error: {option} {directory} is a file; give the directory that holds it "
                         f"({os.path.dirname(directory) or '.'}), written by {written_by}")
    for name in ("ckpt.pt", "tokenizer.json"):
        if not os.path.exists(os.path.join(directory, name)):
            raise SystemExit(f"error: {option} {directory}: no {name} there; such a directory is written by "
                             f"{written_by} (run it first, or check the path)")


STEPS_OF_PHASE = {"dense": "dense_steps", "sparse": "prune_steps", "bio": "steps"}  # checkpoint phase -> option


def load_run(directory, option, written_by="train_general.py or train_bio.py"):
    """(checkpoint, tokenizer) of a finished training run, for --init and --models; one-line errors for
    an unfinished run, a checkpoint without its model config, and a tokenizer that is not the one
    the checkpoint was trained with."""
    check_run_dir(directory, option, written_by)
    path = os.path.join(directory, "ckpt.pt")
    ckpt = load_checkpoint(path, written_by)
    if "model_config" not in ckpt:
        raise SystemExit(f"error: {path} holds no model_config: not a checkpoint of {written_by}")
    check_weights(path, ckpt, written_by)
    steps = ckpt.get("run_config", {}).get(STEPS_OF_PHASE.get(ckpt.get("phase")), 0)
    if not ckpt.get("finished", ckpt["step"] >= steps):  # older checkpoints: step against the run's steps
        raise SystemExit(f"error: {option} {directory} is an unfinished run (step {ckpt['step']} of {steps}): "
                         f"finish it with --resume (the same command that started it), or train it again")
    tokenizer_path = os.path.join(directory, "tokenizer.json")
    if ckpt.get("tokenizer_sha256", file_sha256(tokenizer_path)) != file_sha256(tokenizer_path):
        raise SystemExit(f"error: {tokenizer_path} is not the tokenizer {path} was trained with (sha256 differs); "
                         f"copy that run's tokenizer.json back, or train again")
    tokenizer = load_tokenizer(tokenizer_path)
    if tokenizer.get_vocab_size() != ckpt["model_config"]["vocab_size"]:
        raise SystemExit(f"error: {tokenizer_path} has {tokenizer.get_vocab_size()} pieces, the model in {path} "
                         f"{ckpt['model_config']['vocab_size']}: not the tokenizer it was trained with")
    return ckpt, tokenizer


def check_writable(directory):
    """Fail now, not after an hour of training, if results cannot be written to `directory`."""
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory):
            pass
    except OSError as e:
        raise SystemExit(f"error: cannot write to {directory}: {e.strerror or e} (choose another --out)") from None


def check_model_and_pruning(cfg):
    """train_general.py's model and pruning options that check_options cannot range-check."""
    if cfg.hidden % cfg.n_head:
        raise SystemExit(f"error: --hidden {cfg.hidden} is not divisible by --n-head {cfg.n_head} (each head gets "
                         f"hidden / n_head dimensions)")
    if cfg.prune_score not in SCORES:
        raise SystemExit(f"error: --prune-score {cfg.prune_score!r}: use {', '.join(SCORES)}")
    pattern = parse_pattern(cfg.prune_pattern)  # unstructured, neurons, RxC or N:M
    if "x" in pattern:  # every prunable weight is hidden x hidden, intermediate x hidden or hidden x intermediate
        rows, cols = map(int, pattern.split("x"))
        if any(size % r for size in (cfg.hidden, cfg.intermediate) for r in (rows, cols)):
            raise SystemExit(f"error: --prune-pattern {pattern}: the prunable weights ({cfg.hidden} and "
                             f"{cfg.intermediate} wide) are not made of {pattern} blocks; choose block sides that "
                             f"divide both")
    if n_of_m(pattern):  # N:M: groups of M along each weight's input, exactly 1 - N/M of them zero
        n, m = n_of_m(pattern)
        if cfg.hidden % m or cfg.intermediate % m:
            raise SystemExit(f"error: --prune-pattern {pattern}: the weights' inputs ({cfg.hidden} and "
                             f"{cfg.intermediate} wide) do not split into groups of {m}")
        if abs(cfg.final_sparsity - (1 - n / m)) > 1e-9:
            raise SystemExit(f"error: --prune-pattern {pattern} keeps {n} of every {m} weights: give "
                             f"--final-sparsity {1 - n / m:g}")
    if cfg.prune_begin > cfg.prune_end:
        raise SystemExit(f"error: --prune-begin {cfg.prune_begin} must not be after --prune-end {cfg.prune_end} "
                         f"(equal: one-shot, every weight goes at that step)")


def remove_run_files(directories):
    """--overwrite: the files a training run wrote in each directory (checkpoint, record, config, tokenizer)."""
    for run_dir in directories:
        for name in ("ckpt.pt", "record.jsonl", "config.json", "tokenizer.json"):
            if os.path.exists(os.path.join(run_dir, name)):
                os.remove(os.path.join(run_dir, name))


def load_run_tokenizer(path, vocab_size, resuming, dense_dir):
    """train_general.py's tokenizer, with one-line errors for a resumed run without its own tokenizer
    and a vocabulary of another size than --vocab-size asks for."""
    if resuming and not os.path.exists(path):
        raise SystemExit(f"error: --resume needs {path}, the run's tokenizer; copy it back (each finished model "
                         f"directory holds a copy, e.g. {dense_dir}/tokenizer.json)")
    tokenizer = load_tokenizer(path)
    if tokenizer.get_vocab_size() != vocab_size:
        raise SystemExit(f"error: {path} has {tokenizer.get_vocab_size()} pieces, --vocab-size asks for "
                         f"{vocab_size}: " + ("not this run's tokenizer (copy the run's own back)" if resuming else
                                              "the corpus gives no more pieces than that, or needs more (its "
                                              "characters and the special tokens); choose another --vocab-size"))
    return tokenizer


def check_weights(path, ckpt, written_by):
    """One-line errors for a checkpoint whose weights do not fit its model config (a key removed,
    the config edited) or hold NaN or infinity: checked on the meta device, so no memory and no
    random numbers are spent."""
    try:
        with torch.device("meta"):
            expected = BertForMaskedLM(BertConfig(**ckpt["model_config"])).state_dict()
    except (TypeError, ValueError, AssertionError) as e:
        raise SystemExit(f"error: {path}: its model_config does not describe a model ({e}); it was edited or "
                         f"damaged: train it again with {written_by}") from None
    weights = ckpt["model"]
    wrong = sorted(set(expected) ^ set(weights)) + [k for k in expected if k in weights and
                                                   tuple(weights[k].shape) != tuple(expected[k].shape)]
    if wrong:
        raise SystemExit(f"error: {path}: its weights do not fit its model_config ({wrong[0]}, {len(wrong)} in all); "
                         f"it was edited or damaged: train it again with {written_by}")
    if not all_finite(list(weights.values())):
        raise SystemExit(f"error: {path} holds NaN or infinite weights: not a model to build on; train it again "
                         f"with {written_by} (a lower --lr or more --warmup)")
