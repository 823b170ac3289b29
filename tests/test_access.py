# -*- test-case-name: tests.test_access -*-
"""
Tests for L{ollamamq.access}, and the security rules of the proxy as a whole: the whole
proxy in memory (the harness of L{tests.test_api}) behind the L{AccessGate}, simulated
backends that record the headers they saw.
"""

from __future__ import annotations

import json
from typing import Any

import treq
from treq.testing import StubTreq
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource

from ollamamq.access import AccessGate
from ollamamq.config import UserConfig
from ollamamq.limits import RateLimiter
from tests.test_api import CHAT, Proxy, sim

ANTHROPIC_CHAT = {"model": "llama3", "max_tokens": 20,
                  "messages": [{"role": "user", "content": "hello"}]}

# One request per dialect: (path, body).
DIALECTS = {
    "ollama": ("/api/chat", CHAT),
    "openai": ("/v1/chat/completions", CHAT),
    "anthropic": ("/v1/messages", ANTHROPIC_CHAT),
}


class Recorder(Resource):
    """
    Records the path and headers of every request to the resource it wraps.
    """

    isLeaf = True

    def __init__(self, inner: Any) -> None:
        super().__init__()
        self.inner = inner
        self.seen: list[tuple[str, dict[str, list[str]]]] = []

    def render(self, request: Any) -> Any:
        self.seen.append((
            request.path.decode(),
            {k.decode().lower(): [v.decode() for v in vs]
             for k, vs in request.requestHeaders.getAllRawHeaders()},
        ))
        return self.inner.render(request)


class GatedProxy(Proxy):
    """
    The in-memory proxy behind an L{AccessGate}, each backend behind a L{Recorder}.
    """

    def __init__(self, test: SynchronousTestCase, **configFields: Any) -> None:
        configFields.setdefault("users", {
            "alice": UserConfig(keys=("sk-alice",)),
            "bob": UserConfig(keys=("sk-bob",)),
        })
        configFields.setdefault("adminKey", "admin-secret")
        self.recorders: dict[str, Recorder] = {}
        super().__init__(test, {"gpu1": sim(name="gpu1", slots=4)}, **configFields)

    def probe(self) -> None:
        if not self.recorders:
            # First call, from the constructor: put the recorders in front of the sims.
            for name, resource in list(self.router.resources.items()):
                self.recorders[name] = Recorder(resource)
                self.router.resources[name] = self.recorders[name]
            self.limiter = RateLimiter(self.clock, self.config)
            self.client = StubTreq(AccessGate(self.api.resource(), self.api.identity,
                                              self.limiter))
        super().probe()

    def backendSaw(self, path: str) -> list[dict[str, list[str]]]:
        """
        The headers of the requests the backend got on C{path}.
        """
        return [h for p, h in self.recorders["gpu1"].seen if p == path]


