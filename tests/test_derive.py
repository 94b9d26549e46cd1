"""data/derive.py: the conversions of the derived data files, on fixtures written in each origin's format."""
import json
import os
import sys
from xml.sax.saxutils import quoteattr

import pytest

from conftest import MIRROR, ROOT

sys.path.insert(0, os.path.join(ROOT, "data"))
import derive  # noqa: E402

TEST_SENTENCE = "the patients who received the study drug showed markedly fewer seizures than those given placebo"


def article(title, abstract, body, extra=""):
    """An article in evidence-inference's text format (label lines, one paragraph per line)."""
    return (f"TITLE: \n{title}\n\n\n\nABSTRACT.BACKGROUND::\n{abstract}\n\nABSTRACT.ELECTRONIC SUPPLEMENTARY MATERIAL::\n"
            f"The online version holds supplementary material.\n\nBODY.INTRODUCTION:\n{body}\n{extra}"
            f"BODY.COMPETING INTERESTS:\nThe authors declare none.\n\nBODY.ABBREVIATIONS:\nRCT: randomised trial\n")


def no_overlap(text):
    return False


def test_article_parts():
    title, abstract, body = derive.article_parts(article("A  trial\nof things", "We  did\na trial.", "Para one.",
                                                         "BODY.RESULTS:\nPara two.\nTable 1BODY. STRAY : kept\n"))
    assert title == "A trial of things" and abstract == "We did a trial."  # supplementary material dropped
    assert body == "Para one. Para two. Table 1BODY. STRAY : kept"  # back matter dropped, an inline label kept
    # an abstract without labels, as some articles have it, is no abstract (the article is dropped)
    assert derive.article_parts("TITLE: \nA title\n\n\nObjective. Unlabelled.\nBODY.1. INTRODUCTION:\nText.\n") == \
        ("A title", "", "Text.")


def test_evidence_inference_selection_cap_and_files():
    body = " ".join(["word"] * 200)
    articles = [("PMC30", article("Third", "Abstract three.", body)),
                ("PMC4", article("First", "Abstract one.", body)),
                ("PMC7", article("first", "Same title, other case.", body)),  # duplicate title: dropped
                ("PMC8", article("No abstract", "", body)),                    # no abstract: dropped
                ("PMC9", article("Short body", "Abstract.", "too short")),     # abstract only
                ("PMC12", article("Second", "Abstract two.", body))]
    line = len(f"PMC4\t{body}\n".encode())
    out = derive.evidence_inference(articles, no_overlap, cap=3 * line + 2, file_size=2 * line + 1)
    assert [a.split("\t")[0] for a in out["abstracts.txt"]] == ["PMC4", "PMC9", "PMC12", "PMC30"]  # PMC-number order
    assert out["abstracts.txt"][0] == "PMC4\tFirst Abstract one."
    assert out["fulltext_00.txt"] == [f"PMC4\t{body}", f"PMC12\t{body}"] and out["fulltext_01.txt"] == [f"PMC30\t{body}"]
    out = derive.evidence_inference(articles, no_overlap, cap=2 * line + 1, file_size=3 * line)  # stops after PMC12
    assert list(out) == ["abstracts.txt", "fulltext_00.txt"] and len(out["fulltext_00.txt"]) == 2


