"""Figures of a run, drawn from what the scripts record in their output directory.

A support module: the paper can be followed without it (and the only one that imports matplotlib).

    python -m tiny_sparse_bert.plots out/           # writes out/figures/*.png

Each training directory holds `config.json`, `ckpt.pt` and `record.jsonl` (one JSON object per
log line, mask update and evaluation: `bookkeeping.append_record`); finetune.py writes
`results.json`; `tests/bench_sparse.py --json out/bench_sparse.json` the inference timings.
Every figure whose data exists is drawn; the others are skipped with one line saying why, so a
partial run (phase 1 only, one seed) still plots. matplotlib is imported here only: the rest of
the package needs numpy, torch, tokenizers and tqdm alone.
"""
import glob
import json
import os
import sys

import matplotlib
matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import numpy as np
import torch

from .config import dense_counterpart
from .pruning import PRUNABLE_MODULES, cubic_sparsity
from .bookkeeping import read_record

WIDTH = (7, 4)  # inches at 100 dpi: 700 px, the width of a README column
KIND_COLOURS = dict(zip(PRUNABLE_MODULES, plt.get_cmap("tab10").colors))


def load_run(directory):
    """(config dict, record entries) of a training directory; None without a config.json, and an
    empty record for a run written before records existed."""
    config, record = os.path.join(directory, "config.json"), os.path.join(directory, "record.jsonl")
    if not os.path.exists(config):
        return None
    try:
        with open(config) as f:
            return json.load(f), read_record(record) if os.path.exists(record) else []
    except (ValueError, UnicodeDecodeError) as e:
        print(f"warning: {config} is damaged ({type(e).__name__}); figures of {directory} skipped")
        return None


def last_per_key(entries, *keys):
    """The last entry for each value of `keys` (a resumed run may repeat a step): later ones win."""
    return list({tuple(e.get(k) for k in keys): e for e in entries}.values())


def schedule_data(directory):
    """The cubic schedule of a pruning run: target curve, mask updates, measured sparsity at log points."""
    config, record = load_run(directory)
    steps, begin = config["prune_steps"], int(config["prune_begin"] * config["prune_steps"])
    end = int(config["prune_end"] * config["prune_steps"])
    curve_steps = np.arange(steps + 1)
    curve = [cubic_sparsity(s, 0.0, config["final_sparsity"], begin, end) for s in curve_steps]
    updates = sorted((e["step"], e["target_sparsity"]) for e in last_per_key(record, "step") if e.get("mask_update"))
    measured = sorted((e["step"], e["sparsity"]) for e in last_per_key(
        [e for e in record if "sparsity" in e], "step"))
    return dict(config=config, begin=begin, end=end, curve_steps=curve_steps, curve=curve, updates=updates,
                measured=measured)


def plot_schedule(out, directory):
    d = schedule_data(directory)
    fig, ax = plt.subplots(figsize=WIDTH)
    ax.plot(d["curve_steps"], np.array(d["curve"]) * 100, color="grey", label="target (Zhu & Gupta eq. 1)")
    if not d["updates"]:
        ax.text(0.5, 0.2, "(this run has no record.jsonl: target only)", transform=ax.transAxes, ha="center")
    if d["updates"]:
        s, t = zip(*d["updates"])
        ax.scatter(s, np.array(t) * 100, s=14, color="C3", zorder=3, label="mask updates")
    if d["measured"]:
        s, m = zip(*d["measured"])
        ax.plot(s, np.array(m) * 100, "o", mfc="none", color="C0", label="measured at log points")
    ax.axvspan(d["end"], d["curve_steps"][-1], color="C2", alpha=0.08, label="recovery (mask fixed)")
    ax.set(xlabel="phase-2 step", ylabel="encoder weights pruned (%)",
           title=f"Cubic sparsity schedule, {os.path.basename(directory)}")
    ax.legend(loc="lower right")
    return save(fig, out, "schedule.png")


def plot_losses(out, runs):
    """MLM loss against the global step: phase 1, phase 2, then the biomedical runs from phase 2's end."""
    fig, ax = plt.subplots(figsize=WIDTH)
    floors = {}
    for name, (offset, config, record) in runs.items():
        train = sorted((e["step"], e["loss"]) for e in last_per_key([e for e in record if "loss" in e], "step"))
        if train:
            s, l = zip(*train)
            ax.plot(np.array(s) + offset, l, lw=1, label=f"{name}: training loss")
        for domain, style in (("general", "s--"), ("bio", "^--")):
            evals = sorted((e["step"], e["eval_loss"], e["unigram"]) for e in last_per_key(
                [e for e in record if e.get("domain") == domain], "step"))
            if evals:
                s, l, u = zip(*evals)
                ax.plot(np.array(s) + offset, l, style, ms=4, label=f"{name}: held-out {domain}")
                floors[domain] = u[-1]
    for (domain, floor), colour in zip(floors.items(), ("black", "brown")):
        ax.axhline(floor, ls=":", color=colour, label=f"unigram floor, {domain} ({floor:.2f})")
    ax.set(xlabel="step (phase 1, then phase 2, then PubMed)", ylabel="MLM loss (nats)",
           title="Masked-language-model loss and the context-blind floor")
    ax.legend(fontsize=6, ncol=2)
    return save(fig, out, "loss.png")


