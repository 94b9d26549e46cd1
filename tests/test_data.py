import os

import numpy as np
import pytest
import torch

from tiny_sparse_bert.data import (Blocks, CLS_ID, MASK_ID, NUM_SPECIAL, PAD_ID, SEP_ID, SPECIAL_TOKENS,
                                    load_tokenizer, mask_tokens, read_gutenberg, read_id_text, read_wikipedia,
                                    tokenize_corpus, train_tokenizer)
from tiny_sparse_bert.model import IGNORE_INDEX

WIKI = """<doc id="1" url="?curid=1" title="Jarred Shaw">
Jarred Shaw

Jarred Shaw (born September 28, 1990) is an American professional basketball player for Trouville of the Liga Uruguaya.
He played college basketball for Utah State &amp; Oklahoma State, where he scored &lt;many&gt; points in &quot;big&quot; games.
</doc>
<doc id="2" url="?curid=2" title="Stub">
Stub

</doc>
<doc id="3" url="?curid=3" title="Short">
Short
Too short to keep.
</doc>
"""
BOOK = "[ Alice 's Adventures in Wonderland by Lewis Carroll 1865 ]\nCHAPTER I. Down the Rabbit-Hole\n" + \
       "Alice was beginning to get very tired of sitting by her sister on the bank .\n" * 150
BIO = "PMC1\tA comparison of volume control ventilation in acute respiratory failure .\n\n" \
      "PMC2\tCisapride decreases gastric content aspiration in mechanically ventilated patients .\n"


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_read_wikipedia(tmp_path):
    docs = list(read_wikipedia(write(tmp_path, "wiki_00.txt", WIKI)))
    assert len(docs) == 1  # the stub and the 4-word article are dropped
    assert docs[0].startswith("Jarred Shaw (born")  # the title line is dropped
    assert "Utah State & Oklahoma State" in docs[0] and '<many>' in docs[0] and '"big"' in docs[0]
    with pytest.raises(ValueError, match="wiki_bad.txt:3"):
        list(read_wikipedia(write(tmp_path, "wiki_bad.txt", '<doc id="1">\nT\n<doc id="2">\n')))
    with pytest.raises(ValueError, match="ends inside"):
        list(read_wikipedia(write(tmp_path, "wiki_cut.txt", '<doc id="1">\nT\ntext\n')))


def test_read_gutenberg(tmp_path):
    docs = list(read_gutenberg(write(tmp_path, "carroll-alice.txt", BOOK)))
    assert len(docs) == 2  # 152 sentences in documents of 100
    assert docs[0].startswith("[ Alice 's Adventures") and docs[1].count("Alice was") == 52


def test_read_id_text(tmp_path):
    assert list(read_id_text(write(tmp_path, "abstracts.txt", BIO)))[1].startswith("Cisapride")
    with pytest.raises(ValueError, match=r"bad.txt:2: expected 'ID<TAB>text'"):
        list(read_id_text(write(tmp_path, "bad.txt", "PMC1\tfine text\nno tab here\n")))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = [line for line in (WIKI + BOOK + BIO).splitlines() if line] * 3
    path = str(tmp_path_factory.mktemp("tok") / "tokenizer.json")
    train_tokenizer(texts, 300, path)
    return load_tokenizer(path)


def test_tokenizer_round_trip(tokenizer):
    text = "Alice was beginning to get very tired of sitting by her sister."
    enc = tokenizer.encode(text)
    assert enc.ids[0] == CLS_ID and enc.ids[-1] == SEP_ID
    assert tokenizer.token_to_id("[PAD]") == PAD_ID == 0 and tokenizer.token_to_id("[MASK]") == MASK_ID
    assert tokenizer.decode(enc.ids) == "alice was beginning to get very tired of sitting by her sister."
    pair = tokenizer.encode("first part", "second part")
    assert pair.ids.count(SEP_ID) == 2 and set(pair.type_ids) == {0, 1}


def test_token_cache_reused_and_invalidated(tmp_path, tokenizer):
    files = [(read_id_text, write(tmp_path, "abstracts.txt", BIO * 30))]
    train, val = tokenize_corpus("bio", files, tokenizer, str(tmp_path / "cache"), val_every=4)
    assert isinstance(train, np.memmap) and len(val) > 0
    assert (np.asarray(train) == SEP_ID).sum() == 45 and (np.asarray(val) == SEP_ID).sum() == 15  # split by doc
    assert len(os.listdir(tmp_path / "cache")) == 3  # train, val and the manifest
    tokenize_corpus("bio", files, tokenizer, str(tmp_path / "cache"), val_every=4)
    assert len(os.listdir(tmp_path / "cache")) == 3  # reused
    write(tmp_path, "abstracts.txt", BIO * 31)  # the corpus changed: a new cache
    train2, _ = tokenize_corpus("bio", files, tokenizer, str(tmp_path / "cache"), val_every=4)
    assert len(os.listdir(tmp_path / "cache")) == 6 and len(train2) > len(train)


