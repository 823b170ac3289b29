"""
Tests for L{ollamamq.control.http}: every admin route (success, 400 per bad field, 401
without the key, 404 for unknown names), the loopback rule without an admin key, and the
SSE event stream.
"""

from __future__ import annotations

import json
from typing import Any

import treq
from twisted.internet.address import IPv4Address
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from treq.testing import StubTreq

from ollamamq.config import BackendConfig, Config, ConfigError, UserConfig
from ollamamq.control.http import AdminAPI, _isLoopback

from .controlfixture import ControlFixture

KEY = "s3cret-admin"
ADMIN = {"Authorization": f"Bearer {KEY}"}


class _Root(Resource):
    """
    Mounts the admin app at C{/proxy/} as the proxy's route table does; a request with
    C{X-Test-Peer} comes from that address instead of 127.0.0.1.
    """

    def __init__(self, admin: Any) -> None:
        super().__init__()
        self.putChild(b"proxy", admin)

    def getChildWithDefault(self, path: bytes, request: Any) -> Any:
        peer = request.getHeader(b"x-test-peer")
        if peer is not None:
            request.client = IPv4Address("TCP", peer.decode("ascii"), 4242)
        return super().getChildWithDefault(path, request)


class AdminHarness:
    """
    The admin app on a L{ControlFixture}, behind L{StubTreq}.
    """

    def __init__(self, test: SynchronousTestCase, **configFields: Any) -> None:
        self.test = test
        fields: dict[str, Any] = {
            "backends": (BackendConfig(url="http://gpu1:11434", name="gpu1", slots=1),),
            "users": {"alice": UserConfig(weight=2)},
        }
        fields.update(configFields)
        self.f = ControlFixture(Config(**fields))
        self.admin = AdminAPI(actions=self.f.actions, hub=self.f.hub,
                              identify=lambda headers, peer: (
                                  (headers.getRawHeaders(b"x-user-id") or [peer.encode()])[0]
                              ).decode())
        self.client = StubTreq(_Root(self.admin.resource()))

    def call(self, method: str, path: str, body: Any = None, headers: dict | None = None,
             raw: bytes | None = None) -> tuple[int, Any, Any]:
        """
        Run one request; return (status, decoded JSON body, response headers).
        """
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        d = self.client.request(method, "http://proxy/proxy" + path, data=data,
                                headers=headers if headers is not None else ADMIN)
        self.client.flush()
        response = self.test.successResultOf(d)
        content = self.test.successResultOf(treq.content(response))
        return response.code, json.loads(content) if content else None, response.headers


