import os

import pytest
import torch

from tiny_sparse_bert.cpu_dropout import attend_with_dropout, dropout

from tiny_sparse_bert.hf import load_hf, save_hf

from tiny_sparse_bert.model import (BertConfig, BertForMaskedLM, BertForSequenceClassification,
                                     BertForTokenClassification, IGNORE_INDEX, alibi_bias, alibi_slopes)

CFG = BertConfig(vocab_size=120, n_layer=2, hidden=32, n_head=4, intermediate=64, max_position=64)


def batch(B=3, T=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, CFG.vocab_size, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 10:] = 0  # the second sequence is padded
    ids[1, 10:] = 0
    return ids, mask


def test_output_shapes():
    ids, mask = batch()
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, 3] = labels[2, 5] = 7
    logits, loss = BertForMaskedLM(CFG)(ids, mask, labels=labels)
    assert logits.shape == (2, CFG.vocab_size) and loss.dim() == 0  # only the 2 labelled positions
    assert BertForMaskedLM(CFG)(ids, mask)[0].shape == (3, 16, CFG.vocab_size)
    logits, loss = BertForTokenClassification(CFG, 5)(ids, mask, labels=torch.zeros_like(ids))
    assert logits.shape == (3, 16, 5) and torch.isfinite(loss)
    logits, loss = BertForSequenceClassification(CFG, 4)(ids, mask, labels=torch.tensor([0, 1, 3]))
    assert logits.shape == (3, 4) and torch.isfinite(loss)
    logits, loss = BertForSequenceClassification(CFG, 4, multi_label=True)(ids, mask, labels=torch.ones(3, 4))
    assert logits.shape == (3, 4) and torch.isfinite(loss)


VARIANTS = [{}, {"pre_norm": True}, {"alibi": True}]  # BERT, and each named deviation


@pytest.mark.parametrize("variant", VARIANTS)
def test_sparse_prediction_equals_full_logits(variant):
    """With labels, the last layer and the head run at the labelled positions only: same logits there."""
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(**{**CFG.__dict__, **variant})).eval()
    ids, mask = batch()
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, 1], labels[2, 7] = 9, 11
    selected, _ = model(ids, mask, labels=labels)
    full, _ = model(ids, mask)
    torch.testing.assert_close(selected, full[labels != IGNORE_INDEX])


@pytest.mark.parametrize("variant", VARIANTS)
def test_padding_invariance(variant):
    """Changing padded tokens (ids and token types) changes nothing at the real positions."""
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(**{**CFG.__dict__, **variant})).eval()
    ids, mask = batch()
    other = ids.clone()
    other[1, 10:] = torch.randint(5, CFG.vocab_size, (6,))
    types = torch.zeros_like(ids)
    types[1, 10:] = 1
    a, _ = model(ids, mask)
    b, _ = model(other, mask, token_type_ids=types)
    torch.testing.assert_close(a[mask.bool()], b[mask.bool()], atol=1e-5, rtol=0)
    assert not torch.allclose(a[1, 10:], b[1, 10:])  # the padded positions did change


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("head", ["token", "sequence"])
def test_skipping_padding_changes_no_number(variant, head):
    """The task heads run the encoder on the real positions only: same logits, loss and gradients as
    with the padding computed, and the encoder's padded positions come out as zeros."""
    config = BertConfig(**{**CFG.__dict__, **variant, "dropout": 0.0})
    ids, mask = batch()
    if head == "token":
        labels = torch.randint(0, 3, ids.shape).masked_fill(~mask.bool(), IGNORE_INDEX)  # as tasks.collate does
    else:
        labels = torch.tensor([0, 2, 1])
    results = []
    for skip in (False, True):
        torch.manual_seed(0)
        model = BertForTokenClassification(config, 3) if head == "token" else BertForSequenceClassification(config, 3)
        model.skip_padding = skip
        logits, loss = model(ids, mask, labels=labels)
        loss.backward()
        results.append((logits, loss, {n: p.grad for n, p in model.named_parameters()}))
    (logits, loss, grads), (logits_skip, loss_skip, grads_skip) = results
    real = mask.bool() if head == "token" else slice(None)
    torch.testing.assert_close(logits_skip[real], logits[real], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(loss_skip, loss, atol=1e-6, rtol=1e-5)
    for name in grads:
        torch.testing.assert_close(grads_skip[name], grads[name], atol=1e-6, rtol=1e-4, msg=name)
    hidden = model.bert(ids, mask, skip_padding=True)
    assert hidden[~mask.bool()].abs().sum() == 0 and hidden[mask.bool()].abs().sum() > 0


def test_loss_decreases_when_overfitting_one_batch():
    torch.manual_seed(0)
    model = BertForMaskedLM(CFG)
    ids, mask = batch()
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, IGNORE_INDEX))
    inputs = torch.where(torch.rand(ids.shape) < 0.3, torch.full_like(ids, 4), ids)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        _, loss = model(inputs, mask, labels=labels)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::10]