class AuthRequiredTests(SynchronousTestCase):
    """
    C{auth = "required"}: shaped 401s in each dialect, keys in each form.
    """

    def setUp(self) -> None:
        self.proxy = GatedProxy(self, auth="required")

    def test_missingKey401(self) -> None:
        """
        Without a key every dialect answers 401 in its own shape, with
        C{WWW-Authenticate: Bearer}; the backend never sees the request.
        """
        for family, (path, body) in DIALECTS.items():
            response, content = self.proxy.complete("POST", path, body)
            self.assertEqual(response.code, 401, family)
            self.assertEqual(response.headers.getRawHeaders("www-authenticate"),
                             ['Bearer realm="ollamamq"'])
            payload = json.loads(content)
            if family == "ollama":
                self.assertIn("API key is required", payload["error"])
            elif family == "openai":
                self.assertEqual(payload["error"]["type"], "authentication_error")
                self.assertEqual(payload["error"]["code"], "missing_api_key")
            else:
                self.assertEqual(payload["type"], "error")
                self.assertEqual(payload["error"]["type"], "authentication_error")
            self.assertEqual(self.proxy.backendSaw(path), [])

    def test_wrongKeyAndHeaderOnly(self) -> None:
        """
        An unknown key is 401 C{invalid_api_key}; C{X-User-ID} alone is no credential.
        """
        response, content = self.proxy.complete(
            "POST", "/v1/chat/completions", CHAT, {"Authorization": "Bearer sk-guess"})
        self.assertEqual(response.code, 401)
        self.assertEqual(json.loads(content)["error"]["code"], "invalid_api_key")
        response, _ = self.proxy.complete("POST", "/api/chat", CHAT, {"X-User-ID": "alice"})
        self.assertEqual(response.code, 401)

    def test_keyForms(self) -> None:
        """
        A valid key as C{Authorization: Bearer}, bare C{Authorization} (Ollama-style) or
        C{x-api-key} (Anthropic) is served, as its user; the key never reaches the backend.
        """
        for path, body, headers in [
            ("/api/chat", CHAT, {"Authorization": "Bearer sk-alice"}),
            ("/api/chat", CHAT, {"Authorization": "sk-alice"}),
            ("/v1/chat/completions", CHAT, {"x-api-key": "sk-bob"}),
            ("/v1/chat/completions", CHAT, {"Authorization": "Bearer sk-bob"}),
        ]:
            response, _ = self.proxy.complete("POST", path, body, headers)
            self.assertEqual(response.code, 200, headers)
        served = {u["id"]: u["served"] for u in self.proxy.scheduler.snapshot()}
        self.assertEqual((served["alice"], served["bob"]), (2, 2))
        for _, seen in self.proxy.recorders["gpu1"].seen:
            self.assertNotIn("sk-", json.dumps(seen))

    def test_allRoutesButPublic(self) -> None:
        """
        Aggregated and unknown routes need a key too (unknown ones do not reveal that
        they are unknown); C{/}, C{/health} and C{/proxy/status} do not.
        """
        for path in ["/api/tags", "/v1/models", "/no/such/route"]:
            response, _ = self.proxy.complete("GET", path)
            self.assertEqual(response.code, 401, path)
        response, _ = self.proxy.complete("GET", "/api/tags",
                                          headers={"Authorization": "Bearer sk-alice"})
        self.assertEqual(response.code, 200)
        for path in ["/", "/health", "/proxy/status", "/proxy/ui"]:
            response, _ = self.proxy.complete("GET", path)
            self.assertEqual(response.code, 200, path)

    def test_publicMetrics(self) -> None:
        """
        C{/metrics} is public only when the daemon's metrics are (the public set is the
        gate's own, as tap.py builds it from C{metrics_public}).
        """
        from ollamamq.access import PUBLIC

        response, _ = self.proxy.complete("GET", "/metrics")
        self.assertEqual(response.code, 401)
        self.proxy.client = StubTreq(AccessGate(
            self.proxy.api.resource(), self.proxy.api.identity,
            RateLimiter(self.proxy.clock, self.proxy.config), PUBLIC | {b"/metrics"}))
        response, _ = self.proxy.complete("GET", "/metrics")
        self.assertNotEqual(response.code, 401)

    def test_adminKeyPasses(self) -> None:
        """
        The admin key is let through (model management, listings).
        """
        response, _ = self.proxy.complete("GET", "/api/tags",
                                          headers={"X-Admin-Key": "admin-secret"})
        self.assertEqual(response.code, 200)

    def test_optionalServesAnyone(self) -> None:
        """
        With auth optional (the default) no key is needed, and a foreign key is forwarded
        to the backend (it may be meant for it).
        """
        proxy = GatedProxy(self)
        response, _ = proxy.complete("POST", "/v1/chat/completions", CHAT,
                                     {"Authorization": "Bearer sk-openai-own"})
        self.assertEqual(response.code, 200)
        self.assertEqual(proxy.backendSaw("/v1/chat/completions")[-1]["authorization"],
                         ["Bearer sk-openai-own"])


class CredentialPlacementTests(SynchronousTestCase):
    """
    Repeated credential headers and keys in the query string are refused.
    """

    def setUp(self) -> None:
        self.proxy = GatedProxy(self)

    def test_repeatedAuthorization(self) -> None:
        """
        Two C{Authorization} (or C{x-api-key}, C{X-User-ID}) headers are a 400
        C{repeated_header}; nothing reaches the backend.
        """
        for name in ["Authorization", "x-api-key", "X-User-ID"]:
            d = self.proxy.client.request(
                "POST", "http://proxy/v1/chat/completions", data=json.dumps(CHAT).encode(),
                headers=Headers({name: ["Bearer sk-alice", "Bearer other"]}))
            self.proxy.advance(5, steps=20)
            response = self.successResultOf(d)
            self.assertEqual(response.code, 400)
            content = self.successResultOf(treq.json_content(response))
            self.proxy.flush()
            self.assertEqual(content["error"]["code"], "repeated_header")
        self.assertEqual(self.proxy.backendSaw("/v1/chat/completions"), [])

    def test_keyInQuery(self) -> None:
        """
        A key-named query parameter, or any parameter holding a proxy key, is a 400 with a
        hint to use the header; other query strings pass.
        """
        for query in ["?key=abc", "?api_key=sk-alice", "?x=1&Access_Token=zzz", "?q=sk-bob"]:
            response, content = self.proxy.complete("GET", "/v1/models" + query)
            self.assertEqual(response.code, 400, query)
            error = json.loads(content)["error"]
            self.assertEqual(error["code"], "key_in_query")
            self.assertIn("Authorization: Bearer", error["message"])
        response, _ = self.proxy.complete("GET", "/v1/models?limit=5")
        self.assertEqual(response.code, 200)


