"""data/prepare.py against a throw-away HTTP server on 127.0.0.1, and with --mirror."""
import contextlib
import hashlib
import io
import http.server
import json
import os
import subprocess
import sys
import tarfile
import threading
from functools import partial

import pytest

from conftest import ROOT

PREPARE = os.path.join(ROOT, "data", "prepare.py")
FILES = {"a.txt": b"first fixture file\n" * 100, "b.txt": b"second fixture file\n" * 50}


@contextlib.contextmanager
def serving(www):
    """Serve the folder `www` over HTTP on 127.0.0.1; yields its URL."""
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *a: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()


def make_archive(path, top, files):
    """A .tar.gz of {path inside: text} below the folder `top`, as GitHub serves a repository."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for inside, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"{top}/{inside}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def registry_entry(file, repo, commit, path, text, derived=False):
    """The registry.json entry of a file with this text."""
    data = text.encode()
    return {"file": file, "repo": repo, "path": path, "commit": commit, "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(), **({"derived": True} if derived else {})}


@pytest.fixture
def server(tmp_path):
    """Serve tmp_path/www as the origin; the registry points at owner/repo@c0ffee/files/<name>."""
    www = tmp_path / "www" / "owner" / "repo" / "c0ffee" / "files"
    www.mkdir(parents=True)
    for name, data in FILES.items():
        (www / name).write_bytes(data)
    files = [registry_entry(name, "owner/repo", "c0ffee", f"files/{name}", data.decode()) for name, data in FILES.items()]
    registry = {"toy": {"licence": "CC0", "files": files}}
    (tmp_path / "registry.json").write_text(json.dumps(registry))
    with serving(tmp_path / "www") as origin:
        yield tmp_path, origin, www


def prepare(tmp_path, *args):
    return subprocess.run([sys.executable, PREPARE, "--registry", str(tmp_path / "registry.json"),
                           "--out", str(tmp_path / "data"), *args], capture_output=True, text=True, timeout=60)


def test_download_then_skip(server):
    tmp_path, origin, _ = server
    r = prepare(tmp_path, "--origin", origin)
    assert r.returncode == 0, r.stderr
    assert "2 fetched" in r.stdout
    assert (tmp_path / "data" / "toy" / "a.txt").read_bytes() == FILES["a.txt"]
    r = prepare(tmp_path, "--origin", origin, "toy")
    assert r.returncode == 0 and "0 fetched, 2 already complete" in r.stdout


def test_checksum_mismatch_removes_file(server):
    tmp_path, origin, www = server
    (www / "b.txt").write_bytes(b"tampered\n")
    r = prepare(tmp_path, "--origin", origin)
    assert r.returncode == 1
    line = r.stderr.strip().splitlines()[-1]  # above it only the progress bars
    assert line.startswith("error: ") and "checksum mismatch for toy/b.txt" in line and f"{origin}/owner/repo" in line
    assert not (tmp_path / "data" / "toy" / "b.txt").exists()
    assert not (tmp_path / "data" / "toy" / "b.txt.tmp").exists()


def test_unknown_name_and_no_network(server):
    tmp_path, _, _ = server
    r = prepare(tmp_path, "nope")
    assert r.returncode == 1 and r.stderr.strip() == "error: unknown data set nope; valid names: toy"
    r = prepare(tmp_path, "--origin", "http://127.0.0.1:9")  # nothing listens on the discard port
    line = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 1 and line.startswith("error: cannot reach") and "--mirror" in line


def test_mirror(server):
    tmp_path, _, www = server
    mirror = tmp_path / "mirror" / "toy"
    mirror.mkdir(parents=True)
    for name, data in FILES.items():
        (mirror / name).write_bytes(data)
    r = prepare(tmp_path, "--mirror", str(tmp_path / "mirror"))
    assert r.returncode == 0 and "2 fetched" in r.stdout
    assert (tmp_path / "data" / "toy" / "b.txt").read_bytes() == FILES["b.txt"]
    (tmp_path / "data" / "toy" / "b.txt").write_bytes(b"corrupt")  # a damaged file is fetched again
    r = prepare(tmp_path, "--mirror", str(tmp_path / "mirror"))
    assert r.returncode == 0 and "1 fetched, 1 already complete" in r.stdout


def test_list_and_real_registry():
    r = subprocess.run([sys.executable, PREPARE, "--list"], capture_output=True, text=True)
    assert r.returncode == 0 and "general_wikipedia" in r.stdout and "CC BY-SA" in r.stdout
    with open(os.path.join(ROOT, "data", "registry.json")) as f:
        registry = json.load(f)
    assert sum(len(ds["files"]) for ds in registry.values()) == 112  # every file of SOURCES.md


def test_derived_rebuilt_from_origins(tmp_path):
    """A derived data set is rebuilt from its origins (a repository archive, JSON files) and compared
    with the reference build; the test sets it is filtered against are prepared first."""
    leak = "the patients who received the study drug showed markedly fewer seizures than those given placebo"
    www = tmp_path / "www"
    tests = {  # the test splits the overlap filter reads, one data set each
        "ner_ncbi_disease/test.tsv": "Seizures\tB\nstopped\tO\n", "ner_bc5cdr_chem/test.tsv": "Aspirin\tB\n",
        "re_chemprot/test.jsonl": json.dumps({"text": f"<< {leak} >>", "label": "false"}) + "\n",
        "cls_hoc/test.tsv": "A sentence.\tempty\n", "cls_nicta_piboso/test.txt": "###1\nother\tA sentence.\n",
        "qa_pubmedqa/test.jsonl": json.dumps({"contexts": ["Ctx."], "long_answer": "Yes."}) + "\n",
        "re_ddi/test_sentences.tsv": "sentence_id\tdoc_id\ttext\nd.s0\td\tA sentence.\n"}
    registry = {}
    for path, text in tests.items():
        name, file = path.split("/")
        (www / "o" / name / "c0").mkdir(parents=True)
        (www / "o" / name / "c0" / file).write_text(text)
        registry[name] = {"licence": "CC0", "files": [registry_entry(file, f"o/{name}", "c0", file, text)]}
    needs = list(registry)

    kddti = {"1": {"title": "Kept.", "abstract": "A clean abstract."}, "2": {"title": "Leak.", "abstract": leak}}
    (www / "o" / "bio" / "c1").mkdir(parents=True)
    (www / "o" / "bio" / "c1" / "valid.json").write_text(json.dumps(kddti))
    expected = "1\tKept. A clean abstract.\n"
    registry["kddti"] = {"licence": "MIT",
                         "files": [registry_entry("abstracts.txt", "o/bio", "c1", "valid.json", expected, True)],
                         "derive": {"builder": "kddti", "sources": [{"repo": "o/bio", "commit": "c1", "path": "valid.json"}],
                                    "entries": 2, "needs": needs, "docs": {"abstracts.txt": 1}}}

    body = " ".join(["word"] * 200)
    make_archive(www / "o" / "rct" / "archive" / "c2.tar.gz", "rct-c2", {
        f"annotations/txt_files/{pmcid}.txt": f"TITLE: \n{pmcid} title\n\nABSTRACT.BACKGROUND::\n{abstract}\n\n"
                                              f"BODY.INTRODUCTION:\n{body}\n"
        for pmcid, abstract in (("PMC7", "Plain abstract."), ("PMC3", f"Abstract with {leak}."))})
    files = {"abstracts.txt": "PMC7\tPMC7 title Plain abstract.\n", "fulltext_00.txt": f"PMC7\t{body}\n"}
    registry["rct"] = {"licence": "MIT", "files": [registry_entry(f, "o/rct", "c2", "txt_files", t, True)
                                                   for f, t in files.items()],
                       "derive": {"builder": "evidence_inference", "needs": needs,
                                  "docs": {"abstracts.txt": 1, "fulltext_*.txt": 2},  # 2: the reference differs
                                  "archive": {"repo": "o/rct", "commit": "c2", "count": 2,
                                              "members": ["annotations/txt_files/PMC*.txt"]}}}
    (tmp_path / "registry.json").write_text(json.dumps(registry))
    with serving(www) as origin:
        r = prepare(tmp_path, "--origin", origin, "--archive-origin", origin, "kddti", "rct")
        assert r.returncode == 0, r.stderr
        assert "ner_ncbi_disease: 1 fetched" in r.stdout  # the test sets come first
        assert "kddti: rebuilt abstracts.txt 1 docs; identical to the reference build" in r.stdout
        assert (tmp_path / "data" / "kddti" / "abstracts.txt").read_text() == expected  # the leaking abstract is out
        for f, t in files.items():
            assert (tmp_path / "data" / "rct" / f).read_text() == t
        # the reference build said 2 full texts, this one has 1: a warning with both counts
        assert "warning: rct: rebuilt abstracts.txt 1 docs, fulltext_*.txt 1 docs (reference build: abstracts.txt 1, " \
               "fulltext_*.txt 2); 0 of 2 files differ from it" in r.stdout
        r = prepare(tmp_path, "--origin", origin, "--archive-origin", origin, "kddti")
        assert r.returncode == 0 and "kddti: 0 fetched, 1 already complete" in r.stdout and "rebuilt" not in r.stdout


def test_derived_without_builder(tmp_path):
    """A derived data set nobody can rebuild: skipped in a run over everything, an error when asked for."""
    entry = registry_entry("train.tsv", "o/ddi", "c3", "data/train/*.xml", "pairs\n", derived=True)
    (tmp_path / "registry.json").write_text(json.dumps({"ddi": {"licence": "CC BY-NC", "files": [entry]}}))
    r = prepare(tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("skipped: ddi is derived from o/ddi@c3")
    r = prepare(tmp_path, "ddi")
    assert r.returncode == 1 and r.stderr.strip() == ("error: ddi is derived from o/ddi@c3 (data/train/*.xml); "
                                                      "rebuilding it is not implemented: use --mirror DIR")


def test_ddi_rebuilt_from_an_archive(tmp_path):
    """DDI's three XML folders become train/dev/test files, documents in file-name order."""
    def document(doc, sentence):
        return (f'<document id="{doc}"><sentence id="{doc}.s0" text="{sentence}">'
                f'<entity id="{doc}.s0.e0" charOffset="0-1" type="drug" text="{sentence[:2]}"/>'
                f'<entity id="{doc}.s0.e1" charOffset="3-4" type="brand" text="{sentence[3:5]}"/>'
                f'<pair id="{doc}.s0.p0" e1="{doc}.s0.e0" e2="{doc}.s0.e1" ddi="true" type="int"/></sentence></document>')
    make_archive(tmp_path / "www" / "o" / "ddi" / "archive" / "c4.tar.gz", "ddi-c4", {
        "data/train/B.xml": document("d.b", "Bb Cc."), "data/train/A.xml": document("d.a", "Aa Bb."),
        "data/devel/C.xml": document("d.c", "Cc Dd."), "data/test/D.xml": document("d.d", "Dd Ee."),
        "data/other/E.xml": document("d.e", "not a split")})
    pairs_header = "pair_id\tlabel\te1_text\te1_type\te1_offset\te2_text\te2_type\te2_offset\tsentence_masked"
    sentences_header = "sentence_id\tdoc_id\ttext"
    expected = {"train.tsv": ["d.a.s0.p0\tint\tAa\tdrug\t0-1\tBb\tbrand\t3-4\t@DRUG$ @DRUG$.",
                              "d.b.s0.p0\tint\tBb\tdrug\t0-1\tCc\tbrand\t3-4\t@DRUG$ @DRUG$."],
                "train_sentences.tsv": ["d.a.s0\td.a\tAa Bb.", "d.b.s0\td.b\tBb Cc."],
                "dev.tsv": ["d.c.s0.p0\tint\tCc\tdrug\t0-1\tDd\tbrand\t3-4\t@DRUG$ @DRUG$."],
                "dev_sentences.tsv": ["d.c.s0\td.c\tCc Dd."],
                "test.tsv": ["d.d.s0.p0\tint\tDd\tdrug\t0-1\tEe\tbrand\t3-4\t@DRUG$ @DRUG$."],
                "test_sentences.tsv": ["d.d.s0\td.d\tDd Ee."]}
    texts = {f: "".join(line + "\n" for line in [pairs_header if "sentences" not in f else sentences_header] + lines)
             for f, lines in expected.items()}
    registry = {"re_ddi": {"licence": "CC BY-NC", "files": [registry_entry(f, "o/ddi", "c4", "data", t, True)
                                                            for f, t in texts.items()],
                           "derive": {"builder": "ddi", "docs": {"train.tsv": 2, "dev.tsv": 1, "test.tsv": 1,
                                                                "*_sentences.tsv": 4},
                                      "archive": {"repo": "o/ddi", "commit": "c4", "count": 4,
                                                  "members": ["data/train/*.xml", "data/devel/*.xml", "data/test/*.xml"]}}}}
    (tmp_path / "registry.json").write_text(json.dumps(registry))
    with serving(tmp_path / "www") as origin:
        r = prepare(tmp_path, "--origin", origin, "--archive-origin", origin)
    assert r.returncode == 0, r.stderr
    assert "re_ddi: rebuilt train.tsv 2 docs, dev.tsv 1 docs, test.tsv 1 docs, *_sentences.tsv 4 docs; identical" in r.stdout
    for f, t in texts.items():
        assert (tmp_path / "data" / "re_ddi" / f).read_text() == t


