"""The engine thread and the small client interface HTTP handlers use to talk to it.

One thread owns the Runtime (the llama contexts): it loads the models after the HTTP server is up, then
serves queued jobs one at a time. Handlers never touch the Runtime: they `submit()` a JobSpec and read
events from the JobHandle. Errors travel as values (TandemError instances on the job's event queue);
the handle raises them in the handler, where the app's single exception handler maps them to HTTP.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import queue
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tandem.errors import (BadInputError, BusyError, CancelledError, EngineError, LoadFailedError, LoadingError,
                           ModelNotFoundError, TandemError)
from tandem.runtime import Runtime
from tandem.server.batching import Batcher
from tandem.server.drafts import CONFIGURED, DraftSelector, NeedsLoad, load_draft
from tandem.server.metrics import Metrics
from tandem.server.pool import Loaded, Loader, Slot, Slots
from tandem.spec.drafters import ModelDrafter
from tandem.spec.generate import Done, GenParams, Token
from tandem.spec.stats import SpecStats
from tandem.templates import ChatFormat
from tandem.tool_grammar import constrain
from tandem.tools import ToolRequest

log = logging.getLogger("tandem.server")


@dataclass(frozen=True)
class Counted:
    """The one event of a "count" job: the prompt's length in tokens (POST /v1/messages/count_tokens)."""

    tokens: int


Event = Token | Done | Counted
State = Literal["loading", "ready", "degraded", "failed", "draining", "stopped"]
"""ready: serving as configured; degraded: serving without the draft (--draft-optional), `reason` says why;
failed: the models could not be loaded, nothing is served; draining: shutting down, finishing the requests it
has and refusing new ones; stopped: shut down."""
SERVING = frozenset({"ready", "degraded"})
"""States in which jobs are accepted."""
ACCEPTING = SERVING | {"draining"}
"""States in which the jobs already submitted still run."""
_WAKE = object()
"""Queued to wake the engine thread (after abort())."""


@dataclass(frozen=True)
class _Stall:
    """Queued by Engine.stall(): the engine thread blocks here until `release` is set."""

    release: threading.Event


@dataclass(frozen=True)
class ModelInfo:
    """What handlers may know about the loaded models (plain values, safe to read from any thread)."""

    id: str
    path: str
    aliases: frozenset[str]
    n_ctx: int
    created: int
    draft_model: str | None
    draft_path: str | None
    exact: bool = False
    """Speculative output is bit-for-bit the main model's plain output (see tandem.engine.exact)."""
    draft_payoff: float | None = None
    """With a draft model: tokens/s over plain lone-row decoding if every draft token were accepted, from
    costs timed at load (below 1: the draft cannot make this model faster here; see tandem.spec.payoff)."""
    invariance: dict | None = None
    """What the load-time probes found: `batch_sizes` (every verification size gives a row the same logits),
    `lone_row` (a lone row does too), their largest differences, `sequences` (a sequence's logits do not depend
    on the others sharing its batch and KV cache), `patch_level` (Tandem's llama.cpp patch in the loaded library;
    0: stock), and `regime` with `regime_why`: how exactness holds ("kernels": the same kernels for every row
    count, at no cost; "paired": lone rows decoded with the row before them; "none") and why."""
    draft_paused: str | None = None
    """Why requests that do not name the draft decode as --draft none does (it cannot pay here); None when
    the configured speculation runs."""
    draft_text_share: float | None = None
    """With a draft of another vocabulary, which drafts through text (tandem.spec.translate): the share of the main
    model's tokens its vocabulary can write. None: the draft shares the main model's vocabulary (or there is none)."""
    chat: ChatFormat | None = None
    """How chats become prompts for this model: its template and tool-call format (/health shows its summary)."""


@dataclass(frozen=True)
class EngineStatus:
    """What the engine is doing (replaced whole on every change: safe to read from any thread)."""

    state: State
    """See State."""
    reason: str | None = None
    """Why the state is degraded or failed."""
    model: ModelInfo | None = None
    """The startup (default) model: the one requests without `model` get."""
    loaded: tuple[ModelInfo, ...] = ()
    """Every main model loaded now."""
    loading: tuple[str, ...] = ()
    """Ids of the main models being loaded (or queued to load)."""
    error: TandemError | None = None
    """The load failure (state failed): `tandem serve` exits with its exit code."""


