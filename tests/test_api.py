"""
Tests for L{ollamamq.api}: the whole proxy in memory. Real scheduler, pool, health checker,
relay and Klein app; simulated backends behind C{StubTreq}; time on a C{task.Clock}.
"""

from __future__ import annotations

import json
from typing import Any

import treq
from treq.client import HTTPClient
from treq.testing import RequestTraversalAgent, StubTreq
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from ollamamq.aggregate import Aggregator
from ollamamq.api import ProxyAPI
from ollamamq.forward import MAX_FAILED_ATTEMPTS, Forwarder
from ollamamq.backends import Backend, BackendPool
from ollamamq.config import Config, ModelRule, UserConfig
from ollamamq.health import HealthChecker
from ollamamq.identity import IdentityResolver
from ollamamq.models import ModelCatalog
from ollamamq.relay import Relay
from ollamamq.scheduler import Scheduler
from ollamamq.sim.server import Simulator, SimulatorOptions

CHAT = {"model": "llama3", "messages": [{"role": "user", "content": "hello there"}]}


class HostRouter(Resource):
    """
    Several simulated backends behind one StubTreq, told apart by the URL's host.
    """

    isLeaf = True

    def __init__(self, resources: dict[str, Any]) -> None:
        super().__init__()
        self.resources = resources

    def render(self, request: Any) -> Any:
        return self.resources[request.getRequestHostname().decode()].render(request)


class RefusingAgent:
    """
    An agent that refuses connections to the hosts in C{refused}, else delegates.
    """

    def __init__(self, agent: Any) -> None:
        self.agent = agent
        self.refused: set[bytes] = set()

    def request(self, method: bytes, uri: bytes, headers: Any = None, bodyProducer: Any = None) -> Any:
        from urllib.parse import urlsplit

        from twisted.internet.defer import fail
        from twisted.internet.error import ConnectionRefusedError

        if urlsplit(uri).hostname in self.refused:
            return fail(ConnectionRefusedError())
        return self.agent.request(method, uri, headers, bodyProducer)


class BusyOnce:
    """
    An agent whose first request to host C{host} is answered C{code} with C{body} (and
    C{Retry-After}) by a resource of its own, the rest delegated. Flush C{answers} to move
    that answer.
    """

    def __init__(self, agent: Any, host: bytes, code: int, body: bytes,
                 retryAfter: bytes | None = None) -> None:
        self.agent = agent
        self.host = host
        self.used = False

        class Answer(Resource):
            isLeaf = True

            def render(self, request: Any) -> bytes:
                request.setResponseCode(code)
                if retryAfter is not None:
                    request.setHeader(b"retry-after", retryAfter)
                return body

        self.answers = RequestTraversalAgent(Answer())

    def request(self, method: bytes, uri: bytes, headers: Any = None, bodyProducer: Any = None) -> Any:
        from urllib.parse import urlsplit

        if self.used or urlsplit(uri).hostname != self.host:
            return self.agent.request(method, uri, headers, bodyProducer)
        self.used = True
        return self.answers.request(method, uri, headers, bodyProducer)


class StaleOnce:
    """
    An agent whose first request fails as a dropped keep-alive connection does.
    """

    def __init__(self, agent: Any) -> None:
        self.agent = agent
        self.calls = 0

    def request(self, method: bytes, uri: bytes, headers: Any = None, bodyProducer: Any = None) -> Any:
        from twisted.internet.defer import fail
        from twisted.internet.error import ConnectionDone
        from twisted.python.failure import Failure
        from twisted.web.client import ResponseNeverReceived

        self.calls += 1
        if self.calls == 1:
            return fail(ResponseNeverReceived([Failure(ConnectionDone())]))
        return self.agent.request(method, uri, headers, bodyProducer)