class RateLimitTests(SynchronousTestCase):
    """
    C{max_requests_per_minute} through the whole proxy.
    """

    def setUp(self) -> None:
        self.proxy = GatedProxy(self, maxRequestsPerMinute=2, users={
            "alice": UserConfig(keys=("sk-alice",), maxRequestsPerMinute=1),
            "bob": UserConfig(keys=("sk-bob",)),
        })

    def test_429EachDialect(self) -> None:
        """
        Over the limit, each dialect gets a shaped 429 with C{Retry-After} and the
        C{X-RateLimit-*} headers; served answers carry the headers too.
        """
        for family, (path, body) in DIALECTS.items():
            headers = {"X-User-ID": f"carol-{family}"}
            for remaining in ("1", "0"):
                response, _ = self.proxy.complete("POST", "/api/chat", CHAT, headers, seconds=2)
                self.assertEqual(response.code, 200)
                self.assertEqual(response.headers.getRawHeaders("x-ratelimit-remaining"),
                                 [remaining])
            response, content = self.proxy.complete("POST", path, body, headers, seconds=0.1)
            self.assertEqual(response.code, 429, family)
            h = response.headers
            self.assertEqual(h.getRawHeaders("x-ratelimit-limit"), ["2"])
            self.assertEqual(h.getRawHeaders("x-ratelimit-remaining"), ["0"])
            # 2 per minute: 30 s per request, of which ~4 s (two complete() runs) passed.
            retry = int(h.getRawHeaders("retry-after")[0])
            self.assertTrue(25 <= retry <= 27, retry)
            payload = json.loads(content)
            if family == "ollama":
                self.assertIn("rate limit", payload["error"])
            elif family == "openai":
                self.assertEqual(payload["error"]["type"], "rate_limit_error")
                self.assertEqual(payload["error"]["code"], "rate_limited")
            else:
                self.assertEqual(payload["error"]["type"], "rate_limit_error")

    def test_retryAfterHonoured(self) -> None:
        """
        Waiting C{Retry-After} seconds is enough; a user's own limit applies; other users
        are unaffected by one user's empty bucket.
        """
        key = {"Authorization": "Bearer sk-alice"}
        response, _ = self.proxy.complete("POST", "/api/chat", CHAT, key, seconds=1)
        self.assertEqual(response.code, 200)
        response, _ = self.proxy.complete("POST", "/api/chat", CHAT, key, seconds=0.1)
        self.assertEqual(response.code, 429)
        retry = int(response.headers.getRawHeaders("retry-after")[0])
        response, _ = self.proxy.complete("POST", "/api/chat", CHAT,
                                          {"Authorization": "Bearer sk-bob"}, seconds=1)
        self.assertEqual(response.code, 200)
        self.proxy.advance(retry - 1.2)
        response, _ = self.proxy.complete("POST", "/api/chat", CHAT, key, seconds=0.1)
        self.assertEqual(response.code, 429)
        self.proxy.advance(1.0)
        response, _ = self.proxy.complete("POST", "/api/chat", CHAT, key, seconds=1)
        self.assertEqual(response.code, 200)

    def test_publicNotCounted(self) -> None:
        """
        C{/health} and C{/} neither count nor carry the headers.
        """
        for _ in range(5):
            response, _ = self.proxy.complete("GET", "/health", headers={"X-User-ID": "x"})
            self.assertEqual(response.code, 200)
            self.assertIsNone(response.headers.getRawHeaders("x-ratelimit-limit"))


class StatusTests(SynchronousTestCase):
    """
    C{/proxy/status} shows details to the admin only.
    """

    def test_redacted(self) -> None:
        """
        Without the admin key: backend states and totals, no user names, addresses or
        backend URLs. With it: everything.
        """
        proxy = GatedProxy(self)
        proxy.complete("POST", "/api/chat", CHAT, {"Authorization": "Bearer sk-alice"})
        response, content = proxy.complete("GET", "/proxy/status")
        self.assertEqual(response.code, 200)
        status = json.loads(content)
        self.assertEqual(set(status), {"backends", "queued", "active", "detail"})
        self.assertEqual(status["backends"][0]["name"], "gpu1")
        self.assertTrue(status["backends"][0]["online"])
        self.assertNotIn("alice", content.decode())
        self.assertNotIn("http://", content.decode())
        response, content = proxy.complete("GET", "/proxy/status",
                                           headers={"Authorization": "Bearer admin-secret"})
        status = json.loads(content)
        self.assertIn("alice", [u["id"] for u in status["users"]])
        self.assertEqual(status["backends"][0]["url"], "http://gpu1")

    def test_noAdminKeyLoopback(self) -> None:
        """
        With no admin key configured, details go to loopback peers that relay for nobody
        (the in-memory client is 127.0.0.1), not to requests forwarded by a local proxy.
        """
        proxy = GatedProxy(self, adminKey=None)
        _, content = proxy.complete("GET", "/proxy/status")
        self.assertIn("users", json.loads(content))
        _, content = proxy.complete("GET", "/proxy/status",
                                    headers={"X-Forwarded-For": "203.0.113.9"})
        self.assertNotIn("users", json.loads(content))
        response, _ = proxy.complete("POST", "/api/pull", {"model": "x"},
                                     {"X-Forwarded-For": "203.0.113.9"})
        self.assertEqual(response.code, 401)


