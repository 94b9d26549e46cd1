"""Script configuration and start-up checks: options in, one-line errors out, before any work.

`parse_config` turns a config dataclass (plus named presets) into command-line options;
`check_options` refuses out-of-range values; `check_resume_config`, `check_run_dir` and
`check_writable` look at the run directories a script reads and writes. Each error is one line
that says what to do, so an hour of training never ends in a traceback about an argument.

    preset, cfg = parse_config(Config, PRESETS, "what the script does")
    check_options(cfg, positive=("steps", "lr"), below_one=("final_sparsity",))
"""
import argparse
import json
import os
import tempfile
from dataclasses import asdict, fields, replace

from .data import file_sha256, load_tokenizer
from .train import load_checkpoint


def dense_counterpart(name):
    """The dense model a sparse run directory's name pairs with: bio-sparse90 -> bio-dense; None if dense."""
    return f"{name.split('-sparse')[0]}-dense" if "-sparse" in name else None


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

    Every dataclass field becomes `--field-name`; `--help` lists them with their defaults.
    """
    defaults = config_cls()
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--preset", choices=list(presets), default="default",
                        help="named sizes: " + "; ".join(f"{k}: {v}" for k, v in presets.items() if v))
    for f in fields(config_cls):
        kind = type(getattr(defaults, f.name))
        extra = dict(nargs="?", const=True) if kind is bool else {}  # `--resume` alone means true
        parser.add_argument("--" + f.name.replace("_", "-"), type=parse_bool if kind is bool else kind, default=None,
                            metavar=kind.__name__.upper(), help=f"default {getattr(defaults, f.name)!r}", **extra)
    args = parser.parse_args(argv)
    config = replace(defaults, **presets[args.preset])
    overrides = {f.name: getattr(args, f.name) for f in fields(config_cls) if getattr(args, f.name) is not None}
    config = replace(config, **overrides)
    return args.preset, config


def note_gpu_preset(preset, device):
    """A GPU-sized preset started on the CPU runs, but for a very long time: say so at once."""
    if preset in ("gpu", "base") and device.type == "cpu":
        print(f"note: --preset {preset} is sized for a GPU; on the CPU it takes many times the default's time "
              f"(the default preset is the one sized for a CPU)")


def check_options(config, positive=(), non_negative=(), fraction=(), below_one=(), at_least=()):
    """One-line errors for options out of range, checked at start-up, before any work is done.

    positive: > 0 (sizes, steps, learning rates); non_negative: >= 0; fraction: in [0, 1];
    below_one: in [0, 1) (sparsities, dropout: 1 would remove everything); at_least: (name, minimum)
    pairs (a sequence needs room for [CLS], one word piece and [SEP]).
    """
    rules = [(positive, lambda v: v > 0, "> 0"), (non_negative, lambda v: v >= 0, ">= 0"),
             (fraction, lambda v: 0 <= v <= 1, "in [0, 1]"), (below_one, lambda v: 0 <= v < 1, "in [0, 1)")]
    for names, ok, what in rules:
        for name in names:
            value = getattr(config, name)
            if not ok(value):  # written as `not ok`, so that NaN is refused too
                raise SystemExit(f"error: --{name.replace('_', '-')} {value}: must be {what}")
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
    print(f"note: resuming {path} at step {ckpt['step']} with changed settings: {what}")


def claim_run_dir(config, out_dir, checkpoints):
    """Decide, before any work, what happens to an earlier run in --out: continued (--resume, with
    the settings that made each saved checkpoint unchanged), replaced (--overwrite, the caller
    removes its files), or refused. `checkpoints` is [(path, options that may change, steps option)].
    Returns the checkpoints that exist."""
    existing = [path for path, *_ in checkpoints if os.path.exists(path)]
    if config.resume and config.overwrite:
        raise SystemExit("error: --resume continues the run in --out, --overwrite replaces it: choose one")
    if existing and not (config.resume or config.overwrite):
        raise SystemExit(f"error: {existing[0]} exists (an earlier run); continue it with --resume, or start over "
                         f"with --overwrite (or choose another --out)")
    if config.resume:
        for path, ignore, steps_field in checkpoints:
            if os.path.exists(path):
                check_resume_config(path, config, ignore, steps_field)
    check_writable(out_dir)
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