class Proxy:
    """
    An in-memory proxy in front of simulators, with helpers to drive it.
    """

    def __init__(self, test: SynchronousTestCase, sims: dict[str, SimulatorOptions],
                 **configFields: Any) -> None:
        self.test = test
        self.clock = Clock()
        self.sims = {name: Simulator(options, self.clock) for name, options in sims.items()}
        self.router = HostRouter({n: s.resource() for n, s in self.sims.items()})
        self.backendAgent = RequestTraversalAgent(self.router)
        self.backendHTTP = HTTPClient(self.backendAgent)
        self.relayAgent = RefusingAgent(self.backendAgent)
        self.config = Config(**configFields)
        self.pool = BackendPool(
            Backend(name=name, url=f"http://{name}", slots=options.slots)
            for name, options in sims.items()
        )
        self.scheduler = Scheduler(self.pool, self.clock, self.config)
        self.rechecked: list[Backend] = []
        # More in-memory agents to move bytes through on every flush.
        self.flushing: list[Any] = []
        catalog = ModelCatalog(self.config.models)
        self.health = HealthChecker(self.pool, self.backendHTTP, self.clock, 10, 5)
        self.relay = Relay(self.relayAgent, self.clock, self.config.timeout,
                           self.config.firstByteTimeout)
        self.forwarder = Forwarder(
            pool=self.pool,
            scheduler=self.scheduler,
            relay=self.relay,
            catalog=catalog,
            clock=self.clock,
            recheck=self.rechecked.append,
            downAfter=self.config.downAfter,
        )
        self.api = ProxyAPI(
            config=self.config,
            pool=self.pool,
            scheduler=self.scheduler,
            forwarder=self.forwarder,
            identity=IdentityResolver(self.config),
            catalog=catalog,
            aggregator=Aggregator(self.pool, self.backendHTTP, self.clock, catalog, 5),
        )
        # The proxy's own request class, as tap.py sets it, so the front's early checks
        # run as in the daemon.
        self.client = StubTreq(self.api.resource())
        self.client._agent._serverFactory.requestFactory = self.api.frontRules().requestFactory()
        self.probe()

    def probe(self) -> None:
        """
        Run one round of real health probes against the simulators.
        """
        d = self.health.probeAll()
        self.flush()
        self.test.successResultOf(d)

    def flush(self) -> None:
        """
        Move every pending byte through both stubs until nothing moves.
        """
        for _ in range(6):
            self.backendAgent.flush()
            for agent in self.flushing:
                agent.flush()
            self.client.flush()

    def advance(self, seconds: float, steps: int = 1) -> None:
        """
        Let simulated time pass, flushing after each step.
        """
        for _ in range(steps):
            self.clock.advance(seconds / steps)
            self.flush()

    def request(self, method: str, path: str, body: Any = None, headers: dict | None = None,
                raw: bytes | None = None) -> Any:
        """
        Start a request; return its (unfired until headers arrive) Deferred.
        """
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        d = self.client.request(method, "http://proxy" + path, data=data,
                                headers=headers or {}, unbuffered=True)
        self.flush()
        return d

    def complete(self, method: str, path: str, body: Any = None, headers: dict | None = None,
                 raw: bytes | None = None, seconds: float = 30) -> tuple[Any, bytes]:
        """
        Run a request to the end (advancing time); return (response, body).
        """
        d = self.request(method, path, body, headers, raw)
        self.advance(seconds, steps=300)
        response = self.test.successResultOf(d)
        content = treq.content(response)
        self.flush()
        return response, self.test.successResultOf(content)


def sim(**kwargs: Any) -> SimulatorOptions:
    """
    Simulator options with quick defaults for tests.
    """
    kwargs.setdefault("models", ("llama3:latest", "nomic-embed-text:latest"))
    kwargs.setdefault("tps", 10)
    kwargs.setdefault("tokens", 5)
    return SimulatorOptions(**kwargs)


class LocalRouteTests(SynchronousTestCase):
    """
    Routes the proxy answers itself.
    """

    def setUp(self) -> None:
        self.proxy = Proxy(self, {"gpu1": sim(name="gpu1")})

    def test_root(self) -> None:
        """
        C{/} answers like Ollama, so clients probing for a server are satisfied.
        """
        response, body = self.proxy.complete("GET", "/")
        self.assertEqual((response.code, body), (200, b"Ollama is running"))

    def test_health(self) -> None:
        """
        C{/health} counts online backends; 503 once none is online.
        """
        response, body = self.proxy.complete("GET", "/health")
        self.assertEqual(response.code, 200)
        self.assertEqual(json.loads(body)["backends"], {"online": 1, "total": 1})
        self.proxy.pool.markOffline(self.proxy.pool.get("gpu1"), "test")
        response, body = self.proxy.complete("GET", "/health")
        self.assertEqual(response.code, 503)
        self.assertEqual(json.loads(body)["status"], "down")

    def test_status(self) -> None:
        """
        C{/proxy/status} has backends, users and queue totals in the documented shape.
        """
        self.proxy.complete("POST", "/api/chat", CHAT, {"X-User-ID": "alice"})
        response, body = self.proxy.complete("GET", "/proxy/status")
        status = json.loads(body)
        self.assertEqual(status["backends"][0]["name"], "gpu1")
        self.assertTrue(status["backends"][0]["online"])
        self.assertEqual(status["backends"][0]["kind"], "ollama")
        alice = [u for u in status["users"] if u["id"] == "alice"]
        self.assertEqual(alice[0]["served"], 1)
        self.assertEqual((status["queued"], status["active"]), (0, 0))

    def test_unknownRoute(self) -> None:
        """
        Unknown paths get a shaped 404 unless C{--allow-all-routes}.
        """
        response, body = self.proxy.complete("POST", "/api/nonsense", {"model": "llama3"})
        self.assertEqual(response.code, 404)
        self.assertIn("no route", json.loads(body)["error"])
        response, body = self.proxy.complete("GET", "/v1/nonsense")
        self.assertEqual(json.loads(body)["error"]["code"], "unknown_route")


