"""Step 3 of 3: fine-tune checkpoints on biomedical tasks and print the comparison table.

Sparse*BERT's claim (Campos et al. 2022, table 2): fine-tuned with the pruning mask held fixed,
the 90%-sparse model transferred to the biomedical domain matches its dense counterpart. Every
checkpoint, and a random initialisation of the same size, is fine-tuned on every task with the
same search: each recipe of the grids (`--epochs`, `--lr`, `--distill-hardness`) with the first
`--search-seeds` seeds, the best mean *dev* score kept (never test), the other seeds at that
recipe. Grids, scoring and the table are in tiny_sparse_bert/transfer.py.

    python finetune.py                                   # the README's four models + random init
    python finetune.py --epochs 3,6 --lr 6e-4,1.5e-3 --search-seeds 3 --tasks ncbi_disease
    python finetune.py --distill-hardness 0,1            # sparse models may learn from their dense teachers
    python finetune.py --tasks ner:my_data/,cls:other/   # your own data in our formats
    python finetune.py --prune-during-finetune 0.9       # ablation: GMP during fine-tuning only
    python finetune.py --preset tiny                     # seconds, for tests

Writes results.md and results.json (every run: recipe, seed, dev curve, scores) to --out.
"""
# %% 1) config
import copy
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from tiny_sparse_bert.config import (check_options, check_run_dir, check_writable, dense_counterpart, note_gpu_preset,
                                     parse_config)
from tiny_sparse_bert.data import file_sha256
from tiny_sparse_bert.model import BertForMaskedLM
from tiny_sparse_bert.pruning import MagnitudePruner
from tiny_sparse_bert.tasks import encode, get_task
from tiny_sparse_bert.train import (Distillation, NonFiniteLoss, Reporting, Runtime, barrier, load_checkpoint,
                                    make_optimizer, precision_name, save_checkpoint, setup_distributed, train, use_bf16,
                                    wrap_ddp)
from tiny_sparse_bert.recovery import FLOOR_MARGIN, all_intervals, floor_score
from tiny_sparse_bert.transfer import (RUNS_FILE, check_names, claim_out_dir, encoder_info, evaluate, failed_run, grid,
                                       head_model, load_encoder, load_task_data, recorded_runs, results_table, run_key,
                                       run_summary, save_runs, search_recipes, seeds_for, training_batches,
                                       write_results)


@dataclass
class Config:
    models: str = "out/general-dense,out/general-sparse90,out/bio-dense,out/bio-sparse90"  # checkpoint dirs
    random_baseline: bool = True   # also fine-tune a randomly initialised model of the same size
    tasks: str = "ncbi_disease,bc5cdr_chem,chemprot"  # names, ner:DIR or cls:DIR (comma-separated); hoc is
                                   # left out by default: no model learns it in this budget (docs/finetuning.md)
    data: str = "data"
    out: str = "out/finetune"
    seeds: int = 3                 # runs per (model, task, recipe) of the --seeded models: mean ± std
    seeded: str = "bio-dense,bio-sparse90"  # the comparison that gets --seeds runs ("all": every model)
    other_seeds: int = 1           # runs of the other rows (general models, random init): cheaper, noisier
    search_seeds: int = 1          # the grid is searched with this many seeds, then the rest run the winner
    epochs: str = "5"              # a number, or a comma-separated grid searched on dev (e.g. 3,6); 5 rather
                                   # than 3: the sparse models gain more from it (docs/ladder.md, rows R-T)
    lr: str = "1.5e-3,3e-3"        # a number, or a comma-separated grid searched on dev (90%-sparse
                                   # models want a higher rate than dense ones: docs/ladder.md)
    lr_fallback: str = "5e-4,2e-4"  # tried in turn, for any model, where every rate of --lr ends at the
                                   # floor on dev (a task the grid was not chosen on: "" = never)
    shared_recipe: bool = True     # the --seeded sparse models also run every seed at their dense
                                   # counterpart's recipe: recovery without a recipe of their own
    distill_hardness: str = "0"    # sparse models: weight of the soft loss from the dense teacher (1 = soft
                                   # only, 0 = none); a grid (0,1) is searched on dev too. Off by default:
                                   # at 5 epochs it no longer pays (docs/ladder.md, row U), and costs 12 runs
    distill_temperature: float = 2.0
    batch_size: int = 32
    warmup: float = 0.1
    weight_decay: float = 0.01
    dropout: float = 0.1           # BERT's fine-tuning dropout
    max_len: int = 128             # word pieces per example (longer ones are truncated)
    max_train: int = 2000          # training examples per task (0 = all)
    max_eval: int = 1000           # dev examples per task (0 = all): dev is scored after every epoch
    max_test: int = 0              # test examples per task (0 = all: the narrowest interval on recovery)
    prune_during_finetune: float = 0.0  # ablation: prune dense models with GMP to this sparsity while fine-tuning
    device: str = "auto"           # auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps
    compile: bool = False         # torch.compile the model (worth it on a GPU)
    precision: str = "auto"        # auto (bf16 on CUDA and CPUs with bf16 dot products, else fp32) | bf16 | fp32
    overwrite: bool = False        # start over, removing the runs already finished in --out


