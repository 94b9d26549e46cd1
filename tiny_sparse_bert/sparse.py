"""Making sparsity pay: a compressed checkpoint format and a sparse-matrix CPU inference path.

A support module: the paper can be followed without it.
A pruned weight in plain PyTorch is a dense tensor full of zeros: as large and as slow as before.

- `save_sparse` / `load_sparse`: each pruned weight stored as a bitmask of its non-zeros (one bit
  per weight, numpy.packbits) plus the non-zero values in row-major order; everything else as is.
  At 90% sparsity a weight costs 1 bit + 0.1 x 32 bits = 4.2 bits instead of 32 (7.6x smaller).
  A bitmask (1 bit per weight) is smaller than CSR's 16-bit column indices (16 bits per non-zero)
  up to 93.75% sparsity, and simpler to read.
- `convert_to_sparse`: makes every pruned Linear cheaper in the way its zeros allow, found from the
  zeros themselves: a feed-forward whose neurons were pruned whole becomes two smaller dense
  Linears (`compact_feed_forward`: full dense speed), an attention whose dimensions were pruned
  whole smaller query, key, value and output Linears per head (`compact_attention`); a weight
  whose zeros are whole b x b blocks multiplies in block-sparse rows (BSR); any other pruned
  weight in compressed sparse rows (CSR; MKL's sparse kernels on CPU).

    python -m tiny_sparse_bert.sparse out/bio-sparse90 --to out/bio-sparse90.sparse.pt
    python -m tiny_sparse_bert.sparse DIR --hf DIR-hf   # a transformers BERT (models without ALiBi)
"""
import argparse
import os
import warnings
from dataclasses import asdict

import numpy as np
import torch
import torch.nn as nn

from .hf import save_hf
from .model import BertConfig, BertForMaskedLM
from .pruning import prunable_parameters
from .bookkeeping import load_checkpoint

FORMAT = "tiny-sparse-bert/bitmask-v1"
RUN_FILES = ("ckpt.pt", "record.jsonl", "config.json", "tokenizer.json")  # what a training run writes


def save_sparse(model, path, min_sparsity=0.5):
    """Write `model` with its pruned weights as (bitmask, non-zero values); returns the file size."""
    sparse = {}
    for name, w in prunable_parameters(model).items():
        w = w.detach().cpu()
        keep = (w != 0).flatten().numpy()
        sparse[name] = {"shape": list(w.shape), "bitmask": torch.from_numpy(np.packbits(keep)),
                        "values": w.flatten()[torch.from_numpy(keep)].clone()}
    n_zero = sum(int(np.prod(s["shape"])) - s["values"].numel() for s in sparse.values())
    n_prunable = sum(int(np.prod(s["shape"])) for s in sparse.values())
    if n_zero < min_sparsity * n_prunable:
        raise ValueError(f"only {n_zero / n_prunable:.1%} of its prunable weights are zero: the bitmask format "
                         f"pays from {min_sparsity:.0%}; compress a sparse checkpoint such as out/general-sparse90")
    dense = {k: v.detach().cpu() for k, v in model.state_dict().items() if k not in sparse}
    tmp = path + ".tmp"
    torch.save({"format": FORMAT, "model_config": asdict(model.config), "dense": dense, "sparse": sparse}, tmp)
    os.replace(tmp, path)
    return os.path.getsize(path)


def prunable_bytes(model):
    """(dense fp32 bytes, bitmask + values bytes) of the prunable weights: the compression they get."""
    dense = compressed = 0
    for w in prunable_parameters(model).values():
        dense += w.numel() * w.element_size()
        compressed += (w.numel() + 7) // 8 + int((w != 0).sum()) * w.element_size()
    return dense, compressed