class QueuedRouteTests(SynchronousTestCase):
    """
    Generation and embedding routes: scheduled, relayed, streamed.
    """

    def setUp(self) -> None:
        self.proxy = Proxy(self, {"gpu1": sim(name="gpu1")})

    def test_chatStreamsIncrementally(self) -> None:
        """
        NDJSON lines reach the client one token at a time, before the stream ends.
        """
        self.proxy = Proxy(self, {"gpu1": sim(name="gpu1", tokens=20)})
        d = self.proxy.request("POST", "/api/chat", CHAT, {"X-User-ID": "alice"})
        self.proxy.advance(0.1)
        response = self.successResultOf(d)
        chunks: list[bytes] = []
        done = treq.collect(response, chunks.append)
        seen = []
        for _ in range(5):
            self.proxy.advance(0.1)
            seen.append(b"".join(chunks).count(b"\n"))
        self.assertNoResult(done)
        self.proxy.advance(3, steps=30)
        self.successResultOf(done)
        # Lines kept arriving, about one per tenth of a second, while the stream ran.
        self.assertEqual(seen, sorted(seen))
        self.assertGreaterEqual(seen[-1] - seen[0], 3)
        lines = [json.loads(line) for line in b"".join(chunks).splitlines()]
        self.assertTrue(lines[-1]["done"])
        self.assertEqual(lines[-1]["eval_count"], 20)

    def test_headersBothWays(self) -> None:
        """
        The client's X-User-ID reaches the backend; the backend's headers reach the client.
        """
        response, body = self.proxy.complete("POST", "/api/generate",
                                             {"model": "llama3", "prompt": "hi", "stream": False},
                                             {"X-User-ID": "alice", "X-Trace": "t1"})
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"x-sim-backend"), [b"gpu1"])
        entry = self.proxy.sims["gpu1"].stats["log"][-1]
        self.assertEqual(entry["user"], "alice")
        self.assertEqual(entry["headers"]["x-trace"], "t1")

    def test_openaiStream(self) -> None:
        """
        An OpenAI SSE stream is relayed as is, ending with C{[DONE]}.
        """
        response, body = self.proxy.complete(
            "POST", "/v1/chat/completions", dict(CHAT, stream=True)
        )
        self.assertEqual(response.code, 200)
        self.assertTrue(body.rstrip().endswith(b"data: [DONE]"))

    def test_embeddings(self) -> None:
        """
        Embedding routes are queued and answered.
        """
        response, body = self.proxy.complete("POST", "/api/embed",
                                             {"model": "nomic-embed-text", "input": "x"})
        self.assertEqual(len(json.loads(body)["embeddings"]), 1)
        response, body = self.proxy.complete("POST", "/v1/embeddings",
                                             {"model": "nomic-embed-text", "input": "x"})
        self.assertEqual(json.loads(body)["object"], "list")

    def test_disconnectWhileQueued(self) -> None:
        """
        A client that hangs up while queued leaves the queue; the backend never sees it.
        """
        first = self.proxy.request("POST", "/api/chat", CHAT, {"X-User-ID": "a"})
        second = self.proxy.request("POST", "/api/chat", CHAT, {"X-User-ID": "b"})
        self.assertEqual(self.proxy.scheduler.queued, 1)
        second.cancel()
        self.proxy.flush()
        self.failureResultOf(second)
        self.assertEqual(self.proxy.scheduler.queued, 0)
        self.proxy.advance(5, steps=50)
        self.successResultOf(first)
        self.proxy.advance(5, steps=50)
        self.assertEqual(self.proxy.sims["gpu1"].stats["requests"], 1)
        self.assertEqual(self.proxy.scheduler.active, 0)
        self.assertEqual(self.flushLoggedErrors(), [])