class RouteTests(SynchronousTestCase):
    """
    Each route with the admin key configured.
    """

    def setUp(self) -> None:
        self.h = AdminHarness(self, adminKey=KEY)

    def assertBadField(self, method: str, path: str, body: Any, field: str) -> None:
        """
        C{body} is refused with a 400 naming C{field}.
        """
        code, answer, _ = self.h.call(method, path, body)
        self.assertEqual((code, answer.get("field")), (400, field), answer)
        self.assertIn(field, answer["error"])

    def test_putUser(self) -> None:
        """
        PUT sets the given fields and answers the user with its runtime fields.
        """
        code, answer, _ = self.h.call("PUT", "/users/alice",
                                      {"priority": "vip", "max_queued": 5, "blocked": False})
        self.assertEqual(code, 200)
        self.assertEqual((answer["priority"], answer["weight"], answer["max_queued"]),
                         ("vip", 2.0, 5))
        self.assertEqual(answer["runtime"], ["priority", "maxQueued"])
        code, answer, _ = self.h.call("PUT", "/users/newbie", {"weight": 3})
        self.assertEqual((code, answer["weight"]), (200, 3.0))

    def test_putUserBadFields(self) -> None:
        """
        Each bad field is a 400 naming it; nothing changes.
        """
        self.assertBadField("PUT", "/users/alice", {"priority": "gold"}, "priority")
        self.assertBadField("PUT", "/users/alice", {"weight": 0}, "weight")
        self.assertBadField("PUT", "/users/alice", {"weight": "heavy"}, "weight")
        self.assertBadField("PUT", "/users/alice", {"weight": None}, "weight")
        self.assertBadField("PUT", "/users/alice", {"max_queued": -1}, "max_queued")
        self.assertBadField("PUT", "/users/alice", {"max_queued": 2.5}, "max_queued")
        self.assertBadField("PUT", "/users/alice", {"blocked": "yes"}, "blocked")
        self.assertBadField("PUT", "/users/alice", {"colour": "red"}, "colour")
        code, answer, _ = self.h.call("PUT", "/users/alice", raw=b"{not json")
        self.assertEqual((code, answer["code"]), (400, "invalid_json"))
        code, answer, _ = self.h.call("PUT", "/users/alice", [1, 2])
        self.assertEqual((code, answer["code"]), (400, "invalid_body"))
        self.assertEqual(self.h.f.actions.user("alice")["runtime"], [])

    def test_deleteUser(self) -> None:
        """
        DELETE drops the runtime policy; an unknown user is a 404.
        """
        self.h.call("PUT", "/users/alice", {"priority": "vip"})
        code, answer, _ = self.h.call("DELETE", "/users/alice")
        self.assertEqual((code, answer["priority"], answer["runtime"]), (200, "normal", []))
        code, answer, _ = self.h.call("DELETE", "/users/nobody")
        self.assertEqual((code, answer["code"]), (404, "unknown_user"))

    def test_ips(self) -> None:
        """
        PUT blocks an address or range (normalised); DELETE lifts it; a bad address is a
        400, an address not blocked a 404.
        """
        code, answer, _ = self.h.call("PUT", "/ips/10.1.2.3/16")
        self.assertEqual((code, answer), (200, {"address": "10.1.0.0/16", "source": "runtime"}))
        code, answer, _ = self.h.call("PUT", "/ips/2001:db8::1")
        self.assertEqual(answer["address"], "2001:db8::1/128")
        self.assertEqual(self.h.f.actions.status()["blocked_ips"],
                         ["10.1.0.0/16", "2001:db8::1/128"])
        code, answer, _ = self.h.call("DELETE", "/ips/10.1.0.0/16")
        self.assertEqual((code, answer), (200, {"address": "10.1.0.0/16"}))
        code, answer, _ = self.h.call("DELETE", "/ips/10.1.0.0/16")
        self.assertEqual((code, answer["code"]), (404, "unknown_address"))
        code, answer, _ = self.h.call("PUT", "/ips/10.1.2.300")
        self.assertEqual((code, answer["field"]), (400, "address"))

    def test_backends(self) -> None:
        """
        POST adds (201), PATCH sets slots, drain/undrain, DELETE removes; duplicates are
        409, unknown names 404, bad fields 400.
        """
        code, answer, _ = self.h.call("POST", "/backends",
                                      {"url": "http://gpu2:11434", "name": "gpu2", "slots": 2})
        self.assertEqual((code, answer["name"], answer["slots"], answer["source"]),
                         (201, "gpu2", 2, "runtime"))
        code, answer, _ = self.h.call("POST", "/backends", {"url": "http://gpu2:1", "name": "gpu2"})
        self.assertEqual((code, answer["code"]), (409, "duplicate_backend"))
        self.assertBadField("POST", "/backends", {"name": "x"}, "url")
        self.assertBadField("POST", "/backends", {"url": "gopher://x"}, "url")
        self.assertBadField("POST", "/backends", {"url": "http://x:1", "slots": 0}, "slots")
        self.assertBadField("POST", "/backends", {"url": "http://x:1", "name": ""}, "name")
        self.assertBadField("POST", "/backends", {"url": "http://x:1", "extra": 1}, "extra")
        code, answer, _ = self.h.call("PATCH", "/backends/gpu2", {"slots": 4})
        self.assertEqual((code, answer["slots"]), (200, 4))
        self.assertBadField("PATCH", "/backends/gpu2", {"slots": -4}, "slots")
        code, answer, _ = self.h.call("POST", "/backends/gpu1/drain")
        self.assertEqual((code, answer["draining"]), (200, True))
        code, answer, _ = self.h.call("POST", "/backends/gpu1/undrain")
        self.assertEqual((code, answer["draining"]), (200, False))
        code, answer, _ = self.h.call("DELETE", "/backends/gpu2")
        self.assertEqual((code, answer), (200, {"name": "gpu2"}))
        for method, path in [("DELETE", "/backends/gpu2"), ("POST", "/backends/gpu2/drain"),
                             ("POST", "/backends/gpu2/undrain")]:
            code, answer, _ = self.h.call(method, path)
            self.assertEqual((code, answer["code"]), (404, "unknown_backend"), path)
        code, answer, _ = self.h.call("PATCH", "/backends/gpu2", {"slots": 1})
        self.assertEqual(code, 404)

    def test_queueAndCancel(self) -> None:
        """
        GET /queue lists queued requests (optionally one user's); DELETE /requests/{id}
        cancels one; an unknown id is a 404.
        """
        self.h.f.enqueue("alice", "r0")
        waiting = self.h.f.enqueue("alice", "r1")
        self.h.f.enqueue("bob", "r2")
        code, answer, _ = self.h.call("GET", "/queue")
        self.assertEqual(code, 200)
        self.assertEqual([(r["id"], r["position"], r["user"]) for r in answer["requests"]],
                         [("r2", 1, "bob"), ("r1", 2, "alice")])
        code, answer, _ = self.h.call("GET", "/queue?user=alice")
        self.assertEqual([r["id"] for r in answer["requests"]], ["r1"])
        code, answer, _ = self.h.call("DELETE", "/requests/r1")
        self.assertEqual((code, answer), (200, {"id": "r1"}))
        self.assertEqual(waiting.outcome[0].value.code, "cancelled")
        code, answer, _ = self.h.call("DELETE", "/requests/r1")
        self.assertEqual((code, answer["code"]), (404, "unknown_request"))

    def test_queueMine(self) -> None:
        """
        GET /queue/me needs no key and shows the caller's own requests only.
        """
        self.h.f.enqueue("alice", "r0")
        self.h.f.enqueue("alice", "r1")
        self.h.f.enqueue("bob", "r2")
        code, answer, _ = self.h.call("GET", "/queue/me", headers={"X-User-ID": "alice"})
        self.assertEqual((code, answer["user"]), (200, "alice"))
        self.assertEqual([(r["id"], r["position"]) for r in answer["requests"]], [("r1", 2)])

    def test_reload(self) -> None:
        """
        POST /reload answers what changed; a broken config is a 400 with the reason.
        """
        self.h.f.nextConfig = Config(
            backends=self.h.f.config.backends, users={"alice": UserConfig(weight=5)},
            adminKey=KEY,
        )
        code, answer, _ = self.h.call("POST", "/reload")
        self.assertEqual((code, answer), (200, {"changes": ["user alice changed"]}))
        self.h.f.nextConfig = ConfigError("server.timeout: expected a positive number, got 0")
        code, answer, _ = self.h.call("POST", "/reload")
        self.assertEqual((code, answer["code"]), (400, "reload_failed"))
        self.assertIn("server.timeout", answer["error"])

    def test_unknownRouteAndMethod(self) -> None:
        """
        Unknown paths below /proxy are shaped 404s; a wrong method a 405 with Allow.
        """
        code, answer, _ = self.h.call("GET", "/nothing-here")
        self.assertEqual((code, answer["code"]), (404, "unknown_route"))
        code, answer, headers = self.h.call("GET", "/users/alice")
        self.assertEqual(code, 405)
        self.assertEqual(headers.getRawHeaders("allow"), ["DELETE, PUT"])

    def test_needsKey(self) -> None:
        """
        Every write, the queue and the events answer 401 without the key or with a
        wrong one, with C{WWW-Authenticate}; C{X-Admin-Key} works too.
        """
        routes = [
            ("PUT", "/users/alice"), ("DELETE", "/users/alice"), ("PUT", "/ips/10.0.0.1"),
            ("DELETE", "/ips/10.0.0.1"), ("POST", "/backends"), ("DELETE", "/backends/gpu1"),
            ("PATCH", "/backends/gpu1"), ("POST", "/backends/gpu1/drain"),
            ("POST", "/backends/gpu1/undrain"), ("GET", "/queue"),
            ("DELETE", "/requests/r1"), ("POST", "/reload"), ("GET", "/events"),
        ]
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"X-Admin-Key": "wrong"},
                        {"Authorization": KEY}):
            for method, path in routes:
                code, answer, response = self.h.call(method, path, headers=headers)
                self.assertEqual(code, 401, (method, path, headers))
                self.assertTrue(answer["code"].startswith("admin_key"))
                self.assertEqual(response.getRawHeaders("www-authenticate"),
                                 ['Bearer realm="ollamamq admin"'])
        self.assertFalse(self.h.f.pool.get("gpu1").draining)
        code, _, _ = self.h.call("POST", "/backends/gpu1/drain", headers={"X-Admin-Key": KEY})
        self.assertEqual(code, 200)

    def test_keyNotNeededFromLoopbackWhenConfigured(self) -> None:
        """
        With a key configured, loopback gets no pass: the key is needed from anywhere.
        """
        code, _, _ = self.h.call("POST", "/backends/gpu1/drain",
                                 headers={"X-Test-Peer": "127.0.0.1"})
        self.assertEqual(code, 401)


