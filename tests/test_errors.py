"""
Tests for L{ollamamq.errors}: one error, three API families' shapes.
"""

from __future__ import annotations

import json

from twisted.trial.unittest import SynchronousTestCase

from ollamamq.errors import (
    ANTHROPIC,
    OLLAMA,
    OPENAI,
    TooManyRequests,
    errorBody,
    retryAfterHeader,
    streamErrorLine,
)


class ShapeTests(SynchronousTestCase):
    """
    Each family gets its own documented shape.
    """

    error = TooManyRequests("queue full", code="user_queue_full", retryAfter=2.2)

    def test_ollama(self) -> None:
        """
        Ollama: C{{"error": message}}.
        """
        self.assertEqual(json.loads(errorBody(self.error, OLLAMA)), {"error": "queue full"})

    def test_openai(self) -> None:
        """
        OpenAI: C{{"error": {message, type, code}}}.
        """
        self.assertEqual(
            json.loads(errorBody(self.error, OPENAI)),
            {"error": {"message": "queue full", "type": "rate_limit_error", "code": "user_queue_full"}},
        )

    def test_anthropic(self) -> None:
        """
        Anthropic: C{{"type": "error", "error": {type, message}}}.
        """
        self.assertEqual(
            json.loads(errorBody(self.error, ANTHROPIC)),
            {"type": "error", "error": {"type": "rate_limit_error", "message": "queue full"}},
        )

    def test_retryAfterRoundsUp(self) -> None:
        """
        Retry-After is whole seconds, rounded up, at least one.
        """
        self.assertEqual(retryAfterHeader(self.error), b"3")
        self.assertEqual(retryAfterHeader(TooManyRequests("x", retryAfter=0.01)), b"1")
        self.assertIsNone(retryAfterHeader(TooManyRequests("x")))

    def test_streamLines(self) -> None:
        """
        Mid-stream errors use the stream's framing.
        """
        self.assertEqual(streamErrorLine(self.error, OLLAMA, sse=False), b'{"error": "queue full"}\n')
        line = streamErrorLine(self.error, OPENAI, sse=True)
        self.assertTrue(line.startswith(b"data: {") and line.endswith(b"\n\n"))
        self.assertTrue(streamErrorLine(self.error, ANTHROPIC, sse=True).startswith(b"event: error\n"))
