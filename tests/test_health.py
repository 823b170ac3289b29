"""
Tests for L{ollamamq.health}.

The backends are small twisted.web resources behind one L{StubTreq}, told apart by host
name, so every probe goes through a real Agent and a real Site without sockets.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlsplit

from treq.testing import StubTreq
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import (
    ConnectError,
    ConnectionDone,
    ConnectionRefusedError,
    DNSLookupError,
)
from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseNeverReceived
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from ollamamq.backends import (
    OFFLINE,
    OLLAMA,
    ONLINE,
    OPENAI,
    SUSPECT,
    UNKNOWN,
    Backend,
    BackendPool,
)
from twisted.logger import formatEvent

from ollamamq import health
from ollamamq.health import HealthChecker, describeFailure

#: A route answer that never comes: the request is held for the test to finish (or not).
HANG = "hang"


class FakeBackend(Resource):
    """
    A backend answering fixed routes.

    @ivar routes: path -> C{(code, body)} (a body that is not bytes is sent as JSON), or
        L{HANG}. Unknown paths get a 404.
    @ivar requests: the paths asked, in order.
    @ivar held: the requests answered with L{HANG}, still open.
    @ivar closed: the held requests whose connection went away.
    """

    isLeaf = True

    def __init__(self, routes: dict[str, Any]) -> None:
        super().__init__()
        self.routes = routes
        self.requests: list[str] = []
        self.held: list[Request] = []
        self.closed: list[Request] = []

    def render(self, request: Request) -> bytes | int:
        path = request.path.decode("utf-8")
        self.requests.append(path)
        answer = self.routes.get(path, (404, {"error": "not found"}))
        if answer == HANG:
            self.held.append(request)
            request.notifyFinish().addErrback(lambda _: self.closed.append(request))
            return NOT_DONE_YET
        code, body = answer
        request.setResponseCode(code)
        if not isinstance(body, bytes):
            request.setHeader("content-type", "application/json")
            body = json.dumps(body).encode("utf-8")
        return body


def tagEntry(name: str) -> dict:
    """
    An C{/api/tags} entry shaped like Ollama's.
    """
    return {
        "name": name,
        "model": name,
        "modified_at": "2025-01-01T00:00:00Z",
        "size": 4661224676,
        "digest": "365c0bd3c000",
        "details": {"family": "llama", "parameter_size": "8.0B"},
    }


def psEntry(name: str) -> dict:
    """
    An C{/api/ps} entry shaped like Ollama's.
    """
    return {
        "name": name,
        "model": name,
        "size": 5137025024,
        "digest": "365c0bd3c000",
        "expires_at": "2025-01-01T00:05:00Z",
        "size_vram": 5137025024,
    }


def ollamaRoutes(
    models: list[str], loaded: list[str] = (), version: str = "0.5.7"
) -> dict[str, Any]:
    """
    The routes of an Ollama server (which also speaks C{/v1}).
    """
    return {
        "/api/tags": (200, {"models": [tagEntry(m) for m in models]}),
        "/api/ps": (200, {"models": [psEntry(m) for m in loaded]}),
        "/api/version": (200, {"version": version}),
        "/v1/models": openaiListing(models, "library"),
    }


def openaiListing(ids: list[str], owner: str = "llamacpp") -> tuple[int, dict]:
    """
    A C{/v1/models} answer.
    """
    return (
        200,
        {
            "object": "list",
            "data": [{"id": i, "object": "model", "created": 1, "owned_by": owner} for i in ids],
        },
    )


def openaiRoutes(ids: list[str]) -> dict[str, Any]:
    """
    The routes of an OpenAI-only server such as llama-server or vLLM (404 elsewhere).
    """
    return {"/v1/models": openaiListing(ids)}


def lmstudioRoutes(ids: list[str]) -> dict[str, Any]:
    """
    The routes of LM Studio, which answers unknown paths with 200 and an error object.
    """
    return {
        "/api/tags": (200, {"error": "Unexpected endpoint or method. (GET /api/tags)"}),
        "/v1/models": openaiListing(ids, "organization_owner"),
    }


class Hosts(Resource):
    """
    Dispatch each request to the fake backend named by its host.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.backends: dict[str, Resource] = {}

    def render(self, request: Request) -> bytes | int:
        return self.backends[request.getRequestHostname().decode("ascii")].render(request)


