"""
Tests for L{ollamamq.aggregate}.
"""

from __future__ import annotations

from twisted.internet.defer import CancelledError
from twisted.trial.unittest import SynchronousTestCase

from ollamamq import errors
from ollamamq.aggregate import TRANSLATED_VERSION, Aggregator
from ollamamq.backends import OLLAMA, OPENAI
from ollamamq.config import ModelRule
from ollamamq.models import ModelCatalog
from tests.test_health import (
    HANG,
    PoolFixture,
    ollamaRoutes,
    openaiRoutes,
    psEntry,
    tagEntry,
)


class AggregatorTests(PoolFixture, SynchronousTestCase):
    """
    Tests for L{Aggregator} over two Ollama backends with overlapping models, an
    OpenAI-only backend, an offline Ollama backend and (in some tests) a hung one.
    """

    def setUp(self) -> None:
        self.setUpPool()
        catalog = ModelCatalog(
            {
                "llama3:8b": ModelRule("llama3:8b", aliases=("gpt-4o-mini",)),
                "absent:1b": ModelRule("absent:1b", aliases=("ghost",)),
            }
        )
        self.aggregator = Aggregator(self.pool, self.net, self.clock, catalog, 5)
        self.gpu1, self.fake1 = self.addBackend(
            "gpu1", ollamaRoutes(["llama3:8b", "qwen2.5:7b"], ["llama3:8b"], "0.10.0")
        )
        self.gpu2, self.fake2 = self.addBackend(
            "gpu2", ollamaRoutes(["Llama3:8B", "mistral:latest"], ["mistral:latest"], "0.9.6")
        )
        self.vllm, self.fakeV = self.addBackend("vllm", openaiRoutes(["meta-llama/Llama-3.1-8B"]))
        self.down, self.fakeD = self.addBackend(
            "down", ollamaRoutes(["phi3:mini"], ["phi3:mini"], "0.1.0")
        )
        self.pool.markOnline(self.gpu1, OLLAMA, ["llama3:8b", "qwen2.5:7b"], version="0.10.0")
        self.pool.markOnline(self.gpu2, OLLAMA, ["Llama3:8B", "mistral:latest"], version="0.9.6")
        self.pool.markOnline(self.vllm, OPENAI, ["meta-llama/Llama-3.1-8B"])
        self.pool.markOnline(self.down, OLLAMA, ["phi3:mini"], version="0.1.0")
        self.pool.markOffline(self.down, "connection refused")

    def addHung(self) -> None:
        """
        Add an online Ollama backend that never answers.
        """
        hung, self.fakeH = self.addBackend(
            "hung", {"/api/tags": HANG, "/api/ps": HANG, "/api/version": HANG}
        )
        self.pool.markOnline(hung, OLLAMA, ["hung-only:1b"], version="0.0.1")

    def test_tags(self) -> None:
        """
        C{/api/tags} is the union of the online backends' live entries, one per model
        (the first backend's), plus aliases of present models, sorted by name; an
        OpenAI-only backend's models are listed from its live C{/v1/models}; offline
        backends are not asked.
        """
        result = self.successResultOf(self.aggregator.tags())
        self.assertEqual(
            [m["name"] for m in result["models"]],
            ["gpt-4o-mini", "llama3:8b", "meta-llama/Llama-3.1-8B", "mistral:latest", "qwen2.5:7b"],
        )
        self.assertEqual(result["models"][1], tagEntry("llama3:8b"))
        self.assertEqual(
            result["models"][0], {**tagEntry("llama3:8b"), "name": "gpt-4o-mini", "model": "gpt-4o-mini"}
        )
        self.assertEqual(result["models"][2], {
            "name": "meta-llama/Llama-3.1-8B", "model": "meta-llama/Llama-3.1-8B",
            "modified_at": "1970-01-01T00:00:01Z", "size": 0, "digest": "",
            "details": {"parent_model": "", "format": "", "family": "", "families": None,
                        "parameter_size": "", "quantization_level": ""}})
        self.assertEqual(self.fakeD.requests, [])
        self.assertEqual(self.fakeV.requests, ["/v1/models"])

    def test_tagsLlamaServerMeta(self) -> None:
        """
        llama-server's C{meta} (file size, parameter count) fills C{size} and
        C{details}; an Ollama backend's entry wins for a model both kinds list.
        """
        self.fakeV.routes["/v1/models"] = (200, {"object": "list", "data": [
            {"id": "gemma3-270m", "object": "model", "created": 1764547200, "owned_by": "llamacpp",
             "meta": {"n_params": 268098176, "size": 253111296, "n_ctx_train": 32768}},
            {"id": "llama3:8b", "object": "model", "created": 1, "owned_by": "llamacpp"}]})
        models = {m["name"]: m for m in self.successResultOf(self.aggregator.tags())["models"]}
        self.assertEqual(models["gemma3-270m"]["size"], 253111296)
        self.assertEqual(models["gemma3-270m"]["modified_at"], "2025-12-01T00:00:00Z")
        self.assertEqual(models["gemma3-270m"]["details"]["parameter_size"], "268M")
        self.assertEqual(models["gemma3-270m"]["details"]["format"], "gguf")
        self.assertEqual(models["llama3:8b"], tagEntry("llama3:8b"))

    def test_tagsSkipsHung(self) -> None:
        """
        A hung backend only drops out of the answer, after the timeout.
        """
        self.addHung()
        d = self.aggregator.tags()
        self.clock.advance(4.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        names = [m["name"] for m in self.successResultOf(d)["models"]]
        self.assertNotIn("hung-only:1b", names)
        self.assertIn("mistral:latest", names)
        self.net.flush()
        self.assertEqual(self.fakeH.closed, self.fakeH.held)

    def test_tagsSkipsFailing(self) -> None:
        """
        A backend that errors or answers nonsense is left out; the rest are listed.
        """
        self.fake2.routes["/api/tags"] = (500, {"error": "boom"})
        self.fake1.routes["/api/tags"] = (200, {"models": "many"})
        self.fakeV.routes["/v1/models"] = (200, {"data": [{"object": "model"}]})
        self.assertEqual(self.successResultOf(self.aggregator.tags()), {"models": []})
        self.fake1.routes["/api/tags"] = (200, {"models": None})
        self.assertEqual(self.successResultOf(self.aggregator.tags()), {"models": []})

    def test_drainingExcluded(self) -> None:
        """
        A draining backend's models are not offered.
        """
        self.pool.drain("gpu2")
        names = [m["name"] for m in self.successResultOf(self.aggregator.tags())["models"]]
        self.assertNotIn("mistral:latest", names)
        self.assertEqual(self.fake2.requests, [])

    def test_ps(self) -> None:
        """
        C{/api/ps} is the union of loaded models, one entry per model, without aliases;
        an OpenAI-only backend serves (so has in memory) every model it lists.
        """
        self.fake2.routes["/api/ps"] = (200, {"models": [psEntry("LLAMA3:8b"), psEntry("mistral:latest")]})
        self.fakeV.routes["/v1/models"] = (200, {"object": "list", "data": [
            {"id": "meta-llama/Llama-3.1-8B", "object": "model", "created": 1,
             "meta": {"n_params": 8030261248, "size": 4920734016, "n_ctx_train": 131072}}]})
        result = self.successResultOf(self.aggregator.ps())
        served = {"name": "meta-llama/Llama-3.1-8B", "model": "meta-llama/Llama-3.1-8B",
                  "size": 4920734016, "size_vram": 4920734016, "digest": "", "context_length": 131072,
                  "details": {"parent_model": "", "format": "gguf", "family": "", "families": None,
                              "parameter_size": "8.0B", "quantization_level": ""}}
        self.assertEqual(result, {"models": [psEntry("llama3:8b"), served, psEntry("mistral:latest")]})

    def test_psSkipsHung(self) -> None:
        """
        A hung backend only drops out of C{/api/ps}, after the timeout.
        """
        self.addHung()
        d = self.aggregator.ps()
        self.assertNoResult(d)
        self.clock.advance(5)
        self.assertEqual(len(self.successResultOf(d)["models"]), 3)

    def test_version(self) -> None:
        """
        C{/api/version} is the lowest version of the online Ollama backends.
        """
        self.assertEqual(self.successResultOf(self.aggregator.version()), {"version": "0.9.6"})
        self.pool.markOnline(self.gpu2, OLLAMA, [], version="0.12.0-rc1")
        self.assertEqual(self.successResultOf(self.aggregator.version()), {"version": "0.10.0"})

    def test_versionCached(self) -> None:
        """
        With no Ollama backend online, the lowest last known version; with none known,
        the translated Ollama API's version while an OpenAI-only backend is online, else
        503.
        """
        self.pool.markOffline(self.gpu1, "x")
        self.pool.markOffline(self.gpu2, "x")
        self.assertEqual(self.successResultOf(self.aggregator.version()), {"version": "0.1.0"})
        for backend in (self.gpu1, self.gpu2, self.down):
            backend.version = None
        self.assertEqual(self.successResultOf(self.aggregator.version()),
                         {"version": TRANSLATED_VERSION})
        self.pool.markOffline(self.vllm, "x")
        failure = self.failureResultOf(self.aggregator.version(), errors.Unavailable)
        self.assertEqual(failure.value.status, 503)

    def test_models(self) -> None:
        """
        C{/v1/models} lists the models of online backends of both kinds, once each, with
        aliases, in OpenAI's shape.
        """
        result = self.successResultOf(self.aggregator.models())
        self.assertEqual(result["object"], "list")
        self.assertEqual(
            [m["id"] for m in result["data"]],
            ["gpt-4o-mini", "llama3:8b", "meta-llama/Llama-3.1-8B", "mistral:latest", "qwen2.5:7b"],
        )
        for entry in result["data"]:
            self.assertEqual(set(entry), {"id", "object", "created", "owned_by"})
            self.assertEqual(entry["object"], "model")
            self.assertIsInstance(entry["created"], int)
        owners = {m["id"]: m["owned_by"] for m in result["data"]}
        self.assertEqual(owners["meta-llama/Llama-3.1-8B"], "meta-llama")
        self.assertEqual(owners["qwen2.5:7b"], "library")
        self.assertEqual(self.net.calls, 0)

    def test_model(self) -> None:
        """
        C{/v1/models/{model}} finds a model (any spelling, or an alias) on an online
        backend, keeping the name asked for.
        """
        for name in ("llama3:8b", "LLAMA3:8B", "gpt-4o-mini", "meta-llama/llama-3.1-8b"):
            entry = self.successResultOf(self.aggregator.model(name))
            self.assertEqual(entry["id"], name)
            self.assertEqual(entry["object"], "model")

    def test_modelNotFound(self) -> None:
        """
        A model no online backend has is a 404: unknown, only on an offline backend, or
        an alias of an absent model.
        """
        for name in ("nothing", "phi3:mini", "ghost", "llama3:70b"):
            failure = self.failureResultOf(self.aggregator.model(name), errors.NotFound)
            self.assertEqual(failure.value.status, 404)
            self.assertIn(name, failure.value.message)

    def test_cancel(self) -> None:
        """
        Cancelling a fan-out (the client went away) closes the backend calls, fails with
        L{CancelledError} rather than a partial answer, and logs no error.
        """
        self.addHung()
        d = self.aggregator.tags()
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.net.flush()
        self.assertEqual(self.fakeH.closed, self.fakeH.held)
        self.assertEqual(self.clock.getDelayedCalls(), [])