@dataclass(frozen=True)
class JobSpec:
    """One generation request: chat messages, or a text/token prompt, and its parameters."""

    endpoint: str
    """chat, completion, or count (the prompt is only tokenized: one Counted event, nothing generated)."""
    params: GenParams
    messages: Sequence[dict] | None = None
    prompt: str | Sequence[int] | None = None
    draft_model: str | None = None
    """The request's draft_model as sent (None: the model's configured draft)."""
    model: str | None = None
    """Registry id of the main model (None: the startup model)."""
    draft_path: Path | None = None
    """A draft file the registry resolved and checked (takes precedence over draft_model)."""
    max_tokens_from_context: bool = False
    """Generate up to the model's context size (chat without max_tokens): the engine knows it, not the handler."""
    tools: ToolRequest | None = None
    """The tools offered in a chat's prompt (None: none)."""

    def params_for(self, rt: Runtime) -> GenParams:
        """The parameters for the loaded model: under tool_choice required or a named function, the output held
        to calls in its tool format (known only once it is loaded; tandem.tool_grammar)."""
        return constrain(self.params, self.tools, rt.chat_format.tool_format, rt.main_model)


class _Abort:
    """The error that ends every job once the shutdown's grace period is over (None before)."""

    def __init__(self) -> None:
        self.error: TandemError | None = None


class _Job:
    """Engine-side state of one job; events cross to the handler's event loop thread-safely."""

    def __init__(self, job_id: str, spec: JobSpec, loop: asyncio.AbstractEventLoop, abort: _Abort):
        self.id, self.spec, self.loop = job_id, spec, loop
        self.events: asyncio.Queue[Event | TandemError] = asyncio.Queue()
        self.cancelled = threading.Event()
        self.submitted = time.perf_counter()
        self.abort = abort

    def put(self, ev: Event | TandemError) -> None:
        """Pass an event to the handler; a generation stopped by the shutdown ends with the shutdown's error."""
        if isinstance(ev, TandemError) and ev.param == "messages" and self.spec.messages is None:
            ev.param = "prompt"  # the engine's errors name the chat field; a text completion sent `prompt`
        err = self.abort.error
        if err is not None and isinstance(ev, Done) and ev.stats.stop_reason == "cancelled" \
                and not self.cancelled.is_set():
            ev = err
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, ev)
        except RuntimeError:  # the handler's loop is closed: nobody is listening any more
            self.cancelled.set()


class JobHandle:
    """The handler's side of a job: read events in order, or cancel it."""

    def __init__(self, job: _Job):
        self._job = job
        self._error: TandemError | None = None  # met by ready() after some events; raised by the next next()

    @property
    def id(self) -> str:
        return self._job.id

    async def next(self, gone: Callable[[], Awaitable[bool]] | None = None) -> Event:
        """The next event; raises the job's TandemError. With `gone`, polls it and cancels when it says so."""
        if self._error is not None:
            raise self._error
        get = asyncio.ensure_future(self._job.events.get())
        try:
            while True:
                done, _ = await asyncio.wait({get}, timeout=0.2 if gone else None)
                if done:
                    break
                if gone is not None and await gone():
                    self.cancel()
                    raise CancelledError("the client closed the connection", "nothing to do")
        finally:
            if not get.done():
                get.cancel()
        ev = get.result()
        if isinstance(ev, TandemError):
            raise ev
        return ev

    def ready(self) -> list[Event]:
        """Events already waiting, without blocking. An error is raised once the events before it are returned."""
        out: list[Event] = []
        q = self._job.events
        while not q.empty():
            ev = q.get_nowait()
            if isinstance(ev, TandemError):
                if not out:
                    raise ev
                self._error = ev
                break
            out.append(ev)
            if isinstance(ev, Done):
                break
        return out

    def cancel(self) -> None:
        """Stop the generation at its next step (or skip it if still queued)."""
        self._job.cancelled.set()


