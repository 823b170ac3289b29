# -*- test-case-name: tests.test_sim -*-
"""
Tests for L{ollamamq.sim}: the simulated Ollama / OpenAI server (its options, Ollama and
OpenAI dialects, engine, resource and service; the Anthropic dialect and the llama-server
mode have their own modules).

Everything runs in memory: a L{Clock} drives the simulator and
L{StubTreq} talks HTTP to its resource through a real L{Site}.
"""

from __future__ import annotations

import base64
import io
import json
import math
import struct
import sys
from typing import Any

import attrs
import treq
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.iweb import IResponse
from treq.testing import StubTreq

from ollamamq.sim.__main__ import Options, main
from ollamamq.sim.server import (
    EMBEDDING_DIMENSIONS,
    Simulator,
    SimulatorOptions,
    embeddingFor,
    simulatorService,
)

BASE = "http://sim.invalid"


@attrs.define
class Stream:
    """
    A response being collected chunk by chunk.

    @ivar response: the response.
    @ivar chunks: the body bytes received so far, one item per delivery.
    @ivar done: fires when the body has been read (or fails).
    """

    response: IResponse
    chunks: list[bytes]
    done: Deferred[None]

    def body(self) -> bytes:
        """
        @return: all body bytes received so far.
        """
        return b"".join(self.chunks)

    def lines(self) -> list[dict[str, Any]]:
        """
        @return: the NDJSON objects received so far.
        """
        return [json.loads(line) for line in self.body().splitlines() if line]

    def events(self) -> list[str]:
        """
        @return: the SSE C{data:} payloads received so far.
        """
        events = [event for event in self.body().decode("utf-8").split("\n\n") if event]
        if not all(event.startswith("data: ") for event in events):
            raise ValueError(f"not server-sent data events: {events!r}")
        return [event[len("data: ") :] for event in events]


class SimulatorTestCase(SynchronousTestCase):
    """
    Base for simulator tests: builds a simulator on a L{Clock} and talks to
    it with L{StubTreq}.
    """

    def makeSimulator(self, **options: Any) -> None:
        """
        Build C{self.simulator}, C{self.clock} and C{self.stub}.

        @param options: L{SimulatorOptions} fields; C{tps=1} and C{tokens=3}
            unless given, so each token takes one clock second.
        """
        options.setdefault("tps", 1.0)
        options.setdefault("tokens", 3)
        self.clock = Clock()
        self.simulator = Simulator(SimulatorOptions(**options), self.clock)
        self.stub = StubTreq(self.simulator.resource())

    def setUp(self) -> None:
        """
        A default Ollama simulator with two models.
        """
        self.makeSimulator(models=("llama3:latest", "qwen2.5:7b", "nomic-embed-text"))

    def get(self, path: str, method: str = "GET") -> tuple[IResponse, bytes]:
        """
        Make a request that is answered at once.

        @param path: the path.
        @param method: the HTTP method.
        @return: the response and its body.
        """
        response = self.successResultOf(self.stub.request(method, BASE + path))
        return response, self.successResultOf(treq.content(response))

    def getJSON(self, path: str) -> Any:
        """
        @param path: the path of a JSON GET route.
        @return: the decoded body (after checking the status is 200).
        """
        response, body = self.get(path)
        self.assertEqual(response.code, 200, body)
        return json.loads(body)

    def post(self, path: str, body: Any, headers: dict[str, str] | None = None) -> Deferred[IResponse]:
        """
        Start a POST with a JSON body (or raw bytes).

        @param path: the path.
        @param body: a JSON-ready value, or L{bytes} sent as they are.
        @param headers: extra request headers.
        @return: the response Deferred (unbuffered).
        """
        if isinstance(body, bytes):
            return self.stub.post(BASE + path, data=body, headers=headers, unbuffered=True)
        return self.stub.post(BASE + path, json=body, headers=headers, unbuffered=True)

    def postNow(self, path: str, body: Any) -> tuple[IResponse, Any]:
        """
        POST and read an answer that comes without the clock moving.

        @param path: the path.
        @param body: the JSON body (or raw bytes).
        @return: the response and its decoded JSON body.
        """
        self.stub.flush()
        response = self.successResultOf(self.post(path, body))
        return response, json.loads(self.successResultOf(treq.content(response)))

    def advance(self, seconds: float) -> None:
        """
        Move the clock, then move the bytes.

        @param seconds: how far.
        """
        self.clock.advance(seconds)
        self.stub.flush()

    def stream(self, responseDeferred: Deferred[IResponse]) -> Stream:
        """
        Start collecting a response that has arrived.

        @param responseDeferred: the response Deferred.
        @return: the stream being collected.
        """
        response = self.successResultOf(responseDeferred)
        chunks: list[bytes] = []
        return Stream(response, chunks, treq.collect(response, chunks.append))

    def finish(self, responseDeferred: Deferred[IResponse], seconds: float = 100) -> tuple[IResponse, bytes]:
        """
        Let the clock run until a response is complete.

        @param responseDeferred: the response Deferred.
        @param seconds: how long to let the clock run, one second at a time.
        @return: the response and its whole body.
        """
        for _ in range(int(seconds)):
            self.advance(1)
        self.stub.flush()
        stream = self.stream(responseDeferred)
        self.stub.flush()
        self.successResultOf(stream.done)
        return stream.response, stream.body()


