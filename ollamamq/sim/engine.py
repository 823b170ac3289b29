# -*- test-case-name: tests.test_sim -*-
"""
The simulator's engine: slots, model loads and token pacing, all timed by an injected
L{IReactorTime} (so tests run on L{twisted.internet.task.Clock}).

  - at most L{SimulatorOptions.slots} jobs (generations or embeddings) run at once; the
    rest wait in FIFO order with no byte sent, like Ollama's C{OLLAMA_NUM_PARALLEL};
  - a model that is not loaded costs L{SimulatorOptions.loadDelay} seconds before its
    first token, and loading evicts the least recently used model beyond
    L{SimulatorOptions.maxLoaded} (a model kept loaded for good, as llama-server keeps
    its one model, is never evicted);
  - tokens keep to a timeline of L{SimulatorOptions.tps} per stream, each written the
    moment it is "generated" in the job's wire format (its L{Route});
  - a client that goes away is dropped at once, freeing its slot.

The engine knows nothing of HTTP routing: L{ollamamq.sim.resource.Simulator} admits a
request, builds its L{Job} and L{Engine.submit}s it.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from typing import Any

import attrs
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request

from ollamamq.sim.dialect import DEFAULT_KEEP_ALIVE, Route
from ollamamq.sim.options import SimulatorOptions

__all__ = ["LOG_LIMIT", "WORDS", "Engine", "Job"]


LOG_LIMIT = 1000
"""
How many request log entries C{/sim/stats} (and C{/sim/requests}) keeps (the most recent ones).
"""

WORDS = (
    "Simulated",
    "tokens",
    "drift",
    "from",
    "a",
    "patient",
    "llama",
    "who",
    "answers",
    "every",
    "question",
    "with",
    "calm",
    "and",
    "measured",
    "words",
    "while",
    "the",
    "queue",
    "moves",
    "fairly",
    "along.",
)
"""
The vocabulary of simulated answers; one word is one token.
"""

_requestLog = Logger(namespace="ollamamq.sim.requests")


@attrs.define(eq=False)
class Job:
    """
    One generation, embedding or model load, from arrival to its end.

    @ivar request: the HTTP request to answer.
    @ivar route: the formatter that knows the route's wire format.
    @ivar entry: this request's entry in the stats log (updated in place).
    @ivar model: the served model's canonical name.
    @ivar requestedModel: the name as the client sent it (echoed back).
    @ivar stream: whether to stream the answer.
    @ivar tokens: how many tokens to produce.
    @ivar limited: whether C{tokens} came from the request (so the answer ends
        with C{done_reason} C{"length"}).
    @ivar promptTokens: the approximate prompt length in tokens.
    @ivar seed: where in the vocabulary the answer starts.
    @ivar keepAlive: seconds the model stays loaded after this request.
    @ivar body: the parsed request body.
    @ivar inputs: texts to embed, for embedding routes.
    @ivar receivedAt: when the request arrived.
    @ivar phase: C{"waiting"}, C{"loading"}, C{"running"} or C{"done"}.
    @ivar loadDuration: seconds spent loading the model for this request.
    @ivar generatingSince: when the first token started (after the load).
    @ivar emitted: the tokens produced so far, in order.
    @ivar timer: the pending delayed call driving this job, if any.
    @ivar ident: a number unique within the simulator, used in ids.
    """

    request: Request
    route: Route
    entry: dict[str, Any]
    model: str
    requestedModel: str
    stream: bool
    tokens: int
    limited: bool
    promptTokens: int
    seed: int
    keepAlive: float
    body: dict[str, Any]
    inputs: list[str]
    receivedAt: float
    ident: int
    phase: str = "waiting"
    loadDuration: float = 0.0
    generatingSince: float = 0.0
    emitted: list[str] = attrs.field(factory=list)
    timer: IDelayedCall | None = None

    @property
    def doneReason(self) -> str:
        """
        Why the answer ended, as Ollama and OpenAI name it.
        """
        return "length" if self.limited else "stop"

    def text(self) -> str:
        """
        @return: the whole answer produced so far.
        """
        return "".join(self.emitted)


@attrs.define(eq=False)
class Engine:
    """
    Runs jobs in slots, loads and evicts models, paces tokens.

    @ivar options: how the simulator behaves.
    @ivar clock: the clock driving tokens and loads.
    """

    options: SimulatorOptions
    clock: IReactorTime
    _waiting: deque[Job] = attrs.field(init=False, factory=deque)
    _running: list[Job] = attrs.field(init=False, factory=list)
    # model -> expiry time, least recently used first.
    _loaded: OrderedDict[str, float] = attrs.field(init=False, factory=OrderedDict)
    _loading: dict[str, IDelayedCall] = attrs.field(init=False, factory=dict)
    _counters: dict[str, int] = attrs.field(init=False, factory=dict)
    _log: deque[dict[str, Any]] = attrs.field(init=False, factory=lambda: deque(maxlen=LOG_LIMIT))
    _nextIdent: int = attrs.field(init=False, default=1)

    def __attrs_post_init__(self) -> None:
        """
        Start with zero counters.
        """
        self._resetCounters()

    # -- public API ---------------------------------------------------------

    @property
    def stats(self) -> dict[str, Any]:
        """
        The counters and the work log.

        @return: a JSON-ready dict: C{requests}, C{completed}, C{cancelled},
            C{errors}, C{active}, C{waiting}, C{maxConcurrent}, C{loaded} and
            C{log} (oldest first).
        """
        self.expire()
        return {
            **self._counters,
            "active": len(self._running),
            "waiting": len(self._waiting),
            "loaded": list(self._loaded),
            "log": [dict(entry) for entry in self._log],
        }

    def reset(self) -> None:
        """
        Clear the counters and the request log (requests in flight go on).
        """
        self._resetCounters()
        self._log.clear()

    def record(self, entry: dict[str, Any]) -> int:
        """
        Log a work request that arrived (before it is admitted or refused).

        @param entry: its log entry, updated in place as it goes.
        @return: its number, unique within the engine.
        """
        ident = self._nextIdent
        self._nextIdent += 1
        entry["id"] = ident
        self._log.append(entry)
        self._counters["requests"] += 1
        return ident

    def refused(self, entry: dict[str, Any]) -> None:
        """
        A logged work request was refused with an error.

        @param entry: its log entry.
        """
        entry["status"] = "error"
        entry["finishedAt"] = self.clock.seconds()
        self._counters["errors"] += 1

    def answered(self, entry: dict[str, Any]) -> None:
        """
        A logged work request was answered at once, without a slot.

        @param entry: its log entry.
        """
        entry["status"] = "completed"
        entry["startedAt"] = entry["finishedAt"] = self.clock.seconds()
        self._counters["completed"] += 1

    def submit(self, job: Job) -> None:
        """
        Queue a job for a slot; it runs as soon as one is free.

        @param job: the job (its request gets the answer).
        """
        job.request.notifyFinish().addErrback(self._disconnected, job)
        self._waiting.append(job)
        self._dispatch()

    def loaded(self) -> list[tuple[str, float]]:
        """
        @return: the loaded models and when each expires, most recently used
            first.
        """
        self.expire()
        return [(name, self._loaded[name]) for name in reversed(self._loaded)]

    def unload(self, model: str) -> None:
        """
        Unload a model now, or once its last job ends if it is in use (as
        Ollama does for C{keep_alive: 0}).

        @param model: the model.
        """
        if model in self._loaded:
            self._loaded[model] = self.clock.seconds()
            self.expire()

    def preload(self, models: tuple[str, ...]) -> None:
        """
        Load models for good, as llama-server loads its model at startup:
        they are loading for C{loadDelay} seconds, then loaded forever.

        @param models: the models.
        """
        for model in models:
            if self.options.loadDelay == 0:
                self._loaded[model] = math.inf
            else:
                self._loading[model] = self.clock.callLater(
                    self.options.loadDelay, self._loadFinished, model, math.inf
                )

    def isLoading(self) -> bool:
        """
        @return: whether any model is loading now.
        """
        return bool(self._loading)

    def shutdown(self) -> None:
        """
        Stop all work: cancel every timer and drop every open request's
        connection, so nothing is left pending on the reactor.
        """
        for call in self._loading.values():
            if call.active():
                call.cancel()
        self._loading.clear()
        for job in list(self._waiting) + list(self._running):
            self._stopJob(job)
            job.entry["status"] = "cancelled"
            job.entry["finishedAt"] = self.clock.seconds()
            self._counters["cancelled"] += 1
            job.request.loseConnection()
        self._waiting.clear()
        self._running.clear()

    # -- bookkeeping --------------------------------------------------------

    def _resetCounters(self) -> None:
        """
        Zero the counters; the high-water mark restarts at what runs now.
        """
        self._counters = {
            "requests": 0,
            "completed": 0,
            "cancelled": 0,
            "errors": 0,
            "maxConcurrent": len(self._running),
        }

    def _inUse(self) -> set[str]:
        """
        @return: the models that running jobs are generating with.
        """
        return {job.model for job in self._running if job.phase == "running"}

    def expire(self) -> None:
        """
        Unload models whose keep-alive ran out, unless a job is using them.
        """
        now = self.clock.seconds()
        inUse = self._inUse()
        for model, expiresAt in list(self._loaded.items()):
            if expiresAt <= now and model not in inUse:
                del self._loaded[model]

    # -- slots, loads and tokens --------------------------------------------

    def _dispatch(self) -> None:
        """
        Start waiting jobs, oldest first, while slots are free.
        """
        while self._waiting and len(self._running) < self.options.slots:
            job = self._waiting.popleft()
            self._running.append(job)
            self._counters["maxConcurrent"] = max(
                self._counters["maxConcurrent"], len(self._running)
            )
            self._start(job)

    def _start(self, job: Job) -> None:
        """
        A job got a slot: load its model if needed, then produce.

        @param job: the job.
        """
        now = self.clock.seconds()
        job.entry["status"] = "running"
        job.entry["startedAt"] = now
        _requestLog.info(
            "request {id} {path} user={user} started",
            id=job.entry.get("id"), path=job.entry.get("path"), user=job.entry.get("user"),
        )
        self.expire()
        if job.model in self._loaded:
            self._loaded.move_to_end(job.model)
            self._begin(job)
            return
        if job.model not in self._loading:
            if self.options.loadDelay == 0:
                self._loaded[job.model] = now + DEFAULT_KEEP_ALIVE
                self._evict(job.model)
                self._begin(job)
                return
            self._loading[job.model] = self.clock.callLater(
                self.options.loadDelay, self._loadFinished, job.model
            )
        # Wait for the load in progress, whoever started it.
        job.phase = "loading"
        readyAt = self._loading[job.model].getTime()
        job.timer = self.clock.callLater(max(0.0, readyAt - now), self._loadedFor, job, now)

    def _loadFinished(self, model: str, expiresAt: float | None = None) -> None:
        """
        A model finished loading: it becomes the most recently used one.

        @param model: the model.
        @param expiresAt: when it unloads; by default after Ollama's default
            keep-alive (the job that asked for it sets its own when it ends).
        """
        del self._loading[model]
        if expiresAt is None:
            expiresAt = self.clock.seconds() + DEFAULT_KEEP_ALIVE
        self._loaded[model] = expiresAt
        self._loaded.move_to_end(model)
        self._evict(model)

    def _evict(self, keep: str) -> None:
        """
        Unload least recently used models beyond C{maxLoaded}, sparing the
        one just loaded and any in use (so the limit can be exceeded while
        all loaded models are busy).

        @param keep: the model just loaded.
        """
        inUse = self._inUse()
        for model in list(self._loaded):
            if len(self._loaded) <= self.options.maxLoaded:
                break
            if model != keep and model not in inUse and not math.isinf(self._loaded[model]):
                del self._loaded[model]

    def _loadedFor(self, job: Job, since: float) -> None:
        """
        The model a job waited for is loaded.

        @param job: the job.
        @param since: when the job started waiting for the load.
        """
        job.timer = None
        if job.model not in self._loaded:
            # Another load evicted it at the same instant (busy server, tiny
            # maxLoaded): treat it as loaded for this job, as the slot holds it.
            self._loaded[job.model] = self.clock.seconds() + DEFAULT_KEEP_ALIVE
            self._evict(job.model)
        self._loaded.move_to_end(job.model)
        job.loadDuration = self.clock.seconds() - since
        self._begin(job)

    def _interval(self) -> float:
        """
        @return: seconds per token (0 for "as fast as possible").
        """
        return 1.0 / self.options.tps if self.options.tps > 0 else 0.0

    def _begin(self, job: Job) -> None:
        """
        The model is loaded: schedule the first token (or the embedding, or
        the load answer).

        @param job: the job.
        """
        job.phase = "running"
        job.generatingSince = self.clock.seconds()
        if job.route.loadOnly:
            self._complete(job)
        elif job.route.embedding:
            # An embedding costs one token's time.
            job.timer = self.clock.callLater(self._delayUntil(job, 1), self._complete, job)
        elif job.tokens == 0:
            self._complete(job)
        else:
            job.timer = self.clock.callLater(self._delayUntil(job, 1), self._token, job)

    def _delayUntil(self, job: Job, count: int) -> float:
        """
        How long until a job's C{count}th token is due.  Tokens keep to a
        timeline fixed when generation began, so a late reactor turn does not
        slow the whole stream down (and a test clock that jumps ahead gets
        every token that is due by then).

        @param job: the job.
        @param count: which token (1 for the first).
        @return: the delay, never negative.
        """
        due = job.generatingSince + count * self._interval()
        return max(0.0, due - self.clock.seconds())

    def _token(self, job: Job) -> None:
        """
        Produce one token; stream it at once if streaming.

        @param job: the job.
        """
        job.timer = None
        index = len(job.emitted)
        word = WORDS[(job.seed + index) % len(WORDS)]
        token = word if index == 0 else " " + word
        job.emitted.append(token)
        job.entry["tokens"] = len(job.emitted)
        if job.stream:
            job.request.write(job.route.chunk(job, token))
            if job.phase == "done":
                # The write found the client gone; _disconnected cleaned up.
                return
        if len(job.emitted) >= job.tokens:
            self._complete(job)
        else:
            # One token per reactor turn even at tps=0 (callLater(0)), never
            # a loop, so other streams and the network keep moving.
            job.timer = self.clock.callLater(
                self._delayUntil(job, len(job.emitted) + 1), self._token, job
            )

    def _complete(self, job: Job) -> None:
        """
        Finish a job's answer and free its slot.

        @param job: the job.
        """
        job.timer = None
        if job.stream:
            job.request.write(job.route.end(job))
        else:
            body = job.route.whole(job)
            job.request.setHeader(b"Content-Length", b"%d" % (len(body),))
            job.request.write(body)
        if job.phase == "done":
            # The write found the client gone; _disconnected cleaned up.
            return
        self._release(job, "completed")
        job.request.finish()
        self._dispatch()

    def _release(self, job: Job, status: str) -> None:
        """
        Take a job out of the slots (or the queue) and record how it ended.

        @param job: the job.
        @param status: C{"completed"} or C{"cancelled"}.
        """
        wasRunning = job.phase in ("loading", "running")
        self._stopJob(job)
        if wasRunning and job.model in self._loaded and not math.isinf(self._loaded[job.model]):
            # A model loaded for good (preloaded) stays so whatever the request said.
            self._loaded[job.model] = self.clock.seconds() + job.keepAlive
        job.entry["status"] = status
        job.entry["finishedAt"] = self.clock.seconds()
        self._counters[status] += 1
        # With -v, integration tests wait for these lines instead of polling /sim/stats.
        _requestLog.info(
            "request {id} {path} user={user} {status}",
            id=job.entry.get("id"), path=job.entry.get("path"),
            user=job.entry.get("user"), status=status,
        )

    def _stopJob(self, job: Job) -> None:
        """
        Cancel a job's timer and take it out of the queue or the slots.

        @param job: the job.
        """
        if job.timer is not None and job.timer.active():
            job.timer.cancel()
        job.timer = None
        if job in self._running:
            self._running.remove(job)
        elif job in self._waiting:
            self._waiting.remove(job)
        job.phase = "done"

    def _disconnected(self, reason: Failure, job: Job) -> None:
        """
        The client went away before the answer ended: drop the job at once.

        @param reason: why the connection was lost.
        @param job: the job.
        """
        if job.phase == "done":
            return
        self._release(job, "cancelled")
        self._dispatch()