class Engine:
    """The engine thread: loads the startup Runtime, then runs jobs one at a time from a FIFO queue.

    With `load_model` (a function from a registry id to a Runtime), a job may name another model: it is
    loaded by the loader thread while the engine keeps serving the loaded ones, and the job waits for it.
    At most `max_loaded` main models stay loaded (least recently used out, once the new one is ready);
    models and on-demand drafts idle for `ttl` seconds are unloaded. The startup model reloads through
    `runtime_factory` if it was unloaded.
    """

    def __init__(self, runtime_factory: Callable[[], Runtime], metrics: Metrics, *, allow_draft_paths: bool = True,
                 on_status: Callable[[EngineStatus], None] | None = None,
                 load_model: Callable[[str], Runtime] | None = None, model_id: Callable[[Path], str] | None = None,
                 max_loaded: int = 1, ttl: float = 0.0, max_queue: int = 64):
        self._factory = runtime_factory
        self._metrics = metrics
        self._allow_paths = allow_draft_paths
        self._on_status = on_status
        self._load_model = load_model
        self._model_id = model_id or (lambda p: p.stem)
        self._jobs: queue.Queue[_Job | Loaded | object | None] = queue.Queue()
        self._status = EngineStatus("loading")
        self._stopping = threading.Event()
        self._abort = _Abort()
        self._ids = itertools.count(1)
        self._thread = threading.Thread(target=self._main, name="tandem-engine", daemon=True)
        self._slots = Slots(max_loaded, ttl)
        self._loader = Loader(self._jobs.put)
        self._parked: dict[tuple, list[_Job]] = {}
        self._names: dict[tuple, str] = {}  # what each pending load is, for the log
        self._default: str | None = None  # the startup model's id
        self._max_queue = max_queue
        self._alone = 0  # requests generating one at a time now (0 or 1)
        self._alone_kv = 0.0
        self._batcher = Batcher(metrics, prompt=_prompt_tokens, cancel=self._cancelled, run_alone=self._run,
                                done=_log_done)
        self._waiting = 0  # jobs submitted and not yet taken by the engine thread (guarded by _count_lock)
        self._count_lock = threading.Lock()
        self.progress = 0
        """Grows with every token the engine thread hands out and every batched step it takes (written by that
        thread only): a hang watchdog's signal that it is working, even through one long generation."""

    # -- client interface (event-loop side) ---------------------------------------------------------------
    @property
    def status(self) -> EngineStatus:
        return self._status

    def submit(self, spec: JobSpec) -> JobHandle:
        """Queue a job (call from the event loop); 503 unless the models are loaded."""
        st = self._status
        if st.state not in SERVING:
            raise not_ready_error(st)
        with self._count_lock:
            if self._waiting >= self._max_queue:
                raise BusyError(f"{self._waiting} requests are already waiting for the engine (--max-queue "
                                f"{self._max_queue})", "retry after the Retry-After seconds, or start the server "
                                "with a larger --max-queue", code="server_busy")
            self._waiting += 1
            self._metrics.queue_depth.set(self._waiting)
        job = _Job(f"req-{next(self._ids)}", spec, asyncio.get_running_loop(), self._abort)
        self._jobs.put(job)
        return JobHandle(job)

    def start(self) -> None:
        self._thread.start()

    def stall(self, release: threading.Event) -> None:
        """Block the engine thread before its next job until `release` is set, as a stuck llama.cpp call
        would block it. A fault for tests (tandem.deploy.replica.inject_fault); nothing else calls it."""
        self._jobs.put(_Stall(release))

    def drain(self) -> None:
        """Refuse new jobs (503, code shutting_down) and keep running the ones already submitted."""
        st = self._status
        if st.state in SERVING:
            self._set_status(dataclasses.replace(st, state="draining", reason="the server is shutting down"))

    def abort(self, error: TandemError) -> None:
        """End every job now: the running ones stop at their next step, and they and the queued ones get `error`."""
        self._abort.error = error
        self._jobs.put(_WAKE)

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel the running job, refuse the queued ones, and end the thread."""
        self._set_status(dataclasses.replace(self._status, state="stopped", reason="the server is shutting down"))
        self._stopping.set()
        self._jobs.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)
        self._loader.stop(timeout)

    # -- engine thread --------------------------------------------------------------------------------------
    def _set_status(self, status: EngineStatus) -> None:
        self._status = status
        self._metrics.engine_ready.set(1 if status.state in SERVING else 0)
        if self._on_status is not None:
            self._on_status(status)

    def _publish(self) -> None:
        """Status with the current loaded/loading models (only while serving: other states are final or earlier)."""
        st = self._status
        if st.state not in SERVING:
            return
        loaded = tuple(_model_info(s.rt, s.id) for s in self._slots)
        for slot in self._slots:
            self._metrics.record_policy(str(slot.rt.main_model.path), slot.rt.policy_report(), slot.rt.suffix_report())
        loading = tuple(k[1] for k in self._loader.busy if k[0] == "main")
        default = next((i for i in loaded if i.id == self._default), st.model)
        self._status = EngineStatus(st.state, st.reason, model=default, loaded=loaded, loading=loading)

    def _load(self) -> bool:
        try:
            rt = self._factory()
        except TandemError as e:
            self._set_status(EngineStatus("failed", f"loading the models failed: {e.message}", error=e))
            return False
        except Exception as e:  # noqa: BLE001 - any load failure must be reported with its reason
            log.exception("loading the models failed")
            err = LoadFailedError(f"loading the models failed: {type(e).__name__}: {e}", "see the server log",
                                  code="load_failed")
            self._set_status(EngineStatus("failed", err.cause, error=err))
            return False
        self._default = self._model_id(rt.main_model.path)
        self._slots.add(Slot(self._default, rt, DraftSelector(rt, allow_paths=self._allow_paths)))
        info = _model_info(rt, self._default)
        self._metrics.record_policy(str(rt.main_model.path), rt.policy_report(), rt.suffix_report())
        state = "degraded" if rt.draft_status else "ready"
        self._set_status(EngineStatus(state, rt.draft_status, model=info, loaded=(info,)))
        return True

    def _main(self) -> None:
        ok = self._load()
        while True:
            # 1. Take what arrived (without waiting while batched requests run), 2. else step them, or idle.
            busy = self._batcher.busy
            try:
                item = self._jobs.get_nowait() if busy else self._jobs.get(
                    timeout=self._slots.next_deadline(time.monotonic()))
            except queue.Empty:
                if busy:
                    self._batcher.step()
                    self.progress += 1
                self._expire()
                continue
            if isinstance(item, _Job):
                with self._count_lock:
                    self._waiting -= 1
                    self._metrics.queue_depth.set(self._waiting)
            if item is None:
                break
            if self._abort.error is not None:
                self._refuse_parked(self._abort.error)
            if item is _WAKE:
                continue
            if isinstance(item, _Stall):
                item.release.wait()
                continue
            if isinstance(item, Loaded):
                self._loaded(item)
            elif self._abort.error is not None:
                item.put(self._abort.error)
            elif not ok or self._status.state not in ACCEPTING:
                item.put(not_ready_error(self._status))
            else:
                self._dispatch(item)
            self._expire()
        leftovers = [j for jobs in self._parked.values() for j in jobs] + self._batcher.stop()
        while True:  # refuse whatever is still queued
            try:
                item = self._jobs.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, _Job):
                leftovers.append(item)
            elif isinstance(item, Loaded) and item.value is not None:
                _close(item.value)
        for job in leftovers:
            job.put(not_ready_error(self._status))
        for slot in self._slots:
            slot.close()

    def _refuse_parked(self, error: TandemError) -> None:
        """Give `error` to the jobs waiting for a model or draft to load."""
        for jobs in self._parked.values():
            for job in jobs:
                job.put(error)
        self._parked.clear()

    def _dispatch(self, job: _Job) -> None:
        """Run the job now, or park it until the loader brings in its model or draft."""
        model = job.spec.model or self._default
        slot = self._slots.get(model) if model else None
        if slot is None:
            loader = self._factory if model == self._default else self._load_fn(model)
            if loader is None:
                job.put(ModelNotFoundError(f"model {model!r} is not loaded", "omit `model` to use the loaded one",
                                           param="model", code="model_not_found"))
                return
            self._park(("main", model), job, loader, str(model))
            return
        if job.spec.endpoint == "count":
            try:
                job.put(Counted(len(_prompt_tokens(slot.rt, job.spec))))
            except TandemError as e:
                job.put(e)
            return
        try:
            choice = slot.drafts.select(job.spec.draft_model, job.spec.draft_path)
        except TandemError as e:
            job.put(e)
            return
        if isinstance(choice, NeedsLoad):
            rt = slot.rt
            self._park(("draft", slot.id, choice.key), job, lambda: load_draft(rt, choice.path),
                       f"draft {choice.path.name} for {slot.id}")
            return
        self._slots.use(slot)
        if Batcher.wants(slot.rt):
            self._batcher.start(slot.rt, choice, job)
            return
        self._run(slot.rt, choice, job)
        self._slots.use(slot)

    def _load_fn(self, model: str | None) -> Callable[[], Runtime] | None:
        if model is None or self._load_model is None:
            return None
        load = self._load_model
        return lambda: load(model)

    def _park(self, key: tuple, job: _Job, load: Callable[[], object], what: str) -> None:
        self._parked.setdefault(key, []).append(job)
        if not self._loader.pending(key):
            log.info("%s waits for %s to load", job.id, what)
            self._names[key] = what
            self._loader.submit(key, load)
            self._publish()

    def _loaded(self, done: Loaded) -> None:
        """A load finished: install it (evicting the least recently used model) and run the jobs that waited."""
        self._loader.done(done.key)
        waiting = self._parked.pop(done.key, [])
        what = self._names.pop(done.key, str(done.key[1]))
        if done.error is not None:
            err = done.error if isinstance(done.error, TandemError) else EngineError(
                f"loading failed: {type(done.error).__name__}: {done.error}", "see the server log")
            log.warning("loading %s failed: %s", what, err.message)
            for job in waiting:
                job.put(err)
            self._publish()
            return
        if done.key[0] == "main":
            rt = done.value
            assert isinstance(rt, Runtime)
            log.info("loaded %s in %.1f s", done.key[1], done.seconds)
            for old in self._slots.add(Slot(done.key[1], rt, DraftSelector(rt, allow_paths=self._allow_paths))):
                log.info("unloading %s (least recently used; --max-loaded-models %d)", old.id, self._slots.max_loaded)
                for job in self._batcher.forget(old.rt):
                    job.put(EngineError(f"model {old.id} was unloaded while this request waited or ran",
                                        "raise --max-loaded-models, or retry"))
                old.close()
        else:
            slot = self._slots.get(done.key[1])
            if slot is None:  # its main was unloaded meanwhile: the jobs will load both again
                _close(done.value)
            else:
                log.info("loaded %s in %.1f s", what, done.seconds)
                slot.drafts.install(done.key[2], done.value)  # type: ignore[arg-type]
        self._publish()
        for job in waiting:
            self._dispatch(job)

    def _expire(self) -> None:
        """Unload models and on-demand drafts idle past the TTL (never one that parked jobs wait on)."""
        ttl = self._slots.ttl
        if ttl <= 0:
            return
        now = time.monotonic()
        awaited = {k[1] for k in self._parked}
        busy = {s.id for s in self._slots if self._batcher.serving(s.rt)}
        for slot in self._slots.expired(now, lambda mid: mid in awaited or mid in busy):
            log.info("unloading %s: idle for more than %g s (--ttl)", slot.id, ttl)
            self._batcher.forget(slot.rt)
            slot.close()
        for slot in self._slots:
            if slot.drafts.has_extra and now - slot.drafts.extra_used > ttl:
                log.info("unloading the on-demand draft of %s: idle for more than %g s (--ttl)", slot.id, ttl)
                slot.drafts.release()
        self._publish()

    def _cancelled(self, job: _Job) -> Callable[[], bool]:
        """generate()'s cancel check: the client left, or the server is stopping."""
        return lambda: job.cancelled.is_set() or self._stopping.is_set() or self._abort.error is not None

    def _run(self, rt: Runtime, choice: ModelDrafter | str, job: _Job) -> None:
        if job.cancelled.is_set():
            job.put(CancelledError("the client went away before its turn", "nothing to do"))
            return
        first: float | None = None
        debug = log.isEnabledFor(logging.DEBUG)
        self._set_running(1, rt)
        try:
            prompt = _prompt_tokens(rt, job.spec)
            params = job.spec.params_for(rt)
            if job.spec.max_tokens_from_context:
                params = dataclasses.replace(params, max_tokens=rt.main.capacity)
            cancel = self._cancelled(job)
            if isinstance(choice, str):  # CONFIGURED or NONE: the Runtime's own path (and whatever state it keeps)
                events = rt.generate(prompt, params, use_draft=choice == CONFIGURED, cancel=cancel)
            else:  # a draft loaded on demand for this request
                events = rt.generate(prompt, params, model=choice, cancel=cancel)
            for ev in events:
                if isinstance(ev, Token):
                    if first is None:
                        first = time.perf_counter() - job.submitted
                    if debug:
                        log.debug("%s token %d %r (%s)", job.id, ev.id, ev.text, ev.source)
                else:
                    self._metrics.record_generation(ev.stats, first)
                    self._metrics.record_policy(str(rt.main_model.path), rt.policy_report(), rt.suffix_report())
                    _log_done(job, ev.stats)
                job.put(ev)
                self.progress += 1
        except TandemError as e:
            job.put(e)
        except Exception as e:  # noqa: BLE001 - an engine failure becomes a 500 for this request only
            log.exception("%s failed", job.id)
            job.put(EngineError(f"generation failed: {type(e).__name__}: {e}", "see the server log; retry"))
        finally:
            self._set_running(0, rt)

    def _set_running(self, running: int, rt: Runtime) -> None:
        """Publish the requests generating now and how full the main KV cache is (cells held / context)."""
        self._alone = running
        self._alone_kv = len(rt.main.held()) / rt.main.n_ctx if rt.main.n_ctx else 0.0
        self._metrics.requests_running.set(self.running)
        self._metrics.kv_usage.set(self.kv_usage)

    @property
    def running(self) -> int:
        """Requests generating now (one at a time, or batched)."""
        return self._alone + self._batcher.published[0]

    @property
    def kv_usage(self) -> float:
        """Share of the main KV cache's cells in use, as of the last step reported."""
        return max(self._alone_kv, self._batcher.published[1])

    @property
    def waiting(self) -> int:
        """Requests submitted and not yet taken by the engine thread."""
        return self._waiting