class OptionsTests(SynchronousTestCase):
    """
    Tests for L{SimulatorOptions}.
    """

    def test_defaults(self) -> None:
        """
        The defaults are a single-slot Ollama serving C{llama3:latest}.
        """
        options = SimulatorOptions()
        self.assertEqual(
            (options.api, options.models, options.tps, options.tokens, options.slots),
            ("ollama", ("llama3:latest",), 50.0, 20, 1),
        )

    def test_modelsFromString(self) -> None:
        """
        Models may be given as one comma-separated string.
        """
        self.assertEqual(SimulatorOptions(models="a, b,,c").models, ("a", "b", "c"))

    def test_invalid(self) -> None:
        """
        Out-of-range values raise L{ValueError} naming the option.
        """
        for kwargs, name in [
            ({"slots": 0}, "slots"),
            ({"maxLoaded": 0}, "maxLoaded"),
            ({"tps": -1.0}, "tps"),
            ({"tps": math.inf}, "tps"),
            ({"loadDelay": -0.5}, "loadDelay"),
            ({"tokens": -1}, "tokens"),
            ({"api": "bogus"}, "api"),
            ({"models": ()}, "models"),
        ]:
            error = self.assertRaises(ValueError, SimulatorOptions, **kwargs)
            self.assertTrue(str(error).startswith(name + " "), str(error))


class MetadataTests(SimulatorTestCase):
    """
    The Ollama metadata routes.
    """

    def test_root(self) -> None:
        """
        C{GET /} says Ollama is running, with the backend header.
        """
        response, body = self.get("/")
        self.assertEqual((response.code, body), (200, b"Ollama is running"))
        self.assertEqual(response.headers.getRawHeaders("x-sim-backend"), ["sim"])

    def test_head(self) -> None:
        """
        C{HEAD} works on GET routes, with no body.
        """
        response, body = self.get("/api/tags", method="HEAD")
        self.assertEqual((response.code, body), (200, b""))

    def test_version(self) -> None:
        """
        C{GET /api/version} reports the configured version.
        """
        self.assertEqual(self.getJSON("/api/version"), {"version": "0.12.6"})

    def test_tags(self) -> None:
        """
        C{GET /api/tags} lists every model with Ollama's fields; untagged
        names mean C{:latest}.
        """
        models = self.getJSON("/api/tags")["models"]
        self.assertEqual(
            [m["name"] for m in models],
            ["llama3:latest", "qwen2.5:7b", "nomic-embed-text:latest"],
        )
        for model in models:
            self.assertEqual(model["model"], model["name"])
            self.assertEqual(
                set(model), {"name", "model", "modified_at", "size", "digest", "details"}
            )
            self.assertTrue(
                {"format", "family", "families", "parameter_size", "quantization_level"}
                <= set(model["details"])
            )
        self.assertEqual(models[1]["details"]["parameter_size"], "7.0B")

    def test_psAfterUse(self) -> None:
        """
        C{GET /api/ps} is empty before any request and lists the model (with
        C{expires_at} and C{size_vram}) after one.
        """
        self.assertEqual(self.getJSON("/api/ps"), {"models": []})
        self.finish(self.post("/api/generate", {"model": "llama3", "prompt": "hi"}))
        [model] = self.getJSON("/api/ps")["models"]
        self.assertEqual(model["name"], "llama3:latest")
        self.assertEqual(model["size_vram"], model["size"])
        # Five minutes after the request ended (at 3 s on the clock).
        self.assertEqual(model["expires_at"], "1970-01-01T00:05:03.000000Z")

    def test_keepAliveExpiry(self) -> None:
        """
        A model is unloaded when the request's C{keep_alive} runs out.
        """
        self.finish(
            self.post("/api/generate", {"model": "llama3", "prompt": "hi", "keep_alive": "10s"}),
            seconds=5,
        )
        self.assertEqual(len(self.getJSON("/api/ps")["models"]), 1)
        self.clock.advance(10)
        self.assertEqual(self.getJSON("/api/ps")["models"], [])

    def test_show(self) -> None:
        """
        C{POST /api/show} describes a model.
        """
        response, body = self.postNow("/api/show", {"model": "llama3"})
        self.assertEqual(response.code, 200)
        self.assertTrue(
            {"modelfile", "parameters", "template", "details", "model_info", "capabilities"}
            <= set(body)
        )
        self.assertEqual(body["capabilities"], ["completion"])
        _, embed = self.postNow("/api/show", {"model": "nomic-embed-text"})
        self.assertEqual(embed["capabilities"], ["embedding"])

    def test_showUnknown(self) -> None:
        """
        C{POST /api/show} of an unknown model is 404 with Ollama's message.
        """
        response, body = self.postNow("/api/show", {"model": "nope"})
        self.assertEqual((response.code, body), (404, {"error": "model 'nope' not found"}))

    def test_unknownRoute(self) -> None:
        """
        An unknown route is 404 in plain text, as Ollama's router answers.
        """
        response, body = self.get("/api/nope")
        self.assertEqual((response.code, body), (404, b"404 page not found"))
        self.assertEqual(response.headers.getRawHeaders("x-sim-backend"), ["sim"])

    def test_wrongMethod(self) -> None:
        """
        A known route with the wrong method is 405 with C{Allow}.
        """
        response, _ = self.get("/api/generate")
        self.assertEqual(response.code, 405)
        self.assertEqual(response.headers.getRawHeaders("allow"), ["POST"])

    def test_openaiModels(self) -> None:
        """
        C{GET /v1/models} and C{/v1/models/{id}} use OpenAI's shapes.
        """
        listing = self.getJSON("/v1/models")
        self.assertEqual(listing["object"], "list")
        self.assertEqual(
            listing["data"][0],
            {"id": "llama3:latest", "object": "model", "created": 1717171717, "owned_by": "library"},
        )
        self.assertEqual(self.getJSON("/v1/models/qwen2.5:7b")["id"], "qwen2.5:7b")
        response, body = self.get("/v1/models/nope")
        self.assertEqual(response.code, 404)
        self.assertEqual(json.loads(body)["error"]["code"], "model_not_found")


