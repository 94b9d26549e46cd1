"""Benchmark: training-step speed and model FLOPs utilisation (MFU) of a preset, eager vs compiled.

    python tests/bench_gpu.py --preset gpu                    # on a GPU: every variant side by side
    python tests/bench_gpu.py --preset base --steps 30
    python tests/bench_gpu.py --preset tiny --steps 4         # CPU smoke test (eager variants only)

Each variant runs `train.train` itself (the loop the scripts use: pruner, AdamW, clipping, bf16
autocast where the device has it) for --warmup steps, then --steps timed steps, on synthetic
tokens. Variants: eager; eager with the static-shape MLM head (`--static-mlm`); compiled
(dynamic shapes); compiled with the static head (one graph, CUDA graphs on a GPU).
MFU = model FLOPs per second / the device's peak; the FLOP count is `train_flops` below.
"""
import argparse
import time

import numpy as np
import torch

from conftest import ROOT  # noqa: F401  (puts the repository on sys.path)
from tiny_sparse_bert.data import Blocks, NUM_SPECIAL
from tiny_sparse_bert.model import BertConfig, BertForMaskedLM
from tiny_sparse_bert.pruning import GradualMagnitudePruner
from tiny_sparse_bert.bookkeeping import Checkpoints, Reporting
from tiny_sparse_bert.data import mlm_batch, static_predictions
from tiny_sparse_bert.runtime import Runtime, pick_device, use_bf16
from tiny_sparse_bert.train import make_optimizer, train

# the model and batch sizes of train_general.py's presets (vocabulary 8,192, sequences of 128)
PRESETS = {"tiny": dict(n_layer=2, hidden=64, n_head=2, intermediate=128, batch_size=8),
           "default": dict(n_layer=4, hidden=256, n_head=4, intermediate=1024, batch_size=32),
           "gpu": dict(n_layer=6, hidden=512, n_head=8, intermediate=2048, batch_size=128),
           "base": dict(n_layer=12, hidden=768, n_head=12, intermediate=3072, batch_size=256)}
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 tensor-core FLOP/s (data sheets)


def train_flops(L, H, I, V, B, T, P):
    """Matmul FLOPs of one training step (forward + backward = 3 x forward; 2 FLOPs per multiply-add).

    Per layer and token: Q, K, V and the attention output (4 H x H matrices), the feed-forward
    (H x I and I x H), and attention itself (scores q.k and the weighted sum of v: 2 x T x H).
    Our MLM model runs the last layer after attention, and the head, only at the P predicted positions.
    """
    qkv_attention = B * T * L * (2 * 3 * H * H + 2 * 2 * T * H)  # every position, every layer
    after_attention = (B * T * (L - 1) + P) * (2 * H * H + 2 * 2 * H * I)
    head = P * (2 * H * H + 2 * H * V)  # transform + tied decoder
    return 3 * (qkv_attention + after_attention + head)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=list(PRESETS), default="gpu")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    parser.add_argument("--variants", default="", help="comma-separated; default: all on CUDA, eager ones on CPU")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="the device's peak, if not in PEAK_BF16")
    args = parser.parse_args()
    device = pick_device(args.device)
    bf16 = use_bf16(device)
    size = dict(PRESETS[args.preset])
    B, T, V, p = size.pop("batch_size"), 128, 8192, 0.4
    config = BertConfig(vocab_size=V, dropout=0.0, alibi=True, **size)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    peak = args.peak_tflops * 1e12 or next((v for k, v in PEAK_BF16.items() if k in name), 0.0)
    variants = args.variants.split(",") if args.variants else (
        ["eager", "eager-static", "compiled", "compiled-static"] if device.type == "cuda" else ["eager", "eager-static"])
    tokens = np.random.default_rng(0).integers(NUM_SPECIAL, V, 4_000_000).astype(np.uint16)
    blocks = Blocks(tokens, T, B)
    n_static = static_predictions(B, T, p)
    print(f"{name}, torch {torch.__version__}, {'bf16 autocast' if bf16 else 'fp32'}; preset {args.preset}: "
          f"L{config.n_layer} H{config.hidden} I{config.intermediate}, batch {B} x {T}, {p:.0%} masked; "
          f"{args.warmup} warm-up + {args.steps} timed steps per variant")
    print("| variant | ms/step | tokens/s | TFLOP/s | MFU |")
    print("|---|---|---|---|---|")
    for variant in variants:
        static = variant.endswith("static")
        torch.manual_seed(0)
        model = BertForMaskedLM(config).to(device)
        optimizer = make_optimizer(model, 1e-4, 0.01)
        total = args.warmup + args.steps
        pruner = GradualMagnitudePruner(model, 0.9, 0, total, 10)
        batch_fn = (lambda step: mlm_batch(blocks, step, p, V, 0, max_predictions=n_static if static else 0))

        def run(start, stop):  # `train` resumes at `start` with the same model: no re-compilation
            train(model, optimizer, batch_fn, stop, peak_lr=1e-4, warmup_steps=1, pruner=pruner,
                  ckpt=Checkpoints(start_step=start),
                  report=Reporting(log_every=10 ** 9),
                  runtime=Runtime(device=device, compile=variant.startswith("compiled"), static_shapes=static,
                                  bf16=bf16))
        # NOTE: each call of `train` wraps the model in torch.compile again; the compiled code is
        # cached by torch, so the timed call reuses what the warm-up compiled
        run(0, args.warmup)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        run(args.warmup, total)  # ends with a read of the loss: the device has finished
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - t) / args.steps
        P = n_static if static else round(p * B * (T - 2))
        flops = train_flops(config.n_layer, config.hidden, config.intermediate, V, B, T, P)
        mfu = f"{flops / seconds / peak:.1%}" if peak else "n/a (peak unknown)"
        print(f"| {variant} | {seconds * 1000:.1f} | {B * T / seconds:,.0f} | {flops / seconds / 1e12:.1f} | {mfu} |",
              flush=True)


if __name__ == "__main__":
    main()
