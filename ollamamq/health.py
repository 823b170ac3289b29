# -*- test-case-name: tests.test_health -*-
"""
Health probes: which backends are up, which API they speak, which models they have and
which are loaded.

Every C{interval} seconds L{HealthChecker} probes all backends of the pool at once and
writes what it finds with L{BackendPool.markOnline} / L{BackendPool.markFailed}: one failed
probe makes a backend suspect, C{down_after} in a row offline (the failure model is in
L{ollamamq.backends}). Every HTTP call has its own deadline, so a hung backend fails its
probe after C{probeTimeout} and never delays the others or the next round.

Probe results are ordered: a probe that started before a newer failure (a request that
failed while the probe was under way) does not overwrite it; the backend is probed again
instead.

Classification goes by the shape of the answers, not by status codes alone, because
several servers answer paths they do not really implement:

  1. C{GET /api/tags} answering C{{"models": [...]}} is Ollama; then C{GET /api/ps}
     (loaded models) and C{GET /api/version} run concurrently, and failures of those two
     only cost the extra information (older Ollama has no C{/api/ps}). Ollama serves the
     Anthropic Messages API from version L{OLLAMA_MESSAGES_VERSION} on.
  2. Otherwise C{GET /v1/models} answering C{{"data": [...]}} is OpenAI-compatible
     (llama.cpp's llama-server, LM Studio, vLLM); model ids are the names.
  3. Otherwise the backend is offline, with the reasons of both calls. A connection that
     cannot be made, or a call that times out, ends the probe at once: asking the same
     host a second question would only double the wait.

Backend facts are then read from the answers instead of guessed (L{readFacts}):
llama.cpp's llama-server is recognised by C{GET /props} answering C{total_slots}, which
becomes the backend's C{slots} when the config sets none (and it serves the Anthropic
Messages API natively); LM Studio and vLLM by the
C{owned_by} of their C{/v1/models} entries. A llama-server still loading its model answers
every call with 503 C{"Loading model"}: that backend is busy, not down: it keeps the state
it had (a new one stays unknown, so requests for its model are told the backends are
starting) and is probed again a second later.

L{getJSON} is the one HTTP helper of the module, shared with L{ollamamq.aggregate}.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

import attrs
from twisted.application.internet import TimerService
from twisted.application.service import IService
from twisted.internet.defer import CancelledError, Deferred, DeferredList, succeed
from twisted.internet.error import (
    ConnectError,
    ConnectionLost,
    ConnectionRefusedError,
    DNSLookupError,
)
from twisted.internet.error import TimeoutError as ConnectTimeoutError
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseFailed, ResponseNeverReceived

from ollamamq.backends import (
    ANTHROPIC_API,
    OLLAMA,
    OLLAMA_API,
    OPENAI,
    OPENAI_API,
    ONLINE,
    Backend,
    BackendPool,
    UnknownBackend,
)
from ollamamq.models import versionKey
from ollamamq.relay import BodyCollector, BodyTooLong, wasCancelled
from ollamamq.relay import describeFailure as describeCallFailure

#: Seconds before a backend found loading its model is probed again.
LOADING_RETRY = 1.0

#: Largest answer body read from a backend. A listing of hundreds of models is a few
#: hundred KiB; anything far bigger is a misbehaving server, not a model list.
MAX_BODY = 16 * 1024 * 1024

#: The first Ollama release with C{/v1/messages} (Anthropic compatibility).
OLLAMA_MESSAGES_VERSION = "0.14.0"


class FetchError(Exception):
    """
    A backend call failed; the message says why, for a person (it ends up in
    L{Backend.error}, C{/proxy/status} and the log).

    @ivar connection: whether the failure was the connection itself (refused, timed out,
        dropped), so asking the same host something else is pointless.
    """

    def __init__(
        self, message: str, connection: bool = False, code: int | None = None, body: bytes = b""
    ) -> None:
        """
        @param code: the HTTP status of an error answer, if there was one.
        @param body: that answer's body.
        """
        super().__init__(message)
        self.message = message
        self.connection = connection
        self.code = code
        self.body = body

    @property
    def loading(self) -> bool:
        """
        Whether the answer was llama-server's 503 C{"Loading model"}: busy, not down.
        """
        if self.code != 503:
            return False
        try:
            answer = json.loads(self.body)
        except ValueError:
            return False
        error = answer.get("error") if isinstance(answer, dict) else None
        message = error.get("message") if isinstance(error, dict) else error
        return isinstance(message, str) and "loading model" in message.lower()


def _seconds(value: float) -> str:
    """
    C{5.0} as C{"5s"}, C{2.5} as C{"2.5s"}.
    """
    return f"{value:g}s"


def describeFailure(failure: Failure) -> FetchError:
    """
    Turn a failed HTTP call into a L{FetchError} with a short reason (the relay's
    L{describeCallFailure}: fixed phrases, never an address).
    """
    if failure.check(FetchError):
        return failure.value
    return FetchError(describeCallFailure(failure), connection=True)


def getJSON(
    http: Any,
    clock: IReactorTime,
    base: str,
    path: str,
    timeout: float,
    onResponse: Callable[[], None] | None = None,
    headers: dict[bytes, list[bytes]] | None = None,
) -> Deferred[Any]:
    """
    C{GET base + path} and decode the JSON answer, all within C{timeout} seconds.

    @param http: treq or a treq-like object (L{treq.testing.StubTreq}).
    @param clock: measures the deadline, so tests can use L{task.Clock}.
    @param onResponse: called when the response headers arrive (for latency).
    @param headers: request headers (the backend's own credentials).
    @return: fires with the decoded JSON of a 2xx answer; errbacks with L{FetchError}
        (C{"GET /api/tags: 500"}, C{"GET /api/tags: not JSON"}, C{"GET /api/tags timed
        out after 5s"}, C{"connection refused"}, ...), or L{CancelledError} when the
        caller cancelled it. Cancelling (or the deadline) closes the connection.
    """
    url = base.rstrip("/") + path

    def gotResponse(response: Any) -> Deferred[tuple[int, bytes]]:
        if onResponse is not None:
            onResponse()
        # Read the body even of an error answer: an unread body keeps the connection busy.
        reader = BodyCollector(MAX_BODY)
        response.deliverBody(reader)
        return reader.done.addCallback(lambda body: (response.code, body))

    def decode(answer: tuple[int, bytes]) -> Any:
        code, body = answer
        if not 200 <= code < 300:
            raise FetchError(f"GET {path}: {code}", code=code, body=body)
        try:
            return json.loads(body)
        except ValueError:
            raise FetchError(f"GET {path}: not JSON") from None

    def failed(failure: Failure) -> Failure:
        if wasCancelled(failure):
            return Failure(CancelledError())
        if failure.check(BodyTooLong):
            return Failure(FetchError(f"GET {path}: answer larger than {MAX_BODY} bytes"))
        return Failure(describeFailure(failure))

    def timedOut(result: Any, seconds: float) -> Any:
        # Whatever the cancelled call ended with (CancelledError, ResponseNeverReceived,
        # ...), the reason is that we stopped waiting.
        if isinstance(result, Failure):
            raise FetchError(f"GET {path} timed out after {_seconds(seconds)}", connection=True)
        return result

    d = http.get(url, headers=headers or None, unbuffered=True)
    d.addCallback(gotResponse)
    d.addCallback(decode)
    d.addErrback(failed)
    d.addTimeout(timeout, clock, onTimeoutCancel=timedOut)
    return d


def _names(entries: Any, field: str) -> list[str] | None:
    """
    The names in a listing (C{models} of C{/api/tags}, C{data} of C{/v1/models}), or
    L{None} when it is not a listing. Go servers encode an empty list as C{null}.
    """
    if entries is None:
        return []
    if not isinstance(entries, list):
        return None
    names = []
    for entry in entries:
        if isinstance(entry, dict):
            name = entry.get(field)
            if field == "name" and not isinstance(name, str):
                name = entry.get("model")
            if isinstance(name, str) and name:
                names.append(name)
    return names


def _listing(answer: Any, key: str, field: str) -> list[str] | None:
    """
    The names listed under C{key} of a JSON object answer, or L{None} when C{answer} is
    not that shape.
    """
    if not isinstance(answer, dict) or key not in answer:
        return None
    return _names(answer[key], field)


@attrs.frozen
class Finding:
    """
    What one probe found.

    @ivar kind: L{OLLAMA}, L{OPENAI}, or L{None} when the probe failed.
    @ivar reason: why it failed (only when C{kind} is L{None}).
    @ivar dialects: the wire dialects found, or L{None} for what C{kind} implies.
    @ivar startedAt: clock time the probe started (to order it against failures).
    @ivar loading: the backend answered that it is loading its model (busy, not down).
    @ivar facts: what the backend's answers say about its software and slots.
    """

    kind: str | None
    models: tuple[str, ...] = ()
    loaded: tuple[str, ...] = ()
    version: str | None = None
    latency: float | None = None
    reason: str | None = None
    dialects: tuple[str, ...] | None = None
    startedAt: float = 0.0
    loading: bool = False
    facts: Facts | None = None


LLAMA_SERVER = "llama-server"
LM_STUDIO = "lmstudio"
VLLM = "vllm"

#: C{owned_by} of C{/v1/models} entries -> the server that says it.
_OWNERS = {"llamacpp": LLAMA_SERVER, "organization_owner": LM_STUDIO, "vllm": VLLM}


@attrs.frozen
class Facts:
    """
    What an OpenAI-compatible backend's answers say about it.

    @ivar server: L{LLAMA_SERVER}, L{LM_STUDIO}, L{VLLM}, or L{None} when not recognised.
    @ivar slots: requests it runs at once, when it says (llama-server's C{total_slots}).
    """

    server: str | None = None
    slots: int | None = None


def _owner(listing: Any) -> str | None:
    """
    The server a C{/v1/models} answer names by its entries' C{owned_by}, if any.
    """
    entries = listing.get("data") if isinstance(listing, dict) else None
    for entry in entries if isinstance(entries, list) else ():
        if isinstance(entry, dict) and entry.get("owned_by") in _OWNERS:
            return _OWNERS[entry["owned_by"]]
    return None


async def readFacts(
    http: Any, clock: IReactorTime, base: str, listing: Any, timeout: float
) -> Facts:
    """
    Recognise an OpenAI-compatible backend from its C{/v1/models} answer and, unless that
    names LM Studio or vLLM, from C{GET /props}: llama-server answers it with
    C{total_slots}. A failed C{/props} only costs the facts.

    @param listing: the decoded C{/v1/models} answer.
    @return: the facts found.
    @raise CancelledError: when the probe was cancelled.
    """
    server = _owner(listing)
    if server in (LM_STUDIO, VLLM):
        return Facts(server)
    try:
        props = await getJSON(http, clock, base, "/props", timeout)
    except FetchError:
        return Facts(server)
    slots = props.get("total_slots") if isinstance(props, dict) else None
    if isinstance(slots, int) and not isinstance(slots, bool) and slots >= 1:
        return Facts(LLAMA_SERVER, slots)
    return Facts(server)


class _ProbeLoop(TimerService):
    """
    The periodic probe: a L{TimerService} that, when stopped, cancels the probes under way
    instead of waiting for a hung backend's deadline, so C{twistd} stops promptly.
    """

    def __init__(self, checker: HealthChecker) -> None:
        super().__init__(checker.interval, checker.probeAll)
        # Before startService: TimerService creates its LoopingCall there.
        self.clock = checker.clock
        self._checker = checker

    def startService(self) -> None:
        self._checker.stopped = False
        super().startService()

    def stopService(self) -> Deferred[None]:
        # Stop the loop first, so the round we cancel does not schedule another.
        d = super().stopService()
        self._checker.stop()
        return d


class HealthChecker:
    """
    Probes the backends of a pool and records what it finds there.

    @ivar stopped: set while the service is stopped; cancelled probes then record nothing.
    @ivar onProbe: called with each probed backend and its probe's latency in seconds, or
        L{None} when it failed (for metrics).
    """

    log = Logger()
    onProbe: Callable[[Backend, float | None], None] = staticmethod(lambda backend, latency: None)

    def __init__(
        self,
        pool: BackendPool,
        http: Any,
        clock: IReactorTime,
        interval: float,
        probeTimeout: float,
        downAfter: int = 3,
    ) -> None:
        """
        @param http: treq, or a treq-like object such as L{treq.testing.StubTreq}.
        @param interval: seconds between probe rounds.
        @param probeTimeout: deadline of each HTTP call of a probe.
        @param downAfter: failures in a row that make a backend offline.
        """
        self.pool = pool
        self.http = http
        self.clock = clock
        self.interval = interval
        self.probeTimeout = probeTimeout
        self.downAfter = downAfter
        self.stopped = False
        # Backends whose probe result was older than a failure: probe them again.
        self._again: set[Backend] = set()
        self._running: dict[Backend, Deferred[None]] = {}
        self._waiters: dict[Backend, list[Deferred[None]]] = {}
        self._soon: dict[Backend, IDelayedCall] = {}
        # Backends found loading their model, to probe again a moment after their probe.
        self._loadingAgain: set[Backend] = set()
        self._service: _ProbeLoop | None = None

    def reconfigure(self, config: Any) -> None:
        """
        Take a reloaded config's probe interval (from the next round on) and timeout.
        """
        self.interval = config.healthInterval
        self.probeTimeout = config.probeTimeout
        self.downAfter = config.downAfter
        loop = self._service
        if loop is not None:
            loop.step = config.healthInterval
            running = getattr(loop, "_loop", None)
            if running is not None:
                running.interval = config.healthInterval

    def service(self) -> IService:
        """
        The service that probes every C{interval} seconds, the first round at once.
        Always the same service: two loops over one pool would only double the traffic.
        """
        if self._service is None:
            self._service = _ProbeLoop(self)
        return self._service

    def probeAll(self) -> Deferred[None]:
        """
        Probe every backend now in the pool, concurrently. Backends added later are
        probed in the next round.

        @return: fires with L{None} when all probes are done; never fails, since an
            unhandled failure would stop the L{TimerService} for good.
        """
        try:
            probes = [self.probe(backend) for backend in self.pool.backends]
        except Exception:
            self.log.failure("Could not start the probe round")
            return succeed(None)
        done = DeferredList(probes, consumeErrors=True)
        return done.addCallback(lambda _: None)

    def probe(self, backend: Backend) -> Deferred[None]:
        """
        Probe one backend and record the result in the pool (unless the backend has left
        the pool meanwhile). A probe already under way for it is joined, not repeated.

        @return: fires with L{None} when done; never fails.
        """
        waiter: Deferred[None] = Deferred()
        self._waiters.setdefault(backend, []).append(waiter)
        if backend not in self._running:
            delayed = self._soon.pop(backend, None)
            if delayed is not None and delayed.active():
                delayed.cancel()
            started = self.clock.seconds()
            d = Deferred.fromCoroutine(self._examine(backend))
            d.addErrback(self._examineFailed, backend)
            d.addCallback(lambda finding: attrs.evolve(finding, startedAt=started))
            d.addCallback(self._record, backend)
            d.addErrback(self._recordFailed, backend)
            self._running[backend] = d
            d.addBoth(self._finished, backend)
        return waiter

    def probeSoon(self, backend: Backend, delay: float = 0) -> None:
        """
        Probe C{backend} after C{delay} seconds, unless a probe is already due or under
        way: the relay calls this after a request failed, so a backend that only hiccuped
        is back in service without waiting for the next round, and a burst of failures
        costs one probe.
        """
        if self.stopped or backend in self._running or backend in self._soon:
            return

        def due() -> None:
            del self._soon[backend]
            self.probe(backend)

        self._soon[backend] = self.clock.callLater(delay, due)

    def stop(self) -> None:
        """
        Cancel the probes under way and those scheduled with L{probeSoon}, recording
        nothing for them.
        """
        self.stopped = True
        for delayed in self._soon.values():
            if delayed.active():
                delayed.cancel()
        self._soon.clear()
        for d in list(self._running.values()):
            d.cancel()

    async def _examine(self, backend: Backend) -> Finding:
        """
        Ask C{backend} what it is. Only L{CancelledError} escapes; every failure of the
        backend becomes a L{Finding} with a reason.
        """
        started = self.clock.seconds()
        answered: list[float] = []

        def stamp() -> None:
            answered.append(self.clock.seconds())

        try:
            tags = await getJSON(
                self.http, self.clock, backend.url, "/api/tags", self.probeTimeout, stamp,
                headers=backend.authHeaders(),
            )
        except FetchError as e:
            if e.connection:
                return Finding(None, reason=e.message)
            if e.loading:
                return Finding(None, reason="loading model", loading=True)
            tagsProblem = e.message
        else:
            models = _listing(tags, "models", "name")
            if models is not None:
                latency = answered[0] - started if answered else None
                return await self._ollamaDetails(backend, models, latency)
            tagsProblem = "GET /api/tags: unexpected response shape"
        latency = answered[0] - started if answered else None

        try:
            listing = await getJSON(
                self.http, self.clock, backend.url, "/v1/models", self.probeTimeout,
                headers=backend.authHeaders(),
            )
        except FetchError as e:
            if e.loading:
                return Finding(None, reason="loading model", loading=True)
            return Finding(None, reason=f"{tagsProblem}; {e.message}")
        ids = _listing(listing, "data", "id")
        if ids is None:
            return Finding(
                None, reason=f"{tagsProblem}; GET /v1/models: unexpected response shape"
            )
        facts = await readFacts(self.http, self.clock, backend.url, listing, self.probeTimeout)
        # No common way to ask an OpenAI-compatible server what is in memory (llama-server
        # and vLLM serve only loaded models, LM Studio lists what it could load), so none
        # is preferred for being "loaded".
        # llama-server serves Anthropic's /v1/messages (and count_tokens) natively.
        dialects = (OPENAI_API, ANTHROPIC_API) if facts.server == LLAMA_SERVER else None
        return Finding(
            OPENAI, models=tuple(ids), latency=latency, facts=facts, dialects=dialects
        )

    @staticmethod
    def _ollamaDialects(version: str | None) -> tuple[str, ...]:
        """
        The dialects an Ollama of C{version} serves.
        """
        if version is not None and versionKey(version) >= versionKey(OLLAMA_MESSAGES_VERSION):
            return (OLLAMA_API, OPENAI_API, ANTHROPIC_API)
        return (OLLAMA_API, OPENAI_API)

    async def _ollamaDetails(
        self, backend: Backend, models: list[str], latency: float | None
    ) -> Finding:
        """
        The loaded models and version of an Ollama backend, asked concurrently. Either
        may fail (old versions lack C{/api/ps}) without making the backend offline.
        """
        auth = backend.authHeaders()
        ps = getJSON(self.http, self.clock, backend.url, "/api/ps", self.probeTimeout,
                     headers=auth)
        version = getJSON(self.http, self.clock, backend.url, "/api/version", self.probeTimeout,
                          headers=auth)
        results = await DeferredList([ps, version], consumeErrors=True)
        (psOK, psAnswer), (versionOK, versionAnswer) = results
        for ok, answer in results:
            if not ok and answer.check(CancelledError):
                answer.raiseException()
        loaded = _listing(psAnswer, "models", "name") if psOK else None
        found = None
        if versionOK and isinstance(versionAnswer, dict):
            found = versionAnswer.get("version")
        if not isinstance(found, str):
            # Keep what an earlier probe learnt: the version only changes with a restart.
            found = backend.version
        return Finding(
            OLLAMA, models=tuple(models), loaded=tuple(loaded or ()), version=found,
            latency=latency, dialects=self._ollamaDialects(found),
        )

    def _inPool(self, backend: Backend) -> bool:
        """
        Whether C{backend} itself (not just its name) is still in the pool.
        """
        try:
            return self.pool.get(backend.name) is backend
        except UnknownBackend:
            return False

    def _record(self, finding: Finding, backend: Backend) -> None:
        """
        Write a finding into the pool and log the transitions (not every round).
        """
        if not self._inPool(backend):
            # Removed while we asked: writing would notify subscribers about a backend
            # nobody can use, and a name reused since must not get our stale answer.
            return
        self.onProbe(backend, finding.latency if finding.kind is not None else None)
        before = backend.state
        if finding.loading:
            self._loading(backend, backend.error)
            return
        if finding.kind is None:
            self.pool.markFailed(backend, finding.reason or "unknown error",
                                 self.clock.seconds(), self.downAfter)
            if backend.state != before:
                self.log.warn(
                    "Backend {name} ({url}) is {state}: {reason}",
                    name=backend.name, url=backend.url, state=backend.state,
                    reason=finding.reason,
                )
            return
        if backend.failedAt is not None and backend.failedAt > finding.startedAt:
            # A request failed while this probe was under way: its good news is older
            # than that failure. Ask again rather than overwrite it.
            self._again.add(backend)
            return
        self.pool.markOnline(
            backend, finding.kind, finding.models, finding.loaded, finding.version,
            finding.latency, finding.dialects,
        )
        self._applyFacts(backend, finding.facts)
        if before != ONLINE:
            self.log.info(
                "Backend {name} ({url}) is online: {kind} {version}, {count} models",
                name=backend.name, url=backend.url, kind=finding.kind,
                version=finding.version or "", count=len(finding.models),
            )

    def _loading(self, backend: Backend, previousError: str | None) -> None:
        """
        The backend is loading its model: busy, not down. Its state stays as it was (a
        backend never seen online stays unknown, so its models' requests hear that the
        backends are starting), and it is probed again in a second, so it takes traffic
        as soon as the load is done rather than a whole interval later.
        """
        backend.error = "loading model"
        if previousError != backend.error:
            self.log.info(
                "Backend {name} ({url}) is loading its model", name=backend.name, url=backend.url
            )
        self._loadingAgain.add(backend)

    def _applyFacts(self, backend: Backend, facts: Facts | None) -> None:
        """
        Record what the backend said about itself; its reported slot count becomes its
        C{slots} unless the config set them (the default, 1, stays when none is reported).
        """
        if facts is None:
            return
        backend.server = facts.server
        if facts.slots is not None and backend.slotsFromBackend and backend.slots != facts.slots:
            self.log.info(
                "Backend {name} ({url}) runs {slots} requests at once ({server} reports it)",
                name=backend.name, url=backend.url, slots=facts.slots, server=facts.server,
            )
            backend.slots = facts.slots
            # More (or fewer) free slots: the scheduler may dispatch now.
            self.pool.changed()

    def _examineFailed(self, failure: Failure, backend: Backend) -> Finding | Failure:
        """
        A bug while examining a backend (backend failures are findings, not exceptions):
        log it with its traceback and count the backend as offline, since what it said
        could not be understood. A cancelled probe passes through, to record nothing.
        """
        if failure.check(CancelledError):
            return failure
        self.log.failure("Probe of backend {name} failed", failure, name=backend.name)
        return Finding(None, reason=f"probe failed: {failure.getErrorMessage()}")

    def _recordFailed(self, failure: Failure, backend: Backend) -> None:
        """
        Keep a probe from ever failing: a cancelled probe records nothing, and an error
        while recording (a pool subscriber's, most likely) is logged and dropped, so the
        loop and the other probes go on.
        """
        if failure.check(CancelledError):
            return
        self.log.failure(
            "Recording the probe of backend {name} failed", failure, name=backend.name
        )

    def _finished(self, result: None, backend: Backend) -> None:
        """
        A probe is over: let the next one start and wake everyone waiting for this one.
        """
        del self._running[backend]
        for waiter in self._waiters.pop(backend, ()):
            waiter.callback(None)
        if backend in self._again:
            self._again.discard(backend)
            self.probeSoon(backend)
        if backend in self._loadingAgain:
            self._loadingAgain.discard(backend)
            self.probeSoon(backend, LOADING_RETRY)


def onlineBackends(pool: BackendPool, kinds: Iterable[str]) -> list[Backend]:
    """
    The backends that are online, not draining, and speak one of C{kinds}, in pool order.
    """
    wanted = frozenset(kinds)
    return [b for b in pool.backends if b.available and b.kind in wanted]


__all__ = [
    "LLAMA_SERVER",
    "LM_STUDIO",
    "VLLM",
    "Facts",
    "FetchError",
    "Finding",
    "HealthChecker",
    "describeFailure",
    "getJSON",
    "onlineBackends",
    "readFacts",
]
