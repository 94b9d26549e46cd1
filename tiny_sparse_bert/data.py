"""Text in, MLM batches out: WordPiece tokenizer, corpus readers, token cache, dynamic masking.

- `train_tokenizer` / `load_tokenizer`: a BERT WordPiece tokenizer (Wu et al. 2016; BERT 3)
  built with Hugging Face `tokenizers` and saved as one `tokenizer.json`.
- `read_wikipedia`, `read_gutenberg`, `read_id_text`: the corpora of data/README.md.
- `tokenize_corpus`: a whole corpus as one flat token array, cached (memory-mapped numpy) in
  data/cache/, with a held-out validation split by document.
- `Blocks` and `mask_tokens`: fixed-length `[CLS] ... [SEP]` blocks and BERT's dynamic masking
  (BERT 3.1: 15% of tokens; 80% -> [MASK], 10% -> random token, 10% unchanged); `mlm_batch`: the
  masked batch of a step, a pure function of (seed, step), so resuming needs no data state.

    files = corpus_files("data", "general")
    tok = train_tokenizer(list(documents(files)), vocab_size=8192, path="out/tokenizer.json")
    train, val = tokenize_corpus("general", files, tok, "data/cache")
"""
import glob
import hashlib
import html
import json
import math
import os

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from .bookkeeping import file_sha256
from .model import IGNORE_INDEX

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = range(len(SPECIAL_TOKENS))  # [PAD] = 0 as in BERT
NUM_SPECIAL = len(SPECIAL_TOKENS)  # ids below this are special: never masked, never a random replacement
MIN_WIKI_WORDS = 20  # WikiExtractor leaves many title-only stubs; shorter articles are dropped
GUTENBERG_DOC_LINES = 100  # a book is cut into documents of this many sentences (for the val split)


# ---------------------------------------------------------------------------------- tokenizer

def train_tokenizer(texts, vocab_size, path):
    """Train a lower-casing BERT WordPiece tokenizer on a list of strings and save it.

    Trained twice, so that two trainings on the same texts give the same file. The trainer of
    `tokenizers` numbers the continuation pieces of single characters ("##a") in hash-map order,
    which changes from run to run, and it breaks ties between equally frequent merges by those
    numbers (huggingface/tokenizers#1794): the vocabulary itself would differ at the margin. The
    first pass only collects those pieces; the second starts from them in sorted order.
    """
    def trained(fixed_pieces):
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]", max_input_chars_per_word=100))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS + fixed_pieces,
                                            min_frequency=2, show_progress=False)
        tok.train_from_iterator(texts, trainer)
        return tok

    continuation_chars = sorted(p for p in trained([]).get_vocab() if p.startswith("##") and len(p) == 3)
    vocab = trained(continuation_chars).get_vocab()
    # the fixed pieces were passed as special tokens only to fix their ids: rebuild with the plain vocabulary
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", CLS_ID), ("[SEP]", SEP_ID)])
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(NUM_SPECIAL))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tok.save(path)
    return tok


def load_tokenizer(path):
    if not os.path.exists(path):
        raise SystemExit(f"error: no tokenizer at {path}: run train_general.py first")
    try:
        tok = Tokenizer.from_file(path)
    except Exception as e:  # truncated or edited JSON: tokenizers raises its own exception type
        raise SystemExit(f"error: {path} is damaged ({str(e).splitlines()[0][:80]}); it is written by "
                         f"train_general.py: run that again (or copy the run's own tokenizer.json back)") from None
    if [tok.token_to_id(t) for t in SPECIAL_TOKENS] != list(range(NUM_SPECIAL)):
        raise ValueError(f"{path}: special tokens are not {SPECIAL_TOKENS} at ids 0..{NUM_SPECIAL - 1}")
    return tok


# ---------------------------------------------------------------------------------- corpus readers

def read_wikipedia(path):
    """Yield articles of a WikiExtractor file: text between `<doc ...>` and `</doc>`, title line dropped."""
    lines, in_doc = [], False
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if line.startswith("<doc "):
                if in_doc:
                    raise ValueError(f"{path}:{n}: <doc> opened before the previous one was closed")
                lines, in_doc, title_pending = [], True, True
            elif line == "</doc>":
                if not in_doc:
                    raise ValueError(f"{path}:{n}: </doc> without <doc>")
                text = html.unescape(" ".join(lines))
                if len(text.split()) >= MIN_WIKI_WORDS:
                    yield text
                in_doc = False
            elif in_doc and line:
                if title_pending:  # the first line repeats the title
                    title_pending = False
                else:
                    lines.append(line)
    if in_doc:
        raise ValueError(f"{path}: file ends inside a <doc> block")


def read_gutenberg(path):
    """Yield a sentence-per-line book in documents of GUTENBERG_DOC_LINES sentences."""
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip()]
    for i in range(0, len(lines), GUTENBERG_DOC_LINES):
        yield " ".join(lines[i:i + GUTENBERG_DOC_LINES])


