"""
Tests for L{ollamamq.usage}: token counts read from Ollama, OpenAI and Anthropic answers
however they are cut into chunks, and the removal of the one usage event the proxy asked
an OpenAI backend for.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from ollamamq.usage import (
    Usage,
    UsageEventFilter,
    UsageMeter,
    askForUsage,
)


def ndjson(*objects: dict) -> bytes:
    """
    Objects as Ollama streams them, one JSON line each.
    """
    return b"".join(json.dumps(o, separators=(",", ":")).encode() + b"\n" for o in objects)


def sse(*objects: dict | str) -> bytes:
    """
    Objects as OpenAI streams them: C{data:} events (a string is sent as is, C{[DONE]}).
    """
    out = b""
    for o in objects:
        payload = o if isinstance(o, str) else json.dumps(o)
        out += b"data: " + payload.encode() + b"\n\n"
    return out


OLLAMA_STREAM = ndjson(
    {"model": "llama3", "response": "The", "done": False},
    {"model": "llama3", "response": " sky \"eval_count\": 999,", "done": False},
    {"model": "llama3", "response": "", "done": True, "total_duration": 2_500_000_000,
     "load_duration": 500_000_000, "prompt_eval_count": 26, "prompt_eval_duration": 1,
     "eval_count": 123, "eval_duration": 7},
)

OPENAI_CHUNK = {"id": "c1", "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": None}],
                "usage": None}
OPENAI_LAST = {"id": "c1", "object": "chat.completion.chunk",
               "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": None}
OPENAI_USAGE = {"id": "c1", "object": "chat.completion.chunk", "choices": [],
                "usage": {"prompt_tokens": 11, "completion_tokens": 42, "total_tokens": 53,
                          "prompt_tokens_details": {"cached_tokens": 3}}}
OPENAI_STREAM = sse(OPENAI_CHUNK, OPENAI_CHUNK, OPENAI_LAST, OPENAI_USAGE, "[DONE]")
OPENAI_STREAM_WITHOUT_USAGE = sse(OPENAI_CHUNK, OPENAI_CHUNK, OPENAI_LAST, "[DONE]")

ANTHROPIC_STREAM = (
    b"event: message_start\ndata: "
    + json.dumps({"type": "message_start", "message": {
        "id": "msg_1", "type": "message", "role": "assistant", "content": [],
        "usage": {"input_tokens": 25, "cache_read_input_tokens": 100,
                  "output_tokens": 1}}}).encode()
    + b"\n\nevent: content_block_delta\ndata: "
    + json.dumps({"type": "content_block_delta", "index": 0,
                  "delta": {"type": "text_delta", "text": "Hello"}}).encode()
    + b"\n\nevent: message_delta\ndata: "
    + json.dumps({"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                  "usage": {"output_tokens": 15}}).encode()
    + b"\n\nevent: message_stop\ndata: {\"type\": \"message_stop\"}\n\n"
)


def meter(body: bytes, cuts: list[int] | None = None) -> Usage:
    """
    Feed C{body} to a new meter, cut at C{cuts} (offsets), and return its usage.
    """
    m = UsageMeter()
    start = 0
    for cut in sorted(cuts or []) + [len(body)]:
        m.feed(body[start:cut])
        start = max(start, cut)
    return m.usage()


class UsageMeterTests(SynchronousTestCase):
    """
    L{UsageMeter} finds each family's counts.
    """

    def test_ollamaStream(self) -> None:
        """
        Ollama's final chunk gives prompt and completion tokens and the durations, in
        seconds; text of the answer that looks like a key is not taken for one.
        """
        self.assertEqual(
            meter(OLLAMA_STREAM),
            Usage(promptTokens=26, completionTokens=123, bytes=len(OLLAMA_STREAM),
                  backendSeconds=2.5, loadSeconds=0.5),
        )

    def test_ollamaWhole(self) -> None:
        """
        A non-streamed Ollama answer (one JSON object, no newline) is read the same way.
        """
        body = json.dumps({"model": "m", "response": "x", "done": True,
                           "prompt_eval_count": 4, "eval_count": 9}).encode()
        usage = meter(body)
        self.assertEqual((usage.promptTokens, usage.completionTokens), (4, 9))

    def test_ollamaCachedPrompt(self) -> None:
        """
        Ollama leaves C{prompt_eval_count} out when the prompt was cached: zero prompt
        tokens, not unknown.
        """
        usage = meter(ndjson({"done": True, "eval_count": 7}))
        self.assertEqual((usage.promptTokens, usage.completionTokens, usage.known),
                         (0, 7, True))

    def test_openaiStream(self) -> None:
        """
        OpenAI's usage chunk gives the counts; its C{cached_tokens} detail is not taken
        for the prompt count.
        """
        usage = meter(OPENAI_STREAM)
        self.assertEqual((usage.promptTokens, usage.completionTokens), (11, 42))

    def test_openaiWhole(self) -> None:
        """
        A non-streamed OpenAI answer's C{usage}, pretty-printed over lines.
        """
        body = json.dumps({"choices": [{"message": {"content": "hi"}}],
                           "usage": {"prompt_tokens": 5, "completion_tokens": 6}},
                          indent=2).encode()
        usage = meter(body)
        self.assertEqual((usage.promptTokens, usage.completionTokens), (5, 6))

    def test_openaiEmbedding(self) -> None:
        """
        An embedding's usage has prompt tokens only: nothing was generated.
        """
        body = json.dumps({"data": [{"embedding": [0.1, 0.2]}],
                           "usage": {"prompt_tokens": 8, "total_tokens": 8}}).encode()
        usage = meter(body)
        self.assertEqual((usage.promptTokens, usage.completionTokens), (8, 0))

    def test_anthropicStream(self) -> None:
        """
        Anthropic's input tokens come from C{message_start}, the output tokens from the
        last C{message_delta} (not the running count in C{message_start}); cache reads are
        not the input count.
        """
        usage = meter(ANTHROPIC_STREAM)
        self.assertEqual((usage.promptTokens, usage.completionTokens), (25, 15))

    def test_anthropicWhole(self) -> None:
        """
        A non-streamed Anthropic message's C{usage}.
        """
        body = json.dumps({"type": "message", "content": [{"type": "text", "text": "x"}],
                           "usage": {"input_tokens": 3, "output_tokens": 2}}).encode()
        usage = meter(body)
        self.assertEqual((usage.promptTokens, usage.completionTokens), (3, 2))

    def test_unknown(self) -> None:
        """
        An answer without counts records its bytes, and the counts as unknown.
        """
        body = b"data: {\"text\": \"no counts here\"}\n\n"
        usage = meter(body)
        self.assertEqual(usage, Usage(bytes=len(body)))
        self.assertFalse(usage.known)

    def test_emptyChunks(self) -> None:
        """
        Empty chunks change nothing.
        """
        m = UsageMeter()
        m.feed(b"")
        m.feed(b"")
        self.assertEqual(m.usage(), Usage())

    @settings(max_examples=200, deadline=None)
    @given(st.sampled_from([OLLAMA_STREAM, OPENAI_STREAM, ANTHROPIC_STREAM]),
           st.lists(st.integers(min_value=0, max_value=2000), max_size=30))
    def test_anyCuts(self, body: bytes, cuts: list[int]) -> None:
        """
        However the body is cut into chunks (a key or a number split between two), the
        counts are those of the whole body.
        """
        cuts = [c % (len(body) + 1) for c in cuts]
        self.assertEqual(meter(body, cuts), meter(body))

    def test_everySingleByte(self) -> None:
        """
        Fed one byte at a time, the meter still finds every count.
        """
        m = UsageMeter()
        for i in range(len(OLLAMA_STREAM)):
            m.feed(OLLAMA_STREAM[i:i + 1])
        self.assertEqual(m.usage(), meter(OLLAMA_STREAM))


class AskForUsageTests(SynchronousTestCase):
    """
    L{askForUsage} turns usage on only where the client did not ask for it and a stream
    would otherwise go unaccounted.
    """

    def test_streamWithoutUsage(self) -> None:
        """
        A streaming chat completion gets C{include_usage}; other options are kept.
        """
        body = {"model": "m", "stream": True, "stream_options": {"other": 1}}
        self.assertEqual(
            askForUsage(b"/v1/chat/completions", body),
            {"model": "m", "stream": True,
             "stream_options": {"other": 1, "include_usage": True}},
        )
        self.assertEqual(body["stream_options"], {"other": 1}, "the client's body is kept")

    def test_usageExplicitlyOff(self) -> None:
        """
        C{include_usage: false} is turned on as well (and the event removed).
        """
        body = {"model": "m", "stream": True, "stream_options": {"include_usage": False}}
        self.assertEqual(askForUsage(b"/v1/completions", body)["stream_options"],
                         {"include_usage": True})

    def test_nothingToDo(self) -> None:
        """
        Already asked for, not streaming, not an OpenAI streaming route, no JSON body, or
        malformed options: nothing changes.
        """
        asked = {"model": "m", "stream": True, "stream_options": {"include_usage": True}}
        for path, body in [
            (b"/v1/chat/completions", asked),
            (b"/v1/chat/completions", {"model": "m"}),
            (b"/v1/chat/completions", {"model": "m", "stream": False}),
            (b"/v1/embeddings", {"model": "m", "stream": True}),
            (b"/api/chat", {"model": "m", "stream": True}),
            (b"/v1/messages", {"model": "m", "stream": True}),
            (b"/v1/chat/completions", None),
            (b"/v1/chat/completions", {"model": "m", "stream": True, "stream_options": 3}),
        ]:
            self.assertIsNone(askForUsage(path, body), (path, body))


def filtered(body: bytes, cuts: list[int]) -> tuple[bytes, list[bytes], UsageEventFilter]:
    """
    Pass C{body}, cut at C{cuts}, through a new filter: what the client gets, in total and
    per chunk.
    """
    f = UsageEventFilter()
    out = []
    start = 0
    for cut in sorted(cuts) + [len(body)]:
        out.append(f.feed(body[start:cut]))
        start = max(start, cut)
    out.append(f.finish())
    return b"".join(out), out, f


class UsageEventFilterTests(SynchronousTestCase):
    """
    L{UsageEventFilter} removes exactly the one usage event.
    """

    def test_removesUsageEvent(self) -> None:
        """
        The client gets the backend's bytes less the usage event and its blank line.
        """
        out, _, f = filtered(OPENAI_STREAM, [])
        self.assertEqual(out, OPENAI_STREAM_WITHOUT_USAGE)
        self.assertEqual(f.removed, 1)

    def test_crlf(self) -> None:
        """
        Events ended by CRLF lines lose the usage event and its CRLF blank line.
        """
        body = OPENAI_STREAM.replace(b"\n", b"\r\n")
        out, _, _ = filtered(body, [])
        self.assertEqual(out, OPENAI_STREAM_WITHOUT_USAGE.replace(b"\n", b"\r\n"))

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.integers(min_value=0, max_value=5000), max_size=40),
           st.booleans())
    def test_anyCuts(self, cuts: list[int], crlf: bool) -> None:
        """
        However the stream is cut, the client gets exactly the stream less that event.
        """
        body, expected = OPENAI_STREAM, OPENAI_STREAM_WITHOUT_USAGE
        if crlf:
            body, expected = body.replace(b"\n", b"\r\n"), expected.replace(b"\n", b"\r\n")
        cuts = [c % (len(body) + 1) for c in cuts]
        self.assertEqual(filtered(body, cuts)[0], expected)

    def test_wholeLinesPassAtOnce(self) -> None:
        """
        A chunk of whole lines is passed on at once, unchanged (no latency is added to a
        token); only the unterminated part of a line waits for its end.
        """
        f = UsageEventFilter()
        first = sse(OPENAI_CHUNK)
        self.assertIs(f.feed(first), first)
        self.assertEqual(f.feed(b"data: {\"par"), b"")
        self.assertEqual(f.feed(b"t\": 1}\n\n"), b"data: {\"part\": 1}\n\n")

    def test_onlyOne(self) -> None:
        """
        Only the first usage event goes; a second one (not the proxy's doing) stays.
        """
        body = sse(OPENAI_USAGE, OPENAI_USAGE, "[DONE]")
        out, _, f = filtered(body, [])
        self.assertEqual(out, sse(OPENAI_USAGE, "[DONE]"))
        self.assertEqual(f.removed, 1)

    def test_usageWithChoicesStays(self) -> None:
        """
        A chunk that has choices as well as usage is content, and is not removed.
        """
        chunk = dict(OPENAI_CHUNK, usage={"prompt_tokens": 1, "completion_tokens": 1})
        body = sse(chunk, "[DONE]")
        self.assertEqual(filtered(body, [])[0], body)

    def test_textMentioningTokens(self) -> None:
        """
        Answer text that mentions a usage key is left alone.
        """
        chunk = dict(OPENAI_CHUNK, choices=[{"index": 0, "delta": {
            "content": '{"choices": [], "usage": {"prompt_tokens": 1}}'}}])
        body = sse(chunk, "[DONE]")
        self.assertEqual(filtered(body, [])[0], body)

    def test_unterminatedTail(self) -> None:
        """
        A last line without its end is passed on when the body ends.
        """
        self.assertEqual(filtered(b"data: x\n\ndata: [DO", [])[0], b"data: x\n\ndata: [DO")

    def test_notLines(self) -> None:
        """
        A body with no line ends at all (not an SSE stream) is not held without bound.
        """
        f = UsageEventFilter()
        big = b"x" * (1024 * 1024 + 1)
        self.assertEqual(f.feed(big), big)
        self.assertEqual(f.feed(b"more"), b"more")


class RelayAccountTests(SynchronousTestCase):
    """
    L{ollamamq.relay.Relay.stream} with a L{StreamAccount}: the client gets the backend's
    stream less the usage event, as it arrives, and the account has the counts.
    """

    def setUp(self) -> None:
        from treq.testing import RequestTraversalAgent, StubTreq
        from twisted.internet.task import Clock
        from twisted.web.resource import Resource
        from twisted.web.server import NOT_DONE_YET

        from ollamamq.backends import Backend
        from ollamamq.errors import OPENAI
        from ollamamq.relay import Relay, requestHeadersForBackend
        from ollamamq.usage import StreamAccount
        from tests.test_relay import HoldingBackend

        self.clock = Clock()
        self.backend = HoldingBackend(b"text/event-stream")
        self.backendHTTP = RequestTraversalAgent(self.backend)
        relay = Relay(self.backendHTTP, self.clock, idleTimeout=30)
        self.accounts: list[StreamAccount] = []
        test = self

        class Front(Resource):
            isLeaf = True

            def render(self, request: Any) -> object:
                from twisted.internet.defer import ensureDeferred

                async def run() -> None:
                    response = await relay.open(
                        Backend(name="b", url="http://backend"), request.method,
                        request.uri, requestHeadersForBackend(request.requestHeaders),
                        request.content.read())
                    account = StreamAccount(test.clock, removeUsageEvent=True)
                    test.accounts.append(account)
                    await relay.stream(request, response, OPENAI, account,
                                       {b"x-ollamamq-backend": b"b"})

                ensureDeferred(run()).addBoth(lambda _: request.finish())
                return NOT_DONE_YET

        self.client = StubTreq(Front())

    def flush(self) -> None:
        for _ in range(3):
            self.backendHTTP.flush()
            self.client.flush()

    def test_streamWithoutTheUsageEvent(self) -> None:
        """
        Each event reaches the client as the backend sends it; the usage event never
        does; the counts are the backend's; the proxy's headers are on the response.
        """
        import treq

        d = self.client.post("http://proxy/v1/chat/completions", data=b"{}", unbuffered=True)
        self.flush()
        backendRequest = self.backend.requests[0]
        backendRequest.write(b"")
        self.flush()
        response = self.successResultOf(d)
        self.assertEqual(response.headers.getRawHeaders(b"x-ollamamq-backend"), [b"b"])
        chunks: list[bytes] = []
        done = treq.collect(response, chunks.append)
        self.clock.advance(0.5)
        backendRequest.write(sse(OPENAI_CHUNK))
        self.flush()
        self.assertEqual(b"".join(chunks), sse(OPENAI_CHUNK))
        self.assertEqual(self.accounts[0].firstByteAt, 0.5)
        for event in (OPENAI_LAST, OPENAI_USAGE, "[DONE]"):
            backendRequest.write(sse(event))
            self.flush()
        backendRequest.finish()
        self.flush()
        self.successResultOf(done)
        self.assertEqual(b"".join(chunks), sse(OPENAI_CHUNK, OPENAI_LAST, "[DONE]"))
        usage = self.accounts[0].usage()
        self.assertEqual((usage.promptTokens, usage.completionTokens), (11, 42))

    def test_knownLengthKept(self) -> None:
        """
        An answer whose length the client was told is relayed whole (cutting it would
        break the framing), usage event and all.
        """
        import treq

        d = self.client.post("http://proxy/v1/chat/completions", data=b"{}", unbuffered=True)
        self.flush()
        backendRequest = self.backend.requests[0]
        body = sse(OPENAI_USAGE, "[DONE]")
        backendRequest.setHeader(b"content-length", b"%d" % len(body))
        backendRequest.write(body)
        backendRequest.finish()
        self.flush()
        response = self.successResultOf(d)
        self.assertEqual(self.successResultOf(treq.content(response)), body)
        self.assertEqual(self.accounts[0].usage().promptTokens, 11)