def _close(value: object) -> None:
    """Free a Runtime or drafter nobody will use."""
    if isinstance(value, Runtime):
        value.close()
    elif isinstance(value, ModelDrafter):
        value.ctx.close()
        value.ctx.model.close()


def not_ready_error(st: EngineStatus) -> LoadingError:
    """The 503 for a request that arrives while the engine cannot serve: loading, failed, or stopping."""
    if st.state == "loading":
        return LoadingError("the server is still loading its models", "retry in a few seconds; GET /health "
                            "says 'ready' when it can serve", code="model_loading")
    if st.state in ("draining", "stopped"):
        return LoadingError("the server is shutting down", "retry against a running server", code="shutting_down")
    return LoadingError(st.reason or "the models could not be loaded",
                        "fix the model paths or options and restart `tandem serve`", code="model_load_failed")


def _prompt_tokens(rt: Runtime, spec: JobSpec) -> list[int]:
    if spec.messages is not None:
        return rt.prompt(messages=spec.messages, tools=spec.tools)
    if isinstance(spec.prompt, str):
        return rt.prompt(text=spec.prompt, raw=True)
    tokens = list(spec.prompt or ())
    n_vocab = rt.main_model.n_vocab
    bad = [t for t in tokens if not 0 <= t < n_vocab]
    if bad:
        raise BadInputError(f"prompt holds token id {bad[0]}, outside the vocabulary (0..{n_vocab - 1})",
                            "send token ids produced by this model's tokenizer, or send text", param="prompt")
    return tokens


