# -*- test-case-name: tests.test_sim_anthropic -*-
"""
Tests for L{ollamamq.sim.anthropic}: the simulator's Anthropic Messages dialect.
"""

from __future__ import annotations

import json
from typing import Any

from tests.test_sim import SimulatorTestCase

HELLO = [{"role": "user", "content": "Say hello to the queue"}]


def sseEvents(body: bytes) -> list[tuple[str, dict[str, Any]]]:
    """
    Parse named server-sent events.

    @param body: the stream's bytes.
    @return: (event name, decoded data) pairs, in order.
    """
    events = []
    for block in body.decode("utf-8").split("\n\n"):
        if not block:
            continue
        name, data = block.split("\n")
        if not (name.startswith("event: ") and data.startswith("data: ")):
            raise ValueError(f"not a named event: {block!r}")
        events.append((name[len("event: ") :], json.loads(data[len("data: ") :])))
    return events


class MessagesTests(SimulatorTestCase):
    """
    C{POST /v1/messages}.
    """

    def test_whole(self) -> None:
        """
        Without C{stream} the answer is one C{message} with a text block, C{end_turn}
        and the usage; C{system} counts towards the input tokens.
        """
        d = self.post(
            "/v1/messages",
            {"model": "llama3", "max_tokens": 50, "system": "be brief", "messages": HELLO},
        )
        response, body = self.finish(d, 3)
        self.assertEqual(response.code, 200)
        message = json.loads(body)
        self.assertEqual(
            {k: message[k] for k in ("type", "role", "model", "stop_reason", "stop_sequence")},
            {"type": "message", "role": "assistant", "model": "llama3",
             "stop_reason": "end_turn", "stop_sequence": None},
        )
        self.assertTrue(message["id"].startswith("msg_"))
        [block] = message["content"]
        self.assertEqual(block["type"], "text")
        self.assertEqual(len(block["text"].split()), 3)
        self.assertEqual(message["usage"], {"input_tokens": 7, "output_tokens": 3})

    def test_maxTokensCaps(self) -> None:
        """
        A C{max_tokens} below the default length cuts the answer: C{max_tokens} is the
        stop reason.
        """
        d = self.post("/v1/messages", {"model": "llama3", "max_tokens": 2, "messages": HELLO})
        message = json.loads(self.finish(d, 3)[1])
        self.assertEqual((message["stop_reason"], message["usage"]["output_tokens"]), ("max_tokens", 2))

    def test_stream(self) -> None:
        """
        A stream opens with C{message_start}, C{content_block_start} and C{ping} as the
        first token arrives, sends one C{content_block_delta} per token as it is made,
        and ends with C{content_block_stop}, C{message_delta} (stop reason, output
        tokens) and C{message_stop}.
        """
        d = self.post(
            "/v1/messages", {"model": "llama3", "max_tokens": 10, "stream": True, "messages": HELLO}
        )
        self.advance(1)
        stream = self.stream(d)
        self.assertEqual(stream.response.headers.getRawHeaders("content-type"), ["text/event-stream"])
        self.stub.flush()
        names = [name for name, _ in sseEvents(stream.body())]
        self.assertEqual(names, ["message_start", "content_block_start", "ping", "content_block_delta"])
        self.advance(1)
        self.assertEqual(len(sseEvents(stream.body())), 5)
        self.advance(1)
        self.successResultOf(stream.done)
        events = sseEvents(stream.body())
        self.assertEqual(
            [name for name, _ in events],
            ["message_start", "content_block_start", "ping"]
            + ["content_block_delta"] * 3
            + ["content_block_stop", "message_delta", "message_stop"],
        )
        for name, data in events:
            self.assertEqual(data["type"], name)
        start = events[0][1]["message"]
        self.assertEqual((start["content"], start["stop_reason"]), ([], None))
        self.assertEqual(start["usage"], {"input_tokens": 5, "output_tokens": 0})
        text = "".join(data["delta"]["text"] for name, data in events if name == "content_block_delta")
        self.assertEqual(len(text.split()), 3)
        delta = events[-2][1]
        self.assertEqual(delta["delta"], {"stop_reason": "end_turn", "stop_sequence": None})
        self.assertEqual(delta["usage"], {"output_tokens": 3})

    def test_streamNoTokens(self) -> None:
        """
        A stream of zero tokens still opens and closes the message properly.
        """
        self.makeSimulator(tokens=0)
        d = self.post(
            "/v1/messages", {"model": "llama3", "max_tokens": 5, "stream": True, "messages": HELLO}
        )
        response, body = self.finish(d, 1)
        self.assertEqual(
            [name for name, _ in sseEvents(body)],
            ["message_start", "content_block_start", "ping", "content_block_stop",
             "message_delta", "message_stop"],
        )

    def test_contentBlocks(self) -> None:
        """
        Content given as a list of blocks is counted by its text blocks.
        """
        messages = [{"role": "user", "content": [{"type": "text", "text": "one two"},
                                                 {"type": "image", "source": {}}]}]
        d = self.post("/v1/messages", {"model": "llama3", "max_tokens": 5, "messages": messages})
        self.assertEqual(json.loads(self.finish(d, 3)[1])["usage"]["input_tokens"], 2)

    def test_badRequests(self) -> None:
        """
        A missing C{max_tokens}, missing or empty C{messages}, a bad C{system}, an
        unknown or missing model each get a 4xx in Anthropic's error shape, and are
        counted as errors.
        """
        cases = [
            ({"model": "llama3", "messages": HELLO}, 400, "max_tokens"),
            ({"model": "llama3", "max_tokens": 0, "messages": HELLO}, 400, "max_tokens"),
            ({"model": "llama3", "max_tokens": 5}, 400, "messages"),
            ({"model": "llama3", "max_tokens": 5, "messages": []}, 400, "messages"),
            ({"model": "llama3", "max_tokens": 5, "messages": HELLO, "system": 3}, 400, "system"),
            ({"max_tokens": 5, "messages": HELLO}, 400, "model"),
            ({"model": "nope", "max_tokens": 5, "messages": HELLO}, 404, "nope"),
        ]
        for body, code, word in cases:
            response, answer = self.postNow("/v1/messages", body)
            self.assertEqual(response.code, code, body)
            self.assertEqual(answer["type"], "error", body)
            self.assertIn(word, answer["error"]["message"], body)
            expected = "not_found_error" if code == 404 else "invalid_request_error"
            self.assertEqual(answer["error"]["type"], expected, body)
        response, answer = self.postNow("/v1/messages", b"{nope")
        self.assertEqual((response.code, answer["type"]), (400, "error"))
        self.assertEqual(self.simulator.stats["errors"], len(cases) + 1)

    def test_unknownMessagesRoute(self) -> None:
        """
        An unknown path under C{/v1/messages} is a 404 in Anthropic's shape.
        """
        response, body = self.get("/v1/messages/nope", "POST")
        self.assertEqual(response.code, 404)
        self.assertEqual(json.loads(body)["error"]["type"], "not_found_error")