def read_id_text(path):
    """Yield the text of `ID<TAB>text` lines (the biomedical corpora: one document per line)."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            doc_id, sep, text = line.rstrip("\n").partition("\t")
            if not sep or not text.strip():
                raise ValueError(f"{path}:{n}: expected 'ID<TAB>text'")
            yield text


def corpus_files(data_dir, domain):
    """The (reader, path) pairs of a domain's corpus: 'general' (Wikipedia + books) or 'bio' (PubMed)."""
    patterns = {
        "general": [(read_wikipedia, "general_wikipedia/wiki_*.txt"), (read_gutenberg, "general_gutenberg/*.txt")],
        "bio": [(read_id_text, "biomed_evidence_inference/abstracts.txt"),
                (read_id_text, "biomed_evidence_inference/fulltext_*.txt"),
                (read_id_text, "biomed_abstracts_kddti/abstracts.txt")],
    }[domain]
    files = [(reader, p) for reader, pattern in patterns for p in sorted(glob.glob(os.path.join(data_dir, pattern)))]
    if not files:
        raise SystemExit(f"error: no {domain} corpus under {data_dir}: run `python data/prepare.py` first")
    return files


def documents(files, max_docs=None):
    """All documents of the given (reader, path) files, in order, optionally only the first max_docs."""
    n = 0
    for reader, path in files:
        try:
            for doc in reader(path):
                if max_docs is not None and n >= max_docs:
                    return
                yield doc
                n += 1
        except UnicodeDecodeError:
            raise SystemExit(f"error: {path} is not UTF-8 text (damaged, or cut off mid-character?); "
                             f"run python data/prepare.py again") from None


# ---------------------------------------------------------------------------------- token cache

def tokenize_corpus(name, files, tokenizer, cache_dir, max_docs=None, val_every=50):
    """Tokenize a corpus into flat uint16/uint32 arrays (train, val), cached and memory-mapped.

    Documents are joined with [SEP] (RoBERTa's FULL-SENTENCES packing); every `val_every`-th
    document goes to the validation split, so no document is in both. The cache key covers the
    tokenizer, the files (path, size, mtime) and these settings: change any and it is rebuilt.
    A manifest written last records each array's size and sha256; a cache that does not match
    it (truncated, emptied, overwritten) is reported and rebuilt.
    """
    key = hashlib.sha256(tokenizer.to_str().encode())
    for _, path in files:
        st = os.stat(path)
        key.update(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}".encode())
    key.update(f"{max_docs}|{val_every}".encode())
    stem = os.path.join(cache_dir, f"{name}-{key.hexdigest()[:16]}")
    paths = {split: f"{stem}.{split}.npy" for split in ("train", "val")}
    if os.path.exists(stem + ".json"):  # the manifest is written last: the cache was complete
        try:
            with open(stem + ".json") as f:
                manifest = json.load(f)
            damaged = [p for split, p in paths.items() if not os.path.exists(p) or
                       os.path.getsize(p) != manifest[split]["bytes"] or file_sha256(p) != manifest[split]["sha256"]]
        except (ValueError, KeyError, TypeError):  # the manifest itself is damaged
            damaged = [stem + ".json"]
        if not damaged:
            return tuple(np.load(p, mmap_mode="r") for p in paths.values())
        print(f"token cache {damaged[0]} does not match its manifest (damaged?); rebuilding it")

    dtype = np.uint16 if tokenizer.get_vocab_size() <= 2**16 else np.uint32
    splits = {"train": [], "val": []}
    batch = []

    def flush():
        for i, enc in enumerate(tokenizer.encode_batch(batch, add_special_tokens=False)):
            split = "val" if (flush.n + i) % val_every == 0 else "train"
            splits[split].append(np.asarray(enc.ids + [SEP_ID], dtype=dtype))
        flush.n += len(batch)
        batch.clear()
    flush.n = 0
    for doc in documents(files, max_docs):
        batch.append(doc)
        if len(batch) == 1000:
            flush()
    flush()
    os.makedirs(cache_dir, exist_ok=True)
    manifest = {}
    for split, path in paths.items():  # atomic: write to a temporary name, then rename
        arr = np.concatenate(splits[split]) if splits[split] else np.zeros(0, dtype)
        with open(stem + f".{split}.tmp.npy", "wb") as f:
            np.save(f, arr)
        os.replace(stem + f".{split}.tmp.npy", path)
        manifest[split] = {"bytes": os.path.getsize(path), "sha256": file_sha256(path)}
    with open(stem + ".json.tmp", "w") as f:
        json.dump(manifest, f)
    os.replace(stem + ".json.tmp", stem + ".json")
    return tuple(np.load(p, mmap_mode="r") for p in paths.values())


# ---------------------------------------------------------------------------------- MLM batches

