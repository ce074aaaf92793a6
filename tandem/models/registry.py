"""The model registry: every GGUF in the models folder plus the embedded default models, described from
their headers (no weights loaded), and which of them can draft for which.

Scanning parses each file's header once: the facts are kept in a JSON index under the user cache folder,
keyed by path, size and mtime, and each distinct vocabulary is stored once by fingerprint (a model family
shares one file), so a restart reads the index instead of the files. A `Registry` is an immutable snapshot;
scan again to see new files.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import platformdirs

from tandem.engine.vocab import Pairing as VocabPairing, VocabInfo, check_pairing, pairing, vocab_info_from_metadata
from tandem.errors import IncompatibleDraftError, ModelNotFoundError, TandemError
from tandem.models import defaults
from tandem.models.gguf_meta import read_header

log = logging.getLogger("tandem.models")

INDEX_VERSION = 1
"""Bump when the index's entries change shape or meaning (older indexes are then ignored)."""
MODELS_DIR_ENV = "TANDEM_MODELS_DIR"
"""Environment variable that overrides the default models folder."""
BUILTIN = "builtin"
MODELS_DIR = "models-dir"
PATH = "path"


def expand(name: str | Path) -> Path:
    """`name` as a path, a leading ~ or ~user expanded; as written where that home directory is unknown
    (a request may name any user: that must be a missing model, not a server error)."""
    try:
        return Path(name).expanduser()
    except RuntimeError:
        return Path(name)


def default_models_dir() -> Path:
    """$TANDEM_MODELS_DIR, else `models` under the user data folder (~/.local/share/tandem, XDG_DATA_HOME)."""
    env = os.environ.get(MODELS_DIR_ENV)
    return Path(env).expanduser() if env else Path(platformdirs.user_data_dir("tandem")) / "models"


def default_index_dir() -> Path:
    """`registry` under Tandem's cache folder ($TANDEM_CACHE_DIR, else ~/.cache/tandem, XDG_CACHE_HOME)."""
    return defaults.cache_dir() / "registry"


@dataclass(frozen=True)
class ModelFacts:
    """What a GGUF header says about a model (cached in the index)."""

    arch: str
    """general.architecture (llama, qwen2, ...)."""
    name: str | None
    """general.name, when the file has one."""
    n_params: int
    """Parameter count: the sum of the tensors' element counts."""
    quantization: str
    """general.file_type's name (F32, Q4_1, Q4_K_M, ...), else the tensor type holding the most bytes."""
    context_length: int | None
    """Trained context length (<arch>.context_length)."""
    n_vocab: int
    """Tokens in the vocabulary."""
    vocab_type: str
    """Tokenizer family by llama.cpp's name (bpe, spm, ...)."""
    vocab_fingerprint: str
    """VocabInfo.fingerprint: equal fingerprints mean interchangeable vocabularies."""


@dataclass(frozen=True)
class ModelEntry:
    """One model the registry knows."""

    id: str
    """The name requests and commands use: the file stem (a relative path when stems repeat)."""
    path: Path
    """The GGUF file."""
    origin: str
    """builtin (the embedded default pair), models-dir (found in the models folder) or path (named explicitly)."""
    size_bytes: int
    """File size in bytes."""
    facts: ModelFacts
    """What its header says."""

    def to_dict(self) -> dict:
        return {"id": self.id, "path": str(self.path), "origin": self.origin, "size_bytes": self.size_bytes,
                **asdict(self.facts)}


@dataclass(frozen=True)
class Pairing:
    """Whether `draft` can draft for `main`, and if not, why."""

    main: str
    """Main model id."""
    draft: str
    """Draft model id."""
    reason: str | None
    """None when the pair is usable; else the first reason it is refused."""
    translated: bool = False
    """Usable through text: the draft has another vocabulary (tandem.spec.translate)."""
    text_share: float = 1.0
    """Share of the main model's tokens the draft's vocabulary can write as text (1.0 for the same vocabulary)."""


@dataclass(frozen=True)
class RegistryConfig:
    """Where the registry looks and where it keeps its index."""

    models_dir: Path = field(default_factory=default_models_dir)
    """Folder scanned (recursively) for *.gguf files."""
    index_dir: Path = field(default_factory=default_index_dir)
    """Folder of the on-disk index (index.json and one vocabulary file per fingerprint)."""
    builtin: bool = True
    """List the embedded default models (the packaged Q4_1 draft; the derived main once it is cached)."""
    extra: tuple[Path, ...] = ()
    """More GGUF files to list (models named by path on the command line)."""


