# -*- test-case-name: tests.test_translate_ollama_openai -*-
"""
Ollama C{/api/chat}, C{/api/generate}, C{/api/embed} and C{/api/embeddings} on an
OpenAI-compatible backend (C{/v1/chat/completions}, C{/v1/completions},
C{/v1/embeddings}), and the answers back: OpenAI SSE into Ollama NDJSON as it arrives,
whole JSON answers at once.

Requests (L{translateRequest}):

  - chat messages keep their roles and text; C{images} (base64) become C{image_url} parts
    with C{data:} URIs of the sniffed image type; assistant C{tool_calls} get ids and
    JSON-string arguments, and each C{tool} message answers the oldest pending call (of
    its C{tool_name} when given); C{tools} are already OpenAI-shaped.
  - C{/api/generate} applies the model's template, so it becomes a chat completion (an
    optional system message, the prompt as the user's message); with C{raw} it is a plain
    C{/v1/completions} prompt.
  - C{format}: C{"json"} is C{response_format} C{json_object}, a schema is
    C{json_schema}; C{think} levels are C{reasoning_effort}, C{think: false} drops the
    reasoning from the answer; C{logprobs}/C{top_logprobs} pass on.
  - options: see L{_SAMPLING}. Load-time options (L{_LOAD_TIME}: C{num_ctx}, C{num_gpu},
    ...) and C{keep_alive} are the OpenAI server's own start-up settings and are not
    sent; any other option is refused.
  - What has no faithful equivalent is refused with a 400: C{context}, C{template},
    C{suffix}, C{raw} with images, a system prompt or a format, unknown options,
    unknown roles, images that are not PNG, JPEG, GIF or WebP.
  - An empty chat or prompt is Ollama's "load the model" call and an empty C{keep_alive:
    0} one is "unload": an OpenAI server keeps its models loaded, so both are answered
    at once (C{done_reason} C{load}/C{unload}) without a backend call.

Answers: content, C{reasoning_content} as C{thinking}, tool calls (collected until their
arguments are complete, then one line, as Ollama sends them), C{logprobs}; the final
line has C{done}, C{done_reason} from the finish reason (C{tool_calls} is C{stop}, as
Ollama reports it), C{prompt_eval_count}/C{eval_count} from C{usage} (streams ask for
it with C{stream_options.include_usage}), and durations from llama-server's C{timings}
when present, else measured on the proxy's clock.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from datetime import datetime, timezone
from typing import Any

from twisted.internet.interfaces import IReactorTime

from ollamamq.errors import OLLAMA, BadRequest, ProxyError
from ollamamq.translate.common import (
    OpenAIStreamReader,
    NDJSON,
    SSEReader,
    Translation,
    UntranslatableResponse,
    asJSON,
    jsonLine,
    translateWhole,
)

CHAT = b"/v1/chat/completions"
COMPLETIONS = b"/v1/completions"
EMBEDDINGS = b"/v1/embeddings"

#: Ollama option -> the OpenAI-compatible field. The first five are the OpenAI API's
#: own; the others are llama.cpp's names, which llama-server, LM Studio and vLLM take.
_SAMPLING = {
    "temperature": "temperature",
    "top_p": "top_p",
    "seed": "seed",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "stop": "stop",
    "num_predict": "max_tokens",
    "top_k": "top_k",
    "min_p": "min_p",
    "typical_p": "typical_p",
    "repeat_penalty": "repeat_penalty",
    "repeat_last_n": "repeat_last_n",
    "mirostat": "mirostat",
    "mirostat_tau": "mirostat_tau",
    "mirostat_eta": "mirostat_eta",
    "num_keep": "n_keep",
}

#: Options Ollama applies when it loads a model: an OpenAI server fixed them at start-up.
_LOAD_TIME = frozenset({
    "numa", "num_ctx", "num_batch", "num_gpu", "main_gpu", "low_vram", "f16_kv",
    "logits_all", "vocab_only", "use_mmap", "use_mlock", "embedding_only", "num_thread",
})

_ROLES = frozenset({"system", "user", "assistant", "tool"})

# Magic numbers of the image types multimodal OpenAI servers take.
_IMAGE_TYPES = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
)

_FINISH = {"stop": "stop", "length": "length", "tool_calls": "stop", "function_call": "stop"}


def createdAt(clock: IReactorTime) -> str:
    """
    Ollama's C{created_at}: RFC 3339 UTC time with microseconds.
    """
    moment = datetime.fromtimestamp(clock.seconds(), tz=timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def imageURI(image: Any, where: str) -> str:
    """
    A C{data:} URI for one Ollama image (base64, no header), its type sniffed from the
    bytes.

    @raise BadRequest: not base64, or not PNG, JPEG, GIF or WebP.
    """
    if not isinstance(image, str) or not image:
        raise BadRequest(f"{where}: an image must be a base64 string", code="invalid_image")
    if image.startswith("data:"):
        return image
    try:
        head = base64.b64decode(image[:32] + "=" * (-len(image[:32]) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{where}: an image is not valid base64", code="invalid_image") from None
    mime = None
    for magic, kind in _IMAGE_TYPES:
        if head.startswith(magic):
            mime = kind
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        mime = "image/webp"
    if mime is None:
        raise BadRequest(
            f"{where}: image type not recognised (PNG, JPEG, GIF or WebP can be translated "
            "for an OpenAI-compatible backend)", code="invalid_image")
    return f"data:{mime};base64,{image}"


def _content(text: str | None, images: Any, where: str) -> Any:
    """
    An OpenAI message content: the text alone, or text and image parts.
    """
    if not images:
        return text or ""
    if not isinstance(images, list):
        raise BadRequest(f"{where}.images must be a list", code="invalid_image")
    parts: list[dict] = []
    if text:
        parts.append({"type": "text", "text": text})
    for i, image in enumerate(images):
        parts.append({"type": "image_url", "image_url": {"url": imageURI(image, f"{where}.images[{i}]")}})
    return parts


def _toolCalls(calls: Any, where: str, counter: list[int]) -> list[dict]:
    """
    Ollama tool calls (arguments as objects) as OpenAI ones (ids, arguments as JSON text).
    """
    if not isinstance(calls, list):
        raise BadRequest(f"{where}.tool_calls must be a list", code="invalid_tool_calls")
    result = []
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise BadRequest(f"{where}.tool_calls[{j}] needs a function with a name",
                             code="invalid_tool_calls")
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            text = arguments
        else:
            text = json.dumps(arguments if arguments is not None else {})
        callId = call.get("id")
        if not isinstance(callId, str) or not callId:
            counter[0] += 1
            callId = f"call_{counter[0]}"
        result.append({"id": callId, "type": "function",
                       "function": {"name": function["name"], "arguments": text}})
    return result


def chatMessages(messages: Any) -> list[dict]:
    """
    Ollama chat messages as OpenAI ones.

    @raise BadRequest: a message that cannot be translated.
    """
    if messages is None:
        return []
    if not isinstance(messages, list):
        raise BadRequest("messages must be a list", code="invalid_messages")
    result: list[dict] = []
    pending: list[tuple[str, str]] = []
    counter = [0]
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise BadRequest(f"{where} must be an object", code="invalid_messages")
        role = message.get("role")
        if role not in _ROLES:
            raise BadRequest(f"{where}.role must be one of system, user, assistant, tool; "
                             f"got {role!r}", code="invalid_messages")
        text = message.get("content")
        if text is not None and not isinstance(text, str):
            raise BadRequest(f"{where}.content must be a string", code="invalid_messages")
        out: dict[str, Any] = {"role": role}
        if role == "tool":
            if message.get("images"):
                raise BadRequest(f"{where}: a tool message cannot carry images for an "
                                 "OpenAI-compatible backend", code="invalid_messages")
            name = message.get("tool_name")
            match = next((p for p in pending if p[1] == name), None) if name else None
            if match is None and pending:
                match = pending[0]
            if match is not None:
                pending.remove(match)
                callId = match[0]
            else:
                # A result no call asked for (the client trimmed the history): OpenAI
                # servers still need an id to accept it.
                counter[0] += 1
                callId = f"call_{counter[0]}"
            out["tool_call_id"] = callId
            out["content"] = text or ""
            if isinstance(name, str) and name:
                out["name"] = name
        else:
            out["content"] = _content(text, message.get("images"), where)
            if role == "assistant" and message.get("tool_calls"):
                calls = _toolCalls(message["tool_calls"], where, counter)
                out["tool_calls"] = calls
                pending = [(c["id"], c["function"]["name"]) for c in calls]
        result.append(out)
    return result


def _tools(tools: Any) -> list[dict] | None:
    """
    Ollama tools: already the OpenAI shape, checked.
    """
    if tools is None or tools == []:
        return None
    if not isinstance(tools, list):
        raise BadRequest("tools must be a list", code="invalid_tools")
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or \
                not isinstance(tool.get("function"), dict) or \
                not isinstance(tool["function"].get("name"), str):
            raise BadRequest(f"tools[{i}] must be a function tool with a name", code="invalid_tools")
    return [dict(tool, type="function") for tool in tools]


def _options(options: Any, out: dict) -> None:
    """
    Ollama's C{options} as OpenAI request fields, into C{out}.
    """
    if options is None:
        return
    if not isinstance(options, dict):
        raise BadRequest("options must be an object", code="invalid_options")
    unknown = []
    for name, value in options.items():
        if value is None or name in _LOAD_TIME:
            continue
        field = _SAMPLING.get(name)
        if field is None:
            unknown.append(name)
            continue
        if name == "num_predict":
            if not isinstance(value, int) or isinstance(value, bool):
                raise BadRequest("options.num_predict must be an integer", code="invalid_options")
            if value < 0:
                # -1 (no limit) and -2 (fill the context) are what OpenAI servers do
                # without max_tokens.
                continue
        if name == "stop" and isinstance(value, str):
            value = [value]
        out[field] = value
    if unknown:
        raise BadRequest(
            "options not supported on an OpenAI-compatible backend: " + ", ".join(sorted(unknown)),
            code="untranslatable_option")


def _format(value: Any, out: dict) -> None:
    """
    Ollama's C{format} as C{response_format}.
    """
    if value is None or value == "":
        return
    if value == "json":
        out["response_format"] = {"type": "json_object"}
    elif isinstance(value, dict):
        out["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "response", "schema": value, "strict": True},
        }
    else:
        raise BadRequest('format must be "json" or a JSON schema object', code="invalid_format")


def _think(value: Any, out: dict) -> bool:
    """
    Ollama's C{think} as C{reasoning_effort}; whether reasoning is kept in the answer.
    """
    if value is None or value is True:
        return True
    if value is False:
        return False
    if value in ("low", "medium", "high"):
        out["reasoning_effort"] = value
        return True
    raise BadRequest('think must be true, false, "low", "medium" or "high"', code="invalid_think")


def _logprobs(body: dict, out: dict) -> bool:
    """
    C{logprobs}/C{top_logprobs}; whether they were asked for.
    """
    if not body.get("logprobs"):
        return False
    out["logprobs"] = True
    top = body.get("top_logprobs")
    if top:
        out["top_logprobs"] = top
    return True


def _stream(body: dict, out: dict) -> bool:
    """
    Ollama streams unless told not to; a stream asks for the usage chunk.
    """
    stream = body.get("stream") is not False
    out["stream"] = stream
    if stream:
        out["stream_options"] = {"include_usage": True}
    return stream


def _refuse(body: dict, fields: tuple[str, ...], why: str) -> None:
    for field in fields:
        value = body.get(field)
        if value not in (None, "", [], False):
            raise BadRequest(f"{field!r} cannot be translated for an OpenAI-compatible "
                             f"backend: {why}", code="untranslatable_field")


def _modelOf(body: dict) -> str:
    model = body.get("model", body.get("name"))
    if not isinstance(model, str) or not model:
        raise BadRequest('missing model: set "model" in the request body', code="missing_model")
    return model


def _unloads(body: dict) -> bool:
    keepAlive = body.get("keep_alive")
    return keepAlive in (0, "0", "0s", "0m")


def translateRequest(path: bytes, body: dict, model: str, clock: IReactorTime) -> Translation:
    """
    The OpenAI request for an Ollama request on C{path}.

    @param body: the Ollama request, model spelled as the backend spells it.
    @param model: the model name the client asked for, echoed in the answers.
    @raise BadRequest: what cannot be translated faithfully.
    """
    started = clock.seconds()
    if path == b"/api/chat":
        return _chat(body, model, clock, started)
    if path == b"/api/generate":
        return _generate(body, model, clock, started)
    if path == b"/api/embed":
        return _embed(body, model, clock, started)
    if path == b"/api/embeddings":
        return _embeddings(body, model, clock, started)
    raise BadRequest(f"{path.decode('latin-1')} cannot be translated", code="untranslatable_route")


def _local(path: bytes, answer: dict, stream: bool) -> Translation:
    """
    A translation answered by the proxy itself.
    """
    return Translation(path, {}, OLLAMA, stream, None, None, local=answer)


def _chat(body: dict, model: str, clock: IReactorTime, started: float) -> Translation:
    _refuse(body, ("template",), "the OpenAI server applies its own template")
    out: dict[str, Any] = {"model": _modelOf(body), "messages": chatMessages(body.get("messages"))}
    stream = body.get("stream") is not False
    if not out["messages"]:
        reason = "unload" if _unloads(body) else "load"
        return _local(CHAT, {"model": model, "created_at": createdAt(clock),
                             "message": {"role": "assistant", "content": ""},
                             "done_reason": reason, "done": True}, stream)
    _stream(body, out)
    _options(body.get("options"), out)
    _format(body.get("format"), out)
    thinking = _think(body.get("think"), out)
    logprobs = _logprobs(body, out)
    tools = _tools(body.get("tools"))
    if tools:
        out["tools"] = tools
    return Translation(
        CHAT, out, OLLAMA, stream,
        lambda: OllamaStream(model, clock, started, "chat", thinking, logprobs),
        lambda: OllamaWhole(model, clock, started, "chat", thinking, stream),
    )


def _generate(body: dict, model: str, clock: IReactorTime, started: float) -> Translation:
    _refuse(body, ("context",), "token contexts are Ollama's own; send the conversation "
                                "to /api/chat instead")
    _refuse(body, ("template",), "the OpenAI server applies its own template")
    _refuse(body, ("suffix",), "fill-in-the-middle has no OpenAI chat equivalent")
    prompt = body.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise BadRequest("prompt must be a string", code="invalid_prompt")
    system = body.get("system")
    if system is not None and not isinstance(system, str):
        raise BadRequest("system must be a string", code="invalid_prompt")
    stream = body.get("stream") is not False
    images = body.get("images")
    if not prompt and not images:
        reason = "unload" if _unloads(body) else "load"
        return _local(CHAT, {"model": model, "created_at": createdAt(clock), "response": "",
                             "done": True, "done_reason": reason}, stream)
    out: dict[str, Any] = {"model": _modelOf(body)}
    if body.get("raw"):
        _refuse(body, ("images", "system", "format"),
                "a raw prompt goes to /v1/completions, which takes text only")
        out["prompt"] = prompt
        path, kind = COMPLETIONS, "raw"
    else:
        messages: list[dict] = []
        if system:
            messages.append({"role": "system", "content": system})
        messages.append({"role": "user", "content": _content(prompt, images, "request")})
        out["messages"] = messages
        _format(body.get("format"), out)
        path, kind = CHAT, "generate"
    _stream(body, out)
    _options(body.get("options"), out)
    thinking = _think(body.get("think"), out) if kind == "generate" else True
    if kind == "raw":
        _refuse(body, ("think",), "a raw prompt has no reasoning control")
    logprobs = _logprobs(body, out)
    return Translation(
        path, out, OLLAMA, stream,
        lambda: OllamaStream(model, clock, started, kind, thinking, logprobs),
        lambda: OllamaWhole(model, clock, started, kind, thinking, stream),
    )


def _embedInputs(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise BadRequest("input must be a string or a list of strings", code="invalid_input")


def _embed(body: dict, model: str, clock: IReactorTime, started: float) -> Translation:
    inputs = _embedInputs(body.get("input", []))
    dimensions = body.get("dimensions")
    if dimensions is not None and (not isinstance(dimensions, int) or isinstance(dimensions, bool)
                                   or dimensions < 1):
        raise BadRequest("dimensions must be a positive integer", code="invalid_dimensions")
    _options(body.get("options"), {})
    if not inputs:
        return _local(EMBEDDINGS, {"model": model, "embeddings": [], "total_duration": 0,
                                   "load_duration": 0, "prompt_eval_count": 0}, False)
    out = {"model": _modelOf(body), "input": inputs, "encoding_format": "float"}
    return Translation(EMBEDDINGS, out, OLLAMA, False, None,
                       lambda: EmbedWhole(model, clock, started, dimensions, len(inputs)))


def _embeddings(body: dict, model: str, clock: IReactorTime, started: float) -> Translation:
    prompt = body.get("prompt", "")
    if not isinstance(prompt, str):
        raise BadRequest("prompt must be a string", code="invalid_prompt")
    _options(body.get("options"), {})
    if not prompt:
        return _local(EMBEDDINGS, {"embedding": []}, False)
    out = {"model": _modelOf(body), "input": [prompt], "encoding_format": "float"}
    return Translation(EMBEDDINGS, out, OLLAMA, False, None,
                       lambda: EmbedWhole(model, clock, started, None, 1, legacy=True))


# --- answers ---


def _nanoseconds(seconds: float) -> int:
    return max(0, int(round(seconds * 1e9)))


def _toolCallOut(function: dict) -> dict:
    """
    An OpenAI tool call function (arguments as JSON text) the Ollama way.

    @raise UntranslatableResponse: arguments that are not a JSON object.
    """
    name = function.get("name")
    text = function.get("arguments")
    if text in (None, ""):
        arguments: Any = {}
    elif isinstance(text, dict):
        arguments = text
    else:
        try:
            arguments = json.loads(text)
        except (TypeError, ValueError, RecursionError):
            raise UntranslatableResponse(
                f"the arguments of tool call {name!r} are not JSON") from None
    if not isinstance(arguments, dict):
        raise UntranslatableResponse(f"the arguments of tool call {name!r} are not a JSON object")
    return {"function": {"name": name, "arguments": arguments}}


def _logprobsOut(logprobs: Any) -> list[dict]:
    """
    OpenAI C{choices[].logprobs} as Ollama's C{logprobs} list.
    """
    entries = logprobs.get("content") if isinstance(logprobs, dict) else None
    result = []
    for entry in entries or []:
        if not isinstance(entry, dict):
            continue
        item = {"token": entry.get("token"), "logprob": entry.get("logprob")}
        top = entry.get("top_logprobs")
        if top:
            item["top_logprobs"] = [{"token": t.get("token"), "logprob": t.get("logprob")}
                                    for t in top if isinstance(t, dict)]
        result.append(item)
    return result


class _Stats:
    """
    The counts and durations of an Ollama final object, from OpenAI usage and
    llama-server timings, or measured.
    """

    def __init__(self, clock: IReactorTime, started: float) -> None:
        self.clock = clock
        self.started = started
        self.firstToken: float | None = None
        self.usage: dict | None = None
        self.timings: dict | None = None

    def saw(self, chunk: dict) -> None:
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self.usage = usage
        timings = chunk.get("timings")
        if isinstance(timings, dict):
            self.timings = timings

    def token(self) -> None:
        if self.firstToken is None:
            self.firstToken = self.clock.seconds()

    def fields(self) -> dict:
        now = self.clock.seconds()
        first = self.firstToken if self.firstToken is not None else now
        result: dict[str, Any] = {
            "total_duration": _nanoseconds(now - self.started),
            "load_duration": 0,
        }
        usage = self.usage or {}
        timings = self.timings or {}
        prompt = usage.get("prompt_tokens", timings.get("prompt_n"))
        completion = usage.get("completion_tokens", timings.get("predicted_n"))
        if isinstance(prompt, int):
            result["prompt_eval_count"] = prompt
        promptMs, predictedMs = timings.get("prompt_ms"), timings.get("predicted_ms")
        result["prompt_eval_duration"] = (
            _nanoseconds(promptMs / 1000) if isinstance(promptMs, (int, float))
            else _nanoseconds(first - self.started))
        if isinstance(completion, int):
            result["eval_count"] = completion
        result["eval_duration"] = (
            _nanoseconds(predictedMs / 1000) if isinstance(predictedMs, (int, float))
            else _nanoseconds(now - first))
        return result


class OllamaStream(OpenAIStreamReader):
    """
    An OpenAI chat or completion SSE stream as Ollama NDJSON, line by line as the
    events arrive.

    @ivar kind: C{"chat"} (C{/api/chat} lines), C{"generate"} (C{/api/generate} lines
        from a chat stream) or C{"raw"} (C{/api/generate} lines from a completion stream).
    """

    contentType = NDJSON

    def __init__(self, model: str, clock: IReactorTime, started: float, kind: str,
                 thinking: bool = True, logprobs: bool = False) -> None:
        self.model = model
        self.clock = clock
        self.kind = kind
        self.thinking = thinking
        self.logprobs = logprobs
        self._reader = SSEReader()
        self._stats = _Stats(clock, started)
        self._calls: dict[int, dict] = {}
        self._finish: str | None = None
        self._ended = False

    def _line(self, content: str = "", thinking: str | None = None, **extra: Any) -> dict:
        line: dict[str, Any] = {"model": self.model, "created_at": createdAt(self.clock)}
        if self.kind == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if thinking:
                message["thinking"] = thinking
            if "tool_calls" in extra:
                message["tool_calls"] = extra.pop("tool_calls")
            line["message"] = message
        else:
            line["response"] = content
            if thinking:
                line["thinking"] = thinking
        line.update(extra)
        return line

    def _error(self, message: str) -> bytes:
        return jsonLine({"error": message})

    def _chunk(self, chunk: dict) -> bytes:
        self._stats.saw(chunk)
        out = b""
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            out += self._choice(choice)
        return out

    def _choice(self, choice: dict) -> bytes:
        out = b""
        delta = choice.get("delta") if self.kind != "raw" else None
        if self.kind == "raw":
            content = choice.get("text") or ""
            reasoning = None
        else:
            delta = delta if isinstance(delta, dict) else {}
            content = delta.get("content") or ""
            reasoning = delta.get("reasoning_content") or delta.get("reasoning") or None
            if not self.thinking:
                reasoning = None
            for call in delta.get("tool_calls") or ():
                self._toolDelta(call)
        extra: dict[str, Any] = {}
        if self.logprobs and choice.get("logprobs"):
            extra["logprobs"] = _logprobsOut(choice["logprobs"])
        if content or reasoning or extra:
            self._stats.token()
            out += jsonLine(self._line(content, reasoning, done=False, **extra))
        finish = choice.get("finish_reason")
        if finish:
            self._finish = finish
            out += self._flushCalls()
        return out

    def _toolDelta(self, call: Any) -> None:
        if not isinstance(call, dict):
            return
        index = call.get("index", len(self._calls))
        entry = self._calls.setdefault(index, {"name": "", "arguments": ""})
        function = call.get("function") or {}
        if isinstance(function.get("name"), str):
            entry["name"] += function["name"]
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            entry["arguments"] += arguments
        elif isinstance(arguments, dict):
            entry["arguments"] = json.dumps(arguments)

    def _flushCalls(self) -> bytes:
        if not self._calls:
            return b""
        calls = [_toolCallOut(self._calls[i]) for i in sorted(self._calls)]
        self._calls = {}
        self._stats.token()
        return jsonLine(self._line("", None, tool_calls=calls, done=False))

    def _final(self) -> bytes:
        out = self._flushCalls()
        self._ended = True
        final = self._line("", None, done=True)
        if self._finish is not None:
            final["done_reason"] = _FINISH.get(self._finish, self._finish)
        final.update(self._stats.fields())
        return out + jsonLine(final)

    def finish(self) -> bytes:
        """
        The backend's body is complete: the final line, if C{[DONE]} did not bring it.
        """
        out = b"".join(self._event(payload) for _, payload in self._reader.close())
        if not self._ended:
            out += self._final()
        return out

    def failed(self, error: ProxyError) -> bytes:
        """
        An error line ends the stream.
        """
        self._ended = True
        return jsonLine({"error": error.message})


class OllamaWhole:
    """
    A whole OpenAI chat completion or completion as one Ollama answer (or, for a
    client that asked for a stream, a one-line stream).
    """

    def __init__(self, model: str, clock: IReactorTime, started: float, kind: str,
                 thinking: bool = True, stream: bool = False) -> None:
        self.model = model
        self.clock = clock
        self.started = started
        self.kind = kind
        self.thinking = thinking
        self.stream = stream

    def translate(self, code: int, body: bytes) -> tuple[int, bytes, bytes]:
        """
        The client's status, content type and body.
        """
        encode = (lambda a: (NDJSON, jsonLine(a))) if self.stream else asJSON
        return translateWhole(code, body, OLLAMA, self._translate, encode)

    def _translate(self, answer: Any) -> dict:
        if not isinstance(answer, dict) or not isinstance(answer.get("choices"), list) \
                or not answer["choices"] or not isinstance(answer["choices"][0], dict):
            raise UntranslatableResponse("the answer has no choices")
        choice = answer["choices"][0]
        stats = _Stats(self.clock, self.started)
        stats.saw(answer)
        result: dict[str, Any] = {"model": self.model, "created_at": createdAt(self.clock)}
        if self.kind == "raw":
            result["response"] = choice.get("text") or ""
        else:
            message = choice.get("message")
            if not isinstance(message, dict):
                raise UntranslatableResponse("the answer's choice has no message")
            content = message.get("content") or ""
            reasoning = message.get("reasoning_content") or message.get("reasoning")
            if self.kind == "chat":
                out: dict[str, Any] = {"role": "assistant", "content": content}
                if reasoning and self.thinking:
                    out["thinking"] = reasoning
                calls = message.get("tool_calls")
                if calls:
                    out["tool_calls"] = [_toolCallOut(c.get("function") or {}) for c in calls
                                         if isinstance(c, dict)]
                result["message"] = out
            else:
                result["response"] = content
                if reasoning and self.thinking:
                    result["thinking"] = reasoning
        if choice.get("logprobs"):
            result["logprobs"] = _logprobsOut(choice["logprobs"])
        result["done"] = True
        finish = choice.get("finish_reason")
        if finish:
            result["done_reason"] = _FINISH.get(finish, finish)
        result.update(stats.fields())
        return result


class EmbedWhole:
    """
    An OpenAI embeddings answer as Ollama's C{/api/embed} (or legacy C{/api/embeddings})
    answer. C{dimensions} is applied here, as Ollama does it (truncate, then scale back
    to unit length), since not every OpenAI server honours the field.
    """

    def __init__(self, model: str, clock: IReactorTime, started: float,
                 dimensions: int | None, count: int, legacy: bool = False) -> None:
        self.model = model
        self.clock = clock
        self.started = started
        self.dimensions = dimensions
        self.count = count
        self.legacy = legacy

    def translate(self, code: int, body: bytes) -> tuple[int, bytes, bytes]:
        """
        The client's status, content type and body.
        """
        return translateWhole(code, body, OLLAMA, self._translate, asJSON)

    def _vectors(self, answer: Any) -> list[list[float]]:
        data = answer.get("data") if isinstance(answer, dict) else None
        if not isinstance(data, list) or len(data) != self.count:
            raise UntranslatableResponse(f"expected {self.count} embeddings")
        ordered = sorted(data, key=lambda d: d.get("index", 0) if isinstance(d, dict) else 0)
        vectors = []
        for item in ordered:
            vector = item.get("embedding") if isinstance(item, dict) else None
            if not isinstance(vector, list) or not all(
                    isinstance(x, (int, float)) and not isinstance(x, bool) for x in vector):
                raise UntranslatableResponse("an embedding is not a list of numbers")
            if self.dimensions is not None and self.dimensions < len(vector):
                vector = vector[: self.dimensions]
                norm = math.sqrt(sum(x * x for x in vector))
                if norm:
                    vector = [x / norm for x in vector]
            vectors.append(vector)
        return vectors

    def _translate(self, answer: Any) -> dict:
        vectors = self._vectors(answer)
        if self.legacy:
            return {"embedding": vectors[0]}
        usage = answer.get("usage") if isinstance(answer.get("usage"), dict) else {}
        result: dict[str, Any] = {
            "model": self.model,
            "embeddings": vectors,
            "total_duration": _nanoseconds(self.clock.seconds() - self.started),
            "load_duration": 0,
        }
        if isinstance(usage.get("prompt_tokens"), int):
            result["prompt_eval_count"] = usage["prompt_tokens"]
        return result


__all__ = ["EmbedWhole", "OllamaStream", "OllamaWhole", "translateRequest"]
