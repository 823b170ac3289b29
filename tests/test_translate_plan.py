"""
Tests for L{ollamamq.translate.plan} and its wiring in the request path: the whole proxy
in memory in front of simulated OpenAI-only (and Ollama) backends, so translated
requests are queued, streamed with backpressure, cancelled, and refused like any other.
"""

from __future__ import annotations

import json
from typing import Any

import treq
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http import HTTPChannel, Request

from ollamamq.backends import ANTHROPIC_API, OLLAMA, OLLAMA_API, OPENAI, OPENAI_API, Backend, BackendPool
from ollamamq.translate.common import TranslatedResponse
from ollamamq.translate.plan import Translator
from tests.test_api import CHAT, Proxy, sim

MESSAGES = {"model": "llama3", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]}


def ndjson(body: bytes) -> list[dict]:
    """
    The NDJSON lines of C{body}, decoded.
    """
    return [json.loads(line) for line in body.splitlines()]


class KindsTests(SynchronousTestCase):
    """
    Tests for L{Translator.kindsFor} and L{Translator.needed}: a backend of the
    request's own dialect is preferred, translation is the fallback.
    """

    def setUp(self) -> None:
        self.ollama = Backend("o", "http://o")
        self.openai = Backend("v", "http://v")
        self.pool = BackendPool([self.ollama, self.openai])
        self.pool.markOnline(self.ollama, OLLAMA, ["both:latest"],
                             dialects=(OLLAMA_API, OPENAI_API, ANTHROPIC_API))
        self.pool.markOnline(self.openai, OPENAI, ["both:latest", "only-openai"])
        self.translator = Translator(None, None)  # type: ignore[arg-type]

    def test_nativePreferred(self) -> None:
        """
        A translatable request for a model an available backend of its own dialect has
        needs that dialect; for a model only OpenAI backends have, OpenAI's too.
        """
        ollama, both = frozenset({OLLAMA_API}), frozenset({OLLAMA_API, OPENAI_API})
        self.assertEqual(self.translator.kindsFor(b"/api/chat", "both:latest", self.pool), ollama)
        self.assertEqual(self.translator.kindsFor(b"/api/chat", "only-openai:latest", self.pool), both)
        anthropic = frozenset({ANTHROPIC_API})
        self.assertEqual(self.translator.kindsFor(b"/v1/messages", "both:latest", self.pool), anthropic)
        self.assertEqual(self.translator.kindsFor(b"/v1/messages/count_tokens", "only-openai:latest",
                                                  self.pool), anthropic | {OPENAI_API})
        self.pool.drain("o")
        self.assertEqual(self.translator.kindsFor(b"/api/embed", "both:latest", self.pool), both)

    def test_untranslatableRoutes(self) -> None:
        """
        Other routes keep their own dialect.
        """
        self.assertEqual(self.translator.kindsFor(b"/api/pull", "only-openai:latest", self.pool),
                         frozenset({OLLAMA_API}))
        self.assertEqual(self.translator.kindsFor(b"/api/chat", None, self.pool), frozenset({OLLAMA_API}))
        self.assertEqual(self.translator.kindsFor(b"/v1/chat/completions", "only-openai:latest", self.pool),
                         frozenset({OPENAI_API}))
        self.assertEqual(self.translator.acceptable(b"/v1/embeddings"), frozenset({OPENAI_API}))
        self.assertEqual(self.translator.acceptable(b"/api/generate"), frozenset({OLLAMA_API, OPENAI_API}))

    def test_needed(self) -> None:
        """
        Translatable routes are translated on backends that lack their dialect, and
        Messages on backends found to lack the route.
        """
        self.assertTrue(self.translator.needed(b"/api/chat", self.openai))
        self.assertFalse(self.translator.needed(b"/api/chat", self.ollama))
        self.assertFalse(self.translator.needed(b"/v1/chat/completions", self.openai))
        self.assertTrue(self.translator.needed(b"/v1/messages", self.openai))
        self.assertFalse(self.translator.needed(b"/v1/messages", self.ollama))

        class Missing:
            code = 404

        self.assertFalse(self.translator.lacksMessages(b"/v1/chat/completions", self.ollama, Missing()))
        self.assertTrue(self.translator.lacksMessages(b"/v1/messages", self.ollama, Missing()))
        self.assertTrue(self.translator.needed(b"/v1/messages/count_tokens", self.ollama))
        self.assertFalse(self.translator.needed(b"/api/chat", self.ollama))