class BadInputTests(SynchronousTestCase):
    """
    Every bad input gets its status and its family's error shape, and loses nothing else.
    """

    def setUp(self) -> None:
        self.proxy = Proxy(self, {"gpu1": sim(name="gpu1")}, maxBodyBytes=2000,
                           maxQueuedPerUser=1)

    def error(self, path: str, body: Any = None, raw: bytes | None = None,
              headers: dict | None = None) -> tuple[int, Any, Any]:
        """
        Send a request expected to fail; return (status, parsed body, response).
        """
        response, content = self.proxy.complete("POST", path, body, headers, raw)
        return response.code, json.loads(content), response

    def test_malformedJSON(self) -> None:
        """
        Malformed JSON is a 400 in each family's shape.
        """
        code, body, _ = self.error("/api/chat", raw=b"{nope")
        self.assertEqual(code, 400)
        self.assertIn("not valid JSON", body["error"])
        code, body, _ = self.error("/v1/chat/completions", raw=b"[1, 2]")
        self.assertEqual((code, body["error"]["type"]), (400, "invalid_request_error"))
        code, body, _ = self.error("/v1/messages", raw=b"")
        self.assertEqual((code, body["type"], body["error"]["type"]),
                         (400, "error", "invalid_request_error"))

    def test_missingModel(self) -> None:
        """
        A generation request without a model is a 400 naming the field.
        """
        code, body, _ = self.error("/api/generate", {"prompt": "hi"})
        self.assertEqual(code, 400)
        self.assertIn("missing model", body["error"])
        code, body, _ = self.error("/v1/chat/completions", {"model": 3, "messages": []})
        self.assertEqual(body["error"]["code"], "missing_model")

    def test_unknownModel(self) -> None:
        """
        A model no backend has is a 404.
        """
        code, body, _ = self.error("/api/chat", dict(CHAT, model="llama3:70b"))
        self.assertEqual(code, 404)
        code, body, _ = self.error("/v1/chat/completions", dict(CHAT, model="gpt-5"))
        self.assertEqual((code, body["error"]["code"]), (404, "model_not_found"))

    def test_deeplyNestedJSON(self) -> None:
        """
        JSON nested deeper than the parser's stack is a 400, not a 500.
        """
        raw = b'{"model": "llama3", "x": ' + b"[" * 100000 + b"]" * 100000 + b"}"
        proxy = Proxy(self, {"gpu1": sim(name="gpu1")}, maxBodyBytes=1000000)
        response, content = proxy.complete("POST", "/api/chat", raw=raw)
        self.assertEqual(response.code, 400)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_emptyPathSegments(self) -> None:
        """
        C{//api/generate} is not taken for C{/api/generate} (the router would merge the
        slashes while the request would be forwarded as is): 404.
        """
        code, body, _ = self.error("//api/generate", {"model": "llama3", "prompt": "x"})
        self.assertEqual((code, body["error"]), (404, "no route for '//api/generate'"))
        self.assertEqual(self.proxy.sims["gpu1"].stats["requests"], 0)

    def test_pathNotUTF8(self) -> None:
        """
        A path that is not UTF-8 is a shaped 400, with nothing logged.
        """
        response, content = self.proxy.complete("GET", "/v1/models/%ff")
        self.assertEqual(response.code, 400)
        self.assertEqual(json.loads(content)["error"]["code"], "invalid_path")
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_bodyTooLarge(self) -> None:
        """
        A body over C{max_body_bytes} is a 413.
        """
        code, body, _ = self.error("/api/chat", raw=b"x" * 3000)
        self.assertEqual(code, 413)

    def test_userQueueFull(self) -> None:
        """
        Beyond C{max_queued_per_user}, a 429 with Retry-After; others still get through.
        """
        running = self.proxy.request("POST", "/api/chat", CHAT, {"X-User-ID": "a"})
        queued = self.proxy.request("POST", "/api/chat", CHAT, {"X-User-ID": "a"})
        refused = self.proxy.request("POST", "/v1/chat/completions", CHAT, {"X-User-ID": "a"})
        other = self.proxy.request("POST", "/api/chat", CHAT, {"X-User-ID": "b"})
        response = self.successResultOf(refused)
        self.assertEqual(response.code, 429)
        self.assertTrue(response.headers.getRawHeaders(b"retry-after"))
        content = treq.content(response)
        self.proxy.flush()
        self.assertEqual(json.loads(self.successResultOf(content))["error"]["type"], "rate_limit_error")
        self.proxy.advance(10, steps=100)
        for d in (running, queued, other):
            self.assertEqual(self.successResultOf(d).code, 200)

    def test_noBackendOnline(self) -> None:
        """
        A known model whose backends are all offline is a 503 with Retry-After.
        """
        self.proxy.pool.markOffline(self.proxy.pool.get("gpu1"), "test")
        code, body, response = self.error("/api/chat", CHAT)
        self.assertEqual(code, 503)
        self.assertTrue(response.headers.getRawHeaders(b"retry-after"))

    def test_timeoutBeforeFirstByte(self) -> None:
        """
        A backend silent for the first-byte timeout before answering is a 504.
        """
        proxy = Proxy(self, {"slow": sim(name="slow", loadDelay=100)}, timeout=1.0,
                      firstByteTimeout=5.0)
        response, content = proxy.complete("POST", "/api/chat", CHAT, seconds=10)
        self.assertEqual(response.code, 504)
        self.assertIn("sent nothing for 5s", json.loads(content)["error"])

    def test_firstByteTimeoutStrikes(self) -> None:
        """
        A backend that reaches the first-byte timeout twice in a row is marked failed
        (suspect); once is not enough.
        """
        proxy = Proxy(self, {"slow": sim(name="slow", loadDelay=100)}, firstByteTimeout=5.0)
        backend = proxy.pool.get("slow")
        proxy.complete("POST", "/api/chat", CHAT, seconds=6)
        self.assertEqual((backend.state, backend.firstByteTimeouts), ("online", 1))
        proxy.complete("POST", "/api/chat", CHAT, seconds=6)
        self.assertEqual(backend.state, "suspect")
        self.assertEqual(proxy.rechecked, [backend])

    def test_slowNonStreamingAnswerUnderShortIdleTimeout(self) -> None:
        """
        The idle timeout does not bound the wait for the first byte: a C{"stream": false}
        answer that takes longer than it, well within the first-byte timeout, succeeds.
        """
        proxy = Proxy(self, {"gpu1": sim(name="gpu1", tps=1, tokens=3)}, timeout=1.0)
        response, content = proxy.complete("POST", "/api/chat", dict(CHAT, stream=False),
                                           seconds=10)
        self.assertEqual(response.code, 200)
        self.assertTrue(json.loads(content)["done"])


