"""
Integration tests of the failure model and the timeouts with real processes: the only
backend dies and comes back (or does not) while requests wait; a generation slower than
the idle timeout.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlsplit

import treq
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import deferLater

from tests.harness import ProcessTestCase

#: How long the backend is gone in the outage test: the scenario, not a wait for state.
DOWNTIME = 2.0


class OutageTests(ProcessTestCase):
    """
    One simulator with one slot behind the proxy, killed while eight requests wait.
    """

    def config(self, **server: Any) -> str:
        """
        A config file with these C{[server]} settings.
        """
        path = self.mktemp()
        lines = ["[server]"] + [f"{key} = {json.dumps(value)}" for key, value in server.items()]
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        return path

    async def post(self, url: str, user: str) -> tuple[int, bytes, Any]:
        response = await self.http.post(
            url + "/api/generate",
            json.dumps({"model": "llama3.2", "prompt": "x", "stream": False}).encode(),
            headers={"X-User-ID": user},
        )
        return response.code, await treq.content(response), response

    async def outage(self, grace: float) -> tuple[str, Any, list[Any], str, int]:
        """
        Start the simulator and the proxy, queue eight requests, and kill the simulator
        while the first of them runs.

        @return: the simulator's URL and port, the requests' Deferreds, the proxy.
        """
        simURL, sim = await self.startSimulator("--models", "llama3.2", "--name", "only",
                                                "--tps", "20", "--tokens", "10")
        url, proxy = await self.startProxy(
            "--backend", simURL, "--config",
            self.config(health_interval=0.5, down_grace=grace, down_after=3), backends=1)
        requests = [ensureDeferred(self.post(url, f"u{i}")) for i in range(8)]
        await sim.waitFor(r"request \d+ /api/generate user=u\d started")
        sim.transport.signalProcess("KILL")
        await sim.ended
        return simURL, proxy, requests, url, urlsplit(simURL).port

    async def test_backendComesBack(self) -> None:
        """
        The only backend killed while eight requests wait, and started again on its port
        two seconds later: every request completes with 200; the proxy saw the backend go
        suspect and come back, and never answered anyone with an error.
        """
        simURL, proxy, requests, url, port = await self.outage(grace=20)
        await proxy.waitFor(r"Backend \S+ \(\S+\) is (suspect|offline)")
        await deferLater(reactor, DOWNTIME, lambda: None)
        await self.startSimulator("--models", "llama3.2", "--name", "only", "--tps", "20",
                                  "--tokens", "10", port=port)
        results = [await d for d in requests]
        self.assertEqual([code for code, _, _ in results], [200] * 8)
        for _, body, _ in results:
            self.assertTrue(json.loads(body)["done"])

    async def test_backendStaysAway(self) -> None:
        """
        With the backend gone longer than the grace, each waiting request gets a shaped
        503 with Retry-After.
        """
        simURL, proxy, requests, url, port = await self.outage(grace=2)
        results = [await d for d in requests]
        for code, body, response in results:
            self.assertEqual(code, 503)
            self.assertIn("error", json.loads(body))
            self.assertTrue(response.headers.getRawHeaders(b"retry-after"))
            self.assertNotIn(simURL.encode(), body)


class TimeoutTests(ProcessTestCase):
    """
    The idle timeout does not bound the wait for a first byte.
    """

    async def test_slowNonStreamingGeneration(self) -> None:
        """
        With C{timeout = 1}, a non-streaming generation that takes three seconds (the
        backend sends nothing until it is done) succeeds.
        """
        simURL, _ = await self.startSimulator("--models", "llama3.2", "--tps", "2",
                                              "--tokens", "6")
        url, _ = await self.startProxy("--backend", simURL, "--timeout", "1", backends=1)
        response = await self.http.post(
            url + "/api/generate",
            json.dumps({"model": "llama3.2", "prompt": "x", "stream": False}).encode(),
        )
        body = json.loads(await treq.content(response))
        self.assertEqual(response.code, 200)
        self.assertTrue(body["done"])
        self.assertEqual(body["eval_count"], 6)
