"""Downstream tasks: readers for each format in data/README.md, encoding, and the metrics.

A support module of finetune.py: the paper can be followed without it.
The biomedical tasks of BioBERT / BLURB that Sparse*BERT reports (Campos et al. 2022, table 2):
NER (NCBI-disease, BC5CDR-chem, BC5CDR-disease), relation classification (ChemProt, DDI) and
sentence classification (HoC, multi-label; NICTA-PIBOSO as a stand-in for PubMed RCT; PubMedQA),
plus CoNLL-2003 and SST-2 for the general domain. `TASKS` maps each name to its files and reader;
`ner:DIR` and `cls:DIR` describe a user's own data set in the same formats.

Every reader raises ValueError naming the file, the line and what was expected on malformed input.
Metrics: entity-level exact-match micro F1 (CoNLL's conlleval), micro/macro F1, accuracy.
"""
import json
import os
from dataclasses import dataclass

import numpy as np
import torch

from .data import PAD_ID
from .model import IGNORE_INDEX


# ---------------------------------------------------------------------------------- readers

def read_ner(path, columns=None):
    """Token-per-line NER: `token<TAB>tag` (BioBERT) or `token POS chunk TAG` (CoNLL, columns=4).

    Returns a list of (words, tags); sentences are separated by blank lines.
    """
    sentences, words, tags = [], [], []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip():
                if words:
                    sentences.append((words, tags))
                words, tags = [], []
                continue
            parts = line.split(" ") if columns == 4 else line.split("\t")
            if len(parts) != (columns or 2):
                expected = "token POS chunk TAG" if columns == 4 else "token<TAB>tag"
                raise ValueError(f"{path}:{n}: expected '{expected}', "
                                 f"got {line[:60]!r}")
            tag = parts[-1]
            if not (tag == "O" or tag[:1] in "BI" and (len(tag) == 1 or tag[1] == "-")):
                raise ValueError(f"{path}:{n}: tag {tag!r} is not IOB2 (O, B, I, B-TYPE or I-TYPE)")
            words.append(parts[0])
            tags.append(tag)
    if words:
        sentences.append((words, tags))
    return sentences


def read_sentence_label(path, header=False):
    """`sentence<TAB>label` lines (SST-2 with a header; a user's `cls:DIR` data without)."""
    examples = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if (header and n == 1) or not line.strip():
                continue
            text, sep, label = line.rstrip("\n").rpartition("\t")
            if not sep or not text.strip() or not label.strip():
                raise ValueError(f"{path}:{n}: expected 'sentence<TAB>label'")
            examples.append((text.strip(), None, label.strip()))
    return examples


def read_hoc(path):
    """HoC: `sentence<TAB>label|label...` or `empty`; blank lines (after every test sentence) skipped."""
    return [(text, None, [] if label == "empty" else label.split("|"))
            for text, _, label in read_sentence_label(path)]


def read_json_lines(path, example, expected):
    """One example per JSON line: `example(row)` builds it; a bad line names `expected`."""
    examples = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                examples.append(example(json.loads(line)))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                why = f" ({e})" if isinstance(e, TypeError) else ""
                raise ValueError(f"{path}:{n}: expected a JSON object with {expected}{why}") from None
    return examples


def text(value):
    """A JSON field that must be a string (a label 3 or a null text is a malformed line, not a crash later)."""
    if not isinstance(value, str):
        raise TypeError(f"{value!r} is not a string")
    return value


def read_chemprot(path):
    """ChemProt JSON lines {"text", "label"}; the << >> and [[ ]] entity markers stay in the text."""
    return read_json_lines(path, lambda row: (text(row["text"]), None, text(row["label"])),
                           "'text' and 'label' strings")


def read_nicta(path):
    """NICTA-PIBOSO: `###id` starts an abstract, then `label<TAB>sentence` lines, blank line between."""
    examples = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip() or line.startswith("###"):
                continue
            label, sep, text = line.partition("\t")
            if not sep or not text.strip():
                raise ValueError(f"{path}:{n}: expected 'label<TAB>sentence' or '###id'")
            examples.append((text, None, label))
    return examples