class FailoverTests(SynchronousTestCase):
    """
    A backend that fails before the first byte hands the request to another.
    """

    def failing(self, proxy: Proxy, name: str, status: int | None = 503) -> None:
        """
        Make simulator C{name} answer every generation with C{status} (L{None}: normally).
        """
        proxy.sims[name].failStatus = status

    def test_failoverToOtherBackend(self) -> None:
        """
        A 503 from one backend sends the request to the other; the first is marked offline.
        """
        proxy = Proxy(self, {"a": sim(name="a"), "b": sim(name="b")})
        self.failing(proxy, "a")
        self.failing(proxy, "b", None)
        codes = [proxy.complete("POST", "/api/chat", CHAT)[0].code for _ in range(2)]
        self.assertEqual(codes, [200, 200])
        self.assertEqual(proxy.sims["b"].stats["completed"], 2)
        self.assertFalse(proxy.pool.get("a").online)
        self.assertTrue(proxy.pool.get("b").online)
        self.assertEqual(proxy.scheduler.active, 0)

    def test_onlyBackendFailsEveryAttempt(self) -> None:
        """
        When the only backend fails, the request waits for it instead of failing at once;
        each time a probe finds it well the request is sent again, and after
        L{MAX_FAILED_ATTEMPTS} failed attempts the client gets a 502 naming the failure.
        """
        proxy = Proxy(self, {"a": sim(name="a")})
        self.failing(proxy, "a")
        d = proxy.request("POST", "/api/chat", CHAT)
        self.assertNoResult(d)
        self.assertEqual(proxy.pool.get("a").state, "suspect")
        self.assertEqual(proxy.scheduler.queued, 1)
        for _ in range(MAX_FAILED_ATTEMPTS - 1):
            proxy.probe()
        response = self.successResultOf(d)
        self.assertEqual(response.code, 502)
        proxy.flush()
        error = json.loads(self.successResultOf(treq.content(response)))["error"]
        self.assertIn("backend a answered 503", error)
        self.assertEqual(proxy.sims["a"].stats["requests"], MAX_FAILED_ATTEMPTS)
        self.assertEqual((proxy.scheduler.active, proxy.scheduler.queued), (0, 0))

    def test_onlyBackendComesBack(self) -> None:
        """
        A request whose only backend failed is served once a probe finds the backend
        working again: the client never sees the failure.
        """
        proxy = Proxy(self, {"a": sim(name="a")})
        self.failing(proxy, "a")
        d = proxy.request("POST", "/api/chat", CHAT)
        self.failing(proxy, "a", None)
        proxy.probe()
        proxy.advance(5)
        self.assertEqual(self.successResultOf(d).code, 200)

    def test_graceEnds(self) -> None:
        """
        Requests wait for an unavailable backend for C{down_grace} seconds; then each
        gets a shaped 503 with C{Retry-After}, and new requests get it at once.
        """
        proxy = Proxy(self, {"a": sim(name="a")}, downGrace=20.0)
        proxy.relayAgent.refused.add(b"a")
        first = proxy.request("POST", "/v1/chat/completions", CHAT)
        second = proxy.request("POST", "/v1/chat/completions", CHAT)
        proxy.advance(19)
        self.assertNoResult(first)
        self.assertNoResult(second)
        proxy.advance(2)
        for d in (first, second):
            response = self.successResultOf(d)
            self.assertEqual(response.code, 503)
            self.assertTrue(response.headers.getRawHeaders(b"retry-after"))
        code, _ = proxy.complete("POST", "/v1/chat/completions", CHAT, seconds=0)
        self.assertEqual(code.code, 503)

    def test_connectionRefused(self) -> None:
        """
        A refused connection fails over to the other backend; with none left the client
        gets a 502 in its family's shape once the grace is over, naming the failure
        without the backend's address.
        """
        proxy = Proxy(self, {"a": sim(name="a"), "b": sim(name="b")}, downGrace=20.0)
        proxy.relayAgent.refused.add(b"a")
        codes = [proxy.complete("POST", "/api/chat", CHAT)[0].code for _ in range(3)]
        self.assertEqual(codes, [200, 200, 200])
        self.assertFalse(proxy.pool.get("a").online)
        proxy.probe()  # a comes back: the probes do not go through the refusing agent
        self.assertTrue(proxy.pool.get("a").online)
        proxy.relayAgent.refused.add(b"b")
        response, content = proxy.complete("POST", "/v1/chat/completions", CHAT)
        self.assertEqual(response.code, 502)
        error = json.loads(content)["error"]
        self.assertEqual((error["type"], error["code"]), ("server_error", "backend_failed"))
        self.assertIn("connection refused", error["message"])
        self.assertNotIn("http://", error["message"])
        self.assertEqual(proxy.scheduler.active, 0)
        self.assertEqual(sorted(b.name for b in proxy.rechecked), ["a", "a", "b"])
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_busyBackendIsNotDown(self) -> None:
        """
        A 503 saying the backend is loading (llama-server) pauses it for its Retry-After
        and puts the request back in its place; the backend stays online, counts no
        failure, and serves the request when the pause is over.
        """
        proxy = Proxy(self, {"a": sim(name="a")})
        backend = proxy.pool.get("a")
        busy = BusyOnce(proxy.relayAgent.agent, b"a", 503,
                        b'{"error": {"code": 503, "message": "Loading model"}}', b"3")
        proxy.relayAgent.agent = busy
        proxy.flushing.append(busy.answers)
        d = proxy.request("POST", "/api/chat", CHAT)
        self.assertNoResult(d)
        self.assertEqual((backend.state, backend.failures), ("online", 0))
        self.assertFalse(backend.available)
        self.assertEqual(proxy.rechecked, [])
        proxy.advance(2.9, steps=29)
        self.assertNoResult(d)
        proxy.advance(3, steps=30)
        self.assertEqual(self.successResultOf(d).code, 200)
        self.assertTrue(backend.available)

    def test_tooManyRequestsIsBusy(self) -> None:
        """
        A backend's 429 is busy too: the client does not see it, the request waits.
        """
        proxy = Proxy(self, {"a": sim(name="a")})
        busy = BusyOnce(proxy.relayAgent.agent, b"a", 429, b"slow down")
        proxy.relayAgent.agent = busy
        proxy.flushing.append(busy.answers)
        response, _ = proxy.complete("POST", "/api/chat", CHAT)
        self.assertEqual(response.code, 200)
        self.assertEqual(proxy.pool.get("a").failures, 0)

    def test_staleConnectionRetriedFresh(self) -> None:
        """
        A request lost on a pooled connection is sent once more on a fresh connection to
        the same backend before anything counts as failed.
        """
        proxy = Proxy(self, {"a": sim(name="a")})
        stale = StaleOnce(proxy.relayAgent.agent)
        proxy.relay.agent = stale
        proxy.relay.freshAgent = proxy.relayAgent
        response, _ = proxy.complete("POST", "/api/chat", CHAT)
        self.assertEqual(response.code, 200)
        self.assertEqual(stale.calls, 1)
        self.assertTrue(proxy.pool.get("a").online)
        self.assertEqual(proxy.rechecked, [])

    def test_internalErrorRelayed(self) -> None:
        """
        A 500 is the backend's own answer and reaches the client as is.
        """
        proxy = Proxy(self, {"a": sim(name="a")})
        self.failing(proxy, "a", 500)
        response, content = proxy.complete("POST", "/api/chat", CHAT)
        self.assertEqual(response.code, 500)
        self.assertTrue(proxy.pool.get("a").online)


