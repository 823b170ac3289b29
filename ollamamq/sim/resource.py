# -*- test-case-name: tests.test_sim,tests.test_sim_openai,tests.test_sim_anthropic -*-
"""
The simulator's HTTP side: L{Simulator} routes each request to its dialect (Ollama, OpenAI,
Anthropic), shapes errors for the route's API family, admits work requests into the
L{Engine}, and serves the test hooks; L{SimulatorResource} is the C{twisted.web} resource.

Routes (C{HEAD} works wherever C{GET} does):

  - C{api="ollama"}: the Ollama API (L{ollamamq.sim.ollama}) and the OpenAI routes;
  - C{api="openai"}: only C{/v1/*} and C{GET /health} (like vLLM);
  - C{api="llama-server"}: C{/v1/*}, C{GET /health} and C{GET /props} (like llama.cpp's
    llama-server, whose models load at startup: until then every route but the test
    hooks answers 503 C{"Loading model"});
  - all of them, unless C{messages=False}: the Anthropic Messages routes;
  - test hooks: C{GET /sim/stats}, C{POST /sim/reset}, C{POST /sim/fail},
    C{GET /sim/requests}.

Only generation and embedding requests ("work") take slots and appear in the
C{/sim/stats} counters and log; listings and health probes do not, so a proxy's periodic
probes leave the numbers alone.  C{/sim/requests} lists every request that arrived (the
probes too) with its method, path and headers, so a test can see which credentials reached
the backend.
"""

from __future__ import annotations

import json
import zlib
from collections import deque
from typing import Any, Callable
from urllib.parse import unquote

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request

from ollamamq.sim.anthropic import AnthropicDialect
from ollamamq.sim.dialect import ModelCard, Route, SimError, jsonBytes, parseKeepAlive
from ollamamq.sim.engine import LOG_LIMIT, Engine, Job
from ollamamq.sim.ollama import OllamaDialect
from ollamamq.sim.openai import LOADING_ERROR, OpenAIDialect
from ollamamq.sim.options import LLAMA_SERVER, OLLAMA, SimulatorOptions

__all__ = ["Handler", "Simulator", "SimulatorResource"]

Handler = Callable[[Request], "bytes | int"]


def _headers(request: Request) -> dict[str, str]:
    """
    @param request: a request.
    @return: its headers, names lowercased, repeated values joined with C{", "}.
    """
    return {
        name.decode("latin-1").lower(): ", ".join(v.decode("latin-1") for v in values)
        for name, values in request.requestHeaders.getAllRawHeaders()
    }


