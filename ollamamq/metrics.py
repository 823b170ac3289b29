# -*- test-case-name: tests.test_metrics -*-
"""
Prometheus metrics: counters and histograms updated once per finished request, gauges
read from the scheduler and the backend pool at scrape time, and the C{/metrics}
resource.

Everything lives in a L{CollectorRegistry} of the daemon's own (never the global one), and
is rendered on the reactor thread: the state the live gauges read is only ever touched
there. (C{prometheus_client.twisted.MetricsResource} renders on a thread pool, a race with
the reactor.)

Label cardinality is bounded: the first C{topUsers} users that send traffic get a C{user}
label of their own for the life of the process, the rest are counted as C{other}. Sticky
labels keep counters monotonic (a user moving in and out of a live top-N would make both
its series and C{other} jump); the queue-depth gauge, which may go up and down, shows the
C{topUsers} users with the most queued requests now and folds the rest into C{other}.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.gc_collector import GCCollector
from prometheus_client.registry import Collector
from twisted.web.iweb import IRequest

from ollamamq.backends import BackendPool

OTHER = "other"

# Routes with a label of their own; any other path (with --allow-all-routes) is "other".
ROUTE_LABELS = frozenset({
    "/api/generate", "/api/chat", "/api/embed", "/api/embeddings", "/v1/chat/completions",
    "/v1/completions", "/v1/embeddings", "/v1/messages", "/api/show",
})

# Users whose token totals /proxy/status shows (the most recently active).
USER_TOKENS_KEPT = 10_000

# Seconds. Queue waits range from nothing to many minutes on a busy box; the first byte
# includes a model load (tens of seconds) or a whole non-streamed generation.
WAIT_BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
FIRST_BYTE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
PROBE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class UserLabels:
    """
    Maps user ids to bounded label values: the first C{limit} users seen keep their id,
    every later one is L{OTHER}.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._named: set[str] = set()

    def label(self, user: str) -> str:
        """
        The label value for C{user}, admitting it while there is room.
        """
        if user in self._named:
            return user
        if len(self._named) < self._limit:
            self._named.add(user)
            return user
        return OTHER


class _LiveCollector(Collector):
    """
    Gauges read from the scheduler and the pool when scraped.
    """

    def __init__(self, scheduler: Any, pool: BackendPool, topUsers: int) -> None:
        self._scheduler = scheduler
        self._pool = pool
        self._topUsers = topUsers

    def collect(self) -> Iterable[Metric]:
        """
        The live gauges (see README.rst for their meaning).
        """
        depth = GaugeMetricFamily(
            "ollamamq_queue_depth", "Requests waiting for a slot, per user.", labels=["user"]
        )
        users = [u for u in self._scheduler.snapshot() if u["queued"]]
        users.sort(key=lambda u: (-u["queued"], u["id"]))
        for entry in users[: self._topUsers]:
            depth.add_metric([entry["id"]], entry["queued"])
        rest = sum(u["queued"] for u in users[self._topUsers:])
        if rest or len(users) > self._topUsers:
            depth.add_metric([OTHER], rest)
        yield depth

        total = GaugeMetricFamily("ollamamq_queued", "Requests waiting for a slot.")
        total.add_metric([], self._scheduler.queued)
        yield total
        running = GaugeMetricFamily("ollamamq_active", "Requests running on backends.")
        running.add_metric([], self._scheduler.active)
        yield running

        up = GaugeMetricFamily("ollamamq_backend_up",
                               "1 when the backend's last probe or request found it working.",
                               labels=["backend"])
        active = GaugeMetricFamily("ollamamq_backend_active",
                                   "Requests running on the backend.", labels=["backend"])
        slots = GaugeMetricFamily("ollamamq_backend_slots",
                                  "Requests the backend may run at once.", labels=["backend"])
        queued = GaugeMetricFamily(
            "ollamamq_backend_queued",
            "Queued requests the backend could serve (a request several backends serve "
            "counts for each).",
            labels=["backend"],
        )
        draining = GaugeMetricFamily("ollamamq_backend_draining",
                                     "1 while the backend takes no new requests.",
                                     labels=["backend"])
        latency = GaugeMetricFamily("ollamamq_backend_probe_latency_seconds",
                                    "Response time of the backend's last successful probe.",
                                    labels=["backend"])
        perBackend = self._scheduler.queuedByBackend()
        for backend in self._pool.backends:
            name = [backend.name]
            up.add_metric(name, 1 if backend.online else 0)
            active.add_metric(name, backend.active)
            slots.add_metric(name, backend.slots)
            queued.add_metric(name, perBackend.get(backend.name, 0))
            draining.add_metric(name, 1 if backend.draining else 0)
            if backend.latency is not None:
                latency.add_metric(name, backend.latency)
        yield from (up, active, slots, queued, draining, latency)


