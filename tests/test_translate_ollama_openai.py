"""
Tests for L{ollamamq.translate.ollama_openai}: every mapped field of Ollama requests,
each refusal, and OpenAI answers (streamed and whole) back into Ollama's shape.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from ollamamq.errors import BadGateway, BadRequest
from ollamamq.translate.common import UntranslatableResponse
from ollamamq.translate.ollama_openai import (
    EmbedWhole,
    OllamaStream,
    OllamaWhole,
    imageURI,
    translateRequest,
)

PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 20).decode()
JPEG = base64.b64encode(b"\xff\xd8\xff\xe0" + b"\0" * 20).decode()
WEBP = base64.b64encode(b"RIFF\0\0\0\0WEBPVP8 " + b"\0" * 20).decode()
GIF = base64.b64encode(b"GIF89a" + b"\0" * 20).decode()

USER = [{"role": "user", "content": "hi"}]


def sse(*chunks: Any) -> bytes:
    """
    An OpenAI stream of C{chunks} (dicts, or raw strings such as C{[DONE]}).
    """
    return b"".join(
        b"data: " + (c.encode() if isinstance(c, str) else json.dumps(c).encode()) + b"\n\n"
        for c in chunks)


def lines(data: bytes) -> list[dict]:
    """
    The NDJSON lines of C{data}, decoded.
    """
    return [json.loads(line) for line in data.splitlines()]


class RequestTests(SynchronousTestCase):
    """
    Ollama requests as OpenAI requests.
    """

    def setUp(self) -> None:
        self.clock = Clock()

    def translate(self, path: bytes, body: dict) -> Any:
        return translateRequest(path, body, "asked", self.clock)

    def refused(self, path: bytes, body: dict, words: str) -> None:
        """
        Assert C{body} on C{path} is refused with a 400 whose message has C{words}.
        """
        error = self.assertRaises(BadRequest, self.translate, path, body)
        self.assertEqual(error.status, 400)
        self.assertIn(words, error.message)

    def test_chatBasic(self) -> None:
        """
        A chat is a chat completion; Ollama streams by default, so the request streams
        and asks for the usage chunk.
        """
        t = self.translate(b"/api/chat", {"model": "m", "messages": USER})
        self.assertEqual(t.path, b"/v1/chat/completions")
        self.assertEqual(t.body, {"model": "m", "messages": USER, "stream": True,
                                  "stream_options": {"include_usage": True}})
        self.assertTrue(t.stream)
        t = self.translate(b"/api/chat", {"model": "m", "messages": USER, "stream": False})
        self.assertEqual(t.body["stream"], False)
        self.assertNotIn("stream_options", t.body)
        self.assertFalse(t.stream)

    def test_images(self) -> None:
        """
        Base64 images become data URIs of their sniffed type, next to the text.
        """
        t = self.translate(b"/api/chat", {"model": "m", "messages": [
            {"role": "user", "content": "what is it", "images": [PNG, JPEG]}]})
        self.assertEqual(t.body["messages"][0]["content"], [
            {"type": "text", "text": "what is it"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + PNG}},
            {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + JPEG}}])
        self.assertEqual(imageURI(WEBP, "x"), "data:image/webp;base64," + WEBP)
        self.assertEqual(imageURI(GIF, "x"), "data:image/gif;base64," + GIF)
        self.assertEqual(imageURI("data:image/png;base64,AAAA", "x"), "data:image/png;base64,AAAA")

    def test_badImages(self) -> None:
        """
        An image that is not base64, of an unknown type, or not a string is refused.
        """
        for image in ("not base64!", base64.b64encode(b"BM bitmap data").decode(), 7):
            self.refused(b"/api/chat", {"model": "m", "messages": [
                {"role": "user", "content": "x", "images": [image]}]}, "image")

    def test_toolCalls(self) -> None:
        """
        Tools pass as they are; an assistant's tool calls get ids and JSON-text
        arguments; each tool result answers the oldest pending call, or the one of its
        C{tool_name}.
        """
        tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
        t = self.translate(b"/api/chat", {"model": "m", "tools": tools, "messages": [
            {"role": "user", "content": "weather in Paris and time?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"function": {"name": "weather", "arguments": {"city": "Paris"}}},
                {"function": {"name": "clock", "arguments": {}}}]},
            {"role": "tool", "tool_name": "clock", "content": "noon"},
            {"role": "tool", "content": "sunny"}]})
        self.assertEqual(t.body["tools"], tools)
        assistant, first, second = t.body["messages"][1:]
        self.assertEqual(assistant["tool_calls"], [
            {"id": "call_1", "type": "function",
             "function": {"name": "weather", "arguments": '{"city": "Paris"}'}},
            {"id": "call_2", "type": "function", "function": {"name": "clock", "arguments": "{}"}}])
        self.assertEqual(first, {"role": "tool", "tool_call_id": "call_2", "content": "noon", "name": "clock"})
        self.assertEqual(second, {"role": "tool", "tool_call_id": "call_1", "content": "sunny"})

    def test_badTools(self) -> None:
        """
        A tool that is not a named function, or a malformed tool call, is refused.
        """
        self.refused(b"/api/chat", {"model": "m", "messages": USER,
                                    "tools": [{"type": "retrieval"}]}, "tools[0]")
        self.refused(b"/api/chat", {"model": "m", "messages": [
            {"role": "assistant", "tool_calls": [{"function": {}}]}]}, "tool_calls[0]")

    def test_messagesRefused(self) -> None:
        """
        Unknown roles, non-text content and non-list messages are refused.
        """
        self.refused(b"/api/chat", {"model": "m", "messages": [{"role": "robot", "content": "x"}]}, "role")
        self.refused(b"/api/chat", {"model": "m", "messages": [{"role": "user", "content": [1]}]}, "content")
        self.refused(b"/api/chat", {"model": "m", "messages": "hi"}, "messages")

    def test_format(self) -> None:
        """
        C{format: "json"} is a JSON object answer, a schema is C{json_schema}; anything
        else is refused.
        """
        t = self.translate(b"/api/chat", {"model": "m", "messages": USER, "format": "json"})
        self.assertEqual(t.body["response_format"], {"type": "json_object"})
        schema = {"type": "object", "properties": {"age": {"type": "integer"}}}
        t = self.translate(b"/api/chat", {"model": "m", "messages": USER, "format": schema})
        self.assertEqual(t.body["response_format"], {
            "type": "json_schema", "json_schema": {"name": "response", "schema": schema, "strict": True}})
        self.refused(b"/api/chat", {"model": "m", "messages": USER, "format": "yaml"}, "format")

    def test_options(self) -> None:
        """
        Sampling options map to their OpenAI (or llama.cpp) names, C{num_predict} to
        C{max_tokens}, a single C{stop} to a list; nulls, negative C{num_predict} and
        load-time options are not sent.
        """
        options = {"temperature": 0.2, "top_p": 0.9, "top_k": 40, "seed": 7, "stop": "END",
                   "num_predict": 64, "min_p": 0.05, "repeat_penalty": 1.1, "presence_penalty": 0.1,
                   "frequency_penalty": 0.2, "typical_p": 0.9, "repeat_last_n": 32, "mirostat": 2,
                   "mirostat_tau": 5.0, "mirostat_eta": 0.1, "num_keep": 4,
                   "num_ctx": 8192, "num_gpu": 99, "num_thread": 8, "use_mmap": True, "tfs_z": None}
        t = self.translate(b"/api/chat", {"model": "m", "messages": USER, "options": options,
                                          "keep_alive": "5m"})
        for name in ("temperature", "top_p", "top_k", "seed", "min_p", "repeat_penalty",
                     "presence_penalty", "frequency_penalty", "typical_p", "repeat_last_n",
                     "mirostat", "mirostat_tau", "mirostat_eta"):
            self.assertEqual(t.body[name], options[name], name)
        self.assertEqual(t.body["max_tokens"], 64)
        self.assertEqual(t.body["n_keep"], 4)
        self.assertEqual(t.body["stop"], ["END"])
        for name in ("num_ctx", "num_gpu", "num_thread", "use_mmap", "tfs_z", "keep_alive", "options"):
            self.assertNotIn(name, t.body)
        t = self.translate(b"/api/chat", {"model": "m", "messages": USER, "options": {"num_predict": -1}})
        self.assertNotIn("max_tokens", t.body)

    def test_optionsRefused(self) -> None:
        """
        Options with no equivalent are refused, all named; so are non-object options
        and a non-integer C{num_predict}.
        """
        self.refused(b"/api/chat", {"model": "m", "messages": USER,
                                    "options": {"tfs_z": 0.9, "penalize_newline": True}},
                     "penalize_newline, tfs_z")
        self.refused(b"/api/chat", {"model": "m", "messages": USER, "options": [1]}, "options")
        self.refused(b"/api/chat", {"model": "m", "messages": USER,
                                    "options": {"num_predict": "many"}}, "num_predict")

    def test_think(self) -> None:
        """
        Thinking levels are C{reasoning_effort}; true or false send nothing (false drops
        the reasoning from the answer); other values are refused.
        """
        t = self.translate(b"/api/chat", {"model": "m", "messages": USER, "think": "high"})
        self.assertEqual(t.body["reasoning_effort"], "high")
        for think in (True, False):
            t = self.translate(b"/api/chat", {"model": "m", "messages": USER, "think": think})
            self.assertNotIn("reasoning_effort", t.body)
        self.refused(b"/api/chat", {"model": "m", "messages": USER, "think": "max"}, "think")

    def test_logprobs(self) -> None:
        """
        C{logprobs} and C{top_logprobs} pass on.
        """
        t = self.translate(b"/api/chat", {"model": "m", "messages": USER, "logprobs": True,
                                          "top_logprobs": 3})
        self.assertEqual((t.body["logprobs"], t.body["top_logprobs"]), (True, 3))

    def test_generate(self) -> None:
        """
        A templated generate is a chat completion: the system prompt, then the prompt
        (with its images) as the user's message; C{format} applies.
        """
        t = self.translate(b"/api/generate", {"model": "m", "prompt": "why?", "system": "be brief",
                                              "images": [PNG], "format": "json", "stream": False})
        self.assertEqual(t.path, b"/v1/chat/completions")
        self.assertEqual(t.body["messages"], [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "why?"}, {
                "type": "image_url", "image_url": {"url": "data:image/png;base64," + PNG}}]}])
        self.assertEqual(t.body["response_format"], {"type": "json_object"})

    def test_generateRaw(self) -> None:
        """
        A raw generate is a plain completion of the prompt.
        """
        t = self.translate(b"/api/generate", {"model": "m", "prompt": "1, 2,", "raw": True,
                                              "options": {"num_predict": 3}})
        self.assertEqual(t.path, b"/v1/completions")
        self.assertEqual(t.body, {"model": "m", "prompt": "1, 2,", "stream": True,
                                  "stream_options": {"include_usage": True}, "max_tokens": 3})

    def test_generateRefused(self) -> None:
        """
        A token context, a template, a suffix, a non-string prompt, and a raw prompt
        with images, a system prompt, a format or thinking are refused.
        """
        self.refused(b"/api/generate", {"model": "m", "prompt": "x", "context": [1, 2]}, "'context'")
        self.refused(b"/api/generate", {"model": "m", "prompt": "x", "template": "{{ .Prompt }}"}, "'template'")
        self.refused(b"/api/generate", {"model": "m", "prompt": "x", "suffix": "end"}, "'suffix'")
        self.refused(b"/api/generate", {"model": "m", "prompt": 5}, "prompt")
        for extra in ({"images": [PNG]}, {"system": "s"}, {"format": "json"}, {"think": True}):
            self.refused(b"/api/generate", {"model": "m", "prompt": "x", "raw": True, **extra},
                         repr(next(iter(extra))))

    def test_load(self) -> None:
        """
        An empty chat or prompt is Ollama's load call, with C{keep_alive: 0} its unload
        call: answered without the backend.
        """
        t = self.translate(b"/api/chat", {"model": "m", "messages": []})
        self.assertEqual(t.local, {"model": "asked", "created_at": "1970-01-01T00:00:00.000000Z",
                                   "message": {"role": "assistant", "content": ""},
                                   "done_reason": "load", "done": True})
        t = self.translate(b"/api/generate", {"model": "m", "keep_alive": 0})
        self.assertEqual(t.local["done_reason"], "unload")
        self.assertEqual(t.local["response"], "")

    def test_embed(self) -> None:
        """
        C{/api/embed} inputs (one or many) are an embeddings request of floats; an empty
        input is answered at once.
        """
        t = self.translate(b"/api/embed", {"model": "m", "input": "one", "truncate": True,
                                           "options": {"num_ctx": 512}})
        self.assertEqual((t.path, t.body), (b"/v1/embeddings", {
            "model": "m", "input": ["one"], "encoding_format": "float"}))
        t = self.translate(b"/api/embed", {"model": "m", "input": ["a", "b"], "dimensions": 2})
        self.assertEqual(t.body["input"], ["a", "b"])
        self.assertNotIn("dimensions", t.body)
        self.assertEqual(self.translate(b"/api/embed", {"model": "m", "input": []}).local["embeddings"], [])

    def test_embedRefused(self) -> None:
        """
        Non-text inputs, bad dimensions and unknown options are refused.
        """
        self.refused(b"/api/embed", {"model": "m", "input": [1, 2]}, "input")
        self.refused(b"/api/embed", {"model": "m", "input": "x", "dimensions": 0}, "dimensions")
        self.refused(b"/api/embed", {"model": "m", "input": "x", "options": {"bogus": 1}}, "bogus")

    def test_embeddings(self) -> None:
        """
        The legacy C{/api/embeddings} prompt is one input; an empty prompt is answered at
        once with an empty embedding, as Ollama does.
        """
        t = self.translate(b"/api/embeddings", {"model": "m", "prompt": "x"})
        self.assertEqual(t.body["input"], ["x"])
        self.assertEqual(self.translate(b"/api/embeddings", {"model": "m", "prompt": ""}).local,
                         {"embedding": []})
        self.refused(b"/api/embeddings", {"model": "m", "prompt": ["x"]}, "prompt")

    def test_otherRoute(self) -> None:
        """
        A route with no translation is refused.
        """
        self.refused(b"/api/pull", {"model": "m"}, "/api/pull")


def chunk(delta: dict | None = None, finish: str | None = None, **extra: Any) -> dict:
    """
    An OpenAI chat completion chunk.
    """
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
            "model": "m", "choices": choices, **extra}


class StreamTests(SynchronousTestCase):
    """
    OpenAI streams as Ollama NDJSON.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)

    def stream(self, kind: str = "chat", **kwargs: Any) -> OllamaStream:
        return OllamaStream("asked", self.clock, 1000, kind, **kwargs)

    def test_content(self) -> None:
        """
        Each content delta is a line at once; the final line has C{done}, the finish
        reason, the usage counts and llama-server's timings as nanoseconds.
        """
        s = self.stream()
        self.assertEqual(s.feed(sse(chunk({"role": "assistant", "content": ""}))), b"")
        self.clock.advance(0.5)
        # An event is complete at its empty line, not before.
        self.assertEqual(s.feed(sse(chunk({"content": "Hel"}))[:-1]), b"")
        self.assertEqual(lines(s.feed(b"\n")),
                         [{"model": "asked", "created_at": "1970-01-01T00:16:40.500000Z",
                           "message": {"role": "assistant", "content": "Hel"}, "done": False}])
        self.assertEqual(lines(s.feed(sse(chunk({"content": "lo"})))),
                         [{"model": "asked", "created_at": "1970-01-01T00:16:40.500000Z",
                           "message": {"role": "assistant", "content": "lo"}, "done": False}])
        self.clock.advance(1)
        out = s.feed(sse(chunk({}, "length"),
                         chunk(usage={"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11},
                               timings={"prompt_n": 9, "prompt_ms": 12.5, "predicted_n": 2,
                                        "predicted_ms": 40.25}),
                         "[DONE]"))
        self.assertEqual(lines(out), [{
            "model": "asked", "created_at": "1970-01-01T00:16:41.500000Z",
            "message": {"role": "assistant", "content": ""}, "done": True, "done_reason": "length",
            "total_duration": 1500000000, "load_duration": 0, "prompt_eval_count": 9,
            "prompt_eval_duration": 12500000, "eval_count": 2, "eval_duration": 40250000}])
        self.assertEqual(s.feed(b"data: late\n\n"), b"")
        self.assertEqual(s.finish(), b"")

    def test_measuredDurations(self) -> None:
        """
        Without timings, durations are measured: to the first token, then to the end.
        """
        s = self.stream()
        self.clock.advance(0.25)
        s.feed(sse(chunk({"content": "a"})))
        self.clock.advance(1)
        final = lines(s.feed(sse(chunk({}, "stop"), "[DONE]")))[-1]
        self.assertEqual((final["prompt_eval_duration"], final["eval_duration"],
                          final["total_duration"]), (250000000, 1000000000, 1250000000))
        self.assertNotIn("eval_count", final)

    def test_thinking(self) -> None:
        """
        C{reasoning_content} is C{message.thinking}, unless thinking was turned off.
        """
        s = self.stream()
        self.assertEqual(lines(s.feed(sse(chunk({"reasoning_content": "hmm"}))))[0]["message"],
                         {"role": "assistant", "content": "", "thinking": "hmm"})
        s = self.stream(thinking=False)
        self.assertEqual(s.feed(sse(chunk({"reasoning_content": "hmm"}))), b"")

    def test_toolCalls(self) -> None:
        """
        Tool call fragments are collected until the finish reason, then sent as one
        line with object arguments; C{tool_calls} finishes as C{stop}, as in Ollama.
        """
        s = self.stream()
        out = s.feed(sse(
            chunk({"tool_calls": [{"index": 0, "id": "c1", "type": "function",
                                   "function": {"name": "weather", "arguments": ""}}]}),
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]}),
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}),
            chunk({"tool_calls": [{"index": 1, "id": "c2", "function": {"name": "clock"}}]})))
        self.assertEqual(out, b"")
        out = lines(s.feed(sse(chunk({}, "tool_calls"), "[DONE]")))
        self.assertEqual(out[0]["message"]["tool_calls"], [
            {"function": {"name": "weather", "arguments": {"city": "Paris"}}},
            {"function": {"name": "clock", "arguments": {}}}])
        self.assertEqual(out[0]["done"], False)
        self.assertEqual((out[1]["done"], out[1]["done_reason"]), (True, "stop"))

    def test_badToolArguments(self) -> None:
        """
        Tool arguments that are not a JSON object cannot be translated.
        """
        s = self.stream()
        s.feed(sse(chunk({"tool_calls": [{"index": 0, "function": {"name": "f", "arguments": "[1"}}]})))
        self.assertRaises(UntranslatableResponse, s.feed, sse(chunk({}, "tool_calls")))
        s = self.stream()
        s.feed(sse(chunk({"tool_calls": [{"index": 0, "function": {"name": "f", "arguments": "[1]"}}]})))
        self.assertRaises(UntranslatableResponse, s.feed, sse(chunk({}, "tool_calls")))

    def test_generate(self) -> None:
        """
        For C{/api/generate}, text is C{response} and reasoning C{thinking}; a raw
        completion's C{text} is C{response}.
        """
        s = self.stream("generate")
        out = lines(s.feed(sse(chunk({"content": "a", "reasoning_content": "r"}), chunk({}, "stop"),
                               "[DONE]")))
        self.assertEqual((out[0]["response"], out[0]["thinking"]), ("a", "r"))
        self.assertNotIn("message", out[0])
        self.assertEqual((out[1]["response"], out[1]["done"], out[1]["done_reason"]), ("", True, "stop"))
        s = self.stream("raw")
        out = lines(s.feed(sse({"choices": [{"index": 0, "text": " 3,", "finish_reason": None}]},
                               {"choices": [{"index": 0, "text": "", "finish_reason": "length"}],
                                "usage": {"prompt_tokens": 4, "completion_tokens": 1}})) + s.finish())
        self.assertEqual(out[0]["response"], " 3,")
        self.assertEqual((out[1]["done_reason"], out[1]["eval_count"], out[1]["prompt_eval_count"]),
                         ("length", 1, 4))

    def test_logprobs(self) -> None:
        """
        Logprobs asked for are carried on their line, Ollama-shaped.
        """
        s = self.stream(logprobs=True)
        logprobs = {"content": [{"token": "Hi", "logprob": -0.5, "bytes": [72, 105],
                                 "top_logprobs": [{"token": "Hi", "logprob": -0.5, "bytes": []}]}]}
        line = lines(s.feed(sse({"choices": [{"index": 0, "delta": {"content": "Hi"},
                                              "logprobs": logprobs}]})))[0]
        self.assertEqual(line["logprobs"], [{"token": "Hi", "logprob": -0.5,
                                             "top_logprobs": [{"token": "Hi", "logprob": -0.5}]}])

    def test_noDone(self) -> None:
        """
        A stream that ends without C{[DONE]} still gets its final line, once.
        """
        s = self.stream()
        s.feed(sse(chunk({"content": "a"})) + b'data: {"choices": [{"index": 0, "delta": {}, '
               b'"finish_reason": "stop"}]}')
        out = lines(s.finish())
        self.assertEqual([(o["done"], o.get("done_reason")) for o in out], [(True, "stop")])

    def test_errorEvent(self) -> None:
        """
        An error event from the backend is an Ollama error line, and the end.
        """
        s = self.stream()
        out = s.feed(sse({"error": {"message": "slot unavailable", "code": 503}}, chunk({"content": "x"})))
        self.assertEqual(lines(out), [{"error": "slot unavailable"}])
        self.assertEqual(s.finish(), b"")

    def test_failed(self) -> None:
        """
        A failure is an error line.
        """
        self.assertEqual(lines(self.stream().failed(BadGateway("gone"))), [{"error": "gone"}])

    def test_notJSON(self) -> None:
        """
        An event that is not a JSON object cannot be translated.
        """
        self.assertRaises(UntranslatableResponse, self.stream().feed, b"data: {nope\n\n")
        self.assertRaises(UntranslatableResponse, self.stream().feed, b"data: [1]\n\n")

    def test_otherChoices(self) -> None:
        """
        Only the first choice is translated (the request never asks for more).
        """
        s = self.stream()
        self.assertEqual(s.feed(sse({"choices": [{"index": 1, "delta": {"content": "x"}}]})), b"")


