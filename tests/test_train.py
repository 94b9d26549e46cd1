import json
import math
import os
import signal
import time
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tiny_sparse_bert.bookkeeping import Checkpoints, NonFiniteLoss, Reporting, load_checkpoint
from tiny_sparse_bert.data import NUM_SPECIAL, Blocks, mlm_batch
from tiny_sparse_bert.distillation import Distillation
from tiny_sparse_bert.model import IGNORE_INDEX, BertConfig, BertForMaskedLM, BertForTokenClassification
from tiny_sparse_bert.pruning import GradualMagnitudePruner
from tiny_sparse_bert.runtime import Runtime
from tiny_sparse_bert.train import linear_warmup_decay, make_optimizer, train

CFG = BertConfig(vocab_size=100, n_layer=2, hidden=32, n_head=4, intermediate=64, max_position=32, dropout=0.1)
TOKENS = np.random.default_rng(0).integers(NUM_SPECIAL, 100, 30 * 40).astype(np.uint16)


def setup(seed=0):
    torch.manual_seed(seed)
    model = BertForMaskedLM(CFG)
    optimizer = make_optimizer(model, 1e-3, 0.01)
    pruner = GradualMagnitudePruner(model, 0.8, 2, 8, 2)
    blocks = Blocks(TOKENS, 32, 4, seed=0)
    return model, optimizer, pruner, lambda step: mlm_batch(blocks, step, 0.15, 100, 0)


def run(model, optimizer, pruner, batch_fn, steps, path, start=0, **kw):
    train(model, optimizer, batch_fn, steps, peak_lr=1e-3, warmup_steps=2, pruner=pruner,
          ckpt=Checkpoints(path=str(path), every=0, start_step=start),
          report=Reporting(log_every=100), **kw)


def test_lr_schedule():
    lrs = [linear_warmup_decay(s, 1.0, 10, 100) for s in range(100)]
    assert lrs[9] == 1.0 and lrs[0] == 0.1 and lrs[-1] == pytest.approx(1 / 90)
    assert max(lrs) == 1.0 and all(a >= b for a, b in zip(lrs[9:], lrs[10:]))


def test_resume_equals_uninterrupted_run(tmp_path):
    model, optimizer, pruner, batch_fn = setup()
    run(model, optimizer, pruner, batch_fn, 10, tmp_path / "full.pt")

    # the same run interrupted by Ctrl-C during step 4 (it completes the step and saves) ...
    m, o, p, fn = setup()

    def interrupting(step):
        if step == 4:
            os.kill(os.getpid(), signal.SIGINT)
        return fn(step)
    with pytest.raises(SystemExit):
        run(m, o, p, interrupting, 10, tmp_path / "part.pt")
    # ... and resumed from its checkpoint in a fresh state
    torch.manual_seed(123)  # disturb the global RNG: resume must restore it
    ckpt = load_checkpoint(tmp_path / "part.pt")
    assert ckpt["step"] == 5
    m, o, p, fn = setup(seed=99)
    m.load_state_dict(ckpt["model"])
    o.load_state_dict(ckpt["optimizer"])
    p.load_state_dict(ckpt["pruner"])
    torch.set_rng_state(ckpt["rng"])
    run(m, o, p, fn, 10, tmp_path / "part.pt", start=5)
    for (k, a), b in zip(model.state_dict().items(), m.state_dict().values()):
        assert torch.equal(a, b), k
    assert all(torch.equal(pruner.masks[n], p.masks[n]) for n in pruner.masks)


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path):
    model, optimizer, pruner, batch_fn = setup()

    def poisoned(step):
        if step == 6:
            with torch.no_grad():
                model.decoder_bias.fill_(float("nan"))
        return batch_fn(step)
    with pytest.raises(NonFiniteLoss, match="at step 6"):
        train(model, optimizer, poisoned, 10, peak_lr=1e-3, warmup_steps=2,
              ckpt=Checkpoints(path=str(tmp_path / "c.pt"), every=4),
              report=Reporting(log_every=100))
    ckpt = load_checkpoint(tmp_path / "c.pt")
    assert ckpt["step"] == 4 and torch.isfinite(ckpt["model"]["decoder_bias"]).all()


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])  # Ctrl-C, and a batch scheduler's stop
def test_ctrl_c_saves_and_exits(tmp_path, stop):
    model, optimizer, pruner, batch_fn = setup()
    before = signal.getsignal(stop)  # Python's default, or SIG_IGN under `nohup ... &`

    def interrupting(step):
        if step == 3:
            os.kill(os.getpid(), stop)
        return batch_fn(step)
    with pytest.raises(SystemExit) as e:
        train(model, optimizer, interrupting, 10, peak_lr=1e-3, warmup_steps=2, pruner=pruner,
              ckpt=Checkpoints(path=str(tmp_path / "c.pt"), every=0, extra_state={"note": "kept"}),
              report=Reporting(log_every=100))
    assert e.value.code == 130
    ckpt = load_checkpoint(tmp_path / "c.pt")
    assert ckpt["step"] == 4 and ckpt["note"] == "kept"  # the step in flight completed, then it saved
    assert not ckpt["finished"]  # --init and --models refuse it (config.load_run)
    assert signal.getsignal(stop) is before  # the caller's handler restored


