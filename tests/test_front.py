"""
Tests for L{ollamamq.front}: request targets, methods and body limits, checked when the
headers arrive (on a real L{HTTPChannel}) and again when the request is rendered.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlsplit

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import Site

from ollamamq.access import AccessGate
from ollamamq.channel import guardedChannel
from ollamamq.config import UserConfig
from ollamamq.errors import Forbidden, writeError
from ollamamq.front import (
    FrontResource,
    FrontRules,
    checkTarget,
    dialectsFor,
    familyFor,
)
from ollamamq.limits import RateLimiter
from ollamamq.relay import targetURL


def rules(**kwargs: Any) -> FrontRules:
    """
    Rules with small limits: bodies of 100 bytes, blobs of 1,000; C{/api/tags} takes GET
    and HEAD; blobs need the header C{X-Admin-Key: k}.
    """

    def adminError(headers: Headers) -> Forbidden | None:
        if headers.getRawHeaders(b"x-admin-key") == [b"k"]:
            return None
        return Forbidden("this route needs the admin key", code="admin_only")

    kwargs.setdefault("maxBodyBytes", 100)
    kwargs.setdefault("maxBlobBytes", 1000)
    kwargs.setdefault("allowedMethods",
                      lambda path: ["GET", "HEAD"] if path == b"/api/tags" else [])
    kwargs.setdefault("adminError", adminError)
    return FrontRules(**kwargs)


class Recorder(Resource):
    """
    The route table's stand-in: records what reaches it.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.rendered: list[Any] = []

    def render(self, request: Any) -> bytes:
        self.rendered.append((request.method, request.uri, request.content.read()))
        return b"ok"