def read_ddi(path):
    """DDI 2013 pairs: a header, then 9 tab-separated columns; the label is the 2nd (false, mechanism,
    effect, advise, int), the text the 9th, with both drugs of the pair replaced by @DRUG$."""
    examples = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if n == 1 or not line.strip():
                continue
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 9 or not parts[1] or not parts[8].strip():
                raise ValueError(f"{path}:{n}: expected 9 tab-separated columns: pair_id, label, ..., sentence_masked")
            examples.append((parts[8], None, parts[1]))
    return examples


def read_pubmedqa(path):
    """PubMedQA JSON lines: (question, contexts joined) -> yes/no/maybe (reasoning-required setting)."""
    return read_json_lines(path, lambda row: (text(row["question"]), " ".join(map(text, row["contexts"])),
                                              text(row["final_decision"])),
                           "question, contexts, final_decision strings")


@dataclass
class Task:
    name: str
    kind: str       # "ner", "cls" (one label) or "multi" (several labels)
    folder: str     # under the data directory (or a user's directory)
    splits: tuple   # (train, dev or None, test) file names
    reader: object
    metric: str     # the headline metric in the results table


NER_SPLITS = ("train.tsv", "devel.tsv", "test.tsv")
TASKS = {
    "ncbi_disease": Task("ncbi_disease", "ner", "ner_ncbi_disease", NER_SPLITS, read_ner, "f1"),
    "bc5cdr_chem": Task("bc5cdr_chem", "ner", "ner_bc5cdr_chem", NER_SPLITS, read_ner, "f1"),
    "bc5cdr_disease": Task("bc5cdr_disease", "ner", "ner_bc5cdr_disease", ("train.tsv", "devel.tsv", "test.tsv"),
                           read_ner, "f1"),
    "chemprot": Task("chemprot", "cls", "re_chemprot", ("train.jsonl", "dev.jsonl", "test.jsonl"), read_chemprot,
                     "micro_f1"),
    "hoc": Task("hoc", "multi", "cls_hoc", ("train.tsv", None, "test.tsv"), read_hoc, "micro_f1"),
    "nicta_piboso": Task("nicta_piboso", "cls", "cls_nicta_piboso", ("train.txt", "dev.txt", "test.txt"), read_nicta,
                         "macro_f1"),
    "ddi": Task("ddi", "cls", "re_ddi", ("train.tsv", "dev.tsv", "test.tsv"), read_ddi, "macro_f1"),
    "pubmedqa": Task("pubmedqa", "cls", "qa_pubmedqa", ("train.jsonl", "dev.jsonl", "test.jsonl"), read_pubmedqa,
                     "accuracy"),
    "conll2003": Task("conll2003", "ner", "gen_ner_conll2003", ("eng.train", "eng.testa", "eng.testb"),
                      lambda p: read_ner(p, columns=4), "f1"),
    "sst2": Task("sst2", "cls", "gen_cls_sst2", ("train.tsv", "dev.tsv", "test.tsv"),
                 lambda p: read_sentence_label(p, header=True), "accuracy"),
}


def get_task(spec):
    """A task name from TASKS, or `ner:DIR` / `cls:DIR` for a user's data set in our formats."""
    if spec in TASKS:
        return TASKS[spec]
    kind, sep, folder = spec.partition(":")
    if sep and kind == "ner":
        return Task(f"ner:{os.path.basename(folder.rstrip('/'))}", "ner", folder, NER_SPLITS,
                    read_ner, "f1")
    if sep and kind == "cls":
        return Task(f"cls:{os.path.basename(folder.rstrip('/'))}", "cls", folder, ("train.tsv", "dev.tsv", "test.tsv"),
                    read_sentence_label, "accuracy")
    raise SystemExit(f"error: unknown task {spec!r}; use one of {', '.join(TASKS)}, ner:DIR or cls:DIR")