@pytest.mark.filterwarnings("ignore:CUDA is not available")
def test_cuda_arguments_without_a_gpu(monkeypatch):
    """The CUDA-only lines, exercised for argument handling on a machine without a GPU."""
    from tiny_sparse_bert.runtime import autocast, pick_device, setup_distributed, use_bf16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no CUDA GPU"):
        pick_device("cuda")
    assert pick_device("auto").type == "cpu"
    assert isinstance(autocast(torch.device("cuda"), True), torch.autocast)  # bf16 autocast object for CUDA
    assert use_bf16(torch.device("cuda")) and not use_bf16(torch.device("cpu"), "fp32")
    with pytest.raises(SystemExit, match="--precision"):
        use_bf16(torch.device("cpu"), "fp16")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="no Apple GPU"):
        pick_device("mps")
    monkeypatch.delenv("RANK", raising=False)
    assert setup_distributed("cpu") == (0, 1, torch.device("cpu"))


def test_no_checkpoint_ever_holds_a_non_finite_tensor(tmp_path, monkeypatch):
    """lr 1000 blows the weights up: every checkpoint written on the way must still be finite, and the
    error must name one that exists (the issue: a finite loss, then non-finite weights saved)."""
    import tiny_sparse_bert.bookkeeping as bookkeeping_module
    saved = []

    def recording_save(path, **state):
        tensors = list(state["model"].values()) + [t for s in state["optimizer"]["state"].values() for t in s.values()]
        saved.append(all(torch.isfinite(t).all() for t in tensors if t.is_floating_point()))
        return save(path, **state)
    save = bookkeeping_module.save_checkpoint
    monkeypatch.setattr(bookkeeping_module, "save_checkpoint", recording_save)
    model, _, _, batch_fn = setup()
    with pytest.raises(NonFiniteLoss) as e:
        train(model, make_optimizer(model, 1e3, 0.01), batch_fn, 50, peak_lr=1e3, warmup_steps=2,
              ckpt=Checkpoints(path=str(tmp_path / "c.pt"), every=1),
              report=Reporting(log_every=7))
    assert saved and all(saved)
    assert f"the last good checkpoint is {tmp_path / 'c.pt'}" in str(e.value)
    assert all(torch.isfinite(t).all() for t in load_checkpoint(tmp_path / "c.pt")["model"].values())


def test_finite_loss_with_a_non_finite_gradient_is_never_saved(tmp_path):
    """The issue's case: the loss of step 5 is finite, its gradient is not, so the weights after
    step 5 are NaN; the checkpoint at step 6 must not be written, and the error names step 5's."""
    model, optimizer, _, batch_fn = setup()
    current = {}
    model.decoder_bias.register_hook(lambda g: g * float("nan") if current["step"] == 5 else g)

    def tracking(step):
        current["step"] = step
        return batch_fn(step)
    with pytest.raises(NonFiniteLoss, match="at step 5; stopped, the last good checkpoint is"):
        train(model, optimizer, tracking, 10, peak_lr=1e-3, warmup_steps=2,
              ckpt=Checkpoints(path=str(tmp_path / "c.pt"), every=1),
              report=Reporting(log_every=100))
    ckpt = load_checkpoint(tmp_path / "c.pt")
    assert ckpt["step"] == 5 and all(torch.isfinite(t).all() for t in ckpt["model"].values())


def test_non_finite_before_any_checkpoint_says_so(tmp_path):
    model, optimizer, _, batch_fn = setup()

    def poisoned(step):
        if step == 2:
            with torch.no_grad():
                model.decoder_bias.fill_(float("inf"))
        return batch_fn(step)
    with pytest.raises(NonFiniteLoss, match="at step 2; stopped, no checkpoint was written"):
        train(model, optimizer, poisoned, 10, peak_lr=1e-3, warmup_steps=2,
              ckpt=Checkpoints(path=str(tmp_path / "c.pt"), every=4),
              report=Reporting(log_every=100))
    assert not os.path.exists(tmp_path / "c.pt")


