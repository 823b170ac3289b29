"""
Integration tests: real C{ollamamq-sim} and C{twistd -n ollamamq} processes on 127.0.0.1,
driven by the official C{ollama} and C{openai} Python clients.
"""

from __future__ import annotations

import http.client
import json
import re
from typing import Any
from urllib.parse import urlsplit
from urllib.request import urlopen

import ollama
import openai
import treq
from twisted.internet.defer import ensureDeferred

from tests.harness import ProcessTestCase, threaded

CHAT = [{"role": "user", "content": "Why is the sky blue?"}]


def simStats(url: str) -> dict:
    """
    A simulator's counters and request log (blocking; call in a thread).
    """
    with urlopen(url + "/sim/stats", timeout=10) as response:
        return json.loads(response.read())


def ollamaConversation(url: str, simURL: str | None, user: str) -> dict[str, Any]:
    """
    Streaming chat, non-streaming generate and an embedding through the official ollama
    client (blocking; call in a thread). Records the backend's state at the first token.
    """
    client = ollama.Client(host=url, headers={"X-User-ID": user})
    found: dict[str, Any] = {"chunks": []}
    for part in client.chat(model="llama3.2", messages=CHAT, stream=True):
        if not found["chunks"] and simURL is not None:
            found["atFirstChunk"] = simStats(simURL)
        found["chunks"].append(part)
    found["generate"] = client.generate(model="llama3.2", prompt="Hello", stream=False)
    found["embed"] = client.embed(model="nomic-embed-text", input=["one", "two"])
    return found


def openaiConversation(url: str, user: str) -> dict[str, Any]:
    """
    Streaming chat and an embedding through the official openai client (blocking).
    """
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused",
                           default_headers={"X-User-ID": user}, max_retries=0)
    found: dict[str, Any] = {}
    stream = client.chat.completions.create(model="llama3.2", messages=CHAT, stream=True)
    found["deltas"] = [c.choices[0].delta.content for c in stream if c.choices]
    found["embedding"] = client.embeddings.create(model="nomic-embed-text", input="hello")
    return found


class ClientTests(ProcessTestCase):
    """
    The official clients, through the proxy, against simulator processes and --demo.
    """

    def checkOllama(self, found: dict[str, Any]) -> None:
        """
        The ollama client's answers are complete and well-formed.
        """
        chunks = found["chunks"]
        self.assertGreater(len(chunks), 5)
        self.assertTrue(chunks[-1].done)
        self.assertTrue("".join(c.message.content for c in chunks).strip())
        self.assertTrue(found["generate"].response)
        self.assertGreater(found["generate"].eval_count, 0)
        self.assertEqual(len(found["embed"].embeddings), 2)

    def checkOpenAI(self, found: dict[str, Any]) -> None:
        """
        The openai client's answers are complete and well-formed.
        """
        self.assertGreater(len([d for d in found["deltas"] if d]), 5)
        self.assertEqual(len(found["embedding"].data), 1)
        self.assertGreater(len(found["embedding"].data[0].embedding), 0)

    async def test_againstSimulator(self) -> None:
        """
        Against an ollamamq-sim process at 10 tokens/s: both clients complete; the first
        chunk arrives while the backend is still generating; the user header reaches the
        backend and the backend's header reaches the client.
        """
        simURL, sim = await self.startSimulator(
            "--models", "llama3.2,nomic-embed-text", "--tps", "10", "--tokens", "20",
            "--slots", "2", "--name", "sim-a",
        )
        url, proxy = await self.startProxy("--backend", simURL, backends=1)
        found = await threaded(ollamaConversation, url, simURL, "alice")
        self.checkOllama(found)
        # Streaming is real: at the first chunk the backend was still mid-answer.
        running = [e for e in found["atFirstChunk"]["log"] if e["status"] == "running"]
        self.assertEqual(len(running), 1)
        self.assertEqual(len(found["chunks"]), 21)
        self.checkOpenAI(await threaded(openaiConversation, url, "bob"))
        users = {e["user"] for e in (await threaded(simStats, simURL))["log"]}
        self.assertEqual(users, {"alice", "bob"})
        response = await self.http.get(url + "/api/version")
        await treq.content(response)
        response = await self.http.post(url + "/api/generate", json.dumps(
            {"model": "llama3.2", "prompt": "x", "stream": False}).encode())
        await treq.content(response)
        self.assertEqual(response.headers.getRawHeaders(b"x-sim-backend"), [b"sim-a"])

    async def test_demo(self) -> None:
        """
        With --demo alone, both clients complete streaming chat, generate and embeddings.
        """
        url, proxy = await self.startProxy("--demo", backends=2)
        self.checkOllama(await threaded(ollamaConversation, url, None, "alice"))
        self.checkOpenAI(await threaded(openaiConversation, url, "bob"))

    async def test_disconnectMidStream(self) -> None:
        """
        A client that hangs up mid-stream makes the proxy close the backend request: the
        simulator records it as cancelled.
        """
        simURL, sim = await self.startSimulator("--models", "llama3.2", "--tps", "10",
                                                "--tokens", "100")
        url, proxy = await self.startProxy("--backend", simURL, backends=1)

        def readOneLineAndHangUp() -> bytes:
            parts = urlsplit(url)
            connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
            body = json.dumps({"model": "llama3.2", "messages": CHAT})
            connection.request("POST", "/api/chat", body, {"X-User-ID": "carol"})
            response = connection.getresponse()
            line = response.readline()
            connection.sock.close()
            connection.close()
            return line

        first = await threaded(readOneLineAndHangUp)
        self.assertFalse(json.loads(first)["done"])
        await sim.waitFor(r"request \d+ /api/chat user=carol cancelled")