def test_overlap_filter():
    overlap = derive.OverlapFilter([TEST_SENTENCE, "too short to count: seizures fewer than placebo"])
    assert overlap(f"Background. {TEST_SENTENCE.upper()}, as reported before. " + "Other words here. " * 50)
    half = TEST_SENTENCE.split()[:9]  # 9 of 16 words: 2 of the sentence's 9 8-grams -> not half
    assert not overlap(" ".join(half) + " and then something else entirely " * 20)
    assert not overlap("seizures fewer than placebo " * 3)  # a test sentence under 12 words is not indexed
    # a short document made mostly of test text overlaps by the second rule (20% of its own 8-grams)
    assert overlap(" ".join(TEST_SENTENCE.split()[:10]) + " end of it all")
    body = " ".join(["word"] * 200)
    articles = [("PMC1", article("Clean", "Nothing to see.", body)),
                ("PMC2", article("Leaky", f"In short, {TEST_SENTENCE}.", body)),
                ("PMC3", article("Leaky body", "Fine abstract.", f"{body} {TEST_SENTENCE}."))]
    out = derive.evidence_inference(articles, overlap)
    assert [a.split("\t")[0] for a in out["abstracts.txt"]] == ["PMC1", "PMC3"]
    assert [a.split("\t")[0] for a in out["fulltext_00.txt"]] == ["PMC1"]


def test_kddti():
    valid = {"11": {"title": "Drug  A.", "abstract": "It binds &gt; B.", "triples": []},
             "12": {"title": "No abstract.", "abstract": "", "triples": []}}
    test = {"11": {"title": "Drug A again.", "abstract": "Seen before.", "triples": []},
            "13": {"title": "Leak.", "abstract": TEST_SENTENCE, "triples": []}}
    out = derive.kddti([json.dumps(valid), json.dumps(test)], derive.OverlapFilter([TEST_SENTENCE]))
    assert out == {"abstracts.txt": ["11\tDrug A. It binds &gt; B."]}


def test_pubmedqa():
    ori = {str(p): {"QUESTION": f"Question {p}?", "CONTEXTS": ["Ctx é."], "LABELS": ["L"], "LONG_ANSWER": "Yes.",
                    "final_decision": "yes", "YEAR": "2001", "MESHES": ["M"], "reasoning_required_pred": "yes"}
           for p in (5, 6, 7)}
    tsv = "question: Question {}? context: Ctx é. answer: Yes.\tyes\n"
    out = derive.pubmedqa(json.dumps(ori), json.dumps({"6": "yes"}), tsv.format(7), tsv.format(5))
    assert [len(v) for v in out.values()] == [1, 1, 1]
    assert json.loads(out["train.jsonl"][0])["pmid"] == "7" and json.loads(out["dev.jsonl"][0])["pmid"] == "5"
    assert out["test.jsonl"][0] == ('{"pmid": "6", "question": "Question 6?", "contexts": ["Ctx é."], '
                                    '"context_labels": ["L"], "long_answer": "Yes.", "final_decision": "yes", '
                                    '"year": "2001", "meshes": ["M"]}')
    with pytest.raises(ValueError, match="none of the splits"):
        derive.pubmedqa(json.dumps(ori), json.dumps({"6": "yes"}), tsv.format(7), "")
    with pytest.raises(ValueError, match="line 1"):
        derive.biogpt_questions("not the format\tyes\n")


@pytest.mark.skipif(not os.path.isdir(MIRROR), reason="no data mirror")
def test_against_the_reference_build():
    """PubMedQA rebuilt from the mirror's origin files is byte-identical; the filter passes the kept documents."""
    folder = os.path.join(MIRROR, "qa_pubmedqa")

    def read(file):
        with open(os.path.join(folder, file), encoding="utf-8") as f:
            return f.read()
    tsv = {split: "".join(f"question: {json.loads(line)['question']} context: ... answer: ...\tyes\n"
                          for line in read(f"{split}.jsonl").split("\n") if line) for split in ("train", "dev")}
    out = derive.pubmedqa(read("ori_pqal.json"), read("test_ground_truth.json"), tsv["train"], tsv["dev"])
    for file, lines in out.items():
        assert "".join(line + "\n" for line in lines) == read(file), file
    overlap = derive.OverlapFilter(derive.biomedical_test_sentences(MIRROR))
    for corpus in ("biomed_abstracts_kddti", "biomed_evidence_inference"):  # full texts: 6 s more, passed too
        with open(os.path.join(MIRROR, corpus, "abstracts.txt"), encoding="utf-8") as f:
            assert not any(overlap(line.partition("\t")[2]) for line in f), corpus