def plot_layer_sparsity(out, directories):
    fig, axes = plt.subplots(len(directories), 1, figsize=(WIDTH[0], 2.4 * len(directories) + 0.6), squeeze=False)
    for ax, directory in zip(axes[:, 0], directories):
        ckpt = torch.load(os.path.join(directory, "ckpt.pt"), map_location="cpu", weights_only=True)
        names = [n for n in ckpt["pruner"]["masks"]]
        sparsity = [100 * (ckpt["model"][n] == 0).float().mean().item() for n in names]
        kinds = [n.split(".")[-2] for n in names]
        ax.bar(range(len(names)), sparsity, color=[KIND_COLOURS[k] for k in kinds])
        ax.set_xticks(range(len(names)), [n.split(".")[-3] + "." + k for n, k in zip(names, kinds)],
                      rotation=90, fontsize=6)
        mode = "global threshold" if ckpt["run_config"].get("global_pruning") else "per tensor"
        ax.set(ylabel="zeros (%)", ylim=(0, 120), yticks=range(0, 101, 20),
               title=f"{os.path.basename(directory)} ({mode})")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in KIND_COLOURS.values()]
    axes[0, 0].legend(handles, KIND_COLOURS, fontsize=6, ncol=6, loc="upper center")
    fig.suptitle("Sparsity of every prunable tensor (layer.module)")
    return save(fig, out, "layer_sparsity.png")


def plot_magnitudes(out, dense_dir, sparse_dir):
    """|w| of the encoder's prunable weights before (dense) and after (sparse) pruning."""
    fig, ax = plt.subplots(figsize=WIDTH)
    dense = torch.load(os.path.join(dense_dir, "ckpt.pt"), map_location="cpu", weights_only=True)
    sparse = torch.load(os.path.join(sparse_dir, "ckpt.pt"), map_location="cpu", weights_only=True)
    names = list(sparse["pruner"]["masks"])
    before = torch.cat([dense["model"][n].abs().flatten() for n in names]).numpy()
    after = torch.cat([sparse["model"][n].abs().flatten() for n in names]).numpy()
    bins = np.logspace(np.log10(max(before[before > 0].min(), 1e-6)), np.log10(before.max()), 80)
    ax.hist(before, bins=bins, alpha=0.6, label=f"{os.path.basename(dense_dir)}")
    ax.hist(after[after > 0], bins=bins, alpha=0.6,
            label=f"{os.path.basename(sparse_dir)}, non-zero ({(after == 0).mean():.0%} are exactly 0)")
    first = sparse["model"][names[0]].abs()
    threshold = first[first > 0].min().item()
    ax.axvline(threshold, color="C3", ls="--", label=f"smallest kept |w| in {names[0]}: {threshold:.3g}")
    ax.set(xscale="log", yscale="log", xlabel="|weight| (log scale)", ylabel="number of weights (log scale)",
           title="Encoder weight magnitudes before and after pruning")
    ax.legend(fontsize=7)
    return save(fig, out, "magnitudes.png")


def plot_finetune(out, path):
    """Grouped bars of one finetune.py run (out/finetune/ -> finetune.png, out/finetune-x/ -> finetune-x.png)."""
    with open(path) as f:
        results = json.load(f)
    scores = results["scores"]
    tasks = list(next(iter(scores.values())))
    # each sparse model next to its dense counterpart (bio-dense, bio-sparse90, ...), random init last
    pair = lambda m: (dense_counterpart(m) or m, dense_counterpart(m) is not None)  # (bio-dense, sparse?)
    models = sorted(scores, key=lambda m: (m == "random-init", *pair(m)))
    fig, ax = plt.subplots(figsize=WIDTH)
    width = 0.8 / len(models)
    mean = lambda xs: 100 * np.mean(xs) if xs else 0.0  # a task whose runs all failed: no bar
    for i, model in enumerate(models):
        means = [mean(scores[model][t]) for t in tasks]
        stds = [100 * np.std(scores[model][t], ddof=1) if len(scores[model][t]) > 1 else 0 for t in tasks]
        x = np.arange(len(tasks)) + (i - (len(models) - 1) / 2) * width
        n = max(len(scores[model][t]) for t in tasks)
        ax.bar(x, means, width, yerr=stds, capsize=2, label=f"{model} ({n} seed{'s' if n > 1 else ''})")
        dense = dense_counterpart(model)
        # recovery on each sparse bar, with its 95% interval (finetune.py's bootstrap) where there is one
        boot = ((results.get("intervals") or {}).get(model) or {}).get("its own dev-selected recipe", {})
        for xi, t, m in zip(x, tasks, means):
            row = boot.get("tasks", {}).get(t)
            if row and row["recovery"] is None:  # the dense model learned nothing: no recovery to give
                ax.text(xi, m + 1, "dense at\nfloor", ha="center", fontsize=5)
            elif row:
                lo, hi = row["recovery_ci"]
                ax.text(xi, m + 1, f"{row['recovery']:.0%}\n[{lo:.0%},\n{hi:.0%}]", ha="center", fontsize=5)
            elif dense in scores and mean(scores[dense][t]):
                ax.text(xi, m + 1, f"{m / mean(scores[dense][t]):.0%}", ha="center", fontsize=6)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set(ylabel="test score (x100)", title="Fine-tuning: mean ± std over seeds; % = recovery vs the dense model\n"
           "[95% interval: bootstrap over test examples and seeds]")
    ax.legend(fontsize=7)
    return save(fig, out, os.path.basename(os.path.dirname(os.path.abspath(path))) + ".png")