class Registry:
    """A snapshot of the known models, with lazy vocabularies and memoised compatibility."""

    def __init__(self, config: RegistryConfig, entries: Iterable[ModelEntry], *, broken: dict[str, str],
                 parsed: int, index: _Index | None = None):
        self.config = config
        self._index = index or _Index(config.index_dir)
        self.entries: tuple[ModelEntry, ...] = tuple(entries)
        self.broken = dict(broken)
        """path -> why the file is not listed (not GGUF, no vocabulary, unreadable)."""
        self.parsed = parsed
        """How many headers this scan parsed (the rest came from the index)."""
        self._by_name: dict[str, ModelEntry] = {}
        for e in reversed(self.entries):  # ids win over file names, earlier entries over later ones
            for alias in (e.path.name, str(e.path), str(e.path.resolve()), e.id):
                self._by_name[alias] = e
        self._vocabs: dict[str, VocabInfo] = {}
        self._reasons: dict[tuple[str, str], VocabPairing] = {}  # by the two vocabularies' fingerprints

    @classmethod
    def scan(cls, config: RegistryConfig | None = None, *, previous: Registry | None = None) -> Registry:
        """Scan the models folder, the built-ins and the extra paths, parsing only new or changed files. The
        vocabularies and compatibility verdicts `previous` (an earlier scan) holds are kept for the models still
        listed: they are keyed by vocabulary fingerprint, so a rescan need not load them again."""
        config = config or RegistryConfig()
        index = _Index(config.index_dir)
        found: list[tuple[Path, str]] = []
        if config.builtin:
            found += [(p, BUILTIN) for p in _builtin_paths()]
        found += [(p, MODELS_DIR) for p in _gguf_files(config.models_dir)]
        found += [(Path(p).expanduser(), PATH) for p in config.extra]
        entries: list[tuple[Path, str, int, ModelFacts]] = []
        broken: dict[str, str] = {}
        seen: set[Path] = set()
        for path, origin in found:
            try:
                real = path.resolve()
                if real in seen:
                    continue
                seen.add(real)
                size, facts = index.facts(path)
            except TandemError as e:
                broken[str(path)] = e.message
                continue
            except OSError as e:
                broken[str(path)] = f"cannot read {path}: {e.strerror or e}"
                continue
            entries.append((path, origin, size, facts))
        index.save()
        ids = _ids([(p, o) for p, o, _s, _f in entries], config.models_dir)
        out = cls(config, [ModelEntry(i, p, o, s, f) for i, (p, o, s, f) in zip(ids, entries)],
                  broken=broken, parsed=index.parsed, index=index)
        if previous is not None:
            fps = {e.facts.vocab_fingerprint for e in out.entries}
            out._vocabs = {fp: v for fp, v in previous._vocabs.items() if fp in fps}
            out._reasons = {k: r for k, r in previous._reasons.items() if k[0] in fps and k[1] in fps}
        return out

    # -- lookup ---------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[ModelEntry]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, name: str) -> ModelEntry | None:
        """The entry whose id, file name or path is `name`, or None."""
        e = self._by_name.get(name)
        if e is None and ("/" in name or os.sep in name):
            try:
                e = self._by_name.get(str(expand(name).resolve()))
            except (OSError, ValueError):  # ValueError: a NUL byte in the name
                e = None
        return e

    def find(self, name: str, *, param: str = "model") -> ModelEntry:
        """Like get(), but a name that is not known raises ModelNotFoundError listing what is."""
        e = self.get(name)
        if e is None:
            known = ", ".join(x.id for x in self.entries[:12]) or "none"
            raise ModelNotFoundError(f"model {name!r} is not in the registry (known: {known})",
                                     f"put the GGUF file in {self.config.models_dir} or use an id from "
                                     "`tandem models`", param=param, code="model_not_found")
        return e

    def in_models_dir(self, path: str | Path) -> bool:
        """Whether `path` names a file inside the models folder, `..` resolved lexically.

        Symlinks inside the folder are the user's own choice and count as inside (LM Studio-style
        folders of links), so the check is on the path as named, not on its target.
        """
        root = os.path.abspath(self.config.models_dir.expanduser())
        return Path(os.path.abspath(expand(path))).is_relative_to(root)

    # -- compatibility --------------------------------------------------------------------------------
    def vocab(self, entry: ModelEntry) -> VocabInfo:
        """The entry's full vocabulary, from the index's vocabulary store."""
        fp = entry.facts.vocab_fingerprint
        if fp not in self._vocabs:
            self._vocabs[fp] = self._index.vocab(fp, entry.path)
        return self._vocabs[fp]

    def incompatibility(self, main: ModelEntry, draft: ModelEntry) -> str | None:
        """Why `draft` cannot draft for `main` (vocabulary, then size), or None when it can."""
        if main.path.resolve() == draft.path.resolve():
            return "a model cannot draft for itself"
        vocab = self.vocab_pairing(main, draft)
        if vocab.kind is None:
            return vocab.reason
        dp, mp = draft.facts.n_params, main.facts.n_params
        if vocab.kind == "translated" and dp >= mp:  # (a smaller file of more weights only pays within a family)
            return f"the draft is not smaller than the main model ({dp:,} vs {mp:,} parameters)"
        if draft.size_bytes >= main.size_bytes and dp >= mp:
            return (f"the draft is not smaller than the main model ({_gb(draft.size_bytes)} vs "
                    f"{_gb(main.size_bytes)}, {dp:,} vs {mp:,} parameters)")
        return None

    def vocab_pairing(self, main: ModelEntry, draft: ModelEntry) -> VocabPairing:
        """How the draft's vocabulary serves the main model's: the same ids, through text, or not (cached per pair of
        vocabularies: reading another vocabulary's share of text takes a fraction of a second)."""
        key = (main.facts.vocab_fingerprint, draft.facts.vocab_fingerprint)
        if key not in self._reasons:
            self._reasons[key] = pairing(self.vocab(main), self.vocab(draft))
        return self._reasons[key]

    def pairings(self, main: ModelEntry) -> list[Pairing]:
        """Every other model as a draft for `main`, usable or not (with the reason)."""
        out = []
        for d in self.entries:
            if d is not main:
                vocab = self.vocab_pairing(main, d)
                out.append(Pairing(main.id, d.id, self.incompatibility(main, d), vocab.kind == "translated",
                                   round(vocab.text_share, 4)))
        return out

    def compatible_drafts(self, main: ModelEntry) -> list[ModelEntry]:
        """The models that can draft for `main`, smallest first."""
        ok = [d for d in self.entries if d is not main and self.incompatibility(main, d) is None]
        return sorted(ok, key=lambda d: (d.size_bytes, d.id))

    def check_pair(self, main: ModelEntry, draft: ModelEntry) -> None:
        """Raise IncompatibleDraftError (cause and fix) unless `draft` can draft for `main`."""
        check_pairing(self.vocab(main), self.vocab(draft), main_name=main.id, draft_name=draft.id)
        reason = self.incompatibility(main, draft)
        if reason is not None:
            raise IncompatibleDraftError(f"draft {draft.id} cannot be used with {main.id}: {reason}",
                                         "pick a smaller model of the same family; `tandem models` lists the "
                                         "compatible drafts", param="draft_model", code="incompatible_draft")