class FakeNetwork:
    """
    A treq-like HTTP client reaching fake backends by host name; hosts in C{down} refuse
    connections.
    """

    def __init__(self) -> None:
        self.hosts = Hosts()
        self.stub = StubTreq(self.hosts)
        self.down: set[str] = set()
        self.calls = 0

    def add(self, host: str, backend: Resource) -> None:
        """
        Put a fake backend at C{host}.
        """
        self.hosts.backends[host] = backend

    def get(self, url: str, **kwargs: Any) -> Deferred:
        """
        L{treq.get}.
        """
        self.calls += 1
        if urlsplit(url).hostname in self.down:
            return fail(ConnectionRefusedError("Connection was refused by other side"))
        return self.stub.get(url, **kwargs)

    def flush(self) -> None:
        """
        Move the bytes written by held requests.
        """
        self.stub.flush()


class PoolFixture:
    """
    A pool, a clock and a fake network, with helpers to add backends to all of them.
    """

    def setUpPool(self) -> None:
        """
        Create the pool, clock and network; count pool notifications.
        """
        self.clock = Clock()
        self.net = FakeNetwork()
        self.pool = BackendPool()
        self.notified = 0
        self.pool.subscribe(self.count)

    def count(self) -> None:
        """
        Pool subscriber.
        """
        self.notified += 1

    def addBackend(self, name: str, routes: dict[str, Any], slots: int = 1) -> tuple[Backend, FakeBackend]:
        """
        Add a backend called C{name} (also its host name) answering C{routes}.
        """
        fake = FakeBackend(routes)
        self.net.add(name, fake)
        backend = self.pool.add(Backend(name, f"http://{name}:11434", slots=slots))
        return backend, fake

    def finish(self, request: Request, body: Any, code: int = 200) -> None:
        """
        Answer a held request and deliver the answer.
        """
        request.setResponseCode(code)
        request.write(json.dumps(body).encode("utf-8"))
        request.finish()
        self.net.flush()


