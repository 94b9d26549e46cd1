import os

import pytest
import torch

from tiny_sparse_bert.model import BertConfig, BertForMaskedLM, BertForSequenceClassification
from tiny_sparse_bert.pruning_lab import LabPruner
from tiny_sparse_bert.pruning import GradualMagnitudePruner
from tiny_sparse_bert.sparse import SparseLinear, convert_to_sparse, load_sparse, main, prunable_bytes, save_sparse
from tiny_sparse_bert.bookkeeping import save_checkpoint

CFG = BertConfig(vocab_size=200, n_layer=2, hidden=64, n_head=4, intermediate=256, max_position=64)


def pruned(model, sparsity=0.9):
    torch.manual_seed(0)
    pruner = GradualMagnitudePruner(model, sparsity, 0, 0, 1)
    pruner.update(0)
    return model, pruner


def test_round_trip_is_exact_and_small(tmp_path):
    torch.manual_seed(0)
    model, _ = pruned(BertForMaskedLM(CFG))
    save_sparse(model, str(tmp_path / "m.sparse.pt"))
    back = load_sparse(str(tmp_path / "m.sparse.pt"))
    for (k, a), b in zip(model.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), k
    dense, compressed = prunable_bytes(model)
    assert dense / compressed > 7  # 32 bits vs 1 + 0.1 * 32 bits per weight at 90% sparsity
    torch.save(model.state_dict(), tmp_path / "dense.pt")
    assert os.path.getsize(tmp_path / "m.sparse.pt") < os.path.getsize(tmp_path / "dense.pt")


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="only 0.0% of its prunable weights are zero"):
        save_sparse(BertForMaskedLM(CFG), str(tmp_path / "x.pt"))
    model, _ = pruned(BertForMaskedLM(CFG))
    save_sparse(model, str(tmp_path / "m.pt"))
    other = BertConfig(vocab_size=200, n_layer=1, hidden=64, n_head=4, intermediate=256, max_position=64)
    with pytest.raises(ValueError, match="another model config"):
        load_sparse(str(tmp_path / "m.pt"), expected_config=other)
    dense_dir = tmp_path / "dense"
    save_checkpoint(str(dense_dir / "ckpt.pt"), model=BertForMaskedLM(CFG).state_dict(),
                    model_config=CFG.__dict__, pruner=None)
    with pytest.raises(SystemExit, match="has no pruning masks"):
        main([str(dense_dir), "--to", str(tmp_path / "d.sparse.pt")])
    alibi = BertConfig(**{**CFG.__dict__, "alibi": True})  # HF's BERT has no ALiBi: a one-line error
    save_checkpoint(str(tmp_path / "alibi" / "ckpt.pt"), model=BertForMaskedLM(alibi).state_dict(),
                    model_config=alibi.__dict__, pruner=None)
    with pytest.raises(SystemExit, match="ALiBi"):
        main([str(tmp_path / "alibi"), "--hf", str(tmp_path / "hf")])
    sparse_dir = tmp_path / "sparse"
    save_checkpoint(str(sparse_dir / "ckpt.pt"), model=model.state_dict(), model_config=CFG.__dict__, pruner={})
    main([str(sparse_dir), "--to", str(tmp_path / "new" / "folder" / "m.sparse.pt")])  # the folder is made
    before = (sparse_dir / "ckpt.pt").read_bytes()
    with pytest.raises(SystemExit, match="a training run's own file name"):  # never over the run's checkpoint
        main([str(sparse_dir), "--to", str(sparse_dir / "ckpt.pt")])
    with pytest.raises(SystemExit, match="holds a training run"):  # nor over its config.json
        main([str(sparse_dir), "--hf", str(sparse_dir)])
    assert (sparse_dir / "ckpt.pt").read_bytes() == before
    few = BertForMaskedLM(CFG)
    pruned(few, 0.3)
    save_checkpoint(str(tmp_path / "few" / "ckpt.pt"), model=few.state_dict(), model_config=CFG.__dict__, pruner={})
    with pytest.raises(SystemExit, match="only 30.0% of its prunable weights are zero"):
        main([str(tmp_path / "few"), "--to", str(tmp_path / "few.sparse.pt")])
    assert (tmp_path / "new" / "folder" / "m.sparse.pt").exists()
    (sparse_dir / "ckpt.pt").write_bytes((sparse_dir / "ckpt.pt").read_bytes()[:3000])
    with pytest.raises(SystemExit, match="ckpt.pt is damaged or not a checkpoint"):
        main([str(sparse_dir), "--to", str(tmp_path / "x.sparse.pt")])


def test_sparse_path_gives_the_same_outputs():
    torch.manual_seed(0)
    ids = torch.randint(5, 200, (3, 20))
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    mlm, _ = pruned(BertForMaskedLM(CFG).eval())
    classifier, _ = pruned(BertForSequenceClassification(CFG, 5).eval())
    for model in (mlm, classifier):
        with torch.no_grad():
            expected, _ = model(ids, mask)
            assert convert_to_sparse(model) == {"compacted": 0, "bsr": 0, "csr": 6 * CFG.n_layer}
            assert isinstance(model.bert.layers[1].inter, SparseLinear)
            got, _ = model(ids, mask)
        assert (got - expected).abs().max() <= 1e-4
    labels = torch.full_like(ids, -100)
    labels[0, 3], labels[2, 9] = 7, 8
    with torch.no_grad():  # the MLM path that runs its last layer at the labelled positions only
        selected, _ = mlm(ids, mask, labels=labels)
    assert (selected - mlm(ids, mask)[0][labels != -100]).abs().max() <= 1e-5


def test_dense_layers_stay_dense():
    model, _ = pruned(BertForMaskedLM(CFG), sparsity=0.5)
    assert convert_to_sparse(model) == {"compacted": 0, "bsr": 0, "csr": 0}
    assert isinstance(model.bert.layers[0].query, torch.nn.Linear)


@pytest.mark.parametrize("pattern, expected", [("4x4", {"compacted": 0, "bsr": 12, "csr": 0}),
                                               ("8x8", {"compacted": 0, "bsr": 12, "csr": 0}),
                                               ("neurons", {"compacted": 4, "bsr": 0, "csr": 0})])
@pytest.mark.parametrize("alibi", [False, True])
def test_block_and_neuron_pruned_models_are_recognised_and_give_the_same_outputs(pattern, expected, alibi):
    """convert_to_sparse finds the structure from the zeros alone: BSR for whole blocks, smaller dense
    feed-forwards and attentions for whole neurons (no sparse product left); outputs within 1e-4,
    padding included."""
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(**{**CFG.__dict__, "alibi": alibi}), 5).eval()
    LabPruner(model, 0.9, 0, 0, 1, pattern=pattern, global_=pattern == "neurons").update(0)  # uneven heads
    ids = torch.randint(5, 200, (3, 20))
    attention_mask = torch.ones_like(ids)
    attention_mask[1, 12:] = 0
    with torch.no_grad():
        expected_out, _ = model(ids, attention_mask)
        assert convert_to_sparse(model) == expected
        got, _ = model(ids, attention_mask)
    assert (got - expected_out).abs().max() <= 1e-4
    if pattern == "neurons":
        layer = model.bert.layers[0]
        kept = (layer.out.in_features, layer.query.out_features, layer.value.out_features)
        assert kept[0] < 0.2 * CFG.intermediate and max(kept[1:]) < 0.5 * CFG.hidden, kept
    else:
        assert model.bert.layers[0].query.block == int(pattern[0])
