"""Rebuild the files that data/registry.json marks "derived" from their public origins.

These files are not copies of one origin file but conversions of many (the RCT articles of
evidence-inference, KD-DTI's JSON, PubMedQA's splits, the DDI-2013 XML); ../shared/data/README.md
(sections 2.3, 2.4, 3 and 5) describes each conversion, and this module is that description as
code. The builders take the origin's text and return lines; prepare.py downloads the origins,
calls the builder, writes the files and compares them with the reference build (document counts,
sha256).

    evidence_inference(articles, overlap)      PMC articles -> abstracts.txt, fulltext_00.txt, ...
    kddti(json_texts, overlap)                 KD-DTI JSON -> abstracts.txt
    pubmedqa(ori, truth, train_tsv, dev_tsv)   PubMedQA -> train.jsonl, dev.jsonl, test.jsonl
    ddi(xml_texts)                             DDI-2013 XML (one split) -> candidate pairs, sentences

Pretraining text must not contain the downstream test sets, or fine-tuning scores measure memory:
`OverlapFilter` finds the documents that share word 8-grams with them (README section 5).
"""
import json
import os
import re
import sys
import xml.etree.ElementTree as ET
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
from tiny_sparse_bert.tasks import TASKS  # noqa: E402  (the test-set readers)


def normalise(text):
    """Collapse every run of whitespace (newlines included) into one space."""
    return " ".join(text.split())


# ------------------------------------------------------------------------- test-set overlap

def words(text):
    """The words of `text`, lower-cased and reduced to their letters and digits (empty ones dropped)."""
    return [w for w in (re.sub(r"[^0-9a-z]", "", t) for t in text.lower().split()) if w]


def word_8grams(ws):
    """The set of 8-word windows of a list of words."""
    return {tuple(ws[i:i + 8]) for i in range(len(ws) - 7)}


class OverlapFilter:
    """Flags documents that contain test sentences (README section 5).

    A document overlaps when it holds at least half of the 8-grams of one test sentence of 12 or
    more words, or when at least a fifth of its own 8-grams occur in the test sentences.
    """

    def __init__(self, sentences, min_words=12):
        self.sizes = []  # 8-gram count of each indexed test sentence
        self.index = {}  # 8-gram -> indices of the test sentences that contain it
        for sentence in sentences:
            ws = words(sentence)
            if len(ws) >= min_words:
                grams = word_8grams(ws)
                for g in grams:
                    self.index.setdefault(g, []).append(len(self.sizes))
                self.sizes.append(len(grams))

    def __call__(self, text):
        grams = word_8grams(words(text))
        shared, in_test = Counter(), 0
        for g in grams:
            if g in self.index:
                in_test += 1
                shared.update(self.index[g])
        return (bool(grams) and in_test >= 0.2 * len(grams)) or \
            any(n >= 0.5 * self.sizes[i] for i, n in shared.items())


CHEMPROT_MARKERS = re.compile(r"<<|>>|\[\[|\]\]")