@pytest.mark.parametrize("damage", ["truncate", "empty", "same-size garbage", "delete", "manifest"])
def test_damaged_token_cache_is_rebuilt(tmp_path, tokenizer, capsys, damage):
    files = [(read_id_text, write(tmp_path, "abstracts.txt", BIO * 30))]
    cache = str(tmp_path / "cache")
    train, val = (np.array(a) for a in tokenize_corpus("bio", files, tokenizer, cache, val_every=4))
    path = next(os.path.join(cache, f) for f in os.listdir(cache) if f.endswith(".train.npy"))
    size = os.path.getsize(path)
    if damage == "manifest":  # the record of the arrays is cut short
        manifest = path.replace(".train.npy", ".json")
        with open(manifest, "r+b") as f:
            f.truncate(os.path.getsize(manifest) // 2)
        path = manifest
    elif damage == "delete":
        os.remove(path)
    else:
        with open(path, "r+b") as f:
            if damage == "same-size garbage":  # a valid header, other token ids
                f.seek(size - 64)
                f.write(bytes(64))
            else:
                f.truncate(size // 2 if damage == "truncate" else 0)
    train2, val2 = tokenize_corpus("bio", files, tokenizer, cache, val_every=4)
    assert f"token cache {path} does not match its manifest" in capsys.readouterr().out
    assert np.array_equal(train2, train) and np.array_equal(val2, val)
    assert damage == "manifest" or os.path.getsize(path) == size


def test_tokenizer_training_is_deterministic(tmp_path):
    """The trainer of `tokenizers` numbers pieces in hash-map order; two trainings must still agree."""
    texts = [line for line in (WIKI + BOOK + BIO).splitlines() if line] * 3
    words = " ".join(texts).split()
    texts += [" ".join(words[i::7]) for i in range(7)]  # many equally frequent pairs: ties between merges
    files = []
    for i in range(3):
        train_tokenizer(texts, 300, str(tmp_path / f"t{i}.json"))
        files.append((tmp_path / f"t{i}.json").read_bytes())
    assert files[0] == files[1] == files[2]
    tok = load_tokenizer(str(tmp_path / "t0.json"))
    assert tok.get_vocab_size() == 300 and "##e" in tok.get_vocab()
    assert [t.content for t in tok.get_added_tokens_decoder().values()] == SPECIAL_TOKENS  # "##e" is not special


def test_masking_ratios_and_80_10_10():
    g = torch.Generator().manual_seed(0)
    V = 1000
    ids = torch.randint(NUM_SPECIAL, V, (400, 128), generator=g)
    ids[:, 0], ids[:, -1] = CLS_ID, SEP_ID
    attention = torch.ones_like(ids)
    attention[::2, 100:] = 0  # half the rows padded at the end
    ids[::2, 100:] = PAD_ID
    x, labels = mask_tokens(ids, attention, 0.15, V, g)
    maskable = attention.bool() & (ids >= NUM_SPECIAL)
    chosen = labels != IGNORE_INDEX
    assert abs(chosen.sum().item() / maskable.sum().item() - 0.15) < 0.005
    assert not chosen[~maskable].any()  # special tokens and padding never chosen
    assert torch.equal(x[~chosen], ids[~chosen]) and torch.equal(labels[chosen], ids[chosen])
    n = chosen.sum().item()
    to_mask = (x[chosen] == MASK_ID).sum().item() / n
    unchanged = (x[chosen] == ids[chosen]).sum().item() / n
    random = 1 - to_mask - unchanged
    assert abs(to_mask - 0.8) < 0.01 and abs(unchanged - 0.1) < 0.01 and abs(random - 0.1) < 0.01
    assert (x[chosen] >= NUM_SPECIAL).sum() == n - (x[chosen] == MASK_ID).sum()  # random ids are never special


def test_blocks_deterministic_and_sharded():
    tokens = np.arange(NUM_SPECIAL, NUM_SPECIAL + 62 * 10, dtype=np.uint16)
    blocks = Blocks(tokens, 64, 4, seed=1)
    x, mask = blocks.batch(3)
    assert x.shape == (4, 64) and (x[:, 0] == CLS_ID).all() and (x[:, -1] == SEP_ID).all() and mask.all()
    assert torch.equal(x, Blocks(tokens, 64, 4, seed=1).batch(3)[0])
    assert not torch.equal(x, blocks.batch(4)[0])


def test_missing_inputs_are_one_line_errors(tmp_path):
    from tiny_sparse_bert.data import corpus_files
    from tiny_sparse_bert.bookkeeping import load_checkpoint
    with pytest.raises(SystemExit, match="no general corpus under .*data/prepare.py"):
        corpus_files(str(tmp_path), "general")
    with pytest.raises(SystemExit, match="no tokenizer at"):
        load_tokenizer(str(tmp_path / "tokenizer.json"))
    with pytest.raises(SystemExit, match="no checkpoint at"):
        load_checkpoint(str(tmp_path / "ckpt.pt"))
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "truncation": nu')  # cut off mid-file
    with pytest.raises(SystemExit, match=r"tokenizer.json is damaged \(.*\); it is written by train_general.py"):
        load_tokenizer(str(tmp_path / "tokenizer.json"))
    from tiny_sparse_bert.data import Blocks, documents
    with pytest.raises(SystemExit, match="a corpus of 100 tokens holds fewer than one batch of 8 x 64"):
        Blocks(np.arange(100), 64, 8)
    (tmp_path / "abstracts.txt").write_bytes("1\tcaf\u00e9 au lait\n".encode("utf-8")[:6])  # cut mid-character
    with pytest.raises(SystemExit, match="abstracts.txt is not UTF-8 text .*run python data/prepare.py again"):
        list(documents([(read_id_text, str(tmp_path / "abstracts.txt"))]))