DDI_XML = """<?xml version="1.0" encoding="UTF-8"?>
<document id="DDI-X.d1">
 <sentence id="DDI-X.d1.s0" text="Aspirin raises&#10;the  level of warfarin and heparin drugs.">
  <entity id="DDI-X.d1.s0.e0" charOffset="0-6" type="drug" text="Aspirin"/>
  <entity id="DDI-X.d1.s0.e1" charOffset="29-36" type="drug" text="warfarin"/>
  <entity id="DDI-X.d1.s0.e2" charOffset="42-48;50-54" type="group" text="heparin drugs"/>
  <pair id="DDI-X.d1.s0.p0" e1="DDI-X.d1.s0.e0" e2="DDI-X.d1.s0.e1" ddi="true" type="mechanism"/>
  <pair id="DDI-X.d1.s0.p1" e1="DDI-X.d1.s0.e1" e2="DDI-X.d1.s0.e2" ddi="false"/>
 </sentence>
 <sentence id="DDI-X.d1.s1" text="No pairs here. "/>
</document>
"""


def test_ddi():
    pairs, sentences = derive.ddi([DDI_XML])
    assert pairs[1:] == [
        "DDI-X.d1.s0.p0\tmechanism\tAspirin\tdrug\t0-6\twarfarin\tdrug\t29-36\t"
        "@DRUG$ raises the level of @DRUG$ and heparin drugs.",
        "DDI-X.d1.s0.p1\tfalse\twarfarin\tdrug\t29-36\theparin drugs\tgroup\t42-48;50-54\t"
        "Aspirin raises the level of @DRUG$ and @DRUG$ drugs."]  # only the first span of a discontinuous one
    assert sentences[1:] == ["DDI-X.d1.s0\tDDI-X.d1\tAspirin raises the  level of warfarin and heparin drugs.",
                             "DDI-X.d1.s1\tDDI-X.d1\tNo pairs here."]  # offsets still point into the text
    assert derive.count_documents(pairs) == 2 and derive.count_documents(sentences) == 2


@pytest.mark.skipif(not os.path.isdir(MIRROR), reason="no data mirror")
def test_ddi_against_the_reference_build():
    """XML written from the mirror's DDI test split converts back to the same bytes."""
    folder = os.path.join(MIRROR, "re_ddi")

    def read(file):  # the rows of a TSV file, header left out
        with open(os.path.join(folder, file), encoding="utf-8") as f:
            return [line.split("\t") for line in f.read().split("\n")[1:-1]]
    pairs = {}
    for p in read("test.tsv"):
        pairs.setdefault(p[0].rsplit(".", 1)[0], []).append(p)
    documents = {}
    for sid, doc, text in read("test_sentences.tsv"):
        xml = [f"<sentence id={quoteattr(sid)} text={quoteattr(text)}>"]
        for p in pairs.get(sid, []):
            xml += [f"<entity id={quoteattr(sid + p[o])} charOffset={quoteattr(p[o])} type={quoteattr(p[o - 1])} "
                    f"text={quoteattr(p[o - 2])}/>" for o in (4, 7)]
            label = 'ddi="false"' if p[1] == "false" else f'ddi="true" type="{p[1]}"'
            xml.append(f'<pair id="{p[0]}" e1={quoteattr(sid + p[4])} e2={quoteattr(sid + p[7])} {label}/>')
        documents.setdefault(doc, []).append("\n".join(xml + ["</sentence>"]))
    built = derive.ddi([f"<document id={quoteattr(d)}>{''.join(s)}</document>" for d, s in documents.items()])
    for lines, file in zip(built, ("test.tsv", "test_sentences.tsv")):
        assert "".join(line + "\n" for line in lines) == open(os.path.join(folder, file), encoding="utf-8").read()
