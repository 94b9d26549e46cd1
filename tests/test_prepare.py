"""data/prepare.py against a throw-away HTTP server on 127.0.0.1, and with --mirror."""
import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
from functools import partial

import pytest

from conftest import ROOT

PREPARE = os.path.join(ROOT, "data", "prepare.py")
FILES = {"a.txt": b"first fixture file\n" * 100, "b.txt": b"second fixture file\n" * 50}


@pytest.fixture
def server(tmp_path):
    """Serve tmp_path/www as the origin; the registry points at owner/repo@c0ffee/files/<name>."""
    www = tmp_path / "www" / "owner" / "repo" / "c0ffee" / "files"
    www.mkdir(parents=True)
    for name, data in FILES.items():
        (www / name).write_bytes(data)
    registry = {"toy": {"licence": "CC0", "files": [
        {"file": name, "repo": "owner/repo", "path": f"files/{name}", "commit": "c0ffee", "bytes": len(data),
         "sha256": hashlib.sha256(data).hexdigest()} for name, data in FILES.items()]}}
    (tmp_path / "registry.json").write_text(json.dumps(registry))
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "www"))
    handler.log_message = lambda *a: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield tmp_path, f"http://127.0.0.1:{httpd.server_address[1]}", www
    httpd.shutdown()


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