BOOKKEEPING = ("out", "device", "compile", "precision", "overwrite")  # what may change when a run continues


PRESETS = {
    "default": {},
    "tiny": dict(epochs="1", seeds=2, batch_size=8, max_train=64, max_eval=32, max_test=32, max_len=64,
                 lr_fallback=""),  # tiny models learn little: no fallback, so tests know the runs
    # after the other scripts' lab presets: one task, 1,000 training sentences, 3 epochs, no fallback rates
    "lab": dict(models="out-lab/general-dense,out-lab/general-sparse90,out-lab/bio-dense,out-lab/bio-sparse90",
                out="out-lab/finetune", tasks="ncbi_disease", epochs="3", max_train=1000, max_eval=500,
                lr_fallback=""),
    "gpu": dict(max_train=0, max_eval=0, epochs="3"),
}

preset, cfg = parse_config(Config, PRESETS, __doc__.splitlines()[0])


def stopped_at_start_up(signum, frame):  # Ctrl-C (or a scheduler's stop) while data and models load
    print("stopped before the first run: nothing to keep")
    raise SystemExit(130)


signal.signal(signal.SIGINT, stopped_at_start_up)
signal.signal(signal.SIGTERM, stopped_at_start_up)
check_options(cfg, positive=("seeds", "other_seeds", "search_seeds", "batch_size", "max_len",
                             "distill_temperature"),
              non_negative=("max_train", "max_eval", "max_test", "weight_decay"), fraction=("warmup",),
              below_one=("dropout", "prune_during_finetune"), at_least=(("max_len", 3),))


recipes = [(epochs, lr) for epochs in grid("epochs", cfg.epochs) for lr in grid("lr", cfg.lr)]
fallback = [(epochs, lr, 0.0) for epochs in grid("epochs", cfg.epochs) for lr in
            (grid("lr-fallback", cfg.lr_fallback) if cfg.lr_fallback else [])]
hardness_grid = grid("distill-hardness", cfg.distill_hardness)
distilling = any(h > 0 for h in hardness_grid)
model_dirs = [m for m in cfg.models.split(",") if m]
tasks = [get_task(t) for t in cfg.tasks.split(",") if t]
check_names(model_dirs, tasks, cfg.random_baseline, cfg.seeded)
for directory in model_dirs:  # arguments first, before any data is read
    check_run_dir(directory, "--models", "train_general.py or train_bio.py")
check_writable(cfg.out)
rank, world, device = setup_distributed(cfg.device)  # one process, or one of `torchrun --nproc_per_node N`
bf16 = use_bf16(device, cfg.precision)
if rank != 0:
    sys.stdout = open(os.devnull, "w")  # only rank 0 prints and writes files
print(f"config (preset {preset}, {world} process{'es' if world > 1 else ''} on {device}, precision: "
      f"{precision_name(device, bf16)}): {asdict(cfg)}")
note_gpu_preset(preset, device)
seeds_of = lambda name: seeds_for(name, cfg.seeded, cfg.seeds, cfg.other_seeds)
settings = {k: v for k, v in asdict(cfg).items() if k not in BOOKKEEPING}
settings["checkpoints"] = {d: file_sha256(os.path.join(d, "ckpt.pt")) for d in model_dirs}  # the exact models
if rank == 0:  # runs already in --out: continued when this is the command that made them, else refused
    claim_out_dir(cfg.out, settings, cfg.overwrite)
barrier(world)
finished = recorded_runs(cfg.out)[1]  # "model | task | recipe | seed" -> run
if finished:
    print(f"{len(finished)} runs already finished in {cfg.out}/{RUNS_FILE}: not run again")
t_start = time.time()

# %% 2) data: each task's splits, read and checked once (encoded per tokenizer in 5)
splits, labels = load_task_data(tasks, cfg.data, cfg.max_train, cfg.max_eval, cfg.max_test)

# %% 3) models: the pretrained checkpoints, and a random initialisation of the same size
encoders = [load_encoder(d) for d in model_dirs]  # (name, BertForMaskedLM, is_sparse, tokenizer)
if cfg.random_baseline:
    assert encoders, "--random-baseline needs one checkpoint for its size and tokenizer"
    _, like, _, tokenizer = encoders[0]
    torch.manual_seed(0)
    encoders.append(("random-init", BertForMaskedLM(like.config), False, tokenizer))


