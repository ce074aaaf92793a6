"""The engine's loaded models and the loader thread that brings more in.

Loading runs in its own thread, one model at a time, so the engine thread keeps serving the models it
has; a finished load comes back to the engine thread as a `Loaded` message on the engine's own queue,
and only then does the engine thread use it. The engine thread is still the only one that touches a
context while it is in use (a loading model is not in use: nobody else has it yet).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from tandem.runtime import Runtime
from tandem.server.drafts import DraftSelector

log = logging.getLogger("tandem.server")

MainKey = tuple[str, str]
"""("main", model id)."""
DraftKey = tuple[str, str, tuple]
"""("draft", main model id, draft file key)."""


@dataclass(frozen=True)
class Loaded:
    """A finished load, for the engine thread: the Runtime or drafter, or the error that stopped it."""

    key: MainKey | DraftKey
    """What was loaded."""
    value: object = None
    """The Runtime (main) or ModelDrafter (draft)."""
    error: BaseException | None = None
    """Why it could not be loaded."""
    seconds: float = 0.0
    """How long the load took."""


@dataclass
class Slot:
    """One loaded main model (engine thread only)."""

    id: str
    """Its model id."""
    rt: Runtime
    """Its contexts (and its configured draft)."""
    drafts: DraftSelector
    """Its on-demand draft."""
    last_used: float = field(default_factory=time.monotonic)
    """time.monotonic() of its last job."""

    def close(self) -> None:
        self.drafts.release()
        self.rt.close()


class Slots:
    """Loaded main models in least-recently-used order (engine thread only)."""

    def __init__(self, max_loaded: int, ttl: float):
        self.max_loaded = max(1, max_loaded)
        self.ttl = ttl
        self._slots: OrderedDict[str, Slot] = OrderedDict()

    def __contains__(self, model_id: str) -> bool:
        return model_id in self._slots

    def __iter__(self):
        return iter(list(self._slots.values()))

    def get(self, model_id: str) -> Slot | None:
        return self._slots.get(model_id)

    def use(self, slot: Slot) -> None:
        slot.last_used = time.monotonic()
        self._slots.move_to_end(slot.id)

    def add(self, slot: Slot) -> list[Slot]:
        """Hold a new slot; return the least recently used ones it pushes out (for the caller to close)."""
        self._slots[slot.id] = slot
        self._slots.move_to_end(slot.id)
        out = []
        while len(self._slots) > self.max_loaded:
            _, old = self._slots.popitem(last=False)
            out.append(old)
        return out

    def remove(self, model_id: str) -> Slot | None:
        return self._slots.pop(model_id, None)

    def expired(self, now: float, busy: Callable[[str], bool]) -> list[Slot]:
        """Slots idle for longer than the TTL (and not awaited by parked jobs), removed."""
        if self.ttl <= 0:
            return []
        out = [s for s in self._slots.values() if now - s.last_used > self.ttl and not busy(s.id)]
        for s in out:
            del self._slots[s.id]
        return out

    def next_deadline(self, now: float) -> float | None:
        """Seconds until the next TTL check is due (None: no TTL, or nothing can expire)."""
        if self.ttl <= 0 or not self._slots:
            return None
        times = [s.last_used for s in self._slots.values()]
        times += [s.drafts.extra_used for s in self._slots.values() if s.drafts.has_extra]
        return max(0.05, min(times) + self.ttl - now)


class Loader:
    """One thread that runs load functions in order and posts each result to `deliver`."""

    def __init__(self, deliver: Callable[[Loaded], None]):
        self._deliver = deliver
        self._tasks: queue.Queue[tuple[MainKey | DraftKey, Callable[[], object]] | None] = queue.Queue()
        self._pending: set = set()
        self._thread = threading.Thread(target=self._main, name="tandem-loader", daemon=True)
        self._started = False

    def pending(self, key: MainKey | DraftKey) -> bool:
        """Queued or loading now."""
        return key in self._pending

    @property
    def busy(self) -> frozenset:
        return frozenset(self._pending)

    def submit(self, key: MainKey | DraftKey, load: Callable[[], object]) -> None:
        if key in self._pending:
            return
        if not self._started:
            self._thread.start()
            self._started = True
        self._pending.add(key)
        self._tasks.put((key, load))

    def done(self, key: MainKey | DraftKey) -> None:
        """The engine thread took the result (called from the engine thread)."""
        self._pending.discard(key)

    def stop(self, timeout: float = 10.0) -> None:
        self._tasks.put(None)
        if self._started:
            self._thread.join(timeout)

    def _main(self) -> None:
        while (task := self._tasks.get()) is not None:
            key, load = task
            t0 = time.perf_counter()
            try:
                value = load()
            except Exception as e:  # noqa: BLE001 - the waiting requests get the error
                self._deliver(Loaded(key, error=e, seconds=time.perf_counter() - t0))
                continue
            self._deliver(Loaded(key, value, seconds=time.perf_counter() - t0))