class FairnessTests(ProcessTestCase):
    """
    The scheduler end to end: one simulator with one slot, two users.
    """

    async def test_interleaving(self) -> None:
        """
        Alice queues 4 requests, then Bob 1: Bob's runs second, not after Alice's backlog.
        """
        # Each request runs for a second: long enough that Bob is queued while Alice's
        # first one still runs, even on a loaded machine.
        simURL, sim = await self.startSimulator("--models", "llama3.2", "--tps", "50",
                                                "--tokens", "50", "--slots", "1")
        url, proxy = await self.startProxy("--backend", simURL, backends=1)

        def generate(user: str) -> str:
            client = ollama.Client(host=url, headers={"X-User-ID": user})
            return client.generate(model="llama3.2", prompt="x", stream=False).response

        alice = [threaded(generate, "alice") for _ in range(4)]
        await self.untilStatus(url, lambda s: _user(s, "alice").get("queued") == 3)
        bob = threaded(generate, "bob")
        await self.untilStatus(url, lambda s: _user(s, "bob").get("queued") == 1)
        for d in alice + [bob]:
            self.assertTrue(await d)
        started = [m.group(1) for m in map(
            re.compile(r"request \d+ /api/generate user=(\S+) started").search, sim.output) if m]
        self.assertEqual(started, ["alice", "bob", "alice", "alice", "alice"])

    async def untilStatus(self, url: str, predicate: Any) -> None:
        """
        Ask C{/proxy/status} until C{predicate(status)} holds (each ask is a round trip,
        bounded by the test timeout).
        """
        while True:
            response = await self.http.get(url + "/proxy/status")
            if predicate(json.loads(await treq.content(response))):
                return


def _user(status: dict, user: str) -> dict:
    for entry in status["users"]:
        if entry["id"] == user:
            return entry
    return {}