def load_splits(task, data_dir, seed=0, dev_fraction=0.1):
    """{'train', 'dev', 'test'} examples; without a dev file, a seeded dev split is carved from train."""
    folder = task.folder if ":" in task.name else os.path.join(data_dir, task.folder)
    splits = {}
    for split, name in zip(("train", "dev", "test"), task.splits):
        if name is None:
            continue
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            raise SystemExit(f"error: {task.name}: missing {split} split {path}"
                             + ("" if ":" in task.name else " (run python data/prepare.py)"))
        try:
            splits[split] = task.reader(path)
        except UnicodeDecodeError:
            raise SystemExit(f"error: {path} is not UTF-8 text (damaged, or cut off mid-character?)"
                             + ("" if ":" in task.name else "; run python data/prepare.py again")) from None
        if not splits[split]:  # an empty test set would score 0 as if it were a result; an empty dev selects nothing
            raise SystemExit(f"error: {task.name}: {split} split {path} has no examples")
    if "dev" not in splits:  # HoC has no dev split
        order = np.random.default_rng(seed).permutation(len(splits["train"]))
        n_dev = int(len(order) * dev_fraction)
        if n_dev == 0:
            raise SystemExit(f"error: {task.name}: {len(order)} training examples are too few to carve a dev split")
        splits["dev"] = [splits["train"][i] for i in order[:n_dev]]
        splits["train"] = [splits["train"][i] for i in order[n_dev:]]
    return splits


def label_list(task, splits):
    """The label vocabulary from the training split; an unseen label in dev/test is an error."""
    def labels_of(examples):
        if task.kind == "ner":
            return {t for _, tags in examples for t in tags}
        if task.kind == "multi":
            return {l for _, _, ls in examples for l in ls}
        return {l for _, _, l in examples}
    labels = sorted(labels_of(splits["train"]))
    if task.kind == "ner":  # O first, so an untrained classifier's default is harmless
        labels = ["O"] + [l for l in labels if l != "O"]
    for split in ("dev", "test"):
        unknown = labels_of(splits[split]) - set(labels)
        if unknown:
            raise SystemExit(f"error: {task.name}: {split} has labels not seen in train: {sorted(unknown)[:5]}")
    return labels


# ---------------------------------------------------------------------------------- encoding

def encode(task, examples, tokenizer, labels, max_len):
    """Token ids and label ids per example (lists, padded later per batch).

    NER: words are split into word pieces; the word's label goes on its first piece and the other
    pieces get IGNORE_INDEX (BERT 5.3). `first` holds the first-piece positions, to read one
    prediction per word back; words cut off by max_len keep their gold label in `word_labels`. A
    word the tokenizer turns into no piece at all is read as [UNK], so that `first` stays aligned.
    """
    index = {l: i for i, l in enumerate(labels)}
    tokenizer.enable_truncation(max_len)
    out = []
    for ex in examples:
        if task.kind == "ner":
            words, tags = ex
            enc = tokenizer.encode(words, is_pretokenized=True)
            present = set(enc.word_ids) - {None}
            if present and len(present) <= max(present):  # words with no piece (a no-break space, say):
                words = [w if i in present or i > max(present) else "[UNK]" for i, w in enumerate(words)]
                enc = tokenizer.encode(words, is_pretokenized=True)  # each gets [UNK], so words pair 1:1
            y, first, previous = [], [], None
            for pos, w in enumerate(enc.word_ids):
                if w is not None and w != previous:
                    y.append(index[tags[w]])
                    first.append(pos)
                else:
                    y.append(IGNORE_INDEX)
                previous = w
            out.append({"ids": enc.ids, "types": enc.type_ids, "y": y, "first": first,
                        "word_labels": [index[t] for t in tags]})  # every word's gold label, also cut-off ones
        else:
            text_a, text_b, label = ex
            enc = tokenizer.encode(text_a, text_b) if text_b else tokenizer.encode(text_a)
            y = [float(l in label) for l in labels] if task.kind == "multi" else index[label]
            out.append({"ids": enc.ids, "types": enc.type_ids, "y": y})
    tokenizer.no_truncation()
    return out