class OllamaGenerationTests(SimulatorTestCase):
    """
    C{/api/generate} and C{/api/chat}.
    """

    def test_generateStreamsIncrementally(self) -> None:
        """
        Each token arrives as its own NDJSON line when it is due, and the
        last line is C{done} with the stats.
        """
        d = self.post("/api/generate", {"model": "llama3", "prompt": "why is the sky blue"})
        self.stub.flush()
        self.assertNoResult(d)
        self.advance(1)
        stream = self.stream(d)
        self.assertEqual(stream.response.code, 200)
        self.assertEqual(
            stream.response.headers.getRawHeaders("content-type"), ["application/x-ndjson"]
        )
        self.assertEqual(len(stream.lines()), 1)
        self.advance(1)
        self.assertEqual(len(stream.lines()), 2)
        self.assertNoResult(stream.done)
        self.advance(1)
        self.successResultOf(stream.done)
        lines = stream.lines()
        self.assertEqual(len(lines), 4)
        for line in lines[:3]:
            self.assertEqual(set(line), {"model", "created_at", "response", "done"})
            self.assertFalse(line["done"])
            self.assertEqual(line["model"], "llama3")
        final = lines[-1]
        self.assertTrue(final["done"])
        self.assertEqual(final["response"], "")
        self.assertEqual(final["done_reason"], "stop")
        self.assertEqual(final["eval_count"], 3)
        self.assertEqual(final["prompt_eval_count"], 5)
        self.assertEqual(final["eval_duration"], 3_000_000_000)
        self.assertEqual(final["total_duration"], 3_000_000_000)
        self.assertEqual(final["load_duration"], 0)
        self.assertIn("prompt_eval_duration", final)
        self.assertEqual(final["created_at"], "1970-01-01T00:00:03.000000Z")
        # Tokens are words, each but the first after a space.
        text = "".join(line["response"] for line in lines)
        self.assertEqual(len(text.split()), 3)
        self.assertTrue(text[0] != " " and lines[1]["response"].startswith(" "))

    def test_chatStream(self) -> None:
        """
        Chat lines carry assistant messages; the final one has an empty
        message and the stats.
        """
        d = self.post(
            "/api/chat",
            {"model": "llama3", "messages": [{"role": "user", "content": "hello there"}]},
        )
        response, body = self.finish(d, 3)
        lines = [json.loads(line) for line in body.splitlines()]
        self.assertEqual(len(lines), 4)
        self.assertEqual(lines[0]["message"]["role"], "assistant")
        self.assertEqual(lines[-1]["message"], {"role": "assistant", "content": ""})
        self.assertEqual((lines[-1]["eval_count"], lines[-1]["prompt_eval_count"]), (3, 2))

    def test_streamFalse(self) -> None:
        """
        C{stream: false} gets one object with the whole text, only after all
        tokens were generated.
        """
        d = self.post("/api/chat", {"model": "llama3", "stream": False, "messages": []})
        # An empty chat only loads the model (that is Ollama's "load" call).
        response, body = self.finish(d, 0)
        self.assertEqual(json.loads(body)["done_reason"], "load")

        streamed = self.finish(
            self.post("/api/generate", {"model": "llama3", "prompt": "same prompt"}), 3
        )[1]
        d = self.post("/api/generate", {"model": "llama3", "prompt": "same prompt", "stream": False})
        self.advance(2)
        self.assertNoResult(d)
        self.advance(1)
        response, body = self.finish(d, 0)
        self.assertEqual(
            response.headers.getRawHeaders("content-type"), ["application/json; charset=utf-8"]
        )
        answer = json.loads(body)
        self.assertTrue(answer["done"])
        self.assertEqual(answer["eval_count"], 3)
        expected = "".join(json.loads(line)["response"] for line in streamed.splitlines())
        self.assertEqual(answer["response"], expected)

    def test_numPredict(self) -> None:
        """
        C{options.num_predict} sets the answer length, ending with
        C{done_reason: "length"}.
        """
        d = self.post(
            "/api/generate",
            {"model": "llama3", "prompt": "x", "options": {"num_predict": 5}, "stream": False},
        )
        answer = json.loads(self.finish(d, 5)[1])
        self.assertEqual((answer["eval_count"], answer["done_reason"]), (5, "length"))
        self.assertEqual(len(answer["response"].split()), 5)

    def test_numPredictZero(self) -> None:
        """
        C{num_predict: 0} ends at once with only the final line.
        """
        d = self.post("/api/generate", {"model": "llama3", "prompt": "x", "options": {"num_predict": 0}})
        lines = [json.loads(line) for line in self.finish(d, 0)[1].splitlines()]
        self.assertEqual(len(lines), 1)
        self.assertEqual(lines[0]["eval_count"], 0)

    def test_unload(self) -> None:
        """
        An empty prompt with C{keep_alive: 0} unloads the model.
        """
        self.finish(self.post("/api/generate", {"model": "llama3", "prompt": "hi"}), 3)
        self.assertEqual(len(self.getJSON("/api/ps")["models"]), 1)
        _, answer = self.postNow("/api/generate", {"model": "llama3", "keep_alive": 0})
        self.assertEqual(answer["done_reason"], "unload")
        self.assertEqual(self.getJSON("/api/ps")["models"], [])

    def test_tpsZero(self) -> None:
        """
        With C{tps=0} each token is its own zero-delay call (one per reactor
        turn), never a loop inside one call.
        """
        self.makeSimulator(tps=0.0, tokens=3)
        d = self.post("/api/generate", {"model": "llama3", "prompt": "x"})
        self.stub.flush()
        self.assertNoResult(d)
        [call] = self.clock.getDelayedCalls()
        self.assertEqual(call.getTime(), 0.0)
        call.func(*call.args, **call.kw)
        self.clock.calls.remove(call)
        self.stub.flush()
        stream = self.stream(d)
        self.assertEqual(len(stream.lines()), 1)
        self.assertEqual([c.getTime() for c in self.clock.getDelayedCalls()], [0.0])
        self.advance(0)
        self.successResultOf(stream.done)
        self.assertEqual(len(stream.lines()), 4)

    def test_embeddingModelRefusesGenerate(self) -> None:
        """
        An embedding-only model refuses to generate, as in Ollama.
        """
        response, body = self.postNow("/api/generate", {"model": "nomic-embed-text", "prompt": "x"})
        self.assertEqual(response.code, 400)
        self.assertIn("does not support generate", body["error"])


