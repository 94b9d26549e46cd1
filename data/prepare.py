"""Download (or copy from a local mirror) the corpora and task data into data/<name>/.

Every file is listed in data/registry.json with its public origin (GitHub repository, path and
the commit it is pinned to), size, sha256 and licence; see data/README.md.

    python data/prepare.py                      # everything, from the public origins
    python data/prepare.py general_wikipedia    # only some data sets
    python data/prepare.py --mirror ../shared/data   # copy from a folder laid out like data/
    python data/prepare.py --list               # names, sizes, licences

A file already present with the right checksum is skipped; a download goes to a temporary file
that is renamed only once its checksum matches, so an interrupted run leaves nothing half-written.
Files marked "derived" are rebuilt from their origins by data/derive.py (origins are cached under
data/cache/origins/) and compared with the reference build: document counts and sha256.
"""
import argparse
import errno
import fnmatch
import hashlib
import json
import os
import shutil
import sys
import tarfile
import urllib.error
import urllib.request

from tqdm import tqdm

import derive

HERE = os.path.dirname(os.path.abspath(__file__))
GITHUB_RAW = "https://raw.githubusercontent.com"
GITHUB = "https://github.com"  # serves an archive of a repository at a commit


class PrepareError(Exception):
    """A failure the user can act on; printed as one line."""


WRITE_ERRORS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT}  # the disk, not the network


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def url_of(entry, origin):
    return f"{origin}/{entry['repo']}/{entry['commit']}/{entry['path']}"


def download(url, tmp, size):
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f, \
                tqdm(total=size, unit="B", unit_scale=True, desc=os.path.basename(tmp)[:-4], leave=False) as bar:
            for chunk in iter(lambda: r.read(1 << 16), b""):
                f.write(chunk)
                bar.update(len(chunk))
    except urllib.error.HTTPError as e:
        raise PrepareError(f"HTTP {e.code} for {url}")
    except (urllib.error.URLError, OSError) as e:
        if getattr(e, "errno", None) in WRITE_ERRORS:  # the disk, not the network: prepare_file says so
            raise
        raise PrepareError(f"cannot reach {url} ({getattr(e, 'reason', e)}); no network? "
                           f"copy from a local copy instead with --mirror DIR")


def prepare_file(name, entry, out_dir, mirror, origin):
    """Make out_dir/name/file exist with the registry's checksum; return 'skipped' or 'fetched'. A
    copy or download cut short (Ctrl-C, a full or read-only disk) leaves no partial file behind."""
    dest = os.path.join(out_dir, name, entry["file"])
    if os.path.exists(dest) and os.path.getsize(dest) == entry["bytes"] and sha256_of(dest) == entry["sha256"]:
        return "skipped"
    tmp = dest + ".tmp"
    source = os.path.join(mirror, name, entry["file"]) if mirror else url_of(entry, origin)
    if mirror and not os.path.exists(source):
        raise PrepareError(f"{source} not found in the mirror")
    try:
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        if mirror:
            shutil.copyfile(source, tmp)
        else:
            download(source, tmp, entry["bytes"])
    except (KeyboardInterrupt, OSError) as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, KeyboardInterrupt):
            raise
        raise PrepareError(f"cannot write {dest} ({e.strerror or e}); free some space or choose another --out")
    if sha256_of(tmp) != entry["sha256"]:
        os.remove(tmp)
        raise PrepareError(f"checksum mismatch for {name}/{entry['file']} from {source}; the file was removed")
    os.replace(tmp, dest)
    return "fetched"


