import numpy as np
import pytest

from tiny_sparse_bert.data import train_tokenizer
from tiny_sparse_bert.model import IGNORE_INDEX
from tiny_sparse_bert.tasks import (TASKS, best_threshold, collate, encode, entity_f1, entity_spans, f1_scores,
                                    get_task, label_list, length_grouped_batches, load_splits, multilabel_f1,
                                    read_chemprot, read_ddi, read_hoc, read_ner, read_nicta, read_pubmedqa,
                                    read_sentence_label)


def write(tmp_path, name, text):
    (tmp_path / name).write_text(text, encoding="utf-8")
    return str(tmp_path / name)


def test_entity_spans_hand_worked():
    assert entity_spans(["B", "I", "O", "B", "B", "I"]) == {("", 0, 2), ("", 3, 4), ("", 4, 6)}  # adjacent
    assert entity_spans(["O", "I", "I", "O"]) == {("", 1, 3)}  # I- without B- starts a chunk (conlleval)
    assert entity_spans(["B-PER", "I-ORG", "O"]) == {("PER", 0, 1), ("ORG", 1, 2)}  # type change ends it


def test_entity_f1_hand_worked():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    assert entity_f1(gold, gold)["f1"] == 1.0
    partial = [["B-PER", "O", "O", "B-LOC"], ["B-ORG", "O"]]  # partial overlap counts as wrong
    r = entity_f1(gold, partial)
    assert r["precision"] == pytest.approx(2 / 3) and r["recall"] == pytest.approx(2 / 3)
    wrong_type = [["B-ORG", "I-ORG", "O", "B-LOC"], ["B-ORG", "O"]]
    assert entity_f1(gold, wrong_type)["f1"] == pytest.approx(2 / 3)
    adjacent = [["B-PER", "B-PER", "O", "B-LOC"], ["B-ORG", "O"]]  # one entity split in two
    r = entity_f1(gold, adjacent)
    assert r["precision"] == pytest.approx(2 / 4) and r["recall"] == pytest.approx(2 / 3)
    assert entity_f1([["O"]], [["O"]])["f1"] == 0.0