def _gb(n: int) -> str:
    return f"{n / 1e9:.3g} GB" if n >= 1e9 else f"{n / 1e6:.3g} MB"


def _builtin_paths() -> list[Path]:
    """The packaged draft, and the derived main when it is already cached (a scan never derives it)."""
    out = []
    try:
        out.append(defaults.draft_path())
    except TandemError as e:
        log.debug("no built-in draft: %s", e.message)
    main = defaults.main_path()
    if main.is_file():
        out.append(main)
    return out


def _gguf_files(root: Path) -> list[Path]:
    root = root.expanduser()
    if not root.is_dir():
        return []
    files = [p for p in root.rglob("*") if p.suffix.lower() == ".gguf" and not p.name.startswith(".")
             and p.is_file()]
    return sorted(files, key=lambda p: str(p.relative_to(root)))


def _ids(found: list[tuple[Path, str]], models_dir: Path) -> list[str]:
    """File stems; a repeated stem becomes the path relative to the models folder (without .gguf), then
    gets a ~N suffix if that still repeats. Earlier entries (built-ins first) keep the plain stem."""
    stems: dict[str, int] = {}
    for path, _ in found:
        stems[path.stem] = stems.get(path.stem, 0) + 1
    ids: list[str] = []
    taken: set[str] = set()
    for path, origin in found:
        cand = path.stem
        if stems[cand] > 1 and cand in taken:
            if origin == MODELS_DIR:
                cand = path.relative_to(models_dir.expanduser()).with_suffix("").as_posix()
            n = 2
            base = cand
            while cand in taken:
                cand, n = f"{base}~{n}", n + 1
        taken.add(cand)
        ids.append(cand)
    return ids