class Metrics:
    """
    The daemon's metrics.

    @ivar registry: what C{/metrics} exposes.
    """

    def __init__(self, scheduler: Any, pool: BackendPool, topUsers: int = 50,
                 processMetrics: bool = True) -> None:
        """
        @param scheduler: read at scrape time (C{snapshot}, C{queued}, C{active},
            C{queuedByBackend}).
        @param pool: read at scrape time.
        @param topUsers: how many users get a label of their own.
        @param processMetrics: include the process (CPU, memory, file descriptors), Python
            platform and garbage-collector collectors.
        """
        registry = self.registry = CollectorRegistry()
        self.users = UserLabels(topUsers)
        self.requests = Counter(
            "ollamamq_requests", "Finished proxied requests, by route and HTTP status.",
            ["route", "code"], registry=registry)
        self.queueWait = Histogram(
            "ollamamq_queue_wait_seconds", "Time requests spent queued before a slot.",
            buckets=WAIT_BUCKETS, registry=registry)
        self.firstByte = Histogram(
            "ollamamq_time_to_first_byte_seconds",
            "Time from a slot being granted to the backend's first body byte.",
            buckets=FIRST_BYTE_BUCKETS, registry=registry)
        self.duration = Histogram(
            "ollamamq_request_duration_seconds",
            "Time from arrival to the answer's end (queue wait included).",
            buckets=DURATION_BUCKETS, registry=registry)
        self.tokens = Counter(
            "ollamamq_tokens", "Tokens the backends reported, by user, model and kind "
            "(prompt | completion).", ["user", "model", "kind"], registry=registry)
        self.unaccounted = Counter(
            "ollamamq_unaccounted_requests",
            "Finished requests whose backend reported no token counts.", ["route"],
            registry=registry)
        self.bytes = Counter(
            "ollamamq_response_bytes", "Body bytes relayed from backends.", ["backend"],
            registry=registry)
        self.dispatches = Counter(
            "ollamamq_dispatches",
            "Requests started on a backend, by reason: loaded (the model was in memory), "
            "cold (it was not), any (no model named), failover (after another backend "
            "failed).", ["backend", "reason"], registry=registry)
        self.failovers = Counter(
            "ollamamq_failovers", "Requests moved off a backend that failed before "
            "answering, by that backend.", ["backend"], registry=registry)
        self.cancelled = Counter(
            "ollamamq_cancelled_requests", "Requests whose client went away, by route.",
            ["route"], registry=registry)
        self.probes = Histogram(
            "ollamamq_backend_probe_seconds", "Health probe response times, by backend.",
            ["backend"], buckets=PROBE_BUCKETS, registry=registry)
        self.probeFailures = Counter(
            "ollamamq_backend_probe_failures", "Health probes that failed, by backend.",
            ["backend"], registry=registry)
        registry.register(_LiveCollector(scheduler, pool, topUsers))
        if processMetrics:
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
            GCCollector(registry=registry)
        # Tokens per user since start, for /proxy/status (not labels: not bounded by
        # topUsers, but by USER_TOKENS_KEPT).
        self.userTokens: dict[str, list[int]] = {}
        self._children: dict[tuple, Any] = {}

    def dispatched(self, backend: str, reason: str) -> None:
        """
        A request was started on C{backend}.
        """
        self.dispatches.labels(backend, reason).inc()

    def failedOver(self, backend: str) -> None:
        """
        A request left C{backend}, which failed before answering.
        """
        self.failovers.labels(backend).inc()

    def probed(self, backend: str, seconds: float | None) -> None:
        """
        A health probe of C{backend} answered in C{seconds}, or failed (L{None}).
        """
        if seconds is None:
            self.probeFailures.labels(backend).inc()
        else:
            self.probes.labels(backend).observe(seconds)

    def finished(self, record: Any) -> None:
        """
        Account one finished request (a L{ollamamq.requestlog.RequestRecord}).
        """
        route = record.route if record.route in ROUTE_LABELS else OTHER
        self._child(self.requests, route, str(record.status)).inc()
        if record.queueWait is not None:
            self.queueWait.observe(record.queueWait)
        if record.firstByte is not None:
            self.firstByte.observe(record.firstByte)
        self.duration.observe(record.duration)
        if record.cancelled:
            self.cancelled.labels(route).inc()
        if record.backend is not None:
            self._child(self.bytes, record.backend).inc(record.bytes)
        if record.promptTokens is None:
            if record.backend is not None:
                self.unaccounted.labels(route).inc()
            return
        tokens = self.userTokens.pop(record.user, None) or [0, 0]
        tokens[0] += record.promptTokens
        tokens[1] += record.completionTokens or 0
        # Re-inserted last: the least recently active user is the first to be dropped.
        self.userTokens[record.user] = tokens
        if len(self.userTokens) > USER_TOKENS_KEPT:
            del self.userTokens[next(iter(self.userTokens))]
        user = self.users.label(record.user)
        model = record.model or ""
        self._child(self.tokens, user, model, "prompt").inc(record.promptTokens)
        self._child(self.tokens, user, model, "completion").inc(record.completionTokens or 0)


    def _child(self, metric: Any, *labels: str) -> Any:
        """
        C{metric.labels(*labels)}, looked up once: prometheus_client takes a lock and
        builds a key on every C{labels} call, which is most of a request's metrics cost.
        """
        key = (metric, labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def addTokens(self, users: list[dict]) -> None:
        """
        Add C{"tokens": {"prompt", "completion"}} to the C{/proxy/status} entries of
        users that have used any since the daemon started.
        """
        for entry in users:
            tokens = self.userTokens.get(entry["id"])
            if tokens is not None:
                entry["tokens"] = {"prompt": tokens[0], "completion": tokens[1]}


def renderMetrics(registry: CollectorRegistry, request: IRequest) -> bytes:
    """
    The registry in the text format the scraper asks for (Prometheus or OpenMetrics, by
    C{Accept}), with its content type set on C{request}; runs on the calling (reactor)
    thread.
    """
    accept = (request.getHeader(b"accept") or b"").decode("latin-1")
    encoder, contentType = choose_encoder(accept)
    request.setHeader(b"content-type", contentType.encode("ascii"))
    return encoder(registry)