# %% 4) one fine-tuning run: a task head on the encoder, the pretrained zeros kept, the best dev epoch kept
def finetune_run(task, mlm, sparse, encoded, epochs, lr, seed, teacher=None, hardness=0.0):
    """Fine-tune one model once; return its dev-selected weights and scores (dev after every epoch)."""
    names = labels[task.name]
    steps_per_epoch = max(1, len(encoded["train"]) // cfg.batch_size)
    steps = max(1, round(epochs * steps_per_epoch))
    torch.manual_seed(seed)
    model = head_model(task, mlm, len(names), cfg.dropout).to(device)
    if sparse:
        pruner = MagnitudePruner.from_sparse_model(model)  # the pretrained zeros stay zero
    elif cfg.prune_during_finetune > 0:
        pruner = MagnitudePruner(model, cfg.prune_during_finetune, 0, int(0.7 * steps), max(1, steps // 50))
    else:
        pruner = None
    batch_fn, mean_labelled = training_batches(task, encoded["train"], cfg.batch_size, steps_per_epoch,
                                               np.random.default_rng(seed), rank, world)
    best = {"dev": -1.0, "state": None, "threshold": None, "dev_curve": []}

    def select_on_dev(step=None):  # keep the weights (and multi-label threshold) of the best dev score
        dev = evaluate(model, task, encoded["dev"], names, device, bf16)
        best["dev_curve"].append(round(dev[task.metric], 4))
        if dev[task.metric] > best["dev"]:
            best.update(dev=dev[task.metric], state=copy.deepcopy(model.state_dict()), threshold=dev.get("threshold"))
        return f"dev {task.metric} {dev[task.metric]:.4f}"

    distill = Distillation(teacher, hardness, cfg.distill_temperature, task.kind) if teacher else None
    run = {"epochs": epochs, "lr": lr, "distill_hardness": hardness, "seed": seed, "teacher": teacher is not None,
           "distill_temperature": cfg.distill_temperature if teacher is not None else None}
    try:
        train(model, make_optimizer(model, lr, cfg.weight_decay), batch_fn, steps, peak_lr=lr,
              warmup_steps=int(cfg.warmup * steps), pruner=pruner, mean_labelled=mean_labelled, distill=distill,
              report=Reporting(log_every=max(1, steps // 4), eval_fn=select_on_dev, eval_every=steps_per_epoch),
              runtime=Runtime(device, wrap_ddp(model, device, world), rank == 0, cfg.compile, bf16=bf16))
    except NonFiniteLoss as e:  # recorded as failed, never selected on dev; the other runs go on
        return failed_run(epochs, lr, hardness, seed, str(e).split(";")[0].removeprefix("error: "),
                          best["dev_curve"]), None
    select_on_dev()
    model.load_state_dict(best["state"])
    if sparse:  # exactly the pretrained zeros, no more, no fewer
        assert all(torch.equal(w != 0, pruner.masks[n]) for n, w in pruner.params.items()), "mask changed"
    test, counts = evaluate(model, task, encoded["test"], names, device, bf16, best["threshold"], counts=True)
    run.update(dev=best["dev"], dev_curve=best["dev_curve"], test=test[task.metric], test_metrics=test,
               at_floor=best["dev"] <= floors[task.name]["dev"] + FLOOR_MARGIN,  # learned nothing on dev
               test_counts=counts.tolist())  # per test example: what the bootstrap resamples
    if pruner and not pruner.frozen:
        run["pruned_in_finetune"] = pruner.sparsity()
    return run, best["state"]


# %% 5) every model on every task: the same recipe grid and seeds for all (dense models first: they teach)
# Each finished run went to --out/runs.json at once (1); the same command run again skips what it holds.
names_in_run = [name for name, *_ in encoders]
results = {name: {} for name in names_in_run}  # name -> task -> {"recipe": (epochs, lr, hardness), "runs": [...]}
info, teachers = {}, {}  # teachers[(dense model, task)] = its fine-tuned weights (or their file) per seed
floors = {}  # task -> {"dev": score, "test": score} of predicting the commonest training label
encodings = {}  # encoded once per tokenizer and task (the checkpoints of one run share a tokenizer)


def finetune_model(name, mlm, sparse, tokenizer):
    info[name] = encoder_info(mlm, sparse)
    is_teacher = distilling and name in map(dense_counterpart, names_in_run)
    teacher_name = dense_counterpart(name) if distilling and sparse else None
    if teacher_name and teacher_name not in names_in_run:
        print(f"note: {name} is fine-tuned without distillation: its teacher {teacher_name} is not in --models")
        teacher_name = None
    info[name]["teacher"] = teacher_name
    model_recipes = [(e, lr, h) for e, lr in recipes for h in (hardness_grid if teacher_name else [0.0])]
    for task in tasks:
        key = (tokenizer.to_str(), task.name)
        if key not in encodings:
            encodings[key] = {s: encode(task, ex, tokenizer, labels[task.name], cfg.max_len)
                              for s, ex in splits[task.name].items()}
            floors.setdefault(task.name, {s: floor_score(task, encodings[key]["train"], encodings[key][s],
                                                         labels[task.name]) for s in ("dev", "test")})
        states = {}

        def run_seed(recipe, seed):
            epochs, lr, hardness = recipe
            state_file = os.path.join(cfg.out, "teachers", name, task.name, f"{epochs:g}-{lr:g}-{seed}.pt")
            run_id = run_key(name, task.name, *recipe, seed)
            if run_id in finished:  # an earlier process finished it; a teacher's weights were saved with it
                run, state = finished[run_id], state_file
            else:
                teacher = None
                if hardness > 0:  # the dense counterpart fine-tuned with this seed, frozen, in eval mode
                    weights = teachers.get((teacher_name, task.name), [None] * (seed + 1))[seed]
                    weights = load_checkpoint(weights)["model"] if isinstance(weights, str) else weights
                    teacher = weights and head_model(task, mlm, len(labels[task.name]), cfg.dropout, weights)
                    teacher = teacher and teacher.to(device).eval().requires_grad_(False)
                if hardness > 0 and teacher is None:
                    run, state = failed_run(*recipe, seed, "its teacher's run failed"), None
                else:
                    run, state = finetune_run(task, mlm, sparse, encodings[key], epochs, lr, seed, teacher, hardness)
                if rank == 0 and is_teacher and state is not None:
                    save_checkpoint(state_file, model=state)
                finished[run_id] = run
                if rank == 0:
                    save_runs(cfg.out, settings, finished)
                print(run_summary(name, task, run))
            if is_teacher:
                states[(epochs, lr, seed)] = state
            return run

        dense_recipe = results.get(dense_counterpart(name), {}).get(task.name, {}).get("recipe")
        shared = dense_recipe if cfg.shared_recipe and sparse and seeds_of(name) == cfg.seeds else None
        recipe, runs = search_recipes(run_seed, model_recipes, fallback, cfg.search_seeds, seeds_of(name), shared,
                                      say=lambda text: print(f"note: {name} / {task.name}: {text}"))
        results[name][task.name] = {"recipe": recipe, "runs": runs}
        if is_teacher and recipe:
            teachers[(name, task.name)] = [states[(*recipe[:2], seed)] for seed in range(seeds_of(name))]
    if sparse:
        info[name]["mask_unchanged"] = True  # checked after every run
    if cfg.prune_during_finetune > 0 and not sparse:
        info[name]["pruned_in_finetune"] = cfg.prune_during_finetune


signal.signal(signal.SIGINT, signal.default_int_handler)  # from here on, a stop keeps the finished runs
signal.signal(signal.SIGTERM, signal.default_int_handler)  # a batch scheduler's stop: as Ctrl-C
try:
    for encoder in sorted(encoders, key=lambda e: e[2]):
        finetune_model(*encoder)
except (KeyboardInterrupt, SystemExit) as e:  # train() exits with 130 after Ctrl-C
    if isinstance(e, SystemExit) and e.code != 130:
        raise
    print(f"stopped: {len(finished)} finished runs are kept in {cfg.out}/{RUNS_FILE}; run the same command again "
          f"to continue (--overwrite starts over)")
    raise SystemExit(130) from None

# %% 6) the comparison table, and recovery with a 95% interval (bootstrap over test examples and seeds)
table, chosen = results_table(results, info, tasks, seeds_of, floors)
intervals, intervals_text = all_intervals(results, tasks, floors, seeds_of, cfg.shared_recipe, cfg.seeds)
print(f"\n{table}\n\nrecipes selected on dev (grid: epochs {cfg.epochs}, lr {cfg.lr}, distillation hardness "
      f"{cfg.distill_hardness} for sparse models with their dense counterpart in --models):\n{chosen}")
print("\n" + intervals_text)
if rank == 0:
    write_results(cfg.out, asdict(cfg), table, chosen, info, results, floors, intervals, intervals_text)
    print(f"\n{(time.time() - t_start) / 60:.1f} min; wrote {cfg.out}/results.md and results.json")
    print(f"figures: python -m tiny_sparse_bert.plots {os.path.dirname(os.path.normpath(cfg.out)) or '.'}")