def test_hf_round_trip(tmp_path):
    torch.manual_seed(0)
    model = BertForMaskedLM(CFG).eval()
    save_hf(model, tmp_path)
    assert {"config.json", "pytorch_model.bin"} <= set(os.listdir(tmp_path))
    back = load_hf(tmp_path).eval()
    for (k, v), (k2, v2) in zip(model.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    with pytest.raises(ValueError, match="pre-LayerNorm"):
        save_hf(BertForMaskedLM(BertConfig(**{**CFG.__dict__, "pre_norm": True})), tmp_path / "pre")
    with pytest.raises(ValueError, match="ALiBi"):
        save_hf(BertForMaskedLM(BertConfig(**{**CFG.__dict__, "alibi": True})), tmp_path / "alibi")


def test_alibi_bias():
    """Press et al. 2022: head h adds -m_h * |i - j|, slopes 2^(-8h/nh); zero on the diagonal, symmetric."""
    bias = alibi_bias(4, 5)
    assert bias.shape == (4, 5, 5)
    torch.testing.assert_close(alibi_slopes(4), torch.tensor([2**-2, 2**-4, 2**-6, 2**-8]))
    assert torch.equal(bias, bias.transpose(1, 2)) and bias.diagonal(dim1=1, dim2=2).eq(0).all()
    assert bias[0, 0, 3] == -0.75 and bias[3, 4, 2] == -2 * 2**-8
    # it changes the model: same weights, different outputs with and without the bias
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(**{**CFG.__dict__, "alibi": True})).eval()
    plain = BertForMaskedLM(CFG).eval()
    plain.load_state_dict(model.state_dict())
    ids, mask = batch()
    assert not torch.allclose(model(ids, mask)[0], plain(ids, mask)[0])


def test_dropout():
    """Drops a fraction p in each of the four 16-bit slots of a 64-bit draw, scales the rest by 1/(1-p)."""
    torch.manual_seed(0)
    x = torch.ones(250_000, 4, requires_grad=True)  # column j = slot j of every draw
    y = dropout(x, 0.25)
    dropped = (y == 0).float().mean(0)
    assert torch.allclose(dropped, torch.full((4,), 0.25), atol=0.005), dropped
    assert torch.equal(y.unique(), torch.tensor([0.0, 1 / 0.75]))
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # the gradient goes through the kept elements, scaled
    assert dropout(x, 0.25, training=False) is x and dropout(x, 0.0) is x
    assert dropout(x.bfloat16(), 0.1).dtype == torch.bfloat16


@pytest.mark.parametrize("alibi", [False, True])
def test_attention_with_dropout_is_sdpa(alibi):
    """Written-out attention (used for dropout on a CPU) equals F.scaled_dot_product_attention at p=0."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 16, 8) for _ in range(3))
    mask = torch.ones(2, 1, 1, 16, dtype=torch.bool)
    mask[1, ..., 10:] = False
    if alibi:
        mask = alibi_bias(4, 16) + torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(attend_with_dropout(q, k, v, mask, 0.0), expected)
    # with dropout, padded keys still get no weight: changing their values changes nothing
    v2 = v.clone()
    v2[1, :, 10:] = 100.0
    torch.manual_seed(1)
    out = attend_with_dropout(q, k, v, mask, 0.5)
    torch.manual_seed(1)
    torch.testing.assert_close(attend_with_dropout(q, k, v2, mask, 0.5), out)


@pytest.mark.parametrize("variant", [{}, {"alibi": True}])
def test_padding_invariance_in_training(variant):
    """With dropout on (training mode, same seed), padded tokens still change nothing at real positions."""
    model = BertForMaskedLM(BertConfig(**{**CFG.__dict__, **variant, "dropout": 0.1})).train()
    ids, mask = batch()
    other = ids.clone()
    other[1, 10:] = 7
    torch.manual_seed(3)
    a = model(ids, mask)[0]
    torch.manual_seed(3)
    b = model(other, mask)[0]
    torch.testing.assert_close(a[1, :10], b[1, :10])
    assert not torch.allclose(model(ids, mask)[0], a)  # and dropout is really on


def test_same_logits_as_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = BertForMaskedLM(CFG).eval()
    save_hf(model, tmp_path / "ours")
    hf = transformers.BertForMaskedLM.from_pretrained(tmp_path / "ours").eval()
    ids, mask = batch()
    with torch.no_grad():
        ours, _ = model(ids, mask)
        theirs = hf(input_ids=ids, attention_mask=mask).logits
    assert (ours - theirs)[mask.bool()].abs().max() < 1e-5
    hf.save_pretrained(tmp_path / "theirs")  # transformers' own format (safetensors) loads back too
    with torch.no_grad():
        assert (load_hf(tmp_path / "theirs").eval()(ids, mask)[0] - ours)[mask.bool()].abs().max() < 1e-5
