# -*- test-case-name: tests.test_sim -*-
"""
What every wire dialect of the simulator shares: the error a request is refused with, JSON
and time formats, made-up model cards, deterministic embeddings, and L{Route}, the base of
each work route's wire format (one module per dialect subclasses it:
L{ollamamq.sim.ollama}, L{ollamamq.sim.openai}, L{ollamamq.sim.anthropic}).
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
import struct
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    from ollamamq.sim.engine import Job
    from ollamamq.sim.resource import Simulator

__all__ = [
    "DEFAULT_KEEP_ALIVE",
    "EMBEDDING_DIMENSIONS",
    "FOREVER_SECONDS",
    "MODIFIED_AT",
    "ModelCard",
    "Route",
    "SimError",
    "countWords",
    "embeddingFor",
    "embeddingInputs",
    "encodeEmbedding",
    "isoTime",
    "jsonBytes",
    "messagesWords",
    "nanoseconds",
    "parseKeepAlive",
]

EMBEDDING_DIMENSIONS = 8
"""
Length of the vectors returned by the embedding routes (unless an OpenAI
request asks for other C{dimensions}).
"""

DEFAULT_KEEP_ALIVE = 300.0
"""
Seconds a model stays loaded after its last use when the request says
nothing, Ollama's default of C{5m}.
"""

FOREVER_SECONDS = 1e10
"""
How far in the future C{expires_at} is put for a model kept loaded forever
(a negative C{keep_alive}); real Ollama shows a date some centuries ahead too.
"""

MODIFIED_AT = 1717171717
"""
The fixed POSIX time reported as every model's modification time, so
listings are deterministic.
"""

def isoTime(seconds: float) -> str:
    """
    Format a POSIX time the way Ollama does in C{created_at}/C{expires_at}.

    @param seconds: the POSIX time.
    @return: an RFC 3339 UTC timestamp with microseconds.
    """
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def nanoseconds(seconds: float) -> int:
    """
    Convert seconds to the integer nanoseconds Ollama reports durations in.

    @param seconds: a duration.
    @return: the same duration in nanoseconds.
    """
    return int(round(seconds * 1e9))


def countWords(text: str) -> int:
    """
    Approximate a text's token count by its words.

    @param text: the text.
    @return: how many whitespace-separated words it has.
    """
    return len(text.split())


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}


def parseKeepAlive(value: object) -> float:
    """
    Read Ollama's C{keep_alive}: a number of seconds or a Go duration such as
    C{"5m"} or C{"1h30m"}; negative means forever.

    @param value: the request's C{keep_alive}, or L{None}.
    @return: seconds to keep the model loaded after the request (C{inf} for
        forever); L{DEFAULT_KEEP_ALIVE} when absent or unreadable.
    """
    if isinstance(value, bool) or value is None:
        return DEFAULT_KEEP_ALIVE
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        try:
            seconds = float(text)
        except ValueError:
            negative = text.startswith("-")
            text = text.lstrip("-")
            parts = list(_DURATION_PART.finditer(text))
            if not parts or "".join(part.group(0) for part in parts) != text:
                return DEFAULT_KEEP_ALIVE
            seconds = sum(float(part.group(1)) * _DURATION_UNITS[part.group(2)] for part in parts)
            if negative:
                seconds = -seconds
    else:
        return DEFAULT_KEEP_ALIVE
    return math.inf if seconds < 0 else seconds


def embeddingFor(text: str, dimensions: int = EMBEDDING_DIMENSIONS) -> list[float]:
    """
    A deterministic unit vector for a text: the same text always gets the
    same vector, different texts almost surely different ones.

    @param text: the text to "embed".
    @param dimensions: the vector's length.
    @return: a list of C{dimensions} floats with Euclidean norm 1.
    """
    values: list[float] = []
    counter = 0
    while len(values) < dimensions:
        digest = hashlib.sha256(f"{counter}\0{text}".encode("utf-8")).digest()
        for (word,) in struct.iter_unpack("<I", digest):
            values.append(word / 2**31 - 1.0)
        counter += 1
    values = values[:dimensions]
    norm = math.sqrt(sum(value * value for value in values)) or 1.0
    return [value / norm for value in values]


def encodeEmbedding(vector: list[float], encodingFormat: object) -> list[float] | str:
    """
    Encode a vector as OpenAI's C{encoding_format} asks: a list of floats, or
    base64 of little-endian float32 values (what the official client asks for
    by default).

    @param vector: the embedding.
    @param encodingFormat: the request's C{encoding_format}.
    @return: the JSON value to send.
    """
    if isinstance(encodingFormat, str) and encodingFormat.lower() == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
    return vector


@attrs.frozen
class ModelCard:
    """
    Made-up but stable facts about one model, for listings and C{/api/show}.

    @ivar name: the model's name as served.
    @ivar family: the architecture family (C{llama}, C{qwen}, ...).
    @ivar parameterSize: e.g. C{"8.0B"}.
    @ivar size: bytes on disk (and in VRAM when loaded).
    @ivar digest: a sha256 hex digest.
    @ivar embedding: whether this is an embedding-only model.
    """

    name: str
    family: str
    parameterSize: str
    size: int
    digest: str
    embedding: bool

    @classmethod
    def describe(cls, name: str) -> ModelCard:
        """
        Derive a model card from a model name alone.

        @param name: the model name, e.g. C{"qwen2.5:7b"}.
        @return: the card.
        """
        base = name.rsplit("/", 1)[-1]
        match = re.match(r"[A-Za-z]+", base)
        family = match.group(0).lower() if match else "llama"
        sizeMatch = re.search(r"(\d+(?:\.\d+)?)[bB]\b", base)
        billions = float(sizeMatch.group(1)) if sizeMatch else 8.0
        embedding = "embed" in name.lower()
        if embedding and not sizeMatch:
            billions = 0.137
        return cls(
            name=name,
            family=family,
            parameterSize=f"{billions:.1f}B" if billions >= 1 else f"{billions * 1000:.0f}M",
            # About 4.5 bits per weight, a Q4_K_M file.
            size=int(billions * 1e9 * 0.5625),
            digest=hashlib.sha256(name.encode("utf-8")).hexdigest(),
            embedding=embedding,
        )

    def details(self) -> dict[str, Any]:
        """
        The C{details} object of Ollama's listings.

        @return: a JSON-ready dict.
        """
        return {
            "parent_model": "",
            "format": "gguf",
            "family": self.family,
            "families": [self.family],
            "parameter_size": self.parameterSize,
            "quantization_level": "Q4_K_M",
        }

    def listing(self) -> dict[str, Any]:
        """
        This model's entry in C{/api/tags}.

        @return: a JSON-ready dict.
        """
        return {
            "name": self.name,
            "model": self.name,
            "modified_at": isoTime(MODIFIED_AT),
            "size": self.size,
            "digest": self.digest,
            "details": self.details(),
        }


class SimError(Exception):
    """
    A request the simulator refuses before any byte of an answer: becomes an
    error response shaped for the route's API family.

    @ivar code: the HTTP status.
    @ivar message: the human-readable message.
    @ivar errorType: OpenAI's C{error.type}.
    @ivar errorCode: OpenAI's C{error.code}.
    """

    def __init__(
        self,
        code: int,
        message: str,
        errorType: str = "invalid_request_error",
        errorCode: str | None = None,
    ) -> None:
        """
        @param code: the HTTP status.
        @param message: the human-readable message.
        @param errorType: OpenAI's C{error.type}.
        @param errorCode: OpenAI's C{error.code}.
        """
        super().__init__(message)
        self.code = code
        self.message = message
        self.errorType = errorType
        self.errorCode = errorCode


def jsonBytes(value: object) -> bytes:
    """
    Serialise a value as compact JSON, the way Go's encoder writes it.

    @param value: a JSON-ready value.
    @return: UTF-8 bytes without a trailing newline.
    """
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


class Route:
    """
    The wire format of one kind of work route.  Subclasses render chunks,
    the stream's end and whole (non-streamed) answers.

    @cvar family: C{"ollama"}, C{"openai"} or C{"anthropic"}, for error shapes.
    @cvar embedding: whether the route embeds rather than generates.
    @cvar streamByDefault: what C{stream} means when the request omits it.
    @cvar loadOnly: whether the route only loads the model (no tokens).
    @cvar lengthIsCap: whether the requested length only caps the default
        answer length (Anthropic's required C{max_tokens}) rather than
        setting it (Ollama's C{num_predict}, OpenAI's C{max_tokens}).
    """

    family = "ollama"
    embedding = False
    streamByDefault = True
    loadOnly = False
    lengthIsCap = False

    def __init__(self, simulator: Simulator) -> None:
        """
        @param simulator: the simulator, for its clock and options.
        """
        self.simulator = simulator

    def now(self) -> float:
        """
        @return: the simulator clock's current time.
        """
        return self.simulator.clock.seconds()

    def parse(self, body: dict[str, Any]) -> tuple[int, int | None, list[str]]:
        """
        Read what the route needs from a request body.

        @param body: the parsed JSON body.
        @return: the approximate prompt token count, the requested answer
            length (or L{None}), and the texts to embed (empty for
            generation routes).
        @raise SimError: when the body is unusable.
        """
        raise NotImplementedError()

    def special(self, body: dict[str, Any], keepAlive: float) -> str | None:
        """
        Whether a request is not ordinary work (Ollama's empty prompts load or
        unload the model).

        @param body: the parsed JSON body.
        @param keepAlive: the request's keep-alive in seconds.
        @return: L{None} for ordinary work, C{"load"} or C{"unload"}.
        """
        return None

    def contentType(self, stream: bool) -> bytes:
        """
        @param stream: whether the answer is streamed.
        @return: the response's content type.
        """
        return b"application/json; charset=utf-8"

    def chunk(self, job: Job, token: str) -> bytes:
        """
        @param job: the job.
        @param token: the token just produced (already in C{job.emitted}).
        @return: the bytes to write for it in a stream.
        """
        raise NotImplementedError()

    def end(self, job: Job) -> bytes:
        """
        @param job: the finished job.
        @return: the bytes that end a stream.
        """
        raise NotImplementedError()

    def whole(self, job: Job) -> bytes:
        """
        @param job: the finished job.
        @return: the whole non-streamed answer.
        """
        raise NotImplementedError()

    def stats(self, job: Job) -> dict[str, Any]:
        """
        Ollama's timing and count fields, in nanoseconds.

        @param job: the finished job.
        @return: a JSON-ready dict.
        """
        now = self.now()
        return {
            "total_duration": nanoseconds(now - job.receivedAt),
            "load_duration": nanoseconds(job.loadDuration),
            "prompt_eval_count": job.promptTokens,
            # Prompt evaluation takes no simulated time: the answer's pace is
            # set by tps alone, which keeps timings predictable in tests.
            "prompt_eval_duration": 0,
            "eval_count": len(job.emitted),
            "eval_duration": nanoseconds(now - job.generatingSince),
        }

    def usage(self, job: Job) -> dict[str, int]:
        """
        OpenAI's C{usage} object.

        @param job: the finished job.
        @return: a JSON-ready dict.
        """
        return {
            "prompt_tokens": job.promptTokens,
            "completion_tokens": len(job.emitted),
            "total_tokens": job.promptTokens + len(job.emitted),
        }


def messagesWords(messages: object) -> int:
    """
    Count the words of a chat's messages, both plain string contents and
    OpenAI's list-of-parts contents.

    @param messages: the request's C{messages}.
    @return: the word count.
    @raise SimError: when C{messages} is not a list of objects.
    """
    if messages is None:
        return 0
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise SimError(400, "messages must be a list of message objects")
    words = 0
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            words += countWords(content)
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    words += countWords(part["text"])
    return words


def embeddingInputs(value: object, name: str, allowTokens: bool) -> list[str]:
    """
    Normalise an embedding request's input to a list of texts.

    @param value: C{input} (or C{prompt}).
    @param name: the field's name, for errors.
    @param allowTokens: whether lists of token ids (OpenAI) are accepted.
    @return: the texts.
    @raise SimError: when the input has the wrong type.
    """
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        if all(isinstance(item, str) for item in value):
            return list(value)
        if allowTokens:
            if all(isinstance(item, int) and not isinstance(item, bool) for item in value):
                return [json.dumps(value)]
            if all(isinstance(item, list) for item in value):
                return [json.dumps(item) for item in value]
    raise SimError(400, f"invalid {name}: expected a string or a list of strings")