class CountTokensTests(SimulatorTestCase):
    """
    C{POST /v1/messages/count_tokens}.
    """

    def test_count(self) -> None:
        """
        The input tokens are counted as the messages route counts them, without a slot
        and without a log entry.
        """
        response, body = self.postNow(
            "/v1/messages/count_tokens",
            {"model": "llama3", "system": "be brief", "messages": HELLO},
        )
        self.assertEqual((response.code, body), (200, {"input_tokens": 7}))
        self.assertEqual(self.simulator.stats["requests"], 0)

    def test_bad(self) -> None:
        """
        An unknown model is a 404, missing messages a 400, in Anthropic's shape.
        """
        response, body = self.postNow("/v1/messages/count_tokens", {"model": "x", "messages": HELLO})
        self.assertEqual((response.code, body["error"]["type"]), (404, "not_found_error"))
        response, body = self.postNow("/v1/messages/count_tokens", {"model": "llama3"})
        self.assertEqual((response.code, body["error"]["type"]), (400, "invalid_request_error"))


class NoMessagesTests(SimulatorTestCase):
    """
    C{messages=False}: a server without Messages routes.
    """

    def test_absent(self) -> None:
        """
        Both routes are unknown (404), as on a server that has none.
        """
        self.makeSimulator(messages=False)
        for path in ("/v1/messages", "/v1/messages/count_tokens"):
            response, body = self.postNow(path, {"model": "llama3", "max_tokens": 5, "messages": HELLO})
            self.assertEqual(response.code, 404, path)