@pytest.mark.parametrize("closing_error", [False, True])
def test_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch, closing_error):
    import errno
    from tiny_sparse_bert.bookkeeping import save_checkpoint
    path = str(tmp_path / "c.pt")
    save_checkpoint(path, model={}, model_config={}, step=1)

    def full_disk(obj, f):
        f.write(b"partial")
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        finally:
            if closing_error:  # what torch's zip writer does on a real full disk
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 955392 vs 955280")
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(SystemExit, match=f"error: could not write {path}: the disk is full; the previous .* is kept"):
        save_checkpoint(path, model={}, model_config={}, step=2)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["c.pt"] and load_checkpoint(path)["step"] == 1  # no .tmp left behind


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated zip", bytes(range(256)) * 4, "truncated"])
def test_damaged_checkpoint_is_a_one_line_error(tmp_path, content):
    path = tmp_path / "ckpt.pt"
    if content == "truncated":
        torch.save({"model": {"w": torch.zeros(1000)}, "model_config": {}}, path)
        path.write_bytes(path.read_bytes()[:-300])
    else:
        path.write_bytes(content)
    with pytest.raises(SystemExit) as e:
        load_checkpoint(str(path), "train_bio.py")
    assert str(e.value).startswith(f"error: {path} is damaged or not a checkpoint") and "train_bio.py" in str(e.value)
    assert "weights_only" not in str(e.value) and "\n" not in str(e.value)
    torch.save({"something": 1}, path)  # a readable file that is not one of our checkpoints
    with pytest.raises(SystemExit, match="not a checkpoint of this project"):
        load_checkpoint(str(path))


# ---------------------------------------------------------------------------------- distillation

@pytest.mark.parametrize("kind", ["mlm", "ner", "cls", "multi"])
def test_distillation_loss_is_zero_only_when_student_equals_teacher(kind):
    from tiny_sparse_bert.distillation import distillation_loss
    g = torch.Generator().manual_seed(0)
    shape = {"mlm": (20, 50), "ner": (3, 7, 5), "cls": (6, 4), "multi": (6, 4)}[kind]
    teacher = torch.randn(shape, generator=g) * 3
    labels = torch.randint(0, 5, shape[:2], generator=g) if kind == "ner" else None
    for T in (1.0, 2.0):
        assert distillation_loss(teacher.clone(), teacher, labels, kind, T).abs() < 1e-5
        student = teacher + torch.randn(shape, generator=g)
        assert distillation_loss(student, teacher, labels, kind, T) > 1e-3


def test_ner_distillation_ignores_padding_and_later_word_pieces():
    from tiny_sparse_bert.distillation import distillation_loss
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(2, 6, 3, generator=g)
    labels = torch.tensor([[IGNORE_INDEX, 1, IGNORE_INDEX, 0, IGNORE_INDEX, IGNORE_INDEX],   # [CLS] w ##p w [SEP] pad
                           [IGNORE_INDEX, 2, 0, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]])
    student = (teacher + torch.randn(2, 6, 3, generator=g)).requires_grad_()
    loss = distillation_loss(student, teacher, labels, "ner", 2.0)
    loss.backward()
    ignored = labels == IGNORE_INDEX
    assert (student.grad[ignored] == 0).all() and (student.grad[~ignored] != 0).any()
    moved = student.detach().clone()
    moved[ignored] += 100.0  # anything at padding, [CLS], [SEP] and non-first pieces
    assert torch.equal(distillation_loss(moved, teacher, labels, "ner", 2.0), loss.detach())


def test_the_teacher_gets_no_gradient_and_does_not_change(tmp_path):
    model, optimizer, pruner, batch_fn = setup()
    teacher = BertForMaskedLM(CFG)
    teacher.load_state_dict(model.state_dict())
    teacher.eval().requires_grad_(False)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    train(model, optimizer, batch_fn, 6, peak_lr=1e-3, warmup_steps=2, pruner=pruner,
          distill=Distillation(teacher, hardness=1.0),
          report=Reporting(log_every=100))
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert not torch.equal(before["decoder_bias"], model.decoder_bias)  # the student did learn


