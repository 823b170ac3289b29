# -*- test-case-name: tests.test_usage -*-
"""
Token counts read from an answer as it streams past, never buffering it.

Every API family reports its counts in JSON keys of its own:

 - Ollama, in the final NDJSON chunk (or the whole non-streamed answer):
   C{prompt_eval_count}, C{eval_count}, C{total_duration} and C{load_duration}
   (nanoseconds);
 - OpenAI, in C{usage}: C{prompt_tokens} and C{completion_tokens}, in the answer or, when
   streaming with C{stream_options.include_usage}, in one extra chunk before C{[DONE]};
 - Anthropic, in C{usage}: C{input_tokens} in C{message_start}, the running
   C{output_tokens} in C{message_start} and again, final, in C{message_delta}.

L{UsageMeter} finds those keys with one regular expression over the bytes, whatever the
framing: a quote inside a JSON string is always escaped, so C{"eval_count":} with bare
quotes is a key and never text of the answer. A chunk is only searched when one of the
keys' endings occurs in it (one search; most chunks are token lines that have none), and a few bytes are carried over from the previous chunk so that a key split
between two chunks is still found. The last value of each key wins (Anthropic's final
C{output_tokens} comes last).

An OpenAI client that streams without asking for usage is accounted all the same:
L{askForUsage} turns C{include_usage} on in the request sent to the backend, and
L{UsageEventFilter} removes exactly the one usage event that adds, so the client receives
the backend's bytes otherwise unchanged.
"""

from __future__ import annotations

import json
import re
from typing import Any

import attrs

# Every key read, with a leading quote so that "eval_count" does not match inside
# "prompt_eval_count"; the number must be followed by a non-digit, so a number cut by the
# end of a chunk is not read short (it is read whole from the next window).
_COUNTS = re.compile(
    rb'"(prompt_eval_count|eval_count|total_duration|load_duration|prompt_tokens'
    rb'|completion_tokens|input_tokens|output_tokens)"\s*:\s*(\d+)(?=\D)'
)
# The endings of those keys: one search for them decides whether a chunk is read at all.
_ENDINGS = re.compile(rb'_(?:tokens|count|duration)"')

# Bytes of the previous chunk searched again with the next one: longer than the longest
# key-value pair above with a little whitespace.
_CARRY = 64

# The longest line L{UsageEventFilter} holds back while waiting for its end.
_MAX_HELD = 1024 * 1024

_PROMPT = {b"prompt_eval_count": True, b"prompt_tokens": True, b"input_tokens": True}
_COMPLETION = {b"eval_count": True, b"completion_tokens": True, b"output_tokens": True}

# Routes whose streamed answers carry OpenAI's usage only when asked for.
OPENAI_STREAMING_ROUTES = frozenset({b"/v1/chat/completions", b"/v1/completions"})


@attrs.frozen
class Usage:
    """
    What one answer cost, as far as the backend said.

    @ivar promptTokens: tokens of the prompt, L{None} when the backend gave no counts.
    @ivar completionTokens: tokens generated, L{None} when the backend gave no counts.
    @ivar bytes: body bytes received from the backend.
    @ivar backendSeconds: Ollama's C{total_duration}, in seconds, when given.
    @ivar loadSeconds: Ollama's C{load_duration} (model load), in seconds, when given.
    """

    promptTokens: int | None = None
    completionTokens: int | None = None
    bytes: int = 0
    backendSeconds: float | None = None
    loadSeconds: float | None = None

    @property
    def known(self) -> bool:
        """
        Whether the backend reported token counts at all.
        """
        return self.promptTokens is not None


class UsageMeter:
    """
    Reads token counts from an answer body fed to it chunk by chunk.

    It holds at most L{_CARRY} bytes of the body and never changes it.
    """

    def __init__(self) -> None:
        self._carry = b""
        self._bytes = 0
        self._values: dict[bytes, int] = {}

    def feed(self, data: bytes) -> None:
        """
        Account one chunk of the body.
        """
        self._bytes += len(data)
        window = self._carry + data
        if _ENDINGS.search(window) is not None:
            for match in _COUNTS.finditer(window):
                self._values[match.group(1)] = int(match.group(2))
        self._carry = window[-_CARRY:]

    def usage(self) -> Usage:
        """
        The counts found so far (final once the body has ended).
        """
        values = self._values
        prompt = completion = None
        for key, value in values.items():
            if key in _PROMPT:
                prompt = value
            elif key in _COMPLETION:
                completion = value
        if prompt is not None or completion is not None:
            # A known answer with one count missing means none of that kind: Ollama leaves
            # prompt_eval_count out when the prompt was cached, embeddings generate nothing.
            prompt = prompt or 0
            completion = completion or 0
        total = values.get(b"total_duration")
        load = values.get(b"load_duration")
        return Usage(
            promptTokens=prompt,
            completionTokens=completion,
            bytes=self._bytes,
            backendSeconds=total / 1e9 if total is not None else None,
            loadSeconds=load / 1e9 if load is not None else None,
        )