class _Index:
    """index.json (path -> size, mtime, facts or error) and vocab-<fingerprint>.json, under one folder."""

    def __init__(self, root: Path):
        self.root = root
        self.parsed = 0
        self._dirty = False
        self._files: dict[str, dict] = {}
        self._used: set[str] = set()
        self._vocabs: dict[str, VocabInfo] = {}  # parsed in this scan (kept even if the store is read-only)
        try:
            data = json.loads((root / "index.json").read_text())
            if data.get("version") == INDEX_VERSION:
                self._files = dict(data.get("files", {}))
        except (OSError, ValueError, AttributeError):
            pass

    def facts(self, path: Path) -> tuple[int, ModelFacts]:
        """(file size, facts) from the index when size and mtime match, else parsed from the header."""
        st = path.stat()
        key = str(path.resolve())
        self._used.add(key)
        row = self._files.get(key)
        if row is None or row.get("size") != st.st_size or row.get("mtime_ns") != st.st_mtime_ns:
            row = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, **self._parse(path)}
            self._files[key] = row
            self._dirty = True
        if "error" in row:
            raise TandemError(row["error"])
        fp = row["facts"]["vocab_fingerprint"]
        if fp not in self._vocabs and not (self.root / _vocab_file(fp)).is_file():
            row.update(self._parse(path))  # the vocabulary store was cleared: parse again
        return st.st_size, ModelFacts(**row["facts"])

    def _parse(self, path: Path) -> dict:
        self.parsed += 1
        try:
            header = read_header(path)
        except TandemError as e:
            return {"error": e.message}
        kv = header.kv
        vocab = vocab_info_from_metadata(kv)
        if vocab.n_tokens == 0:
            return {"error": f"{path.name} has no vocabulary (not a language model, e.g. a vision projector)"}
        arch = str(kv.get("general.architecture", "unknown"))
        ctx, name = kv.get(f"{arch}.context_length"), kv.get("general.name")
        facts = ModelFacts(arch=arch, name=name if isinstance(name, str) else None, n_params=header.n_params,
                           quantization=header.quantization,
                           context_length=int(ctx) if isinstance(ctx, int) else None, n_vocab=vocab.n_tokens,
                           vocab_type=vocab.vocab_type, vocab_fingerprint=vocab.fingerprint)
        self._store_vocab(vocab)
        self._dirty = True
        return {"facts": asdict(facts)}

    def _store_vocab(self, vocab: VocabInfo) -> None:
        self._vocabs[vocab.fingerprint] = vocab
        target = self.root / _vocab_file(vocab.fingerprint)
        if target.is_file():
            return
        try:
            _write_atomic(target, json.dumps({"vocab_type": vocab.vocab_type, "bos": vocab.bos, "eos": vocab.eos,
                                              "add_bos": vocab.add_bos, "tokens": list(vocab.tokens)}))
        except OSError as e:  # a read-only cache only costs speed
            log.warning("could not store a vocabulary in %s: %s", self.root, e)

    def vocab(self, fingerprint: str, path: Path) -> VocabInfo:
        """The stored vocabulary; reparsed from `path` if the store lost it."""
        if fingerprint in self._vocabs:
            return self._vocabs[fingerprint]
        try:
            d = json.loads((self.root / _vocab_file(fingerprint)).read_text())
            v = VocabInfo(d["vocab_type"], len(d["tokens"]), d["bos"], d["eos"], d["add_bos"], tuple(d["tokens"]))
            if v.fingerprint == fingerprint:
                return v
        except (OSError, ValueError, KeyError, TypeError):
            pass
        self.parsed += 1
        v = vocab_info_from_metadata(read_header(path).kv)
        self._store_vocab(v)
        return v

    def save(self) -> None:
        """Write the index if this scan changed it, dropping files that are gone."""
        gone = [k for k in self._files if k not in self._used and not Path(k).exists()]
        for k in gone:
            del self._files[k]
        if not (self._dirty or gone):
            return
        try:
            _write_atomic(self.root / "index.json",
                          json.dumps({"version": INDEX_VERSION, "files": self._files}, indent=1))
        except OSError as e:  # a read-only cache only costs speed
            log.warning("could not write the model index in %s: %s", self.root, e)
        self._dirty = False


def _vocab_file(fingerprint: str) -> str:
    return f"vocab-{fingerprint}.json"


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