class ModelRuleTests(SynchronousTestCase):
    """
    Aliases and per-model rewriting reach the backend.
    """

    def test_aliasAndRewrite(self) -> None:
        """
        An alias is rewritten to the concrete model; num_ctx and keep_alive are filled in.
        """
        rules = {"llama3:latest": ModelRule(name="llama3:latest", aliases=("gpt-4o-mini",),
                                            keepAlive="30m", numCtx=8192)}
        proxy = Proxy(self, {"gpu1": sim(name="gpu1")}, models=rules)
        response, body = proxy.complete("POST", "/api/chat", dict(CHAT, model="GPT-4o-mini"))
        self.assertEqual(response.code, 200)
        self.assertEqual(proxy.sims["gpu1"].stats["log"][-1]["model"], "llama3:latest")


class CredentialTests(SynchronousTestCase):
    """
    The proxy's own keys stay with the proxy.
    """

    def test_repeatedHeaderCannotSmuggleKey(self) -> None:
        """
        A proxy key in any of several Authorization headers keeps the header from the
        backend.
        """
        proxy = Proxy(self, {"gpu1": sim(name="gpu1")},
                      users={"alice": UserConfig(keys=("sk-alice",))})
        d = proxy.client.request(
            "POST", "http://proxy/api/chat", data=json.dumps(CHAT).encode(),
            headers=Headers({b"Authorization": [b"Bearer sk-alice", b"Bearer other"],
                             b"X-Api-Key": [b"x", b"sk-alice"]}))
        proxy.advance(5, steps=50)
        self.assertEqual(self.successResultOf(d).code, 200)
        headers = proxy.sims["gpu1"].stats["log"][-1]["headers"]
        self.assertNotIn("authorization", headers)
        self.assertNotIn("x-api-key", headers)

    def test_proxyKeyNotForwarded(self) -> None:
        """
        A configured bearer key identifies the user and is not sent on; other bearer
        tokens (meant for the backend) are.
        """
        proxy = Proxy(self, {"gpu1": sim(name="gpu1")},
                      users={"alice": UserConfig(keys=("sk-alice",))})
        proxy.complete("POST", "/api/chat", CHAT, {"Authorization": "Bearer sk-alice"})
        entry = proxy.sims["gpu1"].stats["log"][-1]
        self.assertNotIn("authorization", entry["headers"])
        users = {u["id"]: u for u in proxy.scheduler.snapshot()}
        self.assertEqual(users["alice"]["served"], 1)
        proxy.complete("POST", "/api/chat", CHAT, {"Authorization": "Bearer sk-backend"})
        self.assertEqual(proxy.sims["gpu1"].stats["log"][-1]["headers"]["authorization"],
                         "Bearer sk-backend")


