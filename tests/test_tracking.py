"""
Tests for L{ollamamq.tracking} through the whole proxy in memory (L{tests.test_api.Proxy}):
the queueing headers on every proxied response, one record per request whose token counts
equal the simulator's, failovers and cancellations recorded as such, and an OpenAI stream
accounted without the client seeing the usage event it did not ask for.
"""

from __future__ import annotations

import json
from typing import Any

import treq
from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import SynchronousTestCase

from ollamamq.metrics import Metrics
from ollamamq.requestlog import RequestLog, RequestRecord
from ollamamq.tracking import Observer
from tests.test_api import CHAT, Proxy, sim
from tests.test_requestlog import InlineStore


class RecordingObserver(Observer):
    """
    An observer that also keeps every record it reports.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.records: list[RequestRecord] = []

    def report(self, record: RequestRecord) -> None:
        self.records.append(record)
        super().report(record)


class TeeAgent:
    """
    An agent that keeps a copy of every response body it delivers, as the backend sent it.
    """

    def __init__(self, agent: Any) -> None:
        self.agent = agent
        self.bodies: list[list[bytes]] = []
        self.sent: list[bytes] = []

    def request(self, method: bytes, uri: bytes, headers: Any = None,
                bodyProducer: Any = None) -> Any:
        if bodyProducer is not None:
            self.sent.append(bodyProducer._body)
        chunks: list[bytes] = []
        self.bodies.append(chunks)

        def wrap(response: Any) -> Any:
            deliver = response.deliverBody

            def deliverBody(protocol: Any) -> None:
                received = protocol.dataReceived

                def dataReceived(data: bytes) -> None:
                    chunks.append(data)
                    received(data)

                protocol.dataReceived = dataReceived
                deliver(protocol)

            response.deliverBody = deliverBody
            return response

        return self.agent.request(method, uri, headers, bodyProducer).addCallback(wrap)


def trackedProxy(test: SynchronousTestCase, sims: dict | None = None, **config: Any) -> Proxy:
    """
    An in-memory proxy whose requests are observed, with metrics and a request log.
    """
    proxy = Proxy(test, sims or {"gpu1": sim(name="gpu1")}, **config)
    proxy.metrics = Metrics(proxy.scheduler, proxy.pool, processMetrics=False)
    proxy.store = InlineStore()
    proxy.requestLog = RequestLog(proxy.store.runInteraction, proxy.clock)
    proxy.observer = RecordingObserver(proxy.clock, proxy.metrics, proxy.requestLog,
                                       wallClock=lambda: 1_800_000_000.0)
    proxy.forwarder.observer = proxy.observer
    proxy.api.metrics = proxy.metrics
    proxy.tee = TeeAgent(proxy.relay.agent)
    proxy.relay.agent = proxy.tee
    return proxy


def simCounts(proxy: Proxy, name: str = "gpu1") -> list[tuple[int, int]]:
    """
    (prompt, completion) tokens of each request the simulator logged, oldest first.
    """
    return [(e["promptTokens"], e["tokens"]) for e in proxy.sims[name].stats["log"]]


class HeaderTests(SynchronousTestCase):
    """
    Every proxied response says which request it was, where it ran and how long it waited.
    """

    def test_headers(self) -> None:
        """
        Request id, backend name and queue wait in milliseconds; the id is the record's.
        """
        proxy = trackedProxy(self)
        first = proxy.request("POST", "/api/chat", dict(CHAT, stream=True), {"X-User-ID": "a"})
        second = proxy.request("POST", "/api/chat", dict(CHAT, stream=True), {"X-User-ID": "b"})
        proxy.advance(30, steps=300)
        responses = [self.successResultOf(d) for d in (first, second)]
        for response in responses:
            self.successResultOf(treq.content(response))
        headers = responses[1].headers
        self.assertEqual(headers.getRawHeaders(b"x-ollamamq-backend"), [b"gpu1"])
        wait = int(headers.getRawHeaders(b"x-ollamamq-queue-wait-ms")[0])
        # One slot: the second waited for the first (5 tokens at 10 per second).
        self.assertGreater(wait, 400)
        ids = [r.requestId for r in proxy.observer.records]
        self.assertEqual(headers.getRawHeaders(b"x-ollamamq-request-id"), [ids[1].encode()])
        self.assertEqual(len(set(ids)), 2)

    def test_refusedCarriesId(self) -> None:
        """
        A request refused before any backend still carries its id, and is recorded with
        the status it got.
        """
        proxy = trackedProxy(self, maxQueuedPerUser=1)
        body = dict(CHAT, stream=True)
        proxy.request("POST", "/api/chat", body, {"X-User-ID": "a"})
        proxy.request("POST", "/api/chat", body, {"X-User-ID": "a"})
        response, _ = proxy.complete("POST", "/api/chat", body, {"X-User-ID": "a"},
                                     seconds=0.01)
        self.assertEqual(response.code, 429)
        self.assertEqual(len(response.headers.getRawHeaders(b"x-ollamamq-request-id")), 1)
        refused = [r for r in proxy.observer.records if r.status == 429]
        self.assertEqual(len(refused), 1)
        self.assertIsNone(refused[0].backend)
        proxy.advance(30, steps=300)


class AccountingTests(SynchronousTestCase):
    """
    The proxy's token counts equal the simulator's, for each API and mode.
    """

    def test_ollama(self) -> None:
        """
        Ollama streaming chat, non-streamed generate and an embedding.
        """
        proxy = trackedProxy(self)
        proxy.complete("POST", "/api/chat", dict(CHAT, stream=True), {"X-User-ID": "a"})
        proxy.complete("POST", "/api/generate",
                       {"model": "llama3", "prompt": "one two three", "stream": False})
        proxy.complete("POST", "/api/embed", {"model": "nomic-embed-text", "input": ["a b"]})
        records = proxy.observer.records
        self.assertEqual([(r.promptTokens, r.completionTokens) for r in records],
                         simCounts(proxy))
        self.assertTrue(all(r.status == 200 and r.bytes > 0 for r in records))
        self.assertEqual(records[0].route, "/api/chat")
        self.assertEqual(records[0].model, "llama3:latest")

    def test_accountedEvent(self) -> None:
        """
        A finished request whose counts are known is announced on the control plane's
        event stream (consoles show token rates from it); one without counts is not.
        """
        proxy = trackedProxy(self)
        events: list = []
        proxy.observer.publish = lambda name, payload: events.append((name, payload))
        proxy.complete("POST", "/api/generate",
                       {"model": "llama3", "prompt": "one two", "stream": False},
                       {"X-User-ID": "a"})
        [(name, payload)] = events
        record = proxy.observer.records[0]
        self.assertEqual(name, "request.accounted")
        self.assertEqual(payload, {"id": record.requestId, "user": "a",
                                   "model": "llama3:latest",
                                   "tokens": {"prompt": record.promptTokens,
                                              "completion": record.completionTokens}})

    def test_openai(self) -> None:
        """
        OpenAI non-streamed and streamed with and without C{include_usage}.
        """
        proxy = trackedProxy(self)
        proxy.complete("POST", "/v1/chat/completions", CHAT)
        proxy.complete("POST", "/v1/chat/completions",
                       dict(CHAT, stream=True, stream_options={"include_usage": True}))
        proxy.complete("POST", "/v1/chat/completions", dict(CHAT, stream=True))
        proxy.complete("POST", "/v1/completions", {"model": "llama3", "prompt": "hi there",
                                                   "stream": True})
        proxy.complete("POST", "/v1/embeddings", {"model": "nomic-embed-text", "input": "x"})
        self.assertEqual(
            [(r.promptTokens, r.completionTokens) for r in proxy.observer.records],
            simCounts(proxy))

    def test_streamWithoutIncludeUsage(self) -> None:
        """
        A client that did not ask for usage gets exactly what the backend sent less the
        one usage event; the backend was asked for it, and the request is accounted.
        """
        proxy = trackedProxy(self)
        response, body = proxy.complete("POST", "/v1/chat/completions", dict(CHAT, stream=True))
        self.assertEqual(response.code, 200)
        sent = json.loads(proxy.tee.sent[-1])
        self.assertEqual(sent["stream_options"], {"include_usage": True})
        backendBytes = b"".join(proxy.tee.bodies[-1])
        events = backendBytes.split(b"\n\n")
        usage = [e for e in events if b'"prompt_tokens"' in e]
        self.assertEqual(len(usage), 1)
        self.assertEqual(body, backendBytes.replace(usage[0] + b"\n\n", b""))
        self.assertNotIn(b"prompt_tokens", body)
        record = proxy.observer.records[-1]
        self.assertEqual((record.promptTokens, record.completionTokens), simCounts(proxy)[-1])

    def test_clientAskedForUsage(self) -> None:
        """
        A client that asked for usage gets the backend's bytes untouched, usage included.
        """
        proxy = trackedProxy(self)
        _, body = proxy.complete("POST", "/v1/chat/completions",
                                 dict(CHAT, stream=True, stream_options={"include_usage": True}))
        self.assertEqual(body, b"".join(proxy.tee.bodies[-1]))
        self.assertIn(b'"prompt_tokens"', body)

    def test_unknownCounts(self) -> None:
        """
        An answer without counts is recorded with its bytes and unknown tokens.
        """
        proxy = trackedProxy(self, allowAllRoutes=True)
        response, body = proxy.complete("GET", "/api/version/anything")
        record = proxy.observer.records[-1]
        self.assertIsNone(record.promptTokens)
        self.assertEqual(record.bytes, len(body))

    def test_metricsAfterRequests(self) -> None:
        """
        After N requests through the simulator, the exposition parses and counters,
        histograms and token totals hold the expected values.
        """
        proxy = trackedProxy(self)
        n = 4
        for i in range(n):
            proxy.complete("POST", "/api/chat", dict(CHAT, stream=True),
                           {"X-User-ID": f"user{i % 2}"})
        _, text = proxy.complete("GET", "/metrics")
        found = {}
        for family in text_string_to_metric_families(text.decode()):
            for s in family.samples:
                found[(s.name, tuple(sorted(s.labels.items())))] = s.value
        self.assertEqual(found[("ollamamq_requests_total",
                                (("code", "200"), ("route", "/api/chat")))], n)
        self.assertEqual(found[("ollamamq_queue_wait_seconds_count", ())], n)
        self.assertEqual(found[("ollamamq_time_to_first_byte_seconds_count", ())], n)
        counts = simCounts(proxy)
        for i in range(2):
            mine = [c for j, c in enumerate(counts) if j % 2 == i]
            for kind, index in (("prompt", 0), ("completion", 1)):
                key = ("ollamamq_tokens_total", (("kind", kind), ("model", "llama3:latest"),
                                                 ("user", f"user{i}")))
                self.assertEqual(found[key], sum(c[index] for c in mine))
        self.assertEqual(found[("ollamamq_dispatches_total",
                                (("backend", "gpu1"), ("reason", "cold")))]
                         + found.get(("ollamamq_dispatches_total",
                                      (("backend", "gpu1"), ("reason", "loaded"))), 0), n)
        self.assertEqual(found[("ollamamq_backend_up", (("backend", "gpu1"),))], 1)


class OutcomeTests(SynchronousTestCase):
    """
    Cancelled and failed-over requests are recorded as such.
    """

    def test_failover(self) -> None:
        """
        A request whose first backend refuses is recorded with one failover, on the
        backend that answered; the metrics count the failover and its dispatch.
        """
        proxy = trackedProxy(self, {"gpu1": sim(name="gpu1"), "gpu2": sim(name="gpu2")})
        proxy.relayAgent.refused.add(b"gpu1")
        proxy.complete("POST", "/api/chat", dict(CHAT, stream=True))
        proxy.complete("POST", "/api/chat", dict(CHAT, stream=True))
        failed = [r for r in proxy.observer.records if r.failovers]
        self.assertEqual(len(failed), 1)
        self.assertEqual((failed[0].backend, failed[0].status), ("gpu2", 200))
        self.assertEqual(proxy.metrics.failovers.labels("gpu1")._value.get(), 1)
        self.assertEqual(proxy.metrics.dispatches.labels("gpu2", "failover")._value.get(), 1)

    def test_cancelledWhileQueued(self) -> None:
        """
        A client that leaves while queued is recorded as cancelled, with no backend.
        """
        proxy = trackedProxy(self)
        proxy.request("POST", "/api/chat", dict(CHAT, stream=True), {"X-User-ID": "a"})
        queued = proxy.request("POST", "/api/chat", dict(CHAT, stream=True), {"X-User-ID": "b"})
        queued.cancel()
        proxy.advance(30, steps=300)
        self.failureResultOf(queued)
        [cancelled] = [r for r in proxy.observer.records if r.cancelled]
        self.assertEqual((cancelled.user, cancelled.backend, cancelled.status),
                         ("b", None, 499))

    def test_cancelledMidStream(self) -> None:
        """
        A client that leaves mid-stream is recorded as cancelled on its backend.
        """
        proxy = trackedProxy(self)
        d = proxy.request("POST", "/api/chat", dict(CHAT, stream=True, options={"num_predict": 50}))
        proxy.advance(1, steps=10)
        response = self.successResultOf(d)
        got: list[bytes] = []

        def collect(data: bytes) -> None:
            got.append(data)
            if len(got) == 2:
                raise ConnectionAbortedError("client hung up")

        lost: list[Any] = []
        treq.collect(response, collect).addErrback(lost.append)
        proxy.advance(10, steps=100)
        self.assertEqual(len(lost), 1)
        [record] = proxy.observer.records
        self.assertTrue(record.cancelled)
        self.assertEqual(record.backend, "gpu1")
