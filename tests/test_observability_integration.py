"""
Integration: a real daemon (C{twistd -n ollamamq --log-format json}) in front of a real
simulator, driven by the official clients: queueing headers, token accounting equal to the
simulator's, C{/metrics}, the request log surviving a restart, C{ollamamq-usage}, and one
JSON access line per request.
"""

from __future__ import annotations

import io
import json
import os
from typing import Any

import ollama
import openai
import treq
from prometheus_client.parser import text_string_to_metric_families

from ollamamq.usagecli import main as usageMain
from tests.harness import ProcessTestCase, threaded
from tests.test_integration import CHAT, simStats


def talk(url: str) -> dict[str, Any]:
    """
    One streamed Ollama chat as alice, one OpenAI stream without usage as bob (blocking).
    """
    found: dict[str, Any] = {}
    client = ollama.Client(host=url, headers={"X-User-ID": "alice"})
    found["ollama"] = list(client.chat(model="llama3.2", messages=CHAT, stream=True))
    openaiClient = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0,
                                 default_headers={"X-User-ID": "bob"})
    stream = openaiClient.chat.completions.with_raw_response.create(
        model="llama3.2", messages=CHAT, stream=True)
    found["headers"] = dict(stream.headers)
    found["openai"] = list(stream.parse())
    return found


def usageTable(argv: list[str]) -> str:
    """
    Run C{ollamamq-usage} (blocking).
    """
    out = io.StringIO()
    usageMain(argv, out, {})
    return out.getvalue()


class ObservabilityTests(ProcessTestCase):
    """
    The whole observability surface on real processes.
    """

    async def test_endToEnd(self) -> None:
        """
        Requests through the daemon are accounted as the simulator counted them, show in
        C{/metrics} and C{/proxy/usage}, are still there after a restart, and each left
        one JSON access line.
        """
        simURL, sim = await self.startSimulator("--models", "llama3.2", "--tps", "0",
                                                "--tokens", "7")
        state = os.path.join(self.mktemp() + "-state.db")
        url, proxy = await self.startProxy("--backend", simURL, "--state", state,
                                           "--log-format", "json", backends=1)
        found = await threaded(talk, url)
        # The client that did not ask for usage got none, and every chunk it got parsed.
        self.assertTrue(all(chunk.usage is None for chunk in found["openai"]))
        self.assertTrue(found["headers"]["x-ollamamq-request-id"])
        self.assertEqual(found["headers"]["x-ollamamq-backend"], simURL.split("//")[1])
        self.assertGreaterEqual(int(found["headers"]["x-ollamamq-queue-wait-ms"]), 0)

        counted = [(e["user"], e["promptTokens"], e["tokens"])
                   for e in (await threaded(simStats, simURL))["log"]]
        response = await self.http.get(url + "/proxy/usage?group=user")
        self.assertEqual(response.code, 200)
        totals = {r["user"]: (r["prompt_tokens"], r["completion_tokens"], r["unknown"])
                  for r in json.loads(await treq.content(response))["totals"]}
        self.assertEqual(totals, {user: (p, c, 0) for user, p, c in counted})

        response = await self.http.get(url + "/metrics")
        text = (await treq.content(response)).decode()
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for f in text_string_to_metric_families(text) for s in f.samples}
        for user, prompt, completion in counted:
            key = ("ollamamq_tokens_total",
                   (("kind", "completion"), ("model", "llama3.2:latest"), ("user", user)))
            self.assertEqual(samples[key], completion)
        self.assertEqual(samples[("ollamamq_requests_total",
                                  (("code", "200"), ("route", "/api/chat")))], 1)

        access = [json.loads(line) for line in proxy.output
                  if line.startswith("{") and '"ollamamq.access"' in line]
        self.assertEqual(sorted(a["user"] for a in access), ["alice", "bob"])
        self.assertTrue(all(a["request_id"] and a["duration"] >= 0 for a in access))

        # A restart keeps the log: a new daemon on the same state file has the same totals.
        await proxy.stop()
        url, proxy = await self.startProxy("--backend", simURL, "--state", state, backends=1)
        table = await threaded(usageTable, ["--url", url])
        lines = {line.split()[0]: line.split() for line in table.splitlines()[1:]}
        for user, prompt, completion in counted:
            self.assertEqual(lines[user][1:4], ["1", str(prompt), str(completion)])
        fromFile = await threaded(usageTable, ["--state", state, "--csv"])
        self.assertEqual(len(fromFile.splitlines()), 3)
