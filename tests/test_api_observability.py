"""
Tests for the observability routes of L{ollamamq.api}: C{/metrics}, C{/proxy/usage},
C{/proxy/queue/me}, the status page and the tokens in C{/proxy/status}; the whole proxy
in memory (see L{tests.test_api.Proxy}).
"""

from __future__ import annotations

import json
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import SynchronousTestCase

from ollamamq.metrics import Metrics
from ollamamq.requestlog import RequestLog
from ollamamq.tracking import Observer
from tests.test_api import CHAT, Proxy, sim
from tests.test_requestlog import InlineStore, record


def observedProxy(test: SynchronousTestCase, **config: Any) -> Proxy:
    """
    An in-memory proxy with metrics and a request log on an in-memory database.
    """
    proxy = Proxy(test, {"gpu1": sim(name="gpu1")}, **config)
    proxy.store = InlineStore()
    proxy.metrics = Metrics(proxy.scheduler, proxy.pool)
    proxy.requestLog = RequestLog(proxy.store.runInteraction, proxy.clock)
    proxy.api.metrics = proxy.metrics
    proxy.api.runQuery = proxy.store.runInteraction
    proxy.api.requestLog = proxy.requestLog
    proxy.forwarder.observer = Observer(proxy.clock, proxy.metrics, proxy.requestLog,
                                  wallClock=lambda: 1_800_000_000.0)
    return proxy


class MetricsRouteTests(SynchronousTestCase):
    """
    C{GET /metrics}.
    """

    def test_public(self) -> None:
        """
        By default anyone may scrape; the answer parses as Prometheus text.
        """
        proxy = observedProxy(self, adminKey="secret")
        response, body = proxy.complete("GET", "/metrics")
        self.assertEqual(response.code, 200)
        self.assertTrue(response.headers.getRawHeaders(b"content-type")[0].startswith(
            b"text/plain"))
        names = {f.name for f in text_string_to_metric_families(body.decode())}
        self.assertTrue({"ollamamq_requests", "ollamamq_backend_up",
                         "ollamamq_queue_wait_seconds"} <= names, names)

    def test_private(self) -> None:
        """
        With C{metrics_public = false} the admin key is needed.
        """
        proxy = observedProxy(self, adminKey="secret", metricsPublic=False)
        response, body = proxy.complete("GET", "/metrics")
        self.assertIn(response.code, (401, 403))
        self.assertIn("error", json.loads(body))
        response, _ = proxy.complete("GET", "/metrics", headers={"X-Admin-Key": "secret"})
        self.assertEqual(response.code, 200)


class UsageRouteTests(SynchronousTestCase):
    """
    C{GET /proxy/usage}.
    """

    def setUp(self) -> None:
        self.proxy = observedProxy(self, adminKey="secret")
        for user, tokens in (("alice", 10), ("alice", 5), ("bob", 1)):
            self.proxy.requestLog.add(record(user=user, promptTokens=tokens,
                                             completionTokens=tokens, time=1_700_000_000))
        self.admin = {"X-Admin-Key": "secret"}

    def get(self, query: str, headers: dict | None = None) -> tuple[int, Any]:
        response, body = self.proxy.complete("GET", "/proxy/usage" + query,
                                             headers=self.admin if headers is None else headers)
        return response.code, json.loads(body)

    def test_totals(self) -> None:
        """
        Totals per user, including rows not yet written in a batch.
        """
        code, answer = self.get("?group=user")
        self.assertEqual(code, 200)
        totals = {r["user"]: (r["requests"], r["prompt_tokens"]) for r in answer["totals"]}
        self.assertEqual(totals, {"alice": (2, 15), "bob": (1, 1)})

    def test_filters(self) -> None:
        """
        C{since}, C{until} as ISO dates or seconds, C{user}, C{model}, C{group}.
        """
        code, answer = self.get("?since=2023-11-14&until=1700000001&user=bob&group=model")
        self.assertEqual((code, [r["requests"] for r in answer["totals"]]), (200, [1]))
        self.assertEqual(answer["totals"][0]["model"], "llama3:latest")
        code, answer = self.get("?since=2030-01-01")
        self.assertEqual((code, answer["totals"]), (200, []))

    def test_adminOnly(self) -> None:
        """
        Without the admin key: refused, shaped.
        """
        code, answer = self.get("", headers={})
        self.assertIn(code, (401, 403))
        self.assertIn("error", answer)

    def test_badParameters(self) -> None:
        """
        An unknown group, a bad time or an unknown parameter: 400 naming it.
        """
        for query, word in (("?group=planet", "group"), ("?since=yesterday", "since"),
                            ("?colour=red", "colour")):
            code, answer = self.get(query)
            self.assertEqual(code, 400, query)
            self.assertIn(word, answer["error"])


class QueueMeTests(SynchronousTestCase):
    """
    C{GET /proxy/queue/me}.
    """

    def test_ownOnly(self) -> None:
        """
        A caller sees its own queued requests with positions, never another user's.
        """
        proxy = observedProxy(self)
        body = dict(CHAT, stream=True)
        for user in ("alice", "bob", "alice"):
            proxy.request("POST", "/api/chat", body, {"X-User-ID": user})
        # gpu1 has one slot: alice's first runs, bob's and alice's second wait.
        response, raw = proxy.complete("GET", "/proxy/queue/me",
                                       headers={"X-User-ID": "alice"}, seconds=0.01)
        answer = json.loads(raw)
        self.assertEqual(answer["user"], "alice")
        self.assertEqual([r["position"] for r in answer["requests"]], [2])
        self.assertEqual(answer["requests"][0]["model"], "llama3:latest")
        response, raw = proxy.complete("GET", "/proxy/queue/me",
                                       headers={"X-User-ID": "carol"}, seconds=0.01)
        self.assertEqual(json.loads(raw), {"user": "carol", "requests": []})
        proxy.advance(30, steps=300)


class StatusTokensTests(SynchronousTestCase):
    """
    C{/proxy/status} shows each user's tokens.
    """

    def test_tokens(self) -> None:
        """
        Users with accounted requests carry their token totals (here one recorded
        directly and one request through the simulator).
        """
        proxy = observedProxy(self)
        proxy.metrics.finished(record(user="alice", promptTokens=3, completionTokens=4))
        proxy.complete("POST", "/api/chat", CHAT, {"X-User-ID": "alice"})
        _, body = proxy.complete("GET", "/proxy/status")
        [alice] = [u for u in json.loads(body)["users"] if u["id"] == "alice"]
        [(prompt, completion)] = [(e["promptTokens"], e["tokens"])
                                  for e in proxy.sims["gpu1"].stats["log"]]
        self.assertEqual(alice["tokens"], {"prompt": 3 + prompt, "completion": 4 + completion})