class ThroughProxyTests(SynchronousTestCase):
    """
    Ollama and Anthropic clients' requests through the proxy to an OpenAI-only
    simulator.
    """

    def setUp(self) -> None:
        self.proxy = Proxy(self, {"gpu1": sim(name="gpu1", api="openai", tokens=20)})
        self.sim = self.proxy.sims["gpu1"]

    def test_chatStreamsIncrementally(self) -> None:
        """
        A translated chat streams NDJSON lines one token at a time, before the stream
        ends, and ends with C{done}, the finish reason and the backend's token counts.
        """
        d = self.proxy.request("POST", "/api/chat", CHAT, {"X-User-ID": "alice"})
        self.proxy.advance(0.1)
        response = self.successResultOf(d)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/x-ndjson"])
        chunks: list[bytes] = []
        done = treq.collect(response, chunks.append)
        seen = []
        for _ in range(5):
            self.proxy.advance(0.1)
            seen.append(b"".join(chunks).count(b"\n"))
        self.assertNoResult(done)
        self.proxy.advance(3, steps=30)
        self.successResultOf(done)
        self.assertEqual(seen, sorted(seen))
        self.assertGreaterEqual(seen[-1] - seen[0], 3)
        lines = ndjson(b"".join(chunks))
        self.assertEqual(len(lines), 21)
        self.assertTrue(all(line["model"] == "llama3" for line in lines))
        self.assertEqual(lines[-1]["done"], True)
        self.assertEqual(lines[-1]["done_reason"], "stop")
        self.assertEqual(lines[-1]["eval_count"], 20)
        self.assertEqual(lines[-1]["prompt_eval_count"], 2)
        entry = self.sim.stats["log"][-1]
        self.assertEqual((entry["path"], entry["user"]), ("/v1/chat/completions", "alice"))

    def test_wholeAnswers(self) -> None:
        """
        Unstreamed chat, generate, raw generate, embed and embeddings answers come back
        Ollama-shaped.
        """
        response, body = self.proxy.complete("POST", "/api/chat", dict(CHAT, stream=False))
        self.assertEqual(response.headers.getRawHeaders(b"x-sim-backend"), [b"gpu1"])
        self.assertEqual(response.length, len(body))
        answer = json.loads(body)
        self.assertEqual((answer["done"], answer["eval_count"]), (True, 20))
        self.assertEqual(len(answer["message"]["content"].split()), 20)
        _, body = self.proxy.complete("POST", "/api/generate",
                                      {"model": "llama3", "prompt": "hi", "stream": False})
        self.assertEqual(json.loads(body)["eval_count"], 20)
        _, body = self.proxy.complete("POST", "/api/generate",
                                      {"model": "llama3", "prompt": "hi", "raw": True, "stream": False})
        self.assertEqual(self.sim.stats["log"][-1]["path"], "/v1/completions")
        self.assertTrue(json.loads(body)["done"])
        _, body = self.proxy.complete("POST", "/api/embed",
                                      {"model": "nomic-embed-text", "input": ["a", "b"]})
        self.assertEqual(len(json.loads(body)["embeddings"]), 2)
        _, body = self.proxy.complete("POST", "/api/embeddings",
                                      {"model": "nomic-embed-text", "prompt": "a"})
        self.assertIsInstance(json.loads(body)["embedding"][0], float)

    def test_refusedBeforeQueueing(self) -> None:
        """
        What cannot be translated is a 400 at once, Ollama-shaped; the backend never
        sees it, and other requests flow.
        """
        response, body = self.proxy.complete("POST", "/api/generate",
                                             {"model": "llama3", "prompt": "x", "context": [1, 2, 3]})
        self.assertEqual(response.code, 400)
        self.assertIn("'context' cannot be translated", json.loads(body)["error"])
        self.assertEqual(self.sim.stats["requests"], 0)
        response, _ = self.proxy.complete("POST", "/api/chat", dict(CHAT, stream=False))
        self.assertEqual(response.code, 200)

    def test_loadAnsweredLocally(self) -> None:
        """
        Ollama's "load the model" call is answered without the backend.
        """
        response, body = self.proxy.complete("POST", "/api/chat", {"model": "llama3", "messages": []})
        self.assertEqual(ndjson(body)[0]["done_reason"], "load")
        self.assertEqual(self.sim.stats["requests"], 0)
        self.assertEqual(self.proxy.scheduler.active, 0)

    def test_backendError(self) -> None:
        """
        A backend's own error keeps its status and is Ollama-shaped, streamed request
        or not.
        """
        self.sim.failStatus = 500
        for stream in (True, False):
            response, body = self.proxy.complete("POST", "/api/chat", dict(CHAT, stream=stream))
            self.assertEqual(response.code, 500)
            self.assertEqual(set(json.loads(body)), {"error"})
            self.assertIsInstance(json.loads(body)["error"], str)

    def test_disconnectMidStream(self) -> None:
        """
        A client that hangs up mid-stream closes the backend request; the slot is freed.
        """
        d = self.proxy.request("POST", "/api/chat", CHAT)
        self.proxy.advance(0.3, steps=3)
        response = self.successResultOf(d)

        def hangUp(data: bytes) -> None:
            raise RuntimeError("client goes away")

        collected = treq.collect(response, hangUp)
        self.proxy.advance(1, steps=10)
        self.failureResultOf(collected, RuntimeError)
        self.assertEqual(self.sim.stats["cancelled"], 1)
        self.assertEqual(self.proxy.scheduler.active, 0)
        self.flushLoggedErrors(RuntimeError)

    def test_messages(self) -> None:
        """
        A backend without the Messages dialect gets Messages requests as chat
        completions: whole, streamed, and token counts.
        """
        response, body = self.proxy.complete("POST", "/v1/messages", MESSAGES)
        self.assertEqual(response.code, 200)
        message = json.loads(body)
        self.assertEqual((message["type"], message["role"], message["model"]),
                         ("message", "assistant", "llama3"))
        self.assertEqual(message["usage"]["output_tokens"], 20)
        self.assertEqual(message["stop_reason"], "max_tokens")
        self.assertEqual([e["path"] for e in self.sim.stats["log"]], ["/v1/chat/completions"])
        response, body = self.proxy.complete("POST", "/v1/messages", dict(MESSAGES, stream=True))
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"text/event-stream"])
        names = [line[7:] for line in body.decode().splitlines() if line.startswith("event: ")]
        self.assertEqual(names[0], "message_start")
        self.assertEqual(names[-2:], ["message_delta", "message_stop"])
        self.assertEqual(names.count("content_block_delta"), 20)
        response, body = self.proxy.complete("POST", "/v1/messages/count_tokens",
                                             {"model": "llama3", "messages": MESSAGES["messages"]})
        self.assertEqual(json.loads(body), {"input_tokens": 1})

    def test_messagesFallBack(self) -> None:
        """
        A backend that claims the Messages dialect (an Ollama 0.14) but answers it 404
        gets the request again as a chat completion, and later ones translated at once.
        """
        proxy = Proxy(self, {"ollama": sim(name="ollama", version="0.14.0", messages=False)})
        backend = proxy.pool.get("ollama")
        self.assertIn("anthropic", backend.dialects)
        translator = proxy.forwarder.translator
        self.assertFalse(translator.needed(b"/v1/messages", backend))
        response, body = proxy.complete("POST", "/v1/messages", MESSAGES)
        self.assertEqual((response.code, json.loads(body)["type"]), (200, "message"))
        self.assertTrue(translator.needed(b"/v1/messages", backend))
        response, body = proxy.complete("POST", "/v1/messages", MESSAGES)
        self.assertEqual((response.code, json.loads(body)["type"]), (200, "message"))
        # (The simulator logs only the requests it serves, not its 404s.)
        self.assertEqual([e["path"] for e in proxy.sims["ollama"].stats["log"]],
                         ["/v1/chat/completions", "/v1/chat/completions"])

    def test_messagesRefused(self) -> None:
        """
        An untranslatable Messages request is an Anthropic-shaped 400.
        """
        self.proxy.complete("POST", "/v1/messages", MESSAGES)
        response, body = self.proxy.complete("POST", "/v1/messages", dict(MESSAGES, container="c"))
        self.assertEqual(response.code, 400)
        self.assertEqual(json.loads(body)["error"]["type"], "invalid_request_error")

    def test_aggregated(self) -> None:
        """
        C{/api/tags}, C{/api/ps}, C{/api/show} and C{/api/version} answer for the
        OpenAI-only backend's models.
        """
        _, body = self.proxy.complete("GET", "/api/tags")
        self.assertEqual([m["name"] for m in json.loads(body)["models"]],
                         ["llama3:latest", "nomic-embed-text:latest"])
        _, body = self.proxy.complete("GET", "/api/ps")
        self.assertEqual(len(json.loads(body)["models"]), 2)
        response, body = self.proxy.complete("POST", "/api/show", {"model": "llama3"})
        self.assertEqual(response.code, 200)
        self.assertEqual(json.loads(body)["capabilities"], ["completion"])
        self.assertIn("model_info", json.loads(body))
        _, body = self.proxy.complete("GET", "/api/version")
        self.assertEqual(json.loads(body), {"version": "0.12.0"})


