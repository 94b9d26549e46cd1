import pytest
import torch

from tiny_sparse_bert.model import BertConfig, BertForMaskedLM, BertForSequenceClassification
from tiny_sparse_bert.pruning_lab import SCORES, LabPruner, fisher_score, wanda_score
from tiny_sparse_bert.pruning import GradualMagnitudePruner, cubic_sparsity, prunable_parameters
from tiny_sparse_bert.train import make_optimizer

CFG = BertConfig(vocab_size=100, n_layer=2, hidden=32, n_head=4, intermediate=64, max_position=32)


def test_schedule_end_points_plateaus_monotonic():
    s = [cubic_sparsity(t, 0.0, 0.9, 10, 110) for t in range(0, 200)]
    assert s[0] == s[10] == 0.0 and s[110] == s[199] == 0.9
    assert all(a <= b for a, b in zip(s, s[1:]))
    assert cubic_sparsity(60, 0.0, 0.9, 10, 110) == pytest.approx(0.9 - 0.9 * 0.5 ** 3)
    assert s[20] - s[10] > s[110] - s[100]  # prunes fast early, slowly late


def test_prunable_weights_are_the_six_encoder_linears():
    names = set(prunable_parameters(BertForSequenceClassification(CFG, 3)))
    assert len(names) == 6 * CFG.n_layer
    assert all(n.startswith("bert.layers.") for n in names)  # no embeddings, pooler or classifier


@pytest.mark.parametrize("global_", [False, True])
def test_exact_zero_counts(global_):
    torch.manual_seed(0)
    model = BertForMaskedLM(CFG)
    pruner = GradualMagnitudePruner(model, 0.9, 0, 10, 5, global_=global_)
    for step in (0, 5, 7, 10):
        pruner.update(step)
        s = pruner.target(step) if pruner.should_update(step) else pruner.current_target
        params = prunable_parameters(model).values()
        if global_:
            assert sum(int((p == 0).sum()) for p in params) == round(s * sum(p.numel() for p in params))
        else:
            assert all(int((p == 0).sum()) == round(s * p.numel()) for p in params)
    assert pruner.sparsity() == pytest.approx(0.9, abs=1e-3)


