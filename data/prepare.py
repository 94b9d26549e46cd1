"""Download (or copy from a local mirror) the corpora and task data into data/<name>/.

Every file is listed in data/registry.json with its public origin (GitHub repository, path and
the commit it is pinned to), size, sha256 and licence; see data/README.md.

    python data/prepare.py                      # everything, from the public origins
    python data/prepare.py general_wikipedia    # only some data sets
    python data/prepare.py --mirror ../shared/data   # copy from a folder laid out like data/
    python data/prepare.py --list               # names, sizes, licences

A file already present with the right checksum is skipped; a download goes to a temporary file
that is renamed only once its checksum matches, so an interrupted run leaves nothing half-written.
"""
import argparse
import hashlib
import json
import os
import shutil
import sys
import urllib.error
import urllib.request

from tqdm import tqdm

HERE = os.path.dirname(os.path.abspath(__file__))
GITHUB_RAW = "https://raw.githubusercontent.com"


class PrepareError(Exception):
    """A failure the user can act on; printed as one line."""


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
        raise PrepareError(f"cannot reach {url} ({getattr(e, 'reason', e)}); no network? "
                           f"copy from a local copy instead with --mirror DIR")


def prepare_file(name, entry, out_dir, mirror, origin):
    """Make out_dir/name/file exist with the registry's checksum; return 'skipped' or 'fetched'."""
    dest = os.path.join(out_dir, name, entry["file"])
    if os.path.exists(dest) and os.path.getsize(dest) == entry["bytes"] and sha256_of(dest) == entry["sha256"]:
        return "skipped"
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    tmp = dest + ".tmp"
    if mirror:
        source = os.path.join(mirror, name, entry["file"])
        if not os.path.exists(source):
            raise PrepareError(f"{source} not found in the mirror")
        shutil.copyfile(source, tmp)
    elif entry.get("derived"):
        # NOTE(limitation): files marked DERIVED in SOURCES.md were converted from thousands of
        # origin files (XML, JSON, per-article text); rebuilding them here is not implemented yet.
        raise PrepareError(f"{name}/{entry['file']} is derived from {entry['repo']}@{entry['commit'][:8]} "
                           f"({entry['path']}); rebuilding it is not implemented: use --mirror DIR")
    else:
        source = url_of(entry, origin)
        download(source, tmp, entry["bytes"])
    if sha256_of(tmp) != entry["sha256"]:
        os.remove(tmp)
        raise PrepareError(f"checksum mismatch for {name}/{entry['file']} from {source}; the file was removed")
    os.replace(tmp, dest)
    return "fetched"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="data sets to prepare (default: all)")
    parser.add_argument("--mirror", help="copy from this folder (laid out like data/) instead of downloading")
    parser.add_argument("--out", default=HERE, help="where the data sets go (default: data/)")
    parser.add_argument("--list", action="store_true", help="list the data sets, their sizes and licences")
    parser.add_argument("--registry", default=os.path.join(HERE, "registry.json"), help=argparse.SUPPRESS)
    parser.add_argument("--origin", default=GITHUB_RAW, help=argparse.SUPPRESS)  # tests serve files locally
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
    for name in args.names or list(registry):
        counts = {"skipped": 0, "fetched": 0}
        for entry in registry[name]["files"]:
            counts[prepare_file(name, entry, args.out, args.mirror, args.origin)] += 1
        print(f"{name}: {counts['fetched']} fetched, {counts['skipped']} already complete")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
