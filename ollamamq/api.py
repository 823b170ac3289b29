# -*- test-case-name: tests.test_api -*-
"""
The HTTP front: the route table. Each request is classified (local, aggregated, queued,
routed by model, model management), its caller identified, and handed on: queued requests
to the scheduler and then the relay, aggregated ones to the aggregator.
"""

from __future__ import annotations

import ipaddress
import json
from io import BytesIO
from collections.abc import Callable
from typing import Any

import attrs
from klein import Klein
from twisted.internet.defer import CancelledError, DeferredList, ensureDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseFailed
from twisted.web.http_headers import Headers
from twisted.web.iweb import IRequest
from werkzeug.exceptions import HTTPException

from ollamamq.aggregate import Aggregator
from ollamamq.backends import OLLAMA as OLLAMA_BACKEND
from ollamamq.backends import OLLAMA_API, OPENAI_API, Backend, BackendPool, UnknownBackend
from ollamamq.config import Config
from ollamamq.errors import (
    BadRequest,
    BodyTooLarge,
    NotFound,
    ProxyError,
    Unauthorized,
    Unavailable,
    writeError,
)
from ollamamq.forward import Forwarder, Outgoing
from ollamamq.front import (
    KNOWN_METHODS,
    FrontResource,
    FrontRules,
    dialectsFor,
    familyFor,
    wrongMethod,
)
from ollamamq.identity import IdentityResolver
from ollamamq.keys import UnknownKey, canHoldKeys
from ollamamq.models import ModelCatalog, Resolution
from ollamamq.relay import BackendUnreachable, BodyTooLong, requestHeadersForBackend
from ollamamq.metrics import Metrics, renderMetrics
from ollamamq.requestlog import GROUPS, RequestLog, usageTotals
from ollamamq.scheduler import Job, Scheduler
from ollamamq.web.page import statusPage

OLLAMA_ONLY = frozenset({OLLAMA_API})
OPENAI_ONLY = frozenset({OPENAI_API})

log = Logger()

# What one backend may answer to a model-management request that goes to several (the
# answers are merged in memory): pull progress is a few hundred kilobytes.
FAN_OUT_LIMIT = 16 * 1024 * 1024

JSON = b"application/json; charset=utf-8"

#: Readable names of dialects, for errors that say which one a model lacks.
_DIALECT_NAMES = {"ollama": "the Ollama API", "openai": "the OpenAI API",
                  "anthropic": "the Anthropic Messages API"}


def _jsonResponse(request: IRequest, payload: Any, code: int = 200) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", JSON)
    return json.dumps(payload).encode("utf-8")


def _peerHost(request: IRequest) -> str:
    return getattr(request.getClientAddress(), "host", None) or "local"


def _when(name: str, value: str) -> float:
    """
    A time parameter: Unix seconds, or an ISO 8601 date or date-time (UTC unless it has
    an offset).
    """
    from datetime import datetime, timezone

    try:
        return float(value)
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise BadRequest(f"{name}: expected Unix seconds or an ISO 8601 date, got {value!r}",
                         code="invalid_parameter") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.timestamp()


def usageFilters(args: dict[bytes, list[bytes]]) -> dict[str, Any]:
    """
    The filters of C{GET /proxy/usage} from its query arguments, checked.

    @raise BadRequest: for an unknown group, a bad time, or an unknown parameter.
    """
    known = {"since", "until", "user", "model", "group"}
    values: dict[str, str] = {}
    for raw, given in args.items():
        name = raw.decode("utf-8", "replace")
        if name not in known:
            raise BadRequest(f"unknown parameter {name!r} (known: {', '.join(sorted(known))})",
                             code="invalid_parameter")
        values[name] = given[-1].decode("utf-8", "replace")
    group = values.get("group", "user")
    if group not in GROUPS:
        raise BadRequest(f"group: expected one of {', '.join(GROUPS)}, got {group!r}",
                         code="invalid_parameter")
    return {
        "since": _when("since", values["since"]) if "since" in values else None,
        "until": _when("until", values["until"]) if "until" in values else None,
        "user": values.get("user"),
        "model": values.get("model"),
        "group": group,
    }