def test_corrupt_origin_is_one_line(tmp_path):
    """An origin that does not parse (here truncated JSON) stops the rebuild with one line naming the cache."""
    (tmp_path / "www" / "o" / "bio" / "c1").mkdir(parents=True)
    (tmp_path / "www" / "o" / "bio" / "c1" / "valid.json").write_text('{"1": {"title": "Cut off')
    source = {"repo": "o/bio", "commit": "c1", "path": "valid.json"}
    registry = {"kddti": {"licence": "MIT", "files": [registry_entry("abstracts.txt", **source, text="x\n", derived=True)],
                          "derive": {"builder": "kddti", "sources": [source], "entries": 1, "docs": {"abstracts.txt": 1}}}}
    (tmp_path / "registry.json").write_text(json.dumps(registry))
    with serving(tmp_path / "www") as origin:
        r = prepare(tmp_path, "--origin", origin)
    line = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 1 and line.startswith("error: kddti: cannot rebuild from the origins in ")
    assert "JSONDecodeError" in line and line.endswith("remove them and run again")
    assert not (tmp_path / "data" / "kddti" / "abstracts.txt").exists()


def load_prepare():
    """data/prepare.py as a module (it imports data/derive.py beside it)."""
    import importlib.util
    sys.path.insert(0, os.path.dirname(PREPARE))
    spec = importlib.util.spec_from_file_location("prepare", PREPARE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("stop", ["full disk", "Ctrl-C"])
def test_a_copy_cut_short_leaves_no_partial_file(server, monkeypatch, stop):
    import errno
    tmp_path, _, _ = server
    mirror = tmp_path / "mirror" / "toy"
    mirror.mkdir(parents=True)
    for name, data in FILES.items():
        (mirror / name).write_bytes(data)
    prepare_module = load_prepare()

    def copy_half(source, target):  # half the file written, then the disk is full or the user stops it
        with open(target, "wb") as f:
            f.write(open(source, "rb").read()[:100])
        raise OSError(errno.ENOSPC, "No space left on device") if stop == "full disk" else KeyboardInterrupt()
    monkeypatch.setattr(prepare_module.shutil, "copyfile", copy_half)
    argv = ["--registry", str(tmp_path / "registry.json"), "--out", str(tmp_path / "data"),
            "--mirror", str(tmp_path / "mirror")]
    if stop == "full disk":
        with pytest.raises(prepare_module.PrepareError, match=r"cannot write .*a.txt \(No space left on device\); "
                                                              "free some space or choose another --out"):
            prepare_module.main(argv)
    else:
        with pytest.raises(KeyboardInterrupt):
            prepare_module.main(argv)
    assert os.listdir(tmp_path / "data" / "toy") == []  # no .tmp left to fill the disk