class PoolTests(ProcessTestCase):
    """
    Three simulators: two Ollama with different models, one OpenAI-only.
    """

    async def test_routingFailoverAndRecovery(self) -> None:
        """
        Requests reach only backends with the model; two one-slot backends with the same
        model run two requests at once; killing one fails over without a client error;
        restarting it brings traffic back; /api/tags answers while every slot is busy.
        """
        aURL, a = await self.startSimulator("--models", "llama3.2,qwen2.5", "--name", "a",
                                            "--tps", "20", "--tokens", "20",
                                            "--load-delay", "2", "--max-loaded", "1")
        bURL, b = await self.startSimulator("--models", "llama3.2,mistral", "--name", "b",
                                            "--tps", "20", "--tokens", "20")
        cURL, c = await self.startSimulator("--api", "openai", "--models", "gpt-oss",
                                            "--name", "c", "--tps", "20", "--tokens", "20")
        url, proxy = await self.startProxy("--backend", aURL, "--backend", bURL,
                                           "--backend", cURL, "--health-interval", "2",
                                           backends=3)

        async def post(path: str, body: dict, user: str = "u") -> tuple[int, bytes, Any]:
            response = await self.http.post(url + path, json.dumps(body).encode(),
                                       headers={"X-User-ID": user})
            return response.code, await treq.content(response), response

        def served(response: Any) -> str:
            return response.headers.getRawHeaders(b"x-sim-backend")[0].decode()

        qwen = await post("/api/generate", {"model": "qwen2.5", "prompt": "x", "stream": False})
        mistral = await post("/api/generate", {"model": "mistral", "prompt": "x", "stream": False})
        gpt = await post("/v1/chat/completions", {"model": "gpt-oss", "messages": CHAT})
        self.assertEqual([served(r[2]) for r in (qwen, mistral, gpt)], ["a", "b", "c"])
        # Only the OpenAI-only backend has gpt-oss: an Ollama chat for it is translated.
        native = await post("/api/chat", {"model": "gpt-oss", "messages": CHAT})
        self.assertEqual((native[0], served(native[2])), (200, "c"))
        self.assertTrue(json.loads(native[1].splitlines()[-1])["done"])

        # Two one-slot backends share llama3.2: two requests run at once, while the
        # aggregated /api/tags still answers. (keep_alive 0: a unloads the model after.)
        once = {"model": "llama3.2", "prompt": "x", "stream": False, "keep_alive": 0}
        both = [ensureDeferred(post("/api/generate", once, user=f"p{i}")) for i in range(2)]
        await a.waitFor(r"request \d+ /api/generate user=p\d started")
        await b.waitFor(r"request \d+ /api/generate user=p\d started")
        tagsResponse = await self.http.get(url + "/api/tags")
        names = {m["name"] for m in json.loads(await treq.content(tagsResponse))["models"]}
        self.assertEqual(names, {"llama3.2:latest", "qwen2.5:latest", "mistral:latest", "gpt-oss"})
        self.assertEqual(sorted([(await d)[0] for d in both]), [200, 200])
        spans = []
        for simURL in (aURL, bURL):
            log = (await threaded(simStats, simURL))["log"]
            spans += [(e["startedAt"], e["finishedAt"]) for e in log if e["user"] in ("p0", "p1")]
        self.assertEqual(len(spans), 2)
        (start1, end1), (start2, end2) = spans
        self.assertTrue(start1 < end2 and start2 < end1, f"not concurrent: {spans}")

        # Kill a mid-run, while its request waits for the model to load (a has a load
        # delay): that request fails over to b before its first byte, and so does every
        # new llama3.2 request. No client sees an error.
        streams = [ensureDeferred(post("/api/generate", {"model": "llama3.2", "prompt": "x",
                                                          "options": {"num_predict": 40}},
                                       user=f"s{i}")) for i in range(2)]
        await a.waitFor(r"user=s\d started")
        await b.waitFor(r"user=s\d started")
        aPort = urlsplit(aURL).port
        a.transport.signalProcess("KILL")
        await a.ended
        fresh = [ensureDeferred(post("/api/generate", {"model": "llama3.2", "prompt": "x",
                                                        "stream": False}, user=f"n{i}"))
                 for i in range(3)]
        results = [await d for d in fresh]
        self.assertEqual([(r[0], served(r[2])) for r in results], [(200, "b")] * 3)
        for code, body, response in [await d for d in streams]:
            self.assertEqual((code, served(response)), (200, "b"))
            self.assertTrue(json.loads(body.splitlines()[-1])["done"])
        await proxy.waitFor(r"; failing over")

        # Restart a on its port: the next probe brings it back and traffic returns.
        aURL2, a2 = await self.startSimulator("--models", "llama3.2,qwen2.5", "--name", "a",
                                              port=aPort)
        await proxy.waitUntil(lambda lines: sum(f"({aURL})" in l and "is online" in l
                                                for l in lines) >= 2)
        qwen = await post("/api/generate", {"model": "qwen2.5", "prompt": "x", "stream": False})
        self.assertEqual((qwen[0], served(qwen[2])), (200, "a"))