def test_ties_broken_deterministically():
    model = BertForMaskedLM(CFG)
    for p in prunable_parameters(model).values():
        torch.nn.init.constant_(p, 0.5)  # all scores tie
    pruner = GradualMagnitudePruner(model, 0.5, 0, 0, 1)
    pruner.update(0)
    first = {n: m.clone() for n, m in pruner.masks.items()}
    pruner.update(0)
    assert all(torch.equal(first[n], m) for n, m in pruner.masks.items())
    assert all(not m.flatten()[: m.numel() // 2].any() for m in first.values())


def train_steps(model, pruner, steps, wd=0.1):
    opt = make_optimizer(model, 1e-2, wd)
    ids = torch.randint(5, 100, (4, 16))
    for step in range(steps):
        pruner.update(step)
        _, loss = model(ids, labels=ids)
        loss.backward()
        opt.step()
        opt.zero_grad()
        pruner.apply()
    return opt


def test_pruned_weights_stay_zero_under_adamw_and_masks_only_grow():
    torch.manual_seed(0)
    model = BertForMaskedLM(CFG)
    pruner = GradualMagnitudePruner(model, 0.8, 0, 16, 2)
    previous = {n: m.clone() for n, m in pruner.masks.items()}
    opt = make_optimizer(model, 1e-2, 0.1)
    ids = torch.randint(5, 100, (4, 16))
    for step in range(20):  # AdamW with weight decay and momentum
        pruner.update(step)
        for n, m in pruner.masks.items():
            assert not (m & ~previous[n]).any(), "a pruned weight came back"
            previous[n] = m.clone()
        _, loss = model(ids, labels=ids)
        loss.backward()
        opt.step()
        opt.zero_grad()
        pruner.apply()
        for n, p in pruner.params.items():
            assert (p[~pruner.masks[n]] == 0).all()
    assert pruner.sparsity() == pytest.approx(0.8, abs=1e-3)


def test_masks_survive_save_load_and_frozen_masks(tmp_path):
    torch.manual_seed(0)
    model = BertForMaskedLM(CFG)
    pruner = GradualMagnitudePruner(model, 0.7, 0, 4, 2)
    train_steps(model, pruner, 6)
    torch.save({"model": model.state_dict(), "pruner": pruner.state_dict()}, tmp_path / "c.pt")
    ckpt = torch.load(tmp_path / "c.pt", weights_only=True)
    model2 = BertForMaskedLM(CFG)
    model2.load_state_dict(ckpt["model"])
    pruner2 = GradualMagnitudePruner(model2)
    pruner2.load_state_dict(ckpt["pruner"])
    assert all(torch.equal(pruner.masks[n], pruner2.masks[n]) for n in pruner.masks)
    assert pruner2.end_step == 4 and pruner2.final_sparsity == 0.7
    frozen = GradualMagnitudePruner.from_sparse_model(model2)
    assert frozen.frozen and all(torch.equal(pruner.masks[n], frozen.masks[n]) for n in pruner.masks)
    train_steps(model2, frozen, 5)  # frozen masks are never updated, zeros stay exactly where they were
    assert all(torch.equal(p != 0, pruner.masks[n]) for n, p in frozen.params.items())
    with pytest.raises(ValueError, match="another config"):
        GradualMagnitudePruner(BertForMaskedLM(BertConfig(vocab_size=100, n_layer=1, hidden=32, n_head=4,
                                                   intermediate=64))).load_state_dict(ckpt["pruner"])


def test_sparsity_report():
    model = BertForMaskedLM(CFG)
    pruner = GradualMagnitudePruner(model, 0.5, 0, 0, 1)
    pruner.update(0)
    report = pruner.sparsity_report(model)
    assert "bert.layers.1.out.weight" in report and "50.0% of prunable" in report


VARIANTS = [(score, pattern) for score in SCORES for pattern in ("unstructured", "4x4", "neurons")]


def exact_zeros(pruner, s):
    """The zeros each tensor (unstructured, blocks) or pair of tensors (neurons) must have at sparsity s."""
    if pruner.pattern == "neurons":  # per pair: round(s * units) whole rows / columns
        from tiny_sparse_bert.pruning_lab import neuron_groups
        return all(int((~pruner.masks[name]).all(1 - axis).sum()) == round(s * pruner.params[name].shape[axis])
                   for group in neuron_groups(pruner.params) for name, axis in group)
    block = 1 if pruner.pattern == "unstructured" else 16
    return all(int((p == 0).sum()) == round(s * p.numel() / block) * block for p in pruner.params.values())


@pytest.mark.parametrize("score, pattern", VARIANTS)
def test_every_score_and_pattern_reaches_the_schedule_and_never_revives_a_weight(score, pattern):
    """Exact scheduled sparsity at every update; pruned weights stay zero under AdamW with weight decay,
    whatever the score: here a random order changes at every update, and a movement score is pushed
    towards the pruned weights by a loss that wants them large."""
    torch.manual_seed(0)
    model = BertForMaskedLM(CFG)
    pruner = LabPruner(model, 0.8, 0, 12, 3, score=score, pattern=pattern)
    opt = make_optimizer(model, 1e-2, 0.1)
    ids = torch.randint(5, 100, (4, 16))
    previous = {n: m.clone() for n, m in pruner.masks.items()}
    for step in range(16):
        if pruner.update(step):
            assert exact_zeros(pruner, pruner.current_target), step
        for n, m in pruner.masks.items():
            assert not (m & ~previous[n]).any(), f"a pruned weight came back at step {step}"
            previous[n] = m.clone()
        _, loss = model(ids, labels=ids)
        # a term that pulls every pruned weight away from zero: its gradient favours reviving them
        loss = loss - sum((p * (~pruner.masks[n])).abs().sum() + (p.detach() * ~pruner.masks[n]).sum() * p.sum()
                          for n, p in pruner.params.items()) * 1e-3
        loss.backward()
        pruner.accumulate()
        opt.step()
        opt.zero_grad()
        pruner.apply()
        assert all((p[~pruner.masks[n]] == 0).all() for n, p in pruner.params.items())
    assert exact_zeros(pruner, 0.8)


def test_block_masks_are_whole_blocks_and_neuron_masks_whole_neurons():
    torch.manual_seed(0)
    model = BertForMaskedLM(CFG)
    LabPruner(model, 0.75, 0, 0, 1, pattern="4x4").update(0)
    for p in prunable_parameters(model).values():
        blocks = (p != 0).reshape(p.shape[0] // 4, 4, p.shape[1] // 4, 4)
        assert (blocks.all(3).all(1) | ~blocks.any(3).any(1)).all()  # each block all kept or all pruned
    model = BertForMaskedLM(CFG)
    LabPruner(model, 0.75, 0, 0, 1, pattern="neurons").update(0)
    for layer in model.bert.layers:
        dead = (layer.out.weight == 0).all(0)  # neuron i: column i of out ...
        assert dead.float().mean() == 0.75 and ((layer.inter.weight == 0).all(1) == dead).all()  # ... row i of inter
        assert ((layer.query.weight == 0).all(1) == (layer.key.weight == 0).all(1)).all()


def test_movement_scores_prune_the_weights_training_pulls_to_zero():
    """-w * grad summed: a weight whose gradient shrinks it (w and grad of one sign) scores low."""
    torch.manual_seed(0)
    model = BertForMaskedLM(CFG)
    pruner = LabPruner(model, 0.5, 0, 1, 1, score="movement")
    for n, p in pruner.params.items():
        p.grad = p.detach().sign() * (torch.arange(p.numel()).view_as(p) % 2 * 2 - 1).float()  # shrink odd ones
    pruner.accumulate()
    pruner.update(1)
    for n, p in pruner.params.items():
        odd = (torch.arange(p.numel()).view_as(p) % 2 == 1)
        assert (~pruner.masks[n] == odd).all()  # exactly the weights the gradient pulled towards zero


def test_a_frozen_block_mask_keeps_its_blocks_through_training(tmp_path):
    torch.manual_seed(0)
    model = BertForSequenceClassification(CFG, 3)
    LabPruner(model, 0.9, 0, 0, 1, pattern="4x4").update(0)
    frozen = GradualMagnitudePruner.from_sparse_model(model)
    before = {n: p != 0 for n, p in frozen.params.items()}
    opt = make_optimizer(model, 1e-2, 0.1)
    ids = torch.randint(5, 100, (4, 16))
    for _ in range(5):
        _, loss = model(ids, labels=torch.tensor([0, 1, 2, 0]))
        loss.backward()
        opt.step()
        opt.zero_grad()
        frozen.apply()
    assert all(torch.equal(p != 0, before[n]) for n, p in frozen.params.items())


def test_the_pruner_state_resumes_score_pattern_and_movement():
    torch.manual_seed(0)
    model = BertForMaskedLM(CFG)
    pruner = LabPruner(model, 0.5, 0, 4, 2, score="movement", pattern="neurons")
    for p in pruner.params.values():
        p.grad = torch.randn_like(p)
    pruner.accumulate()
    state = pruner.state_dict()
    again = LabPruner(model)
    again.load_state_dict(state)
    assert (again.score, again.pattern) == ("movement", "neurons")
    with pytest.raises(ValueError, match="LabPruner"):  # the paper's pruner does not take the lab's masks silently
        GradualMagnitudePruner(model).load_state_dict(state)
    assert all(torch.equal(again.stats[n], pruner.stats[n]) for n in pruner.stats)
    with pytest.raises(SystemExit, match="--prune-pattern '3y3'"):
        LabPruner(model, pattern="3y3")


def test_n_of_m_keeps_n_of_every_m_weights_along_the_input_and_never_revives():
    """2:4 on a gradual schedule: exact scheduled sparsity per tensor at every update, never more than
    M - N zeros in a group of M consecutive inputs, exactly N kept in each at the end."""
    torch.manual_seed(0)
    model = BertForMaskedLM(CFG)
    pruner = LabPruner(model, 0.5, 0, 6, 2, pattern="2:4")
    opt = make_optimizer(model, 1e-2, 0.1)
    ids = torch.randint(5, 100, (4, 16))
    previous = {n: m.clone() for n, m in pruner.masks.items()}
    for step in range(8):
        if pruner.update(step):
            for n, p in pruner.params.items():
                zeros = (p == 0).view(p.shape[0], -1, 4).sum(-1)
                assert int(zeros.sum()) == round(pruner.current_target * p.numel()) and int(zeros.max()) <= 2
        assert all(not (m & ~previous[n]).any() for n, m in pruner.masks.items()), step
        previous = {n: m.clone() for n, m in pruner.masks.items()}
        _, loss = model(ids, labels=ids)
        loss.backward()
        opt.step()
        opt.zero_grad()
        pruner.apply()
    assert all(((p != 0).view(p.shape[0], -1, 4).sum(-1) == 2).all() for p in pruner.params.values())
    with pytest.raises(AssertionError, match="50%"):  # 2:4 is 50% sparse, not 90%
        LabPruner(model, 0.9, pattern="2:4")


def test_one_shot_prunes_everything_at_one_step():
    torch.manual_seed(0)
    model = BertForMaskedLM(CFG)
    pruner = LabPruner(model, 0.9, 5, 5, 20, score="fisher")
    assert [step for step in range(12) if pruner.should_update(step)] == [5]
    assert pruner.target(4) == 0.0 and pruner.target(5) == 0.9


def test_the_data_scores_rank_by_their_formulas():
    """Hand-made weights, gradients and inputs: each score is its paper's formula."""
    w = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    assert torch.equal(wanda_score(w, torch.tensor([4.0, 0.25])), torch.tensor([[2.0, 1.0], [6.0, 0.25]]))
    assert torch.equal(fisher_score(w, torch.tensor([[1.0, 0.0], [0.5, 4.0]])), torch.tensor([[1.0, 0.0], [4.5, 1.0]]))
    for score, expected in (("taylor", lambda w, g0, g1: 0.9 * (w * g0).abs() + (w * g1).abs()),
                            ("fisher", lambda w, g0, g1: w * w * (g0 * g0 + g1 * g1)),
                            ("movement", lambda w, g0, g1: -w * (g0 + g1))):
        torch.manual_seed(0)
        model = BertForMaskedLM(CFG)
        grads = [{n: torch.randn_like(p) for n, p in prunable_parameters(model).items()} for _ in range(2)]
        pruner = LabPruner(model, 0.5, 0, 2, 2, score=score)
        for g in grads:
            for n, p in pruner.params.items():
                p.grad = g[n]
            pruner.accumulate()
        w = {n: p.detach().clone() for n, p in pruner.params.items()}
        s = {n: expected(w[n], grads[0][n], grads[1][n]) for n in w}
        assert all(torch.allclose(SCORES[score](w[n], pruner.stats[n]), s[n]) for n in w), score
        pruner.update(2)  # the lowest half of each tensor by the formula goes
        assert all(torch.equal(~pruner.masks[n], s[n] <= s[n].flatten().kthvalue(s[n].numel() // 2).values)
                   for n in w), score


def test_wanda_gathers_each_layers_input_norms_in_training_only():
    torch.manual_seed(0)
    model = BertForMaskedLM(CFG)
    pruner = LabPruner(model, 0.5, 0, 4, 2, score="wanda")
    seen = {}
    query = model.bert.layers[1].query
    hook = query.register_forward_hook(lambda m, inputs, out: seen.setdefault("x", inputs[0].detach()))
    ids = torch.randint(5, 100, (3, 16))
    model(ids)
    model.eval()
    model(ids)  # evaluation adds nothing
    hook.remove()
    x = seen["x"].reshape(-1, CFG.hidden)
    name = "bert.layers.1.query.weight"
    assert torch.allclose(pruner.stats[name], (x * x).sum(0), rtol=1e-5)
    pruner.update(4)
    s = pruner.params[name].detach().abs() * (x * x).sum(0).sqrt()
    assert torch.equal(~pruner.masks[name], s <= s.flatten().kthvalue(s.numel() // 2).values)
    again = LabPruner(model)
    again.load_state_dict(pruner.state_dict())  # a resumed Wanda pruner gathers again
    model.train()
    model(ids)
    assert again.stats[name].sum() > 0 and len(again.hooks) == len(again.params)