def askForUsage(path: bytes, body: dict | None) -> dict | None:
    """
    For an OpenAI streaming request whose client did not ask for usage, the body to send
    the backend instead (with C{stream_options.include_usage}); else L{None}.

    When this returns a body, the answer must go through a L{UsageEventFilter}.
    """
    if body is None or path not in OPENAI_STREAMING_ROUTES or body.get("stream") is not True:
        return None
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        # Not ours to fix: the backend answers the malformed request as it will.
        return None
    if options is not None and options.get("include_usage") is True:
        return None
    return dict(body, stream_options=dict(options or {}, include_usage=True))


class UsageEventFilter:
    """
    Removes the usage event that L{askForUsage} made an OpenAI backend add to a stream:
    the one C{data:} event whose chunk has empty C{choices} and a C{usage} object, and the
    blank line that ends it. Everything else passes byte for byte.

    To remove an event it must see the event whole, so a line is passed on once its end
    has arrived (a token's line is seldom split; the held part is a few bytes). Only lines
    that mention a token count are parsed.
    """

    def __init__(self) -> None:
        self._held = b""
        self._dropBlank = False
        self._gaveUp = False
        self.removed = 0

    def feed(self, data: bytes) -> bytes:
        """
        Take one chunk from the backend; return what the client gets now.
        """
        if self._gaveUp:
            return data
        if self._held:
            data = self._held + data
        end = data.rfind(b"\n") + 1
        if not end:
            if len(data) > _MAX_HELD:
                # Not an SSE stream of JSON chunks after all: stop holding, pass it on.
                self._gaveUp = True
                self._held = b""
                return data
            self._held = data
            return b""
        # In the common case (whole lines, nothing held) this slice is the chunk itself.
        complete, self._held = data[:end], data[end:]
        if self._dropBlank:
            self._dropBlank = False
            if complete.startswith(b"\n"):
                complete = complete[1:]
            elif complete.startswith(b"\r\n"):
                complete = complete[2:]
        if self.removed or b'_tokens"' not in complete:
            return complete
        return self._remove(complete)

    def _remove(self, complete: bytes) -> bytes:
        """
        Drop the usage event from C{complete} lines, if it is among them.
        """
        start = 0
        while True:
            found = complete.find(b'_tokens"', start)
            if found < 0:
                return complete
            lineStart = complete.rfind(b"\n", 0, found) + 1
            lineEnd = complete.find(b"\n", found) + 1
            if _isUsageEvent(complete[lineStart:lineEnd]):
                self.removed += 1
                rest = complete[lineEnd:]
                if rest.startswith(b"\n"):
                    rest = rest[1:]
                elif rest.startswith(b"\r\n"):
                    rest = rest[2:]
                elif not rest:
                    # The blank line that ends the event has not arrived yet.
                    self._dropBlank = True
                return complete[:lineStart] + rest
            start = lineEnd

    def finish(self) -> bytes:
        """
        The body ended: whatever was held back (an unterminated last line).
        """
        held, self._held = self._held, b""
        return held


def _isUsageEvent(line: bytes) -> bool:
    """
    Whether an SSE line is the C{data:} line of a usage-only OpenAI chunk.
    """
    if not line.startswith(b"data:"):
        return False
    try:
        chunk: Any = json.loads(line[5:])
    except (ValueError, RecursionError):
        return False
    return (
        isinstance(chunk, dict)
        and chunk.get("choices") == []
        and isinstance(chunk.get("usage"), dict)
    )


class StreamAccount:
    """
    What the relay feeds each body chunk of one answer through: counts tokens
    (L{UsageMeter}), notes when the first byte came, and, when the proxy asked the backend
    for a usage event the client did not want, removes it (L{UsageEventFilter}).

    @ivar firstByteAt: clock time of the first body byte, or L{None}.
    """

    def __init__(self, clock: Any, removeUsageEvent: bool = False) -> None:
        self._clock = clock
        self.meter = UsageMeter()
        self.filter: UsageEventFilter | None = UsageEventFilter() if removeUsageEvent else None
        self.firstByteAt: float | None = None

    def started(self, sse: bool, lengthKnown: bool) -> None:
        """
        The answer's headers are known: a usage event can only be removed from an SSE
        stream whose length the client was not told.
        """
        if self.filter is not None and (not sse or lengthKnown):
            self.filter = None

    def feed(self, data: bytes) -> bytes:
        """
        Take one chunk from the backend; return what the client gets now.
        """
        if self.firstByteAt is None and data:
            self.firstByteAt = self._clock.seconds()
        self.meter.feed(data)
        return data if self.filter is None else self.filter.feed(data)

    def finish(self) -> bytes:
        """
        The body ended: the bytes still held back, if any.
        """
        return b"" if self.filter is None else self.filter.finish()

    def usage(self) -> Usage:
        """
        The answer's usage so far.
        """
        return self.meter.usage()