class NoKeyTests(SynchronousTestCase):
    """
    With no admin key configured, admin requests are taken from loopback peers only.
    """

    def setUp(self) -> None:
        self.h = AdminHarness(self)

    def test_loopbackOnly(self) -> None:
        """
        A loopback peer may write; any other peer gets a 403 and nothing changes.
        """
        code, answer, _ = self.h.call("POST", "/backends/gpu1/drain",
                                      headers={"X-Test-Peer": "192.0.2.10"})
        self.assertEqual((code, answer["code"]), (403, "admin_loopback_only"))
        self.assertFalse(self.h.f.pool.get("gpu1").draining)
        code, answer, _ = self.h.call("GET", "/queue", headers={"X-Test-Peer": "10.0.0.1"})
        self.assertEqual(code, 403)
        code, _, _ = self.h.call("POST", "/backends/gpu1/drain", headers={})
        self.assertEqual(code, 200)
        self.assertTrue(self.h.f.pool.get("gpu1").draining)

    def test_isLoopback(self) -> None:
        """
        Loopback addresses in every spelling count, others and non-addresses do not.
        """
        for host in ("127.0.0.1", "127.1.2.3", "::1", "::ffff:127.0.0.1"):
            self.assertTrue(_isLoopback(host), host)
        for host in ("10.0.0.1", "::ffff:10.0.0.1", "2001:db8::1", "localhost", "", None):
            self.assertFalse(_isLoopback(host), host)