def test_mean_labelled_weighs_every_labelled_word_the_same():
    """Length-grouped batches hold different numbers of labelled words. With `mean_labelled`, the
    gradients of two steps add up to the gradient of the mean loss over all their words, as if the
    two batches were one; without it, the 4 words of the short batch weigh as much as the 24 of the long."""
    torch.manual_seed(0)
    model = BertForTokenClassification(replace(CFG, dropout=0.0), 3)
    g = torch.Generator().manual_seed(0)

    def batch(T, n_words):  # 2 sentences of T pieces; positions 1..n_words are labelled first pieces
        labels = torch.full((2, T), IGNORE_INDEX)
        labels[:, 1:1 + n_words] = torch.randint(0, 3, (2, n_words), generator=g)
        return {"input_ids": torch.randint(NUM_SPECIAL, 100, (2, T), generator=g), "labels": labels,
                "attention_mask": torch.ones(2, T, dtype=torch.long), "token_type_ids": torch.zeros(2, T, dtype=torch.long)}

    batches = [batch(4, 2), batch(16, 12)]  # 4 and 24 labelled words

    class RecordGradients(torch.optim.SGD):  # keeps each step's gradients, leaves the weights alone
        grads = []

        def step(self):
            self.grads.append([torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.parameters()])

    def summed_gradients(**kw):
        optimizer = RecordGradients(model.parameters(), lr=1.0)
        optimizer.grads = []
        train(model, optimizer, lambda step: batches[step], 2, peak_lr=1.0, warmup_steps=0, clip_norm=1e9,
              report=Reporting(log_every=100), **kw)
        return [a + b for a, b in zip(*optimizer.grads)]

    total = sum(F.cross_entropy(model(b["input_ids"], b["attention_mask"], b["token_type_ids"])[0].flatten(0, 1),
                                b["labels"].flatten(), ignore_index=IGNORE_INDEX, reduction="sum") for b in batches)
    (2 * total / 28).backward()  # two steps' worth of the mean over all 28 words
    expected = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    weighted, plain = summed_gradients(mean_labelled=14), summed_gradients()
    assert all(torch.allclose(w, e, atol=1e-6) for w, e in zip(weighted, expected))
    assert not all(torch.allclose(p, e, atol=1e-4) for p, e in zip(plain, expected))


def test_static_shape_mlm_head_gives_the_dynamic_loss():
    """mlm_batch(max_predictions=N): the same N positions every batch (padded with [CLS], label
    ignored), for torch.compile / CUDA graphs; loss and gradients equal the dynamic head's."""
    from tiny_sparse_bert.data import static_predictions
    blocks = Blocks(TOKENS, 32, 4, seed=0)
    n = static_predictions(4, 32, 0.4)
    assert n > 0.4 * 4 * 32
    torch.manual_seed(0)
    model = BertForMaskedLM(CFG).eval()  # no dropout: both paths see the same computation
    for step in range(3):
        dynamic = mlm_batch(blocks, step, 0.4, 100, 0)
        static = mlm_batch(blocks, step, 0.4, 100, 0, max_predictions=n)
        assert static["predict"].shape == (n,)
        assert all(torch.equal(dynamic[k], static[k]) for k in dynamic)
        losses, grads = [], []
        for batch in (dynamic, static):
            model.zero_grad()
            _, loss = model(**batch)
            loss.backward()
            losses.append(loss.detach())
            grads.append(model.bert.layers[-1].inter.weight.grad.clone())
        assert torch.allclose(losses[0], losses[1], atol=1e-6) and torch.allclose(grads[0], grads[1], atol=1e-6)
    few = mlm_batch(blocks, 0, 0.4, 100, 0, max_predictions=5)  # fewer slots than targets: the rest are dropped
    assert few["predict"].shape == (5,) and model(**few)[1].isfinite()