def read_text(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def fetch_origin(url, cache):
    """Download `url` once into the cache folder (atomically); return the local path."""
    path = os.path.join(cache, url.split("://", 1)[1].replace("/", "_"))
    if not os.path.exists(path):
        os.makedirs(cache, exist_ok=True)
        download(url, path + ".tmp", None)
        os.replace(path + ".tmp", path)
    return path


def read_archive(path, members, count):
    """(path, text) of the archive's files matching one of `members`, in path order; there must be `count`."""
    found = []
    try:
        with tarfile.open(path, "r:gz") as tar:
            for m in tar:
                inside = m.name.split("/", 1)[-1]  # below the archive's top folder, REPO-COMMIT/
                if m.isfile() and any(fnmatch.fnmatch(inside, pattern) for pattern in members):
                    found.append((inside, tar.extractfile(m).read().decode("utf-8")))
    except (tarfile.TarError, EOFError, UnicodeDecodeError) as e:
        os.remove(path)
        raise PrepareError(f"{path} is not a readable archive of UTF-8 text ({e}); removed, run again")
    if len(found) != count:
        raise PrepareError(f"{path} holds {len(found)} files {' '.join(members)}, the origin has {count}; "
                           f"remove it and run again")
    return sorted(found)


def run_builder(spec, texts, files, folder, overlap):
    """Call the data set's builder in derive.py on its origins; return {file name: lines}."""
    if spec["builder"] == "evidence_inference":  # annotations/txt_files/PMC123.txt -> PMC123
        return derive.evidence_inference([(os.path.basename(p)[:-4], text) for p, text in files], overlap)
    if spec["builder"] == "ddi":  # data/{train,devel,test}/*.xml -> {train,dev,test}.tsv and _sentences.tsv
        built = {}
        for folder_name, split in (("train", "train"), ("devel", "dev"), ("test", "test")):
            xml_texts = [text for p, text in files if p.split("/")[-2] == folder_name]
            built[f"{split}.tsv"], built[f"{split}_sentences.tsv"] = derive.ddi(xml_texts)
        return built
    if spec["builder"] == "kddti":
        entries = sum(len(json.loads(t)) for t in texts)
        if entries != spec["entries"]:
            raise ValueError(f"the KD-DTI files hold {entries} entries, the origin {spec['entries']}")
        return derive.kddti(texts, overlap)
    # pubmedqa: the data set's own two plain files, plus BioGPT's split lists
    own = [read_text(os.path.join(folder, f)) for f in ("ori_pqal.json", "test_ground_truth.json")]
    return derive.pubmedqa(*own, *texts)


def build_derived(name, dataset, out_dir, origin, archive_origin):
    """Rebuild the derived files of one data set with data/derive.py; compare with the reference build."""
    spec, folder = dataset["derive"], os.path.join(out_dir, name)
    cache = os.path.join(out_dir, "cache", "origins")
    sources = [fetch_origin(url_of(s, origin), cache) for s in spec.get("sources", [])]
    files = []
    if "archive" in spec:
        a = spec["archive"]
        archive = fetch_origin(f"{archive_origin}/{a['repo']}/archive/{a['commit']}.tar.gz", cache)
        files = read_archive(archive, a["members"], a["count"])
    # the pretraining corpora are filtered against the test sets they "need" (prepared before)
    overlap = derive.OverlapFilter(derive.biomedical_test_sentences(out_dir)) if "needs" in spec else None
    try:
        texts = [read_text(p) for p in sources]
        built = run_builder(spec, texts, files, folder, overlap)
    except (ValueError, KeyError, SyntaxError) as e:  # bad JSON, UTF-8 or XML (ParseError), a missing field
        raise PrepareError(f"{name}: cannot rebuild from the origins in {cache} ({type(e).__name__}: {e}); "
                           f"remove them and run again")
    os.makedirs(folder, exist_ok=True)
    for file, lines in built.items():  # each written atomically
        with open(os.path.join(folder, file + ".tmp"), "w", encoding="utf-8") as f:
            f.writelines(line + "\n" for line in lines)
        os.replace(os.path.join(folder, file + ".tmp"), os.path.join(folder, file))
    counts = {pattern: sum(derive.count_documents(lines) for file, lines in built.items()
                           if fnmatch.fnmatch(file, pattern)) for pattern in spec["docs"]}
    expected = {e["file"]: e["sha256"] for e in dataset["files"] if e.get("derived")}
    same = [f for f, sha in expected.items()
            if os.path.exists(os.path.join(folder, f)) and sha256_of(os.path.join(folder, f)) == sha]
    summary = ", ".join(f"{pattern} {n:,} docs" for pattern, n in counts.items())
    if counts == spec["docs"] and len(same) == len(expected):
        print(f"{name}: rebuilt {summary}; identical to the reference build")
    else:
        reference = ", ".join(f"{pattern} {n:,}" for pattern, n in spec["docs"].items())
        print(f"warning: {name}: rebuilt {summary} (reference build: {reference}); {len(expected) - len(same)} of "
              f"{len(expected)} files differ from it, so figures may differ slightly from the README's")


def not_rebuildable(name, dataset):
    """Why the derived files of a data set cannot be rebuilt here, or None."""
    derived = [e for e in dataset["files"] if e.get("derived")]
    if derived and "derive" not in dataset:
        # every derived data set of registry.json has a builder; this guards a new entry without one
        return (f"{name} is derived from {derived[0]['repo']}@{derived[0]['commit'][:8]} ({derived[0]['path']}); "
                f"rebuilding it is not implemented: use --mirror DIR")
    return None


def prepare_dataset(name, registry, args, done):
    """Prepare one data set (first those it needs); `done` holds the names already prepared."""
    if name in done:
        return
    done.add(name)
    dataset = registry[name]
    derived = [e for e in dataset["files"] if e.get("derived")]
    counts = {"skipped": 0, "fetched": 0}
    for entry in dataset["files"]:
        if args.mirror or not entry.get("derived"):
            counts[prepare_file(name, entry, args.out, args.mirror, args.origin)] += 1
    rebuild = bool(derived) and not args.mirror  # (with --mirror they were copied above)
    if rebuild and all(os.path.exists(p) and sha256_of(p) == e["sha256"]
                       for e in derived for p in [os.path.join(args.out, name, e["file"])]):
        counts["skipped"] += len(derived)
        rebuild = False
    if sum(counts.values()):  # a data set of derived files only says what it did after the rebuild
        print(f"{name}: {counts['fetched']} fetched, {counts['skipped']} already complete")
    if rebuild:
        if not_rebuildable(name, dataset):
            raise PrepareError(not_rebuildable(name, dataset))
        for need in dataset["derive"].get("needs", []):
            prepare_dataset(need, registry, args, done)
        build_derived(name, dataset, args.out, args.origin, args.archive_origin)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="data sets to prepare (default: all)")
    parser.add_argument("--mirror", help="copy from this folder (laid out like data/) instead of downloading")
    parser.add_argument("--out", default=HERE, help="where the data sets go (default: data/)")
    parser.add_argument("--list", action="store_true", help="list the data sets, their sizes and licences")
    parser.add_argument("--registry", default=os.path.join(HERE, "registry.json"), help=argparse.SUPPRESS)
    parser.add_argument("--origin", default=GITHUB_RAW, help=argparse.SUPPRESS)  # tests serve files locally
    parser.add_argument("--archive-origin", default=GITHUB, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    with open(args.registry) as f:
        registry = json.load(f)
    if args.list:
        for name, ds in registry.items():
            mb = sum(e["bytes"] for e in ds["files"]) / 1e6
            print(f"{name:28s} {len(ds['files']):3d} files {mb:7.1f} MB  {ds['licence']}")
        return 0
    unknown = [n for n in args.names if n not in registry]
    if unknown:
        raise PrepareError(f"unknown data set {', '.join(unknown)}; valid names: {', '.join(registry)}")
    done = set()
    for name in args.names or list(registry):
        if not args.names and not args.mirror and not_rebuildable(name, registry[name]):
            print(f"skipped: {not_rebuildable(name, registry[name])}")  # asked for by name, it is an error
            continue
        prepare_dataset(name, registry, args, done)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("stopped: the files prepared so far are kept; run the same command again to finish", file=sys.stderr)
        sys.exit(130)
