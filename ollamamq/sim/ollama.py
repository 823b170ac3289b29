# -*- test-case-name: tests.test_sim -*-
"""
The Ollama dialect of the simulator: C{GET /}, C{GET /api/version}, C{GET /api/tags},
C{GET /api/ps}, C{POST /api/show}, and the work routes C{POST /api/generate},
C{POST /api/chat} (NDJSON streams), C{POST /api/embed}, C{POST /api/embeddings}.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from twisted.web.server import Request

from ollamamq.sim.dialect import (
    EMBEDDING_DIMENSIONS,
    FOREVER_SECONDS,
    MODIFIED_AT,
    Route,
    SimError,
    countWords,
    embeddingFor,
    embeddingInputs,
    isoTime,
    jsonBytes,
    messagesWords,
)

if TYPE_CHECKING:
    from ollamamq.sim.engine import Job
    from ollamamq.sim.resource import Handler, Simulator

__all__ = ["OllamaDialect"]


def ollamaLength(body: dict[str, Any]) -> int | None:
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


class OllamaGenerate(Route):
    """
    C{POST /api/generate}: NDJSON of C{{"response": token}} objects.
    """

    def parse(self, body: dict[str, Any]) -> tuple[int, int | None, list[str]]:
        """
        Count the prompt, system and suffix words.
        """
        words = sum(
            countWords(body[key])
            for key in ("prompt", "system", "suffix")
            if isinstance(body.get(key), str)
        )
        return words, ollamaLength(body), []

    def special(self, body: dict[str, Any], keepAlive: float) -> str | None:
        """
        An empty prompt loads the model, or unloads it with C{keep_alive: 0}.
        """
        if self._empty(body):
            return "unload" if keepAlive == 0 else "load"
        return None

    def _empty(self, body: dict[str, Any]) -> bool:
        """
        @param body: the request body.
        @return: whether it has nothing to answer.
        """
        return not body.get("prompt")

    def loadRoute(self) -> OllamaLoad:
        """
        @return: the route answering a load request that came here.
        """
        return OllamaLoad(self.simulator, chat=False)

    def doneAnswer(self, requested: str, reason: str) -> bytes:
        """
        The answer of a load or unload request: an empty response and
        C{done: true}.

        @param requested: the model name the client used.
        @param reason: C{done_reason}, C{"load"} or C{"unload"}.
        @return: the body.
        """
        answer: dict[str, Any] = {"model": requested, "created_at": isoTime(self.now())}
        if isinstance(self, OllamaChat) or getattr(self, "chat", False):
            answer["message"] = {"role": "assistant", "content": ""}
        else:
            answer["response"] = ""
        answer["done_reason"] = reason
        answer["done"] = True
        return jsonBytes(answer)

    def contentType(self, stream: bool) -> bytes:
        """
        Streams are NDJSON, as Ollama sends them.
        """
        return b"application/x-ndjson" if stream else super().contentType(stream)

    def _object(self, job: Job, text: str) -> dict[str, Any]:
        """
        @param job: the job.
        @param text: the C{response} text.
        @return: the fields every line has.
        """
        return {
            "model": job.requestedModel,
            "created_at": isoTime(self.now()),
            "response": text,
            "done": False,
        }

    def chunk(self, job: Job, token: str) -> bytes:
        """
        One line per token.
        """
        return jsonBytes(self._object(job, token)) + b"\n"

    def _final(self, job: Job, text: str) -> dict[str, Any]:
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

    def end(self, job: Job) -> bytes:
        """
        The last line has an empty response, C{done: true} and the stats.
        """
        return jsonBytes(self._final(job, "")) + b"\n"

    def whole(self, job: Job) -> bytes:
        """
        One object with the whole answer and the stats.
        """
        return jsonBytes(self._final(job, job.text()))


class OllamaChat(OllamaGenerate):
    """
    C{POST /api/chat}: NDJSON of C{{"message": {"role", "content"}}} objects.
    """

    def parse(self, body: dict[str, Any]) -> tuple[int, int | None, list[str]]:
        """
        Count the words of all messages.
        """
        return messagesWords(body.get("messages")), ollamaLength(body), []

    def _empty(self, body: dict[str, Any]) -> bool:
        """
        A chat without messages has nothing to answer.
        """
        return not body.get("messages")

    def loadRoute(self) -> OllamaLoad:
        """
        @return: the route answering a load request that came here.
        """
        return OllamaLoad(self.simulator, chat=True)

    def _object(self, job: Job, text: str) -> dict[str, Any]:
        """
        Chat lines carry a C{message} instead of a C{response}.
        """
        return {
            "model": job.requestedModel,
            "created_at": isoTime(self.now()),
            "message": {"role": "assistant", "content": text},
            "done": False,
        }


class OllamaEmbed(Route):
    """
    C{POST /api/embed}: C{{"embeddings": [[...], ...]}} plus timings.
    """

    embedding = True
    streamByDefault = False

    def parse(self, body: dict[str, Any]) -> tuple[int, int | None, list[str]]:
        """
        Read C{input}, a string or a list of strings.
        """
        inputs = embeddingInputs(body.get("input", []), "input", False)
        return sum(countWords(text) for text in inputs), None, inputs

    def whole(self, job: Job) -> bytes:
        """
        The embeddings with Ollama's timings.
        """
        stats = self.stats(job)
        return jsonBytes(
            {
                "model": job.requestedModel,
                "embeddings": [embeddingFor(text) for text in job.inputs],
                "total_duration": stats["total_duration"],
                "load_duration": stats["load_duration"],
                "prompt_eval_count": job.promptTokens,
            }
        )


class OllamaEmbeddings(Route):
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
            raise SimError(400, "invalid prompt: expected a string")
        return countWords(prompt), None, [prompt]

    def whole(self, job: Job) -> bytes:
        """
        The one embedding; an empty prompt gets an empty vector, as in Ollama.
        """
        text = job.inputs[0]
        return jsonBytes({"embedding": embeddingFor(text) if text else []})


class OllamaLoad(OllamaGenerate):
    """
    An Ollama generate or chat request with nothing to answer: it only loads
    the model (inside a slot) and answers C{done_reason: "load"}.
    """

    loadOnly = True

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

    def whole(self, job: Job) -> bytes:
        """
        The load answer: an empty response and C{done: true}.
        """
        return self.doneAnswer(job.requestedModel, "load")


class OllamaDialect:
    """
    The Ollama routes of a simulator.
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
        return {
            (b"GET", "/"): self._root,
            (b"GET", "/api/version"): self._version,
            (b"GET", "/api/tags"): self._tags,
            (b"GET", "/api/ps"): self._ps,
            (b"POST", "/api/show"): self._show,
            (b"POST", "/api/generate"): sim.work(OllamaGenerate(sim)),
            (b"POST", "/api/chat"): sim.work(OllamaChat(sim)),
            (b"POST", "/api/embed"): sim.work(OllamaEmbed(sim)),
            (b"POST", "/api/embeddings"): sim.work(OllamaEmbeddings(sim)),
        }

    def _root(self, request: Request) -> bytes:
        """
        C{GET /}: Ollama's liveness text.
        """
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        return b"Ollama is running"

    def _version(self, request: Request) -> bytes:
        """
        C{GET /api/version}.
        """
        return self.sim.json(request, {"version": self.sim.options.version})

    def _tags(self, request: Request) -> bytes:
        """
        C{GET /api/tags}: every served model.
        """
        return self.sim.json(
            request, {"models": [self.sim.cards[name].listing() for name in self.sim.modelNames]}
        )

    def _ps(self, request: Request) -> bytes:
        """
        C{GET /api/ps}: the loaded models, most recently used first.
        """
        now = self.sim.clock.seconds()
        models = []
        for name, expiresAt in self.sim.engine.loaded():
            card = self.sim.cards[name]
            entry = card.listing()
            del entry["modified_at"]
            entry["expires_at"] = isoTime(
                now + FOREVER_SECONDS if math.isinf(expiresAt) else expiresAt
            )
            entry["size_vram"] = card.size
            entry["context_length"] = 4096
            models.append(entry)
        return self.sim.json(request, {"models": models})

    def _show(self, request: Request) -> bytes:
        """
        C{POST /api/show}: a model's details.
        """
        body = self.sim.body(request)
        requested = body.get("model", body.get("name"))
        name = self.sim.find(requested)
        if name is None:
            raise SimError(404, f"model '{requested}' not found")
        card = self.sim.cards[name]
        template = "{{ .System }}\nUSER: {{ .Prompt }}\nASSISTANT: "
        return self.sim.json(
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
                "modified_at": isoTime(MODIFIED_AT),
            },
        )
