"""Reading a queued job's events from an HTTP route: the same three steps for every API (chat completions, the
Messages API, the Responses API), whatever body each renders from them."""

from __future__ import annotations

from fastapi import Request

from tandem.server.worker import JobHandle
from tandem.spec.generate import Done


async def first_events(handle: JobHandle, request: Request) -> list:
    """The job's first event and any ready after it. A route waits for them before answering, so that errors the
    engine finds (an unknown or incompatible draft, a prompt over the context) still get their HTTP status, even
    when streaming; a failure or a disconnect while waiting cancels the job."""
    try:
        first = [await handle.next(request.is_disconnected)]
    except BaseException:
        handle.cancel()
        raise
    return first + handle.ready()


async def all_events(handle: JobHandle, events: list, request: Request) -> list:
    """`events` followed by the rest of the job's, up to its Done; the job is cancelled if the client leaves."""
    try:
        while not isinstance(events[-1], Done):
            events.append(await handle.next(request.is_disconnected))
            events += handle.ready()
    finally:
        handle.cancel()
    return events


async def cancel(handle: JobHandle) -> None:
    """A streaming response's background task: the job ends when the stream does (async: a sync task would take a
    worker thread)."""
    handle.cancel()