def collate(items, kind):
    """Pad a list of encoded examples to the longest: a dict of model inputs and labels."""
    T = max(len(it["ids"]) for it in items)
    ids = torch.full((len(items), T), PAD_ID, dtype=torch.long)
    types = torch.zeros_like(ids)
    mask = torch.zeros_like(ids)
    for i, it in enumerate(items):
        n = len(it["ids"])
        ids[i, :n], types[i, :n], mask[i, :n] = torch.tensor(it["ids"]), torch.tensor(it["types"]), 1
    if kind == "ner":
        labels = torch.full_like(ids, IGNORE_INDEX)
        for i, it in enumerate(items):
            labels[i, :len(it["y"])] = torch.tensor(it["y"])
    else:
        labels = torch.tensor([it["y"] for it in items])
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types, "labels": labels}


def length_grouped_batches(lengths, batch_size, rng, group=50):
    """One epoch of training batches (rows of example indices): random, but of similar lengths.

    A batch is padded to its longest example, so random batches of NER sentences (10 to 128 pieces)
    are more than half padding. Shuffle, sort each run of `group` batches' worth of examples by
    length, cut it into batches and shuffle the batches: each batch holds examples of one length,
    the epoch still visits every example once in a random order (group_by_length in Hugging Face's
    Trainer does the same). The examples after the last full batch are left out, as a plain
    `permutation[i * batch_size:(i + 1) * batch_size]` would (fewer than `batch_size` make one batch).
    finetune.py uses it for NER, weighting each batch by its labelled words (`train(mean_labelled)`);
    for sentence-level tasks it skews each batch's label mix, and dense models collapsed on ChemProt.
    """
    lengths = np.asarray(lengths)
    order = rng.permutation(len(lengths))[:max(batch_size, len(lengths) // batch_size * batch_size)]
    size = group * batch_size
    for start in range(0, len(order), size):  # a stable sort: equal lengths keep their random order
        chunk = order[start:start + size]
        order[start:start + size] = chunk[np.argsort(lengths[chunk], kind="stable")]
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


# ---------------------------------------------------------------------------------- metrics

def entity_spans(tags):
    """Set of (type, start, end) chunks of an IOB2 tag sequence, as conlleval reads them.

    A chunk starts at B-X, or at I-X that does not continue a chunk of type X; it ends where the
    next tag is not I-X. Plain B / I tags (one entity type) have the type ''.
    """
    spans, start, kind = set(), None, None
    for i, tag in enumerate(list(tags) + ["O"]):
        prefix, typ = tag[0], tag[2:]
        if start is not None and not (prefix == "I" and typ == kind):
            spans.add((kind, start, i))
            start = None
        if prefix == "B" or (prefix == "I" and start is None):
            start, kind = i, typ
    return spans


def entity_f1(gold_sequences, pred_sequences):
    """Exact-match micro F1 over entities of all sentences (CoNLL-2003 evaluation)."""
    tp = n_gold = n_pred = 0
    for gold, pred in zip(gold_sequences, pred_sequences):
        g, p = entity_spans(gold), entity_spans(pred)
        tp, n_gold, n_pred = tp + len(g & p), n_gold + len(g), n_pred + len(p)
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"f1": f1, "precision": precision, "recall": recall}


def f1_scores(gold, pred, n_labels):
    """Accuracy, micro F1 and macro F1 of single-label predictions (integer arrays)."""
    gold, pred = np.asarray(gold), np.asarray(pred)
    per_label = []
    for k in range(n_labels):
        tp = np.sum((pred == k) & (gold == k))
        denominator = np.sum(pred == k) + np.sum(gold == k)
        per_label.append(2 * tp / denominator if denominator else 0.0)
    accuracy = float(np.mean(gold == pred)) if len(gold) else 0.0
    # every example has exactly one gold and one predicted label, so micro F1 equals accuracy
    return {"accuracy": accuracy, "micro_f1": accuracy, "macro_f1": float(np.mean(per_label))}


def multilabel_f1(gold, pred):
    """Micro F1 over all (example, label) decisions of a multi-label task (0/1 matrices)."""
    gold, pred = np.asarray(gold, dtype=bool), np.asarray(pred, dtype=bool)
    tp, n_pred, n_gold = np.sum(gold & pred), np.sum(pred), np.sum(gold)
    return {"micro_f1": float(2 * tp / (n_pred + n_gold)) if n_pred + n_gold else 0.0,
            "exact_match": float(np.mean(np.all(gold == pred, axis=1)))}


def example_counts(task, gold, pred, n_labels):
    """Per test example, the counts its task's headline metric is a function of (an (n, k) array):
    summed over any resample of the examples, `metric_from_counts` gives the metric of that
    resample, which is what a bootstrap over test examples needs (entity F1 and macro F1 are not
    means of per-example scores). gold / pred: tag sequences (NER), label ids (cls), 0/1 rows (multi)."""
    if task.metric == "f1":  # entity F1: (true positives, predicted, gold) entities per sentence
        rows = []
        for g, p in zip(gold, pred):
            g, p = entity_spans(g), entity_spans(p)
            rows.append((len(g & p), len(p), len(g)))
        return np.array(rows, dtype=np.int64).reshape(-1, 3)
    if task.kind == "multi":  # micro F1 over (example, label) decisions
        gold, pred = np.asarray(gold, dtype=bool), np.asarray(pred, dtype=bool)
        return np.stack([(gold & pred).sum(1), pred.sum(1), gold.sum(1)], 1).astype(np.int64)
    gold, pred = np.asarray(gold), np.asarray(pred)
    if task.metric == "macro_f1":  # per label: (true positives, predicted, gold)
        k = np.arange(n_labels)
        return np.concatenate([(gold[:, None] == k) & (pred[:, None] == k), pred[:, None] == k,
                               gold[:, None] == k], 1).astype(np.int64)
    return np.stack([gold == pred, np.ones(len(gold), bool)], 1).astype(np.int64)  # accuracy: (right, 1)


def metric_from_counts(task, counts):
    """The headline metric from summed `example_counts` (the last axis), for one or many resamples."""
    counts = np.asarray(counts, dtype=np.float64)
    if task.metric == "f1" or task.kind == "multi":
        tp, n_pred, n_gold = counts[..., 0], counts[..., 1], counts[..., 2]
        return np.divide(2 * tp, n_pred + n_gold, out=np.zeros_like(tp), where=n_pred + n_gold > 0)
    if task.metric == "macro_f1":
        tp, n_pred, n_gold = np.split(counts, 3, axis=-1)
        f1 = np.divide(2 * tp, n_pred + n_gold, out=np.zeros_like(tp), where=n_pred + n_gold > 0)
        return f1.mean(-1)
    return np.divide(counts[..., 0], counts[..., 1], out=np.zeros_like(counts[..., 0]), where=counts[..., 1] > 0)


def best_threshold(gold, probs, thresholds=tuple(i / 20 for i in range(1, 20))):
    """The probability threshold (0.05 ... 0.95) with the best micro F1 of a multi-label task.

    Chosen on dev, applied to test: with most examples carrying no label (70% in HoC), a short
    fine-tuning run rarely pushes a label's probability over 0.5, and a fixed 0.5 predicts nothing.
    """
    gold, probs = np.asarray(gold, dtype=bool), np.asarray(probs)
    return max(thresholds, key=lambda t: multilabel_f1(gold, probs > t)["micro_f1"])