class MixedPoolTests(SynchronousTestCase):
    """
    An Ollama and an OpenAI-only backend: native first, translation only for models
    the Ollama backend lacks.
    """

    def test_nativePreferred(self) -> None:
        """
        A model both have goes to Ollama untranslated, even while Ollama is busy; a
        model only the OpenAI backend has is translated there.
        """
        proxy = Proxy(self, {"ollama": sim(name="ollama", models=("llama3:latest",)),
                             "vllm": sim(name="vllm", api="openai", models=("llama3:latest", "qwen3:latest"))})
        busy = proxy.request("POST", "/api/chat", CHAT)
        second = proxy.request("POST", "/api/chat", CHAT)
        proxy.advance(5, steps=50)
        self.successResultOf(busy)
        self.successResultOf(second)
        self.assertEqual(proxy.sims["vllm"].stats["requests"], 0)
        self.assertEqual(proxy.sims["ollama"].stats["requests"], 2)
        _, body = proxy.complete("POST", "/api/chat", dict(CHAT, model="qwen3", stream=False))
        self.assertEqual(json.loads(body)["model"], "qwen3")
        self.assertEqual(proxy.sims["vllm"].stats["log"][-1]["path"], "/v1/chat/completions")


class RelayedStreamTests(SynchronousTestCase):
    """
    A translated stream through the real relay: backpressure, cancellation, and a
    backend failure mid-stream ending the client's stream in its own framing.
    """

    def relayed(self, translator: Any, path: bytes = b"/api/chat",
                family: str = "ollama") -> tuple[HTTPChannel, Any, StringTransport, Any]:
        """
        A client request relaying a translated backend response; returns the client
        channel, the backend response, the backend transport and the relay's Deferred.
        """
        from twisted.internet.task import Clock

        from ollamamq.relay import Relay
        from tests.test_translate_common import _Response

        channel = HTTPChannel()
        channel.makeConnection(StringTransport())
        request = Request(channel)
        request.method, request.uri, request.path, request.clientproto = (
            b"POST", path, path, b"HTTP/1.1")
        backend = _Response()
        done = Relay(None, Clock(), 30).stream(request, TranslatedResponse(backend, translator),
                                               family)
        backendTransport = StringTransport()
        backend.protocol.makeConnection(backendTransport)
        return channel, backend, backendTransport, done

    def test_pausesBackend(self) -> None:
        """
        The backend transport behind a translated response is the client request's
        producer: a client that stops reading pauses the backend; cancelling (the client
        left) stops it.
        """
        from twisted.internet.task import Clock

        from ollamamq.translate.ollama_openai import OllamaStream

        channel, backend, backendTransport, done = self.relayed(
            OllamaStream("m", Clock(), 0, "chat"))
        channel.pauseProducing()
        self.assertEqual(backendTransport.producerState, "paused")
        channel.resumeProducing()
        self.assertEqual(backendTransport.producerState, "producing")
        backend.protocol.dataReceived(b'data: {"choices": [{"index": 0, "delta": {"content": "x"}}]}\n\n')
        self.assertIn(b'"content": "x"', channel.transport.value())
        done.cancel()
        self.assertEqual(backendTransport.producerState, "stopped")
        self.failureResultOf(done)

    def test_failureMidStream(self) -> None:
        """
        A backend that fails mid-stream ends the translated stream with an error line
        (NDJSON for Ollama, an C{error} event for Anthropic), never a silent cut.
        """
        from twisted.internet.task import Clock
        from twisted.python.failure import Failure
        from twisted.web.client import ResponseFailed

        from ollamamq.translate.anthropic_openai import MessagesStream
        from ollamamq.translate.ollama_openai import OllamaStream

        for translator, path, family, expected in (
                (OllamaStream("m", Clock(), 0, "chat"), b"/api/chat", "ollama", b'{"error": "'),
                (MessagesStream("m"), b"/v1/messages", "anthropic", b"event: error\ndata: ")):
            channel, backend, _, done = self.relayed(translator, path, family)
            backend.protocol.dataReceived(b'data: {"choices": [{"index": 0, "delta": {"content": "x"}}]}\n\n')
            backend.protocol.connectionLost(Failure(ResponseFailed([Failure(ConnectionError())])))
            self.successResultOf(done)
            written = channel.transport.value()
            self.assertIn(expected, written)
            self.assertIn(b"backend failed mid-stream", written)