class ManagementTests(SynchronousTestCase):
    """
    Model management routes: admin key, X-Backend, fan-out.
    """

    def setUp(self) -> None:
        self.proxy = Proxy(self, {"a": sim(name="a"), "b": sim(name="b")}, adminKey="k")

    def test_needsAdminKey(self) -> None:
        """
        Without the admin key model management is refused with 401, naming the key.
        """
        response, body = self.proxy.complete("POST", "/api/pull", {"model": "x"})
        self.assertEqual(response.code, 401)
        self.assertIn("admin key", json.loads(body)["error"])
        self.assertEqual(response.headers.getRawHeaders("www-authenticate"),
                         ['Bearer realm="ollamamq"'])

    def test_adminKeyForms(self) -> None:
        """
        The admin key is accepted as X-Admin-Key or as a bearer token, whatever the case
        of the scheme; a wrong key is refused.
        """
        for headers, code in (({"X-Admin-Key": "k"}, 404), ({"Authorization": "bearer k"}, 404),
                              ({"Authorization": "Bearer nope"}, 401)):
            response, body = self.proxy.complete("POST", "/api/copy", {"source": "x"},
                                                 dict(headers, **{"X-Backend": "zzz"}))
            self.assertEqual(response.code, code, headers)

    def test_unknownBackend(self) -> None:
        """
        An unknown X-Backend is a 404.
        """
        response, body = self.proxy.complete("POST", "/api/copy", {"source": "a", "destination": "b"},
                                             {"X-Admin-Key": "k", "X-Backend": "zzz"})
        self.assertEqual(response.code, 404)
        self.assertEqual(json.loads(body)["error"], "no backend named 'zzz'")


    def test_fanOutToEveryBackend(self) -> None:
        """
        Without X-Backend, a management request goes to every online Ollama backend and
        the answer names each backend's result; the worst status wins.
        """
        response, body = self.proxy.complete("POST", "/api/copy",
                                             {"source": "llama3", "destination": "x",
                                              "stream": False},
                                             {"Authorization": "Bearer k"})
        answer = json.loads(body)
        self.assertEqual(sorted(answer["backends"]), ["a", "b"])
        self.assertEqual(response.code, 404)  # the simulators have no /api/copy
        self.assertEqual(answer["status"], "error")

    def test_fanOutIdleTimeoutAndCancel(self) -> None:
        """
        A backend that stalls mid-answer drops out after the idle timeout (the others'
        answers still come); a client that leaves cancels every backend call.
        """
        proxy = Proxy(self, {"a": sim(name="a"), "b": sim(name="b")}, adminKey="k",
                      timeout=5.0)
        stalled = []

        class Stalling(Resource):
            isLeaf = True

            def render(self, request: Any) -> object:
                request.write(b'{"status": "pulling"}\n')
                stalled.append(request)
                request.notifyFinish().addErrback(lambda _: stalled.remove(request))
                return NOT_DONE_YET

        proxy.router.resources["b"] = Stalling()
        response, body = proxy.complete("POST", "/api/pull", {"model": "x", "stream": False},
                                        {"X-Admin-Key": "k"}, seconds=6)
        self.assertEqual(response.code, 502)
        self.assertEqual(sorted(json.loads(body)["backends"]), ["a", "b"])
        self.assertEqual(stalled, [])
        d = proxy.request("POST", "/api/pull", {"model": "x"}, {"X-Admin-Key": "k"})
        self.assertEqual(len(stalled), 1)
        d.cancel()
        proxy.flush()
        self.failureResultOf(d)
        self.assertEqual(stalled, [])
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_namedBackend(self) -> None:
        """
        With X-Backend the request goes to that backend only, relayed as it answers.
        """
        response, body = self.proxy.complete("POST", "/api/copy", {"source": "llama3"},
                                             {"X-Admin-Key": "k", "X-Backend": "b"})
        self.assertEqual(response.headers.getRawHeaders(b"x-sim-backend"), [b"b"])


class ShowAndAggregateTests(SynchronousTestCase):
    """
    Routes answered without queueing.
    """

    def test_showWhileBusy(self) -> None:
        """
        C{/api/show} and C{/api/tags} answer while every slot is busy.
        """
        proxy = Proxy(self, {"gpu1": sim(name="gpu1", tokens=30)})
        busy = proxy.request("POST", "/api/chat", CHAT)
        proxy.advance(0.5, steps=5)
        response, body = proxy.complete("POST", "/api/show", {"model": "llama3"}, seconds=0.1)
        self.assertEqual(response.code, 200)
        self.assertIn("details", json.loads(body))
        response, body = proxy.complete("GET", "/api/tags", seconds=0.1)
        names = [m["name"] for m in json.loads(body)["models"]]
        self.assertIn("llama3:latest", names)
        content = treq.content(self.successResultOf(busy))
        self.assertNoResult(content)  # the generation was running all along
        proxy.advance(5, steps=50)
        self.assertTrue(json.loads(self.successResultOf(content).splitlines()[-1])["done"])
        self.assertEqual(self.flushLoggedErrors(), [])


class AllRoutesTests(SynchronousTestCase):
    """
    C{--allow-all-routes} proxies unknown paths.
    """

    def test_unknownPathProxied(self) -> None:
        """
        With the option, an unknown path reaches a backend (which answers it).
        """
        proxy = Proxy(self, {"gpu1": sim(name="gpu1")}, allowAllRoutes=True)
        response, body = proxy.complete("GET", "/api/version/extra")
        self.assertEqual(response.headers.getRawHeaders(b"x-sim-backend"), [b"gpu1"])
        response, body = proxy.complete("POST", "/api/custom", {"model": "llama3"})
        self.assertEqual(response.headers.getRawHeaders(b"x-sim-backend"), [b"gpu1"])
        response, body = proxy.complete("POST", "/api/custom", {"model": "nope"})
        self.assertEqual(response.code, 404)
        self.assertIsNone(response.headers.getRawHeaders(b"x-sim-backend"))


class UnexpectedErrorTests(SynchronousTestCase):
    """
    A bug in a route costs that request a shaped 500, logged, and nothing else.
    """

    def test_shaped500(self) -> None:
        """
        An exception escaping a route becomes a family-shaped 500 without a traceback,
        and the next request is served normally.
        """
        proxy = Proxy(self, {"gpu1": sim(name="gpu1")})

        def broken() -> None:
            raise RuntimeError("boom")

        proxy.api.aggregator.models = broken
        response, body = proxy.complete("GET", "/v1/models")
        self.assertEqual(response.code, 500)
        self.assertEqual(json.loads(body)["error"]["code"], "internal_error")
        self.assertNotIn(b"Traceback", body)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        response, body = proxy.complete("GET", "/api/version")
        self.assertEqual(response.code, 200)