def load_sparse(path, expected_config=None):
    """Rebuild the BertForMaskedLM of a `save_sparse` file, bit-for-bit the same weights."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if blob.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} file")
    config = BertConfig(**blob["model_config"])
    if expected_config is not None and expected_config != config:
        raise ValueError(f"{path} was written for another model config: {config} (expected {expected_config})")
    state = dict(blob["dense"])
    for name, s in blob["sparse"].items():
        n = int(np.prod(s["shape"]))
        keep = torch.from_numpy(np.unpackbits(s["bitmask"].numpy(), count=n).astype(bool))
        w = torch.zeros(n, dtype=s["values"].dtype)
        w[keep] = s["values"]
        state[name] = w.view(s["shape"])
    model = BertForMaskedLM(config)
    model.load_state_dict(state)
    return model


class SparseLinear(nn.Module):
    """y = x W^T + b with W in compressed-sparse-row form (CSR), or block-sparse rows (BSR) when the
    zeros are whole `block` x `block` blocks: work and memory scale with the non-zeros."""

    def __init__(self, linear, block=None):
        super().__init__()
        self.in_features, self.out_features, self.block = linear.in_features, linear.out_features, block
        with warnings.catch_warnings():  # torch calls its CSR and BSR support "beta"; it is what we measure
            warnings.simplefilter("ignore", UserWarning)
            w = linear.weight.detach()  # (out, in)
            self.weight = w.to_sparse_bsr((block, block)) if block else w.to_sparse_csr()
        self.bias = linear.bias.detach().clone() if linear.bias is not None else torch.zeros(self.out_features)

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, self.in_features)  # (N, in)
        y = torch.addmm(self.bias[:, None], self.weight, x.t())  # (out, N) = b + W x^T, sparse @ dense
        return y.t().reshape(*shape[:-1], self.out_features)


def block_size(weight, sizes=(16, 8, 4, 2)):
    """The largest b such that every zero of `weight` lies in an all-zero b x b block (a block-pruned
    weight, recognised from its zeros alone), or None."""
    rows, cols = weight.shape
    for b in sizes:
        if rows % b == 0 and cols % b == 0:
            zero_blocks = (weight.reshape(rows // b, b, cols // b, b) == 0).all(3).all(1)
            if int(zero_blocks.sum()) * b * b == int((weight == 0).sum()) > 0:
                return b
    return None


def compact_feed_forward(layer):
    """A feed-forward whose neurons were pruned whole (the output weight's column is zero) loses them:
    `inter` and `out` become smaller dense Linears with the same outputs. Returns the neurons kept."""
    alive = (layer.out.weight != 0).any(0)  # (I,): neuron i reaches the output
    kept = int(alive.sum())
    inter, out = nn.Linear(layer.inter.in_features, kept), nn.Linear(kept, layer.out.out_features)
    inter.weight.copy_(layer.inter.weight[alive])
    inter.bias.copy_(layer.inter.bias[alive])
    out.weight.copy_(layer.out.weight[:, alive])
    out.bias.copy_(layer.out.bias)
    layer.inter, layer.out = inter, out
    return kept


def attention_dims_alive(layer):
    """(C,) bools each: which query/key dimensions (a row of either weight not zero) and which value
    dimensions (a value row or an attention-output column not zero) still reach the output."""
    qk = (layer.query.weight != 0).any(1) | (layer.key.weight != 0).any(1)
    v = (layer.value.weight != 0).any(1) | (layer.attn_out.weight != 0).any(0)
    return qk, v


def compact_attention(layer):
    """An attention whose dimensions were pruned whole (a query row with the same key row; a value
    row with the same attention-output column) loses them: per head, the kept query/key dimensions
    and the kept value dimensions go into smaller dense Linears, padded with zero rows to the head
    that keeps most, so that all heads still run in one batched product. The same outputs: a
    pruned query/key dimension adds b_q b_k to every score of a query alike, which softmax ignores;
    a pruned value dimension reaches the output through a zero column. Returns (qk, v) widths kept
    per head."""
    nh, hs = layer.n_head, layer.query.out_features // layer.n_head
    alive_qk, alive_v = (alive.view(nh, hs) for alive in attention_dims_alive(layer))

    def gather(alive):  # (nh, hs) bool -> indices (nh, width) into the C rows, and which are padding
        width = max(1, int(alive.sum(1).max()))
        order = alive.float().argsort(dim=1, descending=True, stable=True)[:, :width]  # kept dimensions first
        pad = ~alive.gather(1, order)
        return (order + torch.arange(nh)[:, None] * hs).flatten(), pad.flatten(), width

    def rows(linear, index, pad):  # a Linear with only these output rows (padding rows zero)
        small = nn.Linear(linear.in_features, index.numel())
        small.weight.copy_(linear.weight[index].masked_fill(pad[:, None], 0))
        small.bias.copy_(linear.bias[index].masked_fill(pad, 0))
        return small

    qk, qk_pad, qk_width = gather(alive_qk)
    v, v_pad, v_width = gather(alive_v)
    attn_out = nn.Linear(v.numel(), layer.attn_out.out_features)
    attn_out.weight.copy_(layer.attn_out.weight[:, v].masked_fill(v_pad[None, :], 0))
    attn_out.bias.copy_(layer.attn_out.bias)
    layer.scale = layer.scale or hs ** -0.5  # the scores keep the full head size's scale
    layer.query, layer.key = rows(layer.query, qk, qk_pad), rows(layer.key, qk, qk_pad)
    layer.value, layer.attn_out = rows(layer.value, v, v_pad), attn_out
    return qk_width, v_width


@torch.no_grad()
def convert_to_sparse(model, min_sparsity=0.7):
    """Make, in place, each pruned part of the encoder cheaper; returns {"compacted", "bsr", "csr"} counts.

    A feed-forward with whole neurons pruned is compacted (two smaller dense Linears), and so is an
    attention with whole dimensions pruned (four smaller dense Linears); then each
    prunable Linear with at least `min_sparsity` zeros becomes a SparseLinear, BSR if its zeros
    are whole blocks, else CSR. Below ~70% zeros a CSR product is slower than MKL's dense one, so
    those layers stay dense, as do embeddings, LayerNorms and heads. For inference only (no
    gradients).
    """
    if next(model.parameters()).device.type == "mps":  # torch has no sparse CSR products on Apple's GPU
        raise ValueError("sparse CSR inference runs on the CPU (or CUDA), not on mps: call model.cpu() first")
    done = {"compacted": 0, "bsr": 0, "csr": 0}
    for layer in (model.bert if hasattr(model, "bert") else model).layers:  # a model with a head, or the encoder
        dead = ~(layer.out.weight != 0).any(0)  # whole neurons pruned: the pattern "neurons"
        if float(dead.float().mean()) >= min_sparsity:
            compact_feed_forward(layer)
            done["compacted"] += 1
        alive_qk, alive_v = attention_dims_alive(layer)  # whole attention dimensions pruned: "neurons" too
        if 1 - max(float(alive_qk.float().mean()), float(alive_v.float().mean())) >= min_sparsity:
            compact_attention(layer)
            done["compacted"] += 1
    for name in list(prunable_parameters(model)):
        module_path = name.rsplit(".", 1)[0]  # "...layers.0.query.weight" -> "...layers.0.query"
        parent_path, attr = module_path.rsplit(".", 1)
        linear = model.get_submodule(module_path)
        if float((linear.weight == 0).float().mean()) >= min_sparsity:
            block = block_size(linear.weight)
            setattr(model.get_submodule(parent_path), attr, SparseLinear(linear, block))
            done["bsr" if block else "csr"] += 1
    return done


def main(argv=None):
    parser = argparse.ArgumentParser(description="convert a sparse checkpoint directory to the compressed format "
                                                 "and/or to the Hugging Face BERT layout")
    parser.add_argument("checkpoint", help="a directory with ckpt.pt (e.g. out/bio-sparse90)")
    parser.add_argument("--to", help="write the compressed file here (e.g. out/bio-sparse90.sparse.pt)")
    parser.add_argument("--hf", help="write a Hugging Face directory here (config.json, pytorch_model.bin)")
    args = parser.parse_args(argv)
    ckpt = load_checkpoint(os.path.join(args.checkpoint, "ckpt.pt"))  # one-line errors: missing, damaged
    if "model_config" not in ckpt:
        raise SystemExit(f"error: {args.checkpoint}/ckpt.pt holds no model_config: not a checkpoint of this project")
    if args.to and os.path.basename(args.to) in RUN_FILES:
        raise SystemExit(f"error: --to {args.to}: a training run's own file name; write e.g. "
                         f"{os.path.normpath(args.checkpoint)}.sparse.pt")
    if args.hf and any(os.path.exists(os.path.join(args.hf, name)) for name in RUN_FILES[:2]):
        raise SystemExit(f"error: --hf {args.hf} holds a training run (ckpt.pt or record.jsonl), whose config.json "
                         f"it would replace; write e.g. {os.path.normpath(args.checkpoint)}-hf")
    for path in (args.to, args.hf):  # an output folder that does not exist yet is made
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    model = BertForMaskedLM(BertConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    if args.to:
        if ckpt.get("pruner") is None:
            raise SystemExit(f"error: {args.checkpoint} has no pruning masks (a dense model); nothing to compress")
        try:
            size = save_sparse(model, args.to)
        except ValueError as e:  # too few zeros for the format to pay
            raise SystemExit(f"error: {args.checkpoint}: {e}") from None
        torch.save(model.state_dict(), args.to + ".dense.tmp")  # the same model saved densely, to compare
        dense_size = os.path.getsize(args.to + ".dense.tmp")
        os.remove(args.to + ".dense.tmp")
        prunable_dense, prunable_compressed = prunable_bytes(model)
        print(f"{args.to}: {size / 1e6:.2f} MB vs {dense_size / 1e6:.2f} MB dense ({dense_size / size:.1f}x smaller); "
              f"prunable weights {prunable_compressed / 1e6:.2f} MB vs {prunable_dense / 1e6:.2f} MB "
              f"({prunable_dense / prunable_compressed:.1f}x)")
    if args.hf:
        try:
            save_hf(model, args.hf)
        except ValueError as e:  # a deviation HF's BERT cannot express (ALiBi, pre-LN)
            raise SystemExit(f"error: {args.checkpoint}: {e}")
        print(f"{args.hf}: Hugging Face BERT (transformers.BertForMaskedLM.from_pretrained loads it)")
    if not (args.to or args.hf):
        parser.error("nothing to do: give --to and/or --hf")


if __name__ == "__main__":
    main()