class Blocks:
    """Fixed-length `[CLS] t_1 ... t_{T-2} [SEP]` blocks cut from a flat token array.

    `batch(step)` is a pure function of the step (a seeded shuffle per epoch), so resuming at a
    step reproduces the data order exactly.
    """

    def __init__(self, tokens, seq_len, batch_size, seed=0):
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed
        self.n_blocks = len(tokens) // (seq_len - 2)
        self.batch_size = batch_size
        self.batches_per_epoch = self.n_blocks // batch_size
        if self.batches_per_epoch == 0:
            raise SystemExit(f"error: a corpus of {len(tokens):,} tokens holds fewer than one batch of {batch_size} "
                             f"x {seq_len}; lower --batch-size or --seq-len (or raise --max-docs)")

    def block(self, i):
        body = np.asarray(self.tokens[i * (self.seq_len - 2):(i + 1) * (self.seq_len - 2)], dtype=np.int64)
        return np.concatenate([[CLS_ID], body, [SEP_ID]])

    def order(self, epoch):
        """The shuffled block order of an epoch (kept for the epoch: permuting every block again at
        every step cost 1.5 ms, as much as a GPU's training step)."""
        if getattr(self, "_epoch", None) != epoch:
            self._epoch, self._order = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n_blocks)
        return self._order

    def batch(self, step):
        """(input_ids, attention_mask) of step `step`: (B, T) each."""
        epoch, i = divmod(step, self.batches_per_epoch)
        ids = self.order(epoch)[i * self.batch_size:(i + 1) * self.batch_size]
        x = torch.from_numpy(np.stack([self.block(j) for j in ids]))
        return x, torch.ones_like(x)

    def fixed_batches(self, n_batches):
        """The first n_batches batches in corpus order (for evaluation: same blocks every time)."""
        n = min(n_batches * self.batch_size, self.n_blocks)
        for start in range(0, n, self.batch_size):
            x = torch.from_numpy(np.stack([self.block(j) for j in range(start, min(start + self.batch_size, n))]))
            yield x, torch.ones_like(x)


def mask_tokens(input_ids, attention_mask, mlm_prob, vocab_size, generator=None):
    """BERT 3.1 dynamic masking: returns (masked input_ids, labels).

    Each real, non-special token is chosen with probability `mlm_prob`; of the chosen, 80% become
    [MASK], 10% a random non-special token, 10% stay. Labels are the original ids at chosen
    positions and IGNORE_INDEX elsewhere (padding and special tokens are never chosen).
    """
    def rand(*shape):
        return torch.rand(shape, generator=generator)

    can_mask = attention_mask.bool() & (input_ids >= NUM_SPECIAL)
    chosen = (rand(*input_ids.shape) < mlm_prob) & can_mask
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    r = rand(*input_ids.shape)
    to_mask = chosen & (r < 0.8)
    to_random = chosen & (r >= 0.8) & (r < 0.9)
    random_ids = torch.randint(NUM_SPECIAL, vocab_size, input_ids.shape, generator=generator)
    x = torch.where(to_mask, torch.full_like(input_ids, MASK_ID), input_ids)
    x = torch.where(to_random, random_ids, x)
    return x, labels


def mlm_batch(blocks, step, mlm_prob, vocab_size, seed, rank=0, world=1, max_predictions=0):
    """The masked batch of a step; the masking RNG is seeded by (seed, step), so resume needs no state.

    Under torchrun every rank draws the same global batch and masks (cheap), then keeps its own
    interleaved rows: together the ranks see exactly the batch a single process would.
    With `max_predictions` N > 0 the batch also holds `predict`: the flat positions of its masked
    tokens, padded to exactly N with position 0 ([CLS], never a target), so the MLM head has the
    same shape at every step (`static_predictions` sizes N so that a batch almost never has more).
    """
    x, attention_mask = blocks.batch(step)
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    x, labels = mask_tokens(x, attention_mask, mlm_prob, vocab_size, g)
    assert len(x) % world == 0, f"batch size {len(x)} is not divisible by {world} processes"
    batch = {"input_ids": x[rank::world], "attention_mask": attention_mask[rank::world], "labels": labels[rank::world]}
    if max_predictions:
        targets = (batch["labels"] != IGNORE_INDEX).flatten().nonzero().squeeze(1)[:max_predictions]
        batch["predict"] = torch.cat([targets, torch.zeros(max_predictions - len(targets), dtype=torch.long)])
    return batch


def static_predictions(batch_size, seq_len, mlm_prob):
    """A fixed number of MLM predictions per batch: the mean number of masked tokens + 6 standard
    deviations (binomial), so that a batch has more (and loses the excess) about once in 10^9."""
    n = batch_size * seq_len
    return math.ceil(n * mlm_prob + 6 * math.sqrt(n * mlm_prob * (1 - mlm_prob)))