@attrs.define
class ProxyAPI:
    """
    The Klein application of the proxy; all collaborators are injected.

    @ivar keys: the runtime-minted keys (L{ollamamq.keys.MintedKeys}), or L{None} when
        there is no state store to keep them in.
    """

    config: Config
    pool: BackendPool
    scheduler: Scheduler
    forwarder: Forwarder
    identity: IdentityResolver
    catalog: ModelCatalog
    aggregator: Aggregator
    metrics: Metrics | None = None
    # The store's runInteraction (the request log's database), for GET /proxy/usage.
    runQuery: Callable[..., Any] | None = None
    requestLog: RequestLog | None = None
    keys: Any = None
    # The control plane (ollamamq.control.actions.ControlActions), when wired: serves
    # /proxy/status with the runtime details and the admin routes.
    control: Any = None
    # The admin HTTP API (ollamamq.control.http.AdminAPI), mounted at /proxy/.
    admin: Any = None

    app = Klein()

    def frontRules(self) -> FrontRules:
        """
        The front's rules (L{ollamamq.front}) for this route table.
        """
        return FrontRules(
            maxBodyBytes=self.config.maxBodyBytes,
            maxBlobBytes=self.config.maxBlobBytes,
            allowedMethods=self._allowedMethods,
            adminError=self._adminError,
        )

    def resource(self) -> Any:
        """
        The twisted.web resource serving this API, behind the front's rules.
        """
        return FrontResource(self.app.resource(), self.frontRules(), self._answer)

    # --- errors ---

    def _answer(self, request: IRequest, error: ProxyError) -> bytes:
        return writeError(request, error, familyFor(request.path))

    @app.handle_errors(ProxyError)
    def _proxyError(self, request: IRequest, failure: Failure) -> bytes:
        return self._answer(request, failure.value)

    @app.handle_errors(HTTPException)
    def _routingError(self, request: IRequest, failure: Failure) -> bytes:
        # The router's own refusals (a path the catch-all does not match, such as POST /)
        # answered like every other error, never as a logged 500.
        error = failure.value
        valid = getattr(error, "valid_methods", None)
        if error.code == 405 and valid:
            allowed = [m for m in KNOWN_METHODS if m in valid]
            return self._answer(request, wrongMethod(request.method, request.path, allowed))
        return self._answer(request, NotFound(
            f"no route for {request.method.decode('latin-1')} "
            f"{request.path.decode('latin-1')}", code="unknown_route"))

    @app.handle_errors(Exception)
    def _unexpected(self, request: IRequest, failure: Failure) -> bytes:
        # A bug must cost one request a 500, never the daemon or a traceback to the client.
        log.failure("Unexpected error handling {method} {path}", failure,
                    method=request.method, path=request.path)
        return self._answer(request, ProxyError("internal proxy error", code="internal_error"))

    # --- local routes ---

    @app.route("/", methods=["GET", "HEAD"])
    def root(self, request: IRequest) -> bytes:
        """
        What Ollama answers, so clients that check for a running server are satisfied.
        """
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"Ollama is running"

    @app.route("/health", methods=["GET", "HEAD"])
    def health(self, request: IRequest) -> bytes:
        """
        Liveness for load balancers: 200 while at least one backend is online, else 503.
        """
        backends = self.pool.backends
        online = sum(b.online for b in backends)
        if online:
            status = "ok" if online == len(backends) else "degraded"
        else:
            status = "starting" if not self.pool.settled else "down"
        payload = {
            "status": status,
            "backends": {"online": online, "total": len(backends)},
            "queued": self.scheduler.queued,
            "active": self.scheduler.active,
        }
        return _jsonResponse(request, payload, 200 if online else 503)

    @app.route("/proxy/status", methods=["GET"])
    def status(self, request: IRequest) -> bytes:
        """
        Backends, users and queues, as documented in DESIGN.md section 4. Without the
        admin key (see L{_isAdmin}), only totals and backend states: no user names, client
        addresses or backend URLs.
        """
        if not self._isAdmin(request):
            return _jsonResponse(request, {
                "backends": [
                    {field: entry[field] for field in
                     ("name", "online", "state", "kind", "slots", "active", "draining")
                     if field in entry}
                    for entry in (b.describe() for b in self.pool.backends)
                ],
                "queued": self.scheduler.queued,
                "active": self.scheduler.active,
                "detail": False,
            })
        if self.control is not None:
            payload = self.control.status()
        else:
            payload = {
                "backends": [b.describe() for b in self.pool.backends],
                "users": self.scheduler.snapshot(),
                "blocked_ips": [],
                "queued": self.scheduler.queued,
                "active": self.scheduler.active,
            }
        if self.metrics is not None:
            self.metrics.addTokens(payload["users"])
        return _jsonResponse(request, payload)

    @app.route("/metrics", methods=["GET"])
    def metricsRoute(self, request: IRequest) -> bytes:
        """
        Prometheus metrics; the admin key is needed when C{metrics_public = false}.
        """
        if self.metrics is None:
            raise NotFound("metrics are not enabled", code="unknown_route")
        if not self.config.metricsPublic:
            self._checkAdmin(request)
        return renderMetrics(self.metrics.registry, request)

    @app.route("/proxy/ui", methods=["GET"])
    def ui(self, request: IRequest) -> bytes:
        """
        The live status page (static; it reads C{/proxy/status} and C{/proxy/events}).
        """
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        # It loads nothing from elsewhere, and nobody should frame it.
        request.setHeader(b"content-security-policy",
                          b"default-src 'self'; script-src 'unsafe-inline'; "
                          b"style-src 'unsafe-inline'; frame-ancestors 'none'")
        request.setHeader(b"cache-control", b"no-cache")
        return statusPage()

    @app.route("/proxy/queue/me", methods=["GET"])
    def queueMe(self, request: IRequest) -> bytes:
        """
        The caller's own queued requests with their places and estimated starts, the
        caller identified as its requests are; nobody else's.
        """
        who = self.identity.identify(request.requestHeaders, _peerHost(request))
        return _jsonResponse(request, {"user": who.user,
                                       "requests": self.scheduler.queuedFor(who.user)})

    @app.route("/proxy/usage", methods=["GET"])
    async def usage(self, request: IRequest) -> bytes:
        """
        Totals from the request log (admin): C{since}, C{until} (Unix seconds or ISO 8601
        dates/times, UTC unless they say otherwise), C{user}, C{model}, C{group}.
        """
        self._checkAdmin(request)
        if self.runQuery is None:
            raise NotFound("the request log is not enabled", code="unknown_route")
        filters = usageFilters(request.args)
        if self.requestLog is not None:
            # Include the requests that finished since the last batch.
            await self.requestLog.flush()
        rows = await self.runQuery(usageTotals, **filters)
        return _jsonResponse(request, {"group": filters["group"], "since": filters["since"],
                                       "until": filters["until"], "totals": rows})

    # --- runtime-minted API keys (admin) ---

    def _keysFor(self, request: IRequest, user: str) -> Any:
        """
        The minted-keys manager, once the caller is known to be the admin and C{user} to
        be a user id a key can name.
        """
        self._checkAdmin(request)
        if not canHoldKeys(user):
            raise BadRequest(f"not a user id a key can name: {user!r}", code="invalid_user")
        if self.keys is None:
            raise Unavailable("no state store to keep minted keys in", code="no_store")
        return self.keys

    @app.route("/proxy/users/<user>/keys", methods=["POST"])
    async def mintKey(self, request: IRequest, user: str) -> bytes:
        """
        Mint a key for C{user}: answered once, stored only as its digest, accepted at
        once.
        """
        minted = await self._keysFor(request, user).mint(user)
        # The one answer that carries a key: no cache may keep it.
        request.setHeader(b"cache-control", b"no-store")
        return _jsonResponse(
            request, {"user": user, "prefix": minted.prefix, "key": minted.key}, 201
        )

    @app.route("/proxy/users/<user>/keys", methods=["GET"])
    async def listKeys(self, request: IRequest, user: str) -> bytes:
        """
        C{user}'s minted keys: prefixes and creation times, never the keys.
        """
        found = await self._keysFor(request, user).list(user)
        return _jsonResponse(request, {"user": user, "keys": [
            {"prefix": k.prefix, "created": k.created} for k in found
        ]})

    @app.route("/proxy/users/<user>/keys/<prefix>", methods=["DELETE"])
    async def revokeKey(self, request: IRequest, user: str, prefix: str) -> bytes:
        """
        Revoke C{user}'s key named C{prefix}: refused from the moment this answers.
        """
        try:
            await self._keysFor(request, user).revoke(user, prefix)
        except UnknownKey:
            raise NotFound(f"user {user!r} has no key {prefix!r}", code="unknown_key") from None
        return _jsonResponse(request, {"user": user, "prefix": prefix, "revoked": True})

    @app.route("/proxy/", branch=True)
    def proxyAdmin(self, request: IRequest) -> Any:
        """
        The admin API (L{ollamamq.control.http}) below C{/proxy/}; routes of this table
        with a fixed path (C{/proxy/status}) go first.
        """
        if self.admin is None:
            raise NotFound(f"no route for {request.path.decode('latin-1')}",
                           code="unknown_route")
        return self.admin.resource()

    # --- aggregated over backends, never queued ---

    @app.route("/api/tags", methods=["GET", "HEAD"])
    async def tags(self, request: IRequest) -> bytes:
        """
        The union of every online Ollama backend's models, plus configured aliases.
        """
        return _jsonResponse(request, await self.aggregator.tags())

    @app.route("/api/ps", methods=["GET"])
    async def ps(self, request: IRequest) -> bytes:
        """
        The union of the models loaded on the online Ollama backends.
        """
        return _jsonResponse(request, await self.aggregator.ps())

    @app.route("/api/version", methods=["GET", "HEAD"])
    async def version(self, request: IRequest) -> bytes:
        """
        The lowest backend version: what every request can rely on.
        """
        return _jsonResponse(request, await self.aggregator.version())

    @app.route("/v1/models", methods=["GET"])
    async def models(self, request: IRequest) -> bytes:
        """
        The union of the online backends' models, OpenAI-shaped.
        """
        return _jsonResponse(request, await self.aggregator.models())

    @app.route("/v1/models/<path:model>", methods=["GET"])
    async def model(self, request: IRequest, model: str) -> bytes:
        """
        One model, OpenAI-shaped; 404 when no online backend has it.
        """
        return _jsonResponse(request, await self.aggregator.model(model))

    # --- queued: fair-share scheduled, routed by model ---

    @app.route("/api/generate", methods=["POST"])
    @app.route("/api/chat", methods=["POST"])
    @app.route("/api/embed", methods=["POST"])
    @app.route("/api/embeddings", methods=["POST"])
    @app.route("/v1/chat/completions", methods=["POST"])
    @app.route("/v1/completions", methods=["POST"])
    @app.route("/v1/embeddings", methods=["POST"])
    @app.route("/v1/messages", methods=["POST"])
    @app.route("/v1/messages/count_tokens", methods=["POST"])
    async def queued(self, request: IRequest) -> None:
        """
        A generation or embedding: wait for a fair turn and a slot, then stream.
        """
        raw = self._readBody(request)
        job, outgoing = self._prepare(request, raw, requireModel=True)
        translator = self.forwarder.translator
        if job.kinds != dialectsFor(request.path):
            # It may be translated: refuse what cannot be before it waits in a queue, and
            # answer what needs no backend (loading a model) at once.
            translation = translator.translate(request.path, json.loads(raw),
                                               outgoing.requested or "")
            if translation.local is not None:
                request.write(translator.answerLocally(request, translation))
                return
        await self.forwarder.forward(request, job, outgoing)

    @app.route("/<path:rest>", methods=list(KNOWN_METHODS))
    async def other(self, request: IRequest, rest: str) -> None:
        """
        Any other path: proxied (queued, any backend of a fitting kind) with
        C{--allow-all-routes}, else 404.
        """
        if not self.config.allowAllRoutes:
            allowed = self._allowedMethods(request.path)
            if allowed:
                raise wrongMethod(request.method, request.path, allowed)
            raise NotFound(f"no route for {request.method.decode('latin-1')} /{rest}",
                           code="unknown_route")
        job, outgoing = self._prepare(request, self._readBody(request), requireModel=False)
        await self.forwarder.forward(request, job, outgoing)

    def _allowedMethods(self, path: bytes) -> list[str]:
        """
        The methods the route table takes for C{path} (other than the catch-all).
        """
        adapter = self.app.url_map.bind("proxy")
        allowed = []
        for method in KNOWN_METHODS:
            try:
                endpoint, _ = adapter.match(path.decode("latin-1"), method=method)
            except HTTPException:
                continue
            if endpoint != "other":
                allowed.append(method)
        return allowed

    # --- routed by model, not queued ---

    @app.route("/api/show", methods=["POST"])
    async def show(self, request: IRequest) -> bytes | None:
        """
        Model details, from a backend that has the model, without waiting in a queue:
        an Ollama backend's own answer, else what an OpenAI-only backend says of it.
        """
        body = self._parseJSON(self._readBody(request))
        resolution = self._resolveModel(body, OLLAMA_ONLY | OPENAI_ONLY)
        holders = self.pool.holders(OLLAMA_ONLY, resolution.key)
        others = self.pool.holders(OPENAI_ONLY, resolution.key)
        if not holders and others:
            return _jsonResponse(request, await self.aggregator.show(others[0], resolution.requested))
        if not holders:
            raise Unavailable(f"no backend online for model {resolution.requested!r}",
                              code="no_backend", retryAfter=self.config.healthInterval)
        payload = dict(body, model=holders[0].modelName(resolution.key))
        payload.pop("name", None)
        outgoing = Outgoing(request.method, request.uri, self._backendHeaders(request),
                            json.dumps(payload).encode("utf-8"))
        await self.forwarder.tryInTurn(request, holders, outgoing)

    # --- request handling ---

    def _readBody(self, request: IRequest) -> bytes:
        """
        The request body, refused with 413 beyond C{max_body_bytes} (the front refuses
        most such bodies before they arrive; this covers bodies of unknown length). The
        request's own copy is dropped: a queued request holds one copy of its body.
        """
        limit = self.config.maxBodyBytes
        raw = request.content.read(limit + 1)
        request.content = BytesIO()
        if len(raw) > limit:
            raise BodyTooLarge(f"request body over {limit} bytes", code="body_too_large")
        return raw

    def _parseJSON(self, raw: bytes) -> dict:
        """
        A request body parsed as a JSON object; 400 when it is not one.
        """
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError) as e:
            # RecursionError: nesting deeper than the parser's stack (a hostile body).
            raise BadRequest(f"request body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise BadRequest("request body must be a JSON object", code="invalid_json")
        return body

    def _prepare(self, request: IRequest, raw: bytes,
                 requireModel: bool) -> tuple[Job, Outgoing]:
        """
        What the scheduler and the forwarder need of a request: who asks for which model
        on which dialects, and the one copy of the body it holds while it waits. The parsed
        body is dropped here (the forwarder parses it again if a backend needs it
        rewritten).

        @param requireModel: the route needs a JSON body naming a model (the queued
            routes); otherwise (C{--allow-all-routes}) a body naming none is forwarded
            as it is to any backend of a fitting dialect.
        """
        translator = self.forwarder.translator
        dialects = dialectsFor(request.path)
        resolution: Resolution | None = None
        requested: str | None = None
        if requireModel:
            body = self._parseJSON(raw)
        else:
            try:
                body = json.loads(raw) if raw else None
            except (ValueError, RecursionError):
                body = None
            if not (isinstance(body, dict) and isinstance(body.get("model"), str)):
                body = None
        if body is not None:
            resolution = self._resolveModel(body, translator.acceptable(request.path))
            requested = body.get("model", body.get("name"))
            dialects = translator.kindsFor(request.path, resolution.key, self.pool)
        headers = request.requestHeaders
        peerHost = _peerHost(request)
        who = self.identity.identify(headers, peerHost)
        job = Job(
            user=who.user,
            kinds=dialects,
            model=resolution.key if resolution is not None else None,
            peer=self.identity.clientAddress(headers, peerHost),
            size=len(raw),
        )
        outgoing = Outgoing(request.method, request.uri, self._backendHeaders(request),
                            raw if raw or requireModel else None, resolution, requested)
        return job, outgoing

    def _resolveModel(self, body: dict, dialects: frozenset[str]) -> Resolution:
        """
        The model a request names, resolved; 404 when no backend has ever listed it, or
        when the backends that have it do not speak the request's dialect.
        """
        # Ollama's older clients send "name" instead of "model" on some routes.
        requested = body.get("model", body.get("name"))
        if not isinstance(requested, str) or not requested.strip():
            raise BadRequest("missing model: set \"model\" in the request body", code="missing_model")
        resolution = self.catalog.resolve(requested)
        if not self.pool.knows(resolution.key):
            if self.pool.settled:
                raise NotFound(f"model {requested!r} not found on any backend", code="model_not_found")
            raise Unavailable(
                f"model {requested!r} not known yet: backends are starting",
                code="backends_starting",
                retryAfter=self.config.healthInterval,
            )
        if not self.pool.knows(resolution.key, dialects):
            wanted = " or ".join(sorted(_DIALECT_NAMES.get(d, d) for d in dialects))
            raise NotFound(
                f"model {requested!r} is only on backends that do not serve {wanted}",
                code="model_not_on_dialect",
            )
        return resolution

    def _backendHeaders(self, request: IRequest) -> Headers:
        """
        The client's headers for a backend, less the proxy's own credentials and controls.
        """
        drop = {b"x-admin-key", b"x-backend"}
        for name in (b"authorization", b"x-api-key"):
            # Every value counts: a repeated header must not smuggle a key through.
            values = request.requestHeaders.getRawHeaders(name, [])
            if any(self.identity.isProxyCredential(v.decode("latin-1")) for v in values):
                drop.add(name)
        return requestHeadersForBackend(request.requestHeaders, frozenset(drop))

    # --- model management: one named backend, or every online Ollama backend ---

    @app.route("/api/pull", methods=["POST"])
    @app.route("/api/push", methods=["POST"])
    @app.route("/api/create", methods=["POST"])
    @app.route("/api/copy", methods=["POST"])
    @app.route("/api/delete", methods=["DELETE"])
    @app.route("/api/blobs/<digest>", methods=["HEAD", "POST"])
    async def manage(self, request: IRequest, digest: str | None = None) -> bytes | None:
        """
        Model management goes to the backend named in C{X-Backend}, or to every online
        Ollama backend at once (so a pulled model is everywhere). A single target streams
        as usual. Several targets run concurrently and are answered when all are done: each
        backend's NDJSON lines tagged with C{"backend"}, or for C{"stream": false}
        C{{"status", "backends": {name: last answer}}}; the HTTP status is the worst.

        Blob uploads (gigabytes) are never read into memory: twisted.web spools them to a
        file (L{ollamamq.front} names it), and each backend gets its own reading of it.
        """
        self._checkAdmin(request)
        blob = digest is not None
        data = b"" if blob else self._readBody(request)
        named = request.getHeader(b"x-backend")
        if named is not None:
            try:
                target = self.pool.get(named.decode("utf-8", "replace"))
            except UnknownBackend:
                raise NotFound(f"no backend named {named.decode('utf-8', 'replace')!r}",
                               code="unknown_backend") from None
            targets = [target]
        else:
            targets = [b for b in self.pool.backends
                       if b.available and b.kind == OLLAMA_BACKEND]
        if not targets:
            raise Unavailable("no Ollama backend online", code="no_backend",
                              retryAfter=self.config.healthInterval)
        if len(targets) == 1:
            outgoing = self._managementOutgoing(request, data, blob)
            await self.forwarder.tryInTurn(request, targets, outgoing)
            return None
        return await self._fanOut(request, targets, data, blob)

    def _managementOutgoing(self, request: IRequest, data: bytes, blob: bool) -> Outgoing:
        """
        What a model-management request sends one backend: its body, or for a blob upload
        a reading of the spooled file of its own.
        """
        body: Any = data
        if blob:
            body = _blobReader(request) if request.method == b"POST" else None
        return Outgoing(request.method, request.uri, self._backendHeaders(request), body)

    def _adminError(self, headers: Headers) -> ProxyError | None:
        """
        The 401 for a request without the admin key, or L{None} when it has it (or when
        no admin key is configured: then L{_checkAdmin} asks for a local peer).
        """
        if self.config.adminKey is None or self.identity.isAdmin(headers):
            return None
        return Unauthorized(
            "this route needs the admin key (Authorization: Bearer or X-Admin-Key)",
            code="admin_only",
        )

    def _isAdmin(self, request: IRequest) -> bool:
        """
        Whether C{request} comes from the admin: it carries the admin key, or no admin key
        is configured and it comes straight from this host (a loopback peer, not relaying
        for anyone: no C{X-Forwarded-For} or C{Forwarded}).
        """
        headers = request.requestHeaders
        if self.config.adminKey is not None:
            return self.identity.isAdmin(headers)
        if headers.hasHeader(b"x-forwarded-for") or headers.hasHeader(b"forwarded"):
            return False
        peer = _peerHost(request)
        try:
            return ipaddress.ip_address(peer).is_loopback
        except ValueError:
            # No IP peer: a UNIX socket, which is on this host too.
            return peer == "local" or peer.startswith("/")

    def _checkAdmin(self, request: IRequest) -> None:
        """
        Refuse a request that is not the admin's with 401 (see L{_isAdmin}).
        """
        error = self._adminError(request.requestHeaders)
        if error is not None:
            raise error
        if not self._isAdmin(request):
            raise Unauthorized(
                "this route is for the admin: set admin_key, or ask from this host",
                code="admin_only",
            )

    async def _fanOut(self, request: IRequest, targets: list[Backend], data: bytes,
                      blob: bool) -> bytes:
        relay = self.forwarder.relay

        async def one(backend: Backend) -> tuple[int, bytes]:
            outgoing = self._managementOutgoing(request, data, blob)
            try:
                response = await relay.open(backend, outgoing.method, outgoing.target,
                                            outgoing.headers, outgoing.body)
                return response.code, await relay.collect(response, FAN_OUT_LIMIT)
            except (BackendUnreachable, BodyTooLong, ResponseFailed) as e:
                return 502, json.dumps({"error": f"backend {backend.name}: {e}"}).encode()

        results = await DeferredList(
            [ensureDeferred(one(b)) for b in targets], consumeErrors=True
        )
        if request.finished or getattr(request, "_disconnected", False):
            # The client left: cancelling the list cancelled every backend call.
            raise CancelledError()
        answers = {}
        worst = 200
        lines = []
        for backend, (ok, result) in zip(targets, results):
            code, content = result if ok else (502, b"")
            worst = max(worst, code)
            decoded = []
            for line in content.splitlines():
                try:
                    decoded.append(json.loads(line))
                except (ValueError, RecursionError):
                    pass
            answers[backend.name] = decoded[-1] if decoded else {"status": code}
            lines.extend(dict(item, backend=backend.name) for item in decoded if isinstance(item, dict))
        request.setResponseCode(worst)
        if request.method == b"HEAD":
            return b""
        streamed = True
        try:
            streamed = blob or json.loads(data or b"{}").get("stream", True) is not False
        except (ValueError, RecursionError, AttributeError):
            pass
        if streamed and lines:
            request.setHeader(b"content-type", b"application/x-ndjson")
            return b"".join(json.dumps(line).encode() + b"\n" for line in lines)
        status = "success" if worst < 300 else "error"
        return _jsonResponse(request, {"status": status, "backends": answers}, worst)



def _blobReader(request: IRequest) -> Any:
    """
    A file of its own reading a blob upload's spooled body from the start: the front
    spools blob bodies to a named file (L{ollamamq.front}); a body that was small enough
    to stay in memory is read from there.
    """
    content = request.content
    name = getattr(content, "name", None)
    if isinstance(name, str):
        return open(name, "rb")
    content.seek(0)
    return BytesIO(content.read())