def test_classification_metrics():
    r = f1_scores([0, 0, 1, 2], [0, 1, 1, 2], 3)
    assert r["accuracy"] == 0.75 and r["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)
    r = multilabel_f1([[1, 0, 1], [0, 0, 0]], [[1, 1, 0], [0, 0, 0]])
    assert r["micro_f1"] == pytest.approx(0.5) and r["exact_match"] == 0.5
    # every probability under 0.5, yet ranked right: 0.5 predicts nothing, the tuned threshold all of it
    gold, probs = [[1, 0], [0, 0], [0, 1]], [[0.3, 0.1], [0.1, 0.05], [0.2, 0.4]]
    assert multilabel_f1(gold, [[p > 0.5 for p in row] for row in probs])["micro_f1"] == 0.0
    t = best_threshold(gold, probs)
    assert 0.2 <= t < 0.3 and multilabel_f1(gold, [[p > t for p in row] for row in probs])["micro_f1"] == 1.0


def test_readers_and_malformed_lines(tmp_path):
    assert read_ner(write(tmp_path, "a.tsv", "Selegiline\tB\n-\tO\n\ninduced\tO\n")) == \
        [(["Selegiline", "-"], ["B", "O"]), (["induced"], ["O"])]
    with pytest.raises(ValueError, match=r"b.tsv:2: expected 'token<TAB>tag'"):
        read_ner(write(tmp_path, "b.tsv", "a\tO\nbroken line\n"))
    with pytest.raises(ValueError, match=r"c.tsv:1: tag 'X' is not IOB2"):
        read_ner(write(tmp_path, "c.tsv", "a\tX\n"))
    assert read_ner(write(tmp_path, "eng.train", "EU NNP B-NP B-ORG\nrejects VBZ B-VP O\n"), columns=4) == \
        [(["EU", "rejects"], ["B-ORG", "O"])]
    hoc = read_hoc(write(tmp_path, "hoc.tsv", "Cells grow .\tempty\n\nTumors spread .\tactivating invasion|x y\n\n"))
    assert hoc == [("Cells grow .", None, []), ("Tumors spread .", None, ["activating invasion", "x y"])]
    with pytest.raises(ValueError, match=r"hoc2.tsv:1: expected 'sentence<TAB>label'"):
        read_hoc(write(tmp_path, "hoc2.tsv", "no label here\n"))
    assert read_chemprot(write(tmp_path, "c.jsonl", '{"text": "<< A >> inhibits [[ B ]]", "label": "INHIBITOR"}\n')) \
        == [("<< A >> inhibits [[ B ]]", None, "INHIBITOR")]
    with pytest.raises(ValueError, match=r"d.jsonl:2: expected a JSON object"):
        read_chemprot(write(tmp_path, "d.jsonl", '{"text": "a", "label": "X"}\n{"text": "a"\n'))
    assert read_nicta(write(tmp_path, "n.txt", "###1\nbackground\tThe heart .\noutcome\tIt beats .\n\n")) == \
        [("The heart .", None, "background"), ("It beats .", None, "outcome")]
    with pytest.raises(ValueError, match=r"n2.txt:2: expected 'label<TAB>sentence'"):
        read_nicta(write(tmp_path, "n2.txt", "###1\njust text\n"))
    header = "pair_id\tlabel\te1_text\te1_type\te1_offset\te2_text\te2_type\te2_offset\tsentence_masked\n"
    pair = "d1.s1.p0\teffect\taspirin\tdrug\t0-6\twarfarin\tdrug\t20-27\t@DRUG$ raises the effect of @DRUG$ .\n"
    assert read_ddi(write(tmp_path, "ddi.tsv", header + pair)) == [("@DRUG$ raises the effect of @DRUG$ .", None, "effect")]
    with pytest.raises(ValueError, match=r"ddi2.tsv:2: expected 9 tab-separated columns"):
        read_ddi(write(tmp_path, "ddi2.tsv", header + "d1.s1.p0\teffect\tonly three\n"))
    qa = read_pubmedqa(write(tmp_path, "q.jsonl", '{"question": "Q?", "contexts": ["a", "b"], "final_decision": "yes"}\n'))
    assert qa == [("Q?", "a b", "yes")]
    assert read_sentence_label(write(tmp_path, "s.tsv", "sentence\tlabel\ngood film \t1\n"), header=True) == \
        [("good film", None, "1")]


def test_user_task_and_errors(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    write(folder, "train.tsv", "good\tpos\nbad\tneg\n")
    write(folder, "dev.tsv", "fine\tpos\n")
    task = get_task(f"cls:{folder}")
    with pytest.raises(SystemExit, match="missing test split"):
        load_splits(task, "unused")
    write(folder, "test.tsv", "odd\tneutral\n")
    splits = load_splits(task, "unused")
    with pytest.raises(SystemExit, match=r"test has labels not seen in train: \['neutral'\]"):
        label_list(task, splits)
    with pytest.raises(SystemExit, match="unknown task"):
        get_task("nope")
    (folder / "test.tsv").write_bytes("caf\u00e9\tpos\n".encode("utf-8")[:4])  # cut off mid-character
    with pytest.raises(SystemExit, match=r"test.tsv is not UTF-8 text \(damaged, or cut off mid-character\?\)$"):
        load_splits(task, "unused")


def test_hoc_dev_split_is_carved_from_train(tmp_path):
    folder = tmp_path / "cls_hoc"
    folder.mkdir()
    write(folder, "train.tsv", "".join(f"sentence {i} .\tempty\n" for i in range(50)))
    write(folder, "test.tsv", "a test .\tempty\n\n")
    splits = load_splits(TASKS["hoc"], str(tmp_path))
    assert len(splits["dev"]) == 5 and len(splits["train"]) == 45
    assert not {s for s, _, _ in splits["dev"]} & {s for s, _, _ in splits["train"]}
    assert splits == load_splits(TASKS["hoc"], str(tmp_path))  # seeded


def test_label_alignment_on_first_word_piece(tmp_path):
    tok = train_tokenizer(["the cat sat on the mat", "a tomcat sat"] * 5, 60, str(tmp_path / "t.json"))
    words, tags = ["the", "catmat", "sat"], ["O", "B", "O"]
    task = get_task(f"ner:{tmp_path}")
    [item] = encode(task, [(words, tags)], tok, ["O", "B", "I"], 32)
    pieces = tok.encode(words, is_pretokenized=True)
    assert len(pieces.ids) > len(words) + 2  # the rare word is split into several pieces
    assert item["y"][0] == IGNORE_INDEX and item["y"][-1] == IGNORE_INDEX  # [CLS], [SEP]
    labelled = [(pos, y) for pos, y in enumerate(item["y"]) if y != IGNORE_INDEX]
    assert [y for _, y in labelled] == [0, 1, 0] and [p for p, _ in labelled] == item["first"]
    assert item["first"][2] - item["first"][1] > 1  # the pieces after the first carry no label
    batch = collate([item, item], "ner")
    assert batch["labels"].shape == batch["input_ids"].shape


def test_length_grouped_batches():
    lengths = np.random.default_rng(1).integers(5, 129, size=1000)
    epoch = length_grouped_batches(lengths, 32, np.random.default_rng(0), group=10)
    # every example at most once, only full batches, the 1000 % 32 = 8 left out as a random permutation would
    seen = np.concatenate(epoch)
    assert all(len(b) == 32 for b in epoch) and len(seen) == 992 == len(set(seen.tolist()))
    padded = lambda batches: sum(len(b) * lengths[b].max() for b in batches)
    random_batches = np.random.default_rng(0).permutation(1000)[:992].reshape(-1, 32)
    assert padded(random_batches) > 1.8 * lengths[seen].sum()  # random batches: nearly half is padding
    assert padded(epoch) < 1.15 * lengths[seen].sum()
    # the batches come in a random order (not sorted by length), fixed by the seed, new each epoch
    longest = [lengths[b].max() for b in epoch]
    assert longest != sorted(longest) and longest != sorted(longest, reverse=True)
    again = length_grouped_batches(lengths, 32, np.random.default_rng(0), group=10)
    assert all(np.array_equal(a, b) for a, b in zip(epoch, again))
    rng = np.random.default_rng(0)
    assert not np.array_equal(np.concatenate(length_grouped_batches(lengths, 32, rng)),
                              np.concatenate(length_grouped_batches(lengths, 32, rng)))
    # fewer examples than a batch: one batch of all of them
    assert sorted(np.concatenate(length_grouped_batches([3, 9, 4], 8, np.random.default_rng(0)))) == [0, 1, 2]
