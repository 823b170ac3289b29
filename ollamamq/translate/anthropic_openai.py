# -*- test-case-name: tests.test_translate_anthropic_openai -*-
"""
Anthropic Messages (C{/v1/messages}, C{/v1/messages/count_tokens}) on a backend that has
only OpenAI chat completions, and the answers back (whole messages, and the Messages
stream of events as the chunks arrive).

Requests (L{translateRequest}): C{system} (text or text blocks) becomes a system
message; text blocks stay text, C{image} blocks (base64 or URL) become C{image_url}
parts; an assistant's C{tool_use} blocks become C{tool_calls} (the input as JSON text),
a user's C{tool_result} blocks become C{tool} messages placed right after the calls they
answer (an error result says so in its text); C{thinking} blocks of earlier turns are
dropped (an OpenAI server takes no reasoning as input). Tools become function tools
(C{input_schema} is C{parameters}), C{tool_choice} C{auto}/C{any}/C{tool}/C{none} is
C{auto}/C{required}/the named function/C{none}, C{disable_parallel_tool_use} is
C{parallel_tool_calls: false}; C{max_tokens}, C{temperature}, C{top_p}, C{top_k},
C{stop_sequences} (C{stop}), C{metadata.user_id} (C{user}) carry over; C{thinking}
C{disabled} drops reasoning from the answer. Server tools (web search, code execution,
...), documents, MCP servers and containers have no equivalent and are refused with a
400.

C{count_tokens} asks the backend for a one-token completion of the same conversation and
answers its C{usage.prompt_tokens}: that is the server's own count, chat template
included, which no tokenizer guessed here would match.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.interfaces import IReactorTime

from ollamamq.errors import ANTHROPIC, BadRequest, ProxyError, streamErrorLine
from ollamamq.translate.common import (
    OpenAIStreamReader,
    EVENT_STREAM,
    SSEReader,
    Translation,
    UntranslatableResponse,
    asJSON,
    sseEvent,
    translateWhole,
)

CHAT = b"/v1/chat/completions"

_STOP = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use",
         "function_call": "tool_use", "content_filter": "refusal"}

#: Request fields with no OpenAI equivalent: refused rather than ignored.
_REFUSED = ("container", "mcp_servers")


def _text(blocks: Any, where: str) -> str:
    """
    The text of a string or of a list of text blocks.
    """
    if isinstance(blocks, str):
        return blocks
    if not isinstance(blocks, list):
        raise BadRequest(f"{where} must be a string or a list of text blocks", code="invalid_request")
    parts = []
    for i, block in enumerate(blocks):
        if not isinstance(block, dict) or block.get("type") != "text" or \
                not isinstance(block.get("text"), str):
            raise BadRequest(f"{where}[{i}] must be a text block", code="invalid_request")
        parts.append(block["text"])
    return "\n\n".join(parts)


def _image(block: dict, where: str) -> dict:
    source = block.get("source")
    if not isinstance(source, dict):
        raise BadRequest(f"{where}.source must be an object", code="invalid_request")
    if source.get("type") == "base64" and isinstance(source.get("data"), str) and \
            isinstance(source.get("media_type"), str):
        url = f"data:{source['media_type']};base64,{source['data']}"
    elif source.get("type") == "url" and isinstance(source.get("url"), str):
        url = source["url"]
    else:
        raise BadRequest(f"{where}: only base64 and url image sources can be translated",
                         code="untranslatable_block")
    return {"type": "image_url", "image_url": {"url": url}}


def _toolResult(block: dict, where: str) -> dict:
    toolId = block.get("tool_use_id")
    if not isinstance(toolId, str) or not toolId:
        raise BadRequest(f"{where}.tool_use_id must be a string", code="invalid_request")
    content = block.get("content", "")
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text":
                raise BadRequest(f"{where}.content[{j}]: only text tool results can be "
                                 "translated for an OpenAI-compatible backend",
                                 code="untranslatable_block")
            texts.append(str(part.get("text", "")))
        content = "\n\n".join(texts)
    elif not isinstance(content, str):
        raise BadRequest(f"{where}.content must be a string or text blocks", code="invalid_request")
    if block.get("is_error"):
        content = f"Error: {content}"
    return {"role": "tool", "tool_call_id": toolId, "content": content}


def chatMessages(system: Any, messages: Any) -> list[dict]:
    """
    An Anthropic system prompt and messages as OpenAI chat messages.

    @raise BadRequest: what cannot be translated.
    """
    result: list[dict] = []
    if system not in (None, "", []):
        result.append({"role": "system", "content": _text(system, "system")})
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list", code="invalid_request")
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            raise BadRequest(f"{where}.role must be user or assistant", code="invalid_request")
        role = message["role"]
        content = message.get("content")
        if isinstance(content, str):
            result.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise BadRequest(f"{where}.content must be a string or a list of blocks",
                             code="invalid_request")
        parts: list[dict] = []
        calls: list[dict] = []
        tools: list[dict] = []
        for j, block in enumerate(content):
            at = f"{where}.content[{j}]"
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "text" and isinstance(block.get("text"), str):
                parts.append({"type": "text", "text": block["text"]})
            elif kind == "image" and role == "user":
                parts.append(_image(block, at))
            elif kind == "tool_use" and role == "assistant":
                if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str):
                    raise BadRequest(f"{at} needs an id and a name", code="invalid_request")
                calls.append({"id": block["id"], "type": "function", "function": {
                    "name": block["name"], "arguments": json.dumps(block.get("input") or {})}})
            elif kind == "tool_result" and role == "user":
                tools.append(_toolResult(block, at))
            elif kind in ("thinking", "redacted_thinking") and role == "assistant":
                continue
            else:
                raise BadRequest(f"{at}: a {kind!r} block in a {role} message cannot be "
                                 "translated for an OpenAI-compatible backend",
                                 code="untranslatable_block")
        # Tool results first: OpenAI wants them right after the calls they answer.
        result.extend(tools)
        if role == "assistant":
            out: dict[str, Any] = {"role": "assistant",
                                   "content": "".join(p["text"] for p in parts) or None}
            if calls:
                out["tool_calls"] = calls
            if out["content"] is not None or calls:
                result.append(out)
        elif parts:
            if all(p["type"] == "text" for p in parts):
                result.append({"role": "user", "content": "\n\n".join(p["text"] for p in parts)})
            else:
                result.append({"role": "user", "content": parts})
    return result


def _tools(tools: Any, choice: Any, out: dict) -> None:
    if tools not in (None, []):
        if not isinstance(tools, list):
            raise BadRequest("tools must be a list", code="invalid_request")
        functions = []
        for i, tool in enumerate(tools):
            if not isinstance(tool, dict) or tool.get("type", "custom") != "custom":
                kind = tool.get("type") if isinstance(tool, dict) else None
                raise BadRequest(f"tools[{i}]: server tool {kind!r} cannot be translated for an "
                                 "OpenAI-compatible backend", code="untranslatable_tool")
            if not isinstance(tool.get("name"), str):
                raise BadRequest(f"tools[{i}] needs a name", code="invalid_request")
            function: dict[str, Any] = {"name": tool["name"],
                                        "parameters": tool.get("input_schema") or {"type": "object"}}
            if isinstance(tool.get("description"), str):
                function["description"] = tool["description"]
            functions.append({"type": "function", "function": function})
        out["tools"] = functions
    if choice is None:
        return
    if not isinstance(choice, dict):
        raise BadRequest("tool_choice must be an object", code="invalid_request")
    kind = choice.get("type")
    if kind == "auto":
        out["tool_choice"] = "auto"
    elif kind == "any":
        out["tool_choice"] = "required"
    elif kind == "none":
        out["tool_choice"] = "none"
    elif kind == "tool" and isinstance(choice.get("name"), str):
        out["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
    else:
        raise BadRequest("tool_choice.type must be auto, any, tool (with a name) or none",
                         code="invalid_request")
    if choice.get("disable_parallel_tool_use"):
        out["parallel_tool_calls"] = False


def _sampling(body: dict, out: dict) -> None:
    for field in ("temperature", "top_p", "top_k"):
        if body.get(field) is not None:
            out[field] = body[field]
    stops = body.get("stop_sequences")
    if stops:
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise BadRequest("stop_sequences must be a list of strings", code="invalid_request")
        out["stop"] = stops
    metadata = body.get("metadata")
    if isinstance(metadata, dict) and isinstance(metadata.get("user_id"), str):
        out["user"] = metadata["user_id"]


def _thinking(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, dict) and value.get("type") in ("enabled", "adaptive"):
        return True
    if isinstance(value, dict) and value.get("type") == "disabled":
        return False
    raise BadRequest('thinking.type must be "enabled" or "disabled"', code="invalid_request")


def translateRequest(path: bytes, body: dict, model: str, clock: IReactorTime) -> Translation:
    """
    The OpenAI chat completion for a Messages request (or a token count) on C{path}.

    @param body: the Anthropic request, model spelled as the backend spells it.
    @param model: the model name the client asked for, echoed in the answers.
    @raise BadRequest: what cannot be translated faithfully.
    """
    for field in _REFUSED:
        if body.get(field):
            raise BadRequest(f"{field!r} cannot be translated for an OpenAI-compatible backend",
                             code="untranslatable_field")
    out: dict[str, Any] = {"model": body.get("model"),
                           "messages": chatMessages(body.get("system"), body.get("messages"))}
    _tools(body.get("tools"), body.get("tool_choice"), out)
    if path == b"/v1/messages/count_tokens":
        out.update(max_tokens=1, stream=False)
        return Translation(CHAT, out, ANTHROPIC, False, None, lambda: CountWhole())
    if path != b"/v1/messages":
        raise BadRequest(f"{path.decode('latin-1')} cannot be translated", code="untranslatable_route")
    maxTokens = body.get("max_tokens")
    if not isinstance(maxTokens, int) or isinstance(maxTokens, bool) or maxTokens < 1:
        raise BadRequest("max_tokens: a positive integer is required", code="invalid_request")
    out["max_tokens"] = maxTokens
    _sampling(body, out)
    thinking = _thinking(body.get("thinking"))
    stream = bool(body.get("stream"))
    out["stream"] = stream
    if stream:
        out["stream_options"] = {"include_usage": True}
    return Translation(
        CHAT, out, ANTHROPIC, stream,
        lambda: MessagesStream(model, thinking),
        lambda: MessagesWhole(model, thinking, stream),
    )


def _usage(usage: Any) -> dict:
    """
    OpenAI usage in Anthropic's terms: C{input_tokens} excludes the prompt tokens read
    from the cache, which are C{cache_read_input_tokens} (as llama-server's own Messages
    route reports them).
    """
    usage = usage if isinstance(usage, dict) else {}
    prompt = usage.get("prompt_tokens", 0) or 0
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens", 0) if isinstance(details, dict) else 0
    cached = cached if isinstance(cached, int) and 0 < cached <= prompt else 0
    result = {"input_tokens": prompt - cached,
              "output_tokens": usage.get("completion_tokens", 0) or 0}
    if cached:
        result["cache_read_input_tokens"] = cached
    return result


def _toolInput(call: dict) -> dict:
    function = call.get("function") if isinstance(call.get("function"), dict) else {}
    text = function.get("arguments")
    if text in (None, ""):
        return {}
    if isinstance(text, dict):
        return text
    try:
        value = json.loads(text)
    except (TypeError, ValueError, RecursionError):
        raise UntranslatableResponse(
            f"the arguments of tool call {function.get('name')!r} are not JSON") from None
    if not isinstance(value, dict):
        raise UntranslatableResponse(
            f"the arguments of tool call {function.get('name')!r} are not a JSON object")
    return value


class MessagesWhole:
    """
    A whole chat completion as an Anthropic message (or, for a client that asked for a
    stream, the same message as a stream of events).
    """

    def __init__(self, model: str, thinking: bool = True, stream: bool = False) -> None:
        self.model = model
        self.thinking = thinking
        self.stream = stream

    def translate(self, code: int, body: bytes) -> tuple[int, bytes, bytes]:
        """
        The client's status, content type and body.
        """
        encode = (lambda m: (EVENT_STREAM, _asEvents(m))) if self.stream else asJSON
        return translateWhole(code, body, ANTHROPIC, self.message, encode)

    def message(self, answer: Any) -> dict:
        """
        The Anthropic message for an OpenAI chat completion object.
        """
        if not isinstance(answer, dict) or not isinstance(answer.get("choices"), list) \
                or not answer["choices"] or not isinstance(answer["choices"][0], dict):
            raise UntranslatableResponse("the answer has no choices")
        choice = answer["choices"][0]
        message = choice.get("message")
        if not isinstance(message, dict):
            raise UntranslatableResponse("the answer's choice has no message")
        content: list[dict] = []
        reasoning = message.get("reasoning_content") or message.get("reasoning")
        if reasoning and self.thinking:
            content.append({"type": "thinking", "thinking": reasoning, "signature": ""})
        if message.get("content"):
            content.append({"type": "text", "text": message["content"]})
        for call in message.get("tool_calls") or ():
            if isinstance(call, dict):
                content.append({"type": "tool_use", "id": call.get("id") or "toolu_0",
                                "name": (call.get("function") or {}).get("name"),
                                "input": _toolInput(call)})
        finish = choice.get("finish_reason")
        return {
            "id": "msg_" + str(answer.get("id") or "0"),
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": content,
            "stop_reason": _STOP.get(finish, "end_turn") if finish else "end_turn",
            "stop_sequence": None,
            "usage": _usage(answer.get("usage")),
        }


def _asEvents(message: dict) -> bytes:
    """
    A whole message as the event stream that would have built it.
    """
    start = dict(message, content=[], stop_reason=None,
                 usage={"input_tokens": message["usage"]["input_tokens"], "output_tokens": 0})
    out = [sseEvent({"type": "message_start", "message": start}, "message_start")]
    for index, block in enumerate(message["content"]):
        if block["type"] == "text":
            opened, delta = {"type": "text", "text": ""}, {"type": "text_delta", "text": block["text"]}
        elif block["type"] == "thinking":
            opened = {"type": "thinking", "thinking": "", "signature": ""}
            delta = {"type": "thinking_delta", "thinking": block["thinking"]}
        else:
            opened = dict(block, input={})
            delta = {"type": "input_json_delta", "partial_json": json.dumps(block["input"])}
        out.append(sseEvent({"type": "content_block_start", "index": index,
                             "content_block": opened}, "content_block_start"))
        out.append(sseEvent({"type": "content_block_delta", "index": index, "delta": delta},
                            "content_block_delta"))
        out.append(sseEvent({"type": "content_block_stop", "index": index}, "content_block_stop"))
    out.append(sseEvent({"type": "message_delta",
                         "delta": {"stop_reason": message["stop_reason"], "stop_sequence": None},
                         "usage": message["usage"]}, "message_delta"))
    out.append(sseEvent({"type": "message_stop"}, "message_stop"))
    return b"".join(out)


class CountWhole:
    """
    A one-token completion's usage as C{count_tokens}' answer.
    """

    def translate(self, code: int, body: bytes) -> tuple[int, bytes, bytes]:
        """
        The client's status, content type and body.
        """
        def count(answer: Any) -> dict:
            usage = answer.get("usage") if isinstance(answer, dict) else None
            tokens = usage.get("prompt_tokens") if isinstance(usage, dict) else None
            if not isinstance(tokens, int):
                raise UntranslatableResponse("the answer has no usage.prompt_tokens")
            return {"input_tokens": tokens}

        return translateWhole(code, body, ANTHROPIC, count, asJSON)


class MessagesStream(OpenAIStreamReader):
    """
    An OpenAI chat completion stream as Anthropic Messages stream events, as the chunks
    arrive: text and reasoning deltas at once, tool call arguments as
    C{input_json_delta} fragments (Anthropic streams partial JSON too).
    """

    contentType = EVENT_STREAM

    def __init__(self, model: str, thinking: bool = True) -> None:
        self.model = model
        self.thinking = thinking
        self._reader = SSEReader()
        self._started = False
        self._ended = False
        self._index = -1
        self._block: tuple[str, int | None] | None = None
        self._finish: str | None = None
        self._usage: Any = None

    def _start(self, chunk: dict) -> bytes:
        self._started = True
        message = {"id": "msg_" + str(chunk.get("id") or "0"), "type": "message",
                   "role": "assistant", "model": self.model, "content": [],
                   "stop_reason": None, "stop_sequence": None,
                   "usage": {"input_tokens": 0, "output_tokens": 0}}
        return sseEvent({"type": "message_start", "message": message}, "message_start")

    def _open(self, kind: str, key: int | None, block: dict) -> bytes:
        out = self._close()
        self._index += 1
        self._block = (kind, key)
        return out + sseEvent({"type": "content_block_start", "index": self._index,
                               "content_block": block}, "content_block_start")

    def _close(self) -> bytes:
        if self._block is None:
            return b""
        self._block = None
        return sseEvent({"type": "content_block_stop", "index": self._index}, "content_block_stop")

    def _delta(self, delta: dict) -> bytes:
        return sseEvent({"type": "content_block_delta", "index": self._index, "delta": delta},
                        "content_block_delta")

    def _error(self, message: str) -> bytes:
        return sseEvent({"type": "error", "error": {"type": "api_error", "message": message}},
                        "error")

    def _chunk(self, chunk: dict) -> bytes:
        out = b"" if self._started else self._start(chunk)
        if isinstance(chunk.get("usage"), dict):
            self._usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            if isinstance(choice, dict) and choice.get("index", 0) == 0:
                out += self._choice(choice)
        return out

    def _choice(self, choice: dict) -> bytes:
        out = b""
        delta = choice.get("delta") if isinstance(choice.get("delta"), dict) else {}
        reasoning = delta.get("reasoning_content") or delta.get("reasoning")
        if reasoning and self.thinking:
            if self._block is None or self._block[0] != "thinking":
                out += self._open("thinking", None, {"type": "thinking", "thinking": "", "signature": ""})
            out += self._delta({"type": "thinking_delta", "thinking": reasoning})
        if delta.get("content"):
            if self._block is None or self._block[0] != "text":
                out += self._open("text", None, {"type": "text", "text": ""})
            out += self._delta({"type": "text_delta", "text": delta["content"]})
        for call in delta.get("tool_calls") or ():
            if not isinstance(call, dict):
                continue
            key = call.get("index", 0)
            function = call.get("function") if isinstance(call.get("function"), dict) else {}
            if self._block != ("tool", key):
                out += self._open("tool", key, {"type": "tool_use",
                                                "id": call.get("id") or f"toolu_{key}",
                                                "name": function.get("name") or "", "input": {}})
            arguments = function.get("arguments")
            if isinstance(arguments, dict):
                arguments = json.dumps(arguments)
            if arguments:
                out += self._delta({"type": "input_json_delta", "partial_json": arguments})
        if choice.get("finish_reason"):
            self._finish = choice["finish_reason"]
            out += self._close()
        return out

    def _final(self) -> bytes:
        self._ended = True
        out = b"" if self._started else self._start({})
        out += self._close()
        stop = _STOP.get(self._finish, "end_turn") if self._finish else "end_turn"
        out += sseEvent({"type": "message_delta",
                         "delta": {"stop_reason": stop, "stop_sequence": None},
                         "usage": _usage(self._usage)}, "message_delta")
        return out + sseEvent({"type": "message_stop"}, "message_stop")

    def finish(self) -> bytes:
        """
        The backend's body is complete: close the message if C{[DONE]} did not.
        """
        out = b"".join(self._event(payload) for _, payload in self._reader.close())
        if not self._ended:
            out += self._final()
        return out

    def failed(self, error: ProxyError) -> bytes:
        """
        An C{error} event ends the stream.
        """
        self._ended = True
        return streamErrorLine(error, ANTHROPIC, sse=True)


__all__ = ["CountWhole", "MessagesStream", "MessagesWhole", "translateRequest"]
