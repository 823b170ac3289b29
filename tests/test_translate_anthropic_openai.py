"""
Tests for L{ollamamq.translate.anthropic_openai}: Messages requests as chat completions,
each refusal, and the answers back (whole, and as the Messages event stream).
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from ollamamq.errors import BadGateway, BadRequest
from ollamamq.translate.anthropic_openai import (
    CountWhole,
    MessagesStream,
    MessagesWhole,
    translateRequest,
)
from ollamamq.translate.common import SSEReader, UntranslatableResponse
from tests.test_translate_ollama_openai import chunk, sse

BASE = {"model": "m", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]}


def events(data: bytes) -> list[tuple[str, dict]]:
    """
    The SSE events of C{data}, payloads decoded.
    """
    reader = SSEReader()
    found = reader.feed(data) + reader.close()
    return [(name, json.loads(payload)) for name, payload in found]


class RequestTests(SynchronousTestCase):
    """
    Messages requests as chat completion requests.
    """

    def translate(self, body: dict, path: bytes = b"/v1/messages") -> Any:
        return translateRequest(path, body, "asked", Clock())

    def refused(self, body: dict, words: str, path: bytes = b"/v1/messages") -> None:
        """
        Assert C{body} is refused with a 400 whose message has C{words}.
        """
        error = self.assertRaises(BadRequest, self.translate, body, path)
        self.assertEqual(error.status, 400)
        self.assertIn(words, error.message)

    def test_basic(self) -> None:
        """
        Text messages, the system prompt (text or blocks), C{max_tokens} and the
        sampling fields carry over.
        """
        t = self.translate(dict(BASE, system=[{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                                temperature=0.5, top_p=0.9, top_k=20, stop_sequences=["X"],
                                metadata={"user_id": "u1"}))
        self.assertEqual(t.path, b"/v1/chat/completions")
        self.assertEqual(t.body, {"model": "m", "max_tokens": 64, "stream": False,
                                  "messages": [{"role": "system", "content": "a\n\nb"},
                                               {"role": "user", "content": "hi"}],
                                  "temperature": 0.5, "top_p": 0.9, "top_k": 20, "stop": ["X"],
                                  "user": "u1"})
        t = self.translate(dict(BASE, system="s", stream=True))
        self.assertEqual(t.body["messages"][0], {"role": "system", "content": "s"})
        self.assertEqual(t.body["stream_options"], {"include_usage": True})
        self.assertTrue(t.stream)

    def test_blocks(self) -> None:
        """
        Text and image blocks (base64 and URL) are content parts; tool use and results
        become tool calls and tool messages right after them; earlier thinking is dropped.
        """
        t = self.translate(dict(BASE, messages=[
            {"role": "user", "content": [
                {"type": "text", "text": "look"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}},
                {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}}]},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "hmm", "signature": "s"},
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Paris"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1",
                 "content": [{"type": "text", "text": "sunny"}]},
                {"type": "tool_result", "tool_use_id": "toolu_2", "content": "down", "is_error": True},
                {"type": "text", "text": "and so?"}]}]))
        self.assertEqual(t.body["messages"], [
            {"role": "user", "content": [
                {"type": "text", "text": "look"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                {"type": "image_url", "image_url": {"url": "https://x/y.png"}}]},
            {"role": "assistant", "content": "Checking.", "tool_calls": [
                {"id": "toolu_1", "type": "function",
                 "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"},
            {"role": "tool", "tool_call_id": "toolu_2", "content": "Error: down"},
            {"role": "user", "content": "and so?"}])

    def test_tools(self) -> None:
        """
        Tools are function tools; every tool choice has its OpenAI form.
        """
        tool = {"name": "weather", "description": "d", "input_schema": {"type": "object"}}
        t = self.translate(dict(BASE, tools=[tool], tool_choice={"type": "any",
                                                                 "disable_parallel_tool_use": True}))
        self.assertEqual(t.body["tools"], [{"type": "function", "function": {
            "name": "weather", "description": "d", "parameters": {"type": "object"}}}])
        self.assertEqual((t.body["tool_choice"], t.body["parallel_tool_calls"]), ("required", False))
        for choice, expected in (({"type": "auto"}, "auto"), ({"type": "none"}, "none"),
                                 ({"type": "tool", "name": "weather"},
                                  {"type": "function", "function": {"name": "weather"}})):
            self.assertEqual(self.translate(dict(BASE, tools=[tool], tool_choice=choice))
                             .body["tool_choice"], expected)

    def test_refused(self) -> None:
        """
        Server tools, documents, non-text tool results, other image sources, MCP
        servers, containers, a missing C{max_tokens} and malformed messages are refused.
        """
        self.refused(dict(BASE, tools=[{"type": "web_search_20250305", "name": "web_search"}]),
                     "web_search_20250305")
        self.refused(dict(BASE, messages=[{"role": "user", "content": [
            {"type": "document", "source": {"type": "text", "data": "x"}}]}]), "'document'")
        self.refused(dict(BASE, messages=[{"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "t", "content": [{"type": "image"}]}]}]),
            "only text tool results")
        self.refused(dict(BASE, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "file", "file_id": "f"}}]}]), "image sources")
        self.refused(dict(BASE, mcp_servers=[{"url": "x"}]), "'mcp_servers'")
        self.refused(dict(BASE, container="c"), "'container'")
        self.refused({"model": "m", "messages": BASE["messages"]}, "max_tokens")
        self.refused(dict(BASE, messages=[]), "messages")
        self.refused(dict(BASE, messages=[{"role": "system", "content": "x"}]), "role")
        self.refused(dict(BASE, tool_choice={"type": "sometimes"}), "tool_choice")
        self.refused(dict(BASE, thinking={"type": "maybe"}), "thinking")
        self.refused(dict(BASE, stop_sequences="X"), "stop_sequences")

    def test_countTokens(self) -> None:
        """
        A token count is a one-token, unstreamed completion of the same conversation.
        """
        t = self.translate({"model": "m", "system": "s", "messages": BASE["messages"]},
                           b"/v1/messages/count_tokens")
        self.assertEqual(t.body, {"model": "m", "max_tokens": 1, "stream": False, "messages": [
            {"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]})
        code, _, body = t.whole().translate(200, b'{"choices": [], "usage": {"prompt_tokens": 17}}')
        self.assertEqual((code, json.loads(body)), (200, {"input_tokens": 17}))
        self.assertEqual(CountWhole().translate(200, b'{"choices": []}')[0], 502)


COMPLETION = {"id": "chatcmpl-9", "choices": [{"index": 0, "message": {
    "role": "assistant", "content": "Sunny.", "reasoning_content": "r",
    "tool_calls": [{"id": "call_1", "type": "function",
                    "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}]},
    "finish_reason": "tool_calls"}], "usage": {"prompt_tokens": 7, "completion_tokens": 4}}


class WholeTests(SynchronousTestCase):
    """
    Whole chat completions as messages.
    """

    def test_message(self) -> None:
        """
        Thinking, text and tool use blocks, the stop reason and usage.
        """
        code, kind, body = MessagesWhole("asked").translate(200, json.dumps(COMPLETION).encode())
        self.assertEqual(json.loads(body), {
            "id": "msg_chatcmpl-9", "type": "message", "role": "assistant", "model": "asked",
            "content": [{"type": "thinking", "thinking": "r", "signature": ""},
                        {"type": "text", "text": "Sunny."},
                        {"type": "tool_use", "id": "call_1", "name": "weather", "input": {"city": "Paris"}}],
            "stop_reason": "tool_use", "stop_sequence": None,
            "usage": {"input_tokens": 7, "output_tokens": 4}})

    def test_stopReasons(self) -> None:
        """
        Each finish reason has its stop reason.
        """
        for finish, stop in (("stop", "end_turn"), ("length", "max_tokens"),
                             ("content_filter", "refusal"), (None, "end_turn")):
            answer = {"choices": [{"message": {"content": "x"}, "finish_reason": finish}]}
            body = MessagesWhole("a").translate(200, json.dumps(answer).encode())[2]
            self.assertEqual(json.loads(body)["stop_reason"], stop)

    def test_cachedTokens(self) -> None:
        """
        Prompt tokens read from the server's cache are C{cache_read_input_tokens}, not
        C{input_tokens}, as Anthropic counts them.
        """
        answer = dict(COMPLETION, usage={"prompt_tokens": 16, "completion_tokens": 8,
                                         "prompt_tokens_details": {"cached_tokens": 11}})
        body = MessagesWhole("a").translate(200, json.dumps(answer).encode())[2]
        self.assertEqual(json.loads(body)["usage"], {"input_tokens": 5, "output_tokens": 8,
                                                     "cache_read_input_tokens": 11})

    def test_noThinking(self) -> None:
        """
        With thinking disabled, reasoning is left out.
        """
        body = MessagesWhole("a", thinking=False).translate(200, json.dumps(COMPLETION).encode())[2]
        self.assertEqual([b["type"] for b in json.loads(body)["content"]], ["text", "tool_use"])

    def test_asStream(self) -> None:
        """
        A client that asked for a stream from a backend that answered whole gets the
        event stream of the same message.
        """
        code, kind, body = MessagesWhole("a", stream=True).translate(200, json.dumps(COMPLETION).encode())
        self.assertEqual(kind, b"text/event-stream")
        names = [name for name, _ in events(body)]
        self.assertEqual(names, ["message_start"] + ["content_block_start", "content_block_delta",
                                                     "content_block_stop"] * 3
                         + ["message_delta", "message_stop"])
        self.assertEqual(events(body)[-2][1]["delta"]["stop_reason"], "tool_use")

    def test_errors(self) -> None:
        """
        Backend errors keep their status in Anthropic's shape; untranslatable answers
        are a 502.
        """
        code, _, body = MessagesWhole("a").translate(429, b'{"error": {"message": "busy"}}')
        self.assertEqual((code, json.loads(body)), (429, {"type": "error", "error": {
            "type": "rate_limit_error", "message": "busy"}}))
        self.assertEqual(MessagesWhole("a").translate(200, b"[]")[0], 502)
        bad = {"choices": [{"message": {"tool_calls": [{"function": {"name": "f", "arguments": "{"}}]}}]}
        self.assertEqual(MessagesWhole("a").translate(200, json.dumps(bad).encode())[0], 502)


class StreamTests(SynchronousTestCase):
    """
    Chat completion streams as Messages event streams.
    """

    def test_text(self) -> None:
        """
        The message starts with the first chunk; text deltas are forwarded as they come;
        the end carries the stop reason and usage.
        """
        s = MessagesStream("asked")
        first = events(s.feed(sse(chunk({"role": "assistant", "content": ""}))))
        self.assertEqual(first, [("message_start", {"type": "message_start", "message": {
            "id": "msg_chatcmpl-1", "type": "message", "role": "assistant", "model": "asked",
            "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0}}})])
        self.assertEqual(events(s.feed(sse(chunk({"content": "Hi"})))), [
            ("content_block_start", {"type": "content_block_start", "index": 0,
                                     "content_block": {"type": "text", "text": ""}}),
            ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                     "delta": {"type": "text_delta", "text": "Hi"}})])
        out = events(s.feed(sse(chunk({}, "length"),
                                chunk(usage={"prompt_tokens": 3, "completion_tokens": 1}), "[DONE]")))
        self.assertEqual(out, [
            ("content_block_stop", {"type": "content_block_stop", "index": 0}),
            ("message_delta", {"type": "message_delta",
                               "delta": {"stop_reason": "max_tokens", "stop_sequence": None},
                               "usage": {"input_tokens": 3, "output_tokens": 1}}),
            ("message_stop", {"type": "message_stop"})])
        self.assertEqual(s.finish(), b"")

    def test_thinkingAndTools(self) -> None:
        """
        Reasoning is a thinking block; each tool call is a tool use block whose
        arguments stream as C{input_json_delta} fragments.
        """
        s = MessagesStream("a")
        out = events(s.feed(sse(
            chunk({"reasoning_content": "hm"}),
            chunk({"tool_calls": [{"index": 0, "id": "c1", "function": {"name": "f", "arguments": '{"a"'}}]}),
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]}),
            chunk({"tool_calls": [{"index": 1, "id": "c2", "function": {"name": "g", "arguments": "{}"}}]}),
            chunk({}, "tool_calls"), "[DONE]")))
        blocks = [(n, e.get("index"), e.get("content_block") or e.get("delta")) for n, e in out]
        self.assertEqual(blocks[1:], [
            ("content_block_start", 0, {"type": "thinking", "thinking": "", "signature": ""}),
            ("content_block_delta", 0, {"type": "thinking_delta", "thinking": "hm"}),
            ("content_block_stop", 0, None),
            ("content_block_start", 1, {"type": "tool_use", "id": "c1", "name": "f", "input": {}}),
            ("content_block_delta", 1, {"type": "input_json_delta", "partial_json": '{"a"'}),
            ("content_block_delta", 1, {"type": "input_json_delta", "partial_json": ": 1}"}),
            ("content_block_stop", 1, None),
            ("content_block_start", 2, {"type": "tool_use", "id": "c2", "name": "g", "input": {}}),
            ("content_block_delta", 2, {"type": "input_json_delta", "partial_json": "{}"}),
            ("content_block_stop", 2, None),
            ("message_delta", None, {"stop_reason": "tool_use", "stop_sequence": None}),
            ("message_stop", None, None)])

    def test_noThinking(self) -> None:
        """
        With thinking disabled no thinking block is sent.
        """
        s = MessagesStream("a", thinking=False)
        out = events(s.feed(sse(chunk({"reasoning_content": "hm"}))))
        self.assertEqual([n for n, _ in out], ["message_start"])

    def test_endWithoutDone(self) -> None:
        """
        A stream that ends without C{[DONE]}, even an empty one, still ends the message.
        """
        out = events(MessagesStream("a").finish())
        self.assertEqual([n for n, _ in out], ["message_start", "message_delta", "message_stop"])

    def test_errors(self) -> None:
        """
        A backend error event and a failure are Anthropic C{error} events; an event
        that is not JSON cannot be translated.
        """
        s = MessagesStream("a")
        out = events(s.feed(sse({"error": {"message": "boom"}})))
        self.assertEqual(out, [("error", {"type": "error", "error": {"type": "api_error", "message": "boom"}})])
        self.assertEqual(s.finish(), b"")
        out = events(MessagesStream("a").failed(BadGateway("gone")))
        self.assertEqual(out, [("error", {"type": "error", "error": {"type": "api_error", "message": "gone"}})])
        self.assertRaises(UntranslatableResponse, MessagesStream("a").feed, b"data: nope\n\n")
