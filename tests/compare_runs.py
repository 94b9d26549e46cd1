"""Compare two output folders of the scripts: a refactor must leave every tensor and every score as it was.

    python tests/compare_runs.py OLD NEW     # e.g. out-lab of the last commit against out-lab of this one

Record OLD before a change (the tiny preset for seconds, `--preset lab` for the README's numbers),
run the same commands after it into NEW, then compare. Every checkpoint (ckpt.pt and fine-tuning
teachers) must hold tensor-identical models, optimizer states, masks and RNG states; tokenizers
must be byte-identical; config.json, record.jsonl, runs.json and results.json must hold the same
values (results.json: runs, scores, intervals). What may differ: the wall-clock fields
(`ms_per_step`, times), the sha256 of checkpoint files (their bytes hold the config's field
order) and the folder names themselves (OLD's path is read as NEW's).
Exits 1 and lists every difference, else prints what it compared.
"""
import json
import os
import sys

import torch

TIMING = {"ms_per_step", "minutes", "seconds", "wall_s"}  # measured, so never equal twice
# sha256 of the checkpoint files (runs.json's settings): the bytes hold the run config's field
# order too, so a refactor may change them; the checkpoints themselves are compared tensor by tensor
FILE_HASHES = {"checkpoints"}


def normalise(value, old_root, new_root):
    """Paths under OLD read as under NEW; timing fields dropped; tensors compared exactly elsewhere."""
    if isinstance(value, dict):
        return {normalise(k, old_root, new_root): normalise(v, old_root, new_root) for k, v in value.items()
                if k not in TIMING | FILE_HASHES}
    if isinstance(value, (list, tuple)):
        return [normalise(v, old_root, new_root) for v in value]
    if isinstance(value, str):
        return value.replace(old_root, new_root)
    return value


def differences(a, b, where):
    """Where two loaded objects (tensors, dicts, lists, numbers, strings) differ, as a list of lines."""
    if torch.is_tensor(a) or torch.is_tensor(b):
        same = torch.is_tensor(a) and torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape \
            and torch.equal(a, b)
        return [] if same else [f"{where}: tensors differ"]
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{where}: key {k!r} only in one" for k in sorted(set(a) ^ set(b), key=str)]
        for k in a:
            if k in b:
                out += differences(a[k], b[k], f"{where}.{k}")
        return out
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{where}: {len(a)} against {len(b)} items"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}[{i}]")]
    return [] if a == b else [f"{where}: {a!r} against {b!r}"]


def load(path, old_root, new_root):
    if path.endswith(".pt"):
        return normalise(torch.load(path, map_location="cpu", weights_only=True), old_root, new_root)
    if path.endswith(".jsonl"):
        with open(path) as f:
            return [normalise(json.loads(line), old_root, new_root) for line in f]
    if path.endswith(".json") and not path.endswith("tokenizer.json"):
        with open(path) as f:
            return normalise(json.load(f), old_root, new_root)
    with open(path, "rb") as f:
        return f.read()


def compare(old, new):
    old_root, new_root = os.path.abspath(old), os.path.abspath(new)
    files = sorted(os.path.relpath(os.path.join(d, f), old) for d, _, fs in os.walk(old) for f in fs
                   if f.endswith((".pt", ".json", ".jsonl")))
    problems = []
    for name in files:
        if not os.path.exists(os.path.join(new, name)):
            problems.append(f"{name}: missing in {new}")
            continue
        a, b = (load(os.path.join(root, name), old_root, new_root) for root in (old, new))
        a = normalise(a, old, new) if not isinstance(a, bytes) else a  # relative paths too (out-lab/...)
        problems += differences(a, b, name)
    return files, problems


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__.splitlines()[2].strip())
    files, problems = compare(*sys.argv[1:])
    if not files:
        raise SystemExit(f"error: {sys.argv[1]} holds no checkpoints, records or results to compare")
    if problems:
        print("\n".join(problems))
        raise SystemExit(f"{len(problems)} differences in {len(files)} files")
    print(f"identical: {len(files)} files ({', '.join(sorted({os.path.splitext(f)[1] for f in files}))}), "
          f"every tensor and every value outside the timings")