class TrackedTests(SynchronousTestCase):
    """
    Translated requests are observed like any other: the proxy's headers, and the
    backend's token counts read from the translated answer.
    """

    def test_accounted(self) -> None:
        """
        Streamed and whole translated answers (Ollama and Anthropic) carry the request
        id and backend headers and are recorded with the simulator's own token counts.
        """
        from tests.test_tracking import simCounts, trackedProxy

        proxy = trackedProxy(self, {"gpu1": sim(name="gpu1", api="openai", tokens=7)})
        for path, body in (("/api/chat", CHAT), ("/api/chat", dict(CHAT, stream=False)),
                           ("/v1/messages", MESSAGES), ("/v1/messages", dict(MESSAGES, stream=True))):
            response, _ = proxy.complete("POST", path, body)
            self.assertEqual(response.code, 200)
            self.assertEqual(response.headers.getRawHeaders(b"x-ollamamq-backend"), [b"gpu1"])
            self.assertTrue(response.headers.getRawHeaders(b"x-ollamamq-request-id"))
        self.assertEqual([(r.promptTokens, r.completionTokens) for r in proxy.observer.records],
                         simCounts(proxy))
        self.assertEqual([r.route for r in proxy.observer.records],
                         ["/api/chat", "/api/chat", "/v1/messages", "/v1/messages"])
