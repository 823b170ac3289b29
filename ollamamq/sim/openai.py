# -*- test-case-name: tests.test_sim,tests.test_sim_openai -*-
"""
The OpenAI dialect of the simulator: C{GET /v1/models}, C{GET /v1/models/{model}}, and the
work routes C{POST /v1/chat/completions}, C{POST /v1/completions} (server-sent events when
streamed) and C{POST /v1/embeddings}; plus what OpenAI-only servers add: C{GET /health}
(vLLM, llama-server) and llama.cpp's C{GET /props} with C{total_slots}.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from twisted.web.server import Request

from ollamamq.sim.dialect import (
    EMBEDDING_DIMENSIONS,
    MODIFIED_AT,
    Route,
    SimError,
    countWords,
    embeddingFor,
    embeddingInputs,
    encodeEmbedding,
    jsonBytes,
    messagesWords,
)
from ollamamq.sim.options import LLAMA_SERVER, OLLAMA

if TYPE_CHECKING:
    from ollamamq.sim.engine import Job
    from ollamamq.sim.resource import Handler, Simulator

__all__ = ["LOADING_ERROR", "OpenAIDialect"]

LOADING_ERROR = {"error": {"message": "Loading model", "type": "unavailable_error", "code": 503}}
"""
What llama-server answers (503) to every request while its model loads.
"""


def openaiLength(body: dict[str, Any]) -> int | None:
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


class OpenAIChat(Route):
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
        return messagesWords(body.get("messages")), openaiLength(body), []

    def contentType(self, stream: bool) -> bytes:
        """
        Streams are server-sent events.
        """
        return b"text/event-stream" if stream else super().contentType(stream)

    def _includeUsage(self, job: Job) -> bool:
        """
        @param job: the job.
        @return: whether the client asked for a usage chunk.
        """
        options = job.body.get("stream_options")
        return isinstance(options, dict) and options.get("include_usage") is True

    def _envelope(self, job: Job, objectName: str) -> dict[str, Any]:
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

    def _choice(self, job: Job, text: str | None, finishReason: str | None) -> dict[str, Any]:
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

    def _event(self, job: Job, choices: list[dict[str, Any]], usage: object = False) -> bytes:
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
        return b"data: " + jsonBytes(chunk) + b"\n\n"

    def chunk(self, job: Job, token: str) -> bytes:
        """
        One event per token.
        """
        return self._event(job, [self._choice(job, token, None)])

    def end(self, job: Job) -> bytes:
        """
        The closing chunk with C{finish_reason}, the usage chunk when asked
        for, then C{[DONE]}.
        """
        events = self._event(job, [self._choice(job, None, job.doneReason)])
        if self._includeUsage(job):
            events += self._event(job, [], self.usage(job))
        return events + b"data: [DONE]\n\n"

    def whole(self, job: Job) -> bytes:
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
        return jsonBytes(answer)


class OpenAICompletion(OpenAIChat):
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
            words = countWords(prompt)
        elif isinstance(prompt, list):
            words = sum(countWords(p) if isinstance(p, str) else 1 for p in prompt)
        elif prompt is None:
            words = 0
        else:
            raise SimError(400, "prompt must be a string or a list of strings")
        return words, openaiLength(body), []

    def _choice(self, job: Job, text: str | None, finishReason: str | None) -> dict[str, Any]:
        """
        Completion choices carry C{text} rather than a delta.
        """
        return {
            "text": text or "",
            "index": 0,
            "logprobs": None,
            "finish_reason": finishReason,
        }

    def whole(self, job: Job) -> bytes:
        """
        A C{text_completion} object.
        """
        answer = self._envelope(job, self.objectName)
        answer["choices"] = [self._choice(job, job.text(), job.doneReason)]
        answer["usage"] = self.usage(job)
        return jsonBytes(answer)


class OpenAIEmbeddings(Route):
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
        inputs = embeddingInputs(body.get("input"), "input", True)
        dimensions = body.get("dimensions")
        if dimensions is not None and (
            not isinstance(dimensions, int) or isinstance(dimensions, bool) or dimensions < 1
        ):
            raise SimError(400, "dimensions must be a positive integer")
        return sum(countWords(text) for text in inputs), None, inputs

    def whole(self, job: Job) -> bytes:
        """
        The embeddings, encoded as C{encoding_format} asks.
        """
        dimensions = job.body.get("dimensions") or EMBEDDING_DIMENSIONS
        encodingFormat = job.body.get("encoding_format")
        return jsonBytes(
            {
                "object": "list",
                "data": [
                    {
                        "object": "embedding",
                        "index": index,
                        "embedding": encodeEmbedding(embeddingFor(text, dimensions), encodingFormat),
                    }
                    for index, text in enumerate(job.inputs)
                ],
                "model": job.requestedModel,
                "usage": {"prompt_tokens": job.promptTokens, "total_tokens": job.promptTokens},
            }
        )


class OpenAIDialect:
    """
    The OpenAI routes of a simulator, and the probes of OpenAI-only servers.
    """

    def __init__(self, simulator: Simulator) -> None:
        """
        @param simulator: the simulator whose models and engine are served.
        """
        self.sim = simulator

    def routes(self) -> dict[tuple[bytes, str], Handler]:
        """
        @return: the route table: (method, path) -> handler.
        """
        sim = self.sim
        routes: dict[tuple[bytes, str], Handler] = {
            (b"GET", "/v1/models"): self._openaiModels,
            (b"POST", "/v1/chat/completions"): sim.work(OpenAIChat(sim)),
            (b"POST", "/v1/completions"): sim.work(OpenAICompletion(sim)),
            (b"POST", "/v1/embeddings"): sim.work(OpenAIEmbeddings(sim)),
        }
        if sim.options.api != OLLAMA:
            # llama-server and vLLM answer a health probe here.
            routes[b"GET", "/health"] = self._health
        if sim.options.api == LLAMA_SERVER:
            routes[b"GET", "/props"] = self._props
        return routes

    def prefixRoutes(self) -> list[tuple[bytes, str, Handler]]:
        """
        @return: routes matched by path prefix: (method, prefix, handler).
        """
        return [(b"GET", "/v1/models/", self._openaiModel)]

    def _health(self, request: Request) -> bytes:
        """
        C{GET /health}: C{{"status": "ok"}}; a llama-server-like simulator
        answers 503 C{"Loading model"} before (see L{Simulator.render}).
        """
        return self.sim.json(request, {"status": "ok"})

    def _props(self, request: Request) -> bytes:
        """
        C{GET /props}: llama.cpp's server properties; C{total_slots} is what
        a proxy reads as the backend's parallelism.
        """
        options = self.sim.options
        model = self.sim.modelNames[0]
        return self.sim.json(
            request,
            {
                "default_generation_settings": {
                    "id": 0,
                    "n_ctx": 4096,
                    "speculative": False,
                    "is_processing": False,
                    "params": {"n_predict": -1, "temperature": 0.8, "top_k": 40, "top_p": 0.95},
                },
                "total_slots": options.slots,
                "model_alias": model,
                "model_path": f"/models/{model}.gguf",
                "modalities": {"vision": False, "audio": False},
                "endpoint_slots": True,
                "endpoint_props": False,
                "endpoint_metrics": False,
                "chat_template": "{{ messages }}",
                "build_info": f"b0-{options.name}",
                "is_sleeping": False,
            },
        )

    def _openaiModelObject(self, name: str) -> dict[str, Any]:
        """
        @param name: a served model.
        @return: its OpenAI C{model} object.
        """
        api = self.sim.options.api
        owner = {OLLAMA: "library", LLAMA_SERVER: "llamacpp"}.get(api, self.sim.options.name)
        return {"id": name, "object": "model", "created": MODIFIED_AT, "owned_by": owner}

    def _openaiModels(self, request: Request) -> bytes:
        """
        C{GET /v1/models}.
        """
        listing: dict[str, Any] = {
            "object": "list",
            "data": [self._openaiModelObject(n) for n in self.sim.modelNames],
        }
        if self.sim.options.api == LLAMA_SERVER:
            # llama-server lists its models Ollama-style too, under "models".
            listing["models"] = [
                {"name": n, "model": n, "type": "model", "capabilities": ["completion"]}
                for n in self.sim.modelNames
            ]
        return self.sim.json(request, listing)

    def _openaiModel(self, request: Request) -> bytes:
        """
        C{GET /v1/models/{model}}; the name may contain slashes.
        """
        path = unquote(request.path.decode("utf-8", "replace"))
        requested = path[len("/v1/models/") :]
        name = self.sim.find(requested)
        if name is None:
            raise SimError(
                404,
                f"The model `{requested}` does not exist.",
                "invalid_request_error",
                "model_not_found",
            )
        return self.sim.json(request, self._openaiModelObject(name))