class EventStreamTests(SynchronousTestCase):
    """
    C{GET /proxy/events}: the event stream as Server-Sent Events.
    """

    def setUp(self) -> None:
        self.h = AdminHarness(self, adminKey=KEY)
        d = self.h.client.get("http://proxy/proxy/events", headers=ADMIN, unbuffered=True)
        self.h.client.flush()
        self.response = self.successResultOf(d)
        self.chunks: list[bytes] = []
        self.done = treq.collect(self.response, self.chunks.append)
        self.h.client.flush()

    def events(self) -> list[tuple[str, dict]]:
        """
        The events received so far, parsed.
        """
        text = b"".join(self.chunks).decode()
        result = []
        for block in text.split("\n\n"):
            lines = dict(line.split(": ", 1) for line in block.splitlines() if not line.startswith(":"))
            if "event" in lines:
                result.append((lines["event"], json.loads(lines["data"])))
        return result

    def test_stream(self) -> None:
        """
        Events arrive as they happen, as C{event:}/C{data:} blocks, after a comment line.
        """
        self.assertEqual(self.response.headers.getRawHeaders("content-type"),
                         ["text/event-stream; charset=utf-8"])
        self.assertTrue(b"".join(self.chunks).startswith(b": connected\n\n"))
        self.h.f.enqueue("alice", "r0")
        self.h.f.actions.drainBackend("gpu1")
        self.h.client.flush()
        self.assertEqual([n for n, _ in self.events()],
                         ["request.queued", "request.started", "backend.changed"])
        self.assertEqual(self.events()[0][1]["id"], "r0")

    def test_disconnectUnsubscribes(self) -> None:
        """
        A client that goes away is unsubscribed.
        """
        self.assertEqual(self.h.f.hub.subscribers, 2)
        # The client drops the connection mid-stream.
        self.response.original._transport.stopProducing()
        self.h.client.flush()
        self.failureResultOf(self.done)
        self.assertEqual(self.h.f.hub.subscribers, 1)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_slowClientBounded(self) -> None:
        """
        While the connection is paused (the client's socket is full) events are counted,
        not buffered; on resume the client is told how many it missed.
        """
        [sse] = [s for s in self.h.f.hub._subscribers if hasattr(s, "pauseProducing")]
        sse.pauseProducing()
        before = len(b"".join(self.chunks))
        for i in range(1000):
            self.h.f.enqueue(f"u{i}", f"r{i}")
        self.h.client.flush()
        self.assertEqual(len(b"".join(self.chunks)), before)
        sse.resumeProducing()
        self.h.client.flush()
        name, payload = self.events()[-1]
        self.assertEqual(name, "events.dropped")
        self.assertGreaterEqual(payload["count"], 1000)