class ProbeTests(PoolFixture, SynchronousTestCase):
    """
    Tests for L{HealthChecker.probe}: classification and what is recorded.
    """

    def setUp(self) -> None:
        self.setUpPool()
        self.events: list[dict] = []
        # One failed probe is enough to be offline here: these tests are about what a
        # probe finds; HysteresisTests are about how failures add up.
        self.checker = HealthChecker(self.pool, self.net, self.clock, 10, 5, downAfter=1)
        self.checker.log = Logger(observer=self.events.append)

    def probe(self, backend: Backend) -> None:
        """
        Probe C{backend}, which must finish at once.
        """
        self.assertIsNone(self.successResultOf(self.checker.probe(backend)))

    def test_ollama(self) -> None:
        """
        A backend answering C{/api/tags} with a model list is Ollama; its models, loaded
        models and version are recorded under canonical keys, spelled its way.
        """
        backend, fake = self.addBackend(
            "gpu1", ollamaRoutes(["Llama3:8B", "qwen2.5:7b"], ["Llama3:8B"], "0.5.7")
        )
        self.probe(backend)
        self.assertEqual(backend.state, ONLINE)
        self.assertEqual(backend.kind, OLLAMA)
        self.assertEqual(backend.models, {"llama3:8b": "Llama3:8B", "qwen2.5:7b": "qwen2.5:7b"})
        self.assertEqual(backend.loaded, frozenset({"llama3:8b"}))
        self.assertEqual(backend.version, "0.5.7")
        self.assertEqual(backend.latency, 0.0)
        self.assertIsNone(backend.error)
        self.assertEqual(fake.requests[0], "/api/tags")
        self.assertEqual(sorted(fake.requests[1:]), ["/api/ps", "/api/version"])

    def test_ollamaWithoutExtras(self) -> None:
        """
        An Ollama backend without C{/api/ps} and with a broken C{/api/version} is still
        online; the version learnt earlier is kept.
        """
        routes = ollamaRoutes(["llama3"])
        routes["/api/ps"] = (404, b"404 page not found")
        routes["/api/version"] = (200, b"<html>")
        backend, _ = self.addBackend("old", routes)
        backend.version = "0.1.30"
        self.probe(backend)
        self.assertEqual((backend.state, backend.kind), (ONLINE, OLLAMA))
        self.assertEqual(backend.loaded, frozenset())
        self.assertEqual(backend.version, "0.1.30")

    def test_ollamaEmpty(self) -> None:
        """
        An Ollama backend without models (Go may encode the list as C{null}) is online.
        """
        backend, _ = self.addBackend("empty", {"/api/tags": (200, {"models": None})})
        self.probe(backend)
        self.assertEqual((backend.state, backend.kind, backend.models), (ONLINE, OLLAMA, {}))

    def test_openaiOnly(self) -> None:
        """
        A backend with C{/v1/models} only is OpenAI-compatible; ids are its models.
        """
        backend, fake = self.addBackend("llamacpp", openaiRoutes(["Qwen2.5-7B-Instruct"]))
        self.probe(backend)
        self.assertEqual((backend.state, backend.kind), (ONLINE, OPENAI))
        self.assertEqual(backend.models, {"qwen2.5-7b-instruct:latest": "Qwen2.5-7B-Instruct"})
        self.assertEqual(backend.loaded, frozenset())
        self.assertIsNone(backend.version)
        # owned_by "llamacpp": /props is asked for llama-server's slot count (404 here).
        self.assertEqual(fake.requests, ["/api/tags", "/v1/models", "/props"])
        self.assertEqual((backend.server, backend.slots), ("llama-server", 1))

    def test_classifiedByShape(self) -> None:
        """
        A C{200} on C{/api/tags} without a model list (LM Studio answers every path) does
        not make a backend Ollama.
        """
        backend, _ = self.addBackend("lmstudio", lmstudioRoutes(["qwen2.5-7b-instruct"]))
        self.probe(backend)
        self.assertEqual((backend.state, backend.kind), (ONLINE, OPENAI))

    def test_broken(self) -> None:
        """
        A backend answering errors, non-JSON or the wrong shape is offline, and the
        reason says what each call got.
        """
        cases = [
            (
                {"/api/tags": (500, {"error": "boom"}), "/v1/models": (500, b"")},
                "GET /api/tags: 500; GET /v1/models: 500",
            ),
            (
                {"/api/tags": (200, b"<html>hello</html>")},
                "GET /api/tags: not JSON; GET /v1/models: 404",
            ),
            (
                {"/api/tags": (200, {"models": "many"}), "/v1/models": (200, {"data": {}})},
                "GET /api/tags: unexpected response shape; "
                "GET /v1/models: unexpected response shape",
            ),
            (
                {"/api/tags": (200, []), "/v1/models": (200, [])},
                "GET /api/tags: unexpected response shape; "
                "GET /v1/models: unexpected response shape",
            ),
        ]
        for i, (routes, reason) in enumerate(cases):
            backend, _ = self.addBackend(f"broken{i}", routes)
            self.probe(backend)
            self.assertEqual((backend.state, backend.error), (OFFLINE, reason))
            self.assertIsNone(backend.kind)

    def test_tooLarge(self) -> None:
        """
        An answer larger than L{health.MAX_BODY} is not read to the end.
        """
        self.patch(health, "MAX_BODY", 100)
        backend, _ = self.addBackend("huge", ollamaRoutes(["x" * 200]))
        self.probe(backend)
        self.assertEqual(backend.state, OFFLINE)
        self.assertEqual(
            backend.error,
            "GET /api/tags: answer larger than 100 bytes; "
            "GET /v1/models: answer larger than 100 bytes",
        )

    def test_connectionRefused(self) -> None:
        """
        A refused connection is offline at once, without asking the second question.
        """
        backend, _ = self.addBackend("gone", ollamaRoutes(["llama3"]))
        self.net.down.add("gone")
        self.probe(backend)
        self.assertEqual((backend.state, backend.error), (OFFLINE, "connection refused"))
        self.assertEqual(self.net.calls, 1)

    def test_recovery(self) -> None:
        """
        A backend goes offline when it fails and online again when it recovers; pool
        subscribers hear of both, and each transition is logged once.
        """
        backend, _ = self.addBackend("gpu1", ollamaRoutes(["llama3"]))
        self.probe(backend)
        self.assertEqual(backend.state, ONLINE)
        self.net.down.add("gpu1")
        before = self.notified
        self.probe(backend)
        self.probe(backend)
        self.assertEqual((backend.state, backend.error), (OFFLINE, "connection refused"))
        self.assertEqual(self.notified, before + 1)
        self.assertFalse(self.pool.canServe(frozenset({OLLAMA}), "llama3:latest"))
        self.net.down.clear()
        self.probe(backend)
        self.assertEqual((backend.state, backend.error), (ONLINE, None))
        self.assertGreater(self.notified, before + 1)
        self.assertTrue(self.pool.canServe(frozenset({OLLAMA}), "llama3:latest"))
        messages = [formatEvent(e).split(" is ")[1][:7] for e in self.events]
        self.assertEqual(messages, ["online:", "offline", "online:"])

    def test_hungDoesNotDelayOthers(self) -> None:
        """
        A backend that never answers is offline after the probe timeout, while the others
        were recorded without waiting for it; its connection is closed.
        """
        ollama, _ = self.addBackend("gpu1", ollamaRoutes(["llama3"]))
        openai, _ = self.addBackend("vllm", openaiRoutes(["meta-llama/Llama-3.1-8B"]))
        hung, fake = self.addBackend("hung", {"/api/tags": HANG})
        d = self.checker.probeAll()
        self.assertEqual((ollama.state, openai.state, hung.state), (ONLINE, ONLINE, UNKNOWN))
        self.clock.advance(4.9)
        self.assertNoResult(d)
        self.assertEqual(hung.state, UNKNOWN)
        self.clock.advance(0.1)
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual((hung.state, hung.error), (OFFLINE, "GET /api/tags timed out after 5s"))
        self.net.flush()
        self.assertEqual(fake.closed, fake.held)
        self.assertEqual(len(fake.held), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_hungBody(self) -> None:
        """
        A backend that sends headers and then stalls mid-body times out too, and the
        connection is dropped.
        """
        backend, fake = self.addBackend("slow", {"/api/tags": HANG})
        d = self.checker.probe(backend)
        fake.held[0].write(b'{"models": [')
        self.net.flush()
        self.clock.advance(5)
        self.successResultOf(d)
        self.assertEqual((backend.state, backend.error), (OFFLINE, "GET /api/tags timed out after 5s"))
        self.net.flush()
        self.assertEqual(fake.closed, fake.held)

    def test_hungDetails(self) -> None:
        """
        A hung C{/api/ps} delays only that backend's record by the timeout, and costs only
        the loaded models.
        """
        routes = ollamaRoutes(["llama3"], ["llama3"], "0.6.0")
        routes["/api/ps"] = HANG
        backend, _ = self.addBackend("gpu1", routes)
        d = self.checker.probe(backend)
        self.assertEqual(backend.state, UNKNOWN)
        self.clock.advance(5)
        self.successResultOf(d)
        self.assertEqual((backend.state, backend.kind, backend.version), (ONLINE, OLLAMA, "0.6.0"))
        self.assertEqual(backend.loaded, frozenset())

    def test_latency(self) -> None:
        """
        The latency is the time until the first call's answer arrives.
        """
        routes = ollamaRoutes(["llama3"])
        routes["/api/tags"] = HANG
        backend, fake = self.addBackend("gpu1", routes)
        d = self.checker.probe(backend)
        self.clock.advance(0.25)
        self.finish(fake.held[0], {"models": [tagEntry("llama3")]})
        self.successResultOf(d)
        self.assertEqual(backend.state, ONLINE)
        self.assertEqual(backend.latency, 0.25)

    def test_removedNotReAdded(self) -> None:
        """
        A backend removed from the pool while being probed is not written to, nor put
        back, nor announced; a new backend under the same name is not touched either.
        """
        routes = ollamaRoutes(["llama3"])
        routes["/api/tags"] = HANG
        backend, fake = self.addBackend("gpu1", routes)
        d = self.checker.probe(backend)
        self.pool.remove("gpu1")
        newcomer = self.pool.add(Backend("gpu1", "http://gpu1:11434"))
        before = self.notified
        self.finish(fake.held[0], {"models": [tagEntry("llama3")]})
        self.successResultOf(d)
        self.assertEqual((backend.state, newcomer.state), (UNKNOWN, UNKNOWN))
        self.assertIs(self.pool.get("gpu1"), newcomer)
        self.assertEqual(self.pool.backends, [newcomer])
        self.assertEqual(self.notified, before)

    def test_concurrentProbesJoined(self) -> None:
        """
        A second probe of a backend while one is under way joins it.
        """
        routes = ollamaRoutes(["llama3"])
        routes["/api/tags"] = HANG
        backend, fake = self.addBackend("gpu1", routes)
        first = self.checker.probe(backend)
        second = self.checker.probe(backend)
        self.assertEqual(len(fake.held), 1)
        self.finish(fake.held[0], {"models": []})
        self.successResultOf(first)
        self.successResultOf(second)
        self.assertEqual(fake.requests.count("/api/tags"), 1)

    def test_probeSoon(self) -> None:
        """
        L{HealthChecker.probeSoon} probes after the delay, once however often it is
        asked, and not at all once the checker is stopped.
        """
        backend, fake = self.addBackend("gpu1", ollamaRoutes(["llama3"]))
        self.pool.markOffline(backend, "request failed")
        self.checker.probeSoon(backend, 1)
        self.checker.probeSoon(backend)
        self.assertEqual(fake.requests, [])
        self.clock.advance(1)
        self.assertEqual(backend.state, ONLINE)
        self.assertEqual(fake.requests.count("/api/tags"), 1)
        self.checker.stop()
        self.checker.probeSoon(backend)
        self.clock.advance(1)
        self.assertEqual(fake.requests.count("/api/tags"), 1)


LOADING = (503, {"error": {"message": "Loading model", "type": "unavailable_error", "code": 503}})


def llamaServerRoutes(ids: list[str], slots: int) -> dict[str, Any]:
    """
    The routes of llama.cpp's llama-server: C{/v1/models} and C{/props} with C{total_slots}.
    """
    return {
        "/v1/models": openaiListing(ids),
        "/props": (200, {"total_slots": slots, "default_generation_settings": {"n_ctx": 4096}}),
        "/health": (200, {"status": "ok"}),
    }


class FactsTests(PoolFixture, SynchronousTestCase):
    """
    Backend facts read from the backend (L{health.readFacts}): llama-server's slots, LM
    Studio and vLLM recognised, llama-server's "Loading model" taken as busy.
    """

    def setUp(self) -> None:
        """
        A pool, a fake network and a checker whose log events are kept.
        """
        self.setUpPool()
        self.events: list[dict] = []
        self.checker = HealthChecker(self.pool, self.net, self.clock, 10, 5)
        self.checker.log = Logger(observer=self.events.append)

    def addReporting(self, name: str, routes: dict[str, Any]) -> tuple[Backend, FakeBackend]:
        """
        Add a backend whose config sets no slots (it takes what the backend reports).
        """
        backend, fake = self.addBackend(name, routes)
        backend.slotsFromBackend = True
        return backend, fake

    def probe(self, backend: Backend) -> None:
        """
        Probe C{backend}, which must finish at once.
        """
        self.assertIsNone(self.successResultOf(self.checker.probe(backend)))

    def test_totalSlots(self) -> None:
        """
        llama-server's C{total_slots} becomes the slots of a backend whose config set none,
        and the pool is told (more room to dispatch).
        """
        backend, fake = self.addReporting("llama", llamaServerRoutes(["gemma3"], 2))
        before = self.notified
        self.probe(backend)
        self.assertEqual((backend.state, backend.kind, backend.server), (ONLINE, OPENAI, "llama-server"))
        # llama-server serves Anthropic's Messages API natively.
        self.assertEqual(backend.dialects, frozenset({"openai", "anthropic"}))
        self.assertEqual(backend.slots, 2)
        self.assertGreater(self.notified, before)
        self.assertEqual(backend.describe()["server"], "llama-server")
        [event] = [e for e in self.events if "requests at once" in e["log_format"]]
        self.assertEqual((event["slots"], event["server"]), (2, "llama-server"))
        notified = self.notified
        self.probe(backend)
        self.assertEqual(self.notified, notified, "an unchanged probe notifies nobody")

    def test_configuredSlotsWin(self) -> None:
        """
        Slots set in the config are kept whatever the backend reports.
        """
        backend, _ = self.addBackend("llama", llamaServerRoutes(["gemma3"], 4), slots=3)
        self.probe(backend)
        self.assertEqual((backend.server, backend.slots), ("llama-server", 3))

    def test_badTotalSlots(self) -> None:
        """
        A C{/props} without a usable C{total_slots} (missing, zero, not a number) leaves the
        default of one slot.
        """
        for index, value in enumerate((None, 0, "2", True)):
            routes = llamaServerRoutes(["m"], 2)
            routes["/props"] = (200, {"total_slots": value})
            backend, _ = self.addReporting(f"b{index}", routes)
            self.probe(backend)
            self.assertEqual((backend.state, backend.slots), (ONLINE, 1), value)

    def test_propsFails(self) -> None:
        """
        A failing C{/props} costs only the facts: the backend is online.
        """
        routes = llamaServerRoutes(["m"], 2)
        routes["/props"] = (500, b"oops")
        backend, _ = self.addReporting("b", routes)
        self.probe(backend)
        self.assertEqual((backend.state, backend.slots, backend.server), (ONLINE, 1, "llama-server"))

    def test_lmStudioAndVLLM(self) -> None:
        """
        LM Studio and vLLM are recognised by the C{owned_by} of their models, without
        asking C{/props}.
        """
        lmstudio, lmFake = self.addReporting("lm", lmstudioRoutes(["qwen2-7b"]))
        vllm, vllmFake = self.addReporting("vllm", {"/v1/models": openaiListing(["Qwen/Qwen2.5"], "vllm")})
        self.probe(lmstudio)
        self.probe(vllm)
        self.assertEqual((lmstudio.server, vllm.server), ("lmstudio", "vllm"))
        self.assertNotIn("/props", lmFake.requests + vllmFake.requests)
        self.assertEqual((lmstudio.slots, vllm.slots), (1, 1))

    def test_unknownServer(self) -> None:
        """
        An OpenAI-compatible server named by nothing is not recognised.
        """
        backend, _ = self.addReporting("x", {"/v1/models": openaiListing(["m"], "someone")})
        self.probe(backend)
        self.assertEqual((backend.state, backend.server), (ONLINE, None))

    def test_ollamaNoFacts(self) -> None:
        """
        Ollama backends are not asked for C{/props}.
        """
        backend, fake = self.addReporting("ollama", ollamaRoutes(["llama3:latest"]))
        self.probe(backend)
        self.assertNotIn("/props", fake.requests)
        self.assertIsNone(backend.server)

    def test_loadingIsBusy(self) -> None:
        """
        A new llama-server still loading its model (503 "Loading model" everywhere) is
        not offline: it stays unknown, is probed again a second later, and is online with
        its slots once loaded.
        """
        routes = {path: LOADING for path in ("/api/tags", "/v1/models", "/props", "/health")}
        backend, fake = self.addReporting("llama", routes)
        self.probe(backend)
        self.assertEqual((backend.state, backend.error), (UNKNOWN, "loading model"))
        fake.routes = llamaServerRoutes(["gemma3"], 2)
        self.clock.advance(1)
        self.net.flush()
        self.assertEqual((backend.state, backend.slots), (ONLINE, 2))
        self.assertIsNone(backend.error)

    def test_onlineLoadingStaysOnline(self) -> None:
        """
        An online backend that answers "Loading model" (restarted) stays online: busy, not
        down.
        """
        backend, fake = self.addReporting("llama", llamaServerRoutes(["gemma3"], 2))
        self.probe(backend)
        fake.routes = {"/api/tags": (404, b""), "/v1/models": LOADING}
        self.probe(backend)
        self.assertEqual((backend.state, backend.error), (ONLINE, "loading model"))

    def test_other503IsDown(self) -> None:
        """
        A 503 that is not "Loading model" is still a failed probe (the backend is no
        longer unknown, and no longer says it is loading).
        """
        backend, _ = self.addReporting(
            "b", {"/api/tags": (503, {"error": "busy"}), "/v1/models": (503, b"down")}
        )
        self.probe(backend)
        self.assertIn(backend.state, (SUSPECT, OFFLINE))
        self.assertNotEqual(backend.error, "loading model")


class FailureTests(PoolFixture, SynchronousTestCase):
    """
    Unexpected errors inside probe handling are logged and never escape.
    """

    def setUp(self) -> None:
        self.setUpPool()
        # One failed probe is enough to be offline here: these tests are about what a
        # probe finds; HysteresisTests are about how failures add up.
        self.checker = HealthChecker(self.pool, self.net, self.clock, 10, 5, downAfter=1)

    def test_subscriberRaises(self) -> None:
        """
        A pool subscriber raising while a probe records its finding is logged; the probe
        round still finishes, the other backends are recorded and the loop goes on.
        """
        calls: list[str] = []

        def explode() -> None:
            calls.append("x")
            if len(calls) == 1:
                raise RuntimeError("subscriber bug")

        a, _ = self.addBackend("a", ollamaRoutes(["llama3"]))
        b, _ = self.addBackend("b", openaiRoutes(["x"]))
        self.pool.subscribe(explode)
        service = self.checker.service()
        service.startService()
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual((a.state, b.state), (ONLINE, ONLINE))
        self.net.down.add("a")
        self.clock.advance(10)
        self.assertEqual((a.state, a.error), (OFFLINE, "connection refused"))
        self.successResultOf(service.stopService())

    def test_examineRaises(self) -> None:
        """
        A bug while examining an answer is logged with its traceback and counts the
        backend offline; the next round works again.
        """
        backend, _ = self.addBackend("a", ollamaRoutes(["llama3"]))
        original = self.checker._ollamaDetails
        broken = [True]

        async def details(*args: Any) -> Any:
            if broken.pop() if broken else False:
                raise ZeroDivisionError("oops")
            return await original(*args)

        self.checker._ollamaDetails = details  # type: ignore[method-assign]
        service = self.checker.service()
        service.startService()
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertEqual((backend.state, backend.error), (OFFLINE, "probe failed: oops"))
        self.clock.advance(10)
        self.assertEqual(backend.state, ONLINE)
        self.successResultOf(service.stopService())

    def test_poolRaises(self) -> None:
        """
        Even a pool that cannot list its backends does not stop the loop.
        """
        backend, _ = self.addBackend("a", ollamaRoutes(["llama3"]))
        real = BackendPool.backends
        self.patch(BackendPool, "backends", property(lambda self: 1 / 0))
        service = self.checker.service()
        service.startService()
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.patch(BackendPool, "backends", real)
        self.clock.advance(10)
        self.assertEqual(backend.state, ONLINE)
        self.successResultOf(service.stopService())

    def test_describeFailure(self) -> None:
        """
        Connection-level failures get short reasons and end a probe.
        """
        cases = [
            (ConnectionRefusedError(), "connection refused"),
            (DNSLookupError("nowhere"), "DNS lookup failed"),
            (ResponseNeverReceived([Failure(ConnectionRefusedError())]), "connection refused"),
            (ResponseNeverReceived([Failure(ConnectionDone())]), "connection lost"),
            # The underlying message names the host; the reason never does.
            (ConnectError("10.0.0.5:11434", "no route to host"), "cannot connect"),
        ]
        for exception, reason in cases:
            error = describeFailure(Failure(exception))
            self.assertEqual((error.message, error.connection), (reason, True))


class HysteresisTests(PoolFixture, SynchronousTestCase):
    """
    How failures add up: suspect after one, offline after C{down_after}, and probe results
    ordered against request failures.
    """

    def setUp(self) -> None:
        self.setUpPool()
        self.checker = HealthChecker(self.pool, self.net, self.clock, 10, 5, downAfter=3)

    def probe(self, backend: Backend) -> None:
        self.assertIsNone(self.successResultOf(self.checker.probe(backend)))

    def test_suspectThenOffline(self) -> None:
        """
        One failed probe makes an online backend suspect (no new requests, but not yet
        offline); C{down_after} in a row make it offline; one good probe brings it back
        and forgets the count.
        """
        backend, _ = self.addBackend("gpu1", ollamaRoutes(["llama3"]))
        self.probe(backend)
        self.net.down.add("gpu1")
        self.clock.advance(1)
        self.probe(backend)
        self.assertEqual((backend.state, backend.failures), (SUSPECT, 1))
        self.assertFalse(backend.available)
        self.assertEqual(backend.unavailableSince, 1)
        self.probe(backend)
        self.assertEqual(backend.state, SUSPECT)
        self.probe(backend)
        self.assertEqual((backend.state, backend.failures), (OFFLINE, 3))
        self.assertEqual(backend.unavailableSince, 1)
        self.net.down.clear()
        self.probe(backend)
        self.assertEqual((backend.state, backend.failures, backend.unavailableSince),
                         (ONLINE, 0, None))

    def test_requestFailureCounts(self) -> None:
        """
        A request failure (reported by the forwarder) counts like a failed probe.
        """
        backend, _ = self.addBackend("gpu1", ollamaRoutes(["llama3"]))
        self.probe(backend)
        self.pool.markFailed(backend, "backend gpu1 answered 502", self.clock.seconds(), 3)
        self.assertEqual(backend.state, SUSPECT)
        self.net.down.add("gpu1")
        self.probe(backend)
        self.probe(backend)
        self.assertEqual(backend.state, OFFLINE)

    def test_olderProbeDoesNotOverwriteFailure(self) -> None:
        """
        A probe that started before a request failed must not mark the backend online
        with its older news; the backend is probed again instead, and that newer probe
        decides.
        """
        routes = ollamaRoutes(["llama3"])
        backend, fake = self.addBackend("gpu1", routes)
        self.probe(backend)
        routes["/api/tags"] = HANG
        d = self.checker.probe(backend)
        self.clock.advance(1)
        self.pool.markFailed(backend, "backend gpu1 answered 502", self.clock.seconds(), 3)
        routes["/api/tags"] = (200, {"models": [tagEntry("llama3")]})
        held = fake.held[0]
        self.finish(held, {"models": [tagEntry("llama3")]})
        self.successResultOf(d)
        self.assertEqual(backend.state, SUSPECT)
        # The newer probe was scheduled at once and finds the backend well.
        self.clock.advance(0)
        self.net.flush()
        self.assertEqual(backend.state, ONLINE)
        self.assertEqual(fake.requests.count("/api/tags"), 3)

    def test_messagesDialect(self) -> None:
        """
        Ollama serves the Anthropic Messages API from 0.14 on; older ones do not.
        """
        new, _ = self.addBackend("new", ollamaRoutes(["llama3"], version="0.14.1"))
        old, _ = self.addBackend("old", ollamaRoutes(["llama3"], version="0.13.9"))
        self.successResultOf(self.checker.probeAll())
        self.assertEqual(new.dialects, frozenset({"ollama", "openai", "anthropic"}))
        self.assertEqual(old.dialects, frozenset({"ollama", "openai"}))
        self.assertTrue(self.pool.canServe(frozenset({"anthropic"}), "llama3:latest"))
        self.pool.remove("new")
        self.assertFalse(self.pool.canServe(frozenset({"anthropic"}), "llama3:latest"))


class ServiceTests(PoolFixture, SynchronousTestCase):
    """
    Tests for L{HealthChecker.service}.
    """

    def setUp(self) -> None:
        self.setUpPool()
        self.checker = HealthChecker(self.pool, self.net, self.clock, 10, 5)

    def test_startStop(self) -> None:
        """
        The service probes at once when started, every interval afterwards, and not after
        it stopped; L{HealthChecker.service} is always the same service.
        """
        backend, fake = self.addBackend("gpu1", ollamaRoutes(["llama3"]))
        service = self.checker.service()
        self.assertIs(self.checker.service(), service)
        service.startService()
        self.assertEqual(backend.state, ONLINE)
        self.assertEqual(fake.requests.count("/api/tags"), 1)
        self.clock.advance(9)
        self.assertEqual(fake.requests.count("/api/tags"), 1)
        self.clock.advance(1)
        self.assertEqual(fake.requests.count("/api/tags"), 2)
        self.assertIsNone(self.successResultOf(service.stopService()))
        self.assertFalse(service.running)
        self.clock.advance(100)
        self.assertEqual(fake.requests.count("/api/tags"), 2)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_newBackendsNextRound(self) -> None:
        """
        A backend added while the service runs is probed in the next round.
        """
        service = self.checker.service()
        service.startService()
        backend, _ = self.addBackend("late", openaiRoutes(["m"]))
        self.assertEqual(backend.state, UNKNOWN)
        self.clock.advance(10)
        self.assertEqual(backend.state, ONLINE)
        self.successResultOf(service.stopService())

    def test_stopCancelsHungProbe(self) -> None:
        """
        Stopping does not wait for a hung backend's deadline: the probe is cancelled,
        records nothing, and its connection is closed.
        """
        backend, fake = self.addBackend("hung", {"/api/tags": HANG})
        service = self.checker.service()
        service.startService()
        self.assertIsNone(self.successResultOf(service.stopService()))
        self.assertEqual(backend.state, UNKNOWN)
        self.net.flush()
        self.assertEqual(fake.closed, fake.held)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stopCancelsHungDetails(self) -> None:
        """
        A probe cancelled while waiting for C{/api/ps} records nothing either, though
        C{/api/tags} had already answered.
        """
        routes = ollamaRoutes(["llama3"])
        routes["/api/ps"] = HANG
        backend, fake = self.addBackend("gpu1", routes)
        service = self.checker.service()
        service.startService()
        self.assertIsNone(self.successResultOf(service.stopService()))
        self.assertEqual(backend.state, UNKNOWN)
        self.net.flush()
        self.assertEqual(fake.closed, fake.held)

    def test_restart(self) -> None:
        """
        A stopped service starts again.
        """
        backend, fake = self.addBackend("gpu1", ollamaRoutes(["llama3"]))
        service = self.checker.service()
        service.startService()
        self.successResultOf(service.stopService())
        service.startService()
        self.assertEqual(fake.requests.count("/api/tags"), 2)
        self.successResultOf(service.stopService())


class ReconfigureTests(PoolFixture, SynchronousTestCase):
    """
    L{HealthChecker.reconfigure}: a reloaded probe interval applies to the running loop.
    """

    def test_interval(self) -> None:
        """
        After the interval is changed, rounds come at the new interval.
        """
        from ollamamq.config import Config

        self.setUpPool()
        checker = HealthChecker(self.pool, self.net, self.clock, 10, 5)
        backend, fake = self.addBackend("gpu1", ollamaRoutes(["llama3"]))
        service = checker.service()
        service.startService()
        self.clock.advance(10)
        self.assertEqual(fake.requests.count("/api/tags"), 2)
        checker.reconfigure(Config(healthInterval=3.0, probeTimeout=2.0, downAfter=5))
        self.assertEqual((checker.interval, checker.probeTimeout, checker.downAfter),
                         (3.0, 2.0, 5))
        self.clock.advance(10)
        self.clock.advance(3)
        self.assertEqual(fake.requests.count("/api/tags"), 4)
        self.successResultOf(service.stopService())
