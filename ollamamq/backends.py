# -*- test-case-name: tests.test_backends -*-
"""
The backend pool: what the proxy knows of each backend (state, API kind, models, load) and
which backend a request goes to.

Health probes write into it (L{BackendPool.markOnline}, L{BackendPool.markFailed}), the
forwarder reports failed and busy answers (L{BackendPool.markFailed},
L{BackendPool.markBusy}), the scheduler reads it (L{BackendPool.choose}) and counts slots
(L{BackendPool.acquire}, L{BackendPool.release}); anything that changes what the pool can
serve notifies the subscribers, so queued requests are dispatched the moment a backend
comes back.

Failure model
=============

A backend is L{UNKNOWN} until its first probe, then L{ONLINE}, L{SUSPECT} or L{OFFLINE}:

  - One failure (a failed probe, a request that failed before its first byte) makes an
    online backend L{SUSPECT}: it gets no new requests and is probed again at once. A
    successful probe makes it L{ONLINE} again.
  - C{down_after} failed probes in a row make it L{OFFLINE}.
  - Leaving L{ONLINE} stamps C{unavailableSince}. Requests for models that only
    unavailable backends serve keep waiting while L{Backend.recovering} holds, that is for
    C{down_grace} seconds from that stamp (the scheduler's grace), and are dispatched the
    moment a backend comes back.
  - Busy is not down: a backend that answers 429, or 503 saying it is loading or busy, is
    only paused until C{busyUntil} (its own C{Retry-After}), keeps its state, and counts no
    failure.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import attrs

from ollamamq.models import canonicalModel

OLLAMA = "ollama"
OPENAI = "openai"

#: Wire dialects a backend may speak; a request names the dialects that can serve it.
#: Ollama speaks its own API and OpenAI's; newer Ollama and llama-server speak Anthropic
#: Messages too (see L{ollamamq.health}).
OLLAMA_API = "ollama"
OPENAI_API = "openai"
ANTHROPIC_API = "anthropic"

UNKNOWN = "unknown"
ONLINE = "online"
SUSPECT = "suspect"
OFFLINE = "offline"


class UnknownBackend(KeyError):
    """
    No backend has that name.
    """


class DuplicateBackend(ValueError):
    """
    A backend with that name is already in the pool.
    """


@attrs.define(eq=False)
class Backend:
    """
    One backend server and everything the proxy knows about it.

    @ivar state: L{UNKNOWN} until the first probe, then L{ONLINE}, L{SUSPECT} or
        L{OFFLINE} (see the module docstring).
    @ivar kind: L{OLLAMA} (serves C{/api/*} and C{/v1/*}) or L{OPENAI} (only C{/v1/*}).
    @ivar dialects: the wire dialects it serves (L{OLLAMA_API}, L{OPENAI_API},
        L{ANTHROPIC_API}), as the probe found them.
    @ivar models: canonical model key -> the name as this backend spells it.
    @ivar loaded: canonical keys of the models it has in memory.
    @ivar active: requests the proxy is running on it now.
    @ivar draining: finishing what it runs, taking nothing new.
    @ivar slotsFromBackend: the config set no C{slots}: take what the backend reports
        (llama-server's C{total_slots}), keeping C{slots} meanwhile.
    @ivar server: the server software its answers name (C{"llama-server"},
        C{"lmstudio"}, C{"vllm"}), when recognised.
    @ivar failures: failures in a row (probes and requests) since it was last online.
    @ivar unavailableSince: clock time it last left L{ONLINE}, or L{None}.
    @ivar failedAt: clock time of its latest failure, so that a probe that started before
        it cannot overwrite it.
    @ivar busyUntil: clock time until which it said it is busy, or L{None}.
    @ivar firstByteTimeouts: requests in a row that reached the first-byte timeout.
    @ivar apiKey: the backend's own key (C{[[backends]] api_key}), sent to it alone as
        C{Authorization: Bearer}; never shown in status.
    """

    name: str
    url: str
    slots: int = 1
    state: str = UNKNOWN
    kind: str | None = None
    dialects: frozenset[str] = frozenset()
    models: dict[str, str] = attrs.field(factory=dict)
    loaded: frozenset[str] = frozenset()
    version: str | None = None
    latency: float | None = None
    error: str | None = None
    active: int = 0
    draining: bool = False
    slotsFromBackend: bool = False
    server: str | None = None
    failures: int = 0
    unavailableSince: float | None = None
    failedAt: float | None = None
    busyUntil: float | None = None
    firstByteTimeouts: int = 0
    apiKey: str | None = attrs.field(default=None, repr=False)

    @property
    def online(self) -> bool:
        """
        Whether the last probe (or request) found it working.
        """
        return self.state == ONLINE

    @property
    def available(self) -> bool:
        """
        Whether it may be given new requests now.
        """
        return self.state == ONLINE and not self.draining and self.busyUntil is None

    def recovering(self, now: float, grace: float) -> bool:
        """
        Whether requests it serves should wait for it rather than fail: it is busy for a
        while, or it left L{ONLINE} less than C{grace} seconds ago (and is not draining).
        """
        if self.draining:
            return False
        if self.state == ONLINE:
            return self.busyUntil is not None
        since = self.unavailableSince
        return since is not None and now < since + grace

    @property
    def free(self) -> int:
        """
        Slots not in use (never negative, even after C{slots} was lowered).
        """
        return max(0, self.slots - self.active)

    def serves(self, dialects: frozenset[str], model: str | None) -> bool:
        """
        Whether it speaks one of C{dialects} and lists C{model} (a canonical key; L{None}
        means any model), regardless of whether it is online now.
        """
        return not self.dialects.isdisjoint(dialects) and (
            model is None or model in self.models
        )

    def authHeaders(self) -> dict[bytes, list[bytes]]:
        """
        The headers that authenticate the proxy to this backend: C{Authorization: Bearer}
        with its own key, or none.
        """
        if self.apiKey is None:
            return {}
        return {b"authorization": [b"Bearer " + self.apiKey.encode("utf-8")]}

    def modelName(self, model: str) -> str:
        """
        The name this backend uses for the canonical key C{model}.
        """
        return self.models.get(model, model)

    def describe(self) -> dict:
        """
        The backend's entry in C{/proxy/status}.
        """
        return {
            "name": self.name,
            "url": self.url,
            "online": self.online,
            "state": self.state,
            "kind": self.kind,
            "dialects": sorted(self.dialects),
            "busy": self.busyUntil is not None,
            "slots": self.slots,
            "active": self.active,
            "draining": self.draining,
            "models": sorted(self.models.values()),
            "loaded": sorted(self.models.get(k, k) for k in self.loaded),
            "version": self.version,
            "latency": self.latency,
            "error": self.error,
            "server": self.server,
        }


class BackendPool:
    """
    The set of backends, their slot accounting, and least-connections choice.
    """

    def __init__(self, backends: Iterable[Backend] = ()) -> None:
        self._backends: dict[str, Backend] = {}
        self._listeners: list[Callable[[], None]] = []
        self._turn = 0
        for backend in backends:
            self.add(backend)

    @property
    def backends(self) -> list[Backend]:
        """
        All backends, in the order they were added.
        """
        return list(self._backends.values())

    def get(self, name: str) -> Backend:
        """
        @raise UnknownBackend: when no backend has that name.
        """
        try:
            return self._backends[name]
        except KeyError:
            raise UnknownBackend(name) from None

    def subscribe(self, listener: Callable[[], None]) -> None:
        """
        Call C{listener} (no arguments) whenever what the pool can serve may have grown or
        shrunk: a backend added, removed, drained, up, down, or with other models.
        """
        self._listeners.append(listener)

    def changed(self) -> None:
        """
        Tell the subscribers that the pool changed.
        """
        for listener in list(self._listeners):
            listener()

    def add(self, backend: Backend) -> Backend:
        """
        Add a backend; it takes traffic once a probe finds it online.

        @raise DuplicateBackend: when the name is taken.
        """
        if backend.name in self._backends:
            raise DuplicateBackend(backend.name)
        self._backends[backend.name] = backend
        self.changed()
        return backend

    def remove(self, name: str) -> Backend:
        """
        Take a backend out of the pool. Requests running on it finish normally; it gets
        nothing new.

        @raise UnknownBackend: when no backend has that name.
        """
        backend = self.get(name)
        del self._backends[name]
        backend.draining = True
        self.changed()
        return backend

    def drain(self, name: str, draining: bool = True) -> Backend:
        """
        Stop (or, with C{draining=False}, resume) giving a backend new requests.

        @raise UnknownBackend: when no backend has that name.
        """
        backend = self.get(name)
        backend.draining = draining
        self.changed()
        return backend

    def setSlots(self, name: str, slots: int) -> Backend:
        """
        Set how many requests a backend runs at once. Lowering it below its active count
        lets those finish (L{Backend.free} stays at 0 until they do). Slots set so are no
        longer taken from what the backend reports.

        @raise UnknownBackend: when no backend has that name.
        @raise ValueError: for fewer than one slot.
        """
        if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
            raise ValueError(f"slots must be a positive integer, got {slots!r}")
        backend = self.get(name)
        backend.slots = slots
        backend.slotsFromBackend = False
        self.changed()
        return backend

    def markOnline(
        self,
        backend: Backend,
        kind: str,
        models: Iterable[str],
        loaded: Iterable[str] = (),
        version: str | None = None,
        latency: float | None = None,
        dialects: Iterable[str] | None = None,
    ) -> None:
        """
        Record a successful probe.

        @param models: model names as the backend reported them.
        @param loaded: names of the models it has in memory.
        @param dialects: the wire dialects it serves; by default what its C{kind} implies
            (Ollama: its own and OpenAI's; OpenAI-compatible: OpenAI's).
        """
        if dialects is None:
            dialects = (OLLAMA_API, OPENAI_API) if kind == OLLAMA else (OPENAI_API,)
        before = (backend.state, backend.kind, backend.dialects, backend.models, backend.loaded)
        backend.state = ONLINE
        backend.kind = kind
        backend.dialects = frozenset(dialects)
        backend.models = {canonicalModel(m): m for m in models}
        backend.loaded = frozenset(canonicalModel(m) for m in loaded)
        backend.version = version
        backend.latency = latency
        backend.error = None
        backend.failures = 0
        backend.unavailableSince = None
        # Probes repeat every interval; wake the scheduler only when what it can route
        # (or prefer) changed.
        after = (backend.state, backend.kind, backend.dialects, backend.models, backend.loaded)
        if before != after:
            self.changed()

    def markFailed(self, backend: Backend, reason: str, now: float, downAfter: int = 1) -> None:
        """
        Record a failed probe or a request that failed before its first byte: an online
        (or never probed) backend becomes L{SUSPECT}, and L{OFFLINE} once C{downAfter}
        failures came in a row. Its model list is kept, so requests for its models wait
        or get 503 (come back later), not 404.

        @param now: the clock time of the failure.
        """
        before = backend.state
        backend.failures += 1
        backend.failedAt = now
        backend.error = reason
        if before in (ONLINE, UNKNOWN):
            backend.unavailableSince = now
        if backend.failures >= downAfter:
            backend.state = OFFLINE
        elif before != OFFLINE:
            backend.state = SUSPECT
        if backend.state != before:
            self.changed()

    def markOffline(self, backend: Backend, reason: str, now: float | None = None) -> None:
        """
        Record a failure that leaves no doubt: L{OFFLINE} at once. Requests wait for it
        (the grace) only when C{now}, the time of the failure, is given.
        """
        wasOnline = backend.state != OFFLINE
        backend.state = OFFLINE
        backend.error = reason
        backend.failures = max(backend.failures, 1)
        backend.failedAt = now
        backend.unavailableSince = now
        if wasOnline:
            self.changed()

    def markBusy(self, backend: Backend, until: float) -> None:
        """
        The backend said it is busy (429, or 503 while loading): give it nothing new until
        C{until}, then L{markReady}. Its state and failure count do not change.
        """
        wasAvailable = backend.available
        backend.busyUntil = max(until, backend.busyUntil or until)
        if wasAvailable:
            self.changed()

    def markReady(self, backend: Backend) -> None:
        """
        A busy backend's pause is over.
        """
        if backend.busyUntil is not None:
            backend.busyUntil = None
            self.changed()

    def choose(
        self,
        dialects: frozenset[str],
        model: str | None,
        exclude: Iterable[Backend] = (),
    ) -> Backend | None:
        """
        The backend with a free slot that should run a request for C{model}: one with the
        model already loaded first, then the least loaded (active per slot), ties taken in
        turn. L{None} when no available backend that serves it has a free slot.
        """
        excluded = set(exclude) if exclude else ()
        best: list[Backend] = []
        bestKey: tuple[bool, float] | None = None
        for backend in self._backends.values():
            if (
                not backend.available
                or backend.free <= 0
                or not backend.serves(dialects, model)
                or backend in excluded
            ):
                continue
            key = (model not in backend.loaded, backend.active / backend.slots)
            if bestKey is None or key < bestKey:
                best, bestKey = [backend], key
            elif key == bestKey:
                best.append(backend)
        if not best:
            return None
        self._turn += 1
        return best[self._turn % len(best)]

    def holders(self, dialects: frozenset[str], model: str | None) -> list[Backend]:
        """
        Available backends that serve C{model} in one of C{dialects}, with free slots or
        not, those with the model loaded first: for requests that are answered at once
        rather than queued (C{/api/show}).
        """
        found = [b for b in self._backends.values() if b.available and b.serves(dialects, model)]
        return sorted(found, key=lambda b: (model not in b.loaded, b.active / b.slots))

    def canServe(self, dialects: frozenset[str], model: str | None) -> bool:
        """
        Whether any available backend (with free slots or not) serves C{model} in one of
        C{dialects}.
        """
        return any(b.available and b.serves(dialects, model) for b in self._backends.values())

    def knows(self, model: str, dialects: frozenset[str] | None = None) -> bool:
        """
        Whether any backend, in any state, has listed C{model} (a canonical key), and
        speaks one of C{dialects} when they are given.
        """
        return any(
            model in b.models and (dialects is None or not b.dialects.isdisjoint(dialects))
            for b in self._backends.values()
        )

    @property
    def settled(self) -> bool:
        """
        Whether there are backends and every one has been probed at least once. (An empty
        pool is not settled: with C{--demo} the backends are added a moment after start.)
        """
        return bool(self._backends) and all(b.state != UNKNOWN for b in self._backends.values())

    def acquire(self, backend: Backend) -> None:
        """
        Count one more request running on C{backend}.
        """
        backend.active += 1

    def release(self, backend: Backend) -> None:
        """
        Count one request on C{backend} as finished.
        """
        if backend.active <= 0:
            raise AssertionError(f"release without acquire on backend {backend.name}")
        backend.active -= 1
