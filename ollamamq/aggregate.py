# -*- test-case-name: tests.test_aggregate -*-
"""
The endpoints the proxy answers for the whole pool, without queueing: C{/api/tags},
C{/api/ps}, C{/api/version}, C{/v1/models} and C{/v1/models/{model}}.

Live or cached, per endpoint:

  - C{/api/tags} and C{/api/ps} ask every online Ollama backend, concurrently, each call
    with its own deadline: their entries carry data the probes do not keep (C{size},
    C{digest}, C{modified_at}, C{details}; C{expires_at} and C{size_vram} change by the
    second). A backend that fails or times out only drops out of the answer; it is not
    marked offline here, that is the health checker's judgement.
  - C{/api/version}, C{/v1/models} and C{/v1/models/{model}} are answered from what the
    last probe recorded (L{Backend.version}, L{Backend.models}): a version only changes
    with a restart and model ids are all an OpenAI client reads, so a fan-out would add a
    round trip (and a hung backend's deadline) for nothing. They are at most one health
    interval old.

"Online" means online and not draining: a draining backend takes no new requests, so
listing models only it has would invite requests that cannot be served. C{/api/ps} is the
exception: it reports what is in memory, and a draining backend still has it.

Models of OpenAI-only backends (llama-server, LM Studio, vLLM) are listed in C{/api/tags}
and C{/api/ps} too, and C{/api/show} describes them, because the proxy translates Ollama
requests for them (L{ollamamq.translate}). Their entries are built from a live
C{/v1/models} (llama-server adds a C{meta} object: file size, parameter count, training
context) and, for C{/api/show}, llama-server's C{/props} (chat template, context size,
modalities) when the backend has it. An Ollama backend's own entry wins for a model both
kinds have. C{/api/ps} lists every model of an online OpenAI-only backend: those servers
serve the models they list (LM Studio loads its listed models on demand). With no Ollama
backend at all, C{/api/version} answers L{TRANSLATED_VERSION}, the Ollama API level the
translation provides.

Aliases (C{[models."x"] aliases}) are listed next to their model, as copies of its entry
under the alias's name, when the model is present; not in C{/api/ps}, which reports
models, not names for them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, DeferredList, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from ollamamq import errors
from ollamamq.backends import OLLAMA, OPENAI, Backend, BackendPool
from ollamamq.health import FetchError, getJSON, onlineBackends
from ollamamq.models import ModelCatalog, canonicalModel, versionKey

_BOTH = (OLLAMA, OPENAI)

#: The Ollama version the translation of Ollama requests for OpenAI-only backends
#: behaves as (thinking, tool calls, logprobs, structured outputs): what C{/api/version}
#: answers when no Ollama backend reports one.
TRANSLATED_VERSION = "0.12.0"

_EPOCH = "1970-01-01T00:00:00Z"


def _iso(seconds: Any) -> str:
    """
    A C{created} timestamp (Unix seconds) as Ollama's C{modified_at}.
    """
    if isinstance(seconds, (int, float)) and not isinstance(seconds, bool) and 0 < seconds < 1e11:
        return datetime.fromtimestamp(seconds, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return _EPOCH


def _parameterSize(count: Any) -> str:
    """
    A parameter count the way Ollama prints it (C{8.0B}, C{268M}); empty when unknown.
    """
    if not isinstance(count, (int, float)) or isinstance(count, bool) or count <= 0:
        return ""
    if count >= 1e9:
        return f"{count / 1e9:.1f}B"
    return f"{count / 1e6:.0f}M"


def _details(entry: dict) -> dict:
    """
    Ollama's C{details} of an OpenAI model entry, from llama-server's C{meta} if any.
    """
    meta = entry.get("meta") if isinstance(entry.get("meta"), dict) else {}
    return {
        "parent_model": "",
        "format": "gguf" if meta else "",
        "family": "",
        "families": None,
        "parameter_size": _parameterSize(meta.get("n_params")),
        "quantization_level": "",
    }


def _size(entry: dict) -> int:
    meta = entry.get("meta") if isinstance(entry.get("meta"), dict) else {}
    size = meta.get("size")
    return size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else 0


def tagFromOpenAI(entry: dict) -> dict:
    """
    An C{/api/tags} entry for a C{/v1/models} entry.
    """
    name = entry["id"]
    return {"name": name, "model": name, "modified_at": _iso(entry.get("created")),
            "size": _size(entry), "digest": "", "details": _details(entry)}


def psFromOpenAI(entry: dict) -> dict:
    """
    An C{/api/ps} entry for a C{/v1/models} entry (served, so in memory; no expiry).
    """
    name = entry["id"]
    result = {"name": name, "model": name, "size": _size(entry), "digest": "",
              "details": _details(entry), "size_vram": _size(entry)}
    meta = entry.get("meta") if isinstance(entry.get("meta"), dict) else {}
    if isinstance(meta.get("n_ctx_train"), int):
        result["context_length"] = meta["n_ctx_train"]
    return result


def _ownedBy(name: str, kind: str | None) -> str:
    """
    The C{owned_by} of a model id: its namespace, as Ollama reports it (C{library} for
    official models, C{user} for C{hf.co/user/repo}); C{system} for a bare id from an
    OpenAI-compatible server.
    """
    path = name.split(":", 1)[0].split("/")
    if len(path) >= 2:
        return path[-2]
    return "library" if kind == OLLAMA else "system"


class Aggregator:
    """
    Answers the pool-wide endpoints.
    """

    log = Logger()

    def __init__(
        self,
        pool: BackendPool,
        http: Any,
        clock: IReactorTime,
        catalog: ModelCatalog,
        timeout: float,
        retryAfter: float = 10.0,
    ) -> None:
        """
        @param http: treq, or a treq-like object such as L{treq.testing.StubTreq}.
        @param timeout: deadline of each backend call of a fan-out.
        @param retryAfter: the C{Retry-After} of a 503 when no backend can answer (the
            health interval: when a probe may bring one back).
        """
        self.pool = pool
        self.http = http
        self.clock = clock
        self.catalog = catalog
        self.timeout = timeout
        self.retryAfter = retryAfter

    def _fanOut(
        self, backends: Iterable[Backend], path: str, key: str = "models",
        named: Callable[[Any], str | None] | None = None,
    ) -> Deferred[list[tuple[Backend, list[dict]]]]:
        """
        C{GET path} on every backend at once; fires with the C{key} entries (C{models},
        or C{data} of C{/v1/models}) of those that answered a listing in time, in pool
        order. Cancelling it cancels the calls (closing their connections) and errbacks
        with L{CancelledError}.
        """
        named = named or _entryName
        backends = list(backends)
        calls = [
            getJSON(self.http, self.clock, b.url, path, self.timeout, headers=b.authHeaders())
            for b in backends
        ]

        def merge(results: list[tuple[bool, Any]]) -> list[tuple[Backend, list[dict]]]:
            if any(not ok and answer.check(CancelledError) for ok, answer in results):
                # Only our caller cancels the calls (deadlines are FetchErrors); it went
                # away, so it must not get a half answer to write.
                raise CancelledError()
            answers = []
            for backend, (ok, answer) in zip(backends, results):
                if not ok:
                    reason = (
                        answer.value.message if answer.check(FetchError)
                        else answer.getErrorMessage()
                    )
                    self.log.warn(
                        "Backend {name} left out of {path}: {reason}",
                        name=backend.name, path=path, reason=reason,
                    )
                    continue
                entries = answer.get(key) if isinstance(answer, dict) else ()
                if entries is None:
                    entries = []  # Go encodes an empty list as null
                if not isinstance(entries, list):
                    self.log.warn(
                        "Backend {name} left out of {path}: unexpected response shape",
                        name=backend.name, path=path,
                    )
                    continue
                answers.append((backend, [e for e in entries if named(e)]))
            return answers

        return DeferredList(calls, consumeErrors=True).addCallback(merge)

    def _union(
        self, answers: list[tuple[Backend, list[dict]]], withAliases: bool
    ) -> dict[str, dict]:
        """
        The entries of all answers by canonical key, the first of each model kept; then
        one entry per alias of a present model.
        """
        entries: dict[str, dict] = {}
        for _backend, models in answers:
            for entry in models:
                entries.setdefault(canonicalModel(_entryName(entry)), entry)
        if withAliases:
            for alias, key in self.catalog.aliases.items():
                target = entries.get(key)
                if target is not None:
                    # An alias hides a real model of that name (it is routed to its
                    # target), so its listing does too.
                    entries[canonicalModel(alias)] = {**target, "name": alias, "model": alias}
        return entries

    def _withOpenAI(
        self, native: Deferred[list[tuple[Backend, list[dict]]]], backends: list[Backend],
        convert: Callable[[dict], dict],
    ) -> Deferred[list[tuple[Backend, list[dict]]]]:
        """
        C{native} answers followed by those of C{backends} (OpenAI-only) to a live
        C{/v1/models}, converted to Ollama entries.
        """
        openai = self._fanOut(backends, "/v1/models", "data", _entryId)

        def both(results: list[tuple[bool, Any]]) -> list[tuple[Backend, list[dict]]]:
            for ok, answer in results:
                if not ok:
                    answer.raiseException()
            (_, ours), (_, theirs) = results
            return ours + [(b, [convert(e) for e in entries]) for b, entries in theirs]

        return DeferredList([native, openai], fireOnOneErrback=True, consumeErrors=True) \
            .addErrback(lambda f: f.value.subFailure) \
            .addCallback(both)

    def tags(self) -> Deferred[dict]:
        """
        C{GET /api/tags}: the union of the online backends' models (live; Ollama's
        entries, then OpenAI-only backends' ones built from C{/v1/models}), plus aliases,
        sorted by name.
        """
        d = self._withOpenAI(self._fanOut(onlineBackends(self.pool, [OLLAMA]), "/api/tags"),
                             onlineBackends(self.pool, [OPENAI]), tagFromOpenAI)
        return d.addCallback(
            lambda answers: {"models": _sortedEntries(self._union(answers, True))}
        )

    def ps(self) -> Deferred[dict]:
        """
        C{GET /api/ps}: the union of the models loaded on online Ollama backends (live,
        draining ones included) and of the models online OpenAI-only backends serve, one
        entry per model, sorted by name.
        """
        backends = [b for b in self.pool.backends if b.online and b.kind == OLLAMA]
        openai = [b for b in self.pool.backends if b.online and b.kind == OPENAI]
        d = self._withOpenAI(self._fanOut(backends, "/api/ps"), openai, psFromOpenAI)
        return d.addCallback(
            lambda answers: {"models": _sortedEntries(self._union(answers, False))}
        )

    def show(self, backend: Backend, name: str) -> Deferred[dict]:
        """
        C{POST /api/show} for a model of an OpenAI-only backend: what C{/v1/models} and
        (llama-server) C{/props} say about it, in Ollama's shape.

        @param name: the model as the client named it.
        @return: errbacks with L{errors.BadGateway} when the backend does not answer
            its listing.
        """
        spelled = backend.modelName(canonicalModel(name))
        listing = getJSON(self.http, self.clock, backend.url, "/v1/models", self.timeout)
        props = getJSON(self.http, self.clock, backend.url, "/props", self.timeout)

        def build(results: list[tuple[bool, Any]]) -> dict:
            (listed, models), (propsOK, found) = results
            for ok, answer in results:
                if not ok and answer.check(CancelledError):
                    raise CancelledError()
            if not listed:
                reason = models.value.message if models.check(FetchError) else models.getErrorMessage()
                raise errors.BadGateway(f"backend {backend.name}: {reason}", code="backend_failed")
            entries = models.get("data") if isinstance(models, dict) else None
            entry = next((e for e in entries or () if isinstance(e, dict)
                          and e.get("id") == spelled), {"id": spelled})
            return _showFromOpenAI(entry, found if propsOK and isinstance(found, dict) else {})

        return DeferredList([listing, props], consumeErrors=True).addCallback(build)

    def version(self) -> Deferred[dict]:
        """
        C{GET /api/version}: the lowest version (by L{versionKey}) the probes found on
        online Ollama backends, since a client must not use a feature some backend lacks;
        with none online, the lowest last known one.

        @return: errbacks with L{errors.Unavailable} when no Ollama backend ever
            reported a version.
        """
        ollama = [b for b in self.pool.backends if b.kind == OLLAMA and b.version]
        online = [b for b in ollama if b.online]
        versions = [b.version for b in (online or ollama) if b.version]
        if not versions and onlineBackends(self.pool, [OPENAI]):
            return succeed({"version": TRANSLATED_VERSION})
        if not versions:
            return fail(
                errors.Unavailable(
                    "no Ollama backend is online", code="no_backend", retryAfter=self.retryAfter
                )
            )
        return succeed({"version": min(versions, key=versionKey)})

    def _modelEntries(self) -> dict[str, dict]:
        """
        One C{/v1/models} entry per model of the online backends (any kind), by key.
        """
        entries: dict[str, dict] = {}
        for backend in onlineBackends(self.pool, _BOTH):
            for key, name in backend.models.items():
                if key not in entries:
                    entries[key] = _modelEntry(name, backend.kind)
        return entries

    def models(self) -> Deferred[dict]:
        """
        C{GET /v1/models}: the online backends' model ids (cached from the probes),
        aliases included, sorted by id. C{created} is 0: the probes do not keep a date,
        and a stable value is better than a made-up one.
        """
        entries = self._modelEntries()
        for alias, key in self.catalog.aliases.items():
            target = entries.get(key)
            if target is not None:
                entries[canonicalModel(alias)] = {**target, "id": alias}
        data = sorted(entries.values(), key=lambda e: (e["id"].lower(), e["id"]))
        return succeed({"object": "list", "data": data})

    def model(self, name: str) -> Deferred[dict]:
        """
        C{GET /v1/models/{model}}: the entry of C{name} (an alias resolves to its model;
        the entry keeps the name asked for, as Ollama does).

        @return: errbacks with L{errors.NotFound} when no online backend has it.
        """
        key = self.catalog.resolve(name).key
        for backend in onlineBackends(self.pool, _BOTH):
            if key in backend.models:
                return succeed(_modelEntry(name, backend.kind))
        return fail(errors.NotFound(f"model {name!r} not found", code="model_not_found"))


def _entryId(entry: Any) -> str | None:
    """
    The id of a C{/v1/models} entry, or L{None} when it has none.
    """
    if isinstance(entry, dict) and isinstance(entry.get("id"), str) and entry["id"]:
        return entry["id"]
    return None


def _showFromOpenAI(entry: dict, props: dict) -> dict:
    """
    An C{/api/show} answer from a C{/v1/models} entry and llama-server's C{/props}.
    """
    meta = entry.get("meta") if isinstance(entry.get("meta"), dict) else {}
    info: dict[str, Any] = {}
    if isinstance(meta.get("n_params"), int):
        info["general.parameter_count"] = meta["n_params"]
    settings = props.get("default_generation_settings")
    context = settings.get("n_ctx") if isinstance(settings, dict) else None
    capabilities = ["completion"]
    modalities = props.get("modalities")
    if isinstance(modalities, dict) and modalities.get("vision"):
        capabilities.append("vision")
    template = props.get("chat_template") if isinstance(props.get("chat_template"), str) else ""
    if "tool" in template:
        capabilities.append("tools")
    parameters = f"num_ctx {context}" if isinstance(context, int) else ""
    return {
        "modelfile": "",
        "parameters": parameters,
        "template": template,
        "details": _details(entry),
        "model_info": info,
        "capabilities": capabilities,
        "modified_at": _iso(entry.get("created")),
    }


def _entryName(entry: Any) -> str | None:
    """
    The name of an C{/api/tags} or C{/api/ps} entry, or L{None} when it has none.
    """
    if not isinstance(entry, dict):
        return None
    for field in ("name", "model"):
        value = entry.get(field)
        if isinstance(value, str) and value:
            return value
    return None


def _sortedEntries(entries: dict[str, dict]) -> list[dict]:
    """
    Entries sorted by name, case-insensitively (ties in a fixed order).
    """
    return sorted(entries.values(), key=lambda e: (_entryName(e).lower(), _entryName(e)))


def _modelEntry(name: str, kind: str | None) -> dict:
    """
    A C{/v1/models} entry, shaped like Ollama's.
    """
    return {"id": name, "object": "model", "created": 0, "owned_by": _ownedBy(name, kind)}


__all__ = ["Aggregator"]