class OpenAITests(SimulatorTestCase):
    """
    C{/v1/chat/completions}, C{/v1/completions} and their streams.
    """

    def test_chatStreamSSE(self) -> None:
        """
        A streamed chat completion is server-sent events: one chunk per
        token (the first naming the role), a closing chunk with
        C{finish_reason}, then C{[DONE]}.
        """
        d = self.post(
            "/v1/chat/completions",
            {"model": "llama3", "stream": True, "messages": [{"role": "user", "content": "hi"}]},
        )
        self.advance(1)
        stream = self.stream(d)
        self.assertEqual(stream.response.headers.getRawHeaders("content-type"), ["text/event-stream"])
        [first] = stream.events()
        chunk = json.loads(first)
        self.assertEqual(chunk["object"], "chat.completion.chunk")
        self.assertEqual(chunk["choices"][0]["delta"]["role"], "assistant")
        self.assertNotIn("usage", chunk)
        self.advance(1)
        self.advance(1)
        self.successResultOf(stream.done)
        events = stream.events()
        self.assertEqual(events[-1], "[DONE]")
        chunks = [json.loads(event) for event in events[:-1]]
        self.assertEqual(len(chunks), 4)
        self.assertEqual(chunks[1]["choices"][0]["delta"], {"content": chunks[1]["choices"][0]["delta"]["content"]})
        self.assertEqual(chunks[-1]["choices"][0]["delta"], {})
        self.assertEqual(chunks[-1]["choices"][0]["finish_reason"], "stop")
        self.assertEqual(len({c["id"] for c in chunks}), 1)

    def test_includeUsage(self) -> None:
        """
        C{stream_options.include_usage} adds a usage chunk with no choices
        before C{[DONE]}, and C{"usage": null} on every other chunk.
        """
        d = self.post(
            "/v1/chat/completions",
            {
                "model": "llama3",
                "stream": True,
                "stream_options": {"include_usage": True},
                "max_tokens": 2,
                "messages": [{"role": "user", "content": "one two three"}],
            },
        )
        _, body = self.finish(d, 2)
        events = body.decode().split("\n\n")[:-1]
        self.assertEqual(events[-1], "data: [DONE]")
        chunks = [json.loads(e[len("data: ") :]) for e in events[:-1]]
        self.assertEqual(len(chunks), 4)
        self.assertTrue(all(c["usage"] is None for c in chunks[:-1]))
        self.assertEqual(chunks[-2]["choices"][0]["finish_reason"], "length")
        self.assertEqual(chunks[-1]["choices"], [])
        self.assertEqual(
            chunks[-1]["usage"], {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
        )

    def test_chatNonStream(self) -> None:
        """
        Without C{stream}, a C{chat.completion} object with C{usage};
        C{max_completion_tokens} sets the length.
        """
        d = self.post(
            "/v1/chat/completions",
            {"model": "llama3", "max_completion_tokens": 4, "messages": [{"role": "user", "content": "hi"}]},
        )
        answer = json.loads(self.finish(d, 4)[1])
        self.assertEqual(answer["object"], "chat.completion")
        [choice] = answer["choices"]
        self.assertEqual(choice["message"]["role"], "assistant")
        self.assertEqual(len(choice["message"]["content"].split()), 4)
        self.assertEqual(choice["finish_reason"], "length")
        self.assertEqual(answer["usage"], {"prompt_tokens": 1, "completion_tokens": 4, "total_tokens": 5})

    def test_completions(self) -> None:
        """
        C{/v1/completions} streams C{text_completion} chunks and answers a
        C{text_completion} object.
        """
        _, body = self.finish(self.post("/v1/completions", {"model": "llama3", "prompt": "a b", "stream": True}), 3)
        events = body.decode().split("\n\n")[:-1]
        chunks = [json.loads(e[len("data: ") :]) for e in events[:-1]]
        self.assertEqual({c["object"] for c in chunks}, {"text_completion"})
        self.assertEqual(chunks[-1]["choices"][0]["finish_reason"], "stop")
        self.assertEqual(events[-1], "data: [DONE]")
        answer = json.loads(self.finish(self.post("/v1/completions", {"model": "llama3", "prompt": "a b"}), 3)[1])
        self.assertEqual(answer["object"], "text_completion")
        self.assertEqual(answer["usage"]["completion_tokens"], 3)
        self.assertEqual(len(answer["choices"][0]["text"].split()), 3)

    def test_unknownModel(self) -> None:
        """
        Like Ollama's compatibility layer, an unknown model is 404 with
        Ollama's message in OpenAI's error envelope.
        """
        response, body = self.postNow("/v1/chat/completions", {"model": "nope", "messages": []})
        self.assertEqual(response.code, 404)
        self.assertEqual(
            body,
            {
                "error": {
                    "message": 'model "nope" not found, try pulling it first',
                    "type": "not_found_error",
                    "param": None,
                    "code": None,
                }
            },
        )

    def test_badJSON(self) -> None:
        """
        A malformed body is 400 in OpenAI's error envelope.
        """
        response, body = self.postNow("/v1/chat/completions", b"{not json")
        self.assertEqual(response.code, 400)
        self.assertEqual(body["error"]["type"], "invalid_request_error")
        self.assertIn("invalid JSON", body["error"]["message"])


class OpenAIModeTests(SimulatorTestCase):
    """
    A simulator with C{api="openai"}, like vLLM or llama-server.
    """

    def setUp(self) -> None:
        """
        An OpenAI-only simulator with an unusual model name.
        """
        self.makeSimulator(api="openai", models=("Qwen/Qwen2.5-7B-Instruct",), name="vllm")

    def test_noOllamaRoutes(self) -> None:
        """
        C{/} and C{/api/*} are 404 in OpenAI's shape.
        """
        for path in ["/", "/api/tags", "/api/version"]:
            response, body = self.get(path)
            self.assertEqual(response.code, 404, path)
            self.assertNotIn(b"Ollama is running", body)
            self.assertIn("error", json.loads(body))
            self.assertEqual(response.headers.getRawHeaders("x-sim-backend"), ["vllm"])
        response, _ = self.postNow("/api/generate", {"model": "Qwen/Qwen2.5-7B-Instruct"})
        self.assertEqual(response.code, 404)

    def test_models(self) -> None:
        """
        Names are served exactly (no C{:latest}), slashes and all.
        """
        self.assertEqual(
            [m["id"] for m in self.getJSON("/v1/models")["data"]], ["Qwen/Qwen2.5-7B-Instruct"]
        )
        self.assertEqual(
            self.getJSON("/v1/models/Qwen/Qwen2.5-7B-Instruct")["owned_by"], "vllm"
        )
        self.assertEqual(self.getJSON("/health"), {"status": "ok"})

    def test_unknownModel(self) -> None:
        """
        An unknown model is 404 with OpenAI's own error.
        """
        response, body = self.postNow("/v1/chat/completions", {"model": "qwen", "messages": []})
        self.assertEqual(response.code, 404)
        self.assertEqual(body["error"]["code"], "model_not_found")
        self.assertEqual(body["error"]["type"], "invalid_request_error")

    def test_chat(self) -> None:
        """
        Chat completions work as with the Ollama API.
        """
        d = self.post(
            "/v1/chat/completions",
            {"model": "Qwen/Qwen2.5-7B-Instruct", "messages": [{"role": "user", "content": "hi"}]},
        )
        answer = json.loads(self.finish(d, 3)[1])
        self.assertEqual(answer["usage"]["completion_tokens"], 3)


class ErrorTests(SimulatorTestCase):
    """
    Ollama-shaped errors on C{/api/*}.
    """

    def test_unknownModel(self) -> None:
        """
        An unknown model is 404 with Ollama's message.
        """
        for path in ["/api/generate", "/api/chat", "/api/embed"]:
            response, body = self.postNow(path, {"model": "nope"})
            self.assertEqual(response.code, 404)
            self.assertEqual(body, {"error": 'model "nope" not found, try pulling it first'})

    def test_badJSON(self) -> None:
        """
        A malformed body is 400 with an C{error} string.
        """
        response, body = self.postNow("/api/generate", b"{nope")
        self.assertEqual(response.code, 400)
        self.assertIsInstance(body["error"], str)
        response, body = self.postNow("/api/chat", b"[1, 2]")
        self.assertEqual(response.code, 400)

    def test_missingModel(self) -> None:
        """
        A request without a model is 400.
        """
        response, body = self.postNow("/api/generate", {"prompt": "hi"})
        self.assertEqual((response.code, body), (400, {"error": "model is required"}))

    def test_errorsCounted(self) -> None:
        """
        Refused requests are logged with status C{error}.
        """
        self.postNow("/api/generate", {"model": "nope"})
        stats = self.simulator.stats
        self.assertEqual((stats["requests"], stats["errors"]), (1, 1))
        self.assertEqual(stats["log"][0]["status"], "error")
        self.assertEqual(stats["log"][0]["model"], "nope")


class EmbeddingTests(SimulatorTestCase):
    """
    The three embedding routes.
    """

    def test_embedFunction(self) -> None:
        """
        L{embeddingFor} is deterministic, normalised, and differs by text.
        """
        vector = embeddingFor("hello")
        self.assertEqual(len(vector), EMBEDDING_DIMENSIONS)
        self.assertAlmostEqual(sum(v * v for v in vector), 1.0)
        self.assertEqual(vector, embeddingFor("hello"))
        self.assertNotEqual(vector, embeddingFor("world"))
        self.assertEqual(len(embeddingFor("hello", 20)), 20)

    def test_ollamaEmbed(self) -> None:
        """
        C{/api/embed} takes a string or a list and answers C{embeddings}
        after one token's time.
        """
        d = self.post("/api/embed", {"model": "nomic-embed-text", "input": ["a b", "c"]})
        self.stub.flush()
        self.assertNoResult(d)
        answer = json.loads(self.finish(d, 1)[1])
        self.assertEqual(answer["model"], "nomic-embed-text")
        self.assertEqual(answer["embeddings"], [embeddingFor("a b"), embeddingFor("c")])
        self.assertEqual(answer["prompt_eval_count"], 3)
        self.assertTrue({"total_duration", "load_duration"} <= set(answer))
        single = json.loads(self.finish(self.post("/api/embed", {"model": "llama3", "input": "a"}), 1)[1])
        self.assertEqual(single["embeddings"], [embeddingFor("a")])

    def test_legacyEmbeddings(self) -> None:
        """
        C{/api/embeddings} takes C{prompt} and answers one C{embedding}.
        """
        d = self.post("/api/embeddings", {"model": "nomic-embed-text", "prompt": "hello"})
        self.assertEqual(json.loads(self.finish(d, 1)[1]), {"embedding": embeddingFor("hello")})

    def test_openaiEmbeddings(self) -> None:
        """
        C{/v1/embeddings} answers an OpenAI list, as floats or as base64 of
        float32 values.
        """
        d = self.post("/v1/embeddings", {"model": "nomic-embed-text", "input": ["x", "y z"]})
        answer = json.loads(self.finish(d, 1)[1])
        self.assertEqual(answer["object"], "list")
        self.assertEqual(answer["model"], "nomic-embed-text")
        self.assertEqual(answer["usage"], {"prompt_tokens": 3, "total_tokens": 3})
        self.assertEqual(
            [(e["object"], e["index"]) for e in answer["data"]], [("embedding", 0), ("embedding", 1)]
        )
        self.assertEqual(answer["data"][1]["embedding"], embeddingFor("y z"))
        d = self.post(
            "/v1/embeddings",
            {"model": "nomic-embed-text", "input": "x", "encoding_format": "base64"},
        )
        encoded = json.loads(self.finish(d, 1)[1])["data"][0]["embedding"]
        decoded = struct.unpack(f"<{EMBEDDING_DIMENSIONS}f", base64.b64decode(encoded))
        for got, want in zip(decoded, embeddingFor("x")):
            self.assertAlmostEqual(got, want, places=6)

    def test_badInput(self) -> None:
        """
        A non-text input is 400.
        """
        response, _ = self.postNow("/api/embed", {"model": "nomic-embed-text", "input": 3})
        self.assertEqual(response.code, 400)


class SlotTests(SimulatorTestCase):
    """
    Slots, FIFO waiting, model loads and client disconnects.
    """

    def test_secondWaits(self) -> None:
        """
        With one slot a second request gets no byte until the first ends,
        then runs; the stats show it waiting, then running.
        """
        first = self.post("/api/generate", {"model": "llama3", "prompt": "one"})
        second = self.post("/api/generate", {"model": "llama3", "prompt": "two"})
        self.stub.flush()
        stats = self.simulator.stats
        self.assertEqual((stats["active"], stats["waiting"]), (1, 1))
        self.assertEqual([e["status"] for e in stats["log"]], ["running", "waiting"])
        self.advance(1)
        firstStream = self.stream(first)
        self.advance(1)
        self.advance(1)
        self.successResultOf(firstStream.done)
        self.assertNoResult(second)
        self.advance(1)
        secondStream = self.stream(second)
        self.assertEqual(len(secondStream.lines()), 1)
        self.advance(2)
        self.successResultOf(secondStream.done)
        stats = self.simulator.stats
        self.assertEqual((stats["completed"], stats["maxConcurrent"]), (2, 1))
        self.assertEqual([e["startedAt"] for e in stats["log"]], [0.0, 3.0])

    def test_fifo(self) -> None:
        """
        Waiting requests start in arrival order as slots free.
        """
        self.makeSimulator(slots=2, tokens=1)
        ds = [self.post("/api/generate", {"model": "llama3", "prompt": str(i)}) for i in range(5)]
        self.stub.flush()
        self.assertEqual(self.simulator.stats["active"], 2)
        self.advance(1)
        self.advance(1)
        self.advance(1)
        for d in ds:
            self.stream(d)
        starts = [e["startedAt"] for e in self.simulator.stats["log"]]
        self.assertEqual(starts, [0.0, 0.0, 1.0, 1.0, 2.0])
        self.assertEqual(self.simulator.stats["maxConcurrent"], 2)

    def test_loadDelay(self) -> None:
        """
        A model that is not loaded costs C{loadDelay} before its first token
        (reported as C{load_duration}); with C{maxLoaded=1} switching models
        evicts the other, so switching back costs the load again.
        """
        self.makeSimulator(models=("llama3", "qwen2.5:7b"), loadDelay=5.0, tokens=1)

        def run(model: str, expectDelay: float) -> dict[str, Any]:
            d = self.post("/api/generate", {"model": model, "prompt": "x"})
            self.advance(expectDelay)
            self.assertNoResult(d)
            self.advance(1)
            return self.stream(d).lines()[-1]

        self.assertEqual(run("llama3", 5.0)["load_duration"], 5_000_000_000)
        self.assertEqual(run("llama3", 0.0)["load_duration"], 0)
        self.assertEqual([m["name"] for m in self.getJSON("/api/ps")["models"]], ["llama3:latest"])
        self.assertEqual(run("qwen2.5:7b", 5.0)["load_duration"], 5_000_000_000)
        self.assertEqual([m["name"] for m in self.getJSON("/api/ps")["models"]], ["qwen2.5:7b"])
        self.assertEqual(run("llama3", 5.0)["load_duration"], 5_000_000_000)

    def test_maxLoaded(self) -> None:
        """
        With C{maxLoaded=2} two models stay loaded; a third evicts the least
        recently used.
        """
        self.makeSimulator(models=("a", "b", "c"), maxLoaded=2, tokens=1)
        for model in ["a", "b", "a", "c"]:
            self.finish(self.post("/api/generate", {"model": model, "prompt": "x"}), 1)
        self.assertEqual(self.simulator.stats["loaded"], ["a:latest", "c:latest"])

    def test_sharedLoad(self) -> None:
        """
        Two slots asking for the same unloaded model share one load.
        """
        self.makeSimulator(slots=2, loadDelay=4.0, tokens=1)
        first = self.post("/api/generate", {"model": "llama3", "prompt": "x"})
        self.advance(2)
        second = self.post("/api/generate", {"model": "llama3", "prompt": "y"})
        self.advance(2)
        self.advance(1)
        self.assertEqual(self.stream(first).lines()[-1]["load_duration"], 4_000_000_000)
        self.assertEqual(self.stream(second).lines()[-1]["load_duration"], 2_000_000_000)

    def disconnect(self, d: Deferred[IResponse]) -> None:
        """
        Make the client of a response that has arrived drop the connection,
        by making its body collector raise (treq then closes the transport).

        @param d: the response Deferred.
        """

        def explode(data: bytes) -> None:
            raise RuntimeError("client gave up")

        done = treq.collect(self.successResultOf(d), explode)
        self.stub.flush()
        self.failureResultOf(done, RuntimeError)

    def test_disconnectWhileRunning(self) -> None:
        """
        A client that goes away mid-stream frees its slot at once; the next
        request starts and the cancelled one stops producing.
        """
        first = self.post("/api/generate", {"model": "llama3", "prompt": "x"})
        second = self.post("/api/generate", {"model": "llama3", "prompt": "y"})
        self.advance(1)
        self.disconnect(first)
        stats = self.simulator.stats
        self.assertEqual((stats["cancelled"], stats["active"], stats["waiting"]), (1, 1, 0))
        self.assertEqual(stats["log"][0]["status"], "cancelled")
        self.assertEqual(stats["log"][0]["tokens"], 1)
        self.assertEqual(stats["log"][1]["startedAt"], 1.0)
        self.finish(second, 3)
        stats = self.simulator.stats
        self.assertEqual((stats["completed"], stats["cancelled"]), (1, 1))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_disconnectWhileWaiting(self) -> None:
        """
        A waiting client that goes away leaves the queue and is counted.
        """
        first = self.post("/api/generate", {"model": "llama3", "prompt": "x"})
        second = self.post("/api/generate", {"model": "llama3", "prompt": "y"})
        self.stub.flush()
        self.assertNoResult(second)
        second.cancel()
        self.stub.flush()
        self.failureResultOf(second)
        stats = self.simulator.stats
        self.assertEqual((stats["cancelled"], stats["active"], stats["waiting"]), (1, 1, 0))
        self.assertEqual(stats["log"][1]["status"], "cancelled")
        self.assertIsNone(stats["log"][1]["startedAt"])
        self.finish(first, 3)
        self.assertEqual(self.simulator.stats["completed"], 1)

    def test_disconnectWhileLoading(self) -> None:
        """
        A client that goes away while its model loads frees the slot at
        once; the load itself goes on, so the next request for the model
        waits only for the rest of it.
        """
        self.makeSimulator(loadDelay=5.0, tokens=1)
        first = self.post("/api/generate", {"model": "llama3", "prompt": "x"})
        second = self.post("/api/generate", {"model": "llama3", "prompt": "y"})
        self.advance(2)
        first.cancel()
        self.stub.flush()
        self.failureResultOf(first)
        stats = self.simulator.stats
        self.assertEqual((stats["cancelled"], stats["active"], stats["waiting"]), (1, 1, 0))
        self.advance(3)
        self.advance(1)
        self.assertEqual(self.stream(second).lines()[-1]["load_duration"], 3_000_000_000)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_shutdown(self) -> None:
        """
        L{Simulator.shutdown} cancels every timer and drops every request.
        """
        self.makeSimulator(loadDelay=2.0)
        first = self.post("/api/generate", {"model": "llama3", "prompt": "x"})
        second = self.post("/api/generate", {"model": "llama3", "prompt": "y"})
        self.stub.flush()
        self.simulator.shutdown()
        self.stub.flush()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.failureResultOf(first)
        self.failureResultOf(second)
        stats = self.simulator.stats
        self.assertEqual((stats["cancelled"], stats["active"], stats["waiting"]), (2, 0, 0))


class SimRouteTests(SimulatorTestCase):
    """
    C{/sim/stats}, C{/sim/reset} and C{/sim/fail}.
    """

    def test_statsRecordHeaders(self) -> None:
        """
        The log records the path, model, C{X-User-ID} and lowercased
        request headers of each work request.
        """
        d = self.post(
            "/api/chat",
            {"model": "llama3", "messages": [{"role": "user", "content": "hi"}]},
            headers={"X-User-ID": "alice", "X-Custom": "yes"},
        )
        self.finish(d, 3)
        self.finish(self.post("/v1/completions", {"model": "llama3", "prompt": "x"}), 3)
        stats = self.getJSON("/sim/stats")
        self.assertEqual(
            {k: stats[k] for k in ["requests", "completed", "cancelled", "active", "waiting", "maxConcurrent"]},
            {"requests": 2, "completed": 2, "cancelled": 0, "active": 0, "waiting": 0, "maxConcurrent": 1},
        )
        first, second = stats["log"]
        self.assertEqual(
            (first["path"], first["model"], first["user"], first["status"]),
            ("/api/chat", "llama3", "alice", "completed"),
        )
        self.assertEqual(first["headers"]["x-custom"], "yes")
        self.assertEqual(first["headers"]["x-user-id"], "alice")
        self.assertEqual((first["startedAt"], first["finishedAt"]), (0.0, 3.0))
        self.assertIsNone(second["user"])

    def test_requestsRecordHeaders(self) -> None:
        """
        C{GET /sim/requests} lists every request but the test hooks', probes too, with
        method, path and lowercased headers, so a test sees which credentials reached
        the backend; C{POST /sim/reset} clears it.
        """
        self.successResultOf(
            self.stub.get(BASE + "/api/tags", headers={"Authorization": "Bearer sk-backend"})
        )
        self.finish(
            self.post("/v1/messages", {"model": "llama3", "max_tokens": 2, "messages": [
                {"role": "user", "content": "hi"}]}, headers={"X-Api-Key": "sk-ant"}),
            3,
        )
        self.getJSON("/sim/stats")
        requests = self.getJSON("/sim/requests")["requests"]
        self.assertEqual(
            [(r["method"], r["path"]) for r in requests],
            [("GET", "/api/tags"), ("POST", "/v1/messages")],
        )
        self.assertEqual(requests[0]["headers"]["authorization"], "Bearer sk-backend")
        self.assertEqual(requests[1]["headers"]["x-api-key"], "sk-ant")
        self.assertNotIn("authorization", requests[1]["headers"])
        self.postNow("/sim/reset", {})
        self.assertEqual(self.getJSON("/sim/requests"), {"requests": []})

    def test_reset(self) -> None:
        """
        C{POST /sim/reset} clears counters and the log.
        """
        self.finish(self.post("/api/generate", {"model": "llama3", "prompt": "x"}), 3)
        response, body = self.postNow("/sim/reset", {})
        self.assertEqual(response.code, 200)
        stats = self.getJSON("/sim/stats")
        self.assertEqual((stats["requests"], stats["completed"], stats["log"]), (0, 0, []))

    def test_logCapped(self) -> None:
        """
        The log keeps only the last 1000 entries.
        """
        for _ in range(1005):
            self.postNow("/api/generate", {"model": "nope"})
        stats = self.simulator.stats
        self.assertEqual((stats["requests"], len(stats["log"])), (1005, 1000))
        self.assertEqual(stats["log"][0]["id"], 6)

    def test_fail(self) -> None:
        """
        C{POST /sim/fail} makes work requests fail with the status, in each
        family's shape, until it is set to null; metadata still works.
        """
        response, body = self.postNow("/sim/fail", {"status": 503})
        self.assertEqual((response.code, body), (200, {"status": 503}))
        response, body = self.postNow("/api/generate", {"model": "llama3", "prompt": "x"})
        self.assertEqual((response.code, body), (503, {"error": "simulated failure"}))
        self.assertEqual(response.headers.getRawHeaders("x-sim-backend"), ["sim"])
        response, body = self.postNow("/v1/embeddings", {"model": "llama3", "input": "x"})
        self.assertEqual(response.code, 503)
        self.assertEqual(body["error"]["message"], "simulated failure")
        self.assertEqual(self.getJSON("/api/version"), {"version": "0.12.6"})
        stats = self.simulator.stats
        self.assertEqual((stats["requests"], stats["errors"], stats["failStatus"]), (2, 2, 503))
        self.postNow("/sim/fail", {"status": None})
        d = self.post("/api/generate", {"model": "llama3", "prompt": "x", "stream": False})
        self.assertEqual(self.finish(d, 3)[0].code, 200)

    def test_failBadStatus(self) -> None:
        """
        A status that is not an HTTP error is refused.
        """
        response, _ = self.postNow("/sim/fail", {"status": 200})
        self.assertEqual(response.code, 400)
        self.assertIsNone(self.simulator.failStatus)


class ServiceTests(SynchronousTestCase):
    """
    Tests for L{simulatorService}.
    """

    def test_listens(self) -> None:
        """
        The service listens on its endpoint when started, reports the port,
        and stops listening when stopped.
        """
        reactor = MemoryReactorClock()
        service = simulatorService(
            SimulatorOptions(name="gpu1"), TCP4ServerEndpoint(reactor, 0), reactor
        )
        self.assertEqual(service.simulator.options.name, "gpu1")
        waiting = service.whenListening()
        service.startService()
        port = self.successResultOf(waiting)
        self.assertIs(self.successResultOf(service.whenListening()), port)
        [(portNumber, factory, _, _)] = reactor.tcpServers
        self.assertIs(factory.resource, service.simulator.resource())
        self.successResultOf(service.stopService())
        self.assertFalse(service.running)


class MainTests(SynchronousTestCase):
    """
    Tests for the command line.
    """

    def runMain(self, argv: list[str]) -> tuple[int | str | None, str]:
        """
        Run L{main} expecting it to exit.

        @param argv: the arguments.
        @return: the exit code and what was written to stderr.
        """
        stderr = io.StringIO()
        self.patch(sys, "stderr", stderr)
        error = self.assertRaises(SystemExit, main, argv)
        return error.code, stderr.getvalue()

    def test_badSlots(self) -> None:
        """
        C{--slots 0} is a usage error: exit code 2 and a clear message.
        """
        code, err = self.runMain(["--port", "0", "--slots", "0"])
        self.assertEqual(code, 2)
        self.assertIn("ollamamq-sim: error: --slots must be an integer of at least 1, not 0", err)
        self.assertIn("Usage:", err)

    def test_badApi(self) -> None:
        """
        An unknown C{--api} is a usage error.
        """
        code, err = self.runMain(["--api", "bogus"])
        self.assertEqual(code, 2)
        self.assertIn("--api must be one of ollama, openai, llama-server, not 'bogus'", err)

    def test_badNumbers(self) -> None:
        """
        Non-numbers, negative delays and impossible ports are usage errors.
        """
        for argv, message in [
            (["--tps", "fast"], "--tps must be a number, not 'fast'"),
            (["--slots", "1.5"], "--slots must be an integer, not '1.5'"),
            (["--load-delay", "-1"], "--load-delay must be a finite number of at least 0"),
            (["--port", "70000"], "--port must be between 0 and 65535"),
            (["--max-loaded", "0"], "--max-loaded must be an integer of at least 1"),
        ]:
            code, err = self.runMain(argv)
            self.assertEqual(code, 2, argv)
            self.assertIn("ollamamq-sim: error: " + message, err)

    def test_options(self) -> None:
        """
        Every option reaches L{SimulatorOptions}, including C{--version}.
        """
        config = Options()
        config.parseOptions(
            [
                "--port=0", "--api=openai", "--models=a,b", "--tps=5", "--tokens=7",
                "--load-delay=1.5", "--slots=3", "--max-loaded=2", "--name=gpu1",
                "--version=0.5.0", "--no-messages",
            ]
        )
        self.assertEqual(
            config.simulatorOptions,
            SimulatorOptions(
                api="openai", models=("a", "b"), tps=5.0, tokens=7, loadDelay=1.5,
                slots=3, maxLoaded=2, name="gpu1", version="0.5.0", messages=False,
            ),
        )
        self.assertEqual(config["port"], 0)
        config = Options()
        config.parseOptions(["--api=llama-server"])
        self.assertEqual(config.simulatorOptions.api, "llama-server")
        self.assertTrue(config.simulatorOptions.messages)
