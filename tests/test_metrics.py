"""
Tests for L{ollamamq.metrics}: the exposition parses with prometheus_client's own parser,
live gauges follow the scheduler and pool, labels stay bounded; and the scheduler's
read-only views the metrics and C{/proxy/queue/me} use.
"""

from __future__ import annotations

from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from ollamamq.backends import OLLAMA, Backend, BackendPool
from ollamamq.config import Config
from ollamamq.metrics import OTHER, Metrics, UserLabels, renderMetrics
from ollamamq.scheduler import Job, Scheduler
from tests.test_requestlog import record

API = frozenset({OLLAMA})


def samples(metrics: Metrics, accept: bytes | None = None) -> dict[tuple, float]:
    """
    Render C{metrics} as C{/metrics} does and parse it back: (name, labels) -> value.
    """
    request = DummyRequest([b"metrics"])
    if accept is not None:
        request.requestHeaders.setRawHeaders(b"accept", [accept])
    text = renderMetrics(metrics.registry, request).decode("utf-8")
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


class Setup:
    """
    A pool with two online backends, a scheduler on a clock, and metrics over them.
    """

    def __init__(self, topUsers: int = 50) -> None:
        self.clock = Clock()
        self.pool = BackendPool()
        self.gpu1 = self.pool.add(Backend(name="gpu1", url="http://gpu1", slots=1))
        self.gpu2 = self.pool.add(Backend(name="gpu2", url="http://gpu2", slots=1))
        self.pool.markOnline(self.gpu1, OLLAMA, ["m", "n"])
        self.pool.markOnline(self.gpu2, OLLAMA, ["m"])
        self.scheduler = Scheduler(self.pool, self.clock, Config())
        self.metrics = Metrics(self.scheduler, self.pool, topUsers=topUsers)

    def enqueue(self, user: str, model: str = "m:latest", requestId: str | None = None) -> Any:
        return self.scheduler.enqueue(Job(user=user, kinds=API, model=model,
                                          requestId=requestId))