def biomedical_test_sentences(data_dir):
    """Every test sentence of the biomedical tasks (their files must be prepared under data_dir)."""
    for name in ("ncbi_disease", "bc5cdr_chem", "chemprot", "hoc", "nicta_piboso"):
        task = TASKS[name]
        for example in task.reader(os.path.join(data_dir, task.folder, task.splits[2])):
            if task.kind == "ner":
                yield " ".join(example[0])  # the sentence rebuilt from its tokens
            else:
                yield CHEMPROT_MARKERS.sub("", example[0])
    with open(os.path.join(data_dir, "re_ddi", "test_sentences.tsv"), encoding="utf-8") as f:
        for line in f.read().split("\n")[1:]:  # sentence_id, doc_id, text
            yield line.split("\t")[-1]
    with open(os.path.join(data_dir, "qa_pubmedqa", "test.jsonl"), encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            yield from row["contexts"]
            yield row["long_answer"]


# ------------------------------------------------------------------------- evidence-inference

SECTION = re.compile(r"(TITLE|ABSTRACT\.\S[^:]*|BODY\.\S[^:]*):{1,2}")  # a whole line, e.g. "BODY.METHODS:"
BACK_MATTER = ("COMPETING INTEREST", "CONTRIBUTION", "ABBREVIATION", "ACKNOWLEDG", "FUNDING", "SUPPLEMENTARY",
               "PRE-PUBLICATION")


def article_parts(text):
    """(title, abstract, body) of one evidence-inference article, whitespace-normalised.

    The article is a sequence of sections, each opened by a label line: `TITLE:`,
    `ABSTRACT.<NAME>::` or `BODY.<NAME>:`. The abstract joins every ABSTRACT section except the
    electronic supplementary material; the body joins the BODY sections except back matter
    (competing interests, contributions, abbreviations, acknowledgements, funding, ...). A label
    that does not stand on its own line stays in the text (a known artefact of the source); an
    abstract without ABSTRACT labels (plain paragraphs after the title) counts as none.
    """
    title, abstract, body, current = [], [], [], None
    for line in text.split("\n"):
        m = SECTION.fullmatch(line.strip())
        if m:
            label = m.group(1).upper()
            if label == "TITLE":
                current = title
            elif label.startswith("ABSTRACT."):
                current = None if "ELECTRONIC SUPPLEMENTARY" in label else abstract
            else:
                current = None if any(word in label for word in BACK_MATTER) else body
        elif current is title and title and not line.strip():
            current = None  # the title is the section's first paragraph; unlabelled text after it is lost
        elif current is not None:
            current.append(line)
    return normalise(" ".join(title)), normalise(" ".join(abstract)), normalise(" ".join(body))


def evidence_inference(articles, overlap, body_words=200, cap=30 * 2**20, file_size=3 * 2**20):
    """`articles`: (PMCID, text) pairs. One abstract per line, and full texts up to `cap` bytes.

    Abstracts (`PMCID<TAB>title abstract`) of every article with a title and an abstract, in
    PMC-number order, the first of each title only, less those overlapping a test set. Full texts
    (`PMCID<TAB>body`) of those articles with at least `body_words` words, in the same order until
    `cap` bytes, cut into files of at most `file_size` bytes; then overlapping ones are dropped.
    """
    abstracts, bodies, titles = [], [], set()
    for pmcid, text in sorted(articles, key=lambda a: int(a[0][3:])):
        title, abstract, body = article_parts(text)
        if not title or not abstract or title.lower() in titles:
            continue
        titles.add(title.lower())
        if overlap(f"{title} {abstract}"):
            continue
        abstracts.append(f"{pmcid}\t{title} {abstract}")
        if len(body.split()) >= body_words:
            bodies.append(f"{pmcid}\t{body}")
    files, total, in_file = [[]], 0, 0  # bytes in all files, in the last file
    for line in bodies:
        size = len(line.encode("utf-8")) + 1  # with its newline
        if total + size > cap:
            break
        if in_file + size > file_size:
            files.append([])
            in_file = 0
        files[-1].append(line)
        total, in_file = total + size, in_file + size
    out = {"abstracts.txt": abstracts}
    for i, lines in enumerate(files):
        out[f"fulltext_{i:02d}.txt"] = [line for line in lines if not overlap(line.partition("\t")[2])]
    return out


# ------------------------------------------------------------------------- KD-DTI

def kddti(json_texts, overlap):
    """`json_texts`: KD-DTI files (`{PMID: {title, abstract, ...}}`). One `PMID<TAB>title abstract` per line.

    Entries in file order; a PMID seen before or without an abstract is skipped, as is an abstract
    that overlaps a test set. HTML entities stay as the source has them.
    """
    lines, seen = [], set()
    for text in json_texts:
        for pmid, entry in json.loads(text).items():
            abstract = normalise(entry.get("abstract") or "")
            if pmid in seen or not abstract:
                continue
            seen.add(pmid)
            doc = normalise(f"{entry.get('title') or ''} {abstract}")
            if not overlap(doc):
                lines.append(f"{pmid}\t{doc}")
    return {"abstracts.txt": lines}


# ------------------------------------------------------------------------- PubMedQA

def biogpt_questions(tsv_text):
    """The questions of BioGPT's PubMedQA split files (`question: Q context: C answer: A<TAB>label`)."""
    questions = set()
    for n, line in enumerate(tsv_text.split("\n"), 1):
        if not line.strip():
            continue
        if not line.startswith("question: ") or " context: " not in line:
            raise ValueError(f"line {n}: expected 'question: ... context: ...', got {line[:60]!r}")
        questions.add(normalise(line[len("question: "):].split(" context: ", 1)[0]))
    return questions


def pubmedqa(ori_text, truth_text, train_tsv, dev_tsv):
    """PubMedQA's 1,000 expert-labelled questions as JSON lines, split as BioGPT and the official test set.

    The test split is the PMIDs of test_ground_truth.json; train and dev are the questions of
    BioGPT's train.tsv and valid.tsv. Rows keep ori_pqal.json's order.
    """
    test_ids = set(json.loads(truth_text))
    train_q, dev_q = biogpt_questions(train_tsv), biogpt_questions(dev_tsv)
    out = {"train.jsonl": [], "dev.jsonl": [], "test.jsonl": []}
    for pmid, e in json.loads(ori_text).items():
        q = normalise(e["QUESTION"])
        split = "test" if pmid in test_ids else "train" if q in train_q else "dev" if q in dev_q else None
        if split is None:
            raise ValueError(f"PubMedQA {pmid} is in none of the splits (question {q[:60]!r})")
        row = {"pmid": pmid, "question": e["QUESTION"], "contexts": e["CONTEXTS"], "context_labels": e["LABELS"],
               "long_answer": e["LONG_ANSWER"], "final_decision": e["final_decision"], "year": e.get("YEAR"),
               "meshes": e.get("MESHES")}
        out[f"{split}.jsonl"].append(json.dumps(row, ensure_ascii=False))
    return out


# ------------------------------------------------------------------------- DDI-2013

DDI_PAIR_HEADER = "pair_id\tlabel\te1_text\te1_type\te1_offset\te2_text\te2_type\te2_offset\tsentence_masked"
DDI_SENTENCE_HEADER = "sentence_id\tdoc_id\ttext"


def count_documents(lines):
    """The documents (lines) of a built file, less its TSV header."""
    return len(lines) - int(bool(lines) and lines[0] in (DDI_PAIR_HEADER, DDI_SENTENCE_HEADER))


def first_span(char_offset):
    """(start, end exclusive) of the first span of a DDI `charOffset` ("23-31", or "a-b;c-d"; ends inclusive)."""
    start, end = char_offset.split(";")[0].split("-")
    return int(start), int(end) + 1


def ddi(xml_texts):
    """`xml_texts`: the DDI-2013 documents of one split (one XML file each, in file-name order).

    Returns (pairs, sentences), each a list of TSV lines with its header. Every candidate pair:
    its label (`false`, or the interaction type), both entities (text, type, offset) and the
    sentence with both mentions replaced by @DRUG$ (only the first span of a discontinuous one),
    whitespace-normalised.
    Every sentence, with tabs and line breaks turned into spaces and trailing spaces cut, so the
    offsets still point into it.
    """
    pairs, sentences = [DDI_PAIR_HEADER], [DDI_SENTENCE_HEADER]
    for text in xml_texts:
        document = ET.fromstring(text)
        for s in document.iter("sentence"):
            sentence = re.sub(r"[\r\n\t]", " ", s.get("text")).rstrip(" ")
            sentences.append(f"{s.get('id')}\t{document.get('id')}\t{sentence}")
            entities = {e.get("id"): e for e in s.iter("entity")}
            for pair in s.iter("pair"):
                e1, e2 = entities[pair.get("e1")], entities[pair.get("e2")]
                masked = sentence
                for start, end in sorted([first_span(e1.get("charOffset")), first_span(e2.get("charOffset"))], reverse=True):
                    masked = masked[:start] + "@DRUG$" + masked[end:]  # right to left: earlier offsets stay valid
                label = pair.get("type") if pair.get("ddi") == "true" else "false"
                entity_columns = [e.get(k) for e in (e1, e2) for k in ("text", "type", "charOffset")]
                pairs.append("\t".join([pair.get("id"), label, *entity_columns, normalise(masked)]))
    return pairs, sentences