class MethodTests(SynchronousTestCase):
    """
    A known route with the wrong method is a 405 naming the right ones.
    """

    def test_wrongMethod(self) -> None:
        """
        GET on a queued route: 405, shaped, with an Allow header; unknown paths stay 404.
        """
        proxy = Proxy(self, {"gpu1": sim(name="gpu1")})
        response, body = proxy.complete("GET", "/v1/chat/completions")
        self.assertEqual(response.code, 405)
        self.assertEqual(response.headers.getRawHeaders(b"allow"), [b"POST"])
        self.assertEqual(json.loads(body)["error"]["code"], "method_not_allowed")
        response, body = proxy.complete("POST", "/api/tags")
        self.assertEqual((response.code, response.headers.getRawHeaders(b"allow")),
                         (405, [b"GET, HEAD"]))
        response, body = proxy.complete("GET", "/api/nothing")
        self.assertEqual(response.code, 404)

    def test_routerRefusalsShaped(self) -> None:
        """
        What the router itself refuses (C{POST /}, which the catch-all route does not
        match) is a shaped 405 with C{Allow}, not a logged 500.
        """
        proxy = Proxy(self, {"gpu1": sim(name="gpu1")})
        response, body = proxy.complete("POST", "/")
        self.assertEqual((response.code, response.headers.getRawHeaders(b"allow")),
                         (405, [b"GET, HEAD"]))
        self.assertIn("POST is not allowed on /", json.loads(body)["error"])
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_messagesWithoutAnthropicDialect(self) -> None:
        """
        A C{/v1/messages} request for a model whose backends do not serve the Anthropic
        API is translated to chat completions (L{ollamamq.translate}); one that cannot be
        translated is an Anthropic-shaped 400.
        """
        proxy = Proxy(self, {"gpu1": sim(name="gpu1")})
        message = {"model": "llama3", "max_tokens": 5,
                   "messages": [{"role": "user", "content": "hi"}]}
        response, body = proxy.complete("POST", "/v1/messages", message)
        self.assertEqual((response.code, json.loads(body)["type"]), (200, "message"))
        self.assertEqual(proxy.sims["gpu1"].stats["log"][-1]["path"], "/v1/chat/completions")
        response, body = proxy.complete("POST", "/v1/messages", dict(message, messages=[]))
        self.assertEqual(response.code, 400)
        self.assertEqual(json.loads(body)["error"]["type"], "invalid_request_error")


class AnthropicRouteTests(SynchronousTestCase):
    """
    The Anthropic Messages routes, relayed to a backend that serves them natively.
    """

    def setUp(self) -> None:
        self.proxy = Proxy(self, {"gpu1": sim(name="gpu1", api="llama-server", models=("gemma3",))})

    def test_messages(self) -> None:
        """
        C{POST /v1/messages} reaches the backend and its C{message} comes back.
        """
        body = {"model": "gemma3", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}
        response, answer = self.proxy.complete("POST", "/v1/messages", body)
        self.assertEqual(response.code, 200)
        message = json.loads(answer)
        self.assertEqual((message["type"], message["usage"]["output_tokens"]), ("message", 3))

    def test_countTokens(self) -> None:
        """
        C{POST /v1/messages/count_tokens} is routed by model to a backend too.
        """
        body = {"model": "gemma3", "messages": [{"role": "user", "content": "one two three"}]}
        response, answer = self.proxy.complete("POST", "/v1/messages/count_tokens", body)
        self.assertEqual((response.code, json.loads(answer)), (200, {"input_tokens": 3}))
        [seen] = [r for r in self.proxy.sims["gpu1"].requests if r["method"] == "POST"]
        self.assertEqual(seen["path"], "/v1/messages/count_tokens")


class ControlMountTests(SynchronousTestCase):
    """
    The control plane wired into the route table: C{/proxy/status} from the actions, the
    admin API below C{/proxy/}.
    """

    def test_mounted(self) -> None:
        """
        An admin write below C{/proxy/} reaches the admin app and shows in
        C{/proxy/status}, which keeps its own route; blocked users get a shaped 403.
        """
        from ollamamq.control.actions import ControlActions
        from ollamamq.control.events import EventHub
        from ollamamq.control.http import AdminAPI

        from .controlfixture import RecordingStore

        p = Proxy(self, {"gpu1": sim(models=["llama3"])})
        hub = EventHub(p.clock, lambda: {})
        actions = ControlActions(config=p.config, pool=p.pool, scheduler=p.scheduler,
                                 store=RecordingStore(), events=hub)
        p.api.control = actions
        p.api.admin = AdminAPI(actions=actions, hub=hub)
        response, body = p.complete("PUT", "/proxy/users/mallory", {"blocked": True})
        self.assertEqual(response.code, 200, body)
        response, body = p.complete("GET", "/proxy/status")
        users = {u["id"]: u for u in json.loads(body)["users"]}
        self.assertEqual(users["mallory"]["blocked"], True)
        self.assertEqual(users["mallory"]["runtime"], ["blocked"])
        response, body = p.complete("POST", "/api/generate",
                                    {"model": "llama3", "prompt": "hi"},
                                    headers={"X-User-ID": "mallory"})
        self.assertEqual(response.code, 403)
        self.assertEqual(json.loads(body), {"error": "user mallory is blocked"})
        response, body = p.complete("GET", "/proxy/nothing")
        self.assertEqual(response.code, 404)