def test_bench_gpu_runs_on_a_cpu_as_a_smoke_test():
    import subprocess
    import sys
    from conftest import ROOT
    r = subprocess.run([sys.executable, "tests/bench_gpu.py", "--preset", "tiny", "--steps", "2", "--warmup", "1"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [line for line in r.stdout.splitlines() if line.startswith("| eager")]
    assert len(rows) == 2 and all(float(row.split("|")[2]) > 0 for row in rows)


def test_train_flops_of_bert_base_match_the_6nd_rule():
    """Kaplan et al.'s 6 x parameters x tokens, for the matmul weights, plus attention and the head."""
    import importlib.util
    from conftest import ROOT
    spec = importlib.util.spec_from_file_location("bench_gpu", os.path.join(ROOT, "tests", "bench_gpu.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    L, H, I, V, B, T = 12, 768, 3072, 8192, 256, 128
    P = B * T  # every position predicted: nothing skipped
    weights = L * (4 * H * H + 2 * H * I) + H * H + H * V
    attention = 3 * B * T * L * 4 * T * H
    assert bench.train_flops(L, H, I, V, B, T, P) == 6 * weights * B * T + attention


def test_device_auto_prefers_cuda_then_mps_then_cpu(monkeypatch):
    """--device auto, with each kind of accelerator faked visible or not (no GPU is touched)."""
    from tiny_sparse_bert.runtime import pick_device, to_device, use_bf16
    for cuda, mps, expected in ((True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
        assert pick_device("auto").type == expected
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert pick_device("mps").type == "mps"
    monkeypatch.setattr("tiny_sparse_bert.runtime.cpu_bf16_support", lambda: "amx_bf16")
    assert not use_bf16(torch.device("mps")) and use_bf16(torch.device("cpu"))  # auto: AMX is a CPU's, not mps's
    assert use_bf16(torch.device("mps"), "bf16")
    moved = []
    tensor = SimpleNamespace(to=lambda device: moved.append(device.type))  # records where it is sent
    to_device({"input_ids": tensor}, torch.device("mps"))
    assert moved == ["mps"]  # a batch for mps is moved there, not left on the CPU


def test_sparse_inference_says_it_does_not_run_on_mps():
    from tiny_sparse_bert.sparse import convert_to_sparse
    on_mps = SimpleNamespace(parameters=lambda: iter([SimpleNamespace(device=torch.device("mps"))]))
    with pytest.raises(ValueError, match="not on mps: call model.cpu"):
        convert_to_sparse(on_mps)


def test_precision_auto_follows_what_the_cpu_reports(monkeypatch):
    """bf16 where the CPU has native bf16 dot products (faked /proc/cpuinfo flags), fp32 elsewhere."""
    from tiny_sparse_bert import runtime as t
    flags = {"AMD EPYC (Zen 4)": ("fpu avx2 avx512f avx512_bf16 avx512_vnni", "avx512_bf16"),
             "Intel Xeon (Sapphire Rapids)": ("avx512f avx512_bf16 amx_bf16 amx_tile", "amx_bf16"),
             "ARM Neoverse V1": ("Features : fp asimd sve bf16 i8mm", "bf16"),
             "a laptop without bf16": ("fpu avx2 fma", None)}
    cpu = torch.device("cpu")
    for name, (cpuinfo, expected) in flags.items():
        assert t.cpu_bf16_support(cpuinfo) == expected, name
        monkeypatch.setattr(t, "cpu_bf16_support", lambda cpuinfo=None: expected)
        assert t.use_bf16(cpu) == (expected is not None), name
        assert t.precision_name(cpu, t.use_bf16(cpu)) == (f"bf16 ({expected})" if expected else "fp32")
        assert not t.use_bf16(cpu, "fp32") and t.use_bf16(cpu, "bf16")  # the override wins


def test_a_tiny_bf16_run_on_the_cpu_has_a_finite_loss(tmp_path):
    model, optimizer, pruner, batch_fn = setup()
    losses = []
    train(model, optimizer, batch_fn, 6, peak_lr=1e-3, warmup_steps=2, pruner=pruner,
          report=Reporting(log_every=1, eval_fn=None, record_path=str(tmp_path / "r.jsonl")),
          runtime=Runtime(bf16=True))
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "r.jsonl") if "loss" in line]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)


def test_a_stop_outside_the_loop_is_one_line_and_the_loop_puts_it_back(capsys):
    """Ctrl-C while data load or between phases: the message and exit 130, no traceback; inside
    train() the Bookkeeper's own handler (save, then exit) runs, and this one is back after it."""
    from tiny_sparse_bert.bookkeeping import stop_quietly
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        stop_quietly("stopped: nothing lost")
        quiet = signal.getsignal(signal.SIGINT)
        with pytest.raises(SystemExit) as e:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)  # the handler runs at the next bytecode
        assert e.value.code == 130 and capsys.readouterr().out == "stopped: nothing lost\n"
        model, optimizer, _, batch_fn = setup()
        train(model, optimizer, batch_fn, 2, peak_lr=1e-3, warmup_steps=1, report=Reporting(log_every=100))
        assert signal.getsignal(signal.SIGINT) is quiet
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