@attrs.define(eq=False)
class Simulator:
    """
    A simulated LLM server.  Serve L{resource} with a L{twisted.web.server.Site};
    everything is timed by C{clock}.

    @ivar options: how the simulator behaves.
    @ivar clock: the clock driving tokens and loads.
    @ivar modelNames: the served model names (canonical: C{name:tag} with
        the Ollama API).
    @ivar cards: each served model's made-up facts, by canonical name.
    @ivar engine: the slots, loads and token pacing.
    @ivar failStatus: when set, every work request fails with this status
        (see C{POST /sim/fail}).
    """

    options: SimulatorOptions
    clock: IReactorTime
    modelNames: tuple[str, ...] = attrs.field(init=False)
    cards: dict[str, ModelCard] = attrs.field(init=False)
    engine: Engine = attrs.field(init=False)
    failStatus: int | None = attrs.field(init=False, default=None)
    _routes: dict[tuple[bytes, str], Handler] = attrs.field(init=False, factory=dict)
    _prefixRoutes: list[tuple[bytes, str, Handler]] = attrs.field(init=False, factory=list)
    _requests: deque[dict[str, Any]] = attrs.field(
        init=False, factory=lambda: deque(maxlen=LOG_LIMIT)
    )
    _resource: IResource | None = attrs.field(init=False, default=None)

    def __attrs_post_init__(self) -> None:
        """
        Canonicalise model names, build the route table, and (like llama-server)
        start loading the models at once in the llama-server mode.
        """
        names: list[str] = []
        for name in self.options.models:
            canonical = self._canonical(name)
            if canonical not in names:
                names.append(canonical)
        self.modelNames = tuple(names)
        self.cards = {name: ModelCard.describe(name) for name in self.modelNames}
        self.engine = Engine(self.options, self.clock)
        self._buildRoutes()
        if self.options.api == LLAMA_SERVER:
            self.engine.preload(self.modelNames)

    # -- public API ---------------------------------------------------------

    def resource(self) -> IResource:
        """
        @return: the C{twisted.web} resource serving every route.
        """
        if self._resource is None:
            self._resource = SimulatorResource(self)
        return self._resource

    @property
    def stats(self) -> dict[str, Any]:
        """
        The counters and request log served by C{GET /sim/stats}.

        @return: a JSON-ready dict: C{requests}, C{completed}, C{cancelled},
            C{errors}, C{active}, C{waiting}, C{maxConcurrent}, C{loaded},
            C{failStatus} and C{log} (oldest first).
        """
        return {**self.engine.stats, "failStatus": self.failStatus}

    @property
    def requests(self) -> list[dict[str, Any]]:
        """
        Every request seen (the last L{LOG_LIMIT}), served by C{GET /sim/requests}.

        @return: JSON-ready dicts with C{method}, C{path}, C{headers} (names lowercased)
            and C{receivedAt}, oldest first.
        """
        return [dict(entry) for entry in self._requests]

    def reset(self) -> None:
        """
        Clear the counters and the request logs (requests in flight go on).
        """
        self.engine.reset()
        self._requests.clear()

    def shutdown(self) -> None:
        """
        Stop all work: cancel every timer and drop every open request's
        connection, so nothing is left pending on the reactor.
        """
        self.engine.shutdown()

    @property
    def ready(self) -> bool:
        """
        Whether the server answers requests: a llama-server-like simulator does not
        while its models load at startup.
        """
        return not (self.options.api == LLAMA_SERVER and self.engine.isLoading())

    # -- helpers for the dialects -------------------------------------------

    def _canonical(self, name: str) -> str:
        """
        @param name: a model name as a client or the options give it.
        @return: the name as served: with the Ollama API an untagged name
            means C{:latest}; OpenAI-style servers match names exactly.
        """
        if self.options.api == OLLAMA and ":" not in name.rsplit("/", 1)[-1]:
            return name + ":latest"
        return name

    def find(self, name: object) -> str | None:
        """
        @param name: a requested model name.
        @return: the served model's canonical name, or L{None}.
        """
        if not isinstance(name, str) or not name:
            return None
        canonical = self._canonical(name)
        return canonical if canonical in self.cards else None

    @staticmethod
    def json(request: Request, value: object) -> bytes:
        """
        Answer 200 with a JSON body.

        @param request: the request.
        @param value: a JSON-ready value.
        @return: the body.
        """
        request.setHeader(b"Content-Type", b"application/json; charset=utf-8")
        return jsonBytes(value)

    @staticmethod
    def body(request: Request) -> dict[str, Any]:
        """
        Parse a request's JSON object body.

        @param request: the request.
        @return: the object.
        @raise SimError: 400 when the body is not a JSON object.
        """
        raw = request.content.read() if request.content is not None else b""
        try:
            body = json.loads(raw or b"{}")
        except ValueError as error:
            raise SimError(400, f"invalid JSON body: {error}") from None
        if not isinstance(body, dict):
            raise SimError(400, "the request body must be a JSON object")
        return body

    def work(self, route: Route) -> Handler:
        """
        Build the handler of a generation or embedding route.

        @param route: the route's wire format.
        @return: the handler.
        """
        return lambda request: self._accept(request, route)

    # -- HTTP dispatch ------------------------------------------------------

    def _buildRoutes(self) -> None:
        """
        Fill the route table for the configured API family.
        """
        routes: dict[tuple[bytes, str], Handler] = {}
        if self.options.api == OLLAMA:
            routes.update(OllamaDialect(self).routes())
        openai = OpenAIDialect(self)
        routes.update(openai.routes())
        self._prefixRoutes = openai.prefixRoutes()
        if self.options.messages:
            routes.update(AnthropicDialect(self).routes())
        routes[b"GET", "/sim/stats"] = self._simStats
        routes[b"GET", "/sim/requests"] = self._simRequests
        routes[b"POST", "/sim/reset"] = self._simReset
        routes[b"POST", "/sim/fail"] = self._simFail
        self._routes = routes

    def render(self, request: Request) -> bytes | int:
        """
        Answer any request: the resource's single entry point.

        @param request: the request.
        @return: the body, or L{NOT_DONE_YET} for answers that take time.
        """
        request.setHeader(b"X-Sim-Backend", self.options.name.encode("utf-8"))
        path = unquote((request.path or b"/").decode("utf-8", "replace"))
        method = request.method
        if not path.startswith("/sim/"):
            self._requests.append(
                {
                    "method": method.decode("latin-1"),
                    "path": path,
                    "headers": _headers(request),
                    "receivedAt": self.clock.seconds(),
                }
            )
        lookup = b"GET" if method == b"HEAD" else method
        handler = self._routes.get((lookup, path))
        if handler is None:
            for routeMethod, prefix, prefixHandler in self._prefixRoutes:
                if lookup == routeMethod and path.startswith(prefix):
                    handler = prefixHandler
                    break
        if not self.ready and not path.startswith("/sim/"):
            # llama-server refuses everything while loading, its /health included.
            request.setResponseCode(503)
            body = self.json(request, LOADING_ERROR)
        elif handler is None:
            allowed = sorted({m.decode() for (m, p) in self._routes if p == path})
            if allowed:
                if "GET" in allowed:
                    allowed.append("HEAD")
                request.setHeader(b"Allow", ", ".join(allowed).encode("ascii"))
                body = self._errorBody(request, SimError(405, "method not allowed"), path)
            else:
                body = self._notFound(request, path)
        else:
            try:
                body = handler(request)
            except SimError as error:
                body = self._errorBody(request, error, path)
        if method == b"HEAD" and isinstance(body, bytes):
            # Say how long the GET body would be, but send none, without
            # twisted.web logging a warning about eating a HEAD body.
            request.setHeader(b"Content-Length", b"%d" % (len(body),))
            return b""
        return body

    def _family(self, path: str) -> str:
        """
        @param path: a request path.
        @return: the API family whose error shape the path gets.
        """
        if path.startswith("/v1/messages"):
            return "anthropic"
        if path.startswith("/v1/") or self.options.api != OLLAMA:
            return "openai"
        return "ollama"

    def _errorBody(self, request: Request, error: SimError, path: str) -> bytes:
        """
        Shape an error for the route's API family.

        @param request: the request to answer.
        @param error: the error.
        @param path: the request path.
        @return: the body.
        """
        request.setResponseCode(error.code)
        request.setHeader(b"Content-Type", b"application/json; charset=utf-8")
        family = self._family(path)
        if family == "anthropic":
            return jsonBytes(
                {"type": "error", "error": {"type": error.errorType, "message": error.message}}
            )
        if family == "openai":
            return jsonBytes(
                {
                    "error": {
                        "message": error.message,
                        "type": error.errorType,
                        "param": None,
                        "code": error.errorCode,
                    }
                }
            )
        return jsonBytes({"error": error.message})

    def _notFound(self, request: Request, path: str) -> bytes:
        """
        Answer an unknown route as the real servers do.

        @param request: the request.
        @param path: its path.
        @return: the body.
        """
        if self._family(path) == "ollama":
            # Ollama's router (Gin) answers unknown routes in plain text.
            request.setResponseCode(404)
            request.setHeader(b"Content-Type", b"text/plain")
            return b"404 page not found"
        errorType = "not_found_error" if self._family(path) == "anthropic" else "invalid_request_error"
        return self._errorBody(
            request, SimError(404, f"Not found: {path}", errorType, "not_found"), path
        )

    # -- /sim/* -------------------------------------------------------------

    def _simStats(self, request: Request) -> bytes:
        """
        C{GET /sim/stats}.
        """
        return self.json(request, self.stats)

    def _simRequests(self, request: Request) -> bytes:
        """
        C{GET /sim/requests}: C{{"requests": [...]}}, see L{requests}.
        """
        return self.json(request, {"requests": self.requests})

    def _simReset(self, request: Request) -> bytes:
        """
        C{POST /sim/reset}.
        """
        self.reset()
        return self.json(request, {"reset": True})

    def _simFail(self, request: Request) -> bytes:
        """
        C{POST /sim/fail} C{{"status": 500}} or C{{"status": null}}.
        """
        status = self.body(request).get("status")
        if status is not None and (
            not isinstance(status, int) or isinstance(status, bool) or not 400 <= status <= 599
        ):
            raise SimError(400, "status must be an HTTP error status (400-599) or null")
        self.failStatus = status
        return self.json(request, {"status": status})

    # -- work routes --------------------------------------------------------

    def _accept(self, request: Request, route: Route) -> bytes | int:
        """
        Admit a work request: log it, refuse it if it is unusable (or the
        simulator is failing), else queue it for a slot.

        @param request: the request.
        @param route: the route's wire format.
        @return: an error body, or L{NOT_DONE_YET}.
        """
        user = request.getHeader(b"x-user-id")
        entry: dict[str, Any] = {
            "id": None,
            "path": request.path.decode("utf-8", "replace"),
            "model": None,
            "user": user.decode("utf-8", "replace") if user is not None else None,
            "headers": _headers(request),
            "status": "waiting",
            "receivedAt": self.clock.seconds(),
            "startedAt": None,
            "finishedAt": None,
            "promptTokens": 0,
            "tokens": 0,
        }
        ident = self.engine.record(entry)
        try:
            return self._admit(request, route, entry, ident)
        except SimError:
            self.engine.refused(entry)
            raise

    def _admit(self, request: Request, route: Route, entry: dict[str, Any], ident: int) -> int:
        """
        Validate a work request and queue it.

        @param request: the request.
        @param route: the route's wire format.
        @param entry: its log entry.
        @param ident: its number.
        @return: L{NOT_DONE_YET}.
        @raise SimError: when it is refused.
        """
        if self.failStatus is not None:
            raise SimError(self.failStatus, "simulated failure", "api_error", "simulated_failure")
        body = self.body(request)
        requested = body.get("model")
        entry["model"] = requested if isinstance(requested, str) else None
        if not isinstance(requested, str) or not requested:
            raise SimError(400, "model is required")
        model = self.find(requested)
        if model is None:
            if route.family == "anthropic":
                raise SimError(404, f"model: {requested}", "not_found_error")
            if route.family == "openai" and self.options.api != OLLAMA:
                raise SimError(
                    404,
                    f"The model `{requested}` does not exist.",
                    "invalid_request_error",
                    "model_not_found",
                )
            # Ollama says the same on /api/* and on its /v1/* compatibility
            # routes (there with OpenAI's error envelope).
            raise SimError(
                404, f'model "{requested}" not found, try pulling it first', "not_found_error"
            )
        if self.cards[model].embedding and not route.embedding:
            raise SimError(400, f'"{requested}" does not support generate')
        promptTokens, length, inputs = route.parse(body)
        stream = body.get("stream")
        if not isinstance(stream, bool):
            stream = route.streamByDefault
        keepAlive = parseKeepAlive(body.get("keep_alive"))

        special = route.special(body, keepAlive)
        if special == "unload":
            return self._unload(request, route, entry, model, requested)
        if special == "load":
            route = route.loadRoute()  # type: ignore[attr-defined]
            stream = False

        tokens, limited = self.options.tokens, False
        if length is not None:
            if not route.lengthIsCap:
                tokens, limited = length, True
            elif length < tokens:
                tokens, limited = length, True
        job = Job(
            request=request,
            route=route,
            entry=entry,
            model=model,
            requestedModel=requested,
            stream=stream,
            tokens=tokens,
            limited=limited,
            promptTokens=promptTokens,
            seed=zlib.crc32(json.dumps(body.get("messages", body.get("prompt", ""))).encode()),
            keepAlive=keepAlive,
            body=body,
            inputs=inputs,
            receivedAt=self.clock.seconds(),
            ident=ident,
        )
        entry["promptTokens"] = promptTokens
        request.setHeader(b"Content-Type", route.contentType(stream))
        self.engine.submit(job)
        return NOT_DONE_YET

    def _unload(
        self, request: Request, route: Route, entry: dict[str, Any], model: str, requested: str
    ) -> int:
        """
        Answer an Ollama unload request (empty prompt, C{keep_alive: 0}).

        @param request: the request.
        @param route: the generate or chat route.
        @param entry: its log entry.
        @param model: the model to unload.
        @param requested: the name the client used.
        @return: L{NOT_DONE_YET} (the answer is already written).
        """
        # A model in use goes once its last job ends, as in Ollama.
        self.engine.unload(model)
        body = route.doneAnswer(requested, "unload")  # type: ignore[attr-defined]
        request.setHeader(b"Content-Type", b"application/json; charset=utf-8")
        request.setHeader(b"Content-Length", b"%d" % (len(body),))
        request.write(body)
        request.finish()
        self.engine.answered(entry)
        return NOT_DONE_YET


class SimulatorResource(Resource):
    """
    The one resource serving every simulator route (it does its own routing,
    so paths such as C{/v1/models/library/llama3:8b} need no tree).
    """

    isLeaf = True

    def __init__(self, simulator: Simulator) -> None:
        """
        @param simulator: the simulator answering requests.
        """
        super().__init__()
        self._simulator = simulator

    def render(self, request: Request) -> bytes | int:  # type: ignore[override]
        """
        Hand every request, whatever its method, to the simulator.

        @param request: the request.
        @return: a body or L{NOT_DONE_YET}.
        """
        return self._simulator.render(request)
