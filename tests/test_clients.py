# -*- test-case-name: tests.test_clients -*-
"""
The client matrix: the official C{openai}, C{anthropic} and C{ollama} Python clients,
through a real proxy process, against each kind of backend: the simulator in its Ollama,
OpenAI-only and llama-server-like modes, and a real llama.cpp C{llama-server} serving
Gemma 3 270M (real-backend tests: they skip with the reason when the binary or model is
missing, and fail under C{CI=true}; see L{tests.llama}).

One class per backend kind, all sharing L{ClientMatrix}'s tests; a class sets what its
backend offers (C{embedModel}). Ollama clients on OpenAI-only backends, and Anthropic
clients on backends without Messages, are served by protocol translation
(L{ollamamq.translate}). To add a client or a case, add a test to
L{ClientMatrix}; to add a backend kind, add a class with C{startBackend}.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import anthropic
import ollama
import openai
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults

from tests.harness import ONLINE_LINE, ProcessTestCase, threaded
from tests.llama import GEMMA_MODEL, LlamaServerTestCase

QUESTION = [{"role": "user", "content": "Name one colour of the sky."}]

#: Small answers keep the real-backend tests to seconds.
MAX_TOKENS = 8


def openaiClient(url: str) -> openai.OpenAI:
    """
    An OpenAI client for a proxy (or backend) at C{url}.
    """
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def anthropicClient(url: str) -> anthropic.Anthropic:
    """
    An Anthropic client for a proxy (or backend) at C{url}.
    """
    return anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0, timeout=120)


def openaiSession(url: str, model: str, embedModel: str | None) -> dict[str, Any]:
    """
    Everything the openai client does here, streaming and not (blocking; run in a thread).
    """
    client = openaiClient(url)
    found: dict[str, Any] = {"models": [m.id for m in client.models.list()]}
    found["chat"] = client.chat.completions.create(
        model=model, messages=QUESTION, max_tokens=MAX_TOKENS, temperature=0, seed=1
    )
    stream = client.chat.completions.create(
        model=model, messages=QUESTION, max_tokens=MAX_TOKENS, temperature=0, seed=1,
        stream=True, stream_options={"include_usage": True},
    )
    found["chatChunks"] = list(stream)
    found["completion"] = client.completions.create(
        model=model, prompt="The sky is", max_tokens=MAX_TOKENS, temperature=0, seed=1
    )
    found["completionChunks"] = list(
        client.completions.create(
            model=model, prompt="The sky is", max_tokens=MAX_TOKENS, temperature=0, seed=1,
            stream=True,
        )
    )
    if embedModel is not None:
        found["embedding"] = client.embeddings.create(model=embedModel, input=["one", "two"])
    else:
        try:
            client.embeddings.create(model=model, input="one")
        except openai.APIStatusError as e:
            found["embeddingError"] = e
    return found


def anthropicSession(url: str, model: str) -> dict[str, Any]:
    """
    Everything the anthropic client does here (blocking; run in a thread).
    """
    client = anthropicClient(url)
    found: dict[str, Any] = {}
    found["message"] = client.messages.create(
        model=model, max_tokens=MAX_TOKENS, messages=QUESTION,
        extra_body={"temperature": 0},
    )
    with client.messages.stream(
        model=model, max_tokens=MAX_TOKENS, messages=QUESTION,
        extra_body={"temperature": 0},
    ) as stream:
        found["streamText"] = list(stream.text_stream)
        found["streamFinal"] = stream.get_final_message()
    found["count"] = client.messages.count_tokens(model=model, messages=QUESTION)
    return found


def ollamaSession(url: str, model: str, embedModel: str | None) -> dict[str, Any]:
    """
    The ollama client's chat and generate (streaming and not), embed, list, ps, show and
    version (blocking).
    """
    client = ollama.Client(host=url)
    options = {"num_predict": MAX_TOKENS}
    found: dict[str, Any] = {}
    found["chunks"] = list(client.chat(model=model, messages=QUESTION, stream=True, options=options))
    found["chat"] = client.chat(model=model, messages=QUESTION, options=options)
    found["generate"] = client.generate(model=model, prompt="The sky is", options=options)
    found["generated"] = list(client.generate(model=model, prompt="The sky is", stream=True,
                                              options=options))
    if embedModel is not None:
        found["embed"] = client.embed(model=embedModel, input=["one", "two"])
    found["list"] = [m.model for m in client.list().models]
    found["ps"] = [m.model for m in client.ps().models]
    found["show"] = client.show(model)
    # The Python client has no version call (the CLI's "ollama -v" asks /api/version);
    # its own transport sends it with the client's headers and host handling.
    found["version"] = client._request_raw("GET", "/api/version").json()
    return found


def promptTokens(usage: Any) -> int:
    """
    All the prompt tokens of an Anthropic C{usage}: fresh and read from the cache.
    """
    return usage.input_tokens + (getattr(usage, "cache_read_input_tokens", None) or 0)


class ClientMatrix:
    """
    The client tests every backend kind runs. Mixed into a L{ProcessTestCase}.

    @cvar model: the model the backend serves (as clients name it).
    @cvar embedModel: a model to embed with, or L{None} when the backend offers none
        (llama-server without C{--embeddings}): then the proxy must relay its refusal.
    """

    model = GEMMA_MODEL
    embedModel: str | None = "nomic-embed-text"

    async def startBackend(self) -> str:
        """
        Start the backend; return its URL.
        """
        raise NotImplementedError()

    async def startStack(self) -> str:
        """
        Start the backend and a proxy in front of it (no slots configured); return the
        proxy's URL once the backend is online there.
        """
        self.backendURL = await self.startBackend()
        url, self.proxy = await self.startProxy("--backend", self.backendURL, backends=1)  # type: ignore[attr-defined]
        return url

    async def test_openai(self) -> None:
        """
        The openai client lists the model, and completes chat and completions, streaming
        and not, with usage; embeddings work where the backend offers them, and where it
        does not, its refusal reaches the client as a clean API error.
        """
        url = await self.startStack()
        found = await threaded(openaiSession, url, self.model, self.embedModel)
        t: Any = self
        # An Ollama backend lists the model with its tag.
        t.assertTrue({self.model, self.model + ":latest"} & set(found["models"]), found["models"])
        chat = found["chat"]
        t.assertTrue(chat.choices[0].message.content)
        t.assertIn(chat.choices[0].finish_reason, ("stop", "length"))
        t.assertGreater(chat.usage.prompt_tokens, 0)
        t.assertGreater(chat.usage.completion_tokens, 0)
        t.assertLessEqual(chat.usage.completion_tokens, MAX_TOKENS)
        chunks = found["chatChunks"]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        t.assertTrue(text)
        t.assertGreater(len(chunks), 2)
        usage = chunks[-1].usage
        t.assertEqual(usage.prompt_tokens, chat.usage.prompt_tokens)
        t.assertGreater(usage.completion_tokens, 0)
        completion = found["completion"]
        t.assertTrue(completion.choices[0].text)
        t.assertGreater(completion.usage.completion_tokens, 0)
        t.assertTrue("".join(c.choices[0].text for c in found["completionChunks"] if c.choices))
        if self.embedModel is not None:
            t.assertEqual(len(found["embedding"].data), 2)
            t.assertGreater(len(found["embedding"].data[0].embedding), 0)
        else:
            error = found["embeddingError"]
            t.assertGreaterEqual(error.status_code, 400)
            t.assertLess(error.status_code, 600)

    async def test_anthropic(self) -> None:
        """
        The anthropic client completes a message, a streamed message (text deltas, a
        final message with usage) and a token count.
        """
        url = await self.startStack()
        found = await threaded(anthropicSession, url, self.model)
        t: Any = self
        message = found["message"]
        t.assertEqual(message.type, "message")
        t.assertTrue(message.content[0].text)
        t.assertIn(message.stop_reason, ("end_turn", "max_tokens"))
        t.assertGreater(message.usage.input_tokens, 0)
        t.assertGreater(message.usage.output_tokens, 0)
        t.assertTrue("".join(found["streamText"]))
        final = found["streamFinal"]
        t.assertGreater(final.usage.output_tokens, 0)
        # llama-server counts prompt tokens it found in its cache apart (as Anthropic does).
        t.assertEqual(promptTokens(final.usage), promptTokens(message.usage))
        t.assertGreater(found["count"].input_tokens, 0)

    async def test_ollama(self) -> None:
        """
        The ollama client streams a chat ending with C{done} and real counts, chats and
        generates (streaming and not), embeds where the backend offers it, and lists,
        shows and versions the model; C{ps} lists the model used last.
        """
        url = await self.startStack()
        found = await threaded(ollamaSession, url, self.model, self.embedModel)
        t: Any = self
        chunks = found["chunks"]
        t.assertTrue(all(not c.done for c in chunks[:-1]))
        t.assertTrue(chunks[-1].done)
        t.assertIn(chunks[-1].done_reason, ("stop", "length"))
        t.assertGreater(chunks[-1].eval_count, 0)
        t.assertLessEqual(chunks[-1].eval_count, MAX_TOKENS)
        t.assertGreater(chunks[-1].prompt_eval_count, 0)
        t.assertTrue("".join(c.message.content for c in chunks))
        t.assertTrue(found["chat"].message.content)
        t.assertGreater(found["chat"].eval_count, 0)
        t.assertTrue(found["generate"].response)
        t.assertGreater(found["generate"].eval_count, 0)
        t.assertTrue(found["generated"][-1].done)
        t.assertTrue("".join(g.response for g in found["generated"]))
        if self.embedModel is not None:
            t.assertEqual(len(found["embed"].embeddings), 2)
            t.assertGreater(len(found["embed"].embeddings[0]), 0)
        t.assertTrue(any(name.startswith(self.model) for name in found["list"]))
        # The last model used is in memory (a simulator may have evicted the first).
        lastUsed = self.embedModel or self.model
        t.assertTrue(any(name.startswith(lastUsed) for name in found["ps"]), found["ps"])
        t.assertTrue(found["show"].details)
        t.assertIn("version", found["version"])


class OllamaSimulatorClients(ClientMatrix, ProcessTestCase):
    """
    The clients against the simulator in its Ollama mode.
    """

    async def startBackend(self) -> str:
        # Ollama serves /v1/messages from 0.14 on, and the proxy goes by the version.
        url, _ = await self.startSimulator(
            "--models", f"{self.model},nomic-embed-text", "--tps", "0", "--tokens", "6",
            "--version", "0.14.0",
        )
        return url


class OpenAISimulatorClients(ClientMatrix, ProcessTestCase):
    """
    The clients against the simulator in its OpenAI-only mode (vLLM-like): Ollama and
    Anthropic clients are served by translation.
    """

    async def startBackend(self) -> str:
        url, _ = await self.startSimulator(
            "--api", "openai", "--models", f"{self.model},nomic-embed-text", "--tps", "0",
            "--tokens", "6",
        )
        return url


class LlamaServerSimulatorClients(ClientMatrix, ProcessTestCase):
    """
    The clients against the simulator in its llama-server-like mode: two slots, a model
    that loads for a moment at startup.
    """

    async def startBackend(self) -> str:
        url, _ = await self.startSimulator(
            "--api", "llama-server", "--models", f"{self.model},nomic-embed-text",
            "--tps", "20", "--tokens", "6", "--slots", "2", "--load-delay", "0.5",
        )
        return url

    async def test_slotsFromProps(self) -> None:
        """
        A llama-server still loading its model (503 "Loading model") is busy, not down:
        the proxy says it is loading, never that it is suspect or offline, and takes it
        online once loaded. With no slots configured it takes the backend's C{/props}
        C{total_slots} (2), and two requests then run on it at once.
        """
        self.backendURL, _ = await self.startSimulator(
            "--api", "llama-server", "--models", self.model, "--tps", "20", "--tokens", "6",
            "--slots", "2", "--load-delay", "6",
        )
        url, proxy = await self.startProxy("--backend", self.backendURL)
        await proxy.waitFor(r"Backend \S+ \(\S+\) is loading its model")
        await proxy.waitFor(ONLINE_LINE)
        self.assertFalse([line for line in proxy.output if "suspect" in line or "offline" in line])
        status = await self.getStatus(url)
        [backend] = status["backends"]
        self.assertEqual((backend["slots"], backend["server"]), (2, "llama-server"))
        client = openaiClient(url)

        def ask() -> Any:
            return client.chat.completions.create(model=self.model, messages=QUESTION)

        await gatherResults([threaded(ask), threaded(ask)])
        stats = await self.getStats()
        self.assertEqual((stats["completed"], stats["maxConcurrent"]), (2, 2))

    async def getStatus(self, url: str) -> Any:
        """
        The proxy's C{/proxy/status}.
        """
        response = await self.http.get(url + "/proxy/status")
        return json.loads(await treq.content(response))

    async def getStats(self) -> Any:
        """
        The simulator's C{/sim/stats}.
        """
        response = await self.http.get(self.backendURL + "/sim/stats")
        return json.loads(await treq.content(response))


class LlamaServerClients(ClientMatrix, LlamaServerTestCase):
    """
    The clients against a real llama-server (real-backend tests).
    """

    embedModel = None

    async def startBackend(self) -> str:
        url, self.llama = await self.startLlamaServer(slots=2)
        return url

    async def test_usageMatches(self) -> None:
        """
        Through the proxy, the answer and its usage are exactly what llama-server itself
        reports for the same deterministic request (temperature 0, fixed seed), for
        OpenAI chat (streamed too) and Anthropic messages.
        """
        url = await self.startStack()

        def both(target: str) -> dict[str, Any]:
            client = openaiClient(target)
            chat = client.chat.completions.create(
                model=self.model, messages=QUESTION, max_tokens=MAX_TOKENS, temperature=0, seed=1
            )
            chunks = list(
                client.chat.completions.create(
                    model=self.model, messages=QUESTION, max_tokens=MAX_TOKENS, temperature=0,
                    seed=1, stream=True, stream_options={"include_usage": True},
                )
            )
            message = anthropicClient(target).messages.create(
                model=self.model, max_tokens=MAX_TOKENS, messages=QUESTION,
                extra_body={"temperature": 0},
            )
            return {
                "chat": (chat.choices[0].message.content, chat.usage.prompt_tokens,
                         chat.usage.completion_tokens),
                "stream": (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens),
                "messages": (message.content[0].text, message.usage.input_tokens,
                             message.usage.output_tokens),
            }

        direct = await threaded(both, self.backendURL)
        proxied = await threaded(both, url)
        self.assertEqual(proxied, direct)
        self.assertGreater(direct["chat"][2], 0)

    async def test_ollamaUsageMatches(self) -> None:
        """
        The ollama client, translated, gets what llama-server itself answers the same
        deterministic request: the same text, C{eval_count} its completion tokens,
        C{prompt_eval_count} its prompt tokens, streamed and not.
        """
        url = await self.startStack()
        options = {"num_predict": MAX_TOKENS, "temperature": 0, "seed": 1}

        def ask() -> dict[str, Any]:
            direct = openaiClient(self.backendURL).chat.completions.create(
                model=self.model, messages=QUESTION, max_tokens=MAX_TOKENS, temperature=0, seed=1)
            client = ollama.Client(host=url)
            chunks = list(client.chat(model=self.model, messages=QUESTION, stream=True,
                                      options=options))
            whole = client.chat(model=self.model, messages=QUESTION, options=options)
            return {"direct": direct, "chunks": chunks, "whole": whole}

        found = await threaded(ask)
        direct, chunks, whole = found["direct"], found["chunks"], found["whole"]
        text = direct.choices[0].message.content
        self.assertEqual("".join(c.message.content for c in chunks), text)
        self.assertEqual(whole.message.content, text)
        for final in (chunks[-1], whole):
            self.assertTrue(final.done)
            self.assertEqual(final.eval_count, direct.usage.completion_tokens)
            self.assertEqual(final.prompt_eval_count, direct.usage.prompt_tokens)
            self.assertEqual(final.done_reason, direct.choices[0].finish_reason)

    async def test_twoAtOnce(self) -> None:
        """
        With no slots configured the proxy reads llama-server's two slots from C{/props},
        and two streaming requests then run on it at once: while both streams are open,
        llama-server's own C{/slots} shows both slots processing.
        """
        url = await self.startStack()
        status = await self.getJSON(url + "/proxy/status")
        [backend] = status["backends"]
        self.assertEqual((backend["slots"], backend["server"]), (2, "llama-server"))

        release = threading.Event()
        started = [Deferred(), Deferred()]

        def streamOne(index: int) -> str:
            stream = openaiClient(url).chat.completions.create(
                model=self.model, messages=QUESTION, max_tokens=256, stream=True,
                extra_body={"ignore_eos": True},
            )
            try:
                first = next(iter(stream))
            except Exception as e:
                reactor.callFromThread(started[index].errback, e)
                raise
            else:
                reactor.callFromThread(started[index].callback, None)
                release.wait(120)
                return first.id
            finally:
                stream.close()

        try:
            streams = [threaded(streamOne, 0), threaded(streamOne, 1)]
            await gatherResults(started)
            slots = await self.getJSON(self.backendURL + "/slots")
            processing = [s for s in slots if s.get("is_processing")]
            proxyStatus = await self.getJSON(url + "/proxy/status")
        finally:
            release.set()
        await gatherResults(streams)
        self.assertEqual(len(processing), 2, slots)
        self.assertEqual(proxyStatus["backends"][0]["active"], 2)