def plot_sparse_speed(out, path):
    with open(path) as f:
        rows = json.load(f)
    fig, ax = plt.subplots(figsize=WIDTH)
    pattern = lambda r: r.get("pattern", "unstructured")  # rows written before patterns existed
    for size, pat, sparsity in sorted({(r["size"], pattern(r), r["sparsity"]) for r in rows}):
        pts = sorted((r["batch"], r["dense_ms"] / r["sparse_ms"]) for r in rows
                     if (r["size"], pattern(r), r["sparsity"]) == (size, pat, sparsity))
        ax.plot(*zip(*pts), "o-", label=f"{size}, {pat}, {sparsity:.0%} sparse")
    ax.axhline(1.0, color="black", ls=":", label="1x (no gain)")
    ax.set(xscale="log", xlabel="batch size (sequences of 128 tokens)", ylabel="speedup (dense ms / sparse ms)",
           title="Pruned encoder (CSR, BSR or compacted) against dense inference on the CPU")
    ax.legend(fontsize=7)
    return save(fig, out, "sparse_speed.png")


def save(fig, out, name):
    fig.tight_layout()
    path = os.path.join(out, name)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(run_dir):
    out = os.path.join(run_dir, "figures")
    os.makedirs(out, exist_ok=True)
    written, skipped = [], []

    def attempt(name, reason, draw):
        if reason is not None:
            return skipped.append(f"{name}: {reason}")
        try:
            written.append(draw())
        except Exception as e:  # a damaged results.json or ckpt.pt: this figure is skipped, the others drawn
            skipped.append(f"{name}: could not read its data ({type(e).__name__}: {str(e).splitlines()[0][:100]})")

    general = load_run(os.path.join(run_dir, "general-dense"))
    sparse_dirs = sorted(d for d in glob.glob(os.path.join(run_dir, "general-sparse*")) if load_run(d))
    attempt("schedule", None if sparse_dirs else "no general-sparse*/config.json (phase 2 not finished)",
            lambda: plot_schedule(out, sparse_dirs[0]))
    runs = {}  # name -> (step offset, config, record): phase 2 starts where phase 1 ended, PubMed after phase 2
    if general:
        runs["general-dense"] = (0, *general)
        for d in sparse_dirs[:1]:
            runs[os.path.basename(d)] = (general[0]["dense_steps"], *load_run(d))
        for d in sorted(glob.glob(os.path.join(run_dir, "bio-*"))):
            bio = load_run(d)
            if bio:
                runs[os.path.basename(d)] = (general[0]["dense_steps"] + general[0]["prune_steps"], *bio)
    runs = {name: run for name, run in runs.items() if run[2]}  # runs from before records existed have none
    attempt("loss", None if runs else "no record.jsonl in general-dense/, general-sparse*/ or bio-*/",
            lambda: plot_losses(out, runs))
    with_ckpt = [d for d in sparse_dirs if os.path.exists(os.path.join(d, "ckpt.pt"))]
    attempt("layer_sparsity", None if with_ckpt else "no general-sparse*/ckpt.pt",
            lambda: plot_layer_sparsity(out, with_ckpt))
    dense_ckpt = os.path.exists(os.path.join(run_dir, "general-dense", "ckpt.pt"))
    attempt("magnitudes", None if dense_ckpt and with_ckpt else "needs general-dense/ and general-sparse*/ ckpt.pt",
            lambda: plot_magnitudes(out, os.path.join(run_dir, "general-dense"), with_ckpt[0]))
    finetunes = sorted(glob.glob(os.path.join(run_dir, "finetune*", "results.json")))
    attempt("finetune", None if finetunes else f"no {run_dir}/finetune*/results.json (python finetune.py)",
            lambda: [plot_finetune(out, path) for path in finetunes][0])
    bench = os.path.join(run_dir, "bench_sparse.json")
    attempt("sparse_speed", None if os.path.exists(bench) else
            f"no {bench} (python tests/bench_sparse.py --json {bench})", lambda: plot_sparse_speed(out, bench))
    for path in written:
        print(f"wrote {path}")
    for line in skipped:
        print(f"skipped {line}")
    return written, skipped


if __name__ == "__main__":
    if len(sys.argv) != 2 or not os.path.isdir(sys.argv[1]):
        raise SystemExit("usage: python -m tiny_sparse_bert.plots OUT_DIR   (the --out of the training scripts)")
    main(sys.argv[1])
