"""The registry plus the per-model defaults: what `tandem models`, `run`, `serve` and the server share.

Precedence everywhere: an explicit command-line flag or request field, then the model's defaults from
the settings file, then the built-in defaults.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path

from tandem.config import ModelOptions, RegistryOptions, SpecOptions
from tandem.errors import BadInputError, ModelNotFoundError
from tandem.models import defaults
from tandem.models.catalogue import CATALOGUE, known_file
from tandem.models.registry import BUILTIN, ModelEntry, Registry, RegistryConfig, default_models_dir
from tandem.models.settings import ModelSettings, SettingsFile

_MODEL_FIELDS = frozenset(f.name for f in dataclasses.fields(ModelOptions))
_SPEC_FIELDS = frozenset(f.name for f in dataclasses.fields(SpecOptions))


def registry_config(opts: RegistryOptions, extra: Iterable[str | Path | None] = ()) -> RegistryConfig:
    """The RegistryConfig for these options; `extra` adds files named on the command line (when they exist)."""
    paths = tuple(Path(p).expanduser() for p in extra if p and Path(p).expanduser().is_file())
    models_dir = Path(opts.models_dir).expanduser() if opts.models_dir else default_models_dir()
    return RegistryConfig(models_dir=models_dir, extra=paths)


class Library:
    """A registry snapshot and the settings file, read together."""

    def __init__(self, registry: Registry, settings: SettingsFile):
        self.registry = registry
        self.settings = settings

    @classmethod
    def open(cls, opts: RegistryOptions, extra: Iterable[str | Path | None] = ()) -> Library:
        """Scan (from the index where it can) and read the settings file."""
        settings = SettingsFile.load(Path(opts.config).expanduser() if opts.config else None)
        return cls(Registry.scan(registry_config(opts, extra)), settings)

    def rescan(self) -> Library:
        """A fresh snapshot of the same folders (new files appear, removed ones go), same settings file."""
        return Library(Registry.scan(self.registry.config, previous=self.registry),
                       SettingsFile.load(self.settings.path))

    # -- defaults -------------------------------------------------------------------------------------
    def settings_for(self, main: ModelEntry | None) -> ModelSettings:
        return self.settings.get(main.id) if main is not None else ModelSettings()

    def default_draft(self, main: ModelEntry) -> ModelEntry | None:
        """The model's default draft: its `draft` setting ('none': no draft), else the embedded draft for
        the embedded main. A setting naming a model that is gone raises ModelNotFoundError."""
        name = self.settings.get(main.id).draft
        if name is None:
            return self._builtin_draft() if main.path == defaults.main_path() else self._catalogue_draft(main)
        if name.lower() == "none":
            return None
        draft = self.registry.get(name)
        if draft is None:
            raise ModelNotFoundError(
                f"the default draft {name!r} of {main.id} (set in {self.settings.path}) is not in the registry",
                f"put the file back in {self.registry.config.models_dir}, or run "
                f"`tandem models set-draft {main.id} DRAFT` (or `none`)", param="draft_model", code="model_not_found")
        return draft

    def _catalogue_draft(self, main: ModelEntry) -> ModelEntry | None:
        """The draft the catalogue names for a model it knows (`tandem models pull`), when the registry has the
        draft's file (by its exact size: the embedded SmolLM2 is the catalogue's file) and it can serve the main."""
        known = known_file(main.path.name, main.size_bytes)
        want = CATALOGUE.get(known.default_draft) if known and known.default_draft else None
        if want is None:
            return None
        return next((e for e in self.registry if e is not main and e.size_bytes == want.size
                     and self.registry.incompatibility(main, e) is None), None)

    def _builtin_draft(self) -> ModelEntry | None:
        return next((e for e in self.registry if e.origin == BUILTIN and e.path != defaults.main_path()), None)

    def set_draft(self, main_name: str, draft_name: str) -> tuple[ModelEntry, ModelEntry | None]:
        """Make `draft_name` (an id, or 'none' to clear) the default draft of `main_name` and save the file.
        Unknown models and unusable pairs are refused (ModelNotFoundError / IncompatibleDraftError)."""
        main = self.registry.find(main_name)
        if draft_name.lower() == "none":
            self.settings.update(main.id, draft=None)
            self.settings.save()
            return main, None
        draft = self.registry.find(draft_name, param="draft_model")
        self.registry.check_pair(main, draft)
        self.settings.update(main.id, draft=draft.id)
        self.settings.save()
        return main, draft

    # -- options for run/serve ------------------------------------------------------------------------
    def resolve(self, opts: ModelOptions, spec: SpecOptions, explicit: frozenset[str] = frozenset()
                ) -> tuple[ModelOptions, SpecOptions]:
        """ModelOptions and SpecOptions with registry ids turned into paths and the main model's defaults
        applied to every field not given explicitly. Names the registry does not know are left as given
        (Runtime reports a missing file or a non-GGUF one with its own cause and fix)."""
        if opts.model is None:
            main = self.registry.get(defaults.main_path().stem)
            main = main if main is not None and main.path == defaults.main_path() else None
        else:
            main = self.registry.get(opts.model)
        conf = self.settings_for(main).values()
        model_changes = {k: v for k, v in conf.items() if k in _MODEL_FIELDS and k not in explicit and k != "draft"}
        spec_changes = {k: v for k, v in conf.items() if k in _SPEC_FIELDS and k not in explicit}
        if main is not None and opts.model is not None:
            model_changes["model"] = str(main.path)
        if opts.draft is not None:  # explicit --draft wins: an id becomes its path, 'none' and paths stay
            d = None if opts.draft.lower() == "none" else self.registry.get(opts.draft)
            if d is not None:
                model_changes["draft"] = str(d.path)
        elif main is not None:  # the model's default draft: its setting, or the embedded pair's own draft
            d = self.default_draft(main)
            # None, not 'none', for a --model without a draft model: 'none' turns all speculation off (text lookups
            # too), which only an explicit --draft none asks for (the embedded main needs 'none' to drop its draft)
            model_changes["draft"] = str(d.path) if d is not None else ("none" if opts.model is None else None)
        try:
            return dataclasses.replace(opts, **model_changes), dataclasses.replace(spec, **spec_changes)
        except BadInputError as e:
            raise BadInputError(f"{e.cause} (from {self.settings.path})", e.fix, param=e.param) from None

    # -- listings -------------------------------------------------------------------------------------
    def describe(self, entry: ModelEntry) -> dict:
        """Everything listings show about one model (plain JSON values)."""
        try:
            default = self.default_draft(entry)
            default_id: str | None = default.id if default else None
        except ModelNotFoundError:
            default_id = self.settings.get(entry.id).draft  # shown as set; using it fails loudly
        drafts = self.registry.compatible_drafts(entry)
        translated = {d.id: round(p.text_share, 4) for d in drafts
                      if (p := self.registry.vocab_pairing(entry, d)).kind == "translated"}
        return {**entry.to_dict(), "compatible_drafts": [d.id for d in drafts], "translated_drafts": translated,
                "default_draft": default_id, "settings": self.settings.get(entry.id).values()}