class ChannelTests(SynchronousTestCase):
    """
    The front's request class on a real HTTP channel: refusals happen before any body
    byte is accepted, shaped for the route, and close the connection.
    """

    def setUp(self) -> None:
        self.recorder = Recorder()
        self.rules = rules()
        front = FrontResource(self.recorder, self.rules,
                              lambda request, error: writeError(request, error, "ollama"))
        # A memory reactor: the channel's idle timer must not land on the global one.
        site = Site(front, reactor=MemoryReactorClock())
        site.requestFactory = self.rules.requestFactory()
        self.channel = site.buildProtocol(None)
        self.transport = StringTransport()
        self.channel.makeConnection(self.transport)

    def send(self, data: bytes) -> bytes:
        self.channel.dataReceived(data)
        return self.transport.value()

    def answer(self) -> tuple[int, dict, bytes]:
        """
        The status, headers and body of the one answer written so far.
        """
        head, _, body = self.transport.value().partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ")[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b": ")
            headers[name.lower()] = value
        return status, headers, body

    def test_declaredLength(self) -> None:
        """
        A declared Content-Length over the limit is answered 413 (shaped for the route)
        at once, before any body byte, and the connection is closed.
        """
        self.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                  b"Content-Length: 50000000\r\n\r\n")
        status, headers, body = self.answer()
        self.assertEqual(status, 413)
        self.assertEqual(json.loads(body)["error"]["type"], "invalid_request_error")
        self.assertEqual(int(headers[b"content-length"]), len(body))
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.recorder.rendered, [])

    def test_chunkedBody(self) -> None:
        """
        A chunked body is refused once what arrived passes the limit.
        """
        self.send(b"POST /api/chat HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        self.assertEqual(self.send(b"64\r\n" + b"x" * 100 + b"\r\n"), b"")
        self.send(b"64\r\n" + b"x" * 100 + b"\r\n0\r\n\r\n")
        self.assertEqual(self.answer()[0], 413)
        self.assertEqual(self.recorder.rendered, [])

    def test_smallAndBlobBodiesPass(self) -> None:
        """
        Bodies within the limit, and blob uploads within theirs and with the admin key,
        are served; a blob is spooled to a named file, not kept in memory.
        """
        self.send(b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        self.send(b"POST /api/blobs/sha256:ab HTTP/1.1\r\nHost: x\r\nX-Admin-Key: k\r\n"
                  b"Content-Length: 1000\r\n\r\n" + b"x" * 1000)
        self.assertEqual([r[2] for r in self.recorder.rendered], [b"{}", b"x" * 1000])
        self.assertNotIn(b" 413 ", self.transport.value())

    def test_blobOverItsLimit(self) -> None:
        """
        A blob has a limit of its own.
        """
        self.send(b"POST /api/blobs/sha256:ab HTTP/1.1\r\nHost: x\r\nX-Admin-Key: k\r\n"
                  b"Content-Length: 1001\r\n\r\n")
        self.assertEqual(self.answer()[0], 413)

    def test_blobNeedsAdminKeyBeforeBody(self) -> None:
        """
        A blob upload without the admin key is refused when its headers arrive, before
        any of its body is accepted.
        """
        self.send(b"POST /api/blobs/sha256:ab HTTP/1.1\r\nHost: x\r\n"
                  b"Content-Length: 900\r\n\r\n")
        status, _, body = self.answer()
        self.assertEqual((status, json.loads(body)), (403, {"error": "this route needs the admin key"}))
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.recorder.rendered, [])

    def test_targetWithoutSlash(self) -> None:
        """
        A request target without its leading slash is a shaped 400, and nothing is
        rendered (it could be glued onto a backend's base URL).
        """
        self.send(b"POST X/api/generate HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        status, _, body = self.answer()
        self.assertEqual(status, 400)
        self.assertIn("must be a path", json.loads(body)["error"])
        self.assertEqual(self.recorder.rendered, [])

    def test_absoluteForm(self) -> None:
        """
        The absolute form, meant for forward proxies, is refused.
        """
        self.send(b"GET http://10.0.0.5/api/tags HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(self.answer()[0], 400)

    def test_unknownMethod(self) -> None:
        """
        An unknown method is 405 with C{Allow} on a known path and 501 elsewhere, shaped,
        with nothing rendered and nothing logged.
        """
        self.send(b"PROPFIND /api/tags HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, body = self.answer()
        self.assertEqual((status, headers[b"allow"]), (405, b"GET, HEAD"))
        self.assertIn("PROPFIND", json.loads(body)["error"])
        self.setUp()
        self.send(b"PROPFIND /nowhere HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(self.answer()[0], 501)
        self.assertEqual(self.recorder.rendered, [])
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_validRequestRendered(self) -> None:
        """
        A request within every rule reaches the route table with its target intact.
        """
        self.send(b"GET /api/tags?x=1&y=%20 HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(self.recorder.rendered, [(b"GET", b"/api/tags?x=1&y=%20", b"")])


class CheckTests(SynchronousTestCase):
    """
    L{checkTarget}, L{FrontRules.check} and the path classifiers.
    """

    def test_targets(self) -> None:
        """
        Only origin-form targets with URL characters, no empty segment, and UTF-8 paths
        pass.
        """
        for good in (b"/", b"/api/chat", b"/v1/models/llama3:8b", b"/a?b=c/d?e", b"/%C3%A9"):
            self.assertIsNone(checkTarget(good), good)
        for bad, status in ((b"X/api/generate", 400), (b"0/api", 400), (b"*", 400),
                            (b"http://h/api", 400), (b"/api/\x00", 400), (b"/a b", 400),
                            (b"/api#frag", 400), (b"//api/chat", 404), (b"/%FF", 400)):
            error = checkTarget(bad)
            self.assertIsNotNone(error, bad)
            self.assertEqual(error.status, status, bad)

    def test_renderChecksToo(self) -> None:
        """
        L{FrontResource} applies the rules to requests that did not come through the
        front's request class (another L{Site}).
        """
        from treq.testing import StubTreq

        recorder = Recorder()
        front = FrontResource(recorder, rules(),
                              lambda request, error: writeError(request, error, "openai"))
        stub = StubTreq(front)
        response = self.successResultOf(stub.request("PROPFIND", "http://x/api/tags"))
        self.assertEqual(response.code, 405)
        response = self.successResultOf(stub.post("http://x/api/chat", data=b"x" * 101))
        self.assertEqual(response.code, 413)
        self.assertEqual(recorder.rendered, [])

    def test_families(self) -> None:
        """
        One place maps paths to error families and to the dialects that serve them.
        """
        self.assertEqual([familyFor(p) for p in (b"/api/chat", b"/v1/chat/completions",
                                                  b"/v1/messages", b"/")],
                         ["ollama", "openai", "anthropic", "ollama"])
        self.assertEqual(dialectsFor(b"/api/chat"), frozenset({"ollama"}))
        self.assertEqual(dialectsFor(b"/v1/embeddings"), frozenset({"openai"}))
        self.assertEqual(dialectsFor(b"/v1/messages"), frozenset({"anthropic"}))
        self.assertEqual(dialectsFor(b"/other"), frozenset({"ollama", "openai"}))

    def test_targetURL(self) -> None:
        """
        A backend URL is the backend's base, then the target's path and query: no target
        can change the host (C{http://10.0.0.5} + C{0/api} is never C{10.0.0.50}).
        """
        self.assertEqual(targetURL("http://10.0.0.5", b"/api/chat?x=1"),
                         b"http://10.0.0.5/api/chat?x=1")
        self.assertEqual(targetURL("https://h:8443/prefix/", b"/v1/models"),
                         b"https://h:8443/prefix/v1/models")
        with self.assertRaises(ValueError):
            targetURL("http://10.0.0.5", b"0/api/generate")


class _Recording:
    """
    An agent that records every URL the proxy sends a backend, then delegates.
    """

    def __init__(self, agent: Any) -> None:
        self.agent = agent
        self.urls: list[bytes] = []

    def request(self, method: bytes, uri: bytes, headers: Any = None,
                bodyProducer: Any = None) -> Any:
        self.urls.append(uri)
        return self.agent.request(method, uri, headers, bodyProducer)


_PATHS = [b"/", b"/health", b"/api/chat", b"/api/generate", b"/api/tags", b"/api/show",
          b"/v1/chat/completions", b"/v1/models", b"/v1/messages", b"/api/blobs/sha256:0",
          b"/proxy/status", b"/nowhere"]
_TOKEN = st.from_regex(rb"\A[!#$%&'*+.^_`|~0-9A-Za-z-]{1,12}\Z")


def _targets() -> Any:
    """
    Request targets as attackers write them: known paths with odd prefixes, suffixes and
    queries, and arbitrary bytes (a request line cannot hold spaces or line breaks).
    """
    junk = st.binary(max_size=24).map(
        lambda b: b.replace(b" ", b"").replace(b"\r", b"").replace(b"\n", b""))
    known = st.sampled_from(_PATHS)
    return st.one_of(
        known,
        st.tuples(junk, known, junk).map(b"".join),
        st.tuples(known, st.sampled_from([b"?", b"#", b"/../", b"//", b"%00", b"@evil"]),
                  junk).map(b"".join),
        junk.filter(bool),
    )


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=3),
    max_leaves=8,
)


def _bodies() -> Any:
    """
    Request bodies as hostile clients send them: a valid chat, the chat with a field of
    the wrong JSON type, deeply nested JSON, a truncated chat, and arbitrary bytes.
    """
    from tests.test_api import CHAT

    chat = json.dumps(CHAT).encode()
    wrongTypes = st.tuples(st.sampled_from(["model", "stream", "options", "messages",
                                            "keep_alive", "format"]), _JSON).map(
        lambda kv: json.dumps(dict(CHAT, **{kv[0]: kv[1]})).encode())
    nested = st.integers(1, 100_000).map(lambda n: b"[" * n + b"]" * (n % 7))
    truncated = st.integers(0, len(chat) - 1).map(lambda n: chat[:n])
    return st.one_of(st.just(chat), wrongTypes, nested, truncated, st.binary(max_size=64))


# Header names the fuzzer favours: the ones with rules of their own.
_HEADER_NAMES = st.one_of(
    st.sampled_from([b"Authorization", b"x-api-key", b"X-User-ID", b"X-Admin-Key",
                     b"X-Forwarded-For", b"X-Backend", b"Expect", b"Connection"]),
    _TOKEN,
)


class FrontPropertyTests(SynchronousTestCase):
    """
    Arbitrary request targets, methods, header bytes (invalid UTF-8, repeated credential
    headers, keys and proxies' headers), bodies and declared lengths thrown at the whole
    proxy in memory, as the daemon serves it (its guarded HTTP channel, access gate, front,
    route table, scheduler and forwarder, simulated backends), while another user sends a
    well-formed request alongside: the hostile request always gets a well-formed HTTP
    answer, never a 500 or a traceback, never a backend URL outside the backend's base,
    never a backend marked down; the other user's request succeeds.
    """

    @settings(max_examples=200, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow])
    @given(
        method=st.one_of(st.sampled_from([b"GET", b"POST", b"HEAD", b"PUT", b"DELETE",
                                          b"OPTIONS", b"PATCH"]), _TOKEN),
        target=_targets(),
        headers=st.lists(st.tuples(_HEADER_NAMES, st.binary(max_size=30).map(
            lambda b: b.replace(b"\r", b"").replace(b"\n", b""))), max_size=5),
        body=_bodies(),
        lengthDelta=st.sampled_from([0, 0, 0, -3, 5]),
    )
    def test_anyRequest(self, method: bytes, target: bytes,
                        headers: list[tuple[bytes, bytes]], body: bytes,
                        lengthDelta: int) -> None:
        """
        See the class docstring.
        """
        from tests.test_api import CHAT, Proxy, sim

        proxy = Proxy(self, {"a": sim(name="a"), "b": sim(name="b")}, clientTimeout=2.0,
                      adminKey="admin-secret", maxRequestsPerMinute=600,
                      users={"alice": UserConfig(keys=("sk-alice",)),
                             "bystander": UserConfig(keys=("sk-bystander",))})
        recording = _Recording(proxy.relayAgent)
        proxy.relay.agent = proxy.relay.freshAgent = recording
        # As tap.makeService builds it, timers on the proxy's clock.
        site = Site(AccessGate(proxy.api.resource(), proxy.api.identity,
                               RateLimiter(proxy.clock, proxy.config)),
                    reactor=MemoryReactorClock())
        site.requestFactory = proxy.api.frontRules().requestFactory()
        site.protocol = guardedChannel(proxy.clock, proxy.config.clientTimeout,
                                       proxy.config.maxHeaderBytes)

        def connect() -> tuple[Any, StringTransport]:
            peer = IPv4Address("TCP", "10.0.0.9", 4000)
            channel = site.buildProtocol(peer)
            transport = StringTransport(peerAddress=peer)
            channel.makeConnection(transport)
            return channel, transport

        channel, transport = connect()
        other, otherTransport = connect()
        lines = [method + b" " + target + b" HTTP/1.1", b"Host: proxy"]
        lines += [name + b": " + value for name, value in headers
                  if name.lower() not in (b"content-length", b"transfer-encoding", b"host")]
        lines.append(b"Content-Length: %d" % max(0, len(body) + lengthDelta))
        channel.dataReceived(b"\r\n".join(lines) + b"\r\n\r\n" + body)
        chat = json.dumps(CHAT).encode()
        other.dataReceived(
            b"POST /api/chat HTTP/1.1\r\nHost: proxy\r\nAuthorization: Bearer sk-bystander"
            b"\r\nContent-Length: %d\r\n\r\n" % len(chat) + chat)
        proxy.advance(5, steps=50)
        otherAnswer = otherTransport.value()
        self.assertTrue(otherAnswer.startswith(b"HTTP/1.1 200 "), otherAnswer[:300])
        self.assertIn(b'"done": true', otherAnswer.replace(b'"done":true', b'"done": true'))
        answer = transport.value()
        self.assertTrue(answer.startswith(b"HTTP/1.1 "), answer[:80])
        status = int(answer.split(b" ", 2)[1])
        self.assertNotEqual(status, 500, answer[:300])
        self.assertNotIn(b"Traceback", answer)
        for url in recording.urls:
            parts = urlsplit(url)
            self.assertIn(parts.netloc, (b"a", b"b"), url)
            self.assertEqual(parts.scheme, b"http", url)
        self.assertEqual([b.state for b in proxy.pool.backends], ["online", "online"])
        self.assertEqual(self.flushLoggedErrors(), [])
        channel.connectionLost(None)
        other.connectionLost(None)