class BackendKeyTests(SynchronousTestCase):
    """
    A backend's own C{api_key} goes to it alone; the proxy's keys go nowhere.
    """

    def test_ownKeySentProxyKeysNot(self) -> None:
        """
        Relayed requests and health probes carry the backend's own key as
        C{Authorization: Bearer}; the client's proxy key and admin key never arrive, nor
        does a client's C{x-api-key} replace the backend's credential.
        """
        proxy = GatedProxy(self)
        proxy.pool.get("gpu1").apiKey = "llama-own"
        proxy.probe()
        for path in ["/api/tags", "/api/ps", "/api/version"]:
            self.assertEqual(proxy.backendSaw(path)[-1]["authorization"], ["Bearer llama-own"])
        proxy.complete("POST", "/api/chat", CHAT, {"Authorization": "Bearer sk-alice"})
        proxy.complete("POST", "/api/generate", {"model": "llama3", "prompt": "hi"},
                       {"x-api-key": "sk-bob", "X-Admin-Key": "admin-secret"})
        proxy.complete("POST", "/v1/chat/completions", CHAT,
                       {"Authorization": "Bearer client-own", "x-api-key": "client-other"})
        proxy.complete("GET", "/api/tags", headers={"Authorization": "Bearer sk-alice"})
        for path in ["/api/chat", "/api/generate", "/v1/chat/completions"]:
            seen = proxy.backendSaw(path)[-1]
            self.assertEqual(seen["authorization"], ["Bearer llama-own"], path)
            self.assertNotIn("x-api-key", seen)
            self.assertNotIn("x-admin-key", seen)
        for _, seen in proxy.recorders["gpu1"].seen:
            text = json.dumps(seen)
            for secret in ("sk-alice", "sk-bob", "admin-secret"):
                self.assertNotIn(secret, text)

    def test_noOwnKey(self) -> None:
        """
        Without an own key, probes send no credentials at all.
        """
        proxy = GatedProxy(self)
        self.assertNotIn("authorization", proxy.backendSaw("/api/tags")[-1])

    def test_notShown(self) -> None:
        """
        The backend's key is in neither its repr nor its status entry.
        """
        proxy = GatedProxy(self)
        backend = proxy.pool.get("gpu1")
        backend.apiKey = "llama-own"
        self.assertNotIn("llama-own", repr(backend))
        self.assertNotIn("llama-own", json.dumps(backend.describe()))


class TokenBudgetTests(SynchronousTestCase):
    """
    C{max_tokens_per_day} end to end: counted from the answers' usage as requests finish,
    refused at the gate once used up.
    """

    def test_budgetUsedUp(self) -> None:
        """
        A user whose finished requests used the day's tokens gets a shaped 429 with the
        time to midnight UTC; another user is still served.
        """
        from ollamamq.limits import TokenBudget
        from ollamamq.tracking import Observer

        proxy = GatedProxy(self, maxTokensPerDay=5, users={
            "alice": UserConfig(keys=("sk-alice",)), "bob": UserConfig(keys=("sk-bob",))})
        now = [86400.0 * 20000 + 600.0]
        budget = TokenBudget(proxy.config, wallClock=lambda: now[0])
        observer = Observer(proxy.clock)
        observer.budget = budget
        proxy.forwarder.observer = observer
        proxy.client = StubTreq(AccessGate(proxy.api.resource(), proxy.api.identity,
                                           proxy.limiter, budget=budget))
        body = {"model": "llama3", "prompt": "one two three", "stream": False}
        alice = {"Authorization": "Bearer sk-alice"}
        response, _ = proxy.complete("POST", "/api/generate", body, alice)
        self.assertEqual(response.code, 200)
        self.assertGreaterEqual(budget.used("alice"), 5)
        response, content = proxy.complete("POST", "/v1/completions",
                                           {"model": "llama3", "prompt": "x"}, alice)
        self.assertEqual(response.code, 429)
        error = json.loads(content)["error"]
        self.assertEqual((error["type"], error["code"]),
                         ("rate_limit_error", "token_budget_exhausted"))
        self.assertEqual(response.headers.getRawHeaders(b"retry-after"), [b"85800"])
        response, _ = proxy.complete("POST", "/api/generate", body,
                                     {"Authorization": "Bearer sk-bob"})
        self.assertEqual(response.code, 200)
