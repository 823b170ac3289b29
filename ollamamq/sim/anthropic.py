# -*- test-case-name: tests.test_sim_anthropic -*-
"""
The Anthropic Messages dialect of the simulator: C{POST /v1/messages} (a C{message}
object, or when streamed the server-sent events C{message_start}, C{content_block_start},
C{ping}, C{content_block_delta} per token, C{content_block_stop}, C{message_delta} with the
stop reason and usage, C{message_stop}) and C{POST /v1/messages/count_tokens}.

Ollama, llama-server and vLLM serve these routes natively; C{messages=False} in the
options imitates a server that does not.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.web.server import Request

from ollamamq.sim.dialect import Route, SimError, countWords, jsonBytes, messagesWords

if TYPE_CHECKING:
    from ollamamq.sim.engine import Job
    from ollamamq.sim.resource import Handler, Simulator

__all__ = ["AnthropicDialect", "AnthropicMessages"]


def _systemWords(system: object) -> int:
    """
    Count the words of a Messages request's C{system}: a string or a list of text blocks.

    @param system: the request's C{system}.
    @return: the word count.
    @raise SimError: when it is neither.
    """
    if system is None:
        return 0
    if isinstance(system, str):
        return countWords(system)
    if isinstance(system, list) and all(isinstance(block, dict) for block in system):
        return sum(
            countWords(block["text"]) for block in system if isinstance(block.get("text"), str)
        )
    raise SimError(400, "system: Input should be a valid string or a list of text blocks")


def _promptWords(body: dict[str, Any]) -> int:
    """
    Count a Messages request's prompt: its messages and system.

    @param body: the request body.
    @return: the word count.
    @raise SimError: when C{messages} is missing or malformed.
    """
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise SimError(400, "messages: Field required (a non-empty list of messages)")
    return messagesWords(messages) + _systemWords(body.get("system"))


def _event(name: str, data: dict[str, Any]) -> bytes:
    """
    @param name: the event's name (Anthropic names each event and repeats it as C{type}).
    @param data: its payload.
    @return: one server-sent event.
    """
    return b"event: " + name.encode("ascii") + b"\ndata: " + jsonBytes(data) + b"\n\n"


class AnthropicMessages(Route):
    """
    C{POST /v1/messages}.  Its C{max_tokens} is required and caps the answer.
    """

    family = "anthropic"
    streamByDefault = False
    lengthIsCap = True

    def parse(self, body: dict[str, Any]) -> tuple[int, int | None, list[str]]:
        """
        Count messages and system; require C{max_tokens}.
        """
        words = _promptWords(body)
        maxTokens = body.get("max_tokens")
        if not isinstance(maxTokens, int) or isinstance(maxTokens, bool) or maxTokens < 1:
            raise SimError(400, "max_tokens: Field required (an integer of at least 1)")
        return words, maxTokens, []

    def contentType(self, stream: bool) -> bytes:
        """
        Streams are server-sent events.
        """
        return b"text/event-stream" if stream else super().contentType(stream)

    def _stopReason(self, job: Job) -> str:
        """
        @return: C{"max_tokens"} when the cap cut the answer, else C{"end_turn"}.
        """
        return "max_tokens" if job.limited else "end_turn"

    def _message(self, job: Job, content: list[dict[str, Any]], done: bool) -> dict[str, Any]:
        """
        @param job: the job.
        @param content: the content blocks.
        @param done: whether the answer is finished (stop reason and output usage known).
        @return: a C{message} object.
        """
        return {
            "id": f"msg_sim{job.ident}",
            "type": "message",
            "role": "assistant",
            "model": job.requestedModel,
            "content": content,
            "stop_reason": self._stopReason(job) if done else None,
            "stop_sequence": None,
            "usage": {
                "input_tokens": job.promptTokens,
                "output_tokens": len(job.emitted) if done else 0,
            },
        }

    def _start(self, job: Job) -> bytes:
        """
        @return: the events that open a stream: the message, its one text block, a ping.
        """
        return (
            _event("message_start", {"type": "message_start", "message": self._message(job, [], False)})
            + _event(
                "content_block_start",
                {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
            )
            + _event("ping", {"type": "ping"})
        )

    def chunk(self, job: Job, token: str) -> bytes:
        """
        One C{content_block_delta} per token, after the opening events for the first.
        """
        delta = _event(
            "content_block_delta",
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": token}},
        )
        return (self._start(job) if len(job.emitted) == 1 else b"") + delta

    def end(self, job: Job) -> bytes:
        """
        Close the block, say why the message stopped and how many tokens it took, stop.
        """
        opening = b"" if job.emitted else self._start(job)
        return (
            opening
            + _event("content_block_stop", {"type": "content_block_stop", "index": 0})
            + _event(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": self._stopReason(job), "stop_sequence": None},
                    "usage": {"output_tokens": len(job.emitted)},
                },
            )
            + _event("message_stop", {"type": "message_stop"})
        )

    def whole(self, job: Job) -> bytes:
        """
        The C{message} object with one text block.
        """
        return jsonBytes(self._message(job, [{"type": "text", "text": job.text()}], True))


class AnthropicDialect:
    """
    The Anthropic Messages routes of a simulator.
    """

    def __init__(self, simulator: Simulator) -> None:
        """
        @param simulator: the simulator whose models are served.
        """
        self.sim = simulator

    def routes(self) -> dict[tuple[bytes, str], Handler]:
        """
        @return: the route table: (method, path) -> handler.
        """
        return {
            (b"POST", "/v1/messages"): self.sim.work(AnthropicMessages(self.sim)),
            (b"POST", "/v1/messages/count_tokens"): self._countTokens,
        }

    def _countTokens(self, request: Request) -> bytes:
        """
        C{POST /v1/messages/count_tokens}: C{{"input_tokens": N}}, counted as the
        messages route counts the prompt; takes no slot.
        """
        body = self.sim.body(request)
        requested = body.get("model")
        if not isinstance(requested, str) or not requested:
            raise SimError(400, "model: Field required")
        if self.sim.find(requested) is None:
            raise SimError(404, f"model: {requested}", "not_found_error")
        return self.sim.json(request, {"input_tokens": _promptWords(body)})