def _model_info(rt: Runtime, model_id: str | None = None) -> ModelInfo:
    path = rt.main_model.path
    d = rt.drafter  # the draft model; rt.draft_name names whatever the Runtime speculates with
    try:
        created = int(path.stat().st_mtime)
    except OSError:
        created = 0
    return ModelInfo(id=model_id or rt.main_model.name, path=str(path),
                     aliases=frozenset({model_id or rt.main_model.name, rt.main_model.name, path.name, str(path),
                                        str(Path(path).resolve())}),
                     n_ctx=rt.main.capacity, created=created, draft_model=rt.draft_name,
                     draft_path=str(d.ctx.model.path) if d else None, exact=rt.exact,
                     draft_payoff=None if rt.payoff is None else round(rt.payoff, 3), draft_paused=rt.draft_paused,
                     invariance=rt.invariance_report(), chat=rt.chat_format,
                     draft_text_share=(round(rt.draft_pairing.text_share, 4) if d and rt.draft_pairing
                                       and rt.draft_pairing.kind == "translated" else None))


def _log_done(job: _Job, s: SpecStats) -> None:
    spec = (f"draft {s.draft_model}: acceptance {s.acceptance_rate:.0%} ({s.accepted}/{s.drafted}), "
            f"mean accepted length {s.mean_accepted_length:.2f}" if s.draft_model else "no draft")
    log.info("%s %s: %d prompt + %d tokens in %.2f s, %.1f tok/s, %s, stop %s", job.id, job.spec.endpoint,
             s.prompt_tokens, s.generated_tokens, s.prompt_time + s.generation_time, s.tokens_per_second,
             spec, s.stop_reason)
