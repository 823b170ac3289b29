"""
The client matrix for translated requests: the official C{ollama} client (chat, generate,
embed, list, ps, show, version) and the C{anthropic} client (messages, streaming,
count_tokens) through a real proxy process to backends that speak only OpenAI: an
C{ollamamq-sim --api openai} process, and the real llama-server when it is built (see
L{tests.real_backend}).
"""

from __future__ import annotations

from typing import Any

import anthropic
import ollama

from tests.harness import ProcessTestCase, threaded
from tests.real_backend import RealBackendMixin

CHAT = [{"role": "user", "content": "Say hello in one short sentence."}]


def ollamaMatrix(url: str, model: str, embedModel: str | None) -> dict[str, Any]:
    """
    Every Ollama client call of the matrix (blocking; call in a thread).
    """
    client = ollama.Client(host=url, headers={"X-User-ID": "ollama-user"})
    found: dict[str, Any] = {}
    found["chunks"] = list(client.chat(model=model, messages=CHAT, stream=True,
                                       options={"num_predict": 24, "temperature": 0}))
    found["chat"] = client.chat(model=model, messages=CHAT, stream=False,
                                options={"num_predict": 24, "temperature": 0})
    found["generate"] = client.generate(model=model, prompt="The sky is", stream=False,
                                        options={"num_predict": 12})
    found["generated"] = list(client.generate(model=model, prompt="The sky is", stream=True,
                                              options={"num_predict": 12}))
    if embedModel is not None:
        found["embed"] = client.embed(model=embedModel, input=["one", "two"])
    found["list"] = client.list()
    found["ps"] = client.ps()
    found["show"] = client.show(model)
    # The Python client has no version call (the CLI's "ollama -v" asks /api/version);
    # its own transport sends it with the client's headers and host handling.
    found["version"] = client._request_raw("GET", "/api/version").json()
    return found


def anthropicMatrix(url: str, model: str) -> dict[str, Any]:
    """
    Every Anthropic client call of the matrix (blocking; call in a thread).
    """
    client = anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0,
                                 default_headers={"X-User-ID": "anthropic-user"})
    found: dict[str, Any] = {}
    found["message"] = client.messages.create(model=model, max_tokens=24, messages=CHAT)
    with client.messages.stream(model=model, max_tokens=24, messages=CHAT) as stream:
        found["texts"] = list(stream.text_stream)
        found["final"] = stream.get_final_message()
    found["count"] = client.messages.count_tokens(model=model, messages=CHAT)
    return found


class MatrixChecks:
    """
    What every backend of the matrix must give each client.
    """

    def checkOllama(self, found: dict[str, Any], model: str, embed: bool = True) -> None:
        """
        Real text streamed, ending with C{done} and real counts; the aggregated calls
        answer with the fields the client reads.
        """
        chunks = found["chunks"]
        self.assertGreater(len(chunks), 2)
        self.assertTrue(all(not c.done for c in chunks[:-1]))
        self.assertTrue(chunks[-1].done)
        self.assertIn(chunks[-1].done_reason, ("stop", "length"))
        self.assertTrue("".join(c.message.content for c in chunks).strip())
        self.assertGreater(chunks[-1].eval_count, 0)
        self.assertGreater(chunks[-1].prompt_eval_count, 0)
        self.assertTrue(found["chat"].message.content.strip())
        self.assertGreater(found["chat"].eval_count, 0)
        self.assertTrue(found["generate"].response)
        self.assertGreater(found["generate"].eval_count, 0)
        self.assertTrue(found["generated"][-1].done)
        self.assertTrue("".join(g.response for g in found["generated"]))
        if embed:
            self.assertEqual(len(found["embed"].embeddings), 2)
            self.assertGreater(len(found["embed"].embeddings[0]), 0)
        self.assertIn(model, [m.model for m in found["list"].models])
        self.assertIn(model, [m.model for m in found["ps"].models])
        self.assertIn("completion", found["show"].capabilities)
        self.assertIsNotNone(found["show"].modelinfo)
        self.assertTrue(found["version"]["version"])

    def checkAnthropic(self, found: dict[str, Any]) -> None:
        """
        A whole message, a stream of text ending in a final message with usage, and a
        token count.
        """
        message = found["message"]
        self.assertEqual(message.role, "assistant")
        self.assertTrue(message.content[0].text.strip())
        self.assertIn(message.stop_reason, ("end_turn", "max_tokens"))
        self.assertGreater(message.usage.output_tokens, 0)
        self.assertGreater(message.usage.input_tokens, 0)
        self.assertGreater(len(found["texts"]), 1)
        self.assertEqual("".join(found["texts"]), found["final"].content[0].text)
        self.assertGreater(found["final"].usage.output_tokens, 0)
        self.assertGreater(found["count"].input_tokens, 0)


class SimulatorMatrixTests(MatrixChecks, ProcessTestCase):
    """
    The matrix against an OpenAI-only simulator process.
    """

    async def test_ollamaClient(self) -> None:
        """
        The ollama client's calls all succeed on an OpenAI-only backend.
        """
        simURL, sim = await self.startSimulator("--api", "openai", "--models",
                                                "llama3.2,nomic-embed-text", "--tps", "50",
                                                "--tokens", "10", "--slots", "2")
        url, proxy = await self.startProxy("--backend", simURL, backends=1)
        found = await threaded(ollamaMatrix, url, "llama3.2", "nomic-embed-text")
        self.checkOllama(found, "llama3.2")
        await sim.waitFor(r"request \d+ /v1/chat/completions user=ollama-user")
        await sim.waitFor(r"request \d+ /v1/embeddings user=ollama-user")

    async def test_anthropicClient(self) -> None:
        """
        The anthropic client's calls all succeed on a backend without a Messages route.
        """
        simURL, sim = await self.startSimulator("--api", "openai", "--models", "llama3.2",
                                                "--tps", "50", "--tokens", "10")
        url, proxy = await self.startProxy("--backend", simURL, backends=1)
        self.checkAnthropic(await threaded(anthropicMatrix, url, "llama3.2"))


class RealBackendMatrixTests(MatrixChecks, RealBackendMixin, ProcessTestCase):
    """
    The matrix against the real llama-server serving Gemma 3 270M (skipped, saying
    why, when it is not built).
    """

    async def test_ollamaClient(self) -> None:
        """
        With only llama-server behind the proxy, the ollama client streams real text
        ending with C{done} and llama-server's own token counts.
        """
        serverURL, model = await self.startRealBackend()
        url, proxy = await self.startProxy("--backend", serverURL, backends=1)
        found = await threaded(ollamaMatrix, url, model, None)
        self.checkOllama(found, model, embed=False)

    async def test_anthropicClient(self) -> None:
        """
        With only llama-server behind the proxy, the anthropic client completes.
        """
        serverURL, model = await self.startRealBackend()
        url, proxy = await self.startProxy("--backend", serverURL, backends=1)
        self.checkAnthropic(await threaded(anthropicMatrix, url, model))