class WholeTests(SynchronousTestCase):
    """
    Whole OpenAI answers as Ollama answers.
    """

    def setUp(self) -> None:
        self.clock = Clock()

    def test_chat(self) -> None:
        """
        A chat completion is one Ollama chat answer: content, thinking, tool calls,
        finish reason and usage.
        """
        answer = {"id": "x", "object": "chat.completion", "choices": [{"index": 0, "message": {
            "role": "assistant", "content": "Sunny.", "reasoning_content": "think",
            "tool_calls": [{"id": "c", "type": "function",
                            "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}]},
            "finish_reason": "tool_calls"}], "usage": {"prompt_tokens": 5, "completion_tokens": 3}}
        self.clock.advance(2)
        code, kind, body = OllamaWhole("asked", self.clock, 0, "chat").translate(200, json.dumps(answer).encode())
        self.assertEqual((code, kind), (200, b"application/json; charset=utf-8"))
        self.assertEqual(json.loads(body), {
            "model": "asked", "created_at": "1970-01-01T00:00:02.000000Z",
            "message": {"role": "assistant", "content": "Sunny.", "thinking": "think",
                        "tool_calls": [{"function": {"name": "weather", "arguments": {"city": "Paris"}}}]},
            "done": True, "done_reason": "stop", "total_duration": 2000000000, "load_duration": 0,
            "prompt_eval_count": 5, "prompt_eval_duration": 2000000000, "eval_count": 3,
            "eval_duration": 0})

    def test_generate(self) -> None:
        """
        For C{/api/generate} the text is C{response}; a raw completion's C{text} too; a
        client that asked for a stream gets one NDJSON line.
        """
        answer = {"choices": [{"message": {"content": "ok"}, "finish_reason": "stop"}]}
        _, _, body = OllamaWhole("a", self.clock, 0, "generate", thinking=False).translate(
            200, json.dumps(answer).encode())
        self.assertEqual(json.loads(body)["response"], "ok")
        raw = {"choices": [{"text": "4", "finish_reason": "length"}]}
        _, kind, body = OllamaWhole("a", self.clock, 0, "raw", stream=True).translate(
            200, json.dumps(raw).encode())
        self.assertEqual(kind, b"application/x-ndjson")
        self.assertEqual(lines(body)[0]["response"], "4")

    def test_errors(self) -> None:
        """
        A backend error keeps its status, Ollama-shaped; an answer that is not JSON or
        has no choices is a 502.
        """
        whole = OllamaWhole("a", self.clock, 0, "chat")
        self.assertEqual(whole.translate(400, b'{"error": {"message": "bad"}}')[::2],
                         (400, b'{"error": "bad"}'))
        code, _, body = whole.translate(200, b"<html>")
        self.assertEqual(code, 502)
        self.assertIn("not JSON", json.loads(body)["error"])
        self.assertEqual(whole.translate(200, b'{"choices": []}')[0], 502)

    def test_embed(self) -> None:
        """
        Embeddings come back in input order with the prompt count; C{dimensions}
        truncates and rescales to unit length.
        """
        answer = {"data": [{"index": 1, "embedding": [0.0, 1.0, 0.0]},
                           {"index": 0, "embedding": [0.6, 0.0, 0.8]}],
                  "usage": {"prompt_tokens": 4, "total_tokens": 4}}
        _, _, body = EmbedWhole("a", self.clock, 0, None, 2).translate(200, json.dumps(answer).encode())
        self.assertEqual(json.loads(body), {"model": "a", "embeddings": [[0.6, 0.0, 0.8], [0.0, 1.0, 0.0]],
                                            "total_duration": 0, "load_duration": 0,
                                            "prompt_eval_count": 4})
        _, _, body = EmbedWhole("a", self.clock, 0, 1, 2).translate(200, json.dumps(answer).encode())
        self.assertEqual(json.loads(body)["embeddings"], [[1.0], [0.0]])
        _, _, body = EmbedWhole("a", self.clock, 0, None, 1, legacy=True).translate(
            200, json.dumps({"data": [answer["data"][1]]}).encode())
        self.assertEqual(json.loads(body), {"embedding": [0.6, 0.0, 0.8]})

    def test_embedErrors(self) -> None:
        """
        Too few embeddings or ones that are not numbers are a 502.
        """
        whole = EmbedWhole("a", self.clock, 0, None, 2)
        self.assertEqual(whole.translate(200, b'{"data": [{"embedding": [1]}]}')[0], 502)
        self.assertEqual(whole.translate(200, b'{"data": [{"embedding": ["x"]}, {"embedding": [1]}]}')[0], 502)
        self.assertEqual(whole.translate(500, b'{"error": "oom"}')[::2], (500, b'{"error": "oom"}'))
