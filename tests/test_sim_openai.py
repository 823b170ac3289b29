# -*- test-case-name: tests.test_sim_openai -*-
"""
Tests for L{ollamamq.sim.openai} beyond the OpenAI routes themselves (those are in
L{tests.test_sim}): the llama-server-like mode's C{/health} and C{/props}.
"""

from __future__ import annotations

import json

from tests.test_sim import SimulatorTestCase

CHAT = {"model": "gemma3", "messages": [{"role": "user", "content": "hi"}], "stream": False}

LOADING = {"error": {"message": "Loading model", "type": "unavailable_error", "code": 503}}


class LlamaServerTests(SimulatorTestCase):
    """
    C{api="llama-server"}.
    """

    def setUp(self) -> None:
        """
        A llama-server-like simulator with two slots whose model takes 5 seconds to load.
        """
        self.makeSimulator(api="llama-server", models=("gemma3",), slots=2, loadDelay=5)

    def test_loading(self) -> None:
        """
        While the model loads, C{/health}, C{/props}, C{/v1/models} and work routes all
        answer 503 C{"Loading model"} as llama-server does; the test hooks still work.
        """
        for path in ("/health", "/props", "/v1/models"):
            response, body = self.get(path)
            self.assertEqual((response.code, json.loads(body)), (503, LOADING), path)
        response, body = self.postNow("/v1/chat/completions", CHAT)
        self.assertEqual((response.code, body), (503, LOADING))
        self.assertEqual(self.getJSON("/sim/stats")["requests"], 0)

    def test_loaded(self) -> None:
        """
        Once loaded, C{/health} answers 200 C{{"status": "ok"}} and requests start
        without a load delay; the model stays loaded for good, whatever the keep-alive.
        """
        self.advance(5)
        self.assertEqual(self.getJSON("/health"), {"status": "ok"})
        d = self.post("/v1/chat/completions", {**CHAT, "keep_alive": 0})
        response, body = self.finish(d, 3)
        self.assertEqual(response.code, 200)
        self.assertEqual(json.loads(body)["usage"]["completion_tokens"], 3)
        self.advance(10000)
        self.assertEqual(self.simulator.stats["loaded"], ["gemma3"])
        self.assertEqual(self.simulator.stats["log"][0]["startedAt"], 5.0)

    def test_props(self) -> None:
        """
        C{/props} reports C{total_slots} (the slots option) and the model.
        """
        self.advance(5)
        props = self.getJSON("/props")
        self.assertEqual(props["total_slots"], 2)
        self.assertEqual(props["model_alias"], "gemma3")
        self.assertIn("n_ctx", props["default_generation_settings"])

    def test_models(self) -> None:
        """
        C{/v1/models} lists the model as llama-server does: C{owned_by} C{"llamacpp"}, and
        an Ollama-style C{models} list beside C{data}.
        """
        self.advance(5)
        listing = self.getJSON("/v1/models")
        self.assertEqual([(m["id"], m["owned_by"]) for m in listing["data"]], [("gemma3", "llamacpp")])
        self.assertEqual([m["name"] for m in listing["models"]], ["gemma3"])

    def test_twoSlots(self) -> None:
        """
        Two requests run at once, the third waits.
        """
        self.advance(5)
        for _ in range(3):
            self.post("/v1/chat/completions", CHAT)
        stats = self.simulator.stats
        self.assertEqual((stats["active"], stats["waiting"]), (2, 1))

    def test_noOllamaRoutes(self) -> None:
        """
        No C{/api/*}: 404 in OpenAI's error shape, as llama-server answers.
        """
        self.advance(5)
        response, body = self.get("/api/tags")
        self.assertEqual(response.code, 404)
        self.assertEqual(json.loads(body)["error"]["code"], "not_found")

    def test_noLoadDelay(self) -> None:
        """
        Without a load delay the server is ready at once.
        """
        self.makeSimulator(api="llama-server", models=("gemma3",))
        self.assertEqual(self.getJSON("/health"), {"status": "ok"})
        self.assertEqual(self.getJSON("/props")["total_slots"], 1)


class OpenAIModeHealthTests(SimulatorTestCase):
    """
    C{api="openai"} (vLLM-like): C{/health} is always ok and there is no C{/props}.
    """

    def test_health(self) -> None:
        """
        C{/health} answers 200 even with a load delay (models load per request), and
        C{/props} is unknown.
        """
        self.makeSimulator(api="openai", models=("m",), loadDelay=5)
        self.assertEqual(self.getJSON("/health"), {"status": "ok"})
        response, _ = self.get("/props")
        self.assertEqual(response.code, 404)