class MetricsTests(SynchronousTestCase):
    """
    L{Metrics} and L{renderMetrics}.
    """

    def test_countersAndHistograms(self) -> None:
        """
        Finished requests count by route and code; waits and first bytes land in their
        buckets; tokens count by user, model and kind.
        """
        s = Setup()
        s.metrics.finished(record(queueWait=0.2, firstByte=3.0))
        s.metrics.finished(record(queueWait=7.0, firstByte=0.04, promptTokens=5,
                                  completionTokens=6))
        s.metrics.finished(record(status=502, route="/v1/chat/completions",
                                  promptTokens=None, completionTokens=None))
        found = samples(s.metrics)
        self.assertEqual(found[("ollamamq_requests_total",
                                (("code", "200"), ("route", "/api/chat")))], 2)
        self.assertEqual(found[("ollamamq_requests_total",
                                (("code", "502"), ("route", "/v1/chat/completions")))], 1)
        self.assertEqual(found[("ollamamq_queue_wait_seconds_count", ())], 3)
        self.assertEqual(found[("ollamamq_queue_wait_seconds_bucket", (("le", "0.25"),))], 1)
        self.assertEqual(found[("ollamamq_queue_wait_seconds_bucket", (("le", "0.5"),))], 2)
        self.assertEqual(found[("ollamamq_queue_wait_seconds_bucket", (("le", "10.0"),))], 3)
        self.assertAlmostEqual(found[("ollamamq_queue_wait_seconds_sum", ())], 7.7)
        self.assertEqual(
            found[("ollamamq_time_to_first_byte_seconds_bucket", (("le", "0.05"),))], 1)
        tokens = "ollamamq_tokens_total"
        labels = (("kind", "prompt"), ("model", "llama3:latest"), ("user", "alice"))
        self.assertEqual(found[(tokens, labels)], 15)
        labels = (("kind", "completion"), ("model", "llama3:latest"), ("user", "alice"))
        self.assertEqual(found[(tokens, labels)], 26)
        self.assertEqual(found[("ollamamq_unaccounted_requests_total",
                                (("route", "/v1/chat/completions"),))], 1)

    def test_liveGauges(self) -> None:
        """
        Queue depth per user, backend up/active/slots/queued are read at scrape time.
        """
        s = Setup()
        s.enqueue("alice")
        s.enqueue("alice")
        s.enqueue("bob")
        s.enqueue("carol", model="n:latest")
        found = samples(s.metrics)
        # Two slots, both taken by alice's requests; bob's and carol's wait.
        self.assertEqual(found[("ollamamq_queue_depth", (("user", "bob"),))], 1)
        self.assertEqual(found[("ollamamq_queue_depth", (("user", "carol"),))], 1)
        self.assertNotIn(("ollamamq_queue_depth", (("user", "alice"),)), found)
        self.assertEqual(found[("ollamamq_queued", ())], 2)
        self.assertEqual(found[("ollamamq_active", ())], 2)
        for name in ("gpu1", "gpu2"):
            self.assertEqual(found[("ollamamq_backend_up", (("backend", name),))], 1)
            self.assertEqual(found[("ollamamq_backend_active", (("backend", name),))], 1)
            self.assertEqual(found[("ollamamq_backend_slots", (("backend", name),))], 1)
        # bob's (model m) can go to either; carol's (n) only to gpu1.
        self.assertEqual(found[("ollamamq_backend_queued", (("backend", "gpu1"),))], 2)
        self.assertEqual(found[("ollamamq_backend_queued", (("backend", "gpu2"),))], 1)
        s.pool.markOffline(s.gpu2, "gone")
        found = samples(s.metrics)
        self.assertEqual(found[("ollamamq_backend_up", (("backend", "gpu2"),))], 0)

    def test_queueDepthFolded(self) -> None:
        """
        Beyond C{topUsers}, the users with the fewest queued requests are summed as
        C{other}.
        """
        s = Setup(topUsers=1)
        s.enqueue("x")
        s.enqueue("y")
        for user, n in (("alice", 3), ("bob", 1), ("carol", 1)):
            for _ in range(n):
                s.enqueue(user)
        found = samples(s.metrics)
        depth = {k[1][0][1]: v for k, v in found.items() if k[0] == "ollamamq_queue_depth"}
        self.assertEqual(depth, {"alice": 3, OTHER: 2})

    def test_tokenUsersBounded(self) -> None:
        """
        Token counters name at most C{topUsers} users, the rest count as C{other}.
        """
        s = Setup(topUsers=2)
        for user in ("a", "b", "c", "d"):
            s.metrics.finished(record(user=user, promptTokens=1, completionTokens=1))
        s.metrics.finished(record(user="a", promptTokens=1, completionTokens=1))
        found = samples(s.metrics)
        users = {dict(k[1])["user"]: v for k, v in found.items()
                 if k[0] == "ollamamq_tokens_total" and dict(k[1])["kind"] == "prompt"}
        self.assertEqual(users, {"a": 2, "b": 1, OTHER: 2})

    def test_dispatchesFailoversProbes(self) -> None:
        """
        Dispatches by reason, failovers by backend, probe latencies and failures.
        """
        s = Setup()
        s.metrics.dispatched("gpu1", "loaded")
        s.metrics.dispatched("gpu1", "failover")
        s.metrics.failedOver("gpu2")
        s.metrics.probed("gpu1", 0.02)
        s.metrics.probed("gpu1", None)
        s.gpu1.latency = 0.02
        found = samples(s.metrics)
        self.assertEqual(found[("ollamamq_dispatches_total",
                                (("backend", "gpu1"), ("reason", "failover")))], 1)
        self.assertEqual(found[("ollamamq_failovers_total", (("backend", "gpu2"),))], 1)
        self.assertEqual(found[("ollamamq_backend_probe_seconds_count",
                                (("backend", "gpu1"),))], 1)
        self.assertEqual(found[("ollamamq_backend_probe_failures_total",
                                (("backend", "gpu1"),))], 1)
        self.assertEqual(found[("ollamamq_backend_probe_latency_seconds",
                                (("backend", "gpu1"),))], 0.02)

    def test_processMetrics(self) -> None:
        """
        The process collector is included (on Linux it reads /proc).
        """
        found = samples(Setup().metrics)
        self.assertIn(("process_cpu_seconds_total", ()), found)
        self.assertIn(("python_gc_collections_total", (("generation", "0"),)), found)

    def test_openMetrics(self) -> None:
        """
        A scraper asking for OpenMetrics gets that format.
        """
        request = DummyRequest([b"metrics"])
        request.requestHeaders.setRawHeaders(
            b"accept", [b"application/openmetrics-text; version=1.0.0"])
        body = renderMetrics(Setup().metrics.registry, request)
        self.assertTrue(body.endswith(b"# EOF\n"))
        self.assertIn(b"openmetrics", request.responseHeaders.getRawHeaders(b"content-type")[0])

    def test_ownRegistry(self) -> None:
        """
        Two daemons' metrics do not share a registry.
        """
        a, b = Setup().metrics, Setup().metrics
        a.finished(record())
        self.assertNotIn(("ollamamq_requests_total", (("code", "200"), ("route", "/api/chat"))),
                         samples(b))


class UserLabelsTests(SynchronousTestCase):
    """
    L{UserLabels} admits the first users and keeps them.
    """

    def test_sticky(self) -> None:
        """
        A user keeps its label; newcomers beyond the limit are C{other}.
        """
        labels = UserLabels(1)
        self.assertEqual([labels.label(u) for u in ("a", "b", "a")], ["a", OTHER, "a"])


class SchedulerViewTests(SynchronousTestCase):
    """
    L{Scheduler.queuedFor} tells a user where its requests stand.
    """

    def test_positions(self) -> None:
        """
        With both slots busy, the next requests of two users alternate: alice's second
        request waits behind bob's first (equal counters: bob was served less).
        """
        s = Setup()
        s.enqueue("alice", requestId="a1")
        s.enqueue("alice", requestId="a2")
        s.enqueue("alice", requestId="a3")
        s.enqueue("alice", requestId="a4")
        self.assertEqual([e["position"] for e in s.scheduler.queuedFor("alice")], [1, 2])
        s.enqueue("bob", requestId="b1")
        mine = s.scheduler.queuedFor("alice")
        self.assertEqual([(e["id"], e["position"]) for e in mine],
                         [("a3", 2), ("a4", 3)])
        self.assertEqual(s.scheduler.queuedFor("bob")[0]["position"], 1)
        self.assertEqual(s.scheduler.queuedFor("nobody"), [])

    def test_estimatedStart(self) -> None:
        """
        The estimated start is the turns ahead over the slots, times the mean lease.
        """
        s = Setup()
        for i in range(5):
            s.enqueue("alice", requestId=f"a{i}")
        positions = [(e["position"], e["estimated_start"]) for e in s.scheduler.queuedFor("alice")]
        # Two slots, no lease finished yet: one second each.
        self.assertEqual(positions, [(1, 0.0), (2, 0.0), (3, 1.0)])
