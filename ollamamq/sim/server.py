# -*- test-case-name: tests.test_sim -*-
"""
A simulated Ollama / OpenAI-compatible LLM server, built on C{twisted.web}.

The simulator speaks the real wire formats (Ollama NDJSON streams, OpenAI
server-sent events) and imitates the parts of a real server's behaviour that a
queueing proxy cares about:

  - tokens are produced at a fixed rate per stream (L{SimulatorOptions.tps}),
    each written as soon as it is "generated", never buffered;
  - at most L{SimulatorOptions.slots} generations or embeddings run at once,
    the rest wait inside the server in FIFO order with no byte sent, like
    Ollama's C{OLLAMA_NUM_PARALLEL};
  - a model that is not loaded costs L{SimulatorOptions.loadDelay} seconds
    before its first token, and loading evicts the least recently used model
    beyond L{SimulatorOptions.maxLoaded};
  - a client that goes away is dropped at once, freeing its slot.

Everything is driven by an injected L{IReactorTime}, so tests run on
L{twisted.internet.task.Clock} without sockets, and C{/sim/*} routes expose
counters and a request log for assertions.

Routes (C{HEAD} works wherever C{GET} does):

  - Ollama API only: C{GET /}, C{GET /api/version}, C{GET /api/tags},
    C{GET /api/ps}, C{POST /api/show}, C{POST /api/generate},
    C{POST /api/chat}, C{POST /api/embed}, C{POST /api/embeddings};
  - OpenAI API only: C{GET /health} (as llama-server and vLLM have);
  - both: C{GET /v1/models}, C{GET /v1/models/{model}},
    C{POST /v1/chat/completions}, C{POST /v1/completions},
    C{POST /v1/embeddings};
  - test hooks: C{GET /sim/stats}, C{POST /sim/reset}, C{POST /sim/fail}.

Only generation and embedding requests ("work") take slots and appear in
the C{/sim/stats} counters and log; listings and health probes do not, so a
proxy's periodic probes leave the numbers alone.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
import struct
import zlib
from collections import OrderedDict, deque
from datetime import datetime, timezone
from typing import Any, Callable, Iterable
from urllib.parse import unquote

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.interfaces import (
    IDelayedCall,
    IListeningPort,
    IReactorTime,
    IStreamServerEndpoint,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

__all__ = [
    "EMBEDDING_DIMENSIONS",
    "Simulator",
    "SimulatorOptions",
    "SimulatorService",
    "embeddingFor",
    "simulatorService",
]

EMBEDDING_DIMENSIONS = 8
"""
Length of the vectors returned by the embedding routes (unless an OpenAI
request asks for other C{dimensions}).
"""

LOG_LIMIT = 1000
"""
How many request log entries C{/sim/stats} keeps (the most recent ones).
"""

DEFAULT_KEEP_ALIVE = 300.0
"""
Seconds a model stays loaded after its last use when the request says
nothing, Ollama's default of C{5m}.
"""

_FOREVER_SECONDS = 1e10
"""
How far in the future C{expires_at} is put for a model kept loaded forever
(a negative C{keep_alive}); real Ollama shows a date some centuries ahead too.
"""

_MODIFIED_AT = 1717171717
"""
The fixed POSIX time reported as every model's modification time, so
listings are deterministic.
"""

_WORDS = (
    "Simulated",
    "tokens",
    "drift",
    "from",
    "a",
    "patient",
    "llama",
    "who",
    "answers",
    "every",
    "question",
    "with",
    "calm",
    "and",
    "measured",
    "words",
    "while",
    "the",
    "queue",
    "moves",
    "fairly",
    "along.",
)
"""
The vocabulary of simulated answers; one word is one token.
"""

_API_FAMILIES = ("ollama", "openai")

_requestLog = Logger(namespace="ollamamq.sim.requests")


def _positive(name: str) -> Callable[[Any, Any, Any], None]:
    """
    Build an attrs validator that requires a finite number of at least 1.

    @param name: the option's name, for the error message.
    @return: the validator.
    """

    def check(instance: Any, attribute: Any, value: Any) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an integer of at least 1, not {value!r}")

    return check


def _nonNegative(name: str) -> Callable[[Any, Any, Any], None]:
    """
    Build an attrs validator that requires a finite number that is not
    negative.

    @param name: the option's name, for the error message.
    @return: the validator.
    """

    def check(instance: Any, attribute: Any, value: Any) -> None:
        if (
            not isinstance(value, (int, float))
            or isinstance(value, bool)
            or not math.isfinite(value)
            or value < 0
        ):
            raise ValueError(f"{name} must be a finite number of at least 0, not {value!r}")

    return check


def _modelsConverter(value: str | Iterable[str]) -> tuple[str, ...]:
    """
    Accept model names as a tuple, any iterable, or one comma-separated string.

    @param value: the names.
    @return: the names, stripped, empty ones dropped.
    """
    if isinstance(value, str):
        value = value.split(",")
    return tuple(name.strip() for name in value if name.strip())


def _checkModels(instance: Any, attribute: Any, value: tuple[str, ...]) -> None:
    """
    Require at least one model name.

    @param instance: the options being built.
    @param attribute: the attrs attribute.
    @param value: the converted model names.
    """
    if not value:
        raise ValueError("models must name at least one model")


def _checkApi(instance: Any, attribute: Any, value: str) -> None:
    """
    Require a known API family.

    @param instance: the options being built.
    @param attribute: the attrs attribute.
    @param value: the family name.
    """
    if value not in _API_FAMILIES:
        raise ValueError(f"api must be one of {', '.join(_API_FAMILIES)}, not {value!r}")


@attrs.frozen
class SimulatorOptions:
    """
    How a L{Simulator} behaves.  Invalid values raise L{ValueError} with a
    message fit for a command-line user.

    @ivar api: C{"ollama"} serves C{/api/*} and C{/v1/*} like real Ollama;
        C{"openai"} serves only C{/v1/*} (like vLLM or llama-server).
    @ivar models: the model names served.  With the Ollama API a name without
        a tag means C{:latest}, as in Ollama.  Names containing C{embed} are
        embedding-only models that refuse to generate, as in Ollama.
    @ivar tps: tokens per second per stream; C{0} means as fast as the
        reactor turns (one token per turn).
    @ivar tokens: default answer length; C{options.num_predict} (Ollama) or
        C{max_tokens}/C{max_completion_tokens} (OpenAI) override it.
    @ivar loadDelay: seconds to load a model that is not loaded.
    @ivar slots: how many generations or embeddings run at once.
    @ivar maxLoaded: how many models stay loaded (least recently used goes).
    @ivar version: reported by C{/api/version}.
    @ivar name: reported in the C{X-Sim-Backend} header of every response.
    """

    api: str = attrs.field(default="ollama", validator=_checkApi)
    models: tuple[str, ...] = attrs.field(
        default=("llama3:latest",), converter=_modelsConverter, validator=_checkModels
    )
    tps: float = attrs.field(default=50.0, validator=_nonNegative("tps"))
    tokens: int = attrs.field(default=20, validator=_nonNegative("tokens"))
    loadDelay: float = attrs.field(default=0.0, validator=_nonNegative("loadDelay"))
    slots: int = attrs.field(default=1, validator=_positive("slots"))
    maxLoaded: int = attrs.field(default=1, validator=_positive("maxLoaded"))
    version: str = "0.12.6"
    name: str = "sim"


def _isoTime(seconds: float) -> str:
    """
    Format a POSIX time the way Ollama does in C{created_at}/C{expires_at}.

    @param seconds: the POSIX time.
    @return: an RFC 3339 UTC timestamp with microseconds.
    """
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _nanoseconds(seconds: float) -> int:
    """
    Convert seconds to the integer nanoseconds Ollama reports durations in.

    @param seconds: a duration.
    @return: the same duration in nanoseconds.
    """
    return int(round(seconds * 1e9))


def _countWords(text: str) -> int:
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


def _parseKeepAlive(value: object) -> float:
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


def _encodeEmbedding(vector: list[float], encodingFormat: object) -> list[float] | str:
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
class _ModelCard:
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
    def describe(cls, name: str) -> _ModelCard:
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
            "modified_at": _isoTime(_MODIFIED_AT),
            "size": self.size,
            "digest": self.digest,
            "details": self.details(),
        }


class _SimError(Exception):
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


def _jsonBytes(value: object) -> bytes:
    """
    Serialise a value as compact JSON, the way Go's encoder writes it.

    @param value: a JSON-ready value.
    @return: UTF-8 bytes without a trailing newline.
    """
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


@attrs.define(eq=False)
class _Job:
    """
    One generation, embedding or model load, from arrival to its end.

    @ivar request: the HTTP request to answer.
    @ivar route: the formatter that knows the route's wire format.
    @ivar entry: this request's entry in the stats log (updated in place).
    @ivar model: the served model's canonical name.
    @ivar requestedModel: the name as the client sent it (echoed back).
    @ivar stream: whether to stream the answer.
    @ivar tokens: how many tokens to produce.
    @ivar limited: whether C{tokens} came from the request (so the answer ends
        with C{done_reason} C{"length"}).
    @ivar promptTokens: the approximate prompt length in tokens.
    @ivar seed: where in the vocabulary the answer starts.
    @ivar keepAlive: seconds the model stays loaded after this request.
    @ivar body: the parsed request body.
    @ivar inputs: texts to embed, for embedding routes.
    @ivar receivedAt: when the request arrived.
    @ivar phase: C{"waiting"}, C{"loading"}, C{"running"} or C{"done"}.
    @ivar loadDuration: seconds spent loading the model for this request.
    @ivar generatingSince: when the first token started (after the load).
    @ivar emitted: the tokens produced so far, in order.
    @ivar timer: the pending delayed call driving this job, if any.
    @ivar ident: a number unique within the simulator, used in ids.
    """

    request: Request
    route: _Route
    entry: dict[str, Any]
    model: str
    requestedModel: str
    stream: bool
    tokens: int
    limited: bool
    promptTokens: int
    seed: int
    keepAlive: float
    body: dict[str, Any]
    inputs: list[str]
    receivedAt: float
    ident: int
    phase: str = "waiting"
    loadDuration: float = 0.0
    generatingSince: float = 0.0
    emitted: list[str] = attrs.field(factory=list)
    timer: IDelayedCall | None = None

    @property
    def doneReason(self) -> str:
        """
        Why the answer ended, as Ollama and OpenAI name it.
        """
        return "length" if self.limited else "stop"

    def text(self) -> str:
        """
        @return: the whole answer produced so far.
        """
        return "".join(self.emitted)


class _Route:
    """
    The wire format of one kind of work route.  Subclasses render chunks,
    the stream's end and whole (non-streamed) answers.

    @cvar family: C{"ollama"} or C{"openai"}, for error shapes.
    @cvar embedding: whether the route embeds rather than generates.
    @cvar streamByDefault: what C{stream} means when the request omits it.
    """

    family = "ollama"
    embedding = False
    streamByDefault = True

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
        @raise _SimError: when the body is unusable.
        """
        raise NotImplementedError()

    def contentType(self, stream: bool) -> bytes:
        """
        @param stream: whether the answer is streamed.
        @return: the response's content type.
        """
        return b"application/json; charset=utf-8"

    def chunk(self, job: _Job, token: str) -> bytes:
        """
        @param job: the job.
        @param token: the token just produced (already in C{job.emitted}).
        @return: the bytes to write for it in a stream.
        """
        raise NotImplementedError()

    def end(self, job: _Job) -> bytes:
        """
        @param job: the finished job.
        @return: the bytes that end a stream.
        """
        raise NotImplementedError()

    def whole(self, job: _Job) -> bytes:
        """
        @param job: the finished job.
        @return: the whole non-streamed answer.
        """
        raise NotImplementedError()

    def stats(self, job: _Job) -> dict[str, Any]:
        """
        Ollama's timing and count fields, in nanoseconds.

        @param job: the finished job.
        @return: a JSON-ready dict.
        """
        now = self.now()
        return {
            "total_duration": _nanoseconds(now - job.receivedAt),
            "load_duration": _nanoseconds(job.loadDuration),
            "prompt_eval_count": job.promptTokens,
            # Prompt evaluation takes no simulated time: the answer's pace is
            # set by tps alone, which keeps timings predictable in tests.
            "prompt_eval_duration": 0,
            "eval_count": len(job.emitted),
            "eval_duration": _nanoseconds(now - job.generatingSince),
        }

    def usage(self, job: _Job) -> dict[str, int]:
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


def _ollamaLength(body: dict[str, Any]) -> int | None:
    """
    Read Ollama's C{options.num_predict}.

    @param body: the request body.
    @return: the requested answer length, or L{None} when absent or
        negative (Ollama's "no limit").
    """
    options = body.get("options")
    if not isinstance(options, dict):
        return None
    value = options.get("num_predict")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        return None
    return int(value)


def _openaiLength(body: dict[str, Any]) -> int | None:
    """
    Read OpenAI's C{max_completion_tokens} or C{max_tokens}.

    @param body: the request body.
    @return: the requested answer length, or L{None}.
    """
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return None


def _messagesWords(messages: object) -> int:
    """
    Count the words of a chat's messages, both plain string contents and
    OpenAI's list-of-parts contents.

    @param messages: the request's C{messages}.
    @return: the word count.
    @raise _SimError: when C{messages} is not a list of objects.
    """
    if messages is None:
        return 0
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise _SimError(400, "messages must be a list of message objects")
    words = 0
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            words += _countWords(content)
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    words += _countWords(part["text"])
    return words


class _OllamaGenerate(_Route):
    """
    C{POST /api/generate}: NDJSON of C{{"response": token}} objects.
    """

    def parse(self, body: dict[str, Any]) -> tuple[int, int | None, list[str]]:
        """
        Count the prompt, system and suffix words.
        """
        words = sum(
            _countWords(body[key])
            for key in ("prompt", "system", "suffix")
            if isinstance(body.get(key), str)
        )
        return words, _ollamaLength(body), []

    def contentType(self, stream: bool) -> bytes:
        """
        Streams are NDJSON, as Ollama sends them.
        """
        return b"application/x-ndjson" if stream else super().contentType(stream)

    def _object(self, job: _Job, text: str) -> dict[str, Any]:
        """
        @param job: the job.
        @param text: the C{response} text.
        @return: the fields every line has.
        """
        return {
            "model": job.requestedModel,
            "created_at": _isoTime(self.now()),
            "response": text,
            "done": False,
        }

    def chunk(self, job: _Job, token: str) -> bytes:
        """
        One line per token.
        """
        return _jsonBytes(self._object(job, token)) + b"\n"

    def _final(self, job: _Job, text: str) -> dict[str, Any]:
        """
        @param job: the finished job.
        @param text: the C{response} text of the last object.
        @return: the last object, with the stats.
        """
        final = self._object(job, text)
        final["done"] = True
        final["done_reason"] = job.doneReason
        final.update(self.stats(job))
        return final

    def end(self, job: _Job) -> bytes:
        """
        The last line has an empty response, C{done: true} and the stats.
        """
        return _jsonBytes(self._final(job, "")) + b"\n"

    def whole(self, job: _Job) -> bytes:
        """
        One object with the whole answer and the stats.
        """
        return _jsonBytes(self._final(job, job.text()))


class _OllamaChat(_OllamaGenerate):
    """
    C{POST /api/chat}: NDJSON of C{{"message": {"role", "content"}}} objects.
    """

    def parse(self, body: dict[str, Any]) -> tuple[int, int | None, list[str]]:
        """
        Count the words of all messages.
        """
        return _messagesWords(body.get("messages")), _ollamaLength(body), []

    def _object(self, job: _Job, text: str) -> dict[str, Any]:
        """
        Chat lines carry a C{message} instead of a C{response}.
        """
        return {
            "model": job.requestedModel,
            "created_at": _isoTime(self.now()),
            "message": {"role": "assistant", "content": text},
            "done": False,
        }


class _OpenAIChat(_Route):
    """
    C{POST /v1/chat/completions}: SSE of C{chat.completion.chunk} objects.
    """

    family = "openai"
    streamByDefault = False
    objectName = "chat.completion"
    chunkObjectName = "chat.completion.chunk"
    idPrefix = "chatcmpl-"

    def parse(self, body: dict[str, Any]) -> tuple[int, int | None, list[str]]:
        """
        Count the words of all messages.
        """
        return _messagesWords(body.get("messages")), _openaiLength(body), []

    def contentType(self, stream: bool) -> bytes:
        """
        Streams are server-sent events.
        """
        return b"text/event-stream" if stream else super().contentType(stream)

    def _includeUsage(self, job: _Job) -> bool:
        """
        @param job: the job.
        @return: whether the client asked for a usage chunk.
        """
        options = job.body.get("stream_options")
        return isinstance(options, dict) and options.get("include_usage") is True

    def _envelope(self, job: _Job, objectName: str) -> dict[str, Any]:
        """
        @param job: the job.
        @param objectName: the C{object} field.
        @return: the fields every chunk and answer has.
        """
        return {
            "id": f"{self.idPrefix}sim{job.ident}",
            "object": objectName,
            "created": int(self.now()),
            "model": job.requestedModel,
            "system_fingerprint": "fp_sim",
        }

    def _choice(self, job: _Job, text: str | None, finishReason: str | None) -> dict[str, Any]:
        """
        @param job: the job.
        @param text: the delta's content, or L{None} for the closing chunk.
        @param finishReason: C{finish_reason}.
        @return: one streamed choice.
        """
        delta: dict[str, Any] = {}
        # The first delta names the role, as OpenAI does; the rest carry only
        # content, and the closing chunk's delta is empty.
        if len(job.emitted) <= 1 and (text is not None or not job.emitted):
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finishReason}

    def _event(self, job: _Job, choices: list[dict[str, Any]], usage: object = False) -> bytes:
        """
        @param job: the job.
        @param choices: the chunk's choices.
        @param usage: the C{usage} field, or C{False} to leave it out.
        @return: one SSE event.
        """
        chunk = self._envelope(job, self.chunkObjectName)
        chunk["choices"] = choices
        if usage is not False:
            chunk["usage"] = usage
        elif self._includeUsage(job):
            # With include_usage every other chunk says "usage": null.
            chunk["usage"] = None
        return b"data: " + _jsonBytes(chunk) + b"\n\n"

    def chunk(self, job: _Job, token: str) -> bytes:
        """
        One event per token.
        """
        return self._event(job, [self._choice(job, token, None)])

    def end(self, job: _Job) -> bytes:
        """
        The closing chunk with C{finish_reason}, the usage chunk when asked
        for, then C{[DONE]}.
        """
        events = self._event(job, [self._choice(job, None, job.doneReason)])
        if self._includeUsage(job):
            events += self._event(job, [], self.usage(job))
        return events + b"data: [DONE]\n\n"

    def whole(self, job: _Job) -> bytes:
        """
        A C{chat.completion} object.
        """
        answer = self._envelope(job, self.objectName)
        answer["choices"] = [
            {
                "index": 0,
                "message": {"role": "assistant", "content": job.text()},
                "logprobs": None,
                "finish_reason": job.doneReason,
            }
        ]
        answer["usage"] = self.usage(job)
        return _jsonBytes(answer)


class _OpenAICompletion(_OpenAIChat):
    """
    C{POST /v1/completions}: SSE of C{text_completion} objects.
    """

    objectName = "text_completion"
    # Legacy completion chunks are text_completion objects too (no ".chunk" suffix).
    chunkObjectName = "text_completion"
    idPrefix = "cmpl-"

    def parse(self, body: dict[str, Any]) -> tuple[int, int | None, list[str]]:
        """
        Count the prompt's words (a string or a list of strings).
        """
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            words = _countWords(prompt)
        elif isinstance(prompt, list):
            words = sum(_countWords(p) if isinstance(p, str) else 1 for p in prompt)
        elif prompt is None:
            words = 0
        else:
            raise _SimError(400, "prompt must be a string or a list of strings")
        return words, _openaiLength(body), []

    def _choice(self, job: _Job, text: str | None, finishReason: str | None) -> dict[str, Any]:
        """
        Completion choices carry C{text} rather than a delta.
        """
        return {
            "text": text or "",
            "index": 0,
            "logprobs": None,
            "finish_reason": finishReason,
        }

    def whole(self, job: _Job) -> bytes:
        """
        A C{text_completion} object.
        """
        answer = self._envelope(job, self.objectName)
        answer["choices"] = [self._choice(job, job.text(), job.doneReason)]
        answer["usage"] = self.usage(job)
        return _jsonBytes(answer)


def _embeddingInputs(value: object, name: str, allowTokens: bool) -> list[str]:
    """
    Normalise an embedding request's input to a list of texts.

    @param value: C{input} (or C{prompt}).
    @param name: the field's name, for errors.
    @param allowTokens: whether lists of token ids (OpenAI) are accepted.
    @return: the texts.
    @raise _SimError: when the input has the wrong type.
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
    raise _SimError(400, f"invalid {name}: expected a string or a list of strings")


class _OllamaEmbed(_Route):
    """
    C{POST /api/embed}: C{{"embeddings": [[...], ...]}} plus timings.
    """

    embedding = True
    streamByDefault = False

    def parse(self, body: dict[str, Any]) -> tuple[int, int | None, list[str]]:
        """
        Read C{input}, a string or a list of strings.
        """
        inputs = _embeddingInputs(body.get("input", []), "input", False)
        return sum(_countWords(text) for text in inputs), None, inputs

    def whole(self, job: _Job) -> bytes:
        """
        The embeddings with Ollama's timings.
        """
        stats = self.stats(job)
        return _jsonBytes(
            {
                "model": job.requestedModel,
                "embeddings": [embeddingFor(text) for text in job.inputs],
                "total_duration": stats["total_duration"],
                "load_duration": stats["load_duration"],
                "prompt_eval_count": job.promptTokens,
            }
        )


class _OllamaEmbeddings(_Route):
    """
    C{POST /api/embeddings} (legacy): C{{"embedding": [...]}} for C{prompt}.
    """

    embedding = True
    streamByDefault = False

    def parse(self, body: dict[str, Any]) -> tuple[int, int | None, list[str]]:
        """
        Read C{prompt}, one string.
        """
        prompt = body.get("prompt", "")
        if not isinstance(prompt, str):
            raise _SimError(400, "invalid prompt: expected a string")
        return _countWords(prompt), None, [prompt]

    def whole(self, job: _Job) -> bytes:
        """
        The one embedding; an empty prompt gets an empty vector, as in Ollama.
        """
        text = job.inputs[0]
        return _jsonBytes({"embedding": embeddingFor(text) if text else []})


class _OpenAIEmbeddings(_Route):
    """
    C{POST /v1/embeddings}: an OpenAI C{list} of C{embedding} objects.
    """

    family = "openai"
    embedding = True
    streamByDefault = False

    def parse(self, body: dict[str, Any]) -> tuple[int, int | None, list[str]]:
        """
        Read C{input}: a string, strings, or token id lists.
        """
        inputs = _embeddingInputs(body.get("input"), "input", True)
        dimensions = body.get("dimensions")
        if dimensions is not None and (
            not isinstance(dimensions, int) or isinstance(dimensions, bool) or dimensions < 1
        ):
            raise _SimError(400, "dimensions must be a positive integer")
        return sum(_countWords(text) for text in inputs), None, inputs

    def whole(self, job: _Job) -> bytes:
        """
        The embeddings, encoded as C{encoding_format} asks.
        """
        dimensions = job.body.get("dimensions") or EMBEDDING_DIMENSIONS
        encodingFormat = job.body.get("encoding_format")
        return _jsonBytes(
            {
                "object": "list",
                "data": [
                    {
                        "object": "embedding",
                        "index": index,
                        "embedding": _encodeEmbedding(embeddingFor(text, dimensions), encodingFormat),
                    }
                    for index, text in enumerate(job.inputs)
                ],
                "model": job.requestedModel,
                "usage": {"prompt_tokens": job.promptTokens, "total_tokens": job.promptTokens},
            }
        )


class _OllamaLoad(_OllamaGenerate):
    """
    An Ollama generate or chat request with nothing to answer: it only loads
    the model (inside a slot) and answers C{done_reason: "load"}.
    """

    def __init__(self, simulator: Simulator, chat: bool) -> None:
        """
        @param simulator: the simulator.
        @param chat: whether the request came to C{/api/chat}.
        """
        super().__init__(simulator)
        self.chat = chat

    def contentType(self, stream: bool) -> bytes:
        """
        Always one JSON object, even when streaming was asked for.
        """
        return b"application/json; charset=utf-8"

    def whole(self, job: _Job) -> bytes:
        """
        The load answer: an empty response and C{done: true}.
        """
        answer: dict[str, Any] = {"model": job.requestedModel, "created_at": _isoTime(self.now())}
        if self.chat:
            answer["message"] = {"role": "assistant", "content": ""}
        else:
            answer["response"] = ""
        answer["done_reason"] = "load"
        answer["done"] = True
        return _jsonBytes(answer)


_Handler = Callable[[Request], "bytes | int"]


@attrs.define(eq=False)
class Simulator:
    """
    A simulated LLM server.  Serve L{resource} with a L{Site}; everything is
    timed by C{clock}.

    @ivar options: how the simulator behaves.
    @ivar clock: the clock driving tokens and loads.
    @ivar modelNames: the served model names (canonical: C{name:tag} with
        the Ollama API).
    @ivar failStatus: when set, every work request fails with this status
        (see C{POST /sim/fail}).
    """

    options: SimulatorOptions
    clock: IReactorTime
    modelNames: tuple[str, ...] = attrs.field(init=False)
    failStatus: int | None = attrs.field(init=False, default=None)
    _cards: dict[str, _ModelCard] = attrs.field(init=False)
    _waiting: deque[_Job] = attrs.field(init=False, factory=deque)
    _running: list[_Job] = attrs.field(init=False, factory=list)
    # model -> expiry time, least recently used first.
    _loaded: OrderedDict[str, float] = attrs.field(init=False, factory=OrderedDict)
    _loading: dict[str, IDelayedCall] = attrs.field(init=False, factory=dict)
    _counters: dict[str, int] = attrs.field(init=False, factory=dict)
    _log: deque[dict[str, Any]] = attrs.field(init=False, factory=lambda: deque(maxlen=LOG_LIMIT))
    _nextIdent: int = attrs.field(init=False, default=1)
    _routes: dict[tuple[bytes, str], _Handler] = attrs.field(init=False, factory=dict)
    _resource: IResource | None = attrs.field(init=False, default=None)

    def __attrs_post_init__(self) -> None:
        """
        Canonicalise model names and build the route table.
        """
        names: list[str] = []
        for name in self.options.models:
            canonical = self._canonical(name)
            if canonical not in names:
                names.append(canonical)
        self.modelNames = tuple(names)
        self._cards = {name: _ModelCard.describe(name) for name in self.modelNames}
        self._resetCounters()
        self._buildRoutes()

    # -- public API ---------------------------------------------------------

    def resource(self) -> IResource:
        """
        @return: the C{twisted.web} resource serving every route.
        """
        if self._resource is None:
            self._resource = _SimulatorResource(self)
        return self._resource

    @property
    def stats(self) -> dict[str, Any]:
        """
        The counters and request log served by C{GET /sim/stats}.

        @return: a JSON-ready dict: C{requests}, C{completed}, C{cancelled},
            C{errors}, C{active}, C{waiting}, C{maxConcurrent}, C{loaded},
            C{failStatus} and C{log} (oldest first).
        """
        self._expire()
        return {
            **self._counters,
            "active": len(self._running),
            "waiting": len(self._waiting),
            "loaded": list(self._loaded),
            "failStatus": self.failStatus,
            "log": [dict(entry) for entry in self._log],
        }

    def reset(self) -> None:
        """
        Clear the counters and the request log (requests in flight go on).
        """
        self._resetCounters()
        self._log.clear()

    def shutdown(self) -> None:
        """
        Stop all work: cancel every timer and drop every open request's
        connection, so nothing is left pending on the reactor.
        """
        for call in self._loading.values():
            if call.active():
                call.cancel()
        self._loading.clear()
        for job in list(self._waiting) + list(self._running):
            self._stopJob(job)
            job.entry["status"] = "cancelled"
            job.entry["finishedAt"] = self.clock.seconds()
            self._counters["cancelled"] += 1
            job.request.loseConnection()
        self._waiting.clear()
        self._running.clear()

    # -- bookkeeping --------------------------------------------------------

    def _resetCounters(self) -> None:
        """
        Zero the counters; the high-water mark restarts at what runs now.
        """
        self._counters = {
            "requests": 0,
            "completed": 0,
            "cancelled": 0,
            "errors": 0,
            "maxConcurrent": len(self._running),
        }

    def _canonical(self, name: str) -> str:
        """
        @param name: a model name as a client or the options give it.
        @return: the name as served: with the Ollama API an untagged name
            means C{:latest}; OpenAI-style servers match names exactly.
        """
        if self.options.api == "ollama" and ":" not in name.rsplit("/", 1)[-1]:
            return name + ":latest"
        return name

    def _find(self, name: object) -> str | None:
        """
        @param name: a requested model name.
        @return: the served model's canonical name, or L{None}.
        """
        if not isinstance(name, str) or not name:
            return None
        canonical = self._canonical(name)
        return canonical if canonical in self._cards else None

    def _inUse(self) -> set[str]:
        """
        @return: the models that running jobs are generating with.
        """
        return {job.model for job in self._running if job.phase == "running"}

    def _expire(self) -> None:
        """
        Unload models whose keep-alive ran out, unless a job is using them.
        """
        now = self.clock.seconds()
        inUse = self._inUse()
        for model, expiresAt in list(self._loaded.items()):
            if expiresAt <= now and model not in inUse:
                del self._loaded[model]

    # -- HTTP dispatch ------------------------------------------------------

    def _buildRoutes(self) -> None:
        """
        Fill the route table for the configured API family.
        """
        routes: dict[tuple[bytes, str], _Handler] = {}
        if self.options.api == "ollama":
            routes[b"GET", "/"] = self._root
            routes[b"GET", "/api/version"] = self._version
            routes[b"GET", "/api/tags"] = self._tags
            routes[b"GET", "/api/ps"] = self._ps
            routes[b"POST", "/api/show"] = self._show
            routes[b"POST", "/api/generate"] = self._work(_OllamaGenerate(self))
            routes[b"POST", "/api/chat"] = self._work(_OllamaChat(self))
            routes[b"POST", "/api/embed"] = self._work(_OllamaEmbed(self))
            routes[b"POST", "/api/embeddings"] = self._work(_OllamaEmbeddings(self))
        else:
            # llama-server and vLLM answer a health probe here.
            routes[b"GET", "/health"] = self._health
        routes[b"GET", "/v1/models"] = self._openaiModels
        routes[b"POST", "/v1/chat/completions"] = self._work(_OpenAIChat(self))
        routes[b"POST", "/v1/completions"] = self._work(_OpenAICompletion(self))
        routes[b"POST", "/v1/embeddings"] = self._work(_OpenAIEmbeddings(self))
        routes[b"GET", "/sim/stats"] = self._simStats
        routes[b"POST", "/sim/reset"] = self._simReset
        routes[b"POST", "/sim/fail"] = self._simFail
        self._routes = routes

    def render(self, request: Request) -> bytes | int:
        """
        Answer any request: the resource's single entry point.

        @param request: the request.
        @return: the body, or L{NOT_DONE_YET} for answers that take time.
        """
        request.setHeader(b"X-Sim-Backend", self.options.name.encode("utf-8"))
        path = unquote((request.path or b"/").decode("utf-8", "replace"))
        method = request.method
        lookup = b"GET" if method == b"HEAD" else method
        handler = self._routes.get((lookup, path))
        if handler is None and lookup == b"GET" and path.startswith("/v1/models/"):
            handler = self._openaiModel
        if handler is None:
            allowed = sorted({m.decode() for (m, p) in self._routes if p == path})
            if allowed:
                if "GET" in allowed:
                    allowed.append("HEAD")
                request.setHeader(b"Allow", ", ".join(allowed).encode("ascii"))
                body = self._errorBody(request, _SimError(405, "method not allowed"), path)
            else:
                body = self._notFound(request, path)
        else:
            try:
                body = handler(request)
            except _SimError as error:
                body = self._errorBody(request, error, path)
        if method == b"HEAD" and isinstance(body, bytes):
            # Say how long the GET body would be, but send none, without
            # twisted.web logging a warning about eating a HEAD body.
            request.setHeader(b"Content-Length", b"%d" % (len(body),))
            return b""
        return body

    def _family(self, path: str) -> str:
        """
        @param path: a request path.
        @return: the API family whose error shape the path gets.
        """
        if path.startswith("/v1/") or self.options.api == "openai":
            return "openai"
        return "ollama"

    def _errorBody(self, request: Request, error: _SimError, path: str) -> bytes:
        """
        Shape an error for the route's API family.

        @param request: the request to answer.
        @param error: the error.
        @param path: the request path.
        @return: the body.
        """
        request.setResponseCode(error.code)
        request.setHeader(b"Content-Type", b"application/json; charset=utf-8")
        if self._family(path) == "openai":
            return _jsonBytes(
                {
                    "error": {
                        "message": error.message,
                        "type": error.errorType,
                        "param": None,
                        "code": error.errorCode,
                    }
                }
            )
        return _jsonBytes({"error": error.message})

    def _notFound(self, request: Request, path: str) -> bytes:
        """
        Answer an unknown route as the real servers do.

        @param request: the request.
        @param path: its path.
        @return: the body.
        """
        if self._family(path) == "ollama":
            # Ollama's router (Gin) answers unknown routes in plain text.
            request.setResponseCode(404)
            request.setHeader(b"Content-Type", b"text/plain")
            return b"404 page not found"
        return self._errorBody(
            request,
            _SimError(404, f"Not found: {path}", "invalid_request_error", "not_found"),
            path,
        )

    @staticmethod
    def _json(request: Request, value: object) -> bytes:
        """
        Answer 200 with a JSON body.

        @param request: the request.
        @param value: a JSON-ready value.
        @return: the body.
        """
        request.setHeader(b"Content-Type", b"application/json; charset=utf-8")
        return _jsonBytes(value)

    @staticmethod
    def _body(request: Request) -> dict[str, Any]:
        """
        Parse a request's JSON object body.

        @param request: the request.
        @return: the object.
        @raise _SimError: 400 when the body is not a JSON object.
        """
        raw = request.content.read() if request.content is not None else b""
        try:
            body = json.loads(raw or b"{}")
        except ValueError as error:
            raise _SimError(400, f"invalid JSON body: {error}") from None
        if not isinstance(body, dict):
            raise _SimError(400, "the request body must be a JSON object")
        return body

    # -- metadata routes ----------------------------------------------------

    def _root(self, request: Request) -> bytes:
        """
        C{GET /}: Ollama's liveness text.
        """
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        return b"Ollama is running"

    def _health(self, request: Request) -> bytes:
        """
        C{GET /health} (OpenAI-style servers).
        """
        return self._json(request, {"status": "ok"})

    def _version(self, request: Request) -> bytes:
        """
        C{GET /api/version}.
        """
        return self._json(request, {"version": self.options.version})

    def _tags(self, request: Request) -> bytes:
        """
        C{GET /api/tags}: every served model.
        """
        return self._json(
            request, {"models": [self._cards[name].listing() for name in self.modelNames]}
        )

    def _ps(self, request: Request) -> bytes:
        """
        C{GET /api/ps}: the loaded models, most recently used first.
        """
        self._expire()
        now = self.clock.seconds()
        models = []
        for name in reversed(self._loaded):
            card = self._cards[name]
            expiresAt = self._loaded[name]
            entry = card.listing()
            del entry["modified_at"]
            entry["expires_at"] = _isoTime(
                now + _FOREVER_SECONDS if math.isinf(expiresAt) else expiresAt
            )
            entry["size_vram"] = card.size
            entry["context_length"] = 4096
            models.append(entry)
        return self._json(request, {"models": models})

    def _show(self, request: Request) -> bytes:
        """
        C{POST /api/show}: a model's details.
        """
        body = self._body(request)
        requested = body.get("model", body.get("name"))
        name = self._find(requested)
        if name is None:
            raise _SimError(404, f"model '{requested}' not found")
        card = self._cards[name]
        template = "{{ .System }}\nUSER: {{ .Prompt }}\nASSISTANT: "
        return self._json(
            request,
            {
                "modelfile": (
                    f'# Modelfile generated by "ollama show"\nFROM {name}\n'
                    f'TEMPLATE """{template}"""\nPARAMETER num_ctx 4096\n'
                ),
                "parameters": "num_ctx                        4096",
                "template": template,
                "details": card.details(),
                "model_info": {
                    "general.architecture": card.family,
                    "general.parameter_count": int(card.size / 0.5625),
                    f"{card.family}.context_length": 8192,
                    f"{card.family}.embedding_length": EMBEDDING_DIMENSIONS,
                },
                "capabilities": ["embedding"] if card.embedding else ["completion"],
                "modified_at": _isoTime(_MODIFIED_AT),
            },
        )

    def _openaiModelObject(self, name: str) -> dict[str, Any]:
        """
        @param name: a served model.
        @return: its OpenAI C{model} object.
        """
        return {
            "id": name,
            "object": "model",
            "created": _MODIFIED_AT,
            "owned_by": "library" if self.options.api == "ollama" else self.options.name,
        }

    def _openaiModels(self, request: Request) -> bytes:
        """
        C{GET /v1/models}.
        """
        return self._json(
            request,
            {"object": "list", "data": [self._openaiModelObject(n) for n in self.modelNames]},
        )

    def _openaiModel(self, request: Request) -> bytes:
        """
        C{GET /v1/models/{model}}; the name may contain slashes.
        """
        path = unquote(request.path.decode("utf-8", "replace"))
        requested = path[len("/v1/models/") :]
        name = self._find(requested)
        if name is None:
            raise _SimError(
                404,
                f"The model `{requested}` does not exist.",
                "invalid_request_error",
                "model_not_found",
            )
        return self._json(request, self._openaiModelObject(name))

    # -- /sim/* -------------------------------------------------------------

    def _simStats(self, request: Request) -> bytes:
        """
        C{GET /sim/stats}.
        """
        return self._json(request, self.stats)

    def _simReset(self, request: Request) -> bytes:
        """
        C{POST /sim/reset}.
        """
        self.reset()
        return self._json(request, {"reset": True})

    def _simFail(self, request: Request) -> bytes:
        """
        C{POST /sim/fail} C{{"status": 500}} or C{{"status": null}}.
        """
        status = self._body(request).get("status")
        if status is not None and (
            not isinstance(status, int) or isinstance(status, bool) or not 400 <= status <= 599
        ):
            raise _SimError(400, "status must be an HTTP error status (400-599) or null")
        self.failStatus = status
        return self._json(request, {"status": status})

    # -- work routes --------------------------------------------------------

    def _work(self, route: _Route) -> _Handler:
        """
        Build the handler of a generation or embedding route.

        @param route: the route's wire format.
        @return: the handler.
        """
        return lambda request: self._accept(request, route)

    def _accept(self, request: Request, route: _Route) -> bytes | int:
        """
        Admit a work request: log it, refuse it if it is unusable (or the
        simulator is failing), else queue it for a slot.

        @param request: the request.
        @param route: the route's wire format.
        @return: an error body, or L{NOT_DONE_YET}.
        """
        now = self.clock.seconds()
        path = request.path.decode("utf-8", "replace")
        headers = {
            name.decode("latin-1").lower(): ", ".join(v.decode("latin-1") for v in values)
            for name, values in request.requestHeaders.getAllRawHeaders()
        }
        user = request.getHeader(b"x-user-id")
        entry: dict[str, Any] = {
            "id": self._nextIdent,
            "path": path,
            "model": None,
            "user": user.decode("utf-8", "replace") if user is not None else None,
            "headers": headers,
            "status": "waiting",
            "receivedAt": now,
            "startedAt": None,
            "finishedAt": None,
            "promptTokens": 0,
            "tokens": 0,
        }
        self._log.append(entry)
        self._counters["requests"] += 1
        ident = self._nextIdent
        self._nextIdent += 1
        try:
            return self._admit(request, route, entry, ident)
        except _SimError:
            entry["status"] = "error"
            entry["finishedAt"] = now
            self._counters["errors"] += 1
            raise

    def _admit(self, request: Request, route: _Route, entry: dict[str, Any], ident: int) -> int:
        """
        Validate a work request and queue it.

        @param request: the request.
        @param route: the route's wire format.
        @param entry: its log entry.
        @param ident: its number.
        @return: L{NOT_DONE_YET}.
        @raise _SimError: when it is refused.
        """
        if self.failStatus is not None:
            raise _SimError(self.failStatus, "simulated failure", "api_error", "simulated_failure")
        body = self._body(request)
        requested = body.get("model")
        entry["model"] = requested if isinstance(requested, str) else None
        if not isinstance(requested, str) or not requested:
            raise _SimError(400, "model is required")
        model = self._find(requested)
        if model is None:
            if route.family == "openai" and self.options.api == "openai":
                raise _SimError(
                    404,
                    f"The model `{requested}` does not exist.",
                    "invalid_request_error",
                    "model_not_found",
                )
            # Ollama says the same on /api/* and on its /v1/* compatibility
            # routes (there with OpenAI's error envelope).
            raise _SimError(
                404, f'model "{requested}" not found, try pulling it first', "not_found_error"
            )
        if self._cards[model].embedding and not route.embedding:
            raise _SimError(400, f'"{requested}" does not support generate')
        promptTokens, length, inputs = route.parse(body)
        stream = body.get("stream")
        if not isinstance(stream, bool):
            stream = route.streamByDefault
        keepAlive = _parseKeepAlive(body.get("keep_alive"))

        if isinstance(route, _OllamaGenerate) and not route.embedding:
            empty = (
                not body.get("messages") if isinstance(route, _OllamaChat) else not body.get("prompt")
            )
            if empty:
                if keepAlive == 0:
                    return self._unload(request, route, entry, model, requested)
                route = _OllamaLoad(self, isinstance(route, _OllamaChat))
                stream = False

        job = _Job(
            request=request,
            route=route,
            entry=entry,
            model=model,
            requestedModel=requested,
            stream=stream,
            tokens=self.options.tokens if length is None else length,
            limited=length is not None,
            promptTokens=promptTokens,
            seed=zlib.crc32(json.dumps(body.get("messages", body.get("prompt", ""))).encode()),
            keepAlive=keepAlive,
            body=body,
            inputs=inputs,
            receivedAt=self.clock.seconds(),
            ident=ident,
        )
        entry["promptTokens"] = promptTokens
        request.setHeader(b"Content-Type", route.contentType(stream))
        request.notifyFinish().addErrback(self._disconnected, job)
        self._waiting.append(job)
        self._dispatch()
        return NOT_DONE_YET

    def _unload(
        self, request: Request, route: _Route, entry: dict[str, Any], model: str, requested: str
    ) -> int:
        """
        Answer an Ollama unload request (empty prompt, C{keep_alive: 0}).

        @param request: the request.
        @param route: the generate or chat route.
        @param entry: its log entry.
        @param model: the model to unload.
        @param requested: the name the client used.
        @return: L{NOT_DONE_YET} (the answer is already written).
        """
        if model in self._loaded:
            # A model in use goes once its last job ends, as in Ollama.
            self._loaded[model] = self.clock.seconds()
            self._expire()
        answer: dict[str, Any] = {
            "model": requested,
            "created_at": _isoTime(self.clock.seconds()),
        }
        if isinstance(route, _OllamaChat):
            answer["message"] = {"role": "assistant", "content": ""}
        else:
            answer["response"] = ""
        answer["done_reason"] = "unload"
        answer["done"] = True
        body = _jsonBytes(answer)
        request.setHeader(b"Content-Type", b"application/json; charset=utf-8")
        request.setHeader(b"Content-Length", b"%d" % (len(body),))
        request.write(body)
        request.finish()
        entry["status"] = "completed"
        entry["startedAt"] = entry["finishedAt"] = self.clock.seconds()
        self._counters["completed"] += 1
        return NOT_DONE_YET

    # -- slots, loads and tokens --------------------------------------------

    def _dispatch(self) -> None:
        """
        Start waiting jobs, oldest first, while slots are free.
        """
        while self._waiting and len(self._running) < self.options.slots:
            job = self._waiting.popleft()
            self._running.append(job)
            self._counters["maxConcurrent"] = max(
                self._counters["maxConcurrent"], len(self._running)
            )
            self._start(job)

    def _start(self, job: _Job) -> None:
        """
        A job got a slot: load its model if needed, then produce.

        @param job: the job.
        """
        now = self.clock.seconds()
        job.entry["status"] = "running"
        job.entry["startedAt"] = now
        _requestLog.info(
            "request {id} {path} user={user} started",
            id=job.entry.get("id"), path=job.entry.get("path"), user=job.entry.get("user"),
        )
        self._expire()
        if job.model in self._loaded:
            self._loaded.move_to_end(job.model)
            self._begin(job)
            return
        if job.model not in self._loading:
            if self.options.loadDelay == 0:
                self._loaded[job.model] = now + DEFAULT_KEEP_ALIVE
                self._evict(job.model)
                self._begin(job)
                return
            self._loading[job.model] = self.clock.callLater(
                self.options.loadDelay, self._loadFinished, job.model
            )
        # Wait for the load in progress, whoever started it.
        job.phase = "loading"
        readyAt = self._loading[job.model].getTime()
        job.timer = self.clock.callLater(max(0.0, readyAt - now), self._loadedFor, job, now)

    def _loadFinished(self, model: str) -> None:
        """
        A model finished loading: it becomes the most recently used one.

        @param model: the model.
        """
        del self._loading[model]
        self._loaded[model] = self.clock.seconds() + DEFAULT_KEEP_ALIVE
        self._loaded.move_to_end(model)
        self._evict(model)

    def _evict(self, keep: str) -> None:
        """
        Unload least recently used models beyond C{maxLoaded}, sparing the
        one just loaded and any in use (so the limit can be exceeded while
        all loaded models are busy).

        @param keep: the model just loaded.
        """
        inUse = self._inUse()
        for model in list(self._loaded):
            if len(self._loaded) <= self.options.maxLoaded:
                break
            if model != keep and model not in inUse:
                del self._loaded[model]

    def _loadedFor(self, job: _Job, since: float) -> None:
        """
        The model a job waited for is loaded.

        @param job: the job.
        @param since: when the job started waiting for the load.
        """
        job.timer = None
        if job.model not in self._loaded:
            # Another load evicted it at the same instant (busy server, tiny
            # maxLoaded): treat it as loaded for this job, as the slot holds it.
            self._loaded[job.model] = self.clock.seconds() + DEFAULT_KEEP_ALIVE
            self._evict(job.model)
        self._loaded.move_to_end(job.model)
        job.loadDuration = self.clock.seconds() - since
        self._begin(job)

    def _interval(self) -> float:
        """
        @return: seconds per token (0 for "as fast as possible").
        """
        return 1.0 / self.options.tps if self.options.tps > 0 else 0.0

    def _begin(self, job: _Job) -> None:
        """
        The model is loaded: schedule the first token (or the embedding, or
        the load answer).

        @param job: the job.
        """
        job.phase = "running"
        job.generatingSince = self.clock.seconds()
        if isinstance(job.route, _OllamaLoad):
            self._complete(job)
        elif job.route.embedding:
            # An embedding costs one token's time.
            job.timer = self.clock.callLater(self._delayUntil(job, 1), self._complete, job)
        elif job.tokens == 0:
            self._complete(job)
        else:
            job.timer = self.clock.callLater(self._delayUntil(job, 1), self._token, job)

    def _delayUntil(self, job: _Job, count: int) -> float:
        """
        How long until a job's C{count}th token is due.  Tokens keep to a
        timeline fixed when generation began, so a late reactor turn does not
        slow the whole stream down (and a test clock that jumps ahead gets
        every token that is due by then).

        @param job: the job.
        @param count: which token (1 for the first).
        @return: the delay, never negative.
        """
        due = job.generatingSince + count * self._interval()
        return max(0.0, due - self.clock.seconds())

    def _token(self, job: _Job) -> None:
        """
        Produce one token; stream it at once if streaming.

        @param job: the job.
        """
        job.timer = None
        index = len(job.emitted)
        word = _WORDS[(job.seed + index) % len(_WORDS)]
        token = word if index == 0 else " " + word
        job.emitted.append(token)
        job.entry["tokens"] = len(job.emitted)
        if job.stream:
            job.request.write(job.route.chunk(job, token))
            if job.phase == "done":
                # The write found the client gone; _disconnected cleaned up.
                return
        if len(job.emitted) >= job.tokens:
            self._complete(job)
        else:
            # One token per reactor turn even at tps=0 (callLater(0)), never
            # a loop, so other streams and the network keep moving.
            job.timer = self.clock.callLater(
                self._delayUntil(job, len(job.emitted) + 1), self._token, job
            )

    def _complete(self, job: _Job) -> None:
        """
        Finish a job's answer and free its slot.

        @param job: the job.
        """
        job.timer = None
        if job.stream:
            job.request.write(job.route.end(job))
        else:
            body = job.route.whole(job)
            job.request.setHeader(b"Content-Length", b"%d" % (len(body),))
            job.request.write(body)
        if job.phase == "done":
            # The write found the client gone; _disconnected cleaned up.
            return
        self._release(job, "completed")
        job.request.finish()
        self._dispatch()

    def _release(self, job: _Job, status: str) -> None:
        """
        Take a job out of the slots (or the queue) and record how it ended.

        @param job: the job.
        @param status: C{"completed"} or C{"cancelled"}.
        """
        wasRunning = job.phase in ("loading", "running")
        self._stopJob(job)
        if wasRunning and job.model in self._loaded:
            self._loaded[job.model] = self.clock.seconds() + job.keepAlive
        job.entry["status"] = status
        job.entry["finishedAt"] = self.clock.seconds()
        self._counters[status] += 1
        # With -v, integration tests wait for these lines instead of polling /sim/stats.
        _requestLog.info(
            "request {id} {path} user={user} {status}",
            id=job.entry.get("id"), path=job.entry.get("path"),
            user=job.entry.get("user"), status=status,
        )

    def _stopJob(self, job: _Job) -> None:
        """
        Cancel a job's timer and take it out of the queue or the slots.

        @param job: the job.
        """
        if job.timer is not None and job.timer.active():
            job.timer.cancel()
        job.timer = None
        if job in self._running:
            self._running.remove(job)
        elif job in self._waiting:
            self._waiting.remove(job)
        job.phase = "done"

    def _disconnected(self, reason: Failure, job: _Job) -> None:
        """
        The client went away before the answer ended: drop the job at once.

        @param reason: why the connection was lost.
        @param job: the job.
        """
        if job.phase == "done":
            return
        self._release(job, "cancelled")
        self._dispatch()


class _SimulatorResource(Resource):
    """
    The one resource serving every simulator route (it does its own routing,
    so paths such as C{/v1/models/library/llama3:8b} need no tree).
    """

    isLeaf = True

    def __init__(self, simulator: Simulator) -> None:
        """
        @param simulator: the simulator answering requests.
        """
        super().__init__()
        self._simulator = simulator

    def render(self, request: Request) -> bytes | int:  # type: ignore[override]
        """
        Hand every request, whatever its method, to the simulator.

        @param request: the request.
        @return: a body or L{NOT_DONE_YET}.
        """
        return self._simulator.render(request)


class _QuietSite(Site):
    """
    A site that logs neither its start nor its requests.
    """

    noisy = False

    def log(self, request: Request) -> None:
        """
        Log nothing: the demo's backends would otherwise fill the proxy's log.
        """


class SimulatorService(Service):
    """
    Serve a L{Simulator} on a stream server endpoint.

    @ivar simulator: the simulator served.
    @ivar endpoint: where to listen.
    """

    _log = Logger()

    def __init__(
        self, simulator: Simulator, endpoint: IStreamServerEndpoint, quiet: bool = False
    ) -> None:
        """
        @param simulator: the simulator to serve.
        @param endpoint: where to listen.
        @param quiet: log no access lines (for C{--demo}, inside the proxy's own log).
        """
        self.simulator = simulator
        self.endpoint = endpoint
        self.quiet = quiet
        self._listening: Deferred[IListeningPort] | None = None
        self._port: IListeningPort | None = None
        self._failure: Failure | None = None
        self._waiters: list[Deferred[IListeningPort]] = []

    def startService(self) -> None:
        """
        Start listening.
        """
        super().startService()
        self._failure = None
        site = (_QuietSite if self.quiet else Site)(self.simulator.resource())
        self._listening = self.endpoint.listen(site)
        self._listening.addCallbacks(self._listened, self._listenFailed)

    def _listened(self, port: IListeningPort) -> None:
        """
        @param port: the port now listening.
        """
        self._listening = None
        self._port = port
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(port)

    def _listenFailed(self, failure: Failure) -> None:
        """
        @param failure: why listening failed.
        """
        self._listening = None
        self._failure = failure
        waiters, self._waiters = self._waiters, []
        if not waiters:
            self._log.failure("simulator {name} could not listen", failure, name=self.simulator.options.name)
        for waiter in waiters:
            waiter.errback(failure)

    def whenListening(self) -> Deferred[IListeningPort]:
        """
        @return: a Deferred that fires with the listening port (use
            C{port.getHost().port} after listening on port 0), or fails with
            why listening failed.
        """
        if self._port is not None:
            return succeed(self._port)
        if self._failure is not None:
            return fail(self._failure)
        waiter: Deferred[IListeningPort] = Deferred()
        self._waiters.append(waiter)
        return waiter

    def stopService(self) -> Deferred[None]:
        """
        Stop listening and drop every request in flight.

        @return: a Deferred that fires once the port is closed.
        """
        super().stopService()
        self.simulator.shutdown()
        if self._listening is not None:
            self._listening.cancel()
            self._listening = None
            return succeed(None)
        port, self._port = self._port, None
        if port is None:
            return succeed(None)
        return maybeDeferred(port.stopListening)


def simulatorService(
    options: SimulatorOptions,
    endpoint: IStreamServerEndpoint,
    clock: IReactorTime,
    quiet: bool = False,
) -> SimulatorService:
    """
    Build a service that serves a new simulator on C{endpoint}.

    @param options: how the simulator behaves.
    @param endpoint: where to listen.
    @param clock: the clock driving tokens and loads (the reactor).
    @return: the service; its C{simulator} attribute is the simulator and
        C{whenListening()} gives the port.
    """
    return SimulatorService(Simulator(options, clock), endpoint, quiet)
